"""The attention kernel chosen per device, and packed rows reaching each kernel with their samples kept apart.

flash-attention cannot run on this CPU: its path is checked up to the kernel's call by a stand-in registered under
its name, a per-sample attention that reads only the boundaries the batch carries (`cu_seq_lens`, `max_length`): if
the batch or the model's plumbing lost them, samples would attend to each other or the stand-in would fail.
"""

from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F
import transformers
from transformers import AttentionInterface
from transformers.modeling_flash_attention_utils import prepare_fa_kwargs_from_position_ids
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from llmft.config.families import ModelFamily
from llmft.data.tokenize.batching import collate
from llmft.data.tokenize.templating import IGNORE_INDEX, Sample
from llmft.errors import ConfigError
from llmft.training import attention
from llmft.training import loss as supervised_loss
from llmft.training.loss import supervised_token_losses, with_loss_index


def installed_only(*packages):
    return lambda name: object() if name in packages else None


class Flash:
    _supports_flash_attn, _supports_flex_attn = True, True


class FlexOnly:
    _supports_flash_attn, _supports_flex_attn = False, True


class Neither:
    _supports_flash_attn, _supports_flex_attn = False, False


@pytest.mark.parametrize("device, half, packed, model_class, capability, packages, expected", [
    ("cpu", False, True, Flash, None, ("flash_attn",), "llmft_sdpa_varlen"),  # packed rows: SDPA per sample
    ("cpu", False, False, Flash, None, ("flash_attn",), "sdpa"),  # padded rows (DPO, KTO): SDPA with their mask
    ("cuda", True, True, Flash, (8, 0), ("flash_attn",), "flash_attention_2"),
    ("cuda", True, False, Flash, (8, 0), ("flash_attn",), "flash_attention_2"),  # padded rows: its unpad path
    ("cuda", True, True, Flash, (9, 0), ("flash_attn", "flash_attn_interface"), "flash_attention_3"),
    ("cuda", True, True, Flash, (8, 0), ("flash_attn", "flash_attn_interface"), "flash_attention_2"),  # FA3: Hopper
    ("cuda", True, True, Flash, (8, 0), (), "flex_attention"),
    ("cuda", False, True, Flash, (7, 0), ("flash_attn",), "flex_attention"),  # fp32 compute (V100): no flash kernel
    ("cuda", True, False, Flash, (8, 0), (), "sdpa"),  # padded rows vary in length: flex would recompile for each
    ("cuda", True, True, FlexOnly, (8, 0), ("flash_attn",), "flex_attention"),
    ("cuda", True, True, Neither, (8, 0), ("flash_attn",), "sdpa"),
])
def test_auto_chooses_the_kernel_per_device(device, half, packed, model_class, capability, packages, expected):
    assert attention.choose("auto", ModelFamily.llama, device, half, packed, model_class, capability,
                            installed_only(*packages)) == expected


def test_bloom_runs_eager_and_a_name_is_taken_as_given_or_refused_when_its_package_is_missing():
    assert attention.choose("auto", ModelFamily.bloom, "cuda", True, False, Flash, (8, 0),
                            installed_only("flash_attn")) == "eager"
    assert attention.choose("sdpa", ModelFamily.llama, "cuda", True, True, Flash, (8, 0),
                            installed_only("flash_attn")) == "sdpa"
    with pytest.raises(ConfigError, match=r"model.attn_implementation=flash_attention_2 needs the `flash_attn` "
                                          r"package.*model.attn_implementation=auto"):
        attention.choose("flash_attention_2", ModelFamily.llama, "cuda", True, True, Flash, (8, 0), installed_only())
    with pytest.raises(ConfigError, match=r"flex_attention has no backward on a CPU"):
        attention.choose("flex_attention", ModelFamily.llama, "cpu", False, True)
    with pytest.raises(ConfigError, match=r"llmft_sdpa_varlen is llmft's kernel for CPUs: on a GPU use "):
        attention.choose("llmft_sdpa_varlen", ModelFamily.llama, "cuda", True, True, Flash, (8, 0), installed_only())
    # train.compile keeps the dense mask on a CPU: the per-sample loop would recompile for each set of lengths
    assert attention.choose("auto", ModelFamily.llama, "cpu", False, True, compiled=True) == "sdpa"


def test_a_launch_refuses_an_unknown_implementation_in_one_sentence():
    from llmft.config.compose import compose
    from llmft.config.validation import validate

    with pytest.raises(ConfigError, match=r"model.attn_implementation=flash2 is not one of auto, sdpa, eager"):
        validate(compose(["model.attn_implementation=flash2"]))


def random_samples(seed: int, count: int, vocab: int) -> list[Sample]:
    rng = random.Random(seed)
    samples = []
    for _ in range(count):
        length = rng.randint(3, 17)
        ids = [rng.randrange(vocab) for _ in range(length)]
        labels = [IGNORE_INDEX] + [t if rng.random() < 0.6 else IGNORE_INDEX for t in ids[1:]]
        samples.append(Sample(ids, labels))
    return samples


def packed_rows(samples: list[Sample], per_row: int, pad_to: int, pad_id: int) -> list[Sample]:
    """Rows of `per_row` samples end to end, padded at the end to `pad_to` (the padding a block of its own)."""
    rows = []
    for start in range(0, len(samples), per_row):
        group = samples[start:start + per_row]
        ids = [t for s in group for t in s.input_ids]
        labels = [t for s in group for t in s.labels]
        lengths = [len(s.input_ids) for s in group]
        if pad_to > len(ids):
            lengths.append(pad_to - len(ids))
            labels += [IGNORE_INDEX] * (pad_to - len(ids))
            ids += [pad_id] * (pad_to - len(ids))
        rows.append(Sample(ids, labels, lengths))
    return rows


def test_flattened_rows_carry_the_boundaries_transformers_would_infer_from_the_positions():
    rows = packed_rows(random_samples(0, 7, 50), per_row=3, pad_to=48, pad_id=0)
    batch = collate(rows, pad_token_id=0, flatten=True)
    (cu_q, cu_k), (max_q, max_k) = prepare_fa_kwargs_from_position_ids(batch["position_ids"])
    assert batch["cu_seq_lens_q"].tolist() == cu_q.tolist() and batch["cu_seq_lens_k"].tolist() == cu_k.tolist()
    assert batch["cu_seq_lens_q"].dtype == torch.int32
    assert isinstance(batch["max_length_q"], int) and batch["max_length_q"] == int(max_q) == batch["max_length_k"]
    assert "cu_seq_lens_q" not in collate(rows, pad_token_id=0)  # side by side: no flash kwargs


def varlen_reference(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """flash-attention's varlen contract in plain torch: one row, each sample [cu[i], cu[i+1]) causal on its own."""
    assert attention_mask is None and query.shape[0] == 1
    offsets, longest = kwargs["cu_seq_lens_q"].tolist(), kwargs["max_length_q"]
    assert isinstance(longest, int) and longest == max(b - a for a, b in zip(offsets, offsets[1:]))
    groups = query.shape[1] // key.shape[1]
    key, value = key.repeat_interleave(groups, 1), value.repeat_interleave(groups, 1)
    pieces = [F.scaled_dot_product_attention(query[:, :, a:b], key[:, :, a:b], value[:, :, a:b], is_causal=True,
                                             scale=scaling) for a, b in zip(offsets, offsets[1:])]
    return torch.cat(pieces, dim=2).transpose(1, 2).contiguous(), None


@pytest.fixture
def flash_stand_in():
    original = ALL_ATTENTION_FUNCTIONS["flash_attention_2"]
    AttentionInterface.register("flash_attention_2", varlen_reference)
    yield
    AttentionInterface.register("flash_attention_2", original)


@pytest.mark.slow  # flex attention compiles on first use (~20 s here)
@pytest.mark.parametrize("implementation", ["sdpa", "eager", "flex_attention", "flash_attention_2",
                                            "llmft_sdpa_varlen"])
def test_packed_rows_give_each_sample_its_unpacked_losses_through_each_kernel(implementation, flash_stand_in):
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).eval()
    supervised_loss.install(model, "chunked", "cpu")
    samples = random_samples(1, 8, 64)
    unpacked = with_loss_index(collate(samples, pad_token_id=0))
    model.set_attn_implementation("sdpa")
    with torch.no_grad():
        expected = supervised_token_losses(model, unpacked, None, installed=True)
    if implementation == "flash_attention_2":
        model.config._attn_implementation = implementation  # set_attn_implementation would look for flash_attn
    elif implementation == "llmft_sdpa_varlen":
        model.set_attn_implementation(attention.choose("auto", ModelFamily.llama, "cpu", False, True))
    else:
        model.set_attn_implementation(implementation)
    rows = packed_rows(samples, per_row=3, pad_to=48, pad_id=0)
    batch = with_loss_index(collate(rows, pad_token_id=0, flatten=attention.lays_rows_end_to_end(implementation)))
    batch.pop("num_tokens")
    with torch.no_grad():
        packed = supervised_token_losses(model, batch, None, installed=True)
    torch.testing.assert_close(packed, expected, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("window", [5, 64])
def test_per_sample_sdpa_on_packed_rows_equals_each_sample_alone_with_a_sliding_window(window):
    """Mistral's sliding window through llmft_sdpa_varlen: a window shorter than most samples (5) gets each sample
    its band mask; a longer one (64) is plain causal. Forward and input gradients equal each sample run alone."""
    config = transformers.MistralConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                        sliding_window=window)
    torch.manual_seed(0)
    model = transformers.MistralForCausalLM(config)
    supervised_loss.install(model, "chunked", "cpu")
    samples = random_samples(2, 6, 64)
    unpacked = with_loss_index(collate(samples, pad_token_id=0))
    model.set_attn_implementation("eager")  # the reference: transformers' own sliding-window masks
    expected = supervised_token_losses(model, unpacked, None, installed=True)
    expected_grads = torch.autograd.grad(expected.sum(), [p for p in model.parameters()][1:3])
    model.set_attn_implementation(attention.choose("auto", ModelFamily.mistral, "cpu", False, True))
    rows = packed_rows(samples, per_row=3, pad_to=48, pad_id=0)
    batch = with_loss_index(collate(rows, pad_token_id=0, flatten=True))
    batch.pop("num_tokens")
    packed = supervised_token_losses(model, batch, None, installed=True)
    grads = torch.autograd.grad(packed.sum(), [p for p in model.parameters()][1:3])
    torch.testing.assert_close(packed, expected, atol=2e-5, rtol=1e-5)
    for got, want in zip(grads, expected_grads):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)


def test_per_sample_sdpa_without_boundaries_is_causal_sdpa_and_refuses_padding():
    """The trained model used outside packed training (a probe of its logits, greedy decoding with a cache) gives
    SDPA's results; a padded batch, which it cannot see the padding of, is refused in one sentence."""
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                      pad_token_id=0, eos_token_id=1, bos_token_id=2)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).eval()
    prompt = torch.randint(3, 64, (2, 11), generator=torch.Generator().manual_seed(0))
    outputs = {}
    for implementation in ("sdpa", attention.choose("auto", ModelFamily.llama, "cpu", False, True)):
        model.set_attn_implementation(implementation)
        with torch.no_grad():
            outputs[implementation] = (model(input_ids=prompt).logits,
                                       model.generate(prompt, max_new_tokens=6, do_sample=False, min_new_tokens=6))
    torch.testing.assert_close(outputs["llmft_sdpa_varlen"][0], outputs["sdpa"][0], atol=1e-5, rtol=1e-5)
    assert torch.equal(outputs["llmft_sdpa_varlen"][1], outputs["sdpa"][1])
    padded = torch.ones_like(prompt)
    padded[0, :3] = 0
    with pytest.raises(ValueError, match=r"these rows are padded: use model.attn_implementation=sdpa"):
        model(input_ids=prompt, attention_mask=padded)
