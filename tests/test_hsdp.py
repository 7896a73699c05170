"""parallelism=hsdp on 4 local ranks in groups of 2 (as 2 nodes x 2 GPUs): DDP's losses, half of each parameter per
rank, the weights read from disk shard by shard on the 2-D mesh, and a DCP checkpoint that resumes on 2 ranks under fsdp. The
same on two real SLURM nodes: tests/test_two_nodes.py."""

from __future__ import annotations

import shutil

import pytest

from conftest import compose, read_metrics
from dist_runs import COMMON, train_ranks
from llmft.launch import run_dir as rundir
from llmft.training.loop import train

pytestmark = pytest.mark.slow

# a model read from disk (model.path): FSDP2 builds it on meta and each rank reads only its rows of each tensor
FROM_DISK = ["model=llama3_2_1b", "model.dtype=float32", "model.max_seq_len=256", "train=debug", "train.max_steps=6",
             "train.save_every=3", "train.eval_every=3", "train.micro_batch_size=2"]


def losses(run_dir) -> list[float]:
    return [r["loss"] for r in read_metrics(run_dir) if "loss" in r]


def test_hsdp_gives_ddp_losses_shards_within_groups_and_resumes_on_fewer_ranks(tmp_path):
    cfg = compose(COMMON + ["train.max_steps=1", "train.save_every=0", f"run_dir={tmp_path / 'tiny'}"])
    train(cfg, rundir.create(cfg))  # a base model on disk: the tiny model's, with its tokenizer
    base = [f"model.path={tmp_path / 'tiny' / 'base_model'}"]
    ddp = train_ranks(tmp_path / "ddp", 4, ["parallelism=ddp", *FROM_DISK, *base])
    hsdp = train_ranks(tmp_path / "hsdp", 4, ["parallelism=hsdp", "parallelism.shard_size=2", *FROM_DISK, *base])
    assert losses(tmp_path / "hsdp") == pytest.approx(losses(tmp_path / "ddp"), abs=1e-5)
    assert hsdp["summary"]["strategy"] == "hsdp"
    sharding = hsdp["summary"]["sharding_rank0"]
    assert hsdp["kinds"]["num_dtensor"] == hsdp["kinds"]["num_params"] > 0
    assert 0.45 * sharding["global_numel"] <= sharding["local_numel"] <= 0.55 * sharding["global_numel"]
    assert ddp["summary"]["sharding_rank0"]["local_numel"] == sharding["global_numel"]

    # the step-3 checkpoint on 2 ranks as fsdp (a job back on one node): 2 ranks x 2 x 2 accumulation steps
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copytree(tmp_path / "hsdp" / "checkpoints" / "step_3", resumed / "checkpoints" / "step_3")
    result = train_ranks(resumed, 2, ["parallelism=fsdp", *FROM_DISK, *base, "train.grad_accum_steps=2"])
    assert result["summary"]["steps"] == 6
    assert losses(resumed) == pytest.approx(losses(tmp_path / "hsdp")[3:], abs=1e-5)
