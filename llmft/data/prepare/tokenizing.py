"""The tokenize path: conversations to the samples of each split, as int32 arrays (`Rows`, tokenize/rows.py), and
counts of what was built, windowed and dropped.

    tokenized = tokenize_rows(conversations, tokenizer, cfg.data, cfg.model.max_seq_len, audit_dir)

Chat template, masks and windows run chunk by chunk on `data.num_workers` processes (`tokenize_chunk`, workers.py);
the split of each sample (splits.py), the audit files, the checks against silent mask failures and packing are done
here, in input order, so the samples are the same bytes for any number of workers. data.format=mixture tokenizes
each source as alone, then draws the training samples at the sources' weights (`tokenize_mixture`, mixture.py).
"""

from __future__ import annotations

import json
import shutil
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from llmft.config.data_schema import DataFormat, LongConversations
from llmft.data.prepare.data_config import format_of, packs, plain
from llmft.data.prepare.mixture import Source, by_source, draw, sample_targets, source_entries, sources_of
from llmft.data.prepare.splits import split_of, validation_fallback
from llmft.data.prepare.workers import chunks, in_order, num_workers_of
from llmft.data.readers.records import Conversation, DataError
from llmft.data.tokenize.packing import pack_rows
from llmft.data.tokenize.rows import Rows
from llmft.data.tokenize.templating import IGNORE_INDEX, Sample, TemplateError, tokenize_many, windows, \
    with_system_prompt


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
    long_policy: LongConversations
    audit: bool = False  # also render the audit line of each conversation that gives a sample

    @classmethod
    def of(cls, tokenizer, data_cfg, end_of_turn: str, max_seq_len: int, audit: bool) -> Tokenizing:
        long_policy = LongConversations(data_cfg.long_conversations)
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
            if state.long_policy is LongConversations.drop:
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
        return validation_fallback([i for i, number in self.split_of_id.items() if number == 0])

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
    if format_of(data_cfg) is DataFormat.mixture:
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

def finish_rows(splits: dict[str, Rows], data_cfg, max_seq_len: int, end_of_turn: str, end_of_turn_id: int,
                dropped: dict[str, int], num_windowed: int) -> dict:
    """Check the unpacked `splits`, pack them in place when data.packing, and count what was built."""
    preflight(splits, end_of_turn, end_of_turn_id)
    if not splits["train"].num_samples:
        raise DataError(f"no training sample left from {data_cfg.path} (dropped: {dict(dropped)}); "
                        f"raise model.max_seq_len or add data.")
    counts = {
        "max_seq_len": max_seq_len,
        "packing": packs(data_cfg),
        "end_of_turn_token": end_of_turn,
        "samples": {split: rows.num_samples for split, rows in splits.items()},
        "tokens": {split: rows.num_tokens for split, rows in splits.items()},
        "supervised_tokens": {split: rows.num_supervised for split, rows in splits.items()},
        "conversations_windowed": num_windowed,
        "samples_dropped": {reason: n for reason, n in dropped.items() if n},
    }
    if packs(data_cfg):
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

