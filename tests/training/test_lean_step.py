"""A lean step (issue 13): one gradient reduction per optimizer step whatever the number of micro-batches (DDP's
no_sync, FSDP2's set_requires_gradient_sync), and no host read of a tensor by llmft's own step code but the
stop-signal agreement (which runs on the host). 2 ranks over gloo, in-process Trainers.

Not counted: transformers' own check for packed sequences (`masking_utils.find_packed_sequence_indices`, a
`.all()` per forward), torch's AdamW reading its step counter (a CPU tensor unless capturable: no device sync), and
the CPU's per-sample attention reading collate's sample offsets (`attention.sdpa_per_sample`: chosen on a CPU only,
refused by name on a GPU, so the tensor it reads is always on the host)."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from support.runs import REPO

pytestmark = pytest.mark.slow

LLMFT = str(REPO / "llmft")
SIGNAL_MODULE = os.path.join("llmft", "training", "signals.py")
CPU_ONLY = ("sdpa_per_sample",)  # functions that run on a CPU only (the module's docstring)


# (strategy, micro-batches per optimizer step); "fsdp-full": full fine-tuning under FSDP2
RUNS = [("ddp", 1), ("ddp", 4), ("fsdp", 1), ("fsdp", 4), ("fsdp-full", 1), ("fsdp-full", 4)]


def rank_main(rank: int, world_size: int, port: int, root: str, out: str) -> None:
    """Every run of RUNS in turn on this rank (one process group and one start-up for all of them)."""
    os.environ.update({"RANK": str(rank), "WORLD_SIZE": str(world_size), "LOCAL_RANK": str(rank),
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1"})
    torch.set_num_threads(1)
    for strategy, accum in RUNS:
        counts = count_one_run(str(Path(root) / f"{strategy}-{accum}"), strategy, accum)
        Path(out, f"{strategy}-{accum}-rank{rank}.json").write_text(json.dumps(counts))


def count_one_run(run_dir: str, strategy: str, accum: int) -> dict:
    from llmft.config.compose import compose
    from llmft.training.loop import Trainer

    full = strategy.endswith("-full")
    strategy = strategy.removesuffix("-full")
    cfg = compose([f"parallelism={strategy}", f"train.grad_accum_steps={accum}", "train.max_steps=3",
                   "train.micro_batch_size=1", "train.log_every=100", "train.eval_every=100", "train.save_every=0",
                   "peft.dropout=0", "launch.nproc=2", f"run_dir={run_dir}"] + (["peft=full"] if full else []))
    Path(run_dir).mkdir(parents=True, exist_ok=True)
    trainer = Trainer(cfg, Path(run_dir))
    counts = {"reductions": 0, "syncs": [], "steps": 0, "held_gradient_elements": [],
              "sharded_elements": sum(p.to_local().numel() if hasattr(p, "to_local") else p.numel()
                                      for p in trainer.model.parameters() if p.requires_grad)}
    if strategy == "fsdp":  # the gradient elements this rank holds after each micro-batch's backward
        real_forward_backward = trainer.forward_backward

        def measured(batch, count):
            result = real_forward_backward(batch, count)
            counts["held_gradient_elements"].append(held_gradient_elements(trainer.model))
            return result

        trainer.forward_backward = measured
    restore = lambda: None  # noqa: E731

    if strategy == "ddp":
        from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

        def counting_hook(state, bucket):
            counts["reductions"] += 1
            return allreduce_hook(state, bucket)

        trainer.model.register_comm_hook(None, counting_hook)
    else:
        import torch.distributed.fsdp._fully_shard._fsdp_param_group as param_group

        real_reduce = param_group.foreach_reduce

        def counting_reduce(*args, **kwargs):
            counts["reductions"] += 1
            return real_reduce(*args, **kwargs)

        param_group.foreach_reduce = counting_reduce
        restore = lambda: setattr(param_group, "foreach_reduce", real_reduce)  # noqa: E731  (for the next run)

    # host syncs: a tensor read by the host (item, float, int, bool, tolist) during a step, outside the signal check
    originals = {name: getattr(torch.Tensor, name) for name in ("item", "__float__", "__int__", "__bool__", "tolist")}

    def counting(name):
        def read(self, *args, **kwargs):
            caller = sys._getframe(1).f_code.co_filename
            if caller.startswith(LLMFT) and not caller.endswith(SIGNAL_MODULE) \
                    and sys._getframe(1).f_code.co_name not in CPU_ONLY:
                counts["syncs"].append(f"{name} from {caller}:{sys._getframe(1).f_lineno}")
            return originals[name](self, *args, **kwargs)
        return read

    real_step = trainer.train_step

    def observed_step():
        counts["steps"] += 1
        if counts["steps"] == 1:  # the first step reads its loss once (first_loss in summary.json)
            return real_step()
        for name in originals:
            setattr(torch.Tensor, name, counting(name))
        try:
            real_step()
        finally:
            for name, original in originals.items():
                setattr(torch.Tensor, name, original)

    trainer.train_step = observed_step
    try:
        trainer.train()
    finally:
        restore()
    return counts


def held_gradient_elements(model) -> int:
    """Gradient elements held by FSDP2 on this rank: the sharded gradients, and the unsharded ones it keeps while
    gradient sync is off (its parameters' unsharded .grad, or their upcast copy for a reduce dtype)."""
    held = 0
    for module in model.modules():
        group = module._get_fsdp_state()._fsdp_param_group if hasattr(module, "_get_fsdp_state") else None
        for fsdp_param in group.fsdp_params if group is not None else []:
            unsharded = getattr(fsdp_param, "_unsharded_param", None)
            for grad in (getattr(fsdp_param, "unsharded_accumulated_grad", None),
                         unsharded.grad if unsharded is not None else None, fsdp_param.sharded_param.grad):
                if grad is not None:
                    held += (grad.to_local() if hasattr(grad, "to_local") else grad).numel()
    return held


@pytest.fixture(scope="module")
def counted(tmp_path_factory) -> dict:
    """Rank 0's counts of every run of RUNS, all in one mp.spawn of 2 ranks: {(strategy, accum): counts}."""
    root = tmp_path_factory.mktemp("lean")
    out = root / "out"
    out.mkdir()
    port = 29650 + (os.getpid() % 200)
    mp.spawn(rank_main, args=(2, port, str(root), str(out)), nprocs=2, join=True)
    return {(strategy, accum): json.loads((out / f"{strategy}-{accum}-rank0.json").read_text())
            for strategy, accum in RUNS}


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_one_gradient_reduction_per_optimizer_step_and_no_host_sync(counted, strategy):
    one, four = counted[strategy, 1], counted[strategy, 4]
    assert one["steps"] == four["steps"] == 3
    # the same reductions for 4 micro-batches a step as for 1: once per bucket (DDP) or per layer group (FSDP2)
    assert four["reductions"] == one["reductions"] > 0, (one, four)
    assert four["syncs"] == [] and one["syncs"] == [], four["syncs"]


def test_fsdp_full_fine_tuning_accumulates_sharded_gradients(counted):
    """Full fine-tuning under FSDP2 reduce-scatters every micro-batch (issue 28 item 1): with sync off it would hold
    every gradient unsharded (and, in bf16, upcast to fp32) until the last micro-batch: 4 bytes per parameter on
    every GPU, which plan does not count. LoRA keeps one reduction per step (its gradients are small)."""
    one, four = counted["fsdp-full", 1], counted["fsdp-full", 4]
    assert four["reductions"] == 4 * one["reductions"] > 0, (one, four)
    assert max(four["held_gradient_elements"]) == four["sharded_elements"], four  # never more than this rank's shards
    lora = counted["fsdp", 4]  # LoRA: the unsharded adapter gradients are held between micro-batches, by design
    assert max(lora["held_gradient_elements"]) > lora["sharded_elements"]
