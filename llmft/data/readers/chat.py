"""Read chat-format JSONL: one conversation a line, `{"messages": [{"role": ..., "content": ...}]}`.

An optional "id" names the ticket the conversation comes from (the split is a hash of it); without one, the id is
a hash of the line. Other keys are ignored, so the audit files that `prepare` writes read back as they are.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from llmft.data.readers.records import ROLES, Conversation, ReadReport, jsonl_records, short_repr


def check_messages(record: object) -> list[dict[str, str]]:
    """The record's messages as {"role", "content"}, or ValueError with a short reason."""
    if not isinstance(record, dict) or "messages" not in record:
        raise ValueError('missing field "messages"')
    messages = record["messages"]
    if not isinstance(messages, list):
        raise ValueError('"messages" is not a list')
    if not messages:
        raise ValueError("empty conversation")
    return checked_message_list(messages)


def checked_message_list(messages: list, prefix: str = "") -> list[dict[str, str]]:
    """Each item as {"role", "content"}, or ValueError naming the first bad one (`prefix`: the field, if any)."""
    clean = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise ValueError(f"{prefix}message {i} is not an object")
        role, content = message.get("role"), message.get("content")
        if role not in ROLES:
            raise ValueError(f"{prefix}message {i} has unknown role {short_repr(role)} "
                             f"(expected one of {', '.join(ROLES)})")
        if not isinstance(content, str):
            raise ValueError(f'{prefix}message {i} has no text "content"')
        clean.append({"role": role, "content": content})
    return clean


def read_chat_jsonl(path: Path, data_cfg, report: ReadReport) -> list[Conversation]:
    return chats_of(jsonl_records(path, report), report)


def chats_of(records, report: ReadReport) -> list[Conversation]:
    """The conversations of (file:line, raw, JSON) records: all of a file, or a chunk of it in a worker."""
    conversations: list[Conversation] = []
    for where, raw, record in records:
        try:
            messages = check_messages(record)
            record_id = record.get("id")
            if record_id is not None and (not isinstance(record_id, (str, int)) or isinstance(record_id, bool)):
                raise ValueError('"id" is neither a string nor a number')
        except ValueError as error:
            report.skip(where, str(error))
        else:
            record_id = record_id if record_id is not None else hashlib.sha1(raw.strip()).hexdigest()[:16]
            conversations.append(Conversation(str(record_id), messages, where))
    return conversations
