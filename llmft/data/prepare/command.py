"""`python -m llmft.data prepare`: everything a run needs from the data, made once on the login node.

    DIR/dataset/                      the tokenized samples (datasets.DatasetDict: train, validation[, test])
    DIR/tokenizer/                    the tokenizer they were made with (model=tiny trains one on the data)
    DIR/<split>.conversations.jsonl   the cleaned, scrubbed conversations, in chat format: what the model sees
    DIR/<split>.pairs.jsonl           (preference_jsonl; kto_jsonl: <split>.examples.jsonl) the same for preference
                                      records, in their own format, with the system prompt the model sees
    DIR/report.json                   what was read, dropped (and why), replaced, built
    DIR/lengths.png                   the histogram of sample lengths against model.max_seq_len
    DIR/manifest.json                 the fingerprint, and what the samples are made from (data settings, model,
                                      input files: prepared_source.py); written last, so a folder without it is
                                      incomplete

Preparing again with the same conversations, tokenizer and settings finds the manifest and does nothing.

With a model's own tokenizer (not model=tiny, which trains one on the cleaned texts first), conversation and
sample formats are read, cleaned and tokenized in one pass (`one_pass.read_and_tokenize`), unless DIR holds a
dataset prepared with the same tokenizer and settings: then the conversations are read first, to see whether that
dataset can be kept as it is.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from llmft.config.data_schema import DataFormat
from llmft.data.preferences.dpo_kto import PREFERENCE_FORMATS, samples_of
from llmft.data.prepare.data_config import format_of, prepared_manifest_path, prepared_report_path
from llmft.data.prepare.mixture import with_mixture_settings
from llmft.data.prepare.one_pass import read_and_tokenize
from llmft.data.prepare.prepared_dir import fingerprint_parts, load_samples, save_samples, settings_fingerprint, \
    tokenizer_fingerprint, write_manifest
from llmft.data.prepare.prepared_source import manifest_record, same_record
from llmft.data.prepare.reading import read_input
from llmft.data.prepare.tokenizing import end_of_turn_of, tokenize_rows
from llmft.data.prepare.tokenizing_preferences import tokenize_preferences
from llmft.data.readers.records import DataError
from llmft.data.tokenize.tokenizer import tokenizer_for_run


def output_dir_of(data_cfg) -> Path:
    if not data_cfg.output_dir:
        raise DataError("data.output_dir is not set: add data.output_dir=DIR, the folder prepare writes to.")
    return Path(os.path.expandvars(str(data_cfg.output_dir))).expanduser()


def write_length_histogram(path: Path, lengths_by_split: dict[str, list[int]], max_seq_len: int, title: str) -> bool:
    try:
        import matplotlib
    except ImportError:
        return False
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(8, 4.5))
    bins = list(range(0, max_seq_len + max(1, max_seq_len // 50), max(1, max_seq_len // 50)))
    axes.hist([lengths for lengths in lengths_by_split.values()], bins=bins, stacked=True,
              label=[f"{split} ({len(lengths)})" for split, lengths in lengths_by_split.items()])
    axes.axvline(max_seq_len, color="black", linestyle="--", label=f"max_seq_len={max_seq_len}")
    axes.set_xlabel("tokens per sample")
    axes.set_ylabel("samples")
    axes.set_title(title, fontsize=10)
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return True


def prepare(cfg, overrides: list[str] | None = None) -> dict:
    """Prepare cfg.data for cfg.model into data.output_dir; returns the report (also in report.json). `overrides`:
    the command's, recorded in the manifest to say how to prepare again."""
    data_cfg, max_seq_len = cfg.data, cfg.model.max_seq_len
    out_dir = output_dir_of(data_cfg)
    out_dir.mkdir(parents=True, exist_ok=True)
    data_format = format_of(data_cfg)
    record = manifest_record(cfg, overrides)  # the input files as they are before reading them
    tokenizer = None if cfg.model.path is None else tokenizer_for_run(cfg, None)  # (model=tiny: from the texts)
    if tokenizer is not None and data_format not in (*PREFERENCE_FORMATS, DataFormat.mixture) and \
            not prepared_with(out_dir, tokenizer, data_cfg, max_seq_len):
        prepared_manifest_path(out_dir).unlink(missing_ok=True)  # incomplete until a new manifest is written
        read_report, tokenized, conversations_part = read_and_tokenize(data_cfg, tokenizer, max_seq_len, out_dir)
        end_of_turn, _ = end_of_turn_of(tokenizer, data_cfg)
        parts = fingerprint_parts(conversations_part, tokenizer, data_cfg, max_seq_len, end_of_turn)
        return write_prepared(cfg, out_dir, tokenizer, tokenized, read_report, parts, record)

    conversations, read_report = read_input(data_cfg)
    tokenizer = tokenizer or tokenizer_for_run(cfg, conversations)
    end_of_turn, _ = end_of_turn_of(tokenizer, data_cfg)
    parts = with_mixture_settings(fingerprint_parts(conversations, tokenizer, data_cfg, max_seq_len, end_of_turn),
                                  data_cfg)
    if not isinstance(load_samples(out_dir, parts), str) and prepared_report_path(out_dir).is_file():
        manifest = json.loads(prepared_manifest_path(out_dir).read_text())
        if not same_record(manifest, record):  # the same samples: say what they are made from now (a touched file)
            write_manifest(out_dir, manifest["fingerprint"], manifest["counts"], record)
        return {**json.loads(prepared_report_path(out_dir).read_text()), "reused_prepared": True}
    prepared_manifest_path(out_dir).unlink(missing_ok=True)
    if data_format in PREFERENCE_FORMATS:
        tokenized = tokenize_preferences(conversations, tokenizer, data_cfg, max_seq_len, audit_dir=out_dir)
    else:
        tokenized = tokenize_rows(conversations, tokenizer, data_cfg, max_seq_len, audit_dir=out_dir)
    return write_prepared(cfg, out_dir, tokenizer, tokenized, read_report, parts, record)


def prepared_with(out_dir: Path, tokenizer, data_cfg, max_seq_len: int) -> bool:
    """Whether out_dir holds a dataset prepared with this tokenizer and these settings (its conversations unknown)."""
    try:
        manifest = json.loads(prepared_manifest_path(out_dir).read_text())
    except (OSError, ValueError):
        return False
    end_of_turn, _ = end_of_turn_of(tokenizer, data_cfg)
    fingerprint = manifest.get("fingerprint", {})
    return fingerprint.get("tokenizer") == tokenizer_fingerprint(tokenizer, end_of_turn) and \
        fingerprint.get("settings") == settings_fingerprint(data_cfg, max_seq_len)


def write_prepared(cfg, out_dir: Path, tokenizer, tokenized, read_report: dict, parts: dict, record: dict) -> dict:
    """The dataset, tokenizer, histogram, report and (last) manifest of a `prepare`; returns the report. `record`:
    what the samples are made from (prepared_source.manifest_record)."""
    data_cfg, max_seq_len = cfg.data, cfg.model.max_seq_len
    counts = tokenized.counts
    if format_of(data_cfg) in PREFERENCE_FORMATS:  # pairs or KTO examples, one a row: no packing
        save_samples(out_dir, tokenized.splits, counts["sample_kind"])
        lengths = {split: [len(s.input_ids) for s in samples_of(items)] for split, items in tokenized.splits.items()}
        title = (f"{sum(counts['samples'].values())} {counts['sample_kind'].split('_')[1]} "
                 f"({sum(map(len, lengths.values()))} sequences); useful tokens "
                 f"{counts['useful_token_fraction']['padded']:.0%} padded to {max_seq_len}")
    else:
        save_samples(out_dir, tokenized.splits)
        lengths = {split: rows.sample_lengths.tolist() for split, rows in tokenized.splits.items()}
        fractions = counts["useful_token_fraction"]
        title = (f"{sum(counts['samples'].values())} samples; useful tokens {fractions['packed']:.0%} packed, "
                 f"{fractions['padded']:.0%} padded to {max_seq_len}")
    tokenizer.save_pretrained(out_dir / "tokenizer")
    has_histogram = write_length_histogram(
        out_dir / "lengths.png", {split: values for split, values in lengths.items() if values}, max_seq_len, title)
    report = {
        **read_report,
        **counts,
        "fingerprint": parts,
        "reused_prepared": False,
        "output_dir": str(out_dir),
        "files": {
            "dataset": str(out_dir / "dataset"),
            "tokenizer": str(out_dir / "tokenizer"),
            "conversations": tokenized.conversation_files,
            "length_histogram": str(out_dir / "lengths.png") if has_histogram else None,
        },
    }
    if "sources" in read_report:  # a mixture: per source what was read, then what was drawn from it
        report["sources"] = [{**read, **drawn} for read, drawn in zip(read_report["sources"], counts["sources"])]
    prepared_report_path(out_dir).write_text(json.dumps(report, indent=2, ensure_ascii=False))
    write_manifest(out_dir, parts, counts, record)
    return report
