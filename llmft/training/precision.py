"""The one place that decides the compute precision of a run: what each GPU does natively, fp32 on a CPU.

`train.precision=auto` means bf16 on a GPU with native bf16 (compute capability 8.0 and up: A100, H100, H200), fp16
with a loss scaler on an older GPU (V100: its bf16 is emulated, slow, and SDPA falls back to its math kernel, while
its tensor cores do fp16 at the 125 TFLOP/s the cluster profiles count), and fp32 on a CPU (exact, deterministic).
`torch.cuda.is_bf16_supported()` counts emulation unless told not to. Every strategy, the loop's autocast and the
attention choice read `compute_dtype`'s answer: None for fp32, else the dtype autocast computes in.
"""

from __future__ import annotations

from contextlib import nullcontext

import torch

from llmft.config.schema import Precision

NAMES = {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


def compute_dtype(precision: Precision | str, device_type: str, native_bf16: bool | None = None) -> torch.dtype | None:
    """The autocast dtype of a run, None for fp32. `native_bf16`: the GPU has bf16 tensor cores (asked of torch when
    None)."""
    precision = Precision(precision)
    if precision is not Precision.auto:
        return {Precision.fp32: None, Precision.bf16: torch.bfloat16, Precision.fp16: torch.float16}[precision]
    if device_type != "cuda":
        return None
    if native_bf16 is None:
        native_bf16 = torch.cuda.is_bf16_supported(including_emulation=False)
    return torch.bfloat16 if native_bf16 else torch.float16


def native_bf16_of(capability: tuple[int, int]) -> bool:
    """bf16 tensor cores from Ampere (compute capability 8.0) on."""
    return capability >= (8, 0)


def autocast(compute: torch.dtype | None, device_type: str):
    """Autocast to the run's compute dtype for the forward pass, or nothing (fp32)."""
    return torch.autocast(device_type, dtype=compute) if compute is not None else nullcontext()


def loss_scaler(compute: torch.dtype | None, device_type: str, sharded: bool = False):
    """fp16's dynamic loss scaler (small gradients underflow in fp16; bf16 has fp32's range and needs none), or
    None. `sharded`: FSDP2's DTensor gradients, whose inf/NaN check must agree across ranks."""
    if compute is not torch.float16:
        return None
    if sharded:
        from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler

        return ShardedGradScaler(device_type)
    return torch.amp.GradScaler(device_type)
