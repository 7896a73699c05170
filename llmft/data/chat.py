"""Read chat-format JSONL: one conversation a line, `{"messages": [{"role": ..., "content": ...}]}`.

A malformed record is skipped and counted with its file:line (or, with `data.strict=true`, stops the run with one
sentence naming it). Never a traceback for bad data, never a silent drop.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

ROLES = ("system", "user", "assistant")


class DataError(Exception):
    """Bad input data, reported as one sentence naming the file and line."""


@dataclass
class Conversation:
    id: str
    messages: list[dict[str, str]]
    source: str  # file:line, for reports


@dataclass
class ReadReport:
    records_read: int = 0
    skipped: list[str] = field(default_factory=list)  # "file:line: reason"

    def as_dict(self) -> dict:
        return {"records_read": self.records_read, "num_skipped": len(self.skipped), "skipped": self.skipped}


def input_files(path: Path, suffixes: tuple[str, ...]) -> list[Path]:
    """`path` itself, or the files with one of `suffixes` in the folder `path`, sorted for determinism."""
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.name.endswith(suffixes))
        if not files:
            raise DataError(f"{path} holds no {' or '.join(suffixes)} file.")
        return files
    if not path.exists():
        raise DataError(f"{path} does not exist.")
    return [path]


def _check_messages(record: object) -> list[dict[str, str]]:
    """The record's messages, or ValueError with a short reason."""
    if not isinstance(record, dict) or "messages" not in record:
        raise ValueError('missing field "messages"')
    messages = record["messages"]
    if not isinstance(messages, list):
        raise ValueError('"messages" is not a list')
    if not messages:
        raise ValueError("empty conversation")
    clean = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise ValueError(f"message {i} is not an object")
        role, content = message.get("role"), message.get("content")
        if role not in ROLES:
            raise ValueError(f"message {i} has unknown role {role!r} (expected one of {', '.join(ROLES)})")
        if not isinstance(content, str):
            raise ValueError(f'message {i} has no text "content"')
        clean.append({"role": role, "content": content})
    if not any(m["role"] == "assistant" and m["content"].strip() for m in clean):
        raise ValueError("no assistant turn to learn from")
    return clean


def read_chat_jsonl(path: Path, strict: bool) -> tuple[list[Conversation], ReadReport]:
    conversations: list[Conversation] = []
    report = ReadReport()
    for file in input_files(path, (".jsonl", ".json")):
        with open(file, "rb") as handle:
            for line_number, raw in enumerate(handle, start=1):
                if not raw.strip():
                    continue
                report.records_read += 1
                where = f"{file}:{line_number}"
                try:
                    record = json.loads(raw.decode("utf-8"))
                    messages = _check_messages(record)
                except UnicodeDecodeError:
                    reason = "not UTF-8 text"
                except json.JSONDecodeError as error:
                    reason = f"bad JSON ({error.msg})"
                except ValueError as error:
                    reason = str(error)
                else:
                    record_id = record.get("id") or hashlib.sha1(raw.strip()).hexdigest()
                    conversations.append(Conversation(str(record_id), messages, where))
                    continue
                if strict:
                    raise DataError(f"{where}: {reason} (data.strict=true stops at the first bad record).")
                report.skipped.append(f"{where}: {reason}")
    return conversations, report


def split_of(conversation_id: str, validation_fraction: float) -> str:
    """'train' or 'validation', from a hash of the id: deterministic, and adding data never moves old records."""
    bucket = int.from_bytes(hashlib.sha256(conversation_id.encode()).digest()[:8], "big") / 2**64
    return "validation" if bucket < validation_fraction else "train"
