"""The data path of a run: read, clean and scrub the conversations, then tokenize, mask, split and pack them.

    conversations, report = read_conversations(cfg.data)                  # text: no tokenizer needed
    tokenizer = tokenizer_for_run(cfg, conversations)                     # model=tiny trains its own on the texts
    splits, counts = build_splits(conversations, tokenizer, cfg.data, cfg.model.max_seq_len)

`python -m llmft.data prepare` and training run this same code. `build_splits` first looks for a prepared
dataset whose fingerprint matches (`data.prepared`, else `data.output_dir`) and loads it instead of tokenizing.

Reading, cleaning, scrubbing and tokenizing run chunk by chunk on `data.num_workers` processes (workers.py); dedup,
the report, the splits and packing take the chunks in input order here, so the outputs are the same bytes for any
number of workers. The raw texts never reach this process for JSONL input (the workers read their own pieces of
the file), and the samples are held as int32 arrays (rows.py).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from omegaconf import DictConfig, OmegaConf

from llmft.data.acronyms import read_acronyms
from llmft.data.chat import chats_of, read_chat_jsonl
from llmft.data.clean import MessageCleaner, normalize_whitespace, shape_turns
from llmft.data.csv_pairs import read_csv_pairs
from llmft.data.dedup import Deduplicator, DedupKeys, dedup_keys
from llmft.data.email_threads import conversations_of, mail_pieces, number_mails, parse_mails, read_email, \
    ticket_pattern_of
from llmft.data.mixture import (Source, by_source, draw, merged_read_report, mixture_splits, sample_targets,
                                source_entries, sources_of, with_mixture_settings, with_source)
from llmft.data.packing import pack_rows
from llmft.data.preferences import PREFERENCE_FORMATS, PreferenceTokenizing, clean_preferences, preference_counts, \
    preference_records_of, samples_of, tokenize_preference_chunk
from llmft.data.prepared import ConversationsFingerprint, conversation_identity, fingerprint_parts, load_samples
from llmft.data.records import Conversation, DataError, ReadReport, input_files, jsonl_chunk_records, jsonl_chunks
from llmft.data.rows import Rows
from llmft.data.scrub import Scrubber
from llmft.data.splits import bucket_of, split_of
from llmft.data.templating import (IGNORE_INDEX, Sample, TemplateError, tokenize_many, windows,
                                   with_system_prompt)
from llmft.data.tickets import StaffRule, read_tickets_jsonl, tickets_of
from llmft.data.transcripts import read_transcripts
from llmft.data.workers import chunk_bytes, chunks, in_order, num_workers_of
from llmft.config.validation import check_data

READERS = {  # data.format -> reader(path, data_cfg, report) -> conversations
    "chat_jsonl": read_chat_jsonl,
    "tickets_jsonl": read_tickets_jsonl,
    "email": read_email,
    "csv": read_csv_pairs,
    "acronyms": read_acronyms,
    "transcript": read_transcripts,
}


def format_of(data_cfg) -> str:
    return str(getattr(data_cfg.format, "value", data_cfg.format))


def data_path(data_cfg) -> Path:
    return Path(os.path.expandvars(str(data_cfg.path))).expanduser()


def plain(data_cfg):
    """The data config as a plain dataclass: OmegaConf's attribute access, in loops over 100k messages, costs more
    than the cleaning itself."""
    return OmegaConf.to_object(data_cfg) if isinstance(data_cfg, DictConfig) else data_cfg


@dataclass
class Cleaning:
    """What reading and cleaning a chunk of records needs, made once in the parent (a bad setting fails there)."""

    data_cfg: object
    data_format: str
    cleaner: MessageCleaner
    scrubber: Scrubber | None
    staff: StaffRule | None
    ticket_pattern: re.Pattern | None

    @classmethod
    def of(cls, data_cfg, data_format: str) -> Cleaning:
        with_staff = data_format in ("tickets_jsonl", "email")
        return cls(data_cfg, data_format, MessageCleaner(data_cfg.clean, data_format),
                   Scrubber(data_cfg.scrub) if data_cfg.scrub.enabled else None,
                   StaffRule(data_cfg.tickets) if with_staff else None,
                   ticket_pattern_of(data_cfg) if data_format == "email" else None)


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
    messages = []
    for message in conversation.messages:
        text = cleaner.clean(message["content"], [message["author"]] if message.get("author") else [])
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
        chunk.mails = parse_mails(task[1], state.ticket_pattern, data_cfg.clean.strip_quotes is not False, chunk.report)
        return chunk
    if kind == "jsonl":
        records = jsonl_chunk_records(*task[1:], chunk.report)
        if state.data_format in PREFERENCE_FORMATS:
            raw = preference_records_of(records, state.data_format, chunk.report)
        else:
            raw = tickets_of(records, state.staff, data_cfg, chunk.report) if state.data_format == "tickets_jsonl" \
                else chats_of(records, chunk.report)
    else:
        raw = task[1]
    chunk.conversations_read = len(raw)
    if state.scrubber is not None:
        state.scrubber.counts = chunk.pii  # this chunk's replacements
    if state.data_format in PREFERENCE_FORMATS:  # a prompt and completions: their own rules (preferences.py)
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
        kept = Conversation(conversation.id, shaped.messages, conversation.source)
        chunk.kept.append((kept, dedup_keys(kept.messages, threshold)))
    return chunk


def read_tasks(state: Cleaning, path: Path, report: ReadReport, num_workers: int) -> list[tuple]:
    """The tasks of `read_chunk` for the input at `path`. The parent reads csv and acronyms files itself (cheap, and a
    CSV row may span lines), and threads e-mail (a thread needs every mail) between parsing and cleaning."""
    data_cfg, data_format = state.data_cfg, state.data_format
    if data_format in ("tickets_jsonl", "chat_jsonl", *PREFERENCE_FORMATS):
        total = sum(file.stat().st_size for file in input_files(path, (".jsonl", ".json")))
        return [("jsonl", *piece) for piece in jsonl_chunks(path, chunk_bytes(total, num_workers))]
    if data_format == "email":
        total = sum(file.stat().st_size for file in input_files(path, (".eml", ".mbox", ".mbx")))
        mails = []
        for chunk in in_order(read_chunk, state, mail_pieces(path, chunk_bytes(total, num_workers)), num_workers):
            report.merge(chunk.report)
            number_mails(chunk.mails, len(mails))
            mails += chunk.mails
        raw = conversations_of(mails, state.staff, data_cfg)
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
            raise DataError(
                f"no usable conversation in {path} ({report.records_read} records read, {len(report.skipped)} bad "
                f"records skipped{': ' + report.skipped[0] if report.skipped else ''}; dropped: {reasons})."
            )
        return {
            "format": self.state.data_format,
            "path": str(path),
            **report.as_dict(),
            "conversations_read": self.num_read,
            "dropped": dict(dropped),
            "user_messages_truncated": self.truncated,
            "num_conversations": self.num_kept,
            "pii_replacements": {kind: n for kind, n in sorted(self.pii.items()) if n} if self.state.scrubber else {},
        }


def read_conversations(data_cfg) -> tuple[list[Conversation], dict]:
    """Clean, scrubbed conversations ready for a chat template, and the report of what was read and dropped.

    Reading, cleaning and scrubbing run on data.num_workers processes, chunk by chunk; dedup and the report take
    the chunks in input order, so the result does not depend on the number of workers."""
    check_data(data_cfg)  # checked at launch already; again for callers that did not validate
    data_cfg = plain(data_cfg)
    data_format, path = format_of(data_cfg), data_path(data_cfg)
    if data_format == "mixture":
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


def read_mixture(data_cfg) -> tuple[list[Conversation], dict]:
    """data.format=mixture: each source read as alone (`read_conversations`), its ids prefixed with its name."""
    conversations, reports = [], []
    sources = sources_of(data_cfg)
    for source in sources:
        found, report = read_conversations(source.cfg)
        conversations += with_source(found, source.name)
        reports.append(report)
    return conversations, merged_read_report(sources, reports)


def assign_splits(conversation_ids: list[str], data_cfg) -> dict[str, str]:
    """Split of each id by hash. When that leaves validation empty (tiny data), the id with the lowest hash among
    the training ids is held out, so a run always has something to evaluate on, unless
    data.validation_fraction=0 asks to train on every ticket (and evaluate on eval.file). A mixture splits each
    source's conversations by their own ids and that source's fractions, as alone."""
    if format_of(data_cfg) == "mixture":
        return mixture_splits(conversation_ids, plain(data_cfg), assign_splits)
    validation_fraction, test_fraction = data_cfg.validation_fraction, data_cfg.test_fraction  # (once: OmegaConf)
    splits = {i: split_of(i, validation_fraction, test_fraction) for i in conversation_ids}
    if "validation" not in splits.values() and validation_fraction > 0:
        candidates = [i for i, split in splits.items() if split == "train"]
        if len(candidates) > 1:
            splits[min(candidates, key=bucket_of)] = "validation"
    return splits


def end_of_turn_of(tokenizer, data_cfg) -> tuple[str, int]:
    end_of_turn = data_cfg.end_of_turn_token or tokenizer.eos_token
    ids = tokenizer(end_of_turn, add_special_tokens=False)["input_ids"] if end_of_turn else []
    if len(ids) != 1:
        raise TemplateError(
            f"the end-of-turn token {end_of_turn!r} is not a single token of this tokenizer; set "
            f"data.end_of_turn_token to the special token that closes assistant turns in the chat template"
        )
    return end_of_turn, ids[0]


def preflight(splits: dict, end_of_turn: str, end_of_turn_id: int) -> None:
    """Fail loudly on the silent mask failures: nothing supervised, or the end of turn never supervised. The splits
    are `Rows` or lists of `Sample`."""
    labels = [split.labels if isinstance(split, Rows) else np.fromiter((x for s in split for x in s.labels), np.int64)
              for split in splits.values()]
    if not any(np.any(split != IGNORE_INDEX) for split in labels):
        raise TemplateError("no sample has a supervised token: the chat template never marks an assistant reply; "
                            "check the data has assistant turns and set model.fallback_chat_template")
    if not any(np.any(split == end_of_turn_id) for split in labels):
        raise TemplateError(
            f"the end-of-turn token {end_of_turn!r} is never supervised, so the model would never learn to stop; "
            f"set data.end_of_turn_token to the token the chat template closes assistant turns with"
        )


def useful_fraction(samples: list[Sample], max_seq_len: int) -> float:
    return sum(len(s.input_ids) for s in samples) / max(1, len(samples) * max_seq_len)


def audit_line(conversation: Conversation, system_prompt: str | None) -> str:
    """The conversation as `prepare` writes it to `<split>.conversations.jsonl`: chat format, with the system prompt
    the model sees."""
    record = {"id": conversation.id, "source": conversation.source,
              "messages": with_system_prompt(conversation.messages, system_prompt)}
    return json.dumps(record, ensure_ascii=False) + "\n"


@dataclass
class Tokenizing:
    """What tokenizing a chunk of conversations needs; a worker gets it once (inherited through fork)."""

    tokenizer: object
    system_prompt: str | None
    end_of_turn: str
    max_seq_len: int
    long_policy: str
    audit: bool = False  # also render the audit line of each conversation that gives a sample

    @classmethod
    def of(cls, tokenizer, data_cfg, end_of_turn: str, max_seq_len: int, audit: bool) -> Tokenizing:
        long_policy = str(getattr(data_cfg.long_conversations, "value", data_cfg.long_conversations))
        return cls(tokenizer, data_cfg.system_prompt, end_of_turn, max_seq_len, long_policy, audit)


@dataclass
class TokenizedChunk:
    pieces: Rows  # the samples of the chunk's conversations, in order (a long conversation gives several windows)
    owners: np.ndarray  # for each sample, the index in the chunk of the conversation it comes from
    # (conversation index, reason, samples or exchanges dropped) in order, zeros included (the reasons keep the order
    # they first occur in); per conversation, so that the samples of a duplicate found later can be left out
    dropped: list[tuple[int, str, int]]
    windowed: list[int]  # the conversations cut into windows
    audit_lines: list[str] | None = None  # one per conversation that gave a sample, in order (Tokenizing.audit)


def tokenize_chunk(state: Tokenizing, chunk: list[Conversation]) -> TokenizedChunk:
    """Template, masks and windows of a chunk of conversations, in a worker."""
    tokenizer, max_seq_len = state.tokenizer, state.max_seq_len
    conversations = [c.messages for c in chunk]
    input_ids: list[int] = []
    labels: list[int] = []
    lengths, owners = [], []
    dropped: list[tuple[int, str, int]] = []
    windowed: list[int] = []
    samples = tokenize_many(tokenizer, conversations, state.system_prompt, state.end_of_turn)
    for index, (messages, sample) in enumerate(zip(conversations, samples)):
        pieces = [sample]
        if len(sample.input_ids) > max_seq_len:
            if state.long_policy == "drop":
                dropped.append((index, "longer_than_max_seq_len", 1))
                continue
            pieces, exchanges_dropped = windows(tokenizer, messages, max_seq_len, state.system_prompt,
                                                state.end_of_turn)
            windowed.append(index)
            dropped.append((index, "exchange_longer_than_max_seq_len", exchanges_dropped))
            if not pieces:
                dropped.append((index, "no_window_fits_max_seq_len", 1))
                continue
        for piece in pieces:
            if piece.num_supervised == 0:
                dropped.append((index, "no_supervised_token", 1))
                continue
            input_ids += piece.input_ids
            labels += piece.labels
            lengths.append(len(piece.input_ids))
            owners.append(index)
    pieces = Rows(np.array(input_ids, np.int32), np.array(labels, np.int32), np.array(lengths, np.int64))
    audit_lines = [audit_line(chunk[i], state.system_prompt) for i in dict.fromkeys(owners)] if state.audit else None
    return TokenizedChunk(pieces, np.array(owners, np.int64), dropped, windowed, audit_lines)


@dataclass
class Tokenized:
    splits: dict[str, Rows]  # packed when data.packing; preference formats: lists of PreferencePair / KtoExample
    counts: dict
    used_ids: set[str]  # the conversations that gave at least one sample
    # audit_dir's `<split>.conversations.jsonl` (train, validation, test): the conversations that gave a sample
    # (acronyms: one id for several conversations, so a conversation, not an id)
    conversation_files: dict[str, str]


class SampleTally:
    """Adds up the tokenized chunks in input order into the splits' samples, the drops and the audit files.

    The split of a conversation is the hash of its id (splits.py); when that leaves validation empty, the id with
    the lowest hash among the training ids moves there at the end (`assign_splits`), samples and audit lines with
    it. The samples wait here, as int32 arrays, until `finish`: packing needs them all anyway."""

    def __init__(self, data_cfg, audit_dir: Path | None):
        self.data_cfg, self.audit_dir = data_cfg, audit_dir
        self.names = ["train", "validation"] + (["test"] if data_cfg.test_fraction > 0 else [])
        self.split_of_id: dict[str, int] = {}
        self.parts: list[tuple[Rows, np.ndarray, list[str]]] = []  # (samples, split of each, id of each)
        self.dropped: Counter = Counter()
        self.num_windowed = 0
        self.used_ids: set[str] = set()
        self.audit_files: dict[str, object] = {}

    def split_number(self, conversation_id: str) -> int:
        number = self.split_of_id.get(conversation_id)
        if number is None:
            split = split_of(conversation_id, self.data_cfg.validation_fraction, self.data_cfg.test_fraction)
            number = self.split_of_id[conversation_id] = self.names.index(split)
        return number

    def add(self, chunk: TokenizedChunk, ids: list[str], new: list[bool] | None = None) -> None:
        """The chunk's samples, `ids[i]` the id of its conversation i; `new[i]` false leaves conversation i out (a
        duplicate of an earlier one)."""
        new = [True] * len(ids) if new is None else new
        for conversation_id, is_new in zip(ids, new):
            if is_new:
                self.split_number(conversation_id)  # every conversation counts for the validation fallback
        for owner, reason, n in chunk.dropped:
            if new[owner]:
                self.dropped[reason] += n  # (+= 0 too: the reasons keep the order they first occurred in)
        self.num_windowed += sum(1 for owner in chunk.windowed if new[owner])
        owners = chunk.owners.tolist()
        pieces = chunk.pieces
        if not all(new[owner] for owner in owners):
            keep = np.array([new[owner] for owner in owners], dtype=bool)
            pieces = Rows(pieces.input_ids[np.repeat(keep, pieces.sample_lengths)],
                          pieces.labels[np.repeat(keep, pieces.sample_lengths)], pieces.sample_lengths[keep])
            owners = [owner for owner in owners if new[owner]]
        owner_ids = [ids[owner] for owner in owners]
        self.used_ids.update(owner_ids)
        self.parts.append((pieces, np.array([self.split_of_id[i] for i in owner_ids], np.int64), owner_ids))
        if chunk.audit_lines is not None:
            for owner, line in zip(dict.fromkeys(chunk.owners.tolist()), chunk.audit_lines):
                if new[owner]:
                    self._audit_file(self.names[self.split_of_id[ids[owner]]]).write(line)

    def _audit_file(self, split: str):
        if split not in self.audit_files:
            self.audit_files[split] = open(self.audit_dir / f"{split}.conversations.jsonl", "w", encoding="utf-8")
        return self.audit_files[split]

    def close(self) -> None:
        for handle in self.audit_files.values():
            handle.close()

    def validation_fallback(self) -> str | None:
        """The id `assign_splits` moves to validation when no id hashed there, else None."""
        if self.data_cfg.validation_fraction <= 0 or 1 in self.split_of_id.values():
            return None
        candidates = [i for i, number in self.split_of_id.items() if number == 0]
        return min(candidates, key=bucket_of) if len(candidates) > 1 else None

    def finish(self, data_cfg, max_seq_len: int, end_of_turn: str, end_of_turn_id: int) -> Tokenized:
        self.close()
        moved = self.validation_fallback()
        written = set(self.audit_files)  # the splits with an audit file
        if moved is not None:
            for _, split_of_piece, owner_ids in self.parts:
                split_of_piece[[number for number, i in enumerate(owner_ids) if i == moved]] = 1
            if "train" in written:
                written = self._move_audit_lines(moved, written)
        splits = {}
        for number, name in enumerate(self.names):
            rows = []
            for pieces, split_of_piece, _ in self.parts:
                here = split_of_piece == number
                tokens = np.repeat(here, pieces.sample_lengths)
                rows.append(Rows(pieces.input_ids[tokens], pieces.labels[tokens], pieces.sample_lengths[here]))
            splits[name] = Rows.concatenate(rows)
        self.parts = []
        counts = finish_rows(splits, data_cfg, max_seq_len, end_of_turn, end_of_turn_id, dict(self.dropped),
                             self.num_windowed)
        return Tokenized(splits, counts, self.used_ids, {split: str(self.audit_dir / f"{split}.conversations.jsonl")
                                                         for split in self.names if split in written})

    def _move_audit_lines(self, moved: str, written: set[str]) -> set[str]:
        """The lines of the id moved to validation, out of the train file into the validation file; the splits with
        an audit file then."""
        train = self.audit_dir / "train.conversations.jsonl"
        lines = train.read_text(encoding="utf-8").splitlines(keepends=True)
        moving = [json.loads(line)["id"] == moved for line in lines]
        if not any(moving):
            return written
        (self.audit_dir / "validation.conversations.jsonl").write_text(
            "".join(line for line, move in zip(lines, moving) if move), encoding="utf-8")
        if all(moving):
            train.unlink()
            return written - {"train"} | {"validation"}
        train.write_text("".join(line for line, move in zip(lines, moving) if not move), encoding="utf-8")
        return written | {"validation"}


def tokenize_rows(conversations, tokenizer, data_cfg, max_seq_len: int, audit_dir: Path | None = None) -> Tokenized:
    """The samples of each split as `Rows`, counts, and with `audit_dir` the conversations that gave a sample
    written there per split (`audit_line`). Tokenizing runs on data.num_workers processes, chunk by chunk; the split
    of each sample, the audit files and the packing are done here, in input order."""
    data_cfg = plain(data_cfg)
    if format_of(data_cfg) == "mixture":
        return tokenize_mixture(conversations, tokenizer, data_cfg, max_seq_len, audit_dir)
    end_of_turn, end_of_turn_id = end_of_turn_of(tokenizer, data_cfg)
    state = Tokenizing.of(tokenizer, data_cfg, end_of_turn, max_seq_len, audit_dir is not None)
    num_workers = num_workers_of(data_cfg)
    batches = chunks(conversations, num_workers)
    tally = SampleTally(data_cfg, audit_dir)
    try:
        # (results first: zip then runs the pool to its end, which closes it)
        for chunk, batch in zip(in_order(tokenize_chunk, state, batches, num_workers), batches):
            tally.add(chunk, [conversation.id for conversation in batch])
    finally:
        tally.close()
    return tally.finish(data_cfg, max_seq_len, end_of_turn, end_of_turn_id)


@dataclass
class OnePass:
    """What `read_and_tokenize` gives a worker: the cleaning and the tokenizing of a chunk."""

    cleaning: Cleaning
    tokenizing: Tokenizing


@dataclass
class PreparedChunk:
    """One chunk read, cleaned and tokenized, without its conversations' texts (but in the audit lines): for each
    conversation it kept, its id, dedup keys and fingerprint identity, then its samples."""

    cleaned: CleanedChunk
    ids: list[str]
    keys: list[DedupKeys]
    identities: list[bytes]
    tokenized: TokenizedChunk


def prepare_chunk(state: OnePass, task: tuple) -> PreparedChunk:
    cleaned = read_chunk(state.cleaning, task)
    conversations = [conversation for conversation, _ in cleaned.kept]
    result = PreparedChunk(cleaned, [c.id for c in conversations], [keys for _, keys in cleaned.kept],
                           [conversation_identity(c) for c in conversations],
                           tokenize_chunk(state.tokenizing, conversations))
    cleaned.kept = []  # (the parent needs the keys, not the texts)
    return result


def read_and_tokenize(data_cfg, tokenizer, max_seq_len: int, audit_dir: Path | None = None
                      ) -> tuple[dict, Tokenized, str]:
    """`read_conversations` then `tokenize_rows` in one pass, when the tokenizer does not depend on the data (a
    model's own): each worker reads, cleans, scrubs AND tokenizes its chunk, and the parent drops the samples of
    the duplicates it finds. Returns the read report, the samples and the conversations' fingerprint, the same as
    the two steps give (the cleaned conversations cross between processes once instead of three times, and no
    step waits for the slowest chunk of the one before). Not for mixtures and preference data."""
    check_data(data_cfg)
    data_cfg = plain(data_cfg)
    data_format, path = format_of(data_cfg), data_path(data_cfg)
    if data_format == "mixture" or data_format in PREFERENCE_FORMATS:
        raise ValueError(f"read_and_tokenize does not take data.format={data_format}")
    num_workers = num_workers_of(data_cfg)
    report = ReadReport(strict=data_cfg.strict)
    cleaning = Cleaning.of(data_cfg, data_format)
    tasks = read_tasks(cleaning, path, report, num_workers)
    end_of_turn, end_of_turn_id = end_of_turn_of(tokenizer, data_cfg)
    state = OnePass(cleaning, Tokenizing.of(tokenizer, data_cfg, end_of_turn, max_seq_len, audit_dir is not None))
    reading, samples = ReadTally(report, cleaning), SampleTally(data_cfg, audit_dir)
    fingerprint = ConversationsFingerprint()
    try:
        for chunk in in_order(prepare_chunk, state, tasks, num_workers):
            new = reading.add(chunk.cleaned, chunk.keys)
            for identity, is_new in zip(chunk.identities, new):
                if is_new:
                    fingerprint.add(identity)
            samples.add(chunk.tokenized, chunk.ids, new)
    finally:
        samples.close()
    read_report = reading.finish(path)
    return read_report, samples.finish(data_cfg, max_seq_len, end_of_turn, end_of_turn_id), fingerprint.value()


def finish_rows(splits: dict[str, Rows], data_cfg, max_seq_len: int, end_of_turn: str, end_of_turn_id: int,
                dropped: dict[str, int], num_windowed: int) -> dict:
    """Check the unpacked `splits`, pack them in place when data.packing, and count what was built."""
    preflight(splits, end_of_turn, end_of_turn_id)
    if not splits["train"].num_samples:
        raise DataError(f"no training sample left from {data_cfg.path} (dropped: {dict(dropped)}); "
                        f"raise model.max_seq_len or add data.")
    counts = {
        "max_seq_len": max_seq_len,
        "packing": bool(data_cfg.packing),
        "end_of_turn_token": end_of_turn,
        "samples": {split: rows.num_samples for split, rows in splits.items()},
        "tokens": {split: rows.num_tokens for split, rows in splits.items()},
        "supervised_tokens": {split: rows.num_supervised for split, rows in splits.items()},
        "conversations_windowed": num_windowed,
        "samples_dropped": {reason: n for reason, n in dropped.items() if n},
    }
    if data_cfg.packing:
        for split in list(splits):  # one split at a time: the unpacked rows go as the packed ones come
            splits[split] = splits[split].packed(max_seq_len)
        counts["packed_rows"] = {split: len(rows) for split, rows in splits.items()}
        train_rows = len(splits["train"])
    else:
        train_rows = len(pack_rows(splits["train"].sample_lengths.tolist(), max_seq_len))
    train_tokens = counts["tokens"]["train"]
    counts["useful_token_fraction"] = {
        # each sample alone in a row of max_seq_len tokens (static shapes) vs rows packed best fit
        "padded": train_tokens / (counts["samples"]["train"] * max_seq_len),
        "packed": train_tokens / (train_rows * max_seq_len),
    }
    counts["supervised_token_fraction"] = counts["supervised_tokens"]["train"] / max(1, train_tokens)
    return counts


def tokenize_mixture(conversations, tokenizer, data_cfg, max_seq_len: int, audit_dir: Path | None = None
                     ) -> Tokenized:
    """data.format=mixture (mixture.py): each source tokenized and split as alone, unpacked; the training samples
    drawn from the sources at their weights, validation and test concatenated; then packed and counted as one data
    set. With `audit_dir`, the audit files hold every source's conversations (ids `name/id`), source after source."""
    sources: list[Source] = sources_of(data_cfg)
    end_of_turn, end_of_turn_id = end_of_turn_of(tokenizer, data_cfg)
    parts, used_ids, dropped, num_windowed = [], set(), Counter(), 0
    audit_lines: dict[str, list[str]] = {}
    for source, own in zip(sources, by_source(conversations, sources)):
        source_dir = audit_dir / f".mixture-{source.name}" if audit_dir is not None else None
        if source_dir is not None:
            source_dir.mkdir(exist_ok=True)
        tokenized = tokenize_rows(own, tokenizer, source.cfg, max_seq_len, source_dir)
        parts.append(tokenized)
        used_ids.update(f"{source.name}/{i}" for i in tokenized.used_ids)
        dropped.update(tokenized.counts["samples_dropped"])
        num_windowed += tokenized.counts["conversations_windowed"]
        for split, file in tokenized.conversation_files.items():
            for line in Path(file).read_text(encoding="utf-8").splitlines():
                record = json.loads(line)
                record["id"] = f"{source.name}/{record['id']}"
                audit_lines.setdefault(split, []).append(json.dumps(record, ensure_ascii=False) + "\n")
        if source_dir is not None:
            shutil.rmtree(source_dir)
    available = [part.splits["train"].num_samples for part in parts]
    total = data_cfg.mixture_samples or sum(available)
    targets = sample_targets([source.weight for source in sources], total)
    names = list(dict.fromkeys(split for part in parts for split in part.splits))  # train, validation[, test]
    splits = {"train": draw([part.splits["train"] for part in parts], targets, data_cfg.mixture_seed)}
    for name in names[1:]:
        splits[name] = Rows.concatenate([part.splits[name] for part in parts if name in part.splits])
    held_out = [{name: part.splits[name].num_samples for name in names[1:] if name in part.splits} for part in parts]
    del parts
    counts = finish_rows(splits, data_cfg, max_seq_len, end_of_turn, end_of_turn_id, dict(dropped), num_windowed)
    counts["sources"] = source_entries(sources, available, targets, held_out)
    files = {}
    for split, lines in audit_lines.items():
        files[split] = str(audit_dir / f"{split}.conversations.jsonl")
        Path(files[split]).write_text("".join(lines), encoding="utf-8")
    return Tokenized(splits, counts, used_ids, files)


def tokenize_preferences(records, tokenizer, data_cfg, max_seq_len: int, audit_dir: Path | None = None) -> Tokenized:
    """data.format=preference_jsonl / kto_jsonl: `PreferencePair` / `KtoExample` lists per split (never packed), the
    counts, and with `audit_dir` the records that gave one, cleaned, as `<split>.pairs.jsonl` / `.examples.jsonl`
    (the same format: they read back as they are). Tokenizing runs on data.num_workers processes, as `tokenize_rows`."""
    data_cfg = plain(data_cfg)
    data_format = format_of(data_cfg)
    end_of_turn, end_of_turn_id = end_of_turn_of(tokenizer, data_cfg)
    split_by_id = assign_splits([r.id for r in records], data_cfg)
    names = ["train", "validation"] + (["test"] if data_cfg.test_fraction > 0 else [])
    splits: dict[str, list] = {name: [] for name in names}
    dropped: Counter = Counter()
    num_cut = 0
    used_ids: set[str] = set()
    long_policy = str(getattr(data_cfg.long_conversations, "value", data_cfg.long_conversations))
    state = PreferenceTokenizing(tokenizer, data_cfg.system_prompt, end_of_turn, max_seq_len, long_policy)
    num_workers = num_workers_of(data_cfg)
    batches = chunks(records, num_workers)
    audit_name = "pairs" if data_format == "preference_jsonl" else "examples"
    audit_lines: dict[str, list[str]] = {}
    for chunk, batch in zip(in_order(tokenize_preference_chunk, state, batches, num_workers), batches):
        for reason, n in chunk.dropped.items():
            dropped[reason] += n
        num_cut += chunk.num_cut
        for item, owner in zip(chunk.items, chunk.owners):
            record = batch[owner]
            used_ids.add(record.id)
            splits[split_by_id[record.id]].append(item)
            if audit_dir is not None:
                audit_lines.setdefault(split_by_id[record.id], []).append(
                    json.dumps(record.audit_record(data_cfg.system_prompt), ensure_ascii=False) + "\n")
    preflight({split: samples_of(items) for split, items in splits.items()}, end_of_turn, end_of_turn_id)
    if not splits["train"]:
        raise DataError(f"no training {audit_name[:-1]} left from {data_cfg.path} (dropped: {dict(dropped)}); "
                        f"raise model.max_seq_len or add data.")
    files = {}
    for split, lines in audit_lines.items():
        files[split] = str(audit_dir / f"{split}.{audit_name}.jsonl")
        Path(files[split]).write_text("".join(lines), encoding="utf-8")
    counts = preference_counts(splits, data_format, max_seq_len, end_of_turn, dict(dropped), num_cut)
    return Tokenized(splits, counts, used_ids, files)


def tokenize_splits(conversations, tokenizer, data_cfg, max_seq_len: int
                    ) -> tuple[dict[str, list[Sample]], dict, set[str]]:
    """Samples per split (packed rows when data.packing), counts, and the ids of the conversations that gave at
    least one sample: `tokenize_rows` as the `Sample` lists training takes. For data.format=preference_jsonl and
    kto_jsonl: `PreferencePair` / `KtoExample` lists (`tokenize_preferences`)."""
    if format_of(data_cfg) in PREFERENCE_FORMATS:
        tokenized = tokenize_preferences(conversations, tokenizer, data_cfg, max_seq_len)
        return tokenized.splits, tokenized.counts, tokenized.used_ids
    tokenized = tokenize_rows(conversations, tokenizer, data_cfg, max_seq_len)
    return {split: rows.samples() for split, rows in tokenized.splits.items()}, tokenized.counts, tokenized.used_ids


def build_splits(conversations, tokenizer, data_cfg, max_seq_len: int) -> tuple[dict[str, list[Sample]], dict]:
    """Samples per split (packed rows when data.packing), and counts of what was built, truncated and dropped.
    For data.format=preference_jsonl / kto_jsonl: lists of `PreferencePair` / `KtoExample` (preferences.py), and
    counts["samples"] counts pairs / examples.

    Reuses the prepared dataset when its fingerprint matches; otherwise tokenizes here and says why.
    """
    end_of_turn, _ = end_of_turn_of(tokenizer, data_cfg)
    parts = with_mixture_settings(fingerprint_parts(conversations, tokenizer, data_cfg, max_seq_len, end_of_turn),
                                  data_cfg)
    prepared_dir = data_cfg.prepared or data_cfg.output_dir
    if prepared_dir:
        loaded = load_samples(Path(os.path.expandvars(str(prepared_dir))).expanduser(), parts)
        if not isinstance(loaded, str):
            splits, counts = loaded
            return splits, {**counts, "prepared_dir": str(prepared_dir), "reused_prepared": True, "fingerprint": parts}
        if os.environ.get("RANK", "0") == "0":
            print(f"llmft: {loaded}: tokenizing in this process instead "
                  f"(run `python -m llmft.data prepare` on the login node to avoid it).", file=sys.stderr)
    splits, counts, _ = tokenize_splits(conversations, tokenizer, data_cfg, max_seq_len)
    return splits, {**counts, "reused_prepared": False, "fingerprint": parts}
