"""From raw message bodies to clean turns: what the model should read, and only that.

Per message: HTML to text, quoted replies out (`>` lines, `On ... wrote:` / `Le ... a écrit :` and what follows,
forwarded-message headers), signatures out (`-- `, a closing such as "Best regards," near the end, a line that
is the author's name, "Sent from my iPhone"), whitespace tidied. Per conversation: empty turns dropped,
consecutive turns of one role merged, staff messages before the first user message and user messages after the
last answer dropped (nothing to learn from them), length limits applied. Each drop has a reason the report counts.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from llmft.config.data_schema import DataFormat
from llmft.data.clean.html_text import html_to_text, looks_like_html

# "On Mon, 13 Jan 2025 at 09:05, Sophie <s@x.fr> wrote:", "Le 10/01/2025 à 11:26, Amélie a écrit :", and the
# German, Spanish, Italian forms; mail clients wrap it over up to three lines.
_ATTRIBUTION = re.compile(
    r"^\s*(?:On\s.{0,300}?\bwrote|Le\s.{0,300}?\ba\s+écrit|Am\s.{0,300}?\bschrieb.{0,120}?|"
    r"El\s.{0,300}?\bescribió|Il\s.{0,300}?\bha\s+scritto)\s*:\s*$",
    re.S,
)
# Everything after these is the previous mail, quoted without `>`: Outlook, Zimbra, Thunderbird forwards.
_QUOTE_HEADER = re.compile(
    r"^\s*(?:-{2,}\s*(?:Original Message|Message d'origine|Mail original|Forwarded message|Message transféré|"
    r"Ursprüngliche Nachricht)\s*-{2,}|_{10,})\s*$",
    re.I,
)
_OUTLOOK_FROM = re.compile(r"^\s*\*?(From|De|Von)\s*\*?\s*:\s*\S", re.I)
_OUTLOOK_NEXT = re.compile(r"^\s*\*?(Sent|Envoyé|Gesendet|Date|To|À|An|Objet|Subject)\s*\*?\s*:", re.I)
_MOBILE_FOOTER = re.compile(
    r"^\s*(Sent from my \w+.*|Envoyé de mon \w+.*|Envoyé depuis mon \w+.*|Get Outlook for \w+.*|"
    r"Télécharger Outlook pour \w+.*|Sent from (Outlook|Mail|Yahoo Mail).*)\s*$",
    re.I,
)
_ZERO_WIDTH = re.compile("[\u200b\u200c\u200d\u2060\ufeff]")
_BLANK_LINES = re.compile(r"\n{3,}")
_ATTRIBUTION_START = re.compile(r"^\s*(On|Le|Am|El|Il)\s")


def normalize_whitespace(text: str) -> str:
    text = text.replace("\r\n", "\n").replace("\r", "\n").replace("\xa0", " ")
    if any(map(text.__contains__, "\u200b\u200c\u200d\u2060\ufeff")):  # (substring tests: far cheaper than a regex)
        text = _ZERO_WIDTH.sub("", text)
    if " \n" in text or "\t\n" in text or text.endswith((" ", "\t")):
        # spaces and tabs before each line end, line by line: several times faster than a regular expression
        text = "\n".join([line.rstrip(" \t") for line in text.split("\n")])
    if "\n\n\n" in text:
        text = _BLANK_LINES.sub("\n\n", text)
    return text.strip("\n").strip()


def strip_quoted_replies(text: str) -> str:
    lines = text.split("\n")
    kept: list[str] = []
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.lstrip().startswith(">"):
            i += 1
            continue
        if (("--" in line or "__" in line) and _QUOTE_HEADER.match(line)) or (
            ":" in line and _OUTLOOK_FROM.match(line) and any(_OUTLOOK_NEXT.match(l) for l in lines[i + 1 : i + 4])
        ):
            break  # the rest is the previous mail
        attribution_end = next(
            (i + k for k in (1, 2, 3) if _ATTRIBUTION.match(" ".join(lines[i : i + k]))), None
        ) if _ATTRIBUTION_START.match(line) else None
        if attribution_end is not None:
            following = next((l for l in lines[attribution_end:] if l.strip()), "")
            if following.lstrip().startswith(">"):
                i = attribution_end  # a `>` quote follows: drop it line by line, keep any answer written below it
                continue
            break  # quoted without `>` (or nothing left): the rest is the previous mail
        kept.append(line)
        i += 1
    return "\n".join(kept)


def _closing_pattern(closings: list[str]) -> re.Pattern | None:
    if not closings:
        return None
    alternatives = "|".join(re.escape(c.strip()) for c in sorted(closings, key=len, reverse=True) if c.strip())
    # The closing, then at most a few words ("Thanks a lot", "Cordialement, Julien"): not a sentence.
    return re.compile(rf"^\s*(?:{alternatives})\b[^\n?]{{0,30}}$", re.I)


def _looks_like_signature(lines: list[str]) -> bool:
    """A short block of short lines with no question: a name, a title, a lab, a phone number."""
    content = [l for l in lines if l.strip()]
    return len(content) <= 7 and all(len(l) <= 90 and not l.rstrip().endswith("?") for l in content)


def strip_signature(text: str, closing_pattern: re.Pattern | None, author_names: list[str]) -> str:
    lines = [l for l in text.split("\n") if not _MOBILE_FOOTER.match(l)]
    for i, line in enumerate(lines):
        if line.strip() == "--" or line == "-- ":
            lines = lines[:i]  # the standard delimiter: all that follows is signature
            break
    content = [i for i, l in enumerate(lines) if l.strip()]
    tail = content[-8:]  # a signature sits in the last lines
    names = [n for n in author_names if n]
    first_names = [n.split()[0] for n in names if len(n.split()[0]) >= 2]
    for i in tail:
        line = lines[i].strip()
        is_closing = closing_pattern is not None and closing_pattern.match(line) and i != content[0]
        is_name = len(line) <= 60 and (
            any(name.lower() in line.lower() for name in names)
            or any(line.rstrip(".,!").lower() == first.lower() for first in first_names)
        )
        if (is_closing or is_name) and _looks_like_signature(lines[i + 1 :]):
            lines = lines[:i]
            break
    return "\n".join(lines)


class MessageCleaner:
    def __init__(self, clean_cfg, data_format: DataFormat):
        # Text that is already clean (chat_jsonl, acronyms) is not searched for quotes and signatures by default:
        # a `>` line there may be a Markdown quote, a "Thanks," a real sentence.
        from_mail = data_format in (DataFormat.tickets_jsonl, DataFormat.email, DataFormat.csv)
        self.strip_quotes = from_mail if clean_cfg.strip_quotes is None else clean_cfg.strip_quotes
        self.strip_signatures = from_mail if clean_cfg.strip_signatures is None else clean_cfg.strip_signatures
        self.closing_pattern = _closing_pattern(list(clean_cfg.closings))
        # E-mail bodies are text already: the reader took the text/plain part, or turned the text/html part into
        # text, by MIME type. Guessing again here would flatten a plain-text mail that has `<p.name@host>` in it.
        self.detect_html = data_format is not DataFormat.email

    def clean(self, text: str, author_names: list[str]) -> str:
        if self.detect_html and looks_like_html(text):
            text = html_to_text(text, drop_quotes=self.strip_quotes)
        text = normalize_whitespace(text)
        if self.strip_quotes:
            text = strip_quoted_replies(text)
        if self.strip_signatures:
            text = strip_signature(text, self.closing_pattern, author_names)
        return normalize_whitespace(text)


@dataclass
class Shaped:
    messages: list[dict[str, str]]
    drop_reason: str | None = None
    truncated_user_messages: int = 0


def shape_turns(messages: list[dict[str, str]], clean_cfg) -> Shaped:
    """Turns a chat template accepts (system?, then user/assistant alternating, ending on assistant), or a reason."""
    messages = [{"role": m["role"], "content": m["content"]} for m in messages if m["content"].strip()]
    merged: list[dict[str, str]] = []
    for message in messages:
        if merged and merged[-1]["role"] == message["role"]:
            merged[-1]["content"] += "\n\n" + message["content"]
        else:
            merged.append(dict(message))
    system = [m for m in merged[:1] if m["role"] == "system"]
    turns = [m for m in merged if m["role"] != "system"]
    while turns and turns[0]["role"] == "assistant":
        turns.pop(0)  # staff wrote first (a notice): no question to learn the answer to
    while turns and turns[-1]["role"] == "user":
        turns.pop()  # "thanks, it works": nothing after it to learn from
    if not any(m["role"] == "assistant" for m in turns):
        return Shaped([], "no_assistant_turn")
    if sum(len(m["content"]) for m in turns if m["role"] == "assistant") < clean_cfg.min_assistant_chars:
        return Shaped([], "assistant_text_too_short")
    truncated = 0
    for message in turns:
        if len(message["content"]) > clean_cfg.max_message_chars:
            if message["role"] == "assistant":
                return Shaped([], "assistant_message_too_long")
            message["content"] = message["content"][: clean_cfg.max_message_chars].rstrip() + "\n[...]"
            truncated += 1
    return Shaped(system + turns, None, truncated)
