"""`python -m llmft.data inspect`: a few samples as the model will see them, the supervised tokens highlighted.

Supervised tokens (where the loss is computed) are shown in green on a terminal, between [[ and ]] otherwise
(or with --no-color), so a mask that misses the assistant reply or its end-of-turn token is seen at a glance.
The samples come from the same code as training (a matching prepared dataset is reused).
"""

from __future__ import annotations

from llmft.data.preferences.dpo_kto import samples_of
from llmft.data.prepare.reading import read_conversations
from llmft.data.prepare.samples_for_run import build_splits
from llmft.data.readers.records import DataError
from llmft.data.tokenize.templating import IGNORE_INDEX, Sample
from llmft.data.tokenize.tokenizer import tokenizer_for_run

GREEN, RESET = "\x1b[1;32m", "\x1b[0m"


def unpack(samples: list[Sample]) -> list[Sample]:
    """Packed rows back into the samples laid end to end in them."""
    alone = []
    for row in samples:
        start = 0
        for length in row.seq_lengths or [len(row.input_ids)]:
            alone.append(Sample(row.input_ids[start : start + length], row.labels[start : start + length]))
            start += length
    return alone


def highlight(tokenizer, sample: Sample, color: bool) -> str:
    """The decoded sample, each run of supervised tokens highlighted (decoded as a run: multi-byte characters
    split across tokens stay whole)."""
    spans: list[tuple[bool, list[int]]] = []
    for token, label in zip(sample.input_ids, sample.labels):
        supervised = label != IGNORE_INDEX
        if spans and spans[-1][0] == supervised:
            spans[-1][1].append(token)
        else:
            spans.append((supervised, [token]))
    text = []
    for supervised, tokens in spans:
        piece = tokenizer.decode(tokens, skip_special_tokens=False)
        text.append((f"{GREEN}{piece}{RESET}" if color else f"[[{piece}]]") if supervised else piece)
    return "".join(text)


def inspect(cfg, num_samples: int, split: str, color: bool) -> str:
    conversations, _ = read_conversations(cfg.data)
    tokenizer = tokenizer_for_run(cfg, conversations)
    splits, counts = build_splits(conversations, tokenizer, cfg.data, cfg.model.max_seq_len)
    if split not in splits:
        raise DataError(f"--split {split}: there is no such split; the splits are {', '.join(splits)}.")
    # preference data: each pair as its chosen then its rejected sequence, the prompt unsupervised in both
    samples = samples_of(splits[split]) if "sample_kind" in counts else unpack(splits[split])
    legend = "supervised tokens in green" if color else "supervised tokens between [[ and ]]"
    lines = [f"{len(samples)} {split} samples ({legend}); showing {min(num_samples, len(samples))}:"]
    for index, sample in enumerate(samples[:num_samples]):
        lines.append(f"\n──── sample {index}: {len(sample.input_ids)} tokens, {sample.num_supervised} supervised")
        lines.append(highlight(tokenizer, sample, color))
    return "\n".join(lines)
