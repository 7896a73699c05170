"""Apply the chat template and put labels on assistant turns only, end-of-turn token included.

The conversation is rendered turn by turn: the text before each assistant reply (rendered with
`add_generation_prompt=True`) is context; the text the reply adds, up to and including the end-of-turn token, is
supervised; what the template puts after that token (ChatML's newline) is context again. Each piece is tokenized
on its own, exactly as inference tokenizes the prompt and then generates, so a mask can never drift across a BPE
merge at a boundary. This needs templates whose renderings of successive prefixes extend each other, which holds
for ChatML, Llama 2/3, Mistral and Qwen 2.5; a template that rewrites history is refused with a clear error.

All pieces of all conversations go to the tokenizer in one batched call: the Rust tokenizer then uses every core.
Rendering and tokenizing call the compiled template and the Rust tokenizer directly (`ChatRenderer`, `token_ids`)
when they give what `apply_chat_template` and `tokenizer(...)` give: those wrappers accept any message object and
return dictionaries of every field, which cost more than the work itself on support-ticket sized turns.
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
        return len(self.labels) - self.labels.count(IGNORE_INDEX)


def with_system_prompt(messages: list[dict[str, str]], system_prompt: str | None) -> list[dict[str, str]]:
    if system_prompt and messages and messages[0]["role"] != "system":
        return [{"role": "system", "content": system_prompt}] + messages
    return messages


class ChatRenderer:
    """`tokenizer.apply_chat_template(messages, tokenize=False, ...)` for plain {"role", "content": str} messages.

    Hand-written because the wrapper copies and normalizes every message (any object, None values, reasoning
    fields) before each render, about 2/3 of the time of a turn-by-turn rendering. This renders transformers' own
    compiled template (cached by template text) with the same variables (the special tokens); the first
    conversation is also rendered through `apply_chat_template`, and any difference (another transformers release
    rendering otherwise) sends every conversation through it."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.compiled, self.variables, self.checked = None, {}, False
        try:
            from transformers.utils.chat_template_utils import _compile_jinja_template

            self.compiled = _compile_jinja_template(tokenizer.get_chat_template())
            self.variables = {key: value for key, value in tokenizer.special_tokens_map.items()
                              if isinstance(value, str)}
        except Exception:  # (a transformers without these internals, or no template: the wrapper says what is wrong)
            self.compiled = None

    def __call__(self, messages: list[dict[str, str]], add_generation_prompt: bool) -> str:
        if self.compiled is not None:
            direct = self.compiled.render(messages=messages, tools=None, documents=None,
                                          add_generation_prompt=add_generation_prompt, **self.variables)
            if self.checked:
                return direct
            self.checked = True
            if direct == self._wrapper(messages, add_generation_prompt):
                return direct
            self.compiled = None
        return self._wrapper(messages, add_generation_prompt)

    def _wrapper(self, messages, add_generation_prompt: bool) -> str:
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def token_ids(tokenizer, texts: list[str]) -> list[list[int]]:
    """`tokenizer(texts, add_special_tokens=False)["input_ids"]`, straight from the Rust tokenizer when it is set as
    that call would set it (no truncation, no padding, the same special-token splitting): the call also builds
    attention masks and a dictionary per text, a quarter of the tokenizing time here."""
    backend = getattr(tokenizer, "_tokenizer", None) if getattr(tokenizer, "is_fast", False) else None
    if backend is None or backend.truncation is not None or backend.padding is not None or \
            backend.encode_special_tokens != bool(getattr(tokenizer, "split_special_tokens", False)):
        return tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []
    encode = getattr(backend, "encode_batch_fast", backend.encode_batch)  # (fast: no offsets; tokenizers >= 0.21)
    return [encoding.ids for encoding in encode(texts, add_special_tokens=False)]


def render_pieces(tokenizer, messages: list[dict[str, str]], end_of_turn: str, renderer: ChatRenderer | None = None
                  ) -> list[tuple[str, bool]]:
    """The rendered conversation as (text, supervised) pieces whose concatenation is the full rendering."""
    render = renderer or ChatRenderer(tokenizer)
    pieces: list[tuple[str, bool]] = []
    rendered = ""
    for index, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt = render(messages[:index], add_generation_prompt=True)
        full = render(messages[: index + 1], add_generation_prompt=False)
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
                  end_of_turn: str | None = None, renderer: ChatRenderer | None = None) -> list[Sample]:
    end_of_turn = end_of_turn or tokenizer.eos_token
    renderer = renderer or ChatRenderer(tokenizer)
    all_pieces = [render_pieces(tokenizer, with_system_prompt(m, system_prompt), end_of_turn, renderer)
                  for m in conversations]
    ids_of_piece = token_ids(tokenizer, [text for pieces in all_pieces for text, _ in pieces])
    samples, position = [], 0
    for pieces in all_pieces:
        input_ids: list[int] = []
        labels: list[int] = []
        for _, supervised in pieces:
            ids = ids_of_piece[position]
            position += 1
            input_ids += ids
            labels += ids if supervised else [IGNORE_INDEX] * len(ids)
        if labels:
            labels[0] = IGNORE_INDEX  # nothing predicts a sample's first token; packed, the previous sample would
        samples.append(Sample(input_ids, labels))
    return samples


def tokenize_conversation(tokenizer, messages: list[dict[str, str]], system_prompt: str | None = None,
                          end_of_turn: str | None = None, renderer: ChatRenderer | None = None) -> Sample:
    return tokenize_many(tokenizer, [messages], system_prompt, end_of_turn, renderer)[0]


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
    renderer = ChatRenderer(tokenizer)
    while start < len(exchanges):
        best, end = None, start + 1
        while end <= len(exchanges):
            candidate = tokenize_conversation(tokenizer, system + [m for e in exchanges[start:end] for m in e],
                                              None, end_of_turn, renderer)
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
