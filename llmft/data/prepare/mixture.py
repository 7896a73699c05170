"""Weighted mixtures of data sets (`data.format=mixture`): multi-task instruction tuning from several sources.

Each of `data.sources` is a data config of its own (any conversation format): it is read, cleaned, scrubbed,
split and tokenized exactly as it would be alone, so its validation split is the one it has alone. Then the
training samples of one epoch are drawn from the sources at their weights' shares:

    total      = data.mixture_samples, or by default the sum of the sources' training samples
    target_i   = weight_i / sum(weights) * total, rounded so the targets add up to the total (largest remainder)
    source i   gives all its samples target_i // n_i times, plus target_i % n_i of them drawn without
               replacement (a larger source is subsampled, a smaller one repeated), by data.mixture_seed

and the drawn samples are shuffled together (so packed rows mix the sources) and packed (data.packing) after the
draw. Validation and test are each source's own split, concatenated. The draw is made once: every epoch of a run
sees the same drawn samples (the training loop shuffles their order per epoch).

The shares are shares of samples (a conversation longer than model.max_seq_len gives several windows), the unit
the training loop draws. Conversations keep their source in their id (`name/id`); a conversation is split by its
own id and its source's fractions, as alone (`mixture_splits`). No dedup across sources.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections import Counter
from dataclasses import dataclass

import numpy as np
from omegaconf import DictConfig, OmegaConf

from llmft.config.data_schema import DataFormat
from llmft.config.validation import mixture_source_name
from llmft.data.readers.records import Conversation
from llmft.data.tokenize.rows import Rows

SEPARATOR = "/"  # mixture id = source name + SEPARATOR + the conversation's id in its source (names have no "/")


@dataclass
class Source:
    name: str
    weight: float  # normalised: the target share of the training samples
    cfg: object  # the source's data config as it is read and tokenized (packing after the draw)


def sources_of(data_cfg) -> list[Source]:
    """The sources of a mixture (a plain data config), with what they inherit from the mixture's keys: num_workers,
    end_of_turn_token and system_prompt when unset, strict when true; packing waits for the draw."""
    total = sum(float(source.weight) for source in data_cfg.sources)
    sources = []
    for index, source in enumerate(data_cfg.sources):
        cfg = dataclasses.replace(
            source, packing=False,
            num_workers=source.num_workers if source.num_workers is not None else data_cfg.num_workers,
            end_of_turn_token=source.end_of_turn_token or data_cfg.end_of_turn_token,
            system_prompt=source.system_prompt if source.system_prompt is not None else data_cfg.system_prompt,
            strict=source.strict or data_cfg.strict)
        sources.append(Source(mixture_source_name(source, index), float(source.weight) / total, cfg))
    return sources


def with_source(conversations: list[Conversation], name: str) -> list[Conversation]:
    return [dataclasses.replace(c, id=f"{name}{SEPARATOR}{c.id}") for c in conversations]


def by_source(conversations: list[Conversation], sources: list[Source]) -> list[list[Conversation]]:
    """The conversations of each source, in order, under their ids in the source."""
    found: dict[str, list[Conversation]] = {source.name: [] for source in sources}
    for conversation in conversations:
        name, _, own_id = conversation.id.partition(SEPARATOR)
        found[name].append(dataclasses.replace(conversation, id=own_id))
    return [found[source.name] for source in sources]


def mixture_splits(conversation_ids: list[str], data_cfg, assign_splits) -> dict[str, str]:
    """The split of each mixture id: `assign_splits` of the ids of each source with that source's fractions."""
    sources = {source.name: source for source in sources_of(data_cfg)}
    own_ids: dict[str, list[str]] = {name: [] for name in sources}
    for mixture_id in conversation_ids:
        name, _, own_id = mixture_id.partition(SEPARATOR)
        own_ids[name].append(own_id)
    return {f"{name}{SEPARATOR}{own_id}": split
            for name, ids in own_ids.items() if ids
            for own_id, split in assign_splits(ids, sources[name].cfg).items()}


def merged_read_report(sources: list[Source], reports: list[dict]) -> dict:
    """One read report for the mixture: the sources' counts added up, the bad records of all (each names its file and
    line), and per source what was read."""
    added: dict[str, Counter] = {key: Counter() for key in ("reader_dropped", "dropped", "pii_replacements")}
    for report in reports:
        for key, counter in added.items():
            counter.update(report[key])
    return {
        "format": "mixture",
        "path": ", ".join(report["path"] for report in reports),
        "records_read": sum(report["records_read"] for report in reports),
        "num_skipped": sum(report["num_skipped"] for report in reports),
        "skipped": [line for report in reports for line in report["skipped"]],
        "reader_dropped": dict(added["reader_dropped"]),
        "conversations_read": sum(report["conversations_read"] for report in reports),
        "dropped": dict(added["dropped"]),
        "user_messages_truncated": sum(report["user_messages_truncated"] for report in reports),
        "num_conversations": sum(report["num_conversations"] for report in reports),
        "pii_replacements": dict(sorted(added["pii_replacements"].items())),
        "sources": [{"name": source.name, "weight": source.weight,
                     **{key: report[key] for key in ("format", "path", "records_read", "num_skipped",
                                                      "conversations_read", "num_conversations", "dropped")}}
                    for source, report in zip(sources, reports)],
    }


def sample_targets(weights: list[float], total: int) -> list[int]:
    """How many training samples each source gives: weight x total, rounded by largest remainder so that they add
    up to `total` exactly (ties to the earlier source)."""
    exact = [weight * total for weight in weights]
    targets = [int(value) for value in exact]
    by_remainder = sorted(range(len(exact)), key=lambda i: (-(exact[i] - targets[i]), i))
    for i in by_remainder[: total - sum(targets)]:
        targets[i] += 1
    return targets


def drawn_indices(available: int, target: int, seed: int, source_index: int) -> np.ndarray:
    """`target` sample indices out of `available`: every index target // available times, plus target % available
    distinct indices drawn by (seed, source index), in increasing order."""
    copies, rest = divmod(target, available)
    rng = np.random.default_rng([seed, source_index])
    extra = np.sort(rng.permutation(available)[:rest])
    return np.concatenate([np.tile(np.arange(available, dtype=np.int64), copies), extra.astype(np.int64)])


def take(rows: Rows, indices: np.ndarray) -> Rows:
    """The samples `indices` of unpacked rows, in that order (an index may repeat)."""
    starts = np.zeros(rows.num_samples, dtype=np.int64)
    np.cumsum(rows.sample_lengths[:-1], out=starts[1:])
    lengths = rows.sample_lengths[indices]
    # token positions: each chosen sample's start, then 0, 1, 2... within it
    first_of_each = np.repeat(starts[indices] - (np.cumsum(lengths) - lengths), lengths)
    positions = first_of_each + np.arange(int(lengths.sum()), dtype=np.int64)
    return Rows(rows.input_ids[positions], rows.labels[positions], lengths.astype(np.int64))


def draw(train: list[Rows], targets: list[int], seed: int) -> Rows:
    """The training samples of the mixture: each source's drawn samples (`drawn_indices`), shuffled together."""
    offsets = np.cumsum([0] + [rows.num_samples for rows in train])
    chosen = np.concatenate([offset + drawn_indices(rows.num_samples, target, seed, i)
                             for i, (rows, target, offset) in enumerate(zip(train, targets, offsets))])
    order = np.random.default_rng([seed, len(train)]).permutation(len(chosen))
    return take(Rows.concatenate(train), chosen[order])


def source_entries(sources: list[Source], available: list[int], targets: list[int], held_out: list[dict]) -> list:
    """report.json's `sources`: per source its weight, training samples drawn, actual share, and held-out samples."""
    total = max(1, sum(targets))
    return [{"name": source.name, "weight": round(source.weight, 6), "samples": target,
             "share": round(target / total, 6), "available_samples": n, "times_each": round(target / n, 4),
             **{f"{split}_samples": count for split, count in splits.items()}}
            for source, n, target, splits in zip(sources, available, targets, held_out)]


def settings_part(data_cfg) -> str:
    """What the mixture adds to the settings fingerprint: each source's weight and the settings that turn its
    conversations into samples, the total and the seed (the conversations' fingerprint covers the rest)."""
    payload = {
        "mixture_samples": data_cfg.mixture_samples,
        "mixture_seed": data_cfg.mixture_seed,
        "sources": [[s.name, s.weight, s.cfg.validation_fraction, s.cfg.test_fraction, s.cfg.system_prompt,
                     s.cfg.long_conversations.value,
                     s.cfg.end_of_turn_token] for s in sources_of(data_cfg)],
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True, ensure_ascii=False).encode()).hexdigest()[:16]


def with_mixture_settings(parts: dict[str, str], data_cfg) -> dict[str, str]:
    """The fingerprint `parts` of a run; for a mixture its settings part also covers the weights and sources."""
    if data_cfg.format is not DataFormat.mixture:
        return parts
    if isinstance(data_cfg, DictConfig):
        data_cfg = OmegaConf.to_object(data_cfg)
    combined = hashlib.sha256(f"{parts['settings']}:{settings_part(data_cfg)}".encode()).hexdigest()[:16]
    return {**parts, "settings": combined}
