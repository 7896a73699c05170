"""Scrubbing of the personal data that has a checksum (payment cards, IBANs, French social security numbers) and of
names where they stand as names: what must go goes, what only looks like it (job ids, timestamps, serial numbers,
phone numbers, the cluster's and the organisation's names) stays."""

from __future__ import annotations

import csv
import json
import re

import pytest
from omegaconf import OmegaConf

from llmft.config.compose import compose
from llmft.config.data_schema import ScrubConfig
from llmft.data.clean.scrub import Scrubber, names_written_in
from llmft.data.prepare.reading import read_conversations


def scrubber(**overrides) -> Scrubber:
    cfg = OmegaConf.structured(ScrubConfig)
    for key, value in overrides.items():
        cfg[key] = value
    return Scrubber(cfg)


def luhn_ok(digits: str) -> bool:
    total = 0
    for i, digit in enumerate(reversed(digits)):
        value = int(digit) * (2 if i % 2 else 1)
        total += value - 9 if value > 9 else value
    return total % 10 == 0


def luhn_complete(prefix: str) -> str:
    return next(prefix + str(d) for d in range(10) if luhn_ok(prefix + str(d)))


def luhn_fail(prefix: str) -> str:
    return next(prefix + str(d) for d in range(10) if not luhn_ok(prefix + str(d)))


def grouped(number: str, sep: str = " ", sizes: tuple[int, ...] = (4, 4, 4, 4, 3)) -> str:
    groups, at = [], 0
    for size in sizes:
        if at < len(number):
            groups.append(number[at:at + size])
            at += size
    return sep.join(groups)


def iban(country: str, bban: str) -> str:
    numeric = "".join(str(int(c, 36)) for c in bban + country + "00")
    return f"{country}{98 - int(numeric) % 97:02d}{bban}"


def nir(first_13: str) -> str:
    return first_13 + f"{97 - int(first_13.replace('2A', '19').replace('2B', '18')) % 97:02d}"


VISA = luhn_complete("497010123456789")      # 16 digits, a French CB/Visa
MASTERCARD = luhn_complete("542418706691234")  # 16 digits
MASTERCARD_2 = luhn_complete("222100123456789")  # 16 digits, the 2-series
AMEX = luhn_complete("37828224631000")        # 15 digits
VISA_13 = luhn_complete("422222222222")       # 13 digits
MAESTRO_19 = luhn_complete("676770123456789012")  # 19 digits
CARDS = {
    "grouped by 4, spaces": grouped(VISA),
    "grouped by 4, dashes": grouped(MASTERCARD, "-"),
    "grouped by 4, no-break spaces": grouped(MASTERCARD_2, "\u00a0"),
    "one piece": VISA,
    "amex 4-6-5": grouped(AMEX, " ", (4, 6, 5)),
    "amex one piece": AMEX,
    "13 digits": VISA_13,
    "19 digits, 4-4-4-4-3": grouped(MAESTRO_19),
    "19 digits, one piece": MAESTRO_19,
}
CONTEXTS = [
    "Pour la formation, ma carte bancaire est la {} (exp. 04/27).",
    "The registration fee can be charged to card {}.",
    "Autre carte si besoin : {}",
    "carte:{}",
    "| Visa | {} | 04/27 | Jean Dupont |",
    "Numéro de carte ({}), merci.",
    "{}\nexpire fin avril",
]


@pytest.mark.parametrize("card", CARDS.values(), ids=CARDS.keys())
@pytest.mark.parametrize("context", CONTEXTS)
def test_a_valid_card_is_replaced_in_every_grouping_and_context(card, context):
    s = scrubber()
    out = s.scrub(context.format(card))
    assert out == context.format("<CARD>")
    assert s.counts["CARD"] == 1 and not s.counts["PHONE"]


def test_a_card_followed_by_another_number_loses_only_the_card():
    s = scrubber()
    assert s.scrub(f"carte {grouped(VISA)} 123 (cryptogramme)") == "carte <CARD> 123 (cryptogramme)"
    assert s.scrub(f"cards {grouped(VISA)}, {grouped(MASTERCARD, '-')} and {AMEX}.") == \
        "cards <CARD>, <CARD> and <CARD>."
    assert s.counts["CARD"] == 4


SURVIVORS = [
    f"The GPU serial number reported by nvidia-smi is {luhn_fail('456789012345678')}.",  # 16 digits, Luhn fails
    f"Numéro de série : {grouped(luhn_fail('497010123456789'))}",  # grouped like a card, Luhn fails
    f"Ticket reference {luhn_complete('100000000000012')}",  # Luhn passes, but no card starts with 1
    f"Batch {luhn_complete('900000000000012')}",  # nor with 9
    "Le job 2345678 s'est arrêté le 2025-02-11T03:14:15 avec l'état OUT_OF_MEMORY.",
    "sacct -j 23456789 --starttime 2025-02-10T00:00:00",
    "jobs 1873412 1873413 1873414 1873415 are pending",  # job ids in a row
    "squeue: 2345678_12 2345678_13",
    "log written at 20250114093015123 and 2025011409301512",  # timestamps (17 and 16 digits)
    "epoch in ms: 1736848215123",
    "file slurm-23456789.out and checkpoint_000400000000.pt",
    f"glued: x{VISA} {VISA}x v1.{VISA} id-{VISA} /data/{VISA}/",
    "value 3.14159265358979323846 and 4970101234567890.5",
    "IPv6 2001:660:3302:282a::15 is not a card",
    "MAC 00:1a:2b:3c:4d:5e, UUID 123e4567-e89b-12d3-a456-426614174000",
]


@pytest.mark.parametrize("text", SURVIVORS)
def test_numbers_that_are_no_card_stay(text):
    s = scrubber()
    out = s.scrub(text)
    assert "<CARD>" not in out and "<IBAN>" not in out and "<NIR>" not in out
    assert not s.counts["CARD"] and not s.counts["IBAN"] and not s.counts["NIR"]
    digits = re.findall(r"\d{7,}", text)
    assert all(d in out for d in digits if "IP" not in text and "MAC" not in text)


@pytest.mark.parametrize("phone", ["06 12 34 56 78", "+33 6 98 76 54 32", "+33 (0)1 44 27 00 00", "01.44.27.00.99",
                                   "+44 20 7946 0958", "(415) 555-0100", "+49 89 289 17456", "0612345678",
                                   "+33612345678"])
def test_phone_numbers_stay_phones(phone):
    s = scrubber()
    assert s.scrub(f"Tél. : {phone}, carte {grouped(VISA)}") == "Tél. : <PHONE>, carte <CARD>"
    assert s.counts["PHONE"] == 1 and s.counts["CARD"] == 1


IBANS = {
    "FR grouped": grouped(iban("FR", "30006000011234567890189"), " ", (4,) * 8),
    "FR one piece": iban("FR", "30006000011234567890189"),
    "DE one piece": iban("DE", "370400440532013000"),
    "DE grouped": grouped(iban("DE", "370400440532013000"), " ", (4,) * 6),
    "GB letters": grouped(iban("GB", "WEST12345698765432"), " ", (4,) * 6),
    "NL": grouped(iban("NL", "ABNA0417164300"), " ", (4,) * 5),
    "BE": iban("BE", "539007547034"),
    "IT": grouped(iban("IT", "X0542811101000000123456"), " ", (4,) * 7),
    "CH": grouped(iban("CH", "00762011623852957"), " ", (4,) * 6),
    "NO, the shortest": iban("NO", "86011117947"),
    "MT, letters at the end": iban("MT", "MALT011000012345MTLCAST001S"),
}


@pytest.mark.parametrize("value", IBANS.values(), ids=IBANS.keys())
@pytest.mark.parametrize("context", ["Pour le remboursement, mon IBAN : {}.", "For the refund my IBAN is {}",
                                     "IBAN:{} BIC BNPAFRPP", "| {} | Jean Dupont |"])
def test_a_valid_iban_is_replaced(value, context):
    s = scrubber()
    assert s.scrub(context.format(value)) == context.format("<IBAN>")
    assert s.counts["IBAN"] == 1 and not s.counts["CARD"] and not s.counts["PHONE"]


def test_the_standard_examples_of_ibans_are_valid_ones():
    s = scrubber()
    text = ("FR76 3000 6000 0112 3456 7890 189, DE89 3704 0044 0532 0130 00, GB82 WEST 1234 5698 7654 32, "
            "NL91 ABNA 0417 1643 00, BE68 5390 0754 7034, CH93 0076 2011 6238 5295 7")
    assert s.scrub(text) == ", ".join(["<IBAN>"] * 6)


@pytest.mark.parametrize("text", [
    "IBAN : FR77 3000 6000 0112 3456 7890 189",  # a wrong check: mod 97 is not 1
    "IBAN : " + iban("FR", "30006000011234567890189")[:-1],  # one character short for France
    "IBAN : " + iban("DE", "370400440532013000") + "7",  # one too many for Germany
    "ZZ12 3456 7890 1234 5678 90",  # no such country
    "The H100 nodes, the A100 partition, SM80 and CUDA12 builds; GPU A100 SXM4 80GB",
    "Version AB12CD34EF56GH78 of the image",
])
def test_what_fails_the_iban_check_stays(text):
    s = scrubber()
    assert "<IBAN>" not in s.scrub(text) and not s.counts["IBAN"]


def test_french_social_security_numbers_with_a_right_key_are_replaced():
    s = scrubber()
    valid = [nir("1850578006084"), nir("2840275123456"), nir("290022A123456")]
    spaced = f"{valid[0][0]} {valid[0][1:3]} {valid[0][3:5]} {valid[0][5:7]} {valid[0][7:10]} {valid[0][10:13]} " \
             f"{valid[0][13:]}"
    out = s.scrub(f"Mon numéro de sécurité sociale : {spaced}. Et {valid[1]}, {valid[2]}.")
    assert out == "Mon numéro de sécurité sociale : <NIR>. Et <NIR>, <NIR>."
    wrong_key = valid[1][:-2] + f"{(int(valid[1][-2:]) + 1) % 100:02d}"
    assert s.scrub(f"numéro {wrong_key}") == f"numéro {wrong_key}"
    assert s.counts["NIR"] == 3


# Names ---------------------------------------------------------------------------------------------------------

PARTICIPANTS = ["Jean Dupont <jean.dupont@univ-lyon1.fr>", "Assistance IDRIS <assist@idris.fr>"]


@pytest.mark.parametrize("text, expected", [
    ("Bonjour Jean,\nvotre job tourne.", "Bonjour <NAME>,\nvotre job tourne."),
    ("Hi Jean, your job runs.", "Hi <NAME>, your job runs."),
    ("Hello Jean Dupont!", "Hello <NAME>!"),
    ("Dear Dr Dupont,", "Dear Dr <NAME>,"),
    ("Dear Dr. Dupont,", "Dear Dr. <NAME>,"),
    ("Bonjour M. Dupont,", "Bonjour M. <NAME>,"),
    ("Bonjour Monsieur Dupont,", "Bonjour Monsieur <NAME>,"),
    ("Jean a dit que le job tournait.", "<NAME> a dit que le job tournait."),
    ("C'est réglé, merci Jean.", "C'est réglé, merci <NAME>."),
    ("Merci Jean !", "Merci <NAME> !"),
    ("Thanks Jean. Ok Jean, see you.", "Thanks <NAME>. Ok <NAME>, see you."),
    ("I asked Jean and Dupont answered.", "I asked <NAME> and <NAME> answered."),
    ("Jean's job and the job of d'Jean", "<NAME>'s job and the job of d'<NAME>"),
    ("Cordialement,\nJean Dupont\nDoctorant", "Cordialement,\n<NAME>\nDoctorant"),
    ("Cordialement,\nJean", "Cordialement,\n<NAME>"),
    ("-- \nJean DUPONT\nLaboratoire", "-- \n<NAME>\nLaboratoire"),
    ("DUPONT Jean, Université Lyon 1", "<NAME>, Université Lyon 1"),
    ("Le 10/01/2025 à 11:26, Jean Dupont a écrit :", "Le 10/01/2025 à 11:26, <NAME> a écrit :"),
    ("Bonjour Jean Je voulais savoir", "Bonjour <NAME> Je voulais savoir"),  # lines joined
])
def test_a_participants_name_is_replaced_where_it_stands_as_a_name(text, expected):
    s = scrubber()
    assert s.scrub(text, PARTICIPANTS) == expected
    assert s.counts["NAME"] == expected.count("<NAME>")


@pytest.mark.parametrize("text", [
    "Les nœuds H100 de Jean Zay sont gérés par l'IDRIS.",
    "The H100 nodes of Jean Zay are run by IDRIS.",
    "Voir la documentation de Jean-Zay et la Formation IDRIS de mars.",
    "Rendez-vous à Saint-Jean, à Saint Jean de Luz ou au Laboratoire Jean Kuntzmann.",
    "Jeanne et Jeannette ne sont pas Jean-Zay.",
    "L'équipe Assistance IDRIS, Institut du développement et des ressources en informatique scientifique (CNRS)",
    "GENCI et le CNRS financent Jean Zay.",
])
def test_longer_proper_names_and_the_organisation_stay(text):
    s = scrubber()
    assert s.scrub(text, PARTICIPANTS) == text
    assert not s.counts["NAME"]


@pytest.mark.parametrize("role", ["Assistance IDRIS", "Support HPC", "HPC Support Team", "Équipe Support", "IDRIS",
                                  "noreply", "Service Informatique", "Helpdesk", "admin", "Formation IDRIS",
                                  "Jean Zay", "CNRS"])
def test_a_role_account_or_an_organisation_is_no_persons_name(role):
    s = scrubber()
    text = ("Votre demande a été transmise au Support HPC. L'équipe Assistance IDRIS vous répond ; HPC Support Team, "
            "Équipe Support, Service Informatique, Helpdesk, Formation IDRIS, Informatique et Jean Zay.")
    assert s.scrub(text, [f"{role} <support@example.org>"]) == text
    assert not s.counts["NAME"]


def test_a_display_name_with_a_role_beside_the_person_keeps_the_person():
    s = scrubber()
    out = s.scrub("Bonjour Pierre, l'Assistance IDRIS et Dubois répondent.", ["Pierre Dubois (Assistance IDRIS)"])
    assert out == "Bonjour <NAME>, l'Assistance IDRIS et <NAME> répondent."
    out = s.scrub("Merci Marie, Curie.", ["Curie, Marie - Support HPC"])
    assert out == "Merci <NAME>, <NAME>."


def test_keep_overrides_every_pattern():
    s = scrubber(keep=["Curie", "gen1234", "06 12 34 56 78"])
    text = "Marie Curie utilise gen1234 (gen4321 aussi) ; appelez le 06 12 34 56 78 ou le 07 81 22 33 44."
    assert s.scrub(text, ["Marie Curie"]) == \
        "Marie Curie utilise gen1234 (<PROJECT> aussi) ; appelez le 06 12 34 56 78 ou le <PHONE>."
    assert s.scrub("Bonjour Marie,", ["Marie Curie"]) == "Bonjour <NAME>,"
    # keep is case-sensitive and whole words: "Curies" and "curie" are other words
    assert s.scrub("Les Curies, curie et Curie.", ["Marie Curie"]) == "Les Curies, curie et Curie."


def test_without_keep_the_cluster_still_stays_by_the_name_rule():
    s = scrubber(keep=[])
    assert s.scrub("Bonjour Jean, Jean Zay est en maintenance.", PARTICIPANTS) == \
        "Bonjour <NAME>, Jean Zay est en maintenance."


def test_the_default_keep_list_fits_jean_zay_and_can_be_overridden():
    default = compose([]).data.scrub
    assert {"Jean Zay", "Jean-Zay", "IDRIS", "GENCI", "CNRS"} <= set(default.keep) and default.names_in_text
    cfg = compose(["data.scrub.keep=[Ada Lovelace,IDRIS]", "data.scrub.names_in_text=false"]).data.scrub
    assert list(cfg.keep) == ["Ada Lovelace", "IDRIS"] and cfg.names_in_text is False
    assert Scrubber(cfg).scrub("Bonjour Marie,\nAda Lovelace", []) == "Bonjour Marie,\nAda Lovelace"


# Names written in a text without authors (CSV, chat JSONL) ------------------------------------------------------

@pytest.mark.parametrize("text, names", [
    ("Bonjour Marie,\n\nMon job plante.", ["Marie"]),
    ("Hello John,\nMy job fails.", ["John"]),
    ("Hi John Smith!", ["John Smith"]),
    ("Dear Dr Dupont,\n", ["Dupont"]),
    ("Dear Mrs. O'Brien,", ["O'Brien"]),
    ("Bonjour Madame Curie,", ["Curie"]),
    ("Good morning Alice,", ["Alice"]),
    ("> Bonjour Émilie,", ["Émilie"]),
    ("Hello, John,\nthanks.", ["John"]),
    ("Merci d'avance,\nMarie Curie\nLaboratoire de physique", ["Marie Curie"]),
    ("Cordialement,\n\nRémi Lacroix\nIngénieur support", ["Rémi Lacroix"]),
    ("Best regards,\nJohn Smith\nResearch Fellow, School of Physics", ["John Smith"]),
    ("Thanks,\n\nBest regards,\nJohn Smith", ["John Smith"]),
    ("Mit freundlichen Grüßen\nHans Müller\nLehrstuhl", ["Hans Müller"]),
    ("-- \nSophie Marchand\nÉquipe support", ["Sophie Marchand"]),
    ("Cheers,\nPierre", ["Pierre"]),
    ("Bien cordialement,\nJean-Pierre de La Fontaine", ["Jean-Pierre de La Fontaine"]),
    ("Cordialement,\nMarie Curie, CNRS", ["Marie Curie"]),
    ("... (suivi X) Cordialement, Rémi Lacroix Ingénieur support applications IA", ["Rémi Lacroix"]),
    ("Contact : <EMAIL> -- Émilie Rousseau Maîtresse de conférences", ["Émilie Rousseau"]),
    ("Best regards, John Smith Research Fellow, University of Edinburgh", ["John Smith"]),
    ("Merci pour tout. Cordialement, Pierre", ["Pierre"]),
    ("Le mar. 1 avr. 2025 à 09:30, Émilie Rousseau <EMAIL> a écrit :", ["Émilie Rousseau"]),
    ("On Mon, 13 Jan 2025 at 09:05, Marie Curie <EMAIL> wrote:", ["Marie Curie"]),
    ("Hans Müller <EMAIL> schrieb am 10.01.2025:", ["Hans Müller"]),
    ("> From: Marie Curie <EMAIL>\n> Sent: Monday", ["Marie Curie"]),
    ("From: Marie Curie\nSent: Monday, January 13, 2025 9:05 AM", ["Marie Curie"]),
    ("De : Curie Marie [mailto:<EMAIL>]", ["Curie Marie"]),
])
def test_names_written_as_names_are_found(text, names):
    assert names_written_in(text) == names


@pytest.mark.parametrize("text", [
    "Bonjour,\nMon job plante.", "Bonjour à tous,", "Hello everyone,", "Hi all,", "Dear Support Team,",
    "Dear IDRIS,", "Bonjour Madame,", "Dear Sir,", "Bonjour \uE000,",
    "Cordialement,\n\nL'équipe Assistance IDRIS\nInstitut du développement", "Best regards,\nThe HPC Support Team",
    "Merci,\nBonne journée", "Thanks, Python works now.", "Merci,\nPourriez-vous regarder ?", "Cheers,\nJD",
    "Cordialement,\nService Informatique", "Thanks,\nPyTorch Team", "Merci Jean Dupont Doctorant",
    "Regards,\n\n-- \nsent from my phone", "sbatch -- Bar", "Le job a écrit 3 Go.", "Thanks, Python",
    "Merci, Slurm", "Hello World!", "Merci Beaucoup,", "Thank You!", "De plus : Python", "From: Python\nhello",
])
def test_what_is_no_name_is_not_found(text):
    assert names_written_in(text) == []


def test_a_text_without_authors_loses_the_names_it_writes_as_names():
    s = scrubber()
    text = ("Bonjour Marie,\n\nLe job de Marie tourne sur Jean Zay ; Curie l'a vérifié avec l'IDRIS.\n\n"
            "Cordialement,\nMarie Curie\nLaboratoire Jean Kuntzmann")
    assert s.scrub(text) == ("Bonjour <NAME>,\n\nLe job de <NAME> tourne sur Jean Zay ; <NAME> l'a vérifié avec "
                             "l'IDRIS.\n\nCordialement,\n<NAME>\nLaboratoire Jean Kuntzmann")
    assert s.counts["NAME"] == 4
    off = scrubber(names_in_text=False)
    assert off.scrub(text) == text


def test_the_names_of_a_conversation_are_those_its_texts_write():
    s = scrubber()
    texts = ["Bonjour,\nmon job plante.\nCordialement,\nClaire Fontaine", "Bonjour Claire,\nvoici.\n-- \nRémi Lacroix"]
    assert sorted(s.names_in(texts)) == ["Claire", "Claire Fontaine", "Rémi Lacroix"]
    assert s.scrub("Mme Fontaine a raison.", s.names_in(texts)) == "Mme <NAME> a raison."
    assert scrubber(names_in_text=False).names_in(texts) == []


def test_each_replacement_is_counted_once_per_kind():
    s = scrubber()
    out = s.scrub(f"carte {grouped(VISA)}, IBAN {IBANS['FR grouped']}, NIR {nir('1850578006084')}, "
                  f"tél. 06 12 34 56 78, Hi Jean", PARTICIPANTS)
    assert out == "carte <CARD>, IBAN <IBAN>, NIR <NIR>, tél. <PHONE>, Hi <NAME>"
    assert {k: v for k, v in s.counts.items() if v} == {"CARD": 1, "IBAN": 1, "NIR": 1, "PHONE": 1, "NAME": 1}


# Through the read path: the report counts each kind -------------------------------------------------------------

def test_a_csv_export_loses_its_cards_ibans_and_names_and_the_report_counts_them(tmp_path):
    """CSV has no authors: the names come from the texts, for the whole conversation (the answer names the user the
    question signed, which cleaning removes)."""
    path = tmp_path / "tickets.csv"
    rows = [
        {"id": "1", "subject": "Remboursement formation",
         "body": f"Bonjour,\n\nPour la formation, ma carte est la {grouped(VISA)}, l'IBAN {IBANS['FR grouped']}.\n\n"
                 "Cordialement,\nClaire Fontaine\nLaboratoire Jean Kuntzmann",
         "answer": "Bonjour,\n\nLa Formation IDRIS ne prend pas de carte, Mme Fontaine. Les nœuds de Jean Zay restent "
                   "ouverts.\n\nCordialement,\nRémi Lacroix"},
        {"id": "2", "subject": "Refund",
         "body": f"Hello,\nMy IBAN is {IBANS['DE one piece']}.\nBest regards,\nJohn Smith",
         "answer": f"Dear John,\nDone: card {grouped(MASTERCARD, '-')} was not charged. Jean Zay runs.\n"
                   "Best regards,\nThomas Weber"},
    ]
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    conversations, report = read_conversations(compose([
        "data=csv", f"data.path={path}", "data.csv.question_columns=[subject,body]", "data.csv.answer_column=answer",
        "data.csv.id_column=id", "data.clean.min_assistant_chars=5"]).data)
    text = "\n".join(m["content"] for c in conversations for m in c.messages)
    for gone in [grouped(VISA), IBANS["FR grouped"], IBANS["DE one piece"], grouped(MASTERCARD, "-"), "Claire",
                 "Fontaine", "John", "Smith", "Rémi", "Lacroix", "Thomas Weber"]:
        assert gone not in text, gone
    for kept in ["Jean Zay", "Formation IDRIS"]:
        assert kept in text, kept
    assert {"CARD", "IBAN"} <= set(report["pii_replacements"])
    assert report["pii_replacements"]["CARD"] == 2 and report["pii_replacements"]["IBAN"] == 2


def test_tickets_with_a_role_account_keep_the_organisation_and_the_cluster(tmp_path):
    path = tmp_path / "tickets.jsonl"
    ticket = {"id": "T-1", "subject": "Formation", "messages": [
        {"from": "Jean Dupont <jean.dupont@univ-lyon1.fr>", "date": "Mon, 06 Jan 2025 09:14:17 +0100",
         "body": f"Bonjour,\nJe paie la Formation IDRIS avec la carte {VISA}. Mon IBAN : {IBANS['GB letters']}.\n"
                 "Merci,\nJean"},
        {"from": "Assistance IDRIS <assist@idris.fr>", "date": "Mon, 06 Jan 2025 10:14:17 +0100",
         "body": "Bonjour Jean,\n\nLa Formation IDRIS sur Jean Zay est confirmée, M. Dupont.\n\n"
                 "Cordialement,\nL'équipe Assistance IDRIS"},
    ]}
    path.write_text(json.dumps(ticket, ensure_ascii=False) + "\n", encoding="utf-8")
    conversations, report = read_conversations(compose([
        "data=tickets", f"data.path={path}", "data.tickets.staff_domains=[idris.fr]",
        "data.clean.min_assistant_chars=5"]).data)
    text = "\n".join(m["content"] for c in conversations for m in c.messages)
    assert "Formation IDRIS" in text and "Jean Zay" in text
    assert "Dupont" not in text and "Bonjour Jean" not in text and VISA not in text
    assert report["pii_replacements"]["CARD"] == 1 and report["pii_replacements"]["IBAN"] == 1
