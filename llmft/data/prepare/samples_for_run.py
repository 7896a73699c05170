"""The samples a run trains on: a prepared folder's (data.prepared), or tokenized here.

    conversations, report = read_conversations(cfg.data)                  # text: no tokenizer needed
    tokenizer = tokenizer_for_run(cfg, conversations)                     # model=tiny trains its own on the texts
    splits, counts = build_splits(conversations, tokenizer, cfg.data, cfg.model.max_seq_len)

`python -m llmft.data prepare` and training run this same code. With `data.prepared=DIR`, `read_conversations` reads
nothing but DIR's report, `tokenizer_for_run` (model=tiny) loads DIR's tokenizer and `build_splits` DIR's samples,
once the settings, input files and tokenizer are checked to be DIR's (prepared_source.py). Otherwise `build_splits`
loads `data.output_dir`'s samples when their fingerprint matches (prepared_dir.py), or tokenizes (tokenizing.py,
tokenizing_preferences.py).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from llmft.data.preferences.dpo_kto import PREFERENCE_FORMATS
from llmft.data.prepare.data_config import format_of
from llmft.data.prepare.mixture import with_mixture_settings
from llmft.data.prepare.prepared_dir import fingerprint_parts, load_samples
from llmft.data.prepare.prepared_source import prepared_samples
from llmft.data.prepare.tokenizing import end_of_turn_of, tokenize_rows
from llmft.data.prepare.tokenizing_preferences import tokenize_preferences
from llmft.data.tokenize.templating import Sample


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
    For data.format=preference_jsonl / kto_jsonl: lists of `PreferencePair` / `KtoExample` (preferences/dpo_kto.py), and
    counts["samples"] counts pairs / examples.

    data.prepared=DIR: DIR's samples, or a DataError saying what differs (never other data instead). Otherwise reuses
    data.output_dir when its fingerprint matches, or tokenizes here and says why.
    """
    if data_cfg.prepared:
        return prepared_samples(tokenizer, data_cfg, max_seq_len)
    end_of_turn, _ = end_of_turn_of(tokenizer, data_cfg)
    parts = with_mixture_settings(fingerprint_parts(conversations, tokenizer, data_cfg, max_seq_len, end_of_turn),
                                  data_cfg)
    prepared_dir = data_cfg.output_dir
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
