"""`python -m llmft.data prepare|inspect` on the bundled samples: outputs, report, privacy, reuse by fingerprint."""

from __future__ import annotations

import email.utils
import json
import re

import pytest

from llmft.config.compose import SAMPLES_DIR, compose
from llmft.data.readers.chat import read_chat_jsonl
from llmft.data.tokenize.tokenizer import tokenizer_for_run
from llmft.data.prepare.reading import read_conversations
from llmft.data.prepare.samples_for_run import build_splits
from llmft.data.prepare.command import prepare
from llmft.data.readers.records import DataError, ReadReport
from support.runs import run_llmft


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("prepared")
    result = run_llmft("data", "prepare", "data=tickets_sample_jsonl", f"data.output_dir={out_dir}", timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    return out_dir, result


def planted_in_sample() -> set[str]:
    """The personal data of the bundled raw tickets, found with patterns independent of llmft's scrubber."""
    raw = (SAMPLES_DIR / "tickets_sample.jsonl").read_text()
    found = set(re.findall(r"[\w.+-]+@[\w-]+(?:\.[\w-]+)+", raw))
    found |= set(re.findall(r"\b(?:hf|ghp)_[A-Za-z0-9]{20,}|\bAKIA[A-Z0-9]{16}\b", raw))
    found |= {ip for ip in re.findall(r"\b\d{1,3}(?:\.\d{1,3}){3}\b", raw) if ip not in ("0.0.0.0", "127.0.0.1")}
    found |= set(re.findall(r"\+\d{1,3}(?: \d{1,4}){2,5}", raw))
    found |= set(re.findall(r"\b0[1-9](?:[ .]\d\d){4}\b", raw))
    for ticket in map(json.loads, raw.splitlines()):
        for message in ticket["messages"]:
            name = email.utils.parseaddr(message["from"])[0]
            if name and " " in name and "Support" not in name:
                found.add(name)
    return found


def test_prepare_writes_dataset_report_histogram_and_audit_files(prepared):
    out_dir, result = prepared
    for name in ["dataset/dataset_dict.json", "tokenizer/tokenizer.json", "train.conversations.jsonl",
                 "validation.conversations.jsonl", "report.json", "lengths.png", "manifest.json"]:
        assert (out_dir / name).exists(), name
    report = json.loads((out_dir / "report.json").read_text())
    for key in ["records_read", "skipped", "dropped", "reader_dropped", "num_conversations", "samples", "tokens",
                "supervised_tokens", "useful_token_fraction", "pii_replacements", "fingerprint"]:
        assert key in report, key
    assert report["reader_dropped"]["internal_notes"] > 0
    assert report["useful_token_fraction"]["packed"] > report["useful_token_fraction"]["padded"]
    assert {"EMAIL", "PHONE", "IP", "SECRET", "URL", "NAME", "LOGIN"} <= set(report["pii_replacements"])
    assert (out_dir / "lengths.png").read_bytes()[:4] == b"\x89PNG"
    assert "useful tokens" in result.stdout and "replaced:" in result.stdout
    # the audit files are chat format: llmft reads them back as they are
    conversations = read_chat_jsonl(out_dir / "train.conversations.jsonl", None, ReadReport())
    assert len(conversations) > 10 and all(c.messages[-1]["role"] == "assistant" for c in conversations)


def test_no_personal_data_of_the_bundled_sample_reaches_the_outputs(prepared):
    out_dir, _ = prepared
    planted = planted_in_sample()
    assert len(planted) > 30  # the sample does plant personal data
    outputs = "\n".join(p.read_text() for p in out_dir.glob("*.json*"))
    assert sorted(value for value in planted if value in outputs) == []


def test_training_reuses_the_prepared_dataset_by_fingerprint(prepared, capsys):
    out_dir, _ = prepared
    cfg = compose(["data=tickets_sample_jsonl", f"data.prepared={out_dir}"])
    conversations, _ = read_conversations(cfg.data)
    tokenizer = tokenizer_for_run(cfg, conversations)
    splits, counts = build_splits(conversations, tokenizer, cfg.data, cfg.model.max_seq_len)
    assert counts["reused_prepared"] is True
    cfg.data.prepared = None
    fresh, fresh_counts = build_splits(conversations, tokenizer, cfg.data, cfg.model.max_seq_len)
    assert fresh_counts["reused_prepared"] is False and fresh == splits  # the same samples, loaded or made
    # another sequence length: refused, saying why (never another data set instead; issue 26)
    cfg.data.prepared = str(out_dir)
    with pytest.raises(DataError, match="was prepared with other settings than this run's"):
        build_splits(conversations, tokenizer, cfg.data, 128)


def test_prepare_again_with_the_same_inputs_does_nothing(prepared):
    out_dir, _ = prepared
    before = {p: p.stat().st_mtime_ns for p in out_dir.rglob("*") if p.is_file()}
    report = prepare(compose(["data=tickets_sample_jsonl", f"data.output_dir={out_dir}"]))
    assert report["reused_prepared"] is True
    assert {p: p.stat().st_mtime_ns for p in out_dir.rglob("*") if p.is_file()} == before


def test_inspect_brackets_the_supervised_tokens(prepared):
    out_dir, _ = prepared
    result = run_llmft("data", "inspect", "data=tickets_sample_jsonl", f"data.prepared={out_dir}", "--num", "2",
                       timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    blocks = re.findall(r"\[\[(.*?)\]\]", result.stdout.split("\n", 1)[1], flags=re.S)  # after the legend
    assert blocks and all(block.endswith("<|im_end|>") for block in blocks)
    assert "<|im_start|>assistant\n[[" in result.stdout and "── sample 1:" in result.stdout


def test_a_bad_override_is_one_line(tmp_path):
    result = run_llmft("data", "prepare", "data=tickets_sample_jsonl", "data.packing=perhaps", timeout=120)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [  # the key, the value given and what was expected (issue 12)
        "llmft: bad config: data.packing=perhaps: expected a bool."
    ]


def test_prepared_data_is_not_world_readable(tmp_path):
    result = run_llmft("data", "prepare", f"data.output_dir={tmp_path / 'prepared'}", timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    paths = [tmp_path / "prepared", *(tmp_path / "prepared").rglob("*")]
    assert paths[1:] and all(p.stat().st_mode & 0o007 == 0 for p in paths), [oct(p.stat().st_mode) for p in paths]
