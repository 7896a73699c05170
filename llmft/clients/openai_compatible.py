"""One small client of an OpenAI-compatible chat endpoint (vLLM, llama.cpp's server, Ollama, OpenAI itself):
`POST {url}/chat/completions`, the reply's text or an `EndpointError` saying what went wrong in one line.

    endpoint = ChatEndpoint(url, model, api_key_of(cfg_key_env, ...), timeout_s, name="the judge")
    text = endpoint.complete(messages, temperature=0, max_tokens=256)

Its users name their keys alike: `<role>_url`, `<role>_model`, `<role>_api_key_env` (the name of the environment
variable holding the key: a key never sits in a config file) and `<role>_timeout_s`: `data.acronyms.llm_*` and
`eval.judge_*`. Hand-written on urllib rather than the `openai` package: two fields of one endpoint, on login and
compute nodes that may have nothing else installed.
"""

from __future__ import annotations

import http.client
import json
import os
import socket
import urllib.error
import urllib.request
from dataclasses import dataclass


class EndpointError(Exception):
    """`kind`: "http" (an error status), "timeout", "unreachable", "connection" (no answer at all), or "reply" (an
    answer that holds no text)."""

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind

    @property
    def answered(self) -> bool:
        """An HTTP answer came back with a body (even a useless one): the endpoint is alive."""
        return self.kind == "reply"


def chat_completions_url(base_url: str) -> str:
    url = base_url.rstrip("/")
    return url if url.endswith("/chat/completions") else url + "/chat/completions"


def api_key_of(*env_names: str | None) -> str | None:
    """The value of the first of these environment variables that is set and not empty."""
    for name in env_names:
        if name and os.environ.get(name):
            return os.environ[name]
    return None


@dataclass
class ChatEndpoint:
    url: str
    model: str
    api_key: str | None = None
    timeout_s: float = 60.0
    name: str = "the endpoint"  # in messages: "HTTP 500 from the judge"

    def complete(self, messages: list[dict[str, str]], temperature: float = 0.0,
                 max_tokens: int | None = None) -> str:
        body = {"model": self.model, "messages": messages, "temperature": temperature}
        if max_tokens is not None:
            body["max_tokens"] = max_tokens
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        request = urllib.request.Request(chat_completions_url(self.url), data=json.dumps(body).encode(),
                                         headers=headers, method="POST")
        timeout = self.timeout_s
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                raw = response.read()
        except urllib.error.HTTPError as error:
            detail = " ".join(error.read()[:300].decode("utf-8", "replace").split())
            raise EndpointError("http", f"HTTP {error.code} from {self.name}{': ' + detail if detail else ''}") \
                from None
        except (TimeoutError, socket.timeout):
            raise EndpointError("timeout", f"timeout: no answer from {self.name} within {timeout:g} s") from None
        except urllib.error.URLError as error:
            if isinstance(error.reason, (TimeoutError, socket.timeout)):
                raise EndpointError("timeout", f"timeout: no answer from {self.name} within {timeout:g} s") from None
            raise EndpointError("unreachable", f"cannot reach {self.name} at {self.url}: {error.reason}") from None
        except (OSError, http.client.HTTPException) as error:
            raise EndpointError("connection", f"the connection to {self.name} failed: {type(error).__name__}: "
                                              f"{error}") from None
        try:
            payload = json.loads(raw)
        except ValueError:
            raise EndpointError("reply", f"{possessive(self.name)} reply is not JSON: "
                                         f"{raw[:200].decode('utf-8', 'replace')!r}") from None
        try:
            content = payload["choices"][0]["message"]["content"]
        except (KeyError, IndexError, TypeError):
            raise EndpointError("reply", f"{possessive(self.name)} reply has no choices[0].message.content: "
                                         f"{json.dumps(payload)[:200]}") from None
        if not isinstance(content, str):
            raise EndpointError("reply", f"{possessive(self.name)} message content is not text: "
                                         f"{json.dumps(content)[:200]}")
        return content


def possessive(name: str) -> str:
    return name + "'" if name.endswith("s") else name + "'s"
