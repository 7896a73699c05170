"""A grid sweep you can read (`python -m llmft.launch -m train.lr=1e-3,2e-3 peft.r=4,8`): each job's run directory is
named after the values it takes and says them in provenance.json, `llmft runs` shows them beside each run and
`llmft runs sweep DIR` compares the runs side by side (final loss, best validation loss, wall time); Hydra leaves no
empty per-job folder in the sweep's folder. Locally (trained one after the other) and as SLURM jobs (submitit)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from llmft.launch import runs, sweep
from support.runs import run_llmft
from support.slurm_cluster import ensure_local_slurm

STEPS = ["train.max_steps=2", "train.eval_every=1", "train.log_every=1", "train.save_every=0"]


def sweep_dir_of(stdout: str) -> Path:
    return Path(re.search(r"^sweep: (\S+) \(one run per combination", stdout, re.M).group(1))


def empty_folders(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_dir() and not any(p.iterdir())]


def check_grid(sweep_dir: Path, runs_root: Path, expected: dict[str, dict[str, str]]) -> list[Path]:
    """The runs of the sweep: one per expected name suffix, each with its values in provenance.json and a
    <n>/trial.json in the sweep's folder pointing to it; no empty folder anywhere under the sweep's folder."""
    run_dirs = sorted(p for p in runs_root.iterdir() if (p / "config.yaml").is_file())
    assert sorted(re.sub(r"^\d{8}-\d{6}-tiny-lora-", "", p.name) for p in run_dirs) == sorted(expected), run_dirs
    for run_dir in run_dirs:
        suffix = re.sub(r"^\d{8}-\d{6}-tiny-lora-", "", run_dir.name)
        recorded = json.loads((run_dir / "provenance.json").read_text())["sweep"]
        assert recorded["values"] == expected[suffix] and recorded["dir"] == str(sweep_dir)
        trial = json.loads((sweep_dir / str(recorded["job"]) / "trial.json").read_text())
        assert trial["run_dir"] == str(run_dir) and trial["params"] == expected[suffix]
    assert (sweep_dir / "multirun.yaml").is_file() and not empty_folders(sweep_dir)
    assert sorted(p.name for p in sweep_dir.iterdir()) == sorted(["multirun.yaml", *map(str, range(len(expected)))])
    return run_dirs


@pytest.mark.slow
def test_a_local_grid_names_each_run_after_its_values_and_compares_them(tmp_path, capsys):
    result = run_llmft("launch", "-m", "train.lr=1e-3,2e-3", "peft.r=4", "train.max_steps=2", *STEPS[1:],
                       f"runs_root={tmp_path}", timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    sweep_dir = sweep_dir_of(result.stdout)
    run_dirs = check_grid(sweep_dir, tmp_path, {"lr_0.001": {"train.lr": "0.001"}, "lr_0.002": {"train.lr": "0.002"}})
    summaries = {p: json.loads((p / "summary.json").read_text()) for p in run_dirs}
    assert all(s["status"] == "completed" for s in summaries.values())
    assert f"python -m llmft.runs sweep {sweep_dir}" in result.stdout  # said at the start, compared at the end
    assert f"sweep {sweep_dir}: 2 trials, 2 completed, 0 failed" in result.stdout

    assert runs.main([str(tmp_path)]) == 0  # every run, with the values it took; then the sweep
    listing = capsys.readouterr().out
    lines = {line.split()[0]: line for line in listing.splitlines()[1:] if line.strip()}
    for run_dir in run_dirs:
        assert lines[run_dir.name].endswith(f"  lr={run_dir.name.rsplit('_', 1)[1]}"), listing
    assert f"multirun/{sweep_dir.name}" in listing

    assert runs.main(["sweep", str(sweep_dir)]) == 0  # side by side
    shown = capsys.readouterr().out.splitlines()
    assert shown[0] == f"sweep {sweep_dir}: 2 trials, 2 completed, 0 failed"
    assert shown[1].split() == ["trial", "status", "loss", "best_val", "final_val_loss", "wall", "values", "run", "dir"]
    for number, run_dir in enumerate(run_dirs):
        summary = summaries[run_dir]
        metrics = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
        best_val = min(r["val_loss"] for r in metrics if "val_loss" in r)
        row = next(l for l in shown if l.endswith(str(run_dir))).split()
        wall = int(summary["wall_time_s"])
        assert row[1:7] == ["completed", f"{summary['final_loss']:.4g}", f"{best_val:.4g}",
                            f"{summary['final_val_loss']:.6g}", f"{wall // 60}m{wall % 60:02d}s",
                            f"lr={run_dir.name.rsplit('_', 1)[1]}"], row
    assert shown[-1].startswith("best: final_val_loss=")

    # the names hold no character Hydra's override grammar refuses: resume=RUN_DIR is typed as it is printed
    composed = run_llmft("launch", "--cfg", "job", f"resume={run_dirs[0]}", timeout=120)
    assert composed.returncode == 0 and f"resume: {run_dirs[0]}" in composed.stdout, composed.stderr


def test_every_job_of_a_two_key_grid_on_a_cluster_is_named_after_both_values(tmp_path):
    """launch.prepare_only: the run directories as a cluster sweep creates them before it submits, without SLURM."""
    result = run_llmft("launch", "-m", "+cluster=localslurm", "train.lr=1e-4,2e-4", "peft.r=8,16",
                       "launch.prepare_only=true", f"runs_root={tmp_path}", timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    values = {f"lr_{lr}-r_{r}": {"train.lr": lr, "peft.r": r} for lr in ("0.0001", "0.0002") for r in ("8", "16")}
    check_grid(sweep_dir_of(result.stdout), tmp_path, values)


def test_names_and_labels_of_a_jobs_values(tmp_path):
    values = {"train.lr": "0.0001", "peft.r": "8", "model": "llama3_8b"}
    assert sweep.values_label(values) == "lr=0.0001,r=8,model=llama3_8b"
    assert sweep.job_run_dir(tmp_path / "x", values).name == "x-lr_0.0001-r_8-model_llama3_8b"
    (tmp_path / "x-lr_3e-05").mkdir()
    assert sweep.job_run_dir(tmp_path / "x", {"train.lr": "3e-05"}).name == "x-lr_3e-05-2"
    same_leaf = {"train.seed": "1", "eval.seed": "2", "data.path": "/data/a b.jsonl"}
    assert sweep.values_label(same_leaf) == "train.seed=1,eval.seed=2,path=/data/a b.jsonl"
    assert sweep.job_run_dir(tmp_path / "x", same_leaf).name == "x-train.seed_1-eval.seed_2-path_data_a_b.jsonl"
    assert sweep.job_run_dir(tmp_path / "x", {"peft.target_modules": "[q_proj,v_proj]"}).name == \
        "x-target_modules_q_proj+v_proj"


@pytest.fixture(scope="session")
def slurm_env() -> dict[str, str]:
    return ensure_local_slurm()


@pytest.mark.slow
def test_a_grid_on_slurm_submits_each_job_under_its_values(slurm_env, tmp_path, capsys):
    """Each job submitted through submitit (waited for, one after the other): its run directory named after its
    value, and the sweep compared by `runs sweep` once the jobs ended."""
    result = run_llmft("launch", "-m", "+cluster=localslurm", "cluster.gpus_per_node=1", "train.lr=1e-3,2e-3",
                       "launch.wait=true", *STEPS, f"runs_root={tmp_path}", env=slurm_env,
                       timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    assert result.stdout.count("submitted job") == 2
    sweep_dir = sweep_dir_of(result.stdout)
    check_grid(sweep_dir, tmp_path, {"lr_0.001": {"train.lr": "0.001"}, "lr_0.002": {"train.lr": "0.002"}})
    assert runs.main(["sweep", str(sweep_dir)]) == 0
    shown = capsys.readouterr().out
    assert "2 trials, 2 completed, 0 failed" in shown and "lr=0.001" in shown and "lr=0.002" in shown
