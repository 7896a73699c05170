#!/usr/bin/env python3
"""Useful-token fraction, padded batches vs packed rows, on the bundled support tickets.

    python bench/bench_useful_tokens.py [--micro-batch 4]

For each sequence length (512, 2048), the bundled raw tickets (tickets_sample.jsonl, through the whole data
pipeline: clean, scrub, template, masks) become training tensors two ways, with the same tokenizer:
- padded: micro-batches of `--micro-batch` samples in the training order, each padded to its longest sample
  (what a trainer without packing feeds the model);
- packed: llmft's best-fit rows of exactly `max_seq_len` positions.
Printed per way: real-token fraction (non-padding tokens / tensor positions) and supervised fraction (tokens with a
label / tensor positions; bounded by the assistant share of the conversations, packed or not), and the ratio.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from llmft.data.tokenize.batching import collate, epoch_order  # noqa: E402
from llmft.data.prepare.reading import read_conversations  # noqa: E402
from llmft.data.prepare.samples_for_run import build_splits  # noqa: E402
from llmft.data.tokenize.templating import IGNORE_INDEX  # noqa: E402
from llmft.config.compose import compose  # noqa: E402
from llmft.data.tokenize.tokenizer import train_tiny_tokenizer  # noqa: E402


def fractions(batches) -> tuple[float, float]:
    positions = real = supervised = 0
    for batch in batches:
        positions += batch["input_ids"].numel()
        real += int(batch["num_tokens"])
        supervised += int((batch["labels"] != IGNORE_INDEX).sum())
    return real / positions, supervised / positions


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--micro-batch", type=int, default=4)
    args = parser.parse_args()
    base = ["data=tickets_sample_jsonl"]
    cfg = compose(base)
    conversations, _ = read_conversations(cfg.data)
    tokenizer = train_tiny_tokenizer([m["content"] for c in conversations for m in c.messages], 2048)
    print(f"{len(conversations)} conversations from the bundled tickets; micro-batch {args.micro_batch}\n")
    print(f"{'max_seq_len':>11} {'way':>7} {'rows':>5} {'real/positions':>15} {'supervised/positions':>21}")
    for max_seq_len in (512, 2048):
        results = {}
        for packing in (False, True):
            cfg = compose(base + [f"data.packing={str(packing).lower()}"])
            samples = build_splits(conversations, tokenizer, cfg.data, max_seq_len)[0]["train"]
            order = epoch_order(len(samples), 0, 0)
            size = 1 if packing else args.micro_batch
            batches = [collate([samples[i] for i in order[k:k + size]], tokenizer.pad_token_id)
                       for k in range(0, len(order), size)]
            if packing:  # every packed row is max_seq_len positions, the last one padded
                positions = len(samples) * max_seq_len
                real = sum(len(s.input_ids) for s in samples)
                supervised = sum(s.num_supervised for s in samples)
                results["packed"] = (real / positions, supervised / positions, len(samples))
            else:
                results["padded"] = (*fractions(batches), len(samples))
        for way, (real, supervised, rows) in results.items():
            print(f"{max_seq_len:>11} {way:>7} {rows:>5} {real:>15.3f} {supervised:>21.3f}")
        print(f"{max_seq_len:>11} {'ratio':>7} {'':>5} {results['packed'][0] / results['padded'][0]:>15.2f} "
              f"{results['packed'][1] / results['padded'][1]:>21.2f}")


if __name__ == "__main__":
    main()
