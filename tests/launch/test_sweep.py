"""Optuna sweeps through Hydra's sweeper plugin (llmft/launch/sweep.py): trials trained locally one after the other
and as SLURM jobs two at a time, their objective (the final validation loss) back in the study, the results with every
trial's run directory, failed trials failing alone, and one sentence for a missing plugin or a bad search-space key."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from llmft.errors import UserError
from llmft.launch import runs, sweep
from support.early import EARLY, EarlyCommand
from support.runs import run_llmft
from support.slurm_cluster import ensure_local_slurm

TRIAL = ["train.max_steps=2", "train.eval_every=2", "train.log_every=1", "train.save_every=0"]
OPTUNA = ["-m", "hydra/sweeper=optuna", "hydra.sweeper.n_trials=2", "hydra.sweeper.sampler.seed=0"]


def sweep_dir_of(stdout: str) -> Path:
    return Path(re.search(r"^sweep: (\S+) \(Optuna", stdout, re.M).group(1))


def check_results(sweep_dir: Path, num_trials: int) -> dict:
    """optimization_results.yaml: every trial completed with its run directory, each value the final validation loss
    of that run's summary.json and each searched lr the one its config.yaml trained with; the best is the minimum."""
    results = OmegaConf.to_container(OmegaConf.load(sweep_dir / "optimization_results.yaml"))
    trials = results["trials"]
    assert [t["number"] for t in trials] == list(range(num_trials))
    assert all(t["status"] == "completed" for t in trials), trials
    for trial in trials:
        run_dir = Path(trial["run_dir"])
        assert trial["value"] == json.loads((run_dir / "summary.json").read_text())["final_val_loss"]
        trained_lr = OmegaConf.load(run_dir / "config.yaml").train.lr
        assert trained_lr == pytest.approx(trial["params"]["train.lr"]) and 1e-4 <= trained_lr <= 1e-2
    assert len({t["run_dir"] for t in trials}) == num_trials
    best = min(trials, key=lambda t: t["value"])
    assert results["best_value"] == pytest.approx(best["value"]) and results["best_run_dir"] == best["run_dir"]
    assert results["best_params"]["train.lr"] == pytest.approx(best["params"]["train.lr"])
    return results


# started when the tests are collected (support/early.py): its trials train on a core earlier tests leave idle
EARLY["tests/launch/test_sweep.py::"
      "test_a_local_sweep_trains_each_trial_and_writes_the_best_with_every_run_directory"] = \
    EarlyCommand(lambda folder: [sys.executable, "-m", "llmft.launch", *OPTUNA, "train.lr=interval(1e-4,1e-2)",
                                 *TRIAL, f"runs_root={folder / 'runs'}"], timeout=600)


@pytest.mark.slow
def test_a_local_sweep_trains_each_trial_and_writes_the_best_with_every_run_directory(early_command, capsys):
    tmp_path, result = early_command.folder / "runs", early_command.finished()
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    sweep_dir = sweep_dir_of(result.stdout)
    results = check_results(sweep_dir, 2)
    assert f"results: {sweep_dir / 'optimization_results.yaml'}" in result.stdout
    assert runs.main([str(tmp_path)]) == 0  # the runs and, below them, the sweep with its best value
    listing = capsys.readouterr().out
    assert f"multirun/{sweep_dir.name}" in listing and f"{results['best_value']:.6g}" in listing
    assert runs.main(["sweep", str(sweep_dir)]) == 0
    shown = capsys.readouterr().out
    assert all(trial["run_dir"] in shown for trial in results["trials"]) and "2 completed, 0 failed" in shown


def test_failed_trials_fail_alone_and_a_sweep_where_none_completed_says_so(tmp_path):
    """Batches of one trial: the first fails (a value the validation refuses), the sweep goes on to the second."""
    result = run_llmft("launch", *OPTUNA, "hydra.sweeper.n_jobs=1", "train.micro_batch_size=choice(0,-1)",
                       f"runs_root={tmp_path}")
    assert result.returncode == 1, result.stderr
    assert "no trial of the sweep completed" in result.stderr.strip().splitlines()[-1]
    results = OmegaConf.load(sweep_dir_of(result.stdout) / "optimization_results.yaml")
    assert results.best_value is None and len(results.trials) == 2
    assert sorted(t.params["train.micro_batch_size"] for t in results.trials) == [-1, 0]
    for trial in results.trials:
        assert trial.status == "failed"
        assert trial.error == f"train.micro_batch_size={trial.params['train.micro_batch_size']} must be positive."


def test_a_search_space_key_not_in_the_config_is_one_sentence_naming_it(tmp_path):
    result = run_llmft("launch", *OPTUNA, "train.lrr=interval(1e-4,1e-2)", f"runs_root={tmp_path}")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == \
        "llmft: bad config: train.lrr: Key 'lrr' not in 'TrainConfig'; did you mean train.lr?"
    assert not [p for p in tmp_path.iterdir() if p.name != "multirun"]  # no run directory was created


def test_the_sweep_command_line_is_checked_before_hydra_sees_it(monkeypatch):
    argv = ["-m", "hydra/sweeper=optuna", "train.lr=interval(1e-5,1e-3)"]
    assert sweep.sweep_argv(argv) == [*argv, "hydra.sweeper.max_failure_rate=1.0"]  # a failed trial fails alone
    given = [*argv, "hydra.sweeper.max_failure_rate=0.5"]
    assert sweep.sweep_argv(given) == given
    assert sweep.sweep_argv(["train.lr=1e-4"]) == ["train.lr=1e-4"]
    with pytest.raises(UserError, match=r"add -m"):
        sweep.sweep_argv(argv[1:])
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name.startswith("hydra_plugins.") else find_spec(name, *a))
    with pytest.raises(UserError) as missing:
        sweep.sweep_argv(argv)
    assert str(missing.value) == ("hydra/sweeper=optuna needs hydra-optuna-sweeper, which is not installed: pip "
                                  "install 'llmft[sweep]' (from a clone: pip install -e '.[sweep]').")
    with pytest.raises(UserError, match=r"hydra/launcher=joblib needs hydra-joblib-launcher.*\.\[sweep\]"):
        sweep.sweep_argv(["-m", "hydra/launcher=joblib", "train.lr=1e-4,2e-4"])


@pytest.fixture(scope="session")
def slurm_env() -> dict[str, str]:
    return ensure_local_slurm()


@pytest.mark.slow
def test_a_sweep_on_slurm_runs_each_trial_as_a_job_two_at_a_time(slurm_env, tmp_path):
    """hydra/launcher=joblib: the batch's two trials are two jobs in the queue together; each trial waits for its job
    and reads the objective from the run's summary.json."""
    result = run_llmft("launch", *OPTUNA, "hydra/launcher=joblib", "hydra.launcher.n_jobs=2",
                       "train.lr=interval(1e-4,1e-2)", "+cluster=localslurm", "cluster.gpus_per_node=1", *TRIAL,
                       f"runs_root={tmp_path}", env=slurm_env)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    assert result.stdout.count("submitted job") == 2
    sweep_dir = sweep_dir_of(result.stdout)
    results = check_results(sweep_dir, 2)
    submitted = [json.loads((Path(t["run_dir"]) / "jobs.jsonl").read_text())["time"] for t in results["trials"]]
    ended = [json.loads((sweep_dir / str(t["number"]) / "trial.json").read_text())["ended"] for t in results["trials"]]
    assert max(submitted) < min(ended)  # both jobs were submitted before either trial ended


def test_the_objective_is_a_completed_runs_finite_validation_loss(tmp_path):
    def run_with(summary: dict | None) -> Path:
        run_dir = tmp_path / f"run{len(list(tmp_path.iterdir()))}"
        run_dir.mkdir()
        if summary is not None:
            (run_dir / "summary.json").write_text(json.dumps(summary))
        return run_dir

    assert sweep.objective(run_with({"status": "completed", "final_val_loss": 2.5}), 0) == 2.5
    cases = [({"status": "completed", "final_val_loss": float("nan")}, "the validation loss is nan: the run diverged"),
             ({"status": "completed", "final_val_loss": None}, "has no final_val_loss"),
             ({"status": "interrupted", "step": 3}, "did not complete (interrupted): continue it with python -m "
                                                    "llmft.launch resume="),
             ({"status": "failed", "error": "DataError: no sample"}, "did not complete (failed): DataError: no sample"),
             (None, "did not complete (no summary.json): exit code 1")]
    for summary, reason in cases:
        with pytest.raises(sweep.TrialFailed, match=re.escape(reason)):
            sweep.objective(run_with(summary), 1)


def test_a_sweep_still_running_is_read_from_its_trial_files(tmp_path, capsys):
    sweep_dir = tmp_path / "multirun" / "20261201-101500"
    trials = [{"number": 0, "overrides": ["train.lr=0.001", "model=tiny"], "status": "completed", "value": 3.25,
               "run_dir": "/runs/a", "error": None},
              {"number": 1, "overrides": ["train.lr=0.01", "model=tiny"], "status": "running", "value": None,
               "run_dir": "/runs/b", "error": None}]
    for trial in trials:
        sweep.write_trial(sweep_dir / str(trial["number"]) / "trial.json", trial)
    assert sweep.find_sweeps(tmp_path) == [sweep_dir]
    found = sweep.read_sweep(sweep_dir)
    assert not found["ended"] and found["best_value"] == 3.25 and found["best_run_dir"] == "/runs/a"
    assert found["trials"][0]["params"] == {"train.lr": 0.001, "model": "tiny"}
    assert runs.main(["sweep", str(sweep_dir)]) == 0
    shown = capsys.readouterr().out
    assert "2 trials, 1 completed, 0 failed (running, or stopped before its end)" in shown
    assert "    1 running" in shown and "/runs/b" in shown and "best: final_val_loss=3.25" in shown
