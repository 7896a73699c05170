"""Stop signals honoured from a rank's first instruction to its exit (llmft/training/signals.py), and ranks that never
outlive their launcher (llmft/rundir/lifetime.py).

Before the first step a signal stops the run with nothing new to save: one line, summary.json `interrupted` with the
signal, the phase and the resume command, exit code 3; `resume=` then completes it bitwise like an uninterrupted run.
During the final export a signal lets a quick export finish (the run completes); a slow one gets the SLURM job
requeued and, cut by SLURM, leaves the last step's checkpoint and no final/, which the resume then writes. The launcher passes its stop
signals on to torchrun's ranks, and its death during their start-up leaves none of them alive."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from llmft.config.compose import compose
from llmft.rundir import create as rundir
from support.runs import REPO, run_llmft

RUN = ["train.max_steps=6", "train.log_every=1", "train.eval_every=3", "train.save_every=0",
       "train.micro_batch_size=4", "peft.dropout=0"]


def launch(run_dir: Path, *overrides: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "llmft.launch", *RUN, *overrides, f"run_dir={run_dir}"],
                            cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)


def adapter(run_dir: Path) -> dict:
    return load_file(run_dir / "final" / "adapter_model.safetensors")


def assert_same_adapter(expected_run: Path, run: Path) -> None:
    expected, got = adapter(expected_run), adapter(run)
    assert expected.keys() == got.keys() and all(torch.equal(expected[k], got[k]) for k in expected), run


def summary(run_dir: Path) -> dict:
    return json.loads((run_dir / "summary.json").read_text())


def llmft_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("llmft:")]


def processes_of(run_dir: Path) -> list[int]:
    """Every process whose command line names `run_dir`: the launcher, torchrun, the ranks."""
    found = []
    for entry in os.listdir("/proc"):
        try:
            if entry.isdigit() and str(run_dir) in Path(f"/proc/{entry}/cmdline").read_text().replace("\0", " "):
                found.append(int(entry))
        except OSError:
            continue
    return found


def ranks_of(run_dir: Path) -> list[int]:
    return [pid for pid in processes_of(run_dir) if "llmft.train" in Path(f"/proc/{pid}/cmdline").read_text()
            and "torch.distributed.run" not in Path(f"/proc/{pid}/cmdline").read_text()]


# A run whose final export is slow and signalled (test code only): SIGUSR2 after the first tensor, 0.3 s a tensor;
# the SLURM requeue it asks for is recorded, and "SLURM" ends the job 1 s later while the export stalls.
SLOW_EXPORT = """
import os, signal, sys, threading, time
from pathlib import Path
from llmft.training import loop
from llmft.training.strategies.single import SingleStrategy

run_dir, requeued = sys.argv[1], Path(sys.argv[2])
real_export = SingleStrategy.export_tensors

def slow_export(self):
    for index, item in enumerate(real_export(self)):
        if index == 1:
            os.kill(os.getpid(), signal.SIGUSR2)
        time.sleep(0 if index == 0 else 60 if requeued.exists() else 0.3)
        yield item

def requeue(max_requeues, topology):
    requeued.write_text("scontrol requeue")
    threading.Timer(1.0, lambda: os.kill(os.getpid(), signal.SIGKILL)).start()
    return True

SingleStrategy.export_tensors = slow_export
loop.requeue_slurm_job = requeue
loop.EXPORT_GRACE_S = 0.5
sys.exit(loop.main([run_dir]))
"""


@pytest.mark.slow
def test_signals_during_loading_and_export_stop_cleanly_and_resume_ends_like_an_uninterrupted_run(tmp_path,
                                                                                                  monkeypatch,
                                                                                                  capsys):
    """Four runs at once, one process each. `whole`, in this process: a SIGUSR2 during its final export (sent by the
    export itself after its first tensor) lets the export finish, the run completes: the uninterrupted reference.
    `usr2`: SIGUSR2 once its ranks started (the data and the model load next). `term`: SIGTERM a second after the
    launcher started (composing, or importing torch). `export`: a slow final export, signalled, asks for the SLURM
    requeue after the grace and is ended by "SLURM". The stopped runs resume (`resume=`, or in this process) and end
    with the reference's adapter, bit for bit, and its losses in summary.json."""
    from llmft.rundir import lock as run_lock
    from llmft.training import loop
    from llmft.training.strategies.single import SingleStrategy

    export_run = rundir.create(compose([*RUN, f"run_dir={tmp_path / 'export'}"]))
    run_lock.release(export_run)  # its own process trains it
    requeued = tmp_path / "requeued"
    export = subprocess.Popen([sys.executable, "-c", SLOW_EXPORT, str(export_run), str(requeued)], cwd=REPO,
                              env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
    usr2 = launch(tmp_path / "usr2")
    term = launch(tmp_path / "term")
    time.sleep(1.0)
    term.send_signal(signal.SIGTERM)
    for line in usr2.stdout:  # the ranks have started: the data and the model load next
        if line.startswith("llmft: model="):
            usr2.send_signal(signal.SIGUSR2)
            break

    for name, process, signal_name in (("usr2", usr2, "SIGUSR2"), ("term", term, "SIGTERM")):
        out, err = process.communicate(timeout=300)
        assert process.returncode == 3, err[-3000:]
        lines = llmft_lines(err)
        assert len(lines) == 1 and f"stopped by {signal_name} while " in lines[0] and \
            f"before training: nothing new to save; continue with: python -m llmft.launch " \
            f"resume={tmp_path / name}" in lines[0], err[-3000:]
        stopped = summary(tmp_path / name)
        assert (stopped["status"], stopped["signal"], stopped["step"]) == ("interrupted", signal_name, 0), stopped
        assert not list((tmp_path / name).glob("checkpoints/step_*"))
    assert summary(tmp_path / "usr2")["phase"] in ("reading the data", "loading the model")
    resumed = subprocess.Popen([sys.executable, "-m", "llmft.launch", f"resume={tmp_path / 'usr2'}"], cwd=REPO,
                               env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)

    whole = rundir.create(compose([*RUN, f"run_dir={tmp_path / 'whole'}"]))
    real_export = SingleStrategy.export_tensors

    def signalled_export(self):
        for index, item in enumerate(real_export(self)):
            if index == 1:
                os.kill(os.getpid(), signal.SIGUSR2)
            yield item

    monkeypatch.setattr(SingleStrategy, "export_tensors", signalled_export)
    assert loop.main([str(whole)]) == 0
    assert summary(whole)["status"] == "completed"
    assert "llmft: SIGUSR2 came during the final export, which finished in" in capsys.readouterr().out
    monkeypatch.undo()

    out, err = export.communicate(timeout=300)
    assert export.returncode == -signal.SIGKILL and requeued.exists(), err[-3000:]
    lines = [line for line in out.splitlines() if line.startswith("llmft: SIGUSR2")]
    assert len(lines) == 1 and "came while writing the final model after step 6" in lines[0] and \
        "the SLURM job is requeued" in lines[0], out[-3000:]
    stopped = summary(export_run)
    assert (stopped["status"], stopped["signal"], stopped["phase"], stopped["step"]) == \
        ("requeued", "SIGUSR2", "writing the final model", 6)
    assert not (export_run / "final").exists() and (export_run / "checkpoints/step_6/manifest.json").exists()
    assert loop.main([str(export_run)]) == 0  # its next attempt: nothing left to train, it writes final/

    out, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err[-3000:]
    for run_dir in (tmp_path / "usr2", export_run):
        completed = summary(run_dir)
        assert completed["status"] == "completed" and completed["steps"] == 6
        for key in ("first_loss", "final_loss", "final_val_loss"):  # the export's run: the losses it had logged
            assert completed[key] == summary(whole)[key], (run_dir, key)
        assert_same_adapter(whole, run_dir)


@pytest.mark.slow
def test_the_launcher_passes_usr2_to_starting_ranks_and_its_death_leaves_none_alive(tmp_path):
    """torchrun's ranks: a USR2 sent to the launcher as they start reaches them (torchrun ignores it); then three
    SIGKILLs of the launcher's process group at random moments of the ranks' start-up, none of them survives."""
    run_dir = tmp_path / "usr2"
    launcher = launch(run_dir, "parallelism=ddp", "launch.nproc=2")
    deadline = time.time() + 120
    while len(ranks_of(run_dir)) < 2 and time.time() < deadline:
        time.sleep(0.05)
    launcher.send_signal(signal.SIGUSR2)
    out, err = launcher.communicate(timeout=300)
    assert launcher.returncode == 3, err[-3000:]
    lines = llmft_lines(err)
    assert len(lines) == 1 and "stopped by SIGUSR2 while " in lines[0] and "before training" in lines[0], err[-3000:]
    assert (summary(run_dir)["status"], summary(run_dir)["signal"]) == ("interrupted", "SIGUSR2")
    assert not processes_of(run_dir)

    rng = random.Random(27)
    for trial in range(3):
        run_dir = tmp_path / f"killed{trial}"
        launcher = launch(run_dir, "parallelism=ddp", "launch.nproc=2")
        while not ranks_of(run_dir) and launcher.poll() is None:
            time.sleep(0.01)
        time.sleep(rng.uniform(0, 2.5))  # the ranks' interpreter, torch's import, the process group, the data
        os.killpg(launcher.pid, signal.SIGKILL)
        launcher.communicate(timeout=30)
        deadline = time.time() + 15
        while processes_of(run_dir) and time.time() < deadline:
            time.sleep(0.1)
        survivors = processes_of(run_dir)
        for pid in survivors:  # (not to leave them to the next tests)
            os.kill(pid, signal.SIGKILL)
        assert not survivors, f"trial {trial}: ranks alive 15 s after their launcher's death"
