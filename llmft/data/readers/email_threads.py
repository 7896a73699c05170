"""Read e-mail (an mbox file, or a folder of .eml and mbox files) and group the mails into tickets.

Two mails belong to one ticket when one names the other in `References` / `In-Reply-To`, or when their subjects
carry the same ticket id (`data.email.ticket_id_pattern`, `[Ticket #1234]` by default): helpdesk tools often
break the header chain, and users often reply to an old mail about a new problem, so both links count. Inside
a ticket the mails are in date order. The body is the text/plain part, or the HTML part turned into text.
Auto-replies (`Auto-Submitted`, `Precedence: auto_reply`) are dropped and counted.

Python's `email` module parses each mail; the mbox is cut into mails the way `mailbox.mbox` does (a "From " line
after a blank line), keeping the line where each mail starts so a bad mail is reported as file:line.
"""

from __future__ import annotations

import codecs
import email
import email.policy
import email.utils
import re
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterator

from llmft.data.clean.html_text import html_to_text
from llmft.data.prepare.workers import ChunkSizes
from llmft.data.readers.records import Conversation, DataError, ReadReport, input_files
from llmft.data.readers.tickets import StaffRule, person_name

_REPLY_PREFIX = re.compile(r"^\s*((re|fwd?|tr|aw|wg|rv|sv|antw)\s*(\[\d+\])?\s*:\s*)+", re.I)
_MESSAGE_ID = re.compile(r"<[^<>\s]+>")


@dataclass
class Mail:
    order: int  # position in the input, to keep mails without a date in a stable place
    where: str
    message_id: str
    links: list[str]  # In-Reply-To and References ids
    ticket_id: str | None
    subject: str
    author: str
    date: datetime | None
    body: str


def mbox_chunks(data: bytes) -> list[tuple[int, bytes]]:
    """(line number, bytes) of each mail of an mbox: a mail starts at a "From " line after a blank line, or at the
    first "From " line. What comes before that line, when it is not blank, is a chunk of its own (a mail without its
    "From " line, or garbage that is then reported), so it never swallows the first mail."""
    chunks: list[tuple[int, bytes]] = []
    start, start_line, previous_blank, started = 0, 1, True, False
    offset = 0
    for line_number, line in enumerate(data.splitlines(keepends=True), start=1):
        if line.startswith(b"From ") and (previous_blank or not started):
            if data[start:offset].strip():
                chunks.append((start_line, data[start:offset]))
            start, start_line, started = offset, line_number, True
        previous_blank = not line.strip()
        offset += len(line)
    if data[start:].strip():
        chunks.append((start_line, data[start:]))
    return chunks


def _body_text(message, drop_quotes: bool) -> str:
    part = message.get_body(preferencelist=("plain", "html"))
    if part is None:
        return ""
    try:
        content = part.get_content()
    except (LookupError, UnicodeError):  # an unknown or wrong charset: decode what can be decoded
        content = (part.get_payload(decode=True) or b"").decode("utf-8", errors="replace")
    if not isinstance(content, str):
        return ""
    return html_to_text(content, drop_quotes) if part.get_content_type() == "text/html" else content


def _parse_mail(raw: bytes, where: str, ticket_pattern: re.Pattern, drop_quotes: bool) -> Mail | None:
    """A Mail (its order and a missing Message-ID are set by `number_mails`), None for an auto-reply, or an exception
    for a mail that cannot be read."""
    message = email.message_from_bytes(raw, policy=email.policy.default)  # takes an mbox "From " line as such
    auto = str(message.get("Auto-Submitted", "no")).strip().lower()
    precedence = str(message.get("Precedence", "")).strip().lower()
    if auto not in ("", "no") or precedence in ("auto_reply", "bulk", "junk"):
        return None
    author = str(message.get("From", "") or "").strip()
    if not author:
        raise ValueError('missing "From" header')
    subject = str(message.get("Subject", "") or "")
    body = _body_text(message, drop_quotes)
    if not body.strip() and message.get_content_maintype() != "text" and not message.is_multipart():
        raise ValueError("no text part")
    try:
        date = email.utils.parsedate_to_datetime(str(message["Date"])) if message["Date"] else None
        date = date.replace(tzinfo=timezone.utc) if date and date.tzinfo is None else date
    except (TypeError, ValueError, IndexError):
        date = None
    message_id = str(message.get("Message-ID", "") or "").strip()
    links = _MESSAGE_ID.findall(str(message.get("In-Reply-To", "") or "") + " " + str(message.get("References", "") or ""))
    found = ticket_pattern.search(subject)
    return Mail(-1, where, message_id, links, found.group(1) if found else None, subject, author, date, body)


def ticket_pattern_of(data_cfg) -> re.Pattern:
    try:
        return re.compile(data_cfg.email.ticket_id_pattern, re.I)
    except re.error as error:
        raise DataError(f"data.email.ticket_id_pattern is not a valid regular expression ({error}).") from None


def mail_pieces(path: Path, chunk_bytes) -> Iterator[tuple]:
    """The mails of the files at `path`, in input order, as tasks for `parse_mails`: ("mails", [(file:line, raw
    bytes), ...]) of about `chunk_bytes.next()` bytes (workers.ChunkSizes), or ("skip", file, reason) for a file that
    holds no mail."""
    for file in input_files(path, (".eml", ".mbox", ".mbx")):
        data = file.read_bytes().removeprefix(codecs.BOM_UTF8)
        if not data.strip():
            yield "skip", str(file), "empty file"
            continue
        if data.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)) or b"\x00" in data[:1000]:
            yield "skip", str(file), "not an e-mail file (binary data, or UTF-16 text: mail is ASCII or UTF-8)"
            continue
        is_mbox = data.startswith(b"From ") or file.suffix.lower() in (".mbox", ".mbx")
        mails, size = [], 0
        for line_number, raw in (mbox_chunks(data) if is_mbox else [(1, data)]):
            mails.append((f"{file}:{line_number}", raw))
            size += len(raw)
            if size >= chunk_bytes.next():
                chunk_bytes.took(size)
                yield "mails", mails
                mails, size = [], 0
        if mails:
            yield "mails", mails


def parse_mails(mails: list[tuple[str, bytes]], ticket_pattern: re.Pattern, drop_quotes: bool,
                report: ReadReport) -> list[Mail]:
    """The mails of one piece of `mail_pieces`, auto-replies counted and unreadable mails skipped in `report`."""
    parsed = []
    for where, raw in mails:
        report.records_read += 1
        try:
            mail = _parse_mail(raw, where, ticket_pattern, drop_quotes)
        except Exception as error:  # the email package raises many kinds on broken mail: all are bad data
            message = " ".join(str(error).split())  # one line, and short: it may quote a 1 MB header
            message = message if len(message) <= 200 else message[:197] + "..."
            report.skip(where, f"unreadable mail ({type(error).__name__}: {message})")
            continue
        if mail is None:
            report.count("auto_replies")
        else:
            parsed.append(mail)
    return parsed


def number_mails(mails: list[Mail], first: int) -> None:
    """Their position in the input (from `first`), and an id of their own for mails without a Message-ID."""
    for order, mail in enumerate(mails, start=first):
        mail.order = order
        mail.message_id = mail.message_id or f"<no-id-{order}@llmft>"


def _threads(mails: list[Mail]) -> list[list[Mail]]:
    """Mails grouped by References / In-Reply-To links and by subject ticket id (union-find over ids)."""
    parent: dict[str, str] = {}

    def root(key: str) -> str:
        parent.setdefault(key, key)
        while parent[key] != key:
            parent[key] = parent[parent[key]]
            key = parent[key]
        return key

    def join(a: str, b: str) -> None:
        parent[root(a)] = root(b)

    for mail in mails:
        root(mail.message_id)
        for link in mail.links:
            join(link, mail.message_id)
        if mail.ticket_id is not None:
            join(f"ticket#{mail.ticket_id}", mail.message_id)
    groups: dict[str, list[Mail]] = {}
    for mail in mails:
        groups.setdefault(root(mail.message_id), []).append(mail)
    far_future = datetime.max.replace(tzinfo=timezone.utc)
    return [sorted(group, key=lambda m: (m.date or far_future, m.order)) for group in groups.values()]


def read_email(path: Path, data_cfg, report: ReadReport) -> list[Conversation]:
    ticket_pattern, drop_quotes = ticket_pattern_of(data_cfg), data_cfg.clean.strip_quotes is not False
    mails: list[Mail] = []
    for piece in mail_pieces(path, ChunkSizes.whole()):
        if piece[0] == "skip":
            report.skip(piece[1], piece[2])
            continue
        parsed = parse_mails(piece[1], ticket_pattern, drop_quotes, report)
        number_mails(parsed, len(mails))
        mails += parsed
    return conversations_of(mails, StaffRule(data_cfg.tickets), data_cfg)


def conversations_of(mails: list[Mail], staff: StaffRule, data_cfg) -> list[Conversation]:
    """The mails, numbered in input order, grouped into tickets: one conversation each, in input order."""
    conversations = []
    for thread in _threads(mails):
        ticket_id = next((m.ticket_id for m in thread if m.ticket_id), None)
        conversation_id = f"ticket#{ticket_id}" if ticket_id else thread[0].message_id
        participants: list[str] = []
        messages = []
        for mail in thread:
            name = person_name(mail.author)
            if name and name not in participants:
                participants.append(name)
            messages.append({"role": staff.role_of(mail.author), "content": mail.body, "author": name or ""})
        subject = _REPLY_PREFIX.sub("", re.sub(data_cfg.email.ticket_id_pattern, "", thread[0].subject, flags=re.I))
        conversation = Conversation(conversation_id, messages, thread[0].where, participants, subject.strip())
        conversations.append((thread[0].order, conversation))
    return [conversation for _, conversation in sorted(conversations, key=lambda pair: pair[0])]  # input order
