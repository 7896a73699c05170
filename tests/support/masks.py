"""What a sample supervises, read back as text (the mask tests of the bundled templates and of real models)."""

from __future__ import annotations

from llmft.data.tokenize.templating import IGNORE_INDEX


def supervised_runs(tokenizer, sample) -> list[str]:
    """The decoded runs of consecutive supervised tokens."""
    runs, current = [], []
    for token, label in zip(sample.input_ids, sample.labels):
        if label != IGNORE_INDEX:
            assert label == token
            current.append(token)
        elif current:
            runs.append(current)
            current = []
    if current:
        runs.append(current)
    return [tokenizer.decode(run, skip_special_tokens=False) for run in runs]
