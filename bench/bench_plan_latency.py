#!/usr/bin/env python3
"""Launcher latency: `python -m llmft.plan ...` wall time against `python -c "import torch"` (ratio).

    python bench/bench_plan_latency.py [--repeats 5]

Both commands run as fresh processes, alternately, `--repeats` times each; the medians are compared. The login node
is shared and slow: plan must answer faster than the training stack can even be imported.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PLAN = [sys.executable, "-m", "llmft.plan", "+cluster=jeanzay", "cluster.gpu=a100", "cluster.account=abc",
        "cluster.nodes=2", "model=llama7b", "parallelism=zero3", "train.max_steps=1000"]
IMPORT_TORCH = [sys.executable, "-c", "import torch"]


def wall_time(command: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(command, cwd=REPO, check=True, capture_output=True)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    wall_time(PLAN), wall_time(IMPORT_TORCH)  # warm the file cache for both
    plan, torch = [], []
    for _ in range(args.repeats):
        plan.append(wall_time(PLAN))
        torch.append(wall_time(IMPORT_TORCH))
    plan_median, torch_median = statistics.median(plan), statistics.median(torch)
    print(f"median of {args.repeats}: llmft.plan {plan_median:.3f} s, import torch {torch_median:.3f} s, "
          f"ratio plan / import torch {plan_median / torch_median:.2f}")


if __name__ == "__main__":
    main()
