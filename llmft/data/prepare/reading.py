"""The read path: data.path read, cleaned, scrubbed and deduplicated into conversations, and the report of what was
read and dropped (and why).

    conversations, report = read_conversations(cfg.data)                  # text: no tokenizer needed

Reading, cleaning and scrubbing run chunk by chunk on `data.num_workers` processes (workers.py): a worker reads its own
piece of a JSONL file (the raw texts never reach this process), or cleans the conversations this process read (csv,
acronyms, transcripts) or threaded (e-mail). Dedup and the report take the chunks in input order here, so the result
is the same for any number of workers. The readers of each format are in readers/, the cleaning in clean/.
"""

from __future__ import annotations

import dataclasses
import os
import re
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from llmft.config.data_schema import DataFormat
from llmft.config.validation import check_data
from llmft.data.clean.dedup import Deduplicator, DedupKeys, dedup_keys
from llmft.data.clean.messages import MessageCleaner, normalize_whitespace, shape_turns
from llmft.data.clean.scrub import Scrubber
from llmft.data.preferences.dpo_kto import PREFERENCE_FORMATS, clean_preferences, preference_records_of
from llmft.data.prepare.data_config import data_path, format_of, plain
from llmft.data.prepare.mixture import merged_read_report, sources_of, with_source
from llmft.data.prepare.workers import chunk_bytes, chunks, in_order, num_workers_of
from llmft.data.readers.acronyms import read_acronyms
from llmft.data.readers.chat import chats_of, read_chat_jsonl
from llmft.data.readers.csv_pairs import read_csv_pairs
from llmft.data.readers.email_threads import attachment_chars_of, conversations_of, mail_pieces, number_mails, \
    parse_mails, read_email, ticket_pattern_of, with_attachments
from llmft.data.readers.records import Conversation, DataError, ReadReport, file_size, input_files, \
    jsonl_chunk_records, jsonl_chunks, skipped_lines
from llmft.data.readers.tickets import StaffRule, read_tickets_jsonl, staff_rule_hint, tickets_of
from llmft.data.readers.transcripts import read_transcripts

READERS = {  # data.format -> reader(path, data_cfg, report) -> conversations
    DataFormat.chat_jsonl: read_chat_jsonl,
    DataFormat.tickets_jsonl: read_tickets_jsonl,
    DataFormat.email: read_email,
    DataFormat.csv: read_csv_pairs,
    DataFormat.acronyms: read_acronyms,
    DataFormat.transcript: read_transcripts,
}


@dataclass
class Cleaning:
    """What reading and cleaning a chunk of records needs, made once in the parent (a bad setting fails there)."""

    data_cfg: object
    data_format: DataFormat
    cleaner: MessageCleaner
    scrubber: Scrubber | None
    staff: StaffRule | None
    ticket_pattern: re.Pattern | None
    records_only: bool = False  # read the records, clean nothing (`scan_records`)

    @classmethod
    def of(cls, data_cfg, data_format: DataFormat) -> Cleaning:
        with_staff = data_format in (DataFormat.tickets_jsonl, DataFormat.email)
        return cls(data_cfg, data_format, MessageCleaner(data_cfg.clean, data_format),
                   Scrubber(data_cfg.scrub) if data_cfg.scrub.enabled else None,
                   StaffRule(data_cfg.tickets) if with_staff else None,
                   ticket_pattern_of(data_cfg) if data_format is DataFormat.email else None)


@dataclass
class CleanedChunk:
    """What one chunk of records gave: the parent adds these up in input order."""

    report: ReadReport
    conversations_read: int = 0
    kept: list[tuple[Conversation, DedupKeys]] = field(default_factory=list)
    dropped: dict[str, int] = field(default_factory=dict)  # by reason, in the order the reasons first occur
    truncated: int = 0
    pii: Counter = field(default_factory=Counter)
    mails: list = field(default_factory=list)  # data.format=email: the parsed mails, before threading


def clean_conversation(conversation: Conversation, cleaner: MessageCleaner, scrubber: Scrubber | None, data_cfg):
    """The conversation's turns cleaned, scrubbed and shaped for a chat template (clean.Shaped)."""
    names = conversation.participants if data_cfg.scrub.names_from_headers else []
    if scrubber is not None and not names:  # no From (CSV, chat): the names its texts write ("Bonjour Marie,", ...)
        names = scrubber.names_in(message["content"] for message in conversation.messages)
    messages = []
    for message in conversation.messages:
        text = cleaner.clean(message["content"], [message["author"]] if message.get("author") else [])
        if message.get("attachments"):  # e-mail: a job script, a log, after the cleaned text (never cut as a quote)
            text = with_attachments(text, message["attachments"])
        if scrubber is not None:
            text = scrubber.scrub(text, names)
        messages.append({"role": message["role"], "content": text})
    first_user = next((m for m in messages if m["role"] == "user"), None)
    if conversation.subject and data_cfg.tickets.include_subject and first_user is not None:
        subject = normalize_whitespace(conversation.subject)
        subject = scrubber.scrub(subject, names) if scrubber is not None else subject
        first_user["content"] = f"{subject}\n\n{first_user['content']}" if first_user["content"] else subject
    return shape_turns(messages, data_cfg.clean)


def read_chunk(state: Cleaning, task: tuple) -> CleanedChunk:
    """One task of `read_conversations`, in a worker: ("jsonl", file, offset, size, first line) reads and cleans a
    piece of a JSONL file; ("conversations", [...]) cleans conversations read by the parent; ("mails", [...])
    parses mails; ("skip", where, reason) reports a file the parent found unreadable."""
    data_cfg = state.data_cfg
    chunk = CleanedChunk(ReadReport(strict=data_cfg.strict))
    kind = task[0]
    if kind == "skip":
        chunk.report.skip(task[1], task[2])
        return chunk
    if kind == "mails":
        chunk.mails = parse_mails(task[1], state.ticket_pattern, data_cfg.clean.strip_quotes is not False,
                                  attachment_chars_of(data_cfg), chunk.report)
        return chunk
    if kind == "jsonl":
        records = jsonl_chunk_records(*task[1:], chunk.report)
        if state.data_format in PREFERENCE_FORMATS:
            raw = preference_records_of(records, state.data_format, chunk.report)
        else:
            raw = tickets_of(records, state.staff, data_cfg, chunk.report) if state.data_format is DataFormat.tickets_jsonl \
                else chats_of(records, chunk.report)
        if state.records_only:
            return chunk
    else:
        raw = task[1]
    chunk.conversations_read = len(raw)
    if state.scrubber is not None:
        state.scrubber.counts = chunk.pii  # this chunk's replacements
    if state.data_format in PREFERENCE_FORMATS:  # a prompt and completions: their own rules (preferences/dpo_kto.py)
        cleaned = clean_preferences(raw, state.cleaner, state.scrubber, data_cfg)
        chunk.kept, chunk.dropped, chunk.truncated = cleaned.kept, cleaned.dropped, cleaned.truncated
        return chunk
    threshold = data_cfg.clean.near_duplicate_threshold
    for conversation in raw:
        shaped = clean_conversation(conversation, state.cleaner, state.scrubber, data_cfg)
        if shaped.drop_reason:
            chunk.dropped[shaped.drop_reason] = chunk.dropped.get(shaped.drop_reason, 0) + 1
            continue
        chunk.truncated += shaped.truncated_user_messages
        kept = Conversation(conversation.id, shaped.messages, conversation.source, expected=conversation.expected)
        chunk.kept.append((kept, dedup_keys(kept.messages, threshold)))
    return chunk


def read_tasks(state: Cleaning, path: Path, report: ReadReport, num_workers: int) -> list[tuple]:
    """The tasks of `read_chunk` for the input at `path`. The parent reads csv and acronyms files itself (cheap, and a
    CSV row may span lines), and threads e-mail (a thread needs every mail) between parsing and cleaning."""
    data_cfg, data_format = state.data_cfg, state.data_format
    if data_format in (DataFormat.tickets_jsonl, DataFormat.chat_jsonl, *PREFERENCE_FORMATS):
        total = sum(file_size(file) for file in input_files(path, (".jsonl", ".json")))
        return jsonl_chunks(path, chunk_bytes(total, num_workers))
    if data_format is DataFormat.email:
        total = sum(file_size(file) for file in input_files(path, (".eml", ".mbox", ".mbx")))
        mails = []
        for chunk in in_order(read_chunk, state, mail_pieces(path, chunk_bytes(total, num_workers)), num_workers):
            report.merge(chunk.report)
            number_mails(chunk.mails, len(mails))
            mails += chunk.mails
        raw = conversations_of(mails, state.staff, data_cfg, report)  # each mail once, from all the files
    else:
        raw = READERS[data_format](path, data_cfg, report)
    return [("conversations", part) for part in chunks(raw, num_workers)]


class ReadTally:
    """Adds up the cleaned chunks in input order: the report, the drops by reason, and dedup (the first occurrence of
    a conversation stays)."""

    def __init__(self, report: ReadReport, state: Cleaning):
        self.report, self.state = report, state
        self.deduplicator = Deduplicator(state.data_cfg.clean.near_duplicate_threshold)
        self.dropped: Counter = Counter()
        self.truncated = self.num_read = self.num_kept = 0
        self.pii: Counter = Counter()

    def add(self, chunk: CleanedChunk, keys: list[DedupKeys]) -> list[bool]:
        """Whether each conversation the chunk kept is new (not a duplicate of an earlier one)."""
        self.report.merge(chunk.report)
        self.num_read += chunk.conversations_read
        for reason, n in chunk.dropped.items():
            self.dropped[reason] += n
        self.truncated += chunk.truncated
        self.pii.update(chunk.pii)
        new = [not self.deduplicator.duplicate(k) for k in keys]
        self.num_kept += sum(new)
        return new

    def finish(self, path: Path) -> dict:
        """The read report; a DataError when no conversation is left."""
        report, dropped = self.report, self.dropped
        dropped.update({reason: n for reason, n in self.deduplicator.dropped.items() if n})
        if not self.num_kept:
            reasons = ", ".join(f"{n} {reason}" for reason, n in (dropped + Counter(report.counts)).items()) or "none"
            staff = staff_rule_hint(self.state.staff, report) if self.state.staff is not None else ""
            raise DataError(
                f"no usable conversation in {path} ({report.records_read} records read, {len(report.skipped)} bad "
                f"records skipped{': ' + report.skipped[0] if report.skipped else ''}; dropped: {reasons}){staff}."
            )
        return {
            "format": self.state.data_format.value,
            "path": str(path),
            **report.as_dict(),
            "conversations_read": self.num_read,
            "dropped": dict(dropped),
            "user_messages_truncated": self.truncated,
            "num_conversations": self.num_kept,
            "pii_replacements": {kind: n for kind, n in sorted(self.pii.items()) if n} if self.state.scrubber else {},
        }


def read_conversations(data_cfg, print_skipped: bool = True) -> tuple[list[Conversation], dict]:
    """Clean, scrubbed conversations ready for a chat template, and the report of what was read and dropped; the bad
    records skipped, on the console (rank 0's). With data.prepared=DIR, DIR's report, and the conversations read from
    data.path only if something goes through them (prepared_source.PreparedConversations): training takes DIR's
    samples and never does."""
    if getattr(data_cfg, "prepared", None):
        from llmft.data.prepare.prepared_source import prepared_conversations

        conversations, report = prepared_conversations(data_cfg, read_input)
    else:
        conversations, report = read_input(data_cfg)
    if print_skipped and report.get("num_skipped") and os.environ.get("RANK", "0") == "0":
        print("llmft: " + "\n".join(skipped_lines(report["skipped"], report["num_skipped"],
                                                  listed_in="report.json, or a run's summary.json")),
              file=sys.stderr)
    return conversations, report


def read_input(data_cfg) -> tuple[list[Conversation], dict]:
    """data.path read, cleaned, scrubbed and deduplicated (data.prepared aside), and the report.

    Reading, cleaning and scrubbing run on data.num_workers processes, chunk by chunk; dedup and the report take
    the chunks in input order, so the result does not depend on the number of workers."""
    check_data(data_cfg)  # checked at launch already; again for callers that did not validate
    data_cfg = plain(data_cfg)
    data_format, path = format_of(data_cfg), data_path(data_cfg)
    if data_format is DataFormat.mixture:
        return read_mixture(data_cfg)
    num_workers = num_workers_of(data_cfg)
    report = ReadReport(strict=data_cfg.strict)
    state = Cleaning.of(data_cfg, data_format)
    tasks = read_tasks(state, path, report, num_workers)
    tally = ReadTally(report, state)
    conversations = []
    for chunk in in_order(read_chunk, state, tasks, num_workers):
        new = tally.add(chunk, [keys for _, keys in chunk.kept])
        conversations += [conversation for (conversation, _), is_new in zip(chunk.kept, new) if is_new]
    return conversations, tally.finish(path)


def scan_records(data_cfg) -> None:
    """Read the records of data.path without cleaning them (data.strict=true at launch): the first bad record raises
    its DataError here, before a run directory exists. Acronym glossaries are not read (their reader may call an
    LLM); a mixture's sources are, each."""
    data_cfg = plain(data_cfg)
    data_format = format_of(data_cfg)
    if data_format is DataFormat.mixture:
        for source in sources_of(data_cfg):
            scan_records(source.cfg)
        return
    if data_format is DataFormat.acronyms:
        return
    report = ReadReport(strict=True)
    state = dataclasses.replace(Cleaning.of(data_cfg, data_format), records_only=True)
    tasks = read_tasks(state, data_path(data_cfg), report, num_workers_of(data_cfg))
    for _ in in_order(read_chunk, state, [task for task in tasks if task[0] != "conversations"],
                      num_workers_of(data_cfg)):
        pass


def read_mixture(data_cfg) -> tuple[list[Conversation], dict]:
    """data.format=mixture: each source read as alone (`read_conversations`), its ids prefixed with its name."""
    conversations, reports = [], []
    sources = sources_of(data_cfg)
    for source in sources:
        found, report = read_input(source.cfg)
        conversations += with_source(found, source.name)
        reports.append(report)
    return conversations, merged_read_report(sources, reports)

