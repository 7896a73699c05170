"""Preference data (DPO pairs, KTO examples): masks on the completion only with its end-of-turn token, the same
prompt tokens on both sides of a pair, the prompt kept whole when cut, bad records named by file:line, the split by
id, scrubbing of every text, the bundled samples, the prepared-dataset cache, and `from-eval` on a report written
by llmft.eval's own code."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from llmft.config.compose import compose
from llmft.data.preferences.from_eval import from_eval
from llmft.data.prepare.inspect_samples import inspect
from llmft.data.prepare.reading import read_conversations
from llmft.data.prepare.tokenizing_preferences import tokenize_preferences
from llmft.data.prepare.samples_for_run import build_splits
from llmft.data.preferences.dpo_kto import (KtoExample, KtoRecord, PreferencePair, PreferenceRecord,
                                             PreferenceTokenizing, tokenize_preference_chunk, training_texts)
from llmft.data.prepare.command import prepare
from llmft.data.readers.records import DataError
from llmft.data.tokenize.templating import IGNORE_INDEX
from llmft.data.tokenize.tokenizer import train_tiny_tokenizer, tokenizer_for_run
from support.runs import run_llmft

SYSTEM = "You are the HPC support assistant."
PROMPT = [
    {"role": "user", "content": "My job is pending with reason QOSMaxGRESPerUser. Why?"},
    {"role": "assistant", "content": "You already use the maximum number of GPUs allowed by your QoS."},
    {"role": "user", "content": "Can I run on the A100 partition instead?"},
]
CHOSEN = "Yes: add `-C a100` and your project's a100 account, `-A <project>@a100`, to the #SBATCH lines."
REJECTED = "Just reboot the node and submit again."
# A Llama-3-style template: a header before each turn, <|eot_id|> after it, nothing between turns.
LLAMA3_STYLE = (
    "{{ '<|begin_of_text|>' }}{% for m in messages %}"
    "{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\n\n' + m['content'] + '<|eot_id|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)) + "\n"
                            for r in records), encoding="utf-8")
    return path


def data_cfg(path: Path, data_format: str, *overrides: str):
    return compose([f"data.path={path}", f"data.format={data_format}", "data.num_workers=1", *overrides])


def supervised_text(tokenizer, sample) -> str:
    tokens = [token for token, label in zip(sample.input_ids, sample.labels) if label != IGNORE_INDEX]
    assert all(label in (IGNORE_INDEX, token) for token, label in zip(sample.input_ids, sample.labels))
    return tokenizer.decode(tokens, skip_special_tokens=False)


@pytest.fixture(scope="module")
def tokenizer():
    texts = [m["content"] for m in PROMPT] * 20 + [CHOSEN, REJECTED, SYSTEM] * 20
    return train_tiny_tokenizer(texts, vocab_size=500)


def llama3_tokenizer():
    tokenizer = train_tiny_tokenizer([m["content"] for m in PROMPT] * 20 + [CHOSEN, REJECTED] * 20, vocab_size=500)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|start_header_id|>", "<|end_header_id|>",
                                                                "<|eot_id|>"]})
    tokenizer.chat_template = LLAMA3_STYLE
    return tokenizer


@pytest.mark.parametrize("template", ["chatml", "llama3"])
def test_a_pair_supervises_each_completion_and_its_end_of_turn_after_the_same_prompt(tokenizer, template):
    tokenizer, end_of_turn = (tokenizer, "<|im_end|>") if template == "chatml" else (llama3_tokenizer(), "<|eot_id|>")
    record = PreferenceRecord.of("T-1", "f:1", PROMPT, CHOSEN, REJECTED)
    state = PreferenceTokenizing(tokenizer, SYSTEM, end_of_turn, 4096, "window")
    (pair,) = tokenize_preference_chunk(state, [record]).items
    length = pair.prompt_length
    assert pair.chosen.input_ids[:length] == pair.rejected.input_ids[:length]
    # the prompt is the rendering of the prompt with the generation prompt, the earlier assistant turn unsupervised
    rendered_prompt = tokenizer.apply_chat_template([{"role": "system", "content": SYSTEM}] + PROMPT, tokenize=False,
                                                    add_generation_prompt=True)
    assert tokenizer.decode(pair.chosen.input_ids[:length], skip_special_tokens=False) == rendered_prompt
    for sample, completion in ((pair.chosen, CHOSEN), (pair.rejected, REJECTED)):
        assert set(sample.labels[:length]) == {IGNORE_INDEX}
        assert supervised_text(tokenizer, sample) == completion + end_of_turn
        full = tokenizer.apply_chat_template([{"role": "system", "content": SYSTEM}] + PROMPT
                                             + [{"role": "assistant", "content": completion}], tokenize=False)
        assert tokenizer.decode(sample.input_ids, skip_special_tokens=False) == full


def test_a_kto_example_supervises_its_completion_and_end_of_turn_only(tmp_path):
    path = write_jsonl(tmp_path / "kto.jsonl", [
        {"id": "T-1", "prompt": PROMPT, "completion": [{"role": "assistant", "content": CHOSEN}], "label": True},
        {"id": "T-1", "prompt": PROMPT, "completion": REJECTED, "label": False},
        {"id": "T-2", "prompt": "How do I see my quota?", "completion": "Run idr_quota_user on a login node.",
         "label": True},
    ])
    cfg = data_cfg(path, "kto_jsonl", "data.validation_fraction=0")
    records, report = read_conversations(cfg.data)
    assert [type(r) for r in records] == [KtoRecord] * 3 and report["num_conversations"] == 3
    # the conversation view: prompt + the completion when desirable, the prompt alone when not
    assert records[0].messages[-1] == {"role": "assistant", "content": CHOSEN} and records[1].messages == PROMPT
    assert records[2].prompt == [{"role": "user", "content": "How do I see my quota?"}]
    tokenizer = tokenizer_for_run(cfg, records)
    splits, counts = build_splits(records, tokenizer, cfg.data, 256)
    examples = splits["train"]
    assert all(isinstance(e, KtoExample) for e in examples) and [e.desirable for e in examples] == [True, False, True]
    assert counts["samples"] == {"train": 3, "validation": 0} and counts["desirable"]["train"] == 2
    for example, completion in zip(examples, [CHOSEN, REJECTED, "Run idr_quota_user on a login node."]):
        assert set(example.sample.labels[:example.prompt_length]) == {IGNORE_INDEX}
        assert supervised_text(tokenizer, example.sample) == completion + "<|im_end|>"
    assert examples[0].sample.input_ids[:examples[0].prompt_length] == \
        examples[1].sample.input_ids[:examples[1].prompt_length]


def test_a_long_sample_keeps_its_prompt_whole_and_a_prompt_too_long_drops_the_record(tmp_path):
    long_answer = " ".join(["Load the module, then submit the job with sbatch and check squeue."] * 30)
    long_question = " ".join(["My job fails with an error I do not understand at all."] * 60)
    path = write_jsonl(tmp_path / "pairs.jsonl", [
        {"id": "A", "prompt": PROMPT, "chosen": long_answer, "rejected": REJECTED},
        {"id": "B", "prompt": long_question, "chosen": CHOSEN, "rejected": REJECTED},
        {"id": "C", "prompt": PROMPT, "chosen": CHOSEN, "rejected": REJECTED},
    ])
    cfg = data_cfg(path, "preference_jsonl", "data.validation_fraction=0")
    records, _ = read_conversations(cfg.data)
    tokenizer = tokenizer_for_run(cfg, records)
    untruncated = tokenize_preference_chunk(PreferenceTokenizing(tokenizer, None, "<|im_end|>", 10**6, "window"),
                                            records[:1]).items[0]
    max_seq_len = 128
    assert untruncated.prompt_length < max_seq_len < len(untruncated.chosen.input_ids)
    splits, counts = build_splits(records, tokenizer, cfg.data, max_seq_len)
    cut, whole = splits["train"]
    assert cut.prompt_length == untruncated.prompt_length  # the prompt whole, the completion cut at the end
    assert cut.chosen.input_ids == untruncated.chosen.input_ids[:max_seq_len]
    assert cut.chosen.labels == untruncated.chosen.labels[:max_seq_len]
    assert cut.rejected == untruncated.rejected  # the short side is untouched
    assert len(whole.chosen.input_ids) < max_seq_len
    assert counts["samples_dropped"] == {"prompt_longer_than_max_seq_len": 1}
    assert counts["completions_cut_to_max_seq_len"] == 1
    # data.long_conversations=drop drops a pair that does not fit instead of cutting it
    drop_cfg = data_cfg(path, "preference_jsonl", "data.validation_fraction=0", "data.long_conversations=drop")
    _, counts = build_splits(records, tokenizer, drop_cfg.data, max_seq_len)
    assert counts["samples"]["train"] == 1
    assert counts["samples_dropped"] == {"prompt_longer_than_max_seq_len": 1, "longer_than_max_seq_len": 1}


def test_bad_records_are_skipped_with_file_and_line_and_strict_stops(tmp_path):
    good = {"prompt": "How do I see my quota?", "chosen": "Run idr_quota_user on a login node.", "rejected": "No."}
    bad = [
        '{"prompt": "x", "chosen": "y"',
        {"chosen": "a", "rejected": "b"},
        {**good, "rejected": 3},
        {**good, "prompt": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]},
        {**good, "chosen": [{"role": "user", "content": "more"}]},
        {**good, "prompt": [{"role": "robot", "content": "q"}]},
        {**good, "prompt": []},
        {**good, "id": True},
        {**good, "system": "s", "prompt": [{"role": "system", "content": "t"}, {"role": "user", "content": "q"}]},
    ]
    path = write_jsonl(tmp_path / "pairs.jsonl", [good, *bad])
    records, report = read_conversations(data_cfg(path, "preference_jsonl").data)
    assert len(records) == 1 and report["num_skipped"] == len(bad)
    reasons = dict(line.split(": ", 1) for line in report["skipped"])
    assert list(reasons) == [f"{path}:{n}" for n in range(2, 2 + len(bad))]
    assert reasons[f"{path}:2"].startswith("bad JSON")
    assert reasons[f"{path}:3"] == 'missing field "prompt"'
    assert reasons[f"{path}:4"] == '"rejected" is neither text nor a list of messages'
    assert "must end with the user turn" in reasons[f"{path}:5"]
    assert "assistant messages only" in reasons[f"{path}:6"]
    assert "unknown role 'robot'" in reasons[f"{path}:7"]
    assert reasons[f"{path}:8"] == '"prompt" is an empty list'
    assert reasons[f"{path}:9"] == '"id" is neither a string nor a number'
    assert reasons[f"{path}:10"].startswith('both "system"')
    kto = write_jsonl(tmp_path / "kto.jsonl", [{"prompt": "q", "completion": "an answer long enough", "label": True},
                                               {"prompt": "q", "completion": "a", "label": "yes"},
                                               {"prompt": "q", "completion": "a"}])
    _, report = read_conversations(data_cfg(kto, "kto_jsonl").data)
    assert report["skipped"] == [f"{kto}:2: \"label\" is 'yes', not true (a good answer) or false (a bad one)",
                                 f'{kto}:3: missing field "label"']
    with pytest.raises(DataError, match=rf"{path}:2: bad JSON .*data.strict=true"):
        read_conversations(data_cfg(path, "preference_jsonl", "data.strict=true").data)


def test_pairs_of_one_ticket_and_of_one_prompt_stay_in_one_split(tmp_path):
    records = []
    for ticket in range(40):
        for variant in range(3):  # three pairs per ticket, each with another rejected answer
            records.append({"id": f"T-{ticket}", "prompt": f"Question {ticket}: why is job {ticket} pending?",
                            "chosen": f"Job {ticket} waits for resources: check squeue --start for {ticket}.",
                            "rejected": f"No idea {variant}."})
    for ticket in range(20):  # no id: the prompt's hash keeps the pairs of one prompt together
        for variant in range(2):
            records.append({"prompt": f"Where do I put dataset number {ticket}?",
                            "chosen": f"On $WORK or $SCRATCH, never in $HOME, for dataset {ticket}.",
                            "rejected": f"Anywhere {variant}."})
    path = write_jsonl(tmp_path / "pairs.jsonl", records)
    cfg = data_cfg(path, "preference_jsonl", "data.validation_fraction=0.3")
    found, report = read_conversations(cfg.data)
    assert report["num_conversations"] == 160  # same prompt and chosen, other rejected: distinct pairs, all kept
    tokenizer = tokenizer_for_run(cfg, found)
    tokenized = tokenize_preferences(found, tokenizer, cfg.data, 256, audit_dir=tmp_path)
    ids = {split: [json.loads(line)["id"] for line in Path(file).read_text().splitlines()]
           for split, file in tokenized.conversation_files.items()}
    assert set(ids) == {"train", "validation"} and not set(ids["train"]) & set(ids["validation"])
    assert all(len(ids["train"]) > 20 for ids in [ids]) and len(ids["validation"]) > 20
    for split_ids in ids.values():
        for record_id in set(split_ids):
            assert split_ids.count(record_id) == (3 if record_id.startswith("T-") else 2)
    assert tokenized.counts["samples"] == {split: len(i) for split, i in ids.items()}
    # the audit file reads back as preference_jsonl
    again, _ = read_conversations(data_cfg(tokenized.conversation_files["validation"], "preference_jsonl").data)
    assert [r.id for r in again] == ids["validation"]


def test_every_text_is_cleaned_and_scrubbed_and_duplicates_dropped(tmp_path):
    path = write_jsonl(tmp_path / "pairs.jsonl", [
        {"id": "T-1", "prompt": "I am jean.dupont@example.org, my job on 192.0.2.15 fails. Call +33 6 12 34 56 78.",
         "chosen": "Please send the log to hpc-help@example.org, never your token hf_abcdefghijklmnopqrstuvwxyzABCDEFGH.",
         "rejected": "<p>Ask <b>marie.curie@example.org</b>, she knows 198.51.100.23.</p>"},
        {"id": "T-1", "prompt": "I am jean.dupont@example.org, my job on 192.0.2.15 fails. Call +33 6 12 34 56 78.",
         "chosen": "Please send the log to hpc-help@example.org, never your token hf_abcdefghijklmnopqrstuvwxyzABCDEFGH.",
         "rejected": "<p>Ask <b>marie.curie@example.org</b>, she knows 198.51.100.23.</p>"},
        {"id": "T-2", "prompt": "Short question?", "chosen": "The same answer, long enough to keep.",
         "rejected": "The same answer,   long enough to keep."},
        {"id": "T-3", "prompt": "Short question?", "chosen": "Too short.", "rejected": "Worse."},
        {"id": "T-4", "prompt": "Why?", "chosen": "Because your QoS allows 2 hours at most.", "rejected": ""},
    ])
    records, report = read_conversations(data_cfg(path, "preference_jsonl").data)
    assert report["dropped"] == {"chosen_same_as_rejected": 1, "chosen_text_too_short": 1, "exact_duplicate": 1}
    first = records[0]
    assert first.prompt == [{"role": "user", "content": "I am <EMAIL>, my job on <IP> fails. Call <PHONE>."}]
    assert first.chosen == "Please send the log to <EMAIL>, never your token <SECRET>."
    assert first.rejected == "Ask <EMAIL>, she knows <IP>."  # HTML to text, then scrubbed
    assert first.messages == first.prompt + [{"role": "assistant", "content": first.chosen}]
    # (the duplicate is cleaned and scrubbed before it is found to be one, as with conversations)
    assert report["pii_replacements"] == {"EMAIL": 6, "IP": 4, "PHONE": 2, "SECRET": 2}
    assert records[1].rejected == ""  # an empty rejected answer is kept: answering nothing is a mistake to unlearn
    # the tiny model's tokenizer is trained on the rejected answers too
    assert "she knows <IP>." in " ".join(training_texts(records))


@pytest.mark.parametrize("name, kind", [("preferences_sample", PreferencePair), ("kto_sample", KtoExample)])
def test_the_bundled_samples_prepare_and_the_prepared_dataset_is_reused(tmp_path, name, kind):
    objective = "dpo" if name == "preferences_sample" else "kto"
    cfg = compose([f"data={name}", f"objective={objective}", f"data.output_dir={tmp_path}", "data.num_workers=1"])
    report = prepare(cfg)
    assert report["num_skipped"] == 0 and report["num_conversations"] >= 40
    assert report["samples"]["train"] > 30 and report["samples"]["validation"] > 0
    assert report["packing"] is False and report["supervised_tokens"]["train"] > 0
    audit = "pairs" if kind is PreferencePair else "examples"
    assert (tmp_path / f"train.{audit}.jsonl").is_file() and (tmp_path / "lengths.png").is_file()
    conversations, _ = read_conversations(cfg.data)
    tokenizer = tokenizer_for_run(cfg, conversations)
    # tokenized again on two worker processes: the same pairs as those prepared in one process and saved
    fresh, _ = build_splits(conversations, tokenizer, compose([f"data={name}", "data.num_workers=2"]).data,
                            cfg.model.max_seq_len)
    reused, counts = build_splits(conversations, tokenizer, cfg.data, cfg.model.max_seq_len)
    assert counts["reused_prepared"] is True and counts["samples"] == report["samples"]
    assert reused == fresh and all(isinstance(item, kind) for item in reused["train"])
    if kind is PreferencePair:
        assert all(p.chosen.input_ids[:p.prompt_length] == p.rejected.input_ids[:p.prompt_length]
                   for p in reused["train"])
        shown = inspect(cfg, 2, "validation", color=False)  # `data inspect`: chosen, then rejected, of each pair
        assert shown.startswith(f"{2 * report['samples']['validation']} validation samples") and "[[" in shown
    else:
        assert 0 < counts["desirable"]["train"] < counts["samples"]["train"]


# ------------------------------------------------------------------------------------------------ from-eval


@pytest.fixture
def evaluated_run(tmp_path, monkeypatch):
    """A finished run's directory evaluated by llmft.eval's own `run_eval`: the held-out tickets of the bundled
    sample, the fine-tuned model's answers and the judge's replies faked (no model, no server): an answer that is
    the reference is judged correct, a "partly" answer partially correct, the others incorrect; one correct answer
    was cut at max_new_tokens."""
    from llmft.rundir.files import write_config
    from llmft.serve import evaluation
    from llmft.serve.inference import Generation

    run_dir = tmp_path / "run"
    (run_dir / "final").mkdir(parents=True)
    (run_dir / "final" / "adapter_config.json").write_text("{}")
    cfg = compose(["data=tickets_sample", "data.validation_fraction=0.3", f"run_dir={run_dir}"])
    write_config(cfg, run_dir)

    def answers(run_dir_, cfg_, settings, examples, log):
        texts = [e.reference if i % 3 == 0 else f"partly: {e.reference[:30]}" if i % 3 == 1 else "Just reboot."
                 for i, e in enumerate(examples)]
        generations = [Generation(text, 20, i != 3) for i, text in enumerate(texts)]
        losses = {"finetuned": [(2.0, 4)] * len(examples)}  # (summed nats, tokens) of each reference
        return {"finetuned": generations}, losses, [(50, 0)] * len(examples), Path("base"), {}

    def judge(settings, messages):
        answer = messages[-1]["content"].split("Answer to grade:\n", 1)[1].rsplit("\n\nGrade the answer", 1)[0]
        reference = messages[-1]["content"].split("Reference answer:\n", 1)[1].split("\n\nAnswer to grade:", 1)[0]
        verdict = "correct" if answer == reference else "partially correct" if answer.startswith("partly") \
            else "incorrect"
        return f"VERDICT: {verdict}\nREASON: compared with the reference", None, True

    monkeypatch.setattr(evaluation, "generate_answers", answers)
    monkeypatch.setattr(evaluation, "ask_judge", judge)
    report = evaluation.run_eval(run_dir, ["eval.judge_url=http://127.0.0.1:9/v1", "eval.judge_model=judge",
                                           "eval.embedding_model=off", "eval.compare_base=false"], log=lambda _: None)
    return run_dir, report


def test_from_eval_turns_the_judged_answers_into_pairs_and_examples_that_prepare_accepts(evaluated_run, tmp_path):
    run_dir, report = evaluated_run
    samples = report["samples"]
    verdicts = [s["finetuned"]["judge"]["verdict"] for s in samples]
    assert {"correct", "partially correct", "incorrect"} <= set(verdicts) and len(samples) >= 9
    lines = []
    pairs_path, kto_path = tmp_path / "pairs.jsonl", tmp_path / "kto.jsonl"
    from_eval([str(run_dir), f"out={pairs_path}", f"kto_out={kto_path}"], log=lines.append)
    pairs = [json.loads(line) for line in pairs_path.read_text().splitlines()]
    examples = [json.loads(line) for line in kto_path.read_text().splitlines()]
    incorrect = [s for s in samples if s["finetuned"]["judge"]["verdict"] == "incorrect"]
    assert [(p["id"], p["prompt"], p["chosen"], p["rejected"]) for p in pairs] == \
        [("eval:" + s["id"], s["prompt"], s["reference"], "Just reboot.") for s in incorrect]
    judged = [s for i, s in enumerate(samples) if verdicts[i] == "incorrect" or (verdicts[i] == "correct" and i != 3)]
    assert [(e["id"], e["completion"], e["label"]) for e in examples] == \
        [("eval:" + s["id"], s["finetuned"]["output"], s["finetuned"]["judge"]["verdict"] == "correct")
         for s in judged]
    assert lines[0].startswith(f"read {len(samples)} answers") and f"{verdicts.count('partially correct')} " \
        "partially correct" in lines[0]
    assert f"wrote {len(pairs)} DPO pairs to {pairs_path}" in lines[1] and "1 correct answers cut" in lines[2]
    for path, data_format, objective in ((pairs_path, "preference_jsonl", "dpo"), (kto_path, "kto_jsonl", "kto")):
        cfg = compose([f"data={data_format}", f"data.path={path}", f"objective={objective}",
                       f"data.output_dir={tmp_path / data_format}", "data.num_workers=1",
                       "data.validation_fraction=0.2"])
        prepared = prepare(cfg)
        records = pairs if objective == "dpo" else examples
        assert prepared["num_skipped"] == 0 and prepared["num_conversations"] == len(records)
        # (a long ticket's prompt may not fit the tiny model's 256 tokens: dropped and counted, never lost silently)
        assert sum(prepared["samples"].values()) + sum(prepared["samples_dropped"].values()) == len(records)
        assert prepared["samples"]["train"] > 0 and prepared["samples"]["validation"] > 0
    # naming no file writes both next to the report
    from_eval([str(run_dir)], log=lines.append)
    assert (run_dir / "eval" / "preferences.jsonl").read_text() == pairs_path.read_text()
    assert (run_dir / "eval" / "kto.jsonl").read_text() == kto_path.read_text()


def test_from_eval_says_what_to_run_when_there_is_no_report_or_no_verdict(tmp_path):
    with pytest.raises(DataError, match=r"no evaluation report in .*python -m llmft.eval run=.* eval.judge_url="):
        from_eval([str(tmp_path)])
    result = run_llmft("data", "from-eval", str(tmp_path), "out=pairs.jsonl", timeout=120)  # as a user types it
    assert result.returncode == 2 and result.stderr.startswith("llmft: no evaluation report in")
    assert len(result.stderr.strip().splitlines()) == 1
    (tmp_path / "eval").mkdir()
    (tmp_path / "eval" / "report.json").write_text(json.dumps({
        "samples": [{"id": "1", "prompt": [], "reference": "r", "finetuned": {"output": "o", "stopped": True}}],
        "skipped_metrics": {"judge": "skipped: no judge endpoint"}}))
    with pytest.raises(DataError, match=r"has no judge verdicts \(skipped: no judge endpoint\).*eval.judge_url=URL"):
        from_eval([str(tmp_path)])
    with pytest.raises(DataError, match="does not exist"):
        from_eval([str(tmp_path / "nowhere")])
