"""A new run directory: created, locked, with its resolved config and its provenance (the layout: `llmft/rundir/`).

No torch here: the launcher creates the directory on the login node.
"""

from __future__ import annotations

import os
import platform
import socket
import subprocess
import sys
import time
from pathlib import Path

from omegaconf import DictConfig

from llmft import __version__
from llmft.config.compose import PACKAGE_DIR
from llmft.config.redact import redact_argv
from llmft.errors import ConfigError
from llmft.rundir import lock
from llmft.rundir.files import write_config, write_provenance
from llmft.rundir.init_from import origin


def new_run_dir(cfg: DictConfig) -> Path:
    if cfg.run_dir:
        return Path(os.path.expandvars(cfg.run_dir)).expanduser().resolve()
    runs_root = cfg.cluster.runs_root if cfg.cluster is not None and cfg.cluster.runs_root else cfg.runs_root
    root = Path(os.path.expandvars(runs_root)).expanduser().resolve()
    name = f"{time.strftime('%Y%m%d-%H%M%S')}-{cfg.model.name}-{cfg.peft.method.value}"
    path, suffix = root / name, 1
    while path.exists():
        suffix += 1
        path = root / f"{name}-{suffix}"
    return path


def git_state() -> dict:
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=PACKAGE_DIR, capture_output=True, text=True, timeout=10).stdout

    try:
        commit = git("rev-parse", "HEAD").strip()
    except (OSError, subprocess.SubprocessError):
        return {}
    return {"git_commit": commit or None, "git_dirty": bool(git("status", "--porcelain", "--untracked-files=no").strip())}


def apply_umask(cfg: DictConfig) -> None:
    """Files and folders of a run are not world-readable (default umask 027): a model trained on private tickets
    must not be readable by every user of the cluster."""
    try:
        os.umask(int(str(cfg.umask), 8))
    except ValueError:
        raise ConfigError(f"umask={cfg.umask} is not an octal mask such as 027.") from None


def create(cfg: DictConfig) -> Path:
    """Create the run directory, take its lock, write the resolved config and provenance; returns its absolute path.
    A `run_dir=` that a live run trains into is refused (RunDirectoryInUse) before anything is written."""
    apply_umask(cfg)
    run_dir = new_run_dir(cfg)
    run_dir.mkdir(parents=True, exist_ok=True)
    lock.acquire(run_dir)
    cfg.run_dir = str(run_dir)
    write_config(cfg, run_dir)
    provenance = {
        "llmft_version": __version__,
        **git_state(),
        "command": redact_argv(sys.argv),
        "host": socket.gethostname(),
        "python": platform.python_version(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    if cfg.get("init_from"):  # where the run started: another run's final model (llmft/rundir/init_from.py)
        provenance["init_from"] = origin(cfg)
    write_provenance(run_dir, provenance)
    return run_dir
