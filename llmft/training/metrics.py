"""What a run shows while it runs: `metrics.jsonl` always, TensorBoard event files in RUN_DIR/tensorboard, wandb
in offline mode when `train.wandb=true`, MLflow when `train.mlflow=true` (tracking.py), a progress bar in a terminal,
a one-line status otherwise.

A SLURM log is not a terminal, so there a status line every `train.log_every` steps replaces the bar.
"""

from __future__ import annotations

import json
import os
import sys
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Callable, ContextManager

import torch

from llmft.rundir.layout import tensorboard_dir


class MetricsLog:
    def __init__(self, path: Path, total_steps: int, start_step: int, enabled: bool, use_wandb: bool = False,
                 mlflow=None, guard: Callable[[str], ContextManager] = lambda doing: nullcontext()):
        self.enabled = enabled
        self.path = path
        self.guard = guard  # bounds each write's time (rundir/checkpoints.guard_write): a stalled file system says so
        self.total_steps = total_steps
        self.start_time = time.time()
        self.start_step = start_step
        self.file = open(path, "a") if enabled else None
        self.bar = None
        self.tensorboard = None
        self.wandb_run = None
        if enabled:
            from torch.utils.tensorboard import SummaryWriter

            self.tensorboard = SummaryWriter(log_dir=str(tensorboard_dir(path.parent)))
        if enabled and use_wandb:
            try:
                import wandb
            except ImportError:
                raise RuntimeError("train.wandb=true needs wandb: pip install wandb") from None
            # offline: compute nodes have no internet; `wandb sync RUN_DIR/wandb/offline-run-*` from a login node
            self.wandb_run = wandb.init(mode="offline", dir=str(path.parent), name=path.parent.name)
        self.mlflow = mlflow  # the run's MlflowTracking (train.mlflow=true, rank 0), else None
        if enabled and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True)

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        step = record["step"]
        with self.guard(f"writing the metrics of step {step} ({self.path}, TensorBoard)"):
            self.file.write(json.dumps(record) + "\n")
            self.file.flush()
            for name, value in record.items():
                if name != "step" and isinstance(value, (int, float)):
                    self.tensorboard.add_scalar(("val/" if name.startswith("val") else "train/") + name, value, step)
            if self.wandb_run is not None:
                self.wandb_run.log(record, step=step)
            if self.mlflow is not None:
                self.mlflow.log_metrics(record)

    def show(self, step: int, record: dict) -> None:
        """Advance the bar to `step` with the latest figures, or print one status line without a terminal."""
        if not self.enabled:
            return
        figures = {k: record[k] for k in ("loss", "val_loss", "reward_accuracy", "val_reward_accuracy", "reward_margin",
                                          "tokens_per_s") if k in record}
        text = " ".join(f"{k}={v:.4g}" for k, v in figures.items())
        if self.bar is not None:
            self.bar.update(step - self.bar.n)
            if text:
                self.bar.set_postfix_str(text)
            return
        if text:
            elapsed = time.time() - self.start_time
            done = step - self.start_step
            eta = elapsed / done * (self.total_steps - step) if done else 0.0
            print(f"step {step}/{self.total_steps} {text} elapsed={elapsed:.0f}s eta={eta:.0f}s", flush=True)

    def __enter__(self) -> "MetricsLog":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.enabled:
            with self.guard(f"closing {self.path} and TensorBoard's event file"):
                if self.file is not None:
                    self.file.close()
                if self.tensorboard is not None:
                    self.tensorboard.close()
                if self.wandb_run is not None:
                    self.wandb_run.finish()
        self.file = self.bar = self.tensorboard = self.wandb_run = None


class MemoryMeter:
    """Peak memory of this rank since the previous reading: GPU memory allocated by torch, or on a CPU the process's
    resident memory (its high-water mark, reset after each reading where Linux allows)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.interval_peak_gb()  # start the first interval now

    def interval_peak_gb(self) -> float:
        if self.device.type == "cuda":
            peak = torch.cuda.max_memory_allocated(self.device) / 2**30
            torch.cuda.reset_peak_memory_stats(self.device)
            return peak
        peak = peak_resident_mb() / 2**10
        reset_peak_resident()
        return peak


def resident_mb() -> float:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def reset_peak_resident() -> None:
    """Start a new high-water mark of resident memory (Linux: writing 5 to clear_refs resets VmHWM)."""
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
    except OSError:
        pass  # then the peak since the process started is reported: an overestimate, never an underestimate


def peak_resident_mb() -> float:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 2**10  # kB
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10


def quiet_progress_bars() -> None:
    """transformers' and datasets' own progress bars ("Loading checkpoint shards", "Saving the dataset") only in a
    terminal: in a SLURM log they are hundreds of carriage-return lines between llmft's status lines."""
    if sys.stderr.isatty():
        return
    import datasets
    import transformers

    transformers.utils.logging.disable_progress_bar()
    datasets.disable_progress_bars()
