"""FSDP2 (`torch.distributed.fsdp.fully_shard`): each decoder layer, then the root, sharded over all ranks (fsdp), or
over groups of `parallelism.shard_size` ranks and replicated across the groups (hsdp: a 2-D mesh, replicas x shards,
so the per-layer all-gathers stay inside a node and gradients cross nodes once per step).

Parameters become DTensors sharded on dim 0. Checkpoints are DCP (torch.distributed.checkpoint): each rank writes
its shards, LoRA keys and their optimizer state only when LoRA (frozen base weights are not saved: they are on
disk already), and DCP reshards on load, so a run saved on 2 ranks resumes on 1 or 4.
"""

from __future__ import annotations

import warnings
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_state_dict,
    set_state_dict,
)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

from llmft.config.schema import Parallelism, PeftMethod
from llmft.config.validation import hsdp_mesh_shape
from llmft.training.model import allocate, decoder_layers, init_lora, load_weights
from llmft.training.strategies.single import SingleStrategy, replan_lr


def rows_of_rank(num_rows: int, world_size: int, rank: int) -> tuple[int, int]:
    """The rows of dim 0 that FSDP2 gives a rank: torch.chunk's split (ceil-sized chunks, the last ones shorter)."""
    chunk = -(-num_rows // world_size)
    start = min(num_rows, rank * chunk)
    return start, min(num_rows, start + chunk)


def dim0_shard(param) -> tuple[int, int]:
    """(this rank's shard index, number of shards) of a DTensor sharded on its rows: its coordinate on the mesh
    dimension that shards (fsdp: the only one; hsdp: the second, the first replicates)."""
    from torch.distributed.tensor import Shard

    coordinate = param.device_mesh.get_coordinate()
    for mesh_dim, placement in enumerate(param.placements):
        if isinstance(placement, Shard) and placement.dim == 0:
            return coordinate[mesh_dim], param.device_mesh.size(mesh_dim)
    return 0, 1


def shard_rows(param):
    """(this rank's local tensor, first row, end row) of a parameter FSDP2 sharded on dim 0 (a DTensor), for
    `load_weights` and `init_lora_weights`: each rank reads and fills only its own rows."""
    from torch.distributed.tensor import DTensor

    if not isinstance(param, DTensor):
        return param, 0, param.shape[0]
    index, count = dim0_shard(param)
    start, end = rows_of_rank(param.shape[0], count, index)
    return param.to_local(), start, end


@contextmanager
def _no_gradient_sync(model, full_fine_tuning: bool = False, hsdp: bool = False):
    """Accumulation across micro-batches. With sync off FSDP2 keeps each gradient unsharded (and upcast to the fp32
    reduce dtype) until the last micro-batch reduces them once: right for LoRA, whose gradients are small, but for
    full fine-tuning that is 4 bytes per parameter on every GPU (32 GB for 8B), which `plan` does not count. So full
    fine-tuning reduce-scatters every micro-batch (its gradients accumulate sharded), and HSDP only defers the
    all-reduce across replicas (torchtitan's choice; pytorch PR 126166)."""
    if full_fine_tuning and not hsdp:
        yield
        return
    if full_fine_tuning:
        model.set_requires_all_reduce(False)
    else:
        model.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        if full_fine_tuning:
            model.set_requires_all_reduce(True)
        else:
            model.set_requires_gradient_sync(True)


class FSDPStrategy(SingleStrategy):
    builds_on_meta = True
    broadcasts_from_rank0 = False
    sharded_gradients = True

    def __init__(self, cfg, topology, compute):
        super().__init__(cfg, topology, compute)
        # ShardedGradScaler's inf check makes a one-element DTensor per gradient: torch warns once per rank, for nothing
        warnings.filterwarnings("ignore", message="Found a non-scalar tensor with numel=1")
        self.name = "hsdp" if cfg.parallelism.strategy is Parallelism.hsdp else "fsdp"

    def mesh(self):
        """fsdp: one dimension, every rank. hsdp: (replicas, shard group), shard groups made of consecutive ranks,
        i.e. of the ranks of one node when the group is a node (SLURM and torchrun number ranks node by node)."""
        topology = self.topology
        if self.name != "hsdp":
            return init_device_mesh(topology.device_type, (topology.world_size,))
        shape = hsdp_mesh_shape(self.cfg.parallelism.shard_size, topology.world_size, topology.ranks_per_node,
                                f"this job's {topology.world_size} ranks")
        return init_device_mesh(topology.device_type, shape, mesh_dim_names=("replicate", "shard"))

    def place(self, model) -> None:
        if not any(p.is_meta for p in model.parameters()):  # a model built whole (tiny): to the device, then shard
            model.to(self.topology.device)

    def wrap(self, model, trainable, lr_lambda):
        mesh = self.mesh()
        mp_policy = MixedPrecisionPolicy(param_dtype=self.compute, reduce_dtype=torch.float32) \
            if self.compute is not None else MixedPrecisionPolicy()
        for layer in decoder_layers(model):
            fully_shard(layer, mesh=mesh, mp_policy=mp_policy)
        fully_shard(model, mesh=mesh, mp_policy=mp_policy)
        if any(p.is_meta for p in model.parameters()):
            self.materialize(model)
        # fully_shard replaced the parameters with DTensors: collect the trainable ones again.
        return super().wrap(model, [p for p in model.parameters() if p.requires_grad], lr_lambda)

    def materialize(self, model) -> None:
        """Allocate this rank's shards of a model built on meta, and fill them from the safetensors files."""
        allocate(model, self.topology.device)
        load_weights(model, Path(self.cfg.model.path), local_rows=shard_rows)
        init_lora(model, self.cfg, local_rows=shard_rows)  # seeded, or the adapter of init_from

    def no_gradient_sync(self):
        return _no_gradient_sync(self.model, self.cfg.peft.method is PeftMethod.full, self.name == "hsdp")

    def step(self) -> torch.Tensor:
        grad_norm = super().step()
        return grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm

    def _options(self, **kwargs) -> StateDictOptions:
        lora = self.cfg.peft.method is not PeftMethod.full
        return StateDictOptions(ignore_frozen_params=lora, **kwargs)

    def save(self, folder: Path) -> None:
        model_state, optim_state = get_state_dict(self.model, self.optimizer, options=self._options())
        dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=str(folder / "dcp"))
        if self.topology.is_main:
            torch.save({"scheduler": self.scheduler.state_dict(), **self.scaler_state()}, folder / "scheduler.pt")

    def load(self, folder: Path) -> None:
        model_state, optim_state = get_state_dict(self.model, self.optimizer, options=self._options())
        state = {"model": model_state, "optim": optim_state}
        dcp.load(state, checkpoint_id=str(folder / "dcp"))
        set_state_dict(self.model, self.optimizer, model_state_dict=state["model"],
                       optim_state_dict=state["optim"], options=self._options(strict=False))
        state = torch.load(folder / "scheduler.pt", weights_only=False)
        self.scheduler.load_state_dict(state["scheduler"])
        self.load_scaler_state(state)
        replan_lr(self.scheduler)

    def sharding_report(self) -> dict:
        from torch.distributed.tensor import DTensor

        params = list(self.model.parameters())
        return {
            "local_numel": sum(p.to_local().numel() if isinstance(p, DTensor) else p.numel() for p in params),
            "global_numel": sum(p.numel() for p in params),
            "sharded_params": sum(isinstance(p, DTensor) for p in params),
        }

    def export_tensors(self):
        """Gathered parameter by parameter (`full_tensor()`, a collective: every rank iterates to the end): the GPUs
        hold one whole tensor at a time, and rank 0 copies each to its CPU as it comes."""
        from torch.distributed.fsdp import FSDPModule
        from torch.distributed.tensor import DTensor

        for module in self.model.modules():  # after a forward the root stays unsharded: back to DTensor shards first
            if isinstance(module, FSDPModule):
                module.reshard()
        lora = self.cfg.peft.method is not PeftMethod.full
        for name, param in self.model.named_parameters():
            if lora and not param.requires_grad:
                continue
            full = param.full_tensor() if isinstance(param, DTensor) else param
            yield name, full.detach().cpu() if self.topology.is_main else None
            del full
