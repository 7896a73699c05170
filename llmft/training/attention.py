"""Which attention kernel a run uses, and how packed rows tell it where each sample starts.

`model.attn_implementation=auto` (the default) chooses per device, once per rank, before the model is built:

| device | chosen | packed rows reach the kernel as |
|---|---|---|
| CUDA, flash-attention installed, bf16/fp16 compute | `flash_attention_2` (`_3` on Hopper with FA3) | rows laid end to end, `cu_seq_lens` and `max_length` made on the host by `collate` |
| CUDA otherwise, packed rows | `flex_attention` | a `BlockMask` built on the device from the position ids |
| CUDA otherwise, padded rows (DPO, KTO, `data.packing=false`) | `sdpa` | (a padding mask: SDPA's efficient kernel) |
| CPU, packed rows | `llmft_sdpa_varlen` (ours, below) | rows laid end to end with `cu_seq_lens`, as for flash-attention |
| CPU, padded rows, or `train.compile` | `sdpa` | (a padding mask), a dense block-diagonal boolean mask |
| BLOOM (any device) | `eager` | a dense additive mask |

Why not SDPA on a GPU: a dense [rows, 1, T, T] mask rules out SDPA's flash kernel, and with it the memory-efficient
path's speed; the two boundary forms above are what the fast kernels understand, and neither reads anything back from
the device per forward (transformers would infer the boundaries from the positions, a host sync per layer for
flash-attention). On the CPU a dense block-diagonal mask costs the whole row's T^2 (SDPA's CPU kernel skips no masked
block, and a mask rules out its causal shortcut): `llmft_sdpa_varlen` calls SDPA on each sample, causal, which costs
the sum of the samples' squares, halved (SmolLM2-135M, rows of 512 holding 2-3 conversations: 514 ms of a 3.4 s step
in attention before). It is the flash contract in plain torch, so the same `collate` output serves both; a sliding
window shorter than a sample gets its band mask there. The dense mask remains for `model.attn_implementation=sdpa`.
Flex attention is compiled for each row length: packed rows all have `model.max_seq_len`, padded rows vary, hence
SDPA for those.
An implementation asked for by name is used as asked (packed rows then take the form of the table's row for it).
"""

from __future__ import annotations

import importlib.util

from llmft.config.families import EAGER_ATTENTION_ONLY
from llmft.errors import ConfigError

FLASH_PACKAGES = {"flash_attention_2": "flash_attn", "flash_attention_3": "flash_attn_interface"}
CPU_VARLEN = "llmft_sdpa_varlen"  # registered with transformers' AttentionInterface by `register_cpu_varlen`


def choose(requested: str, family, device_type: str, half_precision: bool, packed: bool, model_class=None,
           capability: tuple[int, int] | None = None, installed=importlib.util.find_spec,
           compiled: bool = False) -> str:
    """The attention implementation for this rank: `requested` unless it is `auto` (see the module's table).

    `model_class`: the transformers class, whose `_supports_flash_attn` / `_supports_flex_attn` say what it can run
    (None: assumed to support both). `capability`: the GPU's compute capability (Hopper is 9.x). `compiled`:
    train.compile, under which a CPU keeps SDPA's dense mask (compiled once; the per-sample loop would recompile
    for every new set of sample lengths)."""
    if requested != "auto":
        if requested == CPU_VARLEN:
            if device_type != "cpu":  # it reads the samples' offsets on the host in every layer: a sync on a GPU
                raise ConfigError(f"model.attn_implementation={CPU_VARLEN} is llmft's kernel for CPUs: on a GPU use "
                                  "model.attn_implementation=auto (flash-attention or flex attention).")
            register_cpu_varlen()
        package = FLASH_PACKAGES.get(requested)
        if package and installed(package) is None:
            raise ConfigError(f"model.attn_implementation={requested} needs the `{package}` package, which is not "
                              f"installed here: install it, or use model.attn_implementation=auto.")
        if requested == "flex_attention" and device_type == "cpu":
            raise ConfigError("model.attn_implementation=flex_attention has no backward on a CPU (torch runs it for "
                              "inference only there): use model.attn_implementation=auto (sdpa on a CPU).")
        return requested
    if family in EAGER_ATTENTION_ONLY:
        return "eager"
    if device_type != "cuda":
        if packed and not compiled:
            register_cpu_varlen()
            return CPU_VARLEN
        return "sdpa"

    def supports(flag: str) -> bool:
        return model_class is None or bool(getattr(model_class, flag, False))

    if half_precision and supports("_supports_flash_attn"):  # flash kernels take bf16/fp16 only
        if capability and capability[0] == 9 and installed("flash_attn_interface") is not None:
            return "flash_attention_3"
        if installed("flash_attn") is not None:
            return "flash_attention_2"
    if packed and supports("_supports_flex_attn"):
        return "flex_attention"
    return "sdpa"


def lays_rows_end_to_end(implementation: str) -> bool:
    """flash-attention's varlen kernel (and ours on the CPU) takes one row of concatenated samples and their
    boundaries (`cu_seq_lens`); several packed rows side by side would let the samples of a row attend to each other."""
    return implementation.startswith("flash") or implementation == CPU_VARLEN


def register_cpu_varlen() -> None:
    """Makes `llmft_sdpa_varlen` a name transformers accepts (`attn_implementation=...`), with flash-attention's mask
    function: no mask for packed rows (their boundaries come with the batch) nor for rows without padding, the 2D
    padding mask otherwise (which `sdpa_per_sample` refuses: padded rows take `sdpa`)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, flash_attention_mask

    AttentionInterface.register(CPU_VARLEN, sdpa_per_sample)
    AttentionMaskInterface.register(CPU_VARLEN, flash_attention_mask)


def sdpa_per_sample(module, query, key, value, attention_mask, scaling=None, dropout=0.0, sliding_window=None,
                    softcap=None, **kwargs):
    """flash-attention's varlen contract with torch's SDPA: one row of samples laid end to end, each [cu[i],
    cu[i+1]) causal on its own (a band where `sliding_window` is shorter than it). Without `cu_seq_lens` (a forward
    on unpadded rows, such as a probe of the trained model, or a decoding step): causal over the whole row. query
    [rows, heads, q, d]; returns [rows, q, heads, d_v] as transformers' attention functions do."""
    import torch
    import torch.nn.functional as F

    if softcap is not None or kwargs.get("s_aux") is not None:
        raise NotImplementedError(f"{CPU_VARLEN} has no logit soft-capping or attention sinks: set "
                                  "model.attn_implementation=eager")
    if attention_mask is not None:
        raise ValueError(f"{CPU_VARLEN} takes packed rows (laid end to end with their cu_seq_lens) or rows without "
                         "padding, and these rows are padded: use model.attn_implementation=sdpa for them")
    if key.shape[1] != query.shape[1]:  # grouped-query attention: SDPA's CPU kernels take as many heads on each side
        groups = query.shape[1] // key.shape[1]
        key, value = key.repeat_interleave(groups, 1), value.repeat_interleave(groups, 1)
    dropout_p = dropout if module.training else 0.0

    def causal(q, k, v):
        q_length, kv_length = q.shape[2], k.shape[2]
        if q_length == kv_length and not (sliding_window is not None and kv_length > sliding_window):
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=dropout_p, scale=scaling)
        # the queries are the last q_length positions (a decoding step), or a window narrower than the sample
        distance = (torch.arange(q_length, device=q.device)[:, None] + (kv_length - q_length)
                    - torch.arange(kv_length, device=q.device)[None, :])
        allowed = (distance >= 0) & (distance < sliding_window if sliding_window is not None else True)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, dropout_p=dropout_p, scale=scaling)

    if "cu_seq_lens_q" not in kwargs:
        return causal(query, key, value).transpose(1, 2).contiguous(), None
    offsets = kwargs["cu_seq_lens_q"].tolist()  # made on the host by collate: no device read
    pieces = [causal(query[:, :, start:end], key[:, :, start:end], value[:, :, start:end])
              for start, end in zip(offsets, offsets[1:])]
    return torch.cat(pieces, dim=2).transpose(1, 2).contiguous(), None


def packed_rows_mask(position_ids, implementation: str, dtype):
    """What tells `implementation` where the samples of packed rows start, given as the model's `attention_mask`:
    a `BlockMask` for flex attention, a dense block-diagonal causal mask [rows, 1, T, T] for SDPA (boolean) and eager
    (additive, in `dtype`), None for flash-attention (its boundaries come with the batch, see `collate`).

    Built on the device without reading anything back: transformers builds the same masks from the positions, but
    first asks the host whether the rows are packed at all (`find_packed_sequence_indices`: a sync every forward)."""
    import torch

    if implementation == "flex_attention":
        return packed_block_mask(position_ids)
    if implementation not in ("sdpa", "eager"):
        return None
    sequence = sample_of_each_token(position_ids)
    length = position_ids.shape[-1]
    causal = torch.ones(length, length, dtype=torch.bool, device=position_ids.device).tril()
    allowed = (sequence[:, :, None] == sequence[:, None, :]) & causal
    if implementation == "sdpa":
        return allowed[:, None]
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill_(
        ~allowed, torch.finfo(dtype).min)[:, None]


def packed_block_mask(position_ids):
    """The block-diagonal causal `BlockMask` of packed rows (positions restart at each sample), for flex attention:
    built on the device from the positions, without reading them back (compiled on CUDA; eager on the CPU, where
    compiling the mask function would cost more than the small masks of tests)."""
    import torch
    from torch.nn.attention.flex_attention import create_block_mask

    sequence = sample_of_each_token(position_ids)

    def same_sample_causal(batch, head, query, key):
        return (sequence[batch, query] == sequence[batch, key]) & (query >= key)

    rows, length = position_ids.shape
    return create_block_mask(same_sample_causal, rows, None, length, length, device=position_ids.device,
                             _compile=position_ids.device.type == "cuda" and torch.cuda.is_available())


def sample_of_each_token(position_ids):
    """For each token, the index of its sample within the row (positions restart at 0 where a sample starts)."""
    import torch

    starts = torch.diff(position_ids, dim=-1, prepend=position_ids[:, :1] - 1) != 1
    return starts.cumsum(-1)
