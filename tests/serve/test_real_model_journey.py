"""What the docs run on the real SmolLM2-135M-Instruct folder `python -m llmft.models get` makes, as they show it:
docs/models.md's few LoRA steps on the tickets, and the README's "A real model in 15 minutes": train on the acronym
experiment (a few steps here; bench/bench_outcome.py trains it in full and measures the outcome), evaluate base and
tuned side by side, chat with the run. The commands run in the background as soon as the folder is converted
(support.models_get.RealModelRun, whose README run test_gguf_read_by_transformers.py exports too)."""

from __future__ import annotations

import json
import math

import pytest

from support.models_get import converted, real_model_run  # noqa: F401  (the session's folder and run)
from support.runs import read_metrics


@pytest.mark.slow
def test_three_lora_steps_on_the_folder_give_a_finite_held_out_loss(real_model_run):  # noqa: F811
    result, run_dir = real_model_run.finished()["tickets"], real_model_run.work / "tickets"
    assert result.returncode == 0, result.stderr[-3000:]
    assert "model=smollm2_135m peft=lora" in result.stdout + result.stderr
    losses = [r["val_loss"] for r in read_metrics(run_dir) if "val_loss" in r]
    assert losses and all(math.isfinite(loss) for loss in losses), losses
    train = [r["loss"] for r in read_metrics(run_dir) if "loss" in r]
    assert train and all(math.isfinite(loss) for loss in train)
    # a pretrained model on in-domain English and French: far below a random model's ln(49152) = 10.8 nats
    assert max(losses) < 5, losses


@pytest.mark.slow
def test_get_train_evaluate_and_chat_on_the_real_model(real_model_run):  # noqa: F811
    results = real_model_run.finished()
    launched = results["launch"]
    assert launched.returncode == 0, launched.stderr[-3000:]
    run_dir = real_model_run.run_dir  # the launch's last line: "run dir: RUN_DIR", under runs_root=
    assert run_dir.parent == real_model_run.work / "runs", launched.stdout[-2000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "completed"

    evaluated = results["eval"]
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    rows = {line.strip().split("  ")[0]: line.split() for line in evaluated.stdout.splitlines() if "  " in line}
    assert "right expansion, taught acronyms (0-1)" in rows and "answer loss (nats/token)" in rows, evaluated.stdout
    report = json.loads((run_dir / "eval/report.json").read_text())
    assert report["num_samples"] == 6 and set(report["metrics"]) == {"base", "finetuned"}
    assert all(s["expected"] for s in report["samples"])
    losses = {name: report["metrics"][name]["answer_loss"] for name in ("base", "finetuned")}
    assert losses["finetuned"] < 0.95 * losses["base"], losses  # three steps already make the answers likelier

    chatted = results["chat"]
    assert chatted.returncode == 0, chatted.stderr[-3000:]
    assert chatted.stdout.strip()  # three steps teach little: the full experiment's answers are in BENCHMARKS.md
