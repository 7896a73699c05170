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
    # This rank's GPU among those the process sees: its local rank where it sees the node's GPUs (--gres), 0 where
    # SLURM binds one GPU per task (--gpus-per-task=1, --gpu-bind, CUDA_VISIBLE_DEVICES of one device).
    gpu_index: int | None = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1

    @property
    def device(self):
        import torch

        if self.device_type != "cuda":
            return torch.device("cpu")
        return torch.device("cuda", self.local_rank if self.gpu_index is None else self.gpu_index)

    @staticmethod
    def from_env() -> "Topology":
        """Who started this process decides: torchrun (TORCHELASTIC_RUN_ID; its RANK / WORLD_SIZE / LOCAL_RANK), else a
        SLURM step (srun: SLURM_PROCID / SLURM_NTASKS / SLURM_LOCALID, which win over a RANK inherited from the
        submitting shell), else RANK / WORLD_SIZE set by hand, else one process."""
        import torch

        env = os.environ
        slurm_task = "SLURM_PROCID" in env and "SLURM_NTASKS" in env and ("SLURM_STEP_ID" in env or "RANK" not in env)
        if "TORCHELASTIC_RUN_ID" not in env and slurm_task:
            world_size, rank = int(env["SLURM_NTASKS"]), int(env["SLURM_PROCID"])
            local_rank = int(env.get("SLURM_LOCALID", 0))
            num_nodes = int(env.get("SLURM_NNODES", 1))
        elif "RANK" in env:
            world_size, rank = int(env.get("WORLD_SIZE", 1)), int(env["RANK"])
            local_rank = int(env.get("LOCAL_RANK", 0))
            num_nodes = int(env.get("LLMFT_NUM_NODES", env.get("SLURM_NNODES", 1)))
        else:
            world_size, rank, local_rank, num_nodes = 1, 0, 0, 1
        device_type = "cuda" if torch.cuda.is_available() else "cpu"
        gpu_index = None
        if device_type == "cuda":
            ranks_per_node = max(1, world_size // max(1, num_nodes))
            gpu_index = visible_gpu_index(local_rank, ranks_per_node, torch.cuda.device_count())
        return Topology(world_size, rank, local_rank, num_nodes, device_type, gpu_index)

    def export_env(self) -> None:
        """RANK, WORLD_SIZE and LOCAL_RANK in the environment, whatever started the rank (torchrun, submitit, a bare
        srun that only sets SLURM_*): DeepSpeed's zero.Init and engine read LOCAL_RANK from there, and bind that GPU
        index: on a GPU it is this rank's GPU among the visible ones (0 where one GPU is bound per task)."""
        os.environ["RANK"], os.environ["WORLD_SIZE"] = str(self.rank), str(self.world_size)
        local = self.device.index if self.device_type == "cuda" else self.local_rank
        os.environ["LOCAL_RANK"], os.environ["LOCAL_WORLD_SIZE"] = str(local), str(self.ranks_per_node)

    @property
    def ranks_per_node(self) -> int:
        return max(1, self.world_size // max(1, self.num_nodes))

    def init_process_group(self, timeout_min: float = 30.0) -> None:
        """Join the ranks: bind this rank's GPU first (so NCCL, FSDP2 and barriers use it, never GPU 0 from every
        rank), then init_process_group with that device. MASTER_ADDR / MASTER_PORT come from the environment
        (torchrun, submitit, or the sbatch templates in slurm/)."""
        import datetime

        import torch
        import torch.distributed as dist

        if not self.is_distributed or dist.is_initialized():
            return  # one process (trained in the launcher's own process, or a test's): its environment stays as it was
        self.export_env()
        extra = {}
        if self.device_type == "cuda":
            torch.cuda.set_device(self.device)
            extra["device_id"] = self.device
        dist.init_process_group(backend="nccl" if self.device_type == "cuda" else "gloo", rank=self.rank,
                                world_size=self.world_size, timeout=datetime.timedelta(minutes=timeout_min), **extra)

    def barrier(self) -> None:
        """All ranks meet here (on this rank's bound GPU under NCCL); nothing with one rank."""
        if self.is_distributed:
            import torch.distributed as dist

            dist.barrier()

    def gather(self, value) -> list:
        """Every rank's `value` (a small picklable object), on every rank, in rank order."""
        if not self.is_distributed:
            return [value]
        import torch.distributed as dist

        values: list = [None] * self.world_size
        dist.all_gather_object(values, value)
        return values


def visible_gpu_index(local_rank: int, ranks_per_node: int, visible: int) -> int:
    """The index, among the GPUs this process sees, of the GPU of the rank `local_rank` of a node running
    `ranks_per_node` ranks (one GPU each). RuntimeError in one sentence when the binding fits neither way."""
    if visible >= ranks_per_node:
        return local_rank  # every task sees the node's GPUs (--gres=gpu:N): one each, by local rank
    if visible == 1:
        return 0  # SLURM (or the user) bound one GPU to this task
    raise RuntimeError(f"this rank sees {visible} GPUs for {ranks_per_node} ranks on its node: give each task one GPU "
                       f"(--gpus-per-task=1) or every task all of them (--gres=gpu:{ranks_per_node}), one rank per GPU.")



def cpu_binding_warning() -> str | None:
    """One sentence when SLURM bound this rank to fewer CPUs than the job asked per task, else None.

    From Slurm 22.05 `srun` no longer inherits `--cpus-per-task` from sbatch or salloc: an `srun` without `-c` (or
    SRUN_CPUS_PER_TASK) in a job with `--cpus-per-task=8` starts each task with one CPU, and a site that binds tasks to
    their CPUs (task/affinity, task/cgroup) leaves the rank one core for its step's host side, its data loading and its
    checkpoint writes. The job's value stays in SLURM_CPUS_PER_TASK; the binding is the process's affinity."""
    asked = os.environ.get("SLURM_CPUS_PER_TASK", "")
    if not asked.isdigit() or not hasattr(os, "sched_getaffinity"):
        return None
    usable = len(os.sched_getaffinity(0))
    if usable >= int(asked) or usable >= (os.cpu_count() or 1):
        return None  # as many as asked, or not bound at all (a machine smaller than the request: the local SLURM's)
    return (f"llmft: warning: this rank may run on {usable} CPU(s) of the {asked} the job asks per task "
            f"(--cpus-per-task): srun was not given -c (from Slurm 22.05 it does not inherit it) and the site binds "
            f"tasks to their CPUs; start the ranks with `srun --cpus-per-task=$SLURM_CPUS_PER_TASK ...` or export "
            f"SRUN_CPUS_PER_TASK=$SLURM_CPUS_PER_TASK before srun (llmft's templates and its submitit jobs do).")
