"""Checkpoints are complete or ignored."""

from __future__ import annotations

import json

from llmft.rundir import checkpoints as checkpoint


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
