"""SLURM: resources from a cluster profile, checks before submission, and submission through submitit.

`llmft.launch +cluster=NAME` calls `submit()` itself (Hydra's submitit launcher only engages with --multirun, so a
single run would otherwise train on the login node). One task per GPU; submitit's TorchDistributedEnvironment turns
the SLURM variables into RANK / WORLD_SIZE / LOCAL_RANK; MASTER_ADDR and MASTER_PORT are those rank 0 publishes in the
run directory (its node, a port free there: `agree_on_rendezvous`). `llmft.plan` prints the very script `submit()` would hand to sbatch.

No torch here: this runs on the login node.
"""

from __future__ import annotations

import contextlib
import os
import sys
import unittest.mock
from dataclasses import dataclass
from pathlib import Path

from omegaconf import DictConfig

from llmft.config.redact import REDACTED, redact_argv
from llmft.config.validation import check_eval, settle_parallelism
from llmft.launch.estimate import inference_gpus
from llmft.errors import ConfigError


@dataclass
class Resources:
    kind: str
    partition: str | None
    constraint: str | None
    nodes: int
    gpus_per_node: int
    cpus_per_task: int
    time: str
    minutes: int
    account: str | None
    qos: str | None
    qos_max_time: str | None
    longest_qos_time: str | None

    @property
    def world_size(self) -> int:
        return self.nodes * self.gpus_per_node


def parse_time(value: str, key: str = "cluster.time") -> int:
    """HH:MM:SS (hours may exceed 24) -> minutes, rounded up."""
    parts = str(value).split(":")
    try:
        hours, minutes, seconds = (int(p) for p in parts) if len(parts) == 3 else (None, None, None)
    except ValueError:
        hours = None
    if hours is None or not (0 <= minutes < 60 and 0 <= seconds < 60):
        raise ConfigError(f"{key}={value} is not a duration HH:MM:SS (for example {key}=20:00:00).")
    return hours * 60 + minutes + (1 if seconds else 0)


def resolve(cfg: DictConfig) -> Resources:
    """The job's resources from the profile and the overrides, checked; ConfigError with one sentence otherwise."""
    cluster = cfg.cluster
    profile = f"conf/cluster/{cluster.name}.yaml"
    if cluster.gpu not in cluster.kinds:
        raise ConfigError(f"cluster.gpu={cluster.gpu} is not one of {', '.join(cluster.kinds)} ({profile}).")
    kind = cluster.kinds[cluster.gpu]
    gpus_per_node = kind.gpus_per_node if cluster.gpus_per_node is None else cluster.gpus_per_node
    if cluster.nodes < 1 or gpus_per_node < 1:
        raise ConfigError(f"cluster.nodes={cluster.nodes} and cluster.gpus_per_node={gpus_per_node} must be >= 1.")
    if gpus_per_node > kind.gpus_per_node:
        raise ConfigError(
            f"cluster.gpus_per_node={gpus_per_node} exceeds the {kind.gpus_per_node} GPUs of a {cluster.name} "
            f"{cluster.gpu} node: use cluster.nodes={-(-gpus_per_node // kind.gpus_per_node)} "
            f"cluster.gpus_per_node={kind.gpus_per_node}."
        )
    minutes = parse_time(cluster.time)
    qos, qos_max_time = cluster.qos, None
    longest = max(kind.qos, key=lambda q: parse_time(q.max_time), default=None)
    if cluster.qos:
        known = next((q for q in kind.qos if q.name == cluster.qos), None)
        qos_max_time = known.max_time if known else None
    elif kind.qos:
        fitting = [q for q in kind.qos if parse_time(q.max_time) >= minutes]
        if not fitting:
            raise ConfigError(
                f"cluster.time={cluster.time} exceeds the longest QoS of {cluster.name} {cluster.gpu} nodes "
                f"({longest.name}, {longest.max_time}): ask for cluster.time={longest.max_time} or less; at the "
                f"limit the job checkpoints, requeues itself and resumes (up to cluster.max_requeues="
                f"{cluster.max_requeues} times)."
            )
        qos, qos_max_time = fitting[0].name, fitting[0].max_time
    if qos_max_time and minutes > parse_time(qos_max_time):
        raise ConfigError(f"cluster.time={cluster.time} exceeds {qos}'s limit of {qos_max_time}.")
    account = cluster.account
    if not account and cluster.account_required:
        suffix = f"@{kind.account_suffix}" if kind.account_suffix else ""
        raise ConfigError(
            f"cluster.account is not set: {cluster.name} charges every job to a project; add "
            f"cluster.account=<project> (llmft submits as <project>{suffix})."
        )
    if account and kind.account_suffix and "@" not in account:
        account = f"{account}@{kind.account_suffix}"
    resources = Resources(
        kind=cluster.gpu, partition=kind.partition, constraint=kind.constraint, nodes=cluster.nodes,
        gpus_per_node=gpus_per_node, cpus_per_task=kind.cpus_per_gpu, time=cluster.time, minutes=minutes,
        account=account, qos=qos, qos_max_time=qos_max_time,
        longest_qos_time=longest.max_time if longest else None,
    )
    # the job's ranks are known: its run directory records the strategy they run
    cfg.parallelism.strategy = settle_parallelism(cfg, resources.world_size,
                                                  f"cluster.nodes={cluster.nodes} x cluster.gpus_per_node={gpus_per_node}")
    return resources


def setup_lines(cfg: DictConfig, resources: Resources) -> list[str]:
    cluster = cfg.cluster
    lines = [*cluster.setup, *cluster.kinds[resources.kind].setup]
    lines += [f'export {name}="{value}"' for name, value in cluster.env.items()]
    return lines


def make_executor(cfg: DictConfig, run_dir: Path, render_only: bool = False):
    """A submitit executor configured for this run; its folder (RUN_DIR/slurm) holds the script and the logs.

    `render_only`: for `plan` on any machine, SLURM or not (a laptop, CI, another cluster's login node). submitit
    refuses to build a SLURM executor where `srun` is not on PATH; rendering the script needs no SLURM at all, so
    its check is answered for the construction only (nothing is submitted through this executor).
    """
    import submitit

    cluster = cfg.cluster
    resources = resolve(cfg)
    srun_check = contextlib.nullcontext() if not render_only else \
        unittest.mock.patch.object(submitit.SlurmExecutor, "affinity", classmethod(lambda cls: 1))
    with srun_check:
        executor = submitit.AutoExecutor(
            folder=run_dir / "slurm",
            cluster="slurm",
            slurm_max_num_timeout=cluster.max_requeues,
            slurm_python=cluster.python or sys.executable,
        )
    extra = dict(cluster.extra_sbatch)
    if cluster.hint_nomultithread:
        extra["hint"] = "nomultithread"
    parameters = {
        "name": f"llmft-{run_dir.name}",
        "nodes": resources.nodes,
        "tasks_per_node": resources.gpus_per_node,  # one task (rank) per GPU
        "cpus_per_task": resources.cpus_per_task,
        "timeout_min": resources.minutes,
        "slurm_signal_delay_s": cluster.signal_delay_s,
        "slurm_setup": setup_lines(cfg, resources),
        "slurm_additional_parameters": extra,
        # one task failing ends the step (and the job): the other ranks must not wait in a collective for hours
        # -c: from Slurm 22.05 srun no longer inherits --cpus-per-task; with CPU binding each rank would get one core
        "slurm_srun_args": ["--kill-on-bad-exit=1", f"--cpus-per-task={resources.cpus_per_task}"],
    }
    optional = {"slurm_partition": resources.partition, "slurm_account": resources.account,
                "slurm_qos": resources.qos, "slurm_constraint": resources.constraint}
    parameters.update({k: v for k, v in optional.items() if v})
    if cluster.gpu_request == "gres":
        parameters["slurm_gres"] = f"gpu:{resources.gpus_per_node}"
    elif cluster.gpu_request == "gpus_per_node":
        parameters["gpus_per_node"] = resources.gpus_per_node
    executor.update_parameters(**parameters)
    return executor


def sbatch_script(executor) -> str:
    """The exact script submitit hands to sbatch for this executor (submitit's own renderer)."""
    slurm_executor = executor._executor  # submitit has no public API for the script text; this is its renderer
    return slurm_executor._make_submission_file_text(slurm_executor._submitit_command_str, "plan")


class TrainJob:
    """What each SLURM task runs (pickled by submitit): set up torch.distributed from SLURM, then train.

    Time limits are handled by the training loop, not by submitit's own USR2 handler: submitit would call a
    checkpoint method inside the signal handler on rank 0 alone, while the other ranks wait in a collective. llmft's
    handlers replace submitit's at the task's first instruction (submitit's would requeue from rank 0 alone while the
    others go on, and ignore SIGTERM) and record the signal; all ranks agree on it at the first boundary of the run
    (before training: nothing to save) or at a step (they save together), and rank 0 requeues the job.
    """

    def __init__(self, run_dir: str):
        self.run_dir = run_dir

    def __call__(self) -> dict:
        from llmft.rundir.lifetime import end_task_without_teardown
        from llmft.training import signals  # torch-free

        done = end_task_without_teardown()  # once submitit has written the result (llmft/rundir/lifetime.py)
        with signals.recording():  # a signal during the rendezvous (up to minutes) is honoured by the run below
            import submitit

            submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
            os.environ["MASTER_ADDR"], port = agree_on_rendezvous(Path(self.run_dir))
            os.environ["MASTER_PORT"] = str(port)
            from llmft.training.loop import Interrupted, run

            try:
                summary = run(Path(self.run_dir)).summary
                done()
                return summary
            except Interrupted as stop:
                if int(os.environ.get("RANK", "0")) == 0:  # the attempt's log says why it ended, as the templates'
                    resume = f"python -m llmft.launch resume={Path(self.run_dir).resolve()}"
                    print(f"llmft: {stop.sentence(resume)}", file=sys.stderr, flush=True)
                if stop.requeued:
                    sys.exit(-1)  # like submitit: no result file, the job is back in the queue
                raise


def agree_on_rendezvous(run_dir: Path, timeout_s: float = 300) -> tuple[str, int]:
    """The rendezvous (MASTER_ADDR, MASTER_PORT): rank 0's node and a port free there, the same for every task of
    this attempt, on every node.

    submitit derives MASTER_PORT from the job id: two jobs sharing a node can collide, and a requeued attempt (same
    job id) can find the port still held by the previous one (EADDRINUSE, then the other ranks wait). Rank 0 asks
    the kernel for a free port on its own node and writes it with that node's SLURM name into the run directory
    (shared storage, as every rank reads it); the others read both, so the address is always the node where the
    port was found free (submitit's MASTER_ADDR, the allocation's first node, is rank 0's node only under the
    default block distribution). One file per attempt (job id, restart count): an earlier attempt's is never used.
    """
    import json
    import socket
    import time

    attempt = f"{os.environ.get('SLURM_JOB_ID', 'local')}-{os.environ.get('SLURM_RESTART_COUNT', '0')}"
    path = run_dir / "slurm" / f"rendezvous-{attempt}.json"
    if int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0"))) == 0:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            probe.bind(("", 0))
            port = probe.getsockname()[1]
        host = os.environ.get("SLURMD_NODENAME") or socket.gethostname()  # the name the other nodes resolve
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"port": port, "host": host}))
        os.replace(tmp, path)
        return host, port
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        try:
            published = json.loads(path.read_text())
            return str(published["host"]), int(published["port"])
        except (OSError, ValueError, KeyError):
            time.sleep(0.2)
    raise RuntimeError(f"rank 0 did not publish the rendezvous in {path} within {timeout_s:.0f} s")


class EvalJob:
    """The evaluation of a run, as a one-task job (submitted with afterok on the training job)."""

    def __init__(self, run_dir: str, overrides: list[str]):
        self.run_dir, self.overrides = run_dir, list(overrides)

    def __call__(self) -> dict:
        from llmft.serve.evaluation import run_eval

        return run_eval(Path(self.run_dir), self.overrides)


def submit_eval_after(cfg: DictConfig, run_dir: Path, train_job_id: str):
    """The evaluation as one task on one node, with the GPUs the model needs (plan's estimate), starting only when
    the training job completes successfully (afterok).

    Secrets never reach the run directory: submitit pickles the job into RUN_DIR/slurm, so the judge's key given as
    `eval.judge_api_key` (or in `eval.overrides`) travels in the environment sbatch passes to the job
    (LLMFT_JUDGE_API_KEY), and the pickled overrides carry `<redacted>` in its place."""
    resources = resolve(cfg)
    kind = cfg.cluster.kinds[resources.kind]
    gpus = inference_gpus(cfg, kind.memory_gb, resources.gpus_per_node)
    settings = check_eval(cfg.eval, check_paths=False)
    if settings.judge_api_key and settings.judge_api_key != REDACTED:
        os.environ["LLMFT_JUDGE_API_KEY"] = settings.judge_api_key  # sbatch exports this process's environment
    executor = make_executor(cfg, run_dir)
    extra = dict(executor._executor.parameters.get("additional_parameters", {}) or {})
    extra["dependency"] = f"afterok:{train_job_id}"
    parameters = {"name": f"llmft-eval-{run_dir.name}", "nodes": 1, "tasks_per_node": 1,
                  "cpus_per_task": resources.cpus_per_task * gpus,
                  "timeout_min": parse_time(cfg.eval.time, "eval.time"), "slurm_additional_parameters": extra}
    if cfg.cluster.gpu_request == "gres":
        parameters["slurm_gres"] = f"gpu:{gpus}"
    elif cfg.cluster.gpu_request == "gpus_per_node":
        parameters["gpus_per_node"] = gpus
    executor.update_parameters(**parameters)
    return executor.submit(EvalJob(str(run_dir), redact_argv([str(o) for o in cfg.eval.overrides])))


def submit(cfg: DictConfig, run_dir: Path):
    executor = make_executor(cfg, run_dir)
    (run_dir / "submit.sbatch").write_text(sbatch_script(executor))  # the run directory keeps the exact script
    return executor.submit(TrainJob(str(run_dir)))
