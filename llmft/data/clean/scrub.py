"""Replace personal data and secrets with typed placeholders, counting each replacement by type.

Order matters: whole blocks and URLs first (a key block or `https://user:pass@host` holds text the later patterns
would cut in pieces), then tokens with a known shape, then `password: ...` style values, then the site's own
patterns (logins, project ids), e-mail addresses, IP addresses, phone numbers and last the names of the ticket's
participants. Placeholders are never matched again, so each secret is counted once.
"""

from __future__ import annotations

import ipaddress
import re
from collections import Counter
from functools import lru_cache
from typing import Callable

from llmft.data.readers.records import DataError

_URL_CHARS = r"[^\s<>\"'`]"
# (type, pattern, replacement, clues[, needs]): the replacement keeps the key of `password: value` and `TOKEN=value`.
# A pattern only runs on text holding one of its clues (lowercase text for the lowercase clues) and, when it has
# `needs`, one of these characters that every match holds: most messages hold none, and a substring test is a
# hundred times cheaper than a regular expression search. (A skipped pattern would have matched nothing.)
_KEYWORDS = ("pass", "pwd", "mdp", "secret", "token", "key")
_FIXED_PATTERNS: list[tuple] = [
    ("SECRET", r"-----BEGIN[A-Z0-9 ]*PRIVATE KEY(?: BLOCK)?-----.*?(?:-----END[A-Z0-9 ]*PRIVATE KEY(?: BLOCK)?-----|\n[ \t]*\n|\Z)", None,
     ("PRIVATE KEY",)),
    # URLs carrying credentials (user:password@) or tokens in the query string.
    ("URL", rf"\b[a-zA-Z][a-zA-Z0-9+.-]*://[^\s/@:<>\"']+:[^\s/@<>\"']+@{_URL_CHARS}*", None, ("://",)),
    ("URL", rf"\bhttps?://{_URL_CHARS}*?[?&#](?:[\w-]*(?:token|auth|key|sig|signature|session|sid|secret|password|"
            rf"passwd|pwd|code|credential)[\w-]*)={_URL_CHARS}*", None, ("://",)),
    # Tokens with a known shape: Hugging Face, GitHub, GitLab, AWS, OpenAI-style, Slack, JWT.
    ("SECRET", r"\bhf_[A-Za-z0-9]{20,}\b|\bgh[pousr]_[A-Za-z0-9]{20,}\b|\bgithub_pat_[A-Za-z0-9_]{20,}\b|"
               r"\bglpat-[A-Za-z0-9_-]{20,}\b|\b(?:AKIA|ASIA)[A-Z0-9]{16}\b|\bsk-[A-Za-z0-9_-]{20,}\b|"
               r"\bxox[abprs]-[A-Za-z0-9-]{10,}\b|\beyJ[\w-]{8,}\.eyJ[\w-]{8,}\.[\w-]{8,}", None,
     ("hf_", "gh", "glpat-", "AKIA", "ASIA", "sk-", "xox", "eyJ")),
    # `password: x`, `mot de passe : x`, `HF_TOKEN=x`, `aws_secret_access_key = x`: keep the key, hide the value.
    ("SECRET", r"(?i)((?:\b|(?<=_))(?:password|passwd|passphrase|pwd|mot de passe|mdp|secret|token|api[_ -]?key|"
               r"access[_ -]?key|secret[_ -]?key|client[_ -]?secret)\b[\w-]*[ \t]*[:=][ \t]*[\"']?)(?!<[A-Z_]+>)"
               r"([^\s\"'<>]{3,})", r"\1<SECRET>", _KEYWORDS, (":", "=")),
    ("SECRET", r"(\b[A-Z0-9_]*(?:TOKEN|SECRET|PASSWORD|PASSWD|API_KEY|APIKEY|ACCESS_KEY)[A-Z0-9_]*[ \t]*=[ \t]*[\"']?)"
               r"(?!<[A-Z_]+>)([^\s\"'<>]{3,})", r"\1<SECRET>", ("TOKEN", "SECRET", "PASS", "KEY"), ("=",)),
    # "my password is hunter2": only a value with a digit or a symbol, so "the password is expired" stays.
    ("SECRET", r"(?i)((?:\b|(?<=_))(?:password|passwd|mot de passe|mdp)\s+(?:is|est|=)\s+[\"']?)(?!<[A-Z_]+>)"
               r"(?=[^\s\"']*[\d!@#$%^&*_+=])([^\s\"'<>]{4,})", r"\1<SECRET>", ("pass", "mdp")),
]
_EMAIL = re.compile(r"[A-Za-z0-9._%+-]+(?:@|%40)[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}\b")
_IPV6_CANDIDATE = re.compile(r"(?<![\w:.])(?:[0-9A-Fa-f]{0,4}:){2,7}(?:[0-9A-Fa-f]{0,4}|\d{1,3}(?:\.\d{1,3}){3})(?![\w:])")
_IPV4 = re.compile(r"(?<![\w.])(?:(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)\.){3}(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)(?![\w]|\.\d)")
_CAPITALIZED_WORD = re.compile(r"\b[A-ZÀ-ÖØ-Þ][\w'’-]{2,}")
_REPEATED_NAME = re.compile(r"<NAME>(?:[ -]<NAME>)+")
_PHONES = [  # (pattern, a substring every match holds)
    # French: 06 12 34 56 78, 01.44.27.00.00, 0612345678; +33 (0)1 44 27 00 00
    (re.compile(r"(?<![\w+.])0[1-9](?:[ .-]?\d{2}){4}(?![\w])"), "0"),
    (re.compile(r"\+\d{1,3}[ .-]?\(0\)[ .-]?\d(?:[ .-]?\d{2}){4}(?!\d)"), "(0)"),
    # International: +49 30 1234567, +1 415 555 0100, +55 11 5555-0100 (8 to 15 digits)
    (re.compile(r"(?<![\w+])\+\d{1,3}(?:[ .-]?\(?\d{1,8}\)?){1,6}(?!\d)"), "+"),
    # North American: (415) 555-0100, 415-555-0100
    (re.compile(r"(?<![\w-])(?:\(\d{3}\)\s?|\d{3}[ .-])\d{3}[ .-]\d{4}(?![\w-])"), ""),
]
_DIGIT_DOT_DIGIT = re.compile(r"\d\.\d")  # in every IPv4 address
_NON_DIGITS = re.compile(r"\D+")
_NAME_STOPWORDS = {"the", "and", "for", "von", "van", "der", "den", "des", "les", "del", "dos", "bin", "ben"}


class Scrubber:
    def __init__(self, scrub_cfg):
        # (kind, pattern, replacement, lowercase clues, other clues, needs, line by line): every fixed pattern but the
        # key block matches within one line (no newline in any of its character classes, and what a lookaround or
        # `\b` sees past the line is a newline, as at the text's ends), so it runs on the lines that hold a clue only.
        self.patterns = [
            (kind, re.compile(pattern, re.S) if "BEGIN" in pattern else re.compile(pattern), repl,
             tuple(c for c in clues if c.islower()), tuple(c for c in clues if not c.islower()), (needs or [()])[0],
             "BEGIN" not in pattern)
            for kind, pattern, repl, clues, *needs in _FIXED_PATTERNS
        ]
        self.site_patterns: list[tuple[str, re.Pattern]] = []
        for name, pattern in dict(scrub_cfg.patterns).items():
            try:
                self.site_patterns.append((str(name).upper(), re.compile(pattern)))
            except re.error as error:
                raise DataError(f"data.scrub.patterns.{name} is not a valid regular expression ({error}).") from None
        self.keep_ips = set(scrub_cfg.keep_ips)
        self.counts: Counter = Counter()

    def _replace(self, text: str, kind: str, pattern: re.Pattern, repl: str | Callable | None) -> str:
        if kind == "URL":
            repl = _url_placeholder  # the sentence's final "." or ")" is not part of the URL
        text, n = pattern.subn(repl if repl is not None else f"<{kind}>", text)
        self.counts[kind] += n
        return text

    def _replace_in_lines(self, text: str, kind: str, pattern: re.Pattern, repl, lower_clues: tuple[str, ...],
                          clues: tuple[str, ...], needs: tuple[str, ...]) -> str:
        """`_replace` on the lines of `text` that hold a clue (and one of `needs`): a regular expression that cannot
        start on a fixed word (`(?i)`, a lookbehind first) costs far more per character than these substring tests."""
        lines = text.split("\n")
        for number, line in enumerate(lines):
            if needs and not any(map(line.__contains__, needs)):
                continue
            if any(map(line.__contains__, clues)) or (lower_clues and any(map(line.lower().__contains__, lower_clues))):
                lines[number] = self._replace(line, kind, pattern, repl)
        return "\n".join(lines)

    def _ip(self, match: re.Match, version: int) -> str:
        candidate = match.group(0)
        try:
            address = ipaddress.ip_address(candidate)
        except ValueError:
            return candidate
        if address.version != version or candidate in self.keep_ips:
            return candidate
        self.counts["IP"] += 1
        return "<IP>"

    def _phone(self, match: re.Match) -> str:
        digits = sum(c.isdigit() for c in match.group(0))
        if not 8 <= digits <= 15:
            return match.group(0)
        self.counts["PHONE"] += 1
        return "<PHONE>"

    def scrub(self, text: str, names: list[str] | None = None) -> str:
        lowered = text.lower()
        for kind, pattern, repl, lower_clues, clues, needs, by_line in self.patterns:
            # (any(map(str.__contains__ ...)): the substring tests without a Python frame per clue)
            if (any(map(lowered.__contains__, lower_clues)) or any(map(text.__contains__, clues))) and \
                    (not needs or any(map(text.__contains__, needs))):
                text = self._replace_in_lines(text, kind, pattern, repl, lower_clues, clues, needs) if by_line \
                    else self._replace(text, kind, pattern, repl)
        for kind, pattern in self.site_patterns:  # before e-mail: `abc12de@jean-zay.idris.fr` is a login on a host
            text = self._replace(text, kind, pattern, None)
        if "@" in text or "%40" in text:
            text = self._replace(text, "EMAIL", _EMAIL, None)
        if "::" in text or text.count(":") >= 7:
            text = _IPV6_CANDIDATE.sub(lambda m: self._ip(m, 6), text)
        if _DIGIT_DOT_DIGIT.search(text):
            text = _IPV4.sub(lambda m: self._ip(m, 4), text)
        if _num_digits(text) >= 8:  # a phone number has 8 digits or more (`_phone`)
            for pattern, clue in _PHONES:
                if clue in text:
                    text = pattern.sub(self._phone, text)
        if names:
            variants = name_variants(tuple(names))
            before = text.count("<NAME>")
            if any(map(text.__contains__, variants)):  # `_hide_names` only hides a variant
                text = _CAPITALIZED_WORD.sub(lambda m: _hide_names(m.group(0), variants), text)
            if "<NAME>" in text:
                text = _REPEATED_NAME.sub("<NAME>", text)  # "Marie Curie": one name
            self.counts["NAME"] += text.count("<NAME>") - before
        return text


def _num_digits(text: str) -> int:
    """How many characters `\\d` matches (Unicode decimal digits)."""
    return sum(map(text.count, "0123456789")) if text.isascii() else len(_NON_DIGITS.sub("", text))


def _url_placeholder(match: re.Match) -> str:
    url = match.group(0)
    trailing = len(url) - len(url.rstrip(".,;:!?)]}'"))
    return "<URL>" + (url[len(url) - trailing :] if trailing else "")


def _hide_names(word: str, variants: frozenset[str]) -> str:
    """"Curie" -> "<NAME>", "Curie's" -> "<NAME>'s", "Jean-Curie" -> "Jean-<NAME>" (when Curie is a name)."""
    if word in variants:
        return "<NAME>"
    if "'" not in word and "’" not in word and "-" not in word:
        return word
    parts = re.split(r"(['’-])", word)
    return "".join("<NAME>" if part in variants else part for part in parts)


@lru_cache(maxsize=4096)
def name_variants(names: tuple[str, ...]) -> frozenset[str]:
    """Each capitalized part of three letters or more of the names, as written and in capitals ("MOREAU")."""
    variants = set()
    for name in names:
        for part in re.split(r"[\s,\"']+", name):
            part = part.strip(".()")
            if len(part) >= 3 and part[0].isupper() and part.lower() not in _NAME_STOPWORDS:
                variants |= {part, part.upper()}
    return frozenset(variants)
