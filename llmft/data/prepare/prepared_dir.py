"""The tokenized dataset on disk, and the fingerprint that says when it can be reused.

`prepare` (on the login node) saves the samples with `datasets` (`DIR/dataset`, one split each) and writes
`DIR/manifest.json` last, so a folder with a manifest is complete. Training computes the same fingerprint from
its own conversations, tokenizer and settings, and loads the samples instead of tokenizing when all three parts
match: no tokenization inside a GPU job, where it would hold the other ranks at a barrier until NCCL times out.

The fingerprint has three parts, so a mismatch can say what changed:
- conversations: the cleaned, scrubbed conversations themselves (so it covers the input files and every
  reading, cleaning and scrubbing setting at once);
- tokenizer: its full serialization, chat template, end-of-turn and padding tokens;
- settings: what turns conversations into samples (sequence length, packing, system prompt, split fractions).
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

from llmft.data.prepare.data_config import packs, prepared_manifest_path
from llmft.data.preferences.dpo_kto import COLUMNS, PROMPT_RECORDS, columns_of, items_of
from llmft.data.tokenize.rows import Rows
from llmft.data.tokenize.templating import Sample

# Bump when the way samples are built changes, so old prepared folders are not reused.
SAMPLES_FORMAT_VERSION = 1


def _sha(payload) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True, ensure_ascii=False).encode()).hexdigest()[:16]


def conversation_identity(conversation) -> bytes:
    """What the conversations fingerprint hashes of one conversation (a worker computes it where it cleaned it)."""
    identity = conversation.identity() if isinstance(conversation, PROMPT_RECORDS) else \
        [conversation.id, conversation.messages]  # (preference records: the prompt and every completion)
    return json.dumps(identity, ensure_ascii=False).encode()


class ConversationsFingerprint:
    """The conversations part of the fingerprint, from the conversations' identities in order."""

    def __init__(self):
        self.digest = hashlib.sha256()

    def add(self, identity: bytes) -> None:
        self.digest.update(identity)
        self.digest.update(b"\n")

    def value(self) -> str:
        return self.digest.hexdigest()[:16]


def conversations_fingerprint(conversations) -> str:
    fingerprint = ConversationsFingerprint()
    for conversation in conversations:
        fingerprint.add(conversation_identity(conversation))
    return fingerprint.value()


def tokenizer_fingerprint(tokenizer, end_of_turn: str) -> str:
    backend = tokenizer.backend_tokenizer.to_str() if getattr(tokenizer, "is_fast", False) else \
        json.dumps(sorted(tokenizer.get_vocab().items()))
    return _sha([hashlib.sha256(backend.encode()).hexdigest(), tokenizer.chat_template, end_of_turn,
                 tokenizer.pad_token, tokenizer.eos_token, tokenizer.bos_token])


def settings_fingerprint(data_cfg, max_seq_len: int) -> str:
    return _sha({
        "version": SAMPLES_FORMAT_VERSION,
        "max_seq_len": max_seq_len,
        "packing": packs(data_cfg),
        "long_conversations": data_cfg.long_conversations.value,
        "system_prompt": data_cfg.system_prompt,
        "validation_fraction": data_cfg.validation_fraction,
        "test_fraction": data_cfg.test_fraction,
    })


def fingerprint_parts(conversations, tokenizer, data_cfg, max_seq_len: int, end_of_turn: str) -> dict[str, str]:
    """The three parts; `conversations` may be their fingerprint already (`ConversationsFingerprint`)."""
    return {
        "conversations": conversations if isinstance(conversations, str) else conversations_fingerprint(conversations),
        "tokenizer": tokenizer_fingerprint(tokenizer, end_of_turn),
        "settings": settings_fingerprint(data_cfg, max_seq_len),
    }


def save_samples(out_dir: Path, splits: dict[str, Rows] | dict[str, list], sample_kind: str | None = None) -> None:
    """The samples as a `datasets.DatasetDict` in `out_dir/dataset`; call `write_manifest` once all is written.
    `sample_kind` (preferences.SAMPLE_KINDS): the splits are lists of pairs or KTO examples, one row each."""
    from datasets import Dataset, DatasetDict, DatasetInfo, Features, Sequence, Value
    from datasets.table import InMemoryTable
    from datasets.utils.logging import disable_progress_bar

    disable_progress_bar()  # a login-node log, not a terminal show
    if sample_kind is not None:
        scalar = {"prompt_length": Value("int32"), "desirable": Value("bool")}
        features = Features({name: scalar.get(name, Sequence(Value("int32"))) for name in COLUMNS[sample_kind]})
        dataset = DatasetDict({split: Dataset.from_dict(columns_of(items, sample_kind), features=features)
                               for split, items in splits.items()})
    else:
        features = Features({name: Sequence(Value("int32")) for name in ("input_ids", "labels", "seq_lengths")})
        dataset = DatasetDict({  # built from the int32 arrays, without a Python list of the tokens
            split: Dataset(InMemoryTable(rows.arrow_table(features.arrow_schema)), info=DatasetInfo(features=features),
                           fingerprint=rows.fingerprint())  # (else datasets hashes a pickled copy of the whole table)
            for split, rows in splits.items()
        })
    prepared_manifest_path(out_dir).unlink(missing_ok=True)  # the folder is incomplete until a new manifest is written
    staging = out_dir / "dataset.tmp"
    shutil.rmtree(staging, ignore_errors=True)
    dataset.save_to_disk(str(staging))
    shutil.rmtree(out_dir / "dataset", ignore_errors=True)
    staging.rename(out_dir / "dataset")


def write_manifest(out_dir: Path, parts: dict[str, str], counts: dict, record: dict | None = None) -> None:
    """The manifest: the fingerprint, the counts, and `record`, what the samples are made from (data settings, model,
    command, input files: prepared_source.manifest_record)."""
    manifest = prepared_manifest_path(out_dir)
    staging = manifest.with_name(manifest.name + ".tmp")
    staging.write_text(json.dumps({"fingerprint": parts, "counts": counts, **(record or {})}, indent=2, ensure_ascii=False))
    staging.rename(manifest)


def load_samples(prepared_dir: Path, parts: dict[str, str]) -> tuple[dict[str, list[Sample]], dict] | str:
    """The saved samples and counts when the fingerprint matches; otherwise why not, as a sentence. Preference
    data (counts["sample_kind"]) comes back as lists of `PreferencePair` / `KtoExample`."""
    manifest_path = prepared_manifest_path(prepared_dir)
    if not manifest_path.is_file():
        return f"{prepared_dir} holds no prepared dataset (no manifest.json)"
    manifest = json.loads(manifest_path.read_text())
    changed = [name for name, value in parts.items() if manifest.get("fingerprint", {}).get(name) != value]
    if changed:
        return f"{prepared_dir} was prepared with other {' and '.join(changed)}"
    from datasets import load_from_disk

    dataset = load_from_disk(str(prepared_dir / "dataset"))
    splits = {}
    sample_kind = manifest["counts"].get("sample_kind")
    if sample_kind is not None:
        for split in dataset:
            table = dataset[split].data
            splits[split] = items_of({name: table.column(name).to_pylist() for name in COLUMNS[sample_kind]},
                                     sample_kind)
        return splits, manifest["counts"]
    packed = bool(manifest["counts"].get("packing"))
    for split in dataset:
        table = dataset[split].data
        columns = [table.column(name).to_pylist() for name in ("input_ids", "labels", "seq_lengths")]
        splits[split] = [Sample(ids, labels, lengths if packed else None) for ids, labels, lengths in zip(*columns)]
    return splits, manifest["counts"]
