"""Write llmft/data/samples/transcripts_sample.md: 30 of the bundled support conversations as an IDRIS-style
transcript export (plus one ticket left without an answer), for `data=transcripts_sample`.

    python tools/make_transcripts_sample.py          # (re)write the file; deterministic
    python tools/make_transcripts_sample.py --check  # the file is what this script writes, and reads back

The conversations come from tickets_sample.chat.jsonl; the transcript adds what a real export has: the heading
styles (`## Ticket #n`, `Ticket n`, `# Ticket n°n - subject`, `**Ticket #n**`), the speaker styles (`Utilisateur :`
with French spacing, `**IDRIS** :`, `User:`, `Support:`, `Client :`, `Assistance :`), greetings and signatures,
internal notes, fake personal data in the users' turns (a login, an e-mail address, a phone number: all made up,
see samples/README.md), rules between tickets and a title above the first one.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

SAMPLES = Path(__file__).resolve().parent.parent / "llmft" / "data" / "samples"
SOURCE, TARGET = SAMPLES / "tickets_sample.chat.jsonl", SAMPLES / "transcripts_sample.md"

SUBJECTS = {  # line of tickets_sample.chat.jsonl -> the ticket's subject (for the heading styles that carry one)
    1: "SSH key login", 4: "Passphrase SSH", 6: "ssh falls back to password", 9: "Connexion par rebond",
    12: "Disk quota exceeded on $WORK", 14: "Mot de passe oublié", 17: "Quota increase on $WORK",
    20: "Quota $STORE", 22: "QOS policy violation", 25: "Enchaîner des jobs de 20 h", 28: "QOSMaxGRESPerUser",
    30: "DependencyNeverSatisfied", 33: "PyTorch versions", 36: "conda activate in batch jobs",
    38: "Missing pytorch-gpu module", 41: "Python 3.12", 44: "Timeout NCCL à l'évaluation",
    46: "Multi-node hang in init_process_group", 49: "CUDA_VISIBLE_DEVICES", 52: "torchrun or srun",
    54: "Utilisation des GPU d'un job", 57: "ImageNet on the cluster", 60: "Transfert de millions de fichiers",
    62: "Archiving on $STORE", 65: "GPU dans Singularity", 68: "Jupyter with GPUs", 70: "Tunnel vers JupyterLab",
    73: "Compiling MPI C code", 76: "nvcc: command not found", 78: "GPU hours left",
}
HEADINGS = ["## Ticket #{n}", "Ticket {n}", "# Ticket n°{n} - {subject}", "**Ticket #{n}**", "## Ticket #{n} : {subject}"]
SPEAKERS = {  # language -> (user label, assistant label) styles, used in turn
    "fr": [("Utilisateur :", "IDRIS :"), ("**Utilisateur** :", "**IDRIS** :"), ("Client :", "Assistance :"),
           ("Utilisateur\u00a0:", "**IDRIS :**")],
    "en": [("User:", "Support:"), ("**User**:", "**IDRIS**:"), ("Client:", "IDRIS:"), ("User :", "Support :")],
}
GREETING = {"fr": ("Bonjour,", "Bonjour,"), "en": ("Hello,", "Hello,")}
SIGNATURE = {"fr": "Cordialement,\nL'assistance IDRIS", "en": "Best regards,\nIDRIS user support"}
# Fake personal data planted in some users' first turns: scrubbing must replace it.
PERSONAL = {
    "fr": ["Mon identifiant est abc12de, projet gen1234.", "Vous pouvez me joindre au 01 99 00 12 34.",
           "Mon adresse : camille.martin@lab.example.fr"],
    "en": ["My login is xyz34fg on project gen5678.", "You can reach me at +1 415 555 0100.",
           "My address is j.doe@physics.example.org"],
}
INTERNAL_NOTES = {  # ticket number -> a note staff left between two turns (role drop)
    3: "Note interne : clé ssh-rsa, l'utilisateur a un client OpenSSH récent.",
    11: "Internal note: check the QOS limits of this project with the account manager.",
    23: "Note interne : vérifier que le projet n'a pas dépassé son quota d'inodes.",
}
FRENCH_CHARS = set("éèêàùçôîœ«»")


def language_of(messages: list[dict]) -> str:
    text = " ".join(m["content"] for m in messages)
    return "fr" if sum(c in FRENCH_CHARS for c in text) >= 3 or " le " in text or " je " in text else "en"


def ticket_text(number: int, line: int, messages: list[dict]) -> str:
    messages = [m for m in messages if m["role"] != "system"]
    language = language_of(messages)
    user, assistant = SPEAKERS[language][number % len(SPEAKERS[language])]
    heading = HEADINGS[number % len(HEADINGS)].format(n=number, subject=SUBJECTS[line])
    parts = [heading, ""]
    for index, message in enumerate(messages):
        content = message["content"]
        if message["role"] == "user":
            if index == 0 and number % 2 and not content.startswith(("Hi", "Hello", "Bonjour")):
                content = f"{GREETING[language][0]}\n\n{content}"
            if index == 0 and number % 3 == 0:
                content += "\n" + PERSONAL[language][number // 3 % len(PERSONAL[language])]
            parts.append(f"{user} {content}")
        else:
            if number % 4 == 1:  # an answer as a mail: greeting, answer, closing and signature
                content = f"{GREETING[language][1]}\n\n{content}\n\n{SIGNATURE[language]}"
            parts.append(f"{assistant} {content}")
            if index == 1 and number in INTERNAL_NOTES:
                parts.append(INTERNAL_NOTES[number])
        parts.append("")
    return "\n".join(parts)


def transcript() -> str:
    lines = SOURCE.read_text(encoding="utf-8").splitlines()
    chosen = [number for number in range(1, len(lines) + 1) if (number - 1) % 8 in (0, 3, 5)]
    tickets = [ticket_text(n, line, json.loads(lines[line - 1])["messages"]) for n, line in enumerate(chosen, 1)]
    tickets.append("## Ticket #31\n\nUtilisateur : Bonjour, mon job 123456 reste en attente depuis ce matin avec "
                   "la raison « Priority ». Est-ce normal ?\n")  # closed without an answer: the reader reports it
    title = "# Export des tickets de l'assistance (échantillon fictif pour llmft)\n\n"  # a title: no ticket
    return title + "\n---\n\n".join(tickets)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="check the file instead of writing it")
    args = parser.parse_args()
    text = transcript()
    if args.check:
        if TARGET.read_text(encoding="utf-8") != text:
            print(f"{TARGET} differs from what this script writes: run it again", file=sys.stderr)
            return 1
    else:
        TARGET.write_text(text, encoding="utf-8")
    sys.path.insert(0, str(SAMPLES.parent.parent.parent))
    from llmft.config.compose import compose
    from llmft.data.readers.records import ReadReport
    from llmft.data.readers.transcripts import read_transcripts

    report = ReadReport()
    read = read_transcripts(TARGET, compose(["data=transcripts_sample"]).data, report)
    expected = ["ticket 31 has no assistant turn"]
    if len(read) != 30 or len(report.skipped) != 1 or expected[0] not in report.skipped[0]:
        print(f"read back {len(read)} tickets, skipped {report.skipped}: expected 30 and one without an answer",
              file=sys.stderr)
        return 1
    print(f"{TARGET}: 31 tickets, 30 read back, the one without an answer reported")
    return 0


if __name__ == "__main__":
    sys.exit(main())
