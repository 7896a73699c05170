"""The data path of a run: read, clean and scrub the conversations, then tokenize, mask, split and pack them.

    conversations, report = read_conversations(cfg.data)                  # text: no tokenizer needed
    tokenizer = tokenizer_for_run(cfg, conversations)                     # model=tiny trains its own on the texts
    splits, counts = build_splits(conversations, tokenizer, cfg.data, cfg.model.max_seq_len)

`python -m llmft.data prepare` and training run this same code. `build_splits` first looks for a prepared
dataset whose fingerprint matches (`data.prepared`, else `data.output_dir`) and loads it instead of tokenizing.
"""

from __future__ import annotations

import os
import sys
from collections import Counter
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from llmft.data.acronyms import read_acronyms
from llmft.data.chat import read_chat_jsonl
from llmft.data.clean import MessageCleaner, normalize_whitespace, shape_turns
from llmft.data.csv_pairs import read_csv_pairs
from llmft.data.dedup import drop_duplicates
from llmft.data.email_threads import read_email
from llmft.data.packing import pack_best_fit
from llmft.data.prepared import fingerprint_parts, load_samples
from llmft.data.records import Conversation, DataError, ReadReport
from llmft.data.scrub import Scrubber
from llmft.data.splits import bucket_of, split_of
from llmft.data.templating import IGNORE_INDEX, Sample, TemplateError, tokenize_many, windows
from llmft.data.tickets import read_tickets_jsonl
from llmft.config.validation import check_data

READERS = {  # data.format -> reader(path, data_cfg, report) -> conversations
    "chat_jsonl": read_chat_jsonl,
    "tickets_jsonl": read_tickets_jsonl,
    "email": read_email,
    "csv": read_csv_pairs,
    "acronyms": read_acronyms,
}


def format_of(data_cfg) -> str:
    return str(getattr(data_cfg.format, "value", data_cfg.format))


def data_path(data_cfg) -> Path:
    return Path(os.path.expandvars(str(data_cfg.path))).expanduser()


def plain(data_cfg):
    """The data config as a plain dataclass: OmegaConf's attribute access, in loops over 100k messages, costs more
    than the cleaning itself."""
    return OmegaConf.to_object(data_cfg) if isinstance(data_cfg, DictConfig) else data_cfg


def read_conversations(data_cfg) -> tuple[list[Conversation], dict]:
    """Clean, scrubbed conversations ready for a chat template, and the report of what was read and dropped."""
    check_data(data_cfg)  # checked at launch already; again for callers that did not validate
    data_cfg = plain(data_cfg)
    data_format, path = format_of(data_cfg), data_path(data_cfg)
    report = ReadReport(strict=data_cfg.strict)
    raw = READERS[data_format](path, data_cfg, report)
    cleaner = MessageCleaner(data_cfg.clean, data_format)
    scrubber = Scrubber(data_cfg.scrub) if data_cfg.scrub.enabled else None
    dropped: Counter = Counter()
    truncated = 0
    conversations = []
    for conversation in raw:
        names = conversation.participants if data_cfg.scrub.names_from_headers else []
        messages = []
        for message in conversation.messages:
            text = cleaner.clean(message["content"], [message["author"]] if message.get("author") else [])
            if scrubber is not None:
                text = scrubber.scrub(text, names)
            messages.append({"role": message["role"], "content": text})
        first_user = next((m for m in messages if m["role"] == "user"), None)
        if conversation.subject and data_cfg.tickets.include_subject and first_user is not None:
            subject = normalize_whitespace(conversation.subject)
            subject = scrubber.scrub(subject, names) if scrubber is not None else subject
            first_user["content"] = f"{subject}\n\n{first_user['content']}" if first_user["content"] else subject
        shaped = shape_turns(messages, data_cfg.clean)
        if shaped.drop_reason:
            dropped[shaped.drop_reason] += 1
            continue
        truncated += shaped.truncated_user_messages
        conversations.append(Conversation(conversation.id, shaped.messages, conversation.source))
    conversations, duplicates = drop_duplicates(conversations, data_cfg.clean.near_duplicate_threshold)
    dropped.update({reason: n for reason, n in duplicates.items() if n})
    if not conversations:
        reasons = ", ".join(f"{n} {reason}" for reason, n in (dropped + Counter(report.counts)).items()) or "none"
        raise DataError(
            f"no usable conversation in {path} ({report.records_read} records read, {len(report.skipped)} bad records "
            f"skipped{': ' + report.skipped[0] if report.skipped else ''}; dropped: {reasons})."
        )
    read_report = {
        "format": data_format,
        "path": str(path),
        **report.as_dict(),
        "conversations_read": len(raw),
        "dropped": dict(dropped),
        "user_messages_truncated": truncated,
        "num_conversations": len(conversations),
        "pii_replacements": {kind: n for kind, n in sorted(scrubber.counts.items()) if n} if scrubber else {},
    }
    return conversations, read_report


def assign_splits(conversation_ids: list[str], data_cfg) -> dict[str, str]:
    """Split of each id by hash. When that leaves validation empty (tiny data), the id with the lowest hash among
    the training ids is held out, so a run always has something to evaluate on, unless
    data.validation_fraction=0 asks to train on every ticket (and evaluate on eval.file)."""
    splits = {i: split_of(i, data_cfg.validation_fraction, data_cfg.test_fraction) for i in conversation_ids}
    if "validation" not in splits.values() and data_cfg.validation_fraction > 0:
        candidates = [i for i, split in splits.items() if split == "train"]
        if len(candidates) > 1:
            splits[min(candidates, key=bucket_of)] = "validation"
    return splits


def end_of_turn_of(tokenizer, data_cfg) -> tuple[str, int]:
    end_of_turn = data_cfg.end_of_turn_token or tokenizer.eos_token
    ids = tokenizer(end_of_turn, add_special_tokens=False)["input_ids"] if end_of_turn else []
    if len(ids) != 1:
        raise TemplateError(
            f"the end-of-turn token {end_of_turn!r} is not a single token of this tokenizer; set "
            f"data.end_of_turn_token to the special token that closes assistant turns in the chat template"
        )
    return end_of_turn, ids[0]


def preflight(splits: dict[str, list[Sample]], end_of_turn: str, end_of_turn_id: int) -> None:
    """Fail loudly on the silent mask failures: nothing supervised, or the end of turn never supervised."""
    samples = [s for split in splits.values() for s in split]
    if not any(label != IGNORE_INDEX for s in samples for label in s.labels):
        raise TemplateError("no sample has a supervised token: the chat template never marks an assistant reply; "
                            "check the data has assistant turns and set model.fallback_chat_template")
    if not any(label == end_of_turn_id for s in samples for label in s.labels):
        raise TemplateError(
            f"the end-of-turn token {end_of_turn!r} is never supervised, so the model would never learn to stop; "
            f"set data.end_of_turn_token to the token the chat template closes assistant turns with"
        )


def useful_fraction(samples: list[Sample], max_seq_len: int) -> float:
    return sum(len(s.input_ids) for s in samples) / max(1, len(samples) * max_seq_len)


def tokenize_splits(conversations, tokenizer, data_cfg, max_seq_len: int
                    ) -> tuple[dict[str, list[Sample]], dict, set[str]]:
    """Samples per split, counts, and the ids of the conversations that gave at least one sample."""
    end_of_turn, end_of_turn_id = end_of_turn_of(tokenizer, data_cfg)
    split_by_id = assign_splits([c.id for c in conversations], data_cfg)
    names = ["train", "validation"] + (["test"] if data_cfg.test_fraction > 0 else [])
    splits: dict[str, list[Sample]] = {name: [] for name in names}
    dropped: Counter = Counter()
    num_windowed = 0
    used_ids: set[str] = set()
    long_policy = str(getattr(data_cfg.long_conversations, "value", data_cfg.long_conversations))
    samples = tokenize_many(tokenizer, [c.messages for c in conversations], data_cfg.system_prompt, end_of_turn)
    for conversation, sample in zip(conversations, samples):
        pieces = [sample]
        if len(sample.input_ids) > max_seq_len:
            if long_policy == "drop":
                dropped["longer_than_max_seq_len"] += 1
                continue
            pieces, exchanges_dropped = windows(tokenizer, conversation.messages, max_seq_len, data_cfg.system_prompt,
                                                end_of_turn)
            num_windowed += 1
            dropped["exchange_longer_than_max_seq_len"] += exchanges_dropped
            if not pieces:
                dropped["no_window_fits_max_seq_len"] += 1
                continue
        for piece in pieces:
            if piece.num_supervised == 0:
                dropped["no_supervised_token"] += 1
                continue
            splits[split_by_id[conversation.id]].append(piece)
            used_ids.add(conversation.id)
    preflight(splits, end_of_turn, end_of_turn_id)
    if not splits["train"]:
        raise DataError(f"no training sample left from {data_cfg.path} (dropped: {dict(dropped)}); "
                        f"raise model.max_seq_len or add data.")
    counts = {
        "max_seq_len": max_seq_len,
        "packing": bool(data_cfg.packing),
        "end_of_turn_token": end_of_turn,
        "samples": {split: len(s) for split, s in splits.items()},
        "tokens": {split: sum(len(x.input_ids) for x in s) for split, s in splits.items()},
        "supervised_tokens": {split: sum(x.num_supervised for x in s) for split, s in splits.items()},
        "conversations_windowed": num_windowed,
        "samples_dropped": {reason: n for reason, n in dropped.items() if n},
    }
    if data_cfg.packing:
        splits = {split: pack_best_fit(s, max_seq_len) for split, s in splits.items()}
        counts["packed_rows"] = {split: len(s) for split, s in splits.items()}
    train_tokens = counts["tokens"]["train"]
    counts["useful_token_fraction"] = {
        # each sample alone in a row of max_seq_len tokens (static shapes) vs rows packed best fit
        "padded": train_tokens / (counts["samples"]["train"] * max_seq_len),
        "packed": train_tokens / (len(pack_best_fit(splits["train"], max_seq_len) if not data_cfg.packing
                                      else splits["train"]) * max_seq_len),
    }
    counts["supervised_token_fraction"] = counts["supervised_tokens"]["train"] / max(1, train_tokens)
    return splits, counts, used_ids


def build_splits(conversations, tokenizer, data_cfg, max_seq_len: int) -> tuple[dict[str, list[Sample]], dict]:
    """Samples per split (packed rows when data.packing), and counts of what was built, truncated and dropped.

    Reuses the prepared dataset when its fingerprint matches; otherwise tokenizes here and says why.
    """
    end_of_turn, _ = end_of_turn_of(tokenizer, data_cfg)
    parts = fingerprint_parts(conversations, tokenizer, data_cfg, max_seq_len, end_of_turn)
    prepared_dir = data_cfg.prepared or data_cfg.output_dir
    if prepared_dir:
        loaded = load_samples(Path(os.path.expandvars(str(prepared_dir))).expanduser(), parts)
        if not isinstance(loaded, str):
            splits, counts = loaded
            return splits, {**counts, "prepared_dir": str(prepared_dir), "reused_prepared": True, "fingerprint": parts}
        if os.environ.get("RANK", "0") == "0":
            print(f"llmft: {loaded}: tokenizing in this process instead "
                  f"(run `python -m llmft.data prepare` on the login node to avoid it).", file=sys.stderr)
    splits, counts, _ = tokenize_splits(conversations, tokenizer, data_cfg, max_seq_len)
    return splits, {**counts, "reused_prepared": False, "fingerprint": parts}
