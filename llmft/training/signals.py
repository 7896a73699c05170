"""Stop signals: SLURM's warning before the time limit (SIGUSR2), scancel / preemption (SIGTERM) and Ctrl-C (SIGINT)
ask the run to stop; a second Ctrl-C aborts at once. Honoured from the first instruction of a rank to its exit:

    recording()        the handlers, from the top of `python -m llmft.train` (before torch is imported), of the
                       launcher (its composition, an in-process run) and of `loop.run` (submitit's tasks)
    StopSignals        the ranks' agreement on a recorded signal: at each phase boundary before the first step
                       (after the data, the model, the resume, the objective's preparation) and at each step

The handler only records the signal: ranks agree at a boundary (a collective), then stop together: in the loop with
the checkpoint of that step; before the first step with nothing new to save. The final export (after the last step's
checkpoint) is not cut: a collective under fsdp and zero3, and seconds for an adapter; one still running
`EXPORT_GRACE_S` after the signal gets the SLURM job requeued meanwhile (loop.Trainer.finish). Checkpointing inside
the handler would interrupt a collective. (A rank whose launcher is gone before training started is ended by the
kernel: llmft/rundir/lifetime.py.)

Torch-free at import: the launcher (login node) records signals through this module too.
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from llmft.training.topology import Topology

STOP_SIGNALS = (signal.SIGUSR2, signal.SIGTERM, signal.SIGINT)
# The launcher records these from its start (llmft/launch/__main__.py): one while it composes, checks and creates the
# run directory stops the run before it starts; then the run honours it (in that process, or forwarded to torchrun's
# ranks). Ctrl-C stays Python's KeyboardInterrupt until a run starts.
LAUNCHER_SIGNALS = (signal.SIGUSR2, signal.SIGTERM)
# A final export still running this long after a stop signal gets the SLURM job requeued, and goes on: it finishes
# (the run completes) or SLURM ends it (the next attempt writes final/ from the last step's checkpoint). An adapter
# takes seconds; 30 s is a quarter of the templates' USR2 margin (120 s), which leaves the rest for the requeue.
EXPORT_GRACE_S = 30.0


class Interrupted(Exception):
    """The run stopped at a signal; `requeued` when the SLURM job was put back in the queue. `phase`: what the ranks
    were doing when they agreed to stop, None in the step loop (then the checkpoint of `step` is saved)."""

    def __init__(self, step: int, signal_name: str, requeued: bool, phase: str | None = None):
        self.step, self.signal_name, self.requeued, self.phase = step, signal_name, requeued, phase
        super().__init__(self.what())

    def what(self) -> str:
        """What happened and what is saved, without how to continue."""
        if self.phase is None:
            return f"stopped by {self.signal_name} at step {self.step}; the checkpoint is saved"
        return f"stopped by {self.signal_name} while {self.phase}, before training: nothing new to save"

    def sentence(self, resume_command: str) -> str:
        """The one line printed (and kept in summary.json's `message`)."""
        return self.what() + ("; the SLURM job is requeued and resumes" if self.requeued else
                              f"; continue with: {resume_command}")

    def summary(self, run_dir) -> dict:
        """summary.json of the run stopped: how, where, and the line that says it (the launcher prints it)."""
        resume = f"python -m llmft.launch resume={Path(run_dir).resolve()}"
        return {"status": "requeued" if self.requeued else "interrupted", "step": self.step,
                "signal": self.signal_name, "phase": self.phase or "training", "resume": resume,
                "message": self.sentence(resume)}


class StoppedEarly(Exception):
    """A long part of the start (the universal-checkpoint conversion of a ZeRO checkpoint) left off at a recorded stop
    signal, keeping what it finished for the next attempt: the ranks then agree on the signal and stop (the Trainer's
    resume). `phase`: what was left off."""

    def __init__(self, phase: str):
        self.phase = phase
        super().__init__(phase)


TIME_LIMIT = 1000  # a stop agreed because the job's time limit is near (training/time_limit.py), not a signal


def name_of(code: int) -> str:
    """How a stop code is said: a signal's name, or the time limit."""
    return "the job's time limit" if code == TIME_LIMIT else signal.Signals(code).name


# The process's recorded stop signal, the first one (a later one, such as SLURM's SIGTERM after the requeue USR2 led
# to, changes nothing): a process (a rank, the launcher) stops once, whoever asks.
_received = 0
_received_at: float | None = None  # time.monotonic() of the first stop signal
_ctrl_c = False  # a first Ctrl-C came: the second aborts
_depth = 0  # nested recording(): the state is reset when the outermost one starts and ends


def _record(signum, frame) -> None:
    global _received, _received_at, _ctrl_c
    if signum == signal.SIGINT:
        if _ctrl_c:
            raise KeyboardInterrupt  # the second Ctrl-C: abort now, without the checkpoint
        _ctrl_c = True
    if not _received:
        _received, _received_at = signum, time.monotonic()


@contextmanager
def recording(signals: tuple = STOP_SIGNALS):
    """Record `signals` (the handlers installed on entry, the previous ones restored on exit) in the main thread."""
    global _received, _received_at, _ctrl_c, _depth
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    if _depth == 0:
        _received, _received_at, _ctrl_c = 0, None, False
    previous = {s: signal.signal(s, _record) for s in signals}
    _depth += 1
    try:
        yield
    finally:
        _depth -= 1
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        if _depth == 0:  # what comes next in this process (a test) starts afresh
            _received, _received_at, _ctrl_c = 0, None, False


def received() -> int:
    """The stop signal this process recorded (0: none)."""
    return _received


def seconds_since_received() -> float | None:
    """How long ago this process recorded its first stop signal (None: none)."""
    return None if _received_at is None else time.monotonic() - _received_at


class StopSignals:
    """The ranks' agreement on the recorded stop signal, for a Trainer (after the process group exists)."""

    def __init__(self, topology: "Topology"):
        import torch.distributed as dist

        self.topology = topology
        # The agreement runs on the host (gloo) even under NCCL: reading a GPU tensor would make the host wait for
        # the whole step's GPU work at every step. On the host it costs one small message, no device sync.
        self.group = None
        if topology.is_distributed and topology.device_type == "cuda":
            self.group = dist.new_group(backend="gloo")

    def agreed(self, also: int = 0) -> int:
        """The signal any rank received (0: none), or `also` where a rank has a reason of its own to stop (rank 0's
        TIME_LIMIT, above every signal number). Every rank calls it at the same boundary: one small all-reduce."""
        import torch
        import torch.distributed as dist

        if not self.topology.is_distributed:
            return max(_received, also)
        flag = torch.tensor([max(_received, also)], dtype=torch.int64)  # on the host
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.group)
        return int(flag.item())


def requeue_slurm_job(max_requeues: int, topology: "Topology") -> bool:
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
