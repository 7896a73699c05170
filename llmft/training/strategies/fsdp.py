"""FSDP2 (`torch.distributed.fsdp.fully_shard`): each decoder layer, then the root, sharded over all ranks.

Parameters become DTensors sharded on dim 0. Checkpoints are DCP (torch.distributed.checkpoint): each rank writes
its shards, LoRA keys and their optimizer state only when LoRA (frozen base weights are not saved: they are on
disk already), and DCP reshards on load, so a run saved on 2 ranks resumes on 1 or 4.
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_state_dict,
)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

from llmft.training.model import decoder_layers, init_lora_weights, load_shards
from llmft.training.strategies.single import SingleStrategy


@contextmanager
def _no_gradient_sync(model):
    """FSDP2's way to accumulate without a reduce-scatter per micro-batch: the last micro-batch, outside this context,
    reduces the accumulated (unsharded) gradients once."""
    model.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)


class FSDPStrategy(SingleStrategy):
    name = "fsdp"
    builds_on_meta = True

    def place(self, model) -> None:
        if not any(p.is_meta for p in model.parameters()):  # a model built whole (tiny): to the device, then shard
            model.to(self.topology.device)

    def wrap(self, model, trainable, lr_lambda):
        mesh = init_device_mesh(self.topology.device_type, (self.topology.world_size,))
        mp_policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) \
            if self.bf16 else MixedPrecisionPolicy()
        for layer in decoder_layers(model):
            fully_shard(layer, mesh=mesh, mp_policy=mp_policy)
        fully_shard(model, mesh=mesh, mp_policy=mp_policy)
        if any(p.is_meta for p in model.parameters()):
            self.materialize(model)
        # fully_shard replaced the parameters with DTensors: collect the trainable ones again.
        return super().wrap(model, [p for p in model.parameters() if p.requires_grad], lr_lambda)

    def materialize(self, model) -> None:
        """Allocate this rank's shards of a model built on meta, and fill them from the safetensors files."""
        buffers = {name: buffer.clone() for name, buffer in model.named_buffers()}  # rotary tables: computed, real
        model.to_empty(device=self.topology.device)
        with torch.no_grad():
            for name, buffer in model.named_buffers():
                buffer.copy_(buffers[name])
        load_shards(model, Path(self.cfg.model.path), self.topology.rank, self.topology.world_size)
        init_lora_weights(model, self.cfg.train.seed)

    def no_gradient_sync(self):
        return _no_gradient_sync(self.model)

    def step(self) -> torch.Tensor:
        grad_norm = torch.nn.utils.clip_grad_norm_(self.trainable, self.cfg.train.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm

    def _options(self, **kwargs) -> StateDictOptions:
        lora = self.cfg.peft.method.value != "full"
        return StateDictOptions(ignore_frozen_params=lora, **kwargs)

    def save(self, folder: Path) -> None:
        model_state, optim_state = get_state_dict(self.model, self.optimizer, options=self._options())
        dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=str(folder / "dcp"))
        if self.topology.is_main:
            torch.save({"scheduler": self.scheduler.state_dict()}, folder / "scheduler.pt")

    def load(self, folder: Path) -> None:
        model_state, optim_state = get_state_dict(self.model, self.optimizer, options=self._options())
        state = {"model": model_state, "optim": optim_state}
        dcp.load(state, checkpoint_id=str(folder / "dcp"))
        set_state_dict(self.model, self.optimizer, model_state_dict=state["model"],
                       optim_state_dict=state["optim"], options=self._options(strict=False))
        self.scheduler.load_state_dict(torch.load(folder / "scheduler.pt", weights_only=False)["scheduler"])

    def sharding_report(self) -> dict:
        from torch.distributed.tensor import DTensor

        params = list(self.model.parameters())
        return {
            "local_numel": sum(p.to_local().numel() if isinstance(p, DTensor) else p.numel() for p in params),
            "global_numel": sum(p.numel() for p in params),
            "sharded_params": sum(isinstance(p, DTensor) for p in params),
        }

    def trainable_state_for_export(self):
        """Gather the full tensors to rank 0 (a collective: every rank calls it)."""
        state = get_model_state_dict(self.model, options=self._options(full_state_dict=True, cpu_offload=True))
        dist.barrier()
        return state if self.topology.is_main else None
