"""Shared fixtures: compose configs the way the launcher does, and run the tiny model in-process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from llmft.config.compose import compose  # noqa: F401  (the fixtures' and the tests' composition)

REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("OMP_NUM_THREADS", "1")


def run_llmft(module: str, *args: str, timeout: float = 600, env: dict | None = None) -> subprocess.CompletedProcess:
    """`python -m llmft.<module> args...` in a subprocess, as a user types it."""
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run([sys.executable, "-m", f"llmft.{module}", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=timeout, env=full_env)


def wait_for_step(run_dir: Path, step: int, process: subprocess.Popen, timeout: float = 300) -> None:
    """Until the run in `process` has logged the loss of `step` (the process must stay alive meanwhile)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert process.poll() is None, process.communicate()
        if (run_dir / "metrics.jsonl").exists() and any(r.get("step", 0) >= step for r in read_metrics(run_dir)
                                                        if "loss" in r):
            return
        time.sleep(0.05)
    raise TimeoutError(f"{run_dir} never reached step {step}")


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture
def compose_config():
    return compose


def write_chat_jsonl(path: Path, conversations: list[list[tuple[str, str]]]) -> Path:
    with open(path, "w") as handle:
        for conversation in conversations:
            handle.write(json.dumps({"messages": [{"role": r, "content": c} for r, c in conversation]}) + "\n")
    return path


@pytest.fixture(scope="session")
def local_four_rank_runs(tmp_path_factory):
    """The local 4-rank runs of a model read from disk (dist_runs.FROM_DISK), once for the session: ddp, and hsdp in
    groups of 2 (as 2 nodes x 2 GPUs), in one torchrun. tests/test_hsdp.py checks them, and tests/test_two_nodes.py
    compares its 2-node x 2-task SLURM jobs of the same config with the ddp run. Yields (base model folder,
    {"ddp": run_dir, "hsdp": run_dir}, a dist_runs.BatchInBackground): its results() starts the torchrun (unless
    started) and waits for it, so a test that submits jobs first has them overlap."""
    from dist_runs import COMMON, FROM_DISK, BatchInBackground
    from llmft.launch import run_dir as rundir
    from llmft.training.loop import train

    root = tmp_path_factory.mktemp("four_ranks")
    cfg = compose(COMMON + ["train.max_steps=1", "train.save_every=0", f"run_dir={root / 'tiny'}"])
    train(cfg, rundir.create(cfg))  # a base model on disk: the tiny model's, with its tokenizer
    base = root / "tiny" / "base_model"
    run_dirs = {"ddp": root / "ddp", "hsdp": root / "hsdp"}
    on_disk = [*FROM_DISK, f"model.path={base}"]
    runs = BatchInBackground(4, {run_dirs["ddp"]: ["parallelism=ddp", *on_disk],
                                 run_dirs["hsdp"]: ["parallelism=hsdp", "parallelism.shard_size=2", *on_disk]})
    yield base, run_dirs, runs
    runs.stop()
