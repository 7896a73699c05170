"""What a new user broke (issue 12): errors before a run directory exists, one writer per run directory, ranks that
die with their launcher, Ctrl-C, resume that says what it does, and the smaller ones."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from conftest import REPO, compose, read_metrics, run_llmft, wait_for_step
from llmft.config.validation import check_installed
from llmft.errors import ConfigError, UserError
from llmft.rundir import create as rundir
from llmft.rundir import lock as run_lock
from llmft.training.loop import train

QUICK = ["train.log_every=1", "train.eval_every=100", "train.micro_batch_size=4"]


@pytest.mark.parametrize("override, message", [
    ("train.lerning_rate=1e-4", "llmft: bad config: train.lerning_rate: Key 'lerning_rate' not in 'TrainConfig'"),
    ("train.warmup_step=3", "did you mean train.warmup_steps?"),
    ("train.lr=abc", "llmft: bad config: train.lr=abc: expected a float."),
    ("data.packing=maybe", "llmft: bad config: data.packing=maybe: expected a bool."),
    ("parallelism.strategy=fsdp2", "expected one of auto, single, ddp, fsdp"),
    ("+train.foo=1", "llmft: bad config: train.foo: Key 'foo' not in 'TrainConfig'"),
    ("data=tickets", "llmft: data.path is not set: add data.path=... to the command"),
])
def test_a_user_error_is_one_line_exit_2_and_creates_nothing(tmp_path, override, message):
    result = run_llmft("launch", override, f"run_dir={tmp_path / 'run'}", timeout=120)
    assert result.returncode == 2, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and message in result.stderr, result.stderr
    assert not (tmp_path / "run").exists()


def test_tickets_without_a_staff_rule_is_refused_at_launch(tmp_path):
    result = run_llmft("launch", "data=tickets", "data.path=/etc/hostname", f"run_dir={tmp_path / 'run'}")
    assert result.returncode == 2 and "data.tickets.staff_domains" in result.stderr
    assert not (tmp_path / "run").exists()


def test_a_missing_extra_names_the_pip_command(monkeypatch):
    import llmft.config.validation as validation

    monkeypatch.setattr(validation, "find_spec", lambda name: None)
    with pytest.raises(UserError, match=r"parallelism=zero3 needs deepspeed, which is not installed: pip install "
                                        r"'llmft\[deepspeed\]'"):
        check_installed(compose(["parallelism=zero3", "launch.nproc=2"]), local=True)
    with pytest.raises(UserError, match=r"pip install 'llmft\[qlora\]'"):
        check_installed(compose(["peft=qlora"]), local=False)  # a cluster job: the GPU is there
    with pytest.raises(UserError, match=r"pip install 'llmft\[eval\]'"):
        check_installed(compose(["eval.after_train=true"]), local=False)


def test_eval_overrides_are_checked_at_launch(tmp_path):
    result = run_llmft("launch", "eval.overrides=[eval.max_new_tokns=4]", f"run_dir={tmp_path / 'run'}")
    assert result.returncode == 2 and "eval.max_new_tokns" in result.stderr, result.stderr
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("module", ["launch", "train", "data", "plan", "runs", "eval", "chat", "export"])
def test_every_command_has_help(module):
    result = run_llmft(module, "--help", timeout=120)
    assert result.returncode == 0 and result.stdout.strip() and not result.stderr.strip(), result.stderr


def test_an_unknown_subcommand_is_named():
    result = subprocess.run([sys.executable, "-m", "llmft.cli", "foo"], capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 2 and result.stderr.startswith("llmft: unknown command 'foo'")


def test_plan_prints_the_sbatch_script_without_slurm(tmp_path):
    env = {"PATH": str(tmp_path)}  # nothing on PATH, no srun nor sbatch: a laptop
    result = run_llmft("plan", "+cluster=jeanzay", "cluster.account=abc", "model=llama3_8b", env=env)
    assert result.returncode == 0, result.stderr
    assert "#SBATCH --account=abc@a100" in result.stdout and "--kill-on-bad-exit=1" in result.stdout


def test_prepared_data_is_not_world_readable(tmp_path):
    result = run_llmft("data", "prepare", f"data.output_dir={tmp_path / 'prepared'}", timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    paths = [tmp_path / "prepared", *(tmp_path / "prepared").rglob("*")]
    assert paths[1:] and all(p.stat().st_mode & 0o007 == 0 for p in paths), [oct(p.stat().st_mode) for p in paths]


def test_training_on_every_ticket_is_allowed(tmp_path):
    cfg = compose(["data.validation_fraction=0", "train.max_steps=3", *QUICK, f"run_dir={tmp_path}"])
    summary = train(cfg, rundir.create(cfg)).summary
    assert summary["status"] == "completed" and summary["num_validation_samples"] == 0
    assert summary["final_val_loss"] is None


def test_a_checkpoint_is_ranked_by_its_own_steps_validation_loss(tmp_path):
    cfg = compose(["train.max_steps=6", "train.save_every=2", "train.eval_every=3", "train.keep_last=5", *QUICK[:1],
                   f"run_dir={tmp_path}"])
    train(cfg, rundir.create(cfg))
    manifests = {int(p.name.split("_")[1]): json.loads((p / "manifest.json").read_text())
                 for p in (tmp_path / "checkpoints").glob("step_*")}
    assert manifests[2]["val_loss"] is None and manifests[4]["val_loss"] is None  # evaluated at 3 and 6 only


# ------------------------------------------------------------------------------------------------ one writer


def launch(run_dir: Path, *overrides: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "llmft.launch", *QUICK, *overrides, f"run_dir={run_dir}"],
                            cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)




@pytest.mark.slow
def test_a_second_writer_is_refused_while_the_first_lives_then_ctrl_c_checkpoints_and_ranks_die_with_their_launcher(
        tmp_path):
    """Two scenarios at once, each on its own run directory (one process for the first, 2 ranks for the second:
    each leaves a core idle most of the time when alone)."""
    from concurrent.futures import ThreadPoolExecutor

    (tmp_path / "writer").mkdir()
    (tmp_path / "ranks").mkdir()
    with ThreadPoolExecutor(1) as pool:
        ranks = pool.submit(ranks_die_with_their_launcher, tmp_path / "ranks")
        a_second_writer_is_refused_while_the_first_lives_then_ctrl_c_checkpoints(tmp_path / "writer")
        ranks.result()  # its assertion error, if any


def a_second_writer_is_refused_while_the_first_lives_then_ctrl_c_checkpoints(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    first = launch(run_dir, "train.max_steps=300", "train.save_every=0")
    wait_for_step(run_dir, 3, first)
    for second in (["resume=" + str(run_dir)], [f"run_dir={run_dir}"]):
        refused = run_llmft("launch", *second, timeout=120)
        assert refused.returncode == 2 and len(refused.stderr.strip().splitlines()) == 1, refused.stderr
        assert f"{run_dir} is in use by process {first.pid}" in refused.stderr
    first.send_signal(signal.SIGINT)  # Ctrl-C: a checkpoint, a summary, the resume command
    out, err = first.communicate(timeout=120)
    assert first.returncode == 3 and f"resume={run_dir}" in err, err[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "interrupted" and summary["signal"] == "SIGINT"
    assert (run_dir / f"checkpoints/step_{summary['step']}/manifest.json").exists()
    assert not run_lock.lock_path(run_dir).exists()  # released at exit
    # resume: says from which step, applies what a resume may change, never writes a step twice
    resumed = run_llmft("launch", f"resume={run_dir}", f"train.max_steps={summary['step'] + 2}", timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resume: {run_dir} from step {summary['step']}" in resumed.stdout
    steps = [r["step"] for r in read_metrics(run_dir) if "loss" in r]
    assert steps == list(range(1, summary["step"] + 3))


def test_resume_refuses_an_override_that_changes_what_it_trains(tmp_path):
    cfg = compose(["train.max_steps=2", *QUICK, f"run_dir={tmp_path}"])
    rundir.create(cfg)
    run_lock.release(tmp_path)
    result = run_llmft("launch", f"resume={tmp_path}", "train.lr=1e-3", timeout=120)
    assert result.returncode == 2 and "train.lr=1e-3 would change what it trains" in result.stderr, result.stderr


def test_a_stale_lock_is_taken_over_with_a_message(tmp_path):
    run_lock.lock_path(tmp_path).write_text(json.dumps({"host": os.uname().nodename, "pid": 2**22 + 7,
                                                         "job_id": None, "since": "earlier"}))
    messages = []
    holder = run_lock.acquire(tmp_path, log=messages.append)
    assert holder["pid"] == os.getpid() and "taking over the stale lock" in messages[0]
    other_host = {"host": "another-node", "pid": 1, "job_id": None, "since": "now"}
    run_lock.lock_path(tmp_path).write_text(json.dumps(other_host))  # fresh: alive by its heartbeat
    with pytest.raises(run_lock.RunDirectoryInUse, match="in use by process 1 on another-node"):
        run_lock.acquire(tmp_path)


def ranks_die_with_their_launcher(tmp_path: Path) -> None:
    """kill -9 of the launcher's whole process group: torchrun and the ranks (each in a session of its own) stop."""
    run_dir = tmp_path / "run"
    launcher = launch(run_dir, "parallelism=ddp", "launch.nproc=2", "train.max_steps=400", "train.save_every=0")
    wait_for_step(run_dir, 2, launcher)
    family = psutil.Process(launcher.pid).children(recursive=True)
    ranks = [p for p in family if "llmft.train" in " ".join(p.cmdline())]
    assert len(ranks) >= 2
    os.killpg(launcher.pid, signal.SIGKILL)
    launcher.communicate(timeout=30)
    gone, alive = psutil.wait_procs(family, timeout=90)
    assert not alive, [p.cmdline() for p in alive]
    # and the run can be resumed at once: the lock's holder is dead
    resumed = run_llmft("launch", f"resume={run_dir}", "train.max_steps=3", timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]


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


def test_a_requeue_whose_scontrol_is_ended_by_the_requeues_own_sigterm_counts_as_requeued(tmp_path, monkeypatch):
    """SLURM's SIGTERM for an accepted requeue can end `scontrol requeue` (it runs inside the job) before it returns;
    the race cannot be triggered on demand on the real local SLURM, so an `scontrol` that ends itself that way stands
    in for it here. Any other failure still raises."""
    from llmft.training.signals import requeue_slurm_job
    from llmft.training.topology import Topology

    fake = tmp_path / "scontrol"
    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")
    monkeypatch.setenv("SLURM_JOB_ID", "12345")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "0")
    topology = Topology.from_env()
    fake.write_text("#!/bin/sh\nkill -TERM $$\n")
    fake.chmod(0o755)
    assert requeue_slurm_job(3, topology) is True
    fake.write_text("#!/bin/sh\nexit 1\n")
    with pytest.raises(subprocess.CalledProcessError):
        requeue_slurm_job(3, topology)
