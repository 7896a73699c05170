"""python -m llmft.data prepare|inspect [options] [overrides] | from-eval RUN_DIR [out=FILE] [kto_out=FILE]

    prepare    read, clean, scrub, tokenize and pack `data=` for `model=`, into data.output_dir
    inspect    print a few samples with the supervised tokens highlighted
    from-eval  DPO pairs (out) and KTO examples (kto_out) from the judged answers of a run's evaluation

Options: --cfg (print the resolved data config and stop); inspect: --num N (3), --split NAME (train), --no-color.
Overrides are Hydra's, as for `python -m llmft.launch`: data=tickets_sample data.output_dir=$WORK/tickets-v1 ...

Examples:
  python -m llmft.data prepare data=tickets_sample_jsonl data.output_dir=$WORK/tickets-v1
  python -m llmft.data prepare data=tickets data.format=email data.path=export.mbox \\
      data.tickets.staff_domains=support.example.org model=mistral_7b data.output_dir=$WORK/tickets-v1
  python -m llmft.data inspect data=tickets_sample_jsonl data.prepared=$WORK/tickets-v1 --num 2
  python -m llmft.data from-eval RUN_DIR out=pairs.jsonl kto_out=kto.jsonl
"""

from __future__ import annotations

import argparse
import os
import sys

from omegaconf import OmegaConf
from omegaconf.errors import MissingMandatoryValue

from llmft.config.compose import compose, config_help
from llmft.config.validation import validate
from llmft.data.preferences.dpo_kto import summary_line
from llmft.data.readers.records import skipped_lines
from llmft.errors import ConfigError, closed_pipe_ends_quietly, run_command

USAGE = __doc__.split("\n\n")[0].strip()


def summary_lines(report: dict) -> list[str]:
    noun = {"preference_jsonl": "pairs", "kto_jsonl": "examples"}.get(report["format"], "conversations")
    lines = [
        f"read {report['records_read']} records from {report['path']} ({report['format']}): "
        f"{report['conversations_read']} {noun}, {report['num_conversations']} kept",
    ]
    lines += skipped_lines(report.get("skipped", []), report.get("num_skipped"))
    dropped = {**report.get("reader_dropped", {}), **report.get("dropped", {}), **report.get("samples_dropped", {})}
    if dropped:
        lines.append("dropped: " + ", ".join(f"{n} {reason}" for reason, n in dropped.items()))
    if report.get("pii_replacements"):
        lines.append("replaced: " + ", ".join(f"{n} {kind}" for kind, n in report["pii_replacements"].items()))
    for source in report.get("sources", []):  # a mixture
        lines.append(f"source {source['name']}: weight {source['weight']:.3g}, {source['samples']} of the training "
                     f"samples ({source['share']:.1%}; {source['available_samples']} available, each drawn "
                     f"{source['times_each']:.2f} times on average), {source.get('validation_samples', 0)} validation")
    if "sample_kind" in report:  # preference_jsonl, kto_jsonl
        return lines + [summary_line(report)]
    fractions = report["useful_token_fraction"]
    lines.append(
        "samples: " + ", ".join(f"{n} {split}" for split, n in report["samples"].items())
        + f"; {report['tokens']['train']} train tokens, {report['supervised_tokens']['train']} supervised; "
        f"useful tokens {fractions['packed']:.1%} packed vs {fractions['padded']:.1%} padded to {report['max_seq_len']}"
    )
    return lines


def main(argv: list[str] | None = None) -> int:
    return closed_pipe_ends_quietly(lambda: _main(argv))  # `--help | head` too


def _main(argv: list[str] | None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="python -m llmft.data", usage=USAGE, add_help=True,
                                     description=__doc__.split("\n\n", 1)[1].strip(), epilog=config_help(),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=["prepare", "inspect", "from-eval"])
    parser.add_argument("--cfg", action="store_true", help="print the resolved data config and stop")
    parser.add_argument("--num", type=int, default=3, help="inspect: how many samples")
    parser.add_argument("--split", default="train", help="inspect: which split")
    parser.add_argument("--no-color", action="store_true", help="inspect: brackets instead of colour")
    args, overrides = parser.parse_known_args(argv)
    return run_command(lambda overrides_: run(args, overrides_), overrides)


def run(args, overrides: list[str]) -> int:
    if args.command == "from-eval":  # reads a run's evaluation report, composes no config
        from llmft.data.preferences.from_eval import from_eval

        from_eval(overrides)
        return 0
    cfg = compose(overrides)
    if args.command == "inspect" and cfg.data.prepared:  # DIR's own data settings, or those given checked
        from llmft.data.prepare.prepared_source import prepared_for_launch

        cfg = prepared_for_launch(cfg, overrides)
    if args.cfg:
        print(OmegaConf.to_yaml(cfg.data, resolve=True))
        return 0
    try:
        validate(cfg, training=False)  # preparing data needs no objective=
    except MissingMandatoryValue as error:
        key = getattr(error, "full_key", None) or "a key"
        raise ConfigError(f"bad config: {key} is not set: add {key}=... to the command.") from None
    if args.command == "prepare":
        from llmft.data.prepare.command import prepare

        os.umask(int(str(cfg.umask), 8))  # prepared tickets are no more readable than a run (default 027)
        report = prepare(cfg, overrides)
        if report.get("reused_prepared"):
            print(f"llmft: {report['output_dir']} is up to date (same conversations, tokenizer and settings).")
        else:
            print("\n".join(summary_lines(report)))
            audit = {"preference_pairs": "pairs", "kto_examples": "examples"}.get(report.get("sample_kind"),
                                                                                  "conversations")
            print(f"wrote {report['output_dir']} (report.json, dataset/, *.{audit}.jsonl, lengths.png)")
    else:
        from llmft.data.prepare.inspect_samples import inspect

        color = sys.stdout.isatty() and not args.no_color
        print(inspect(cfg, args.num, args.split, color))
    return 0


if __name__ == "__main__":
    sys.exit(main())
