"""One writer per run directory: a second launch into a live run is refused naming its holder, a stale lock is taken
over with a message; Ctrl-C checkpoints, says how to resume and releases the lock; the ranks die with their launcher
(kill -9 of its process group), and the run resumes at once."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from llmft.rundir import lock as run_lock
from support.runs import REPO, read_metrics, run_llmft, wait_for_step

QUICK = ["train.log_every=1", "train.eval_every=100", "train.micro_batch_size=4"]


def launch(run_dir: Path, *overrides: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "llmft.launch", *QUICK, *overrides, f"run_dir={run_dir}"],
                            cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)


@pytest.mark.slow
def test_a_second_writer_is_refused_while_the_first_lives_then_ctrl_c_checkpoints_and_ranks_die_with_their_launcher(
        tmp_path):
    """Two scenarios at once, each on its own run directory (one process for the first, 2 ranks for the second:
    each leaves a core idle most of the time when alone)."""
    from concurrent.futures import ThreadPoolExecutor

    (tmp_path / "writer").mkdir()
    (tmp_path / "ranks").mkdir()
    with ThreadPoolExecutor(1) as pool:
        ranks = pool.submit(ranks_die_with_their_launcher, tmp_path / "ranks")
        a_second_writer_is_refused_while_the_first_lives_then_ctrl_c_checkpoints(tmp_path / "writer")
        ranks.result()  # its assertion error, if any


def a_second_writer_is_refused_while_the_first_lives_then_ctrl_c_checkpoints(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    first = launch(run_dir, "train.max_steps=300", "train.save_every=0")
    wait_for_step(run_dir, 3, first)
    for second in (["resume=" + str(run_dir)], [f"run_dir={run_dir}"]):
        refused = run_llmft("launch", *second, timeout=120)
        assert refused.returncode == 2 and len(refused.stderr.strip().splitlines()) == 1, refused.stderr
        assert f"{run_dir} is in use by process {first.pid}" in refused.stderr
    first.send_signal(signal.SIGINT)  # Ctrl-C: a checkpoint, a summary, the resume command
    out, err = first.communicate(timeout=120)
    assert first.returncode == 3 and f"resume={run_dir}" in err, err[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "interrupted" and summary["signal"] == "SIGINT"
    assert (run_dir / f"checkpoints/step_{summary['step']}/manifest.json").exists()
    assert not run_lock.lock_path(run_dir).exists()  # released at exit
    # resume: says from which step, applies what a resume may change, never writes a step twice
    resumed = run_llmft("launch", f"resume={run_dir}", f"train.max_steps={summary['step'] + 2}", timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resume: {run_dir} from step {summary['step']}" in resumed.stdout
    steps = [r["step"] for r in read_metrics(run_dir) if "loss" in r]
    assert steps == list(range(1, summary["step"] + 3))


def test_a_stale_lock_is_taken_over_with_a_message(tmp_path):
    run_lock.lock_path(tmp_path).write_text(json.dumps({"host": os.uname().nodename, "pid": 2**22 + 7,
                                                         "job_id": None, "since": "earlier"}))
    messages = []
    holder = run_lock.acquire(tmp_path, log=messages.append)
    assert holder["pid"] == os.getpid() and "taking over the stale lock" in messages[0]
    other_host = {"host": "another-node", "pid": 1, "job_id": None, "since": "now"}
    run_lock.lock_path(tmp_path).write_text(json.dumps(other_host))  # fresh: alive by its heartbeat
    with pytest.raises(run_lock.RunDirectoryInUse, match="in use by process 1 on another-node"):
        run_lock.acquire(tmp_path)


def ranks_die_with_their_launcher(tmp_path: Path) -> None:
    """kill -9 of the launcher's whole process group: torchrun and the ranks (each in a session of its own) stop."""
    run_dir = tmp_path / "run"
    launcher = launch(run_dir, "parallelism=ddp", "launch.nproc=2", "train.max_steps=400", "train.save_every=0")
    wait_for_step(run_dir, 2, launcher)
    family = psutil.Process(launcher.pid).children(recursive=True)
    ranks = [p for p in family if "llmft.train" in " ".join(p.cmdline())]
    assert len(ranks) >= 2
    os.killpg(launcher.pid, signal.SIGKILL)
    launcher.communicate(timeout=30)
    gone, alive = psutil.wait_procs(family, timeout=90)
    assert not alive, [p.cmdline() for p in alive]
    # and the run can be resumed at once: the lock's holder is dead
    resumed = run_llmft("launch", f"resume={run_dir}", "train.max_steps=3", timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
