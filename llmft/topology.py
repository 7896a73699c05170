"""The one place that knows the topology: nodes, world size, rank, local rank, device.

Read from the environment set by the launcher: torchrun-style variables (RANK, WORLD_SIZE, LOCAL_RANK) or, under
srun, SLURM's (SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID, SLURM_NNODES). Everything else asks this object.
"""

from __future__ import annotations

import os
from dataclasses import dataclass


@dataclass(frozen=True)
class Topology:
    world_size: int
    rank: int
    local_rank: int
    num_nodes: int
    device_type: str  # "cuda" or "cpu"

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1

    @property
    def device(self):
        import torch

        return torch.device(f"cuda:{self.local_rank}" if self.device_type == "cuda" else "cpu")

    @staticmethod
    def from_env() -> "Topology":
        import torch

        env = os.environ
        if "RANK" in env:
            world_size, rank = int(env["WORLD_SIZE"]), int(env["RANK"])
            local_rank = int(env.get("LOCAL_RANK", 0))
            num_nodes = int(env.get("LLMFT_NUM_NODES", env.get("SLURM_NNODES", 1)))
        elif "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
            world_size, rank = int(env["SLURM_NTASKS"]), int(env["SLURM_PROCID"])
            local_rank = int(env.get("SLURM_LOCALID", 0))
            num_nodes = int(env.get("SLURM_NNODES", 1))
        else:
            world_size, rank, local_rank, num_nodes = 1, 0, 0, 1
        device_type = "cuda" if torch.cuda.is_available() else "cpu"
        return Topology(world_size, rank, local_rank, num_nodes, device_type)
