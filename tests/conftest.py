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
# The suite starts some 300 Python processes, each importing llmft: compiled once into __pycache__ (git ignores it),
# not again in every process where the environment says PYTHONDONTWRITEBYTECODE (some sandboxes and CI images do).
os.environ.pop("PYTHONDONTWRITEBYTECODE", None)
sys.dont_write_bytecode = False


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


class EarlyCommand:
    """A test's subprocess started as soon as the tests are collected (pytest_collection_finish), when that test is
    among them, so that it runs on the core that the earlier single-process tests leave idle; the test takes its
    result with finished(). Its folder is a temporary one, removed at the end of the session."""

    def __init__(self, argv_of, timeout: float):
        self.argv_of, self.timeout = argv_of, timeout
        self.process: subprocess.Popen | None = None
        self.folder: Path | None = None
        self.result: subprocess.CompletedProcess | None = None

    def start(self) -> None:
        import tempfile

        if self.process is None:
            self.folder = Path(tempfile.mkdtemp(prefix="llmft-early-"))
            self.argv = self.argv_of(self.folder)
            self.started = time.time()
            with open(self.folder / "stdout", "w") as out, open(self.folder / "stderr", "w") as err:  # no pipe
                self.process = subprocess.Popen(self.argv, cwd=REPO, stdout=out, stderr=err,  # to fill and block
                                                env={**os.environ, "OMP_NUM_THREADS": "1"})

    def finished(self) -> subprocess.CompletedProcess:
        """The command's result (as subprocess.run gives it), waiting for it; its timeout counts from its start."""
        self.start()
        if self.result is None:
            try:
                self.process.wait(timeout=max(1.0, self.started + self.timeout - time.time()))
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
                raise
            self.result = subprocess.CompletedProcess(self.argv, self.process.returncode,
                                                      (self.folder / "stdout").read_text(),
                                                      (self.folder / "stderr").read_text())
        return self.result

    def stop(self) -> None:
        import shutil

        if self.process is not None and self.process.poll() is None:
            self.process.terminate()  # a torchrun passes it on to its ranks
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self.folder is not None:
            shutil.rmtree(self.folder, ignore_errors=True)


# test node id -> its early command (argv_of(folder) prepares what the command needs in its folder and returns its
# argv), registered by the test modules as they are collected: README command 1 (test_train.py), the torchrun of
# test_loss_strategies.py, the local sweep of test_sweep.py.
EARLY: dict[str, EarlyCommand] = {}


def pytest_collection_finish(session):
    selected = {item.nodeid for item in session.items}
    for nodeid, command in EARLY.items():
        if nodeid in selected:
            command.start()


def pytest_sessionfinish(session):
    for command in EARLY.values():
        command.stop()


@pytest.fixture
def early_command(request) -> EarlyCommand:
    """The EarlyCommand of this test (started at collection, or now if it was not)."""
    return EARLY[request.node.nodeid]


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
    from llmft.rundir import create as rundir
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
