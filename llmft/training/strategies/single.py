"""One process, one replica: plain torch AdamW. Checkpoint: trainable tensors (safetensors) + optimizer state."""

from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path

import torch

from llmft.config.schema import PeftMethod
from llmft.training.precision import loss_scaler


class SingleStrategy:
    name = "single"
    builds_on_meta = False
    broadcasts_from_rank0 = False
    partitions_parameters = False

    sharded_gradients = False  # FSDP2's: DTensors, whose loss scaler must agree across ranks on inf/NaN

    def __init__(self, cfg, topology, compute):
        self.cfg = cfg
        self.topology = topology
        self.compute = compute  # the autocast dtype, None for fp32 (training/precision.py)
        self.scaler = loss_scaler(compute, topology.device_type, self.sharded_gradients)  # fp16 only
        self.model = None
        self.optimizer = None
        self.scheduler = None
        self.trainable = []

    def loading_context(self):
        return nullcontext()

    def full_shape(self, param) -> tuple[int, ...]:
        return tuple(param.shape)  # a replica's own; FSDP2's DTensor says its global shape too

    def place(self, model) -> None:
        if self.cfg.peft.method is PeftMethod.qlora:
            return  # bitsandbytes put the 4-bit weights on this rank's GPU while loading (device_map)
        model.to(self.topology.device)

    def wrap(self, model, trainable, lr_lambda):
        self.model = model
        self.trainable = trainable
        tcfg = self.cfg.train
        self.optimizer = torch.optim.AdamW(
            trainable, lr=tcfg.lr, betas=(tcfg.adam_beta1, tcfg.adam_beta2), weight_decay=tcfg.weight_decay
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda)
        return model

    def no_gradient_sync(self):
        return nullcontext()  # one replica: nothing to synchronise

    def backward(self, loss):
        (self.scaler.scale(loss) if self.scaler else loss).backward()

    def step(self) -> torch.Tensor:
        if self.scaler:  # the norm and the clipping of the true gradients; a step with inf/NaN is skipped
            self.scaler.unscale_(self.optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(self.trainable, self.cfg.train.max_grad_norm)
        if self.scaler:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return grad_norm

    def scaler_state(self) -> dict:
        return {"scaler": self.scaler.state_dict()} if self.scaler else {}

    def load_scaler_state(self, state: dict) -> None:
        if self.scaler and "scaler" in state:  # a checkpoint of an fp32/bf16 run resumed in fp16 starts a new scale
            self.scaler.load_state_dict(state["scaler"])

    def lr(self) -> float:
        return self.scheduler.get_last_lr()[0]

    def _trainable_named(self):
        return {n: p for n, p in self.model.named_parameters() if p.requires_grad}

    def save(self, folder: Path) -> None:
        """Replicas are identical: rank 0 writes the trained tensors, the schedule and the optimizer's settings, and
        every rank the optimizer moments of its share of the parameters (every world_size-th one), in parallel: the
        moments are two thirds of the state (AdamW's two fp32 tensors per weight), and a stop at the time limit
        waits for the slowest writer (training/time_limit.py)."""
        from safetensors.torch import save_file

        optimizer_state = self.optimizer.state_dict()
        rank, world = self.topology.rank, self.topology.world_size
        mine = {index: moments for index, moments in optimizer_state["state"].items() if index % world == rank}
        torch.save(mine, folder / f"optimizer_moments_{rank}_of_{world}.pt")
        if not self.topology.is_main:
            return
        save_file({n: p.detach().cpu().contiguous() for n, p in self._trainable_named().items()},
                  folder / "trainable.safetensors")
        torch.save({"param_groups": optimizer_state["param_groups"], "scheduler": self.scheduler.state_dict(),
                    **self.scaler_state()}, folder / "optimizer.pt")

    def load(self, folder: Path) -> None:
        from safetensors.torch import load_file

        tensors = load_file(folder / "trainable.safetensors", device=str(self.topology.device))
        missing = set(self._trainable_named()) - set(tensors)
        if missing:
            raise RuntimeError(f"{folder} lacks {len(missing)} trainable tensors (e.g. {sorted(missing)[0]})")
        with torch.no_grad():
            for name, param in self._trainable_named().items():
                param.copy_(tensors[name])
        state = torch.load(folder / "optimizer.pt", weights_only=False, map_location=self.topology.device)
        if "optimizer" not in state:  # the moments in parts, one per rank of the run that saved (any number)
            moments = {}
            for part in sorted(folder.glob("optimizer_moments_*_of_*.pt")):
                moments.update(torch.load(part, weights_only=False, map_location=self.topology.device))
            state["optimizer"] = {"state": moments, "param_groups": state["param_groups"]}
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.load_scaler_state(state)
        replan_lr(self.scheduler)

    def sharding_report(self) -> dict:
        """How many parameter elements this rank holds, against the model's total (a full replica here)."""
        numel = sum(p.numel() for p in self.model.parameters())
        return {"local_numel": numel, "global_numel": numel, "sharded_params": 0}

    def export_tensors(self):
        """Replicas are identical: rank 0's own tensors, no collective."""
        if self.topology.is_main:
            for name, param in self._trainable_named().items():
                yield name, param.detach().cpu()


def replan_lr(scheduler) -> None:
    """After a checkpoint's LR schedule state is loaded: the next step's learning rate from this run's schedule (its
    lr_lambda), which plans another number of steps when a resume changes train.max_steps or train.epochs (a
    completed run trained on). LambdaLR's own formula: bitwise the loaded value when the schedule is the same."""
    lrs = [base_lr * lmbda(scheduler.last_epoch) for lmbda, base_lr in zip(scheduler.lr_lambdas, scheduler.base_lrs)]
    for group, lr in zip(scheduler.optimizer.param_groups, lrs):
        group["lr"] = lr
    scheduler._last_lr = lrs
