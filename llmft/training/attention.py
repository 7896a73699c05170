"""Which attention kernel a run uses, and how packed rows tell it where each sample starts.

`model.attn_implementation=auto` (the default) chooses per device, once per rank, before the model is built:

| device | chosen | packed rows reach the kernel as |
|---|---|---|
| CUDA, flash-attention installed, bf16/fp16 compute | `flash_attention_2` (`_3` on Hopper with FA3) | rows laid end to end, `cu_seq_lens` and `max_length` made on the host by `collate` |
| CUDA otherwise, packed rows | `flex_attention` | a `BlockMask` built on the device from the position ids |
| CUDA otherwise, padded rows (DPO, KTO, `data.packing=false`) | `sdpa` | (a padding mask: SDPA's efficient kernel) |
| CPU | `sdpa` | a dense block-diagonal boolean mask |
| BLOOM (any device) | `eager` | a dense additive mask |

Why not SDPA on a GPU: a dense [rows, 1, T, T] mask rules out SDPA's flash kernel, and with it the memory-efficient
path's speed; the two boundary forms above are what the fast kernels understand, and neither reads anything back from
the device per forward (transformers would infer the boundaries from the positions, a host sync per layer for
flash-attention). The dense mask stays for the CPU, where it is exact and the tests compare strategies bitwise.
Flex attention is compiled for each row length: packed rows all have `model.max_seq_len`, padded rows vary, hence
SDPA for those.
An implementation asked for by name is used as asked (packed rows then take the form of the table's row for it).
"""

from __future__ import annotations

import importlib.util

from llmft.config.families import EAGER_ATTENTION_ONLY
from llmft.errors import ConfigError

FLASH_PACKAGES = {"flash_attention_2": "flash_attn", "flash_attention_3": "flash_attn_interface"}


def choose(requested: str, family, device_type: str, half_precision: bool, packed: bool, model_class=None,
           capability: tuple[int, int] | None = None, installed=importlib.util.find_spec) -> str:
    """The attention implementation for this rank: `requested` unless it is `auto` (see the module's table).

    `model_class`: the transformers class, whose `_supports_flash_attn` / `_supports_flex_attn` say what it can run
    (None: assumed to support both). `capability`: the GPU's compute capability (Hopper is 9.x)."""
    if requested != "auto":
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
    """flash-attention's varlen kernel takes one row of concatenated samples and their boundaries (`cu_seq_lens`);
    several packed rows side by side would let the samples of a row attend to each other."""
    return implementation.startswith("flash")


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
