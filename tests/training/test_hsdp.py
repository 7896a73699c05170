"""parallelism=hsdp on 4 local ranks in groups of 2 (as 2 nodes x 2 GPUs): DDP's losses, half of each parameter per
rank, the weights read from disk shard by shard on the 2-D mesh, and a DCP checkpoint that resumes on 2 ranks under
fsdp. The same on two real SLURM nodes: tests/cluster/test_two_nodes.py."""

from __future__ import annotations

import shutil

import pytest

from support.runs import read_metrics
from support.torchrun import FROM_DISK, train_ranks

pytestmark = pytest.mark.slow


def losses(run_dir) -> list[float]:
    return [r["loss"] for r in read_metrics(run_dir) if "loss" in r]


def test_hsdp_gives_ddp_losses_shards_within_groups_and_resumes_on_fewer_ranks(local_four_rank_runs, tmp_path):
    base, run_dirs, runs = local_four_rank_runs  # ddp and hsdp on 4 ranks, a model read from disk (conftest.py)
    results = runs.results()
    ddp, hsdp = results[run_dirs["ddp"]], results[run_dirs["hsdp"]]
    assert losses(run_dirs["hsdp"]) == pytest.approx(losses(run_dirs["ddp"]), abs=1e-5)
    assert hsdp["summary"]["strategy"] == "hsdp"
    sharding = hsdp["summary"]["sharding_rank0"]
    assert hsdp["kinds"]["num_dtensor"] == hsdp["kinds"]["num_params"] > 0
    assert 0.45 * sharding["global_numel"] <= sharding["local_numel"] <= 0.55 * sharding["global_numel"]
    assert ddp["summary"]["sharding_rank0"]["local_numel"] == sharding["global_numel"]

    # the step-3 checkpoint on 2 ranks as fsdp (a job back on one node): 2 ranks x 2 x 2 accumulation steps
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copytree(run_dirs["hsdp"] / "checkpoints" / "step_3", resumed / "checkpoints" / "step_3")
    result = train_ranks(resumed, 2, ["parallelism=fsdp", *FROM_DISK, f"model.path={base}",
                                      "train.grad_accum_steps=2"])
    assert result["summary"]["steps"] == 6
    assert losses(resumed) == pytest.approx(losses(run_dirs["hsdp"])[3:], abs=1e-5)
