"""Under every strategy on 2 ranks, the loss on supervised positions only (train.loss_head=chunked) gives the
full-logits path's loss and gradients (1e-5, fp32): LoRA on padded batches, and full fine-tuning of a model with tied
embeddings on packed rows (the head's weight is then the embedding's, sharded by FSDP2 and ZeRO-3)."""

from __future__ import annotations

import pytest
import torch

from llmft.config.compose import compose
from llmft.rundir import create as rundir
from support.early import EARLY, EarlyCommand
from support.torchrun import COMMON, harness_command

pytestmark = pytest.mark.slow

CASES = {
    "lora_padded": ["data.packing=false"],
    "full_packed_tied": ["peft=full", "data.packing=true", "model.tiny.tie_word_embeddings=true"],
    "full_padded_untied": ["peft=full", "data.packing=false"],
}


STRATEGIES = ["ddp", "fsdp", "zero2", "zero3"]


def every_run(tmp_path, strategies=STRATEGIES) -> list[str]:
    """The run directories of every strategy and case, created in tmp_path, and the argv of the one torchrun that
    runs them all (one start-up, each run set up in turn), which writes tmp_path / "loss.pt"."""
    run_dirs = []
    for strategy in strategies:
        for case, overrides in CASES.items():
            for head in ("full_logits", "chunked"):
                run_dir = tmp_path / f"{strategy}-{case}-{head}"
                cfg = compose(COMMON + overrides + [f"parallelism={strategy}", f"train.loss_head={head}",
                                                    f"run_dir={run_dir}", "launch.nproc=2"])
                rundir.create(cfg)
                run_dirs.append(run_dir)
    return harness_command(2, "loss_and_gradients", tmp_path / "loss.pt", run_dirs)


# started when the tests are collected (support/early.py): its ranks train on the cores earlier tests leave idle
EARLY["tests/training/test_loss_strategies.py::test_chunked_loss_equals_full_logits_under_every_strategy"] = \
    EarlyCommand(every_run, timeout=900)


def test_chunked_loss_equals_full_logits_under_every_strategy(early_command, strategies=STRATEGIES):
    tmp_path, result = early_command.folder, early_command.finished()
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    results = torch.load(tmp_path / "loss.pt", weights_only=False)
    for strategy in strategies:
        for case in CASES:
            full = results[str(tmp_path / f"{strategy}-{case}-full_logits")]
            chunked = results[str(tmp_path / f"{strategy}-{case}-chunked")]
            where = (strategy, case)
            assert (full["loss_head"], chunked["loss_head"]) == ("full_logits", "chunked")
            assert chunked["loss"] == pytest.approx(full["loss"], abs=1e-5), where
            assert full["grads"].keys() == chunked["grads"].keys() and full["grads"], where
            for name, grad in full["grads"].items():
                assert grad.abs().sum() > 0 or "lora_B" not in name, (where, name)
                assert (chunked["grads"][name] - grad).abs().max() <= 1e-5 * max(1.0, float(grad.abs().max())), \
                    (where, name)
