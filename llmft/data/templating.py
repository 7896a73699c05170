"""Apply the chat template and put labels on assistant turns only, end-of-turn token included.

The conversation is rendered turn by turn: the text before each assistant reply (rendered with
`add_generation_prompt=True`) is context, the text the reply adds (its content, the end-of-turn token and whatever
the template puts after it) is supervised. Each piece is tokenized on its own, so a mask can never drift across a
BPE merge at a boundary. This needs templates whose renderings of successive prefixes extend each other, which
holds for ChatML, Llama 2/3, Mistral and Qwen; a template that rewrites history is refused with a clear error.
"""

from __future__ import annotations

from dataclasses import dataclass

IGNORE_INDEX = -100


class TemplateError(Exception):
    pass


@dataclass
class Sample:
    input_ids: list[int]
    labels: list[int]  # IGNORE_INDEX outside assistant turns

    @property
    def num_supervised(self) -> int:
        return sum(1 for label in self.labels if label != IGNORE_INDEX)


def _render(tokenizer, messages, add_generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def tokenize_conversation(tokenizer, messages: list[dict[str, str]], system_prompt: str | None = None) -> Sample:
    if system_prompt and messages[0]["role"] != "system":
        messages = [{"role": "system", "content": system_prompt}] + messages
    input_ids: list[int] = []
    labels: list[int] = []
    rendered = ""

    def add(text: str, supervised: bool) -> None:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"] if text else []
        input_ids.extend(ids)
        labels.extend(ids if supervised else [IGNORE_INDEX] * len(ids))

    for index, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt = _render(tokenizer, messages[:index], add_generation_prompt=True)
        full = _render(tokenizer, messages[: index + 1], add_generation_prompt=False)
        if not prompt.startswith(rendered) or not full.startswith(prompt):
            raise TemplateError(
                "the chat template does not render conversations incrementally (a later turn changes earlier text); "
                "set model.fallback_chat_template to a template that does"
            )
        add(prompt[len(rendered) :], supervised=False)
        add(full[len(prompt) :], supervised=True)
        rendered = full
    return Sample(input_ids, labels)
