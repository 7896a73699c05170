"""Read helpdesk tickets as JSONL: one ticket a line, `{"id", "subject", "messages": [{"from", "date", "body"}]}`.

The role of a message comes from its author (`data.tickets`): an address in a staff domain, or listed as staff,
writes assistant turns; anyone else writes user turns. Internal notes (`"internal": true`) never reach the model.
"""

from __future__ import annotations

import email.utils
import re
from functools import lru_cache
from pathlib import Path

from llmft.data.readers.records import Conversation, DataError, ReadReport, jsonl_records

# Role accounts: their display name ("HPC Support") is not a person's name and must not be scrubbed as one.
_ROLE_ACCOUNT = re.compile(r"\b(support|help ?desk|team|équipe|service|admin|noreply|no-reply|info|contact)\b", re.I)


class StaffRule:
    """Tells staff (assistant) authors from users by e-mail domain or by address / display name."""

    def __init__(self, tickets_cfg):
        self.domains = [d.lower().lstrip("@") for d in tickets_cfg.staff_domains]
        self.addresses = {a.lower().strip() for a in tickets_cfg.staff_addresses}
        if not self.domains and not self.addresses:
            raise DataError(
                "no staff rule: set data.tickets.staff_domains=[support.example.org] (or data.tickets.staff_addresses)"
                " so llmft knows which messages are the support team's answers."
            )

    def describe(self) -> str:
        """The rule as the user wrote it, for messages: `data.tickets.staff_domains=[a.org]`."""
        keys = [("staff_domains", self.domains), ("staff_addresses", sorted(self.addresses))]
        return " ".join(f"data.tickets.{key}=[{','.join(values)}]" for key, values in keys if values)

    def role_of(self, author: str) -> str:
        name, address = parse_address(author)
        address = address.lower()
        domain = address.rpartition("@")[2]
        if any(domain == d or domain.endswith("." + d) for d in self.domains):
            return "assistant"
        if address in self.addresses or name.lower().strip() in self.addresses or author.lower().strip() in self.addresses:
            return "assistant"
        return "user"


@lru_cache(maxsize=65536)
def parse_address(author: str) -> tuple[str, str]:
    return email.utils.parseaddr(author)


def sender_domain(author: str) -> str:
    """The domain of a From header's address (`hpc.example.fr`), or `(no address)`."""
    address = parse_address(author)[1].lower()
    return address.rpartition("@")[2] if "@" in address else "(no address)"


def staff_rule_hint(staff: StaffRule, report: ReadReport) -> str:
    """When the staff rule made no message an answer: the sender domains seen most and the keys that would fix it,
    as a clause of the "no usable conversation" sentence; "" otherwise."""
    if report.staff_messages or not report.sender_domains:
        return ""
    top = sorted(report.sender_domains.items(), key=lambda item: (-item[1], item[0]))[:5]
    seen = ", ".join(f"{domain} ({n} ticket{'s' if n > 1 else ''})" for domain, n in top)
    example = next((domain for domain, _ in top if domain != "(no address)"), "support.example.org")
    return (f"; the staff rule {staff.describe()} matched no sender, and the senders' domains found in most tickets "
            f"are {seen}: set data.tickets.staff_domains=[{example}] if that is the support team's domain (or list "
            f"its members in data.tickets.staff_addresses=[...])")


def person_name(author: str) -> str | None:
    """The display name of a From header when it names a person (not "HPC Support <support@...>")."""
    name = parse_address(author)[0].strip()
    if not name or "@" in name or _ROLE_ACCOUNT.search(name):
        return None
    return name


def _ticket(record: object, staff: StaffRule, tickets_cfg) -> tuple[str, str, list[dict], list[str], int]:
    """(id, subject, messages with author, participant names, internal notes dropped), or ValueError with a reason."""
    if not isinstance(record, dict):
        raise ValueError("the ticket is not a JSON object")
    for key in ("id", "messages"):
        if key not in record:
            raise ValueError(f'missing field "{key}"')
    if not isinstance(record["id"], (str, int)) or isinstance(record["id"], bool):
        raise ValueError('"id" is neither a string nor a number')
    if not str(record["id"]).strip():
        raise ValueError('"id" is empty')
    subject = record.get("subject")
    subject = "" if subject is None else subject
    if not isinstance(subject, str):
        raise ValueError('"subject" is not a string')
    if not isinstance(record["messages"], list):
        raise ValueError('"messages" is not a list')
    if not record["messages"]:
        raise ValueError("empty conversation (no message)")
    messages, participants, num_internal = [], [], 0
    for i, message in enumerate(record["messages"]):
        if not isinstance(message, dict):
            raise ValueError(f"message {i} is not an object")
        author, body = message.get("from"), message.get("body")
        if not isinstance(author, str) or not author.strip():
            raise ValueError(f'message {i} has no "from" author')
        if body is None:
            body = ""
        if not isinstance(body, str):
            raise ValueError(f'message {i} has a "body" that is not text')
        internal = message.get(tickets_cfg.internal_field)
        # "yes" or 1 may mean internal: the ticket is better skipped than an internal note trained on
        if internal is not None and not isinstance(internal, bool):
            raise ValueError(f'message {i} has an "{tickets_cfg.internal_field}" that is neither true nor false')
        if internal:
            num_internal += 1
            continue
        name = person_name(author)
        if name and name not in participants:
            participants.append(name)
        messages.append({"role": staff.role_of(author), "content": body, "author": name or "",
                         "from": author})
    return str(record["id"]), subject.strip(), messages, participants, num_internal


def read_tickets_jsonl(path: Path, data_cfg, report: ReadReport) -> list[Conversation]:
    return tickets_of(jsonl_records(path, report), StaffRule(data_cfg.tickets), data_cfg, report)


def tickets_of(records, staff: StaffRule, data_cfg, report: ReadReport) -> list[Conversation]:
    """The tickets of (file:line, raw, JSON) records: all of a file, or a chunk of it in a worker."""
    conversations: list[Conversation] = []
    for where, _, record in records:
        try:
            ticket_id, subject, messages, participants, num_internal = _ticket(record, staff, data_cfg.tickets)
        except ValueError as error:
            report.skip(where, str(error))
        else:
            report.count("internal_notes", num_internal)
            report.count_senders([sender_domain(message.pop("from")) for message in messages],
                                 sum(message["role"] == "assistant" for message in messages))
            conversations.append(Conversation(ticket_id, messages, where, participants, subject))
    return conversations
