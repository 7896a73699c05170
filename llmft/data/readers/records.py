"""What every reader produces: conversations, and the record of what it skipped and why.

A malformed record is skipped and counted with its file:line (or, with `data.strict=true`, stops the run with one
sentence naming it). Never a traceback for bad data, never a silent drop.
"""

from __future__ import annotations

import codecs
import io
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from llmft.errors import UserError

ROLES = ("system", "user", "assistant")


class DataError(UserError):
    """Bad input data or data settings, reported as one sentence naming the file and line, or the key."""


@dataclass
class Conversation:
    id: str  # the ticket (or group) it comes from: the split is a hash of it, so one ticket never spans two splits
    # {"role", "content"}; readers of tickets and e-mail also set "author" (the From header), which cleaning uses
    # to find signatures and then removes.
    messages: list[dict[str, str]]
    source: str  # file:line, for reports
    participants: list[str] = field(default_factory=list)  # From-header names of tickets and e-mail, scrubbed
    subject: str = ""  # tickets and e-mail: put on top of the first user turn once cleaned (data.tickets.include_subject)
    # What a right answer to the last question contains (an acronym's expansion); `llmft eval` counts the answers
    # that do. Empty: no such phrase.
    expected: str = ""


# A reader that decides a conversation's split itself ends its id with one of these (splits.py): the hash of the
# id decides the others. `held-out` is the test split where there is one, else validation.
PINNED_TO_TRAIN = "#train"
PINNED_HELD_OUT = "#held-out"


class ReadReport:
    """Records read and bad records skipped ("file:line: reason"); in strict mode the first bad record stops."""

    def __init__(self, strict: bool = False):
        self.strict = strict
        self.records_read = 0
        self.skipped: list[str] = []
        self.counts: dict[str, int] = {}  # what readers dropped on purpose (internal notes, auto-replies), by reason
        # tickets_jsonl and email: the tickets each sender domain wrote in, and the messages the staff rule made
        # answers (a rule that matches no sender says which domains it saw). Not in the report: only in that error.
        self.sender_domains: dict[str, int] = {}
        self.staff_messages = 0

    def count(self, reason: str, n: int = 1) -> None:
        if n:
            self.counts[reason] = self.counts.get(reason, 0) + n

    def count_senders(self, domains: list[str], num_staff_messages: int) -> None:
        """One ticket's senders: the domains of its messages' authors, and how many messages are staff's."""
        for domain in set(domains):
            self.sender_domains[domain] = self.sender_domains.get(domain, 0) + 1
        self.staff_messages += num_staff_messages

    def skip(self, where: str, reason: str) -> None:
        if self.strict:
            raise DataError(f"{where}: {reason} (data.strict=true stops at the first bad record; fix or remove it).")
        self.skipped.append(f"{where}: {reason}")

    def merge(self, part: "ReadReport") -> None:
        """Add the report of the next chunk of the input (read in a worker): lists and first-seen orders as if one
        reader had read both."""
        self.records_read += part.records_read
        self.skipped += part.skipped
        for reason, n in part.counts.items():
            self.count(reason, n)
        for domain, n in part.sender_domains.items():
            self.sender_domains[domain] = self.sender_domains.get(domain, 0) + n
        self.staff_messages += part.staff_messages

    def as_dict(self) -> dict:
        return {"records_read": self.records_read, "num_skipped": len(self.skipped), "skipped": self.skipped,
                "reader_dropped": dict(self.counts)}


def skipped_lines(skipped: list[str], num_skipped: int | None = None, shown: int = 5,
                  listed_in: str = "report.json") -> list[str]:
    """The console's account of the bad records: a heading, the first `shown` as `file:line: reason` in full, and
    how many more (every one of them is listed in `listed_in`)."""
    num_skipped = len(skipped) if num_skipped is None else num_skipped
    if not num_skipped:
        return []
    lines = [f"skipped {num_skipped} bad record{'s' if num_skipped > 1 else ''} (data.strict=true stops at the "
             f"first):"]
    lines += [f"  {where}" for where in skipped[:shown]]
    if num_skipped > min(shown, len(skipped)):
        lines.append(f"  ... and {num_skipped - min(shown, len(skipped))} more (all in {listed_in})")
    return lines


def input_files(path: Path, suffixes: tuple[str, ...]) -> list[Path]:
    """`path` itself, or the files with one of `suffixes` in the folder `path`, sorted for determinism. A folder in it
    that cannot be listed is in the list too, at its place: its reader reports it as it reports a file it cannot
    read (`unreadable`), so the files it hides are never silently missing."""
    try:
        is_dir = path.is_dir()
        exists = is_dir or path.exists()
    except OSError:  # a parent folder that cannot be searched: the reader says why when it opens the path
        return [path]
    if not exists:
        raise DataError(f"{path} does not exist: point data.path at your data file or folder.")
    if not is_dir:
        return [path]
    found: list[Path] = []
    unlistable: list[Path] = []
    for folder, _, names in os.walk(path, onerror=lambda error: unlistable.append(Path(error.filename))):
        for name in names:
            if name.lower().endswith(suffixes):
                file = Path(folder, name)
                try:
                    is_file = file.is_file()
                except OSError:
                    is_file = True  # (its reader reports why it cannot be read)
                if is_file:
                    found.append(file)
    if not found and not unlistable:
        raise DataError(f"{path} holds no {' or '.join(suffixes)} file.")
    return sorted(found + unlistable)


def unreadable(file: Path, error: OSError) -> str:
    """Why an input file (or a folder of the input) cannot be read, as the report says it after its name:
    "permission denied" for a file on a shared project space that its owner did not open to the group."""
    try:
        is_folder = file.is_dir()
    except OSError:
        is_folder = False
    if is_folder:  # a folder of the input that os.walk could not list
        try:
            os.scandir(file).close()
        except OSError as listing:
            error = listing
        else:
            return "a folder, not a file"
        reason = "permission denied" if isinstance(error, PermissionError) else (error.strerror or "error").lower()
        return f"{reason} (a folder that cannot be listed: its files are not read)"
    if isinstance(error, PermissionError):
        return "permission denied"
    return (error.strerror or type(error).__name__).lower()


def file_size(file: Path) -> int:
    """The size of an input file, 0 when it cannot be read (its reader reports it)."""
    try:
        return file.stat().st_size
    except OSError:
        return 0


def line_of(text: str, offset: int) -> int:
    return text.count("\n", 0, offset) + 1


def short_repr(value: object, limit: int = 60) -> str:
    """repr(value) cut to `limit` characters, for a reason that names a bad value (it may be a 1 MB string)."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F][0-9a-fA-F]{2}")
_SURROGATE = re.compile("[\ud800-\udfff]")
_DECODER = json.JSONDecoder()


def _has_surrogate(value: object) -> bool:
    stack = [value]  # a loop, not recursion: the value may be nested as deep as the JSON decoder allows
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            if _SURROGATE.search(item):
                return True
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return False


class JsonError(ValueError):
    """JSON that cannot be read: str() is the reason, `pos` the offset in the text where it went wrong."""

    def __init__(self, reason: str, pos: int):
        super().__init__(reason)
        self.pos = pos


def decode_json(text: str, position: int | None = None) -> tuple[object, int]:
    """The JSON value of `text` (or of the value that starts at `position`) and where it ends, or JsonError. Besides
    bad syntax, JSON nested deeper than Python's recursion limit and numbers too long for `int` are errors here."""
    try:
        if position is None:
            return json.loads(text), len(text)
        return _DECODER.raw_decode(text, position)
    except json.JSONDecodeError as error:
        raise JsonError(f"bad JSON ({error.msg})", error.pos) from None
    except RecursionError:
        raise JsonError("bad JSON (nested too deeply)", position or 0) from None
    except ValueError as error:  # "Exceeds the limit (4300 digits) for integer string conversion"
        reason = "a number with too many digits" if "digits" in str(error) else str(error)[:80]
        raise JsonError(f"bad JSON ({reason})", position or 0) from None


def text_problem(text: str, start: int, end: int, value: object) -> str | None:
    """Why the JSON `text[start:end]`, decoded into `value`, holds no valid text, or None. `text` may come from
    bytes decoded with "surrogateescape": a byte that is not UTF-8 is then a surrogate in the text. An escaped lone
    surrogate (`"\\ud800"`) is no text either: no encoder, file or tokenizer accepts it later."""
    if _SURROGATE.search(text, start, end):
        return "not UTF-8 text"
    if _SURROGATE_ESCAPE.search(text, start, end) and _has_surrogate(value):
        return "not valid Unicode text (an escaped lone surrogate such as \\ud800)"
    return None


def jsonl_records(path: Path, report: ReadReport):
    """(file:line, raw bytes, parsed JSON) of every non-blank line of the .jsonl/.json files at `path`, counted as
    read; a line that is not UTF-8 or not JSON is skipped here with its reason, so readers check only their fields."""
    for file in input_files(path, (".jsonl", ".json")):
        try:
            handle = open(file, "rb")
        except OSError as error:
            report.skip(str(file), unreadable(file, error))
            continue
        with handle:
            yield from jsonl_lines(file, handle, 1, report)


def jsonl_chunks(path: Path, chunk_bytes) -> list[tuple]:
    """The .jsonl/.json files at `path` cut at line ends into pieces of `chunk_bytes.next()` bytes or a little more
    (workers.ChunkSizes): ("jsonl", file, offset, size, number of the first line), for `jsonl_chunk_records` in
    workers, or ("skip", file, reason) for a file that cannot be read."""
    pieces: list[tuple] = []
    for file in input_files(path, (".jsonl", ".json")):
        try:
            handle = open(file, "rb")
        except OSError as error:
            pieces.append(("skip", str(file), unreadable(file, error)))
            continue
        with handle:
            offset, line = 0, 1
            while block := handle.read(chunk_bytes.next()):
                block += handle.readline()  # to the end of the line the block stops in
                pieces.append(("jsonl", file, offset, len(block), line))
                chunk_bytes.took(len(block))
                offset, line = offset + len(block), line + block.count(b"\n")
    return pieces


def jsonl_chunk_records(file: Path, offset: int, size: int, first_line: int, report: ReadReport):
    """`jsonl_records` of one piece of `jsonl_chunks`: the same records, line numbers and reasons."""
    with open(file, "rb") as handle:
        handle.seek(offset)
        yield from jsonl_lines(file, io.BytesIO(handle.read(size)), first_line, report)


def jsonl_lines(file: Path, lines, first_line: int, report: ReadReport):
    for line_number, raw in enumerate(lines, start=first_line):
        if line_number == 1 and raw.startswith(codecs.BOM_UTF8):
            raw = raw[len(codecs.BOM_UTF8):]  # a UTF-8 file saved by Notepad: the mark is no record
        if not raw.strip():
            continue
        report.records_read += 1
        where = f"{file}:{line_number}"
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            report.skip(where, "not UTF-8 text")
            continue
        try:
            record, _ = decode_json(text)
        except JsonError as error:
            report.skip(where, str(error))
            continue
        problem = text_problem(text, 0, len(text), record)
        if problem:
            report.skip(where, problem)
            continue
        yield where, raw, record
