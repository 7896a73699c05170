"""A rank that SLURM bound to fewer CPUs than the job asks per task says so (issue: srun without -c from Slurm 22.05).

The binding is the process's CPU affinity, which task/affinity and task/cgroup set and `taskset` sets here: the local
SLURM claims 192 CPUs per node for Jean Zay's job shapes on a 2-CPU machine, and Slurm's binding maps its tasks onto
CPUs that do not exist (measured: `srun -n2 -c1` under task/affinity bound both tasks to CPU 0), so the binding
itself is applied with taskset and the job's request with SLURM_CPUS_PER_TASK, as srun leaves them in a task.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from support.runs import REPO

PROBE = "from llmft.training.topology import cpu_binding_warning; print(cpu_binding_warning())"


def probe(env: dict, bind_to: str | None = None) -> str:
    command = ([*(["taskset", "-c", bind_to] if bind_to else []), sys.executable, "-c", PROBE])
    return subprocess.run(command, cwd=REPO, capture_output=True, text=True, check=True, timeout=60,
                          env={k: v for k, v in {**os.environ, **env}.items() if v is not None}).stdout.strip()


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs 2 CPUs to bind a process to fewer")
def test_a_rank_bound_to_fewer_cpus_than_asked_is_told_how_to_start_it():
    cpus = len(os.sched_getaffinity(0))
    assert probe({"SLURM_CPUS_PER_TASK": str(cpus)}, bind_to="0") == (
        f"llmft: warning: this rank may run on 1 CPU(s) of the {cpus} the job asks per task (--cpus-per-task): srun "
        f"was not given -c (from Slurm 22.05 it does not inherit it) and the site binds tasks to their CPUs; start the "
        f"ranks with `srun --cpus-per-task=$SLURM_CPUS_PER_TASK ...` or export SRUN_CPUS_PER_TASK=$SLURM_CPUS_PER_TASK "
        f"before srun (llmft's templates and its submitit jobs do).")
    assert probe({"SLURM_CPUS_PER_TASK": str(cpus)}) == "None"  # bound to what it asked
    assert probe({"SLURM_CPUS_PER_TASK": "1"}, bind_to="0") == "None"
    assert probe({"SLURM_CPUS_PER_TASK": None}, bind_to="0") == "None"  # not under SLURM: nothing to compare with
    # not bound (every CPU of the machine) on a machine smaller than the request: nothing srun could fix
    assert probe({"SLURM_CPUS_PER_TASK": str(cpus * 4)}) == "None"


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs 2 CPUs to bind a process to fewer")
def test_a_run_started_bound_to_one_cpu_prints_the_warning_once(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "SLURM_CPUS_PER_TASK": "2"}
    result = subprocess.run(["taskset", "-c", "0", sys.executable, "-m", "llmft.launch", "train.max_steps=1",
                             "train.save_every=0", f"run_dir={tmp_path / 'run'}"], cwd=REPO, capture_output=True,
                            text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    output = result.stdout + result.stderr
    assert output.count("llmft: warning: this rank may run on 1 CPU(s) of the 2 the job asks per task") == 1, output
