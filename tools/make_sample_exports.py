#!/usr/bin/env python3
"""Build the sample mailbox export from the raw helpdesk sample.

Reads ``llmft/data/samples/tickets_sample.jsonl`` (one raw ticket per line,
see ``llmft/data/samples/README.md``) and writes
``llmft/data/samples/tickets_sample.mbox``, i.e. the same threads as a
helpdesk would have sent them by e-mail.  The mbox exercises the e-mail
ingestion path of the data pipeline.

Export rules
------------
* One e-mail per ticket message.  Internal notes (``"internal": true``) are
  staff-only comments that never go out by mail, so they are NOT exported.
* ``Subject: [Ticket #<number>] <subject>``; every message after the first
  exported one of a ticket gets a ``Re: `` prefix.
* ``From`` and ``Date`` come from the ticket (dates may be RFC 2822 or ISO
  8601 in the JSONL; they are written as RFC 2822).  ``To`` is the support
  address for user messages and the ticket's requester for staff messages.
* Threading: deterministic ``Message-ID`` ``<t<number>.m<index>@...>``
  (index among the exported mails of the ticket);
  replies carry ``In-Reply-To`` (previous exported message) and
  ``References`` (all previous exported messages of the ticket, oldest
  first).
* Some messages are sent as ``multipart/alternative`` with a text/plain part
  and a text/html part generated from the text (all staff messages, which
  the helpdesk tool sends as HTML, and user messages of every third ticket),
  so that the HTML-to-text conversion path is exercised.  Bodies that are
  already HTML are sent as text/html only, as a mail client would.
* A message with an empty body is exported with an empty text/plain part.

The script only uses the standard library.  After writing, it re-reads the
mbox with :class:`mailbox.mbox` and checks that every message parses and
that the thread headers are consistent (``--check`` runs only this check).

Usage::

    python tools/make_sample_exports.py            # write + check
    python tools/make_sample_exports.py --check    # check existing mbox
"""
from __future__ import annotations

import argparse
import datetime as dt
import email
import email.policy
import email.utils
import html
import json
import mailbox
import re
import sys
import time
from email.message import EmailMessage
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = ROOT / "llmft" / "data" / "samples"
DEFAULT_IN = SAMPLES / "tickets_sample.jsonl"
DEFAULT_OUT = SAMPLES / "tickets_sample.mbox"

SUPPORT_ADDR = "HPC Support <support@support.example-hpc.fr>"
STAFF_DOMAIN = "@support.example-hpc.fr"
MSGID_DOMAIN = "helpdesk.support.example-hpc.fr"
HTML_RE = re.compile(r"^\s*<(html|div|p|body)\b", re.IGNORECASE)


# --------------------------------------------------------------------------- helpers
def ticket_number(ticket_id: str) -> str:
    """'T-1042' -> '1042'."""
    m = re.search(r"(\d+)$", ticket_id)
    if not m:
        raise ValueError(f"ticket id without a number: {ticket_id!r}")
    return m.group(1)


def parse_date(value: str) -> dt.datetime:
    """Parse an RFC 2822 or ISO 8601 date into an aware datetime."""
    try:
        d = dt.datetime.fromisoformat(value)
    except ValueError:
        d = email.utils.parsedate_to_datetime(value)
    if d.tzinfo is None:
        d = d.replace(tzinfo=dt.timezone.utc)
    return d


def is_staff(addr: str) -> bool:
    return email.utils.parseaddr(addr)[1].lower().endswith(STAFF_DOMAIN)


def message_id(num: str, index: int) -> str:
    return f"<t{num}.m{index}@{MSGID_DOMAIN}>"


def text_to_html(text: str) -> str:
    """Small, deterministic text -> HTML rendering, like a helpdesk would do.

    Quoted lines ("> ...") become nested <blockquote>, indented lines become
    <pre> blocks, other paragraphs become <p> with <br> for line breaks.
    """
    out: list[str] = []
    depth = 0
    para: list[str] = []
    pre: list[str] = []

    def flush_para() -> None:
        if para:
            out.append("<p>" + "<br>\n".join(html.escape(x) for x in para) + "</p>")
            para.clear()

    def flush_pre() -> None:
        if pre:
            out.append("<pre>" + html.escape("\n".join(pre)) + "</pre>")
            pre.clear()

    for line in text.split("\n"):
        level = 0
        rest = line
        while rest.startswith(">"):
            level += 1
            rest = rest[1:]
            if rest.startswith(" "):
                rest = rest[1:]
        if level != depth:
            flush_para()
            flush_pre()
            while depth < level:
                out.append('<blockquote style="margin:0 0 0 .8ex;border-left:1px solid #ccc;padding-left:1ex">')
                depth += 1
            while depth > level:
                out.append("</blockquote>")
                depth -= 1
        if rest.startswith("    ") or rest.startswith("\t"):
            flush_para()
            pre.append(rest)
        elif not rest.strip():
            flush_para()
            flush_pre()
        else:
            flush_pre()
            para.append(rest)
    flush_para()
    flush_pre()
    out.extend("</blockquote>" for _ in range(depth))
    return ('<html><head><meta charset="utf-8"></head><body>\n'
            + "\n".join(out) + "\n</body></html>\n")


def wants_html_alternative(ticket_num: int, sender: str) -> bool:
    """All staff mails, and user mails of every third ticket."""
    return is_staff(sender) or ticket_num % 3 == 0


# --------------------------------------------------------------------------- build
def build_messages(ticket: dict) -> list[EmailMessage]:
    num = ticket_number(ticket["id"])
    requester = next((m["from"] for m in ticket["messages"]
                      if not m.get("internal") and not is_staff(m["from"])), SUPPORT_ADDR)
    exported: list[EmailMessage] = []
    ids: list[str] = []
    for msg in ticket["messages"]:
        if msg.get("internal"):
            continue  # internal notes never leave the helpdesk
        index = len(ids)  # position among exported mails, so no gap reveals a note
        sender = msg["from"]
        body = msg.get("body") or ""
        em = EmailMessage(policy=email.policy.default)
        prefix = "Re: " if ids else ""
        em["Subject"] = f"{prefix}[Ticket #{num}] {ticket['subject']}"
        em["From"] = sender
        em["To"] = requester if is_staff(sender) else SUPPORT_ADDR
        em["Date"] = email.utils.format_datetime(parse_date(msg["date"]))
        mid = message_id(num, index)
        em["Message-ID"] = mid
        if ids:
            em["In-Reply-To"] = ids[-1]
            em["References"] = " ".join(ids)
        em["X-Ticket-ID"] = ticket["id"]
        if HTML_RE.match(body):
            em.set_content(body, subtype="html")
        else:
            em.set_content(body if body.endswith("\n") or not body else body + "\n")
            if body and wants_html_alternative(int(num), sender):
                em.add_alternative(text_to_html(body), subtype="html")
                em.set_boundary(f"=_alt_t{num}_m{index}_=")  # deterministic output
        exported.append(em)
        ids.append(mid)
    return exported


def write_mbox(tickets: list[dict], out: Path) -> int:
    if out.exists():
        out.unlink()
    box = mailbox.mbox(str(out), create=True)
    count = 0
    box.lock()
    try:
        for ticket in tickets:
            for em in build_messages(ticket):
                mm = mailbox.mboxMessage(em)
                addr = email.utils.parseaddr(em["From"])[1] or "MAILER-DAEMON"
                when = email.utils.parsedate_to_datetime(em["Date"])
                mm.set_from(addr, time.gmtime(when.timestamp()))
                box.add(mm)
                count += 1
        box.flush()
    finally:
        box.unlock()
        box.close()
    return count


# --------------------------------------------------------------------------- check
def check_mbox(tickets: list[dict], path: Path) -> list[str]:
    """Re-read the mbox and compare it with what the tickets imply."""
    errors: list[str] = []
    expected: dict[str, list[tuple[str, dict]]] = {}
    for t in tickets:
        num = ticket_number(t["id"])
        kept = [m for m in t["messages"] if not m.get("internal")]
        expected[num] = [(message_id(num, i), m) for i, m in enumerate(kept)]
    box = mailbox.mbox(str(path), create=False)
    seen: dict[str, list[email.message.EmailMessage]] = {}
    n = 0
    for key in box.iterkeys():
        raw = box.get_bytes(key)
        n += 1
        try:
            msg = email.message_from_bytes(raw, policy=email.policy.default)
        except Exception as exc:  # pragma: no cover - reported, not raised
            errors.append(f"message {key}: does not parse ({exc})")
            continue
        if msg.defects:
            errors.append(f"message {key}: defects {msg.defects}")
        subj = str(msg["Subject"])
        m = re.match(r"^(Re: )?\[Ticket #(\d+)\] ", subj)
        if not m:
            errors.append(f"message {key}: bad subject {subj!r}")
            continue
        seen.setdefault(m.group(2), []).append(msg)
        # every message must expose a text part
        part = msg.get_body(preferencelist=("plain", "html"))
        if part is None:
            errors.append(f"message {key}: no text body")
        else:
            part.get_content()
        for h in ("From", "To", "Date", "Message-ID"):
            if msg[h] is None:
                errors.append(f"message {key}: missing {h}")
    box.close()

    total_expected = sum(len(v) for v in expected.values())
    if n != total_expected:
        errors.append(f"{n} messages in mbox, expected {total_expected}")
    for num, exp in expected.items():
        got = seen.get(num, [])
        if len(got) != len(exp):
            errors.append(f"ticket {num}: {len(got)} mails, expected {len(exp)}")
            continue
        prev_ids: list[str] = []
        for k, (msg, (mid, src)) in enumerate(zip(got, exp)):
            if msg["Message-ID"] != mid:
                errors.append(f"ticket {num} #{k}: Message-ID {msg['Message-ID']} != {mid}")
            is_reply = k > 0
            if str(msg["Subject"]).startswith("Re: ") != is_reply:
                errors.append(f"ticket {num} #{k}: wrong Re: prefix")
            if is_reply:
                if msg["In-Reply-To"] != prev_ids[-1]:
                    errors.append(f"ticket {num} #{k}: In-Reply-To {msg['In-Reply-To']} != {prev_ids[-1]}")
                if (msg["References"] or "").split() != prev_ids:
                    errors.append(f"ticket {num} #{k}: References mismatch")
            elif msg["In-Reply-To"] or msg["References"]:
                errors.append(f"ticket {num} #0: first message has thread headers")
            if parse_date(src["date"]) != email.utils.parsedate_to_datetime(msg["Date"]):
                errors.append(f"ticket {num} #{k}: Date mismatch")
            if email.utils.parseaddr(src["from"])[1] != msg["From"].addresses[0].addr_spec:
                errors.append(f"ticket {num} #{k}: From mismatch")
            prev_ids.append(mid)
    return errors


def summary(path: Path) -> str:
    box = mailbox.mbox(str(path), create=False)
    n = alt = html_only = 0
    for key in box.iterkeys():
        msg = email.message_from_bytes(box.get_bytes(key), policy=email.policy.default)
        n += 1
        ctype = msg.get_content_type()
        alt += ctype == "multipart/alternative"
        html_only += ctype == "text/html"
    box.close()
    return f"{n} messages ({alt} multipart/alternative, {html_only} text/html only)"


def load_tickets(path: Path) -> list[dict]:
    with path.open(encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--input", type=Path, default=DEFAULT_IN, help="raw tickets JSONL")
    ap.add_argument("--output", type=Path, default=DEFAULT_OUT, help="mbox to write")
    ap.add_argument("--check", action="store_true", help="only check an existing mbox")
    args = ap.parse_args(argv)

    tickets = load_tickets(args.input)
    if not args.check:
        n = write_mbox(tickets, args.output)
        print(f"wrote {n} messages from {len(tickets)} tickets to {args.output}")
    errors = check_mbox(tickets, args.output)
    for e in errors:
        print("ERROR:", e, file=sys.stderr)
    if errors:
        return 1
    print(f"check OK: {summary(args.output)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
