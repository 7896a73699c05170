"""What every reader produces: conversations, and the record of what it skipped and why.

A malformed record is skipped and counted with its file:line (or, with `data.strict=true`, stops the run with one
sentence naming it). Never a traceback for bad data, never a silent drop.
"""

from __future__ import annotations

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


class ReadReport:
    """Records read and bad records skipped ("file:line: reason"); in strict mode the first bad record stops."""

    def __init__(self, strict: bool = False):
        self.strict = strict
        self.records_read = 0
        self.skipped: list[str] = []
        self.counts: dict[str, int] = {}  # what readers dropped on purpose (internal notes, auto-replies), by reason

    def count(self, reason: str, n: int = 1) -> None:
        if n:
            self.counts[reason] = self.counts.get(reason, 0) + n

    def skip(self, where: str, reason: str) -> None:
        if self.strict:
            raise DataError(f"{where}: {reason} (data.strict=true stops at the first bad record; fix or remove it).")
        self.skipped.append(f"{where}: {reason}")

    def as_dict(self) -> dict:
        return {"records_read": self.records_read, "num_skipped": len(self.skipped), "skipped": self.skipped,
                "reader_dropped": dict(self.counts)}


def input_files(path: Path, suffixes: tuple[str, ...]) -> list[Path]:
    """`path` itself, or the files with one of `suffixes` in the folder `path`, sorted for determinism."""
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.name.lower().endswith(suffixes))
        if not files:
            raise DataError(f"{path} holds no {' or '.join(suffixes)} file.")
        return files
    if not path.exists():
        raise DataError(f"{path} does not exist: point data.path at your data file or folder.")
    return [path]


def line_of(text: str, offset: int) -> int:
    return text.count("\n", 0, offset) + 1



def jsonl_records(path: Path, report: ReadReport):
    """(file:line, raw bytes, parsed JSON) of every non-blank line of the .jsonl/.json files at `path`, counted as
    read; a line that is not UTF-8 or not JSON is skipped here with its reason, so readers check only their fields."""
    import json

    for file in input_files(path, (".jsonl", ".json")):
        with open(file, "rb") as handle:
            for line_number, raw in enumerate(handle, start=1):
                if not raw.strip():
                    continue
                report.records_read += 1
                where = f"{file}:{line_number}"
                try:
                    record = json.loads(raw.decode("utf-8"))
                except UnicodeDecodeError:
                    report.skip(where, "not UTF-8 text")
                except json.JSONDecodeError as error:
                    report.skip(where, f"bad JSON ({error.msg})")
                else:
                    yield where, raw, record
