"""How long a run trains, said and extended: a train.max_steps that the epochs cap is said when the run starts (with
the train.epochs that would reach it); a completed run resumed with more steps trains on from its last step (which the
loop checkpoints), its LR schedule re-planned and said so; a resume that gives it no more steps is refused with the
exact command that would, and that command works."""

from __future__ import annotations

import json
import re
import shlex

import pytest

from llmft.training.loop import warmup_cosine
from support.runs import read_metrics, run_llmft

RUN = ["train.epochs=1", "train.log_every=1", "train.eval_every=100", "train.micro_batch_size=4",
       "train.warmup_steps=2", "train.lr=5e-3", "train.min_lr_ratio=0.1", "peft.dropout=0"]


def one_line_refusal(result) -> str:
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1, result.stdout + result.stderr
    return result.stderr.strip()


@pytest.mark.slow
def test_a_completed_run_trains_on_with_more_steps_and_its_schedule_replanned(tmp_path):
    run_dir = tmp_path / "run"
    first = run_llmft("launch", *RUN, "train.max_steps=30", f"run_dir={run_dir}")
    assert first.returncode == 0, first.stdout[-2000:] + first.stderr[-3000:]
    # the cap from the epochs, said at the start
    said = re.search(r"train\.max_steps=30 but 1 epoch ends at step (\d+) \((\d+) samples, 4 a step\): stopping "
                     r"there; raise train\.epochs \(train\.epochs=(\d+) reaches step 30\)\.", first.stdout)
    assert said, first.stdout[-3000:]
    steps, samples, epochs = (int(x) for x in said.groups())
    assert steps == -(-samples // 4) < 30 and epochs == -(-30 * 4 // samples)
    assert json.loads((run_dir / "summary.json").read_text())["steps"] == steps
    assert (run_dir / f"checkpoints/step_{steps}/manifest.json").exists()  # the last step is checkpointed

    # no more steps: refused, naming the command that gives some
    error = one_line_refusal(run_llmft("launch", f"resume={run_dir}", "train.max_steps=30"))
    assert (f"resume={run_dir} has completed already ({steps} steps: train.max_steps=30 but 1 epoch ends at step "
            f"{steps}); to train it on: python -m llmft.launch resume={run_dir} train.max_steps=30 "
            f"train.epochs={epochs}") in error
    command = error.split("to train it on: ", 1)[1]
    plain = one_line_refusal(run_llmft("launch", f"resume={run_dir}"))
    assert f"has completed already ({steps} steps); to train it on: python -m llmft.launch resume={run_dir} " \
           f"train.max_steps={2 * steps}" in plain

    # the command given trains it on, from its last step, the LR schedule re-planned over 30 steps
    more = run_llmft("launch", *shlex.split(command)[3:])
    assert more.returncode == 0, more.stdout[-2000:] + more.stderr[-3000:]
    assert (f"resume: {run_dir} had completed {steps} steps; train.max_steps=30 train.epochs={epochs} trains it on to "
            f"step 30 from step_{steps}, its LR schedule re-planned over 30 steps") in more.stdout
    lr_next = 5e-3 * warmup_cosine(steps, 2, 30, 0.1)  # the new plan's LR for step steps + 1 (not the old plan's end)
    assert (f"resume: the LR schedule is re-planned over 30 steps instead of {steps} (warmup 2, then cosine to 0.1 x "
            f"train.lr): step {steps + 1} trains at lr {lr_next:.3g}") in more.stdout
    records = [r for r in read_metrics(run_dir) if "loss" in r]
    assert [r["step"] for r in records] == list(range(1, 31))  # every step once
    for record in records:  # the LR after each step: the first run's plan, then the new one
        total = steps if record["step"] <= steps else 30
        assert record["lr"] == pytest.approx(5e-3 * warmup_cosine(record["step"], 2, total, 0.1), rel=1e-9), record
    final = json.loads((run_dir / "summary.json").read_text())
    assert final["status"] == "completed" and final["steps"] == 30
    changed = json.loads((run_dir / "provenance.json").read_text())["resumes"][-1]["changed"]
    assert changed["train.epochs"] == [1, epochs]
