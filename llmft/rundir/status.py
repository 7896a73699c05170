"""A run's status, computed here only: from SLURM (sacct) while a cluster job is pending or running, else from the run
directory (summary.json; a run with metrics but no summary is running or was killed). `llmft.runs` shows it, a sweep
reads its trials' with it. No torch here.
"""

from __future__ import annotations

import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from llmft.rundir.files import read_config, read_jobs, read_metrics, read_summary
from llmft.rundir.layout import is_run_dir

# DPO / KTO: the reward figures of the last step and of the last validation
REWARD_KEYS = ("reward_accuracy", "reward_margin", "kl", "val_reward_accuracy", "val_reward_margin")


@dataclass
class RunStatus:
    name: str  # the run directory's name
    # summary.json's status (completed, failed, interrupted, requeued), else SLURM's state of its last job in lower
    # case (pending, running...), else `running?` (metrics but no summary: running, or killed) or `created`
    status: str
    job_ids: list[str] = field(default_factory=list)  # its training jobs, oldest first
    requeues: int = 0  # of its last job
    step: int = 0
    total_steps: int | None = None  # None: not known yet (train.epochs, before the run starts)
    loss: float | None = None
    val_loss: float | None = None
    tokens_per_s: float | None = None
    error: str | None = None  # why it failed
    rewards: dict[str, float] = field(default_factory=dict)


def slurm_state(job_id: str) -> tuple[str | None, int]:
    """(state, requeues) of a job from sacct, or (None, 0) without SLURM accounting. With --duplicates sacct lists
    every attempt of a requeued job: the requeues are the attempts but the last."""
    try:
        out = subprocess.run(["sacct", "-j", job_id, "--duplicates", "-X", "-n", "-P", "-o", "State"],
                             capture_output=True, text=True, timeout=20).stdout.strip().splitlines()
    except (OSError, subprocess.SubprocessError):
        return None, 0
    if not out:
        return None, 0
    return out[-1].split()[0], len(out) - 1


def run_status(run_dir: Path | str, ask_slurm: bool = True) -> RunStatus:
    """The run's status and progress. `ask_slurm=False` reads the run directory only (a sweep's trial whose job it
    waited for: what summary.json says is what ended it)."""
    run_dir = Path(run_dir)
    summary = read_summary(run_dir)
    metrics = read_metrics(run_dir)
    train_records = [r for r in metrics if "loss" in r]
    val_records = [r for r in metrics if "val_loss" in r]
    jobs = [j for j in read_jobs(run_dir) if j.get("kind") != "eval"]  # training jobs
    status = summary.get("status") or ("running?" if train_records else "created")
    requeues = 0
    if jobs and ask_slurm:
        state, requeues = slurm_state(jobs[-1]["job_id"])
        if state and status not in ("completed", "failed"):
            status = state.lower()
    total = summary.get("total_steps")
    if total is None and is_run_dir(run_dir):
        total = read_config(run_dir).train.max_steps
    return RunStatus(
        name=run_dir.name, status=status, job_ids=[str(j["job_id"]) for j in jobs], requeues=requeues,
        step=train_records[-1]["step"] if train_records else 0,
        total_steps=total if total and total > 0 else None,
        loss=train_records[-1]["loss"] if train_records else None,
        val_loss=val_records[-1]["val_loss"] if val_records else None,
        tokens_per_s=train_records[-1].get("tokens_per_s") if train_records else None,
        error=summary.get("error"),
        rewards={k: r[k] for r in train_records[-1:] + val_records[-1:] for k in REWARD_KEYS if k in r},
    )
