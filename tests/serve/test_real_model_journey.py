"""The README's "A real model in 15 minutes", on the real SmolLM2-135M-Instruct folder `python -m llmft.models get`
makes: train on the acronym experiment (a few steps here; bench/bench_outcome.py trains it in full and measures
the outcome), evaluate base and tuned side by side, chat with the run. The commands as the README shows them, run in
the background as soon as the folder is converted (support.models_get.RealModelRun, whose run
test_gguf_read_by_transformers.py exports too)."""

from __future__ import annotations

import json

import pytest

from support.models_get import converted, real_model_run  # noqa: F401  (the session's folder and run)


@pytest.mark.slow
def test_get_train_evaluate_and_chat_on_the_real_model(real_model_run):  # noqa: F811
    results = real_model_run.finished()
    launched = results["launch"]
    assert launched.returncode == 0, launched.stderr[-3000:]
    run_dir = real_model_run.run_dir
    assert launched.stdout.strip().splitlines()[-1] == f"run dir: {run_dir}"
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
