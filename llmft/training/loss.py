"""The training loss: next-token cross-entropy summed over the supervised positions only, without full logits.

    install(hf_model, choice, device_type, partitioned) -> the head the run uses ("chunked", "liger" or "full_logits")
    token_losses(model, batch, compute) -> (sum of losses, number of supervised tokens), both on the device
    supervised_token_losses(model, batch, compute, installed) -> each supervised position's loss (DPO, KTO)

A `[tokens, vocab]` logits tensor is what dominates a fine-tuning step's memory on a real vocabulary (Llama 3:
128,256 ids; 4,096 tokens -> 2 GB of fp32 logits, as much again for their gradient), and about half of a support
conversation's tokens are context whose logits are thrown away. So the model's forward is replaced (on the instance,
so parameter names, checkpoints and PEFT are untouched) by: the decoder's last hidden states, the rows of the
supervised positions (indices computed on the host by `with_loss_index`, so selecting them costs no device sync),
and the LM head plus cross-entropy on those rows, chunk by chunk:

- `chunked` (ours): each chunk's logits, log-sum-exp, loss, and, in the same pass, the gradients of the hidden rows
  and of the head's weight (softmax minus one-hot, times W or h). Backward only scales them. Peak memory is one
  chunk's logits; the head costs as many matmuls as the plain path, on the supervised rows only. Hand-written
  because it must run on the CPU and under DDP, FSDP2 and ZeRO-3 (torch has no fused linear cross-entropy;
  Liger's needs Triton and a GPU).
- `liger`: Liger-Kernel's fused linear cross-entropy (Triton, CUDA), the same computation.
- `full_logits`: the model's own forward and cross-entropy on full logits; what models with logit soft-capping or
  scaling (Gemma 2/3, Cohere) use, since the head is then more than a matmul, or an LM head PEFT wrapped itself.

Under FSDP2 the head's weight is in the root's parameter group, unsharded for the root's forward (this code runs
inside it); under ZeRO-3 DeepSpeed gathers a parameter read inside a forward and registers it as external to the
running module (`parameter_offload.py`), so reading `lm_head.weight` here is safe under every strategy.
"""

from __future__ import annotations

import importlib.util
import types

import torch
import torch.nn.functional as F

from llmft.config.schema import LossHead
from llmft.config.validation import LOGIT_SCALING_KEYS
from llmft.data.tokenize.templating import IGNORE_INDEX
from llmft.errors import ConfigError
from llmft.training import attention
from llmft.training.precision import autocast

# Elements of one chunk's fp32 logits: 2**26 is 256 MB (523 rows of a 128,256-id vocabulary; one chunk for a small one).
CHUNK_ELEMENTS = 2**26


def with_loss_index(batch: dict) -> dict:
    """Add `loss_index`: the flat indices, in the (rows x (length - 1)) grid of shifted targets, of the supervised
    positions. Computed on the host before the batch moves to the device, so the loss selects rows without a sync."""
    targets = batch["labels"][:, 1:]
    batch["loss_index"] = (targets.reshape(-1) != IGNORE_INDEX).nonzero().squeeze(1)
    return batch


def token_losses(model, batch: dict, compute: torch.dtype | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum of next-token cross-entropies over the supervised positions, and their number (both on the device);
    `compute`: the autocast dtype, None for fp32."""
    with autocast(compute, batch["input_ids"].device.type):
        output = model(**batch)
    if getattr(output, "loss_sum", None) is not None:  # an installed head
        return output.loss_sum, output.num_supervised
    targets = batch["labels"][:, 1:]  # the model's own forward: full logits
    loss_sum = F.cross_entropy(output.logits[:, :-1].flatten(0, 1).float(), targets.flatten(),
                               ignore_index=IGNORE_INDEX, reduction="sum")
    return loss_sum, (targets != IGNORE_INDEX).sum()


def supervised_token_losses(model, batch: dict, compute: torch.dtype | None, installed: bool) -> torch.Tensor:
    """The cross-entropy of each supervised position, in `loss_index` order, [supervised] fp32 on the device.
    `installed`: the model's forward was replaced by `install` (else: full logits from its own forward)."""
    with autocast(compute, batch["input_ids"].device.type):
        if installed:
            return model(**batch, token_loss=True).token_losses
        logits = model(**{k: v for k, v in batch.items() if k not in ("labels", "loss_index")}).logits
    targets = batch["labels"][:, 1:].reshape(-1).index_select(0, batch["loss_index"])
    rows = logits[:, :-1].reshape(-1, logits.shape[-1]).index_select(0, batch["loss_index"])
    return F.cross_entropy(rows.float(), targets, reduction="none")


def full_logits_reason(hf_model) -> str | None:
    """Why this model's head cannot run on hidden rows alone, or None."""
    config = hf_model.config
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    for key in LOGIT_SCALING_KEYS:
        if getattr(text_config, key, None) not in (None, 1, 1.0):
            return f"the model scales its logits ({key}={getattr(text_config, key)})"
    head = hf_model.get_output_embeddings()
    if type(head) is not torch.nn.Linear:
        return f"its LM head is a {type(head).__name__}, not a plain Linear (an adapter on lm_head?)"
    if getattr(hf_model, hf_model.base_model_prefix, None) is None:
        return f"{type(hf_model).__name__} has no decoder under `{hf_model.base_model_prefix}`"
    return None


def liger_available(device_type: str) -> bool:
    return device_type == "cuda" and importlib.util.find_spec("liger_kernel") is not None


def install(hf_model, choice: LossHead | str, device_type: str, partitioned: bool = False) -> str:
    """Replace the forward of `hf_model` (the transformers model, under PEFT if any) by the supervised-rows loss
    when called with `labels`; returns the head used. `choice`: train.loss_head (auto, chunked, liger, full_logits).
    `partitioned`: the strategy keeps a parameter whole only inside its module's forward and backward
    (`Strategy.partitions_parameters`, ZeRO-3), so a trainable head's gradient must be made inside its module."""
    choice = LossHead(choice)
    if choice is LossHead.full_logits:
        return "full_logits"
    reason = full_logits_reason(hf_model)
    if reason is not None:
        if choice is not LossHead.auto:
            raise ConfigError(f"train.loss_head={choice.value} is impossible for this model: {reason}; "
                             f"use train.loss_head=auto or full_logits")
        return "full_logits"
    # Liger reads the head's weight outside the head module: under ZeRO-3 a trainable head (full fine-tuning) is then
    # a partitioned parameter whose gradient has nowhere to go (module_cross_entropy_sum's docstring), so it takes
    # the chunked head through its module; a frozen head (LoRA) is gathered as an external parameter and is fine.
    head_in_module = partitioned and any(p.requires_grad for p in hf_model.get_output_embeddings().parameters())
    if choice is LossHead.liger and head_in_module:
        raise ConfigError("train.loss_head=liger cannot train the LM head under ZeRO-3 (its gradient would be "
                          "computed outside the partitioned module): use train.loss_head=auto or chunked")
    head = "liger" if choice is LossHead.liger or (choice is LossHead.auto and liger_available(device_type)
                                                    and not head_in_module) else "chunked"
    original_forward = hf_model.forward

    def forward(self, *args, labels=None, loss_index=None, token_loss=False, **kwargs):
        if labels is None:  # generation, or any caller that wants logits
            return original_forward(*args, **kwargs)
        return supervised_loss(self, labels, loss_index, "per_token" if token_loss else head, partitioned, *args,
                               **kwargs)

    hf_model.forward = types.MethodType(forward, hf_model)
    return head


def supervised_loss(hf_model, labels, loss_index, head: str, partitioned: bool, input_ids=None, **kwargs):
    for key in ("logits_to_keep", "return_dict", "output_attentions", "output_hidden_states", "num_items_in_batch"):
        kwargs.pop(key, None)
    decoder = getattr(hf_model, hf_model.base_model_prefix)
    # A sliding window shorter than the row (Gemma 3's 1024, Phi-3-mini's 2047) is not in packed_rows_mask's
    # block-diagonal mask: transformers then builds the masks from the positions itself (a device sync per forward).
    window = getattr(hf_model.config.get_text_config(), "sliding_window", None)
    if kwargs.get("attention_mask") is None and kwargs.get("position_ids") is not None \
            and not (window and window < kwargs["position_ids"].shape[-1]):
        mask = attention.packed_rows_mask(kwargs["position_ids"], hf_model.config._attn_implementation,
                                          decoder.get_input_embeddings().weight.dtype)
        if mask is not None:
            kwargs["attention_mask"] = mask
    hidden = decoder(input_ids=input_ids, use_cache=False, **kwargs).last_hidden_state
    if loss_index is None:
        loss_index = (labels[:, 1:].reshape(-1) != IGNORE_INDEX).nonzero().squeeze(1)
    rows = hidden[:, :-1].reshape(-1, hidden.shape[-1]).index_select(0, loss_index)
    targets = labels[:, 1:].reshape(-1).index_select(0, loss_index)
    lm_head = hf_model.get_output_embeddings()
    if head == "per_token":  # preference objectives weigh each sequence's tokens differently
        if any(p.requires_grad for p in lm_head.parameters()):
            token_nll = module_token_losses(lm_head, rows, targets)
        else:
            token_nll = linear_cross_entropy_tokens(rows, lm_head.weight, lm_head.bias, targets)
        return types.SimpleNamespace(token_losses=token_nll, loss_sum=None, logits=None)
    if head == "liger":
        from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

        loss_sum = liger_fused_linear_cross_entropy(rows, lm_head.weight, targets, bias=lm_head.bias,
                                                    reduction="sum")
        loss_sum = (loss_sum[0] if isinstance(loss_sum, tuple) else loss_sum).float()  # (loss, z_loss) in some versions
    elif lm_head.weight.requires_grad and partitioned:
        loss_sum = module_cross_entropy_sum(lm_head, rows, targets)
    else:
        loss_sum = linear_cross_entropy_sum(rows, lm_head.weight, lm_head.bias, targets)
    num_supervised = torch.full((), loss_index.numel(), dtype=torch.int64, device=rows.device)
    return types.SimpleNamespace(loss_sum=loss_sum, num_supervised=num_supervised, logits=None)


def chunk_rows(vocab_size: int) -> int:
    return max(1, CHUNK_ELEMENTS // vocab_size)


def module_cross_entropy_sum(lm_head, rows, targets) -> torch.Tensor:
    """The same sum through the head module itself, each chunk recomputed in backward (activation checkpointing):
    for a trainable head under ZeRO-3, whose weight is gathered only around its module's own forward and backward
    (a gradient returned for it outside them would find it partitioned). One more head matmul per chunk."""
    from torch.utils.checkpoint import checkpoint

    def chunk_loss(chunk, chunk_targets):
        return F.cross_entropy(lm_head(chunk).float(), chunk_targets, reduction="sum")

    total = torch.zeros((), dtype=torch.float32, device=rows.device)
    step = chunk_rows(lm_head.out_features)  # not weight.shape: a partitioned weight is empty outside its module
    for start in range(0, rows.shape[0], step):
        total = total + checkpoint(chunk_loss, rows[start : start + step], targets[start : start + step],
                                   use_reentrant=False)
    return total


def module_token_losses(lm_head, rows, targets) -> torch.Tensor:
    """Each row's cross-entropy, [rows] fp32, for a trainable head (full fine-tuning), through the head module chunk by
    chunk, each chunk recomputed in backward (activation checkpointing), so no [rows, vocab] tensor outlives its
    chunk: the losses are weighted per sequence afterwards (DPO, KTO), and the head's gradient sums each row's
    contribution times its weight, which cannot be made in the forward. Through the module: under ZeRO-3 its weight
    is gathered around the module's forward and its recompute."""
    from torch.utils.checkpoint import checkpoint

    def chunk_losses(chunk, chunk_targets):
        return F.cross_entropy(lm_head(chunk).float(), chunk_targets, reduction="none")

    step = chunk_rows(lm_head.out_features)  # not weight.shape: a partitioned weight is empty outside its module
    grad = torch.is_grad_enabled() and (rows.requires_grad or any(p.requires_grad for p in lm_head.parameters()))
    pieces = [checkpoint(chunk_losses, rows[start : start + step], targets[start : start + step], use_reentrant=False)
              if grad else chunk_losses(rows[start : start + step], targets[start : start + step])
              for start in range(0, rows.shape[0], step)]
    return torch.cat(pieces) if pieces else rows.new_zeros(0, dtype=torch.float32)


def linear_cross_entropy_tokens(rows, weight, bias, targets) -> torch.Tensor:
    """Each row's cross-entropy, [rows] fp32, with a frozen head (LoRA): the gradient of each row is made in the same
    pass, chunk by chunk (softmax minus one-hot, times W), and backward scales it by the row's own weight. No recompute
    (under ZeRO-3 a frozen head's weight is gathered for this forward only, as in `linear_cross_entropy_sum`)."""
    if torch.is_grad_enabled() and rows.requires_grad:
        return _LinearCrossEntropyTokens.apply(rows, weight, bias, targets)
    step = chunk_rows(weight.shape[0])
    pieces = [chunk_token_losses(F.linear(rows[start : start + step], weight, bias).float(),
                                 targets[start : start + step])[0]
              for start in range(0, rows.shape[0], step)]
    return torch.cat(pieces) if pieces else rows.new_zeros(0, dtype=torch.float32)


def chunk_token_losses(logits: torch.Tensor, targets: torch.Tensor, softmax: bool = False
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's cross-entropy (log-sum-exp minus the target's logit) and the log-sum-exp, from fp32 logits, which it
    overwrites: on return they hold exp(logits - row max), or with `softmax` the softmax (the gradient's first term).
    In place because `torch.logsumexp` makes a second [rows, vocab] buffer, as large as the chunk (256 MB), at the
    moment the step's memory peaks (every layer's activations are held). The one formula of every chunked path, with
    or without gradient: F.cross_entropy rounds differently (its log-softmax), and DPO's first step must compare a
    policy computed with gradients to a reference computed without them bit for bit (ln 2 exactly when the adapter
    is fresh)."""
    target_logits = logits.gather(1, targets[:, None]).squeeze(1)
    maxes = logits.amax(dim=-1, keepdim=True)
    maxes.masked_fill_(maxes.abs() == float("inf"), 0)  # as torch.logsumexp: no inf - inf
    sums = logits.sub_(maxes).exp_().sum(dim=-1)
    log_norm = sums.log().add_(maxes.squeeze(1))
    if softmax:
        logits.div_(sums[:, None])
    return log_norm - target_logits, log_norm


class _LinearCrossEntropyTokens(torch.autograd.Function):
    """Per-row losses and, in the same pass, d loss_i / d rows_i; backward multiplies by each row's upstream gradient."""

    @staticmethod
    def forward(ctx, rows, weight, bias, targets):
        losses = torch.empty(rows.shape[0], dtype=torch.float32, device=rows.device)
        grad_rows = torch.empty_like(rows)
        step = chunk_rows(weight.shape[0])
        for start in range(0, rows.shape[0], step):
            chunk, chunk_targets = rows[start : start + step], targets[start : start + step]
            logits = F.linear(chunk, weight, bias).float()
            losses[start : start + step], _ = chunk_token_losses(logits, chunk_targets, softmax=True)
            grad_logits = logits
            grad_logits[torch.arange(chunk.shape[0], device=chunk.device), chunk_targets] -= 1.0
            grad_rows[start : start + step] = grad_logits.to(chunk.dtype) @ weight.to(chunk.dtype)
        ctx.save_for_backward(grad_rows)
        return losses

    @staticmethod
    def backward(ctx, grad_output):
        (grad_rows,) = ctx.saved_tensors
        return grad_rows * grad_output.to(grad_rows.dtype)[:, None], None, None, None


def frozen_in_rows_dtype(weight, rows):
    """A frozen head kept in fp32 (QLoRA: PEFT upcasts it) under bf16 autocast, cast to the rows' dtype once for
    the whole loss: autocast caches the casts of trainable weights only, so each chunk's F.linear and gradient
    matmul would cast the [vocab, hidden] weight again (1 GB of bf16 for Llama 3's head, per chunk)."""
    if weight.requires_grad or weight.dtype == rows.dtype or rows.dtype not in (torch.bfloat16, torch.float16):
        return weight
    return weight.to(rows.dtype)


def linear_cross_entropy_sum(rows, weight, bias, targets) -> torch.Tensor:
    """sum_i CE(rows[i] @ weight.T + bias, targets[i]) in fp32, one chunk of rows at a time."""
    if torch.is_grad_enabled() and (rows.requires_grad or weight.requires_grad
                                    or (bias is not None and bias.requires_grad)):
        return _LinearCrossEntropy.apply(rows, weight, bias, targets)
    weight = frozen_in_rows_dtype(weight, rows)
    total = torch.zeros((), dtype=torch.float32, device=rows.device)
    step = chunk_rows(weight.shape[0])
    for start in range(0, rows.shape[0], step):
        logits = F.linear(rows[start : start + step], weight, bias).float()
        total += chunk_token_losses(logits, targets[start : start + step])[0].sum()
    return total


class _LinearCrossEntropy(torch.autograd.Function):
    """The loss and its gradients in one pass over the chunks: nothing of size [rows, vocab] outlives a chunk."""

    @staticmethod
    def forward(ctx, rows, weight, bias, targets):
        needs_rows, needs_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        needs_bias = bias is not None and ctx.needs_input_grad[2]
        ctx.weight_dtype = weight.dtype
        if not needs_weight:
            weight = frozen_in_rows_dtype(weight, rows)
        accumulate = torch.float32 if weight.dtype != torch.float64 else torch.float64
        grad_rows = torch.empty_like(rows) if needs_rows else None
        grad_weight = torch.zeros(weight.shape, dtype=accumulate, device=weight.device) if needs_weight else None
        grad_bias = torch.zeros(bias.shape, dtype=accumulate, device=bias.device) if needs_bias else None
        total = torch.zeros((), dtype=torch.float32, device=rows.device)
        step = chunk_rows(weight.shape[0])
        for start in range(0, rows.shape[0], step):
            chunk, chunk_targets = rows[start : start + step], targets[start : start + step]
            logits = F.linear(chunk, weight, bias).float()
            losses, _ = chunk_token_losses(logits, chunk_targets, softmax=True)
            total += losses.sum()
            # d loss / d logits = softmax - one_hot(target), in place over the chunk's logits
            grad_logits = logits
            grad_logits[torch.arange(chunk.shape[0], device=chunk.device), chunk_targets] -= 1.0
            grad_logits = grad_logits.to(chunk.dtype)
            if needs_rows:
                grad_rows[start : start + step] = grad_logits @ weight.to(chunk.dtype)
            if needs_weight:
                grad_weight += (grad_logits.t() @ chunk).to(accumulate)
            if needs_bias:
                grad_bias += grad_logits.sum(0).to(accumulate)
        ctx.bias_dtype = bias.dtype if bias is not None else None
        ctx.save_for_backward(*(t if t is not None else torch.empty(0) for t in (grad_rows, grad_weight, grad_bias)))
        ctx.has = (needs_rows, needs_weight, needs_bias)
        return total

    @staticmethod
    def backward(ctx, grad_output):
        grad_rows, grad_weight, grad_bias = ctx.saved_tensors
        needs_rows, needs_weight, needs_bias = ctx.has
        scale = grad_output.float()
        return (
            (grad_rows * scale.to(grad_rows.dtype)) if needs_rows else None,
            (grad_weight * scale).to(ctx.weight_dtype) if needs_weight else None,
            (grad_bias * scale).to(ctx.bias_dtype) if needs_bias else None,
            None,
        )
