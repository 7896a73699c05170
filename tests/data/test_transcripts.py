"""data.format=transcript: tickets under headings, `Speaker : text` turns (French spacing, Markdown bold),
continuation lines and commands kept, unknown speakers and bad tickets reported as file:line, strict mode, the
roles map, folders and encodings, and the bundled sample cleaned and scrubbed."""

from __future__ import annotations

import json
import re

import pytest

from llmft.config.compose import SAMPLES_DIR, compose
from llmft.config.validation import validate
from llmft.data.prepare.reading import read_conversations
from llmft.data.readers.records import DataError
from llmft.errors import ConfigError

TRANSCRIPT = """\
# Export de l'assistance
Exporté le 3 mars.

## Ticket #12 - Quota dépassé
Utilisateur : Bonjour, mes jobs échouent avec
"Disk quota exceeded" depuis ce matin.
Mon login est abc12de et mon adresse jean.dupont@lab.example.fr.
**IDRIS** : C'est le quota d'inodes. Pour le voir :
```
idr_quota_project --inodes
IDRIS: this line is output, not a turn
du --inodes -d 2 $WORK | sort -n | tail
```
Note : supprimez les environnements conda inutilisés.
Note interne : vérifier le projet gen1234.
Utilisateur\u00a0: Merci, c'est réglé ?

IDRIS\u202f: Oui, le quota est revenu à 80 %.

---

Ticket 13
**User**: My job dies with
    slurmstepd: error: Detected 1 oom-kill event(s)
Error: the job step was killed.
**Support:** Ask for more memory per task with `--mem=200G`.

# Ticket n°14 - Question sans réponse
Utilisateur : Est-ce que le cluster est en maintenance demain ?

## Ticket #15
Utilisateur : Bonjour
Stagiaire : Je regarde.
IDRIS : Réponse.

## Ticket #16

## Ticket #17
Quelques mots sans orateur.
IDRIS : Une réponse perdue.
"""


def write(tmp_path, text: str, name: str = "export.md"):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def read(path, *overrides: str):
    return read_conversations(compose(["data=transcripts_sample", f"data.path={path}", *overrides]).data)


def line_of(text: str, start: str) -> int:
    return next(i for i, line in enumerate(text.split("\n"), 1) if line.startswith(start))


def test_tickets_turns_and_every_bad_ticket_with_its_file_and_line(tmp_path):
    path = write(tmp_path, TRANSCRIPT)
    conversations, report = read(path)
    by_id = {c.id: c for c in conversations}
    assert list(by_id) == ["12", "13"]
    assert report["records_read"] == 6  # the six headings
    assert report["skipped"] == [
        f"{path}:{line_of(TRANSCRIPT, 'Exporté')}: 1 line(s) of text before the first ticket heading, in no ticket",
        f"{path}:{line_of(TRANSCRIPT, '# Ticket n°14')}: ticket 14 has no assistant turn (no answer)",
        f"{path}:{line_of(TRANSCRIPT, 'Stagiaire')}: unknown speaker 'Stagiaire'",
        f"{path}:{line_of(TRANSCRIPT, '## Ticket #16')}: ticket 16 is empty (no 'Speaker : text' turn)",
        f"{path}:{line_of(TRANSCRIPT, 'Quelques mots')}: text before the first 'Speaker : text' turn of ticket 17",
    ]
    assert report["reader_dropped"] == {"dropped_speaker_turns": 1}  # the internal note
    roles = [m["role"] for m in by_id["12"].messages]
    assert roles == ["user", "assistant", "user", "assistant"]
    user, answer, follow_up, last = (m["content"] for m in by_id["12"].messages)
    # the subject from the heading leads the first question; continuation lines keep their line breaks
    assert user.startswith("Quota dépassé\n\nBonjour, mes jobs échouent avec\n\"Disk quota exceeded\" depuis ce matin.")
    assert "abc12de" not in user and "jean.dupont@lab.example.fr" not in user
    assert "<LOGIN>" in user and "<EMAIL>" in user
    assert answer == ("C'est le quota d'inodes. Pour le voir :\n```\nidr_quota_project --inodes\n"
                      "IDRIS: this line is output, not a turn\ndu --inodes -d 2 $WORK | sort -n | tail\n```\n"
                      "Note : supprimez les environnements conda inutilisés.")
    assert "gen1234" not in json.dumps(by_id["12"].messages)  # the internal note never reaches the model
    assert follow_up == "Merci, c'est réglé ?" and last == "Oui, le quota est revenu à 80 %."
    user, answer = (m["content"] for m in by_id["13"].messages)
    assert user == ("My job dies with\n    slurmstepd: error: Detected 1 oom-kill event(s)\n"
                    "Error: the job step was killed.")  # indented log lines and "Error:" stay in the turn
    assert answer == "Ask for more memory per task with `--mem=200G`."


def test_pasted_output_and_labels_stay_in_the_turn_and_unknown_speakers_do_not(tmp_path):
    pasted = ("Traceback (most recent call last):\nRuntimeError: CUDA out of memory\nCUDA error: an illegal memory access"
              "\nUsage: sbatch [OPTIONS] script\nJob ID: 1234\nCluster: jean-zay\nState: OUT_OF_MEMORY (exit code 0)\n"
              "**Attention** : une ligne en gras.\nÉtape 1 : charger le module.\nLe problème : la mémoire.")
    text = (f"## Ticket #1\nUtilisateur : Mon job plante :\n{pasted}\nIDRIS : Une réponse assez longue.\n"
            "## Ticket #2\nUtilisateur : Bonjour\n**Jean Dupont** : Je transfère.\nIDRIS : Une réponse assez longue.\n"
            "## Ticket #3\nUtilisateur : Bonjour\nIngénieur système : Je regarde ça.\nIDRIS : Réponse assez longue.\n")
    path = write(tmp_path, text)
    conversations, report = read(path, "data.scrub.enabled=false")
    assert [c.id for c in conversations] == ["1"]
    assert conversations[0].messages[0]["content"] == "Mon job plante :\n" + pasted
    assert report["skipped"] == [f"{path}:{line_of(text, '**Jean')}: unknown speaker 'Jean Dupont'",
                                 f"{path}:{line_of(text, 'Ingénieur')}: unknown speaker 'Ingénieur système'"]


def test_strict_mode_stops_at_the_unknown_speaker_with_that_sentence(tmp_path):
    path = write(tmp_path, TRANSCRIPT)
    with pytest.raises(DataError) as error:
        read(path, "data.strict=true")
    assert str(error.value).startswith(f"{path}:2: 1 line(s) of text before")  # the first problem in file order
    path = write(tmp_path, "## Ticket #1\nUser: hi\nStagiaire : Je regarde.\nIDRIS: ok\n", "strict.md")
    with pytest.raises(DataError) as error:
        read(path, "data.strict=true")
    assert str(error.value).startswith(f"{path}:3: unknown speaker 'Stagiaire' (data.strict=true stops")


@pytest.mark.parametrize("line, speaker, text", [
    ("Utilisateur : Bonjour", "user", "Bonjour"),
    ("Utilisateur\u00a0: Bonjour", "user", "Bonjour"),  # no-break space before the colon
    ("utilisateur: Bonjour", "user", "Bonjour"),  # case-insensitive
    ("**IDRIS** : Voici", "assistant", "Voici"),
    ("**IDRIS :** Voici", "assistant", "Voici"),
    ("**IDRIS:** Voici", "assistant", "Voici"),
    ("__Support__: Voici", "assistant", "Voici"),
    ("IDRIS (Jean Dupont) : Voici", "assistant", "Voici"),
    ("Jean Dupont - IDRIS : Voici", "assistant", "Voici"),
    ("Support IDRIS : Voici", "assistant", "Voici"),
    ("L'équipe IDRIS : Voici", "assistant", "Voici"),
    ("Assistance  :  Voici", "assistant", "Voici"),
])
def test_speaker_styles(tmp_path, line, speaker, text):
    other = "IDRIS : Une réponse assez longue pour être gardée." if speaker == "user" else "Client : Une question ?"
    turns = [line, other] if speaker == "user" else [other, line + " et une réponse assez longue."]
    path = write(tmp_path, "## Ticket #1\n" + "\n".join(turns) + "\n")
    conversations, report = read(path, "data.scrub.enabled=false")
    assert report["skipped"] == []
    message = next(m for m in conversations[0].messages if m["role"] == speaker)
    assert message["content"].startswith(text)


def test_a_person_named_beside_a_speaker_is_scrubbed_and_other_words_do_not_start_turns(tmp_path):
    text = ("## Ticket #1\nUtilisateur : Bonjour, une question.\nIDRIS (Jean Dupont) : Bonjour, "
            "Jean Dupont vous répond.\nUser guide: see the documentation.\nSupport technique : ouvert de 9 h à 17 h.\n")
    conversations, report = read(write(tmp_path, text))
    assert not report["skipped"] and [m["role"] for m in conversations[0].messages] == ["user", "assistant"]
    answer = conversations[0].messages[1]["content"]
    assert answer == ("Bonjour, <NAME> vous répond.\nUser guide: see the documentation.\n"
                      "Support technique : ouvert de 9 h à 17 h.")
    assert report["pii_replacements"] == {"NAME": 1}
    conflicting = "## Ticket #2\nUtilisateur : Bonjour ?\nClient IDRIS : Qui parle ?\nIDRIS : Une réponse assez longue.\n"
    _, report = read(write(tmp_path, conflicting + text, "conflict.md"))
    assert report["skipped"] == [f"{tmp_path / 'conflict.md'}:3: unknown speaker 'Client IDRIS'"]


def test_heading_styles_and_a_custom_pattern_and_roles(tmp_path):
    tickets = ["## Ticket #12", "Ticket 13", "# Ticket n°14 - sujet", "**Ticket #15**", "### Demande T-16 : sujet",
               "ticket no. 17", "## Ticket #2024-0018 - sujet"]
    text = "".join(f"{h}\nUser: question {i}?\nIDRIS: an answer long enough to be kept, {i}.\n\n"
                   for i, h in enumerate(tickets))
    conversations, report = read(write(tmp_path, text))
    assert [c.id for c in conversations] == ["12", "13", "14", "15", "T-16", "17", "2024-0018"] and not report["skipped"]
    text = "=== 7 ===\nAlice: hi?\nBob: hello, an answer long enough.\n=== 8 ===\nAlice: again?\nBob: yes, again, at length.\n"
    conversations, report = read(write(tmp_path, text, "custom.txt"), r"data.transcript.ticket_pattern='^=== (\d+) ==='",
                                 "+data.transcript.roles.Alice=user", "+data.transcript.roles.Bob=assistant")
    assert [(c.id, [m["role"] for m in c.messages]) for c in conversations] == [("7", ["user", "assistant"]),
                                                                                ("8", ["user", "assistant"])]


def test_a_folder_of_text_and_markdown_files_with_encoding_problems(tmp_path):
    folder = tmp_path / "export"
    (folder / "2024").mkdir(parents=True)
    (folder / "2024" / "a.txt").write_bytes(
        "Ticket 1\r\nUser: caf\u00e9?\r\nIDRIS: a long enough answer.\r\n".encode("utf-8"))  # CRLF
    (folder / "b.md").write_bytes(b"Ticket 2\nUser: caf\xe9?\nIDRIS: a long enough answer.\n"  # latin-1: skipped
                                  b"Ticket 3\nUser: fine?\nIDRIS: a long enough answer too.\n"
                                  b"Ticket 5 - caf\xe9\nUser: fine?\nIDRIS: a long enough answer, the last.\n")
    (folder / "c.md").write_bytes("Ticket 4\nUser: caf\u00e9 ?\nIDRIS: a long enough answer, in UTF-16.\n"
                                  .encode("utf-16"))  # with its byte-order mark
    (folder / "notes.json").write_text("{}")  # not a transcript: not read
    conversations, report = read(folder)
    assert [c.id for c in conversations] == ["1", "3", "4"]
    assert conversations[0].messages[0]["content"] == "café?"
    assert report["skipped"] == [f"{folder / 'b.md'}:2: not UTF-8 text", f"{folder / 'b.md'}:7: not UTF-8 text"]


def test_bad_transcript_settings_are_one_sentence_naming_the_key():
    with pytest.raises(ConfigError, match=r"^data.transcript.ticket_pattern='Ticket .*' needs exactly one capturing group"):
        validate(compose(["data=transcripts_sample", r"data.transcript.ticket_pattern='Ticket \d+'"]))
    with pytest.raises(ConfigError, match="data.transcript.roles.Bot=robot must be user, assistant or drop"):
        validate(compose(["data=transcripts_sample", "+data.transcript.roles.Bot=robot"]))


def test_the_bundled_sample_is_read_cleaned_and_scrubbed():
    raw = (SAMPLES_DIR / "transcripts_sample.md").read_text(encoding="utf-8")
    conversations, report = read_conversations(compose(["data=transcripts_sample"]).data)
    assert len(conversations) == 30 and report["num_skipped"] == 1
    assert "ticket 31 has no assistant turn" in report["skipped"][0]
    text = json.dumps([c.messages for c in conversations], ensure_ascii=False)
    planted = set(re.findall(r"[\w.+-]+@[\w-]+\.example\.\w+|\b[a-z]{3}\d{2}[a-z]{2}\b|\+1 415 555 0100|"
                             r"01 99 00 12 34|gen\d{4}", raw))
    assert len(planted) >= 6 and not [p for p in planted if p in text]
    assert "Cordialement" not in text and "Best regards" not in text and "Note interne" not in text
    assert "ssh-copy-id -i ~/.ssh/id_ed25519.pub <your_login>@jean-zay.idris.fr\\n```" in text  # commands intact
