"""The universal-checkpoint conversion of a ZeRO checkpoint resumed on another number of ranks
(llmft/training/strategies/deepspeed.py): killed mid-way, it continues where it stopped at the next attempt, without
redoing what it finished, and the training then ends bitwise like a resume whose conversion ran in one go; a stop
signal on a waiting rank leaves it off cleanly; the waiting ranks outlive the collective timeout while it runs."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
from safetensors.torch import load_file

from support.runs import REPO, run_llmft
from support.torchrun import torchrun_command

# fp32 on CPU, no dropout, every ZeRO-3 parameter partitioned; the run ends at step 3 with its one checkpoint, which
# the resumes (train.max_steps=5) convert. 8 samples per optimizer step on 2 ranks x 4 or on 1 rank x 4 x 2.
RUN = ["peft.dropout=0", "train.max_steps=3", "train.log_every=1", "train.eval_every=100", "train.save_every=0",
       "train.micro_batch_size=4", "parallelism.zero3_param_persistence_threshold=0",
       "parallelism.zero3_model_persistence_threshold=0"]
PARAMETERS = 28  # the tiny model's LoRA tensors: one work item each in the conversion's merge phase

# A rank of torchrun training a run directory, each work item of the conversion
# followed by argv[2] seconds of sleep: a conversion slow enough to be killed or signalled mid-way, or to outlast
# the collective timeout.
PACED_CONVERSION = """
import sys, time
from llmft.rundir.lifetime import end_rank
from llmft.training import loop
from llmft.training.strategies import deepspeed

run_item = deepspeed._ResumableConversion._run_item

def paced(self, *args):
    entry = run_item(self, *args)
    time.sleep(float(sys.argv[2]))
    return entry

deepspeed._ResumableConversion._run_item = paced
end_rank(loop.main([sys.argv[1]]))  # as python -m llmft.train ends: no teardown
"""


def launch(run_dir: Path, *overrides: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "llmft.launch", *RUN, *overrides, f"run_dir={run_dir}"], cwd=REPO,
                            env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


@pytest.fixture(scope="module")
def checkpoints_to_convert(tmp_path_factory) -> dict[str, Path]:
    """Two finished runs, each with its checkpoint of step 3: ZeRO-3 on 2 ranks, ZeRO-2 on 1 (both at once)."""
    root = tmp_path_factory.mktemp("saved")
    runs = {"zero3_on_2": ["parallelism=zero3", "launch.nproc=2", "train.grad_accum_steps=1"],
            "zero2_on_1": ["parallelism=zero2", "launch.nproc=1", "train.grad_accum_steps=2"]}
    processes = {name: launch(root / name, *overrides) for name, overrides in runs.items()}
    for name, process in processes.items():
        out, err = process.communicate(timeout=600)
        assert process.returncode == 0, out[-2000:] + err[-4000:]
        assert (root / name / "checkpoints/step_3/deepspeed").is_dir()
    return {name: root / name for name in runs}


def resumable_copy(saved: Path, run_dir: Path, *overrides: str) -> Path:
    """A copy of the run `saved`, prepared by the launcher to resume with `overrides` (trained by PACED_CONVERSION)."""
    shutil.copytree(saved, run_dir)
    result = run_llmft("launch", f"resume={run_dir}", "train.max_steps=5", *overrides, "launch.prepare_only=true")
    assert result.returncode == 0, result.stderr[-3000:]
    return run_dir


def start_paced(torchrun: list[str], run_dir: Path, seconds_per_item: float) -> tuple[subprocess.Popen, Path]:
    """PACED_CONVERSION on `run_dir` under `torchrun`, in a session of its own, its output appended to a file."""
    script = run_dir.parent / f"paced_{run_dir.name}.py"
    script.write_text(PACED_CONVERSION)
    log = run_dir.parent / f"{run_dir.name}.log"
    with open(log, "a") as out:
        process = subprocess.Popen([*torchrun, str(script), str(run_dir), str(seconds_per_item)], cwd=REPO,
                                   env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=out, stderr=subprocess.STDOUT,
                                   start_new_session=True)
    return process, log


def journal(run_dir: Path) -> list[dict]:
    """The conversion's finished work items, as its journal lists them (the line a write is cut in, left out)."""
    path = run_dir / "checkpoints/step_3/.tmp-universal/.progress.jsonl"
    entries = []
    for line in path.read_text().splitlines()[1:] if path.exists() else []:
        try:
            entries.append(json.loads(line))
        except ValueError:
            break
    return [entry for entry in entries if "item" in entry]


def wait_for_merged(run_dir: Path, count: int, process: subprocess.Popen, log: Path) -> None:
    deadline = time.time() + 300
    while sum(entry["phase"] == "merge" for entry in journal(run_dir)) < count:
        assert process.poll() is None and time.time() < deadline, log.read_text()[-5000:]
        time.sleep(0.05)


def finished(process: subprocess.Popen, log: Path, returncode: int = 0) -> str:
    process.wait(timeout=600)
    output = log.read_text()
    assert process.returncode == returncode, output[-6000:]
    return output


def adapter(run_dir: Path) -> dict:
    return load_file(run_dir / "final" / "adapter_model.safetensors")


def summary(run_dir: Path) -> dict:
    return json.loads((run_dir / "summary.json").read_text())


@pytest.mark.slow
def test_a_conversion_killed_mid_way_continues_where_it_stopped_and_ends_bitwise_like_one_in_one_go(
        tmp_path, checkpoints_to_convert):
    """ZeRO-3 saved on 2 ranks, resumed on 1: the conversion SIGKILLed after some parameters were merged; the next
    attempt takes over the split shards and those parameters (their files untouched), merges the rest, and the run
    ends with bitwise the adapter of a copy whose conversion ran uninterrupted (both at once, one core each)."""
    saved = checkpoints_to_convert["zero3_on_2"]
    killed = resumable_copy(saved, tmp_path / "killed", "launch.nproc=1")
    whole = resumable_copy(saved, tmp_path / "whole", "launch.nproc=1")
    one_rank = torchrun_command(1, [])  # as the launcher runs ZeRO on one rank
    in_one_go, in_one_go_log = start_paced(one_rank, whole, 0)
    process, log = start_paced(one_rank, killed, 0.3)
    wait_for_merged(killed, 5, process, log)
    os.killpg(process.pid, signal.SIGKILL)  # torchrun and its rank, as a node dies: in a sleep or inside an item
    process.wait()
    before = journal(killed)
    merged_before = [entry for entry in before if entry["phase"] == "merge"]
    assert len([entry for entry in before if entry["phase"] == "extract"]) == 2 and len(merged_before) >= 5
    assert not (killed / "checkpoints/step_3/universal").exists()
    tmp = killed / "checkpoints/step_3/.tmp-universal"
    mtimes = {name: (tmp / name).stat().st_mtime_ns for entry in merged_before for name in entry["files"]}

    process, log = start_paced(one_rank, killed, 0)
    output = finished(process, log)
    assert "1/3 splitting the optimizer shards of 2 rank(s) into per-parameter files (2 done before)" in output
    assert f"2/3 merging {PARAMETERS} parameters ({len(merged_before)} done before)" in output
    assert f"2/3 merged {PARAMETERS} of {PARAMETERS} parameters ({len(merged_before)} done before)" in output
    universal = killed / "checkpoints/step_3/universal"
    assert {name: (universal / name).stat().st_mtime_ns for name in mtimes} == mtimes  # not written again
    assert not tmp.exists() and not (universal / ".progress.jsonl").exists()

    whole_output = finished(in_one_go, in_one_go_log)
    assert f"2/3 merging {PARAMETERS} parameters (0 done before)" in whole_output
    assert summary(killed)["steps"] == summary(whole)["steps"] == 5
    expected, got = adapter(whole), adapter(killed)
    assert expected.keys() == got.keys() and all(torch.equal(expected[name], got[name]) for name in expected)


def rank_process(torchrun: subprocess.Popen, rank: int) -> psutil.Process:
    deadline = time.time() + 60
    while time.time() < deadline:
        for child in psutil.Process(torchrun.pid).children(recursive=True):
            try:
                if child.environ().get("RANK") == str(rank) and "paced_" in " ".join(child.cmdline()):
                    return child
            except psutil.Error:
                continue
        time.sleep(0.1)
    raise TimeoutError(f"no rank {rank} under torchrun {torchrun.pid}")


@pytest.mark.slow
def test_a_signalled_conversion_stops_cleanly_and_the_waiting_ranks_outlive_the_collective_timeout(
        tmp_path, checkpoints_to_convert):
    """ZeRO-2 saved on 1 rank, resumed on 2 with a collective timeout of 12 s and a conversion of about a second a
    parameter. SIGUSR2 to the waiting rank 1 mid-way: rank 0 leaves the conversion off after the parameter under way,
    every rank stops with summary.json `interrupted` in that phase. The next attempt continues it (rank 1 waiting
    longer than the collective timeout, in no collective) and the run completes."""
    run_dir = resumable_copy(checkpoints_to_convert["zero2_on_1"], tmp_path / "run", "launch.nproc=2",
                             "train.collective_timeout_min=0.2")
    torchrun = torchrun_command(2, [])
    process, log = start_paced(torchrun, run_dir, 1.0)
    wait_for_merged(run_dir, 3, process, log)
    rank_process(process, 1).send_signal(signal.SIGUSR2)
    output = finished(process, log, returncode=1)  # torchrun's code for ranks that failed (here: 3, stopped)
    assert "resume: converting step_3: left off at a stop signal, after" in output
    stopped = summary(run_dir)
    assert (stopped["status"], stopped["signal"], stopped["step"]) == ("interrupted", "SIGUSR2", 3), stopped
    assert stopped["phase"] == ("converting step_3 to DeepSpeed's universal checkpoint (what it finished is kept for "
                                "the next attempt)")
    merged_before = sum(entry["phase"] == "merge" for entry in journal(run_dir))
    assert merged_before >= 3

    started = time.time()
    process, log = start_paced(torchrun, run_dir, 1.0)
    output = finished(process, log)[len(output):]
    assert f"2/3 merging {PARAMETERS} parameters ({merged_before} done before)" in output
    took = float(re.search(r"resume: converting step_3: done in (\d+) s", output).group(1))
    assert took > 12 + 5, output  # the collective timeout, and then some
    assert "resume: from" in output and "saved with world size 1, now 2" in output
    assert summary(run_dir)["status"] == "completed" and summary(run_dir)["steps"] == 5
    print(f"conversion {took:.0f} s with a collective timeout of 12 s; the resume {time.time() - started:.0f} s")


# A conversion on one rank whose file system stalls after its first work item, with a limit of 3 s (DeepSpeed is
# imported before, which takes longer than that on a loaded machine).
STALLED_CONVERSION = """
import sys, time
from pathlib import Path
import deepspeed.checkpoint.ds_to_universal
from llmft.training.strategies import deepspeed
from llmft.training.topology import Topology

run_item = deepspeed._ResumableConversion._run_item

def stalled(self, *args):
    entry = run_item(self, *args)
    time.sleep(120)
    return entry

deepspeed._ResumableConversion._run_item = stalled
deepspeed.universal_checkpoint(Path(sys.argv[1]), 2, Topology(1, 0, 0, 1, "cpu"), timeout_min=0.05)
"""


@pytest.mark.slow
def test_a_stalled_conversion_ends_at_its_limit_with_one_sentence_and_keeps_what_it_finished(
        tmp_path, checkpoints_to_convert):
    run_dir = tmp_path / "run"
    shutil.copytree(checkpoints_to_convert["zero3_on_2"], run_dir)
    started = time.time()
    result = subprocess.run([sys.executable, "-c", STALLED_CONVERSION, str(run_dir / "checkpoints/step_3")], cwd=REPO,
                            capture_output=True, text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert time.time() - started < 60  # the limit and the imports, not the 120 s stall
    assert result.returncode == 2, result.stderr[-3000:]
    sentence = result.stderr.strip().splitlines()[-1]
    assert sentence == ("llmft: rank 0 has converted step_3 to DeepSpeed's universal checkpoint for 3 s, its limit "
                        "(train.save_timeout_min, or longer for a large checkpoint), and is splitting the optimizer "
                        "shard of rank 0: its file system seems stalled, so this rank ends now instead of hanging; "
                        "resume to continue the conversion where it stopped, with a larger train.save_timeout_min if "
                        "it is this slow."), result.stderr[-3000:]
    assert [entry["item"] for entry in journal(run_dir)] == ["0-0"]  # the shard it split, for the next attempt
