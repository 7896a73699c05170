"""Stop signals: SLURM's warning before the time limit (SIGUSR2), scancel / preemption (SIGTERM) and Ctrl-C (SIGINT)
ask the run to stop at the next step boundary, with a checkpoint; a second Ctrl-C aborts at once.

The handler only records the signal: ranks agree at a step boundary (a collective), write the checkpoint of that
step together, and stop. Checkpointing inside the handler would interrupt a collective.
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading

import torch
import torch.distributed as dist

from llmft.training.topology import Topology


class Interrupted(Exception):
    """The run stopped at a signal after checkpointing; `requeued` when the SLURM job was put back in the queue."""

    def __init__(self, step: int, signal_name: str, requeued: bool):
        super().__init__(f"stopped by {signal_name} at step {step}")
        self.step, self.signal_name, self.requeued = step, signal_name, requeued


class StopSignals:
    """A context manager: the handlers are installed on entry and the previous ones restored on exit, whatever
    happens in between."""

    SIGNALS = (signal.SIGUSR2, signal.SIGTERM, signal.SIGINT)

    def __init__(self, topology: Topology):
        self.topology = topology
        self.received = 0
        self.previous: dict = {}
        # The agreement runs on the host (gloo) even under NCCL: reading a GPU tensor would make the host wait for
        # the whole step's GPU work at every step. On the host it costs one small message, no device sync.
        self.group = None
        if topology.is_distributed and topology.device_type == "cuda":
            self.group = dist.new_group(backend="gloo")

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            self.previous = {s: signal.signal(s, self._record) for s in self.SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)
        self.previous = {}

    def _record(self, signum, frame) -> None:
        if signum == signal.SIGINT and self.received == signal.SIGINT:
            raise KeyboardInterrupt  # the second Ctrl-C: abort now, without the checkpoint
        self.received = signum

    def agreed(self) -> int:
        """The signal any rank received (0: none). Every rank calls it at the same step: one small all-reduce."""
        if not self.topology.is_distributed:
            return self.received
        flag = torch.tensor([self.received], dtype=torch.int64)  # on the host
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.group)
        return int(flag.item())


def requeue_slurm_job(max_requeues: int, topology: Topology) -> bool:
    """Rank 0 puts the SLURM job back in the queue (below `max_requeues`); the next attempt resumes."""
    job_id = os.environ.get("SLURM_JOB_ID")
    restarts = int(os.environ.get("SLURM_RESTART_COUNT", "0"))
    if not job_id or restarts >= max_requeues:
        return False
    if topology.is_main:
        result = subprocess.run(["scontrol", "requeue", job_id], timeout=60)
        # SLURM ends the job's processes with SIGTERM once the requeue is accepted, and `scontrol` runs inside the
        # job: that SIGTERM can end it before it returns (seen under load). It means the job was requeued.
        if result.returncode not in (0, -signal.SIGTERM):
            raise subprocess.CalledProcessError(result.returncode, result.args)
    return True
