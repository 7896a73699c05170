"""The one pass of `prepare` with a model's own tokenizer: read, clean, scrub and tokenize each chunk in one worker.

`read_and_tokenize` gives what `read_conversations` (reading.py) then `tokenize_rows` (tokenizing.py) give, from the
same functions (`read_chunk`, then `tokenize_chunk` in the same worker): the parent adds the chunks up in input order
and drops the samples of the duplicates it finds, so the cleaned conversations cross between processes once instead
of three times, and no step waits for the slowest chunk of the one before.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from llmft.config.data_schema import DataFormat
from llmft.config.validation import check_data
from llmft.data.clean.dedup import DedupKeys
from llmft.data.preferences.dpo_kto import PREFERENCE_FORMATS
from llmft.data.prepare import reading, tokenizing
from llmft.data.prepare.data_config import data_path, format_of, plain
from llmft.data.prepare.prepared_dir import ConversationsFingerprint, conversation_identity
from llmft.data.prepare.reading import Cleaning, CleanedChunk, ReadTally, read_tasks
from llmft.data.prepare.tokenizing import SampleTally, Tokenized, TokenizedChunk, Tokenizing, end_of_turn_of
from llmft.data.prepare.workers import in_order, num_workers_of
from llmft.data.readers.records import ReadReport


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
    cleaned = reading.read_chunk(state.cleaning, task)  # (looked up in their modules, as the two steps do)
    conversations = [conversation for conversation, _ in cleaned.kept]
    result = PreparedChunk(cleaned, [c.id for c in conversations], [keys for _, keys in cleaned.kept],
                           [conversation_identity(c) for c in conversations],
                           tokenizing.tokenize_chunk(state.tokenizing, conversations))
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
    if data_format is DataFormat.mixture or data_format in PREFERENCE_FORMATS:
        raise ValueError(f"read_and_tokenize does not take data.format={data_format.value}")
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

