"""Read question / answer pairs from CSV: each row is one exchange (user question, assistant answer).

Column names come from `data.csv` (for example `question_columns=[subject,body] answer_column=answer`). The file
is read as UTF-8 with undecodable bytes kept as surrogates, so a row with non-UTF-8 bytes is reported with its
line instead of stopping the whole file.
"""

from __future__ import annotations

import csv
import hashlib
import re
from pathlib import Path

from llmft.data.records import Conversation, DataError, ReadReport, input_files

_SURROGATE = re.compile("[\udc80-\udcff]")


def read_csv_pairs(path: Path, data_cfg, report: ReadReport) -> list[Conversation]:
    cfg = data_cfg.csv
    question_columns, answer_column = list(cfg.question_columns), cfg.answer_column
    csv.field_size_limit(1 << 26)  # long answers with pasted logs exceed the default 128 KiB
    conversations = []
    for file in input_files(path, (".csv", ".tsv")):
        with open(file, encoding="utf-8-sig", errors="surrogateescape", newline="") as handle:
            reader = csv.DictReader(handle, delimiter=cfg.delimiter)
            header = reader.fieldnames or []
            wanted = question_columns + [answer_column] + ([cfg.id_column] if cfg.id_column else [])
            missing = [column for column in wanted if column not in header]
            if missing:
                raise DataError(
                    f"{file}:1: no column {', '.join(missing)} (the header has {', '.join(header) or 'nothing'}); "
                    f"set data.csv.question_columns / data.csv.answer_column / data.csv.id_column to its columns."
                )
            last_line = reader.line_num
            for row in reader:
                where = f"{file}:{last_line + 1}"  # the line where the row starts (a quoted field may span lines)
                last_line = reader.line_num
                report.records_read += 1
                if None in row:
                    report.skip(where, f"more fields than the {len(header)} columns of the header")
                    continue
                if any(value is None for value in row.values()):
                    report.skip(where, f"fewer fields than the {len(header)} columns of the header")
                    continue
                if any(_SURROGATE.search(value) for value in row.values()):
                    report.skip(where, "not UTF-8 text")
                    continue
                question = "\n\n".join(row[c].strip() for c in question_columns if row[c].strip())
                answer = row[answer_column].strip()
                if not question or not answer:
                    report.skip(where, f"empty {'question' if not question else 'answer'}")
                    continue
                row_id = row[cfg.id_column].strip() if cfg.id_column else ""
                row_id = row_id or hashlib.sha1(f"{question}\0{answer}".encode()).hexdigest()[:16]
                messages = [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
                conversations.append(Conversation(row_id, messages, where))
    return conversations
