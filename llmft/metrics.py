"""What a run shows while it runs: `metrics.jsonl` always, a progress bar in a terminal, one-line status otherwise.

A SLURM log is not a terminal, so there a status line every `train.log_every` steps replaces the bar.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path


class MetricsLog:
    def __init__(self, path: Path, total_steps: int, start_step: int, enabled: bool):
        self.enabled = enabled
        self.total_steps = total_steps
        self.start_time = time.time()
        self.start_step = start_step
        self.file = open(path, "a") if enabled else None
        self.bar = None
        if enabled and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True)

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()

    def show(self, step: int, record: dict) -> None:
        """Advance the bar to `step` with the latest figures, or print one status line without a terminal."""
        if not self.enabled:
            return
        figures = {k: record[k] for k in ("loss", "val_loss", "tokens_per_s") if k in record}
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

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.file is not None:
            self.file.close()
