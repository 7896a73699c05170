"""Apply the chat template and put labels on assistant turns only, end-of-turn token included.

The conversation is rendered turn by turn: the text before each assistant reply (rendered with
`add_generation_prompt=True`) is context; the text the reply adds, up to and including the end-of-turn token, is
supervised; what the template puts after that token (ChatML's newline) is context again. Each piece is tokenized
on its own, exactly as inference tokenizes the prompt and then generates, so a mask can never drift across a BPE
merge at a boundary. This needs templates whose renderings of successive prefixes extend each other, which holds
for ChatML, Llama 2/3, Mistral and Qwen 2.5; a template that rewrites history is refused with a clear error.

All pieces of all conversations go to the tokenizer in one batched call: the Rust tokenizer then uses every core.
"""

from __future__ import annotations

from dataclasses import dataclass

from llmft.errors import UserError

IGNORE_INDEX = -100


class TemplateError(UserError):
    pass


@dataclass
class Sample:
    input_ids: list[int]
    labels: list[int]  # IGNORE_INDEX outside assistant turns
    # A packed row: the lengths of the samples laid end to end in it (positions restart, attention never crosses).
    # None: one sample.
    seq_lengths: list[int] | None = None

    @property
    def num_supervised(self) -> int:
        return sum(1 for label in self.labels if label != IGNORE_INDEX)


def with_system_prompt(messages: list[dict[str, str]], system_prompt: str | None) -> list[dict[str, str]]:
    if system_prompt and messages and messages[0]["role"] != "system":
        return [{"role": "system", "content": system_prompt}] + messages
    return messages


def _render(tokenizer, messages, add_generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def render_pieces(tokenizer, messages: list[dict[str, str]], end_of_turn: str) -> list[tuple[str, bool]]:
    """The rendered conversation as (text, supervised) pieces whose concatenation is the full rendering."""
    pieces: list[tuple[str, bool]] = []
    rendered = ""
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
        pieces.append((prompt[len(rendered) :], False))
        reply = full[len(prompt) :]
        end = reply.find(end_of_turn)
        end = len(reply) if end < 0 else end + len(end_of_turn)
        pieces += [(reply[:end], True), (reply[end:], False)]
        rendered = full
    return [(text, supervised) for text, supervised in pieces if text]


def tokenize_many(tokenizer, conversations: list[list[dict[str, str]]], system_prompt: str | None = None,
                  end_of_turn: str | None = None) -> list[Sample]:
    end_of_turn = end_of_turn or tokenizer.eos_token
    all_pieces = [render_pieces(tokenizer, with_system_prompt(m, system_prompt), end_of_turn) for m in conversations]
    texts = [text for pieces in all_pieces for text, _ in pieces]
    token_ids = tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []
    samples, position = [], 0
    for pieces in all_pieces:
        input_ids: list[int] = []
        labels: list[int] = []
        for _, supervised in pieces:
            ids = token_ids[position]
            position += 1
            input_ids += ids
            labels += ids if supervised else [IGNORE_INDEX] * len(ids)
        if labels:
            labels[0] = IGNORE_INDEX  # nothing predicts a sample's first token; packed, the previous sample would
        samples.append(Sample(input_ids, labels))
    return samples


def tokenize_conversation(tokenizer, messages: list[dict[str, str]], system_prompt: str | None = None,
                          end_of_turn: str | None = None) -> Sample:
    return tokenize_many(tokenizer, [messages], system_prompt, end_of_turn)[0]


def windows(tokenizer, messages: list[dict[str, str]], max_len: int, system_prompt: str | None,
            end_of_turn: str | None) -> tuple[list[Sample], int]:
    """A conversation too long for `max_len` as windows of whole exchanges (user turn + assistant reply) that fit.

    Each window keeps the system prompt and ends on an assistant reply, so it always has supervised tokens.
    Returns the windows and the number of exchanges that do not fit even alone (dropped, for the report).
    """
    messages = with_system_prompt(messages, system_prompt)
    system = [m for m in messages[:1] if m["role"] == "system"]
    exchanges: list[list[dict[str, str]]] = []
    for message in messages[len(system) :]:
        if not exchanges or (message["role"] == "user" and exchanges[-1][-1]["role"] == "assistant"):
            exchanges.append([])
        exchanges[-1].append(message)
    samples, dropped, start = [], 0, 0
    while start < len(exchanges):
        best, end = None, start + 1
        while end <= len(exchanges):
            candidate = tokenize_conversation(tokenizer, system + [m for e in exchanges[start:end] for m in e],
                                              None, end_of_turn)
            if len(candidate.input_ids) > max_len:
                break
            best, end = (candidate, end), end + 1
        if best is None:
            dropped += 1
            start += 1
        else:
            samples.append(best[0])
            start = best[1]
    return [s for s in samples if s.num_supervised], dropped
