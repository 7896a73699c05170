#!/usr/bin/env python3
"""Generation for evaluation on a real model: `llmft eval`'s batched answers against the same answers generated one
prompt at a time, and the wall time of the outcome benchmark's evaluations.

    python bench/bench_generate.py [--outcome DIR] [--models DIR]

1. The runs of the outcome benchmark (bench_outcome.py: SmolLM2-135M-Instruct tuned on the acronym experiment and
   on the tickets): those of `python bench/bench_outcome.py --keep DIR` when --outcome DIR holds them, else trained
   here as it trains them (about 14 minutes on 2 cores; with --outcome DIR they are kept there).
2. Timed, each in its own process: the outcome benchmark's two evaluations, `python -m llmft.eval run=RUN ...` with
   its settings (the acronyms: 68 held-out questions, base and tuned, 40 new tokens at most; the tickets: every
   held-out answer's loss, 4 answers of 96 tokens).
3. Timed, in this process: the acronym run's held-out questions answered by the base model (the adapter disabled)
   and by the tuned one, as `llmft eval` answers them (`generate`: batches of eval.batch_size, left padding, a KV
   cache, greedy), then one question at a time (batch_size=1). The answers must be the same (checked, each).

Prints the seconds of each, then as its last line

    generate: batched_vs_one_by_one=X

X: the seconds one at a time / the seconds batched, both models. Goal on 2 quiet CPU cores: X >= 3. Run it alone.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_outcome import ACRONYM_EVAL, ACRONYMS, TICKET_EVAL, TICKETS, llmft, trained_and_evaluated  # noqa: E402


def outcome_runs(out: Path) -> dict[str, Path]:
    """The outcome benchmark's two runs in `out`, trained (and evaluated once) where missing."""
    runs = {}
    for name, launch, evaluate in (("acronyms", ACRONYMS, ACRONYM_EVAL), ("tickets", TICKETS, TICKET_EVAL)):
        if not (out / name / "final").is_dir():
            trained_and_evaluated(name, out, launch, evaluate)
        runs[name] = out / name
    return runs


def answers_both_ways(run_dir: Path) -> dict[str, dict]:
    """The acronym run's held-out questions answered by base and tuned model, batched as `llmft eval` does and one at
    a time: per way, the answers by model and the seconds."""
    import torch

    from llmft.serve.evaluation import eval_settings, held_out_examples
    from llmft.serve.inference import fit_prompt, generate, load_run_model, load_saved_tokenizer, run_config, \
        stop_token_ids

    cfg = run_config(run_dir)
    settings = eval_settings(run_dir, ACRONYM_EVAL)
    examples, _ = held_out_examples(cfg, run_dir, settings)
    tokenizer = load_saved_tokenizer(run_dir)
    fitted = [fit_prompt(tokenizer, e.messages, cfg.model.max_seq_len) for e in examples]
    prompts = [f[0] for f in fitted if f is not None]
    model, _ = load_run_model(run_dir, cfg)
    stop_ids = stop_token_ids(tokenizer, cfg.data)
    print(f"{len(prompts)} held-out questions of {run_dir}, max_new_tokens={settings.max_new_tokens}, "
          f"eval.batch_size={settings.batch_size}, {torch.get_num_threads()} threads", flush=True)
    results = {}
    for way, batch_size in (("batched", settings.batch_size), ("one by one", 1)):
        started = time.perf_counter()
        with model.disable_adapter():
            base = generate(model, tokenizer, prompts, stop_ids, settings.max_new_tokens, batch_size)
        base_s = time.perf_counter() - started
        tuned = generate(model, tokenizer, prompts, stop_ids, settings.max_new_tokens, batch_size)
        seconds = time.perf_counter() - started
        tokens = sum(g.num_tokens for g in base + tuned)
        print(f"{way:>10} (batch_size={batch_size}): base {base_s:6.1f} s, tuned {seconds - base_s:6.1f} s, "
              f"{tokens} answer tokens, {tokens / seconds:5.1f} tokens/s", flush=True)
        results[way] = {"answers": {"base": base, "tuned": tuned}, "seconds": seconds}
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--outcome", type=Path, help="the runs of `bench_outcome.py --keep DIR` (made there when "
                                                     "missing; default: trained in a temporary folder)")
    parser.add_argument("--models", type=Path, help="the models folder ($LLMFT_MODELS)")
    args = parser.parse_args()
    if args.models:
        os.environ["LLMFT_MODELS"] = str(args.models)
    llmft("models", "get", "smollm2-135m-instruct")
    with tempfile.TemporaryDirectory(prefix="llmft-generate-") as scratch:
        out = args.outcome or Path(scratch)
        out.mkdir(parents=True, exist_ok=True)
        runs = outcome_runs(out)
        load = os.getloadavg()
        evaluation_s = {"acronyms": llmft("eval", f"run={runs['acronyms']}", *ACRONYM_EVAL),
                        "tickets": llmft("eval", f"run={runs['tickets']}", *TICKET_EVAL)}
        results = answers_both_ways(runs["acronyms"])
        after = os.getloadavg()

    batched, alone = results["batched"], results["one by one"]
    differ = {name: sum(a.text != b.text for a, b in zip(batched["answers"][name], alone["answers"][name]))
              for name in ("base", "tuned")}
    print(f"answers that differ between the two ways: base {differ['base']}, tuned {differ['tuned']} (of "
          f"{len(batched['answers']['base'])} each)")
    print(f"the outcome benchmark's evaluations (python -m llmft.eval, wall): acronyms {evaluation_s['acronyms']:.1f} s,"
          f" tickets {evaluation_s['tickets']:.1f} s, {sum(evaluation_s.values()) / 60:.1f} min in all")
    print(f"load average before: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}, after: {after[0]:.2f} {after[1]:.2f} "
          f"{after[2]:.2f} on {os.cpu_count()} CPUs")
    print(f"generate: batched_vs_one_by_one={alone['seconds'] / batched['seconds']:.2f}")
    return 1 if any(differ.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
