"""The tokenize path of preference data (data.format=preference_jsonl, kto_jsonl): records to `PreferencePair` /
`KtoExample` lists per split, never packed, tokenized chunk by chunk on `data.num_workers` processes as
`tokenize_rows` does (the records themselves, their cleaning and tokenizing are in preferences/dpo_kto.py).
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from llmft.config.data_schema import DataFormat, LongConversations
from llmft.data.preferences.dpo_kto import PreferenceTokenizing, preference_counts, samples_of, \
    tokenize_preference_chunk
from llmft.data.prepare.data_config import format_of, plain
from llmft.data.prepare.splits import assign_splits
from llmft.data.prepare.tokenizing import Tokenized, end_of_turn_of, preflight
from llmft.data.prepare.workers import chunks, in_order, num_workers_of
from llmft.data.readers.records import DataError


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
    long_policy = LongConversations(data_cfg.long_conversations)
    state = PreferenceTokenizing(tokenizer, data_cfg.system_prompt, end_of_turn, max_seq_len, long_policy)
    num_workers = num_workers_of(data_cfg)
    batches = chunks(records, num_workers)
    audit_name = "pairs" if data_format is DataFormat.preference_jsonl else "examples"
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

