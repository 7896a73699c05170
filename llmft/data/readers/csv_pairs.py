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

from llmft.data.readers.records import Conversation, DataError, ReadReport, input_files, short_repr, unreadable

_SURROGATE = re.compile("[\udc80-\udcff]")


def read_csv_pairs(path: Path, data_cfg, report: ReadReport) -> list[Conversation]:
    cfg = data_cfg.csv
    question_columns, answer_column = list(cfg.question_columns), cfg.answer_column
    csv.field_size_limit(1 << 26)  # long answers with pasted logs exceed the default 128 KiB
    conversations = []
    for file in input_files(path, (".csv", ".tsv")):
        try:
            handle = open(file, encoding="utf-8-sig", errors="surrogateescape", newline="")
        except OSError as error:
            report.skip(str(file), unreadable(file, error))
            continue
        with handle:
            reader = csv.reader(handle, delimiter=cfg.delimiter)
            rows = _rows(reader, file, report)
            first = next(rows, None)
            if first is None:
                report.skip(str(file), "empty file")
                continue
            _, header = first
            if any(_SURROGATE.search(column) or "\x00" in column for column in header):
                report.skip(f"{file}:{first[0]}", "the header is not UTF-8 text; the file is unread")
                continue
            wanted = question_columns + [answer_column] + ([cfg.id_column] if cfg.id_column else [])
            missing = [column for column in wanted if column not in header]
            if missing:
                shown = ", ".join(short_repr(column, 40)[1:-1] for column in header[:20]) or "nothing"
                raise DataError(
                    f"{file}:{first[0]}: no column {', '.join(missing)} (the header has {shown[:400]}); "
                    f"set data.csv.question_columns / data.csv.answer_column / data.csv.id_column to its columns."
                )
            for line, values in rows:
                where = f"{file}:{line}"
                report.records_read += 1
                if len(values) != len(header):
                    runs_on = f" (the row runs on to line {reader.line_num}: a quote left open?)" \
                        if reader.line_num > line else ""
                    report.skip(where, f"{'more' if len(values) > len(header) else 'fewer'} fields than the "
                                       f"{len(header)} columns of the header{runs_on}")
                    continue
                if any(_SURROGATE.search(value) for value in values):
                    report.skip(where, "not UTF-8 text")
                    continue
                row = dict(zip(header, values))
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


def _rows(reader, file: Path, report: ReadReport):
    """(line where the row starts, fields) of each non-blank row; a quoted field may span lines. A CSV error
    (few are left with the default strict=False) is reported and ends the file, never the run."""
    last_line = 0
    while True:
        try:
            values = next(reader)
        except StopIteration:
            return
        except csv.Error as error:
            report.skip(f"{file}:{last_line + 1}", f"bad CSV ({error}); the rest of the file is unread")
            return
        start, last_line = last_line + 1, reader.line_num
        if values and not (len(values) == 1 and not values[0].strip()):  # a blank line is no row; ",," is one
            yield start, values
