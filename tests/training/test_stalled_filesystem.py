"""A run whose file system stalls for real during a save (tests/support/stalling_fs.py: a FUSE file system whose
writes block in the kernel), not a sleep injected in the writer.

What llmft promises there (docs/checkpoints-and-resuming.md, "A stalled file system"): the save watchdog prints its
one sentence once train.save_timeout_min has passed, naming the rank, the step and the wait; the checkpoint before
is intact; once the file system answers the run ends, and resume continues from that checkpoint to the end. What it
cannot do (measured here too): end the rank while the kernel holds its write, so the process lives until then.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from support.runs import REPO, read_metrics, run_llmft
from support.stalling_fs import stalling_mount

RUN = ["train.max_steps=6", "train.save_every=2", "train.save_timeout_min=0.05", "train.log_every=100",
       "train.eval_every=100"]


def wait_until(condition, timeout: float, what: str, process: subprocess.Popen, log: Path) -> None:
    deadline = time.time() + timeout
    while not condition():
        assert process.poll() is None or condition(), f"the run ended before {what}: {log.read_text()[-3000:]}"
        assert time.time() < deadline, f"no {what} after {timeout:.0f} s: {log.read_text()[-3000:]}"
        time.sleep(0.1)


def states_of_tree(pid: int) -> list[str]:
    """The scheduler state (R, S, D...) of `pid` and of its descendants."""
    states, pending = [], [pid]
    while pending:
        current = pending.pop()
        try:
            states.append(Path(f"/proc/{current}/stat").read_text().rsplit(")", 1)[1].split()[0])
            children = Path(f"/proc/{current}/task/{current}/children").read_text().split()
        except OSError:
            continue
        pending += [int(child) for child in children]
    return states


@pytest.mark.skipif(os.geteuid() != 0, reason="mounts a FUSE file system: needs root")
@pytest.mark.slow
def test_a_save_on_a_stalled_file_system_says_so_then_the_run_resumes_once_it_answers(tmp_path):
    with stalling_mount(tmp_path) as (mount, stall):
        run_dir, log = mount / "run", tmp_path / "run.log"
        with open(log, "w") as output:
            process = subprocess.Popen([sys.executable, "-m", "llmft.launch", *RUN, f"run_dir={run_dir}"], cwd=REPO,
                                       stdout=output, stderr=subprocess.STDOUT, start_new_session=True,
                                       env={**os.environ, "OMP_NUM_THREADS": "1"})
        try:
            wait_until(lambda: (run_dir / "checkpoints/step_2/manifest.json").exists(), 300, "checkpoint of step 2",
                       process, log)
            stall.touch()  # the save of step 4 blocks in the kernel
            sentence = "llmft: rank 0 has waited "
            wait_until(lambda: sentence in log.read_text(), 60, "stall sentence", process, log)
            line = next(line for line in log.read_text().splitlines() if sentence in line)
            assert " s on the checkpoint of step 4, " in line and ("longer than train.save_timeout_min=0.05: its file "
                                                                   "system seems stalled, so this rank ends now") in line
            # the watchdog has called os._exit, and yet the rank lives on, its writing thread in the kernel (D)
            time.sleep(2)
            assert process.poll() is None and "D" in states_of_tree(process.pid), states_of_tree(process.pid)
        finally:
            stall.unlink(missing_ok=True)  # the file system answers again
        returncode = process.wait(timeout=120)
        assert returncode != 0, log.read_text()[-3000:]
        assert json.loads((run_dir / "checkpoints/step_2/manifest.json").read_text())["step"] == 2
        assert not (run_dir / "checkpoints/step_4").exists()

        resumed = run_llmft("launch", f"resume={run_dir}", timeout=300)
        assert resumed.returncode == 0, resumed.stderr[-3000:]
        assert "resume: from " in resumed.stdout + resumed.stderr and "(step 2," in resumed.stdout + resumed.stderr
        assert json.loads((run_dir / "summary.json").read_text())["status"] == "completed"
        assert [r["step"] for r in read_metrics(run_dir) if "loss" in r][-1] == 6


@pytest.mark.skipif(os.geteuid() != 0, reason="mounts a FUSE file system: needs root")
@pytest.mark.slow
def test_a_stall_between_saves_is_named_too_where_one_rank_has_no_collective_timeout(tmp_path):
    """The file system stalls while the run writes its metrics (one rank: nothing else would ever end it); the rank
    says what it was writing and for how long, instead of hanging until the job's time limit."""
    with stalling_mount(tmp_path) as (mount, stall):
        run_dir, log = mount / "run", tmp_path / "run.log"
        with open(log, "w") as output:
            process = subprocess.Popen([sys.executable, "-m", "llmft.launch", "train.max_steps=100000",
                                        "train.save_every=0", "train.log_every=1", "train.eval_every=100000",
                                        "train.save_timeout_min=0.05", f"run_dir={run_dir}"], cwd=REPO,
                                       stdout=output, stderr=subprocess.STDOUT, start_new_session=True,
                                       env={**os.environ, "OMP_NUM_THREADS": "1"})
        try:
            wait_until(lambda: (run_dir / "metrics.jsonl").exists() and len(read_metrics(run_dir)) >= 2, 300,
                       "the metrics of step 2", process, log)
            stall.touch()
            stalled_at = time.time()
            sentence = "llmft: rank 0 has waited "
            wait_until(lambda: sentence in log.read_text(), 60, "stall sentence", process, log)
            said_after = time.time() - stalled_at
            line = next(line for line in log.read_text().splitlines() if sentence in line)
        finally:
            stall.unlink(missing_ok=True)
        assert process.wait(timeout=120) != 0
    assert said_after < 3 + 5 + 10, said_after  # the limit, the watcher's grace, and the next write's wait at most
    assert "writing the metrics of step " in line and f"{run_dir / 'metrics.jsonl'}, TensorBoard)" in line, line
    assert "longer than train.save_timeout_min=0.05: its file system seems stalled" in line, line
