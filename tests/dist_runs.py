"""Helpers for the tests that train on several local ranks with torchrun (imported by test modules)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

from conftest import REPO, compose
from llmft.launch import run_dir as rundir

COMMON = ["peft.dropout=0", "train.max_steps=8", "train.log_every=1", "train.eval_every=4", "train.save_every=4",
          "train.micro_batch_size=4", "parallelism.zero3_param_persistence_threshold=0",
          "parallelism.zero3_model_persistence_threshold=0"]
STRATEGIES = ["ddp", "fsdp", "zero2", "zero3", "zero3_offload"]


def torchrun(nproc: int, script_args: list[str], timeout: float = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
               *script_args]
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return result


def train_ranks(run_dir: Path, nproc: int, overrides: list[str]) -> dict:
    cfg = compose(COMMON + overrides + [f"run_dir={run_dir}", f"launch.nproc={nproc}"])
    rundir.create(cfg)
    out = run_dir / "harness.pt"
    torchrun(nproc, [str(REPO / "tests/dist_harness.py"), str(run_dir), str(out)])
    return torch.load(out, weights_only=False)
