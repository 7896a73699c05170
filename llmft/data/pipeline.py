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
from llmft.data.prepared import fingerprint_parts, load_samples
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
    deduplicator = Deduplicator(data_cfg.clean.near_duplicate_threshold)
    dropped: Counter = Counter()
    truncated, num_read, pii = 0, 0, Counter()
    conversations = []
    for chunk in in_order(read_chunk, state, tasks, num_workers):
        report.merge(chunk.report)
        num_read += chunk.conversations_read
        for reason, n in chunk.dropped.items():
            dropped[reason] += n
        truncated += chunk.truncated
        pii.update(chunk.pii)
        conversations += [kept for kept, keys in chunk.kept if not deduplicator.duplicate(keys)]
    dropped.update({reason: n for reason, n in deduplicator.dropped.items() if n})
    if not conversations:
        reasons = ", ".join(f"{n} {reason}" for reason, n in (dropped + Counter(report.counts)).items()) or "none"
        raise DataError(
            f"no usable conversation in {path} ({report.records_read} records read, {len(report.skipped)} bad records "
            f"skipped{': ' + report.skipped[0] if report.skipped else ''}; dropped: {reasons})."
        )
    read_report = {
        "format": data_format,
        "path": str(path),
        **report.as_dict(),
        "conversations_read": num_read,
        "dropped": dict(dropped),
        "user_messages_truncated": truncated,
        "num_conversations": len(conversations),
        "pii_replacements": {kind: n for kind, n in sorted(pii.items()) if n} if state.scrubber else {},
    }
    return conversations, read_report


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


@dataclass
class TokenizedChunk:
    pieces: Rows  # the samples of the chunk's conversations, in order (a long conversation gives several windows)
    owners: np.ndarray  # for each sample, the index in the chunk of the conversation it comes from
    dropped: dict[str, int]  # by reason, in the order the reasons first occur
    num_windowed: int
    audit_lines: list[str] | None = None  # one per conversation that gave a sample, in order (Tokenizing.audit)


def tokenize_chunk(state: Tokenizing, chunk: list[Conversation]) -> TokenizedChunk:
    """Template, masks and windows of a chunk of conversations, in a worker."""
    tokenizer, max_seq_len = state.tokenizer, state.max_seq_len
    conversations = [c.messages for c in chunk]
    input_ids: list[int] = []
    labels: list[int] = []
    lengths, owners = [], []
    dropped: dict[str, int] = {}
    num_windowed = 0
    samples = tokenize_many(tokenizer, conversations, state.system_prompt, state.end_of_turn)
    for index, (messages, sample) in enumerate(zip(conversations, samples)):
        pieces = [sample]
        if len(sample.input_ids) > max_seq_len:
            if state.long_policy == "drop":
                dropped["longer_than_max_seq_len"] = dropped.get("longer_than_max_seq_len", 0) + 1
                continue
            pieces, exchanges_dropped = windows(tokenizer, messages, max_seq_len, state.system_prompt,
                                                state.end_of_turn)
            num_windowed += 1
            dropped["exchange_longer_than_max_seq_len"] = \
                dropped.get("exchange_longer_than_max_seq_len", 0) + exchanges_dropped
            if not pieces:
                dropped["no_window_fits_max_seq_len"] = dropped.get("no_window_fits_max_seq_len", 0) + 1
                continue
        for piece in pieces:
            if piece.num_supervised == 0:
                dropped["no_supervised_token"] = dropped.get("no_supervised_token", 0) + 1
                continue
            input_ids += piece.input_ids
            labels += piece.labels
            lengths.append(len(piece.input_ids))
            owners.append(index)
    pieces = Rows(np.array(input_ids, np.int32), np.array(labels, np.int32), np.array(lengths, np.int64))
    audit_lines = [audit_line(chunk[i], state.system_prompt) for i in dict.fromkeys(owners)] if state.audit else None
    return TokenizedChunk(pieces, np.array(owners, np.int64), dropped, num_windowed, audit_lines)


@dataclass
class Tokenized:
    splits: dict[str, Rows]  # packed when data.packing; preference formats: lists of PreferencePair / KtoExample
    counts: dict
    used_ids: set[str]  # the conversations that gave at least one sample
    # audit_dir's `<split>.conversations.jsonl`, in the order first written: the conversations that gave a sample
    # (acronyms: one id for several conversations, so a conversation, not an id)
    conversation_files: dict[str, str]


def tokenize_rows(conversations, tokenizer, data_cfg, max_seq_len: int, audit_dir: Path | None = None) -> Tokenized:
    """The samples of each split as `Rows`, counts, and with `audit_dir` the conversations that gave a sample
    written there per split (`audit_line`). Tokenizing runs on data.num_workers processes, chunk by chunk; the split
    of each sample, the audit files and the packing are done here, in input order."""
    data_cfg = plain(data_cfg)
    if format_of(data_cfg) == "mixture":
        return tokenize_mixture(conversations, tokenizer, data_cfg, max_seq_len, audit_dir)
    end_of_turn, end_of_turn_id = end_of_turn_of(tokenizer, data_cfg)
    split_by_id = assign_splits([c.id for c in conversations], data_cfg)
    names = ["train", "validation"] + (["test"] if data_cfg.test_fraction > 0 else [])
    parts: dict[str, list[Rows]] = {name: [] for name in names}
    dropped: Counter = Counter()
    num_windowed = 0
    used_ids: set[str] = set()
    long_policy = str(getattr(data_cfg.long_conversations, "value", data_cfg.long_conversations))
    state = Tokenizing(tokenizer, data_cfg.system_prompt, end_of_turn, max_seq_len, long_policy, audit_dir is not None)
    num_workers = num_workers_of(data_cfg)
    batches = chunks(conversations, num_workers)
    audit_files: dict[str, object] = {}
    try:
        # (results first: zip then runs the pool to its end, which closes it)
        for chunk, batch in zip(in_order(tokenize_chunk, state, batches, num_workers), batches):
            for reason, n in chunk.dropped.items():
                dropped[reason] += n  # (+= 0 too: the reasons keep the order they first occurred in)
            num_windowed += chunk.num_windowed
            owner_ids = [batch[owner].id for owner in chunk.owners.tolist()]
            used_ids.update(owner_ids)
            split_of_piece = np.array([names.index(split_by_id[i]) for i in owner_ids], dtype=np.int64)
            split_of_token = np.repeat(split_of_piece, chunk.pieces.sample_lengths)
            for number, name in enumerate(names):
                tokens = split_of_token == number
                parts[name].append(Rows(chunk.pieces.input_ids[tokens], chunk.pieces.labels[tokens],
                                        chunk.pieces.sample_lengths[split_of_piece == number]))
            for owner, line in zip(dict.fromkeys(chunk.owners.tolist()), chunk.audit_lines or ()):
                split = split_by_id[batch[owner].id]
                if split not in audit_files:
                    audit_files[split] = open(audit_dir / f"{split}.conversations.jsonl", "w", encoding="utf-8")
                audit_files[split].write(line)
    finally:
        for handle in audit_files.values():
            handle.close()
    splits = {name: Rows.concatenate(rows) for name, rows in parts.items()}
    del parts
    counts = finish_rows(splits, data_cfg, max_seq_len, end_of_turn, end_of_turn_id, dict(dropped), num_windowed)
    return Tokenized(splits, counts, used_ids, {split: handle.name for split, handle in audit_files.items()})


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
