"""LoRA on the CPU without the cost around its two small matmuls: one autograd node per adapted linear layer, and a
dropout noise drawn 16 bits at a time.

PEFT computes `base(x) + lora_B(lora_A(dropout(x))) * scaling` as six autograd nodes, each with its own output
tensor, and keeps for backward the dropout's float noise and its output: two [tokens, in] fp32 tensors per adapter
(three adapters read the same input in attention, two in the MLP), besides the small [tokens, r] one. And
`nn.Dropout` draws its noise on the CPU with `bernoulli_`, one 32-bit Mersenne-Twister draw per element in a serial
loop: on SmolLM2-135M (210 adapters, 576-1536 wide) that alone was 0.6 s of a 4 s step, more than the adapters'
matmuls (bench/bench_cpu_limit.py's breakdown).

- `CpuDropout` (LoRA's dropout modules become it, under every strategy): on a CPU tensor it keeps an element when a
  16-bit lane of a 64-bit random word (`random_`, one draw for four elements) is at least p * 2^16, rounded: the
  probability is p to within 2^-17 (0.05 -> 0.0500031), and the kept values are scaled by 1 / (1 - that
  probability), so the expectation is exact. From the same torch generator, so a run stays reproducible and every
  strategy draws the same masks. On other devices `nn.Dropout` as it is (CUDA's kernel is fused and fast).
- `_LoraLinear` (as the forward of each PEFT `lora.Linear` over a plain `nn.Linear`): the base output, then
  `+= (kept(x) A^T * dropout scale * scaling) B^T` in place, where PEFT makes a new tensor at each step: the two
  scales are applied to the small [tokens, r] product instead of to the [tokens, in] input and the [tokens, out]
  output (PEFT's numbers up to rounding: a few ulps). For backward it keeps the input itself (one tensor for the
  adapters that read it), the kept elements as a boolean mask (a byte per element) and the [tokens, r] product.
  One autograd node instead of six, and no [tokens, in] or [tokens, out] tensor made but the output and the kept
  input.

The fused forward hands each call to PEFT's own whenever it would compute something else: adapters disabled or merged,
more than one active adapter, DoRA or another variant, a bias on lora_B, a trainable base weight, mixed dtypes,
autocast, per-sample `adapter_names`, or a tensor off the CPU. Parameters, names, saving and merging stay PEFT's.
Not installed under ZeRO-3 (`install(fuse_layers=False)`), whose partitioned lora_A / lora_B are gathered only when
their own modules run.
"""

from __future__ import annotations

import types

import torch
import torch.nn.functional as F

LANES = 4  # 16-bit lanes in a 64-bit random word


def keep_threshold(p: float) -> tuple[int, float]:
    """The signed 16-bit lane value from which an element is kept, and the probability of dropping it."""
    dropped_lanes = round(p * 2**16)
    return dropped_lanes - 2**15, dropped_lanes / 2**16


def keep_mask(shape, p: float, device) -> torch.Tensor:
    """A boolean mask of `shape`, each element True with probability 1 - keep_threshold(p)[1], from the torch
    generator of `device` (the CPU's)."""
    numel = 1
    for size in shape:
        numel *= size
    words = torch.empty((numel + LANES - 1) // LANES, dtype=torch.int64, device=device).random_(-2**63, None)
    return words.view(torch.int16)[:numel].reshape(shape) >= keep_threshold(p)[0]


def dropped_out(x: torch.Tensor, mask: torch.Tensor, p: float) -> torch.Tensor:
    """x where `mask` keeps it, scaled by 1 / (1 - the dropped probability); 0 elsewhere. (The same values as
    `x * noise` with a float noise of 0 and that scale, without making the noise.)"""
    return torch.where(mask, x * (1 / (1 - keep_threshold(p)[1])), 0.0)


class CpuDropout(torch.nn.Dropout):
    """`nn.Dropout` whose noise, on a CPU tensor, is drawn 16 bits at a time (the module's docstring)."""

    def forward(self, x):
        if not self.training or self.p == 0 or x.device.type != "cpu" or self.p >= 1:
            return super().forward(x)
        return dropped_out(x, keep_mask(x.shape, self.p, x.device), self.p)


class _LoraLinear(torch.autograd.Function):
    """y = x W^T + b + (dropout(x) A^T) B^T * scaling, W and b frozen; gradients for x, A and B. The dropout's scale
    and LoRA's are applied to the [tokens, r] product, not to [tokens, in] and [tokens, out] tensors."""

    @staticmethod
    def forward(ctx, x, weight, bias, lora_a, lora_b, scaling: float, dropout: float):
        rows = x.reshape(-1, x.shape[-1])
        result = F.linear(rows, weight, bias)
        mask = keep_mask(rows.shape, dropout, rows.device) if dropout > 0 else None
        kept = torch.where(mask, rows, 0.0) if mask is not None else rows
        scale = scaling / (1 - keep_threshold(dropout)[1]) if mask is not None else scaling
        scaled_low_rank = kept.mm(lora_a.t()).mul_(scale)
        result.add_(scaled_low_rank.mm(lora_b.t()))
        ctx.save_for_backward(rows, mask, scaled_low_rank, weight, lora_a, lora_b)
        ctx.scale, ctx.input_shape = scale, x.shape
        return result.reshape(*x.shape[:-1], result.shape[-1])

    @staticmethod
    def backward(ctx, grad_output):
        rows, mask, scaled_low_rank, weight, lora_a, lora_b = ctx.saved_tensors
        grad = grad_output.reshape(-1, grad_output.shape[-1])
        grad_b = grad.t().mm(scaled_low_rank) if ctx.needs_input_grad[4] else None
        grad_low_rank = grad.mm(lora_b).mul_(ctx.scale)  # d loss / d (kept A^T)
        grad_a = None
        if ctx.needs_input_grad[3]:
            grad_a = grad_low_rank.t().mm(torch.where(mask, rows, 0.0) if mask is not None else rows)
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = grad.mm(weight)
            through_lora = grad_low_rank.mm(lora_a)
            grad_x.add_(torch.where(mask, through_lora, 0.0) if mask is not None else through_lora)
            grad_x = grad_x.reshape(ctx.input_shape)
        return grad_x, None, None, grad_a, grad_b, None, None


def fused_forward(self, x, *args, **kwargs):
    """`lora.Linear.forward`, through `_LoraLinear` when that is PEFT's computation (the module's docstring)."""
    if args or kwargs or self.disable_adapters or self.merged or len(self.active_adapters) != 1:
        return self.peft_forward(x, *args, **kwargs)
    adapter = self.active_adapters[0]
    if adapter not in self.lora_A or adapter in self.lora_variant:
        return self.peft_forward(x)
    base, lora_a, lora_b = self.base_layer, self.lora_A[adapter].weight, self.lora_B[adapter].weight
    dropout_layer = self.lora_dropout[adapter]
    if isinstance(dropout_layer, CpuDropout):
        dropout = dropout_layer.p if dropout_layer.training else 0.0
    elif isinstance(dropout_layer, torch.nn.Identity):
        dropout = 0.0
    else:
        return self.peft_forward(x)
    if (self.lora_B[adapter].bias is not None or base.weight.requires_grad or dropout >= 1
            or (base.bias is not None and base.bias.requires_grad) or x.device.type != "cpu"
            or torch.is_autocast_enabled("cpu") or not x.dtype == base.weight.dtype == lora_a.dtype == lora_b.dtype):
        return self.peft_forward(x)
    return _LoraLinear.apply(x, base.weight, base.bias, lora_a, lora_b, float(self.scaling[adapter]), dropout)


def install(model, fuse_layers: bool = True) -> int:
    """LoRA's dropout modules become `CpuDropout`; with `fuse_layers`, each PEFT `lora.Linear` over a plain
    `nn.Linear` gets the fused forward. Returns how many layers were fused."""
    from peft.tuners.lora.layer import Linear as LoraLinear

    for module in model.modules():
        dropouts = getattr(module, "lora_dropout", None)
        if isinstance(dropouts, torch.nn.ModuleDict):
            for name, dropout in list(dropouts.items()):
                if type(dropout) is torch.nn.Dropout:
                    dropouts[name] = CpuDropout(dropout.p)
    fused = 0
    for module in model.modules():
        if fuse_layers and type(module) is LoraLinear and type(module.base_layer) is torch.nn.Linear \
                and not hasattr(module, "peft_forward"):
            module.peft_forward = module.forward
            module.forward = types.MethodType(fused_forward, module)
            fused += 1
    return fused
