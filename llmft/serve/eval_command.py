"""python -m llmft.eval run=RUN_DIR [eval.KEY=VALUE ...]: the fine-tuned model and its base on held-out data.

    python -m llmft.eval run=runs/20261122-031500-tiny-lora
    python -m llmft.eval run=RUN_DIR eval.max_new_tokens=128 eval.limit=50
    python -m llmft.eval run=RUN_DIR eval.file=questions.jsonl eval.judge_url=http://node12:8000/v1 eval.judge_model=M

Writes RUN_DIR/eval/report.json and report.md (expected phrase found, answer loss, ROUGE-L, BLEU, embedding
similarity, LLM judge; every answer). Needs the eval extra: pip install 'llmft[eval]'.
The keys, their defaults and meanings are `EvalConfig` in llmft/config/schema.py (docs/configuration.md); the run's
own `eval` keys are the defaults. The work is `run_eval` in llmft/serve/evaluation.py.
"""

from __future__ import annotations

import sys
import textwrap

from llmft.config.arguments import UsageError, parse_arguments, valid_keys
from llmft.errors import run_command
from llmft.serve.evaluation import EvalArgs, metric_rows, run_eval

USAGE = "python -m llmft.eval run=RUN_DIR [eval.KEY=VALUE ...]"


def main(argv: list[str] | None = None) -> int:
    keys = textwrap.fill(" ".join(valid_keys(EvalArgs)), 118, initial_indent="  ", subsequent_indent="  ")
    return run_command(evaluate_run, argv, f"{__doc__.strip()}\n\nKeys (key=value):\n{keys}")


def evaluate_run(argv: list[str]) -> int:
    args = parse_arguments(argv, EvalArgs, USAGE)
    if not args.run:
        raise UsageError(f"say which run: {USAGE}")
    report = run_eval(args.run, [a for a in argv if not a.startswith("run=")])
    names = {"base": "base", "finetuned": "fine-tuned"}
    models = list(report["metrics"])
    rows = [("metric", [names[m] for m in models])] + metric_rows(report)
    width = max(len(metric) for metric, _ in rows)
    print(f"eval: {report['num_samples']} examples ({report['source'].get('split') or report['source'].get('file')})")
    for metric, values in rows:
        print(f"  {metric:<{width}}  " + "  ".join(f"{v:>12}" if len(v) <= 12 else v for v in values))
    losses = [report["metrics"][m].get("answer_loss") for m in ("base", "finetuned")]
    if all(losses) and losses[0] > 0:
        print(f"  answer loss, fine-tuned / base: {losses[1] / losses[0]:.3f}")
    for metric, reason in report["skipped_metrics"].items():
        print(f"  {metric}: {reason}")
    print(f"report: {report['paths']['markdown']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
