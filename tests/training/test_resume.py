"""Runs that lose nothing: a signal at an arbitrary step, a SIGKILL during a checkpoint write or at random moments,
a full disk; a resume that says what it does and refuses what it cannot do; and nothing private leaks from a run
directory."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
from safetensors.torch import load_file

from llmft.config.compose import compose
from llmft.rundir import create as rundir
from llmft.rundir import checkpoints as checkpoint
from llmft.rundir import lock as run_lock
from llmft.rundir.checkpoints import CheckpointError
from llmft.training.loop import train
from support.runs import REPO, read_metrics, run_llmft, wait_for_step

# 24 steps: the signal comes at step 12 or later, and the resumed part still crosses an evaluation (step 16)
RUN = ["train.max_steps=24", "train.log_every=1", "train.eval_every=16", "train.save_every=0",
       "train.micro_batch_size=4"]
QUICK = ["train.log_every=1", "train.eval_every=100", "train.micro_batch_size=4"]


def start_launch(run_dir: Path, overrides: list[str], env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "llmft.launch", *RUN, *overrides, f"run_dir={run_dir}"],
                            cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)




def training_processes(launcher: subprocess.Popen) -> list[psutil.Process]:
    """The processes that train: the launcher itself (single), or torchrun's workers (one per rank)."""
    children = psutil.Process(launcher.pid).children(recursive=True)
    workers = [p for p in children if "llmft.train" in " ".join(p.cmdline()) and "torch.distributed.run"
               not in " ".join(p.cmdline())]
    return workers or [psutil.Process(launcher.pid)]


def adapter(run_dir: Path) -> dict:
    return load_file(run_dir / "final" / "adapter_model.safetensors")


# single and ddp have the same bitwise check elsewhere, on harder paths: one process in the SIGKILL trials below
# and test_preference_tuning's signal test; 2 ddp ranks in test_slurm's USR2 test (a real requeue by SLURM). Here: the
# sharded strategies, whose checkpoints are the ones that could lose state.
SIGNALLED = ("fsdp", "zero3")
SIGNALLED_TEST = "test_signal_then_resume_gives_bitwise_the_uninterrupted_adapter"


def on_two_ranks(strategy: str) -> list[str]:
    return [f"parallelism={strategy}", "launch.nproc=2", "parallelism.zero3_param_persistence_threshold=0",
            "parallelism.zero3_model_persistence_threshold=0"]


@pytest.fixture(scope="module", autouse=True)
def uninterrupted(request, tmp_path_factory) -> dict[str, tuple[Path, subprocess.Popen]]:
    """The uninterrupted launches the signal test compares with, one per strategy, started with the module when that
    test is selected: they train on the core that the single-process tests before it in this file leave idle."""
    if not any(item.originalname == SIGNALLED_TEST for item in request.session.items):
        yield {}
        return
    root = tmp_path_factory.mktemp("uninterrupted")
    runs = {strategy: (root / strategy, start_launch(root / strategy, on_two_ranks(strategy)))
            for strategy in SIGNALLED}
    yield runs
    for _, process in runs.values():
        if process.poll() is None:
            process.kill()
            process.communicate()


@pytest.mark.slow
def test_sigkill_during_checkpoint_writes_never_breaks_resume(tmp_path):
    run_dir = tmp_path / "run"
    checkpoints = run_dir / "checkpoints"
    kills, seen_incomplete = 0, 0
    for attempt in range(3):  # kill, resume, kill again...
        process = start_launch(run_dir, ["train.save_every=1", "train.keep_last=2"]) if attempt == 0 else \
            subprocess.Popen([sys.executable, "-m", "llmft.launch", f"resume={run_dir}"], cwd=REPO,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.time() + 120
        while time.time() < deadline and process.poll() is None:
            if checkpoints.exists() and any(p.name.startswith(".tmp-") for p in checkpoints.iterdir()) and \
                    len(list(checkpoints.glob("step_*"))) >= 1:
                process.send_signal(signal.SIGKILL)  # in the middle of writing a checkpoint
                kills += 1
                break
            time.sleep(0.002)
        process.communicate(timeout=60)
        latest, incomplete = checkpoint.find_latest(checkpoints)
        assert latest is not None and checkpoint.is_complete(latest)
        seen_incomplete += bool(incomplete)
    assert kills >= 1 and seen_incomplete >= 1  # a partial checkpoint was left behind, and was ignored
    final = run_llmft("launch", f"resume={run_dir}", timeout=300)
    assert final.returncode == 0, final.stderr[-4000:]
    assert json.loads((run_dir / "summary.json").read_text())["status"] == "completed"


def test_a_full_disk_at_save_time_stops_the_run_and_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    from llmft.training.strategies.single import SingleStrategy

    cfg = compose(["train.max_steps=30", "train.save_every=10", "train.eval_every=10", f"run_dir={tmp_path / 'r'}"])
    run_dir = rundir.create(cfg)
    real_save = SingleStrategy.save

    def save_until_disk_full(self, folder):
        if "step_20" in folder.name:
            raise OSError(28, "No space left on device")
        real_save(self, folder)

    monkeypatch.setattr(SingleStrategy, "save", save_until_disk_full)
    with pytest.raises(CheckpointError, match="No space left on device.*previous checkpoint is kept"):
        train(cfg, run_dir)
    assert [p.name for p in (run_dir / "checkpoints").iterdir()] == ["step_10"]
    assert max(r["step"] for r in read_metrics(run_dir) if "loss" in r) == 20  # it did not train on
    assert not (run_dir / "final").exists()


def test_no_secret_and_nothing_world_readable_in_a_run_directory(tmp_path):
    secrets = {"HF_TOKEN": "hf_SECRETSECRETSECRETSECRETSECRETSE", "WANDB_API_KEY": "wandb0123456789abcdef0123456789"}
    run_dir = tmp_path / "run"
    # the two runs at once (one process each)
    run = subprocess.Popen([sys.executable, "-m", "llmft.launch", "train.max_steps=4", "train.eval_every=2",
                            "train.save_every=2", f"run_dir={run_dir}", "data.system_prompt=You help."], cwd=REPO,
                           env={**os.environ, "OMP_NUM_THREADS": "1", **secrets}, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True)
    # a run prepared, then resumed from a shell whose umask lets everyone read: written under the run's umask too
    prepared = tmp_path / "prepared"
    assert run_llmft("launch", "train.max_steps=4", "train.save_every=2", "launch.prepare_only=true",
                     f"run_dir={prepared}").returncode == 0
    resumed = subprocess.run([sys.executable, "-m", "llmft.launch", f"resume={prepared}"], cwd=REPO,
                             capture_output=True, text=True, timeout=600, umask=0o022,
                             env={**os.environ, "OMP_NUM_THREADS": "1", **secrets})
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    out, err = run.communicate(timeout=600)
    assert run.returncode == 0, err[-3000:]
    for output in (out, err, resumed.stdout, resumed.stderr):
        assert not any(value in output for value in secrets.values())
    paths = [run_dir, *run_dir.rglob("*"), prepared, *prepared.rglob("*")]
    assert len(paths) > 10
    for path in paths:
        if not path.is_symlink():
            mode = path.stat().st_mode
            assert not mode & stat.S_IROTH and not mode & stat.S_IWOTH, f"{path} is world-readable"
        if path.is_file():
            content = path.read_bytes()
            assert not any(value.encode() in content for value in secrets.values()), path


def test_secret_named_config_values_are_redacted(tmp_path):
    from llmft.config.redact import REDACTED, redact_argv, redact_config

    assert redact_config({"eval": {"judge_api_key": "sk-123", "judge_model": "m"}, "hub_token": None}) == \
        {"eval": {"judge_api_key": REDACTED, "judge_model": "m"}, "hub_token": None}
    assert redact_argv(["x", "eval.judge_api_key=sk-1", "train.lr=1"]) == ["x", f"eval.judge_api_key={REDACTED}",
                                                                             "train.lr=1"]
    assert redact_config({"eval": {"overrides": ["eval.judge_api_key=sk-1", "eval.max_new_tokens=64"]},
                          "max_new_tokens": 64, "hf_token": "hf_x", "password": "p", "end_of_turn_token": "<e>"}) == {
        "eval": {"overrides": [f"eval.judge_api_key={REDACTED}", "eval.max_new_tokens=64"]},
        "max_new_tokens": 64, "hf_token": REDACTED, "password": REDACTED, "end_of_turn_token": "<e>"}


def test_resume_refuses_a_missing_or_completed_run_in_one_line(tmp_path):
    missing = run_llmft("launch", f"resume={tmp_path / 'nowhere'}")
    assert missing.returncode == 2 and len(missing.stderr.strip().splitlines()) == 1
    assert "is not" in missing.stderr or "does not exist" in missing.stderr
    done = tmp_path / "done"
    done.mkdir()
    (done / "summary.json").write_text(json.dumps({"status": "completed"}))
    completed = run_llmft("launch", f"resume={done}")
    assert completed.returncode == 2 and "has completed already" in completed.stderr


def launch(run_dir: Path, *overrides: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "llmft.launch", *QUICK, *overrides, f"run_dir={run_dir}"],
                            cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)


def test_resume_refuses_an_override_that_changes_what_it_trains(tmp_path):
    cfg = compose(["train.max_steps=2", *QUICK, f"run_dir={tmp_path}"])
    rundir.create(cfg)
    run_lock.release(tmp_path)
    result = run_llmft("launch", f"resume={tmp_path}", "train.lr=1e-3", timeout=120)
    assert result.returncode == 2 and "train.lr=1e-3 would change what it trains" in result.stderr, result.stderr


@pytest.mark.slow
@pytest.mark.parametrize("strategy", SIGNALLED)
def test_signal_then_resume_gives_bitwise_the_uninterrupted_adapter(tmp_path, strategy, uninterrupted):
    whole_dir, whole = uninterrupted[strategy]
    interrupted = start_launch(tmp_path / "cut", on_two_ranks(strategy))
    wait_for_step(tmp_path / "cut", 12, interrupted)
    training_processes(interrupted)[-1].send_signal(signal.SIGUSR2)  # one rank only: the others must follow
    out, err = interrupted.communicate(timeout=240)
    assert interrupted.returncode == 3, out[-2000:] + err[-4000:]
    assert "resume=" in err
    summary = json.loads((tmp_path / "cut/summary.json").read_text())
    assert summary["status"] == "interrupted" and summary["signal"] == "SIGUSR2"
    cut_step = summary["step"]
    assert 12 <= cut_step < 24
    assert checkpoint.find_latest(tmp_path / "cut/checkpoints")[0].name == f"step_{cut_step}"

    resumed = run_llmft("launch", f"resume={tmp_path / 'cut'}", timeout=300)
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-4000:]
    assert f"resume: from {tmp_path / 'cut/checkpoints'}/step_{cut_step}" in resumed.stdout + resumed.stderr
    out, err = whole.communicate(timeout=300)
    assert whole.returncode == 0, err[-4000:]
    expected, got = adapter(whole_dir), adapter(tmp_path / "cut")
    assert expected.keys() == got.keys()
    for name in expected:
        assert torch.equal(expected[name], got[name]), name


@pytest.mark.slow
def test_sigkill_at_random_moments_then_resume_gives_the_uninterrupted_adapter(tmp_path):
    """10 trials: start (or resume), SIGKILL the launcher's whole process group at a random moment, resume; the
    final adapter equals an uninterrupted run's, bit for bit."""
    import random

    import torch
    from safetensors.torch import load_file

    run = ["train.max_steps=24", "train.save_every=2", "train.keep_last=2", "peft.dropout=0"]
    whole = launch(tmp_path / "whole", *run)
    run_dir, rng, kills = tmp_path / "cut", random.Random(12), 0
    # The kill moments cover 1.5-6 s after the start stratified: the window cut into 10 equal slices, each trial
    # killed at a random moment of its own slice (slices in random order). Every slice is hit, where 20 independent
    # uniform moments (this test before, twice the time) left each slice unhit with probability 0.9**20 = 12%.
    slices = rng.sample(range(10), 10)
    for trial, piece in enumerate(slices):
        process = launch(run_dir, *run) if trial == 0 else subprocess.Popen(
            [sys.executable, "-m", "llmft.launch", f"resume={run_dir}"], cwd=REPO, start_new_session=True,
            env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            # import, data, model, steps, checkpoints: anywhere
            process.wait(timeout=1.5 + 4.5 * (piece + rng.random()) / len(slices))
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            kills += 1
        out, err = process.communicate(timeout=60)
        if process.returncode == 0:
            break
        assert process.returncode == -signal.SIGKILL, err[-3000:]  # never a refused or broken resume
    final = run_llmft("launch", f"resume={run_dir}", timeout=300) if not (run_dir / "final").exists() else None
    assert final is None or final.returncode == 0, final.stderr[-3000:]
    assert whole.wait(timeout=300) == 0
    assert kills >= 8
    expected = load_file(tmp_path / "whole/final/adapter_model.safetensors")
    got = load_file(run_dir / "final/adapter_model.safetensors")
    assert expected.keys() == got.keys() and all(torch.equal(expected[k], got[k]) for k in expected)
    steps = [r["step"] for r in read_metrics(run_dir) if "loss" in r]
    assert steps == sorted(set(steps)) and steps[-1] == 24  # no step written twice


def test_a_secret_inside_a_list_override_is_redacted_in_the_provenance():
    from llmft.config.redact import REDACTED, redact_argv

    argv = ["eval.overrides=['eval.limit=2','eval.judge_api_key=sk-abc']", "eval.overrides=[eval.judge_api_key=sk-d]"]
    assert redact_argv(argv) == [f"eval.overrides=['eval.limit=2','eval.judge_api_key={REDACTED}']",
                                 f"eval.overrides=[eval.judge_api_key={REDACTED}]"]
