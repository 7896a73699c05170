"""The requeue of a SLURM job from inside it (llmft/training/signals.py): counted as requeued even when SLURM's SIGTERM
for the accepted requeue ends `scontrol requeue` first; any other failure raises."""

from __future__ import annotations

import os
import subprocess

import pytest


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
