"""data.format=mixture: training samples drawn at the weights' shares (repeated or subsampled, by seed), each
source's own validation split, the report's `sources`, the fingerprint, the checks, and a run through the loop."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest
from omegaconf import OmegaConf

from llmft.config.compose import compose
from llmft.config.validation import validate
from llmft.data.prepare.data_config import packs
from llmft.data.prepare.mixture import draw, drawn_indices, sample_targets, sources_of
from llmft.data.prepare.reading import read_conversations
from llmft.data.prepare.splits import assign_splits
from llmft.data.prepare.tokenizing import tokenize_rows
from llmft.data.prepare.samples_for_run import build_splits
from llmft.data.prepare.command import prepare
from llmft.data.tokenize.rows import Rows
from llmft.data.tokenize.tokenizer import tokenizer_for_run
from llmft.errors import ConfigError
from support.runs import run_llmft


def rows_of(token: int, lengths: list[int]) -> Rows:
    """Unpacked rows whose every token is `token` (which source a drawn sample came from) and whose labels count
    up within the source (which sample of it)."""
    labels = np.concatenate([np.full(n, i, np.int32) for i, n in enumerate(lengths)])
    return Rows(np.full(sum(lengths), token, np.int32), labels, np.array(lengths, np.int64))


def test_targets_add_up_and_stay_within_rounding_of_the_weights():
    for weights, total in [([0.8, 0.2], 341), ([1 / 3] * 3, 100), ([0.5, 0.3, 0.2], 7), ([0.999, 0.001], 50)]:
        targets = sample_targets(weights, total)
        assert sum(targets) == total
        assert all(abs(t - w * total) < 1 for t, w in zip(targets, weights)), (weights, total, targets)
    assert sample_targets([0.5, 0.5], 3) == [2, 1]  # a tie goes to the earlier source


def test_a_small_source_is_repeated_a_large_one_subsampled_deterministically_by_seed():
    small, large = rows_of(1, [3, 4, 5]), rows_of(2, list(range(2, 42)))  # 3 and 40 samples
    drawn = draw([small, large], [8, 12], seed=0)
    starts = np.concatenate([[0], np.cumsum(drawn.sample_lengths)[:-1]])
    sources = drawn.input_ids[starts]
    assert Counter(sources.tolist()) == {1: 8, 2: 12}
    small_counts = Counter(drawn.labels[starts][sources == 1].tolist())
    assert sorted(small_counts.values()) == [2, 3, 3]  # every small sample twice, two of them a third time
    large_picked = drawn.labels[starts][sources == 2].tolist()
    assert len(set(large_picked)) == 12  # subsampled without replacement
    for start, length, token, index in zip(starts, drawn.sample_lengths, sources, drawn.labels[starts]):
        assert np.all(drawn.input_ids[start : start + length] == token)  # whole samples, never cut
        assert length == ([3, 4, 5] if token == 1 else list(range(2, 42)))[index]
    again = draw([small, large], [8, 12], seed=0)
    assert again.fingerprint() == drawn.fingerprint()
    other = draw([small, large], [8, 12], seed=1)
    assert other.fingerprint() != drawn.fingerprint()
    assert not np.array_equal(drawn_indices(40, 12, 0, 1), drawn_indices(40, 12, 1, 1))


def test_sources_take_the_mixtures_keys_they_leave_unset():
    data = OmegaConf.to_object(compose(["data=mixture_sample", "data.strict=true", "data.system_prompt=Be brief.",
                                        "data.num_workers=3", "data.sources.1.weight=0.6"]).data)
    tickets, acronyms = sources_of(data)
    assert (tickets.name, tickets.weight, acronyms.weight) == ("tickets", 0.8 / 1.4, 0.6 / 1.4)  # normalised
    assert tickets.cfg.system_prompt == "Be brief." and acronyms.cfg.system_prompt.startswith("You are the user-")
    assert tickets.cfg.strict and acronyms.cfg.strict and tickets.cfg.num_workers == 3
    assert tickets.cfg.packing is False and packs(data)  # packed after the draw (packing: auto)


@pytest.fixture(scope="module")
def mixed():
    """The bundled mixture tokenized with the tiny model's tokenizer, and each source tokenized alone."""
    cfg = compose(["data=mixture_sample", "data.num_workers=1"])
    conversations, read_report = read_conversations(cfg.data)
    tokenizer = tokenizer_for_run(cfg, conversations)
    tokenized = tokenize_rows(conversations, tokenizer, cfg.data, cfg.model.max_seq_len)
    alone = {}
    for name in ("tickets", "acronyms"):
        source_cfg = compose([f"data={name}_sample", "data.packing=false", "data.num_workers=1"]).data
        own, _ = read_conversations(source_cfg)
        alone[name] = (tokenize_rows(own, tokenizer, source_cfg, cfg.model.max_seq_len),
                       assign_splits([c.id for c in own], source_cfg))
    return cfg, conversations, read_report, tokenizer, tokenized, alone


def test_shares_in_the_report_match_the_weights_and_validation_stays_per_source(mixed):
    cfg, conversations, read_report, _, tokenized, alone_and_splits = mixed
    alone = {name: tokens for name, (tokens, _) in alone_and_splits.items()}
    sources = tokenized.counts["sources"]
    assert [s["name"] for s in sources] == ["tickets", "acronyms"]
    available = [alone[s["name"]].splits["train"].num_samples for s in sources]
    assert [s["available_samples"] for s in sources] == available
    total = tokenized.counts["samples"]["train"]
    assert total == sum(available) == sum(s["samples"] for s in sources)  # default: the sources' sum
    for source, weight in zip(sources, [0.8, 0.2]):
        assert source["weight"] == weight
        assert abs(source["share"] - weight) <= 1 / total and source["share"] == round(source["samples"] / total, 6)
    # validation: each source's own split, concatenated in source order, unchanged by the mixture
    validation = Rows.concatenate([alone["tickets"].splits["validation"], alone["acronyms"].splits["validation"]])
    assert [s["validation_samples"] for s in sources] == [alone[n].splits["validation"].num_samples
                                                          for n in ("tickets", "acronyms")]
    assert packs(cfg.data) and tokenized.counts["packed_rows"]["validation"] < validation.num_samples
    assert tokenized.counts["tokens"]["validation"] == validation.num_tokens
    assert sorted(tokenized.splits["validation"].sample_lengths.tolist()) == \
        sorted(validation.sample_lengths.tolist())  # the same samples, packed after the draw
    assert tokenized.counts["samples"]["validation"] == validation.num_samples
    # the splits of the mixture's ids are the sources' own, so evaluation finds the held-out conversations
    split_by_id = assign_splits([c.id for c in conversations], cfg.data)
    for name, (_, own_splits) in alone_and_splits.items():
        assert {i.split("/", 1)[1]: split for i, split in split_by_id.items() if i.startswith(name + "/")} == \
            own_splits
        assert "validation" in own_splits.values()
    assert read_report["format"] == "mixture" and [s["name"] for s in read_report["sources"]] == ["tickets", "acronyms"]


def test_mixture_samples_and_seed(mixed):
    cfg, conversations, _, tokenizer, tokenized, _ = mixed
    fixed = compose(["data=mixture_sample", "data.num_workers=1", "data.mixture_samples=50", "data.packing=false"]).data
    fifty = tokenize_rows(conversations, tokenizer, fixed, cfg.model.max_seq_len)
    assert fifty.counts["samples"]["train"] == 50
    assert [s["samples"] for s in fifty.counts["sources"]] == [40, 10]
    again = tokenize_rows(conversations, tokenizer, fixed, cfg.model.max_seq_len)
    assert again.splits["train"].fingerprint() == fifty.splits["train"].fingerprint()
    reseeded = compose(["data=mixture_sample", "data.num_workers=1", "data.mixture_samples=50", "data.packing=false",
                        "data.mixture_seed=7"]).data
    other = tokenize_rows(conversations, tokenizer, reseeded, cfg.model.max_seq_len)
    assert other.splits["train"].fingerprint() != fifty.splits["train"].fingerprint()
    assert other.splits["validation"].fingerprint() == fifty.splits["validation"].fingerprint()


def test_prepare_reports_sources_and_reuses_only_the_same_mixture(tmp_path):
    out_dir = tmp_path / "prepared"
    overrides = ["data=mixture_sample", f"data.output_dir={out_dir}", "data.num_workers=1"]
    report = prepare(compose(overrides))
    saved = json.loads((out_dir / "report.json").read_text())
    assert saved["sources"] == report["sources"]
    assert [(s["name"], s["weight"]) for s in saved["sources"]] == [("tickets", 0.8), ("acronyms", 0.2)]
    assert all(abs(s["share"] - s["weight"]) <= 0.02 for s in saved["sources"])
    assert sum(s["samples"] for s in saved["sources"]) == saved["samples"]["train"]
    assert saved["sources"][1]["format"] == "acronyms" and saved["sources"][1]["num_conversations"] > 0
    ids = [json.loads(line)["id"] for line in (out_dir / "validation.conversations.jsonl").read_text().splitlines()]
    assert {i.split("/")[0] for i in ids} == {"tickets", "acronyms"}
    assert not list(out_dir.glob(".mixture-*"))  # the per-source audit files are merged, then removed
    assert prepare(compose(overrides))["reused_prepared"] is True
    reweighted = compose(overrides + ["data.sources.0.weight=0.5"])
    conversations, _ = read_conversations(reweighted.data)
    splits, counts = build_splits(conversations, tokenizer_for_run(reweighted, conversations), reweighted.data,
                                  reweighted.model.max_seq_len)
    assert counts["reused_prepared"] is False  # other weights: other settings fingerprint
    assert [s["weight"] for s in counts["sources"]] == [round(0.5 / 0.7, 6), round(0.2 / 0.7, 6)]  # normalised
    assert all(abs(s["share"] - s["weight"]) <= 1 / counts["samples"]["train"] for s in counts["sources"])


@pytest.mark.parametrize("override, message", [
    ("data.sources.0.weight=0", "data.sources[0].weight=0.0 must be a positive number"),
    ("data.sources.1.weight=-1", "data.sources[1].weight=-1.0 must be a positive number"),
    ("data.sources.1.name=tickets", "data.sources[1].name=tickets is the name of another source too"),
    ("data.sources.0.name=a/b", "data.sources[0].name='a/b' must be letters, digits"),
    ("data.sources.1.validation_fraction=1.5", "data.sources[1].validation_fraction=1.5 must be at least 0"),
    ("data.sources.0.format=preference_jsonl", "data.sources[0].format=preference_jsonl cannot be mixed"),
    ("data.sources.0.format=mixture", "data.sources[0].format=mixture cannot be mixed"),
    ("data.sources.1.path=/nowhere", "data.sources[1].path=/nowhere does not exist"),
    ("data.mixture_samples=0", "data.mixture_samples=0 must be at least 1"),
    ("data.sources=[]", "data.format=mixture needs data.sources"),
])
def test_bad_mixtures_are_one_sentence_naming_the_source_key(override, message):
    with pytest.raises(ConfigError) as error:
        validate(compose(["data=mixture_sample", override]))
    assert str(error.value).startswith(message), str(error.value)


def test_missing_weight_and_sources_outside_a_mixture_are_named():
    with pytest.raises(ConfigError, match=r"^data.sources\[0\].weight is not set"):
        validate(compose(["data=mixture", "data.sources=[{path: x.jsonl}]"]))
    with pytest.raises(ConfigError, match="data.sources is set but data.format=chat_jsonl"):
        validate(compose(["data=tickets_sample", "data.sources=[{path: x.jsonl, weight: 1}]"]))


@pytest.mark.slow
def test_a_mixture_trains_through_the_loop(tmp_path):
    result = run_llmft("launch", "data=mixture_sample", "train.max_steps=2", "train.eval_every=2",
                       f"run_dir={tmp_path / 'run'}", timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((tmp_path / "run/summary.json").read_text())
    assert summary["steps"] == 2 and summary["final_val_loss"] > 0
    assert [s["name"] for s in summary["data"]["sources"]] == ["tickets", "acronyms"]
    assert summary["num_train_samples"] == summary["data"]["packed_rows"]["train"]
