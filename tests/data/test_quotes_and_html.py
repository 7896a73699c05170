"""Quoted replies of every common mail client (HTML and plain, French, English, German), signatures, and what HTML
is: the previous mail must go, the reply's own text (code with `<` and `>`, `#include <stdio.h>`, a job script with
blank lines) must stay line for line, and the user's sentences that look like a reply header, a separator or a
closing must stay too."""

from __future__ import annotations

import pytest
from omegaconf import OmegaConf

from llmft.config.data_schema import CleanConfig
from llmft.data.clean.html_text import html_to_text, looks_like_html
from llmft.data.clean.messages import MessageCleaner, strip_quoted_replies

CLEAN = OmegaConf.structured(CleanConfig)
QUOTED = "QUOTEDMARKER"  # in every quoted part: must disappear
OLD_SIGNATURE = "Ingénieure support, IDRIS-CNRS"  # the previous mail's signature, inside the quote
AUTHOR = "Rémi Lacroix"


def clean_mail(text: str | None = None, html: str | None = None, author: str = AUTHOR) -> str:
    """An e-mail body cleaned as prepare does: the HTML part turned into text (the reader), then the cleaner."""
    body = html_to_text(html) if html is not None else text
    return MessageCleaner(CLEAN, "email").clean(body, [author])


# ------------------------------------------------------------------------------------------- the reply's own text
OWN_TEXT = {
    "fr": "Bonjour,\n\nVoici le programme corrigé :\n\n"
          "#include <stdio.h>\nint main(void) {\n    int n = 0, m = 10, k = 5;\n\n    while (n<m && k>1) {\n"
          "        n += 2; k--;\n    }\n    return 0;\n}\n\nEt le script :\n\n"
          "#!/bin/bash\n#SBATCH --nodes=2\n\nsrun ./a.out",
    "en": "Hello,\n\nHere is the fixed program:\n\n"
          "#include <stdio.h>\nint main(void) {\n    if (a<b && c>d) keep(i);\n\n    return 0;\n}\n\n"
          "And the script:\n\n#!/bin/bash\n#SBATCH --gres=gpu:4\n\nsrun python train.py",
    "de": "Hallo,\n\nhier das korrigierte Programm:\n\n"
          "#include <stdio.h>\nint main(void) {\n    while (size<limit && free>0) size *= 2;\n\n    return 0;\n}\n\n"
          "Und das Skript:\n\n#!/bin/bash\n#SBATCH --time=10:00:00\n\nsrun ./solver",
}
OWN_SIGNATURE = {"fr": ["Cordialement,", AUTHOR, "Ingénieur support applications IA, IDRIS-CNRS",
                        "Tél. : 01 69 35 85 21"],
                 "en": ["Best regards,", AUTHOR, "HPC application engineer, IDRIS user support",
                        "Phone: +33 1 69 35 84 90"],
                 "de": ["Mit freundlichen Grüßen", AUTHOR, "Wissenschaftlicher Mitarbeiter, Lehrstuhl für Numerik",
                        "Tel.: +49 89 289 17456"]}


def own_html(lang: str) -> str:
    """OWN_TEXT as a mail client writes it in HTML: paragraphs, `<pre>` blocks escaped, the signature with `<br>`."""
    html, pre = [], []
    for paragraph in OWN_TEXT[lang].split("\n\n"):
        if paragraph.startswith(("#include", "#!", "    ", "int ", "srun")):
            pre.append(paragraph)
            continue
        if pre:
            html.append("<pre>" + escape("\n\n".join(pre)) + "</pre>")
            pre = []
        html.append(f"<p class=MsoNormal>{escape(paragraph)}<o:p></o:p></p>")
    if pre:
        html.append("<pre>" + escape("\n\n".join(pre)) + "</pre>")
    html.append("<p>" + "<br>\n".join(escape(line) for line in OWN_SIGNATURE[lang]) + "</p>")
    return "\n".join(html)


def escape(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def quoted_html(lang: str) -> str:
    words = {"fr": "Mon job reste en attente", "en": "My job stays pending", "de": "Mein Job wartet"}[lang]
    return (f"<p>{words} ({QUOTED}).</p><p>Cordialement,<br>Claire Fontaine<br>{escape(OLD_SIGNATURE)}<br>"
            "Tél. : 06 71 82 93 04</p>")


HEADER_LABELS = {"fr": ("De", "Envoyé", "À", "Objet"), "en": ("From", "Sent", "To", "Subject"),
                 "de": ("Von", "Gesendet", "An", "Betreff")}
HEADER_VALUES = ("Claire Fontaine &lt;claire.fontaine@univ-grenoble-alpes.fr&gt;", "lundi 13 janvier 2025 09:05",
                 "Assistance IDRIS &lt;assist@idris.fr&gt;", "RE: [Demande #1234] Job en attente")
ATTRIBUTION = {
    "en": "On Mon, 13 Jan 2025 at 09:05, Claire Fontaine <claire.fontaine@univ-grenoble-alpes.fr> wrote:",
    "fr": "Le lun. 13 janv. 2025 à 09:05, Claire Fontaine <claire.fontaine@univ-grenoble-alpes.fr> "
          "a\u202fécrit\u00a0:",  # no-break spaces, as Gmail and Outlook write them
    "de": "Am 3. März 2025 um 10:14 schrieb Claire Fontaine <claire.fontaine@univ-grenoble-alpes.fr>:",
}


def outlook_header_html(lang: str, colon: str = "&nbsp;:") -> str:
    sep = colon if lang == "fr" else ":"
    return "<br>\n".join(f"<b>{label}{sep}</b> {value}" for label, value in zip(HEADER_LABELS[lang], HEADER_VALUES))


HTML_CLIENTS = {
    "outlook_desktop": lambda lang: (
        "<html xmlns:o=\"urn:schemas-microsoft-com:office:office\"><head><style>p.MsoNormal {margin:0}</style>"
        f"</head><body lang=FR><div class=WordSection1>{own_html(lang)}<p class=MsoNormal><o:p>&nbsp;</o:p></p>"
        "<div><div style='border:none;border-top:solid #E1E1E1 1.0pt;padding:3.0pt 0cm 0cm 0cm'><p class=MsoNormal>"
        f"{outlook_header_html(lang)}<o:p></o:p></p></div></div>{quoted_html(lang)}</div></body></html>"),
    "outlook_web": lambda lang: (
        f"<html><body><div dir=\"ltr\">{own_html(lang)}</div>\n<div id=\"appendonsend\"></div>\n"
        "<hr style=\"display:inline-block;width:98%\" tabindex=\"-1\">\n<div id=\"divRplyFwdMsg\" dir=\"ltr\">"
        f"<font face=\"Calibri, sans-serif\">{outlook_header_html(lang)}</font><div>&nbsp;</div></div>\n"
        f"<div class=\"BodyFragment\"><font size=\"2\"><div class=\"PlainText\">{quoted_html(lang)}</div></font></div>"
        "</body></html>"),
    "new_outlook_nested": lambda lang: (  # the quote inside the wrapper of the reply, no appendonsend
        f"<html><body><div id=\"divtagdefaultwrapper\" dir=\"ltr\">{own_html(lang)}<hr tabindex=\"-1\">"
        f"<div id=\"x_divRplyFwdMsg\">{outlook_header_html(lang)}</div><div>{quoted_html(lang)}</div></div>"
        "</body></html>"),
    "outlook_mac": lambda lang: (
        f"<html><body><div>{own_html(lang)}</div><div id=\"mail-editor-reference-message-container\"><div "
        f"style=\"border:none;border-top:solid #B5C4DF 1.0pt\">{outlook_header_html(lang)}</div>{quoted_html(lang)}"
        "</div></body></html>"),
    "gmail": lambda lang: (
        f"<div dir=\"ltr\">{own_html(lang)}</div><br><div class=\"gmail_quote gmail_quote_container\"><div dir=\"ltr\" "
        f"class=\"gmail_attr\">{escape(ATTRIBUTION[lang])}<br></div><blockquote class=\"gmail_quote\" "
        f"style=\"margin:0px 0px 0px 0.8ex\">{quoted_html(lang)}</blockquote></div>"),
    "apple_mail": lambda lang: (
        f"<html><body style=\"overflow-wrap: break-word;\"><div>{own_html(lang)}</div><div><br><blockquote "
        f"type=\"cite\"><div>{escape(ATTRIBUTION[lang])}</div><br><div>{quoted_html(lang)}</div></blockquote></div>"
        "</body></html>"),
    "apple_mail_attribution_outside": lambda lang: (
        f"<html><body><div>{own_html(lang)}</div><div><br><div>{escape(ATTRIBUTION[lang])}</div><br "
        f"class=\"Apple-interchange-newline\"><blockquote type=\"cite\">{quoted_html(lang)}</blockquote></div>"
        "</body></html>"),
    "roundcube": lambda lang: (
        f"<html><body style=\"font-size: 10pt\">{own_html(lang)}<p>{escape(ATTRIBUTION[lang])}</p>\n"
        f"<blockquote type=\"cite\" style=\"padding:0 0.4em\">{quoted_html(lang)}</blockquote></body></html>"),
    "thunderbird": lambda lang: (
        f"<html><body><p>{own_html(lang)}</p><div class=\"moz-cite-prefix\">{escape(ATTRIBUTION[lang])}<br></div>\n"
        f"<blockquote type=\"cite\" cite=\"mid:abc@x\">{quoted_html(lang)}</blockquote></body></html>"),
    "yahoo": lambda lang: (
        f"<html><body><div class=\"ydp1f2e3yahoo-style-wrap\">{own_html(lang)}</div><div id=\"yahoo_quoted_5551\" "
        f"class=\"yahoo_quoted\"><div>{escape(ATTRIBUTION[lang])}</div><div>{quoted_html(lang)}</div></div>"
        "</body></html>"),
    "zimbra": lambda lang: (
        f"<html><body><div style=\"font-family: arial\"><div>{own_html(lang)}</div><hr id=\"zwchr\">"
        "<div data-marker=\"__HEADERS__\"><b>" + "</b><br><b>".join(HEADER_LABELS[lang]) + "</b></div>"
        f"<div data-marker=\"__QUOTED_TEXT__\">{quoted_html(lang)}</div></div></body></html>"),
    "protonmail": lambda lang: (
        f"<div style=\"font-family: Arial\">{own_html(lang)}</div><div class=\"protonmail_quote\">"
        f"{escape(ATTRIBUTION[lang])}<br><blockquote class=\"protonmail_quote\" type=\"cite\">{quoted_html(lang)}"
        "</blockquote></div>"),
    "outlook_com_old": lambda lang: (
        f"<html><body><div dir=\"ltr\">{own_html(lang)}<br><br><hr id=\"stopSpelling\">{outlook_header_html(lang)}"
        f"<br><br>{quoted_html(lang)}</div></body></html>"),
}


@pytest.mark.parametrize("lang", ["fr", "en", "de"])
@pytest.mark.parametrize("client", HTML_CLIENTS)
def test_html_reply_of_each_client_keeps_its_own_text_line_for_line_and_loses_the_quote(client, lang):
    html = HTML_CLIENTS[client](lang)
    cleaned = clean_mail(html=html)
    assert QUOTED not in cleaned and OLD_SIGNATURE not in cleaned, cleaned
    assert cleaned == OWN_TEXT[lang], cleaned
    # the same body in a ticket export (no MIME type): HTML too, by its structure
    assert looks_like_html(html)
    assert MessageCleaner(CLEAN, "tickets_jsonl").clean(html, [AUTHOR]) == OWN_TEXT[lang]


def test_outlook_web_drops_everything_after_its_markers_to_the_end_of_the_body():
    html = ("<html><body><div>Answer above.</div><div id=\"appendonsend\"></div><hr><div id=\"divRplyFwdMsg\">"
            "<b>From:</b> X</div><div>first quoted</div><p>second quoted</p><table><tr><td>quoted table</td></tr>"
            "</table></body></html>")
    assert html_to_text(html) == "Answer above."
    assert "quoted table" in html_to_text(html, drop_quotes=False)


def test_a_bordered_block_that_is_not_a_reply_header_is_kept():
    html = ("<div>Voici le résultat :</div><div style=\"border-top:solid #ccc 1pt\">Job 123 terminé</div>"
            "<p>Suite du message.</p>")
    assert html_to_text(html) == "Voici le résultat :\n\nJob 123 terminé\n\nSuite du message."


def test_a_quote_inside_a_quote_does_not_cut_the_answer_written_below_it():
    html = ("<div>Top.</div><blockquote type=\"cite\">old<div id=\"divRplyFwdMsg\">older header</div>oldest"
            "</blockquote><div>Answer below the quote.</div>")
    assert html_to_text(html) == "Top.\n\nAnswer below the quote."


# ------------------------------------------------------------------------------------------- plain-text replies
def quoted_plain(prefix: str = "") -> str:
    lines = ["Bonjour,", "", f"Mon job reste en attente ({QUOTED}).", "", "Cordialement,", "Claire Fontaine",
             OLD_SIGNATURE]
    return "\n".join(prefix + line if line else prefix.rstrip() for line in lines)


def own_plain(lang: str) -> str:
    return OWN_TEXT[lang] + "\n\n" + "\n".join(OWN_SIGNATURE[lang])


def outlook_plain_header(lang: str, colon: str = " :") -> str:
    sep = colon if lang == "fr" else ":"
    values = [v.replace("&lt;", "<").replace("&gt;", ">") for v in HEADER_VALUES]
    return "\n".join(f"{label}{sep} {value}" for label, value in zip(HEADER_LABELS[lang], values))


PLAIN_CLIENTS = {
    "outlook_original_message": lambda lang: (
        own_plain(lang) + "\n\n" + {"en": "-----Original Message-----", "fr": "-----Message d'origine-----",
                                    "de": "-----Ursprüngliche Nachricht-----"}[lang]
        + "\n" + outlook_plain_header(lang, "\u00a0:") + "\n\n" + quoted_plain()),
    "outlook_underscores": lambda lang: (
        own_plain(lang) + "\n\n" + "_" * 32 + "\n" + outlook_plain_header(lang, "\u202f:") + "\n\n" + quoted_plain()),
    "outlook_header_only": lambda lang: own_plain(lang) + "\n\n" + outlook_plain_header(lang) + "\n\n" + quoted_plain(),
    "gmail": lambda lang: own_plain(lang) + "\n\n" + ATTRIBUTION[lang] + "\n\n" + quoted_plain("> "),
    "gmail_wrapped_two_lines": lambda lang: (
        own_plain(lang) + "\n\n" + ATTRIBUTION[lang].replace(", Claire", ",\nClaire", 1).replace(" <", "\n<", 1)
        .replace(",\nClaire", ", Claire") + "\n" + quoted_plain("> ")),
    "wrapped_three_lines": lambda lang: (
        own_plain(lang) + "\n\n" + ATTRIBUTION[lang].replace(" 2025", "\n2025", 1).replace(" <", "\n<", 1) + "\n"
        + quoted_plain("> ")),
    "iphone": lambda lang: (
        OWN_TEXT[lang] + "\n\n" + {"fr": "Envoyé de mon iPhone", "en": "Sent from my iPhone",
                                   "de": "Von meinem iPhone gesendet"}[lang] + "\n\n"
        + ATTRIBUTION[lang].replace(" <", "\n<") + "\n\n" + quoted_plain("> ")),
    "quoted_without_markers": lambda lang: own_plain(lang) + "\n\n" + ATTRIBUTION[lang] + "\n" + quoted_plain(),
    "forward": lambda lang: (
        own_plain(lang) + "\n\n---------- Forwarded message ---------\nFrom: Claire Fontaine <c@x.fr>\n"
        "Date: Mon, 13 Jan 2025 09:05\nSubject: Job\nTo: <assist@idris.fr>\n\n" + quoted_plain()),
    "apple_forward": lambda lang: (
        own_plain(lang) + "\n\nBegin forwarded message:\n\nFrom: Claire Fontaine <c@x.fr>\nSubject: Job\n"
        "Date: 13 January 2025 at 09:05:00 CET\nTo: assist@idris.fr\n\n" + quoted_plain()),
    "zimbra": lambda lang: (
        own_plain(lang) + "\n\n----- Mail original -----\nDe: Claire Fontaine <c@x.fr>\nÀ: assist@idris.fr\n"
        "Envoyé: Lundi 13 Janvier 2025 09:05:00\nObjet: Job\n\n" + quoted_plain()),
    "thunderbird_german_no_intro": lambda lang: (
        own_plain(lang) + "\n\nClaire Fontaine <claire.fontaine@x.fr> schrieb am 03.03.2025 um 10:14:\n"
        + quoted_plain("> ")),
    "gmail_german": lambda lang: (
        own_plain(lang) + "\n\nAm Mo., 13. Jan. 2025 um 09:05 Uhr schrieb Claire Fontaine <\nclaire@x.fr>:\n\n"
        + quoted_plain("> ")),
    "nested_quotes": lambda lang: (
        own_plain(lang) + "\n\n" + ATTRIBUTION[lang] + "\n" + quoted_plain("> ") + "\n>\n> " + ATTRIBUTION["en"]
        + "\n" + quoted_plain(">> ")),
}


@pytest.mark.parametrize("lang", ["fr", "en", "de"])
@pytest.mark.parametrize("client", PLAIN_CLIENTS)
@pytest.mark.parametrize("data_format", ["email", "tickets_jsonl", "csv"])
def test_plain_reply_of_each_client_keeps_its_own_text_line_for_line_and_loses_the_quote(client, lang, data_format):
    body = PLAIN_CLIENTS[client](lang)
    cleaned = MessageCleaner(CLEAN, data_format).clean(body, [AUTHOR] if data_format != "csv" else [])
    assert QUOTED not in cleaned and OLD_SIGNATURE not in cleaned, cleaned
    assert cleaned == OWN_TEXT[lang], cleaned


def test_a_header_block_that_starts_with_its_date_goes_whole():
    body = ("Réponse.\n\nDate: Mon, 13 Jan 2025 09:05:00 +0100\nFrom: Claire <c@x.fr>\nTo: assist@idris.fr\n"
            f"Subject: Job\n\n{QUOTED}")
    assert clean_mail(body) == "Réponse."


def test_mutt_answer_below_the_quote_is_kept():
    body = ("Am 3. März 2025 um 10:14 schrieb Hans Müller <h@x.de>:\n> Welche Partition?\n> " + QUOTED +
            "\n\nDie prepost-Partition.\n\n-- \nRémi")
    assert clean_mail(body) == "Die prepost-Partition."


# ------------------------------------------------------------------------- the user's own lines that look like quotes
USER_TEXT_THAT_LOOKS_LIKE_A_QUOTE = [
    "Bonjour,\n\nVoici ce que mon directeur de thèse a écrit :\n#SBATCH --partition=gpu_p5\n#SBATCH -C a100\n\n"
    "srun --cpu-bind=cores python run_md.py\n\nEst-ce correct ?",
    "Hello,\n\nBelow is what my job script has, as the admin wrote:\n\n#SBATCH --account=bench\n#SBATCH --exclusive\n"
    "srun ./lattice --input $SCRATCH/cfg.in\n\nWhat is wrong?",
    "Bonjour,\n\nLe 13 janvier, mon collègue a écrit :\n#SBATCH --nodes=4\nsrun ./a.out\n\nPourquoi 4 nœuds ?",
    "Hello,\n\nThe scheduler wrote:\nslurmstepd: error: Detected 1 oom_kill event\n\nWhy?",
    "Hello,\n\nMy rsync log:\nFrom: /gpfs/work/abc/data\nTo: /gpfs/scratch/abc/data\nsent 3,211 bytes\n\nIs it done?",
    "Bonjour,\n\nMon tableau :\n______________________________\n| job | état    |\n| 123 | RUNNING |\n"
    "______________________________\n\nEst-ce normal ?",
    "Hello,\n\nIn Python:\n>>> import torch\n>>> torch.cuda.is_available()\nFalse\n\nWhy False?",
    "Hello,\n\nThe loop:\n$ for i in 1 2; do\n> echo $i\n> done\n\nprints nothing.",
    "Hello,\n\nSent from my laptop, the job fails with exit code 137.\n\nAny idea?",
    "Hello,\n\nMy notes:\n----------------------------------------\nstep 1: module load cuda\nstep 2: make\n\n"
    "It fails at step 2.",
]


@pytest.mark.parametrize("text", USER_TEXT_THAT_LOOKS_LIKE_A_QUOTE)
@pytest.mark.parametrize("data_format", ["email", "tickets_jsonl", "csv"])
def test_user_lines_that_look_like_a_reply_header_or_a_separator_are_kept(text, data_format):
    assert MessageCleaner(CLEAN, data_format).clean(text, []) == text


def test_a_reply_header_needs_an_address_or_a_date_and_what_follows_a_header():
    assert strip_quoted_replies("Jean a écrit :\n> old") == "Jean a écrit :"  # the `>` lines go, the sentence stays
    assert strip_quoted_replies("Yes.\n\nOn Mon, Jan 13, Thomas wrote:").strip() == "Yes."  # at the end: a header
    assert strip_quoted_replies("Yes.\n\nOn Mon, Jan 13, Thomas wrote:\nhis text") == (
        "Yes.\n\nOn Mon, Jan 13, Thomas wrote:\nhis text")  # no year, time or address: the user's sentence
    assert strip_quoted_replies("Yes.\n\nOn 13/01/2025 10:14, Thomas wrote:\nold").strip() == "Yes."


# ------------------------------------------------------------------------------------------------------ signatures
@pytest.mark.parametrize("follow_up", [
    "Merci, j'ai essayé votre commande mais le job reste en attente.",
    "Merci, ça marche maintenant.",
    "Thanks, I tried your suggestion but the problem partly remains.",
    "Thank you, it works better now but I still have a question about the limits.",
    "Danke, es funktioniert jetzt.",
])
def test_a_closing_word_that_starts_a_sentence_is_not_a_signature(follow_up):
    signed = f"Bonjour,\n\n{follow_up}\n\nCordialement,\nJean Dupont\nDoctorant, Laboratoire de physique, Lyon 1\n" \
             "Tél. : 04 72 43 18 65"
    assert clean_mail(signed, author="Jean Dupont") == f"Bonjour,\n\n{follow_up}"
    assert clean_mail(f"{follow_up}\n\nJean Dupont", author="Jean Dupont") == follow_up
    assert clean_mail(f"Bonjour,\n\n{follow_up}", author="Jean Dupont") == f"Bonjour,\n\n{follow_up}"


def test_signatures_after_a_closing_go_with_their_titles_labs_and_phones():
    for closing in ("Cordialement,", "Bien cordialement,", "Best regards,", "Mit freundlichen Grüßen",
                    "Thanks a lot for your help!", "Merci d'avance,", "Cordialement, Julien", "Merci, bonne journée"):
        for block in (["Julien Martin", "Research Fellow, School of Physics and Astronomy, University of Edinburgh",
                       "+44 131 650 5249"],
                      ["L'équipe Assistance IDRIS",
                       "Institut du développement et des ressources en informatique scientifique (CNRS)"], []):
            text = "Bonjour,\n\nLe job tourne.\n\n" + "\n".join([closing, *block])
            assert clean_mail(text, author="") == "Bonjour,\n\nLe job tourne.", (closing, block)


def test_a_closing_followed_by_code_or_a_sentence_is_kept():
    script = "Bonjour,\n\nMerci pour votre aide,\nvoici mon script :\n#SBATCH --nodes=2\nsrun ./a.out"
    assert clean_mail(script, author="") == script
    name = "Bonjour,\n\nJean Dupont m'a conseillé de vous écrire.\n\nMerci"
    assert clean_mail(name, author="Jean Dupont") == "Bonjour,\n\nJean Dupont m'a conseillé de vous écrire."


def test_a_last_line_that_starts_with_a_closing_word_but_is_a_sentence_is_kept():
    for last in ("Best practice is to request one GPU per task.", "Merci, le job tourne maintenant.",
                 "Thanks it works now", "Cheers to the team, the fix works."):
        text = f"Bonjour,\n\nLa commande est sbatch job.slurm.\n\n{last}"
        assert clean_mail(text, author="") == text


def test_a_message_that_is_only_a_signature_like_block_keeps_its_text():
    assert clean_mail("Merci beaucoup !\nJean Dupont", author="Jean Dupont") == "Merci beaucoup !"
    assert clean_mail("-- \nJean Dupont", author="Jean Dupont") == "--\nJean Dupont"


# -------------------------------------------------------------------------------------------------- what HTML is
PROSE_ABOUT_TAGS = [
    "Mon script Python génère un rapport, mais les <table> et <td> tags sont affichés tels quels.\n"
    "Le test en C qui filtre les valeurs est le suivant :\nif (a<b && c>d) { keep(i); }",
    "The log says a <br> tag is missing in the template, but I only write plain text.\n"
    "My loop is: for (i = 0; i<n && x[i]>0; i++) total += x[i];",
    "<pre> blocks are lost when I print the page.\nHow do I keep them?",
    "<br> tag missing",
    "#include <stdio.h>\n#include <stdlib.h>\nint main(void) { return 0; }",
    "Jean Dupont <jean.dupont@univ-lyon1.fr> m'a donné ce script :\nwhile (n<m && k>1) {\n\n    n++;\n}",
    "Usage: sbatch [options] <script> [args...]\nsrun --time=<time> <command>",
    "Mon template contient :\n<div class=\"titre\"><b>Titre</b></div>\nmais le titre ne s'affiche pas.\nPourquoi ?",
    "J'ai aussi un <div> vide dans la sortie HTML de mon outil, est-ce grave ?",
    "std::vector<int> v; std::map<std::string, int> m;\nif (v.size()<3 && m.size()>0) return;",
    "Tags (<p>, <b>, <i>) and \"<table>\" are escaped.",
]


@pytest.mark.parametrize("text", PROSE_ABOUT_TAGS)
@pytest.mark.parametrize("data_format", ["tickets_jsonl", "csv", "chat_jsonl"])
def test_plain_text_about_tags_and_comparisons_stays_line_for_line(text, data_format):
    assert not looks_like_html(text), text
    cleaner = MessageCleaner(CLEAN, data_format)
    assert cleaner.clean(text, []) == text
    signed = f"Bonjour,\n\n{text}\n\nCordialement,\nClaire Fontaine\nIngénieure de recherche, LJK"
    assert cleaner.clean(signed, []) == (f"Bonjour,\n\n{text}" if cleaner.strip_signatures else signed)


@pytest.mark.parametrize("html", [
    "<p>Bonjour,</p>\n<p>Mon job plante.</p>",
    "<div dir=\"ltr\">Hi,<br><br>My job fails.</div>",
    "<!DOCTYPE html>\n<html><body>Hello</body></html>",
    "<table>\n<tr><td>job</td><td>123</td></tr>\n</table>",
    "Bonjour,<br>\nMon job plante.<br>\nMerci",
    "<div>\n  Bonjour,\n  <br>\n  Mon job\n</div>",
    "<p class=MsoNormal>Bonjour<o:p></o:p></p><p class=MsoNormal>Suite</p>",
])
def test_html_written_as_markup_is_detected(html):
    assert looks_like_html(html)


def test_html_to_text_keeps_every_less_than_that_opens_no_tag():
    html = ("<div>while (n<m && k>1) { n++; }<br>#include <stdio.h><br>Contact: Jean <jean@x.org><br>"
            "sbatch <options> <script><br>if a <b and c > d<br>vector<int> v;</div>"
            "<pre>if (a<b && c>d)\n\n    keep(i);</pre><p>Fin.</p>")
    assert html_to_text(html) == ("while (n<m && k>1) { n++; }\n#include <stdio.h>\nContact: Jean <jean@x.org>\n"
                                  "sbatch <options> <script>\nif a <b and c > d\nvector<int> v;\n\n"
                                  "if (a<b && c>d)\n\n    keep(i);\n\nFin.")
    assert html_to_text("<p>Bonjour</p><script>var a = 1 < 2;</script><p>Suite</p>") == "Bonjour\n\nSuite"
