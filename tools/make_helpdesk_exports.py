#!/usr/bin/env python3
"""Realistic helpdesk exports of an HPC support team, with what a correct data pipeline must make of them.

    python tools/make_helpdesk_exports.py OUT_DIR [--seed 1] [--tickets 60]

Writes, seeded and byte-identical for a seed (standard library only; real MIME built with the `email` package):

    OUT_DIR/mbox/2025-01.mbox ...  monthly mbox exports of the "IDRIS" helpdesk (cluster "Jean Zay"), overlapping by
                                   a few days (the same mail in two files, sometimes with its Message-ID rewritten);
                                   threads by In-Reply-To/References and by "[Demande #N]" / "[Ticket #N]" in the
                                   subject; replies written by Outlook (desktop plain and HTML, on the web), Gmail,
                                   Apple Mail, Roundcube, Thunderbird, Zimbra, mutt, iPhone, forwards; signatures,
                                   auto-replies (with and without Auto-Submitted), a bounce, attachments, code and
                                   job scripts, planted personal data and decoys that look like it
    OUT_DIR/tickets.jsonl          the tickets-JSONL variant, OUT_DIR/tickets.csv the CSV variant: plain text bodies
                                   that talk about HTML tags and compare with < and > in C code
    OUT_DIR/expected.json          per variant: counts (mails, duplicates, auto-replies by signal, tickets), the
                                   strings that must NOT appear in any output (quoted marker phrases, signature lines,
                                   auto-reply text, personal data by kind) and those that MUST appear (code lines,
                                   job script lines, sentences that look like reply headers, "IDRIS", "Jean Zay")

Every mail's own text carries a marker (`suivi ABCDEFGH`); a quoted copy of it carries another marker, unique per
quoted block, so a quote left in the outputs is found by grepping, and a mail kept twice shows its marker twice.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import io
import json
import random
from datetime import datetime, timedelta, timezone
from email import policy
from email.generator import BytesGenerator
from email.message import EmailMessage, Message
from email.mime.multipart import MIMEMultipart
from email.mime.text import MIMEText
from email.utils import format_datetime, parsedate_to_datetime
from html import escape
from pathlib import Path

POLICY = policy.default.clone(linesep="\n")
STAFF_DOMAIN = "idris.fr"
TZ = timezone(timedelta(hours=1))
MONTHS = [(2025, 1), (2025, 2), (2025, 3)]
OVERLAP_DAYS = 3
HELPDESK = {"name": "Assistance IDRIS", "addr": "assist@idris.fr", "lang": "fr",
            "sig": ["Cordialement,", "", "L'équipe Assistance IDRIS",
                    "Institut du développement et des ressources en informatique scientifique (CNRS)"]}
STAFF = [
    {"name": "Rémi Lacroix", "addr": "remi.lacroix@idris.fr", "lang": "fr",
     "sig": ["Cordialement,", "Rémi Lacroix", "Ingénieur support applications IA, IDRIS-CNRS", "Tél. : 01 69 35 85 21"]},
    {"name": "Sophie Marchand", "addr": "sophie.marchand@idris.fr", "lang": "fr",
     "sig": ["-- ", "Sophie Marchand", "Équipe support utilisateurs calcul intensif, IDRIS-CNRS",
             "Tél. : +33 1 69 35 85 47"]},
    {"name": "Thomas Weber", "addr": "thomas.weber@idris.fr", "lang": "en",
     "sig": ["Best regards,", "Thomas Weber", "HPC application engineer, IDRIS user support", "Phone: +33 1 69 35 84 90"]},
]
USERS = [
    {"name": "Jean Dupont", "addr": "jean.dupont@univ-lyon1.fr", "lang": "fr",
     "sig": ["Cordialement,", "Jean Dupont", "Doctorant, Laboratoire de physique des plasmas, Université Lyon 1",
             "Tél. : 04 72 43 18 65"]},
    {"name": "Émilie Rousseau", "addr": "emilie.rousseau@sorbonne-universite.fr", "lang": "fr",
     "sig": ["-- ", "Émilie Rousseau", "Maîtresse de conférences, Institut des sciences du calcul et des données",
             "+33 1 44 27 36 12"]},
    {"name": "John Smith", "addr": "john.smith@ed.ac.uk", "lang": "en",
     "sig": ["Best regards,", "John Smith", "Research Fellow, School of Physics and Astronomy, University of Edinburgh",
             "+44 131 650 5249"]},
    {"name": "Mary O'Brien", "addr": "mary.obrien@tcd.ie", "lang": "en",
     "sig": ["-- ", "Mary O'Brien", "Postdoctoral researcher, Trinity College Dublin, Department of Genetics"]},
    {"name": "Hans Müller", "addr": "hans.mueller@tum.de", "lang": "de",
     "sig": ["Mit freundlichen Grüßen", "Hans Müller", "Wissenschaftlicher Mitarbeiter, Lehrstuhl für Numerische Mathematik",
             "Tel.: +49 89 289 17456"]},
    {"name": "Claire Fontaine", "addr": "claire.fontaine@univ-grenoble-alpes.fr", "lang": "fr",
     "sig": ["Bien cordialement,", "Claire Fontaine", "Ingénieure de recherche, Laboratoire Jean Kuntzmann",
             "Tél. : 06 71 82 93 04"]},
]
MOBILE_FOOTERS = {"fr": "Envoyé de mon iPhone", "en": "Sent from my iPhone", "de": "Von meinem iPhone gesendet"}

# ------------------------------------------------------------------------------------------------- the content
SBATCH = ["#!/bin/bash", "#SBATCH --job-name={job}", "#SBATCH --nodes={nodes}", "#SBATCH --ntasks-per-node=4",
          "#SBATCH --gres=gpu:4", "#SBATCH --cpus-per-task=10", "#SBATCH --time={hours}:00:00",
          "#SBATCH --qos=qos_gpu-t3", "#SBATCH --hint=nomultithread", "module load pytorch-gpu/py3/2.3.0",
          "srun python train.py --config $WORK/configs/{job}.yaml"]
C_CODE = ["#include <stdio.h>", "int main(void) {", "    int n = 0, m = {m}, k = 5;", "    while (n<m && k>1) {",
          "        n += 2; k--;", "    }", '    printf("%d %d\\n", n, k);', "    return 0;", "}"]
TRACEBACK = ["Traceback (most recent call last):", '  File "train.py", line {line}, in <module>',
             "    model.to(device)", "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB "
             "(GPU 0; 79.10 GiB total capacity)"]
SHELL = ["module purge", "module load cpuarch/amd", "idr_quota_user --project",
         "sacct -j {jobid} --format=JobID,State,Elapsed,MaxRSS"]
TOPICS = [  # (subject fr, subject en, question fr, question en, code template, code in question?, answer fr, answer en)
    ("Job bloqué en PENDING", "Job stuck in PENDING",
     "Mon job reste en PENDING depuis hier sur Jean Zay, voici mon script :",
     "My job has been PENDING since yesterday on Jean Zay, here is my script:", SBATCH, True,
     "La QoS qos_gpu-t3 est limitée en nombre de nœuds ; réduisez --nodes ou passez en qos_gpu-t4 pour les jobs longs.",
     "The qos_gpu-t3 QoS limits the number of nodes; lower --nodes or use qos_gpu-t4 for long jobs."),
    ("Erreur de compilation C", "C program gives wrong result",
     "Mon petit programme C ne donne pas le résultat attendu après compilation avec nvc :",
     "My small C program does not give the expected result when built with nvc:", C_CODE, True,
     "Le compilateur n'y est pour rien : la boucle s'arrête quand k atteint 1, compilez avec -O0 -g pour le vérifier.",
     "The compiler is fine: the loop stops when k reaches 1; build with -O0 -g and step through it to check."),
    ("Out of memory GPU", "CUDA out of memory on H100",
     "Mon entraînement s'arrête avec l'erreur suivante sur les nœuds H100 :",
     "My training stops with this error on the H100 nodes:", TRACEBACK, True,
     "Le modèle ne tient pas sur un GPU : activez le gradient checkpointing ou répartissez-le avec FSDP.",
     "The model does not fit one GPU: turn on gradient checkpointing or shard it with FSDP."),
    ("Quota dépassé sur WORK", "WORK quota exceeded",
     "Je n'arrive plus à écrire dans mon espace WORK, le message dit que le quota est dépassé.",
     "I can no longer write to my WORK space, it says the quota is exceeded.", SHELL, False,
     "Vous pouvez vérifier l'occupation de votre projet avec les commandes suivantes :",
     "You can check your project's usage with these commands:"),
    ("Accès SSH refusé", "SSH access denied",
     "Depuis ce matin la connexion SSH à Jean Zay me renvoie Permission denied (publickey).",
     "Since this morning SSH to Jean Zay answers Permission denied (publickey).", None, False,
     "Votre adresse IP de connexion n'est pas déclarée dans le filtrage de l'IDRIS : faites la demande via le formulaire FGC.",
     "Your machine's IP address is not declared in the IDRIS filter: ask for it with the FGC form."),
    ("Heures GPU épuisées", "GPU hours used up",
     "Notre allocation d'heures GPU semble épuisée alors que le semestre vient de commencer.",
     "Our GPU hour allocation looks used up although the semester has just started.", None, False,
     "Les heures consommées par le projet sont visibles avec idracct ; une demande au fil de l'eau est possible.",
     "The hours your project used are shown by idracct; you can ask for more hours at any time."),
]
CONTEXT = {
    "fr": ["Je travaille sur un modèle de langue pour le français.", "Il s'agit de simulations de dynamique moléculaire.",
           "Nous préparons une soumission pour une conférence dans deux semaines.", "Le même code tournait bien le mois dernier.",
           "J'ai relu la documentation de l'IDRIS sans trouver la réponse.", "Mon encadrant m'a conseillé de vous écrire."],
    "en": ["I am training a language model for biomedical text.", "These are lattice QCD simulations.",
           "We have a paper deadline in two weeks.", "The same code ran fine last month.",
           "I read the IDRIS documentation but could not find the answer.", "My supervisor suggested I write to you."],
}
FOLLOW_UP = {"fr": ["Merci, j'ai essayé votre suggestion mais le problème persiste en partie.",
                    "Merci pour votre réponse, cela fonctionne mieux mais j'ai encore une question sur les limites."],
             "en": ["Thanks, I tried your suggestion but the problem partly remains.",
                    "Thank you, it works better now but I still have a question about the limits."]}
FINAL = {"fr": ["Dans ce cas envoyez-nous le numéro du job et nous regarderons les journaux de Slurm.",
                "Les limites de chaque QoS sont décrites dans la documentation de Jean Zay, section Slurm."],
         "en": ["In that case send us the job id and we will look at the Slurm logs.",
                "Each QoS's limits are described in the Jean Zay documentation, Slurm section."]}
HEADER_LIKE = [  # (user sentence that looks like an attribution line, the script it introduces)
    ("Voici ce que mon directeur de thèse a écrit :", ["#SBATCH --partition=gpu_p5", "#SBATCH -C a100",
                                                        "srun --cpu-bind=cores python run_md.py"]),
    ("Below is what my job script has, as the admin wrote:", ["#SBATCH --account=bench", "#SBATCH --exclusive",
                                                              "srun ./lattice --input $SCRATCH/cfg.in"]),
]


def luhn_ok(digits: str) -> bool:
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = int(ch) * (2 if i % 2 else 1)
        total += d - 9 if d > 9 else d
    return total % 10 == 0


def luhn_complete(prefix: str) -> str:
    return next(prefix + str(d) for d in range(10) if luhn_ok(prefix + str(d)))


def iban(country: str, bban: str) -> str:
    numeric = "".join(str(int(c, 36)) for c in bban + country + "00")
    return f"{country}{98 - int(numeric) % 97:02d}{bban}"


def grouped(value: str, sep: str = " ") -> str:
    return sep.join(value[i:i + 4] for i in range(0, len(value), 4))


def planted_pii(rng: random.Random) -> list[tuple[str, str, str]]:
    """(kind, value, sentence holding it) of the personal data planted in user text."""
    card = luhn_complete("497010" + "".join(rng.choice("0123456789") for _ in range(9)))
    card2 = luhn_complete("542418" + "".join(rng.choice("0123456789") for _ in range(9)))
    card3 = luhn_complete("453201" + "".join(rng.choice("0123456789") for _ in range(9)))
    fr_iban = iban("FR", "3000600001" + "".join(rng.choice("0123456789") for _ in range(11)) + "89")
    de_iban = iban("DE", "37040044" + "".join(rng.choice("0123456789") for _ in range(10)))
    hf = "hf_" + "".join(rng.choice("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ") for _ in range(34))
    ghp = "ghp_" + "".join(rng.choice("abcdefghijklmnopqrstuvwxyz0123456789") for _ in range(36))
    cards = [grouped(card), grouped(card2, "-"), card3]
    return [
        ("EMAIL", "j.dupont.perso@gmail.com", "Vous pouvez aussi m'écrire à j.dupont.perso@gmail.com."),
        ("EMAIL", "m.obrien.lab@outlook.com", "My other address is m.obrien.lab@outlook.com if this one bounces."),
        ("PHONE", "06 12 34 56 78", "Mon portable : 06 12 34 56 78."),
        ("PHONE", "+33 6 98 76 54 32", "You can call me on +33 6 98 76 54 32 this week."),
        ("PHONE", "+44 20 7946 0958", "My office phone is +44 20 7946 0958."),
        ("IP", "193.48.212.37", "Je me connecte depuis l'adresse 193.48.212.37 du laboratoire."),
        ("IP", "2001:660:3302:282a::15", "Our gateway has the IPv6 address 2001:660:3302:282a::15."),
        ("SECRET", hf, f"Le script lit le jeton HF_TOKEN={hf} au démarrage."),
        ("SECRET", ghp, f"I clone the repository with the token {ghp} in the URL."),
        ("SECRET", "Zay!Lyon2025", "Mon mot de passe : Zay!Lyon2025 ne fonctionne plus non plus."),
        ("CARD", cards[0], f"Pour la formation, ma carte bancaire est la {cards[0]} (exp. 04/27)."),
        ("CARD", cards[1], f"The registration fee can be charged to card {cards[1]}."),
        ("CARD", cards[2], f"Autre carte si besoin : {cards[2]}."),
        ("IBAN", grouped(fr_iban), f"Pour le remboursement, mon IBAN : {grouped(fr_iban)}."),
        ("IBAN", de_iban, f"For the refund my IBAN is {de_iban}."),
    ]


def decoys(rng: random.Random) -> list[str]:
    """Lines that look like personal data but are not: they must survive line for line."""
    serial = "".join(rng.choice("0123456789") for _ in range(16))
    while luhn_ok(serial):
        serial = serial[:-1] + str((int(serial[-1]) + 1) % 10)
    job = rng.randint(1000000, 9999999)
    return [f"Le job {job} s'est arrêté le 2025-02-11T03:14:15 avec l'état OUT_OF_MEMORY.",
            f"sacct -j {job + 1} --starttime 2025-02-10T00:00:00",
            f"The GPU serial number reported by nvidia-smi is {serial}."]


# ------------------------------------------------------------------------------------------------- the tickets
class Mail:
    def __init__(self, **kw):
        self.__dict__.update(kw)


def marker(rng: random.Random, used: set) -> str:
    while True:
        value = "".join(rng.choice("BCDFGHJKLMNPQRSTVWXZ") for _ in range(8))
        if value not in used:
            used.add(value)
            return value


def ticket_mails(rng, t: int, number: int, start: datetime, pii: list, plan: dict, used: set) -> list[Mail]:
    """The mails of one ticket: question, answer, and (for most) a follow-up and a second answer."""
    user = USERS[t % len(USERS)]
    staff = HELPDESK if t % 4 == 0 else STAFF[t % len(STAFF)]
    lang = "en" if user["lang"] == "de" else user["lang"]
    topic = TOPICS[t % len(TOPICS)]
    subj_fr, subj_en, q_fr, q_en, code, code_in_q, a_fr, a_en = topic
    subject = subj_fr if lang == "fr" else subj_en
    tag = f"[Demande #{number}]" if lang == "fr" else f"[Ticket #{number}]"
    params = {"job": f"run{t:02d}", "nodes": 1 + t % 8, "hours": 10 + t % 10, "m": 10 + t, "line": 40 + t,
              "jobid": 2300000 + 17 * t}
    code_lines = [_fill(line, params) for line in (code or [])]
    hello = "Bonjour," if lang == "fr" else "Hello,"
    q_blocks = [("p", hello), ("p", f"{q_fr if lang == 'fr' else q_en} {rng.choice(CONTEXT[lang])}")]
    if code_in_q and code_lines:
        q_blocks.append(("code", code_lines))
    q_blocks += plan.get("q_extra", [])
    q_blocks += [("p", sentence) for _, _, sentence in pii]
    first = user["name"].split()[0]
    greet = (f"Bonjour {first}," if lang == "fr" else f"Dear {first},")
    a_blocks = [("p", greet), ("p", a_fr if lang == "fr" else a_en)]
    if not code_in_q and code_lines:
        a_blocks.append(("code", code_lines))
    a_blocks.append(("p", "Les nœuds H100 de Jean Zay sont gérés par l'IDRIS." if lang == "fr"
                     else "The H100 nodes of Jean Zay are run by IDRIS."))
    # question, answer, follow-up, final answer: each after the mail it answers (clock skew is the tests' business)
    hours = (0, 3 + t % 20, 30 + t % 40, 30 + t % 40 + 2 + t % 22)
    dates = [start + timedelta(hours=h) for h in hours]
    clients = plan["clients"]
    mails = [Mail(author=user, to=HELPDESK, date=dates[0], subject=subject, blocks=q_blocks, client=clients[0],
                  parent=None, threaded=True, attachments=plan.get("attachments", []), lang=lang, kind="question"),
             Mail(author=staff, to=user, date=dates[1], subject=f"Re: {tag} {subject}", blocks=a_blocks,
                  client=clients[1], parent=0, threaded=True, attachments=[], lang=lang, kind="answer")]
    if plan.get("long", True):
        f_blocks = [("p", hello), ("p", rng.choice(FOLLOW_UP[lang]))] + plan.get("f_extra", [])
        mails.append(Mail(author=user, to=HELPDESK, date=dates[2], subject=f"RE: {tag} {subject}", blocks=f_blocks,
                          client=clients[2], parent=1, threaded=t % 5 != 1, attachments=[], lang=lang, kind="follow_up"))
        mails.append(Mail(author=staff, to=user, date=dates[3], subject=f"Re: {tag} {subject}",
                          blocks=[("p", greet), ("p", rng.choice(FINAL[lang]))], client=clients[3], parent=2,
                          threaded=True, attachments=[], lang=lang, kind="answer"))
    for mail in mails:
        mail.ticket, mail.tag, mail.marker = number, tag, marker(rng, used)
        mail.blocks[1] = ("p", f"{mail.blocks[1][1]} (suivi {mail.marker})")
        mail.mid = f"<{rng.getrandbits(48):012x}.{number}@{mail.author['addr'].split('@')[1]}>"
    return mails


def _fill(line: str, params: dict) -> str:
    for key, value in params.items():
        line = line.replace("{" + key + "}", str(value))
    return line


# ------------------------------------------------------------------------------------------------- rendering
def plain_of(blocks) -> str:
    return "\n\n".join(b[1] if b[0] == "p" else "\n".join(b[1]) for b in blocks)


def html_of(blocks) -> str:
    return "".join(f"<p>{escape(b[1])}</p>\n".replace("\n", "<br>\n").replace("</p><br>", "</p>") if b[0] == "p" else
                   "<pre>" + escape("\n".join(b[1])) + "</pre>\n" for b in blocks)


def quoted_blocks(prev: Mail, quote_marker: str):
    """The previous mail as a reply quotes it: its text (with a marker of this quoted block) and its signature."""
    blocks = [(kind, text.replace(prev.marker, quote_marker) if kind == "p" else text) for kind, text in prev.blocks]
    return blocks + [("p", "\n".join(prev.author["sig"]))]


def sig_text(mail: Mail) -> str:
    return "\n".join(mail.author["sig"])


def sig_html(mail: Mail) -> str:
    return "<p>" + "<br>\n".join(escape(line) for line in mail.author["sig"]) + "</p>\n"


def colon(rng) -> str:
    return rng.choice([" :", "\u00a0:", "\u202f:"])


def date_words(d: datetime, lang: str) -> str:
    if lang == "fr":
        months = "janv. févr. mars avr. mai juin juil. août sept. oct. nov. déc.".split()
        days = "lun. mar. mer. jeu. ven. sam. dim.".split()
        return f"{days[d.weekday()]} {d.day} {months[d.month - 1]} {d.year} à {d:%H:%M}"
    if lang == "de":
        return f"{d:%d.%m.%Y} um {d:%H:%M}"
    return f"{d:%a}, {d.day} {d:%b} {d.year} at {d:%H:%M}"


def attribution(prev: Mail, lang: str, wrap: bool) -> str:
    who, when = f"{prev.author['name']} <{prev.author['addr']}>", date_words(prev.date, lang)
    line = {"fr": f"Le {when}, {who} a écrit :", "en": f"On {when}, {who} wrote:",
            "de": f"Am {when} schrieb {who}:"}[lang]
    if wrap:  # clients wrap the attribution at about 72 columns
        cut = line.rfind(" ", 0, 60)
        line = line[:cut] + "\n" + line[cut + 1:]
    return line


def outlook_header(prev: Mail, lang: str, rng, html: bool) -> list[str]:
    labels = {"fr": ("De", "Envoyé", "À", "Objet"), "en": ("From", "Sent", "To", "Subject"),
              "de": ("Von", "Gesendet", "An", "Betreff")}[lang]
    sep = colon(rng) if lang == "fr" else ":"
    values = [f"{prev.author['name']} <{prev.author['addr']}>", format_datetime(prev.date),
              f"{prev.to['name']} <{prev.to['addr']}>", prev.subject]
    if html:
        return [f"<b>{label}{sep.replace(' ', '&nbsp;')}</b> {escape(value)}" for label, value in zip(labels, values)]
    return [f"{label}{sep} {value}" for label, value in zip(labels, values)]


def client_outlook_plain(mail, prev, q, rng):
    text = plain_of(mail.blocks) + "\n\n" + sig_text(mail)
    if prev:
        text += "\n\n-----Original Message-----\n" + "\n".join(outlook_header(prev, mail.client_lang, rng, False))
        text += "\n\n" + plain_of(quoted_blocks(prev, q))
    return text, None, "Microsoft Outlook 16.0"


def client_outlook_html(mail, prev, q, rng):
    body = html_of(mail.blocks) + sig_html(mail)
    if prev:
        body += ("<div style='border:none;border-top:solid #E1E1E1 1.0pt;padding:3.0pt 0cm 0cm 0cm'>"
                 "<p class=MsoNormal>" + "<br>\n".join(outlook_header(prev, mail.client_lang, rng, True)) +
                 "</p></div>\n" + html_of(quoted_blocks(prev, q)))
    return None, f"<html><body><div class=WordSection1>\n{body}</div></body></html>", "Microsoft Outlook 16.0"


def client_owa(mail, prev, q, rng):
    body = f'<div dir="ltr">{html_of(mail.blocks)}{sig_html(mail)}</div>\n'
    if prev:
        body += ('<div id="appendonsend"></div>\n<hr style="display:inline-block;width:98%" tabindex="-1">\n'
                 '<div id="divRplyFwdMsg" dir="ltr"><font face="Calibri, sans-serif" style="font-size:11pt">' +
                 "<br>\n".join(outlook_header(prev, mail.client_lang, rng, True)) + "</font><div>&nbsp;</div></div>\n"
                 f'<div class="BodyFragment">{html_of(quoted_blocks(prev, q))}</div>\n')
    return None, f"<html><body>\n{body}</body></html>", "Microsoft Outlook Web App"


def client_gmail(mail, prev, q, rng):
    own_text, own_html = plain_of(mail.blocks) + "\n\n" + sig_text(mail), html_of(mail.blocks) + sig_html(mail)
    if not prev:
        return own_text, f'<div dir="ltr">{own_html}</div>', None
    wrap = rng.random() < 0.5
    attr = attribution(prev, mail.client_lang, wrap)
    quoted = plain_of(quoted_blocks(prev, q))
    text = own_text + "\n\n" + attr + "\n\n" + "\n".join("> " + line if line else ">" for line in quoted.split("\n"))
    html = (f'<div dir="ltr">{own_html}</div><br><div class="gmail_quote"><div dir="ltr" class="gmail_attr">'
            f'{escape(attr).replace(chr(10), " ")}<br></div><blockquote class="gmail_quote" style="margin:0px 0px 0px '
            f'0.8ex;border-left:1px solid rgb(204,204,204);padding-left:1ex">{html_of(quoted_blocks(prev, q))}'
            "</blockquote></div>")
    return text, html, None


def client_apple_mail(mail, prev, q, rng):
    body = f"<div>{html_of(mail.blocks)}{sig_html(mail)}</div>"
    if prev:
        body += (f'<div><br><blockquote type="cite"><div>{escape(attribution(prev, mail.client_lang, False))}</div>'
                 f"<br><div>{html_of(quoted_blocks(prev, q))}</div></blockquote></div>")
    return None, f'<html><body style="overflow-wrap: break-word;">{body}</body></html>', "Apple Mail (2.3774.500.171)"


def client_roundcube(mail, prev, q, rng):
    body = html_of(mail.blocks) + sig_html(mail)
    if prev:
        attr = escape(attribution(prev, mail.client_lang, False))
        body += (f'<p>{attr}</p>\n<blockquote type="cite" style="padding:0 0.4em;border-left:#1010ff 2px solid;'
                 f'margin:0">{html_of(quoted_blocks(prev, q))}</blockquote>')
    return None, f'<html><body style="font-size: 10pt">{body}</body></html>', "Roundcube Webmail/1.6.6"


def client_thunderbird(mail, prev, q, rng):
    body = f"<p>{html_of(mail.blocks)}</p>"
    if prev:
        attr = escape(attribution(prev, mail.client_lang, False))
        body += (f'<div class="moz-cite-prefix">{attr}<br></div>\n<blockquote type="cite" cite="mid:{prev.mid[1:-1]}">'
                 f"{html_of(quoted_blocks(prev, q))}</blockquote>")
    sig = "<br>\n".join(escape(line) for line in mail.author["sig"])
    body += f'<pre class="moz-signature" cols="72">{sig}</pre>'
    return None, f"<html><body>{body}</body></html>", "Mozilla Thunderbird"


def client_zimbra(mail, prev, q, rng):
    body = f"<div>{html_of(mail.blocks)}{sig_html(mail)}</div>"
    if prev:
        labels = {"fr": ("De", "À", "Envoyé", "Objet"), "en": ("From", "To", "Sent", "Subject"),
                  "de": ("Von", "An", "Gesendet", "Betreff")}[mail.client_lang]
        values = [f"{prev.author['name']} <{prev.author['addr']}>", f"{prev.to['name']} <{prev.to['addr']}>",
                  format_datetime(prev.date), prev.subject]
        body += ('<hr id="zwchr"><div style="color:#000;font-weight:normal;font-style:normal;text-decoration:none;">'
                 + "".join(f"<b>{label}: </b>{escape(value)}<br>" for label, value in zip(labels, values)) +
                 f"<br></div><div>{html_of(quoted_blocks(prev, q))}</div>")
    return None, f'<html><body><div style="font-family: arial; font-size: 12pt">{body}</div></body></html>', \
        "Zimbra 9.0.0_GA (ZimbraWebClient - FF115)"


def client_mutt(mail, prev, q, rng):
    text = plain_of(mail.blocks)
    if prev:
        quoted = plain_of(quoted_blocks(prev, q))
        text = (f"On {prev.date:%a, %b %d, %Y at %I:%M:%S%p %z}, {prev.author['name']} wrote:\n" +
                "\n".join("> " + line if line else ">" for line in quoted.split("\n")) + "\n\n" + text)
    sig = mail.author["sig"] if mail.author["sig"][0] == "-- " else ["-- "] + mail.author["sig"][1:]
    return text + "\n\n" + "\n".join(sig), None, "NeoMutt/20231103"


def client_iphone(mail, prev, q, rng):
    text = plain_of(mail.blocks) + "\n\n" + MOBILE_FOOTERS[mail.client_lang]
    if prev:
        quoted = plain_of(quoted_blocks(prev, q))
        text += ("\n\n" + attribution(prev, mail.client_lang, True) + "\n\n" +
                 "\n".join("> " + line if line else ">" for line in quoted.split("\n")))
    return text, None, "iPhone Mail (21E236)"


def client_forward(mail, prev, q, rng):
    text = plain_of(mail.blocks) + "\n\n" + sig_text(mail)
    if prev:
        text += ("\n\n---------- Forwarded message ---------\n" + f"From: {prev.author['name']} <{prev.author['addr']}>\n"
                 f"Date: {format_datetime(prev.date)}\nSubject: {prev.subject}\nTo: <{prev.to['addr']}>\n\n" +
                 plain_of(quoted_blocks(prev, q)))
    return text, None, "Mozilla Thunderbird"


CLIENTS = {f.__name__.removeprefix("client_"): f for f in (
    client_outlook_plain, client_outlook_html, client_owa, client_gmail, client_apple_mail, client_roundcube,
    client_thunderbird, client_zimbra, client_mutt, client_iphone, client_forward)}
STAFF_CLIENTS = ["zimbra", "thunderbird", "outlook_plain", "owa", "mutt", "outlook_html"]
USER_CLIENTS = ["gmail", "outlook_html", "owa", "apple_mail", "roundcube", "thunderbird", "iphone", "mutt",
                "outlook_plain", "forward", "gmail", "zimbra"]


def render(mail: Mail, mails_of_ticket: list[Mail], rng, used: set, expected: dict) -> EmailMessage:
    prev = mails_of_ticket[mail.parent] if mail.parent is not None else None
    q = marker(rng, used) if prev else None
    mail.client_lang = "de" if mail.author.get("lang") == "de" else mail.lang
    text, html, agent = CLIENTS[mail.client](mail, prev, q, rng)
    if q:
        expected["must_not_appear"]["quote"].append(q)
        expected["quoted_by_client"].setdefault(mail.client, []).append(q)
    message = headers(mail, prev, agent)
    if text is not None:
        message.set_content(text, charset="utf-8")
        if html is not None:
            message.add_alternative(html, subtype="html", charset="utf-8")
    else:
        message.set_content(html, subtype="html", charset="utf-8")
    for name, content in mail.attachments:
        if isinstance(content, bytes):
            maintype, subtype = ("application", "pdf") if name.endswith(".pdf") else ("image", "png")
            message.add_attachment(content, maintype=maintype, subtype=subtype, filename=name)
        else:
            message.add_attachment(content, subtype="plain", charset="utf-8", filename=name)
    return message


def headers(mail: Mail, prev: Mail | None, agent: str | None) -> EmailMessage:
    message = EmailMessage(policy=POLICY)
    message["From"] = f"{mail.author['name']} <{mail.author['addr']}>"
    message["To"] = f"{mail.to['name']} <{mail.to['addr']}>"
    message["Subject"] = mail.subject
    message["Date"] = format_datetime(mail.date)
    message["Message-ID"] = mail.mid
    if prev is not None and mail.threaded:
        message["In-Reply-To"] = prev.mid
        message["References"] = prev.mid if prev.parent is None else f"{prev.refs} {prev.mid}"
    mail.refs = str(message.get("References", "")) or mail.mid
    if agent:
        message["X-Mailer" if "Outlook" in agent or "iPhone" in agent else "User-Agent"] = agent
    return message


AUTOREPLY_TEXT = {
    "fr": "Je suis absente du bureau jusqu'au 17 mars avec un accès limité à ma messagerie.",
    "en": "I am out of the office until March 17th with limited access to e-mail.",
    "de": "Ich bin bis zum 17. März nicht im Büro und habe nur eingeschränkt Zugriff auf meine E-Mails.",
}
AUTOREPLY_KINDS = [  # (signal, extra headers, subject prefix, language)
    ("Auto-Submitted: auto-replied", {"Auto-Submitted": "auto-replied"}, "Absence du bureau : ", "fr"),
    ("X-Autoreply: yes", {"X-Autoreply": "yes"}, "Out of Office: ", "en"),
    ("X-Autorespond", {"X-Autorespond": "Vacation message"}, "Absence : ", "fr"),
    ("Precedence: auto_reply", {"Precedence": "auto_reply"}, "Out of office: ", "en"),
    ("X-Auto-Response-Suppress + Réponse automatique", {"X-Auto-Response-Suppress": "All"}, "Réponse automatique : ", "fr"),
    ("X-Auto-Response-Suppress + Automatic reply", {"X-Auto-Response-Suppress": "All"}, "Automatic reply: ", "en"),
    ("X-Auto-Response-Suppress + Automatische Antwort", {"X-Auto-Response-Suppress": "All"}, "Automatische Antwort: ", "de"),
]


def autoreply(kind: int, after: Mail, rng, used: set) -> tuple[EmailMessage, str, str]:
    """An out-of-office answer to `after` from its recipient (a user), threaded into the ticket."""
    signal, extra, prefix, lang = AUTOREPLY_KINDS[kind]
    mark = marker(rng, used)
    text = f"{AUTOREPLY_TEXT[lang]} (absence {mark})"
    message = EmailMessage(policy=POLICY)
    message["From"] = f"{after.to['name']} <{after.to['addr']}>"
    message["To"] = f"{after.author['name']} <{after.author['addr']}>"
    message["Subject"] = prefix + after.subject
    message["Date"] = format_datetime(after.date + timedelta(minutes=1))
    message["Message-ID"] = f"<auto.{rng.getrandbits(40):010x}@{after.to['addr'].split('@')[1]}>"
    message["In-Reply-To"] = after.mid
    message["References"] = after.mid
    for key, value in extra.items():
        message[key] = value
    message.set_content(text, charset="utf-8")
    return message, signal, text


def acknowledgement(question: Mail, rng, used: set) -> tuple[EmailMessage, str]:
    """The helpdesk tool's automatic receipt, from the staff address (it would be trained as an answer)."""
    text = (f"Votre demande a bien été enregistrée sous le numéro {question.ticket}. Un membre de l'équipe vous "
            f"répondra dans les meilleurs délais. (accusé {marker(rng, used)})")
    message = EmailMessage(policy=POLICY)
    message["From"] = f"{HELPDESK['name']} <{HELPDESK['addr']}>"
    message["To"] = f"{question.author['name']} <{question.author['addr']}>"
    message["Subject"] = f"{question.tag} Accusé de réception : {question.subject}"
    message["Date"] = format_datetime(question.date + timedelta(minutes=2))
    message["Message-ID"] = f"<ack.{question.ticket}@helpdesk.idris.fr>"
    message["In-Reply-To"] = question.mid
    message["Auto-Submitted"] = "auto-generated"
    message.set_content(text, charset="utf-8")
    return message, text


def bounce(answer: Mail, rng, used: set) -> tuple[Message, str]:
    """A delivery-status report for a staff answer, from the user's mail server (Exchange-style: it names the mail)."""
    domain = answer.to["addr"].split("@")[1]
    text = (f"This is the mail system at host smtp.{domain}. I'm sorry to have to inform you that your message could "
            f"not be delivered to one or more recipients. (bounce {marker(rng, used)})")
    report = MIMEMultipart("report", report_type="delivery-status", policy=POLICY)
    report["From"] = f"Mail Delivery System <MAILER-DAEMON@{domain}>"
    report["To"] = f"{answer.author['name']} <{answer.author['addr']}>"
    report["Subject"] = "Undelivered Mail Returned to Sender"
    report["Date"] = format_datetime(answer.date + timedelta(minutes=3))
    report["Message-ID"] = f"<bounce.{rng.getrandbits(40):010x}@smtp.{domain}>"
    report["References"] = answer.mid
    report.attach(MIMEText(text, "plain", "utf-8"))
    status = Message(policy=POLICY)
    status["Content-Type"] = "message/delivery-status"
    per_mta, per_rcpt = Message(policy=POLICY), Message(policy=POLICY)
    per_mta["Reporting-MTA"] = f"dns; smtp.{domain}"
    per_rcpt["Final-Recipient"] = f"rfc822; {answer.to['addr']}"
    per_rcpt["Action"] = "failed"
    per_rcpt["Status"] = "5.1.1"
    status.set_payload([per_mta, per_rcpt])
    report.attach(status)
    original = MIMEText(f"From: {answer.author['addr']}\nSubject: {answer.subject}\nMessage-ID: {answer.mid}\n",
                        "rfc822-headers", "utf-8")
    report.attach(original)
    return report, text


# ------------------------------------------------------------------------------------------------- the export
PDF = b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n1 0 obj <</Type /Catalog>> endobj\ntrailer <</Root 1 0 R>>\n%%EOF\n"
PNG = b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\x00\x00\x01\x00\x00\x00\x01\x08\x02\x00\x00\x00\x90wS\xde" + bytes(40)
TEXT_ATTACHMENTS = [
    ("job_train.slurm", "#!/bin/bash\n#SBATCH --job-name=attached_job\n#SBATCH --gres=gpu:8\nsrun python pretrain.py\n",
     "#SBATCH --job-name=attached_job"),
    ("slurm-2345678.out", "Epoch 1/10 loss=2.314\nslurmstepd: error: Detected 1 oom_kill event in StepId=2345678.0\n",
     "slurmstepd: error: Detected 1 oom_kill event in StepId=2345678.0"),
    ("build.err", "nvc-Error-Unknown switch: -fopenmp-simd\nmake: *** [Makefile:12: solver] Error 1\n",
     "make: *** [Makefile:12: solver] Error 1"),
]


def plans(n: int, pii: list, decoy_lines: list) -> list[dict]:
    """What each ticket carries beyond its topic: clients, length, personal data, decoys, attachments, events."""
    out = []
    for t in range(n):
        plan = {"clients": [USER_CLIENTS[t % len(USER_CLIENTS)], STAFF_CLIENTS[t % len(STAFF_CLIENTS)],
                            USER_CLIENTS[(t + 5) % len(USER_CLIENTS)], STAFF_CLIENTS[(t + 1) % len(STAFF_CLIENTS)]],
                "long": t % 3 != 2 or 23 <= t <= 32, "pii": [pii[t]] if t < len(pii) else []}
        if 15 <= t < 15 + len(decoy_lines):
            plan["q_extra"] = [("p", decoy_lines[t - 15])]
        if t in (18, 19):
            sentence, script = HEADER_LIKE[t - 18]
            plan["q_extra"] = [("p", sentence), ("code", script)]
        if t == 20:
            plan["attachments"] = [(name, body) for name, body, _ in TEXT_ATTACHMENTS[:2]]
        if t == 21:
            plan["attachments"] = [("rapport_erreur.pdf", PDF), TEXT_ATTACHMENTS[2][:2]]
        if t == 22:
            plan["attachments"] = [("capture_nvidia_smi.png", PNG)]
        if 23 <= t < 23 + len(AUTOREPLY_KINDS):
            plan["autoreply"] = t - 23
        plan["acknowledgement"] = t in (30, 31)
        plan["bounce"] = t == 32
        out.append(plan)
    return out


def start_of(t: int, rng) -> datetime:
    if 33 <= t <= 38:  # tickets around a month's end: their mails fall in the overlap of two monthly exports
        return datetime(2025, 1 if t < 36 else 2, 31 if t < 36 else 28, 21, 10 * (t - 33), tzinfo=TZ)
    return datetime(2025, 1, 2, 8, tzinfo=TZ) + timedelta(minutes=rng.randrange(0, 84 * 24 * 60))


def serialized(message) -> bytes:
    for i, part in enumerate(p for p in message.walk() if p.is_multipart()):  # fixed boundaries: same seed, same bytes
        seed = f"{message['Message-ID']}/{i}".encode()
        part.set_boundary("=_" + hashlib.sha1(seed).hexdigest()[:24])
    out = io.BytesIO()
    BytesGenerator(out, mangle_from_=True, policy=POLICY).flatten(message)
    return out.getvalue().rstrip(b"\n") + b"\n"


def month_files(entries: list[dict], expected: dict) -> dict[str, list[dict]]:
    """Monthly exports; each runs OVERLAP_DAYS into the next month, and every third mail repeated there has its
    Message-ID rewritten by the export tool in that copy."""
    files, repeated = {}, 0
    for i, (year, month) in enumerate(MONTHS):
        first = datetime(year, month, 1, tzinfo=TZ)
        following = datetime(year + month // 12, month % 12 + 1, 1, tzinfo=TZ)
        end = following + timedelta(days=OVERLAP_DAYS) if i < len(MONTHS) - 1 else following + timedelta(days=60)
        start = first if i else first - timedelta(days=60)
        chosen = []
        for entry in entries:
            if not start <= entry["date"] < end:
                continue
            raw = entry["raw"]
            if entry["date"] >= following:  # also in the next month's file
                repeated += 1
                if repeated % 3 == 0:
                    new_id = f"<export-{repeated:04d}.{i}@helpdesk-export.idris.fr>".encode()
                    raw = raw.replace(b"Message-ID: " + entry["mid"].encode(), b"Message-ID: " + new_id, 1)
                    expected["duplicates"]["rewritten_message_id"] += 1
                else:
                    expected["duplicates"]["same_message_id"] += 1
            chosen.append({**entry, "raw": raw})
        chosen.sort(key=lambda e: (e["date"], e["order"]))
        for entry in [e for e in chosen if e.get("before_parent")]:  # a reply exported before its parent
            parent = next((j for j, e in enumerate(chosen) if e["mid"] == entry["before_parent"]), None)
            if parent is not None:
                chosen.remove(entry)
                chosen.insert(parent, entry)
                expected["replies_before_parent"] += 1
        files[f"{year}-{month:02d}.mbox"] = chosen
    expected["duplicates"]["total"] = sum(expected["duplicates"].values())
    return files


def email_export(out: Path, rng: random.Random, n: int, used: set) -> dict:
    pii = planted_pii(rng)
    decoy_lines = decoys(rng)
    exp = {"format": "email", "path": "mbox", "staff_domains": [STAFF_DOMAIN], "files": [], "mails_in_files": 0,
           "unique_mails": 0, "duplicates": {"same_message_id": 0, "rewritten_message_id": 0},
           "replies_before_parent": 0, "auto_replies": {"total": 0, "by_signal": {}}, "tickets": n,
           "mail_markers": [], "quoted_by_client": {},
           "must_not_appear": {"quote": [], "signature": [], "autoreply": [], "binary": ["%PDF-1.4", "JVBERi0xLjQ"],
                               "pii": {}},
           "must_appear": {"code": [], "sentence": [], "site": ["IDRIS", "Jean Zay"], "attachment": []}}
    entries = []
    for t, plan in enumerate(plans(n, pii, decoy_lines)):
        mails = ticket_mails(rng, t, 1000 + 7 * t, start_of(t, rng), plan["pii"], plan, used)
        for mail in mails:
            message = render(mail, mails, rng, used, exp)
            entries.append({"date": mail.date, "mid": mail.mid, "raw": serialized(message), "order": len(entries),
                            "sender": mail.author["addr"],
                            "before_parent": mails[0].mid if t % 6 == 2 and mail is mails[1] else None})
            exp["mail_markers"].append(mail.marker)
            for kind, block in mail.blocks:
                if kind == "code":
                    exp["must_appear"]["code"] += [line for line in block if line.strip()]
        events = []
        if "autoreply" in plan:
            message, signal, text = autoreply(plan["autoreply"], mails[1], rng, used)
            events.append((message, text, signal))
        if plan["acknowledgement"]:
            events.append((*acknowledgement(mails[0], rng, used), "Auto-Submitted: auto-generated (helpdesk receipt)"))
        if plan["bounce"]:
            events.append((*bounce(mails[1], rng, used), "multipart/report delivery-status from MAILER-DAEMON"))
        for message, text, signal in events:
            entries.append({"date": parsedate_to_datetime(str(message["Date"])), "mid": str(message["Message-ID"]),
                            "raw": serialized(message), "order": len(entries), "sender": "", "before_parent": None})
            exp["auto_replies"]["by_signal"][signal] = exp["auto_replies"]["by_signal"].get(signal, 0) + 1
            exp["must_not_appear"]["autoreply"].append(text)
        for name, content in plan.get("attachments", []):
            exp["must_appear"]["attachment"].append(name)
            if isinstance(content, str):
                exp["must_appear"]["attachment"].append(next(line for _, body, line in TEXT_ATTACHMENTS if body == content))
        for kind, value, _ in plan["pii"]:
            exp["must_not_appear"]["pii"].setdefault(kind, []).append(value)
        for kind, block in plan.get("q_extra", []):
            exp["must_appear"]["sentence" if kind == "p" else "code"] += [block] if kind == "p" else block
    people = USERS + STAFF
    for person in people:  # signature lines other than the closing and the name (names are personal data)
        exp["must_not_appear"]["signature"] += [line for line in person["sig"][2:] if "," in line]  # titles
        exp["must_not_appear"]["pii"].setdefault("NAME", []).append(person["name"])
        phone = next((line for line in person["sig"] if any(c.isdigit() for c in line) and "," not in line), None)
        if phone:
            exp["must_not_appear"]["pii"].setdefault("PHONE", []).append(phone.split(": ")[-1].strip())
    exp["must_not_appear"]["signature"] += [HELPDESK["sig"][3]] + list(MOBILE_FOOTERS.values())
    exp["auto_replies"]["total"] = sum(exp["auto_replies"]["by_signal"].values())
    files = month_files(entries, exp)
    (out / "mbox").mkdir(parents=True, exist_ok=True)
    for name, chosen in files.items():
        with open(out / "mbox" / name, "wb") as handle:
            for entry in chosen:
                sender = entry["sender"] or "MAILER-DAEMON"
                handle.write(f"From {sender} {entry['date'].astimezone(timezone.utc):%a %b %d %H:%M:%S %Y}\n".encode())
                handle.write(entry["raw"] + b"\n")
        exp["files"].append(f"mbox/{name}")
        exp["mails_in_files"] += len(chosen)
    exp["unique_mails"] = len(entries)
    exp["threads"] = n
    return finish(exp)


def finish(exp: dict) -> dict:
    for key, values in exp["must_appear"].items():
        exp["must_appear"][key] = list(dict.fromkeys(values))
    pii = exp["must_not_appear"]["pii"]
    for kind in pii:
        pii[kind] = list(dict.fromkeys(pii[kind]))
    exp["pii_counts"] = {kind: len(values) for kind, values in sorted(pii.items())}
    return exp


# ------------------------------------------------------------------------------------------------- JSONL and CSV
PROSE = [  # (question lines, answer lines): plain text that talks about tags and compares with < and >
    (["Mon script Python génère un rapport, mais les <table> et <td> tags sont affichés tels quels dans le navigateur.",
      "Le test en C qui filtre les valeurs est le suivant :", "if (a<b && c>d) { keep(i); }"],
     ["Le fichier est servi en text/plain : les balises ne sont donc pas interprétées.",
      "Servez-le en text/html ou ouvrez-le localement."]),
    (["The log says a <br> tag is missing in the template, but I only write plain text.",
      "My loop is: for (i = 0; i<n && x[i]>0; i++) total += x[i];"],
     ["The template engine escapes the <br> tag you insert: mark it as safe.",
      "Your loop is fine: it stops at the first x[i]<=0, which is what you want."]),
    (["Is there a way to show the <pre> and <code> blocks of the Jean Zay documentation as plain text?",
      "I compare sizes like this: while (size<limit && free>0) size *= 2;"],
     ["Use the print view of the IDRIS documentation: it keeps the <pre> blocks as they are."]),
    (["Le compilateur refuse : x = (n>m) ? n : m; puis y = (p<q);",
      "J'ai aussi un <div> vide dans la sortie HTML de mon outil, est-ce grave ?"],
     ["Ces deux lignes sont correctes en C ; l'erreur vient de la ligne précédente.",
      "Un <div> vide n'est pas un problème."]),
]


def prose_tickets(rng, used: set, n: int) -> tuple[list[dict], dict]:
    """Tickets for the JSONL and CSV variants: (ticket, expected), quotes and signatures in the staff answers."""
    tickets = []
    exp = {"must_not_appear": {"quote": [], "signature": [], "autoreply": [], "binary": [], "pii": {}},
           "must_appear": {"code": [], "sentence": [], "site": ["IDRIS", "Jean Zay"], "attachment": []},
           "mail_markers": [], "duplicates": {"total": 0}, "auto_replies": {"total": 0, "by_signal": {}}}
    pii = [("EMAIL", "claire.f.perso@free.fr"), ("PHONE", "07 81 22 33 44"), ("IP", "147.210.18.4")]
    for t in range(n):
        user, staff = USERS[(t + 1) % len(USERS)], STAFF[t % len(STAFF)]
        question, answer = PROSE[t % len(PROSE)]
        m_q, m_a, quote = marker(rng, used), marker(rng, used), marker(rng, used)
        q_lines = ["Bonjour," if user["lang"] == "fr" else "Hello,", "", *question, f"(suivi {m_q})"]
        if t < len(pii):
            q_lines.append(f"Contact : {pii[t][1]}")
            exp["must_not_appear"]["pii"].setdefault(pii[t][0], []).append(pii[t][1])
        q_lines += ["", *user["sig"]]
        quoted = [line.replace(m_q, quote) for line in q_lines]
        when = datetime(2025, 4, 1 + t, 9, 30, tzinfo=TZ)
        attr = f"Le {date_words(when, 'fr')}, {user['name']} <{user['addr']}> a écrit :"
        a_lines = ["Bonjour,", "", *answer, "Les nœuds de Jean Zay sont gérés par l'IDRIS.", f"(suivi {m_a})", "",
                   *staff["sig"], "", attr, *("> " + line if line else ">" for line in quoted)]
        tickets.append({"id": f"T-{3000 + t}", "subject": "Balises et comparaisons" if t % 2 else "Tags in output",
                        "user": user, "staff": staff, "date": when, "question": "\n".join(q_lines),
                        "answer": "\n".join(a_lines)})
        exp["must_appear"]["code"] += question
        exp["must_appear"]["sentence"] += answer
        exp["must_not_appear"]["quote"].append(quote)
        exp["must_not_appear"]["signature"] += [line for line in staff["sig"][2:3] + user["sig"][2:3]]
        exp["mail_markers"] += [m_q, m_a]
        exp["must_not_appear"]["pii"].setdefault("NAME", []).extend([user["name"], staff["name"]])
    return tickets, exp


def write_jsonl(out: Path, rng, used: set, n: int) -> dict:
    tickets, exp = prose_tickets(rng, used, n)
    with open(out / "tickets.jsonl", "w", encoding="utf-8") as handle:
        for ticket in tickets:
            messages = [{"from": f"{ticket['user']['name']} <{ticket['user']['addr']}>",
                         "date": format_datetime(ticket["date"]), "body": ticket["question"]},
                        {"from": f"{ticket['staff']['name']} <{ticket['staff']['addr']}>",
                         "date": format_datetime(ticket["date"] + timedelta(hours=2)), "body": ticket["answer"]}]
            handle.write(json.dumps({"id": ticket["id"], "subject": ticket["subject"], "messages": messages},
                                    ensure_ascii=False) + "\n")
    return finish({**exp, "format": "tickets_jsonl", "path": "tickets.jsonl", "staff_domains": [STAFF_DOMAIN],
                   "tickets": n, "threads": n, "unique_mails": 2 * n})


def write_csv(out: Path, rng, used: set, n: int) -> dict:
    tickets, exp = prose_tickets(rng, used, n)
    with open(out / "tickets.csv", "w", encoding="utf-8", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["id", "subject", "body", "answer"])
        for ticket in tickets:
            writer.writerow([ticket["id"], ticket["subject"], ticket["question"], ticket["answer"]])
    for name in exp["must_not_appear"]["pii"]["NAME"][:]:  # CSV has no authors: only names written in the text
        if not any(name in t["question"] + t["answer"] for t in tickets):
            exp["must_not_appear"]["pii"]["NAME"].remove(name)
    return finish({**exp, "format": "csv", "path": "tickets.csv", "question_columns": ["subject", "body"],
                   "answer_column": "answer", "id_column": "id", "tickets": n, "threads": n, "unique_mails": 2 * n})


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--tickets", type=int, default=60, help="tickets in the mbox export (at least 40)")
    args = parser.parse_args(argv)
    if args.tickets < 40:
        parser.error("--tickets: at least 40 (the planted cases need them)")
    rng, used = random.Random(args.seed), set()
    args.out_dir.mkdir(parents=True, exist_ok=True)
    expected = {"seed": args.seed, "generator": "tools/make_helpdesk_exports.py",
                "variants": {"email": email_export(args.out_dir, rng, args.tickets, used),
                             "jsonl": write_jsonl(args.out_dir, rng, used, 8),
                             "csv": write_csv(args.out_dir, rng, used, 6)}}
    (args.out_dir / "expected.json").write_text(json.dumps(expected, ensure_ascii=False, indent=1) + "\n",
                                                encoding="utf-8")
    email_exp = expected["variants"]["email"]
    print(f"wrote {args.out_dir}: {len(email_exp['files'])} mbox files, {email_exp['mails_in_files']} mails "
          f"({email_exp['unique_mails']} unique, {email_exp['duplicates']['total']} duplicates), "
          f"{email_exp['auto_replies']['total']} auto-replies, tickets.jsonl, tickets.csv, expected.json")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
