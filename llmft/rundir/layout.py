"""Where each file of a run directory is (the list is in `llmft/rundir/__init__.py`). Nobody else spells these names."""

from __future__ import annotations

import os
from pathlib import Path

CONFIG_FILE = "config.yaml"
SUMMARY_FILE = "summary.json"
PROVENANCE_FILE = "provenance.json"
METRICS_FILE = "metrics.jsonl"
JOBS_FILE = "jobs.jsonl"


def config_path(run_dir: Path | str) -> Path:
    return Path(run_dir) / CONFIG_FILE


def summary_path(run_dir: Path | str) -> Path:
    return Path(run_dir) / SUMMARY_FILE


def provenance_path(run_dir: Path | str) -> Path:
    return Path(run_dir) / PROVENANCE_FILE


def metrics_path(run_dir: Path | str) -> Path:
    return Path(run_dir) / METRICS_FILE


def jobs_path(run_dir: Path | str) -> Path:
    return Path(run_dir) / JOBS_FILE


def checkpoints_dir(run_dir: Path | str) -> Path:
    return Path(run_dir) / "checkpoints"


def final_dir(run_dir: Path | str) -> Path:
    return Path(run_dir) / "final"


def final_adapter_path(run_dir: Path | str) -> Path:
    """LoRA / QLoRA: the final adapter's weights (PEFT's file name; its adapter_config.json is beside it)."""
    return final_dir(run_dir) / "adapter_model.safetensors"


def tiny_base_dir(run_dir: Path | str) -> Path:
    """model=tiny: the random-weight base model the adapter applies to."""
    return Path(run_dir) / "base_model"


def logs_dir(run_dir: Path | str) -> Path:
    return Path(run_dir) / "logs"


def tensorboard_dir(run_dir: Path | str) -> Path:
    return Path(run_dir) / "tensorboard"


def mlflow_path(run_dir: Path | str) -> Path:
    """The MLflow store and run this llmft run logs to (train.mlflow=true), so a resume continues the same run."""
    return Path(run_dir) / "mlflow.json"


def reference_logps_path(run_dir: Path | str) -> Path:
    """DPO/KTO with a precomputed reference: its log-probabilities of every example, made before the first step."""
    return Path(run_dir) / "reference_logps.pt"


def eval_dir(run_dir: Path | str) -> Path:
    """`llmft eval`'s report (report.json) and detailed answers, unless eval.output_dir says elsewhere."""
    return Path(run_dir) / "eval"


def eval_report_path(run_dir: Path | str, output_dir: str | None = None) -> Path:
    """The evaluation's report.json: in `output_dir` (eval.output_dir, environment variables expanded) when set,
    else in the run's eval/ folder. Its report.md is beside it (`with_suffix(".md")`)."""
    if output_dir:
        return Path(os.path.expandvars(str(output_dir))).expanduser() / "report.json"
    return eval_dir(run_dir) / "report.json"


def export_dir(run_dir: Path | str, kind: str) -> Path:
    """`llmft export`'s default output for one format (merged, gguf...)."""
    return Path(run_dir) / "export" / kind


def is_run_dir(path: Path | str) -> bool:
    """A folder that llmft.launch created (it holds the resolved config)."""
    return config_path(path).is_file()
