"""A stop at the time limit that SLURM's USR2 margin would not leave time for: said once, and the run stops itself
early enough, checkpointed and requeued. The job's end is asked of the real local SLURM."""

from __future__ import annotations

import json
import os
import subprocess
import time

import pytest

from llmft.training import loop, signals, time_limit
from llmft.training.time_limit import TimeLimit, advised_margin_s, job_end_time


def test_a_margin_shorter_than_a_stop_is_said_once_with_the_margin_to_give():
    said = []
    watch = TimeLimit(120, end_time=None, log=said.append, expected_save_s=500)
    watch.seconds.update(step=40.0, validation=0.0)
    with watch.timed("validation"):
        pass
    assert said == []  # an estimated save is not a measured one
    with watch.timed("save"):
        watch.seconds["step"] = 40.0
    assert said == []  # a quick save: 40 s + 10 s for the requeue fit in 120 s
    watch.seconds["save"] = 95.0  # as measured on a slow file system
    with watch.timed("validation"):
        time.sleep(0.01)
    assert len(said) == 1 and "a stop costs 145 s here" in said[0] and "(cluster.signal_delay_s)" in said[0]
    assert f"cluster.signal_delay_s={advised_margin_s(145)}" in said[0] and advised_margin_s(145) == 240
    assert "the job's end is unknown here" in said[0] and not watch.near()
    with watch.timed("step"):
        pass
    assert len(said) == 1  # once


def test_near_only_when_the_margin_is_short_and_the_end_is_closer_than_a_stop():
    now = 1_000_000.0
    short = TimeLimit(120, end_time=now + 330, log=lambda line: None, expected_save_s=200)
    assert not short.near(now)  # 1.5 x 210 s = 315 s needed, 330 s left
    assert short.near(now + 20)
    enough = TimeLimit(120, end_time=now + 10, log=lambda line: None, expected_save_s=5)
    assert not enough.near(now)  # the USR2 margin covers it: SLURM's signal does the stop
    unknown = TimeLimit(120, end_time=None, log=lambda line: None, expected_save_s=500)
    assert not unknown.near(now)


def test_the_job_end_comes_from_the_real_squeue():
    from support.slurm_cluster import ensure_local_slurm

    env = ensure_local_slurm()
    submitted = subprocess.run(["sbatch", "--parsable", "--time=7", "--output=/dev/null", "--wrap", "sleep 120"],
                               env=env, capture_output=True, text=True, check=True)
    job_id = submitted.stdout.strip().split(";")[0]
    try:
        deadline = time.time() + 60
        while time.time() < deadline:
            state = subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%T"], env=env, capture_output=True,
                                   text=True).stdout.strip()
            if state == "RUNNING":
                break
            time.sleep(0.5)
        started = time.time()
        saved = {key: os.environ.get(key) for key in env}
        os.environ.update(env)
        try:
            end = job_end_time(job_id)
        finally:
            for key, value in saved.items():
                os.environ.pop(key) if value is None else os.environ.__setitem__(key, value)
        assert end is not None and abs(end - (started + 7 * 60)) < 90
        assert job_end_time("999999") is None
    finally:
        subprocess.run(["scancel", job_id], env=env)


def test_a_run_near_its_end_stops_itself_checkpointed_and_requeued(tmp_path, monkeypatch, capsys):
    """The tiny model's stop costs about a second: a 0.05 s USR2 margin is short for it, and the job ends 6 s into
    training. The run must stop on its own before that end, with the checkpoint of its last step."""
    from llmft.config.compose import compose
    from llmft.rundir import checkpoints, create as rundir

    end = {}
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    monkeypatch.setattr(time_limit, "REQUEUE_S", 0)
    monkeypatch.setattr(loop, "job_end_time", lambda job_id: end.setdefault("at", time.time() + 6))
    monkeypatch.setattr(loop, "TimeLimit", lambda margin, end_time, log, expected: TimeLimit(0.05, end_time, log,
                                                                                            expected))
    requeued = []
    monkeypatch.setattr(loop, "requeue_slurm_job", lambda limit, topology: requeued.append(limit) or True)
    cfg = compose(["train.max_steps=100000", "train.save_every=2", "train.eval_every=3", f"run_dir={tmp_path}"])
    created = rundir.create(cfg)
    with pytest.raises(signals.Interrupted) as stopped:
        loop.train(cfg, created)
    finished = time.time()
    out = capsys.readouterr().out
    assert stopped.value.signal_name == "the job's time limit" and stopped.value.requeued and requeued == [3]
    assert finished < end["at"]  # before SLURM's SIGKILL
    assert out.count("time limit: a stop costs") == 1 and "time limit: the job ends in" in out
    latest, _ = checkpoints.find_latest(created / "checkpoints")
    assert latest is not None and latest.name == f"step_{stopped.value.step}"
    summary = stopped.value.summary(created)
    assert summary["status"] == "requeued" and "stopped by the job's time limit at step" in summary["message"]
    json.dumps(summary)
