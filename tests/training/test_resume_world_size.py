"""Resume on another number of ranks: a run stopped by a signal on 2 ranks continues on 1 (and one stopped on 1
continues on 2) and ends with the uninterrupted run's adapter; the global batch is kept by adjusting
train.grad_accum_steps, said and recorded; what cannot be kept, or read, is refused in one sentence."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import yaml
from safetensors.torch import load_file

from llmft.config.compose import compose
from llmft.errors import UserError
from llmft.rundir import create as rundir
from llmft.training.loop import train
from support.runs import REPO, read_metrics, run_llmft

# fp32 on CPU, no dropout (its masks follow each rank's RNG), every ZeRO-3 parameter really partitioned; a checkpoint
# only where the signal stops the run.
SMALL = ["peft.dropout=0", "train.max_steps=10", "train.log_every=1", "train.eval_every=100", "train.save_every=0",
         "train.micro_batch_size=4", "parallelism.zero3_param_persistence_threshold=0",
         "parallelism.zero3_model_persistence_threshold=0"]
# 8 samples per optimizer step either way: 2 ranks x 4 x 1, or 1 rank x 4 x 2
ON_2 = ["launch.nproc=2", "train.grad_accum_steps=1"]
ON_1 = ["launch.nproc=1", "train.grad_accum_steps=2"]


def start_launch(run_dir: Path, overrides: list[str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "llmft.launch", *SMALL, *overrides, f"run_dir={run_dir}"],
                            cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def training_processes(launcher: subprocess.Popen) -> list[psutil.Process]:
    """torchrun's workers (one per rank) under the launcher."""
    children = psutil.Process(launcher.pid).children(recursive=True)
    return [p for p in children if "llmft.train" in " ".join(p.cmdline())
            and "torch.distributed.run" not in " ".join(p.cmdline())]


def adapter(run_dir: Path) -> dict:
    return load_file(run_dir / "final" / "adapter_model.safetensors")


def stop_by_signal(*runs: tuple[Path, subprocess.Popen]) -> list[int]:
    """SIGUSR2 to one rank of each run as soon as it has logged step 3 (all watched at once: a run must not finish
    while another is awaited); every rank checkpoints the step they agree on and stops. The steps they stopped at."""
    waiting = list(runs)
    deadline = time.time() + 300
    while waiting and time.time() < deadline:
        for run_dir, process in list(waiting):
            assert process.poll() is None, process.communicate()
            if (run_dir / "metrics.jsonl").exists() and any(r.get("step", 0) >= 3 for r in read_metrics(run_dir)):
                training_processes(process)[-1].send_signal(signal.SIGUSR2)
                waiting.remove((run_dir, process))
        time.sleep(0.05)
    assert not waiting, f"{waiting} never reached step 3"
    steps = []
    for run_dir, process in runs:
        out, err = process.communicate(timeout=300)
        assert process.returncode == 3, out[-2000:] + err[-4000:]
        summary = json.loads((run_dir / "summary.json").read_text())
        assert summary["status"] == "interrupted" and 3 <= summary["step"] < 10, summary
        steps.append(summary["step"])
    return steps


def start_resume(run_dir: Path, *overrides: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "llmft.launch", f"resume={run_dir}", *overrides], cwd=REPO,
                            env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def resumed_output(process: subprocess.Popen) -> str:
    """The output of a resume started by start_resume, which must succeed."""
    out, err = process.communicate(timeout=400)
    assert process.returncode == 0, out[-3000:] + err[-5000:]
    return out + err



def saved_config(run_dir: Path) -> dict:
    return yaml.safe_load((run_dir / "config.yaml").read_text())


def max_abs_difference(expected: dict, got: dict) -> float:
    assert expected.keys() == got.keys() and expected
    return max(float((expected[name] - got[name]).abs().max()) for name in expected)


class Uninterrupted:
    """An uninterrupted launch started in the background, waited for when its run directory is asked."""

    def __init__(self, run_dir: Path, overrides: list[str]):
        self.run_dir, self.process, self.err = run_dir, start_launch(run_dir, overrides), None

    def finished(self) -> Path:
        if self.err is None:
            _, self.err = self.process.communicate(timeout=300)
        assert self.process.returncode == 0, self.err[-4000:]
        return self.run_dir

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.communicate()


@pytest.fixture(scope="module")
def lora_reference(tmp_path_factory):
    """The uninterrupted LoRA run of SMALL, 8 samples a step, in one process (the cheapest run; the strategies agree
    within 1e-6): the reference of the ZeRO-3 and ZeRO-2 LoRA resumes, started at the first test that needs it."""
    run = Uninterrupted(tmp_path_factory.mktemp("reference") / "whole", ["parallelism=single", *ON_1])
    yield run
    run.stop()


@pytest.mark.slow
def test_zero3_stopped_on_2_ranks_resumes_on_1_and_stopped_on_1_resumes_on_2_with_the_uninterrupted_adapter(
        tmp_path, lora_reference):
    cut_2 = start_launch(tmp_path / "cut_2", ["parallelism=zero3", *ON_2])
    cut_1 = start_launch(tmp_path / "cut_1", ["parallelism=zero3", *ON_1])
    step_2, _ = stop_by_signal((tmp_path / "cut_2", cut_2), (tmp_path / "cut_1", cut_1))

    # both resumes at once (they overlap with the end of the uninterrupted run)
    on_1, on_2 = start_resume(tmp_path / "cut_2", "launch.nproc=1"), start_resume(tmp_path / "cut_1", "launch.nproc=2")
    output = resumed_output(on_1)
    assert (f"resume: step_{step_2} was saved by 2 rank(s) (zero3); this run has 1 (launch.nproc=1, zero3), "
            f"train.grad_accum_steps 1 -> 2: the global batch stays 8 samples per optimizer step") in output
    assert "converting it to DeepSpeed's universal checkpoint" in output
    assert f"(step {step_2}, saved with world size 2, now 1)" in output
    assert saved_config(tmp_path / "cut_2")["train"]["grad_accum_steps"] == 2
    assert (tmp_path / f"cut_2/checkpoints/step_{step_2}/universal/zero").is_dir()
    assert not list((tmp_path / f"cut_2/checkpoints/step_{step_2}").glob(".tmp-*"))
    resumes = json.loads((tmp_path / "cut_2/provenance.json").read_text())["resumes"]
    assert resumes[-1]["from_step"] == step_2
    assert resumes[-1]["changed"] == {"launch.nproc": [2, 1], "train.grad_accum_steps": [1, 2],
                                      "world_size": [2, 1], "strategy": ["zero3", "zero3"]}

    output = resumed_output(on_2)
    assert "train.grad_accum_steps 2 -> 1: the global batch stays 8 samples per optimizer step" in output
    assert saved_config(tmp_path / "cut_1")["train"]["grad_accum_steps"] == 1

    expected = adapter(lora_reference.finished())
    for name in ("cut_2", "cut_1"):
        difference = max_abs_difference(expected, adapter(tmp_path / name))
        print(f"zero3 {name}: max abs difference {difference:.2e}")
        assert difference <= 1e-4, name


# The uninterrupted reference of each case. LoRA: lora_reference, one process (the cheapest run; strategies agree
# within 1e-6). Full fine-tuning: the 2 ranks the checkpoint was written on, because 1 and 2 ranks alone already end
# 4e-3 apart on the embeddings (Adam turns the rounding differences of near-zero gradients into lr-sized steps), where
# the 2 -> 1 resume ends 2e-5 from the 2-rank run. full_logits: the chunked loss head fails under ZeRO-3 full fine-tuning.
CASES = {"zero2": (["parallelism=zero2"], None),  # lora_reference
         "zero3-full": (["parallelism=zero3", "peft=full", "train.loss_head=full_logits"],
                        ["parallelism=zero3", "peft=full", "train.loss_head=full_logits", *ON_2])}


def weights(run_dir: Path) -> dict:
    """The trained tensors of final/: the adapter, or every shard of a fully fine-tuned model."""
    tensors = {}
    for path in sorted((run_dir / "final").glob("*.safetensors")):
        tensors.update(load_file(path))
    return tensors


@pytest.mark.slow  # fsdp: DCP reshards (test_distributed); 2.3e-6 here, 75 s more
def test_stopped_on_2_ranks_resumes_on_1_with_the_uninterrupted_weights(tmp_path, lora_reference):
    """Every case of CASES at once (each alone leaves a core idle while it resumes on 1 rank), each in its folder."""
    wholes, cuts = {}, {}
    for case, (overrides, reference) in CASES.items():
        (tmp_path / case).mkdir()
        # the same 8 samples a step
        wholes[case] = lora_reference if reference is None else Uninterrupted(tmp_path / case / "whole", reference)
        cuts[case] = start_launch(tmp_path / case / "cut", [*overrides, *ON_2])
    steps = dict(zip(CASES, stop_by_signal(*((tmp_path / case / "cut", cuts[case]) for case in CASES))))
    resumes = {case: start_resume(tmp_path / case / "cut", "launch.nproc=1") for case in CASES}
    for case, (overrides, _) in CASES.items():
        output = resumed_output(resumes[case])
        strategy = overrides[0].split("=")[1]
        assert f"saved by 2 rank(s) ({strategy}); this run has 1" in output and "grad_accum_steps 1 -> 2" in output
        assert f"(step {steps[case]}, saved with world size 2, now 1)" in output
        difference = max_abs_difference(weights(wholes[case].finished()), weights(tmp_path / case / "cut"))
        print(f"{case} 2 -> 1: max abs difference {difference:.2e}")
        assert difference <= 1e-4, case


def prepared(run_dir: Path, *overrides: str) -> Path:
    """A run directory and its config, nothing trained (what an sbatch template's launch.prepare_only writes)."""
    result = run_llmft("launch", *overrides, "train.micro_batch_size=4", "train.grad_accum_steps=1",
                       "launch.prepare_only=true", f"run_dir={run_dir}")
    assert result.returncode == 0, result.stderr[-3000:]
    return run_dir


def fake_checkpoint(run_dir: Path, strategy: str, world_size: int) -> None:
    """A complete checkpoint as far as the launcher can tell (the launcher reads manifests, never tensors)."""
    folder = run_dir / "checkpoints/step_2"
    folder.mkdir(parents=True)
    (folder / "manifest.json").write_text(json.dumps({"step": 2, "world_size": world_size, "strategy": strategy,
                                                      "files": {}}))


def refused(run_dir: Path, *overrides: str) -> str:
    result = run_llmft("launch", f"resume={run_dir}", *overrides, "launch.prepare_only=true")
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1, result.stderr[-3000:]
    return result.stderr


def test_resume_refuses_a_number_of_ranks_that_cannot_keep_the_global_batch(tmp_path):
    run_dir = prepared(tmp_path / "run", "parallelism=zero3", "launch.nproc=2")
    error = refused(run_dir, "launch.nproc=3")
    assert ("keeps the run's global batch of 8 samples per optimizer step, which 3 ranks (launch.nproc=3) of "
            "train.micro_batch_size=4 cannot take: use launch.nproc=1 or 2 (train.grad_accum_steps then follows).") in error
    error = refused(run_dir, "launch.nproc=4", "train.micro_batch_size=3")
    assert "cannot take: use train.micro_batch_size=1 or 2 on these ranks (" in error
    error = refused(run_dir, "launch.nproc=1", "train.grad_accum_steps=1")
    assert "train.grad_accum_steps=1 would change the run's global batch of 8" in error and "it is 2" in error
    assert saved_config(run_dir)["launch"]["nproc"] == 2  # nothing was written
    # the way out the message names: another micro-batch size (4 ranks x 2 samples x 1 = 8)
    ok = run_llmft("launch", f"resume={run_dir}", "launch.nproc=4", "train.micro_batch_size=2",
                   "launch.prepare_only=true")
    assert ok.returncode == 0, ok.stderr[-3000:]
    assert "this run has 4 (launch.nproc=4, zero3), train.micro_batch_size 4 -> 2: the global batch stays 8" in ok.stdout
    assert saved_config(run_dir)["train"]["grad_accum_steps"] == 1


def test_resume_refuses_a_strategy_that_cannot_read_the_checkpoint(tmp_path):
    run_dir = prepared(tmp_path / "zero3", "parallelism=zero3", "launch.nproc=2")
    fake_checkpoint(run_dir, "zero3", 2)
    error = refused(run_dir, "parallelism=ddp")
    assert "step_2 was written by parallelism=zero3, which parallelism=ddp cannot read: add parallelism=zero3" in error
    # parallelism=auto with full fine-tuning: fsdp on 2 ranks, single on 1, whose checkpoints differ
    run_dir = prepared(tmp_path / "full", "peft=full", "launch.nproc=2")
    fake_checkpoint(run_dir, "fsdp", 2)
    error = refused(run_dir, "launch.nproc=1")
    assert "which parallelism=single (parallelism=auto on 1 rank) cannot read: add parallelism=fsdp" in error
    ok = run_llmft("launch", f"resume={run_dir}", "launch.nproc=1", "parallelism=fsdp", "launch.prepare_only=true")
    assert ok.returncode == 0, ok.stderr[-3000:]
    # LoRA with parallelism=auto: ddp on 2 ranks, single on 1, the same checkpoint files
    run_dir = prepared(tmp_path / "lora", "launch.nproc=2")
    fake_checkpoint(run_dir, "ddp", 2)
    ok = run_llmft("launch", f"resume={run_dir}", "launch.nproc=1", "launch.prepare_only=true")
    assert ok.returncode == 0, ok.stderr[-3000:]
    assert "this run has 1 (launch.nproc=1, single), train.grad_accum_steps 1 -> 2" in ok.stdout


def test_resume_on_a_cluster_with_other_nodes_keeps_the_global_batch(tmp_path):
    run_dir = prepared(tmp_path / "run", "+cluster=localslurm", "cluster.nodes=2", "cluster.gpus_per_node=2",
                       "parallelism=zero3")
    fake_checkpoint(run_dir, "zero3", 4)
    result = run_llmft("launch", f"resume={run_dir}", "cluster.nodes=1", "launch.prepare_only=true")
    assert result.returncode == 0, result.stderr[-3000:]
    assert ("this run has 2 (cluster.nodes=1 x cluster.gpus_per_node=2, zero3), train.grad_accum_steps 1 -> 2: the "
            "global batch stays 16 samples per optimizer step") in result.stdout
    assert saved_config(run_dir)["train"]["grad_accum_steps"] == 2
    assert json.loads((run_dir / "provenance.json").read_text())["resumes"][-1]["changed"]["world_size"] == [4, 2]
    error = refused(run_dir, "cluster.nodes=3")
    assert "6 ranks (cluster.nodes=3 x cluster.gpus_per_node=2)" in error


def test_the_ranks_refuse_a_checkpoint_of_another_global_batch(tmp_path):
    """A run resumed without the launcher (an sbatch template's srun of llmft.train on other nodes) cannot adjust
    train.grad_accum_steps: the ranks refuse, naming the command that does, before loading anything."""
    cfg = compose(["train.max_steps=2", "train.save_every=1", "train.log_every=1", "train.eval_every=100",
                   "train.micro_batch_size=4", f"run_dir={tmp_path / 'run'}"])
    run_dir = rundir.create(cfg)
    train(cfg, run_dir)  # checkpoints at step 1 and at the last, 2, 4 samples a step
    cfg.train.grad_accum_steps = 2  # 8 samples a step, as 2 ranks of this config would take
    with pytest.raises(UserError, match=r"step_2 was trained with 4 samples per optimizer step and this job takes 8 "
                                        r"\(train.micro_batch_size=4 x 1 ranks x train.grad_accum_steps=2\): resume "
                                        r"it with python -m llmft.launch resume="):
        train(cfg, run_dir)
