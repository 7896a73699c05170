"""Hooks and fixtures of the whole suite: the run order of the test files, the early commands, the local 4-rank
runs shared by training/test_hsdp.py and cluster/test_two_nodes.py. What the tests share otherwise is in support/."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from llmft.config.compose import compose
from support.order import RUN_ORDER
from support.early import EARLY, EarlyCommand

TESTS = Path(__file__).resolve().parent
os.environ.setdefault("OMP_NUM_THREADS", "1")
# The suite starts some 300 Python processes, each importing llmft: compiled once into __pycache__ (git ignores it),
# not again in every process where the environment says PYTHONDONTWRITEBYTECODE (some sandboxes and CI images do).
os.environ.pop("PYTHONDONTWRITEBYTECODE", None)
sys.dont_write_bytecode = False



def pytest_collection_modifyitems(items):
    rank = {path: i for i, path in enumerate(RUN_ORDER)}

    def file_rank(item) -> int:
        try:
            return rank.get(item.path.relative_to(TESTS).as_posix(), len(RUN_ORDER))
        except ValueError:  # a test file outside tests/
            return len(RUN_ORDER)

    items.sort(key=file_rank)  # stable: a file's tests keep their order


# Session fixtures whose torchrun trains in the background, started at the first test of the file named here (one whose
# tests leave a core idle, long before the first test that needs them: measured in a full run), when a selected test
# takes them; otherwise the first test that takes one starts it.
START_WITH = {"local_four_rank_runs": "serve/test_eval.py"}
_STARTED_WITH: dict[str, str] = {}  # START_WITH's fixtures that the selected tests take -> the file


_DEFERRED: list[EarlyCommand] = []  # early commands of selected tests that start with a file of their own


def pytest_collection_finish(session):
    selected = {item.nodeid for item in session.items}
    selected_files = {item.path for item in session.items}
    for nodeid, command in EARLY.items():
        if nodeid in selected and command.start_with is None:
            command.start()
        elif nodeid in selected and TESTS / command.start_with in selected_files and command not in _DEFERRED:
            _DEFERRED.append(command)
    for name, path in START_WITH.items():
        if any(name in getattr(item, "fixturenames", ()) for item in session.items):
            _STARTED_WITH[name] = path


@pytest.fixture(autouse=True)
def start_background_fixtures(request):
    """START_WITH's fixtures and the deferred early commands, started at the first test of their file."""
    for name, path in list(_STARTED_WITH.items()):
        if request.node.path == TESTS / path:
            del _STARTED_WITH[name]
            request.getfixturevalue(name)[-1].start()
    for command in list(_DEFERRED):
        if request.node.path == TESTS / command.start_with:
            _DEFERRED.remove(command)
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


@pytest.fixture(scope="session")
def local_four_rank_runs(tmp_path_factory):
    """The local 4-rank runs of a model read from disk (support.torchrun.FROM_DISK), once for the session: ddp, and
    hsdp in groups of 2 (as 2 nodes x 2 GPUs), in one torchrun. training/test_hsdp.py checks them, and
    cluster/test_two_nodes.py compares its 2-node x 2-task SLURM jobs of the same config with the ddp run. Yields
    (base model folder, {"ddp": run_dir, "hsdp": run_dir}, a support.torchrun.BatchInBackground): its results()
    starts the torchrun (unless started) and waits for it, so a test that submits jobs first has them overlap."""
    from llmft.rundir import create as rundir
    from llmft.training.loop import train
    from support.torchrun import COMMON, FROM_DISK, BatchInBackground

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
