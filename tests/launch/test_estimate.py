"""plan's estimates: parameter counts equal transformers' on the meta device; full fine-tuning model states
within 5% of DeepSpeed's estimators; LoRA counts only the adapter's gradients and optimizer states."""

from __future__ import annotations

import pytest

from llmft.config.compose import compose
from llmft.launch.estimate import Arch, arch_of, arch_parameter_counts, model_state_bytes

MODELS = ["llama7b", "llama3_8b", "llama3_2_1b", "mistral_7b", "qwen2_5_7b"]


@pytest.mark.parametrize("model", MODELS)
def test_parameter_counts_equal_transformers_on_the_meta_device(model):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    arch = arch_of(compose([f"model={model}", "model.path=/nowhere"]).model)
    model_type = "qwen2" if model == "qwen2_5_7b" else "mistral" if model == "mistral_7b" else "llama"
    config = AutoConfig.for_model(model_type, **{k: getattr(arch, k) for k in Arch.__dataclass_fields__
                                                 if k != "attention_bias"})
    with torch.device("meta"):
        reference = sum(p.numel() for p in AutoModelForCausalLM.from_config(config).parameters())
    assert arch_parameter_counts(arch, None, 0)[0] == reference


@pytest.mark.parametrize("gpus,nodes", [(8, 1), (4, 2), (8, 4)])
def test_full_fine_tuning_model_states_match_deepspeed_within_5_percent(gpus, nodes):
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    arch = arch_of(compose(["model=llama3_8b", "model.path=/nowhere"]).model)
    total, trainable, largest = arch_parameter_counts(arch, None, 0)
    world = gpus * nodes
    ours = {s: sum(model_state_bytes(total, trainable, largest, s, "full", world).values())
            for s in ("zero2", "zero3", "zero3_offload")}
    _, zero2 = estimate_zero2_model_states_mem_needs(total, gpus, nodes, cpu_offload=False)
    _, zero3, _ = estimate_zero3_model_states_mem_needs(total, largest, gpus, nodes, cpu_offload=False)
    _, zero3_offload, _ = estimate_zero3_model_states_mem_needs(total, largest, gpus, nodes, cpu_offload=True,
                                                                cpu_offload_params=False)
    assert ours["zero2"] == pytest.approx(zero2, rel=0.05)
    assert ours["zero3"] == pytest.approx(zero3, rel=0.05)
    assert ours["zero3_offload"] == pytest.approx(zero3_offload, rel=0.05)


def test_lora_counts_only_the_adapter_gradients_and_optimizer_states():
    arch = arch_of(compose(["model=llama7b", "model.path=/nowhere"]).model)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    total, trainable, largest = arch_parameter_counts(arch, targets, 16)
    assert trainable == 39_976_960  # PEFT's count for Llama-2-7B, r=16, all linear layers
    states = model_state_bytes(total, trainable, largest, "ddp", "lora", 8)
    assert states["gradients_and_optimizer"] == 16 * trainable
    assert states["weights"] == pytest.approx(2 * (total - trainable))
    full = sum(model_state_bytes(total, total, largest, "ddp", "full", 8).values())
    assert sum(states.values()) < full / 8


def test_the_plan_counts_one_chunk_of_logits_not_full_logits():
    from llmft.launch.estimate import LOSS_CHUNK_ELEMENTS, activation_bytes, arch_of
    from llmft.training.loss import CHUNK_ELEMENTS

    assert LOSS_CHUNK_ELEMENTS == CHUNK_ELEMENTS
    arch = arch_of(compose(["model=llama3_8b"]).model)
    chunked = activation_bytes(arch, 8, 4096, checkpointing=True)
    full = activation_bytes(arch, 8, 4096, checkpointing=True, full_logits=True)
    assert full - chunked > 8 * 4096 * arch.vocab_size * 9  # ~40 GB of logits no longer counted
    # the chunked loss's logits do not grow with the micro-batch (one chunk); full logits do
    assert activation_bytes(arch, 16, 4096, True, full_logits=True) - activation_bytes(arch, 16, 4096, True) \
        > 1.9 * (full - chunked)


def test_advice_names_a_micro_batch_that_fits_and_keeps_the_samples_per_step():
    from llmft.launch.estimate import advice, estimate, largest_micro_batch

    cfg = compose(["model=llama3_8b", "peft=lora", "parallelism=fsdp", "train.loss_head=full_logits",
                   "train.micro_batch_size=32", "train.grad_accum_steps=1"])
    too_big = estimate(cfg, 4, 80)
    assert not too_big.fits
    fitting = largest_micro_batch(cfg, 4, 80)
    assert 1 <= fitting < 32
    assert f"train.micro_batch_size={fitting} train.grad_accum_steps={-(-32 // fitting)}" in advice(cfg, too_big, 4)
    cfg.train.micro_batch_size = fitting
    assert estimate(cfg, 4, 80).fits
    cfg.train.loss_head = "auto"  # the chunked loss: a larger micro-batch fits than with full logits
    assert largest_micro_batch(cfg, 4, 80) > fitting


def test_qlora_counts_the_weights_peft_upcasts_to_fp32():
    """plan's QLoRA weights against what PEFT's prepare_model_for_kbit_training (which the QLoRA load calls) really
    leaves: Llama-3-8B built on meta in bf16, its layers' linear weights standing for bitsandbytes' Params4bit (the
    class name is what PEFT tests), then prepared: every other weight is upcast to fp32 (embeddings, head, norms:
    about 4.2 GB, where plan counted them at 0.56 bytes)."""
    import torch
    from peft import prepare_model_for_kbit_training
    from transformers import AutoConfig, AutoModelForCausalLM

    from llmft.launch.estimate import quantized_parameters

    class Params4bit(torch.nn.Parameter):  # (bitsandbytes' class, by name)
        pass

    cfg = compose(["model=llama3_8b", "peft=qlora", "parallelism=single", "model.path=/nowhere"])
    arch = arch_of(cfg.model)
    config = AutoConfig.for_model("llama", vocab_size=arch.vocab_size, hidden_size=arch.hidden_size,
                                  intermediate_size=arch.intermediate_size, num_hidden_layers=arch.num_hidden_layers,
                                  num_attention_heads=arch.num_attention_heads,
                                  num_key_value_heads=arch.num_key_value_heads, tie_word_embeddings=False)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    for layer in model.model.layers:
        for module in layer.modules():
            if isinstance(module, torch.nn.Linear):
                module.weight = Params4bit(module.weight.data, requires_grad=False)
    model.is_loaded_in_4bit = True
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    four_bit = sum(p.numel() for p in model.parameters() if type(p).__name__ == "Params4bit")
    peft_bytes = sum(0.5625 * p.numel() if type(p).__name__ == "Params4bit" else p.numel() * p.element_size()
                     for p in model.parameters())
    assert four_bit == quantized_parameters(arch)
    total, trainable, largest = arch_parameter_counts(arch, None, 16)
    ours = model_state_bytes(total, 0, largest, "single", "qlora", 1, quantized_parameters(arch))["weights"]
    assert ours == pytest.approx(peft_bytes, rel=1e-6)
    assert peft_bytes - 0.5625 * four_bit > 4.2e9  # the fp32 embeddings, head and norms
