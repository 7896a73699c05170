"""Checkpoints are complete or ignored, and each is ranked by its own step's validation loss."""

from __future__ import annotations

import json

from llmft.config.compose import compose
from llmft.rundir import checkpoints as checkpoint
from llmft.rundir import create as rundir
from llmft.training.loop import train

QUICK = ["train.log_every=1", "train.eval_every=100", "train.micro_batch_size=4"]


def write_two_files(folder):
    (folder / "a.bin").write_bytes(b"x" * 10)
    (folder / "b.bin").write_bytes(b"y" * 20)


def test_latest_complete_checkpoint_wins_and_incomplete_ones_are_reported(tmp_path):
    root = tmp_path / "checkpoints"
    checkpoint.save(root, 10, write_two_files, {"world_size": 1}, keep_last=5)
    checkpoint.save(root, 20, write_two_files, {"world_size": 1}, keep_last=5)
    # a crash mid-write: a temporary folder, and a step folder whose file is truncated
    (root / ".tmp-step_30").mkdir()
    (root / "step_20" / "b.bin").write_bytes(b"y")
    latest, incomplete = checkpoint.find_latest(root)
    assert latest == root / "step_10"
    assert {p.name for p in incomplete} == {".tmp-step_30", "step_20"}
    manifest = json.loads((latest / "manifest.json").read_text())
    assert manifest["step"] == 10 and manifest["files"] == {"a.bin": 10, "b.bin": 20}


def test_only_the_last_k_are_kept(tmp_path):
    root = tmp_path / "checkpoints"
    for step in (1, 2, 3, 4):
        checkpoint.save(root, step, write_two_files, {}, keep_last=2)
    assert sorted(p.name for p in root.iterdir()) == ["step_3", "step_4"]


def test_a_checkpoint_is_ranked_by_its_own_steps_validation_loss(tmp_path):
    cfg = compose(["train.max_steps=6", "train.save_every=2", "train.eval_every=3", "train.keep_last=5", *QUICK[:1],
                   f"run_dir={tmp_path}"])
    train(cfg, rundir.create(cfg))
    manifests = {int(p.name.split("_")[1]): json.loads((p / "manifest.json").read_text())
                 for p in (tmp_path / "checkpoints").glob("step_*")}
    assert manifests[2]["val_loss"] is None and manifests[4]["val_loss"] is None  # evaluated at 3 and 6 only
