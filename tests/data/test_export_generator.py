"""tools/make_helpdesk_exports.py (the realistic helpdesk export of bench/bench_data_quality.py): deterministic, its
overlap and personal data really in the files, every mbox readable by Python's own mail packages."""

from __future__ import annotations

import email
import email.policy
import html
import importlib.util
import json
import mailbox
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def generator():
    spec = importlib.util.spec_from_file_location("make_helpdesk_exports", REPO / "tools" / "make_helpdesk_exports.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


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
