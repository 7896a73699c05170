"""python -m llmft.eval run=RUN_DIR [eval.KEY=VALUE ...]: the fine-tuned model and its base on held-out data.

    python -m llmft.eval run=runs/20261122-031500-tiny-lora
    python -m llmft.eval run=RUN_DIR eval.max_new_tokens=128 eval.limit=50
    python -m llmft.eval run=RUN_DIR eval.file=questions.jsonl eval.judge_url=http://node12:8000/v1 eval.judge_model=M

Writes RUN_DIR/eval/report.json and report.md (ROUGE-L, BLEU, embedding similarity, LLM judge; every answer).
The keys and their defaults are `EvalConfig` in llmft/evaluate.py; the work is `run_eval` there.
"""

from __future__ import annotations

import sys

USAGE = "python -m llmft.eval run=RUN_DIR [eval.KEY=VALUE ...]"


def main(argv: list[str] | None = None) -> int:
    from llmft.evaluate import EvalArgs, EvalError, metric_rows, run_eval
    from llmft.inference import UsageError, command_arguments, parse_arguments

    argv = command_arguments(argv, __doc__.strip())
    if argv is None:
        return 0

    try:
        args = parse_arguments(argv, EvalArgs, USAGE)
        if not args.run:
            raise UsageError(f"say which run: {USAGE}")
        report = run_eval(args.run, [a for a in argv if not a.startswith("run=")])
    except (UsageError, EvalError) as error:
        print(f"llmft: {error}", file=sys.stderr)
        return 2
    names = {"base": "base", "finetuned": "fine-tuned"}
    models = list(report["metrics"])
    rows = [("metric", [names[m] for m in models])] + metric_rows(report)
    width = max(len(metric) for metric, _ in rows)
    print(f"eval: {report['num_samples']} examples ({report['source'].get('split') or report['source'].get('file')})")
    for metric, values in rows:
        print(f"  {metric:<{width}}  " + "  ".join(f"{v:>12}" if len(v) <= 12 else v for v in values))
    for metric, reason in report["skipped_metrics"].items():
        print(f"  {metric}: {reason}")
    print(f"report: {report['paths']['markdown']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
