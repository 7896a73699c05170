"""Replace personal data and secrets with typed placeholders, counting each replacement by type.

Order matters: whole blocks and URLs first (a key block or `https://user:pass@host` holds text the later patterns
would cut in pieces), then tokens with a known shape, then `password: ...` style values, then the site's own
patterns (logins, project ids), e-mail addresses, IP addresses, the numbers with a checksum (IBANs, French social
security numbers, payment cards: before the phone numbers, which would eat a card's groups), phone numbers and last
the names of the ticket's participants and those the text writes as names (greetings, signatures, reply headers).
Placeholders are never matched again, so each secret is counted once. `data.scrub.keep` phrases are masked before the
first pattern and put back after the last, so no pattern replaces them.
"""

from __future__ import annotations

import ipaddress
import re
import unicodedata
from collections import Counter
from functools import lru_cache
from typing import Callable, Iterable

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
    ("SECRET", r"(?i)((?:\b|(?<=_))(?:password|passwd|mot de passe|mdp)[^\S\n]+(?:is|est|=)[^\S\n]+[\"']?)(?!<[A-Z_]+>)"
               r"(?=[^\s\"']*[\d!@#$%^&*_+=])([^\s\"'<>]{4,})", r"\1<SECRET>", ("pass", "mdp")),
]
_EMAIL = re.compile(r"[A-Za-z0-9._%+-]+(?:@|%40)[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}\b")
_IPV6_CANDIDATE = re.compile(r"(?<![\w:.])(?:[0-9A-Fa-f]{0,4}:){2,7}(?:[0-9A-Fa-f]{0,4}|\d{1,3}(?:\.\d{1,3}){3})(?![\w:])")
_IPV4 = re.compile(r"(?<![\w.])(?:(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)\.){3}(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)(?![\w]|\.\d)")
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

# Numbers with a checksum: a candidate of the right shape is replaced only when its check digits hold, so job ids,
# timestamps, serial numbers and phone numbers (another shape, or a failed check) stay. One pattern finds the three
# kinds, so the text is read once, and it starts on a digit (an IBAN on its first check digit, the country code
# checked behind it), so the regular expression engine tries the digits only (a set of letters and digits, a repeat or
# a lookaround first would make it try far more places); a lookbehind drops a start inside a word or a number
# (`x4970...`, `1.4970...`, `+33...`, the middle of a job id).
_CHECKSUMMED = re.compile(
    r"\d(?:"
    # IBAN: country code, 2 check digits, the account (letters and digits), in one piece or in groups of 4.
    r"(?<=[A-Z][A-Z]\d)(?<![\w.,+/-][A-Z][A-Z]\d)(?P<IBAN>\d(?:[ \u00a0]?[A-Z0-9]{4}){2,7}(?:[ \u00a0]?[A-Z0-9]{1,4})?"
    r"(?!\w))"
    r"|(?<![\w.,+/-]\d)(?:"
    # French social security number (NIR): sex, year, month, department (2A/2B: Corsica), commune, order, 2-digit key.
    r"(?<=[1278])(?P<NIR>[ \u00a0]?\d{2}[ \u00a0]?(?:0[1-9]|1[0-2]|[2-9]\d)[ \u00a0]?(?:\d{2}|2[AB])[ \u00a0]?\d{3}"
    r"[ \u00a0]?\d{3}[ \u00a0]?\d{2}(?![\w]|[.,/:-]\d))"
    # Payment card: 16 digits in groups of 4 (a 17-19 digit card adds a fifth group), 4-6-5 or 4-6-4 (Amex, Diners),
    # or 13-19 digits in one piece; spaces, no-break spaces or dashes between the groups, the same throughout.
    r"|(?P<CARD>\d{3}(?:(?P<sep>[ \u00a0-])\d{4}(?P=sep)\d{4}(?P=sep)\d{4}(?:(?P=sep)\d{1,3})?"
    r"|(?P<sep6>[ \u00a0-])\d{6}(?P=sep6)\d{4,5}|\d{9,15})(?![\w]|[.,/:-]\d))"
    r"))")
# The length of an IBAN per country (the SWIFT registry, and the countries whose banks use the form unofficially).
_IBAN_LENGTHS = {
    "AD": 24, "AE": 23, "AL": 28, "AT": 20, "AZ": 28, "BA": 20, "BE": 16, "BG": 22, "BH": 22, "BI": 27, "BR": 29,
    "BY": 28, "CH": 21, "CR": 22, "CY": 28, "CZ": 24, "DE": 22, "DJ": 27, "DK": 18, "DO": 28, "EE": 20, "EG": 29,
    "ES": 24, "FI": 18, "FK": 18, "FO": 18, "FR": 27, "GB": 22, "GE": 22, "GI": 23, "GL": 18, "GR": 27, "GT": 28,
    "HN": 28, "HR": 21, "HU": 28, "IE": 22, "IL": 23, "IQ": 23, "IS": 26, "IT": 27, "JO": 30, "KW": 30, "KZ": 20,
    "LB": 28, "LC": 32, "LI": 21, "LT": 20, "LU": 20, "LV": 21, "LY": 25, "MC": 27, "MD": 24, "ME": 22, "MK": 19,
    "MN": 20, "MR": 27, "MT": 31, "MU": 30, "NI": 28, "NL": 18, "NO": 15, "OM": 23, "PK": 24, "PL": 28, "PS": 29,
    "PT": 25, "QA": 29, "RO": 24, "RS": 22, "RU": 33, "SA": 24, "SC": 31, "SD": 18, "SE": 24, "SI": 19, "SK": 24,
    "SM": 27, "SO": 23, "ST": 25, "SV": 28, "TL": 23, "TN": 24, "TR": 26, "UA": 29, "VA": 22, "VG": 24, "XK": 20,
    "YE": 30, "AO": 25, "BF": 28, "BJ": 28, "CF": 27, "CG": 27, "CI": 28, "CM": 27, "CV": 25, "DZ": 26, "GA": 27,
    "GQ": 27, "GW": 25, "IR": 26, "KM": 27, "MA": 28, "MG": 27, "ML": 28, "MZ": 25, "NE": 28, "SN": 28, "TD": 27,
    "TG": 28, "HT": 27,
}

# Names. A participant's full name is replaced wherever it stands; one part of it alone (a first or a last name)
# where it stands as a name: not glued to another capitalised word ("Jean Zay", "Saint-Jean", "Laboratoire Jean
# Kuntzmann"), unless that word is a title or a greeting ("Dear Dr Dupont", "Merci Jean") or only starts the sentence.
# Words of a display name that make it a role account or an organisation, never a person's name:
_ROLE_WORDS = frozenset("""
    assistance support helpdesk help desk hotline service services équipe equipe team teams staff admin admins
    administrator administrateur administration noreply no-reply donotreply do-not-reply ne-pas-repondre
    ne-pas-répondre info infos contact contacts postmaster mailer-daemon daemon root system bot robot notification
    notifications ticket tickets jira gitlab github formation formations training newsletter mailing list liste
    secrétariat secretariat accueil direction dsi office bureau group groupe department département user users
    utilisateurs utilisateur laboratoire laboratory lab institut institute université university universite centre
    center computing calcul operations ops security sécurité sécurite cluster hpc
""".split())
# Titles (compared in lowercase).
_TITLES = frozenset("""
    mr mr. mrs mrs. ms ms. miss mx dr dr. prof prof. pr pr. sir madam madame mme mme. mlle mlle. mademoiselle monsieur
    m. docteur professeur professor herr frau dame señor señora sr sra signor signora dott
""".split())
# Greetings: with the titles, the words before a name that do not make it part of a longer proper name.
_GREETING_WORDS = ("bonjour", "bonsoir", "salut", "coucou", "hello", "hi", "hey", "dear", "cher", "chère", "chers",
                   "chères", "hallo", "liebe", "lieber", "merci", "thanks", "thank you", "good morning",
                   "good afternoon", "good evening", "buongiorno", "hola", "welcome", "bienvenue")
_LEAD_WORDS = _TITLES | frozenset(w for w in _GREETING_WORDS if " " not in w) | \
    {"thank", "cheers", "bravo", "ok", "oui", "non", "yes", "no", "et", "and"}
# Closings after which a signature's first line is a name (lowercase; "--" is the signature delimiter).
_CLOSINGS = ("cordialement", "bien cordialement", "très cordialement", "cdlt", "bien à vous", "bien à toi",
             "salutations", "sincères salutations", "meilleures salutations", "amicalement", "bien amicalement",
             "bonne journée", "bonne soirée", "merci", "merci d'avance", "merci beaucoup", "merci encore",
             "à bientôt", "regards", "best regards", "kind regards", "warm regards", "many regards", "best wishes",
             "best", "cheers", "thanks", "thank you", "many thanks", "thanks again", "thanks in advance", "sincerely",
             "yours sincerely", "yours truly", "yours", "all the best", "respectfully", "mit freundlichen grüßen",
             "mit freundlichen grüssen", "freundliche grüße", "viele grüße", "beste grüße", "liebe grüße", "grüße",
             "saludos", "un saludo", "cordiali saluti", "distinti saluti")
_CLOSING_WORDS = frozenset(_CLOSINGS)
_SIGN_OFFS = ("cordialement", "cdlt", "bien à vous", "salutations", "amicalement", "regards", "best wishes",
              "sincerely", "cheers", "grüßen", "grüssen", "grüße", "saludos", "saluti")  # only ever end a mail
_CLOSING_LINES = frozenset(c for closing in _CLOSINGS for c in (closing, closing.capitalize(), closing.upper())) | \
    {"--"}
# Words that a greeting or a signature holds where a name could stand, and that are not one.
_NOT_NAMES = frozenset("""
    all everyone everybody there colleague colleagues collègue collègues friend friends folks guys world
    tous toutes vous toi madame monsieur mesdames messieurs sir madam customer client clients the a an un une
    bonne bon belle excellent excellente merci thanks thank regards best cordialement bonjour hello hi dear
    cordially kind warm sent envoyé from am on you again so much lot beaucoup encore infiniment bien tout très
    both anyway okay
""".split())
# Lowercase words inside a name ("Charles de Gaulle", "Ludwig van Beethoven"), and words a display name holds that
# are no part of a name.
_NAME_PARTICLES = ("de", "du", "des", "da", "di", "del", "della", "der", "den", "van", "von", "la", "le", "les", "dos",
                   "das", "ten", "ter", "zu", "af", "bin", "ben", "ibn", "al", "el")
_PARTICLES = frozenset(_NAME_PARTICLES + ("y", "e", "st", "st.", "the", "and", "for"))
# Where a text writes a name as a name. At a line's start (a Python loop over the lines: a regular expression's
# alternation of every greeting and closing, tried at each line, costs more): a greeting ("Bonjour Marie,", "Dear Dr
# Dupont,"), a From: line ("From: Marie Curie <...>"), a closing alone on its line or the signature delimiter (the
# name on the next line). A reply header ("Marie Curie <...> a écrit :", "On Mon, 13 Jan 2025, Marie Curie <...>
# wrote:"), found from its verb. After a comma or "--", a signature when a text's lines were joined ("... Cordialement,
# Rémi Lacroix ...", "... -- Émilie Rousseau ..."). These patterns start with a fixed character, which the regular
# expression engine finds by a fast search; the name is read after it, and kept when `_name_words` finds it one.
_UPPER = "A-ZÀ-ÖØ-Þ"
_NAME_TOKEN = rf"[{_UPPER}][\w'’.-]*"
_NAME_TOKENS = rf"((?:{_NAME_TOKEN}[ \t]+){{0,3}}{_NAME_TOKEN})"
_GREETING_HEADS = frozenset(w.split()[0].capitalize() for w in _GREETING_WORDS)  # a line's first word
_FROM_HEADS = frozenset(("From:", "From", "De", "De:", "Von:", "Expéditeur", "Expéditeur:", "Envoyé"))
_LINE_HEADS = _GREETING_HEADS | _FROM_HEADS  # (a closing's line is shorter than 40 characters)
_REPLY_VERBS = ("a écrit", "wrote", "schrieb")
_REPLY_NAME = re.compile(rf"{_NAME_TOKENS}[ \t]*(?:<[^>\n]*>|\[[^\]\n]*\]|\([^)\n]*\))?[ \t]*"
                         rf"(?:{'|'.join(_REPLY_VERBS)})\b")
_AFTER_COMMA = re.compile(rf",[ \t]+(?=[{_UPPER}])")
_AFTER_DASHES = re.compile(rf"--[ \t]+(?=[{_UPPER}])")
_GREETED_NAME = re.compile(rf"{_NAME_TOKENS}[ \t]*(?:[,!:;]|\.?[ \t]*$)")  # "Marie," "Dr Dupont!" "John Smith"
_GREETED = re.compile(rf"[^ \t]+(?:[ \t]+(?:morning|afternoon|evening|you))?[ \t]+{_GREETED_NAME.pattern}")
# "From: Marie Curie <...>", "De : Marie Curie [mailto:...]", or "From: Marie Curie" above "Sent:" or "Date:".
_SENDER = re.compile(rf"(?:From|De|Von|Expéditeur|Envoyé par)[ \t]*:[ \t]*\"?{_NAME_TOKENS}\"?[ \t]*(<|\[mailto:|$)")
_HEADER_FIELDS = ("Sent:", "Date:", "To:", "Envoyé :", "Envoyé:", "À :", "À:", "Gesendet:", "An:", "Cc:", "Subject:",
                  "Objet :", "Objet:", "Betreff:")
_WORD_CHARS = re.compile(r"[\w'’.-]+")
# Capitalised words that start a sentence rather than continue a proper name, in a text whose lines were joined.
_SENTENCE_STARTS = frozenset("""
    je j'ai j’ai nous vous il elle on ils elles le la les un une ce cet cette ces mon ma mes votre vos notre nos
    pour merci voici est-ce pouvez pourriez pourrais serait c'est c’est i i'm i’m we you your our my the this that
    these there here please thanks thank can could would is it do does did hello hi bonjour cordialement
""".split()) | _CLOSING_WORDS | _LEAD_WORDS
_NOT_GLUE = _LEAD_WORDS | frozenset(_NAME_PARTICLES)  # before a name part
_ELIDED = frozenset(("c", "d", "j", "l", "m", "n", "s", "t", "qu", "jusqu", "lorsqu", "puisqu"))
_MASK_BASE, _MAX_MASKS = 0xE000, 6400  # the private-use characters that mask the `keep` phrases (U+E000-U+F8FF)


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
        self.names_in_text = bool(scrub_cfg.names_in_text)
        # data.scrub.keep: each phrase is masked by one private-use character while the patterns run (a character no
        # pattern matches, nor takes for a word character), so nothing replaces it; longest first ("Jean Zay" before
        # "Jean").
        self.keep = tuple(sorted({str(phrase) for phrase in scrub_cfg.keep if str(phrase).strip()}, key=len,
                                 reverse=True))
        if len(self.keep) > _MAX_MASKS:
            raise DataError(f"data.scrub.keep holds {len(self.keep)} phrases: at most {_MAX_MASKS}.")
        self._mask_of = {phrase: chr(_MASK_BASE + i) for i, phrase in enumerate(self.keep)}
        self._unmask = {ord(mask): phrase for phrase, mask in self._mask_of.items()}
        self._keep_pattern = re.compile("|".join(map(re.escape, self.keep))) if self.keep else None
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
        chosen = [number for number, line in enumerate(lines)
                  if (not needs or any(map(line.__contains__, needs))) and
                  (any(map(line.__contains__, clues)) or
                   (lower_clues and any(map(line.lower().__contains__, lower_clues))))]
        if not chosen:
            return text
        # the chosen lines in one search (a call per line cost more than the search): no match of these patterns
        # holds a newline, nor does a replacement, so the lines come back one for one
        replaced = self._replace("\n".join([lines[number] for number in chosen]), kind, pattern, repl).split("\n")
        for number, line in zip(chosen, replaced):
            lines[number] = line
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

    def _checksummed(self, text: str) -> str:
        """The IBANs, NIRs and payment cards of `text` as their placeholders, where their check digits hold."""
        pieces, done = [], 0
        for match in _CHECKSUMMED.finditer(text):
            kind, start, end = match.lastgroup, match.start(), match.end()
            if kind == "IBAN":
                start -= 2  # the country code
                value = text[start:end]
                length = _IBAN_LENGTHS.get(value[:2])
                if length is None:
                    continue
                end, seen = start, 0  # the IBAN's own characters: the match may hold more ("... 189 BIC")
                while seen < length and end < match.end():
                    seen += text[end] not in " \u00a0"
                    end += 1
                if seen < length or (end < match.end() and text[end] not in " \u00a0"):
                    continue
                iban = text[start:end].replace(" ", "").replace("\u00a0", "")
                if int("".join(str(int(c, 36)) for c in iban[4:] + iban[:4])) % 97 != 1:
                    continue
            elif kind == "NIR":
                digits = match.group(0).replace(" ", "").replace("\u00a0", "")
                if 97 - int(digits[:13].replace("2A", "19").replace("2B", "18")) % 97 != int(digits[13:]):
                    continue
            else:
                digits = match.group(0).replace(" ", "").replace("-", "").replace("\u00a0", "")
                if not _is_card(digits):
                    if not (match.group("sep") and len(digits) > 16 and _is_card(digits[:16])):
                        continue
                    end = start + 19  # four groups of 4, then another number ("cvv 123")
            self.counts[kind] += 1
            pieces += [text[done:start], f"<{kind}>"]
            done = end
        return "".join(pieces) + text[done:] if pieces else text

    def _mask_kept(self, match: re.Match) -> str:
        text, start, end = match.string, match.start(), match.end()
        if (start and (text[start - 1].isalnum() or text[start - 1] == "_")) or \
                (end < len(text) and (text[end].isalnum() or text[end] == "_")):
            return match.group(0)  # inside a longer word
        return self._mask_of[match.group(0)]

    def names_in(self, texts: Iterable[str]) -> list[str]:
        """The names that `texts` write as names (`names_written_in`), for the caller to scrub a whole conversation
        with: the name a question signs is hidden in the answer too. [] when data.scrub.names_in_text is off."""
        names: list[str] = []
        for text in texts if self.names_in_text else ():
            names += [name for name in names_written_in(text) if name not in names]
        return names

    def scrub(self, text: str, names: list[str] | None = None) -> str:
        masked = self._keep_pattern is not None and any(map(text.__contains__, self.keep)) and \
            (text.isascii() or not any(map(text.__contains__, self._mask_of.values())))  # (holding a mask: not masked)
        if masked:
            text = self._keep_pattern.sub(self._mask_kept, text)
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
        num_digits = _num_digits(text)
        if num_digits >= 10:  # an IBAN holds 10 digits or more, a NIR or a card 13 or more
            text = self._checksummed(text)
        if num_digits >= 8:  # a phone number has 8 digits or more (`_phone`)
            for pattern, clue in _PHONES:
                if clue in text:
                    text = pattern.sub(self._phone, text)
        if self.names_in_text:
            written = names_written_in(text)
            if written:
                names = [*(names or ()), *written]
        if names:
            before = text.count("<NAME>")
            text = _hide_names(text, name_parts(tuple(names), self.keep))
            if "<NAME> <NAME>" in text or "<NAME>-<NAME>" in text:
                text = _REPEATED_NAME.sub("<NAME>", text)  # "<NAME> <NAME>": one name
            self.counts["NAME"] += text.count("<NAME>") - before
        if masked:
            text = text.translate(self._unmask)
        return text


def _num_digits(text: str) -> int:
    """How many characters `\\d` matches (Unicode decimal digits)."""
    return sum(map(text.count, "0123456789")) if text.isascii() else len(_NON_DIGITS.sub("", text))


def _url_placeholder(match: re.Match) -> str:
    url = match.group(0)
    trailing = len(url) - len(url.rstrip(".,;:!?)]}'"))
    return "<URL>" + (url[len(url) - trailing :] if trailing else "")


def _is_card(digits: str) -> bool:
    """A payment card number: 13 to 19 digits, an issuer's first digits (3 to 6; 22 to 27 for 16 digits), Luhn."""
    if not 13 <= len(digits) <= 19:
        return False
    if not ("3" <= digits[0] <= "6" or ("22" <= digits[:2] <= "27" and len(digits) == 16)):
        return False
    total = 0
    for i, digit in enumerate(reversed(digits)):
        value = int(digit) * (2 if i % 2 else 1)
        total += value - 9 if value > 9 else value
    return total % 10 == 0


def _hide_names(text: str, variants: frozenset[str]) -> str:
    """The spans of name parts of `text` as `<NAME>` where they stand as a name (the comment above `_ROLE_WORDS`).
    The parts are found by substring search, which needs no regular expression compiled per conversation."""
    hits = []
    for variant in variants:
        at = text.find(variant)
        while at >= 0:
            hits.append((at, at + len(variant)))
            at = text.find(variant, at + 1)
    if not hits:
        return text
    hits.sort(key=lambda hit: (hit[0], -hit[1]))  # the longest part first where two start together
    spans: list[list[int]] = []  # [start, end, number of parts]: parts separated by blanks only
    for start, end in hits:
        if spans and start < spans[-1][1] or not _starts_word(text, start) or not _ends_word(text, end):
            continue  # inside a part already found, or inside a longer word ("Jeanne", "Jean-Zay", "Saint-Jean")
        gap = text[spans[-1][1]:start] if spans else None
        if gap is not None and (not gap.strip(" \t\u00a0") or _particles_only(gap)):
            spans[-1][1:] = [end, spans[-1][2] + 1]
        else:
            spans.append([start, end, 1])
    pieces, done = [], 0
    for start, end, num_parts in spans:
        if num_parts >= 2 or not (_capitalised_word_after(text, end) or _capitalised_word_before(text, start)):
            pieces += [text[done:start], "<NAME>"]  # a full name, or a part alone; not "Jean Zay", "Formation X"
            done = end
    return "".join(pieces) + text[done:] if pieces else text


def _particles_only(gap: str) -> bool:
    """Whether the text between two name parts holds blanks and particles only (" de ", " van der ")."""
    words = gap.split()
    return gap[:1] in " \t\u00a0" and gap[-1:] in " \t\u00a0" and 0 < len(words) <= 2 and \
        all(word.lower() in _NAME_PARTICLES for word in words)


def _starts_word(text: str, start: int) -> bool:
    """No letter, digit or hyphen just before `start`; an apostrophe only after an elided word ("d'Émilie")."""
    if not start:
        return True
    before = text[start - 1]
    return not (before.isalnum() or before in "_-") and (before not in "'’" or _elided(text, start - 1))


def _ends_word(text: str, end: int) -> bool:
    """No letter or digit just after `end`, nor a hyphen joining another word; "'s" ends a name ("Jean's")."""
    if end >= len(text):
        return True
    after = text[end]
    if after.isalnum() or after == "_":
        return False
    if after == "-":
        return not (end + 1 < len(text) and text[end + 1].isalnum())
    return after not in "'’" or text[end + 1:end + 2] == "s" and not text[end + 2:end + 3].isalnum()


def _elided(text: str, apostrophe: int) -> bool:
    """"d'Émilie", "l'Émilie", "qu'Émilie": the apostrophe ends an elided word."""
    start = apostrophe
    while start > 0 and text[start - 1].isalpha():
        start -= 1
    return text[start:apostrophe].lower() in _ELIDED


def _is_capital(char: str) -> bool:
    return char.isupper() or _MASK_BASE <= ord(char) < _MASK_BASE + _MAX_MASKS  # a kept phrase: a proper name


def _capitalised_word_after(text: str, end: int) -> bool:
    i = end
    while i < len(text) and text[i] in " \t\u00a0":
        i += 1
    if i == end or i >= len(text) or not _is_capital(text[i]):
        return False
    if not text[i].isalpha():
        return True  # a kept phrase
    word = _WORD_CHARS.match(text, i).group(0).rstrip(".")
    return len(word) >= 2 and word.lower() not in _SENTENCE_STARTS and word.lower() not in _NAME_PARTICLES


def _capitalised_word_before(text: str, start: int) -> bool:
    i = start
    while i > 0 and text[i - 1] in " \t\u00a0":
        i -= 1
    if i == start or i == 0:
        return False
    if _MASK_BASE <= ord(text[i - 1]) < _MASK_BASE + _MAX_MASKS:
        return True
    j = i
    while j > 0 and (text[j - 1].isalnum() or text[j - 1] in "'’-._"):
        j -= 1
    word = text[j:i].strip("'’-._")
    if len(word) < 2 or not word[0].isupper() or word.lower() in _NOT_GLUE:
        return False  # "Dear Dr Dupont", "Merci Jean", "de La Fontaine"
    # a capitalised word that only starts its sentence ("Merci Jean", "Thanks Jean", "Ok Jean")
    k = j
    while k > 0 and text[k - 1] in " \t\u00a0>*•-–\"«(":
        k -= 1
    return not (k == 0 or text[k - 1] in "\n.!?…:;")


@lru_cache(maxsize=4096)
def _name_words(candidate: str) -> tuple[str, ...]:
    """The words of a name found in a text ("Dr Marie Curie" -> ["Marie", "Curie"]), or [] when it is no name: a role,
    a common word, an acronym alone, a word with capitals inside ("PyTorch")."""
    words = [w.strip(",;:!?\"'’()") for w in candidate.split()]
    while words and words[0].lower() in _TITLES:  # "Dr", "Dr.", "Mme"
        words = words[1:]
    words = [w.rstrip(".") for w in words]
    if not words or len(words) > 4:
        return ()
    for word in words:
        if word in _NAME_PARTICLES:
            continue  # "de" in "Charles de Gaulle"
        lowered = word.lower()
        if any(piece in _ROLE_WORDS or piece in _NOT_NAMES or piece in _LEAD_WORDS
               for piece in re.split(r"['’]", lowered)) or lowered in _CLOSING_WORDS:
            return ()
        if any(c.isupper() for c in _inner(word)) and not word.isupper():
            return ()
    if not any(w[:1].isupper() and not w.isupper() and len(w) >= 2 for w in words):
        return ()  # "IDRIS", "J.", "HPC"
    return tuple(words)


def _inner(word: str) -> str:
    """The letters of a word that are lowercase in a name ("Jean-Pierre" -> "eanierre", "O'Brien" -> "rien", "McKay"
    -> "ay")."""
    pieces = re.split(r"[-'’]", word)
    return "".join(piece[2:] if piece[:2] == "Mc" else piece[3:] if piece[:3] == "Mac" else piece[1:]
                   for piece in pieces)


@lru_cache(maxsize=4096)
def _signature_name(line: str, single: bool = True) -> str:
    """The name that starts a signature's first line: the whole line when it is only a name ("Marie Curie"), a name
    before a separator ("Marie Curie, IDRIS", "Marie Curie | CNRS"), or the first two words of a flattened signature
    ("Rémi Lacroix Ingénieur support ..."); a name of one word ("Pierre") only where `single`."""
    tokens = _SIGNATURE_WORDS.match(line)
    if tokens is None:
        return ""
    words, rest = tokens.group(0).split(), line[tokens.end():].strip()
    capitalised = [w for w in words if w[0].isupper()]
    if len(capitalised) < 2 and not single:
        return ""
    if not rest or rest[0] in ",|(<[/–-•·":
        return " ".join(words) if len(capitalised) <= 3 or not rest else " ".join(capitalised[:2])
    if len(capitalised) >= 3 or (len(capitalised) == 2 and not rest[0].islower()):
        return " ".join(capitalised[:2])  # a flattened signature: the name, then the title or the phone
    return ""


_SIGNATURE_WORDS = re.compile(rf"{_NAME_TOKEN}(?:[ \t]+(?:(?:{'|'.join(_NAME_PARTICLES)})[ \t]+)*"
                              rf"{_NAME_TOKEN}){{0,3}}")


def names_written_in(text: str) -> list[str]:
    """The names a text writes as names: after a greeting ("Bonjour Marie,", "Dear Dr Dupont,"), in a signature
    ("Cordialement,\nMarie Curie", "-- \nMarie Curie"), in a reply header ("..., Marie Curie <...> a écrit :") or a
    quoted From: line. For formats without authors (CSV, chat JSONL) these are the conversation's participants."""
    found, greeting = [], []  # (a greeting names one or two words: "Bonjour Jean,", "Dear Dr John Smith,")
    lines = text.split("\n")
    for number in [i for i, line in enumerate(lines) if len(line) < 40 or
                   line.lstrip(" \t>*").partition(" ")[0] in _LINE_HEADS]:
        stripped = lines[number].strip(" \t>*")
        head = stripped.partition(" ")[0]
        greeted = head in _GREETING_HEADS and _GREETED.match(stripped)
        sender = head in _FROM_HEADS and _SENDER.match(stripped)
        if sender and not sender.group(2) and not (number + 1 < len(lines) and
                                                   lines[number + 1].lstrip(" \t>*").startswith(_HEADER_FIELDS)):
            sender = None  # "De : Python" is no header: a name alone on its line needs the header's next field
        if greeted:
            greeting.append(greeted.group(1))
        elif sender:
            found.append(sender.group(1))
        elif len(stripped) < 40 and (stripped.rstrip(" \t,.!") in _CLOSING_LINES or
                                     stripped.rstrip(" \t,.!").lower() in _CLOSING_LINES or
                                     stripped.endswith((",", "!")) and stripped.lower().startswith(_CLOSINGS)):
            following = [rest.strip(" \t>") for rest in lines[number + 1:number + 3]]
            found.append(_signature_name(following[0] or following[-1]) if following else "")
    for verb in _REPLY_VERBS:  # "Marie Curie <...> a écrit :" at a line's start
        at = text.find(verb)
        while at >= 0:
            end = _line_end(text, at)
            name = _REPLY_NAME.match(text[text.rfind("\n", 0, at) + 1:end].lstrip(" \t>"))
            found += [name.group(1)] if name else []
            at = text.find(verb, end)
    for comma in _AFTER_COMMA.finditer(text):
        start, end = comma.start(), comma.end()
        before, rest = text[max(0, start - 30):start].lower(), text[end:_line_end(text, end)]
        if before.endswith(_CLOSINGS) and _word_ends(before, _CLOSINGS):  # "Cordialement, Rémi Lacroix ..."
            # one word alone only after a sign-off ("Cordialement, Pierre", not "Thanks, Python")
            found.append(_signature_name(rest, before.endswith(_SIGN_OFFS)))
        elif before.endswith(_GREETING_WORDS) and _word_ends(before, _GREETING_WORDS):
            greeted = _GREETED_NAME.match(rest)  # "Hello, John,"
            greeting += [greeted.group(1)] if greeted else []
        elif any(map(rest.__contains__, _REPLY_VERBS)):
            name = _REPLY_NAME.match(text, end)  # "On ..., Marie Curie <...> wrote:"
            found += [name.group(1)] if name else []
    found += [_signature_name(text[dashes.end():_line_end(text, dashes.end())], False)
              for dashes in _AFTER_DASHES.finditer(text) if dashes.start() == 0 or text[dashes.start() - 1] in " \t>"]
    names = []
    for candidate, most in [(c, 3) for c in found] + [(c, 2) for c in greeting]:
        words = _name_words(candidate) if candidate else ()
        if 0 < sum(w[:1].isupper() for w in words) <= most and " ".join(words) not in names:
            names.append(" ".join(words))
    return names


def _line_end(text: str, start: int) -> int:
    end = text.find("\n", start)
    return len(text) if end < 0 else end


def _word_ends(before: str, words: tuple[str, ...]) -> bool:
    """Whether the closing that ends `before` is a whole word ("cordialement", not "...ment")."""
    word = next(w for w in words if before.endswith(w))
    return len(before) == len(word) or not before[-len(word) - 1].isalnum()


@lru_cache(maxsize=4096)
def name_parts(names: tuple[str, ...], keep: tuple[str, ...] = ()) -> frozenset[str]:
    """The parts of the names that are a person's (`_parts_of`)."""
    return frozenset().union(*(_parts_of(name, keep) for name in names))


@lru_cache(maxsize=4096)
def _parts_of(name: str, keep: tuple[str, ...]) -> frozenset[str]:
    """The parts of a name that are a person's, as written, in capitals, capitalised and without accents. A display
    name's part in parentheses or after " - ", " | ", " / " is read on its own; a part holding a role word
    ("Assistance IDRIS", "HPC Support Team", "Équipe Support") is no person; an acronym is a name only beside one
    other word ("DUPONT Jean"); a word of `keep` never is."""
    variants: set[str] = set()
    for segment in re.split(r"[()\[\]<>]| [-|/–] | via ", name):
        words = [w.strip(".,;:!?\"'’") for w in re.split(r"[\s,]+", segment) if w.strip(".,;:!?\"'’")]
        if not words or any(w.lower() in _ROLE_WORDS or "@" in w for w in words):
            continue
        words = [w for w in words if w.lower() not in _PARTICLES and w.lower() not in _TITLES and w not in keep]
        if len(words) >= 2 and all(w.islower() and w.isalpha() for w in words):
            words = [w.capitalize() for w in words]  # "jean dupont"
        titled = [w for w in words if w[:1].isupper() and not w.isupper() and len(w) >= 2]
        capitals = [w for w in words if w.isupper() and len(w) >= 2 and w.isalpha()]
        for part in titled + (capitals if len(titled) == 1 and len(capitals) <= 2 else []):
            for variant in (part, part.upper(), part.capitalize() if part.isupper() else part):  # DUPONT: Dupont
                variants |= {variant, _without_accents(variant)}
    return frozenset(v for v in variants if len(v) >= 2 and v not in keep)


def _without_accents(word: str) -> str:
    return "".join(c for c in unicodedata.normalize("NFKD", word) if not unicodedata.combining(c))
