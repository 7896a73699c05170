"""Turn a glossary (a JSON list of `{"acronym", "definition"}`) into synthetic conversations.

Each acronym gives `data.acronyms.conversations_per_acronym` conversations, in the language of its definition
(French or English), from varied question and answer phrasings, some with a follow-up turn. The choice is seeded
by the acronym, so the same glossary always gives the same conversations. Two ways to hold some out
(`data.acronyms.split`):

- by_acronym (default): all conversations of one acronym share its id, so they land in one split: validation never
  asks about an acronym training has seen (does the model generalise?);
- by_phrasing: every acronym is trained, and `held_out_phrasings` other questions about it (single exchanges, the
  question templates training does not use for that acronym) are held out (does the model remember?).

A glossary entry with `"control": true` is never trained, in either mode: its held-out questions measure what the
model guesses unaided. Each conversation's `expected` is the acronym's expansion, which `llmft eval` looks for.

Optionally an LLM behind an OpenAI-compatible endpoint (`data.acronyms.llm_url`, `llm_model`) writes the
conversations instead; it is never required: when it fails the templates are used and the report counts it.
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

from llmft.clients.openai_compatible import ChatEndpoint, EndpointError, api_key_of
from llmft.config.data_schema import AcronymSplit
from llmft.data.readers.records import (PINNED_HELD_OUT, PINNED_TO_TRAIN, Conversation, JsonError, ReadReport,
                                        decode_json, input_files, jsonl_records, line_of, text_problem, unreadable)

QUESTIONS = {
    "en": [
        "What does {a} stand for?",
        "What is {a}?",
        "Can you explain what {a} means?",
        "I keep seeing {a} in the documentation. What is it?",
        "Quick question: what's {a}?",
        "{a}?",
        "Sorry if this is basic, but what does {a} mean on the cluster?",
        "Could you tell me what {a} refers to?",
    ],
    "fr": [
        "Que signifie {a} ?",
        "C'est quoi {a} ?",
        "Pouvez-vous m'expliquer ce qu'est {a} ?",
        "Je vois souvent {a} dans la documentation, qu'est-ce que ça veut dire ?",
        "{a}, ça veut dire quoi ?",
        "Bonjour, que désigne {a} exactement ?",
        "Désolé pour la question basique : c'est quoi {a} ?",
        "À quoi correspond le sigle {a} ?",
    ],
}
ANSWERS = {
    "en": [
        "{a} stands for {e}. {x}",
        "{a} means {e}. {x}",
        "It stands for {e}. {x}",
        "{a} ({e}): {x}",
        "{a} is short for {e}. {x}",
    ],
    "fr": [
        "{a} signifie {e}. {x}",
        "{a} est le sigle de {e}. {x}",
        "C'est l'abréviation de {e}. {x}",
        "{a} ({e}) : {x}",
        "{a} veut dire {e}. {x}",
    ],
}
ANSWERS_WITHOUT_EXPANSION = {"en": ["{a}: {x}", "{a} is {xl}"], "fr": ["{a} : {x}", "{a} désigne {xl}"]}
FOLLOW_UPS = {
    "en": [("And what does {a} stand for, exactly?", "{a} stands for {e}."),
           ("Thanks. Can you spell out the acronym?", "Sure: {a} = {e}.")],
    "fr": [("Et {a}, c'est l'abréviation de quoi exactement ?", "{a} signifie {e}."),
           ("Merci. Vous pouvez me donner la forme longue ?", "Bien sûr : {a} = {e}.")],
}
_FRENCH_WORDS = re.compile(r"\b(le|la|les|des|du|une|est|pour|qui|dans|avec|sur|aux|au|et)\b", re.I)
_ENGLISH_WORDS = re.compile(r"\b(the|of|and|is|a|an|to|for|with|on|in|that|which)\b", re.I)


def language_of(text: str) -> str:
    french = len(_FRENCH_WORDS.findall(text)) + 2 * len(re.findall(r"[éèêàùçô]", text))
    return "fr" if french > len(_ENGLISH_WORDS.findall(text)) else "en"


def split_definition(definition: str) -> tuple[str | None, str]:
    """("Simple Linux Utility for Resource Management", "The open-source job scheduler ...") from "E: x"."""
    expansion, colon, explanation = definition.partition(":")
    if not colon or len(expansion) > 120 or not explanation.strip():
        return None, definition.strip()
    explanation = explanation.strip()
    return expansion.strip(), explanation[:1].upper() + explanation[1:]


def template_conversations(acronym: str, definition: str, count: int, questions: list[str] | None = None
                           ) -> list[list[dict[str, str]]]:
    """`count` conversations asking `questions` (default: the definition's language's) in turn."""
    language = language_of(definition)
    expansion, explanation = split_definition(definition)
    rng = random.Random(f"llmft-acronym:{acronym}")
    questions = questions or QUESTIONS[language]
    questions = rng.sample(questions, k=min(count, len(questions)))
    answers = ANSWERS[language] if expansion else ANSWERS_WITHOUT_EXPANSION[language]
    values = {"a": acronym, "e": expansion, "x": explanation, "xl": explanation[:1].lower() + explanation[1:]}
    conversations = []
    for index in range(count):
        question = questions[index % len(questions)]
        answer = answers[(index + rng.randrange(len(answers))) % len(answers)]
        messages = [{"role": "user", "content": question.format(**values)},
                    {"role": "assistant", "content": answer.format(**values).strip()}]
        if expansion and index % 3 == 2:  # some conversations go on: the model learns short follow-ups too
            # (the first answer keeps the expansion: an answer that leaves it out would teach that a question about
            # an acronym may be answered without it)
            follow_question, follow_answer = rng.choice(FOLLOW_UPS[language])
            messages += [{"role": "user", "content": follow_question.format(**values)},
                         {"role": "assistant", "content": follow_answer.format(**values)}]
        conversations.append(messages)
    return conversations


def held_out_phrasings(acronym: str, definition: str, count: int) -> tuple[list[str], list[list[dict[str, str]]]]:
    """(the questions left for training, `count` single-exchange conversations asking the others): the test of
    `data.acronyms.split=by_phrasing`. The reference answer gives the expansion."""
    language = language_of(definition)
    expansion, explanation = split_definition(definition)
    questions = QUESTIONS[language]
    held = random.Random(f"llmft-acronym-held-out:{acronym}").sample(questions, k=min(count, len(questions) - 1))
    answers = ANSWERS[language] if expansion else ANSWERS_WITHOUT_EXPANSION[language]
    values = {"a": acronym, "e": expansion, "x": explanation, "xl": explanation[:1].lower() + explanation[1:]}
    conversations = [[{"role": "user", "content": question.format(**values)},
                      {"role": "assistant", "content": answers[index % len(answers)].format(**values).strip()}]
                     for index, question in enumerate(held)]
    return [q for q in questions if q not in held], conversations


def llm_conversations(acronym: str, definition: str, count: int, cfg) -> list[list[dict[str, str]]]:
    """Conversations written by an LLM behind an OpenAI-compatible endpoint; raises on any failure."""
    prompt = (
        f"Write {count} short, varied conversations between a user of an HPC centre and its support assistant, "
        f"in the language of the definition, where the user asks about the acronym {acronym!r} and the assistant "
        f"answers using only this definition: {definition!r}. Reply with raw JSON only: a list of {count} lists of "
        f'messages, each message {{"role": "user" or "assistant", "content": "..."}}, each list ending with the assistant.'
    )
    endpoint = ChatEndpoint(cfg.llm_url, cfg.llm_model, api_key_of(cfg.llm_api_key_env), cfg.llm_timeout_s,
                            name="the acronym writer")
    content = endpoint.complete([{"role": "user", "content": prompt}], temperature=0.7)
    content = re.sub(r"^```(?:json)?\s*|\s*```$", "", content.strip())
    conversations = json.loads(content)
    valid = [
        [{"role": m["role"], "content": m["content"].strip()} for m in conversation]
        for conversation in conversations
        if isinstance(conversation, list) and conversation
        and all(isinstance(m, dict) and m.get("role") in ("user", "assistant") and isinstance(m.get("content"), str)
                for m in conversation)
        and conversation[-1]["role"] == "assistant"
    ]
    if not valid:
        raise ValueError("no usable conversation in the LLM's answer")
    return valid[:count]


def _entries(file: Path, report: ReadReport) -> list[tuple[str, object]]:
    """(file:line, entry) for each element of a JSON list (or each line of a JSONL file), each counted as read; one
    that is no JSON, or holds no valid text, is skipped with its reason. Bytes that are not UTF-8 spoil only the
    entry they are in: they are read as surrogates, which `text_problem` finds."""
    if file.suffix == ".jsonl":  # one entry a line: the JSONL reader every format shares
        return [(where, entry) for where, _, entry in jsonl_records(file, report)]
    try:
        raw = file.read_bytes()
    except OSError as error:
        report.skip(str(file), unreadable(file, error))
        return []
    text = raw.decode("utf-8", errors="surrogateescape").removeprefix("\ufeff")  # (Notepad's BOM)
    found = []
    position = len(text) - len(text.lstrip())
    if not text.startswith("[", position):
        if text.strip():
            report.skip(f"{file}:{line_of(text, position)}", "not a JSON list of {acronym, definition} objects")
        else:
            report.skip(str(file), "empty file")
        return []
    position += 1
    line, counted_to = 1, 0  # line_of(text, position), counted on from the last entry: no quadratic recount
    while True:
        while position < len(text) and text[position] in " \t\r\n,":
            position += 1
        if position >= len(text) or text[position] == "]":
            return found
        line, counted_to = line + text.count("\n", counted_to, position), position
        report.records_read += 1
        try:
            entry, end = decode_json(text, position)
        except JsonError as error:
            report.skip(f"{file}:{line_of(text, error.pos)}", f"{error}; the rest of the file is unread")
            return found
        problem = text_problem(text, position, end, entry)
        if problem:
            report.skip(f"{file}:{line}", problem)
        else:
            found.append((f"{file}:{line}", entry))
        position = end


def read_acronyms(path: Path, data_cfg, report: ReadReport) -> list[Conversation]:
    cfg = data_cfg.acronyms
    use_llm = bool(cfg.llm_url and cfg.llm_model)
    conversations = []
    for file in input_files(path, (".json", ".jsonl")):
        for where, entry in _entries(file, report):
            if not isinstance(entry, dict):
                report.skip(where, "the entry is not an object")
                continue
            acronym, definition = entry.get("acronym"), entry.get("definition")
            if not isinstance(acronym, str) or not acronym.strip():
                report.skip(where, 'missing field "acronym"' if acronym is None else '"acronym" is not a non-empty string')
                continue
            if not isinstance(definition, str) or not definition.strip():
                report.skip(where, 'missing field "definition"' if definition is None else '"definition" is not a non-empty string')
                continue
            acronym, definition = acronym.strip(), definition.strip()
            expansion = split_definition(definition)[0] or ""
            control = entry.get("control") is True
            questions = None
            if control or cfg.split is AcronymSplit.by_phrasing:
                questions, asked = held_out_phrasings(acronym, definition, cfg.held_out_phrasings)
                kind = "acronym-control" if control else "acronym"
                conversations += [Conversation(f"{kind}:{acronym}{PINNED_HELD_OUT}", messages, where, expected=expansion)
                                  for messages in asked]
                if control:  # never trained: what the model answers unaided
                    continue
            generated = None
            if use_llm:
                try:
                    generated = llm_conversations(acronym, definition, cfg.conversations_per_acronym, cfg)
                    report.count("llm_conversations", len(generated))
                except (EndpointError, ValueError, KeyError, IndexError, TypeError, AttributeError,
                        RecursionError) as error:
                    # any answer the endpoint gives, however broken, falls back to the templates
                    report.count("llm_failures_fell_back_to_templates")
                    if isinstance(error, EndpointError) and error.kind in ("unreachable", "timeout", "connection"):
                        use_llm = False  # no answer at all: do not wait for it once per acronym
            written_by = "llm" if generated is not None else "templates"
            if generated is None:
                generated = template_conversations(acronym, definition, cfg.conversations_per_acronym, questions)
            pin = PINNED_TO_TRAIN if cfg.split is AcronymSplit.by_phrasing else ""
            conversations += [Conversation(f"acronym:{acronym}{pin}", messages, where,
                                           expected=expansion if written_by == "templates" else "")
                              for messages in generated]
    return conversations
