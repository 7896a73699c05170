"""Helpdesk e-mail exports as they come: monthly mbox files that overlap (a mail in two or three files, sometimes with
its Message-ID rewritten by the export), replies filed before their parents, auto-replies and bounces from many mail
systems, attachments (job scripts, logs, screenshots, PDFs); input files the user may not read; output piped into
`head`. Mails are built with the standard `email` package."""

from __future__ import annotations

import io
import json
import mailbox
import os
import shutil
import subprocess
import sys
import tempfile
from datetime import datetime, timedelta, timezone
from email.message import EmailMessage, Message
from email.mime.multipart import MIMEMultipart
from email.mime.text import MIMEText
from email.utils import format_datetime
from pathlib import Path

import pytest

from llmft.config.compose import SAMPLES_DIR, compose
from llmft.data.prepare import workers
from llmft.data.prepare.one_pass import read_and_tokenize
from llmft.data.prepare.reading import read_conversations
from llmft.data.readers.records import DataError
from llmft.data.tokenize.tokenizer import tokenizer_for_run
from support.runs import REPO, run_llmft

STAFF = "data.tickets.staff_domains=[help.example.org]"
EMAIL = ["data=tickets", "data.format=email", STAFF]
USER, OTHER_USER = "Ada Lovelace <ada@uni.example.org>", "Alan Turing <alan@lab.example.org>"
AGENT = "Claire Martin <claire.martin@help.example.org>"
START = datetime(2025, 1, 28, 9, 0, tzinfo=timezone(timedelta(hours=1)))


def message(sender: str, subject: str, body: str, hours: float, message_id: str | None, parent: str | None = None,
            headers: dict | None = None) -> EmailMessage:
    mail = EmailMessage()
    mail["From"], mail["To"], mail["Subject"] = sender, "Assistance <assist@help.example.org>", subject
    mail["Date"] = format_datetime(START + timedelta(hours=hours))
    if message_id:
        mail["Message-ID"] = message_id
    if parent:
        mail["In-Reply-To"], mail["References"] = parent, parent
    for key, value in (headers or {}).items():
        mail[key] = value
    mail.set_content(body)
    return mail


def write_mbox(path: Path, messages: list) -> Path:
    box = mailbox.mbox(str(path), create=True)
    for mail in messages:
        box.add(mailbox.mboxMessage(mail))
    box.flush()
    box.close()
    return path


def with_message_id(mail: EmailMessage, message_id: str) -> EmailMessage:
    """The same mail as an export tool that rewrites Message-IDs writes it."""
    copy = EmailMessage()
    for key, value in mail.items():
        copy[key] = message_id if key.lower() == "message-id" else value
    copy.set_content(mail.get_content())
    return copy


def texts(conversations) -> str:
    return "\n".join(m["content"] for c in conversations for m in c.messages)


# ------------------------------------------------------------------------------------------- threads across files
def overlapping_exports(folder: Path) -> dict[str, str]:
    """Three monthly exports that overlap; returns the own sentence of each mail (each must be trained once)."""
    folder.mkdir()
    said = {
        "a_q": "My job 4242 has been pending since yesterday.",
        "a_a": "The qos_gpu-t3 QoS limits you to 8 nodes: ask for fewer nodes.",
        "b_q": "Which module gives CUDA 12.4 on the H100 partition?",
        "b_a": "Load cuda/12.4.1 after module purge; it is the default on the H100 nodes.",
        "c_q": "My WORK quota is full although I deleted files yesterday.",
        "c_a": "Deleted files stay in the snapshots for a week; idr_quota_user counts them.",
        "e_q": "Can I get more GPU hours for my project this semester?",
        "e_a": "Yes: file a request on the allocation portal, it is reviewed every month.",
    }
    # ticket A: the answer is in the January export, again in February's (overlap) and in March's (another queue)
    a_q = message(USER, "[Ticket #101] Job pending", said["a_q"], 0, "<a-q@uni.example.org>")
    a_a = message(AGENT, "Re: [Ticket #101] Job pending", said["a_a"], 80, "<a-a@help.example.org>",
                  "<a-q@uni.example.org>")
    # ticket B, no ticket id: the answer (staff's sent folder) is in an earlier file than the question it answers
    b_q = message(OTHER_USER, "CUDA module", said["b_q"], 100, "<b-q@lab.example.org>")
    b_a = message(AGENT, "Re: CUDA module", said["b_a"], 102, "<b-a@help.example.org>", "<b-q@lab.example.org>")
    # ticket C, no ticket id: the January export rewrote the question's Message-ID; February has the original, and
    # the answer names the original
    c_q = message(USER, "WORK quota", said["c_q"], 70, "<c-q@uni.example.org>")
    c_a = message(AGENT, "Re: WORK quota", said["c_a"], 110, "<c-a@help.example.org>", "<c-q@uni.example.org>")
    # ticket E: a question without Message-ID, in two files
    e_q = message(OTHER_USER, "[Ticket #105] GPU hours", said["e_q"], 75, None)
    e_a = message(AGENT, "Re: [Ticket #105] GPU hours", said["e_a"], 120, "<e-a@help.example.org>")
    # an out-of-office answer to A's answer, in the two files of the overlap: one auto-reply, one repeat
    away = message(USER, "Re: [Ticket #101] Job pending", "I am away until Monday (vacation).", 80.1,
                   "<away@uni.example.org>", "<a-a@help.example.org>", {"Auto-Submitted": "auto-replied"})
    write_mbox(folder / "2025-01.mbox", [a_q, with_message_id(c_q, "<export-0001@export.help.example.org>"), e_q,
                                         a_a, away, b_a])
    write_mbox(folder / "2025-02.mbox", [c_q, e_q, a_a, away, b_q, c_a, e_a])
    write_mbox(folder / "2025-03.mbox", [a_a])
    return said


def test_a_mail_in_several_exports_is_trained_once_and_threads_span_the_files(tmp_path):
    said = overlapping_exports(tmp_path / "mbox")
    conversations, report = read_conversations(compose(EMAIL + [f"data.path={tmp_path / 'mbox'}"]).data)
    # a_a twice more, c_q under its rewritten id, e_q without id, the auto-reply once more
    assert report["reader_dropped"] == {"duplicate_mails": 5, "auto_replies": 1}
    assert report["records_read"] == 14 and report["skipped"] == []
    everything = texts(conversations)
    assert {key: everything.count(sentence) for key, sentence in said.items()} == dict.fromkeys(said, 1)
    assert "vacation" not in everything
    by_question = {next(k for k, s in said.items() if s in c.messages[0]["content"]): c for c in conversations}
    assert sorted(by_question) == ["a_q", "b_q", "c_q", "e_q"]  # four tickets, each question with its answer
    for key, conversation in by_question.items():
        assert [m["role"] for m in conversation.messages] == ["user", "assistant"]
        assert said[key[0] + "_a"] in conversation.messages[1]["content"]
    assert by_question["a_q"].id == "ticket#101" and by_question["e_q"].id == "ticket#105"


def test_mail_dedup_is_the_same_with_workers_and_in_the_one_pass(tmp_path, monkeypatch):
    overlapping_exports(tmp_path / "mbox")
    monkeypatch.setattr(workers, "MIN_CHUNK_BYTES", 256)  # many chunks: each file is cut among the workers
    monkeypatch.setattr(workers, "MIN_CHUNK_ITEMS", 1)
    overrides = EMAIL + [f"data.path={tmp_path / 'mbox'}", "model.max_seq_len=256"]
    results = []
    for num_workers in (1, 2):
        conversations, report = read_conversations(compose(overrides + [f"data.num_workers={num_workers}"]).data)
        results.append(([(c.id, c.messages) for c in conversations], report))
    assert results[0] == results[1] and results[0][1]["reader_dropped"]["duplicate_mails"] == 5
    cfg = compose(overrides + ["data.num_workers=1"])
    tokenizer = tokenizer_for_run(cfg, read_conversations(cfg.data)[0])
    for num_workers in (1, 2):  # prepare's one pass (a model's own tokenizer) threads through the same dedup
        report, _, _ = read_and_tokenize(compose(overrides + [f"data.num_workers={num_workers}"]).data, tokenizer, 256)
        assert report == results[0][1]


def test_a_reply_dated_before_the_mail_it_answers_still_follows_it(tmp_path):
    question = message(USER, "[Ticket #7] Jobs killed", "My jobs are killed after 20 hours.", 0, "<q@uni.example.org>")
    answer = message(AGENT, "Re: [Ticket #7] Jobs killed", "The qos_gpu-t3 QoS stops jobs at 20 hours.", 2,
                     "<a@help.example.org>", "<q@uni.example.org>")
    follow_up = message(USER, "Re: [Ticket #7] Jobs killed", "How do I run longer jobs then?", 30,
                        "<f@uni.example.org>", "<a@help.example.org>")
    final = message(AGENT, "Re: [Ticket #7] Jobs killed", "Use qos_gpu-t4, up to 100 hours, 16 GPUs at most.", 29,
                    "<z@help.example.org>", "<f@uni.example.org>")  # the user's clock was an hour and more ahead
    write_mbox(tmp_path / "export.mbox", [question, answer, final, follow_up])
    conversations, _ = read_conversations(compose(EMAIL + [f"data.path={tmp_path / 'export.mbox'}"]).data)
    assert [m["content"].splitlines()[-1] for m in conversations[0].messages] == [
        "My jobs are killed after 20 hours.", "The qos_gpu-t3 QoS stops jobs at 20 hours.",
        "How do I run longer jobs then?", "Use qos_gpu-t4, up to 100 hours, 16 GPUs at most."]


# ------------------------------------------------------------------------------------------- auto-replies, bounces
def report_mail(sender: str, subject: str, report_type: str, text: str, hours: float, parent: str):
    """A multipart/report (RFC 6522): a delivery status (a bounce) or a disposition notification (a read receipt)."""
    mail = MIMEMultipart("report", report_type=report_type)
    mail["From"], mail["Subject"], mail["Date"] = sender, subject, format_datetime(START + timedelta(hours=hours))
    mail["Message-ID"], mail["References"] = f"<report-{hours}@mx.example.org>", parent
    mail.attach(MIMEText(text, "plain", "utf-8"))
    status, fields = Message(), Message()
    status["Content-Type"] = f"message/{report_type}"
    fields["Reporting-MTA" if report_type == "delivery-status" else "Reporting-UA"] = "dns; mx.example.org"
    status.set_payload([fields])
    mail.attach(status)
    return mail


def test_auto_replies_and_bounces_of_every_mail_system_are_dropped_and_counted(tmp_path):
    mails, kept, number = [], [], 300

    def ticket(question_subject: str, question_headers: dict | None = None, answer_headers: dict | None = None,
               sender: str = USER) -> str:
        """A question and its answer (both must be kept); the id of the answer, for auto-replies to it."""
        nonlocal number
        number += 1
        question = f"Question {number}: my array job {number} fails at step 3."
        answer = f"Answer {number}: step 3 needs --mem=64G, the default is 32G on that partition."
        mails.append(message(sender, question_subject.format(n=number), question, number, f"<q{number}@x.org>",
                             headers=question_headers))
        mails.append(message(AGENT, f"Re: [Ticket #{number}] array job", answer, number + 0.5,
                             f"<a{number}@help.example.org>", f"<q{number}@x.org>", answer_headers))
        kept.extend([question, answer])
        return f"<a{number}@help.example.org>"

    automatic = [  # (subject of the automatic answer, its headers), each answering a staff reply
        ("Re: [Ticket #{n}] array job", {"Auto-Submitted": "auto-replied"}),  # Zimbra, sieve vacation
        ("Re: [Ticket #{n}] array job", {"Auto-Submitted": "auto-replied (vacation)"}),
        ("Risposta automatica: Re: [Ticket #{n}] array job", {"X-Auto-Response-Suppress": "All"}),  # Exchange, it
        ("Réponse automatique\u00a0: [Ticket #{n}] array job", {}),  # Exchange, headers lost on the way
        ("Abwesenheitsnotiz: [Ticket #{n}] array job", {}),
        ("Out of Office AutoReply: [Ticket #{n}] array job", {}),  # Exchange 2003
        ("[Autoreply] Re: [Ticket #{n}] array job", {}),
        ("Re: [Ticket #{n}] array job", {"X-Autoreply": "yes"}),
        ("Re: [Ticket #{n}] array job", {"X-Autorespond": "Away"}),
        ("Re: [Ticket #{n}] array job", {"Precedence": "auto_reply"}),
        ("Automatikus válasz: [Ticket #{n}] array job", {"X-Auto-Response-Suppress": "All"}),  # Exchange, hu
        ("Re: [Ticket #{n}] array job", {"Precedence": "bulk"}),  # the old Unix vacation(1)
        ("Re: [Ticket #{n}] array job", {"X-Autogenerated": "Reply"}),
    ]
    auto_texts = []
    for subject, headers in automatic:
        parent = ticket("[Ticket #{n}] array job")
        auto_texts.append(f"Automatic text {number}: I am out of the office.")
        mails.append(message(USER, subject.format(n=number), auto_texts[-1], number + 0.6, f"<auto{number}@x.org>",
                             parent, headers))
    parent = ticket("[Ticket #{n}] array job")
    receipt = report_mail(USER, f"Read: [Ticket #{number}] array job", "disposition-notification",
                          "Automatic text: your message was read.", number + 0.7, parent)
    auto_texts.append("Automatic text: your message was read.")
    mails.append(receipt)
    bounces = [
        report_mail("Mail Delivery Subsystem <mailer-daemon@googlemail.com>", "Delivery Status Notification (Failure)",
                    "delivery-status", "Bounce text: address not found.", 500, "<a301@help.example.org>"),
        report_mail("postmaster@uni.example.org", "Undeliverable: [Ticket #302] array job", "delivery-status",
                    "Bounce text: the mailbox is full.", 501, "<a302@help.example.org>"),
        message("Mail Delivery System <Mailer-Daemon@mx.uni.example.org>",
                "Mail delivery failed: returning message to sender", "Bounce text: unrouteable address.", 502,
                "<exim-bounce@mx.uni.example.org>", "<a303@help.example.org>",
                {"X-Failed-Recipients": "ada@uni.example.org"}),
    ]
    mails += bounces
    # real mail that only looks automatic, or carries a header that automatic mail also carries
    ticket("Automatic restart of my jobs after the maintenance?")
    ticket("Out of office hours: is the helpdesk open on Saturday?")
    ticket("Autoreply configuration for my Slurm job notifications")
    ticket("[Ticket #{n}] array job", {"X-Auto-Response-Suppress": "DR, RN, NRN, OOF, AutoReply"})  # Exchange relay
    ticket("[Ticket #{n}] array job", {"Precedence": "bulk", "List-Id": "<hpc-users.uni.example.org>"})  # a list
    ticket("[Ticket #{n}] array job", {"Auto-Submitted": "no"})
    ticket("[Ticket #{n}] array job", answer_headers={"Precedence": "bulk", "X-Auto-Response-Suppress": "All",
                                                      "RT-Ticket": "help.example.org #1234"})  # RT's answers
    write_mbox(tmp_path / "export.mbox", mails)
    conversations, report = read_conversations(compose(EMAIL + [f"data.path={tmp_path / 'export.mbox'}"]).data)
    assert report["reader_dropped"] == {"auto_replies": len(automatic) + 1, "bounces": len(bounces)}
    everything = texts(conversations)
    assert [t for t in auto_texts if t in everything] == [] and "Bounce text" not in everything
    assert [t for t in kept if t not in everything] == []


# ------------------------------------------------------------------------------------------- attachments
PNG = b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\x00\x00\x01\x00\x00\x00\x01\x08\x02\x00\x00\x00" + bytes(64)
PDF = b"%PDF-1.5\n%\xe2\xe3\xcf\xd3\n1 0 obj << /Type /Catalog >> endobj\ntrailer << /Root 1 0 R >>\n%%EOF\n"


def test_text_attachments_follow_the_message_and_binary_ones_are_dropped_and_counted(tmp_path):
    script = "#!/bin/bash\n#SBATCH --job-name=attached_run\n#SBATCH --gres=gpu:4\nsrun python train.py\n"
    log_lines = [f"step {i} loss=2.{i:03d}" for i in range(4000)] + ["slurmstepd: error: Detected 1 oom_kill event"]
    question = message(USER, "[Ticket #9] OOM", "My job dies, script and log attached.\n\n-- \nAda Lovelace\nLab",
                       0, "<q9@uni.example.org>")
    question.add_attachment(script.encode(), maintype="application", subtype="octet-stream", filename="run.sbatch")
    question.add_attachment("\n".join(log_lines) + "\n", subtype="plain", filename="slurm-777.out")
    question.add_attachment("Température dépassée à 95 °C sur r12i3n4\n> a prompt line\n".encode("latin-1"),
                            maintype="text", subtype="plain", filename="node.log",
                            params={"charset": "iso-8859-1"})
    question.add_attachment(PNG, maintype="image", subtype="png", filename="screenshot.png")
    question.add_attachment(PDF, maintype="application", subtype="pdf", filename="C:\\Users\\ada\\report.pdf")
    question.add_attachment(PNG, maintype="application", subtype="octet-stream", filename="notes.txt")  # not text
    question.add_attachment("BEGIN:VCARD\nFN:Ada Lovelace\nTEL:+33 6 12 34 56 78\nEND:VCARD\n", subtype="vcard",
                            filename="ada.vcf")
    answer = message(AGENT, "Re: [Ticket #9] OOM", "Ask for --mem=64G; the fixed script is attached.\n\n"
                     "On Mon, 27 Jan 2025, Ada wrote:\n> My job dies", 1, "<a9@help.example.org>", "<q9@uni.example.org>")
    answer.add_attachment("#SBATCH --mem=64G\nsrun python train.py\n", subtype="x-sh", filename="fixed.sh")
    answer.add_attachment(PDF, maintype="application", subtype="pdf", filename="guide.pdf")
    html = EmailMessage()  # an HTML mail with a logo embedded in it and an attached job script
    html["From"], html["Subject"], html["Date"] = USER, "Re: [Ticket #9] OOM", format_datetime(START + timedelta(hours=2))
    html["Message-ID"], html["In-Reply-To"] = "<h9@uni.example.org>", "<a9@help.example.org>"
    html.set_content("<p>It runs now, thank you! One more question: can I use 8 GPUs?</p>", subtype="html")
    html.add_related(PNG, maintype="image", subtype="png", cid="<logo@uni>", filename="image001.png",
                     disposition="inline")
    html.add_attachment("#SBATCH --gres=gpu:8\n", subtype="plain", filename="next.slurm")
    last = message(AGENT, "Re: [Ticket #9] OOM", "Yes, 8 GPUs fit the qos_gpu-t3 limits.", 3, "<z9@help.example.org>",
                   "<h9@uni.example.org>")
    write_mbox(tmp_path / "export.mbox", [question, answer, html, last])
    conversations, report = read_conversations(compose(EMAIL + [f"data.path={tmp_path / 'export.mbox'}",
                                                                "data.clean.max_message_chars=20000"]).data)
    # screenshot, report, notes.txt, ada.vcf; guide.pdf; the embedded logo
    assert report["reader_dropped"] == {"attachments_dropped": 6, "attachments_truncated": 1}
    user, staff, user2, _ = [m["content"] for m in conversations[0].messages]
    assert user.startswith("OOM\n\nMy job dies, script and log attached.\n\n[attachment: run.sbatch]\n" + script.strip())
    assert "Ada Lovelace\nLab" not in user  # the signature of the text went, the attachments after it stayed
    log = user.split("[attachment: slurm-777.out]\n")[1].split("\n\n[attachment:")[0]
    assert log.startswith("step 0 loss=2.000\n") and log.endswith("slurmstepd: error: Detected 1 oom_kill event")
    assert "\n[...]\n" in log and len(log) <= 20000 // 4 + 10  # a quarter of max_message_chars, head and tail
    assert "[attachment: node.log]\nTempérature dépassée à 95 °C sur r12i3n4\n> a prompt line" in user
    for name in ("screenshot.png", "report.pdf", "notes.txt", "ada.vcf"):
        assert f"[attachment: {name} (not included)]" in user
    assert "PNG" not in user and "%PDF" not in user and "VCARD" not in user and "+33 6" not in user
    assert staff == ("Ask for --mem=64G; the fixed script is attached.\n\n"
                     "[attachment: fixed.sh]\n#SBATCH --mem=64G\nsrun python train.py")  # no guide.pdf line
    assert user2.endswith("can I use 8 GPUs?\n\n[attachment: next.slurm]\n#SBATCH --gres=gpu:8")
    assert "image001" not in user2


# ------------------------------------------------------------------------------------------- unreadable input
def good_chat() -> str:
    return json.dumps({"messages": [{"role": "user", "content": "How do I see my quota?"},
                                    {"role": "assistant", "content": "Run idr_quota_user on a login node."}]})


def two_files(kind: str, folder: Path) -> tuple[list[str], Path]:
    """Overrides reading `folder`, where a good file and a second one (returned) of the format lie."""
    folder.mkdir()
    if kind == "chat_jsonl":
        for name in ("a.jsonl", "b.jsonl"):
            (folder / name).write_text(good_chat() + "\n")
        return ["data=chat_jsonl"], folder / "b.jsonl"
    if kind == "tickets_jsonl":
        lines = (SAMPLES_DIR / "tickets_sample.jsonl").read_text().splitlines()
        (folder / "a.jsonl").write_text("\n".join(lines[:10]) + "\n")
        (folder / "b.jsonl").write_text("\n".join(lines[10:]) + "\n")
        return ["data=tickets_sample_jsonl"], folder / "b.jsonl"
    if kind == "email":
        shutil.copy(SAMPLES_DIR / "tickets_sample.mbox", folder / "a.mbox")
        write_mbox(folder / "b.mbox", [message(USER, "[Ticket #1] x", "A question?", 0, "<x@uni.example.org>")])
        return ["data=tickets_sample_mbox"], folder / "b.mbox"
    if kind == "csv":
        for name in ("a.csv", "b.csv"):
            (folder / name).write_text("question,answer\nHow do I see my quota?,Run idr_quota_user on a login node.\n")
        return ["data=csv"], folder / "b.csv"
    if kind == "transcript":
        for name in ("a.md", "b.md"):
            (folder / name).write_text("## Ticket #1 Quota\n\nUtilisateur : How do I see my quota?\n\n"
                                       "IDRIS : Run idr_quota_user on a login node.\n")
        return ["data=transcripts_sample"], folder / "b.md"
    if kind in ("acronyms_json", "acronyms_jsonl"):
        shutil.copy(SAMPLES_DIR / "acronyms_sample.json", folder / "a.json")
        other = folder / ("b.json" if kind == "acronyms_json" else "b.jsonl")
        other.write_text(json.dumps({"acronym": "QoS", "definition": "Quality of Service"}) + "\n")
        return ["data=acronyms_sample"], other
    shutil.copy(SAMPLES_DIR / f"{kind}_sample.jsonl", folder / "a.jsonl")  # preferences, kto
    shutil.copy(SAMPLES_DIR / f"{kind}_sample.jsonl", folder / "b.jsonl")
    return [f"data={kind}_sample" if kind == "kto" else "data=preferences_sample"], folder / "b.jsonl"


FORMATS = ["chat_jsonl", "tickets_jsonl", "email", "csv", "transcript", "acronyms_json", "acronyms_jsonl",
           "preferences", "kto"]


@pytest.fixture
def locked(monkeypatch):
    """Paths whose opening raises PermissionError, as a file on a shared project space does (the tests run as root,
    whom chmod does not stop): open() and Path.read_bytes go through io.open; os.walk lists folders with scandir."""
    paths: set[str] = set()
    real_open, real_scandir = io.open, os.scandir

    def guarded_open(file, *args, **kwargs):
        if isinstance(file, (str, Path)) and str(file) in paths:
            raise PermissionError(13, "Permission denied", str(file))
        return real_open(file, *args, **kwargs)

    def guarded_scandir(path="."):
        if str(path) in paths:
            raise PermissionError(13, "Permission denied", str(path))
        return real_scandir(path)

    monkeypatch.setattr(io, "open", guarded_open)
    monkeypatch.setattr("builtins.open", guarded_open)
    monkeypatch.setattr(os, "scandir", guarded_scandir)
    return paths


@pytest.mark.parametrize("kind", FORMATS)
def test_a_file_the_user_may_not_read_is_one_line_of_the_report_in_every_format(kind, tmp_path, locked):
    overrides, other = two_files(kind, tmp_path / "in")
    overrides += [f"data.path={tmp_path / 'in'}", "data.num_workers=1"]
    locked.add(str(other))
    conversations, report = read_conversations(compose(overrides).data)
    denied = [line for line in report["skipped"] if "permission" in line]
    assert denied == [f"{other}: permission denied"] and conversations  # the other file was read
    with pytest.raises(DataError) as error:
        read_conversations(compose(overrides + ["data.strict=true"]).data)
    assert str(error.value) == (f"{other}: permission denied (data.strict=true stops at the first bad record; fix or "
                                f"remove it).")


def test_a_folder_that_cannot_be_listed_is_reported_and_the_rest_is_read(tmp_path, locked):
    overrides, _ = two_files("chat_jsonl", tmp_path / "in")
    (tmp_path / "in" / "2024").mkdir()
    (tmp_path / "in" / "2024" / "c.jsonl").write_text(good_chat() + "\n")
    locked.add(str(tmp_path / "in" / "2024"))
    conversations, report = read_conversations(compose(overrides + [f"data.path={tmp_path / 'in'}"]).data)
    assert report["skipped"] == [f"{tmp_path / 'in' / '2024'}: permission denied (a folder that cannot be listed: its "
                                 f"files are not read)"]
    assert report["records_read"] == 2 and len(conversations) == 1  # a.jsonl and b.jsonl (an exact duplicate)
    locked.add(str(tmp_path / "in"))  # data.path itself: nothing to read is one sentence
    with pytest.raises(DataError, match="permission denied"):
        read_conversations(compose(overrides + [f"data.path={tmp_path / 'in'}"]).data)


def without_file_permission_override() -> list[str] | None:
    """A command prefix that runs a process as root without CAP_DAC_OVERRIDE / CAP_DAC_READ_SEARCH (chmod then
    applies to it, as to any user), or as an unprivileged user; None where neither works."""
    if os.geteuid() != 0:
        return []
    candidates = [["setpriv", "--bounding-set", "-dac_override,-dac_read_search"],
                  ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups"], ["runuser", "-u", "nobody", "--"]]
    for prefix in candidates:
        if shutil.which(prefix[0]) and subprocess.run([*prefix, sys.executable, "-c", "pass"],
                                                      capture_output=True).returncode == 0:
            return prefix
    return None


def test_prepare_on_a_file_chmod_000_is_one_line_in_a_real_process():
    prefix = without_file_permission_override()
    if prefix is None:
        pytest.skip("neither setpriv nor runuser can drop root's right to read any file here")
    base = Path(tempfile.mkdtemp(prefix="llmft-unreadable-"))  # (not tmp_path: its parents are root's alone)
    folder, home = base / "in", base / "home"
    try:
        folder.mkdir()
        home.mkdir()
        (folder / "a.jsonl").write_text(good_chat() + "\n")
        (folder / "b.jsonl").write_text(good_chat() + "\n")
        (folder / "sub").mkdir()
        for path, mode in [(base, 0o777), (home, 0o777), (folder, 0o755), (folder / "a.jsonl", 0o644),
                           (folder / "b.jsonl", 0), (folder / "sub", 0)]:
            os.chmod(path, mode)
        command = [*prefix, sys.executable, "-m", "llmft.data", "prepare", "data=chat_jsonl", f"data.path={folder}",
                   "data.validation_fraction=0"]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "HOME": str(home)}
        result = subprocess.run(command + [f"data.output_dir={base / 'out'}"], cwd=REPO, capture_output=True,
                                text=True, timeout=300, env=env)
        assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr[-3000:]
        assert json.loads((base / "out" / "report.json").read_text())["skipped"] == [
            f"{folder / 'b.jsonl'}: permission denied",
            f"{folder / 'sub'}: permission denied (a folder that cannot be listed: its files are not read)"]
        strict = subprocess.run(command + [f"data.output_dir={base / 'strict'}", "data.strict=true"], cwd=REPO,
                                capture_output=True, text=True, timeout=300, env=env)
        assert strict.returncode == 2 and strict.stderr.strip().splitlines() == [
            f"llmft: {folder / 'b.jsonl'}: permission denied (data.strict=true stops at the first bad record; fix or "
            f"remove it)."]
    finally:
        for path in (folder / "b.jsonl", folder / "sub"):
            if path.exists():
                os.chmod(path, 0o755)
        shutil.rmtree(base, ignore_errors=True)


# ------------------------------------------------------------------------------------------- output into `head`
def test_prepare_and_inspect_piped_into_head_end_quietly(tmp_path):
    data = tmp_path / "chat.jsonl"
    def steps(i: int) -> str:
        return "\n".join(f"{n}. sacct -j {1000 * i + n} --format=JobID,State,MaxRSS" for n in range(12))

    data.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"Question {i} about my job?"},
                                                     {"role": "assistant", "content": f"Answer {i}:\n{steps(i)}"}]})
                            + "\n" for i in range(150)))  # inspect prints more than a pipe holds (64 KiB)
    overrides = ["data=chat_jsonl", f"data.path={data}", f"data.output_dir={tmp_path / 'out'}",
                 "model.max_seq_len=1024"]
    python = " ".join(map(str, [sys.executable, "-m", "llmft.data"]))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    prepared = subprocess.run(f"{python} prepare {' '.join(overrides)} | head -1", shell=True, cwd=REPO, env=env,
                              capture_output=True, text=True, timeout=300)
    assert prepared.stdout.startswith("read 150 records") and prepared.stdout.count("\n") == 1, prepared.stderr
    assert "Traceback" not in prepared.stderr and "BrokenPipe" not in prepared.stderr, prepared.stderr
    inspected = subprocess.run(f"{python} inspect {' '.join(overrides)} --num 130 --no-color | head -1", shell=True,
                               cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert inspected.stdout.count("\n") == 1
    assert "Traceback" not in inspected.stderr and "BrokenPipe" not in inspected.stderr, inspected.stderr


@pytest.mark.parametrize("module, args", [
    ("llmft.data", ["--help"]), ("llmft.data", ["inspect", "--cfg", "data=chat_jsonl"]), ("llmft.plan", ["--help"]),
    ("llmft.runs", ["--help"]), ("llmft.eval", ["--help"]), ("llmft.chat", ["--help"]), ("llmft.export", ["--help"]),
    ("llmft.launch", ["--help"]), ("llmft.cli", ["runs", "--help"]),
])
def test_every_entry_point_ends_quietly_when_its_reader_is_gone(module, args):
    """stdout is a pipe whose reading end is already closed: every write fails with EPIPE."""
    reading, writing = os.pipe()
    os.close(reading)
    try:
        result = subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, stdout=writing, stderr=subprocess.PIPE,
                                text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
    finally:
        os.close(writing)
    # 141 (as SIGPIPE), or 0 where the output went before Python knew (argparse's help ignores the error itself)
    assert result.stderr == "" and result.returncode in (0, 141), (result.returncode, result.stderr[-2000:])
