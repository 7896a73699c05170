"""format=gguf read back by a second implementation of llama.cpp's layout: transformers' own GGUF loader
(`from_pretrained(folder, gguf_file=...)`, which maps the names, undoes the q/k permutation and rebuilds the config and
the tokenizer from the metadata by itself), where test_export_gguf.py reads the file with our own code.

What transformers reads is the merged model with its 2-D weights rounded to the file's format, bit for bit (f16:
torch's own rounding; q8_0: ggml's reference `quantize_row_q8_0`, written here in torch), so its logits are that
rounded model's, and they differ from the merged model's by the format's rounding alone. The bounds, as a share of
the merged model's largest logit on the export's probe conversations:

- f16 keeps 11 significant bits: each weight moves by at most 2^-11 of itself, and these errors, independent from
  weight to weight, partly cancel in every sum, so depth adds little: measured 2.6 x 2^-11 (tiny, 2 layers) and
  2.3 x 2^-11 (SmolLM2-135M, 30 layers). Bound: 6 x 2^-11 (0.3%), over twice what was measured.
- q8_0 stores blocks of 32 weights as int8 times one f16 scale (max|block| / 127): its rms weight error is 26 times
  f16's on both models, and to first order the logits move in proportion (measured 73 x 2^-11, 28 times f16's).
  Bound: 26 times f16's (7.6%).

Both are far below what the adapters move (tiny: 737 x 2^-11; SmolLM2 after 3 steps: 335 x 2^-11), so the unmerged
base fails them, and so does a file whose q/k rows were not permuted for llama.cpp (2076 x 2^-11), which our own
reader, undoing a permutation that was never done, passes."""

from __future__ import annotations

import copy

import gguf
import pytest
import torch

from llmft.serve import gguf_export
from llmft.serve.export import PROBE_CONVERSATIONS
from llmft.serve.export import main as export_main
from support.models_get import converted, real_model_run  # noqa: F401 (fixtures)

F16_BOUND = 6 * 2.0 ** -11
BOUNDS = {"f16": F16_BOUND, "q8_0": 26 * F16_BOUND}  # x the merged model's largest logit (see above)
DEFAULT_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"  # SmolLM2's template's


def q8_0(weights: torch.Tensor) -> torch.Tensor:
    """ggml's quantize_row_q8_0_ref then dequantize: per block of 32, d = max|x| / 127, q = roundf(x * (1 / d))
    (halves away from zero), stored q * f16(d)."""
    blocks = weights.reshape(-1, 32)
    scale = blocks.abs().amax(dim=1, keepdim=True) / 127
    scaled = blocks * torch.where(scale > 0, 1 / scale, torch.zeros_like(scale))
    magnitude = scaled.abs()
    steps = torch.sign(scaled) * (magnitude.floor() + (2 * (magnitude - magnitude.floor())).floor())  # ggml's roundf
    return (steps * scale.half().float()).reshape(weights.shape)


def rounded(model, dtype: str):
    """`model` with its 2-D weights as the file stores them (norms stay float32; q8_0 rows that 32 does not divide
    are f16), rounded here without gguf."""
    copied = copy.deepcopy(model)
    with torch.no_grad():
        for parameter in copied.parameters():
            if parameter.ndim == 2:
                as_q8_0 = dtype == "q8_0" and parameter.shape[-1] % 32 == 0
                parameter.copy_(q8_0(parameter) if as_q8_0 else parameter.half().float())
    return copied


def read_by_transformers(folder):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf_export.GGUF_FILE_NAME).eval()
    return model, AutoTokenizer.from_pretrained(folder, gguf_file=gguf_export.GGUF_FILE_NAME)


def probe_ids(tokenizer) -> list[torch.Tensor]:
    return [tokenizer(tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True),
                      add_special_tokens=False, return_tensors="pt")["input_ids"] for messages in PROBE_CONVERSATIONS]


def logits(model, probes) -> list[torch.Tensor]:
    with torch.no_grad():
        return [model(input_ids=ids).logits[0] for ids in probes]


def max_diff(got: list[torch.Tensor], want: list[torch.Tensor]) -> float:
    return max(float((g - w).abs().max()) for g, w in zip(got, want))


def assert_logits_within(got, want, dtype: str) -> float:
    """The read model's logits against the merged model's: within the format's bound; returns the difference as a
    share of the largest logit."""
    scale = max(float(w.abs().max()) for w in want)
    share = max_diff(got, want) / scale
    assert share <= BOUNDS[dtype], f"{dtype}: logits differ by {share * 2**11:.1f} x 2^-11 of the largest logit"
    return share


def assert_reads_as(read, merged, tokenizer, dtype: str) -> tuple[list[torch.Tensor], float]:
    """The model transformers read is `merged` rounded to `dtype`: its config, its weights bit for bit, its logits;
    returns its logits on the probe conversations and their largest difference to `merged`'s (a share of the
    largest logit)."""
    config, expected = read.config, merged.config
    for key in ("num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads",
                "head_dim", "vocab_size", "max_position_embeddings", "tie_word_embeddings"):
        assert getattr(config, key) == getattr(expected, key), key
    # GGUF stores these as float32 (1e-6 reads back as 9.99999997e-07)
    assert config.rms_norm_eps == pytest.approx(expected.rms_norm_eps, rel=1e-7)
    assert config.rope_parameters["rope_theta"] == pytest.approx(expected.rope_parameters["rope_theta"], rel=1e-7)
    reference = rounded(merged, dtype)
    weights, want = read.state_dict(), reference.state_dict()
    assert set(weights) == set(want)
    for name, tensor in want.items():
        assert weights[name].dtype == torch.float32 and torch.equal(weights[name], tensor), name
    probes = probe_ids(tokenizer)
    got = logits(read, probes)
    torch.testing.assert_close(got, logits(reference, probes), rtol=0, atol=1e-5)  # same weights: float32 noise
    return got, assert_logits_within(got, logits(merged, probes), dtype)


def assert_same_tokenizer(read_tokenizer, tokenizer, path) -> None:
    """transformers' tokenizer from the file: the folder's chat template (as stored in tokenizer.chat_template), its
    special tokens, its tokens at their ids, and the same ids for the rendered conversations."""
    stored = gguf.GGUFReader(str(path)).fields["tokenizer.chat_template"].contents()
    assert stored == read_tokenizer.chat_template == tokenizer.chat_template
    for kind in ("bos_token", "eos_token", "pad_token", "unk_token"):
        assert getattr(read_tokenizer, kind) == getattr(tokenizer, kind), kind
    read_vocab = read_tokenizer.get_vocab()
    assert all(read_vocab[token] == token_id for token, token_id in tokenizer.get_vocab().items())
    for messages in PROBE_CONVERSATIONS:
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        assert read_tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == text
        for special in (False, True):
            assert read_tokenizer(text, add_special_tokens=special)["input_ids"] == \
                tokenizer(text, add_special_tokens=special)["input_ids"]


@pytest.mark.parametrize("dtype", ["f16", "q8_0"])
def test_transformers_reads_the_gguf_as_the_merged_model_rounded_to_its_format(gguf_tiny_run, stock_merge, tmp_path,
                                                                                dtype):
    merged, tokenizer = stock_merge
    out = tmp_path / dtype
    assert export_main([f"run={gguf_tiny_run}", "format=gguf", f"gguf.dtype={dtype}", f"out={out}"]) == 0
    read, read_tokenizer = read_by_transformers(out)
    _, share = assert_reads_as(read, merged, tokenizer, dtype)
    print(f"{dtype}: the logits differ from the merged model's by {share * 2**11:.2f} x 2^-11 of the largest")
    assert share > 0  # really rounded
    assert_same_tokenizer(read_tokenizer, tokenizer, out / gguf_export.GGUF_FILE_NAME)


def test_the_unmerged_base_and_unpermuted_q_k_rows_are_beyond_the_bound(gguf_tiny_run, stock_merge, tmp_path,
                                                                        monkeypatch):
    from transformers import AutoModelForCausalLM

    merged, tokenizer = stock_merge
    probes = probe_ids(tokenizer)
    out = tmp_path / "f16"
    assert export_main([f"run={gguf_tiny_run}", "format=gguf", f"out={out}"]) == 0
    read, _ = read_by_transformers(out)
    base = AutoModelForCausalLM.from_pretrained(gguf_tiny_run / "base_model", dtype=torch.float32).eval()
    with pytest.raises(AssertionError, match="f16: logits differ by") as beyond:
        assert_logits_within(logits(read, probes), logits(base, probes), "f16")
    print(f"the unmerged base: {beyond.value}")

    # a layout bug our own reader cannot see: without the permutation, it undoes one that was never done
    monkeypatch.setattr(gguf_export, "permute", lambda weights, num_heads: weights)
    assert export_main([f"run={gguf_tiny_run}", "format=gguf", f"out={tmp_path / 'unpermuted'}"]) == 0
    unpermuted, _ = read_by_transformers(tmp_path / "unpermuted")
    with pytest.raises(AssertionError, match="f16: logits differ by") as beyond:
        assert_logits_within(logits(unpermuted, probes), logits(merged, probes), "f16")
    print(f"q/k rows not permuted: {beyond.value}")


@pytest.mark.slow
def test_smollm2_tuned_exported_f16_reads_back_in_transformers_as_the_merged_model(converted,  # noqa: F811
                                                                                   real_model_run):  # noqa: F811
    """The real model: the README's few LoRA steps on SmolLM2-135M-Instruct (support.models_get.RealModelRun, on the
    folder `python -m llmft.models get` makes), exported f16, read by transformers: the merged model's logits within
    f16's bound, its chat template (the default system prompt included), tied embeddings; the unmerged base is beyond
    the bound."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, _, _ = converted
    results = real_model_run.finished()
    assert results["launch"].returncode == 0, results["launch"].stderr[-3000:]
    export, run_dir, out = results["export"], real_model_run.run_dir, real_model_run.work / "gguf"
    assert export.returncode == 0 and "GGUF (f16" in export.stdout, export.stderr[-3000:]

    tokenizer = AutoTokenizer.from_pretrained(run_dir / "final")
    assert tokenizer.chat_template == AutoTokenizer.from_pretrained(folder).chat_template
    probes = probe_ids(tokenizer)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    base_logits = logits(model, probes)
    merged = PeftModel.from_pretrained(model, run_dir / "final").merge_and_unload().eval()
    read, read_tokenizer = read_by_transformers(out)
    assert read.config.tie_word_embeddings and read.lm_head.weight is read.model.embed_tokens.weight
    got, share = assert_reads_as(read, merged, tokenizer, "f16")
    print(f"smollm2 f16: the logits differ from the merged model's by {share * 2**11:.2f} x 2^-11 of the largest")
    with pytest.raises(AssertionError, match="f16: logits differ by") as beyond:
        assert_logits_within(got, base_logits, "f16")
    print(f"the unmerged base: {beyond.value}")
    assert_same_tokenizer(read_tokenizer, tokenizer, out / gguf_export.GGUF_FILE_NAME)
    rendered = read_tokenizer.apply_chat_template(PROBE_CONVERSATIONS[0], tokenize=False, add_generation_prompt=True)
    assert rendered.startswith(f"<|im_start|>system\n{DEFAULT_SYSTEM}<|im_end|>\n")
