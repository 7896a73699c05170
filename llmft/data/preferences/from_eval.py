"""`python -m llmft.data from-eval RUN_DIR [out=FILE] [kto_out=FILE]`: preference data from a run's evaluation.

`python -m llmft.eval run=RUN_DIR` writes RUN_DIR/eval/report.json (llmft/serve/evaluation.py): per example its
id (the ticket), the prompt (the conversation before the reference, the run's system prompt first), the reference
(the support team's answer), the fine-tuned model's answer and, with a judge (eval.judge_url), its verdict:
correct, partially correct or incorrect. This turns it into training data for the next step:

- `out` (data.format=preference_jsonl): one DPO pair per answer judged incorrect, the reference as chosen and the
  model's answer as rejected;
- `kto_out` (data.format=kto_jsonl): every answer judged correct (label true) or incorrect (label false).

A `partially correct` answer goes to neither file: half right is neither an answer to imitate nor one to push
away, and a KTO label is a plain yes or no. An answer without a verdict (the judge failed on it) is skipped, and
so is a correct answer cut at eval.max_new_tokens (as a desirable completion it would teach stopping mid-sentence).
Every record keeps the example's id (the ticket) behind the prefix `eval:`, so the records of one ticket stay in
one split (see ID_PREFIX). Naming neither file writes both, as RUN_DIR/eval/preferences.jsonl and
RUN_DIR/eval/kto.jsonl; naming one writes that one. For each file written it prints the whole command that trains on
it from the evaluated run (`init_from=RUN_DIR`: DPO after SFT starts from the SFT model, which is also its reference).

This module reads the report's JSON and imports nothing from llmft.serve (data sits below serve).
"""

from __future__ import annotations

import json
import os
import shlex
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from llmft.config.arguments import UsageError, parse_arguments
from llmft.config.data_schema import DataFormat
from llmft.data.readers.records import DataError
from llmft.rundir.files import read_config
from llmft.rundir.layout import eval_dir, eval_report_path, is_run_dir

USAGE = "python -m llmft.data from-eval RUN_DIR [out=FILE] [kto_out=FILE]"
VERDICTS = ("correct", "partially correct", "incorrect")
# The evaluated examples are the run's held-out split: their ids all hash below data.validation_fraction, so kept
# as they are, a preference run with the same fraction would find every pair in its validation split and none to
# train on. The prefix draws the split of the new data afresh; the pairs of one ticket still share one id.
ID_PREFIX = "eval:"
JUDGE_HINT = "eval.judge_url=URL eval.judge_model=NAME"


@dataclass
class FromEvalArgs:
    run: Optional[str] = None  # the run directory (or its first bare argument)
    out: Optional[str] = None  # DPO pairs, preference_jsonl
    kto_out: Optional[str] = None  # KTO examples, kto_jsonl


def report_path_of(run: Path) -> Path:
    """The evaluation report of `run`: RUN_DIR/eval/report.json, the folder of eval.output_dir when the run's
    config sets it, a folder holding report.json, or the report itself. DataError says what to run when none."""
    if not run.exists():
        raise DataError(f"{run} does not exist: give the run directory that `python -m llmft.eval run=RUN_DIR` "
                        f"evaluated.")
    if run.is_file():
        return run
    candidates = [eval_report_path(run), run / "report.json"]  # a run directory, or the folder of a report
    if is_run_dir(run):
        output_dir = read_config(run).eval.output_dir
        if output_dir:
            candidates.insert(0, eval_report_path(run, output_dir))
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise DataError(f"no evaluation report in {run} (no eval/report.json): evaluate the run first with "
                    f"`python -m llmft.eval run={run} {JUDGE_HINT}`.")


def judged_samples(report: dict, path: Path, run: Path) -> list[dict]:
    """The report's samples; DataError when the judge gave no verdict at all."""
    samples = report.get("samples")
    if not isinstance(samples, list):
        raise DataError(f"{path} is not an llmft evaluation report (no \"samples\" list): give the folder that "
                        f"`python -m llmft.eval` wrote.")
    verdicts = [(s.get("finetuned") or {}).get("judge") for s in samples]
    if not any(v and v.get("verdict") for v in verdicts):
        skipped = report.get("skipped_metrics", {}).get("judge")
        errors = [v.get("error") for v in verdicts if v and v.get("error")]
        reason = skipped or (f"every judge request failed, e.g. {errors[0]}" if errors else "no example was judged")
        raise DataError(f"{path} has no judge verdicts ({reason}): evaluate again with a judge, "
                        f"`python -m llmft.eval run={run} {JUDGE_HINT}`.")
    return samples


@dataclass
class Converted:
    pairs: list[dict]
    examples: list[dict]
    verdicts: Counter  # correct / partially correct / incorrect / no verdict
    cut_correct: int  # correct answers cut at max_new_tokens, left out of the KTO examples


def convert(samples: list[dict]) -> Converted:
    """DPO pairs and KTO examples of the evaluation samples (see the module docstring for the rules)."""
    result = Converted([], [], Counter(), 0)
    for sample in samples:
        answer = sample["finetuned"]
        verdict = (answer.get("judge") or {}).get("verdict")
        result.verdicts[verdict or "no verdict"] += 1
        if verdict not in ("correct", "incorrect"):
            continue
        common = {"id": f"{ID_PREFIX}{sample['id']}", "source": sample.get("source"), "prompt": sample["prompt"]}
        judge_reason = answer["judge"].get("reason")
        if verdict == "incorrect":
            result.pairs.append({**common, "chosen": sample["reference"], "rejected": answer["output"],
                                 "judge_reason": judge_reason})
        if verdict == "correct" and not answer.get("stopped", True):
            result.cut_correct += 1
            continue
        result.examples.append({**common, "completion": answer["output"], "label": verdict == "correct",
                                "judge_reason": judge_reason})
    return result


def write_jsonl(path: Path, records: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.with_name(f".{path.name}.tmp")
    staging.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    os.replace(staging, path)


def from_eval(argv: list[str], log=print) -> Converted:
    """The command: parse `argv`, read the report, write the files, say what was written."""
    bare = [a for a in argv if "=" not in a]
    if len(bare) > 1:
        raise UsageError(f"one run directory, not {len(bare)} ({' '.join(bare)}): {USAGE}.")
    args = parse_arguments([a for a in argv if "=" in a], FromEvalArgs, USAGE)
    if bare and args.run:
        raise UsageError(f"the run directory given twice ({bare[0]} and run={args.run}): {USAGE}.")
    if not (bare or args.run):
        raise UsageError(f"no run directory: {USAGE}.")
    run = Path(os.path.expandvars(bare[0] if bare else args.run)).expanduser()
    path = report_path_of(run)
    run_dir = path.parent.parent if path.parent == eval_dir(path.parent.parent) else path.parent
    if is_run_dir(run_dir):  # answers about private tickets: no more readable than the run
        os.umask(int(str(read_config(run_dir).umask), 8))
    try:
        report = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as error:
        raise DataError(f"{path} is not JSON ({error}): evaluate the run again.") from None
    converted = convert(judged_samples(report, path, run))
    out, kto_out = args.out, args.kto_out
    if out is None and kto_out is None:
        out, kto_out = str(path.parent / "preferences.jsonl"), str(path.parent / "kto.jsonl")
    verdicts = converted.verdicts
    log(f"read {sum(verdicts.values())} answers of the fine-tuned model from {path}: "
        + ", ".join(f"{verdicts[v]} {v}" for v in (*VERDICTS, "no verdict") if verdicts[v] or v in VERDICTS))
    for target, records, what, data_format in ((out, converted.pairs, "DPO pairs", DataFormat.preference_jsonl),
                                              (kto_out, converted.examples, "KTO examples", DataFormat.kto_jsonl)):
        if target is None:
            continue
        target_path = Path(os.path.expandvars(target)).expanduser()
        if not records:
            log(f"no {what} ({'no answer judged incorrect' if data_format is DataFormat.preference_jsonl else 'no answer judged correct or incorrect'}): "
                f"{target_path} not written")
            continue
        write_jsonl(target_path, records)
        detail = ""
        if data_format is DataFormat.kto_jsonl:
            desirable = sum(r["label"] for r in records)
            detail = f": {desirable} desirable, {len(records) - desirable} undesirable" + (
                f" ({converted.cut_correct} correct answers cut at max_new_tokens left out)"
                if converted.cut_correct else "")
        log(f"wrote {len(records)} {what} to {target_path}{detail}; "
            f"{training_command(run if is_run_dir(run) else run_dir, data_format, target_path)}")
    return converted


def training_command(run_dir: Path, data_format: DataFormat, path: Path) -> str:
    """How to train on the written file: the whole command, starting from the evaluated run (init_from: its adapter
    or weights, on its model, so DPO's reference is that model), on its cluster when it ran on one. Without a run
    directory (a report given alone), the keys to add."""
    objective = "dpo" if data_format is DataFormat.preference_jsonl else "kto"
    data = [f"objective={objective}", f"data={data_format.value}", f"data.path={shlex.quote(str(path.resolve()))}"]
    if not is_run_dir(run_dir):
        return f"train on them with {' '.join(data)} init_from=RUN_DIR (the run that was evaluated)"
    cfg = read_config(run_dir)
    model = [] if cfg.model.name == "tiny" else [f"model={cfg.model.name}"]  # tiny: the default
    cluster = [] if cfg.cluster is None else [f"+cluster={cfg.cluster.name}", f"cluster.gpu={cfg.cluster.gpu}"] + \
        ([f"cluster.account={shlex.quote(cfg.cluster.account)}"] if cfg.cluster.account else [])
    command = ["python -m llmft.launch", *model, *data, f"init_from={shlex.quote(str(run_dir.resolve()))}", *cluster]
    return f"train on them from this run with: {' '.join(command)}"
