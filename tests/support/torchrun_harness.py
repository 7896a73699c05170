"""Run under torchrun by the tests: `torchrun_harness.py MODE OUT RUN_DIR...` does MODE's work on each RUN_DIR in
turn and rank 0 writes the results to OUT (a torch file: {run_dir: result}). Several runs share one torchrun to pay
the start-up (torchrun, and each rank importing torch, transformers and peft: ~10 s of CPU a process) once instead of
once per run. The modes (support/torchrun.py builds the command):

- train_and_probe (support.torchrun.train_ranks_batch and BatchInBackground): train, then record what the tests check
  on the trained, still-sharded model: its logits on PROBE_IDS, and whether its parameters really are sharded;
- train_families (training/test_families.py): train, then record the still-wrapped model's logits on
  FAMILIES_PROBE_IDS (float, on the CPU); rank 0 releases the run's lock (train() leaves it to its caller);
- loss_and_gradients (training/test_loss_strategies.py): set up the run's Trainer, take its first micro-batch,
  forward and backward once, and record the step's loss over all ranks and the full (gathered) gradient of every
  trainable parameter.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist

from llmft.rundir import lock as run_lock
from llmft.rundir.files import read_config
from llmft.rundir.lifetime import end_rank
from llmft.training.loop import Trainer, train

PROBE_IDS = [[5, 17, 42, 99, 7, 256, 31, 8, 64, 12]]
FAMILIES_PROBE_IDS = [[5, 17, 42, 99, 7, 120, 31, 8, 64, 12]]


def parameter_kinds(model) -> dict:
    from torch.distributed.tensor import DTensor

    params = list(model.parameters())
    return {
        "num_params": len(params),
        "num_dtensor": sum(isinstance(p, DTensor) for p in params),
        "num_zero3_partitioned": sum(hasattr(p, "ds_tensor") and p.ds_tensor.numel() < p.ds_numel for p in params),
    }


def train_and_probe(run_dir: str) -> dict:
    result = train(read_config(run_dir), Path(run_dir))
    model = result.model.eval()
    kinds = parameter_kinds(model)  # before the forward: FSDP2 leaves the root's parameters unsharded after it
    with torch.no_grad():  # a collective forward for FSDP2 and ZeRO-3
        logits = model(input_ids=torch.tensor(PROBE_IDS)).logits
    return {"logits": logits, "kinds": kinds, "summary": result.summary}


def train_families(run_dir: str) -> dict:
    result = train(read_config(run_dir), Path(run_dir))
    model = result.model.eval()
    with torch.no_grad():
        logits = model(input_ids=torch.tensor(FAMILIES_PROBE_IDS)).logits
    if dist.get_rank() == 0:
        run_lock.release(Path(run_dir))  # train() leaves the run's lock to its caller (llmft.training.loop.run)
    dist.barrier()
    return {"logits": logits.float().cpu(), "summary": result.summary}


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


def loss_and_gradients(run_dir: str) -> dict:
    trainer = Trainer(read_config(run_dir), Path(run_dir))
    batch = trainer.next_micro_batch()
    total_supervised = trainer.all_reduce(torch.tensor(batch.count, dtype=torch.float64))
    if getattr(trainer.strategy, "engine", None) is not None:  # DeepSpeed steps inside backward: not this time,
        trainer.strategy.engine.step = lambda *args, **kwargs: None  # the gradients are read before any step
    loss_sum, _ = trainer.forward_backward(batch, total_supervised)
    loss = float(trainer.all_reduce(loss_sum.clone())) / float(total_supervised)
    return {"loss": loss, "grads": full_gradients(trainer), "loss_head": trainer.loss_head}


MODES = {"train_and_probe": train_and_probe, "train_families": train_families,
         "loss_and_gradients": loss_and_gradients}


def main(mode: str, out: str, run_dirs: list[str]) -> None:
    results = {run_dir: MODES[mode](run_dir) for run_dir in run_dirs}
    if dist.get_rank() == 0:
        torch.save(results, out)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3:])
    end_rank(0)  # as python -m llmft.train ends: ZeRO-3's leftovers can abort the interpreter's teardown
