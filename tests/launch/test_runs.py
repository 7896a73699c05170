"""`llmft runs` and `runs show` on the runs the suite creates: a completed one, a failed one, TensorBoard files."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from llmft.config.compose import compose
from llmft.rundir import create as rundir
from llmft.training.loop import train
from support.runs import REPO, run_llmft


def test_runs_lists_completed_and_failed_runs_and_show_draws_the_loss(tmp_path):
    bad_data = tmp_path / "bad.jsonl"
    bad_data.write_text(json.dumps({"messages": [{"role": "user", "content": "only a question"}]}) + "\n")
    # the failing launch runs while this process trains the completed run
    failed = subprocess.Popen([sys.executable, "-m", "llmft.launch", "data=chat_jsonl", f"data.path={bad_data}",
                               f"run_dir={tmp_path / 'zz-failed'}"], cwd=REPO, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, env={**os.environ, "OMP_NUM_THREADS": "1"})
    cfg = compose(["train.max_steps=12", "train.eval_every=6", "train.log_every=2", f"runs_root={tmp_path}",
                   "run_dir=null"])
    good = rundir.create(cfg)
    train(cfg, good)
    assert failed.wait(timeout=600) != 0

    listing = run_llmft("runs", str(tmp_path))
    assert listing.returncode == 0, listing.stderr
    listed = listing.stdout.splitlines()
    lines = {line.split()[0]: line for line in listed[1:]}
    assert "completed" in lines[good.name] and "12/12" in lines[good.name]
    assert "failed" in lines["zz-failed"]
    why = listed[listed.index(lines["zz-failed"]) + 1]  # the reason, on the line below the failed run
    assert why.startswith("  why: DataError: no usable conversation"), listing.stdout

    shown = run_llmft("runs", "show", str(good))
    assert shown.returncode == 0 and "loss curve" in shown.stdout
    png = good / "loss.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "error:" in run_llmft("runs", "show", str(tmp_path / "zz-failed")).stdout


def test_tensorboard_event_files_are_readable_by_tensorboard(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = compose(["train.max_steps=6", "train.eval_every=3", "train.log_every=1", f"run_dir={tmp_path / 'r'}"])
    run_dir = rundir.create(cfg)
    train(cfg, run_dir)
    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    assert len(events.Scalars("train/loss")) == 6
    assert [s.step for s in events.Scalars("val/val_loss")] == [3, 6]
