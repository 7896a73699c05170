"""LoRA on the CPU (training/fused_lora.py): the fused layers compute what PEFT's lora.Linear computes with the same
dropout noise (outputs and gradients within a few ulps) and hand over to PEFT's forward wherever they would differ
(adapters disabled or merged, eval, autocast); the 16-bit dropout drops p of the elements and keeps the expectation."""

from __future__ import annotations

import copy

import pytest
import torch

from llmft.training.fused_lora import CpuDropout, install, keep_mask, keep_threshold

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def peft_llama(dropout: float):
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, attention_bias=True)
    model = get_peft_model(LlamaForCausalLM(config), LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout,
                                                                 target_modules=TARGETS))
    with torch.no_grad():  # lora_B starts at zero: give the adapters something to say
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.1)
    return model


def losses_and_gradients(model, ids):
    torch.manual_seed(5)  # the same dropout noise for both
    logits = model(input_ids=ids).logits
    logits.pow(2).mean().backward()
    return logits.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_fused_lora_gives_pefts_outputs_and_gradients(dropout):
    stock = peft_llama(dropout)
    assert install(stock, fuse_layers=False) == 0  # PEFT's layers with llmft's dropout modules
    fused = copy.deepcopy(stock)
    assert install(fused) == 2 * len(TARGETS)
    ids = torch.randint(0, 300, (2, 23))
    stock_logits, stock_grads = losses_and_gradients(stock.train(), ids)
    fused_logits, fused_grads = losses_and_gradients(fused.train(), ids)
    assert (fused_logits - stock_logits).abs().max() <= 1e-5 * stock_logits.abs().max()
    assert stock_grads.keys() == fused_grads.keys()
    for name, grad in stock_grads.items():
        assert grad.abs().max() > 0, name
        assert (fused_grads[name] - grad).abs().max() <= 1e-5 * grad.abs().max(), name


def test_fused_lora_keeps_pefts_forward_where_it_would_differ():
    stock = peft_llama(0.1)
    install(stock, fuse_layers=False)
    fused = copy.deepcopy(stock)
    install(fused)
    ids = torch.randint(0, 300, (1, 11))
    with torch.no_grad():
        stock_logits, fused_logits = stock.eval()(input_ids=ids).logits, fused.eval()(input_ids=ids).logits
        assert (fused_logits - stock_logits).abs().max() <= 1e-5 * stock_logits.abs().max()
        with stock.disable_adapter(), fused.disable_adapter():
            assert torch.equal(stock(input_ids=ids).logits, fused(input_ids=ids).logits)
        calls = []
        layer = next(m for m in fused.modules() if hasattr(m, "peft_forward"))
        original = layer.peft_forward
        layer.peft_forward = lambda *a, **k: calls.append(1) or original(*a, **k)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            fused(input_ids=ids)
        assert calls, "under autocast the fused forward must hand over to PEFT's"
        fused.merge_adapter()
        stock.merge_adapter()
        assert torch.allclose(stock(input_ids=ids).logits, fused(input_ids=ids).logits)


def test_cpu_dropout_drops_p_of_the_elements_and_keeps_the_expectation():
    threshold, dropped = keep_threshold(0.05)
    assert abs(dropped - 0.05) <= 2**-17
    torch.manual_seed(0)
    mask = keep_mask((1000, 999), 0.05, "cpu")  # an odd size: the last random word is used in part
    assert mask.shape == (1000, 999) and mask.dtype == torch.bool
    assert abs((1 - mask.float().mean()) - dropped) < 0.002
    dropout = CpuDropout(0.05).train()
    x = torch.ones(2000, 1000)
    torch.manual_seed(1)
    first = dropout(x)
    torch.manual_seed(1)
    assert torch.equal(first, dropout(x)), "the noise comes from torch's generator: seeded, reproducible"
    assert abs(first.mean().item() - 1) < 0.002
    assert set(first.unique().tolist()) == {0.0, torch.tensor(1 / (1 - dropped)).float().item()}
    assert torch.equal(dropout.eval()(x), x)
