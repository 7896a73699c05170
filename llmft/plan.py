"""python -m llmft.plan [overrides]: what a launch would do, without doing it.

Prints the resolved resources and the exact sbatch script `llmft.launch` would submit with the same overrides.
Submits nothing, creates nothing but a scratch folder for submitit's renderer. Imports no torch.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

from omegaconf import DictConfig

from llmft.config import ConfigError, validate
from llmft.launch import compose_or_exit


def describe(cfg: DictConfig) -> str:
    from llmft import slurm

    lines = [f"model       {cfg.model.name} ({cfg.model.path or 'built: random weights'})",
             f"method      peft={cfg.peft.method.value}  parallelism={cfg.parallelism.strategy.value}"]
    if cfg.cluster is None:
        lines.append(f"where       local, {cfg.launch.nproc} process(es); add +cluster=NAME to plan a SLURM job")
        return "\n".join(lines)
    resources = slurm.resolve(cfg)
    lines += [
        f"cluster     {cfg.cluster.name}, {resources.kind} nodes (partition {resources.partition}, "
        f"constraint {resources.constraint})",
        f"resources   {resources.nodes} node(s) x {resources.gpus_per_node} GPU(s) = {resources.world_size} ranks, "
        f"{resources.cpus_per_task} CPUs per task",
        f"time        {resources.time} (QoS {resources.qos or 'default'}"
        + (f", limit {resources.qos_max_time}" if resources.qos_max_time else "") + ")",
        f"account     {resources.account or '(default)'}",
        f"requeues    up to {cfg.cluster.max_requeues} at the time limit (USR2 {cfg.cluster.signal_delay_s} s before)",
    ]
    with tempfile.TemporaryDirectory() as scratch:
        executor = slurm.make_executor(cfg, Path(scratch) / "RUN_DIR")
        script = slurm.sbatch_script(executor).replace(str(Path(scratch) / "RUN_DIR"), "RUN_DIR")
    lines += ["", "sbatch script (RUN_DIR: the run directory created at submission):", "", script]
    return "\n".join(lines)


def main() -> int:
    cfg = compose_or_exit(sys.argv[1:])
    try:
        validate(cfg, check_paths=False)
        print(describe(cfg))
    except ConfigError as error:
        print(f"llmft: {error}", file=sys.stderr)
        return 2
    from llmft.config import model_path_problem

    problem = model_path_problem(cfg)
    if problem:
        print(f"\nwarning: {problem} (launch checks it again and refuses a missing model)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
