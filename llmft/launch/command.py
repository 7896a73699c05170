"""python -m llmft.launch [overrides]: compose, validate, create the run directory, and run or submit.


Without `+cluster=...` the run is local (in this process; several with `launch.nproc`). This module imports no
torch: on a login node it composes and validates in about a second. Hydra's own flags work (`--cfg job`, `-m`).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from llmft.config.compose import CONF_DIR, error_chain, load_run_config, one_line_error, register_configs
from llmft.config.schema import Strategy
from llmft.config.validation import check_installed, settled_strategy, validate
from llmft.errors import ConfigError, UserError, report
from llmft.launch import run_dir as run_dirs
from llmft.launch import slurm
from llmft.training import checkpoint, run_lock  # both torch-free
from llmft.training.lifetime import die_with_parent

register_configs()


_hydra_stderr = io.StringIO()
_task_started = False


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="config")
def _launch(cfg: DictConfig) -> None:
    global _task_started
    _task_started = True
    sys.stderr = sys.__stderr__  # composition is over: stop holding stderr (see main)
    try:
        cfg, run_dir = prepare_run(cfg)
    except UserError as error:
        sys.exit(report(error))
    try:
        code = start_run(cfg, run_dir)
    finally:
        if cfg.cluster is None or cfg.launch.prepare_only:  # a submitted job holds the lock until it ends
            run_lock.release(run_dir)
    if code:
        sys.exit(code)


def prepare_run(cfg: DictConfig) -> tuple[DictConfig, Path]:
    """Every check, then the run directory (created, or the one to resume) with its lock taken."""
    run_dir = None
    if cfg.resume:
        run_dir = resumable_run_dir(cfg.resume)
        cfg = config_for_resume(run_dir, cfg)
    validate(cfg)
    check_installed(cfg, local=cfg.cluster is None)
    if cfg.cluster is not None:
        slurm.resolve(cfg)  # every resource check before anything is created or submitted
    if run_dir is None:
        return cfg, run_dirs.create(cfg)  # takes the lock before writing anything into an existing folder
    run_lock.acquire(run_dir)
    run_dirs.write_config(cfg, run_dir)
    latest, _ = checkpoint.find_latest(run_dir / "checkpoints")
    print(f"resume: {run_dir} from step {checkpoint.read_manifest(latest)['step']} ({latest.name})" if latest else
          f"resume: {run_dir} has no complete checkpoint: training starts over from step 0")
    return cfg, run_dir


def start_run(cfg: DictConfig, run_dir: Path) -> int:
    if cfg.launch.prepare_only:
        print(f"run dir: {run_dir}")
        return 0
    if cfg.cluster is not None:
        return submit_to_cluster(cfg, run_dir)  # with -m (multirun), Hydra calls _launch again for the next one
    if settled_strategy(cfg, cfg.launch.nproc) == Strategy.single:
        from llmft.training.loop import main as train_main  # in this process: no torchrun for one plain rank

        return train_main([str(run_dir)])
    return run_local_ranks(run_dir, cfg.launch.nproc)


# What a resumed run may change: how long and how it runs, never what it trains (that would be another run).
RESUMABLE_KEYS = ("train.max_steps", "train.epochs", "train.log_every", "train.eval_every", "train.save_every",
                  "train.keep_last", "train.wandb", "train.collective_timeout_min", "launch.", "cluster.", "eval.",
                  "umask")


def config_for_resume(run_dir: Path, composed: DictConfig) -> DictConfig:
    """The run's saved config, with the overrides given beside `resume=` applied where a resumed run may change
    them; any other override is refused in one sentence (silently ignoring it would train something else)."""
    from hydra.core.hydra_config import HydraConfig

    saved = load_run_config(run_dir)
    overrides = [o for o in HydraConfig.get().overrides.task if not o.lstrip("+~").startswith("resume=")]
    for override in overrides:
        key = override.lstrip("+~").split("=", 1)[0]
        if "=" not in override or not key.startswith(RESUMABLE_KEYS) or (key.startswith("cluster.")
                                                                           and saved.cluster is None):
            allowed = ", ".join(k.rstrip(".") + ("*" if k.endswith(".") else "") for k in RESUMABLE_KEYS)
            raise ConfigError(f"resume={run_dir} continues the run with its saved config; {override} would change "
                              f"what it trains: start a new run instead (a resumed run may change {allowed}).")
        OmegaConf.update(saved, key, OmegaConf.select(composed, key), merge=False)
    saved.resume = str(run_dir)
    return saved


def resumable_run_dir(path: str) -> Path:
    run_dir = Path(os.path.expandvars(path)).expanduser().resolve()
    summary = run_dir / "summary.json"
    if summary.exists() and json.loads(summary.read_text()).get("status") == "completed":
        raise ConfigError(f"resume={path}: this run has completed already (see {summary}).")
    if not (run_dir / "config.yaml").is_file():
        raise ConfigError(f"resume={path} does not exist or is not a run directory (no config.yaml): give a run "
                          f"directory created by llmft.launch.")
    return run_dir


def submit_to_cluster(cfg: DictConfig, run_dir: Path) -> int:
    """Submit with submitit, print the job id, the run directory and how to follow it; wait if asked."""
    try:
        job = slurm.submit(cfg, run_dir)
    except Exception as error:  # submitit's FailedJobError: sbatch's own message is what the user needs
        message = " ".join(str(error).split()) or type(error).__name__
        run_dirs.mark_failed(run_dir, f"the submission failed: {message}")  # so that `llmft runs` can say why
        run_lock.release(run_dir)
        print(f"llmft: the submission failed: {message} (run dir: {run_dir})", file=sys.stderr)
        return 1
    run_lock.restamp(run_dir, job.job_id)  # the job holds the run directory now, pending or running
    with open(run_dir / "jobs.jsonl", "a") as handle:  # every submission of this run, for `llmft runs`
        handle.write(json.dumps({"job_id": job.job_id, "cluster": cfg.cluster.name, "time": time.time()}) + "\n")
    print(f"submitted job {job.job_id} to {cfg.cluster.name}")
    print(f"follow it:  tail -f {job.paths.stdout}")
    if cfg.eval.after_train:
        eval_job = slurm.submit_eval_after(cfg, run_dir, job.job_id)
        with open(run_dir / "jobs.jsonl", "a") as handle:
            handle.write(json.dumps({"job_id": eval_job.job_id, "kind": "eval", "after": job.job_id,
                                     "time": time.time()}) + "\n")
        print(f"submitted evaluation job {eval_job.job_id}, after job {job.job_id} succeeds: {run_dir / 'eval'}")
    print(f"run dir: {run_dir}")
    if not cfg.launch.wait:
        return 0
    try:
        job.results()  # one result per task (rank)
    except Exception as error:  # submitit raises with the job's own error: report it as one line with the log
        state = job.state
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        print(f"llmft: job {job.job_id} failed ({state}): {first_line}; its log: {job.paths.stderr}", file=sys.stderr)
        return 1
    print(f"job {job.job_id} completed: {run_dir / 'final'}")
    return 0


def run_local_ranks(run_dir: Path, nproc: int) -> int:
    """Start `nproc` ranks of `python -m llmft.train RUN_DIR` on this machine with torchrun (gloo on CPU).

    torchrun sets RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT, stops every rank when one fails, and
    keeps each rank's output in RUN_DIR/logs while showing it here. It runs as a subprocess, so this process
    never imports torch.
    """
    threads = max(1, (os.cpu_count() or 1) // nproc)
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", str(threads))}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
               f"--log-dir={run_dir / 'logs'}", "--tee=3", "-m", "llmft.train", str(run_dir)]
    code = subprocess.call(command, env=env, preexec_fn=die_with_parent)  # torchrun dies with this launcher
    status = json.loads((run_dir / "summary.json").read_text()).get("status") if (run_dir / "summary.json").exists() \
        else None
    if code == 0:
        print(f"run dir: {run_dir}")
    elif status == "interrupted":  # a rank was signalled: every rank checkpointed and stopped
        print(f"llmft: interrupted; the checkpoint is saved. Continue with: python -m llmft.launch resume={run_dir}",
              file=sys.stderr)
        return 3
    else:
        print(f"llmft: the run failed (exit code {code}); each rank's output is in {run_dir / 'logs'}", file=sys.stderr)
    return code


def main() -> None:
    # Hydra prints composition errors as several lines plus a hint about HYDRA_FULL_ERROR. Hold stderr while it
    # composes; if it exits before our task starts, print the error as one line instead.
    # With HYDRA_FULL_ERROR=1 a bug in llmft shows its traceback; composition errors are caught here.
    os.environ.setdefault("HYDRA_FULL_ERROR", "1")
    with contextlib.redirect_stderr(_hydra_stderr):
        try:
            _launch()
        except SystemExit as exit_:
            if not _task_started and exit_.code not in (0, None):
                print(f"llmft: {one_line_error(_hydra_stderr.getvalue())}", file=sys.__stderr__)
            raise
        except Exception as error:
            if _task_started:
                raise
            print(f"llmft: {one_line_error(error_chain(error) + chr(10) + _hydra_stderr.getvalue())}", file=sys.__stderr__)
            sys.exit(2)
    if not _task_started:
        sys.stderr.write(_hydra_stderr.getvalue())


if __name__ == "__main__":
    main()
