"""From raw message bodies to clean turns: what the model should read, and only that.

Per message: HTML to text (only a body written as HTML: `looks_like_html`), quoted replies out, signatures out,
whitespace tidied. Each rule is structural, so the user's own lines that look like one stay:
- a quote is a run of `>` lines (not `>>>` Python sessions, not a shell's continuation lines), a reply header
  ("On <date>, <name> <addr> wrote:", "Le ... a écrit :", "Am ... schrieb ...:", wrapped or not) that holds an
  address or a date and is followed by `>` lines, a header block or nothing (a full one, with a year, time or
  address, by anything), a separator ("-----Original Message-----", a forward's), or an Outlook header block;
- a signature follows "-- ", or a closing line that is only a closing (and a name), or the author's name, when a
  short block of name / title / lab / phone lines comes after it; mobile footers ("Sent from my iPhone") go too.
Per conversation: empty turns dropped, consecutive turns of one role merged, staff messages before the first user
message and user messages after the last answer dropped (nothing to learn from them), length limits applied. Each
drop has a reason the report counts.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from llmft.config.data_schema import DataFormat
from llmft.data.clean.html_text import html_to_text, looks_like_html

# A reply header ("attribution") ends with the verb of its language and a colon: "On Mon, 13 Jan 2025 at 09:05,
# Sophie <s@x.fr> wrote:", "Le 10/01/2025 à 11:26, Amélie a écrit :", "Am 3. März 2025 um 10:14 schrieb Hans
# <h@x.de>:", "Hans <h@x.de> schrieb am 03.03.2025:", the Spanish, Italian, Dutch and Portuguese forms; mail clients
# wrap it over up to three lines, and put U+00A0 or U+202F before the colon.
_ATTRIBUTION_END = re.compile(
    r"(?:\bwrote|\ba\s+écrit|\bschrieb\b.{0,160}?|\bescribió|\bha\s+scritto|\bschreef|\bescreveu)\s*:\s*$",
    re.I | re.S)
_ATTRIBUTION_START = re.compile(r"^\s*(?:On|Le|Am|El|Il|Op|Em|Den)\s", re.I)
# What makes it a header and not a sentence ("Voici ce que mon directeur de thèse a écrit :"): an address, or a date.
_ADDRESS = re.compile(r"[\w.+-]+@[\w-]+(?:\.[\w-]+)+")
_FULL_DATE = re.compile(r"\b(?:19|20)\d\d\b|\b\d{1,2}[:h]\d\d\b|\b\d{1,2}[./-]\d{1,2}[./-]\d{2,4}\b")
_DATE_WORD = re.compile(
    r"\b(?:mon|tue|wed|thu|fri|sat|sun|monday|tuesday|wednesday|thursday|friday|saturday|sunday|lun|mar|mer|jeu|ven|"
    r"sam|dim|lundi|mardi|mercredi|jeudi|vendredi|samedi|dimanche|montag|dienstag|mittwoch|"
    r"donnerstag|freitag|samstag|sonntag|jan|feb|apr|jun|jul|aug|sep|sept|oct|nov|dec|janv|févr|fév|avr|mai|juin|"
    r"juil|août|déc|january|february|march|april|june|july|august|september|october|november|december|janvier|"
    r"février|mars|avril|juillet|septembre|octobre|novembre|décembre|januar|februar|märz|juni|juli|oktober|dezember|"
    r"mär|okt|dez)\b\.?",
    re.I)
# Everything after these is the previous mail, quoted without `>`: Outlook, Zimbra, Thunderbird, Gmail forwards.
_QUOTE_SEPARATOR = re.compile(
    r"^\s*-{2,}\s*(?:Original Message|Message d'origine|Mail original|Forwarded message|Message transféré|"
    r"Ursprüngliche Nachricht|Weitergeleitete Nachricht|Messaggio originale|Mensaje original|Forwarded Message)\s*"
    r"-{2,}\s*$",
    re.I)
# These need the header block after them: a line of underscores may be a table or a form in the user's own text.
_WEAK_SEPARATOR = re.compile(
    r"^\s*(?:_{10,}|-{10,}|Begin forwarded message\s*:|Début du message (?:réexpédié|transféré)\s*:|"
    r"Anfang der weitergeleiteten Nachricht\s*:)\s*$",
    re.I)
_HEADER_FROM = re.compile(r"^\s*\*?(?:From|De|Von|Van|Da)\s*\*?\s*:\s*\S", re.I)
_HEADER_DATE = re.compile(r"^\s*\*?(?:Sent|Envoyé|Gesendet|Date|Datum|Verzonden|Inviato|Enviado)\s*\*?\s*:\s*\S", re.I)
_HEADER_SUBJECT = re.compile(r"^\s*\*?(?:Subject|Objet|Sujet|Betreff|Onderwerp|Oggetto|Asunto)\s*\*?\s*:", re.I)
_HEADER_OTHER = re.compile(r"^\s*\*?(?:To|À|A|An|Aan|Para|Cc|Reply-To|Répondre à|Antwort an)\s*\*?\s*:", re.I)
# A shell prompt: `>` lines after it are the shell's continuation lines (`> echo $i`), not a quote.
_SHELL_PROMPT = re.compile(r"^\s*(?:\$|%|\[[^\]]*\][$#]|[\w.-]+@[\w.-]+(?::[^$#\s]*)?[$#])\s")
# "Sent from my iPhone", "Envoyé de mon iPad", "Von meinem iPhone gesendet", "Get Outlook for iOS<https://...>":
# the phrase, a device of a few words, maybe a link; a sentence that starts the same way goes on ("Sent from my
# laptop, the job fails") and is kept.
_MOBILE_FOOTER = re.compile(
    r"^\s*(?:(?:Sent from my|Sent from|Envoyé de mon|Envoyé depuis mon|Envoyé à partir de|Gesendet von meinem|"
    r"Get Outlook for|Télécharger Outlook pour|Obtenir Outlook pour|Enviado desde mi|Inviato da)\s+[^\s,;:.!?]"
    r"[^,;:.!?]{0,40}|Von meinem\s+[^,;:.!?]{1,30}\s+gesendet)[.!]?\s*(?:<[^<>\s]+>)?\s*$",
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


def _is_header_line(line: str) -> bool:
    return bool(_HEADER_FROM.match(line) or _HEADER_DATE.match(line) or _HEADER_SUBJECT.match(line)
                or _HEADER_OTHER.match(line))


def _header_block_at(lines: list[str], i: int) -> bool:
    """Whether lines[i] starts the header of a quoted mail: "From:" / "De :" / "Von:" with a value, then, on the
    next lines, at least two more header fields, one of them a date ("Sent:", "Envoyé :", "Date:") or a subject.
    "From: /gpfs/work" then "To: /gpfs/scratch" in a pasted log is no header."""
    if not _HEADER_FROM.match(lines[i]):
        return False
    fields, dated_or_subject = 0, False
    for line in lines[i + 1 : i + 7]:
        if not line.strip():
            if fields:
                break
            continue
        if not _is_header_line(line):
            break
        fields += 1
        dated_or_subject = dated_or_subject or bool(_HEADER_DATE.match(line) or _HEADER_SUBJECT.match(line))
    return fields >= 2 and dated_or_subject


def _next_content(lines: list[str], i: int) -> int | None:
    return next((j for j in range(i, len(lines)) if lines[j].strip()), None)


def _attribution_at(lines: list[str], i: int) -> tuple[int, bool] | None:
    """(index after it, strong) when lines[i:i+k] (k = 1, 2, 3) are a reply header, else None. A header ends with
    "wrote:" / "a écrit :" / "schrieb ...:" and holds an address or a date (a weekday or month name counts). Strong:
    it also starts as clients write it ("On", "Le", "Am"...) and has an address, a year, a time or a numeric date;
    only a strong header may be followed by the quoted mail without `>`."""
    for k in (1, 2, 3):
        if i + k > len(lines) or (k > 1 and not lines[i + k - 1].strip()):
            return None
        if not lines[i + k - 1].rstrip().endswith(":"):
            continue
        text = " ".join(line.strip() for line in lines[i : i + k])
        if len(text) > 400 or not _ATTRIBUTION_END.search(text):
            continue
        intro = bool(_ATTRIBUTION_START.match(text))
        above = lines[i : i + k - 1]
        if k > 1 and not intro and any(len(line) > 60 or line.rstrip()[-1:] in ".!?;," for line in above):
            return None  # a sentence of the user's above a header: not part of it
        precise = bool(_ADDRESS.search(text) or _FULL_DATE.search(text))
        if precise or _DATE_WORD.search(text):
            return i + k, intro and precise
        return None
    return None


def _is_quote_run(lines: list[str], start: int, end: int) -> bool:
    """Whether the `>` lines lines[start:end] are a quoted mail: not a Python session (`>>> ` lines only) nor the
    continuation lines of a shell command (`$ for i in 1 2; do` then `> echo $i`)."""
    if all(line.lstrip().startswith(">>>") for line in lines[start:end]):
        return False
    return not (start and lines[start - 1].strip() and (_SHELL_PROMPT.match(lines[start - 1])
                                                          or lines[start - 1].rstrip().endswith("\\")))


def strip_quoted_replies(text: str) -> str:
    """The text without the previous mails it quotes. A quote is structural: `>` lines; a reply header (see
    `_attribution_at`) followed by `>` lines, by a header block, or by nothing (a strong one: by anything); a
    separator such as "-----Original Message-----"; an Outlook header block ("From:" + date or subject fields), or
    a line of underscores or "Begin forwarded message:" before one. The user's own lines that look like one of these
    ("Voici ce que mon directeur a écrit :" then a script, "From: /path" in a log, a table's rule) stay."""
    lines = text.split("\n")
    # a reply header ends with ":" on one of its 1-3 lines: only where one of the next 3 lines does is it looked for
    # (`_attribution_at` on every line was a tenth of a ticket's preparation)
    ends_with_colon = [line.rstrip().endswith(":") for line in lines] + [False, False]
    kept: list[str] = []
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.lstrip().startswith(">"):
            end = i
            while end < len(lines) and lines[end].lstrip().startswith(">"):
                end += 1
            if not _is_quote_run(lines, i, end):
                kept.extend(lines[i:end])
            i = end
            continue
        if ("-" in line and _QUOTE_SEPARATOR.match(line)) or (":" in line and _header_block_at(lines, i)):
            while kept and kept[-1].strip() and _is_header_line(kept[-1]):
                kept.pop()  # "Date:" written above "From:" (Hotmail, Lotus Notes): part of the header
            break  # the rest is the previous mail
        if _WEAK_SEPARATOR.match(line):
            following = _next_content(lines, i + 1)
            if following is not None and following <= i + 3 and _header_block_at(lines, following):
                break
        attribution = _attribution_at(lines, i) if True in ends_with_colon[i:i + 3] else None
        if attribution is not None:
            end, strong = attribution
            following = _next_content(lines, end)
            if following is not None and lines[following].lstrip().startswith(">"):
                i = end  # a `>` quote follows: drop it line by line, keep any answer written below it
                continue
            if strong or following is None or _is_header_line(lines[following]):
                break  # quoted without `>`, or nothing left: the rest is the previous mail
        kept.append(line)
        i += 1
    return "\n".join(kept)


def _closing_pattern(closings: list[str]) -> re.Pattern | None:
    """The closings of data.clean.closings at the start of a line, what follows them as the group "tail"."""
    if not closings:
        return None
    alternatives = "|".join(re.escape(c.strip()) for c in sorted(closings, key=len, reverse=True) if c.strip())
    return re.compile(rf"^\s*(?:{alternatives})\b(?P<tail>.*)$", re.I)


# Words that make what follows a closing a sentence of its own: "Merci, j'ai essayé...", "Thanks, it works".
_SUBJECTS = frozenset(
    "i i'm i've i'll i'd we we're we've it it's this that they he she there my our je j' j'ai tu nous on ça ca cela "
    "c'est il elle ils elles mon ma mes notre nos ich wir es er mein meine unser unsere".split())
# How the words written right after a closing start when they still belong to it: "Thanks a lot for your help",
# "Merci d'avance pour votre aide", "Bonne journée à tous", "Regards from Paris", "Vielen Dank im Voraus". Other
# words make a sentence: "Best practice is to use srun" is no closing.
_COURTESY_STARTS = frozenset(
    "a again all and for from in so very much truly faithfully once to everyone everybody "
    "pour par d' de à et encore beaucoup mille infiniment bien tous toutes à vous "
    "für im und vielmals herzlich schön aus y e per grazie gracias".split())
_NAME_PARTICLES = frozenset("de du des la le van von der den di da dos y".split())
_WORDS = re.compile(r"[\w'’.-]+")


def _is_name(text: str, author_names: list[str]) -> bool:
    """A name or a team: at most four words, each capitalised ("Julien", "J. Dupont", "L'équipe Assistance IDRIS")
    or a particle, or a part of the author's name."""
    words = _WORDS.findall(text)
    if not words:
        return False
    if any(text.lower() in name.lower() for name in author_names if name):
        return True
    return len(words) <= 4 and all(w[0].isupper() or w.lower() in _NAME_PARTICLES for w in words)


def _is_closing_line(line: str, closing_pattern: re.Pattern, author_names: list[str], depth: int = 0) -> bool:
    """A closing ("Cordialement,", "Thanks a lot for your help!", "Best regards, Julien", "Merci, bonne journée")
    and nothing more: no sentence goes on after it ("Merci, j'ai essayé votre commande mais..." is the message)."""
    match = closing_pattern.match(line)
    if match is None or len(line.strip()) > 60 or "?" in line or depth > 2:
        return False
    tail = match.group("tail").strip()
    if not tail:
        return True
    head, _, rest = _split_once(tail)
    words = [w.lower().strip("'’").replace("’", "'") for w in head.split()]
    if words and (len(words) > 7 or len(head) > 40 or not (words[0] in _COURTESY_STARTS or (
            "'" in words[0] and words[0].split("'")[0] + "'" in _COURTESY_STARTS))):
        return False  # "Best practice is to use srun"
    if any(w in _SUBJECTS or w.split("'")[0] + "'" in _SUBJECTS for w in words):
        return False  # "Thanks for this, it works" / "Merci pour ça, j'ai relancé"
    rest = rest.strip(" ,;:!.—–-")
    if not rest:
        return True
    if _is_name(rest, author_names):
        return True  # "Cordialement, Julien"
    rest = re.sub(r"^(?:and|et|und|y|e)\s+", "", rest, flags=re.I)
    return _is_closing_line(rest, closing_pattern, author_names, depth + 1)  # "Merci, bonne journée"


def _split_once(tail: str) -> tuple[str, str, str]:
    """(the words before the first punctuation, the punctuation, the rest) of what follows a closing."""
    found = re.search(r"[,;:!.—–]|\s-\s", tail)
    if found is None:
        return tail, "", ""
    return tail[: found.start()], found.group(0), tail[found.end() :]


_CODE_LINE = re.compile(
    r"^(?:\s{4,}|\t)\S|^\s*(?:#!|#SBATCH|\$ |>>> |module |srun |sbatch )|[;{}]\s*$|&&|\|\||==|\w=\S")


def _looks_like_signature(lines: list[str]) -> bool:
    """A short block of short lines: a name, a title, a lab, a phone number. Not a question, not code, not a
    sentence of eight words or more."""
    content = [l for l in lines if l.strip()]
    for line in content:
        stripped = line.strip()
        if len(line) > 90 or stripped.endswith("?") or (_CODE_LINE.search(line) and "://" not in line):
            return False
        if len(stripped.split()) >= 8 and stripped[-1] in ".:!":
            return False
    return len(content) <= 7


def _is_name_line(line: str, names: list[str], first_names: list[str]) -> bool:
    """The author's name, alone or with a few words ("Jean Dupont (PhD student)", "-- Julien"); not a sentence
    about them ("Jean Dupont m'a conseillé de vous écrire.")."""
    if len(line) > 60:
        return False
    lowered = line.lower()
    for name in names:
        if name.lower() in lowered:
            rest = lowered.replace(name.lower(), " ").strip(" ,!-")
            return not rest.strip(" .") or len(rest.split()) <= 3 and not rest.endswith((".", ":", "?"))
    return any(line.strip(" -.,!").lower() == first.lower() for first in first_names)


def strip_signature(text: str, closing_pattern: re.Pattern | None, author_names: list[str]) -> str:
    """The text without its signature: what follows the "-- " delimiter; a closing line ("Cordialement,", see
    `_is_closing_line`) or the author's name among the last lines, with a signature-like block after it; mobile
    footers. A message whose every line would go keeps its text."""
    lines = text.split("\n")
    content = [i for i, l in enumerate(lines) if l.strip()]
    footers = {i for i in content[-4:] if _MOBILE_FOOTER.match(lines[i])}
    lines = [l for i, l in enumerate(lines) if i not in footers]
    signed = "\n".join(lines)
    for i, line in enumerate(lines):
        if line.strip() == "--" or line == "-- ":
            if any(l.strip() for l in lines[:i]):
                lines = lines[:i]  # the standard delimiter: all that follows is signature
            break
    content = [i for i, l in enumerate(lines) if l.strip()]
    names = [n for n in author_names if n]
    first_names = [n.split()[0] for n in names if len(n.split()[0]) >= 2]
    for i in content[-8:]:  # a signature sits in the last lines
        if i == content[0]:
            continue  # "Thanks!" opening a message, or its only line, is its text
        line = lines[i].strip()
        is_closing = closing_pattern is not None and _is_closing_line(line, closing_pattern, names)
        if (is_closing or _is_name_line(line, names, first_names)) and _looks_like_signature(lines[i + 1 :]):
            lines = lines[:i]
            break
    unsigned = "\n".join(lines)
    return unsigned if any(ch.isalnum() for ch in unsigned) else signed


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
