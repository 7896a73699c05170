#!/usr/bin/env python3
"""Tickets per second of llmft's data preparation on 1 and on data.num_workers processes, against a bare `datasets.map`.

    python bench/bench_data_prepare.py [--tickets 10000] [--max-seq-len 2048] [--workers N] [--repeat 2]
    python bench/bench_data_prepare.py --tickets 100000 --peak-rss     # streaming: the memory of a real prepare
    python bench/bench_data_prepare.py --tickets 100000 --peak-rss --model-tokenizer    # the same, in one pass

Writes a synthetic helpdesk export (tickets JSONL: greetings, pasted logs, quoted replies, signatures, planted
personal data, internal notes), trains the tiny tokenizer once on it (shared by every side, not timed), then times:

- llmft, data.num_workers=1 and data.num_workers=default (the CPUs available, at most 16; --workers overrides), as
  `prepare` runs with a model's own tokenizer: one pass that reads, cleans, scrubs and dedups the export, renders
  the chat template with assistant-only labels, windows long tickets (each worker its chunks), then fingerprints,
  packs, and saves the dataset and the audit files: everything `prepare` does but drawing the length histogram. The
  two runs must write the same bytes (checked);
- baseline: `datasets.Dataset.from_list(conversations).map(apply_chat_template(tokenize=True), num_proc=N)` on the
  conversations llmft produced, N = llmft's workers (the cores: what a user who has them writes): tokenization only,
  no cleaning, no masks, no packing, nothing written. The same call without `num_proc` (one process) is printed
  for reference.

Each side runs --repeat times (llmft's two alternately) and the best time counts: on a shared machine another
job slows one run, not the method. Rates count the input tickets. The last line:
`ratios: workers_vs_one=X vs_datasets_map_num_proc=Y` (X: llmft on the default workers against one; Y: llmft on the
default workers against `datasets.map` on as many processes; goal >= 1.0).

--peak-rss runs `python -m llmft.data prepare` as users do (tokenizer training included) in a child process, and
reports its time and peak memory: the proportional set size (PSS) summed over the process and its workers, sampled
every 0.1 s (and their RSS summed, which counts the pages a forked worker shares with its parent twice), and the
peak RSS of the largest single process (getrusage, what `/usr/bin/time -v` shows). Its last line: `peak RSS: ...`.
"""

from __future__ import annotations

import argparse
import filecmp
import json
import os
import random
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

STAFF_DOMAIN = "support.example-hpc.fr"  # the agents' addresses: their turns are the assistant's
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


def synthetic_tickets(num_tickets: int, seed: int = 0):
    rng = random.Random(seed)
    for ticket in range(num_tickets):
        user = f"{rng.choice(FIRST)} {rng.choice(LAST)} <user{ticket}@lab.example.org>"
        staff = f"{rng.choice(FIRST)} {rng.choice(LAST)} <agent{rng.randint(1, 12)}@{STAFF_DOMAIN}>"
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
        yield {"id": f"T-{ticket}", "subject": sentence(rng)[:60], "messages": messages}


def write_export(path: Path, num_tickets: int) -> Path:
    with open(path, "w", encoding="utf-8") as handle:
        for ticket in synthetic_tickets(num_tickets):
            handle.write(json.dumps(ticket, ensure_ascii=False) + "\n")
    return path


def model_with_own_tokenizer(model_dir: Path, sample_path: Path, weights: bool = False) -> Path:
    """A model folder whose tokenizer (2,048 ids) is trained on 2,000 synthetic tickets written to `sample_path`, and
    a one-layer Llama's config (what `prepare` with model.path reads); with `weights`, seeded random weights too, so
    a run can train it."""
    from transformers import LlamaConfig

    from llmft.config.compose import compose
    from llmft.data.prepare.reading import read_conversations
    from llmft.data.tokenize.tokenizer import train_tiny_tokenizer

    sample = write_export(sample_path, 2000)
    conversations, _ = read_conversations(compose(["data=tickets", f"data.path={sample}",
                                                   f"data.tickets.staff_domains=[{STAFF_DOMAIN}]"]).data)
    tokenizer = train_tiny_tokenizer([m["content"] for c in conversations for m in c.messages], 2048)
    tokenizer.save_pretrained(model_dir)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                         num_attention_heads=2, pad_token_id=tokenizer.pad_token_id)
    if not weights:
        config.save_pretrained(model_dir)
        return model_dir
    import torch
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(model_dir)
    return model_dir


def prepare_without_tokenizer_training(cfg, tokenizer, out_dir: Path) -> tuple[dict, dict, float]:
    """What `prepare` does with a model's own tokenizer, but the histogram: the report, the counts, the seconds."""
    from llmft.data.prepare.tokenizing import end_of_turn_of
    from llmft.data.prepare.one_pass import read_and_tokenize
    from llmft.data.prepare.prepared_dir import fingerprint_parts, save_samples, write_manifest

    started = time.perf_counter()
    read_report, tokenized, conversations_part = read_and_tokenize(cfg.data, tokenizer, cfg.model.max_seq_len,
                                                                   audit_dir=out_dir)
    parts = fingerprint_parts(conversations_part, tokenizer, cfg.data, cfg.model.max_seq_len,
                              end_of_turn_of(tokenizer, cfg.data)[0])
    save_samples(out_dir, tokenized.splits)
    (out_dir / "report.json").write_text(json.dumps({**read_report, **tokenized.counts}, indent=2, ensure_ascii=False))
    write_manifest(out_dir, parts, tokenized.counts)
    return read_report, tokenized.counts, time.perf_counter() - started


def same_files(a: Path, b: Path) -> bool:
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    return files == sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file()) and \
        all(filecmp.cmp(a / f, b / f, shallow=False) for f in files)


def baseline(conversations, tokenizer, num_proc: int | None) -> tuple[float, int]:
    from datasets import Dataset

    def tokenize(example):
        encoded = tokenizer.apply_chat_template(example["messages"], tokenize=True)
        return {"input_ids": encoded["input_ids"] if hasattr(encoded, "keys") else encoded}

    if num_proc:  # forked processes: the tokenizers library's thread pool does not survive a fork
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
    started = time.perf_counter()
    dataset = Dataset.from_list([{"messages": c.messages} for c in conversations])
    dataset = dataset.map(tokenize, remove_columns=["messages"], num_proc=num_proc)
    seconds = time.perf_counter() - started
    os.environ.pop("TOKENIZERS_PARALLELISM", None)
    return seconds, sum(len(ids) for ids in dataset["input_ids"])


def ratios(args) -> int:
    from datasets.utils.logging import disable_progress_bar

    from llmft.config.compose import compose
    from llmft.data.prepare.reading import read_conversations
    from llmft.data.tokenize.tokenizer import train_tiny_tokenizer
    from llmft.data.prepare.workers import num_workers_of

    disable_progress_bar()
    load = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        export = write_export(Path(tmp) / "export.jsonl", args.tickets)
        overrides = ["data.format=tickets_jsonl", f"data.path={export}", f"model.max_seq_len={args.max_seq_len}",
                     f"data.tickets.staff_domains=[{STAFF_DOMAIN}]"]
        default_cfg = compose(overrides + ([f"data.num_workers={args.workers}"] if args.workers else []))
        workers = num_workers_of(default_cfg.data)
        conversations, _ = read_conversations(default_cfg.data)  # once, to train the shared tokenizer on
        tokenizer = train_tiny_tokenizer([m["content"] for c in conversations for m in c.messages], 2048)

        runs: dict[str, list[float]] = {"one": [], "default": []}
        for _ in range(args.repeat):  # alternately, the best of each: a busy machine slows one run, not the other
            for name, cfg in [("one", compose(overrides + ["data.num_workers=1"])), ("default", default_cfg)]:
                out_dir = Path(tmp) / name
                shutil.rmtree(out_dir, ignore_errors=True)
                out_dir.mkdir()
                read_report, counts, run_s = prepare_without_tokenizer_training(cfg, tokenizer, out_dir)
                runs[name].append(run_s)
        seconds = {name: min(times) for name, times in runs.items()}
        identical = same_files(Path(tmp) / "one", Path(tmp) / "default")
        baseline_s, baseline_tokens = min(baseline(conversations, tokenizer, None) for _ in range(args.repeat))
        baseline_workers_s = min(baseline(conversations, tokenizer, workers)[0] for _ in range(args.repeat))

    after = os.getloadavg()
    rate = {name: args.tickets / s for name, s in seconds.items()}
    print(f"{args.tickets} tickets -> {read_report['num_conversations']} conversations kept, "
          f"{sum(counts['samples'].values())} samples, {counts['tokens']['train']} train tokens "
          f"({read_report['num_skipped']} bad, dropped {read_report['dropped']})")
    print(f"PII replaced: {read_report['pii_replacements']}")
    print(f"load average before: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}, after: {after[0]:.2f} {after[1]:.2f} "
          f"{after[2]:.2f} on {os.cpu_count()} CPUs")
    print(f"llmft, 1 worker:   {seconds['one']:6.2f} s  {rate['one']:6.0f} tickets/s  "
          f"(runs: {' '.join(f'{s:.2f}' for s in runs['one'])})")
    print(f"llmft, {workers} workers:  {seconds['default']:6.2f} s  {rate['default']:6.0f} tickets/s  "
          f"(runs: {' '.join(f'{s:.2f}' for s in runs['default'])}; same output files as 1 worker: "
          f"{'yes' if identical else 'NO'})")
    print(f"datasets.map:      {baseline_s:6.2f} s  {args.tickets / baseline_s:6.0f} tickets/s  "
          f"(one process, for reference: vs_datasets_map={baseline_s / seconds['default']:.2f})")
    print(f"datasets.map, num_proc={workers}: {baseline_workers_s:6.2f} s  {args.tickets / baseline_workers_s:6.0f} "
          f"tickets/s  (apply_chat_template, tokenization only, {baseline_tokens} tokens)")
    print(f"useful-token fraction at {args.max_seq_len}: packed {counts['useful_token_fraction']['packed']:.1%}, "
          f"padded {counts['useful_token_fraction']['padded']:.1%}")
    print(f"ratios: workers_vs_one={seconds['one'] / seconds['default']:.2f} "
          f"vs_datasets_map_num_proc={baseline_workers_s / seconds['default']:.2f}")
    return 0 if identical else 1


def tree_memory(pid: int) -> tuple[int, int, int]:
    """(RSS summed, PSS summed, largest RSS) over a process and its descendants, in bytes (Linux /proc). RSS counts the
    pages a forked worker shares with its parent in both; PSS splits them between the processes that share them."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as handle:
                    children.setdefault(int(handle.read().rsplit(")", 1)[1].split()[1]), []).append(int(entry))
            except OSError:
                continue
    rss_sum = pss_sum = largest = 0
    stack = [pid]
    while stack:
        current = stack.pop()
        stack += children.get(current, [])
        try:
            with open(f"/proc/{current}/smaps_rollup") as handle:
                fields = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in handle if line.endswith("kB\n")}
        except OSError:
            continue
        rss_sum, pss_sum, largest = rss_sum + fields["Rss"], pss_sum + fields["Pss"], max(largest, fields["Rss"])
    return rss_sum, pss_sum, largest


def peak_rss(args) -> int:
    with tempfile.TemporaryDirectory() as tmp:
        started = time.perf_counter()
        export = write_export(Path(tmp) / "export.jsonl", args.tickets)
        print(f"export: {args.tickets} tickets, {export.stat().st_size / 1e6:.0f} MB, written in "
              f"{time.perf_counter() - started:.0f} s")
        command = [sys.executable, "-m", "llmft.data", "prepare", "data=tickets", f"data.path={export}",
                   f"data.tickets.staff_domains=[{STAFF_DOMAIN}]", f"data.output_dir={Path(tmp) / 'out'}",
                   f"model.max_seq_len={args.max_seq_len}"]
        command += [f"data.num_workers={args.workers}"] if args.workers else []
        if args.model_tokenizer:  # a model's own tokenizer (here: trained on 2,000 of the tickets, untimed): one pass
            command.append(f"model.path={model_with_own_tokenizer(Path(tmp) / 'model', Path(tmp) / 'sample.jsonl')}")
        load = os.getloadavg()
        started = time.perf_counter()
        process = subprocess.Popen(command, cwd=Path(__file__).resolve().parents[1], stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE, text=True)
        peak = [0, 0, 0]

        def sample() -> None:
            while process.poll() is None:
                peak[:] = [max(a, b) for a, b in zip(peak, tree_memory(process.pid))]
                time.sleep(0.1)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        stdout, stderr = process.communicate()
        seconds = time.perf_counter() - started
        sampler.join()
        largest = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    print(stdout.strip())
    if process.returncode:
        print(stderr[-2000:])
        return process.returncode
    print(f"load average before: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} on {os.cpu_count()} CPUs")
    print(f"prepare: {seconds:.0f} s, {args.tickets / seconds:.0f} tickets/s "
          f"({'one pass, with model.path' if args.model_tokenizer else 'model=tiny: tokenizer training included'})")
    print(f"peak memory of the process and its workers, sampled every 0.1 s: PSS summed {peak[1] / 2**30:.2f} GiB "
          f"(RSS summed {peak[0] / 2**30:.2f} GiB: a forked worker's pages shared with its parent count twice)")
    print(f"peak RSS: {largest / 2**30:.2f} GiB (largest single process, getrusage; sampled {peak[2] / 2**30:.2f} GiB)")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tickets", type=int, default=10_000)
    parser.add_argument("--max-seq-len", type=int, default=2048)
    parser.add_argument("--workers", type=int, default=None, help="data.num_workers of the default run (the CPUs)")
    parser.add_argument("--repeat", type=int, default=2, help="runs of each side, alternately; the best counts")
    parser.add_argument("--peak-rss", action="store_true", help="time a real `prepare` and report its peak memory")
    parser.add_argument("--model-tokenizer", action="store_true",
                        help="with --peak-rss: prepare with a model's own tokenizer (model.path: the one-pass path) "
                             "instead of model=tiny (which trains its tokenizer on the cleaned texts first)")
    args = parser.parse_args()
    return peak_rss(args) if args.peak_rss else ratios(args)


if __name__ == "__main__":
    sys.exit(main())
