"""What differs per parallelism strategy, behind one interface (`Strategy`); one module per strategy.

`single` and `ddp` hold full replicas; `fsdp` shards with FSDP2 (`fully_shard`) and checkpoints with DCP;
`zero2`, `zero3` and `zero3_offload` go through `deepspeed.initialize`. The loop calls the members of `Strategy`
and nothing else: no `if strategy == ...` and no DeepSpeed or FSDP detail outside these modules.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, ContextManager, Iterator, Optional, Protocol

import torch

from llmft.config.schema import Parallelism
from llmft.config.validation import settle_parallelism
from llmft.training.topology import Topology


class Strategy(Protocol):
    name: str
    builds_on_meta: bool  # the model loader builds the skeleton on the meta device; wrap() loads this rank's shards
    # wrap() broadcasts rank 0's weights to every replica (DDP, ZeRO-2): the other ranks need not read them from disk
    broadcasts_from_rank0: bool
    # a parameter is whole only inside its module's forward and backward (ZeRO-3): a gradient made outside them (the
    # loss head's, training/loss.py) would find it partitioned
    partitions_parameters: bool

    def full_shape(self, param: torch.nn.Parameter) -> tuple[int, ...]:
        """A parameter's whole shape, however this strategy shards or partitions it."""

    def loading_context(self) -> ContextManager:
        """Around loading a model from disk: ZeRO-3 makes transformers partition it as it loads; else nothing."""

    def place(self, model: torch.nn.Module) -> None:
        """Put a loaded model on this rank's device, unless it is there already (QLoRA), on meta or partitioned."""

    def wrap(self, model: torch.nn.Module, trainable: list, lr_lambda: Callable[[int], float]) -> torch.nn.Module:
        """Replicate or shard the model; build the optimizer and the LR schedule. Returns the model to call."""

    def no_gradient_sync(self) -> ContextManager:
        """Around the backward passes of all but the last micro-batch of a step: gradients accumulate locally and
        are reduced once per optimizer step."""

    def backward(self, loss: torch.Tensor) -> None:
        """The loss is already normalised for the global batch (no further division)."""

    def step(self) -> torch.Tensor:
        """Clip, optimizer and scheduler step, zero the gradients; the gradient norm before clipping (on device)."""

    def lr(self) -> float: ...

    def save(self, folder: Path) -> None:
        """Model-or-adapter and optimizer state into `folder` (collective: every rank calls it)."""

    def load(self, folder: Path) -> None:
        """The state `save` wrote, possibly with another number of ranks (collective)."""

    def sharding_report(self) -> dict:
        """Parameter elements this rank holds against the model's total, and how many parameters are sharded."""

    def export_tensors(self) -> Iterator[tuple[str, Optional[torch.Tensor]]]:
        """(name, full tensor on rank 0's CPU; None on other ranks) for each trained parameter, gathered one at a time
        (or a module at a time): a collective under fsdp and zero3, so every rank iterates to the end."""


def build(cfg, topology: Topology, compute) -> Strategy:
    """The strategy for this run, `parallelism=auto` settled from the real number of ranks; `compute`: the autocast
    dtype, None for fp32 (training/precision.py)."""
    name = settle_parallelism(cfg, topology.world_size, f"this job's {topology.world_size} ranks",
                              topology.ranks_per_node)
    if name is Parallelism.single:
        from llmft.training.strategies.single import SingleStrategy

        return SingleStrategy(cfg, topology, compute)
    if name is Parallelism.ddp:
        from llmft.training.strategies.ddp import DDPStrategy

        return DDPStrategy(cfg, topology, compute)
    if name in (Parallelism.fsdp, Parallelism.hsdp):
        from llmft.training.strategies.fsdp import FSDPStrategy

        return FSDPStrategy(cfg, topology, compute)
    from llmft.training.strategies.deepspeed import DeepSpeedStrategy

    return DeepSpeedStrategy(cfg, topology, compute)
