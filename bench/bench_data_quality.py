#!/usr/bin/env python3
"""How clean `python -m llmft.data prepare` makes a realistic helpdesk export: quotes, signatures, auto-replies,
duplicate mails, personal data left, and must-keep lines broken, against the values the generator planted.

    python bench/bench_data_quality.py [--seed 1] [--tickets 60] [--keep DIR]

Writes an export with tools/make_helpdesk_exports.py (monthly mbox files, tickets JSONL, CSV, and expected.json)
into a temporary folder, runs `python -m llmft.data prepare` on each variant as docs/data.md shows (data=tickets
with data.format=email for the mbox files, data=tickets for the JSONL, data=csv for the CSV; model=tiny, whose
tokenizer is trained on the cleaned texts; a long model.max_seq_len so no conversation is cut away), reads the
cleaned conversations from OUT/<split>.conversations.jsonl (what the model sees, as text) and OUT/report.json, and
prints each count beside its expected value, then the offending items, then as its last line:

    quality: quotes_left=A signatures_left=B autoreplies_trained=C duplicate_mails=D pii_left=E lines_broken=F

- quotes_left: occurrences of the markers of quoted blocks (each quoted copy of a mail has its own marker);
- signatures_left: occurrences of signature lines (titles, the helpdesk's footer, mobile footers);
- autoreplies_trained: auto-reply, receipt and bounce marker phrases found;
- duplicate_mails: a mail's own marker present more than once in one conversation (each extra copy), plus
  |report's duplicate-mail count - expected| when report.json has one, else the expected count (not counted);
- pii_left: planted personal-data values found (each value once);
- lines_broken: must-keep lines missing (code and job script lines, sentences that look like reply headers, decoys
  such as job ids and timestamps, attachment names and lines, "IDRIS", "Jean Zay").

The three variants add into the same figures. All goals are 0. It measures, it asserts nothing: exit status 0
whatever the state of the data module (a failed prepare leaves no output: its must-keep lines count as broken).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MARKER = re.compile(r"\b[BCDFGHJKLMNPQRSTVWXZ]{8}\b")
FIGURES = ["quotes_left", "signatures_left", "autoreplies_trained", "duplicate_mails", "pii_left", "lines_broken"]


def prepare_command(variant: dict, export: Path, out: Path) -> list[str]:
    path = export / variant["path"]
    common = [f"data.path={path}", f"data.output_dir={out}", "model=tiny", "model.max_seq_len=8192",
              "data.validation_fraction=0.1"]
    domains = "[" + ",".join(variant.get("staff_domains", [])) + "]"
    if variant["format"] == "email":
        return ["data=tickets", "data.format=email", f"data.tickets.staff_domains={domains}", *common]
    if variant["format"] == "tickets_jsonl":
        return ["data=tickets", f"data.tickets.staff_domains={domains}", *common]
    return ["data=csv", f"data.csv.question_columns=[{','.join(variant['question_columns'])}]",
            f"data.csv.answer_column={variant['answer_column']}", f"data.csv.id_column={variant['id_column']}", *common]


def run_prepare(name: str, variant: dict, export: Path, out: Path) -> tuple[list[dict], dict]:
    command = [sys.executable, "-m", "llmft.data", "prepare", *prepare_command(variant, export, out)]
    print(f"[{name}] {' '.join(command[1:])}")
    try:
        result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=1200,
                                env={**os.environ, "OMP_NUM_THREADS": "1"})
        failed = result.returncode != 0 and (result.stderr or result.stdout).strip()[-1500:]
    except subprocess.TimeoutExpired:
        failed = "prepare did not finish in 1200 s"
    if failed:
        print(f"[{name}] prepare FAILED (its outputs count as empty):\n{failed}")
        return [], {}
    conversations = []
    for file in sorted(out.glob("*.conversations.jsonl")):
        conversations += [json.loads(line) for line in file.read_text(encoding="utf-8").splitlines() if line.strip()]
    report_file = out / "report.json"
    return conversations, json.loads(report_file.read_text()) if report_file.is_file() else {}


def norm(line: str) -> str:
    return " ".join(line.replace("\u00a0", " ").replace("\u202f", " ").split())


def duplicate_count_in(report: dict) -> int | None:
    """The mails the reader dropped as duplicates, where the report counts them (reader_dropped or dropped)."""
    for group in ("reader_dropped", "dropped"):
        for key, value in (report.get(group) or {}).items():
            if "duplicate" in key and ("mail" in key or "message" in key) and isinstance(value, int):
                return value
    return None


def measure(name: str, variant: dict, conversations: list[dict], report: dict) -> tuple[dict, dict]:
    texts = ["\n".join(str(m.get("content", "")) for m in c.get("messages", [])) for c in conversations]
    everything = "\n".join(texts)
    lines = {norm(line) for text in texts for line in text.splitlines()}
    bad, keep = variant["must_not_appear"], variant["must_appear"]
    client_of = {q: client for client, quotes in variant.get("quoted_by_client", {}).items() for q in quotes}
    found = {
        "quotes_left": [f"{client_of.get(q, 'quoted')}: {q}" for q in bad["quote"] for _ in range(everything.count(q))],
        "signatures_left": [s for s in bad["signature"] for _ in range(everything.count(s))],
        "autoreplies_trained": [t for t in bad["autoreply"] if MARKER.findall(t)[-1] in everything],
        "pii_left": [f"{kind}: {value}" for kind, values in bad["pii"].items() for value in values
                     if value in everything],
        "lines_broken": [f"{group}: {line}" for group, values in keep.items() for line in values
                         if (norm(line) not in lines if group in ("code", "sentence") else line not in everything)],
    }
    repeated = []
    for conversation, text in zip(conversations, texts):
        for own in variant["mail_markers"]:
            repeated += [f"{conversation.get('id')}: {own}"] * max(0, text.count(own) - 1)
    expected_duplicates = variant["duplicates"]["total"]
    reported = duplicate_count_in(report)
    found["duplicate_mails"] = repeated + ["report: duplicate mails not counted"] * (
        expected_duplicates if reported is None else abs(reported - expected_duplicates))
    kept = sum(1 for own in variant["mail_markers"] if own in everything)
    once = sum(1 for own in variant["mail_markers"] if everything.count(own) == 1)
    print(f"[{name}] expected: {variant['tickets']} tickets, {variant['unique_mails']} unique mails "
          f"({expected_duplicates} duplicates to drop"
          + (f": {variant['duplicates']['same_message_id']} same Message-ID, "
             f"{variant['duplicates']['rewritten_message_id']} rewritten" if "same_message_id" in variant["duplicates"]
             else "") + f"), {variant['auto_replies']['total']} auto-replies {variant['auto_replies']['by_signal']}")
    print(f"[{name}] report:   records_read={report.get('records_read')} conversations_read="
          f"{report.get('conversations_read')} num_conversations={report.get('num_conversations')} "
          f"reader_dropped={report.get('reader_dropped')} dropped={report.get('dropped')} "
          f"duplicate mails counted={reported}")
    print(f"[{name}] report:   pii_replacements={report.get('pii_replacements')}  "
          f"(planted: {variant['pii_counts']})")
    print(f"[{name}] outputs:  {len(conversations)} conversations (expected about {variant['tickets']}), "
          f"own text of {kept}/{len(variant['mail_markers'])} mails present ({once} exactly once); binary "
          f"leftovers {sum(everything.count(b) for b in bad['binary'])}")
    counts = {figure: len(found[figure]) for figure in FIGURES}
    expected_of = {"quotes_left": len(bad["quote"]), "signatures_left": len(bad["signature"]),
                   "autoreplies_trained": len(bad["autoreply"]), "duplicate_mails": expected_duplicates,
                   "pii_left": sum(variant["pii_counts"].values()),
                   "lines_broken": sum(len(values) for values in keep.values())}
    for figure in FIGURES:
        print(f"[{name}]   {figure:20s} {counts[figure]:4d}   (goal 0; planted {expected_of[figure]})")
    return counts, found


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--tickets", type=int, default=60)
    parser.add_argument("--keep", type=Path, help="write the export and the outputs here instead of a temp folder")
    parser.add_argument("--show", type=int, default=12, help="offending items shown per figure and variant")
    args = parser.parse_args()
    totals = dict.fromkeys(FIGURES, 0)
    with tempfile.TemporaryDirectory(prefix="llmft-quality-") as tmp:
        work = args.keep or Path(tmp)
        export = work / "export"
        made = subprocess.run([sys.executable, str(REPO / "tools" / "make_helpdesk_exports.py"), str(export),
                               "--seed", str(args.seed), "--tickets", str(args.tickets)],
                              cwd=REPO, capture_output=True, text=True)
        print(made.stdout.strip() or made.stderr.strip()[-2000:])
        if made.returncode != 0:
            print("quality: quotes_left=-1 signatures_left=-1 autoreplies_trained=-1 duplicate_mails=-1 pii_left=-1 "
                  "lines_broken=-1")
            return 0
        expected = json.loads((export / "expected.json").read_text(encoding="utf-8"))
        details = {}
        for name, variant in expected["variants"].items():
            conversations, report = run_prepare(name, variant, export, work / f"out-{name}")
            counts, details[name] = measure(name, variant, conversations, report)
            for figure in FIGURES:
                totals[figure] += counts[figure]
        print("\nwhat is left (first items per figure and variant):")
        for name, found in details.items():
            for figure in FIGURES:
                if found[figure]:
                    items = list(dict.fromkeys(found[figure]))
                    shown = "; ".join(item if len(item) < 110 else item[:107] + "..." for item in items[:args.show])
                    more = f" (+{len(items) - args.show} more)" if len(items) > args.show else ""
                    print(f"  [{name}] {figure} ({len(found[figure])}): {shown}{more}")
    print("quality: " + " ".join(f"{figure}={totals[figure]}" for figure in FIGURES))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
