#!/usr/bin/env python3
"""Is a real model made better? SmolLM2-135M-Instruct tuned by llmft on the course's acronym experiment and on the
bundled tickets, evaluated against itself before tuning.

    python bench/bench_outcome.py [--keep DIR] [--models DIR]

1. `python -m llmft.models get smollm2-135m-instruct` (a folder made before is reused; --models sets $LLMFT_MODELS).
2. The acronym experiment, as docs/real-model.md shows it: `python -m llmft.launch model=smollm2_135m
   data=acronyms_memorization`, then `python -m llmft.eval run=RUN`: base and tuned answer the held-out phrasings
   of the 30 taught acronyms and the 4 control acronyms never taught.
3. The tickets: `python -m llmft.launch model=smollm2_135m data=tickets_sample train.epochs=2`, then
   `python -m llmft.eval run=RUN eval.limit=4`: every held-out ticket's answer loss under base and tuned
   (teacher-forced, per token), four generated answers (ROUGE-L, embedding similarity).
4. Prints what the tuned model answers to three held-out acronym questions, then as its last line

       outcome: acronyms_base=X acronyms_tuned=Y tickets_loss_ratio=Z minutes=M

   X, Y: the share of base and tuned answers to the held-out phrasings of the taught acronyms that hold the right
   expansion (normalised: case, accents, punctuation); Z: tuned / base loss on the held-out tickets' answers; M:
   wall minutes of the two trainings and the two evaluations. Goals on a quiet 2-core CPU: X <= 0.1, Y >= 0.9,
   Z <= 0.8, M <= 15. It measures and asserts nothing; run it alone (two processes on two cores slow each other
   several times).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ACRONYMS = ["model=smollm2_135m", "data=acronyms_memorization"]
TICKETS = ["model=smollm2_135m", "data=tickets_sample", "train.epochs=2"]
ACRONYM_EVAL = ["eval.max_new_tokens=40"]
TICKET_EVAL = ["eval.limit=4", "eval.max_new_tokens=96"]


def llmft(module: str, *arguments: str) -> float:
    """Runs `python -m llmft.<module> arguments` with its output on ours; the wall seconds it took."""
    print(f"$ python -m llmft.{module} {' '.join(arguments)}", flush=True)
    started = time.time()
    subprocess.run([sys.executable, "-m", f"llmft.{module}", *arguments], cwd=REPO, check=True)
    return time.time() - started


def trained_and_evaluated(name: str, out: Path, launch: list[str], evaluate: list[str]) -> tuple[dict, float]:
    """The eval report of a run trained with `launch`, and the seconds training and evaluation took."""
    run_dir = out / name
    seconds = llmft("launch", *launch, f"run_dir={run_dir}")
    seconds += llmft("eval", f"run={run_dir}", *evaluate)
    return json.loads((run_dir / "eval" / "report.json").read_text()), seconds


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--keep", type=Path, help="write the runs here and keep them (default: a temporary folder)")
    parser.add_argument("--models", type=Path, help="the models folder ($LLMFT_MODELS)")
    args = parser.parse_args()
    if args.models:
        os.environ["LLMFT_MODELS"] = str(args.models)
    llmft("models", "get", "smollm2-135m-instruct")
    with tempfile.TemporaryDirectory(prefix="llmft-outcome-") as scratch:
        out = args.keep or Path(scratch)
        out.mkdir(parents=True, exist_ok=True)
        acronyms, acronym_seconds = trained_and_evaluated("acronyms", out, ACRONYMS, ACRONYM_EVAL)
        tickets, ticket_seconds = trained_and_evaluated("tickets", out, TICKETS, TICKET_EVAL)

    rates = {name: acronyms["metrics"][name]["expected_found"] for name in ("base", "finetuned")}
    losses = {name: tickets["metrics"][name]["answer_loss"] for name in ("base", "finetuned")}
    print(f"acronyms: {acronyms['num_samples']} held-out questions; right expansion, taught acronyms: base "
          f"{rates['base'].get('acronym', 0):.3f}, tuned {rates['finetuned'].get('acronym', 0):.3f}; control "
          f"acronyms (never taught): base {rates['base'].get('acronym-control', 0):.3f}, tuned "
          f"{rates['finetuned'].get('acronym-control', 0):.3f}; {acronym_seconds / 60:.1f} min")
    print(f"tickets: {tickets['num_samples']} held-out answers; loss base {losses['base']:.3f}, tuned "
          f"{losses['finetuned']:.3f} nats/token; ROUGE-L of 4 answers base "
          f"{tickets['metrics']['base']['rougeL']:.3f}, tuned {tickets['metrics']['finetuned']['rougeL']:.3f}; "
          f"{ticket_seconds / 60:.1f} min")
    taught = [s for s in acronyms["samples"] if s["id"].startswith("acronym:")]
    for sample in taught[:: max(1, len(taught) // 3)][:3]:
        question = next(m["content"] for m in reversed(sample["prompt"]) if m["role"] == "user")
        print(f"  Q: {question}\n     base:  {sample['base']['output'][:160]!r}\n     tuned: "
              f"{sample['finetuned']['output'][:160]!r}")
    print(f"outcome: acronyms_base={rates['base'].get('acronym', 0):.3f} "
          f"acronyms_tuned={rates['finetuned'].get('acronym', 0):.3f} "
          f"tickets_loss_ratio={losses['finetuned'] / losses['base']:.3f} "
          f"minutes={(acronym_seconds + ticket_seconds) / 60:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
