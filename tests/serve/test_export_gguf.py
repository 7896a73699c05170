"""format=gguf: a tiny run's merged model as one GGUF file. Read back with gguf.GGUFReader and compared with the merge
that stock PEFT makes (every tensor, the q/k permutation undone with transformers' own Meta-to-HF formula), the
metadata llama.cpp needs, the tokenizer and chat template; the permutation checked against RoPE itself; and, where
llama-cpp-python is installed, llama.cpp's next-token logits against transformers'."""

from __future__ import annotations

import json
import re

import gguf
import numpy as np
import pytest
import torch

from llmft.serve import gguf_export
from llmft.serve.export import main as export_main

PROMPT = [{"role": "user", "content": "My job is pending, why?"}]
BLOCK_NAMES = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
               "attn_output": "self_attn.o_proj", "attn_norm": "input_layernorm",
               "ffn_norm": "post_attention_layernorm", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
               "ffn_down": "mlp.down_proj"}


@pytest.fixture(scope="module")
def f16_export(gguf_tiny_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("gguf-out") / "f16"
    assert export_main([f"run={gguf_tiny_run}", "format=gguf", f"out={out}"]) == 0
    return out


def hf_name(gguf_name: str) -> str:
    """GGUF's Llama tensor names back to transformers' (written out here, independently of gguf's own map)."""
    fixed = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
    stem = gguf_name.removesuffix(".weight")
    if stem in fixed:
        return fixed[stem] + ".weight"
    block, kind = re.fullmatch(r"blk\.(\d+)\.(\w+)", stem).groups()
    return f"model.layers.{block}.{BLOCK_NAMES[kind]}.weight"


def meta_to_hf(weights: torch.Tensor, num_heads: int) -> torch.Tensor:
    """transformers' convert_llama_weights_to_hf `permute`: interleaved RoPE rows (Meta's, llama.cpp's) to HF's."""
    dim1, dim2 = weights.shape
    return weights.view(num_heads, dim1 // num_heads // 2, 2, dim2).transpose(1, 2).reshape(dim1, dim2)


def stored_tensors(path) -> dict[str, tuple[np.ndarray, object]]:
    reader = gguf.GGUFReader(str(path))
    return {t.name: (gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32), t.tensor_type)
            for t in reader.tensors}


def as_hf(name: str, values: np.ndarray, config) -> torch.Tensor:
    tensor = torch.from_numpy(np.ascontiguousarray(values))
    if name.endswith("attn_q.weight"):
        return meta_to_hf(tensor, config.num_attention_heads)
    if name.endswith("attn_k.weight"):
        return meta_to_hf(tensor, config.num_key_value_heads)
    return tensor


def test_the_gguf_file_reads_back_as_the_merged_model_with_its_tokenizer_and_chat_template(f16_export, stock_merge):
    merged, tokenizer = stock_merge
    config, expected = merged.config, merged.state_dict()
    path = f16_export / "model.gguf"
    stored = stored_tensors(path)
    assert {hf_name(name) for name in stored} == set(expected)  # every tensor, no tie: lm_head is its own
    for name, (values, tensor_type) in stored.items():
        want = expected[hf_name(name)].float()
        got = as_hf(name, values.reshape(want.shape), config)
        if want.ndim == 1:  # norms stay float32, as llama.cpp's converter keeps them
            assert tensor_type == gguf.GGMLQuantizationType.F32
            torch.testing.assert_close(got, want, rtol=0, atol=0)
        else:
            assert tensor_type == gguf.GGMLQuantizationType.F16
            torch.testing.assert_close(got, want.half().float(), rtol=0, atol=0)  # f16's own rounding, nothing else

    fields = gguf.GGUFReader(str(path)).fields
    value = {key: field.contents() for key, field in fields.items()}
    assert value["general.architecture"] == "llama"
    assert (value["llama.block_count"], value["llama.embedding_length"], value["llama.feed_forward_length"]) == \
        (config.num_hidden_layers, config.hidden_size, config.intermediate_size)
    assert (value["llama.attention.head_count"], value["llama.attention.head_count_kv"]) == \
        (config.num_attention_heads, config.num_key_value_heads) and config.num_key_value_heads < \
        config.num_attention_heads  # grouped-query attention: k is permuted with its own head count
    assert value["llama.context_length"] == config.max_position_embeddings
    assert value["llama.rope.dimension_count"] == config.head_dim
    assert value["llama.rope.freq_base"] == pytest.approx(config.rope_parameters["rope_theta"])
    assert value["llama.attention.layer_norm_rms_epsilon"] == pytest.approx(config.rms_norm_eps)
    assert value["tokenizer.chat_template"] == tokenizer.chat_template and "<|im_start|>" in tokenizer.chat_template
    assert value["tokenizer.ggml.model"] == "gpt2" and value["tokenizer.ggml.pre"] == "gpt-2"
    tokens = value["tokenizer.ggml.tokens"]
    assert len(tokens) == config.vocab_size
    assert all(tokens[i] == token for token, i in tokenizer.get_vocab().items())
    assert len(value["tokenizer.ggml.merges"]) > 100
    assert value["tokenizer.ggml.eos_token_id"] == tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert value["tokenizer.ggml.bos_token_id"] == tokenizer.bos_token_id
    assert value["tokenizer.ggml.padding_token_id"] == tokenizer.pad_token_id
    assert value["tokenizer.ggml.add_bos_token"] is False  # training tokenized rendered prompts without one
    types = value["tokenizer.ggml.token_type"]
    assert types[tokenizer.convert_tokens_to_ids("<|im_end|>")] == gguf.TokenType.CONTROL
    assert types[tokenizer.convert_tokens_to_ids("Ġjob")] == gguf.TokenType.NORMAL
    learned = set(tokenizer.get_vocab().values())
    assert all(types[i] == gguf.TokenType.UNUSED for i in range(config.vocab_size) if i not in learned)

    modelfile = (f16_export / "Modelfile").read_text()
    assert modelfile.startswith("FROM ./model.gguf\n")
    assert 'PARAMETER stop "<|im_end|>"' in modelfile
    assert 'TEMPLATE """{{ range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}' \
           '<|im_start|>assistant\n"""' in modelfile
    record = json.loads((f16_export / "llmft_export.json").read_text())
    assert record["kind"] == "gguf" and record["check"]["tensors"] == len(stored) == 3 + 9 * config.num_hidden_layers


@pytest.mark.parametrize("dtype, weight_type, bound", [
    ("q8_0", "Q8_0", lambda amax: amax / 254 + amax * 2.0 ** -11),
    ("bf16", "BF16", lambda amax: amax * 2.0 ** -8),
])
def test_q8_0_and_bf16_files_hold_the_weights_within_their_format(gguf_tiny_run, stock_merge, tmp_path, capsys,
                                                                   dtype, weight_type, bound):
    merged, _ = stock_merge
    out = tmp_path / dtype
    assert export_main([f"run={gguf_tiny_run}", "format=gguf", f"gguf.dtype={dtype}", f"out={out}"]) == 0
    assert f"GGUF ({dtype}" in capsys.readouterr().out
    expected = merged.state_dict()
    for name, (values, tensor_type) in stored_tensors(out / "model.gguf").items():
        want = expected[hf_name(name)].float()
        got = as_hf(name, values.reshape(want.shape), merged.config)
        assert tensor_type.name == ("F32" if want.ndim == 1 else weight_type)
        blocks = want.reshape(-1, 32) if want.ndim > 1 else want.reshape(1, -1)
        error = (got - want).abs().reshape(blocks.shape)
        assert (error <= bound(blocks.abs().amax(dim=1, keepdim=True)) + 1e-7).all(), name
        if want.ndim > 1:
            assert error.max() > 0  # really stored in the smaller format
    base_size = (gguf_tiny_run / "base_model" / "model.safetensors").stat().st_size
    assert (out / "model.gguf").stat().st_size < 0.6 * base_size


def test_the_q_k_permutation_turns_transformers_rope_into_llama_cpp_interleaved_rope():
    """llama.cpp's Llama kernels rotate dims (2i, 2i+1) of each head; transformers rotates (i, i + d/2). With the rows
    permuted, llama.cpp's rotation of x @ Wq' is transformers' rotation of x @ Wq, permuted the same way: the
    attention scores are equal."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    torch.manual_seed(0)
    num_heads, num_kv_heads, head_dim, hidden, positions = 4, 2, 8, 16, 5
    wq, wk = torch.randn(num_heads * head_dim, hidden), torch.randn(num_kv_heads * head_dim, hidden)
    x = torch.randn(positions, hidden)
    inv_freq = 1.0 / (10000 ** (torch.arange(0, head_dim, 2).float() / head_dim))
    angles = torch.outer(torch.arange(positions).float(), inv_freq)  # (positions, head_dim / 2)

    def heads(t, n):
        return t.view(positions, n, head_dim).transpose(0, 1)  # (heads, positions, head_dim)

    emb = torch.cat([angles, angles], dim=-1)
    q_hf, k_hf = apply_rotary_pos_emb(heads(x @ wq.T, num_heads)[None], heads(x @ wk.T, num_kv_heads)[None],
                                      emb.cos()[None], emb.sin()[None])
    scores_hf = q_hf[0] @ k_hf[0].repeat_interleave(num_heads // num_kv_heads, 0).transpose(1, 2)

    def interleaved_rope(t):  # ggml's rope, mode NORM: pairs of adjacent dims
        pairs = t.reshape(*t.shape[:-1], head_dim // 2, 2)
        cos, sin = angles.cos(), angles.sin()
        rotated = torch.stack([pairs[..., 0] * cos - pairs[..., 1] * sin, pairs[..., 0] * sin + pairs[..., 1] * cos],
                              dim=-1)
        return rotated.reshape(t.shape)

    wq_gguf = torch.from_numpy(gguf_export.permute(wq.numpy(), num_heads))
    wk_gguf = torch.from_numpy(gguf_export.permute(wk.numpy(), num_kv_heads))
    q_cpp, k_cpp = interleaved_rope(heads(x @ wq_gguf.T, num_heads)), interleaved_rope(heads(x @ wk_gguf.T,
                                                                                            num_kv_heads))
    scores_cpp = q_cpp @ k_cpp.repeat_interleave(num_heads // num_kv_heads, 0).transpose(1, 2)
    torch.testing.assert_close(scores_cpp, scores_hf, rtol=1e-5, atol=1e-4)
    k_unpermuted = interleaved_rope(heads(x @ wk.T, num_kv_heads)).repeat_interleave(2, 0)
    unpermuted = interleaved_rope(heads(x @ wq.T, num_heads)) @ k_unpermuted.transpose(1, 2)
    assert not torch.allclose(unpermuted, scores_hf, atol=1e-2)  # without the permutation llama.cpp would differ
    np.testing.assert_array_equal(gguf_export.unpermute(gguf_export.permute(wq.numpy(), num_heads), num_heads),
                                  wq.numpy())


def test_the_check_refuses_a_file_that_is_not_the_model(f16_export, stock_merge):
    merged, tokenizer = stock_merge
    stop_ids = [tokenizer.convert_tokens_to_ids("<|im_end|>")]
    gguf_export.check_gguf(f16_export / "model.gguf", merged, tokenizer, "f16", stop_ids)  # the right model passes
    with torch.no_grad():
        merged.model.layers[1].mlp.down_proj.weight[3, 5] += 0.05
    try:
        with pytest.raises(gguf_export.GGUFError, match=r"blk\.1\.ffn_down\.weight \(F16\) differs"):
            gguf_export.check_gguf(f16_export / "model.gguf", merged, tokenizer, "f16", stop_ids)
    finally:
        with torch.no_grad():
            merged.model.layers[1].mlp.down_proj.weight[3, 5] -= 0.05


def test_other_architectures_and_tokenizers_are_refused_in_one_sentence():
    from transformers import Qwen2Config

    with pytest.raises(gguf_export.GGUFError) as refused:
        gguf_export.check_architecture(Qwen2Config(architectures=["Qwen2ForCausalLM"]))
    assert "Qwen2ForCausalLM" in str(refused.value) and "LlamaForCausalLM" in str(refused.value)
    assert "convert_hf_to_gguf.py" in str(refused.value) and str(refused.value).count(". ") == 0

    assert gguf_export.bpe_pre_tokenizer({"pre_tokenizer": {"type": "ByteLevel", "use_regex": True}}) == "gpt-2"
    llama3 = {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": gguf_export.LLAMA3_SPLIT}, "behavior": "Isolated"},
        {"type": "ByteLevel", "add_prefix_space": False, "use_regex": False}]}
    assert gguf_export.bpe_pre_tokenizer({"pre_tokenizer": llama3}) == "llama-bpe"
    assert gguf_export.bpe_pre_tokenizer({"pre_tokenizer": {"type": "Metaspace", "replacement": "▁"}}) is None
    assert gguf_export.bpe_pre_tokenizer({"pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": True}}) is None


@pytest.mark.parametrize("arguments, message", [
    (["format=gguf", "gguf.dtype=q4_k"], "llmft: gguf.dtype=q4_k must be f16, bf16, q8_0 or f32."),
    (["format=onnx", "out=x"], "llmft: format=onnx must be hf (Hugging Face folders) or gguf"),
    (["format=gguf", "gguf.dtyp=f16", "out=x"], "llmft: bad argument gguf.dtyp:"),
])
def test_gguf_mistakes_are_one_line(gguf_tiny_run, arguments, message, capsys):
    assert export_main([f"run={gguf_tiny_run}", "out=unused", *arguments]) == 2
    err = capsys.readouterr().err
    assert err.startswith(message) and len(err.strip().splitlines()) == 1, err


def test_llama_cpp_loads_the_file_and_gives_transformers_next_token_logits(gguf_tiny_run, stock_merge, tmp_path):
    """Only where llama-cpp-python is installed (it builds llama.cpp from source; not a dev dependency)."""
    llama_cpp = pytest.importorskip("llama_cpp")
    merged, tokenizer = stock_merge
    out = tmp_path / "f32"
    assert export_main([f"run={gguf_tiny_run}", "format=gguf", "gguf.dtype=f32", f"out={out}"]) == 0
    text = tokenizer.apply_chat_template(PROMPT, tokenize=False, add_generation_prompt=True)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    llm = llama_cpp.Llama(model_path=str(out / "model.gguf"), n_ctx=256, n_threads=1, logits_all=True,
                          verbose=False)
    assert llm.tokenize(text.encode(), add_bos=False, special=True) == ids  # llama.cpp's BPE splits as the run's
    llm.eval(ids)
    got = np.asarray(llm.scores[len(ids) - 1], dtype=np.float32)
    with torch.no_grad():
        want = merged(input_ids=torch.tensor([ids])).logits[0, -1].numpy()
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-3 * np.abs(want).max())
    assert int(got.argmax()) == int(want.argmax())


def test_llama3_rope_scaling_becomes_llama_cpp_rope_freqs():
    """Llama 3.x: llama.cpp divides each frequency by `rope_freqs`; the factors equal llama.cpp's converter formula."""
    import math

    from transformers import LlamaConfig

    scaling = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    config = LlamaConfig(hidden_size=256, num_attention_heads=4, rope_parameters=scaling)
    factors = gguf_export.llama3_rope_factors(config)
    dim = 64
    low_wavelen, high_wavelen = 8192 / 1.0, 8192 / 4.0
    expected = []
    for freq in 1.0 / (500000.0 ** (np.arange(0, dim, 2) / dim)):
        wavelen = 2 * math.pi / freq
        if wavelen < high_wavelen:
            expected.append(1.0)
        elif wavelen > low_wavelen:
            expected.append(32.0)
        else:
            smooth = (8192 / wavelen - 1.0) / (4.0 - 1.0)
            expected.append(1 / ((1 - smooth) / 32.0 + smooth))
    np.testing.assert_allclose(factors, expected, rtol=1e-5)
    assert factors.min() == pytest.approx(1.0) and factors.max() == pytest.approx(32.0)
