"""2 ranks over gloo: DDP, FSDP2, ZeRO-2 and ZeRO-3 train the tiny model to the same loss curve, really shard,
export a complete adapter, and FSDP2 checkpoints resume on another world size."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from llmft.config.compose import compose
from llmft.rundir import create as rundir
from llmft.training.loop import train
from support.runs import read_metrics
from support.torchrun import COMMON, STRATEGIES, train_ranks, train_ranks_batch

pytestmark = pytest.mark.slow

def losses(run_dir: Path) -> list[float]:
    return [r["loss"] for r in read_metrics(run_dir) if "loss" in r]


# model.path under FSDP2 (built on meta, each rank reads its rows) and ZeRO-3 (deepspeed.zero.Init), against DDP's
# whole from_pretrained: the "from_disk_*" runs, on the single-process run's base model
FROM_DISK = ["model=llama3_2_1b", "model.dtype=float32", "model.max_seq_len=256", "train=debug", "train.max_steps=3",
             "train.save_every=0", "train.eval_every=3"]
FULL_FSDP = ["parallelism=fsdp", "peft=full", "train.max_steps=3", "train.eval_every=3", "train.save_every=0"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Every 2-rank run of this module, in one torchrun (one start-up instead of nine); the DeepSpeed runs after
    torch's own, so that no FSDP2 or DDP run follows a DeepSpeed one in the same process."""
    root = tmp_path_factory.mktemp("dist")
    # the same global batch (8 sequences a step) in one process, as the reference; its base_model is the model on
    # disk of the from_disk runs
    cfg = compose(COMMON + ["train.micro_batch_size=8", f"run_dir={root / 'single'}"])
    train(cfg, rundir.create(cfg))
    from_disk = [*FROM_DISK, f"model.path={root / 'single' / 'base_model'}"]
    batch = {root / s: [f"parallelism={s}"] for s in ("ddp", "fsdp")}
    batch[root / "from_disk_ddp"] = ["parallelism=ddp", *from_disk]
    batch[root / "from_disk_fsdp"] = ["parallelism=fsdp", *from_disk]
    batch[root / "full"] = FULL_FSDP
    batch.update({root / s: [f"parallelism={s}"] for s in ("zero2", "zero3", "zero3_offload")})
    batch[root / "from_disk_zero3"] = ["parallelism=zero3", *from_disk]  # COMMON: every parameter partitioned
    results = {path.name: result for path, result in train_ranks_batch(2, batch, timeout=1200).items()}
    return root, results


def test_all_strategies_give_the_single_process_loss_curve(runs):
    root, _ = runs
    reference = losses(root / "single")
    assert len(reference) == 8 and reference[-1] < reference[0]
    for strategy in STRATEGIES:
        assert losses(root / strategy) == pytest.approx(reference, abs=1e-4), strategy


def test_sharding_really_happened(runs):
    _, results = runs
    fsdp = results["fsdp"]
    assert fsdp["kinds"]["num_dtensor"] == fsdp["kinds"]["num_params"] > 0
    for strategy in ("zero3", "zero3_offload"):
        kinds = results[strategy]["kinds"]
        assert kinds["num_zero3_partitioned"] == kinds["num_params"] > 0, strategy
    for strategy in ("fsdp", "zero3", "zero3_offload"):
        sharding = results[strategy]["summary"]["sharding_rank0"]
        assert sharding["local_numel"] <= 0.55 * sharding["global_numel"], (strategy, sharding)
    for strategy in ("ddp", "zero2"):
        sharding = results[strategy]["summary"]["sharding_rank0"]
        assert sharding["local_numel"] == sharding["global_numel"]


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_exported_adapter_reloads_with_stock_peft_and_gives_the_trained_logits(runs, strategy):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    root, results = runs
    from support.torchrun_harness import PROBE_IDS

    base = AutoModelForCausalLM.from_pretrained(root / strategy / "base_model")
    reloaded = PeftModel.from_pretrained(base, root / strategy / "final").eval()
    with torch.no_grad():
        logits = reloaded(input_ids=torch.tensor(PROBE_IDS)).logits
    torch.testing.assert_close(logits, results[strategy]["logits"], rtol=0, atol=1e-5)


def test_fsdp_checkpoint_saved_on_2_ranks_resumes_on_1(runs, tmp_path):
    root, _ = runs
    source = root / "fsdp"
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copytree(source / "checkpoints" / "step_4", resumed / "checkpoints" / "step_4")
    shutil.copytree(source / "base_model", resumed / "base_model")
    # the same 8 samples a step: 1 rank x 4 sequences x 2 accumulation steps instead of 2 ranks x 4
    result = train_ranks(resumed, 1, ["parallelism=fsdp", "train.grad_accum_steps=2"])
    assert result["summary"]["steps"] == 8
    assert losses(resumed) == pytest.approx(losses(source)[4:], abs=1e-4)


def test_loading_from_disk_sharded_matches_ddp_loading_whole_model(runs):
    """model.path under FSDP2 (built on meta, each rank reads its rows) and ZeRO-3 (deepspeed.zero.Init): the same
    losses as DDP's whole from_pretrained."""
    root, results = runs
    ddp, fsdp = results["from_disk_ddp"], results["from_disk_fsdp"]
    assert fsdp["kinds"]["num_dtensor"] == fsdp["kinds"]["num_params"]
    assert losses(root / "from_disk_fsdp") == pytest.approx(losses(root / "from_disk_ddp"), abs=1e-4)
    torch.testing.assert_close(fsdp["logits"], ddp["logits"], rtol=0, atol=1e-4)
    # ZeRO-3 loads the same folder under deepspeed.zero.Init: partitioned as it loads, same losses
    zero3 = results["from_disk_zero3"]
    assert zero3["kinds"]["num_zero3_partitioned"] == zero3["kinds"]["num_params"]
    assert zero3["summary"]["num_parameters"] == ddp["summary"]["num_parameters"]
    assert losses(root / "from_disk_zero3") == pytest.approx(losses(root / "from_disk_ddp"), abs=1e-4)


def test_full_fine_tuning_under_fsdp_exports_the_whole_model(runs):
    from transformers import AutoModelForCausalLM

    from support.torchrun_harness import PROBE_IDS

    root, results = runs
    result = results["full"]
    assert result["kinds"]["num_dtensor"] == result["kinds"]["num_params"]
    assert result["summary"]["num_trainable_parameters"] == result["summary"]["num_parameters"]
    reloaded = AutoModelForCausalLM.from_pretrained(root / "full" / "final").eval()
    with torch.no_grad():
        logits = reloaded(input_ids=torch.tensor(PROBE_IDS)).logits
    torch.testing.assert_close(logits, result["logits"], rtol=0, atol=1e-5)
    base = AutoModelForCausalLM.from_pretrained(root / "full" / "base_model").eval()
    with torch.no_grad():
        assert (base(input_ids=torch.tensor(PROBE_IDS)).logits - logits).abs().max() > 1e-3  # it did train
