"""Runs on several local ranks: the torchrun command, and runs trained in one torchrun of support/torchrun_harness.py
(imported by test modules)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

from llmft.config.compose import compose
from llmft.rundir import create as rundir
from support.runs import REPO

COMMON = ["peft.dropout=0", "train.max_steps=8", "train.log_every=1", "train.eval_every=4", "train.save_every=4",
          "train.micro_batch_size=4", "parallelism.zero3_param_persistence_threshold=0",
          "parallelism.zero3_model_persistence_threshold=0"]
STRATEGIES = ["ddp", "fsdp", "zero2", "zero3", "zero3_offload"]


# a model read from disk (model.path): FSDP2 builds it on meta and each rank reads only its rows of each tensor
FROM_DISK = ["model=llama3_2_1b", "model.dtype=float32", "model.max_seq_len=256", "train=debug", "train.max_steps=6",
             "train.save_every=3", "train.eval_every=3", "train.micro_batch_size=2"]


HARNESS = Path(__file__).resolve().with_name("torchrun_harness.py")


def torchrun_command(nproc: int, script_args: list[str]) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", *script_args]


def harness_command(nproc: int, mode: str, out: Path, run_dirs) -> list[str]:
    """The torchrun of support/torchrun_harness.py doing `mode` on each run directory in turn, rank 0 writing `out`."""
    return torchrun_command(nproc, [str(HARNESS), mode, str(out), *map(str, run_dirs)])


def train_ranks(run_dir: Path, nproc: int, overrides: list[str]) -> dict:
    """One run on `nproc` local ranks (torchrun_harness.py's train_and_probe): its summary, probe logits and
    parameter kinds."""
    return train_ranks_batch(nproc, {run_dir: overrides})[run_dir]


def train_ranks_batch(nproc: int, runs: dict[Path, list[str]], timeout: float = 900) -> dict[Path, dict]:
    """Several runs on `nproc` local ranks, one after the other in ONE torchrun (one start-up for all: each rank's
    imports cost ~10 s of CPU), in the order given; each run's summary, probe logits and parameter kinds."""
    run_dirs = list(runs)
    for run_dir, overrides in runs.items():
        rundir.create(compose(COMMON + overrides + [f"run_dir={run_dir}", f"launch.nproc={nproc}"]))
    out = Path(run_dirs[0]).parent / f"harness-{Path(run_dirs[0]).name}.pt"
    result = subprocess.run(harness_command(nproc, "train_and_probe", out, run_dirs), cwd=REPO, capture_output=True,
                            text=True, timeout=timeout, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    results = torch.load(out, weights_only=False)
    return {run_dir: results[str(run_dir)] for run_dir in run_dirs}


class BatchInBackground:
    """train_ranks_batch, started at the first call of results() without waiting for it, so that a test can start
    its other processes (SLURM jobs) first and let them overlap; results() then waits for the torchrun."""

    def __init__(self, nproc: int, runs: dict[Path, list[str]], timeout: float = 900):
        self.nproc, self.runs, self.timeout = nproc, runs, timeout
        self.process: subprocess.Popen | None = None
        self.cached: dict[Path, dict] | None = None
        first = Path(next(iter(runs)))
        self.out, self.log = first.parent / f"harness-{first.name}.pt", first.parent / f"harness-{first.name}.log"

    def start(self) -> None:
        if self.process is None:
            for run_dir, overrides in self.runs.items():
                rundir.create(compose(COMMON + overrides + [f"run_dir={run_dir}", f"launch.nproc={self.nproc}"]))
            command = harness_command(self.nproc, "train_and_probe", self.out, self.runs)
            with open(self.log, "w") as log:
                self.process = subprocess.Popen(command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                                                env={**os.environ, "OMP_NUM_THREADS": "1"})

    def results(self) -> dict[Path, dict]:
        if self.cached is None:
            self.start()
            code = self.process.wait(timeout=self.timeout)
            assert code == 0, self.log.read_text()[-8000:]
            results = torch.load(self.out, weights_only=False)
            self.cached = {run_dir: results[str(run_dir)] for run_dir in self.runs}
        return self.cached

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()  # torchrun passes it on to its ranks
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
