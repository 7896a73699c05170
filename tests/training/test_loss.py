"""The loss on supervised positions only (training/loss.py) equals the plain full-logits loss, and so do its gradients:
in one process here for LoRA and full fine-tuning, packed and padded batches, tied and untied embeddings, several
chunks; under every strategy on 2 ranks in tests/training/test_loss_strategies.py."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import Gemma2Config, Gemma2ForCausalLM, LlamaConfig, LlamaForCausalLM

from llmft.data.tokenize.batching import collate
from llmft.data.tokenize.templating import IGNORE_INDEX, Sample
from llmft.errors import ConfigError
from llmft.training import loss


def tiny_llama(tied: bool, vocab: int = 300) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tied,
                         initializer_range=0.1, use_cache=False)
    return LlamaForCausalLM(config)


def samples(vocab: int, packed: bool) -> list[Sample]:
    generator = torch.Generator().manual_seed(1)
    out = []
    for length in (37, 50, 23, 64):
        ids = torch.randint(3, vocab, (length,), generator=generator).tolist()
        prompt = length // 3  # context: not supervised
        labels = [IGNORE_INDEX] * prompt + ids[prompt:]
        out.append(Sample(input_ids=ids, labels=labels))
    if packed:  # two rows of two samples each, positions restarting at each sample
        out = [Sample(input_ids=a.input_ids + b.input_ids, labels=a.labels + b.labels, seq_lengths=[len(a.input_ids), len(b.input_ids)]) for a, b in (out[:2], out[2:])]
    return out


def loss_and_grads(model, batch: dict) -> tuple[float, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    loss_sum, count = loss.token_losses(model, batch, compute=None)
    (loss_sum / count).backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad}
    return float(loss_sum), grads


@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("method", ["lora", "full"])
def test_supervised_rows_loss_and_gradients_equal_the_full_logits_path(method, tied, packed, monkeypatch):
    import peft

    vocab = 300
    plain = tiny_llama(tied, vocab)
    if method == "lora":
        plain = peft.get_peft_model(plain, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj",
                                                                                             "down_proj"]))
        for name, p in plain.named_parameters():  # LoRA B starts at zero: give the adapter an effect to differentiate
            if "lora_B" in name:
                torch.nn.init.normal_(p, std=0.05)
    chunked = copy.deepcopy(plain)
    hf_model = chunked.get_base_model() if method == "lora" else chunked
    assert loss.install(hf_model, "chunked", "cpu") == "chunked"
    monkeypatch.setattr(loss, "CHUNK_ELEMENTS", 40 * vocab)  # several chunks (and a ragged last one)
    batch = loss.with_loss_index(collate(samples(vocab, packed), pad_token_id=0))
    batch.pop("num_tokens")

    reference_loss, reference_grads = loss_and_grads(plain, batch)
    chunked_loss, chunked_grads = loss_and_grads(chunked, batch)

    assert chunked_loss == pytest.approx(reference_loss, rel=1e-6)
    assert reference_grads.keys() == chunked_grads.keys() and reference_grads
    for name, grad in reference_grads.items():
        assert (chunked_grads[name] - grad).abs().max() <= 1e-5 * max(1.0, grad.abs().max()), name
    if method == "full":  # the head's own gradient (the embedding's too, when tied) went through the fused pass
        head = "model.embed_tokens.weight" if tied else "lm_head.weight"
        assert chunked_grads[head].abs().sum() > 0


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("method", ["lora", "full"])
def test_per_token_losses_weighted_per_row_equal_the_full_logits_path(method, tied, monkeypatch):
    """The per-position losses that DPO and KTO weigh per sequence (frozen head: gradients of the rows made in the
    forward; trainable head: through the module, each chunk recomputed): values and every trainable gradient of a
    weighted sum equal the full-logits path within 1e-5."""
    import peft

    vocab = 300
    plain = tiny_llama(tied, vocab)
    if method == "lora":
        plain = peft.get_peft_model(plain, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
        for name, p in plain.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(p, std=0.05)
    chunked = copy.deepcopy(plain)
    loss.install(chunked.get_base_model() if method == "lora" else chunked, "chunked", "cpu")
    monkeypatch.setattr(loss, "CHUNK_ELEMENTS", 40 * vocab)
    batch = loss.with_loss_index(collate(samples(vocab, packed=False), pad_token_id=0))
    batch.pop("num_tokens")
    weights = torch.rand(batch["loss_index"].numel(), generator=torch.Generator().manual_seed(3)) * 2 - 0.5

    def weighted(model, installed):
        model.zero_grad(set_to_none=True)
        losses = loss.supervised_token_losses(model, batch, compute=None, installed=installed)
        (losses * weights).sum().backward()
        return losses.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    expected, expected_grads = weighted(plain, installed=False)
    got, got_grads = weighted(chunked, installed=True)
    assert torch.allclose(got, expected, atol=1e-5)
    assert expected_grads.keys() == got_grads.keys() and expected_grads
    for name, grad in expected_grads.items():
        assert (got_grads[name] - grad).abs().max() <= 1e-5 * max(1.0, grad.abs().max()), name


@pytest.mark.parametrize("method", ["lora", "full"])
def test_per_token_losses_are_the_same_bits_with_and_without_gradients(method, monkeypatch):
    """DPO's reference is the same model without gradients (LoRA: its adapter disabled; a fresh adapter adds zero),
    so at the first step policy == reference only if both paths round alike: the per-position losses and the summed
    loss, computed with and without gradients, are equal bit for bit (several chunks)."""
    import peft

    vocab = 300
    model = tiny_llama(False, vocab)
    if method == "lora":
        model = peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    loss.install(model.get_base_model() if method == "lora" else model, "chunked", "cpu")
    monkeypatch.setattr(loss, "CHUNK_ELEMENTS", 40 * vocab)
    batch = loss.with_loss_index(collate(samples(vocab, packed=False), pad_token_id=0))
    batch.pop("num_tokens")
    with torch.no_grad():
        without = loss.supervised_token_losses(model, batch, compute=None, installed=True)
        without_sum, _ = loss.token_losses(model, batch, compute=None)
    with_grad = loss.supervised_token_losses(model, batch, compute=None, installed=True)
    with_grad_sum, _ = loss.token_losses(model, batch, compute=None)
    assert with_grad.requires_grad and with_grad_sum.requires_grad
    assert torch.equal(with_grad.detach(), without)
    assert torch.equal(with_grad_sum.detach(), without_sum)


def test_no_full_logits_tensor_exists_in_the_forward(monkeypatch):
    """The largest float tensor the chunked forward allocates is one chunk of logits, never [tokens, vocab]."""
    vocab = 5000
    model = tiny_llama(tied=False, vocab=vocab)
    loss.install(model, "chunked", "cpu")
    monkeypatch.setattr(loss, "CHUNK_ELEMENTS", 16 * vocab)
    batch = loss.with_loss_index(collate(samples(vocab, packed=False), pad_token_id=0))
    batch.pop("num_tokens")
    tokens = batch["input_ids"].numel()
    largest = 0
    real_linear = torch.nn.functional.linear

    def linear(x, weight, bias=None):
        nonlocal largest
        out = real_linear(x, weight, bias)
        if out.shape[-1] == vocab:
            largest = max(largest, out.numel())
        return out

    monkeypatch.setattr(torch.nn.functional, "linear", linear)
    loss_sum, _ = loss.token_losses(model, batch, compute=None)
    loss_sum.backward()
    assert 0 < largest <= 16 * vocab < tokens * vocab


def test_a_model_that_scales_its_logits_keeps_the_full_logits_path():
    config = Gemma2Config(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                          num_attention_heads=2, num_key_value_heads=1, head_dim=16, final_logit_softcapping=30.0)
    model = Gemma2ForCausalLM(config)
    assert loss.install(model, "auto", "cpu") == "full_logits"
    with pytest.raises(ConfigError, match="final_logit_softcapping"):
        loss.install(model, "chunked", "cpu")


def test_generation_still_gets_logits():
    model = tiny_llama(tied=False)
    loss.install(model, "chunked", "cpu")
    ids = torch.tensor([[5, 6, 7, 8]])
    assert model(input_ids=ids).logits.shape == (1, 4, 300)


def test_launch_refuses_a_forced_chunked_loss_on_a_soft_capped_model(tmp_path):
    from llmft.config.compose import compose
    from llmft.config.validation import check_loss_head

    (tmp_path / "config.json").write_text('{"model_type": "gemma2", "final_logit_softcapping": 30.0}')
    check_loss_head(compose([f"model.path={tmp_path}"]))  # auto: the full-logits path, no error
    with pytest.raises(ConfigError, match="train.loss_head=chunked cannot apply.*final_logit_softcapping=30.0"):
        check_loss_head(compose([f"model.path={tmp_path}", "train.loss_head=chunked"]))


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_packed_rows_forward_reads_nothing_back_from_the_device(attention, monkeypatch):
    """transformers asks the host whether rows are packed on every forward (a GPU sync); the loss's forward builds the
    block-diagonal mask on the device instead, and gives the same loss as the plain path."""
    plain = tiny_llama(tied=False)
    plain.config._attn_implementation = attention
    chunked = copy.deepcopy(plain)
    loss.install(chunked, "chunked", "cpu")
    batch = loss.with_loss_index(collate(samples(300, packed=True), pad_token_id=0))
    batch.pop("num_tokens")
    reference, _ = loss.token_losses(plain, batch, compute=None)
    reads = []
    for name in ("__bool__", "item", "__float__", "__int__", "tolist"):
        real = getattr(torch.Tensor, name)
        monkeypatch.setattr(torch.Tensor, name, lambda self, *a, _real=real, _name=name: reads.append(_name)
                            or _real(self, *a))
    loss_sum, _ = loss.token_losses(chunked, batch, compute=None)
    loss_sum.backward()
    monkeypatch.undo()
    assert reads == []
    assert float(loss_sum) == pytest.approx(float(reference), rel=1e-6)


def test_a_frozen_fp32_head_is_cast_once_under_bf16_autocast(monkeypatch):
    """QLoRA's head stays fp32 (PEFT upcasts it) while the rows are bf16: autocast casts a frozen weight again at each
    use, so each chunk cast the whole [vocab, hidden] head (twice with gradients). Cast once now, the same values."""
    from torch.utils._python_dispatch import TorchDispatchMode

    vocab, hidden, tokens = 300, 16, 40
    monkeypatch.setattr(loss, "CHUNK_ELEMENTS", 8 * vocab)  # 5 chunks
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(vocab, hidden, generator=generator)  # frozen, fp32
    rows = torch.randn(tokens, hidden, generator=generator).bfloat16().requires_grad_()
    targets = torch.randint(0, vocab, (tokens,), generator=generator)

    class HeadCasts(TorchDispatchMode):
        count = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is torch.ops.aten._to_copy.default and args[0].shape == weight.shape:
                HeadCasts.count += 1
            return func(*args, **(kwargs or {}))

    with torch.autocast("cpu", dtype=torch.bfloat16), HeadCasts():
        total = loss.linear_cross_entropy_sum(rows, weight, None, targets)
    total.backward()
    assert HeadCasts.count == 1
    with torch.autocast("cpu", dtype=torch.bfloat16):  # the plain computation: full logits, autocast's casts
        reference_rows = rows.detach().clone().requires_grad_()
        reference = torch.nn.functional.cross_entropy(
            torch.nn.functional.linear(reference_rows, weight).float(), targets, reduction="sum")
    reference.backward()
    assert torch.allclose(total, reference, rtol=1e-5)
    assert torch.allclose(rows.grad.float(), reference_rows.grad.float(), atol=1e-2)
