"""Sweeps: a grid of values with Hydra's own sweeper, or a search with Optuna's (`pip install -e '.[sweep]'`):

    python -m llmft.launch -m train.lr=1e-4,2e-4 peft.r=8,16      # 4 runs, one per combination
    python -m llmft.launch -m hydra/sweeper=optuna hydra.sweeper.n_trials=8 'train.lr=interval(1e-5,1e-3)'

Every job of a sweep is one llmft run whose run directory is named after the values it takes
(`20261207-101500-tiny-lora-lr_0.0001-r_8`); its provenance.json says the sweep, the job's number and its values
(`swept_values`, `job_run_dir`, `record_job`). Hydra makes no folder per job (`hydra.sweep.subdir: .` in
conf/config.yaml): each job writes `<n>/trial.json` in the sweep's folder when its run directory exists, which points
to it.

Optuna: each trial is one run trained in this process (one trial after the other) or as a
SLURM job with a cluster profile (the trial waits for its job: `launch.wait` is forced on).
Its objective, minimised,
is the run's final validation loss (`final_val_loss` of its summary.json). A trial that fails, is interrupted or
diverges (a validation loss that is not finite) raises `TrialFailed`: the sweeper records it as failed in the study
and the sweep goes on (llmft passes `hydra.sweeper.max_failure_rate=1.0` unless you give another). Trials run in
batches of `hydra.sweeper.n_jobs`; `hydra/launcher=joblib hydra.launcher.n_jobs=N` runs a batch's trials at once (on a
cluster: N jobs in the queue together, each waited for by its own process on the login node).

What a sweep leaves in its folder, `hydra.sweep.dir` (default RUNS_ROOT/multirun/<date-time>):

    optimization_results.yaml   the sweeper's best_params and best_value; llmft adds best_run_dir and `trials`
                                (number, status, value, params, run_dir, error) when the sweep ends
    <n>/trial.json              job or trial n: its values and run directory; an Optuna trial's is written when it
                                starts and again when it ends (so a sweep that was killed still lists its trials)
    multirun.yaml               a grid sweep: Hydra's record of the command

`python -m llmft.runs` lists the sweeps under the runs root; `python -m llmft.runs sweep DIR` compares the runs of one
side by side (status, final loss, best and final validation loss, wall time, values).
No torch here, and no optuna either: the plugin imports it, in the sweeper.
"""

from __future__ import annotations

import importlib.util
import json
import math
import re
import sys
import time
from pathlib import Path
from typing import Any, Callable

from omegaconf import DictConfig, OmegaConf

from llmft.config.redact import redact_argv
from llmft.errors import ConfigError, UserError, missing_extra
from llmft.rundir import lock
from llmft.rundir.files import read_metrics, read_provenance, read_summary, write_provenance
from llmft.rundir.layout import is_run_dir, summary_path
from llmft.rundir.status import run_status

RESULTS_FILE = "optimization_results.yaml"
TRIAL_FILE = "trial.json"
OBJECTIVE = "final_val_loss"
# The plugins a sweep may select, by the choice that selects them: (its module, the extra that installs it).
PLUGINS = {"hydra/sweeper=optuna": ("hydra_plugins.hydra_optuna_sweeper", "Hydra's Optuna sweeper"),
           "hydra/launcher=joblib": ("hydra_plugins.hydra_joblib_launcher", "Hydra's joblib launcher")}

# Set in the process that runs the sweeper, once composition is over: the sweep's folder and the keys it varies.
_sweep_dir: Path | None = None
_search_keys: list[str] = []


class TrialFailed(Exception):
    """A trial without an objective: the Optuna sweeper records it as failed (TrialState.FAIL) and goes on."""


def sweep_argv(argv: list[str]) -> list[str]:
    """Check the command line of a sweep before Hydra sees it: each plugin it selects is installed (else one sentence
    with the pip command), `-m` is there, and a failed trial fails only itself (max_failure_rate=1.0, unless given)."""
    chosen = [a.lstrip("+") for a in argv if a.lstrip("+").startswith(("hydra/sweeper=", "hydra/launcher="))]
    for choice in chosen:
        if choice in PLUGINS and importlib.util.find_spec(PLUGINS[choice][0]) is None:
            raise missing_extra(PLUGINS[choice][0].split(".")[1].replace("_", "-"), "sweep", choice)
    if "hydra/sweeper=optuna" not in chosen:
        return argv
    if not any(a in ("-m", "--multirun") for a in argv):
        raise ConfigError("hydra/sweeper=optuna runs its trials in a multirun: add -m (python -m llmft.launch -m "
                          "hydra/sweeper=optuna hydra.sweeper.n_trials=8 'train.lr=interval(1e-5,1e-3)').")
    if any(a.startswith("hydra.sweeper.max_failure_rate=") for a in argv):
        return argv
    return [*argv, "hydra.sweeper.max_failure_rate=1.0"]


def is_optuna(hydra_cfg: Any) -> bool:
    return "optuna" in str(OmegaConf.select(hydra_cfg, "sweeper._target_", default="") or "")


def in_optuna_trial() -> bool:
    """True inside a trial of an Optuna sweep (a job of a multirun whose sweeper is Optuna's)."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized():
        return False
    hydra_cfg = HydraConfig.get()
    return hydra_cfg.mode == RunMode.MULTIRUN and is_optuna(hydra_cfg)


def run_trial(cfg: DictConfig, prepare: Callable[[DictConfig], tuple[DictConfig, Path]],
              start: Callable[[DictConfig, Path], int]) -> float:
    """One trial: create its run, train it here or as a SLURM job it waits for, return its final validation loss.
    `prepare` and `start` are the launcher's own steps (command.prepare_run, command.start_run), as for any launch.

    Anything that leaves the trial without a finite objective raises TrialFailed with the reason (trial.json and
    the line printed say it too); Ctrl-C twice (KeyboardInterrupt) stops the whole sweep."""
    from hydra.core.hydra_config import HydraConfig

    hydra_cfg = HydraConfig.get()
    trial_path = job_trial_path(hydra_cfg)
    overrides = redact_argv([str(o) for o in hydra_cfg.overrides.task])
    trial: dict[str, Any] = {"number": int(hydra_cfg.job.num), "overrides": overrides, "status": "created",
                             "value": None, "run_dir": None, "error": None, "started": time.time()}
    write_trial(trial_path, trial)
    try:
        for key in ("resume", "run_dir"):
            if cfg[key]:
                raise ConfigError(f"{key}={cfg[key]} in a sweep would give every trial the same run directory: "
                                  f"leave it out, each trial gets its own under runs_root.")
        if cfg.launch.prepare_only:
            raise ConfigError("launch.prepare_only=true trains nothing, so a trial would have no objective: leave "
                              "it out of a sweep.")
        if cfg.cluster is not None:
            cfg.launch.wait = True  # the objective comes back when the job ends
        cfg, run_dir = prepare(cfg)
        trial.update(run_dir=str(run_dir), status="running")
        write_trial(trial_path, trial)
        try:
            code = start(cfg, run_dir)
        finally:
            if cfg.cluster is None:  # a submitted job releases its lock itself
                lock.release(run_dir)
        trial["value"] = objective(run_dir, code)
        trial["status"] = "completed"
    except (UserError, TrialFailed) as error:
        resumable = trial["run_dir"] and run_status(trial["run_dir"], ask_slurm=False).status in ("interrupted",
                                                                                                   "requeued")
        trial.update(status="interrupted" if resumable else "failed", error=str(error))
        raise TrialFailed(f"trial {trial['number']} ({' '.join(overrides)}): {error}") from None
    except Exception as error:  # a bug, or a library's error while training in this process: the trial failed
        trial.update(status="failed", error=f"{type(error).__name__}: {error}")
        raise
    except BaseException:  # Ctrl-C twice: the sweep stops here
        trial.update(status="interrupted", error="the sweep was stopped (KeyboardInterrupt)")
        raise
    finally:
        trial["ended"] = time.time()
        write_trial(trial_path, trial)
        if trial["status"] != "completed":
            print(f"llmft: trial {trial['number']} {trial['status']}: {trial['error']}"
                  + (f" (run dir: {trial['run_dir']})" if trial["run_dir"] else ""), file=sys.stderr, flush=True)
    print(f"trial {trial['number']}: {' '.join(overrides)} -> {OBJECTIVE}={trial['value']:.6g} "
          f"(run dir: {trial['run_dir']})", flush=True)
    return trial["value"]


def objective(run_dir: Path, exit_code: int) -> float:
    """The final validation loss of a finished run, or TrialFailed saying why there is none."""
    summary = read_summary(run_dir)
    status = summary.get("status")
    if status != "completed":
        reason = summary.get("error") or (f"continue it with python -m llmft.launch resume={run_dir}"
                                          if status in ("interrupted", "requeued") else f"exit code {exit_code}")
        raise TrialFailed(f"the run did not complete ({status or 'no summary.json'}): {reason}")
    value = summary.get(OBJECTIVE)
    if value is None:
        raise TrialFailed(f"the run has no validation loss ({summary_path(run_dir)} has no {OBJECTIVE}): a sweep "
                          f"minimises it, so give it validation data (data.validation_fraction > 0).")
    if not math.isfinite(value):
        raise TrialFailed(f"the validation loss is {value}: the run diverged")
    return float(value)


def write_trial(path: Path, trial: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(trial, indent=2))
    tmp.replace(path)


def job_trial_path(hydra_cfg: Any) -> Path:
    """SWEEP_DIR/<n>/trial.json: job n's record in the sweep's folder."""
    return Path(hydra_cfg.sweep.dir).resolve() / str(hydra_cfg.job.num) / TRIAL_FILE


def swept_values() -> dict[str, str]:
    """The values this job of a sweep (`-m`) takes for the keys the sweep varies, as Hydra gives them
    ({"train.lr": "0.0001", "peft.r": "8"}); {} outside a sweep."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized() or HydraConfig.get().mode != RunMode.MULTIRUN:
        return {}
    hydra_cfg = HydraConfig.get()
    keys = _search_keys or sweep_keys_of(hydra_cfg)
    overrides = redact_argv([str(o) for o in hydra_cfg.overrides.task])  # a secret never names a folder
    pairs = dict(o.lstrip("+~").split("=", 1) for o in overrides if "=" in o)
    return {key.lstrip("+~"): pairs[key.lstrip("+~")] for key in keys if key.lstrip("+~") in pairs}


def sweep_keys_of(hydra_cfg: Any) -> list[str]:
    """The keys a sweep varies, read in a job that runs in another process than the sweeper (hydra/launcher=joblib):
    Optuna's search space, or the grid's command line that Hydra's sweeper saved as multirun.yaml."""
    keys = [str(k) for k in (OmegaConf.select(hydra_cfg, "sweeper.params") or {})]
    saved = Path(hydra_cfg.sweep.dir) / "multirun.yaml"
    if saved.is_file():
        keys += [k for k in search_keys(list(OmegaConf.load(saved).hydra.overrides.task), None) if k not in keys]
    return keys


def short_names(values: dict[str, Any]) -> dict[str, str]:
    """Each key by its last part (`train.lr` -> lr), unless two keys share it: then in full."""
    leaves = [key.rpartition(".")[2] for key in values]
    return {key: leaf if leaves.count(leaf) == 1 else key for key, leaf in zip(values, leaves)}


def shown_value(value: Any) -> str:
    """A swept value as a person reads it: a float in its shortest form (0.0001, 3e-05)."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        return str(value)
    return str(value) if re.fullmatch(r"-?\d+", str(value)) else f"{number:g}"


def values_label(values: dict[str, Any]) -> str:
    """`lr=0.0001,r=8`: a job's values, as `llmft runs` shows them."""
    names = short_names(values)
    return ",".join(f"{names[key]}={shown_value(value)}" for key, value in values.items())


def job_run_dir(default: Path, values: dict[str, str]) -> Path:
    """The run directory of a sweep's job: the default name with its values (`...-tiny-lora-lr_0.0001-r_8`), in
    characters that a shell and Hydra's override grammar take unquoted (so `resume=RUN_DIR` works as typed);
    `-2`, `-3`... when it exists."""
    def text(value: Any) -> str:  # [q_proj,v_proj] -> q_proj+v_proj; anything else a shell would quote -> _
        shown = re.sub(r"[\[\]'\"]", "", shown_value(value)).replace(",", "+")
        return re.sub(r"[^A-Za-z0-9._+-]+", "_", shown).strip("_")

    names = short_names(values)
    label = "-".join(f"{names[key]}_{text(value)}" for key, value in values.items())[:100]
    path, suffix = default.with_name(f"{default.name}-{label}"), 1
    while path.exists():
        suffix += 1
        path = default.with_name(f"{default.name}-{label}-{suffix}")
    return path


def record_job(run_dir: Path, values: dict[str, str]) -> None:
    """A sweep's job, once its run directory exists: provenance.json says its sweep, number and values, and (a grid's
    job; an Optuna trial writes its own) SWEEP_DIR/<n>/trial.json points to the run directory."""
    from hydra.core.hydra_config import HydraConfig

    hydra_cfg = HydraConfig.get()
    number, sweep_dir = int(hydra_cfg.job.num), str(Path(hydra_cfg.sweep.dir).resolve())
    provenance = read_provenance(run_dir)
    provenance["sweep"] = {"dir": sweep_dir, "job": number, "values": values}
    write_provenance(run_dir, provenance)
    if not in_optuna_trial():
        overrides = redact_argv([str(o) for o in hydra_cfg.overrides.task])
        write_trial(job_trial_path(hydra_cfg), {"number": number, "sweeper": "grid", "overrides": overrides,
                                                "params": values, "status": "created", "value": None,
                                                "run_dir": str(run_dir), "error": None, "started": time.time()})


def search_keys(task_overrides: list[str], params: Any) -> list[str]:
    """The keys the study searches: the sweep overrides of the command line (interval, choice, range, a,b) and
    `hydra.sweeper.params`."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_overrides([str(o) for o in task_overrides])
    keys = [o.get_key_element() for o in parsed if o.is_sweep_override()]
    return keys + [str(k) for k in (params or {}) if str(k) not in keys]


def read_trials(sweep_dir: Path) -> list[dict]:
    trials = []
    for path in sorted(Path(sweep_dir).glob(f"*/{TRIAL_FILE}"), key=lambda p: int(p.parent.name)
                       if p.parent.name.isdigit() else -1):
        try:
            trials.append(json.loads(path.read_text()))
        except (OSError, json.JSONDecodeError):
            continue  # being rewritten at this instant, or cut by a crash
    return trials


def trial_params(trial: dict, keys: list[str]) -> dict:
    """The searched values of a trial, from its overrides (`train.lr=0.00031` -> {"train.lr": "0.00031"})."""
    import yaml

    pairs = dict(o.lstrip("+~").split("=", 1) for o in trial.get("overrides", []) if "=" in o)
    return {key: yaml.safe_load(pairs[key]) for key in keys if key in pairs}  # "0.0003" -> 0.0003, as Hydra reads it


def write_results(sweep_dir: Path, keys: list[str]) -> dict:
    """optimization_results.yaml with every trial and the best trial's run directory added to what the sweeper
    wrote (best_params, best_value); written by llmft alone when the sweeper wrote nothing (every trial failed)."""
    path = Path(sweep_dir) / RESULTS_FILE
    results = OmegaConf.to_container(OmegaConf.load(path)) if path.exists() else \
        {"name": "optuna", "best_params": None, "best_value": None}
    trials = [{"number": t["number"], "status": t["status"], "value": t["value"],
               "params": trial_params(t, keys), "run_dir": t["run_dir"], "error": t["error"]}
              for t in read_trials(sweep_dir)]
    completed = [t for t in trials if t["status"] == "completed" and t["value"] is not None]
    best = min(completed, key=lambda t: t["value"]) if completed else None
    results.update(objective=OBJECTIVE, direction="minimize", search_keys=keys,
                   best_run_dir=best["run_dir"] if best else None, trials=trials)
    OmegaConf.save(OmegaConf.create(results), path)
    return results


def read_sweep(sweep_dir: Path) -> dict:
    """A sweep as `runs` shows it: from optimization_results.yaml when an Optuna sweep ended, else from its trial
    files; each trial with its run's figures (`run_figures`), its status the run's own until the trial has ended."""
    path = Path(sweep_dir) / RESULTS_FILE
    results = OmegaConf.to_container(OmegaConf.load(path)) if path.exists() else {}
    # a grid, or an Optuna sweep still running (or killed): its trial files, every override shown as a param
    trials = results.get("trials") or [
        {**t, "params": t.get("params") or trial_params(t, [o.lstrip("+~").split("=", 1)[0] for o in t["overrides"]])}
        for t in read_trials(sweep_dir)]
    for trial in trials:
        trial["run"] = run_figures(trial.get("run_dir"))
        if trial["run"] and trial["status"] not in ("completed", "failed", "interrupted"):
            trial["status"] = trial["run"]["status"]  # a grid's job, or a trial that has not ended: the run says
            if trial["status"] == "completed" and trial.get("value") is None:
                trial["value"] = trial["run"]["final_val_loss"]
    completed = [t for t in trials if t["status"] == "completed" and t.get("value") is not None]
    best = min(completed, key=lambda t: t["value"]) if completed else None
    num_failed = sum(t["status"] in ("failed", "interrupted") for t in trials)
    is_grid = bool(trials) and all(t.get("sweeper") == "grid" for t in trials)  # each run says how it is doing
    return {"name": Path(sweep_dir).name, "path": str(sweep_dir), "trials": trials, "ended": path.exists() or is_grid,
            "num_completed": sum(t["status"] == "completed" for t in trials), "num_failed": num_failed,
            "best_value": best["value"] if best else None,
            "best_params": results.get("best_params") or (best["params"] if best else {}),
            "best_run_dir": best["run_dir"] if best else None}


def run_figures(run_dir: str | None) -> dict | None:
    """What `runs sweep` compares of a run: status, step, final training loss, best and final validation loss, wall
    time (None: not there yet, or no run directory)."""
    if not run_dir or not is_run_dir(run_dir):
        return None
    summary, metrics = read_summary(run_dir), read_metrics(run_dir)
    losses = [r["loss"] for r in metrics if "loss" in r]
    val_losses = [r["val_loss"] for r in metrics if "val_loss" in r and math.isfinite(r["val_loss"])]
    return {"status": run_status(run_dir).status,  # SLURM's while a job of the run is queued or running
            "step": summary.get("steps") or (metrics[-1].get("step", 0) if metrics else 0),
            "final_loss": summary.get("final_loss", losses[-1] if losses else None),
            "best_val_loss": min(val_losses) if val_losses else None,
            "final_val_loss": summary.get("final_val_loss", val_losses[-1] if val_losses else None),
            "wall_time_s": summary.get("wall_time_s")}


def is_sweep_dir(path: Path) -> bool:
    """A folder an Optuna sweep wrote: its results, or at least one trial file."""
    return Path(path).is_dir() and ((Path(path) / RESULTS_FILE).exists() or any(Path(path).glob(f"*/{TRIAL_FILE}")))


def find_sweeps(runs_root: Path) -> list[Path]:
    """Sweep folders under a runs root: the folders of RUNS_ROOT/multirun that a sweep wrote."""
    multirun = Path(runs_root) / "multirun"
    return sorted(p for p in multirun.iterdir() if is_sweep_dir(p)) if multirun.is_dir() else []


def format_sweep(sweep: dict) -> str:
    """One sweep's runs side by side, one line each (status, final training loss, best and final validation loss, wall
    time, the values it took, its run directory), then its best."""
    def number(value: float | None) -> str:
        return "-" if value is None else f"{value:.4g}"

    def duration(seconds: float | None) -> str:
        return "-" if seconds is None else f"{int(seconds) // 60}m{int(seconds) % 60:02d}s"

    lines = [f"sweep {sweep['path']}: {len(sweep['trials'])} trials, {sweep['num_completed']} completed, "
             f"{sweep['num_failed']} failed" + ("" if sweep["ended"] else " (running, or stopped before its end)"),
             f"{'trial':>5} {'status':10} {'loss':>8} {'best_val':>8} {OBJECTIVE:>14} {'wall':>7}  values  run dir"]
    for trial in sweep["trials"]:
        run = trial.get("run") or {}
        value = trial.get("value", run.get("final_val_loss"))
        lines.append(f"{trial['number']:>5} {trial['status'][:10]:10} {number(run.get('final_loss')):>8} "
                     f"{number(run.get('best_val_loss')):>8} {'-' if value is None else f'{value:.6g}':>14} "
                     f"{duration(run.get('wall_time_s')):>7}  {values_label(trial['params']) or '-'}  "
                     f"{trial['run_dir'] or '-'}")
        if trial["status"] != "completed" and trial.get("error"):
            lines.append(f"{'':>5} why: {' '.join(str(trial['error']).split())[:160]}")
    if sweep["best_value"] is not None:
        lines.append(f"best: {OBJECTIVE}={sweep['best_value']:.6g} "
                     f"{' '.join(f'{k}={v}' for k, v in sweep['best_params'].items())}  {sweep['best_run_dir']}")
    return "\n".join(lines)


def format_sweeps(sweeps: list[dict]) -> str:
    """The sweeps under a runs root, one line each."""
    lines = [f"{'sweep':40} {'trials':>6} {'done':>5} {'failed':>6} {'best ' + OBJECTIVE:>20}  best params"]
    for sweep in sweeps:
        best = "-" if sweep["best_value"] is None else f"{sweep['best_value']:.6g}"
        params = " ".join(f"{k}={v}" for k, v in sweep["best_params"].items())
        name = f"{Path(sweep['path']).parent.name}/{sweep['name']}"  # multirun/<date-time>, under the runs root
        lines.append(f"{name[:40]:40} {len(sweep['trials']):>6} {sweep['num_completed']:>5} "
                     f"{sweep['num_failed']:>6} {best:>20}  {params}")
    return "\n".join(lines)


def explain_error(error: BaseException) -> tuple[str, int] | None:
    """One sentence and an exit code for an error that ends a sweep in the process running the sweeper: a
    search-space override that does not compose (a key not in the config: 2, a user error), or no trial completed
    at all (1); None for anything else."""
    if _sweep_dir is None:
        return None
    from hydra.errors import ConfigCompositionException

    from llmft.config.compose import error_chain, one_line_error

    if isinstance(error, ConfigCompositionException):
        return one_line_error(error_chain(error)), 2
    if isinstance(error, ValueError) and "No trials are completed yet" in str(error):
        write_results(_sweep_dir, _search_keys)
        return (f"no trial of the sweep completed, so it has no best trial: each trial's reason is in "
                f"python -m llmft.runs sweep {_sweep_dir}"), 1
    return None


try:
    from hydra.experimental.callback import Callback
except ImportError:  # pragma: no cover - hydra-core < 1.1, which pyproject.toml excludes
    Callback = object  # type: ignore[misc,assignment]


class SweepCallback(Callback):
    """Hydra callback (`hydra.callbacks.llmft_sweep` in conf/config.yaml), in the process that runs the sweeper.

    At the start of a multirun, composition is over: stop holding stderr (command.main holds it during composition to
    turn Hydra's errors into one line), and remember the sweep's folder and the keys it varies (each job's run
    directory is named after its values). At the end of an Optuna sweep, add every trial with its run directory to
    the sweeper's results and print where they are; at the end of a grid, compare its runs."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        global _sweep_dir, _search_keys
        sys.stderr = sys.__stderr__
        _sweep_dir = Path(config.hydra.sweep.dir).resolve()
        _search_keys = search_keys(list(config.hydra.overrides.task), OmegaConf.select(config, "hydra.sweeper.params"))
        if is_optuna(config.hydra):
            print(f"sweep: {_sweep_dir} (Optuna, {config.hydra.sweeper.n_trials} trials in batches of "
                  f"{config.hydra.sweeper.n_jobs}; objective: {OBJECTIVE}, minimised)", flush=True)
        else:
            print(f"sweep: {_sweep_dir} (one run per combination of {', '.join(_search_keys) or 'the values'}; "
                  f"compare them with python -m llmft.runs sweep {_sweep_dir})", flush=True)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir).resolve()
        if not is_optuna(config.hydra):
            if is_sweep_dir(sweep_dir):
                print(format_sweep(read_sweep(sweep_dir)), flush=True)
            return
        results = write_results(sweep_dir, _search_keys)
        num_failed = sum(t["status"] in ("failed", "interrupted") for t in results["trials"])
        print(f"sweep done: {len(results['trials'])} trials ({num_failed} failed); best {OBJECTIVE}="
              f"{results['best_value']:.6g} with {results['best_params']}: {results['best_run_dir']}", flush=True)
        print(f"results: {sweep_dir / RESULTS_FILE}  (python -m llmft.runs sweep {sweep_dir})", flush=True)
