"""MLflow tracking (train.mlflow=true, llmft/training/tracking.py), read back with MLflow's own client: the config as
params with secrets redacted, every metrics.jsonl figure by step, the run's tags and final adapter path, one MLflow run
continued across a crash and its resume, and tracking errors that never stop training."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from llmft.rundir.layout import mlflow_path
from llmft.training import tracking
from support.runs import REPO, read_metrics, run_llmft, wait_for_step

SECRET = "sk-do-not-log-me-123"




def history(client: MlflowClient, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


@pytest.mark.slow
def test_a_run_killed_then_resumed_is_one_mlflow_run_with_every_step_once(tmp_path, monkeypatch):
    """SIGKILL after step 5 (checkpoints every 2 steps: steps 5.. are trained again after the resume), then resume:
    the default store under the runs root holds one MLflow run with the config (secret redacted), each step's loss
    and validation loss once, equal to metrics.jsonl's, its tags, final adapter path and artifacts."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    run_dir = tmp_path / "run"
    overrides = ["train.mlflow=true", "train.max_steps=10", "train.log_every=1", "train.eval_every=4",
                 "train.save_every=2", f"eval.judge_api_key={SECRET}", f"runs_root={tmp_path}", f"run_dir={run_dir}"]
    first = subprocess.Popen([sys.executable, "-m", "llmft.launch", *overrides], cwd=REPO, text=True,
                             env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE)
    wait_for_step(run_dir, 5, first)
    first.send_signal(signal.SIGKILL)  # one process: the launcher trains the single rank itself
    first.communicate(timeout=60)
    saved = json.loads((run_dir / "mlflow.json").read_text())
    assert saved["tracking_uri"] == f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(saved["tracking_uri"])
    assert client.get_run(saved["run_id"]).info.status == "RUNNING"  # killed: nobody ended it
    logged_before = history(client, saved["run_id"], "loss")
    assert [step for step, _ in logged_before] == list(range(1, len(logged_before) + 1))

    resumed = run_llmft("launch", f"resume={run_dir}", "train.max_steps=12", timeout=400)
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-3000:]
    assert "resume: from" in resumed.stdout and "MLflow tracking is off" not in resumed.stderr
    assert json.loads((run_dir / "mlflow.json").read_text()) == saved
    [run] = client.search_runs([saved["experiment_id"]])  # one MLflow run for the llmft run
    assert run.info.run_id == saved["run_id"] and run.info.status == "FINISHED"
    assert run.info.run_name == "run"

    records = read_metrics(run_dir)
    assert history(client, run.info.run_id, "loss") == [(r["step"], pytest.approx(r["loss"])) for r in records
                                                        if "loss" in r]
    assert [s for s, _ in history(client, run.info.run_id, "loss")] == list(range(1, 13))
    assert history(client, run.info.run_id, "val_loss") == [(r["step"], pytest.approx(r["val_loss"]))
                                                            for r in records if "val_loss" in r]
    assert [s for s, _ in history(client, run.info.run_id, "val_loss")] == [4, 8, 12]
    assert {s for s, _ in history(client, run.info.run_id, "lr")} == set(range(1, 13))

    params = run.data.params
    assert params["train.lr"] == "0.005" and params["model.name"] == "tiny" and params["train.mlflow"] == "true"
    assert params["train.max_steps"] == "10" and run.data.tags["llmft.resumed.train.max_steps"] == "12"
    assert params["eval.judge_api_key"] == "<redacted>" and not any(SECRET in v for v in params.values())
    tags = run.data.tags
    assert tags["llmft.run_dir"] == str(run_dir) and tags["llmft.strategy"] == "single"
    assert tags["llmft.world_size"] == "1" and tags["llmft.resumes"] == "1" and tags["llmft.status"] == "completed"
    assert tags["llmft.final_dir"] == str(run_dir / "final")
    assert (Path(tags["llmft.final_dir"]) / "adapter_model.safetensors").is_file()
    assert sorted(a.path for a in client.list_artifacts(run.info.run_id)) == ["config.yaml", "summary.json"]
    summary = Path(client.download_artifacts(run.info.run_id, "summary.json", str(tmp_path / "download")))
    assert json.loads(summary.read_text())["final_val_loss"] == records[-1]["val_loss"]
    assert SECRET not in Path(client.download_artifacts(run.info.run_id, "config.yaml",
                                                        str(tmp_path / "download"))).read_text()


def test_a_tracking_error_warns_once_and_never_raises(tmp_path, monkeypatch, capsys):
    """An unusable store at the start, and a store that fails in the middle: one warning each, then tracking is off;
    nothing raises into the training loop."""
    config = {"train": {"mlflow": True, "lr": 1e-4}, "runs_root": str(tmp_path)}
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:////dev/null/not-a-folder/mlflow.db")
    unusable = tracking.MlflowTracking(tmp_path, config, "single", 1)
    unusable.log_metrics({"step": 1, "loss": 2.0})
    unusable.end({"status": "completed"})
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("llmft:")]
    assert len(warnings) == 1 and warnings[0].startswith("llmft: MLflow tracking is off for the rest of this run")
    assert not mlflow_path(tmp_path).exists()

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'store' / 'mlflow.db'}")
    failing = tracking.MlflowTracking(tmp_path, config, "single", 1)
    assert not failing.off and mlflow_path(tmp_path).exists()

    def broken(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(failing.client, "log_batch", broken)
    failing.log_metrics({"step": 1, "loss": 2.0})
    failing.log_metrics({"step": 2, "loss": 1.5})
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("llmft:")]
    assert len(warnings) == 1 and "No space left on device" in warnings[0] and failing.off


def test_the_config_is_flattened_into_params_within_mlflows_limits():
    flat = tracking.flatten({"train": {"lr": 1e-4, "wandb": False}, "model": {"lora_target_modules": ["q_proj"],
                                                                              "path": None, "template": "x" * 7000}})
    assert flat["train.lr"] == "0.0001" and flat["train.wandb"] == "false" and flat["model.path"] == "null"
    assert flat["model.lora_target_modules"] == '["q_proj"]' and len(flat["model.template"]) == 6000
