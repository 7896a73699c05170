"""Running llmft as a user does, and reading what a run wrote."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


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


def write_chat_jsonl(path: Path, conversations: list[list[tuple[str, str]]]) -> Path:
    with open(path, "w") as handle:
        for conversation in conversations:
            handle.write(json.dumps({"messages": [{"role": r, "content": c} for r, c in conversation]}) + "\n")
    return path


def trained_in_process(overrides: list[str], run_dir: Path) -> Path:
    """A run of `overrides` into `run_dir`, trained in this process (one rank): its run directory."""
    from llmft.config.compose import compose
    from llmft.rundir import create as rundir
    from llmft.training.loop import train

    cfg = compose([*overrides, f"run_dir={run_dir}"])
    created = rundir.create(cfg)
    train(cfg, created)
    return created
