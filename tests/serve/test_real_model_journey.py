"""The README's "A real model in 15 minutes", on the real SmolLM2-135M-Instruct folder `python -m llmft.models get`
makes: train on the acronym experiment (a few steps here; bench/bench_outcome.py trains it in full and measures
the outcome), evaluate base and tuned side by side, chat with the run. The commands as the README shows them."""

from __future__ import annotations

import json

import pytest

from support.models_get import converted  # noqa: F401  (the session's folder)
from support.runs import run_llmft

QUESTION = "Hi, quick one: ZEPHIL, what is that exactly?"


@pytest.mark.slow
def test_get_train_evaluate_and_chat_on_the_real_model(converted, tmp_path):  # noqa: F811
    folder = converted[0]
    env = {"LLMFT_MODELS": str(folder.parent), "OMP_NUM_THREADS": "2"}
    launched = run_llmft("launch", "model=smollm2_135m", "data=acronyms_memorization", "train.max_steps=3",
                         "train.eval_every=3", f"runs_root={tmp_path}", env=env, timeout=900)
    assert launched.returncode == 0, launched.stderr[-3000:]
    run_dir = launched.stdout.strip().splitlines()[-1].removeprefix("run dir: ")
    summary = json.loads(open(f"{run_dir}/summary.json").read())
    assert summary["status"] == "completed"

    evaluated = run_llmft("eval", f"run={run_dir}", "eval.max_new_tokens=40", "eval.limit=6",
                          "eval.embedding_model=off", env=env, timeout=900)
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    rows = {line.strip().split("  ")[0]: line.split() for line in evaluated.stdout.splitlines() if "  " in line}
    assert "right expansion, taught acronyms (0-1)" in rows and "answer loss (nats/token)" in rows, evaluated.stdout
    report = json.loads(open(f"{run_dir}/eval/report.json").read())
    assert report["num_samples"] == 6 and set(report["metrics"]) == {"base", "finetuned"}
    assert all(s["expected"] for s in report["samples"])
    losses = {name: report["metrics"][name]["answer_loss"] for name in ("base", "finetuned")}
    assert losses["finetuned"] < 0.95 * losses["base"], losses  # three steps already make the answers likelier

    chatted = run_llmft("chat", f"run={run_dir}", f"prompt={QUESTION}", env=env, timeout=600)
    assert chatted.returncode == 0, chatted.stderr[-3000:]
    assert chatted.stdout.strip()  # three steps teach little: the full experiment's answers are in BENCHMARKS.md
