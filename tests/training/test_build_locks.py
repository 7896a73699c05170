"""A DeepSpeed op's build lock left by a killed rank does not hang every later job.

torch builds DeepSpeed's JIT ops (the CPU's shm_comm here, fused optimizers on a GPU) under
`<extensions folder>/<op>/lock` and waits forever in its FileBaton while that file exists. These tests lay out the
folders as torch does (`py311_cpu/<op>/` under the cache, or `<op>/` under $TORCH_EXTENSIONS_DIR) with the files a
build writes, and check what the DeepSpeed strategy does with a lock whose build died and one whose build is alive.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
from torch.utils.file_baton import FileBaton

from llmft.config.compose import compose
from llmft.training.strategies import deepspeed as ds_strategy
from llmft.training.topology import Topology


def build_folder(root: Path, op: str, age_s: float, locked: bool = True) -> Path:
    """An op's build folder as torch leaves it mid-build: build.ninja, objects, the lock; every file `age_s` old."""
    folder = root / op
    folder.mkdir(parents=True)
    for name in ["build.ninja", ".ninja_log", "shm.o"] + (["lock"] if locked else []):
        (folder / name).write_bytes(b"x" * 64)
    written = time.time() - age_s
    for path in [*folder.iterdir(), folder]:
        os.utime(path, (written, written))
    return folder


def test_a_lock_whose_build_died_is_removed_and_torch_can_take_the_baton_again(tmp_path):
    dead = build_folder(tmp_path / "py311_cpu", "deepspeed_shm_comm", age_s=3600)
    assert not FileBaton(str(dead / "lock")).try_acquire()  # what torch would do: wait on it forever
    lines = ds_strategy.remove_dead_build_locks(tmp_path)
    assert not (dead / "lock").exists()
    assert lines == [f"llmft: removed {dead / 'lock'}, a build lock left by a process killed while it built "
                     f"DeepSpeed's op deepspeed_shm_comm (nothing written there for 60 min): torch would wait on it "
                     f"forever; the op is built again"]
    baton = FileBaton(str(dead / "lock"))
    assert baton.try_acquire()
    baton.release()
    assert sorted(p.name for p in dead.iterdir()) == [".ninja_log", "build.ninja", "shm.o"]  # the objects stay


def test_a_live_build_keeps_its_lock_and_the_rank_says_it_waits(tmp_path):
    live = build_folder(tmp_path, "fused_adam", age_s=3600)  # $TORCH_EXTENSIONS_DIR's layout: <op>/ directly
    (live / "fused_adam.o").write_bytes(b"o")  # the build is writing its objects now
    lines = ds_strategy.remove_dead_build_locks(tmp_path)
    assert (live / "lock").exists()
    assert len(lines) == 1 and lines[0].startswith(f"llmft: DeepSpeed's op fused_adam is being built by another "
                                                   f"process (lock {live / 'lock'}, last write ")
    assert lines[0].endswith("s ago): this rank waits for it")
    # just under the limit it is alive, just over it is dead
    limit = ds_strategy.DEAD_BUILD_LOCK_S
    assert ds_strategy.remove_dead_build_locks(tmp_path, now=time.time() + limit - 30)[0].endswith("waits for it")
    assert "removed" in ds_strategy.remove_dead_build_locks(tmp_path, now=time.time() + limit + 30)[0]
    assert not (live / "lock").exists()


def test_built_ops_without_a_lock_and_a_missing_folder_say_nothing(tmp_path):
    build_folder(tmp_path / "py311_cpu", "deepspeed_shm_comm", age_s=3600, locked=False)
    assert ds_strategy.remove_dead_build_locks(tmp_path) == []
    assert ds_strategy.remove_dead_build_locks(tmp_path / "absent") == []


def test_the_extensions_folder_is_torchs(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "ext"))
    assert ds_strategy.extensions_folder() == tmp_path / "ext"
    monkeypatch.delenv("TORCH_EXTENSIONS_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    assert ds_strategy.extensions_folder() == tmp_path / "cache" / "torch_extensions"


@pytest.mark.parametrize("strategy", ["zero2", "zero3"])
def test_the_deepspeed_strategy_clears_a_dead_lock_before_it_loads_an_op(monkeypatch, tmp_path, capsys, strategy):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    dead = build_folder(tmp_path, "deepspeed_shm_comm", age_s=7200)
    cfg = compose([f"parallelism={strategy}"])
    ds_strategy.DeepSpeedStrategy(cfg, Topology.from_env(), None)
    assert not (dead / "lock").exists()
    assert f"llmft: removed {dead / 'lock'}, a build lock left by a process killed" in capsys.readouterr().err
