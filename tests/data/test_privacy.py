"""An ugly export with every kind of personal data, quoted replies and signatures: none of it reaches the outputs."""

from __future__ import annotations

import json
import mailbox
import re
from email.message import EmailMessage
from pathlib import Path

import pytest

from llmft.config.compose import compose
from llmft.data.prepare.command import prepare
from llmft.data.clean.scrub import Scrubber
from llmft.config.data_schema import ScrubConfig
from omegaconf import OmegaConf

STAFF = "support.example-hpc.fr"
# planted value -> the placeholder type that must replace it
PLANTED = {
    "marie.curie@lab.example.fr": "EMAIL",
    "j.doe+hpc@gmail.com": "EMAIL",
    "06 12 34 56 78": "PHONE",
    "+33 (0)1 44 27 00 00": "PHONE",
    "+44 20 7946 0958": "PHONE",
    "01.44.27.00.99": "PHONE",
    "(415) 555-0100": "PHONE",
    "192.0.2.15": "IP",
    "10.148.8.21": "IP",
    "2001:db8:85a3::8a2e:370:7334": "IP",
    "jdupont:S3cretPass@data.example.org": "URL",
    "token=ac2e922f58e6a025c0": "URL",
    "hf_AbCdEfGhIjKlMnOpQrStUvWxYz012345": "SECRET",
    "ghp_vXPhW81DeJ6iHQCjD55A57ErrGuVr9bhg1hY": "SECRET",
    "AKIAY53MEX8GID16K7RX": "SECRET",
    "b3BlbnNzaC1rZXktdjEAAAAABG5vbmUAAAAEbm9uZQ": "SECRET",
    "hunter22": "SECRET",
    "Soleil2025!": "SECRET",
    "uxy12ab": "LOGIN",
    "gen4321": "PROJECT",
    "Curie": "NAME",
    "Dubois": "NAME",
}
LEFTOVERS = ["QUOTED-TEXT", "SIGNATURE-TEXT", "INTERNAL-NOTE"]  # quoted replies, signatures, internal notes

USER_1 = """Bonjour,

Mon job ne démarre plus depuis le nœud 10.148.8.21 (ou 2001:db8:85a3::8a2e:370:7334), login uxy12ab, projet gen4321.
Mon mot de passe : Soleil2025! et mon token hf_AbCdEfGhIjKlMnOpQrStUvWxYz012345, clé AWS AKIAY53MEX8GID16K7RX.
Je clone avec https://jdupont:S3cretPass@data.example.org/corpus/ et
https://files.example.org/x.tar?token=ac2e922f58e6a025c0&expires=1767225600.
Ma clé :
-----BEGIN OPENSSH PRIVATE KEY-----
b3BlbnNzaC1rZXktdjEAAAAABG5vbmUAAAAEbm9uZQ
-----END OPENSSH PRIVATE KEY-----

Merci d'avance,
Marie Curie
SIGNATURE-TEXT Laboratoire
06 12 34 56 78"""
STAFF_1 = """Bonjour Madame Curie,

Ne partagez jamais votre mot de passe. Votre nœud 192.0.2.15 est en maintenance ; relancez avec
`sbatch -A gen4321@h100 job.slurm`. Écrivez-nous à support@support.example-hpc.fr si besoin.

Bien cordialement,
Pierre Dubois
-- 
SIGNATURE-TEXT Équipe support, +33 (0)1 44 27 00 00"""
USER_2 = """Thanks, works now. Another one: git push asks for password: hunter22 and my token ghp_vXPhW81DeJ6iHQCjD55A57ErrGuVr9bhg1hY?
Call me at +44 20 7946 0958 or (415) 555-0100, or 01.44.27.00.99, or write to j.doe+hpc@gmail.com.

Le 10/01/2025 à 11:26, Pierre Dubois a écrit :
> Bonjour Madame Curie,
> QUOTED-TEXT Ne partagez jamais votre mot de passe.

Sent from my iPhone"""
STAFF_2 = """Use an SSH key or a credential helper instead of typing tokens.

Kind regards,
Pierre

On Mon, 13 Jan 2025 at 09:05, Marie Curie <marie.curie@lab.example.fr> wrote:
QUOTED-TEXT without any > marker, as Outlook sends it
-----Original Message-----
From: Marie Curie"""


def ugly_tickets() -> list[dict]:
    author = "Marie Curie <marie.curie@lab.example.fr>"
    staff = f"Pierre Dubois <pierre.dubois@{STAFF}>"
    return [
        {"id": "T-1", "subject": "Job bloqué (login uxy12ab)", "messages": [
            {"from": author, "date": "Mon, 06 Jan 2025 09:14:17 +0100", "body": USER_1},
            {"from": staff, "date": "Mon, 06 Jan 2025 09:20:00 +0100", "body": "INTERNAL-NOTE pwd leaked", "internal": True},
            {"from": staff, "date": "Mon, 06 Jan 2025 09:58:35 +0100", "body": STAFF_1},
            {"from": author, "date": "Mon, 06 Jan 2025 11:20:58 +0100", "body": USER_2},
            {"from": staff, "date": "Mon, 06 Jan 2025 11:40:00 +0100", "body": STAFF_2},
        ]},
        {"id": "T-2", "subject": "Quota", "messages": [
            {"from": author, "date": "Tue, 07 Jan 2025 09:14:17 +0100", "body": "<div>My quota on <b>gen4321</b> is full, "
             "see <a href='mailto:marie.curie@lab.example.fr'>me</a>.<br>Thanks</div>"
             "<div class='gmail_quote'>On Mon wrote:<blockquote>QUOTED-TEXT old mail</blockquote></div>"},
            {"from": staff, "date": "Tue, 07 Jan 2025 10:00:00 +0100", "body": "<p>Clean your conda environments with "
             "<code>conda clean -a</code>.</p><p>Regards,<br>Pierre Dubois<br>SIGNATURE-TEXT</p>"},
        ]},
    ]


def write_mbox(tickets: list[dict], path: Path) -> Path:
    box = mailbox.mbox(str(path))
    for ticket in tickets:
        previous: list[str] = []
        for index, message in enumerate(m for m in ticket["messages"] if not m.get("internal")):
            mail = EmailMessage()
            mail["From"], mail["Date"] = message["from"], message["date"]
            mail["Subject"] = ("Re: " if previous else "") + f"[Ticket #{ticket['id'][2:]}] {ticket['subject']}"
            mail["Message-ID"] = f"<{ticket['id']}.{index}@example>"
            if previous:
                mail["In-Reply-To"], mail["References"] = previous[-1], " ".join(previous)
            body = message["body"]
            mail.set_content(body, subtype="html" if body.startswith("<") else "plain")
            box.add(mail)
            previous.append(mail["Message-ID"])
    box.close()
    return path


def all_output_text(out_dir: Path) -> str:
    """Everything prepare wrote that a person or the model reads: the audit files, the report, decoded samples."""
    from datasets import load_from_disk
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(out_dir / "tokenizer")
    dataset = load_from_disk(str(out_dir / "dataset"))
    decoded = [tokenizer.decode(row["input_ids"]) for split in dataset for row in dataset[split]]
    files = [p.read_text() for p in out_dir.glob("*.json*")]
    return "\n".join(files + decoded)


@pytest.mark.parametrize("data_format", ["tickets_jsonl", "email"])
def test_no_planted_personal_data_quote_or_signature_reaches_any_output(tmp_path, data_format):
    tickets = ugly_tickets()
    if data_format == "email":
        path = write_mbox(tickets, tmp_path / "export.mbox")
    else:
        path = tmp_path / "export.jsonl"
        path.write_text("".join(json.dumps(t, ensure_ascii=False) + "\n" for t in tickets))
    cfg = compose([f"data.format={data_format}", f"data.path={path}", f"data.output_dir={tmp_path / 'out'}",
                   f"data.tickets.staff_domains=[{STAFF}]", "data.validation_fraction=0.5",
                   "data.clean.min_assistant_chars=5"])
    report = prepare(cfg)
    text = all_output_text(tmp_path / "out")
    left = [value for value in PLANTED if value in text] + [marker for marker in LEFTOVERS if marker in text]
    assert not left, f"left in the outputs: {left}"
    assert set(PLANTED.values()) <= set(report["pii_replacements"])
    # what must stay stays: the answers themselves, the staff command, the placeholders
    assert "conda clean -a" in text and "sbatch -A <PROJECT>@h100 job.slurm" in text and "<SECRET>" in text
    assert "Use an SSH key or a credential helper" in text


def test_scrubber_keeps_what_is_not_personal():
    scrubber = Scrubber(OmegaConf.structured(ScrubConfig))
    text = ("Bind to 0.0.0.0 on port 8888; torch 2.3.0 and CUDA 12.4; job 1873412 on 2025-01-13 at 12:30:45; "
            "500 000 files; MAC 00:1a:2b:3c:4d:5e; std::vector; https://docs.example.org/page?lang=fr; "
            "the password is expired; mot de passe : <SECRET>")
    assert scrubber.scrub(text) == text
    assert not scrubber.counts or sum(scrubber.counts.values()) == 0


def test_scrubber_counts_each_replacement_once():
    scrubber = Scrubber(OmegaConf.structured(ScrubConfig))
    out = scrubber.scrub("export HF_TOKEN=hf_AbCdEfGhIjKlMnOpQrStUvWxYz012345 then mail a@b.fr, c@d.org",
                         names=["Ada Lovelace"])
    assert out == "export HF_TOKEN=<SECRET> then mail <EMAIL>, <EMAIL>"
    assert scrubber.counts["SECRET"] == 1 and scrubber.counts["EMAIL"] == 2
    assert re.sub(r"<[A-Z]+>", "", scrubber.scrub("Hello Ada, LOVELACE here", ["Ada Lovelace"])) == "Hello ,  here"
