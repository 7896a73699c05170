"""The job's time limit against what a stop costs: the stop checkpoint must be written before SLURM kills the job.

SLURM sends USR2 `cluster.signal_delay_s` seconds (the templates: 120) before the time limit; the ranks then finish
the step under way (and a validation already started), write the stop checkpoint and requeue. When that takes longer
than the margin (a full state written by rank 0, a slow file system), SLURM's SIGKILL comes first and the job is never
requeued. So rank 0 measures what a stop costs (a step, a validation, a save: the last ones, as the run goes) and,
once it exceeds the margin, says so once and stops on its own early enough: when the job's end (asked of `squeue`
once, at start) is nearer than that cost with a safety factor, the ranks stop as if the signal had come.
"""

from __future__ import annotations

import datetime
import subprocess
import time
from contextlib import contextmanager

SAFETY = 1.5  # the cost of a stop varies (a save on a busy file system): stop while 1.5 times it still fits
REQUEUE_S = 10  # scontrol requeue and the ranks' exit
# One writer's rate to a parallel file system (a GPFS or Lustre client), for a save not measured yet: a conservative
# figure, the measured one replaces it at the first save.
WRITE_BYTES_PER_S = 500e6
WEIGHT_BYTES, MOMENT_BYTES = 4, 8  # per trained parameter: its fp32 weight, AdamW's two fp32 moments


def busiest_writer_bytes(trainable: int, world: int, sharded: bool) -> float:
    """The bytes of a checkpoint the busiest rank writes: its shard of everything under fsdp/hsdp/zero; under
    single/ddp rank 0's, the weights and its share of the moments (every rank writes a share: strategies/single.py)."""
    if sharded:
        return trainable * (WEIGHT_BYTES + MOMENT_BYTES) / world
    return trainable * (WEIGHT_BYTES + MOMENT_BYTES / world)


def job_end_time(job_id: str) -> float | None:
    """The epoch time SLURM ends the job at (`squeue -o %e`), None when unknown (no squeue, no limit, a failure)."""
    try:
        result = subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%e"], capture_output=True, text=True,
                                timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    text = result.stdout.strip()
    if result.returncode != 0 or not text or text in ("N/A", "NONE", "Unknown"):
        return None
    try:
        return datetime.datetime.fromisoformat(text).timestamp()  # the cluster's local time, as the node's clock
    except ValueError:
        return None


class TimeLimit:
    """Rank 0's watch over the margin before the time limit (the other ranks learn of a stop through the agreement)."""

    def __init__(self, margin_s: float, end_time: float | None, log, expected_save_s: float = 0.0):
        self.margin_s, self.end_time, self.log = margin_s, end_time, log
        # the last of each; the save's estimated from the state's size until one is measured
        self.seconds = {"step": 0.0, "validation": 0.0, "save": expected_save_s}
        self.save_measured = False
        self.warned = False

    @property
    def step_s(self) -> float:
        return self.seconds["step"]

    @property
    def validation_s(self) -> float:
        return self.seconds["validation"]

    @property
    def save_s(self) -> float:
        return self.seconds["save"]

    def stop_cost(self) -> float:
        return self.step_s + self.validation_s + self.save_s + REQUEUE_S

    @contextmanager
    def timed(self, part: str):
        """Measure a step, a validation or a save; once a save is known, a margin too short is said once."""
        started = time.time()
        yield
        self.seconds[part] = time.time() - started
        self.save_measured = self.save_measured or part == "save"
        cost = self.stop_cost()
        if self.save_measured and cost > self.margin_s and not self.warned:
            self.warned = True
            fallback = "the run stops on its own before the time limit (it knows the job's end)" \
                if self.end_time is not None else "the job's end is unknown here (squeue), so nothing replaces it"
            self.log(f"time limit: a stop costs {cost:.0f} s here (a step {self.step_s:.0f} s, a validation "
                     f"{self.validation_s:.0f} s, a checkpoint {self.save_s:.0f} s), more than the "
                     f"{self.margin_s:.0f} s between SLURM's USR2 and the time limit (cluster.signal_delay_s): "
                     f"{fallback}; give it cluster.signal_delay_s={advised_margin_s(cost)}")

    def near(self, now: float | None = None) -> bool:
        """The job's end is nearer than a stop costs (with the safety factor) and SLURM's signal would come too late
        for it: stop now."""
        if self.end_time is None or not self.save_s or self.stop_cost() <= self.margin_s:
            return False
        return (now or time.time()) + SAFETY * self.stop_cost() >= self.end_time


def advised_margin_s(stop_cost_s: float) -> int:
    """The USR2 margin that leaves a stop costing `stop_cost_s` its safety factor, in whole minutes."""
    return max(120, 60 * -(-int(SAFETY * stop_cost_s) // 60))
