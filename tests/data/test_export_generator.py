"""tools/make_helpdesk_exports.py (the realistic helpdesk export of bench/bench_data_quality.py): deterministic, its
overlap and personal data really in the files, every mbox readable by Python's own mail packages; and docs/data.md's
commands on it: prepare counts what was planted, and the quality figures are all zero, on another seed too."""

from __future__ import annotations

import email
import email.policy
import html
import json
import mailbox
import subprocess
import sys
from pathlib import Path

import pytest

from support.helpdesk import generator
from support.runs import REPO


@pytest.fixture(scope="module")
def export(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("export")
    assert generator().main([str(out), "--seed", "1"]) == 0
    return out


def messages_of(path: Path) -> list[email.message.EmailMessage]:
    box = mailbox.mbox(path)
    try:
        return [email.message_from_bytes(box.get_bytes(key), policy=email.policy.default) for key in box.keys()]
    finally:
        box.close()


def decoded_text(message) -> str:
    texts = [str(message.get("Subject", ""))]
    for part in message.walk():
        if part.get_content_maintype() == "text":
            content = part.get_content()
            texts.append(html.unescape(content) if part.get_content_subtype() == "html" else content)
    return "\n".join(texts)


def test_same_seed_same_bytes_other_seed_other_bytes(export, tmp_path):
    again, other = tmp_path / "again", tmp_path / "other"
    generator().main([str(again), "--seed", "1"])
    generator().main([str(other), "--seed", "2"])
    files = sorted(p.relative_to(export) for p in export.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(again) for p in again.rglob("*") if p.is_file())
    assert len(files) >= 6
    for name in files:
        assert (export / name).read_bytes() == (again / name).read_bytes(), name
    assert (export / "expected.json").read_bytes() != (other / "expected.json").read_bytes()


def test_every_mbox_parses_and_threads(export):
    expected = json.loads((export / "expected.json").read_text())["variants"]["email"]
    total = 0
    for name in expected["files"]:
        messages = messages_of(export / name)
        assert messages, name
        for message in messages:
            assert message["From"] and message["Message-ID"] and message["Date"]
            assert not message.defects, (name, message["Message-ID"], message.defects)
            assert message.get_body(preferencelist=("plain", "html")) is not None or \
                message.get_content_type() == "multipart/report"
        total += len(messages)
    assert total == expected["mails_in_files"] == expected["unique_mails"] + expected["duplicates"]["total"]


def test_overlap_holds_the_same_message_ids_in_two_files(export):
    expected = json.loads((export / "expected.json").read_text())["variants"]["email"]
    ids = [[str(m["Message-ID"]) for m in messages_of(export / name)] for name in expected["files"]]
    shared = sum(len(set(a) & set(b)) for a, b in zip(ids, ids[1:]))
    assert shared == expected["duplicates"]["same_message_id"] > 0
    assert expected["duplicates"]["rewritten_message_id"] > 0
    assert len(set().union(*ids)) == expected["unique_mails"] + expected["duplicates"]["rewritten_message_id"]


def test_planted_values_are_in_the_raw_export(export):
    variants = json.loads((export / "expected.json").read_text())["variants"]
    mails = "\n".join(decoded_text(m) for name in variants["email"]["files"] for m in messages_of(export / name))
    for name, variant in variants.items():
        raw = mails if name == "email" else (export / variant["path"]).read_text(encoding="utf-8")
        for kind, values in variant["must_not_appear"]["pii"].items():
            assert len(values) == variant["pii_counts"][kind]
            for value in values:
                assert value in raw, (name, kind, value)
        for value in variant["must_not_appear"]["quote"] + variant["must_not_appear"]["autoreply"]:
            assert value in raw, (name, value)
        for line in variant["must_appear"]["code"] + variant["must_appear"]["sentence"]:
            assert line in raw, (name, line)
    kinds = variants["email"]["pii_counts"]
    assert {"EMAIL", "PHONE", "IP", "SECRET", "CARD", "IBAN", "NAME"} <= set(kinds)
    assert "Jean Dupont" in variants["email"]["must_not_appear"]["pii"]["NAME"]
    assert "Jean Zay" in variants["email"]["must_appear"]["site"]


def test_cards_and_ibans_check_and_decoys_do_not(export):
    module = generator()
    variant = json.loads((export / "expected.json").read_text())["variants"]["email"]
    for card in variant["must_not_appear"]["pii"]["CARD"]:
        assert module.luhn_ok(card.replace(" ", "").replace("-", ""))
    for value in variant["must_not_appear"]["pii"]["IBAN"]:
        compact = value.replace(" ", "")
        assert int("".join(str(int(c, 36)) for c in compact[4:] + compact[:4])) % 97 == 1
    serial = next(s for s in variant["must_appear"]["sentence"] if "serial number" in s).rstrip(".").split()[-1]
    assert len(serial) == 16 and not module.luhn_ok(serial)


@pytest.mark.slow
def test_the_docs_commands_prepare_a_generated_export_as_planted(tmp_path):
    """docs/data.md's three commands, from a scratch folder: the export, `prepare` on its mbox files (each repeated
    mail, auto-reply and bounce counted as planted), then the quality bench: every figure 0, for the docs' seed and
    for an export the docs do not show (another seed, more tickets)."""
    def run(*args: str) -> subprocess.CompletedProcess:
        result = subprocess.run([sys.executable, *args], cwd=tmp_path, capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
        return result

    run(str(REPO / "tools" / "make_helpdesk_exports.py"), "exports", "--seed", "1", "--tickets", "60")
    run("-m", "llmft.data", "prepare", "data=tickets", "data.format=email", "data.path=exports/mbox",
        "data.tickets.staff_domains=[idris.fr]", "data.output_dir=prepared")
    expected = json.loads((tmp_path / "exports" / "expected.json").read_text())["variants"]["email"]
    dropped = json.loads((tmp_path / "prepared" / "report.json").read_text())["reader_dropped"]
    assert dropped["duplicate_mails"] == expected["duplicates"]["total"] > 0
    assert dropped["auto_replies"] + dropped.get("bounces", 0) == expected["auto_replies"]["total"] > 0
    assert (tmp_path / "prepared" / "train.conversations.jsonl").stat().st_size > 0
    for seed, tickets in (("1", "60"), ("7", "90")):
        last = run(str(REPO / "bench" / "bench_data_quality.py"), "--seed", seed, "--tickets", tickets).stdout
        assert last.strip().splitlines()[-1] == ("quality: quotes_left=0 signatures_left=0 autoreplies_trained=0 "
                                                 "duplicate_mails=0 pii_left=0 lines_broken=0"), last[-3000:]
