"""Readers: bad records counted with file:line (or one sentence in strict mode), e-mail threading, CSV, acronyms,
and the split by ticket id."""

from __future__ import annotations

import json
import threading
from email.message import EmailMessage
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import pytest

from llmft.config.compose import compose
from llmft.data.clean.html_text import HTML_TAGS
from llmft.data.prepare.reading import read_conversations
from llmft.data.readers.records import DataError
from llmft.data.prepare.splits import split_of
from support.runs import run_llmft

STAFF = "data.tickets.staff_domains=[help.example.org]"
GOOD_CHAT = {"messages": [{"role": "user", "content": "How do I see my quota?"},
                          {"role": "assistant", "content": "Run idr_quota_user on a login node."}]}


def read(overrides: list[str]):
    return read_conversations(compose(overrides).data)


def write_lines(path: Path, lines: list[bytes]) -> Path:
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path


def test_every_bad_chat_record_is_counted_with_its_file_and_line(tmp_path):
    good = json.dumps(GOOD_CHAT).encode()
    path = write_lines(tmp_path / "chat.jsonl", [
        good,
        b'{"messages": [{"role": "user", "content": "unterminated"',
        b'{"turns": []}',
        b'{"messages": "not a list"}',
        b'{"messages": [{"role": "user", "content": 42}]}',
        b'{"messages": [{"role": "wizard", "content": "hi"}]}',
        '{"messages": [{"role": "user", "content": "caf\u00e9"}]}'.encode("latin-1"),
        b'{"messages": []}',
        b"",
        good,
    ])
    conversations, report = read(["data=chat_jsonl", f"data.path={path}"])
    assert len(conversations) == 1  # the second good line is an exact duplicate of the first
    assert report["dropped"] == {"exact_duplicate": 1}
    assert report["skipped"] == [
        f"{path}:2: bad JSON (Expecting ',' delimiter)",
        f'{path}:3: missing field "messages"',
        f'{path}:4: "messages" is not a list',
        f'{path}:5: message 0 has no text "content"',
        f"{path}:6: message 0 has unknown role 'wizard' (expected one of system, user, assistant)",
        f"{path}:7: not UTF-8 text",
        f"{path}:8: empty conversation",
    ]


def test_bad_tickets_csv_and_acronyms_records_are_counted_with_file_and_line(tmp_path):
    tickets = write_lines(tmp_path / "t.jsonl", [
        json.dumps({"id": 1, "subject": "Quota", "messages": [
            {"from": "a@uni.example.org", "body": "My quota is full."},
            {"from": "b@help.example.org", "body": "Clean your conda caches with conda clean -a."}]}).encode(),
        json.dumps({"subject": "no id", "messages": []}).encode(),
        json.dumps({"id": 3, "messages": [{"body": "who wrote this?"}]}).encode(),
        json.dumps({"id": 4, "messages": [{"from": "a@uni.example.org", "body": ["not", "text"]}]}).encode(),
        json.dumps({"id": 5, "messages": []}).encode(),
    ])
    _, report = read(["data.format=tickets_jsonl", f"data.path={tickets}", STAFF])
    assert report["skipped"] == [f'{tickets}:2: missing field "id"', f'{tickets}:3: message 0 has no "from" author',
                                 f'{tickets}:4: message 0 has a "body" that is not text',
                                 f"{tickets}:5: empty conversation (no message)"]

    csv_path = tmp_path / "pairs.csv"
    csv_path.write_bytes(b'subject,body,answer\nQuota,"My quota\nis full",Clean conda caches with conda clean -a.\n'
                         b"GPU,,\nToo,many,fields,here\nBad,caf\xe9,Answer here\n")
    _, report = read(["data=csv", f"data.path={csv_path}", "data.csv.question_columns=[subject,body]"])
    assert report["skipped"] == [f"{csv_path}:4: empty answer", f"{csv_path}:5: more fields than the 3 columns of the header",
                                 f"{csv_path}:6: not UTF-8 text"]

    acronyms = tmp_path / "acronyms.json"
    acronyms.write_text('[\n  {"acronym": "MPI", "definition": "Message Passing Interface: the standard for messages."},\n'
                        '  {"acronym": "GPU"},\n  "just a string",\n  {"acronym": "", "definition": "x"}\n]\n')
    _, report = read(["data=acronyms_sample", f"data.path={acronyms}"])
    assert report["skipped"] == [f'{acronyms}:3: missing field "definition"', f"{acronyms}:4: the entry is not an object",
                                 f'{acronyms}:5: "acronym" is not a non-empty string']


def test_json_that_parses_into_nothing_usable_is_skipped_with_its_line(tmp_path):
    good = json.dumps(GOOD_CHAT).encode()
    path = write_lines(tmp_path / "chat.jsonl", [
        b"\xef\xbb\xbf" + good,  # a byte order mark on the first line is no error
        b'{"id": ' + b"7" * 5000 + b', "messages": []}',
        b"[" * 100_000 + b"]" * 100_000,
        b'{"messages": [{"role": "user", "content": "lone \\ud800"}, {"role": "assistant", "content": "x"}]}',
        b'{"messages": [{"role": "user", "content": "pair \\ud83d\\ude00 ok"}, '
        b'{"role": "assistant", "content": "An answer that is long enough."}]}',
        b'{"messages": [{"role": "' + b"r" * 100_000 + b'", "content": "x"}]}',
    ])
    conversations, report = read(["data=chat_jsonl", f"data.path={path}"])
    assert len(conversations) == 2 and report["records_read"] == 6
    assert report["skipped"] == [
        f"{path}:2: bad JSON (a number with too many digits)",
        f"{path}:3: bad JSON (nested too deeply)",
        f"{path}:4: not valid Unicode text (an escaped lone surrogate such as \\ud800)",
        f"{path}:6: message 0 has unknown role 'rrrrrrrrrrrrrrrrrrrrrrrrrrrrrrrrrrrrrrrrrrrrrrrrrrrrrrrr... "
        f"(expected one of system, user, assistant)",
    ]


def test_ticket_fields_of_the_wrong_type_skip_the_ticket(tmp_path):
    def ticket(number, **fields):
        messages = [{"from": "a@uni.example.org", "body": f"My quota {number} is full."},
                    {"from": "b@help.example.org", "body": "Clean your conda caches with conda clean -a."}]
        return json.dumps({"id": number, "subject": "Quota", "messages": messages, **fields}).encode()

    internal = json.loads(ticket(3))
    internal["messages"][1]["internal"] = "yes"
    path = write_lines(tmp_path / "t.jsonl", [ticket(1), ticket(2, subject=0), json.dumps(internal).encode(),
                                             ticket(" "), ticket(5, subject=None)])
    conversations, report = read(["data.format=tickets_jsonl", f"data.path={path}", STAFF])
    assert [c.id for c in conversations] == ["1", "5"]
    assert report["skipped"] == [f'{path}:2: "subject" is not a string',
                                 f'{path}:3: message 1 has an "internal" that is neither true nor false',
                                 f'{path}:4: "id" is empty']


def test_damage_in_acronyms_email_and_csv_files_stays_where_it_is(tmp_path):
    glossary = tmp_path / "g.json"
    glossary.write_bytes(b'\xef\xbb\xbf[\n  {"acronym": "MPI", "definition": "Message Passing Interface: a standard."},\n'
                         b'  {"acronym": "GPU", "definition": "Graphics Processing Unit: caf\xe9 latin-1."},\n'
                         b'  {"acronym": "X", "definition": "lone \\udc00 surrogate"},\n'
                         b'  {"acronym": "OOM", "definition": "Out Of Memory: the job used more than it asked."}\n]\n')
    conversations, report = read(["data=acronyms_sample", f"data.path={glossary}"])
    assert {c.id for c in conversations} == {"acronym:MPI", "acronym:OOM"} and report["records_read"] == 4
    assert report["skipped"] == [f"{glossary}:3: not UTF-8 text",
                                 f"{glossary}:4: not valid Unicode text (an escaped lone surrogate such as \\ud800)"]

    folder = tmp_path / "mails"
    folder.mkdir()
    good = mail("<m1@x>", "[Ticket #5] Help", "u@uni.example.org", "Question?", "Mon, 06 Jan 2025 09:00:00 +0100")
    reply = mail("<m2@x>", "Re: [Ticket #5] Help", "s@help.example.org", "An answer long enough to keep.",
                 "Mon, 06 Jan 2025 10:00:00 +0100", ["<m1@x>"])
    (folder / "a.mbox").write_bytes(b"\xef\xbb\xbfjunk before the first mail\nFrom a@b Mon Jan  6 09:00:00 2025\n"
                                    + good + b"\nFrom a@b Mon Jan  6 10:00:00 2025\n" + reply)
    (folder / "b.eml").write_bytes(b"")
    (folder / "c.eml").write_bytes("From: x@y\n\nUTF-16".encode("utf-16"))
    conversations, report = read(["data.format=email", f"data.path={folder}", STAFF])
    assert [c.id for c in conversations] == ["ticket#5"]
    assert report["skipped"] == [
        f'{folder / "a.mbox"}:1: unreadable mail (ValueError: missing "From" header)', f"{folder / 'b.eml'}: empty file",
        f"{folder / 'c.eml'}: not an e-mail file (binary data, or UTF-16 text: mail is ASCII or UTF-8)"]

    folder = tmp_path / "csv"
    folder.mkdir()
    (folder / "a.csv").write_bytes(b"question,answer\nQuota?,Clean conda caches with conda clean -a.\n,\n"
                                   b'"GPU?,Unclosed quote\nNext?,Swallowed\n')
    (folder / "b.csv").write_bytes(b"\n")
    (folder / "c.csv").write_bytes("question,answer\nQ,A\n".encode("utf-16"))
    conversations, report = read(["data=csv", f"data.path={folder}"])
    assert len(conversations) == 1 and report["skipped"] == [
        f"{folder / 'a.csv'}:3: empty question",
        f"{folder / 'a.csv'}:4: fewer fields than the 2 columns of the header (the row runs on to line 5: a quote "
        f"left open?)",
        f"{folder / 'b.csv'}: empty file", f"{folder / 'c.csv'}:1: the header is not UTF-8 text; the file is unread"]


def test_strict_mode_stops_with_one_sentence_naming_file_and_line(tmp_path):
    path = write_lines(tmp_path / "chat.jsonl", [json.dumps(GOOD_CHAT).encode(), b"{oops"])
    result = run_llmft("data", "prepare", "data=chat_jsonl", f"data.path={path}", "data.strict=true",
                       f"data.output_dir={tmp_path / 'out'}", timeout=120)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [
        f"llmft: {path}:2: bad JSON (Expecting property name enclosed in double quotes) "
        f"(data.strict=true stops at the first bad record; fix or remove it)."
    ]


def mail(message_id: str, subject: str, sender: str, body: str, date: str, reply_to: list[str] = ()) -> bytes:
    message = EmailMessage()
    message["From"], message["Subject"], message["Message-ID"], message["Date"] = sender, subject, message_id, date
    if reply_to:
        message["In-Reply-To"], message["References"] = reply_to[-1], " ".join(reply_to)
    message.set_content(body)
    return message.as_bytes()


def test_email_is_threaded_by_references_and_by_ticket_id_in_the_subject(tmp_path):
    user, staff = "Ada <ada@uni.example.org>", "Support <support@help.example.org>"
    folder = tmp_path / "mails"
    folder.mkdir()
    mails = {
        # thread 1: linked by References only (subjects differ)
        "a1.eml": mail("<a1@x>", "GPU job pending", user, "My GPU job stays pending.", "Mon, 06 Jan 2025 09:00:00 +0100"),
        "a2.eml": mail("<a2@x>", "Re: your question", staff, "Your QoS allows 8 GPUs; you use 8 already.",
                       "Mon, 06 Jan 2025 10:00:00 +0100", ["<a1@x>"]),
        # thread 2: no header links, only [Ticket #77] in the subjects; the reply is earlier in the folder order
        "b0.eml": mail("<b2@x>", "RE: [Ticket #77] Quota", staff, "Run idr_quota_user to see the inode count.",
                       "Tue, 07 Jan 2025 10:00:00 +0100"),
        "b1.eml": mail("<b1@x>", "[Ticket #77] Quota", user, "Disk quota exceeded on WORK.", "Tue, 07 Jan 2025 09:00:00 +0100"),
        "c1.eml": b"\xff\xfe not a mail at all",
        "d1.eml": mail("<d1@x>", "Out of office", staff, "I am away.", "Tue, 07 Jan 2025 09:00:00 +0100"),
    }
    mails["d1.eml"] = b"Auto-Submitted: auto-replied\n" + mails["d1.eml"]
    for name, raw in mails.items():
        (folder / name).write_bytes(raw)
    conversations, report = read(["data.format=email", f"data.path={folder}", STAFF])
    by_id = {c.id: c.messages for c in conversations}
    assert by_id["ticket#77"] == [
        {"role": "user", "content": "Quota\n\nDisk quota exceeded on WORK."},
        {"role": "assistant", "content": "Run idr_quota_user to see the inode count."},
    ]
    assert by_id["<a1@x>"] == [
        {"role": "user", "content": "GPU job pending\n\nMy GPU job stays pending."},
        {"role": "assistant", "content": "Your QoS allows <NUM> GPUs; you use <NUM> already.".replace("<NUM>", "8")},
    ]
    assert report["reader_dropped"] == {"auto_replies": 1}
    assert report["skipped"] == [f"{folder / 'c1.eml'}: not an e-mail file (binary data, or UTF-16 text: mail is "
                                 f"ASCII or UTF-8)"]


def test_mbox_bad_mail_is_reported_with_its_line(tmp_path):
    good = mail("<m1@x>", "[Ticket #5] Help", "u@uni.example.org", "Question?", "Mon, 06 Jan 2025 09:00:00 +0100")
    reply = mail("<m2@x>", "Re: [Ticket #5] Help", "s@help.example.org", "An answer long enough to keep.",
                 "Mon, 06 Jan 2025 10:00:00 +0100", ["<m1@x>"])
    broken = b"Subject: no sender\n\nbody without From header\n"
    mbox = tmp_path / "export.mbox"
    mbox.write_bytes(b"From a@b Mon Jan  6 09:00:00 2025\n" + good + b"\n"
                     + b"From a@b Mon Jan  6 09:30:00 2025\n" + broken + b"\n"
                     + b"From a@b Mon Jan  6 10:00:00 2025\n" + reply + b"\n")
    broken_line = 1 + good.count(b"\n") + 2
    conversations, report = read(["data.format=email", f"data.path={mbox}", STAFF])
    assert [c.id for c in conversations] == ["ticket#5"]
    assert report["skipped"] == [f'{mbox}:{broken_line}: unreadable mail (ValueError: missing "From" header)']


def test_email_html_is_decided_by_the_mime_type_not_by_an_address_that_starts_like_a_tag(tmp_path):
    user, staff = "Ada Lovelace <ada@uni.example.org>", "Claire <claire@help.example.org>"
    commands = "    module purge\n    module load cuda/12.4\n    sbatch --gres=gpu:1 job.slurm"
    chunks = []
    for n, tag in enumerate(HTML_TAGS, start=1):
        question = mail(f"<q{n}@x>", f"[Ticket #{n}] GPU job pending", user, f"My GPU job {n} stays pending.",
                        "Mon, 06 Jan 2025 09:00:00 +0100")
        answer = (f"Hello,\n\nI copied Jean Dupont <{tag}.dupont@example.org> on this ticket.\n\nRun these:\n\n"
                  f"{commands}\n\nIt should start within the hour.\n\n"
                  f"On Mon, 6 Jan 2025 at 09:00, Jean Dupont <{tag}.dupont@example.org> wrote:\n> OLD QUOTED TEXT\n")
        reply = mail(f"<r{n}@x>", f"Re: [Ticket #{n}] GPU job pending", staff, answer,
                     "Mon, 06 Jan 2025 10:00:00 +0100", [f"<q{n}@x>"])
        chunks += [b"From a@b Mon Jan  6 09:00:00 2025\n" + question, b"From a@b Mon Jan  6 10:00:00 2025\n" + reply]
    html = EmailMessage()  # an HTML-only mail is still turned into text, its quote dropped
    html["From"], html["Subject"], html["Message-ID"] = staff, "Re: [Ticket #1] GPU job pending", "<h1@x>"
    html["Date"] = "Mon, 06 Jan 2025 11:00:00 +0100"
    html.set_content("<div>One more thing:<br><pre>squeue -u $USER\nscontrol show job 1</pre>"
                     "<blockquote>HTML QUOTE</blockquote></div>", subtype="html")
    chunks.append(b"From a@b Mon Jan  6 11:00:00 2025\n" + html.as_bytes())
    mbox = tmp_path / "export.mbox"
    mbox.write_bytes(b"\n".join(chunks) + b"\n")
    conversations, report = read(["data.format=email", f"data.path={mbox}", STAFF])
    assert report["skipped"] == [] and len(conversations) == len(HTML_TAGS)
    for conversation in conversations:
        answer = conversation.messages[1]["content"]
        assert f"Run these:\n\n{commands}\n\nIt should start within the hour." in answer, answer
        assert "OLD QUOTED TEXT" not in answer and "wrote:" not in answer
    first = next(c for c in conversations if c.id == "ticket#1").messages[1]["content"]
    assert first.endswith("One more thing:\n\nsqueue -u $USER\nscontrol show job 1") and "HTML QUOTE" not in first


def test_split_is_deterministic_and_adding_tickets_never_moves_old_ones():
    old = [f"T-{i}" for i in range(2000)]
    before = {i: split_of(i, 0.1, 0.05) for i in old}
    after = {i: split_of(i, 0.1, 0.05) for i in old + [f"T-{i}" for i in range(2000, 6000)]}
    assert all(after[i] == before[i] for i in old)
    counts = {s: list(after.values()).count(s) for s in ("train", "validation", "test")}
    assert 0.08 < counts["validation"] / 6000 < 0.12 and 0.035 < counts["test"] / 6000 < 0.065


def test_acronyms_give_varied_french_and_english_conversations_in_one_split_each(tmp_path):
    conversations, report = read(["data=acronyms_sample"])
    assert report["records_read"] >= 50 and not report["skipped"]
    by_acronym: dict[str, list] = {}
    for conversation in conversations:
        by_acronym.setdefault(conversation.id, []).append(conversation)
    questions = {c.messages[-2]["content"] if len(c.messages) == 2 else c.messages[0]["content"] for c in conversations}
    assert len(questions) > len(by_acronym) * 2  # varied phrasings
    assert any("Que signifie" in q or "C'est quoi" in q or "ça veut dire" in q for q in questions)
    assert any("stand for" in q or "What is" in q for q in questions)
    assert all(c.messages[-1]["role"] == "assistant" for c in conversations)


class _FakeLLM(BaseHTTPRequestHandler):
    def do_POST(self):  # noqa: N802 (http.server's naming)
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        assert body["model"] == "tiny-llm" and self.path == "/v1/chat/completions"
        conversations = [[{"role": "user", "content": "What is MPI?"},
                          {"role": "assistant", "content": "MPI is the Message Passing Interface standard."}]]
        answer = {"choices": [{"message": {"content": "```json\n" + json.dumps(conversations) + "\n```"}}]}
        payload = json.dumps(answer).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, *args):
        pass


def test_acronyms_from_an_openai_compatible_endpoint_and_fallback_when_it_is_down(tmp_path):
    glossary = tmp_path / "g.json"
    glossary.write_text(json.dumps([{"acronym": "MPI", "definition": "Message Passing Interface: a standard."}]))
    server = HTTPServer(("127.0.0.1", 0), _FakeLLM)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_port}/v1"
        conversations, report = read(["data=acronyms_sample", f"data.path={glossary}", f"data.acronyms.llm_url={url}",
                                      "data.acronyms.llm_model=tiny-llm"])
        assert conversations[0].messages[-1]["content"] == "MPI is the Message Passing Interface standard."
        assert report["reader_dropped"] == {"llm_conversations": 1}
    finally:
        server.shutdown()
    conversations, report = read(["data=acronyms_sample", f"data.path={glossary}", "data.acronyms.llm_url=http://127.0.0.1:9/v1",
                                  "data.acronyms.llm_model=tiny-llm", "data.acronyms.llm_timeout_s=2"])
    assert report["reader_dropped"] == {"llm_failures_fell_back_to_templates": 1} and len(conversations) >= 3


def test_no_usable_conversation_is_one_clear_error(tmp_path):
    path = write_lines(tmp_path / "t.jsonl", [json.dumps({"id": 1, "messages": [
        {"from": "a@uni.example.org", "body": "Hello? Anyone?"}]}).encode()])
    with pytest.raises(DataError, match=r"no usable conversation .*1 no_assistant_turn"):
        read(["data.format=tickets_jsonl", f"data.path={path}", STAFF])
