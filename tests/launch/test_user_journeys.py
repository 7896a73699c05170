"""USER-STORIES.md's journeys 1, 5 and 6 as a new user walks them on a CPU, each step the command the docs show:
prepare a helpdesk export -> train on the prepared folder alone -> evaluate with a judge -> turn the judged answers
into preference pairs -> DPO from the SFT run, with the command from-eval prints -> export GGUF without out=.
Each step checks that it used what the previous one made, never something else."""

from __future__ import annotations

import json
import math
import shlex
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from support.runs import read_metrics, run_llmft


class Judge:
    """An OpenAI-compatible judge on loopback that finds every answer incorrect (the tiny model answers gibberish)."""

    def __enter__(self):
        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):  # noqa: N802 (http.server's naming)
                self.rfile.read(int(self.headers["Content-Length"]))
                body = json.dumps({"choices": [{"message": {"content": "VERDICT: incorrect\nREASON: not the fix"}}]})
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body.encode())

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        return self

    def __exit__(self, *exc):
        self.server.shutdown()


def ok(result) -> str:
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    return result.stdout + result.stderr


@pytest.mark.slow
def test_prepare_train_evaluate_align_and_take_home(tmp_path):
    env = {"LLMFT_RUNS_ROOT": str(tmp_path / "runs")}
    prepared = tmp_path / "tickets-v1"
    # journey 1: the export prepared on the login node (the bundled mbox; its staff domain given bare, no brackets)
    ok(run_llmft("data", "prepare", "data=tickets", "data.format=email",
                 f"data.path={Path(__file__).parents[2] / 'llmft/data/samples/tickets_sample.mbox'}",
                 "data.tickets.staff_domains=support.example-hpc.fr", f"data.output_dir={prepared}", env=env))
    manifest = json.loads((prepared / "manifest.json").read_text())

    # ... trained on the prepared folder alone: its own data settings, its samples
    sft = tmp_path / "sft"
    printed = ok(run_llmft("launch", f"data.prepared={prepared}", "train.max_steps=12", "train.eval_every=12",
                           "peft.dropout=0", f"run_dir={sft}", env=env))
    assert f"data.prepared={prepared}: its own data settings" in printed
    config = (sft / "config.yaml").read_text()
    assert "tickets_sample.mbox" in config and "support.example-hpc.fr" in config
    summary = json.loads((sft / "summary.json").read_text())
    assert summary["status"] == "completed"
    assert summary["data"]["fingerprint"]["conversations"] == manifest["fingerprint"]["conversations"]

    # ... evaluated, base and tuned side by side, by a judge
    with Judge() as judge:
        ok(run_llmft("eval", f"run={sft}", "eval.max_new_tokens=8", "eval.embedding_model=off",
                     f"eval.judge_url={judge.url}", "eval.judge_model=judge", env=env))
    report = json.loads((sft / "eval" / "report.json").read_text())
    assert report["num_samples"] > 0 and report["metrics"]["finetuned"]["judge"]["incorrect"] == report["num_samples"]

    # journey 5: the judged answers become preference pairs; from-eval prints the DPO command that starts from the run
    printed = ok(run_llmft("data", "from-eval", str(sft), env=env))
    command = next(line.split("train on them from this run with: ", 1)[1] for line in printed.splitlines()
                   if "train on them from this run with: " in line and "objective=dpo" in line)
    assert f"init_from={sft}" in command
    dpo = tmp_path / "dpo"
    arguments = shlex.split(command)[3:] + ["train.max_steps=4", "train.log_every=1", "train.eval_every=4",
                                            f"run_dir={dpo}"]
    printed = ok(run_llmft("launch", *arguments, env=env))
    assert f"init_from: this run starts from {sft}" in printed
    provenance = json.loads((dpo / "provenance.json").read_text())
    assert provenance["init_from"]["run_dir"] == str(sft)
    first = read_metrics(dpo)[0]
    # the policy starts as the SFT model (no dropout: the SFT run had none) and so does its reference: ln 2
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-4), first

    # journey 6: one GGUF file to take home, where the run keeps its exports
    ok(run_llmft("export", f"run={dpo}", "format=gguf", env=env))
    files = list((dpo / "export" / "gguf").glob("*.gguf"))
    assert len(files) == 1 and files[0].stat().st_size > 0
