"""Run by tests/test_families.py under torchrun: train each RUN_DIR in turn (one start-up for every family and
strategy), then record the trained, still-wrapped model's logits on a fixed probe (a collective forward under FSDP2)
in OUT (a torch file written by rank 0), keyed by run directory."""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist

from llmft.rundir.files import read_config
from llmft.rundir import lock as run_lock
from llmft.training.loop import train

PROBE_IDS = [[5, 17, 42, 99, 7, 120, 31, 8, 64, 12]]


def main(out: str, run_dirs: list[str]) -> None:
    results = {}
    for run_dir in run_dirs:
        result = train(read_config(run_dir), Path(run_dir))
        model = result.model.eval()
        with torch.no_grad():
            logits = model(input_ids=torch.tensor(PROBE_IDS)).logits
        if dist.get_rank() == 0:
            results[run_dir] = {"logits": logits.float().cpu(), "summary": result.summary}
            run_lock.release(Path(run_dir))  # train() leaves the run's lock to its caller (llmft.training.loop.run)
        dist.barrier()
    if dist.get_rank() == 0:
        torch.save(results, out)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
