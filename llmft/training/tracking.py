"""MLflow tracking of a run (`train.mlflow=true`, `pip install -e '.[mlflow]'`), from rank 0 only.

Where: `$MLFLOW_TRACKING_URI` (a server, `sqlite:///...`, `file:...`), else `sqlite:///RUNS_ROOT/mlflow.db`: a file on
the runs' own storage, so it works offline on compute nodes (MLflow 3 refuses its old `./mlruns` file store unless
told to). Artifacts of that default store go to RUNS_ROOT/mlartifacts. View with `mlflow ui --backend-store-uri
sqlite:///RUNS_ROOT/mlflow.db` (the full `mlflow` package, on a login node or a laptop).

What, in the experiment `$MLFLOW_EXPERIMENT_NAME` (default `llmft`), in one MLflow run named after the run directory:
- params: the resolved config the Trainer holds (secrets redacted), flattened (`train.lr`, `model.name`);
- metrics: every metrics.jsonl record, by step (`loss`, `lr`, `tokens_per_s`, `val_loss`, ...);
- tags: `llmft.run_dir`, `llmft.strategy`, `llmft.world_size` (and `llmft.slurm_job_id` in a job); when the run ends,
  its status, `llmft.final_dir` (the final adapter or model, left where it is: not copied into the store) and the
  artifacts `config.yaml` and `summary.json`.

A resumed run continues the same MLflow run (its id is kept in RUN_DIR/mlflow.json) and does not log again the steps
MLflow already has. Tracking never stops training: its first error is one warning line, then it is off for the run.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

from llmft.config.redact import redact_config
from llmft.rundir.layout import config_path, mlflow_path, summary_path

DEFAULT_EXPERIMENT = "llmft"
# summary.json's status -> MLflow's run status
END_STATUS = {"completed": "FINISHED", "failed": "FAILED", "interrupted": "KILLED", "requeued": "KILLED"}
MAX_PARAM_LENGTH = 6000  # MLflow's limit on a param's value


def flatten(config: Any, prefix: str = "") -> dict[str, str]:
    """{"train": {"lr": 1e-4}} -> {"train.lr": "0.0001"}; lists stay one value (their JSON)."""
    if isinstance(config, dict):
        flat: dict[str, str] = {}
        for key, value in config.items():
            flat.update(flatten(value, f"{prefix}{key}."))
        return flat
    value = json.dumps(config) if isinstance(config, (list, bool)) or config is None else str(config)
    return {prefix.rstrip("."): value if len(value) <= MAX_PARAM_LENGTH else value[:MAX_PARAM_LENGTH - 3] + "..."}


def default_tracking_uri(config: dict) -> str:
    """sqlite:///RUNS_ROOT/mlflow.db, RUNS_ROOT being where this run's launcher puts runs (the cluster's own when it
    has one), resolved from the working directory as the launcher does."""
    cluster = config.get("cluster") or {}
    runs_root = cluster.get("runs_root") or config.get("runs_root") or "runs"
    root = Path(os.path.expandvars(runs_root)).expanduser().resolve()
    return f"sqlite:///{root / 'mlflow.db'}"


@contextlib.contextmanager
def store_lock(tracking_uri: str):
    """One process at a time creates a SQLite store and its experiment (parallel trials of a sweep start together;
    two alembic migrations of one new file would collide). Other stores need no lock."""
    if not tracking_uri.startswith("sqlite:///"):
        yield
        return
    path = Path(tracking_uri[len("sqlite:///"):])
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(f".{path.name}.lock"), "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


class MlflowTracking:
    """The MLflow run of one llmft run. Every call goes through `_guarded`: an error warns once and turns it off."""

    def __init__(self, run_dir: Path, config: dict, strategy: str, world_size: int):
        self.run_dir = Path(run_dir)
        self.config = config
        self.strategy, self.world_size = strategy, world_size  # as the Trainer settled them
        self.client = None
        self.run_id: str | None = None
        self.logged_steps: dict[str, int] = {}  # metric -> the last step MLflow has (a resumed run skips up to it)
        self.off = False
        self._guarded(self._start)

    def _guarded(self, action, *args) -> None:
        if self.off:
            return
        try:
            action(*args)
        except Exception as error:  # a tracking problem (store, network, disk, MLflow itself) never stops training
            self.off = True
            reason = " ".join(str(error).split())[:300] or type(error).__name__
            print(f"llmft: MLflow tracking is off for the rest of this run after an error ({type(error).__name__}: "
                  f"{reason}); training goes on, and metrics.jsonl keeps every figure.", file=sys.stderr, flush=True)

    def _start(self) -> None:
        # A tracking server that does not answer must not hold a compute node for minutes of retries.
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")
        from mlflow.tracking import MlflowClient

        for name in ("mlflow", "alembic"):  # their INFO lines (creating the tables...) are noise in a SLURM log
            logging.getLogger(name).setLevel(logging.WARNING)

        saved_path = mlflow_path(self.run_dir)
        saved = json.loads(saved_path.read_text()) if saved_path.exists() else None
        uri = saved["tracking_uri"] if saved else os.environ.get("MLFLOW_TRACKING_URI") or \
            default_tracking_uri(self.config)
        with store_lock(uri):
            self.client = MlflowClient(tracking_uri=uri)
            if saved:
                self._continue(saved["run_id"])
            else:
                self._create(uri)
        self._tag_topology()

    def _create(self, uri: str) -> None:
        name = os.environ.get("MLFLOW_EXPERIMENT_NAME") or DEFAULT_EXPERIMENT
        experiment = self.client.get_experiment_by_name(name)
        if experiment is None:
            artifacts = None
            if uri.startswith("sqlite:///"):  # beside the store, not ./mlruns in whatever directory the job runs in
                artifacts = (Path(uri[len("sqlite:///"):]).parent / "mlartifacts").as_uri()
            experiment_id = self.client.create_experiment(name, artifact_location=artifacts)
        else:
            experiment_id = experiment.experiment_id
        run = self.client.create_run(experiment_id, run_name=self.run_dir.name,
                                     tags={"llmft.run_dir": str(self.run_dir.resolve())})
        self.run_id = run.info.run_id
        saved_path = mlflow_path(self.run_dir)
        tmp = saved_path.with_name(f".{saved_path.name}.tmp")
        tmp.write_text(json.dumps({"tracking_uri": uri, "experiment_id": experiment_id, "run_id": self.run_id},
                                  indent=2))
        os.replace(tmp, saved_path)
        self._log_params({})

    def _continue(self, run_id: str) -> None:
        """A resumed run: the same MLflow run, running again; the steps it has are not logged twice."""
        from mlflow.entities import RunTag

        run = self.client.get_run(run_id)
        self.run_id = run_id
        self.client.update_run(run_id, status="RUNNING")
        for key in run.data.metrics:
            self.logged_steps[key] = max((m.step for m in self.client.get_metric_history(run_id, key)), default=-1)
        resumes = int(run.data.tags.get("llmft.resumes", "0")) + 1
        self.client.log_batch(run_id, tags=[RunTag("llmft.resumes", str(resumes))])
        self._log_params(run.data.params)

    def _log_params(self, logged: dict[str, str]) -> None:
        """The config as params; on a resume, only those MLflow does not have (a param cannot change in MLflow: a
        value the resume changed, such as train.max_steps, goes to a tag `llmft.resumed.KEY`)."""
        from mlflow.entities import Param, RunTag

        params = flatten(redact_config(self.config))
        new = [Param(k, v) for k, v in params.items() if k not in logged]
        changed = [RunTag(f"llmft.resumed.{k}"[:250], v) for k, v in params.items() if k in logged and logged[k] != v]
        self.client.log_batch(self.run_id, params=new, tags=changed)

    def _tag_topology(self) -> None:
        from mlflow.entities import RunTag

        tags = {"llmft.world_size": str(self.world_size), "llmft.strategy": self.strategy}
        if os.environ.get("SLURM_JOB_ID"):
            tags["llmft.slurm_job_id"] = os.environ["SLURM_JOB_ID"]
        self.client.log_batch(self.run_id, tags=[RunTag(k, v) for k, v in tags.items()])

    def log_metrics(self, record: dict) -> None:
        self._guarded(self._log_metrics, record)

    def _log_metrics(self, record: dict) -> None:
        from mlflow.entities import Metric

        step, now = int(record["step"]), int(time.time() * 1000)
        metrics = [Metric(key, float(value), now, step) for key, value in record.items()
                   if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool)
                   and step > self.logged_steps.get(key, -1)]
        if metrics:
            self.client.log_batch(self.run_id, metrics=metrics)

    def end(self, summary: dict) -> None:
        self._guarded(self._end, summary)

    def _end(self, summary: dict) -> None:
        """The run's end as summary.json says it: status, the final adapter's path, the strategy it really ran,
        config.yaml and summary.json as artifacts."""
        from mlflow.entities import RunTag

        status = summary.get("status", "failed")
        tags = {"llmft.status": status}
        if summary.get("final_dir"):
            tags["llmft.final_dir"] = str(Path(summary["final_dir"]).resolve())
        for key in ("strategy", "world_size"):
            if summary.get(key) is not None:
                tags[f"llmft.{key}"] = str(summary[key])
        if summary.get("error"):
            tags["llmft.error"] = str(summary["error"])[:8000]
        self.client.log_batch(self.run_id, tags=[RunTag(k, v) for k, v in tags.items()])
        for path in (config_path(self.run_dir), summary_path(self.run_dir)):
            if path.exists():
                self.client.log_artifact(self.run_id, str(path))
        self.client.set_terminated(self.run_id, END_STATUS.get(status, "FAILED"))

