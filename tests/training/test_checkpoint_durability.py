"""Checkpoints that survive the cluster (issue 27): every file fsynced before the manifest and the rename, each rank
checksumming its share; a damaged newest checkpoint (truncated, torn, missing file) named in one sentence and skipped
for the previous one; room checked before writing and a disk that fills during a save, on a real small tmpfs; a
stalled save ended by the watchdog with one sentence."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import pytest

from llmft.rundir import checkpoints
from llmft.rundir.checkpoints import CheckpointError
from support.apt import apt_install
from support.runs import REPO

# Mounting a tmpfs needs root (the test machine and CI run as root); elsewhere these tests are skipped.
requires_root = pytest.mark.skipif(os.geteuid() != 0, reason="mounts a small tmpfs: needs root")


@contextmanager
def small_file_system(folder: Path, size: str, inodes: int | None = None):
    """A tmpfs of `size` (and `inodes`) mounted on `folder` for the block, unmounted after whatever happens."""
    folder.mkdir(parents=True, exist_ok=True)
    options = f"size={size}" + (f",nr_inodes={inodes}" if inodes else "")
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(folder)], capture_output=True,
                             text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=True)


def free_bytes(folder: Path) -> int:
    stats = os.statvfs(folder)
    return stats.f_bavail * stats.f_frsize


def writer(**files: int):
    """A write_files that writes each named file with that many random bytes."""
    def write_files(folder: Path) -> None:
        for name, size in files.items():
            (folder / name).parent.mkdir(parents=True, exist_ok=True)
            (folder / name).write_bytes(os.urandom(size))
    return write_files


def test_every_file_is_fsynced_before_the_manifest_and_the_rename_then_the_parent(tmp_path, monkeypatch):
    root, events = tmp_path / "checkpoints", []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(descriptor):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{descriptor}")))
        real_fsync(descriptor)

    def replace(source, target):
        events.append(("rename", str(source)))
        real_replace(source, target)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    final = checkpoints.save(root, 3, writer(**{"trainable.safetensors": 3000, "dcp/__0_0.distcp": 5000}),
                             {"world_size": 1}, keep_last=2)
    tmp = str(root / ".tmp-step_3")
    synced = [path for kind, path in events if kind == "fsync"]
    order = [path if kind == "fsync" else "RENAME" for kind, path in events]
    assert order[-2:] == ["RENAME", str(root)]  # the rename, then the folder that holds it
    before_manifest = synced[:synced.index(f"{tmp}/manifest.json")]
    assert {f"{tmp}/trainable.safetensors", f"{tmp}/dcp/__0_0.distcp", f"{tmp}/dcp"} <= set(before_manifest)
    assert order.index(tmp) < order.index("RENAME")  # the folder's entries (the manifest's too) before the rename
    manifest = checkpoints.read_manifest(final)
    assert manifest["files"] == {"dcp/__0_0.distcp": 5000, "trainable.safetensors": 3000}
    for name in manifest["files"]:
        assert checkpoints._read_and_hash(final / name, "xxh3_128", fsync=False) == \
            (manifest["files"][name], manifest["checksums"][name])
    assert manifest["save_s"] >= 0


def test_each_rank_fsyncs_and_checksums_its_share_of_the_files(tmp_path, monkeypatch):
    """Two ranks (threads, with a gather that meets like all_gather_object): each file read back once, by one rank,
    the bytes dealt out about evenly; rank 0 writes the manifest from both shares without reading a file again."""
    world_size, root = 2, tmp_path / "checkpoints"
    meeting, values, readers = threading.Barrier(world_size), [None] * world_size, {}
    real_read = checkpoints._read_and_hash

    def gather_of(rank):
        def gather(value):
            values[rank] = value
            meeting.wait()
            result = list(values)
            meeting.wait()
            return result
        return gather

    def read_and_hash(path, algorithm, fsync):
        readers.setdefault(path.name, []).append(threading.current_thread().name)
        return real_read(path, algorithm, fsync)

    monkeypatch.setattr(checkpoints, "_read_and_hash", read_and_hash)
    sizes = {0: {"model_states.pt": 4000, "optim_rank0.pt": 9000}, 1: {"optim_rank1.pt": 9000, "state_rank1.pt": 500}}

    def rank_main(rank):
        checkpoints.save(root, 5, writer(**sizes[rank]), {"world_size": 2}, keep_last=2, barrier=meeting.wait,
                         is_main=rank == 0, gather=gather_of(rank), rank=rank)

    ranks = [threading.Thread(target=rank_main, args=(rank,), name=f"rank{rank}") for rank in range(world_size)]
    for thread in ranks:
        thread.start()
    for thread in ranks:
        thread.join(timeout=60)
    manifest = checkpoints.read_manifest(root / "step_5")
    assert set(manifest["files"]) == set(readers) == {"model_states.pt", "optim_rank0.pt", "optim_rank1.pt",
                                                      "state_rank1.pt"}
    assert all(len(who) == 1 for who in readers.values()), readers  # each file read once
    by_rank = {f"rank{r}": sum(manifest["files"][n] for n, who in readers.items() if who == [f"rank{r}"])
               for r in range(world_size)}
    assert by_rank == {"rank0": 9500, "rank1": 13000} or by_rank == {"rank0": 13000, "rank1": 9500}, by_rank
    assert checkpoints.find_latest(root)[0] == root / "step_5"


def test_a_damaged_newest_checkpoint_is_named_in_one_sentence_and_the_previous_one_taken(tmp_path):
    root = tmp_path / "checkpoints"
    for step in (4, 8, 12):
        checkpoints.save(root, step, writer(**{"trainable.safetensors": 265_920, "state_rank0.pt": 1000}), {},
                         keep_last=5)
    newest = root / "step_12" / "trainable.safetensors"
    good = newest.read_bytes()

    def skipped_sentences():
        latest, skipped = checkpoints.find_latest(root)
        return latest.name, [str(entry) for entry in skipped]

    newest.write_bytes(good[:132_960])  # a node lost the second half
    assert skipped_sentences() == ("step_8", [f"{root}/step_12: trainable.safetensors is 132,960 bytes, the manifest "
                                              f"says 265,920: resuming from step_8"])
    newest.write_bytes(good[:1000] + bytes(1000) + good[2000:])  # the right size, 1000 bytes of zeros: a torn write
    assert skipped_sentences() == ("step_8", [f"{root}/step_12: trainable.safetensors's checksum differs from the "
                                              f"manifest's (a torn write?): resuming from step_8"])
    (root / "step_8" / "state_rank0.pt").unlink()
    (root / ".tmp-step_16").mkdir()  # a save killed mid-write
    assert skipped_sentences() == ("step_4", [
        f"{root}/.tmp-step_16: the temporary folder of a save that did not finish",
        f"{root}/step_12: trainable.safetensors's checksum differs from the manifest's (a torn write?): resuming "
        f"from step_4",
        f"{root}/step_8: state_rank0.pt is missing: resuming from step_4"])
    lines = checkpoints.describe(root)  # what `llmft runs show` lists
    assert lines[0].split() == ["step_12", "damaged:", "trainable.safetensors's", "checksum", "differs", "from", "the",
                                "manifest's", "(a", "torn", "write?)"]
    assert lines[1].startswith("step_8       damaged: state_rank0.pt is missing")
    assert lines[2].startswith("step_4       complete (verified, resume takes it), 266.9 KB")
    assert lines[3] == ".tmp-step_16 incomplete: the temporary folder of a save that did not finish"

    newest.write_bytes(good)  # repaired: the newest again, verified once, then by its stamp
    assert checkpoints.find_latest(root)[0].name == "step_12"
    assert (root / "step_12" / checkpoints.VERIFIED).is_file()
    time.sleep(0.01)
    newest.write_bytes(good[:1000] + bytes(1000) + good[2000:])  # changed after its verification: read again
    assert checkpoints.find_latest(root)[0].name == "step_4"


def test_a_manifest_from_before_the_checksums_is_checked_by_its_sizes(tmp_path):
    root = tmp_path / "checkpoints"
    checkpoints.save(root, 2, writer(**{"a.bin": 10, "b.bin": 20}), {"world_size": 1}, keep_last=2)
    manifest = checkpoints.read_manifest(root / "step_2")
    del manifest["checksums"], manifest["save_s"]  # as llmft wrote it before issue 27
    (root / "step_2" / "manifest.json").write_text(json.dumps(manifest))
    (root / "step_2" / "a.bin").write_bytes(b"z" * 10)
    assert checkpoints.find_latest(root) == (root / "step_2", [])
    assert checkpoints.describe(root) == ["step_2       complete (sizes checked (saved without checksums), resume "
                                          "takes it), 30 bytes"]
    (root / "step_2" / "b.bin").write_bytes(b"z" * 2)
    latest, skipped = checkpoints.find_latest(root)
    assert latest is None and [str(s) for s in skipped] == [
        f"{root}/step_2: b.bin is 2 bytes, the manifest says 20: no complete checkpoint is left: starting over from "
        f"step 0"]


def two_checkpoints_of_600_kb(disk: Path, keep_last: int):
    """disk/checkpoints with steps 1 and 2 saved, each one file of 600 KB; (that folder, the writer of such a file)."""
    root, files = disk / "checkpoints", writer(**{"optimizer.pt": 600_000})
    for step in (1, 2):
        checkpoints.save(root, step, files, {}, keep_last=keep_last)
    return root, files


@requires_root
def test_too_little_room_first_drops_what_keep_last_would_then_stops_before_writing(tmp_path):
    with small_file_system(tmp_path / "disk", "2m") as disk:
        root, files = two_checkpoints_of_600_kb(disk, keep_last=2)
        # 1.2 MB taken, 0.85 MB free: step 3 needs 630 KB: fits
        checkpoints.save(root, 3, files, {}, keep_last=2)
        assert sorted(p.name for p in root.iterdir()) == ["step_2", "step_3"]
        # 0.85 MB free, but keep_last=1 would drop step_2 after this save: dropped before it to make room, once needed
        (disk / "other-job").write_bytes(bytes(500_000))
        checkpoints.save(root, 4, files, {}, keep_last=1)
        assert sorted(p.name for p in root.iterdir()) == ["step_4"]
        # no room, and nothing keep_last allows to drop: stopped before writing anything, step_4 whole
        (disk / "other-job-2").write_bytes(bytes(free_bytes(disk) - 74 * 4096))  # 303.1 KB left
        with pytest.raises(CheckpointError) as stopped:
            checkpoints.save(root, 5, files, {}, keep_last=2)
        assert str(stopped.value) == (
            f"the checkpoint of step 5 failed: {root} has 303.1 KB free on its file system and the checkpoint needs "
            f"about 630.0 KB (the size of step_4 plus 5%); the previous checkpoint is kept (step_4) and training "
            f"stops: free space there, then resume.")
        assert sorted(p.name for p in root.iterdir()) == ["step_4"] and checkpoints.is_complete(root / "step_4", True)
    with small_file_system(tmp_path / "inodes", "2m", inodes=12) as disk:  # the same for inodes (files)
        root = disk / "checkpoints"
        checkpoints.save(root, 1, writer(**{f"part{i}.pt": 10 for i in range(6)}), {}, keep_last=2)
        with pytest.raises(CheckpointError, match=r"has 2 free inodes \(files\) on its file system and the checkpoint "
                                                  r"needs 8; the previous checkpoint is kept \(step_1\)"):
            checkpoints.save(root, 2, writer(**{"a": 1}), {}, keep_last=2)


@contextmanager
def quota_file_system(folder: Path, limit: str):
    """A 300 MB btrfs (a loop device) whose top volume has a quota (a qgroup limit) of `limit`: its free space, what
    statvfs reports, is far larger than the quota, as on a cluster's $WORK. btrfs-progs installed with apt-get when
    missing, as the local SLURM's packages are."""
    if shutil.which("mkfs.btrfs") is None:
        apt_install("btrfs-progs")
    folder.mkdir(parents=True)
    image = folder.with_suffix(".img")
    with open(image, "wb") as out:
        out.truncate(300 << 20)
    for command in (["mkfs.btrfs", "-q", str(image)], ["mount", "-o", "loop", str(image), str(folder)]):
        subprocess.run(command, check=True, capture_output=True)
    try:
        for command in (["btrfs", "quota", "enable", str(folder)], ["btrfs", "qgroup", "limit", limit, str(folder)]):
            subprocess.run(command, check=True, capture_output=True)
        os.sync()
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=True)
        image.unlink()


@requires_root
def test_a_quota_statvfs_cannot_see_stops_the_save_before_writing_and_one_hit_while_writing_is_named(tmp_path):
    with quota_file_system(tmp_path / "work", "2500K") as disk:
        root, files = two_checkpoints_of_600_kb(disk, keep_last=5)
        (disk / "other-files").write_bytes(os.urandom(900_000))  # what else the project keeps under its quota
        os.sync()
        assert free_bytes(disk) > 100_000_000  # statvfs sees the file system, not the quota
        with pytest.raises(CheckpointError) as stopped:
            checkpoints.save(root, 3, files, {}, keep_last=5)
        assert str(stopped.value).startswith(
            f"the checkpoint of step 3 failed: {root} has ") and (
            " free on its file system, but a quota refused to reserve the 630.0 KB the checkpoint needs (the size of "
            "step_2 plus 5%): EDQUOT (a quota: see it with idr_quota_user on Jean Zay, quota -s, or lfs quota -h -u "
            "$USER on Lustre); the previous checkpoint is kept (step_2) and training stops: free space there (or "
            "lower train.keep_last, now 5), then resume.") in str(stopped.value), str(stopped.value)
        assert sorted(p.name for p in root.iterdir()) == ["step_1", "step_2"]  # nothing of step 3 was written
        # room enough for one like the previous, not for this larger one: the write meets the quota
        (disk / "other-files").unlink()
        os.sync()
        with pytest.raises(CheckpointError, match=r"rank 0 could not write into .*\.tmp-step_3 \(EDQUOT.*the previous "
                                                  r"checkpoint is kept \(step_2\)"):
            checkpoints.save(root, 3, writer(**{"optimizer.pt": 3_000_000}), {}, keep_last=5)
        assert sorted(p.name for p in root.iterdir()) == ["step_1", "step_2"]
        assert all(checkpoints.is_complete(root / name, True) for name in ("step_1", "step_2"))
        checkpoints.save(root, 3, files, {}, keep_last=5)  # and a checkpoint that fits is made
        assert checkpoints.is_complete(root / "step_3", True)


@requires_root
def test_a_disk_that_fills_during_a_save_leaves_every_older_checkpoint_whole(tmp_path):
    """The real writers on a full tmpfs: Python's (OSError), safetensors' (SafetensorError) and torch.save's C++
    writer (a RuntimeError without errno: "unexpected pos 576 vs 534"), and a file system out of inodes."""
    import torch
    from safetensors.torch import save_file

    def fill_then(write):
        def write_files(folder):
            (folder.parent.parent / "filler").write_bytes(bytes(free_bytes(folder) - 20_000))
            write(folder)
        return write_files

    writers = {
        "python": lambda folder: (folder / "optimizer.pt").write_bytes(bytes(100_000)),
        "safetensors": lambda folder: save_file({"w": torch.zeros(25_000)}, folder / "trainable.safetensors"),
        "torch.save": lambda folder: torch.save({"w": torch.zeros(25_000)}, folder / "optimizer.pt"),
    }
    for name, write in writers.items():
        with small_file_system(tmp_path / name, "1m") as disk:
            root = disk / "checkpoints"
            checkpoints.save(root, 10, writer(**{"optimizer.pt": 100_000}), {}, keep_last=2)
            with pytest.raises(CheckpointError) as failed:
                checkpoints.save(root, 20, fill_then(write), {}, keep_last=2)
            sentence = str(failed.value)
            assert sentence.startswith(f"the checkpoint of step 20 failed: rank 0 could not write "), sentence
            assert "ENOSPC" in sentence and "free once the partial checkpoint is removed" in sentence, sentence
            assert "the previous checkpoint is kept (step_10)" in sentence, sentence
            assert sorted(p.name for p in root.iterdir()) == ["step_10"], name  # the partial folder removed
            assert checkpoints.is_complete(root / "step_10", verify=True)
    with small_file_system(tmp_path / "inodes", "1m", inodes=10) as disk:
        root = disk / "checkpoints"
        checkpoints.save(root, 10, writer(a=1), {}, keep_last=2)
        with pytest.raises(CheckpointError, match=r"rank 0 could not write .*\(ENOSPC: No space left on device\)"):
            checkpoints.save(root, 20, writer(**{f"shard{i}": 1 for i in range(20)}), {}, keep_last=2)
        assert sorted(p.name for p in root.iterdir()) == ["step_10"]


# A save that stalls, in a process of its own: in write_files (the folder is all that is known), or in the read-back
# of one file (named).
STALLED_SAVE = """
import sys, time
from pathlib import Path
from llmft.rundir import checkpoints

def write_files(folder):
    (folder / "optimizer.pt").write_bytes(b"x" * 1000)
    if sys.argv[2] == "write":
        time.sleep(120)

if sys.argv[2] == "read-back":
    checkpoints._read_and_hash = lambda path, algorithm, fsync: time.sleep(120)
checkpoints.save(Path(sys.argv[1]), 7, write_files, {}, keep_last=2, timeout_min=0.02)
"""


@pytest.mark.slow
def test_a_stalled_save_ends_the_process_with_one_sentence_naming_the_rank_the_file_and_the_wait(tmp_path):
    started = time.time()
    stalled = {where: subprocess.Popen([sys.executable, "-c", STALLED_SAVE, str(tmp_path / where), where], cwd=REPO,
                                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
               for where in ("write", "read-back")}
    outcome = {where: process.communicate(timeout=60) for where, process in stalled.items()}
    assert time.time() - started < 20  # 1.2 s of save_timeout_min, not the 120 s of the stall
    doing = {"write": f"writing its files into {tmp_path / 'write'}/.tmp-step_7",
             "read-back": f"fsyncing and reading back {tmp_path / 'read-back'}/.tmp-step_7/optimizer.pt"}
    for where, (out, err) in outcome.items():
        assert stalled[where].returncode == 2, err
        assert err.startswith(f"llmft: rank 0 has waited 1 s on the checkpoint of step 7, {doing[where]}, longer than "
                              f"train.save_timeout_min=0.02: its file system seems stalled"), err
        assert len(err.strip().splitlines()) == 1, err
        assert not (tmp_path / where / "step_7").exists()


@requires_root
@pytest.mark.slow
def test_a_run_whose_disk_fills_mid_save_stops_then_resumes_past_a_torn_checkpoint_like_an_uninterrupted_run(
        tmp_path, monkeypatch, capsys):
    """The tiny model, its run directory on a 12 MB tmpfs: the save of step 3 hits ENOSPC (another job filled the disk
    after the room was checked) and the run stops with one sentence, steps 1 and 2 intact; `runs show` lists them;
    with space freed and step_2 torn (same size, other bytes), the resume names step_2 and why, takes step_1, and
    ends with bitwise the adapter of an uninterrupted run."""
    import torch
    from safetensors.torch import load_file

    from llmft.config.compose import compose
    from llmft.launch import runs
    from llmft.rundir import create as rundir
    from llmft.training.loop import train
    from llmft.training.strategies.single import SingleStrategy
    from support.runs import read_metrics

    run = ["train.max_steps=4", "train.save_every=1", "train.keep_last=2", "train.eval_every=100", "train.log_every=1",
           "train.micro_batch_size=1", "peft.dropout=0"]
    whole = compose(run + [f"run_dir={tmp_path / 'whole'}"])
    train(whole, rundir.create(whole))
    with small_file_system(tmp_path / "disk", "12m") as disk:
        cfg = compose(run + [f"run_dir={disk / 'run'}"])
        run_dir = rundir.create(cfg)
        real_save = SingleStrategy.save

        def save_as_the_disk_fills(self, folder):
            if folder.name == ".tmp-step_3":
                (disk / "other-job").write_bytes(bytes(free_bytes(disk) - 100_000))
            real_save(self, folder)

        monkeypatch.setattr(SingleStrategy, "save", save_as_the_disk_fills)
        with pytest.raises(CheckpointError) as stopped:
            train(cfg, run_dir)
        assert str(stopped.value).startswith(f"the checkpoint of step 3 failed: rank 0 could not write into "
                                             f"{run_dir}/checkpoints/.tmp-step_3 (ENOSPC"), stopped.value
        assert str(stopped.value).endswith(f"the previous checkpoint is kept (step_2) and training stops: free space "
                                           f"there (or lower train.keep_last, now 2), then python -m llmft.launch "
                                           f"resume={run_dir}.")
        assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step_1", "step_2"]
        assert max(r["step"] for r in read_metrics(run_dir) if "loss" in r) == 3

        monkeypatch.setattr(SingleStrategy, "save", real_save)
        (disk / "other-job").unlink()
        torn = run_dir / "checkpoints" / "step_2" / "trainable.safetensors"
        data = bytearray(torn.read_bytes())
        data[-1000:] = bytes(1000)
        torn.write_bytes(bytes(data))
        capsys.readouterr()
        assert runs.main(["show", str(run_dir)]) == 0
        shown = capsys.readouterr().out
        assert (f"checkpoints ({run_dir}/checkpoints):\n"
                f"  step_2       damaged: trainable.safetensors's checksum differs from the manifest's "
                f"(a torn write?)\n"
                f"  step_1       complete (verified, resume takes it), ") in shown, shown
        train(cfg, run_dir)  # the run directory's own process resumes: as llmft.train RUN_DIR does
        out = capsys.readouterr().out
        assert (f"checkpoint: skipping {run_dir}/checkpoints/step_2: trainable.safetensors's checksum "
                f"differs from the manifest's (a torn write?): resuming from step_1\n") in out, out
        assert f"resume: from {run_dir}/checkpoints/step_1 (step 1" in out
        expected = load_file(tmp_path / "whole" / "final" / "adapter_model.safetensors")
        got = load_file(run_dir / "final" / "adapter_model.safetensors")
        assert expected.keys() == got.keys() and all(torch.equal(expected[k], got[k]) for k in expected)
        assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step_3", "step_4"]
