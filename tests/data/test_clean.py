"""Cleaning: quoted replies, signatures, HTML, turn shaping and duplicates."""

from __future__ import annotations

import pytest
from omegaconf import OmegaConf

from llmft.data.clean.messages import MessageCleaner, shape_turns, strip_quoted_replies
from llmft.config.data_schema import CleanConfig
from llmft.data.clean.dedup import drop_duplicates
from llmft.data.clean.html_text import HTML_TAGS, html_to_text, looks_like_html
from llmft.data.readers.records import Conversation

CLEAN = OmegaConf.structured(CleanConfig)


def clean(text: str, author: str = "") -> str:
    return MessageCleaner(CLEAN, "tickets_jsonl").clean(text, [author] if author else [])


def test_quoted_replies_are_removed_in_english_french_and_outlook_forms():
    assert clean("It works now.\n\nOn Thu, 9 Jan 2025 at 09:05, Sophie <s@x.fr> wrote:\n> Hello\n> old text") == "It works now."
    wrapped = "Merci !\n\nLe mar. 7 janv. 2025 à 09:12, Julien Lefèvre <\njulien@x.fr> a écrit :\n> Bonjour\n>\n> ancien"
    assert clean(wrapped) == "Merci !"
    outlook = "Done, thanks.\n\nFrom: Support <s@x.fr>\nSent: Monday\nTo: me\nSubject: Re: job\n\nold text without markers"
    assert clean(outlook) == "Done, thanks."
    assert clean("Yes.\n-----Original Message-----\nold") == "Yes."
    assert clean("Fine.\n\nOn Mon, Jan 13 2025, Thomas wrote:\nold text quoted without markers") == "Fine."


def test_an_answer_written_below_a_quote_is_kept():
    text = "On Mon, Jan 13, Thomas wrote:\n> Which partition?\n\nThe prepost one."
    assert strip_quoted_replies(text).strip() == "The prepost one."


def test_signatures_are_removed():
    assert clean("The fix is X.\n\n-- \nJohn Smith\nLab of Things\n+33 1 00 00 00 00") == "The fix is X."
    assert clean("The fix is X.\n\nBest regards,\nClaire Martin\nHPC User Support Team") == "The fix is X."
    assert clean("Le correctif est X.\n\nBien cordialement,\nJulien") == "Le correctif est X."
    assert clean("it works now thx\n\nPriya\n\nSent from my iPhone", author="Priya Raman") == "it works now thx"
    signed = "Il affiche une erreur.\n\nNathalie Garnier\nIngénieure de recherche\nUniversité de Lyon"
    assert clean(signed, author="Nathalie Garnier") == "Il affiche une erreur."
    # a closing at the start of a message with a real question after it is not a signature
    assert clean("Thanks!\n\nAlso, can I get more GPUs for my project?") == "Thanks!\n\nAlso, can I get more GPUs for my project?"


def test_html_becomes_text_without_its_quotes():
    html = """<html><head><style>p {color: red}</style></head><body>
    <div dir="ltr">Hi,<br><br>My job fails with&nbsp;<b>OOM</b> &amp; exits.<ul><li>one</li><li>two</li></ul>
    <pre>  sbatch job.slurm
  squeue -u $USER</pre>
    <div class="gmail_quote">On Mon wrote:<blockquote>QUOTED old</blockquote></div>
    <blockquote>QUOTED too</blockquote>Bye</div></body></html>"""
    text = html_to_text(html)
    assert "QUOTED" not in text and "color" not in text
    assert "My job fails with OOM & exits." in text
    assert "- one\n- two" in text
    assert "  sbatch job.slurm\n  squeue -u $USER" in text
    assert text.startswith("Hi,\n\nMy job") and text.endswith("Bye")


ANSWER = ("Hello,\n\nI copied Jean Dupont <{tag}.dupont@example.org> on this ticket, he has the same problem.\n\n"
          "Run these on a login node:\n\n    module purge\n    module load cuda/12.4\n"
          "    sbatch --gres=gpu:1 job.slurm\n\nThe job should start within the hour.")
QUOTES = {
    "gmail": "On Mon, 13 Jan 2025 at 09:05, Jean Dupont <{tag}.dupont@example.org> wrote:\n> My job stays pending.\n"
             "> Any idea?",
    "french": "Le lun. 13 janv. 2025 à 09:05, Jean Dupont <{tag}.dupont@example.org> a écrit :\nMon job reste en attente.",
    "outlook": "From: Jean Dupont <{tag}.dupont@example.org>\nSent: Monday, 13 January 2025 09:05\nTo: Support\n"
               "Subject: job pending\n\nMy job stays pending.",
}


@pytest.mark.parametrize("data_format", ["tickets_jsonl", "csv", "email"])
@pytest.mark.parametrize("tag", HTML_TAGS)
def test_plain_text_with_an_address_that_starts_like_a_tag_keeps_its_lines_and_loses_its_quote(tag, data_format):
    cleaner = MessageCleaner(CLEAN, data_format)
    for quote in QUOTES.values():
        body = ANSWER.format(tag=tag) + "\n\n" + quote.format(tag=tag)
        assert not looks_like_html(body), body
        assert cleaner.clean(body, []) == ANSWER.format(tag=tag)
    for tag_case in (tag.upper(), tag.capitalize()):
        assert not looks_like_html(f"Jean Dupont <{tag_case}.dupont@example.org> wrote:\n> old")


def test_real_html_is_detected_and_one_tag_word_is_not():
    for html in ('<div dir="ltr">Hi,<br><br>My job fails.</div>', '<p class="MsoNormal">Bonjour,<o:p></o:p></p>',
                 "<html><body>Hello", "<!DOCTYPE html>\n<title>x</title>", "Line one<br/>Line two",
                 "Hello <b>world</b>", "<div><span style='color:red'>Hello", "<P>Hello<BR>world",
                 "<table><tr><td>1</td></tr></table>", "<ul>\n<li>one\n<li>two\n</ul>"):
        assert looks_like_html(html), html
    for text in ("Use the <pre> tag for code.", "Jean <p.dupont@example.org>", "Mail <div.x@y.org> or <li.wei@x.cn>",
                 "if a <b and c > d then", "<a.b@c.d> <b.c@d.e> <i.j@k.l> <p.q@r.s>", "x < y and p > q",
                 "Template: <your_login>@<project>"):
        assert not looks_like_html(text), text
    assert clean("Hi,<br>Run <b>sbatch</b>.<br><br>Thanks") == "Hi,\nRun sbatch."


def test_turns_are_merged_trimmed_and_tickets_without_answer_dropped():
    messages = [
        {"role": "assistant", "content": "Maintenance notice."},
        {"role": "user", "content": "Job fails."},
        {"role": "user", "content": "Here is the log."},
        {"role": "assistant", "content": ""},
        {"role": "assistant", "content": "Your quota is full: clean $HOME."},
        {"role": "user", "content": "Thanks!"},
    ]
    shaped = shape_turns(messages, CLEAN)
    assert shaped.drop_reason is None
    assert shaped.messages == [
        {"role": "user", "content": "Job fails.\n\nHere is the log."},
        {"role": "assistant", "content": "Your quota is full: clean $HOME."},
    ]
    assert shape_turns([{"role": "user", "content": "Hello?"}], CLEAN).drop_reason == "no_assistant_turn"
    assert shape_turns([{"role": "user", "content": "Q"}, {"role": "assistant", "content": "ok"}],
                       CLEAN).drop_reason == "assistant_text_too_short"
    long_user = shape_turns([{"role": "user", "content": "x" * 20000}, {"role": "assistant", "content": "A" * 40}], CLEAN)
    assert len(long_user.messages[0]["content"]) < 12100 and long_user.truncated_user_messages == 1
    long_answer = [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A" * 20000}]
    assert shape_turns(long_answer, CLEAN).drop_reason == "assistant_message_too_long"


def test_exact_and_near_duplicates_are_dropped_first_one_kept():
    answer = " ".join(f"Step {i}: check the memory used by task {i} with sacct, then raise --cpus-per-task." for i in range(20))

    def conversation(i, question, reply=answer):
        return Conversation(str(i), [{"role": "user", "content": question}, {"role": "assistant", "content": reply}], "f:1")

    conversations = [
        conversation(1, "Why was my job killed?"),
        conversation(2, "why was my   job KILLED?"),  # exact, once case and spaces are normalized
        conversation(3, "Why was my job killed? (job 123)"),  # near
        conversation(4, "How do I get GPUs?", "Use --gres=gpu:1 on a GPU partition and pick the account of your project."),
    ]
    kept, dropped = drop_duplicates(conversations, threshold=0.9)
    assert [c.id for c in kept] == ["1", "4"]
    assert dropped == {"exact_duplicate": 1, "near_duplicate": 1}
    kept, dropped = drop_duplicates(conversations, threshold=1.0)
    assert [c.id for c in kept] == ["1", "3", "4"]


def test_minhash_agreement_estimates_the_jaccard_similarity_of_word_5_grams():
    """The share of equal signature values estimates the Jaccard similarity of the texts' word 5-gram sets (64
    multiply-shift hashes: standard error ~0.06), so near_duplicate_threshold means what it says."""
    import random

    import numpy as np

    from llmft.data.clean.dedup import SHINGLE_WORDS, minhash

    rng = random.Random(3)
    vocabulary = [f"w{i}" for i in range(5000)]

    def shingles(words):
        return {tuple(words[i : i + SHINGLE_WORDS]) for i in range(len(words) - SHINGLE_WORDS + 1)}

    errors = []
    for changed in (2, 10, 40, 120):
        for _ in range(10):
            words = [rng.choice(vocabulary) for _ in range(400)]
            other = list(words)
            for position in rng.sample(range(400), changed):
                other[position] = rng.choice(vocabulary)
            a, b = shingles(words), shingles(other)
            estimate = float(np.mean(minhash(" ".join(words)) == minhash(" ".join(other))))
            errors.append(estimate - len(a & b) / len(a | b))
    assert abs(np.mean(errors)) < 0.03 and max(map(abs, errors)) < 0.25
