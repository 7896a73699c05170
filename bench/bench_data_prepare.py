#!/usr/bin/env python3
"""Tickets per second of llmft's data preparation, against a plain `datasets.map` with the same tokenizer.

    python bench/bench_data_prepare.py [--tickets 10000] [--max-seq-len 2048]

Writes a synthetic helpdesk export (tickets JSONL: greetings, pasted logs, quoted replies, signatures, planted
personal data, internal notes), then, in this one process and with one tokenizer:

- llmft: read + clean + scrub + dedup the export, render the chat template with assistant-only labels, window
  long tickets, pack, and save the dataset and the audit files (everything `prepare` does but training the
  tiny tokenizer, which both sides share);
- baseline: `datasets.Dataset.from_list(conversations).map(apply_chat_template(tokenize=True))` on the
  conversations llmft produced: tokenization only, no cleaning, no masks, no packing, nothing written.

Both rates count the input tickets, so the ratio compares the time to go from the same export to tokens.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")

WORDS = ("job node GPU partition quota memory scratch work module conda python torch slurm sbatch srun squeue "
         "checkpoint dataset inode account project allocation queue walltime error kernel driver CUDA NCCL MPI "
         "rank process thread core socket file directory permission ssh key login password token cluster login "
         "prepost compile install environment library version update request limit priority fair-share").split()
GREETINGS = ["Hello,", "Hi,", "Bonjour,", "Dear support,", "Good morning,"]
CLOSINGS = ["Best regards,", "Thanks,", "Cordialement,", "Merci d'avance,", "Kind regards,"]
FIRST = ["Alice", "Bruno", "Chloé", "David", "Emma", "Farid", "Gaëlle", "Hugo", "Inès", "Jules"]
LAST = ["Martin", "Bernard", "Dubois", "Thomas", "Robert", "Richard", "Petit", "Durand", "Leroy", "Moreau"]


def sentence(rng: random.Random) -> str:
    words = [rng.choice(WORDS) for _ in range(rng.randint(6, 18))]
    return words[0].capitalize() + " " + " ".join(words[1:]) + rng.choice([".", ".", "?", "!"])


def body(rng: random.Random, author: str, staff: bool, previous: str | None, ticket: int) -> str:
    lines = [rng.choice(GREETINGS), ""]
    lines += [" ".join(sentence(rng) for _ in range(rng.randint(1, 4))) for _ in range(rng.randint(1, 4))]
    if not staff and rng.random() < 0.3:
        lines += ["", f"    srun: error: node r{rng.randint(1, 999)}i{rng.randint(0, 7)}n{rng.randint(0, 8)}: "
                      f"task {rng.randint(0, 64)}: Out Of Memory"] * rng.randint(1, 8)
    if not staff and rng.random() < 0.3:  # planted personal data
        lines.append(rng.choice([
            f"My login is u{chr(97 + ticket % 26)}x{ticket % 90 + 10}ab, call me at 06 {ticket % 90 + 10} 34 56 78.",
            f"export HF_TOKEN=hf_{''.join(rng.choice('abcdefghijKLMNOP0123456789') for _ in range(34))}",
            f"The node IP is 10.{ticket % 250}.{rng.randint(0, 250)}.{rng.randint(1, 250)}, mail me at x{ticket}@uni.example.org",
        ]))
    lines += ["", rng.choice(CLOSINGS), author.split(" <")[0]]
    if not staff and rng.random() < 0.5:
        lines += ["Laboratoire de physique", f"+33 1 {ticket % 90 + 10} 27 00 00"]
    if previous:
        lines += ["", f"On Mon, 6 Jan 2025 at 09:{ticket % 60:02d}, someone wrote:"] + [f"> {l}" for l in previous.splitlines()]
    return "\n".join(lines)


def synthetic_tickets(num_tickets: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    tickets = []
    for ticket in range(num_tickets):
        user = f"{rng.choice(FIRST)} {rng.choice(LAST)} <user{ticket}@lab.example.org>"
        staff = f"{rng.choice(FIRST)} {rng.choice(LAST)} <agent{rng.randint(1, 12)}@support.example-hpc.fr>"
        messages, previous = [], None
        for turn in range(rng.choice([2, 2, 3, 4, 4, 6])):
            is_staff = turn % 2 == 1
            author = staff if is_staff else user
            text = body(rng, author, is_staff, previous, ticket)
            messages.append({"from": author, "date": "Mon, 06 Jan 2025 09:14:17 +0100", "body": text})
            if is_staff and rng.random() < 0.15:
                messages.append({"from": staff, "date": "Mon, 06 Jan 2025 09:20:00 +0100",
                                 "body": "internal: check the account", "internal": True})
            previous = text
        tickets.append({"id": f"T-{ticket}", "subject": sentence(rng)[:60], "messages": messages})
    return tickets


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tickets", type=int, default=10_000)
    parser.add_argument("--max-seq-len", type=int, default=2048)
    args = parser.parse_args()

    from datasets import Dataset
    from datasets.utils.logging import disable_progress_bar

    from llmft.data.pipeline import read_conversations, tokenize_splits
    from llmft.data.prepare import write_conversations
    from llmft.data.prepared import save_samples
    from llmft.data.tokenizer import train_tiny_tokenizer
    from tests.conftest import compose

    disable_progress_bar()
    with tempfile.TemporaryDirectory() as tmp:
        export = Path(tmp) / "export.jsonl"
        export.write_text("".join(json.dumps(t, ensure_ascii=False) + "\n" for t in synthetic_tickets(args.tickets)))
        out_dir = Path(tmp) / "prepared"
        out_dir.mkdir()
        cfg = compose(["data.format=tickets_jsonl", f"data.path={export}", f"data.output_dir={out_dir}",
                       "data.tickets.staff_domains=[support.example-hpc.fr]", f"model.max_seq_len={args.max_seq_len}"])

        conversations, read_report = read_conversations(cfg.data)  # once to train the shared tokenizer on
        tokenizer = train_tiny_tokenizer([m["content"] for c in conversations for m in c.messages], 2048)

        llmft_started = time.perf_counter()
        conversations, read_report = read_conversations(cfg.data)
        after_read = time.perf_counter()
        splits, counts, used_ids = tokenize_splits(conversations, tokenizer, cfg.data, args.max_seq_len)
        after_tokenize = time.perf_counter()
        save_samples(out_dir, splits)
        write_conversations(out_dir, conversations, used_ids, cfg.data)
        llmft_s = time.perf_counter() - llmft_started

        started = time.perf_counter()
        dataset = Dataset.from_list([{"messages": c.messages} for c in conversations])

        def tokenize(example):
            encoded = tokenizer.apply_chat_template(example["messages"], tokenize=True)
            return {"input_ids": encoded["input_ids"] if hasattr(encoded, "keys") else encoded}

        dataset = dataset.map(tokenize, remove_columns=["messages"])
        baseline_s = time.perf_counter() - started
        baseline_tokens = sum(len(ids) for ids in dataset["input_ids"])

    llmft_rate, baseline_rate = args.tickets / llmft_s, args.tickets / baseline_s
    print(f"{args.tickets} tickets -> {len(conversations)} conversations kept, "
          f"{sum(counts['samples'].values())} samples, {counts['tokens']['train']} train tokens "
          f"({read_report['num_skipped']} bad, dropped {read_report['dropped']})")
    print(f"PII replaced: {read_report['pii_replacements']}")
    print(f"llmft prepare:  {llmft_s:6.2f} s  {llmft_rate:8.0f} tickets/s  "
          f"(read, clean, scrub, dedup {after_read - llmft_started:.2f} s; template, masks, windows, packing "
          f"{after_tokenize - after_read:.2f} s; save {llmft_started + llmft_s - after_tokenize:.2f} s)")
    print(f"datasets.map:   {baseline_s:6.2f} s  {baseline_rate:8.0f} tickets/s  "
          f"(apply_chat_template, tokenization only, {baseline_tokens} tokens)")
    print(f"ratio llmft / datasets.map: {llmft_rate / baseline_rate:.2f}")
    print(f"useful-token fraction at {args.max_seq_len}: packed {counts['useful_token_fraction']['packed']:.1%}, "
          f"padded {counts['useful_token_fraction']['padded']:.1%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
