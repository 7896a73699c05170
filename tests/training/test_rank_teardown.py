"""A rank whose work is done ends with its own exit code, whatever the interpreter's teardown would do.

The fault: tests/support/teardown_abort, a sitecustomize that aborts a rank (SIGABRT) while the interpreter tears
down, as a library's leftover C++ threads did once to a completed ZeRO-3 run ("terminate called without an active
exception"). The SLURM side (a submitit task, and the evaluation job that waits on its success) is in
tests/cluster/test_slurm.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from support.runs import REPO, run_llmft

INJECTOR = REPO / "tests/support/teardown_abort"
ABORTING = {"PYTHONPATH": str(INJECTOR)}


def test_the_injector_aborts_a_rank_in_its_teardown():
    """The fault is real: a plain Python process with LOCAL_RANK ends with SIGABRT after printing its answer."""
    plain = subprocess.run([sys.executable, "-c", "print('done')"], capture_output=True, text=True, timeout=60,
                           env={**os.environ, **ABORTING, "LOCAL_RANK": "0"})
    assert plain.stdout == "done\n" and plain.returncode == -6, (plain.returncode, plain.stderr)


def test_a_completed_two_rank_run_succeeds_though_its_ranks_would_abort_in_teardown(tmp_path):
    run_dir = tmp_path / "run"
    result = run_llmft("launch", "parallelism=ddp", "launch.nproc=2", "train.max_steps=2", "train.eval_every=100",
                       "train.save_every=0", "peft.dropout=0", f"run_dir={run_dir}", env=ABORTING)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    assert json.loads((run_dir / "summary.json").read_text())["status"] == "completed"
    assert (run_dir / "final").is_dir()


def test_a_rank_that_fails_keeps_its_exit_code():
    """Skipping the teardown must not turn a failure into a success, nor into the abort."""
    result = run_llmft("train", "/nonexistent-run-dir", env={**ABORTING, "LOCAL_RANK": "0"})
    assert result.returncode == 2 and "does not exist" in result.stderr, (result.returncode, result.stderr)


ENDS_WITH_WORK_IN_THREADS = r"""
import sys, threading, time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from llmft.rundir.lifetime import end_rank

folder = Path(sys.argv[1])
def later(name):
    time.sleep(0.5)
    (folder / name).write_text("done")
threading.Thread(target=later, args=("thread",)).start()
ThreadPoolExecutor(1).submit(later, "pool")  # never shut down: the interpreter's exit hook does it
print("main done", flush=True)
end_rank(3)
"""


def test_the_end_of_a_rank_waits_for_the_threads_the_interpreter_would_wait_for(tmp_path):
    """What is skipped is the teardown alone: a non-daemon thread and a thread pool's job finish, the code is kept."""
    ended = subprocess.run([sys.executable, "-c", ENDS_WITH_WORK_IN_THREADS, str(tmp_path)], capture_output=True,
                           text=True, timeout=60, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert ended.returncode == 3 and ended.stdout == "main done\n", (ended.returncode, ended.stdout, ended.stderr)
    assert (tmp_path / "thread").read_text() == "done" and (tmp_path / "pool").read_text() == "done"
