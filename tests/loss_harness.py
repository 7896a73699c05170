"""Run by tests/test_loss_strategies.py under torchrun: for each RUN_DIR, set up the run's Trainer, take its first
micro-batch, forward and backward once, and record the step's loss over all ranks and the full (gathered) gradient of
every trainable parameter, in OUT (a torch file written by rank 0)."""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist

from llmft.rundir.files import read_config
from llmft.training.loop import Trainer


def full_gradients(trainer: Trainer) -> dict[str, torch.Tensor]:
    """Every trainable parameter's gradient, whole, in named order (a collective under FSDP2 and ZeRO)."""
    from torch.distributed.tensor import DTensor

    grads = {}
    for name, param in trainer.peft_model.named_parameters():
        if not param.requires_grad:
            continue
        if trainer.strategy.name.startswith("zero"):
            from deepspeed.utils import safe_get_full_grad

            grad = safe_get_full_grad(param)
        else:
            grad = param.grad
        grads[name] = (grad.full_tensor() if isinstance(grad, DTensor) else grad).detach().float().cpu()
    return grads


def main(out: str, run_dirs: list[str]) -> None:
    results = {}
    for run_dir in run_dirs:
        trainer = Trainer(read_config(run_dir), Path(run_dir))
        batch = trainer.next_micro_batch()
        total_supervised = trainer.all_reduce(torch.tensor(batch.count, dtype=torch.float64))
        if getattr(trainer.strategy, "engine", None) is not None:  # DeepSpeed steps inside backward: not this time,
            trainer.strategy.engine.step = lambda *args, **kwargs: None  # the gradients are read before any step
        loss_sum, _ = trainer.forward_backward(batch, total_supervised)
        loss = float(trainer.all_reduce(loss_sum.clone())) / float(total_supervised)
        results[run_dir] = {"loss": loss, "grads": full_gradients(trainer), "loss_head": trainer.loss_head}
    if dist.get_rank() == 0:
        torch.save(results, out)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
