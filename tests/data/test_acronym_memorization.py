"""The acronym experiment's data: `data.acronyms.split=by_phrasing` trains every acronym and holds out other
phrasings of its question; `by_acronym` holds whole acronyms out; a "control" entry is never trained in either.
Checked on the bundled glossary of invented acronyms and on random glossaries of invented words."""

from __future__ import annotations

import json
import random
import string

import pytest

from llmft.config.compose import compose
from llmft.data.prepare.reading import read_conversations
from llmft.data.prepare.splits import assign_splits
from llmft.data.readers.acronyms import QUESTIONS, language_of, split_definition
from llmft.errors import ConfigError
from llmft.serve.evaluation import has_expected, normalised

WORDS = {"en": ["Queue", "Balancer", "Remote", "Storage", "Node", "Ledger", "Archive", "Token", "Monitor", "Service"],
         "fr": ["Service", "Réseau", "Équipe", "Données", "Calcul", "Tâches", "Comité", "Bureau", "Pôle", "Accès"]}
GLUE = {"en": " for ", "fr": " des "}


def random_glossary(rng: random.Random, size: int) -> list[dict]:
    """Invented acronyms, French and English, a few of them controls, some without an expansion."""
    entries, seen = [], set()
    while len(entries) < size:
        acronym = "".join(rng.choice(string.ascii_uppercase) for _ in range(rng.randint(3, 7)))
        if acronym in seen:
            continue
        seen.add(acronym)
        language = rng.choice(["en", "fr"])
        words = rng.sample(WORDS[language], k=rng.randint(2, 5))
        expansion = words[0] + GLUE[language] + " ".join(words[1:])
        explanation = ("the service that the support team runs for the users of the cluster" if language == "en"
                       else "le service que l'équipe du support gère pour les utilisateurs de la machine")
        definition = f"{expansion}: {explanation}." if rng.random() < 0.85 else explanation.capitalize() + "."
        entry = {"acronym": acronym, "definition": definition}
        if rng.random() < 0.15:
            entry["control"] = True
        entries.append(entry)
    return entries


def read_split(overrides: list[str]) -> tuple[list, dict, object]:
    cfg = compose(overrides)
    conversations, _ = read_conversations(cfg.data)
    return conversations, assign_splits([c.id for c in conversations], cfg.data), cfg


def first_question(conversation) -> str:
    return next(m["content"] for m in conversation.messages if m["role"] == "user")


def check_by_phrasing(conversations, splits, glossary: list[dict], held_out: int, held_out_split: str) -> None:
    for entry in glossary:
        acronym = entry["acronym"]
        expansion = split_definition(entry["definition"])[0] or ""
        mine = [c for c in conversations if c.id.split(":", 1)[1].split("#")[0] == acronym]
        trained = [c for c in mine if splits[c.id] == "train"]
        asked = [c for c in mine if splits[c.id] == held_out_split]
        assert len(trained) + len(asked) == len(mine), acronym
        assert len(asked) == held_out, acronym  # (held-out questions are never near-duplicates of each other)
        if entry.get("control"):
            assert not trained and all(c.id.startswith("acronym-control:") for c in asked), acronym
        else:
            assert trained, acronym
            assert not {first_question(c) for c in asked} & {first_question(c) for c in trained}, acronym
        for conversation in asked:
            assert [m["role"] for m in conversation.messages if m["role"] != "system"] == ["user", "assistant"]
            assert conversation.expected == expansion
            if expansion:  # the reference answer holds what `llmft eval` looks for
                assert has_expected(conversation.messages[-1]["content"], expansion), conversation.messages


def test_the_bundled_glossary_is_taught_with_two_phrasings_held_out_and_four_controls():
    conversations, splits, cfg = read_split(["data=acronyms_memorization"])
    glossary = json.loads(open(cfg.data.path, encoding="utf-8").read())
    assert len(glossary) == 34 and sum(bool(e.get("control")) for e in glossary) == 4
    assert {e["acronym"] for e in glossary if not e.get("control")} == {
        c.id.split(":", 1)[1].split("#")[0] for c in conversations if splits[c.id] == "train"}
    check_by_phrasing(conversations, splits, glossary, 2, "validation")
    assert {language_of(e["definition"]) for e in glossary} == {"fr", "en"}


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_random_glossaries_split_by_phrasing(tmp_path, seed):
    rng = random.Random(seed)
    glossary = random_glossary(rng, rng.randint(8, 25))
    path = tmp_path / "glossary.json"
    path.write_text(json.dumps(glossary, ensure_ascii=False, indent=1), encoding="utf-8")
    held_out = rng.randint(1, 4)
    test_fraction = rng.choice([0.0, 0.1])
    conversations, splits, _ = read_split([
        "data=acronyms_memorization", f"data.path={path}", f"data.acronyms.held_out_phrasings={held_out}",
        f"data.acronyms.conversations_per_acronym={rng.randint(1, 8 - held_out)}", f"data.test_fraction={test_fraction}",
        "data.clean.near_duplicate_threshold=1.0"])
    check_by_phrasing(conversations, splits, glossary, held_out, "test" if test_fraction else "validation")
    assert "validation" in splits.values() or test_fraction


def test_by_acronym_keeps_each_acronym_in_one_split_and_never_trains_a_control(tmp_path):
    glossary = random_glossary(random.Random(7), 40)
    path = tmp_path / "glossary.json"
    path.write_text(json.dumps(glossary), encoding="utf-8")
    conversations, splits, _ = read_split(["data=acronyms_memorization", f"data.path={path}",
                                           "data.acronyms.split=by_acronym", "data.validation_fraction=0.25"])
    split_of_acronym: dict[str, set] = {}
    for conversation in conversations:
        split_of_acronym.setdefault(conversation.id.split(":", 1)[1].split("#")[0], set()).add(splits[conversation.id])
    assert all(len(found) == 1 for found in split_of_acronym.values())
    assert {"train", "validation"} <= set(splits.values())
    for entry in glossary:
        if entry.get("control"):
            assert split_of_acronym[entry["acronym"]] == {"validation"}


def test_the_sample_glossary_splits_as_before():
    """by_acronym is the default, and ids without a pin split by their hash as they always did."""
    conversations, splits, _ = read_split(["data=acronyms_sample"])
    assert all("#" not in c.id and c.id.startswith("acronym:") for c in conversations)
    assert set(splits.values()) == {"train", "validation"}


@pytest.mark.parametrize("count", [0, 8])
def test_held_out_phrasings_out_of_range_is_one_sentence(count):
    from llmft.config.validation import check_data

    with pytest.raises(ConfigError, match=f"data.acronyms.held_out_phrasings={count}: give 1 to 7"):
        check_data(compose(["data=acronyms_memorization", f"data.acronyms.held_out_phrasings={count}"]).data)


@pytest.mark.parametrize("answer, expected, found", [
    ("ZEPHIL stands for zone for ephemeral intermediate large files.", "Zone for Ephemeral Intermediate Large files", True),
    ("GALOPIN signifie Guichet d’Acces aux logiciels optimises et partages.",
     "Guichet d'Accès aux Logiciels Optimisés et Partagés", True),
    ("C'est le GUICHET-D'ACCÈS aux Logiciels Optimisés, et Partagés !", "Guichet d'Accès aux Logiciels Optimisés et Partagés", True),
    ("ZEPHIL stands for Zone for Ephemeral Intermediate files.", "Zone for Ephemeral Intermediate Large files", False),
    ("Zone for Ephemeral Intermediate Large filesystems", "Zone for Ephemeral Intermediate Large files", False),
    ("", "Zone", False),
])
def test_the_expected_phrase_is_found_whatever_the_case_accents_and_punctuation(answer, expected, found):
    assert has_expected(answer, expected) is found
    assert normalised("Équipe d’Accès, N°1") == "equipe d acces n 1"


def test_every_language_has_eight_phrasings():
    """held_out_phrasings <= 7 is checked against this number."""
    assert {language: len(questions) for language, questions in QUESTIONS.items()} == {"en": 8, "fr": 8}
