"""A checkpoint that fails on one rank stops every rank together, naming the rank, the path and the errno; the
previous checkpoint stays. (Before: the failing rank removed the folder and raised while the others waited at a
barrier, and the job hung.)"""

from __future__ import annotations

import errno
import json
from pathlib import Path

import pytest
import torch.distributed as dist
import torch.multiprocessing as mp

from llmft.rundir import checkpoints as checkpoint
from llmft.training.topology import Topology


def rank_main(rank: int, world_size: int, init_file: str, checkpoints_dir: str, results_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    topology = Topology(world_size, rank, rank, 1, "cpu")
    folder = Path(checkpoints_dir)

    def write_ok(tmp: Path) -> None:
        (tmp / f"part{rank}.bin").write_bytes(b"x" * 10)

    def write_full_disk_on_rank_1(tmp: Path) -> None:
        if rank == 1:
            raise OSError(errno.ENOSPC, "No space left on device", str(tmp / "part1.bin"))
        write_ok(tmp)

    kwargs = dict(barrier=topology.barrier, is_main=rank == 0, gather=topology.gather, rank=rank)
    checkpoint.save(folder, 1, write_ok, {"world_size": world_size}, keep_last=2, **kwargs)
    outcome = "saved"
    try:
        checkpoint.save(folder, 2, write_full_disk_on_rank_1, {"world_size": world_size}, keep_last=2, **kwargs)
    except checkpoint.CheckpointError as error:
        outcome = str(error)
    Path(results_dir, f"rank{rank}.json").write_text(json.dumps(outcome))
    dist.destroy_process_group()


@pytest.mark.timeout(120)
def test_a_rank_that_cannot_write_stops_every_rank(tmp_path):
    results = tmp_path / "results"
    results.mkdir()
    mp.spawn(rank_main, args=(2, str(tmp_path / "init"), str(tmp_path / "checkpoints"), str(results)), nprocs=2,
             join=True)
    outcomes = [json.loads((results / f"rank{r}.json").read_text()) for r in range(2)]
    for outcome in outcomes:  # both ranks stopped, with the same sentence naming rank 1, its file and ENOSPC
        assert outcome.startswith("the checkpoint of step 2 failed: rank 1 could not write"), outcome
        assert "part1.bin" in outcome and "ENOSPC" in outcome and "previous checkpoint is kept" in outcome
    latest, incomplete = checkpoint.find_latest(tmp_path / "checkpoints")
    assert latest.name == "step_1" and not incomplete  # the failed one's temporary folder is gone
