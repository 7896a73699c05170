#!/usr/bin/env python3
"""The time of a ddp checkpoint: every rank writing its share of the optimizer's moments against rank 0 writing all.

    python bench/bench_checkpoint_save.py [--params-m 100] [--ranks 2] [--repeats 3] [--dir DIR]

`--ranks` processes (gloo) each hold the same replica of `--params-m` million trained fp32 parameters and AdamW's two
moments after one step (12 bytes a parameter), and save it with llmft's own checkpoint writer
(`llmft.rundir.checkpoints.save`: files fsynced, read back for their checksums, the manifest, the rename), once as
`strategies/single.py` saves now (rank 0: the weights; every rank: its share of the moments) and once as it did
before (rank 0 alone: everything), alternately, `--repeats` times each; the medians are compared. The last line is
`checkpoint_save: parallel_vs_rank0=X` (the old time over the new: above 1 is faster). `--dir` is where the
checkpoints go (default: a temporary folder; give one on the file system to measure, e.g. $SCRATCH).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from llmft.config.compose import compose  # noqa: E402
from llmft.rundir import checkpoints  # noqa: E402
from llmft.training.strategies.single import SingleStrategy  # noqa: E402
from llmft.training.topology import Topology  # noqa: E402


def rank0_alone(strategy: SingleStrategy, folder: Path) -> None:
    """The save before: rank 0 wrote the weights and the whole optimizer state, the other ranks nothing."""
    from safetensors.torch import save_file

    if strategy.topology.is_main:
        save_file({n: p.detach().contiguous() for n, p in strategy._trainable_named().items()},
                  folder / "trainable.safetensors")
        torch.save({"optimizer": strategy.optimizer.state_dict(), "scheduler": strategy.scheduler.state_dict()},
                   folder / "optimizer.pt")


def rank_main(rank: int, world: int, params_m: int, repeats: int, root: str, results) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT="29731")
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    topology = Topology(world, rank, rank, 1, "cpu")
    torch.manual_seed(0)
    layers = torch.nn.ModuleList(torch.nn.Linear(1000, 1000, bias=False) for _ in range(params_m))
    strategy = SingleStrategy(compose([]), topology, None)
    strategy.wrap(layers, list(layers.parameters()), lambda step: 1.0)
    for param in layers.parameters():
        param.grad = torch.ones_like(param)
    strategy.step()  # AdamW's moments exist

    times = {"parallel": [], "rank0": []}
    for attempt in range(repeats):
        for name, write in (("parallel", strategy.save), ("rank0", lambda folder: rank0_alone(strategy, folder))):
            dist.barrier()
            started = time.perf_counter()
            checkpoints.save(Path(root) / name, attempt + 1, write, {}, keep_last=1, barrier=topology.barrier,
                             is_main=topology.is_main, gather=topology.gather, rank=rank)
            times[name].append(time.perf_counter() - started)
    if rank == 0:
        results.update({name: statistics.median(values) for name, values in times.items()})
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--params-m", type=int, default=100, help="trained parameters, millions")
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dir", default=None)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=args.dir) as root, mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(rank_main, args=(args.ranks, args.params_m, args.repeats, root, results), nprocs=args.ranks)
        state_gb = args.params_m * 1e6 * 12 / 1e9
        print(f"state {state_gb:.1f} GB on {args.ranks} ranks, median of {args.repeats}: every rank its share "
              f"{results['parallel']:.1f} s, rank 0 alone {results['rank0']:.1f} s")
        print(f"checkpoint_save: parallel_vs_rank0={results['rank0'] / results['parallel']:.2f}")


if __name__ == "__main__":
    main()
