"""Shared fixtures: compose configs the way the launcher does, and run the tiny model in-process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
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
