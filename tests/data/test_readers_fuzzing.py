"""Fuzzing of every reader through the real entry point, `read_conversations`: seeded random mutations of the bundled
samples (truncated lines, flipped bytes, wrong encodings, deleted fields, fields of the wrong type, huge fields,
empty files, binary garbage). Whatever the input, the pipeline either returns conversations with every skipped
record reported as `file:line: reason` (or `file: reason`), or stops with one DataError naming the file: never
another exception. A failure names the format, the seed and the mutations: `mutated_file(format, seed, folder,
sample_bytes(format))` writes that input again.
"""

from __future__ import annotations

import csv
import io
import json
import random
import re
import traceback
from pathlib import Path

import pytest
from omegaconf import OmegaConf

import llmft.data
from llmft.config.compose import compose
from llmft.data.readers.email_threads import mbox_chunks
from llmft.data.prepare.reading import read_conversations
from llmft.data.readers.records import ROLES, DataError

SAMPLES = Path(llmft.data.__file__).parent / "samples"
MUTATIONS_PER_FORMAT = 40
MB = 1 << 20
EMAIL_SAMPLE_MAILS = 40  # the e-mail package parses ~200 mails a second: a slice of the mbox keeps this test short

# (composition overrides, file suffix); data.path is set per mutated file
FORMATS = {
    "chat_jsonl": (["data=tickets_sample"], ".jsonl"),
    "tickets_jsonl": (["data=tickets_sample_jsonl"], ".jsonl"),
    "email": (["data=tickets_sample_mbox"], ".mbox"),
    "csv": (["data=csv", "data.path=unset", "data.csv.question_columns=[subject,question]",
             "data.csv.answer_column=answer", "data.csv.id_column=id"], ".csv"),
    "acronyms": (["data=acronyms_sample"], ".json"),
}

# Placeholders put in the JSON tree, replaced in the serialized text by what json.dumps cannot write.
_RAW = {
    "\x00HUGE_NUMBER\x00": "7" * MB,  # a 1 MB integer: beyond Python's int-from-string limit
    "\x00DEEP\x00": "[" * 100_000 + "]" * 100_000,  # nested beyond the JSON decoder's recursion limit
    "\x00SURROGATE\x00": '"lone \\ud800 surrogate"',
    "\x00BAD_ESCAPE\x00": '"bad \\x escape"',
    "\x00NAN\x00": "NaN",
}


def huge_text(rng: random.Random) -> str:
    words = ["sbatch", "srun", "module", "load", "cuda", "quota", "job", "GPU", "node", "error", "é", "\n", "\n> "]
    words += ["<p>", "</div>", "<br>"] if rng.random() < 0.3 else []  # then the cleaning takes it for HTML
    return " ".join(rng.choices(words, k=MB // 5))[:MB]


def sample_bytes(data_format: str) -> bytes:
    if data_format == "chat_jsonl":
        return (SAMPLES / "tickets_sample.chat.jsonl").read_bytes()
    if data_format == "tickets_jsonl":
        return (SAMPLES / "tickets_sample.jsonl").read_bytes()
    if data_format == "acronyms":
        return (SAMPLES / "acronyms_sample.json").read_bytes()
    if data_format == "email":
        data = (SAMPLES / "tickets_sample.mbox").read_bytes()
        return b"".join(chunk for _, chunk in mbox_chunks(data)[:EMAIL_SAMPLE_MAILS])
    out = io.StringIO()  # csv: question / answer pairs from the chat sample
    writer = csv.writer(out)
    writer.writerow(["id", "subject", "question", "answer"])
    for number, line in enumerate((SAMPLES / "tickets_sample.chat.jsonl").read_text().splitlines(), start=1):
        messages = [m for m in json.loads(line)["messages"] if m["role"] != "system"]
        writer.writerow([f"C-{number}", f"Question {number}", messages[0]["content"], messages[1]["content"]])
    return out.getvalue().encode()


# ---------------------------------------------------------------- mutations of any file, on its bytes


def _lines(data: bytes) -> list[bytes]:
    return data.split(b"\n")


def _pick(rng: random.Random, items: list) -> int:
    return rng.randrange(len(items)) if items else 0


def truncate_lines(data: bytes, rng: random.Random) -> bytes:
    lines = _lines(data)
    for _ in range(rng.randint(1, 6)):
        i = _pick(rng, lines)
        lines[i] = lines[i][: rng.randint(0, len(lines[i]))]
    return b"\n".join(lines)


def truncate_file(data: bytes, rng: random.Random) -> bytes:
    return data[: rng.randint(0, len(data))]


def flip_bytes(data: bytes, rng: random.Random) -> bytes:
    flipped = bytearray(data)
    for _ in range(rng.randint(1, 60) if flipped else 0):
        flipped[rng.randrange(len(flipped))] ^= 1 << rng.randrange(8)
    return bytes(flipped)


def latin1_lines(data: bytes, rng: random.Random) -> bytes:
    lines = _lines(data)
    for _ in range(rng.randint(1, 8)):
        i = _pick(rng, lines)
        lines[i] = lines[i].decode("utf-8", "replace").encode("latin-1", "replace")
    return b"\n".join(lines)


def utf16_pieces(data: bytes, rng: random.Random) -> bytes:
    lines = _lines(data)
    for _ in range(rng.randint(1, 5)):
        i = _pick(rng, lines)
        text = lines[i].decode("utf-8", "replace")
        start = rng.randint(0, len(text))
        end = rng.randint(start, len(text))
        encoding = rng.choice(["utf-16", "utf-16-le", "utf-16-be"])
        lines[i] = (text[:start].encode() + text[start:end].encode(encoding, "surrogatepass") + text[end:].encode())
    return b"\n".join(lines)


def whole_file_encoding(data: bytes, rng: random.Random) -> bytes:
    return data.decode("utf-8", "replace").encode(rng.choice(["utf-16", "utf-32", "latin-1", "cp1252"]), "replace")


def invalid_utf8(data: bytes, rng: random.Random) -> bytes:
    pieces = [b"\xff", b"\xc3", b"\xed\xa0\x80", b"\xf8\x88\x80\x80\x80", b"\xc0\xaf", b"\x80\x80", b"\xe2\x82"]
    for _ in range(rng.randint(1, 10)):
        i = rng.randint(0, len(data))
        data = data[:i] + rng.choice(pieces) + data[i:]
    return data


def control_characters(data: bytes, rng: random.Random) -> bytes:
    pieces = [b"\x00", b"\x1b[31m", b"\r", b"\x0c", b"\x7f", "\u2028".encode(), "\ufeff".encode(), b"\x00" * 100]
    for _ in range(rng.randint(1, 10)):
        i = rng.randint(0, len(data))
        data = data[:i] + rng.choice(pieces) + data[i:]
    return data


def line_endings(data: bytes, rng: random.Random) -> bytes:
    return data.replace(b"\n", rng.choice([b"\r\n", b"\r", b"\n\n", b"\x85"]))


def byte_order_mark(data: bytes, rng: random.Random) -> bytes:
    return rng.choice([b"\xef\xbb\xbf", b"\xff\xfe", b"\xfe\xff"]) + data


def binary_garbage(data: bytes, rng: random.Random) -> bytes:
    garbage = rng.randbytes(rng.randint(1, 4000))
    if rng.random() < 0.3:
        return garbage  # the whole file
    i = rng.randint(0, len(data))
    return data[:i] + garbage + data[i:]


def empty_file(data: bytes, rng: random.Random) -> bytes:
    return rng.choice([b"", b"\n", b"\n\n\n", b"   \t ", b"\xef\xbb\xbf", b"\x00"])


def huge_line(data: bytes, rng: random.Random) -> bytes:
    lines = _lines(data)
    lines.insert(_pick(rng, lines), huge_text(rng).encode())
    return b"\n".join(lines)


def edit_lines(data: bytes, rng: random.Random) -> bytes:
    lines = _lines(data)
    for _ in range(rng.randint(1, 10)):
        i, j = _pick(rng, lines), _pick(rng, lines)
        action = rng.choice(["delete", "duplicate", "swap"])
        if action == "delete" and lines:
            del lines[i]
        elif action == "duplicate" and lines:
            lines.insert(j, lines[i])
        elif lines:
            lines[i], lines[j] = lines[j], lines[i]
    return b"\n".join(lines)


BYTE_MUTATIONS = [truncate_lines, truncate_file, flip_bytes, latin1_lines, utf16_pieces, whole_file_encoding,
                  invalid_utf8, control_characters, line_endings, byte_order_mark, binary_garbage, empty_file,
                  huge_line, edit_lines]

# ---------------------------------------------------------------- mutations of JSON records


def _containers(node, found: list) -> list:
    if isinstance(node, (dict, list)) and node:
        found.append(node)
        for child in (node.values() if isinstance(node, dict) else node):
            _containers(child, found)
    return found


def _wrong_value(rng: random.Random):
    return rng.choice([None, 0, -1, 3.5, True, False, [], ["a", "list"], {}, {"an": "object"}, "", " ", "\n",
                       *_RAW])


def mutate_json_node(record, rng: random.Random):
    """The record with a field deleted, or given a value of the wrong type, or a huge one; or another record."""
    if rng.random() < 0.1:
        return _wrong_value(rng)  # the whole record
    containers = _containers(record, [])
    if not containers:
        return _wrong_value(rng)
    node = rng.choice(containers)
    key = rng.choice(list(node)) if isinstance(node, dict) else rng.randrange(len(node))
    action = rng.choice(["delete", "wrong_type", "wrong_type", "huge"])
    if action == "delete":
        del node[key]
    elif action == "wrong_type":
        node[key] = _wrong_value(rng)
    else:
        node[key] = huge_text(rng) if rng.random() < 0.7 else [huge_text(rng)]
    return record


def _dump(value, rng: random.Random, indent=None) -> str:
    text = json.dumps(value, ensure_ascii=rng.random() < 0.5, indent=indent)
    for placeholder, raw in _RAW.items():
        text = text.replace(json.dumps(placeholder, ensure_ascii=False), raw).replace(json.dumps(placeholder), raw)
    return text


def json_lines_fields(data: bytes, rng: random.Random) -> bytes:
    lines = _lines(data)
    for _ in range(rng.randint(1, 4)):
        i = _pick(rng, lines)
        try:
            record = json.loads(lines[i])
        except ValueError:
            continue
        lines[i] = _dump(mutate_json_node(record, rng), rng).encode()
    return b"\n".join(lines)


def json_list_fields(data: bytes, rng: random.Random) -> bytes:
    try:
        entries = json.loads(data)
    except ValueError:
        return data
    if not isinstance(entries, list):
        return data
    for _ in range(rng.randint(1, 4)):
        if entries:
            i = rng.randrange(len(entries))
            entries[i] = mutate_json_node(entries[i], rng)
    if rng.random() < 0.05:
        entries = _wrong_value(rng)  # not a list at all
    return _dump(entries, rng, indent=rng.choice([None, 2])).encode()


# ---------------------------------------------------------------- mutations of e-mail and CSV


def mail_headers(data: bytes, rng: random.Random) -> bytes:
    lines = _lines(data)
    header = re.compile(rb"^(From|To|Subject|Date|Message-ID|In-Reply-To|References|Content-Type|"
                        rb"Content-Transfer-Encoding|MIME-Version|Auto-Submitted)\s*:", re.I)
    positions = [i for i, line in enumerate(lines) if header.match(line)]
    values = [b"", b"=?utf-8?b?!!!not base64?=", b"=?x-no-such-charset?q?abc?=", b"<<<>>>", b"\xff\xfe\xc3",
              b"text/plain; charset=\"x-no-such-charset\"", b"text/plain; charset=utf-16", b"multipart/mixed",
              b"multipart/alternative; boundary=\"\"", b"text/html", b"application/octet-stream", b"base64",
              b"quoted-printable", b"x-uuencode", b"not a date", b"Mon, 99 Foo 99999 99:99:99 +9999", b"auto-replied",
              b"a" * MB, b"Name <" * 2000]
    for _ in range(rng.randint(1, 8)):
        if not positions:
            break
        i = rng.choice(positions)
        name = lines[i].split(b":", 1)[0]
        if rng.random() < 0.3:
            lines[i] = b"X-Deleted: " + name
        else:
            lines[i] = name + b": " + rng.choice(values)
    return b"\n".join(lines)


def mail_bodies(data: bytes, rng: random.Random) -> bytes:
    lines = _lines(data)
    for _ in range(rng.randint(1, 4)):
        i = _pick(rng, lines)
        piece = rng.choice([None, b"--", b"From nobody Mon Jan  1 00:00:00 2025", b"=\xff=zz=",
                            b"<html><body><p>unclosed <div <b", b"\n", b"begin 644 x\n`\nend"])
        lines.insert(i, huge_text(rng).encode() if piece is None else piece)
    return b"\n".join(lines)


def csv_structure(data: bytes, rng: random.Random) -> bytes:
    lines = _lines(data)
    for _ in range(rng.randint(1, 6)):
        i = _pick(rng, lines)
        line = lines[i]
        position = rng.randint(0, len(line))
        piece = rng.choice([b'"', b",", b",,,,", b'",', b'"\n', b"\x00", b";", b"\t", None, b'"'])
        piece = piece if piece is not None else huge_text(rng).encode()
        lines[i] = line[:position] + piece + line[position:]
    if rng.random() < 0.1:
        lines[0] = rng.choice([b"", b"id;subject;question;answer", b"id,subject,question,question,answer"])
    return b"\n".join(lines)


SPECIFIC_MUTATIONS = {
    "chat_jsonl": [json_lines_fields] * 3,
    "tickets_jsonl": [json_lines_fields] * 3,
    "acronyms": [json_list_fields] * 3,
    "email": [mail_headers, mail_headers, mail_bodies],
    "csv": [csv_structure] * 3,
}


def mutated_file(data_format: str, seed: int, folder: Path, sample: bytes) -> tuple[Path, list[str]]:
    """The sample with 1 to 3 mutations chosen by the seed, written to folder; and the mutations' names."""
    rng = random.Random(f"llmft-fuzz:{data_format}:{seed}")
    data, names = sample, []
    for _ in range(rng.choice([1, 1, 2, 3])):
        mutation = rng.choice(BYTE_MUTATIONS + SPECIFIC_MUTATIONS[data_format])
        data = mutation(data, rng)
        names.append(mutation.__name__)
    path = folder / f"{data_format}-{seed}{FORMATS[data_format][1]}"
    path.write_bytes(data)
    return path, names


# ---------------------------------------------------------------- the checks


def check_result(data_format: str, path: Path, data_cfg, strict: bool) -> None:
    try:
        conversations, report = read_conversations(data_cfg)
    except DataError as error:  # one sentence naming the file: acceptable whatever the damage
        assert str(path) in str(error), f"the DataError does not name the file: {error}"
        assert "\n" not in str(error).strip() and len(str(error)) < 2000, f"not one short sentence: {str(error)[:300]}"
        return
    assert conversations, "no conversation and no DataError"
    pattern = re.compile(rf"{re.escape(str(path))}(:\d+)?: \S")
    for entry in report["skipped"]:
        assert pattern.match(entry), f"a skipped record that does not name its file and line: {entry[:300]}"
        assert len(entry) < 2000, f"a skipped record with an endless reason: {entry[:300]}"
    if strict:
        assert not report["skipped"], "strict mode skipped records instead of stopping"
    if data_format in ("chat_jsonl", "tickets_jsonl", "csv"):  # one record, one conversation: none vanishes
        assert report["records_read"] == report["conversations_read"] + report["num_skipped"], report
    elif data_format == "acronyms":
        per_acronym = data_cfg.acronyms.conversations_per_acronym
        whole_file = sum(1 for s in report["skipped"] if "not a JSON list" in s or s.endswith(": empty file"))
        assert report["conversations_read"] == per_acronym * (report["records_read"] - report["num_skipped"]
                                                              + whole_file), report
    else:  # e-mail: every mail is skipped, an auto-reply, or in a thread
        mails = report["records_read"] - report["num_skipped"] - report["reader_dropped"].get("auto_replies", 0)
        assert 0 < report["conversations_read"] <= mails, report
    for conversation in conversations:
        assert isinstance(conversation.id, str) and conversation.messages
        for message in conversation.messages:
            assert message["role"] in ROLES and isinstance(message["content"], str)
            message["content"].encode("utf-8")  # valid Unicode: the prepared files and the tokenizer need it
        conversation.id.encode("utf-8")


@pytest.mark.slow
@pytest.mark.parametrize("data_format", list(FORMATS))
def test_every_reader_survives_random_damage_with_file_and_line_reports(data_format, tmp_path):
    overrides, _ = FORMATS[data_format]
    base = compose(overrides).data
    sample = sample_bytes(data_format)
    failures = []
    for seed in range(MUTATIONS_PER_FORMAT):
        path, names = mutated_file(data_format, seed, tmp_path, sample)
        strict = seed % 5 == 4
        data_cfg = base.copy()
        OmegaConf.update(data_cfg, "path", str(path))
        OmegaConf.update(data_cfg, "strict", strict)
        try:
            check_result(data_format, path, data_cfg, strict)
        except Exception as error:  # noqa: BLE001 (collect them all: one run shows every crash)
            where = traceback.extract_tb(error.__traceback__)[-1]
            failures.append(f"seed {seed} ({'+'.join(names)}{', strict' if strict else ''}): "
                            f"{type(error).__name__}: {str(error)[:300]} at {Path(where.filename).name}:{where.lineno}")
        path.unlink()
    assert not failures, f"{len(failures)} of {MUTATIONS_PER_FORMAT} mutated {data_format} files failed:\n" + \
        "\n".join(failures)
