"""python -m llmft.runs [ROOT | runs_root=DIR]: the runs under the runs root, one line each, then the sweeps.
python -m llmft.runs show RUN_DIR: one run's summary, its checkpoints and their state (complete and verified against
their checksums, damaged and why, or a save that did not finish), and its loss curve as RUN_DIR/loss.png.
python -m llmft.runs sweep DIR: one sweep (RUNS_ROOT/multirun/<date-time>, a grid of `-m` or an Optuna search): its
runs side by side, with the values each took, final loss, best and final validation loss and wall time.

    python -m llmft.runs                                      # every run under runs_root (default ./runs)
    python -m llmft.runs $SCRATCH/llmft/runs                  # another runs root
    python -m llmft.runs show runs/20261207-101500-tiny-lora
    python -m llmft.runs sweep runs/multirun/20261207-101500

A run of a sweep shows the values it took (`lr=0.0001,r=8`, also in its directory's name). Each run's status comes
from `llmft.rundir.status` (SLURM while a job is pending or running, else the run directory). No torch here.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from llmft.config.compose import compose
from llmft.errors import run_command
from llmft.launch import sweep
from llmft.rundir import checkpoints
from llmft.rundir.files import read_metrics, read_provenance
from llmft.rundir.layout import checkpoints_dir, is_run_dir, metrics_path, summary_path
from llmft.rundir.status import RunStatus, run_status


def format_table(rows: list[RunStatus], swept: dict[str, str] | None = None) -> str:
    """One line per run; `swept`: the values a run of a sweep took, by run name (a last column)."""
    def number(value, digits=4):
        return "-" if value is None else f"{value:.{digits}g}"

    swept = swept or {}
    width = min(72, max([40] + [len(row.name) for row in rows]))  # a sweep's run names hold their values
    header = (f"{'run':{width}} {'status':11} {'jobs':12} {'requeues':>8} {'step':>11} {'loss':>8} {'val_loss':>8} "
              f"{'tok/s':>8}" + ("  swept" if swept else ""))
    lines = [header]
    for row in rows:
        jobs, total = ",".join(row.job_ids) or "-", "?" if row.total_steps is None else row.total_steps
        lines.append(f"{row.name[:width]:{width}} {row.status[:11]:11} {jobs[:12]:12} {row.requeues:>8} "
                     f"{str(row.step) + '/' + str(total):>11} {number(row.loss):>8} "
                     f"{number(row.val_loss):>8} {number(row.tokens_per_s, 3):>8}"
                     + (f"  {swept.get(row.name, '')}" if swept else ""))
        if row.rewards:
            lines.append("  rewards: " + " ".join(f"{k}={v:.4g}" for k, v in row.rewards.items()))
        if row.status == "failed" and row.error:  # why, on the line below: the reason is what one acts on
            lines.append(f"  why: {' '.join(str(row.error).split())[:160]}")
    return "\n".join(lines)


def list_runs(root: Path) -> str:
    run_dirs = sorted((p for p in root.iterdir() if is_run_dir(p)), key=lambda p: p.name) \
        if root.is_dir() else []
    sweeps = sweep.find_sweeps(root)  # grids and Optuna searches: RUNS_ROOT/multirun/<date-time>
    if not run_dirs and not sweeps:
        return f"no run under {root}"
    swept = {d.name: sweep.values_label(read_provenance(d)["sweep"]["values"]) for d in run_dirs
             if read_provenance(d).get("sweep")}
    table = format_table([run_status(d) for d in run_dirs], swept) if run_dirs else f"no run under {root}"
    if sweeps:
        table += ("\n\nsweeps (python -m llmft.runs sweep DIR):\n"
                  + sweep.format_sweeps([sweep.read_sweep(path) for path in sweeps]))
    return table


def write_loss_curve(run_dir: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = read_metrics(run_dir)
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
    lines = [format_table([row]), ""]
    if summary_path(run_dir).exists():
        lines.append(summary_path(run_dir).read_text())  # as written: every key, in its order
    if row.error:
        lines.append(f"error: {row.error}")
    listed = checkpoints.describe(checkpoints_dir(run_dir))  # the newest read through against its checksums
    if listed:
        lines += [f"checkpoints ({checkpoints_dir(run_dir)}):", *(f"  {line}" for line in listed)]
    if metrics_path(run_dir).exists():
        lines.append(f"loss curve: {write_loss_curve(run_dir)}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    return run_command(runs, argv, __doc__)


def runs(argv: list[str]) -> int:
    if argv[:1] == ["show"]:
        if len(argv) != 2 or not is_run_dir(argv[1]):
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
