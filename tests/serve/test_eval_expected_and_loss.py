"""`llmft eval`'s two measures of what tuning taught: the share of answers holding the expected phrase (an
acronym's expansion), by kind of example and per acronym, and the teacher-forced loss of the reference answers
under the base and the tuned model. On a tiny run: the mechanics and the numbers, checked against stock
transformers and PEFT and against `has_expected` recomputed on each answer."""

from __future__ import annotations

import pytest
import torch

from llmft.config.compose import compose
from llmft.serve.evaluation import has_expected, metric_rows, run_eval
from support.runs import run_llmft, trained_in_process

FAST = ["eval.max_new_tokens=10", "eval.batch_size=4", "eval.embedding_model=off"]


@pytest.fixture(scope="module")
def acronyms_run(tmp_path_factory):
    return trained_in_process(["data=acronyms_memorization", "train.max_steps=12", "train.eval_every=12",
                               "train.save_every=0"], tmp_path_factory.mktemp("acronyms") / "run")


@pytest.fixture(scope="module")
def acronyms_report(acronyms_run):
    return run_eval(acronyms_run, FAST)


def test_the_expected_phrase_is_counted_by_kind_and_by_acronym(acronyms_report):
    report = acronyms_report
    samples = report["samples"]
    assert {s["id"].split(":")[0] for s in samples} == {"acronym", "acronym-control"}
    for name in ("base", "finetuned"):
        by_kind: dict[str, list[bool]] = {}
        for sample in samples:
            found = has_expected(sample[name]["output"], sample["expected"])
            assert sample[name]["expected_found"] is found and sample["expected"]
            by_kind.setdefault(sample["id"].split(":")[0], []).append(found)
        assert report["metrics"][name]["expected_found"] == {
            kind: pytest.approx(sum(hits) / len(hits)) for kind, hits in by_kind.items()}
    groups = report["expected_found_by_group"]
    assert set(groups) == {s["id"].removesuffix("#held-out") for s in samples}
    for group, found in groups.items():
        asked = [s for s in samples if s["id"].removesuffix("#held-out") == group]
        assert found == {name: f"{sum(s[name]['expected_found'] for s in asked)}/{len(asked)}"
                         for name in ("base", "finetuned")}
    titles = [metric for metric, _ in metric_rows(report)]
    assert titles[:3] == ["right expansion, taught acronyms (0-1)", "right expansion, control acronyms (0-1)",
                          "answer loss (nats/token)"]
    markdown = (acronyms_run_report_dir(report) / "report.md").read_text()
    assert "## Answers with the expected phrase, by group" in markdown and "Expected phrase: " in markdown


def acronyms_run_report_dir(report):
    from pathlib import Path

    return Path(report["paths"]["markdown"]).parent


def test_the_answer_loss_is_stock_transformers_loss_on_the_reference_and_its_end_of_turn(acronyms_run,
                                                                                         acronyms_report):
    """Each sample's loss is what transformers' own loss gives on prompt + reference + end of turn, the prompt
    masked; the model's figure is the token-weighted mean; tuning lowered it."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(acronyms_run / "final")
    base = AutoModelForCausalLM.from_pretrained(acronyms_run / "base_model").eval()
    tuned = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(acronyms_run / "base_model"),
                                      acronyms_run / "final").eval()
    end_of_turn = tokenizer.convert_tokens_to_ids(compose(["data=acronyms_memorization"]).data.end_of_turn_token
                                                  or tokenizer.eos_token)
    samples = acronyms_report["samples"][:6]
    for name, model in (("base", base), ("finetuned", tuned)):
        for sample in samples:
            prompt = tokenizer(tokenizer.apply_chat_template(sample["prompt"], tokenize=False,
                                                             add_generation_prompt=True),
                               add_special_tokens=False)["input_ids"]
            answer = tokenizer(sample["reference"], add_special_tokens=False)["input_ids"] + [end_of_turn]
            ids = torch.tensor([prompt + answer])
            labels = ids.clone()
            labels[0, :len(prompt)] = -100
            with torch.no_grad():
                expected = model(input_ids=ids, labels=labels).loss.item()
            assert sample[name]["answer_loss"] == pytest.approx(expected, rel=1e-4), (name, sample["id"])
    for name in ("base", "finetuned"):
        assert acronyms_report["metrics"][name]["answer_loss"] > 0
    assert acronyms_report["metrics"]["finetuned"]["answer_loss"] < acronyms_report["metrics"]["base"]["answer_loss"]


def test_the_command_prints_the_expansion_rates_and_the_loss_ratio(acronyms_run, tmp_path):
    result = run_llmft("eval", f"run={acronyms_run}", "eval.limit=4", "eval.max_new_tokens=4",
                       "eval.embedding_model=off", f"eval.output_dir={tmp_path}", timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.splitlines()
    assert any(line.strip().startswith("right expansion, taught acronyms (0-1)") for line in lines), result.stdout
    ratio = next(line for line in lines if "answer loss, fine-tuned / base:" in line)
    assert 0 < float(ratio.rsplit(":", 1)[1]) < 1
