"""Read support transcripts: text or Markdown files where tickets follow each other, turn after turn.

    ## Ticket #12 - Quota dépassé sur $WORK          <- a heading starts a ticket (data.transcript.ticket_pattern)
    Utilisateur : Bonjour, mes jobs échouent avec    <- `Speaker : text` starts a turn (French spacing, **bold**)
    "Disk quota exceeded".                           <- a continuation line: part of the turn, line breaks kept
    **IDRIS** : C'est le quota d'inodes :
    ```
    idr_quota_project                                <- inside a code fence no line starts a turn
    ```

`data.transcript.roles` maps speakers (case-insensitively) to roles. Each ticket is all or nothing: a ticket with
a speaker not in the map, without any turn, with text before its first turn, or without an assistant turn is
skipped and reported as `file:line: reason` (with data.strict=true the first one stops the run). The id of a
ticket is the one its heading gives: the split is a hash of it.

Hand-written rather than a Markdown parser's job: the structure that matters here (a heading line, `Name :` at the
start of a line) is line-based and not Markdown's (plain text files hold the same transcripts), and a parser
would re-flow the lines of pasted commands and logs that must reach the model as they are.
"""

from __future__ import annotations

import codecs
import re
from dataclasses import dataclass, field
from pathlib import Path

from llmft.data.readers.records import Conversation, ReadReport, input_files, unreadable

TRANSCRIPT_SUFFIXES = (".txt", ".md", ".markdown")
TURN_ROLES = ("user", "assistant", "drop")  # drop: turns that never reach the model (internal notes)

_SPACE = "[ \t\u00a0\u202f]"  # French typography puts a (narrow) no-break space before the colon
_TURN = re.compile(
    rf"""^(?:
        (?P<mark>\*{{1,2}}|_{{1,2}})(?P<marked>[^*_:\n]{{1,40}}?){_SPACE}*(?P<inner>:)?{_SPACE}*(?P=mark)  # **IDRIS**, **IDRIS :**
      | (?P<plain>[^\W\d_][\w .'’()-]{{0,39}}?)                                                      # Utilisateur
    ){_SPACE}*(?(inner)|:){_SPACE}*(?P<text>.*)$""",
    re.VERBOSE,
)
_UNDECODABLE = re.compile("[\udc80-\udcff]")  # the bytes that are not UTF-8, as "surrogateescape" reads them
_FENCE = re.compile(r"^\s*(?:```|~~~)")
_RULE = re.compile(r"^\s*(?:-{3,}|\*{3,}|_{3,})\s*$")  # a Markdown horizontal rule, often between tickets
_MARKDOWN_HEADING = re.compile(r"^\s*#{1,6}\s")
_WORD = re.compile(r"[^\W_](?:[\w'’.-]*[^\W_])?")  # a word of a speaker's name: "L'équipe", "Jean-Marc", "M."
_PARENTHESIS = re.compile(r"\s*\(([^()]*)\)\s*")
_SUBJECT_LEAD = re.compile(r"^[\s*_#:|.)\]–—-]+")
_SUBJECT_TAIL = re.compile(r"[\s*_#]+$")
# Words of a line such as "Note : ...", "Le problème : ...", "CUDA error: ..." or "Job ID: 123" (pasted seff
# output) inside a turn: a label, a phrase or program output, not a speaker. An unknown name without any of these
# words, capitalised, of at most three words without digits, followed by text, and not in a block of such
# `Label: value` lines, is taken for a speaker and reported, rather than silently read as part of the turn.
_NOT_SPEAKERS = frozenset("""
    note nota nb ps pps remarque remarques exemple exemples example examples attention important info information
    erreur error errors warning warn avertissement résultat resultat result results sortie output commande commandes
    command commands solution solutions cause question réponse reponse answer objet subject sujet date de from to à
    cc cci bcc re tr fwd edit update mise lien link url source voir see astuce tip hint étape etape step rappel
    message log logs code script fichier file chemin path version versions statut status état etat problème
    probleme problem issue contexte context détails details détail detail merci thanks bonjour hello hi salut
    usage traceback password mot passe login job jobs jobid jobname state cluster node nodes cores cpu cpus gpu gpus
    memory mémoire memoire partition account compte qos reason raison exit exitcode elapsed submit start end time
    temps name nom id host hostname group groupe project projet quota used free size taille total killed line ligne
    efficiency wall clock utilized fatal debug trace stack caused
    le la les l un une des du ce cet cette ces mon ma mes ton ta tes son sa ses notre nos votre vos leur leurs
    the a an this that these those my your our their its his her il elle on nous vous ils elles je tu we you they
    it i pour for avec with sans without et and ou or mais but si if quand when sur on in at by par
""".split())
_PROGRAM_NAME = re.compile(r"(?:error|exception|warning|fault|interrupt)$", re.IGNORECASE)  # RuntimeError, ...


@dataclass
class _Ticket:
    ticket_id: str
    subject: str
    where: str  # file:line of the heading
    turns: list[dict] = field(default_factory=list)  # {"role", "lines", "line"}; role "drop" kept until the end
    participants: list[str] = field(default_factory=list)  # names in "IDRIS (Jean Dupont) :", scrubbed as names
    problem: tuple[str, str] | None = None  # (where, reason): the first reason to skip the ticket
    num_dropped_turns: int = 0


class TranscriptReader:
    """Splits the lines of transcript files into tickets and turns (`read_transcripts`)."""

    def __init__(self, data_cfg, report: ReadReport):
        cfg = data_cfg.transcript
        self.heading = re.compile(cfg.ticket_pattern, re.IGNORECASE)
        self.roles = {speaker_key(name): str(role) for name, role in cfg.roles.items()}
        self.role_words = [(_WORD.findall(key), role) for key, role in self.roles.items()]
        self.report = report

    def read(self, file: Path) -> list[Conversation]:
        try:
            raw = file.read_bytes()
        except OSError as error:
            self.report.skip(str(file), unreadable(file, error))
            return []
        if raw.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):  # Notepad's "Unicode"
            text = raw.decode("utf-16", errors="surrogateescape")
        else:  # bytes that are not UTF-8 become surrogates: only the tickets they are in are skipped
            text = raw.decode("utf-8", errors="surrogateescape").removeprefix("\ufeff")
        lines = text.replace("\r\n", "\n").replace("\r", "\n").split("\n")
        conversations: list[Conversation] = []
        ticket: _Ticket | None = None
        preamble: list[int] = []  # lines of text before the first heading
        in_fence = False
        for number, line in enumerate(lines, start=1):
            where = f"{file}:{number}"
            heading = self.heading.match(line)
            if heading:  # (even inside a code fence: a fence left open must not swallow the following tickets)
                if ticket is None and preamble:
                    self.report.skip(f"{file}:{preamble[0]}", f"{len(preamble)} line(s) of text before the first "
                                                              f"ticket heading, in no ticket")
                self._finish(ticket, conversations)
                subject = _SUBJECT_TAIL.sub("", _SUBJECT_LEAD.sub("", line[heading.end():]))
                ticket, in_fence = _Ticket(heading.group(1).strip(), subject, where), False
                self.report.records_read += 1
                if _UNDECODABLE.search(line):
                    ticket.problem = (where, "not UTF-8 text")
                continue
            if ticket is None:
                if is_text(line):
                    preamble.append(number)
                continue
            if ticket.problem is None and _UNDECODABLE.search(line):
                ticket.problem = (where, "not UTF-8 text")
            if not in_fence:
                neighbours = lines[number - 2] if number > 1 else "", lines[number] if number < len(lines) else ""
                turn = self._turn_start(line, where, ticket, neighbours)
                if turn is not None:
                    ticket.turns.append(turn)
                    in_fence = bool(_FENCE.match(turn["lines"][0]))
                    continue
            if _FENCE.match(line):
                in_fence = not in_fence
            if ticket.turns:
                ticket.turns[-1]["lines"].append(line)
            elif is_text(line) and ticket.problem is None:
                ticket.problem = (where, f"text before the first 'Speaker : text' turn of ticket {ticket.ticket_id}")
        self._finish(ticket, conversations)
        if ticket is None:
            self.report.skip(f"{file}:{preamble[0]}" if preamble else str(file),
                             "no ticket heading in the file (no line matches data.transcript.ticket_pattern)"
                             if preamble else "empty file")
        return conversations

    def _turn_start(self, line: str, where: str, ticket: _Ticket, neighbours: tuple[str, str]) -> dict | None:
        """The turn `line` starts (`Speaker : text`), or None for a continuation line; an unknown speaker marks the
        ticket to be skipped. `neighbours`: the lines before and after it."""
        match = _TURN.match(line)
        if match is None:
            return None
        name = (match.group("marked") or match.group("plain")).strip()
        role, person = self.role_of(name)
        if person and person not in ticket.participants:
            ticket.participants.append(person)
        if role is None:
            marked_speaker = match.group("marked") and looks_like_speaker(name)  # "**Jean** :", not "**Note** :"
            if not (marked_speaker or self._unknown_speaker(match, name, neighbours)):
                return None  # "Note : ...", "Le problème : ...", "State: FAILED": text of the current turn
            if ticket.problem is None:
                ticket.problem = (where, f"unknown speaker {name!r}")
            role = "drop"
        return {"role": role, "lines": [match.group("text")], "line": where}

    def role_of(self, name: str) -> tuple[str | None, str | None]:
        """The role of a speaker, and the person it names if any: a speaker of the map, or one with other names
        around it ("IDRIS (Jean Dupont)", "Jean Dupont - IDRIS", "Support IDRIS": the role of IDRIS, and Jean Dupont
        to scrub as a name). Not when the other words are not names ("User guide", "Support technique") or the
        speakers found disagree."""
        role = self.roles.get(speaker_key(name))
        if role is not None:
            return role, None
        words = _WORD.findall(name)
        lowered = [word.casefold() for word in words]
        found, covered = set(), set()
        for key_words, key_role in self.role_words:
            for start in range(len(words) - len(key_words) + 1):
                if key_words and lowered[start : start + len(key_words)] == key_words:
                    found.add(key_role)
                    covered.update(range(start, start + len(key_words)))
        others = [word for index, word in enumerate(words) if index not in covered]
        if len(found) != 1 or not all(word[:1].isupper() for word in others):
            return None, None
        return found.pop(), " ".join(others) or None

    def _unknown_speaker(self, match: re.Match, name: str, neighbours: tuple[str, str]) -> bool:
        """Whether an unmapped, plain `Name : text` names a speaker: it looks like one, has text after the colon,
        and is not one of a block of `Label: value` lines (pasted program output such as seff's)."""
        if not match.group("text").strip() or not looks_like_speaker(name):
            return False
        for other in neighbours:
            found = _TURN.match(other)
            other_name = found and (found.group("marked") or found.group("plain")).strip()
            if other_name and self.role_of(other_name)[0] is None and looks_like_speaker(other_name):
                return False
        return True

    def _finish(self, ticket: _Ticket | None, conversations: list[Conversation]) -> None:
        if ticket is None:
            return
        if ticket.problem is not None:
            self.report.skip(*ticket.problem)
            return
        messages = []
        for turn in ticket.turns:
            if turn["role"] == "drop":
                ticket.num_dropped_turns += 1
                continue
            lines = turn["lines"]
            while lines and (not lines[-1].strip() or _RULE.match(lines[-1])):
                lines.pop()  # blank lines and the rule that separates it from the next ticket
            messages.append({"role": turn["role"], "content": "\n".join(lines).strip("\n"), "author": ""})
        if not ticket.turns:
            self.report.skip(ticket.where, f"ticket {ticket.ticket_id} is empty (no 'Speaker : text' turn)")
        elif not any(m["role"] == "assistant" and m["content"].strip() for m in messages):
            self.report.skip(ticket.where, f"ticket {ticket.ticket_id} has no assistant turn (no answer)")
        else:
            self.report.count("dropped_speaker_turns", ticket.num_dropped_turns)
            conversations.append(Conversation(ticket.ticket_id, messages, ticket.where, ticket.participants,
                                              ticket.subject))


def is_text(line: str) -> bool:
    """Whether a line outside any turn holds text, not a blank, a Markdown heading (a title) or a rule."""
    return bool(line.strip()) and not _MARKDOWN_HEADING.match(line) and not _RULE.match(line)


def speaker_key(name: str) -> str:
    """A speaker as the roles map is looked up: case and spacing do not matter."""
    return " ".join(name.split()).casefold()


def looks_like_speaker(name: str) -> bool:
    """Whether an unmapped `Name :` at the start of a line may name a speaker rather than be text of the turn:
    capitalised, one to three words, no digits, no label word ("Note", "Job ID"), no phrase ("Le problème"), no
    program output ("CUDA error", "RuntimeError")."""
    words = _PARENTHESIS.sub(" ", name).split()
    return (0 < len(words) <= 3 and name[:1].isupper() and not any(c.isdigit() for c in name)
            and not any(word.casefold().strip(".'’") in _NOT_SPEAKERS or _PROGRAM_NAME.search(word)
                        for word in words))


def read_transcripts(path: Path, data_cfg, report: ReadReport) -> list[Conversation]:
    reader = TranscriptReader(data_cfg, report)
    conversations: list[Conversation] = []
    for file in input_files(path, TRANSCRIPT_SUFFIXES):
        conversations += reader.read(file)
    return conversations
