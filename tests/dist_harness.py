"""Run by tests under torchrun: for each RUN_DIR in turn, train from it, then record what the tests check on the
trained, still-sharded model (its logits on a fixed probe, and whether its parameters really are sharded); all of
it in OUT (a torch file: {run_dir: result}). Several runs share one torchrun to pay the start-up (torchrun, and each
rank importing torch, transformers and peft: ~10 s of CPU a process) once instead of once per run."""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist

from llmft.rundir.files import read_config
from llmft.training.topology import Topology
from llmft.training.loop import train

PROBE_IDS = [[5, 17, 42, 99, 7, 256, 31, 8, 64, 12]]


def parameter_kinds(model) -> dict:
    from torch.distributed.tensor import DTensor

    params = list(model.parameters())
    return {
        "num_params": len(params),
        "num_dtensor": sum(isinstance(p, DTensor) for p in params),
        "num_zero3_partitioned": sum(hasattr(p, "ds_tensor") and p.ds_tensor.numel() < p.ds_numel for p in params),
    }


def train_and_probe(run_dir: str) -> dict:
    result = train(read_config(run_dir), Path(run_dir))
    model = result.model.eval()
    kinds = parameter_kinds(model)  # before the forward: FSDP2 leaves the root's parameters unsharded after it
    with torch.no_grad():  # a collective forward for FSDP2 and ZeRO-3
        logits = model(input_ids=torch.tensor(PROBE_IDS)).logits
    return {"logits": logits, "kinds": kinds, "summary": result.summary}


def main(out: str, run_dirs: list[str]) -> None:
    results = {run_dir: train_and_probe(run_dir) for run_dir in run_dirs}
    if Topology.from_env().is_main:
        torch.save(results, out)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
