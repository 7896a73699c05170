"""Typed reads and writes of a run directory's files: config.yaml (the schema's typed config: `typed_config` in
llmft/config/compose.py), summary.json, provenance.json, metrics.jsonl and jobs.jsonl. What another process may read
while it is written (summary.json, provenance.json) is written to a temporary file, then renamed. No torch here.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from llmft.config.compose import to_container, typed_config
from llmft.config.redact import redact_argv, redact_config
from llmft.errors import ConfigError
from llmft.rundir.layout import config_path, jobs_path, metrics_path, provenance_path, summary_path

# ------------------------------------------------------------------------------------------------ config.yaml


def read_config(run_dir: Path | str) -> DictConfig:
    """The config saved in a run directory, typed by the schema (enums are enums; keys a run directory older than
    the schema lacks get their defaults); ConfigError in one sentence when it is absent or does not match."""
    path = config_path(run_dir)
    if not path.is_file():
        raise ConfigError(f"{path} does not exist: is {run_dir} a run directory created by llmft.launch?")
    try:
        saved = OmegaConf.load(path)
    except Exception as error:  # not YAML at all
        reason = str(error).strip().splitlines()[0]
        raise ConfigError(f"{path} does not match llmft's schema: {reason}.") from None
    return typed_config(saved, f"{path} does not match llmft's schema")


def write_config(cfg: DictConfig, run_dir: Path | str) -> None:
    """The resolved config, secrets redacted: what every rank and every resume reads."""
    OmegaConf.save(OmegaConf.create(redact_config(to_container(cfg))), config_path(run_dir))


# ------------------------------------------------------------------------------------------------ summary.json


def read_summary(run_dir: Path | str) -> dict:
    """summary.json (status, steps, losses, sizes, timing), or {} while the run has none (or it cannot be read)."""
    try:
        return json.loads(summary_path(run_dir).read_text())
    except (OSError, ValueError):
        return {}


def write_summary(run_dir: Path | str, summary: dict) -> None:
    """summary.json, replaced whole (a reader never sees half of it)."""
    _replace(summary_path(run_dir), json.dumps(summary, indent=2))


def mark_failed(run_dir: Path | str, reason: str) -> None:
    """summary.json for a run that failed before training started (a refused submission)."""
    write_summary(run_dir, {"status": "failed", "error": reason})


# ------------------------------------------------------------------------------------------------ provenance.json


def read_provenance(run_dir: Path | str) -> dict:
    """provenance.json (llmft version, git commit, command, host, time, resumes), or {} without one."""
    path = provenance_path(run_dir)
    return json.loads(path.read_text()) if path.is_file() else {}


def write_provenance(run_dir: Path | str, provenance: dict) -> None:
    _replace(provenance_path(run_dir), json.dumps(provenance, indent=2))


def record_resume(run_dir: Path | str, from_step: int, changed: dict) -> None:
    """provenance.json keeps every resume of the run: when, the command, the host, the step, what changed."""
    provenance = read_provenance(run_dir)
    provenance.setdefault("resumes", []).append({
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "command": redact_argv(sys.argv), "host": socket.gethostname(),
        "from_step": from_step, "changed": changed,
    })
    write_provenance(run_dir, provenance)


# ------------------------------------------------------------------------------------- metrics.jsonl, jobs.jsonl


def read_jsonl(path: Path) -> list[dict]:
    """The records of a JSON-lines file; a line cut by a crash is skipped. [] without the file."""
    if not path.exists():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:  # a line cut by a crash
            continue
    return records


def read_metrics(run_dir: Path | str) -> list[dict]:
    """metrics.jsonl: one record per logging step ({step, loss, ...}) or evaluation ({step, val_loss, ...})."""
    return read_jsonl(metrics_path(run_dir))


def read_jobs(run_dir: Path | str) -> list[dict]:
    """jobs.jsonl: every SLURM job submitted for the run ({job_id, ...}; `kind: eval` for an evaluation job)."""
    return read_jsonl(jobs_path(run_dir))


def record_job(run_dir: Path | str, job: dict) -> None:
    with open(jobs_path(run_dir), "a") as handle:
        handle.write(json.dumps(job) + "\n")


def _replace(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
