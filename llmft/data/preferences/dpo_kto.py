"""Preference data for DPO and KTO: records of a prompt and judged completions, read, cleaned and tokenized.

Two input formats (`data.format`), one record a line:

    preference_jsonl  {"id"?, "system"?, "prompt": [messages] | "text", "chosen": [messages] | "text",
                       "rejected": [messages] | "text"}                      (TRL's conversational preference format)
    kto_jsonl         {"id"?, "system"?, "prompt": ..., "completion": [messages] | "text", "label": true | false}

A text prompt is one user turn; a text completion one assistant turn. A prompt is messages (a system message first
at most) ending with the user turn the completion answers; a completion is assistant messages only (merged into
one turn). Records sharing an "id" (several pairs from one ticket) land in the same split; without one, the id is
a hash of the prompt, so the pairs of one prompt stay together too.

What `read_conversations` returns for these formats: `PreferenceRecord` / `KtoRecord`, `Conversation`s whose
`messages` are the prompt followed by the good answer (DPO: chosen; KTO: the completion when desirable, nothing
after the prompt when not), so the code that reads conversations (the split by id, evaluation's references) reads
them as any conversation. The completions are fields of their own; `training_texts` gives every text (the tiny
model's tokenizer is trained on chosen and rejected answers alike), `identity` what the prepared-data fingerprint
hashes.

Cleaning and scrubbing apply to every text. A record is dropped, with its reason counted, when its prompt has no
user turn left, when a good completion (chosen, desirable) is empty or shorter than data.clean.min_assistant_chars,
when a completion is longer than data.clean.max_message_chars (a cut answer teaches stopping mid-sentence), or when
chosen and rejected are the same words (whitespace aside). An empty rejected (or undesirable) answer is kept: a model that answers
nothing should learn not to. Exact duplicates of a whole record are dropped; there is no near-duplicate detection,
since pairs that share a prompt and a chosen answer and differ in the rejected one are distinct examples whose text
is mostly the same.

What `build_splits` returns for them: `PreferencePair` / `KtoExample` lists per split, never packed. The prompt
and each completion are rendered with the chat template as in training on conversations (templating's incremental
rendering, each piece tokenized on its own), so the prompt tokens of a pair's chosen and rejected are the same
tokens; labels sit on the completion only, its end-of-turn token included. A sample longer than model.max_seq_len
keeps its prompt whole and has its completion cut at the end (data.long_conversations=drop drops it instead); a
prompt that leaves no room for a completion token drops the record.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field

from llmft.config.data_schema import DataFormat, LongConversations
from llmft.data.clean.dedup import DedupKeys
from llmft.data.clean.messages import normalize_whitespace
from llmft.data.readers.chat import checked_message_list
from llmft.data.readers.records import Conversation, ReadReport, short_repr
from llmft.data.tokenize.templating import (IGNORE_INDEX, ChatRenderer, Sample, TemplateError, render_pieces,
                                            token_ids, with_system_prompt)

PREFERENCE_FORMATS = (DataFormat.preference_jsonl, DataFormat.kto_jsonl)
SAMPLE_KINDS = {DataFormat.preference_jsonl: "preference_pairs", DataFormat.kto_jsonl: "kto_examples"}


# ------------------------------------------------------------------------------------------------ what training gets


@dataclass
class PreferencePair:
    """One DPO example."""

    chosen: Sample  # prompt + chosen completion; labels = completion tokens only
    rejected: Sample  # the same prompt tokens + rejected completion
    prompt_length: int  # number of prompt tokens (input_ids[:prompt_length] identical in both)


@dataclass
class KtoExample:
    """One KTO example: an answer judged good (desirable) or bad."""

    sample: Sample  # prompt + completion, labels on the completion only
    prompt_length: int
    desirable: bool


def samples_of(items: list) -> list[Sample]:
    """The token sequences of a split of pairs or examples (chosen, rejected, chosen, ...), for checks and counts."""
    return [s for item in items for s in ((item.chosen, item.rejected) if isinstance(item, PreferencePair)
                                          else (item.sample,))]


# ------------------------------------------------------------------------------------------------ records


@dataclass
class PreferenceRecord(Conversation):
    """A DPO pair as read: `messages` = prompt + chosen (see the module docstring)."""

    prompt: list[dict[str, str]] = field(default_factory=list)
    chosen: str = ""
    rejected: str = ""

    @classmethod
    def of(cls, record_id: str, source: str, prompt: list[dict[str, str]], chosen: str, rejected: str
           ) -> PreferenceRecord:
        return cls(record_id, prompt + [{"role": "assistant", "content": chosen}], source, prompt=prompt,
                   chosen=chosen, rejected=rejected)

    def completions(self) -> list[str]:
        return [self.chosen, self.rejected]

    def identity(self) -> list:
        return [self.id, self.prompt, self.chosen, self.rejected]

    def audit_record(self, system_prompt: str | None) -> dict:
        return {"id": self.id, "source": self.source, "prompt": with_system_prompt(self.prompt, system_prompt),
                "chosen": self.chosen, "rejected": self.rejected}


@dataclass
class KtoRecord(Conversation):
    """A KTO example as read: `messages` = prompt + completion when desirable, the prompt alone when not."""

    prompt: list[dict[str, str]] = field(default_factory=list)
    completion: str = ""
    desirable: bool = True

    @classmethod
    def of(cls, record_id: str, source: str, prompt: list[dict[str, str]], completion: str, desirable: bool
           ) -> KtoRecord:
        answer = [{"role": "assistant", "content": completion}] if desirable else []
        return cls(record_id, prompt + answer, source, prompt=prompt, completion=completion, desirable=desirable)

    def completions(self) -> list[str]:
        return [self.completion]

    def identity(self) -> list:
        return [self.id, self.prompt, self.completion, self.desirable]

    def audit_record(self, system_prompt: str | None) -> dict:
        return {"id": self.id, "source": self.source, "prompt": with_system_prompt(self.prompt, system_prompt),
                "completion": self.completion, "label": self.desirable}


PROMPT_RECORDS = (PreferenceRecord, KtoRecord)


def training_texts(conversations) -> list[str]:
    """Every text a run trains on: the messages of conversations, and prompts and every completion of preference
    records (the tiny model's tokenizer must know the rejected answers' words too)."""
    texts = []
    for conversation in conversations:
        if isinstance(conversation, PROMPT_RECORDS):
            texts += [m["content"] for m in conversation.prompt] + conversation.completions()
        else:
            texts += [m["content"] for m in conversation.messages]
    return texts


# ------------------------------------------------------------------------------------------------ reading


def _messages(record: dict, name: str, default_role: str) -> list[dict[str, str]]:
    """The field `name` as messages ({"role", "content"}), or ValueError with a short reason."""
    if name not in record:
        raise ValueError(f'missing field "{name}"')
    value = record[name]
    if isinstance(value, str):
        return [{"role": default_role, "content": value}]
    if not isinstance(value, list):
        raise ValueError(f'"{name}" is neither text nor a list of messages')
    if not value:
        raise ValueError(f'"{name}" is an empty list')
    return checked_message_list(value, prefix=f'"{name}" ')


def _prompt(record: dict) -> list[dict[str, str]]:
    prompt = _messages(record, "prompt", "user")
    system = record.get("system")
    if system is not None:
        if not isinstance(system, str):
            raise ValueError('"system" is not text')
        if prompt[0]["role"] == "system":
            raise ValueError('both "system" and a system message in "prompt": give one')
        prompt = [{"role": "system", "content": system}] + prompt
    for i, message in enumerate(prompt):
        if message["role"] == "system" and i > 0:
            raise ValueError(f'"prompt" message {i} is a system message: only the first message may be one')
    if prompt[-1]["role"] != "user":
        raise ValueError(f'"prompt" ends with a {prompt[-1]["role"]} message: it must end with the user turn the '
                         f'completion answers')
    return prompt


def _completion(record: dict, name: str) -> str:
    """A completion field as one assistant text (several assistant messages are one turn, blank line between)."""
    messages = _messages(record, name, "assistant")
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            raise ValueError(f'"{name}" message {i} has role {message["role"]!r}: a completion holds assistant '
                             f'messages only (earlier turns belong in "prompt")')
    return "\n\n".join(m["content"] for m in messages if m["content"].strip())


def _record_id(record: dict, prompt: list[dict[str, str]]) -> str:
    record_id = record.get("id")
    if record_id is None:  # the prompt's hash: the pairs of one prompt stay in one split
        return hashlib.sha1(json.dumps(prompt, ensure_ascii=False, sort_keys=True).encode()).hexdigest()[:16]
    if not isinstance(record_id, (str, int)) or isinstance(record_id, bool):
        raise ValueError('"id" is neither a string nor a number')
    return str(record_id)


def preference_records_of(records, data_format: DataFormat, report: ReadReport) -> list[Conversation]:
    """The records of (file:line, raw, JSON) lines in `data_format` (preference_jsonl or kto_jsonl); a bad record is
    skipped with its reason (the first one stops with data.strict)."""
    result: list[Conversation] = []
    for where, _, record in records:
        try:
            if not isinstance(record, dict):
                raise ValueError("not a JSON object")
            prompt = _prompt(record)
            if data_format is DataFormat.preference_jsonl:
                chosen, rejected = _completion(record, "chosen"), _completion(record, "rejected")
                item: Conversation = PreferenceRecord.of(_record_id(record, prompt), where, prompt, chosen, rejected)
            else:
                completion = _completion(record, "completion")
                label = record.get("label")
                if not isinstance(label, bool):
                    raise ValueError(f'"label" is {short_repr(label)}, not true (a good answer) or false (a bad one)'
                                     if "label" in record else 'missing field "label"')
                item = KtoRecord.of(_record_id(record, prompt), where, prompt, completion, label)
        except ValueError as error:
            report.skip(where, str(error))
        else:
            result.append(item)
    return result


# ------------------------------------------------------------------------------------------------ cleaning

_SPACES = re.compile(r"\s+")


@dataclass
class CleanedPreferences:
    kept: list[tuple[Conversation, DedupKeys]]
    dropped: dict[str, int]  # by reason, in the order the reasons first occur
    truncated: int  # prompt messages cut to data.clean.max_message_chars


def _shape_prompt(messages: list[dict[str, str]], clean_cfg) -> tuple[list[dict[str, str]], int]:
    """Empty messages out, consecutive messages of one role merged, leading assistant turns out, long messages cut
    (context only: nothing in a prompt is trained on, so cutting it teaches nothing wrong)."""
    merged: list[dict[str, str]] = []
    for message in messages:
        if not message["content"].strip():
            continue
        if merged and merged[-1]["role"] == message["role"]:
            merged[-1]["content"] += "\n\n" + message["content"]
        else:
            merged.append(dict(message))
    system = [m for m in merged[:1] if m["role"] == "system"]
    turns = merged[len(system):]
    while turns and turns[0]["role"] == "assistant":
        turns.pop(0)
    truncated = 0
    for message in turns:
        if len(message["content"]) > clean_cfg.max_message_chars:
            message["content"] = message["content"][: clean_cfg.max_message_chars].rstrip() + "\n[...]"
            truncated += 1
    return system + turns, truncated


def clean_preferences(records: list[Conversation], cleaner, scrubber, data_cfg) -> CleanedPreferences:
    """The records with every text cleaned and scrubbed, the drops by reason, and the dedup keys (exact only)."""
    clean_cfg = data_cfg.clean

    def clean(text: str) -> str:
        text = cleaner.clean(text, [])
        return scrubber.scrub(text, []) if scrubber is not None else text

    result = CleanedPreferences([], {}, 0)

    def drop(reason: str) -> None:
        result.dropped[reason] = result.dropped.get(reason, 0) + 1

    for record in records:
        prompt, truncated = _shape_prompt([{"role": m["role"], "content": clean(m["content"])}
                                           for m in record.prompt], clean_cfg)
        if not prompt or prompt[-1]["role"] != "user":
            drop("prompt_without_user_turn")
            continue
        names = ["chosen", "rejected"] if isinstance(record, PreferenceRecord) else ["completion"]
        good = [True, False] if isinstance(record, PreferenceRecord) else [record.desirable]
        completions = [clean(text) for text in record.completions()]
        reason = None
        for name, is_good, text in zip(names, good, completions):
            if is_good and not text:
                reason = f"empty_{name}"
            elif is_good and len(text) < clean_cfg.min_assistant_chars:
                reason = f"{name}_text_too_short"
            elif len(text) > clean_cfg.max_message_chars:
                reason = f"{name}_message_too_long"
            if reason:
                break
        if reason is None and len(completions) == 2 and completions[0].split() == completions[1].split():
            reason = "chosen_same_as_rejected"
        if reason:
            drop(reason)
            continue
        result.truncated += truncated
        if isinstance(record, PreferenceRecord):
            kept: Conversation = PreferenceRecord.of(record.id, record.source, prompt, *completions)
        else:
            kept = KtoRecord.of(record.id, record.source, prompt, completions[0], record.desirable)
        # the whole record, case and whitespace normalized, the system prompt left out (as clean/dedup.py does)
        parts = [m["content"] for m in prompt if m["role"] != "system"] + completions + [type(kept).__name__]
        if isinstance(kept, KtoRecord):
            parts.append(str(kept.desirable))
        text = "\x1e".join(_SPACES.sub(" ", normalize_whitespace(p).lower()) for p in parts)
        result.kept.append((kept, DedupKeys(hashlib.sha1(text.encode()).digest())))
    return result


# ------------------------------------------------------------------------------------------------ tokenizing


@dataclass
class PreferenceTokenizing:
    """What tokenizing a chunk of records needs; a worker gets it once."""

    tokenizer: object
    system_prompt: str | None
    end_of_turn: str
    max_seq_len: int
    long_policy: LongConversations  # data.long_conversations: `drop` drops a record too long; otherwise its completions are cut


@dataclass
class TokenizedPreferences:
    items: list  # PreferencePair or KtoExample, in order
    owners: list[int]  # for each item, the index in the chunk of the record it comes from
    dropped: dict[str, int]
    num_cut: int  # completions cut to fit max_seq_len


def _prompt_and_completion(tokenizer, prompt: list[dict[str, str]], completion: str, end_of_turn: str,
                           renderer: ChatRenderer) -> tuple[list[str], list[tuple[str, bool]]]:
    """The rendered prompt's pieces (generation prompt included) and the completion's (text, supervised) pieces,
    cut from templating's incremental rendering of prompt + completion: the completion starts at the last
    supervised piece, the reply of the final assistant turn."""
    pieces = render_pieces(tokenizer, prompt + [{"role": "assistant", "content": completion}], end_of_turn, renderer)
    start = max(i for i, (_, supervised) in enumerate(pieces) if supervised)
    return [text for text, _ in pieces[:start]], pieces[start:]


def tokenize_preference_chunk(state: PreferenceTokenizing, chunk: list[Conversation]) -> TokenizedPreferences:
    """Pairs (or KTO examples) of a chunk of records: each piece tokenized on its own, all in one batched call."""
    tokenizer, max_seq_len = state.tokenizer, state.max_seq_len
    renderer = ChatRenderer(tokenizer)
    rendered = []  # per record: (prompt pieces, [completion pieces per completion])
    for record in chunk:
        prompt = with_system_prompt(record.prompt, state.system_prompt)
        parts = [_prompt_and_completion(tokenizer, prompt, text, state.end_of_turn, renderer)
                 for text in record.completions()]
        if any(prompt_pieces != parts[0][0] for prompt_pieces, _ in parts[1:]):
            raise TemplateError("the chat template renders the same prompt differently before the chosen and the "
                                "rejected answers; set model.fallback_chat_template to a template that does not")
        rendered.append((parts[0][0], [completion for _, completion in parts]))
    texts = [text for prompt_pieces, completions in rendered
             for text in prompt_pieces + [t for completion in completions for t, _ in completion]]
    ids_of_piece = iter(token_ids(tokenizer, texts))
    result = TokenizedPreferences([], [], {}, 0)

    def drop(reason: str) -> None:
        result.dropped[reason] = result.dropped.get(reason, 0) + 1

    for index, (record, (prompt_pieces, completions)) in enumerate(zip(chunk, rendered)):
        prompt_ids = [token for _ in prompt_pieces for token in next(ids_of_piece)]
        sides = []
        for completion in completions:
            input_ids, labels = list(prompt_ids), [IGNORE_INDEX] * len(prompt_ids)
            for _, supervised in completion:
                ids = next(ids_of_piece)
                input_ids += ids
                labels += ids if supervised else [IGNORE_INDEX] * len(ids)
            sides.append(Sample(input_ids, labels))
        if len(prompt_ids) >= max_seq_len:
            drop("prompt_longer_than_max_seq_len")
            continue
        if any(len(s.input_ids) > max_seq_len for s in sides):
            if state.long_policy is LongConversations.drop:
                drop("longer_than_max_seq_len")
                continue
            result.num_cut += sum(len(s.input_ids) > max_seq_len for s in sides)
            sides = [Sample(s.input_ids[:max_seq_len], s.labels[:max_seq_len]) for s in sides]
        if isinstance(record, PreferenceRecord):
            result.items.append(PreferencePair(sides[0], sides[1], len(prompt_ids)))
        else:
            result.items.append(KtoExample(sides[0], len(prompt_ids), record.desirable))
        result.owners.append(index)
    return result


def preference_counts(splits: dict[str, list], data_format: DataFormat, max_seq_len: int, end_of_turn: str,
                      dropped: dict[str, int], num_cut: int) -> dict:
    """What `data prepare` reports and training logs: pairs (examples) per split, tokens, supervised tokens."""
    sequences = {split: samples_of(items) for split, items in splits.items()}
    counts = {
        "max_seq_len": max_seq_len,
        "packing": False,  # each pair or example is its own row
        "end_of_turn_token": end_of_turn,
        "sample_kind": SAMPLE_KINDS[data_format],
        "samples": {split: len(items) for split, items in splits.items()},
        "tokens": {split: sum(len(s.input_ids) for s in samples) for split, samples in sequences.items()},
        "supervised_tokens": {split: sum(s.num_supervised for s in samples) for split, samples in sequences.items()},
        "prompt_tokens": {split: sum(item.prompt_length for item in items) for split, items in splits.items()},
        "completions_cut_to_max_seq_len": num_cut,
        "samples_dropped": {reason: n for reason, n in dropped.items() if n},
    }
    if data_format is DataFormat.kto_jsonl:
        counts["desirable"] = {split: sum(item.desirable for item in items) for split, items in splits.items()}
    train = sequences["train"]
    counts["useful_token_fraction"] = {  # each sequence alone in a row of max_seq_len tokens
        "padded": counts["tokens"]["train"] / max(1, len(train) * max_seq_len)}
    counts["supervised_token_fraction"] = counts["supervised_tokens"]["train"] / max(1, counts["tokens"]["train"])
    return counts


def summary_line(counts: dict) -> str:
    """The `data prepare` line about what was built."""
    noun = "pairs" if counts["sample_kind"] == "preference_pairs" else "examples"
    line = f"{noun}: " + ", ".join(f"{n} {split}" for split, n in counts["samples"].items())
    if "desirable" in counts:
        train = counts["samples"]["train"]
        line += f" ({counts['desirable']['train']} desirable, {train - counts['desirable']['train']} undesirable " \
                f"in train)"
    line += (f"; {counts['tokens']['train']} train tokens, {counts['supervised_tokens']['train']} supervised "
             f"(completions), {counts['prompt_tokens']['train']} in prompts; "
             f"{counts['completions_cut_to_max_seq_len']} completions cut to max_seq_len={counts['max_seq_len']}")
    return line


# ------------------------------------------------------------------------------------------------ prepared dataset

COLUMNS = {  # the columns `prepare/prepared_dir.py` saves, by sample kind
    "preference_pairs": ("chosen_input_ids", "chosen_labels", "rejected_input_ids", "rejected_labels",
                         "prompt_length"),
    "kto_examples": ("input_ids", "labels", "prompt_length", "desirable"),
}


def columns_of(items: list, kind: str) -> dict[str, list]:
    """A split of pairs or examples as the columns `prepare/prepared_dir.py` saves."""
    if kind == "preference_pairs":
        return {"chosen_input_ids": [p.chosen.input_ids for p in items], "chosen_labels": [p.chosen.labels for p in items],
                "rejected_input_ids": [p.rejected.input_ids for p in items],
                "rejected_labels": [p.rejected.labels for p in items],
                "prompt_length": [p.prompt_length for p in items]}
    return {"input_ids": [e.sample.input_ids for e in items], "labels": [e.sample.labels for e in items],
            "prompt_length": [e.prompt_length for e in items], "desirable": [e.desirable for e in items]}


def items_of(columns: dict[str, list], kind: str) -> list:
    """The pairs or examples of saved columns (`columns_of` back)."""
    if kind == "preference_pairs":
        return [PreferencePair(Sample(ci, cl), Sample(ri, rl), n) for ci, cl, ri, rl, n in
                zip(*(columns[name] for name in COLUMNS[kind]))]
    return [KtoExample(Sample(ids, labels), n, bool(desirable)) for ids, labels, n, desirable in
            zip(*(columns[name] for name in COLUMNS[kind]))]

