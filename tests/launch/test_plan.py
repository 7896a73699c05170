"""`python -m llmft.plan`: resources and the sbatch script for a cluster profile; wrong requests refused."""

from __future__ import annotations

import pytest

from llmft.config.compose import compose
from llmft.launch import slurm
from llmft.errors import ConfigError
from support.runs import run_llmft

JEAN_ZAY = ["+cluster=jeanzay", "cluster.account=abc"]


def test_plan_for_two_jean_zay_a100_nodes():
    result = run_llmft("plan", "+cluster=jeanzay", "cluster.gpu=a100", "cluster.account=abc", "cluster.nodes=2",
                       "model=llama7b", "parallelism=zero3")
    assert result.returncode == 0, result.stderr
    script = result.stdout
    for line in ["#SBATCH --account=abc@a100", "#SBATCH --constraint=a100", "#SBATCH --ntasks-per-node=8",
                 "#SBATCH --gres=gpu:8", "#SBATCH --cpus-per-task=8", "#SBATCH --hint=nomultithread",
                 "#SBATCH --nodes=2", "#SBATCH --partition=gpu_p5", "#SBATCH --signal=USR2@120",
                 "#SBATCH --qos=qos_gpu_a100-dev", "module load arch/a100", 'export HF_HUB_OFFLINE="1"']:
        assert line in script, line
    assert "16 ranks" in script
    assert "warning: model.path" in result.stderr  # not on this machine: plan warns, launch refuses


@pytest.mark.parametrize("time,qos", [("01:59:00", "qos_gpu_h100-dev"), ("19:00:00", "qos_gpu_h100-t3"),
                                      ("99:00:00", "qos_gpu_h100-t4")])
def test_qos_follows_the_time(time, qos):
    resources = slurm.resolve(compose(JEAN_ZAY + ["cluster.gpu=h100", f"cluster.time={time}"]))
    assert resources.qos == qos and resources.gpus_per_node == 4 and resources.cpus_per_task == 24
    assert resources.account == "abc@h100"


@pytest.mark.parametrize("overrides,message", [
    (["cluster.gpus_per_node=16"], "exceeds the 8 GPUs of a jeanzay a100 node: use cluster.nodes=2"),
    (["cluster.time=30:00:00"], "exceeds the longest QoS of jeanzay a100 nodes (qos_gpu_a100-t3, 20:00:00)"),
    (["cluster.time=1h"], "is not a duration HH:MM:SS"),
    (["cluster.gpu=b200"], "cluster.gpu=b200 is not one of a100, h100, v100"),
    (["cluster.nodes=2", "parallelism=single"], "need a distributed strategy"),
    (["cluster.gpus_per_node=0"], "must be >= 1"),
])
def test_wrong_requests_are_refused_with_one_sentence(overrides, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        slurm.resolve(compose(JEAN_ZAY + overrides))


def test_missing_account_is_refused_by_plan_and_launch(tmp_path):
    for module in ("plan", "launch"):
        result = run_llmft(module, "+cluster=jeanzay", f"run_dir={tmp_path / module}")
        assert result.returncode == 2
        assert result.stderr.strip().splitlines() == [
            "llmft: cluster.account is not set: jeanzay charges every job to a project; add "
            "cluster.account=<project> (llmft submits as <project>@a100)."]
        assert not (tmp_path / module).exists()


def test_launch_refuses_a_missing_model_before_submitting(tmp_path):
    result = run_llmft("launch", *JEAN_ZAY, "model=llama7b", "model.path=/nowhere/llama", f"run_dir={tmp_path}/r")
    assert result.returncode == 2 and "model.path=/nowhere/llama is not a local Hugging Face model" in result.stderr
    assert not (tmp_path / "r").exists()


def test_parallelism_auto_picks_the_strategy_for_the_ranks():
    assert slurm.resolve(cfg := compose(JEAN_ZAY)).world_size == 8 and cfg.parallelism.strategy.value == "ddp"
    slurm.resolve(cfg := compose(JEAN_ZAY + ["peft=full"]))
    assert cfg.parallelism.strategy.value == "fsdp"
    slurm.resolve(cfg := compose(JEAN_ZAY + ["cluster.gpus_per_node=1"]))
    assert cfg.parallelism.strategy.value == "single"


def test_launch_with_cluster_composes_as_written():
    cfg = compose(["+cluster=jeanzay", "model=llama7b"])
    assert cfg.cluster.name == "jeanzay" and cfg.model.name == "llama7b"
    assert compose([]).cluster is None


def test_plan_says_whether_it_fits_and_what_to_change():
    fits = run_llmft("plan", *JEAN_ZAY, "cluster.gpu=h100", "model=mistral_7b", "train.max_steps=2000")
    assert fits.returncode == 0, fits.stderr
    assert "verdict     fits in 80 GB" in fits.stdout and "GPU-hours" in fits.stdout
    too_big = run_llmft("plan", *JEAN_ZAY, "model=llama3_8b", "peft=full", "parallelism=ddp",
                        "train.activation_checkpointing=false", "train.micro_batch_size=4")
    assert "does NOT fit" in too_big.stdout
    assert "parallelism=fsdp" in too_big.stdout and "train.activation_checkpointing=true" in too_big.stdout


def test_plan_imports_no_torch():
    import subprocess
    import sys

    code = ("import sys; sys.argv = ['plan', '+cluster=jeanzay', 'cluster.account=abc', 'model=llama7b']\n"
            "import llmft.plan\nllmft.plan.main()\n"
            "heavy = [m for m in ('torch', 'transformers', 'deepspeed', 'peft') if m in sys.modules]\n"
            "assert not heavy, heavy\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr


def test_plan_costs_epochs_from_a_prepared_dataset(tmp_path):
    import json

    (tmp_path / "report.json").write_text(json.dumps({"tokens": {"train": 50_000_000, "validation": 1}}))
    result = run_llmft("plan", *JEAN_ZAY, "model=mistral_7b", "train.epochs=2", f"data.prepared={tmp_path}")
    assert "for 2 epoch(s) of 50,000,000 tokens" in result.stdout, result.stdout
    no_count = run_llmft("plan", *JEAN_ZAY, "model=mistral_7b")
    assert "set train.max_steps, or data.prepared=DIR" in no_count.stdout


def test_plan_knows_hsdp_and_advises_it_for_full_fine_tuning_on_several_nodes():
    two_nodes = [*JEAN_ZAY, "cluster.gpu=a100", "model=llama3_8b", "peft=full", "cluster.nodes=2"]
    fsdp = run_llmft("plan", *two_nodes)
    assert fsdp.returncode == 0, fsdp.stderr
    assert "parallelism=fsdp" in fsdp.stdout and "advice      parallelism=hsdp" in fsdp.stdout
    hsdp = run_llmft("plan", *two_nodes, "parallelism=hsdp")
    one_node = run_llmft("plan", *JEAN_ZAY, "cluster.gpu=a100", "model=llama3_8b", "peft=full", "parallelism=fsdp")
    memory = [line for line in hsdp.stdout.splitlines() if line.startswith("memory/GPU")]
    # hsdp on 2 nodes x 8 shards its states over one node's 8 GPUs: fsdp's memory on one node
    assert memory == [line for line in one_node.stdout.splitlines() if line.startswith("memory/GPU")]
    assert "advice      parallelism=hsdp" not in hsdp.stdout
    bad = run_llmft("plan", *two_nodes, "parallelism=hsdp", "parallelism.shard_size=3")
    assert bad.returncode == 2 and "parallelism.shard_size=3 must divide the 16 ranks" in bad.stderr


def test_plan_prints_the_sbatch_script_without_slurm(tmp_path):
    env = {"PATH": str(tmp_path)}  # nothing on PATH, no srun nor sbatch: a laptop
    result = run_llmft("plan", "+cluster=jeanzay", "cluster.account=abc", "model=llama3_8b", env=env)
    assert result.returncode == 0, result.stderr
    assert "#SBATCH --account=abc@a100" in result.stdout and "--kill-on-bad-exit=1" in result.stdout
    # srun passes the task's cores itself: from Slurm 22.05 it no longer inherits --cpus-per-task
    cpus = next(line for line in result.stdout.splitlines() if line.startswith("#SBATCH --cpus-per-task="))
    srun = next(line for line in result.stdout.splitlines() if line.startswith("srun "))
    assert f"--cpus-per-task={cpus.split('=')[1]}" in srun.split(), srun


def test_the_sbatch_templates_pass_the_cores_to_srun_and_take_a_free_port():
    from support.runs import REPO

    for template in sorted((REPO / "slurm").glob("*.sbatch")):
        text = template.read_text()
        srun = [line for line in text.splitlines() if line.startswith("srun ")]
        assert srun and all('--cpus-per-task="$SLURM_CPUS_PER_TASK"' in line for line in srun), template
        port = next(line for line in text.splitlines() if line.startswith("export MASTER_PORT="))
        assert "SLURM_JOB_ID" not in port and "s.bind((\"\", 0))" in port, (template, port)
