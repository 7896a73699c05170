"""python -m llmft.runs [ROOT]: the runs under the runs root, one line each.
python -m llmft.runs show RUN: one run's summary, and its loss curve as RUN/loss.png.
python -m llmft.runs sweep DIR: one Optuna sweep (RUNS_ROOT/multirun/<date-time>): every trial, its value and run.

Status comes from SLURM (sacct) while a cluster job is pending or running, else from the run directory
(summary.json; a run with metrics but no summary is running or was killed). No torch here.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from llmft.config.compose import compose
from llmft.errors import run_command
from llmft.launch import sweep


def read_jsonl(path: Path) -> list[dict]:
    if not path.exists():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:  # a line cut by a crash
            continue
    return records


def slurm_state(job_id: str) -> tuple[str | None, int]:
    """(state, requeues) of a job from sacct, or (None, 0) without SLURM accounting. With --duplicates sacct lists
    every attempt of a requeued job: the requeues are the attempts but the last."""
    try:
        out = subprocess.run(["sacct", "-j", job_id, "--duplicates", "-X", "-n", "-P", "-o", "State"],
                             capture_output=True, text=True, timeout=20).stdout.strip().splitlines()
    except (OSError, subprocess.SubprocessError):
        return None, 0
    if not out:
        return None, 0
    return out[-1].split()[0], len(out) - 1


def run_status(run_dir: Path) -> dict:
    summary = json.loads((run_dir / "summary.json").read_text()) if (run_dir / "summary.json").exists() else {}
    metrics = read_jsonl(run_dir / "metrics.jsonl")
    train_records = [r for r in metrics if "loss" in r]
    val_records = [r for r in metrics if "val_loss" in r]
    jobs = [j for j in read_jsonl(run_dir / "jobs.jsonl") if j.get("kind") != "eval"]  # training jobs
    status = summary.get("status") or ("running?" if train_records else "created")
    job_ids, restarts = [j["job_id"] for j in jobs], 0
    if jobs:
        state, restarts = slurm_state(jobs[-1]["job_id"])
        if state and status not in ("completed", "failed"):
            status = state.lower()
    total = summary.get("total_steps")
    if total is None and (run_dir / "config.yaml").exists():
        from omegaconf import OmegaConf

        total = OmegaConf.load(run_dir / "config.yaml").train.max_steps
    return {
        "name": run_dir.name,
        "status": status,
        "jobs": ",".join(job_ids) or "-",
        "requeues": restarts,
        "step": train_records[-1]["step"] if train_records else 0,
        "total_steps": total if total and total > 0 else "?",
        "loss": train_records[-1]["loss"] if train_records else None,
        "val_loss": val_records[-1]["val_loss"] if val_records else None,
        "tokens_per_s": train_records[-1].get("tokens_per_s") if train_records else None,
        "error": summary.get("error"),
        # DPO / KTO: the last step's reward figures and the last validation's, on a line of their own
        "rewards": {k: r[k] for r in train_records[-1:] + val_records[-1:]
                    for k in ("reward_accuracy", "reward_margin", "kl", "val_reward_accuracy", "val_reward_margin")
                    if k in r},
    }


def format_table(rows: list[dict]) -> str:
    def number(value, digits=4):
        return "-" if value is None else f"{value:.{digits}g}"

    header = f"{'run':40} {'status':11} {'jobs':12} {'requeues':>8} {'step':>11} {'loss':>8} {'val_loss':>8} {'tok/s':>8}"
    lines = [header]
    for row in rows:
        lines.append(f"{row['name'][:40]:40} {row['status'][:11]:11} {row['jobs'][:12]:12} {row['requeues']:>8} "
                     f"{str(row['step']) + '/' + str(row['total_steps']):>11} {number(row['loss']):>8} "
                     f"{number(row['val_loss']):>8} {number(row['tokens_per_s'], 3):>8}")
        if row.get("rewards"):
            lines.append("  rewards: " + " ".join(f"{k}={v:.4g}" for k, v in row["rewards"].items()))
        if row["status"] == "failed" and row["error"]:  # why, on the line below: the reason is what one acts on
            lines.append(f"  why: {' '.join(str(row['error']).split())[:160]}")
    return "\n".join(lines)


def list_runs(root: Path) -> str:
    run_dirs = sorted((p for p in root.iterdir() if (p / "config.yaml").exists()), key=lambda p: p.name) \
        if root.is_dir() else []
    sweeps = sweep.find_sweeps(root)  # Optuna sweeps: RUNS_ROOT/multirun/<date-time>
    if not run_dirs and not sweeps:
        return f"no run under {root}"
    table = format_table([run_status(d) for d in run_dirs]) if run_dirs else f"no run under {root}"
    if sweeps:
        table += ("\n\nsweeps (python -m llmft.runs sweep DIR):\n"
                  + sweep.format_sweeps([sweep.read_sweep(path) for path in sweeps]))
    return table


def write_loss_curve(run_dir: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = read_jsonl(run_dir / "metrics.jsonl")
    figure, axes = plt.subplots(figsize=(8, 4.5))
    train_records = [r for r in metrics if "loss" in r]
    val_records = [r for r in metrics if "val_loss" in r]
    axes.plot([r["step"] for r in train_records], [r["loss"] for r in train_records], label="train")
    if val_records:
        axes.plot([r["step"] for r in val_records], [r["val_loss"] for r in val_records], "o-", label="validation")
    axes.set_xlabel("step")
    axes.set_ylabel("loss")
    axes.set_title(run_dir.name, fontsize=10)
    axes.legend()
    figure.tight_layout()
    path = run_dir / "loss.png"
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


def show(run_dir: Path) -> str:
    row = run_status(run_dir)
    summary_path = run_dir / "summary.json"
    lines = [format_table([row]), ""]
    if summary_path.exists():
        lines.append(summary_path.read_text())
    if row["error"]:
        lines.append(f"error: {row['error']}")
    if (run_dir / "metrics.jsonl").exists():
        lines.append(f"loss curve: {write_loss_curve(run_dir)}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    return run_command(runs, argv, __doc__)


def runs(argv: list[str]) -> int:
    if argv[:1] == ["show"]:
        if len(argv) != 2 or not (Path(argv[1]) / "config.yaml").exists():
            print("usage: python -m llmft.runs show RUN_DIR   (a run directory, with its config.yaml)", file=sys.stderr)
            return 2
        print(show(Path(argv[1])))
        return 0
    if argv[:1] == ["sweep"]:
        if len(argv) != 2 or not sweep.is_sweep_dir(Path(argv[1])):
            print("usage: python -m llmft.runs sweep DIR   (a sweep's folder, RUNS_ROOT/multirun/<date-time>)",
                  file=sys.stderr)
            return 2
        print(sweep.format_sweep(sweep.read_sweep(Path(argv[1]))))
        return 0
    if argv and not ("=" in argv[0]):
        root = Path(argv[0])
    else:
        cfg = compose(argv)
        root = Path(os.path.expandvars(cfg.runs_root)).expanduser()
    print(list_runs(root))
    return 0


if __name__ == "__main__":
    sys.exit(main())
