"""The one OpenAI-compatible client (llmft/clients/openai_compatible.py) that the acronym writer and the judge share:
over real HTTP on loopback, the key sent from the environment variable each names with `*_api_key_env`, the reply's
text, each failure as one line of its kind; the judge's older key `eval.judge_api_key` still works, with a warning."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest

from llmft.clients.openai_compatible import ChatEndpoint, EndpointError
from llmft.config.schema import EvalConfig
from llmft.config.validation import check_eval
from llmft.serve.evaluation import eval_settings


class Recorder(BaseHTTPRequestHandler):
    seen: list = []
    reply = b""
    status = 200

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        Recorder.seen.append((self.path, self.headers.get("Authorization"), body))
        self.send_response(Recorder.status)
        self.send_header("Content-Length", str(len(Recorder.reply)))
        self.end_headers()
        self.wfile.write(Recorder.reply)

    def log_message(self, *args):
        pass


@pytest.fixture()
def server():
    httpd = HTTPServer(("127.0.0.1", 0), Recorder)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    Recorder.seen, Recorder.status = [], 200
    yield f"http://127.0.0.1:{httpd.server_port}/v1"
    httpd.shutdown()


def test_a_reply_and_each_kind_of_failure(server):
    endpoint = ChatEndpoint(server, "m", "sk-1", 5.0, name="the judge")
    Recorder.reply = json.dumps({"choices": [{"message": {"content": "VERDICT: correct"}}]}).encode()
    assert endpoint.complete([{"role": "user", "content": "q"}], max_tokens=7) == "VERDICT: correct"
    path, authorization, body = Recorder.seen[-1]
    assert path == "/v1/chat/completions" and authorization == "Bearer sk-1"
    assert body == {"model": "m", "messages": [{"role": "user", "content": "q"}], "temperature": 0.0, "max_tokens": 7}
    for status, reply, kind, message in [(500, b"boom", "http", "HTTP 500 from the judge: boom"),
                                         (200, b"<html>", "reply", "the judge's reply is not JSON"),
                                         (200, b'{"choices": []}', "reply", r"no choices\[0\]\.message\.content")]:
        Recorder.status, Recorder.reply = status, reply
        with pytest.raises(EndpointError, match=message) as caught:
            endpoint.complete([{"role": "user", "content": "q"}])
        assert caught.value.kind == kind and caught.value.answered is (kind == "reply")
    with pytest.raises(EndpointError, match="cannot reach the acronym writer at http://127.0.0.1:9/v1") as caught:
        ChatEndpoint("http://127.0.0.1:9/v1", "m", None, 2.0, name="the acronym writer").complete([])
    assert caught.value.kind == "unreachable" and not caught.value.answered


def test_keys_come_from_the_variable_each_role_names(server, tmp_path, monkeypatch):
    from llmft.data.readers.acronyms import llm_conversations

    Recorder.reply = json.dumps({"choices": [{"message": {"content": json.dumps(
        [[{"role": "user", "content": "MPI?"}, {"role": "assistant", "content": "Message Passing Interface."}]])}}]}
    ).encode()
    monkeypatch.setenv("SITE_LLM_KEY", "sk-site")
    cfg = type("Acronyms", (), {"llm_url": server, "llm_model": "m", "llm_api_key_env": "SITE_LLM_KEY",
                                "llm_timeout_s": 5.0})
    assert llm_conversations("MPI", "Message Passing Interface", 1, cfg)[0][-1]["content"] == \
        "Message Passing Interface."
    assert Recorder.seen[-1][1] == "Bearer sk-site"

    for name in ("LLMFT_JUDGE_API_KEY", "OPENAI_API_KEY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("SITE_JUDGE_KEY", "sk-judge")
    (tmp_path / "config.yaml").write_text("eval:\n  judge_api_key_env: SITE_JUDGE_KEY\n")
    assert eval_settings(tmp_path, []).judge_api_key == "sk-judge"


def test_the_older_judge_key_still_works_with_a_warning(capsys):
    settings = check_eval(EvalConfig(judge_api_key="sk-inline"))
    assert settings.judge_api_key == "sk-inline"
    assert "eval.judge_api_key (the key itself) is deprecated" in capsys.readouterr().err
    check_eval(EvalConfig(judge_api_key="<redacted>"))  # a saved config's redacted key: nothing to warn about
    assert capsys.readouterr().err == ""
