"""python -m llmft.launch [overrides]: compose, validate, create the run directory, and run or submit.


Without `+cluster=...` the run is local (in this process; several with `launch.nproc`). This module imports no
torch: on a login node it composes and validates in about a second. Hydra's own flags work (`--cfg job`, `-m`).
"""

from __future__ import annotations

import contextlib
import copy
import io
import math
import os
import shlex
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from llmft.config.compose import (CONF_DIR, bracket_lists, config_help, error_chain, one_line_error, register_configs,
                                  typed_config)
from llmft.config.schema import Parallelism
from llmft.config.validation import (check_installed, check_resume_strategy, grad_accum_keeping_global_batch,
                                     requested_world_size, settle_parallelism, validate, world_size_keys)
from llmft.errors import ConfigError, UserError, closed_pipe_ends_quietly, report
from llmft.launch import slurm, sweep
from llmft.rundir import checkpoints, lock
from llmft.rundir.create import apply_umask
from llmft.rundir.create import create as create_run_dir
from llmft.rundir.create import new_run_dir
from llmft.rundir.files import (mark_failed, read_config, read_summary, record_job, record_resume, write_config,
                                write_summary)
from llmft.rundir.init_from import starting_config
from llmft.rundir.layout import checkpoints_dir, final_dir, is_run_dir, logs_dir, summary_path
from llmft.rundir.lifetime import LAUNCHER_PID_ENV, catches, child_pids, die_with_parent
from llmft.training import signals

register_configs()

HELP = """
usage: python -m llmft.launch [group=option ...] [group.key=value ...] [-m] [--cfg job] [--hydra-help]

Compose conf/ with the overrides, check everything (one sentence per mistake, before anything exists), create the run
directory, then train in this process (no +cluster: a local run) or submit to SLURM (+cluster=NAME) and return.
It prints `run dir: PATH` last.

Examples:
  python -m llmft.launch                                        # the demo: tiny model, bundled tickets, LoRA
  python -m llmft.launch data=chat_jsonl data.path=my.jsonl train.lr=1e-4 peft.r=8
  python -m llmft.launch model=llama3_2_1b model.path=/models/Llama-3.2-1B-Instruct train.max_steps=200
  python -m llmft.launch +cluster=jeanzay cluster.account=abc model=llama7b    # submit (plan first: llmft.plan)
  python -m llmft.launch -m train.lr=1e-4,2e-4 peft.r=8,16      # a grid sweep, 4 runs: python -m llmft.runs
  python -m llmft.launch resume=RUN_DIR                         # continue a stopped run
  python -m llmft.launch --cfg job model=llama7b                # print the composed config and exit

Hydra's flags: --cfg job|hydra|all, -m (a sweep: key=a,b or hydra/sweeper=optuna), --info, --hydra-help (Hydra's
own help). More: README.md, docs/configuration.md, docs/sweeps-and-tracking.md.
"""

_hydra_stderr = io.StringIO()
_task_started = False


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="config")
def _launch(cfg: DictConfig) -> float | None:
    global _task_started
    _task_started = True
    sys.stderr = sys.__stderr__  # composition is over: stop holding stderr (see main)
    if sweep.in_optuna_trial():  # a trial of `-m hydra/sweeper=optuna`: its objective goes back to the sweeper
        return sweep.run_trial(cfg, prepare_run, start_run)
    try:
        cfg, run_dir = prepare_run(cfg)
    except UserError as error:
        sys.exit(report(error))
    try:
        code = start_run(cfg, run_dir)
    finally:
        if cfg.cluster is None or cfg.launch.prepare_only:  # a submitted job holds the lock until it ends
            lock.release(run_dir)
    if code:
        sys.exit(code)


def prepare_run(cfg: DictConfig) -> tuple[DictConfig, Path]:
    """Every check, then the run directory (created, or the one to resume) with its lock taken."""
    cfg = typed_config(cfg)  # Hydra composed it on the schema; `+group.key=value` additions are refused here
    run_dir = None
    started_from = ""  # init_from=RUN_DIR: the line that says what this run starts from
    if cfg.init_from and not cfg.resume:  # another run's final model (llmft/rundir/init_from.py): its model, peft
        from hydra.core.hydra_config import HydraConfig

        cfg, started_from = starting_config(cfg, list(HydraConfig.get().overrides.task))
    if cfg.resume:
        run_dir = resumable_run_dir(cfg.resume)
        cfg, changes = config_for_resume(run_dir, cfg)
    else:  # data.prepared=DIR alone: DIR's own data settings; data.strict=true: the records read now (a bad one stops)
        from hydra.core.hydra_config import HydraConfig

        from llmft.data.prepare.at_launch import data_for_launch

        cfg = data_for_launch(cfg, list(HydraConfig.get().overrides.task))
    validate(cfg)
    check_installed(cfg, local=cfg.cluster is None)
    if cfg.cluster is not None:
        slurm.resolve(cfg)  # every resource check before anything is created or submitted
    if started_from:  # every check passed: what the new run starts from
        print(started_from)
    if run_dir is None:
        swept = sweep.swept_values()  # a job of a sweep (-m): its run directory's name says its values
        if swept and not cfg.run_dir:
            cfg.run_dir = str(sweep.job_run_dir(new_run_dir(cfg), swept))
        run_dir = create_run_dir(cfg)  # takes the lock before writing anything into an existing folder
        if swept:
            sweep.record_job(run_dir, swept)
        return cfg, run_dir
    apply_umask(cfg)  # the run's umask for everything the resumed run writes, as when it was created
    lock.acquire(run_dir)
    write_config(cfg, run_dir)
    latest, _ = checkpoints.find_latest(checkpoints_dir(run_dir))
    from_step = checkpoints.read_manifest(latest)["step"] if latest else 0
    print(f"resume: {run_dir} from step {from_step} ({latest.name})" if latest else
          f"resume: {run_dir} has no complete checkpoint: training starts over from step 0")
    if changes["line"]:
        print(changes["line"])
    if changes["extension"]:  # a completed run trained on: how far, and its LR schedule re-planned
        print(changes["extension"])
    record_resume(run_dir, from_step, changes["changed"])
    return cfg, run_dir


def start_run(cfg: DictConfig, run_dir: Path) -> int:
    if signals.received():  # recorded since this process started (llmft/launch/__main__.py), before the run starts
        return stopped_before_start(run_dir, signals.received())
    if cfg.launch.prepare_only:
        print(f"run dir: {run_dir}")
        return 0
    if cfg.cluster is not None:
        return submit_to_cluster(cfg, run_dir)  # with -m (multirun), Hydra calls _launch again for the next one
    if settle_parallelism(cfg, cfg.launch.nproc) is Parallelism.single:
        from llmft.training.loop import main as train_main  # in this process: no torchrun for one plain rank

        return train_main([str(run_dir)])
    return run_local_ranks(run_dir, cfg.launch.nproc)


def stopped_before_start(run_dir: Path, signum: int) -> int:
    """A stop signal came before the run started: summary.json says so, one line with the resume command, exit 3."""
    latest, _ = checkpoints.find_latest(checkpoints_dir(run_dir))
    step = checkpoints.read_manifest(latest)["step"] if latest else 0
    stop = signals.Interrupted(step, signal.Signals(signum).name, requeued=False, phase="starting")
    summary = stop.summary(run_dir)
    write_summary(run_dir, summary)
    lock.release(run_dir)
    print(f"llmft: {summary['message']}", file=sys.stderr)
    return 3


# What a resumed run may change: how long, where and on how many ranks it runs, never what it trains (that would be
# another run). The batch layout may change, the global batch may not: see `keep_global_batch`.
RESUMABLE_KEYS = ("train.max_steps", "train.epochs", "train.log_every", "train.eval_every", "train.save_every",
                  "train.keep_last", "train.wandb", "train.mlflow", "train.collective_timeout_min",
                  "train.save_timeout_min", "train.micro_batch_size", "train.grad_accum_steps", "launch.", "cluster.",
                  "eval.", "umask")
STRATEGY_KEYS = ("parallelism", "parallelism.strategy")  # only where the checkpoint's files stay readable


def config_for_resume(run_dir: Path, composed: DictConfig) -> tuple[DictConfig, dict]:
    """The run's saved config, with the overrides given beside `resume=` applied where a resumed run may change
    them; any other override is refused in one sentence (silently ignoring it would train something else). On
    another number of ranks, train.grad_accum_steps is adjusted to keep the global batch (`keep_global_batch`, whose
    account of what changed comes back with the config)."""
    from hydra.core.hydra_config import HydraConfig

    saved = read_config(run_dir)
    before = copy.deepcopy(saved)
    overrides = [o for o in HydraConfig.get().overrides.task if not o.lstrip("+~").startswith("resume=")]
    for override in overrides:
        key = override.lstrip("+~").split("=", 1)[0]
        if override.startswith("+cluster=") and saved.cluster is not None and \
                override.split("=", 1)[1] == saved.cluster.name:
            continue  # the run's own profile (added by with_saved_cluster): the saved one stays, with cluster.* given
        if "=" in override and key in STRATEGY_KEYS and not override.startswith(("+", "~")):
            saved.parallelism.strategy = composed.parallelism.strategy  # checked against the checkpoint below
            continue
        if "=" not in override or not key.startswith(RESUMABLE_KEYS) or (key.startswith("cluster.")
                                                                           and saved.cluster is None):
            allowed = ", ".join(k.rstrip(".") + ("*" if k.endswith(".") else "") for k in RESUMABLE_KEYS)
            raise ConfigError(f"resume={run_dir} continues the run with its saved config; {override} would change "
                              f"what it trains: start a new run instead (a resumed run may change {allowed}, and "
                              f"parallelism where its checkpoint stays readable).")
        OmegaConf.update(saved, key, OmegaConf.select(composed, key), merge=False)
    explicit_accum = any(o.lstrip("+~").startswith("train.grad_accum_steps=") for o in overrides)
    changes = keep_global_batch(run_dir, before, saved, explicit_accum)
    changes["extension"] = longer_run(run_dir, before, saved, overrides) \
        if read_summary(run_dir).get("status") == "completed" else ""
    saved.resume = str(run_dir)
    return saved, changes


def longer_run(run_dir: Path, before: DictConfig, cfg: DictConfig, overrides: list[str]) -> str:
    """A completed run resumed with more steps (a larger train.max_steps or train.epochs) trains on from its last
    checkpoint (the loop checkpoints the last step), its LR schedule re-planned over the new length: the line that
    says so. Without more steps, ConfigError naming the command that gives some. The steps are counted as the loop
    counts them, from the samples and world size summary.json recorded (the global batch stays the run's)."""
    summary, run = read_summary(run_dir), f"resume={run_dir}"
    steps, num_train = summary.get("steps") or 0, summary.get("num_train_samples")
    latest, _ = checkpoints.find_latest(checkpoints_dir(run_dir))
    if latest is None:
        raise ConfigError(f"{run} has completed already and kept no checkpoint to train on from (runs before llmft "
                          f"checkpointed their last step): start a new run from its final model instead, with "
                          f"init_from={run_dir}.")
    if not num_train:  # a summary without the counts: the loop plans the steps
        return ""
    global_batch = before.train.micro_batch_size * before.train.grad_accum_steps * (summary.get("world_size") or 1)

    def epoch_steps(epochs: int) -> int:
        return math.ceil(epochs * num_train / global_batch)

    total = epoch_steps(cfg.train.epochs)
    total = min(total, cfg.train.max_steps) if cfg.train.max_steps > 0 else total
    given = [o for o in overrides if o.startswith(("train.max_steps=", "train.epochs="))]
    if total > steps:
        from_step = checkpoints.read_manifest(latest)["step"]
        return (f"resume: {run_dir} had completed {steps} steps; {' '.join(given) or 'its config'} trains it on to "
                f"step {total} from {latest.name}" + (f" (steps {from_step + 1}-{steps} again)" if from_step < steps
                                                      else "")
                + f", its LR schedule re-planned over {total} steps (warmup, then cosine down at step {total}).")
    max_steps, epochs = cfg.train.max_steps, cfg.train.epochs
    if any(o.startswith("train.max_steps=") for o in given) and max_steps > steps:
        target = max_steps
        ends = f"{epochs} epoch{' ends' if epochs == 1 else 's end'} at step {epoch_steps(epochs)}"
        why = f"train.max_steps={max_steps} but {ends}"
    elif any(o.startswith("train.epochs=") for o in given) and epoch_steps(epochs) > steps:
        target = epoch_steps(epochs)
        why = f"train.epochs={epochs} but train.max_steps={max_steps} stops it at step {max_steps}"
    else:
        target, why = 2 * steps, (f"{' '.join(given)} gives it no more steps" if given else "")
    fix = [f"train.max_steps={target}"]
    if epoch_steps(epochs) < target:
        fix.append(f"train.epochs={math.ceil(target * global_batch / num_train)}")
    elif any(o.startswith("train.epochs=") for o in given):
        fix.append(f"train.epochs={epochs}")
    others = [shlex.quote(o) for o in overrides if not o.startswith(("train.max_steps=", "train.epochs="))]
    command = " ".join(["python -m llmft.launch", run, *others, *fix])
    raise ConfigError(f"{run} has completed already ({steps} steps{': ' + why if why else ''}); to train it on: "
                      f"{command}")


def keep_global_batch(run_dir: Path, before: DictConfig, cfg: DictConfig, explicit_accum: bool) -> dict:
    """A resume on another number of ranks keeps the samples per optimizer step (micro_batch_size x grad_accum_steps x
    ranks: the data position, the LR schedule and each step's gradient stay those of the run) by setting
    train.grad_accum_steps in `cfg`, and refuses where it cannot, or where the strategy the new ranks settle to cannot
    read the checkpoint. Returns what changed ({key: [before, after]}) and the line that says it."""
    run = f"resume={run_dir}"
    saved_world_size, world_size = requested_world_size(before), requested_world_size(cfg)
    latest, _ = checkpoints.find_latest(checkpoints_dir(run_dir))
    manifest = checkpoints.read_manifest(latest) if latest else None
    global_batch = before.train.micro_batch_size * before.train.grad_accum_steps * (saved_world_size or 1)
    if world_size is not None and saved_world_size is not None:
        accum = grad_accum_keeping_global_batch(global_batch, cfg, world_size, run)
        if explicit_accum and cfg.train.grad_accum_steps != accum:
            raise ConfigError(
                f"{run}: train.grad_accum_steps={cfg.train.grad_accum_steps} would change the run's global batch of "
                f"{global_batch} samples per optimizer step; on {world_size} ranks ({world_size_keys(cfg)}) of "
                f"train.micro_batch_size={cfg.train.micro_batch_size} it is {accum}: leave it out and resume sets it.")
        cfg.train.grad_accum_steps = accum
    if manifest is not None and world_size is not None:
        check_resume_strategy(manifest["strategy"], latest.name, cfg, world_size, run)
    changed = {}
    for key in ("launch.nproc", "cluster.nodes", "cluster.gpus_per_node", "cluster.gpu", "train.micro_batch_size",
                "train.grad_accum_steps", "parallelism.strategy", "train.max_steps", "train.epochs"):
        old, new = OmegaConf.select(before, key), OmegaConf.select(cfg, key)
        if old != new:
            changed[key] = [old, new]  # (an enum is written to provenance.json as its name)
    had = manifest["world_size"] if manifest is not None else saved_world_size
    layout = "".join(f", {key} {changed[key][0]} -> {changed[key][1]}"
                     for key in ("train.grad_accum_steps", "train.micro_batch_size") if key in changed)
    if world_size is None or had == world_size:
        line = f"resume: {layout[2:]}: the global batch stays {global_batch} samples per optimizer step." if layout \
            else ""
        return {"changed": changed, "line": line}
    new_strategy = settle_parallelism(cfg, world_size).value
    old_strategy = manifest["strategy"] if manifest is not None else settle_parallelism(before, had).value
    changed["world_size"], changed["strategy"] = [had, world_size], [old_strategy, new_strategy]
    line = (f"resume: {latest.name + ' was saved by' if latest else 'the run had'} {had} rank(s) "
            f"({old_strategy}); this run has {world_size} ({world_size_keys(cfg)}, {new_strategy}){layout}"
            f": the global batch stays {global_batch} samples per optimizer step"
            + ("; the ZeRO checkpoint is converted to DeepSpeed's universal checkpoint when the ranks start"
               if latest and old_strategy.startswith("zero") else "") + ".")
    return {"changed": changed, "line": line}


def resumable_run_dir(path: str) -> Path:
    run_dir = Path(os.path.expandvars(path)).expanduser().resolve()
    if not is_run_dir(run_dir) and read_summary(run_dir).get("status") == "completed":  # (else: longer_run says)
        raise ConfigError(f"resume={path}: this run has completed already, and {run_dir} holds no config.yaml to "
                          f"train it on from (see {summary_path(run_dir)}).")
    if not is_run_dir(run_dir):
        raise ConfigError(f"resume={path} does not exist or is not a run directory (no config.yaml): give a run "
                          f"directory created by llmft.launch.")
    return run_dir


def submit_to_cluster(cfg: DictConfig, run_dir: Path) -> int:
    """Submit with submitit, print the job id, the run directory and how to follow it; wait if asked."""
    try:
        job = slurm.submit(cfg, run_dir)
    except Exception as error:  # submitit's FailedJobError: sbatch's own message is what the user needs
        message = " ".join(str(error).split()) or type(error).__name__
        mark_failed(run_dir, f"the submission failed: {message}")  # so that `llmft runs` can say why
        lock.release(run_dir)
        print(f"llmft: the submission failed: {message} (run dir: {run_dir})", file=sys.stderr)
        return 1
    lock.restamp(run_dir, job.job_id)  # the job holds the run directory now, pending or running
    record_job(run_dir, {"job_id": job.job_id, "cluster": cfg.cluster.name, "time": time.time()})  # for `llmft runs`
    print(f"submitted job {job.job_id} to {cfg.cluster.name}")
    print(f"follow it:  tail -f {job.paths.stdout}")
    if cfg.eval.after_train:
        eval_job = slurm.submit_eval_after(cfg, run_dir, job.job_id)
        record_job(run_dir, {"job_id": eval_job.job_id, "kind": "eval", "after": job.job_id, "time": time.time()})
        print(f"submitted evaluation job {eval_job.job_id}, after job {job.job_id} succeeds: {run_dir / 'eval'}")
    print(f"run dir: {run_dir}")
    if not cfg.launch.wait:
        return 0
    for signum in signals.LAUNCHER_SIGNALS:  # only waiting now: a stop signal ends the wait, as it would any command
        signal.signal(signum, signal.SIG_DFL)
    try:
        job.results()  # one result per task (rank)
    except Exception as error:  # submitit raises with the job's own error: report it as one line with the log
        state = job.state
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        print(f"llmft: job {job.job_id} failed ({state}): {first_line}; its log: {job.paths.stderr}", file=sys.stderr)
        return 1
    print(f"job {job.job_id} completed: {final_dir(run_dir)}")
    return 0


def run_local_ranks(run_dir: Path, nproc: int) -> int:
    """Start `nproc` ranks of `python -m llmft.train RUN_DIR` on this machine with torchrun (gloo on CPU).

    torchrun sets RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT, stops every rank when one fails, and
    keeps each rank's output in RUN_DIR/logs while showing it here. It runs as a subprocess, so this process
    never imports torch. Stop signals sent to this launcher (SIGUSR2, SIGTERM, Ctrl-C) go to the ranks
    (`wait_forwarding_stop_signals`); torchrun ignores SIGUSR2 and SIGINT (their default would end it, and with it
    the ranks, without a checkpoint) and handles SIGTERM, which reaches it when this launcher dies.
    """
    threads = max(1, (os.cpu_count() or 1) // nproc)
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", str(threads)),
           LAUNCHER_PID_ENV: str(os.getpid()),  # each rank checks that torchrun's parent is this launcher
           "TORCHELASTIC_SIGNALS_TO_HANDLE": "SIGTERM,SIGHUP,SIGQUIT"}  # torchrun's default adds SIGINT
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
               f"--log-dir={logs_dir(run_dir)}", "--tee=3", "-m", "llmft.train", str(run_dir)]
    torchrun = subprocess.Popen(command, env=env, preexec_fn=start_torchrun)
    code = wait_forwarding_stop_signals(torchrun)
    summary = read_summary(run_dir)
    if code == 0:
        print(f"run dir: {run_dir}")
    elif summary.get("status") in ("interrupted", "requeued"):  # every rank stopped at a signal, together
        print(f"llmft: {summary.get('message') or 'interrupted; continue with: ' + summary.get('resume', '')}",
              file=sys.stderr)
        return 3
    else:
        print(f"llmft: the run failed (exit code {code}); each rank's output is in {logs_dir(run_dir)}", file=sys.stderr)
    return code


def start_torchrun() -> None:
    """torchrun's process before it runs (preexec_fn): it dies with this launcher, and ignores SIGUSR2 and SIGINT;
    its ranks inherit that until their first instructions record both (llmft/train.py)."""
    die_with_parent()
    signal.signal(signal.SIGUSR2, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def wait_forwarding_stop_signals(torchrun: subprocess.Popen) -> int:
    """torchrun's exit code. Meanwhile each stop signal this launcher receives (or recorded before torchrun started)
    is sent to every rank, in order, as soon as the rank has its handler for it: a rank still starting would ignore
    it. A second Ctrl-C reaches the ranks as a second SIGINT (they abort)."""
    if threading.current_thread() is not threading.main_thread():  # (a sweep's launcher thread: no handlers)
        return torchrun.wait()
    pending = [signals.received()] if signals.received() else []
    previous = {s: signal.signal(s, lambda signum, frame: pending.append(signum)) for s in signals.STOP_SIGNALS}
    sent: dict[int, int] = {}  # rank pid -> how many of `pending` it was sent
    try:
        while True:
            try:
                return torchrun.wait(timeout=0.2)
            except subprocess.TimeoutExpired:
                pass
            if not pending:
                continue
            for pid in child_pids(torchrun.pid):
                while sent.get(pid, 0) < len(pending) and catches(pid, pending[sent.get(pid, 0)]):
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, pending[sent.get(pid, 0)])
                    sent[pid] = sent.get(pid, 0) + 1
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def with_saved_cluster(argv: list[str]) -> list[str]:
    """`resume=RUN_DIR cluster.nodes=4`: overrides of cluster keys compose only with a cluster group, so add the run's
    own `+cluster=NAME` (config_for_resume applies the given cluster.* keys only, over the saved profile)."""
    resume = next((a.split("=", 1)[1] for a in argv if a.startswith("resume=")), None)
    if not resume or not any(a.startswith("cluster.") for a in argv) or \
            any(a.lstrip("+").startswith("cluster=") for a in argv):
        return argv
    try:
        saved = read_config(Path(os.path.expandvars(resume)).expanduser())
    except Exception:  # unreadable: resume= itself says what is wrong with the run directory
        return argv
    name = saved.cluster.name if saved.cluster is not None else None
    return [*argv, f"+cluster={name}"] if name else argv


def main() -> int:
    """python -m llmft.launch: its exit code (output piped into `head` that stops reading ends it quietly)."""
    return closed_pipe_ends_quietly(_main)


def _main() -> None:
    # Hydra prints composition errors as several lines plus a hint about HYDRA_FULL_ERROR. Hold stderr while it
    # composes; if it exits before our task starts, print the error as one line instead.
    # With HYDRA_FULL_ERROR=1 a bug in llmft shows its traceback; composition errors are caught here.
    os.environ.setdefault("HYDRA_FULL_ERROR", "1")
    if any(a in ("-h", "--help") for a in sys.argv[1:]):  # llmft's own; Hydra's is --hydra-help
        print(f"{HELP.strip()}\n\n{config_help()}")
        return
    try:
        # the sweep's plugins installed, a trial fails alone; a list key's bare value (a.org or a.org,b.org) a list
        sys.argv[1:] = bracket_lists(sweep.sweep_argv(with_saved_cluster(sys.argv[1:])))
    except UserError as error:
        sys.exit(report(error))
    with signals.recording(signals.LAUNCHER_SIGNALS), contextlib.redirect_stderr(_hydra_stderr):
        try:
            _launch()
        except SystemExit as exit_:
            if not _task_started and exit_.code not in (0, None):
                print(f"llmft: {one_line_error(_hydra_stderr.getvalue())}", file=sys.__stderr__)
            raise
        except BrokenPipeError:  # what reads our output stopped reading: no error of the launch
            raise
        except Exception as error:
            explained = sweep.explain_error(error)  # a sweep's bad search-space key, or no trial completed
            if explained:
                print(f"llmft: {explained[0]}", file=sys.__stderr__)
                sys.exit(explained[1])
            if _task_started:
                raise
            print(f"llmft: {one_line_error(error_chain(error) + chr(10) + _hydra_stderr.getvalue())}", file=sys.__stderr__)
            sys.exit(2)
    if not _task_started:
        sys.stderr.write(_hydra_stderr.getvalue())


if __name__ == "__main__":
    main()
