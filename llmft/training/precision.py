"""The one place that decides the compute precision of a run: bf16 where the hardware does it natively, fp32 else.

`train.precision=auto` means bf16 on a GPU with native bf16 (A100, H100, H200), fp32 on a CPU (exact, deterministic)
and on a V100, whose bf16 is emulated (`torch.cuda.is_bf16_supported()` counts emulation unless told not to): slow,
and SDPA falls back to its math kernel there. Every strategy and the loop's autocast read `uses_bf16` from here.
"""

from __future__ import annotations

from contextlib import nullcontext

import torch

from llmft.config.schema import Precision


def uses_bf16(precision: Precision | str, device_type: str) -> bool:
    precision = Precision(precision)
    if precision is Precision.bf16:
        return True
    return precision is Precision.auto and device_type == "cuda" \
        and torch.cuda.is_bf16_supported(including_emulation=False)


def autocast(bf16: bool, device_type: str):
    """bf16 autocast for the forward pass, or nothing (fp32)."""
    return torch.autocast(device_type, dtype=torch.bfloat16) if bf16 else nullcontext()
