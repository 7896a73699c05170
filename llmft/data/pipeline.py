"""The data path of a run: read the configured conversations, split them by id, tokenize and mask them."""

from __future__ import annotations

import os
from pathlib import Path

from llmft.data.chat import Conversation, DataError, read_chat_jsonl, split_of
from llmft.data.templating import Sample, tokenize_conversation


def read_conversations(data_cfg) -> tuple[list[Conversation], dict]:
    path = Path(os.path.expandvars(str(data_cfg.path))).expanduser()
    data_format = str(getattr(data_cfg.format, "value", data_cfg.format))
    if data_format != "chat_jsonl":
        raise DataError(f"data.format={data_format} is not readable yet; use data.format=chat_jsonl.")
    conversations, report = read_chat_jsonl(path, strict=data_cfg.strict)
    if not conversations:
        raise DataError(f"no usable conversation in {path} ({len(report.skipped)} records skipped).")
    return conversations, report.as_dict()


def build_splits(conversations, tokenizer, data_cfg, max_seq_len: int) -> tuple[dict[str, list[Sample]], dict]:
    """Tokenized samples per split, and counts of what was truncated or dropped and why."""
    splits: dict[str, list[Sample]] = {"train": [], "validation": []}
    counts = {"truncated": 0, "dropped_no_supervised_token": 0}
    for conversation in conversations:
        sample = tokenize_conversation(tokenizer, conversation.messages, data_cfg.system_prompt)
        if len(sample.input_ids) > max_seq_len:
            counts["truncated"] += 1
            sample = Sample(sample.input_ids[:max_seq_len], sample.labels[:max_seq_len])
        if sample.num_supervised == 0:
            counts["dropped_no_supervised_token"] += 1
            continue
        splits[split_of(conversation.id, data_cfg.validation_fraction)].append(sample)
    if not splits["train"]:
        raise DataError(f"no training sample left from {data_cfg.path} (see the counts: {counts}).")
    if not splits["validation"]:
        # Tiny datasets: hold out the last training sample rather than evaluate on nothing.
        splits["validation"].append(splits["train"].pop())
    return splits, counts
