"""A merged model as one GGUF file for llama.cpp and Ollama, written with `gguf` (llama.cpp's own Python package).

    write_gguf(model, tokenizer, path, "q8_0", ...)    tensors, hyper-parameters, tokenizer, chat template
    check_gguf(path, model, tokenizer, "q8_0")         read back with GGUFReader: every tensor and key, or GGUFError
    ollama_modelfile(tokenizer, stop_tokens, system)   the Modelfile written beside it

What llama.cpp's `convert_hf_to_gguf.py` does for `LlamaForCausalLM` (class LlamaModel), done here on the model in
memory instead of a folder on disk, so the export needs neither a clone of llama.cpp nor a second copy of the
weights: Hugging Face tensor names mapped with `gguf.get_tensor_name_map`; q_proj and k_proj rows permuted from the
rotate-half RoPE layout of transformers to the interleaved pairs llama.cpp's Llama kernels rotate (`permute`);
norms and other 1-D tensors kept in float32; the tokenizer written as a `gpt2` byte-level BPE (tokens, types,
merges, special ids) with `tokenizer.chat_template`. The converter itself is a 10,000-line script outside any
package, which is why its Llama path is repeated here rather than imported.

Only the Llama architecture (what llmft trains, model=tiny included) is written; another architecture is refused in
one sentence that says what to do instead.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from llmft.errors import UserError

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM",)
GGUF_FILE_NAME = "model.gguf"

# gguf.dtype -> (tensor type of 2-D weights, file type recorded in general.file_type), looked up lazily from gguf.
GGUF_DTYPES = ("f32", "f16", "bf16", "q8_0")

# The Llama 3 tokenizer's pre-tokenizer split (tokenizer.json), which llama.cpp calls `llama-bpe`.
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")


class GGUFError(UserError):
    """A model, tokenizer or file that cannot be (or was not) written as GGUF faithfully: one sentence."""


def _types(dtype: str):
    import gguf

    tensor_type, file_type = {
        "f32": (gguf.GGMLQuantizationType.F32, gguf.LlamaFileType.ALL_F32),
        "f16": (gguf.GGMLQuantizationType.F16, gguf.LlamaFileType.MOSTLY_F16),
        "bf16": (gguf.GGMLQuantizationType.BF16, gguf.LlamaFileType.MOSTLY_BF16),
        "q8_0": (gguf.GGMLQuantizationType.Q8_0, gguf.LlamaFileType.MOSTLY_Q8_0),
    }[dtype]
    return tensor_type, file_type


def check_architecture(config) -> None:
    architectures = list(getattr(config, "architectures", None) or [])
    if not architectures or architectures[0] not in SUPPORTED_ARCHITECTURES:
        name = architectures[0] if architectures else getattr(config, "model_type", "unknown")
        raise GGUFError(f"format=gguf writes the Llama architecture ({', '.join(SUPPORTED_ARCHITECTURES)}) only and "
                        f"this run's model is {name}: export it merged (merge=true) and convert that folder with "
                        f"llama.cpp's convert_hf_to_gguf.py.")


# ------------------------------------------------------------------------------------------------ the q/k layout


def permute(weights: np.ndarray, num_heads: int) -> np.ndarray:
    """Rows of q_proj / k_proj from transformers' rotate-half layout (each head's dims i and i + d/2 rotate
    together) to llama.cpp's interleaved one (dims 2i and 2i + 1): the converter's `LlamaModel.permute`."""
    return (weights.reshape(num_heads, 2, weights.shape[0] // num_heads // 2, *weights.shape[1:])
            .swapaxes(1, 2).reshape(weights.shape))


def unpermute(weights: np.ndarray, num_heads: int) -> np.ndarray:
    """The inverse of `permute`: GGUF rows back to the Hugging Face layout."""
    return (weights.reshape(num_heads, weights.shape[0] // num_heads // 2, 2, *weights.shape[1:])
            .swapaxes(1, 2).reshape(weights.shape))


# ------------------------------------------------------------------------------------------------ hyper-parameters


def rope_parameters(config) -> dict:
    """transformers 5 keeps rope_theta and scaling in `config.rope_parameters`; older configs in two attributes."""
    parameters = dict(getattr(config, "rope_parameters", None) or {})
    if not parameters:
        parameters = dict(getattr(config, "rope_scaling", None) or {})
        parameters.setdefault("rope_theta", getattr(config, "rope_theta", 10000.0))
    parameters.setdefault("rope_type", parameters.get("type", "default"))
    return parameters


def head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def llama3_rope_factors(config) -> np.ndarray:
    """The per-frequency divisors llama.cpp applies for Llama 3.x rope scaling (the `rope_freqs` tensor): the default
    inverse frequencies over the scaled ones that transformers itself computes."""
    import torch
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    dim = head_dim(config)
    base = rope_parameters(config)["rope_theta"]
    default = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](config, "cpu")
    return (default / scaled.double()).float().numpy()


def _add_hyperparameters(writer, config, file_type) -> dict[str, np.ndarray]:
    """The `llama.*` keys of convert_hf_to_gguf (TextModel.set_gguf_parameters + LlamaModel's); returns the extra
    tensors they need (rope_freqs for Llama 3 scaling)."""
    import gguf

    rope = rope_parameters(config)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads or config.num_attention_heads)
    writer.add_rope_freq_base(float(rope["rope_theta"]))
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    writer.add_key_length(head_dim(config))
    writer.add_value_length(head_dim(config))
    writer.add_rope_dimension_count(head_dim(config))
    writer.add_vocab_size(config.vocab_size)
    writer.add_file_type(file_type)
    extra: dict[str, np.ndarray] = {}
    if rope["rope_type"] == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(rope["factor"]))
    elif rope["rope_type"] == "llama3":
        extra[gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight"] = llama3_rope_factors(config)
    elif rope["rope_type"] != "default":
        raise GGUFError(f"format=gguf writes default, linear and llama3 rope scaling, not {rope['rope_type']!r}: "
                        f"export merged (merge=true) and convert that folder with llama.cpp's convert_hf_to_gguf.py.")
    if getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False):
        raise GGUFError("format=gguf writes Llama models without attention or MLP biases and this one has them: "
                        "export merged (merge=true) and convert that folder with llama.cpp's convert_hf_to_gguf.py.")
    return extra


# ------------------------------------------------------------------------------------------------ tokenizer


def bpe_pre_tokenizer(tokenizer_json: dict) -> str | None:
    """llama.cpp's name (`tokenizer.ggml.pre`) for this byte-level BPE's pre-tokenization, or None.

    The converter hashes the token ids of a probe text and looks the hash up among published tokenizers; a
    tokenizer that llmft trained per run (model=tiny) has ids no table knows, so the name is read from the
    structure of tokenizer.json instead: GPT-2's regex inside ByteLevel is `gpt-2`, the Llama 3 split is `llama-bpe`.
    """
    pre = tokenizer_json.get("pre_tokenizer") or {}
    if tokenizer_json.get("normalizer") is not None:
        return None
    if pre.get("type") == "ByteLevel" and pre.get("use_regex", True) and not pre.get("add_prefix_space", False):
        return "gpt-2"
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else []
    if (len(steps) == 2 and steps[0].get("type") == "Split" and steps[0].get("pattern", {}).get("Regex") == LLAMA3_SPLIT
            and steps[1].get("type") == "ByteLevel" and not steps[1].get("use_regex", True)):
        return "llama-bpe"
    return None


@dataclass
class Vocabulary:
    tokens: list[str]
    token_types: list[int]
    pre: str


def vocabulary(tokenizer, vocab_size: int) -> Vocabulary:
    """Tokens and their types as convert_hf_to_gguf's `get_vocab_base` lists them: every id below the model's
    vocab_size, ids the tokenizer lacks as unused `[PAD<id>]` (the tiny model's embedding has room for more tokens
    than its BPE learned), special added tokens as control tokens."""
    import gguf

    backend = getattr(tokenizer, "backend_tokenizer", None) or getattr(tokenizer, "_tokenizer", None)
    tokenizer_json = json.loads(backend.to_str()) if backend is not None else {}
    if (tokenizer_json.get("model") or {}).get("type") != "BPE":
        raise GGUFError("format=gguf writes byte-level BPE tokenizers (tokenizer.json with a BPE model) and this "
                        "run's tokenizer is not one: export merged (merge=true) and convert that folder with "
                        "llama.cpp's convert_hf_to_gguf.py.")
    pre = bpe_pre_tokenizer(tokenizer_json)
    if pre is None:
        raise GGUFError(f"the tokenizer's pre-tokenizer ({json.dumps(tokenizer_json.get('pre_tokenizer'))[:120]}) is "
                        f"neither GPT-2's nor Llama 3's, so llama.cpp would split text differently: export merged "
                        f"(merge=true) and convert that folder with llama.cpp's convert_hf_to_gguf.py.")
    vocab = tokenizer.get_vocab()
    if max(vocab.values()) >= vocab_size:
        raise GGUFError(f"the tokenizer has ids up to {max(vocab.values())} but the model's vocab_size is "
                        f"{vocab_size}: the embedding and the tokenizer do not belong together.")
    by_id = {token_id: token for token, token_id in vocab.items()}
    added = tokenizer.added_tokens_decoder
    tokens, types = [], []
    for token_id in range(vocab_size):
        if token_id not in by_id:
            tokens.append(f"[PAD{token_id}]")
            types.append(gguf.TokenType.UNUSED)
        elif token_id in added:
            tokens.append(by_id[token_id])
            types.append(gguf.TokenType.CONTROL if added[token_id].special else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(by_id[token_id])
            types.append(gguf.TokenType.NORMAL)
    return Vocabulary(tokens, [int(t) for t in types], pre)


def merges(tokenizer) -> list[str]:
    """BPE merges as `left right` lines, a space inside a part written as U+0120 + 256 the way gguf's SpecialVocab
    writes the list form of transformers >= 4.45."""
    backend = getattr(tokenizer, "backend_tokenizer", None) or getattr(tokenizer, "_tokenizer", None)
    raw = json.loads(backend.to_str())["model"].get("merges") or []
    if raw and isinstance(raw[0], str):
        return list(raw)
    return [" ".join("".join(chr(ord(c) + 256) if c == " " else c for c in part) for part in pair) for pair in raw]


def special_token_ids(tokenizer, stop_ids: list[int]) -> dict[str, int]:
    ids = {kind: getattr(tokenizer, f"{kind}_token_id", None) for kind in ("bos", "eos", "unk", "pad")}
    eos = ids["eos"]
    end_of_turn = next((i for i in stop_ids if i != eos), None)  # data.end_of_turn_token when it is not eos
    if end_of_turn is not None:
        ids["eot"] = end_of_turn
    return {kind: int(i) for kind, i in ids.items() if i is not None}


def adds_special_tokens(tokenizer) -> dict[str, bool]:
    """Whether the tokenizer itself puts bos / eos around a text (training renders prompts with the chat template
    and tokenizes them without special tokens; llama.cpp adds them when these keys say so)."""
    ids = tokenizer("a")["input_ids"]
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    return {"bos": len(ids) > len(plain) and ids[0] == tokenizer.bos_token_id,
            "eos": len(ids) > len(plain) and ids[-1] == tokenizer.eos_token_id}


def _add_tokenizer(writer, tokenizer, vocab_size: int, stop_ids: list[int]) -> None:
    words = vocabulary(tokenizer, vocab_size)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(words.pre)
    writer.add_token_list(words.tokens)
    writer.add_token_types(words.token_types)
    writer.add_token_merges(merges(tokenizer))
    for kind, token_id in special_token_ids(tokenizer, stop_ids).items():
        getattr(writer, f"add_{kind}_token_id")(token_id)
    adds = adds_special_tokens(tokenizer)
    writer.add_add_bos_token(adds["bos"])
    writer.add_add_eos_token(adds["eos"])
    if not tokenizer.chat_template:
        raise GGUFError("the run's tokenizer has no chat template: was it written by llmft?")
    writer.add_chat_template(tokenizer.chat_template)


# ------------------------------------------------------------------------------------------------ tensors


def gguf_tensors(model) -> dict[str, np.ndarray]:
    """The model's weights under their GGUF names, float32, q/k permuted for llama.cpp (tied lm_head omitted:
    llama.cpp reads the token embedding when `output.weight` is absent)."""
    import gguf
    import torch

    config = model.config
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)
    num_kv_heads = config.num_key_value_heads or config.num_attention_heads
    tensors: dict[str, np.ndarray] = {}
    for name, tensor in model.state_dict().items():
        if name.endswith("rotary_emb.inv_freq") or (name == "lm_head.weight" and config.tie_word_embeddings):
            continue
        gguf_name = names.get_name(name, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise GGUFError(f"the model has a tensor {name} that the Llama layout of GGUF has no place for: export "
                            f"merged (merge=true) and convert that folder with llama.cpp's convert_hf_to_gguf.py.")
        data = tensor.detach().to(torch.float32).cpu().numpy()
        if name.endswith("q_proj.weight"):
            data = permute(data, config.num_attention_heads)
        elif name.endswith("k_proj.weight"):
            data = permute(data, num_kv_heads)
        tensors[gguf_name] = data
    return tensors


def tensor_type_for(name: str, data: np.ndarray, dtype: str):
    """As the converter: 1-D tensors and norms stay float32; a row that q8_0's 32-value blocks do not divide falls
    back to f16."""
    import gguf

    tensor_type, _ = _types(dtype)
    if data.ndim <= 1 or name.endswith("_norm.weight"):
        return gguf.GGMLQuantizationType.F32
    if tensor_type == gguf.GGMLQuantizationType.Q8_0 and data.shape[-1] % gguf.GGML_QUANT_SIZES[tensor_type][0]:
        return gguf.GGMLQuantizationType.F16
    return tensor_type


def write_gguf(model, tokenizer, path: Path, dtype: str, stop_ids: list[int], name: str) -> dict[str, str]:
    """Write `model` (merged, Llama) and `tokenizer` as one GGUF file; returns each tensor's GGUF type."""
    import gguf

    config = model.config
    check_architecture(config)
    _, file_type = _types(dtype)
    writer = gguf.GGUFWriter(str(path), gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA])
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(name)
    extra = _add_hyperparameters(writer, config, file_type)
    _add_tokenizer(writer, tokenizer, config.vocab_size, stop_ids)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    types = {}
    for tensor_name, data in {**extra, **gguf_tensors(model)}.items():
        tensor_type = tensor_type_for(tensor_name, data, dtype)
        writer.add_tensor(tensor_name, gguf.quants.quantize(data, tensor_type), raw_dtype=tensor_type)
        types[tensor_name] = tensor_type.name
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return types


# ------------------------------------------------------------------------------------------------ the check


def tensor_tolerance(expected: np.ndarray, tensor_type) -> np.ndarray:
    """How far a stored value may be from the float32 one, per element, from the format alone: f16 and bf16
    round to 11 and 8 significant bits; q8_0 stores blocks of 32 as int8 times an f16 scale (max|block| / 127), so
    a value is off by at most half a step plus 127 times the scale's own rounding."""
    import gguf

    magnitude = np.abs(expected)
    if tensor_type == gguf.GGMLQuantizationType.F32:
        return np.zeros_like(expected)
    if tensor_type == gguf.GGMLQuantizationType.F16:
        return magnitude * 2.0 ** -11 + 2.0 ** -25  # + half of f16's smallest subnormal
    if tensor_type == gguf.GGMLQuantizationType.BF16:
        return magnitude * 2.0 ** -8
    if tensor_type == gguf.GGMLQuantizationType.Q8_0:
        blocks = np.abs(expected.reshape(-1, 32)).max(axis=1, keepdims=True)
        return np.broadcast_to(blocks * (1 / 254 + 127 * 2.0 ** -11 / 127) + 2.0 ** -24, (blocks.shape[0], 32)
                               ).reshape(expected.shape)
    raise GGUFError(f"no tolerance known for GGUF tensor type {tensor_type.name}")


def read_metadata(reader) -> dict:
    """The GGUF key-value pairs as Python values (token lists as lists)."""
    values = {}
    for key, field in reader.fields.items():
        if key.startswith("GGUF."):
            continue
        values[key] = field.contents()
    return values


SPECIAL_ID_KEYS = {"bos": "tokenizer.ggml.bos_token_id", "eos": "tokenizer.ggml.eos_token_id",
                   "unk": "tokenizer.ggml.unknown_token_id", "pad": "tokenizer.ggml.padding_token_id",
                   "eot": "tokenizer.ggml.eot_token_id"}  # gguf.Keys.Tokenizer.*_ID


def check_gguf(path: Path, model, tokenizer, dtype: str, stop_ids: list[int], shown_as: Path | None = None) -> dict:
    """Read the file back with gguf.GGUFReader and compare it with `model` and `tokenizer`: the same tensors (q/k
    permutation undone, within the dtype's precision) and every key llama.cpp needs. GGUFError otherwise; returns
    what was checked."""
    import gguf

    config = model.config
    reader = gguf.GGUFReader(str(path))
    metadata = read_metadata(reader)
    arch = "llama"
    rope = rope_parameters(config)
    expected_keys = {
        "general.architecture": arch,
        f"{arch}.context_length": config.max_position_embeddings,
        f"{arch}.embedding_length": config.hidden_size,
        f"{arch}.block_count": config.num_hidden_layers,
        f"{arch}.feed_forward_length": config.intermediate_size,
        f"{arch}.attention.head_count": config.num_attention_heads,
        f"{arch}.attention.head_count_kv": config.num_key_value_heads or config.num_attention_heads,
        f"{arch}.rope.dimension_count": head_dim(config),
        f"{arch}.rope.freq_base": float(rope["rope_theta"]),
        f"{arch}.attention.layer_norm_rms_epsilon": float(config.rms_norm_eps),
        f"{arch}.vocab_size": config.vocab_size,
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.chat_template": tokenizer.chat_template,
        **{SPECIAL_ID_KEYS[kind]: token_id for kind, token_id in special_token_ids(tokenizer, stop_ids).items()},
    }
    problems = []
    for key, value in expected_keys.items():
        got = metadata.get(key)
        same = np.isclose(got, value, rtol=1e-6) if isinstance(value, float) and got is not None else got == value
        if not same:
            problems.append(f"{key} is {str(got)[:60]!r}, not {str(value)[:60]!r}")
    tokens = metadata.get("tokenizer.ggml.tokens") or []
    vocab = tokenizer.get_vocab()
    if len(tokens) != config.vocab_size or any(tokens[i] != token for token, i in vocab.items()):
        problems.append(f"tokenizer.ggml.tokens has {len(tokens)} tokens, not the tokenizer's {len(vocab)} at their "
                        f"ids padded to {config.vocab_size}")
    if len(metadata.get("tokenizer.ggml.merges") or []) != len(merges(tokenizer)):
        problems.append("tokenizer.ggml.merges differs from the tokenizer's merges")

    expected = gguf_tensors(model)
    if rope["rope_type"] == "llama3":
        expected[gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight"] = llama3_rope_factors(config)
    stored = {tensor.name: tensor for tensor in reader.tensors}
    if set(stored) != set(expected):
        problems.append(f"tensors missing: {sorted(set(expected) - set(stored))[:5]}, unexpected: "
                        f"{sorted(set(stored) - set(expected))[:5]}")
    num_kv_heads = config.num_key_value_heads or config.num_attention_heads
    worst = {"tensor": None, "max_abs_diff": 0.0, "ratio_to_tolerance": 0.0}
    for name in sorted(set(stored) & set(expected)):
        tensor = stored[name]
        values = gguf.quants.dequantize(tensor.data, tensor.tensor_type).astype(np.float32)
        want = expected[name]
        if values.size != want.size:
            problems.append(f"{name} has {values.size} values, not {want.size}")
            continue
        values = values.reshape(want.shape)
        if tensor.tensor_type != tensor_type_for(name, want, dtype):
            problems.append(f"{name} is stored as {tensor.tensor_type.name}, not gguf.dtype={dtype}'s "
                            f"{tensor_type_for(name, want, dtype).name}")
        if name.endswith("attn_q.weight"):  # compare in the Hugging Face layout: undo the permutation
            values, want = unpermute(values, config.num_attention_heads), unpermute(want, config.num_attention_heads)
        elif name.endswith("attn_k.weight"):
            values, want = unpermute(values, num_kv_heads), unpermute(want, num_kv_heads)
        difference = np.abs(values - want)
        tolerance = tensor_tolerance(want, tensor.tensor_type)
        if (difference > tolerance).any():
            problems.append(f"{name} ({tensor.tensor_type.name}) differs from the model's by up to "
                            f"{difference.max():.3g}, beyond its format's rounding")
        ratio = float((difference / np.maximum(tolerance, 1e-30)).max()) if tolerance.any() else 0.0
        if difference.max() >= worst["max_abs_diff"]:
            worst = {"tensor": name, "max_abs_diff": float(difference.max()), "ratio_to_tolerance": ratio}
    if problems:
        raise GGUFError(f"{shown_as or path} does not read back as the merged model (nothing was kept): "
                        f"{'; '.join(problems[:3])}"
                        f"{f' (and {len(problems) - 3} more)' if len(problems) > 3 else ''}.")
    return {"tensors": len(stored), "keys": len(metadata), "worst_tensor": worst}


# ------------------------------------------------------------------------------------------------ Ollama


# The chat layouts llmft trains with (llmft.data.tokenize.tokenizer), each as Ollama's Go template. A Jinja template is only
# translated when rendering it gives exactly this layout on probe conversations (checked in `ollama_template`).
OLLAMA_LAYOUTS = {
    "chatml": ("{{ range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}"
               "<|im_start|>assistant\n"),
    "markdown": ("{{ range .Messages }}### {{ .Role }}\n{{ .Content }}{{ if eq .Role \"assistant\" }}<EOS>{{ end }}"
                 "\n\n{{ end }}### assistant\n"),
}


def _layout_text(layout: str, messages: list[dict[str, str]], eos: str) -> str:
    """What OLLAMA_LAYOUTS[layout] renders for `messages` (the reference the Jinja template is compared with)."""
    if layout == "chatml":
        return "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages) + \
            "<|im_start|>assistant\n"
    return "".join(f"### {m['role']}\n{m['content']}{eos if m['role'] == 'assistant' else ''}\n\n"
                   for m in messages) + "### assistant\n"


def ollama_template(tokenizer, probes: list[list[dict[str, str]]]) -> str | None:
    """The chat template as an Ollama TEMPLATE, or None when it is not a layout known here (Ollama then picks a
    template from the GGUF's tokenizer.chat_template by itself)."""
    for layout, template in OLLAMA_LAYOUTS.items():
        try:
            same = all(tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
                       == _layout_text(layout, messages, tokenizer.eos_token or "") for messages in probes)
        except Exception:  # a template that raises on these messages (strict role order...) is not this layout
            same = False
        if same:
            return template.replace("<EOS>", tokenizer.eos_token or "")
    return None


def _quoted(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def ollama_modelfile(tokenizer, stop_tokens: list[str], system_prompt: str | None,
                     probes: list[list[dict[str, str]]]) -> str:
    """An Ollama Modelfile for `model.gguf` beside it: the template (when translatable), the stop tokens, and the
    run's system prompt (training put it first in every conversation)."""
    lines = [f"FROM ./{GGUF_FILE_NAME}", ""]
    template = ollama_template(tokenizer, probes)
    if template is None:
        lines += ["# The chat template is not one llmft translates; Ollama reads tokenizer.chat_template from the "
                  "file.", ""]
    else:
        lines += [f'TEMPLATE """{template}"""', ""]
    if system_prompt:
        lines += [f'SYSTEM """{system_prompt}"""', ""]
    lines += [f"PARAMETER stop {_quoted(token)}" for token in dict.fromkeys(stop_tokens)]
    return "\n".join(lines) + "\n"


def token_texts(tokenizer, ids: list[int]) -> list[str]:
    return [tokenizer.convert_ids_to_tokens(i) for i in ids]


def safe_model_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-") or "model"
