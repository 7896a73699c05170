"""Checkpoints that are complete, durable and verified, or absent: written under a temporary name, renamed when whole.

Layout: `checkpoints/step_<N>/` holding the strategy's files and `manifest.json`, written last (step, world size,
strategy, every file with its size and checksum, how long the save took). The order makes it durable: every file is
fsynced, then the manifest, then the folder is renamed (atomic on POSIX file systems, Lustre and GPFS included) and
its parent fsynced, so a node that crashes at any moment leaves either a whole checkpoint or a temporary folder.

A folder without a manifest, or whose files do not match it (missing, another size, another checksum), is skipped by
resume, which names it and why in one sentence (`Skipped`) and takes the previous complete one. The checkpoint resumed
from is verified byte for byte once (`VERIFIED` records it); older ones, pruning and listings check sizes.
Manifests from before the checksums (`files` alone) are checked by size.

Before writing, the file system must have room for a checkpoint the size of the previous one (bytes and inodes,
then the quota: `_quota_refuses`):
else old checkpoints that `keep_last` would drop anyway go first, and if that is not enough the save stops the run
with one sentence (`CheckpointError`) before writing anything. A save that fails on any rank (full disk, quota,
permissions) removes its temporary folder and stops every rank with the same sentence; nothing older is touched.
A save that takes longer than `train.save_timeout_min` on a rank (a stalled file system) ends that rank's process with
one sentence naming the rank, the file and the seconds waited (`_Watchdog`).

A ZeRO checkpoint resumed on another number of ranks also gets `step_<N>/universal/`, DeepSpeed's universal form of
its files, made once by rank 0 the same way (under `.tmp-universal`, renamed when whole) and never listed in the
manifest: the checkpoint's own files are untouched and it stays complete and loadable on its own world size.
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from llmft.errors import USER_ERROR_EXIT_CODE, UserError

MANIFEST = "manifest.json"
TMP_PREFIX = ".tmp-"
# Written into a checkpoint once its bytes were checked against the manifest: the size and modification time of each
# file then, so that the next resume of an unchanged checkpoint (every rank, the launcher) does not read it again.
VERIFIED = ".verified.json"
DEFAULT_SAVE_TIMEOUT_MIN = 30.0
# Room asked for before a save: the previous checkpoint's size plus this share (its files barely change in size).
SPACE_MARGIN = 0.05
_CHUNK = 8 << 20


class CheckpointError(UserError):
    """A checkpoint could not be written (disk full, quota, permissions): the run stops, the previous one stays."""


# ------------------------------------------------------------------------------------------------------ checksums

def _xxh3_128():
    import xxhash  # installed with `datasets` (a dependency of llmft)

    return xxhash.xxh3_128()


def _blake2b():
    import hashlib

    return hashlib.blake2b(digest_size=16)


# Measured on the 2-core test machine, a 64 MiB file read back from the page cache right after writing, 8 MiB reads:
# reading alone 2,800-3,500 MB/s, reading + xxh3_128 2,650-3,100 MB/s, reading + blake2b 400-560 MB/s (in memory:
# xxh3_128 13,500 MB/s, blake2b 620 MB/s). xxh3 finds a torn or lost write as surely (it is not meant against
# tampering) and costs little more than the read: a 96 GB full fine-tuning state dealt out over 8 ranks is ~4 s of
# read-back each, ~25 s with blake2b. blake2b where xxhash is missing (it comes with `datasets`).
HASHES = {"xxh3_128": _xxh3_128, "blake2b": _blake2b}


def _hash_name() -> str:
    try:
        import xxhash  # noqa: F401

        return "xxh3_128"
    except ImportError:  # pragma: no cover: xxhash comes with datasets
        return "blake2b"


def _read_and_hash(path: Path, algorithm: str, fsync: bool) -> tuple[int, str]:
    """(size, "<algorithm>:<hex digest>") of a file, read back in large chunks; fsynced first when `fsync`."""
    hasher, size = HASHES[algorithm](), 0
    with open(path, "rb", buffering=0) as handle:
        if fsync:
            os.fsync(handle.fileno())
        while chunk := handle.read(_CHUNK):
            hasher.update(chunk)
            size += len(chunk)
    return size, f"{algorithm}:{hasher.hexdigest()}"


# ------------------------------------------------------------------------------------------------------ reading

def _step_of(path: Path) -> int:
    return int(path.name.removeprefix("step_"))


def read_manifest(path: Path) -> dict:
    return json.loads((path / MANIFEST).read_text())


def checkpoint_size(manifest: dict) -> int:
    """The bytes of a checkpoint's files, from its manifest."""
    return sum(manifest["files"].values())


def problem_of(path: Path, verify: bool = False) -> str | None:
    """Why the checkpoint folder `path` cannot be resumed from, in words (None: it can): no manifest, a file missing
    or of another size than the manifest says; with `verify`, also a file whose checksum differs (each file read
    once; a checkpoint verified before and unchanged since is not read again)."""
    manifest_path = path / MANIFEST
    if not manifest_path.is_file():
        return "it has no manifest.json (a save that did not finish)"
    try:
        manifest = json.loads(manifest_path.read_text())
        files, checksums = manifest["files"], manifest.get("checksums", {})
        stats = {}
        for name, size in files.items():
            if not (path / name).is_file():
                return f"{name} is missing"
            stats[name] = (path / name).stat()
            if stats[name].st_size != size:
                return f"{name} is {stats[name].st_size:,} bytes, the manifest says {size:,}"
    except (ValueError, KeyError, TypeError, AttributeError, OSError) as error:
        return f"its manifest.json cannot be read ({error})"
    if not verify or not checksums:  # (a manifest from before the checksums: its sizes are all it says)
        return None
    stamp = {name: [stats[name].st_size, stats[name].st_mtime_ns] for name in files}
    try:
        if json.loads((path / VERIFIED).read_text()) == stamp:
            return None
    except (OSError, ValueError):
        pass
    for name in files:
        expected = checksums.get(name, "")
        algorithm = expected.partition(":")[0]
        if algorithm not in HASHES:
            continue  # (not written by this llmft: only its size is checked)
        try:
            _, got = _read_and_hash(path / name, algorithm, fsync=False)
        except OSError as error:
            return f"{name} cannot be read ({error.strerror or error})"
        if got != expected:
            return f"{name}'s checksum differs from the manifest's (a torn write?)"
    try:  # under a name of its own, then renamed: ranks verifying at once never read half a stamp
        tmp = path / f"{VERIFIED}.{os.getpid()}"
        tmp.write_text(json.dumps(stamp))
        os.replace(tmp, path / VERIFIED)
    except OSError:
        pass  # (a run directory one may read but not write: verified again next time)
    return None


def is_complete(path: Path, verify: bool = False) -> bool:
    return problem_of(path, verify) is None


@dataclass(frozen=True)
class Skipped:
    """A folder of checkpoints/ that resume passes over; str() is the path and why, in one sentence."""

    path: Path
    why: str

    @property
    def name(self) -> str:
        return self.path.name

    def __fspath__(self) -> str:
        return str(self.path)

    def __str__(self) -> str:
        return f"{self.path}: {self.why}"


def find_latest(checkpoints_dir: Path, verify: bool = True) -> tuple[Path | None, list[Skipped]]:
    """The newest complete checkpoint, verified byte for byte against its manifest (with `verify`), and the folders
    passed over on the way: the temporary folders of saves that did not finish, and each newer checkpoint that is
    damaged, named with what is wrong and what is resumed from instead ("step_12: trainable.safetensors is 132,960
    bytes, the manifest says 265,920: resuming from step_8")."""
    if not checkpoints_dir.is_dir():
        return None, []
    candidates = sorted((p for p in checkpoints_dir.iterdir() if p.is_dir() and p.name.startswith("step_")),
                        key=_step_of, reverse=True)
    skipped = [Skipped(p, "the temporary folder of a save that did not finish") for p in
               sorted(checkpoints_dir.iterdir()) if p.name.startswith(TMP_PREFIX)]
    damaged, latest = [], None
    for candidate in candidates:
        problem = problem_of(candidate, verify)
        if problem is None:
            latest = candidate
            break
        damaged.append((candidate, problem))
    instead = f"resuming from {latest.name}" if latest else "no complete checkpoint is left: starting over from step 0"
    return latest, skipped + [Skipped(path, f"{problem}: {instead}") for path, problem in damaged]


def describe(checkpoints_dir: Path) -> list[str]:
    """One line per folder of checkpoints/, newest first, with its state (`llmft.runs show`): complete, damaged and
    why, or the temporary folder of a save that did not finish. As resume does, the newest are read through against
    their checksums until a complete one (the one resume takes); older ones are checked by size."""
    if not checkpoints_dir.is_dir():
        return []
    folders = sorted((p for p in checkpoints_dir.iterdir() if p.is_dir() and p.name.startswith("step_")),
                     key=_step_of, reverse=True)
    width = max([12] + [len(p.name) for p in checkpoints_dir.iterdir()])
    lines, resumed = [], None
    for folder in folders:
        problem = problem_of(folder, verify=resumed is None)
        if problem is not None:
            lines.append(f"{folder.name:{width}} damaged: {problem}")
            continue
        manifest = read_manifest(folder)
        if resumed is None:
            resumed = folder
            checked = "verified, resume takes it" if manifest.get("checksums") else \
                "sizes checked (saved without checksums), resume takes it"
        else:
            checked = "sizes checked"
        val_loss = manifest.get("val_loss")
        lines.append(f"{folder.name:{width}} complete ({checked}), {_bytes(checkpoint_size(manifest))}"
                     + (f", val_loss {val_loss:.4g}" if val_loss is not None else ""))
    lines += [f"{p.name:{width}} incomplete: the temporary folder of a save that did not finish"
              for p in sorted(checkpoints_dir.iterdir()) if p.name.startswith(TMP_PREFIX)]
    return lines


# ------------------------------------------------------------------------------------------------------ writing

def save(checkpoints_dir: Path, step: int, write_files: Callable[[Path], None], meta: dict, keep_last: int,
         barrier: Callable[[], None] = lambda: None, is_main: bool = True,
         gather: Callable[[object], list] = lambda value: [value], rank: int = 0,
         timeout_min: float = DEFAULT_SAVE_TIMEOUT_MIN) -> Path:
    """Write a checkpoint through `write_files(tmp_dir)`, make it durable, add the manifest, rename it into place,
    prune old ones.

    Collective when distributed: every rank calls it and writes its part. Every rank then reports success or its
    error (`gather`: one value per rank, on every rank), so all ranks stop together when one fails (a full quota on
    one node must not leave the others waiting at a barrier); the first error is named (rank, path, errno) and the
    previous checkpoint stays. Then each rank fsyncs and checksums its share of the files (dealt out by size: a file
    another node wrote is flushed by that node when this one reads it, on Lustre, GPFS and NFS alike), and rank 0
    alone writes the manifest and renames. A rank whose part takes longer than `timeout_min` ends its process
    (`_Watchdog`).
    """
    started = time.time()
    final = checkpoints_dir / f"step_{step}"
    tmp = checkpoints_dir / f"{TMP_PREFIX}step_{step}"
    problem = None
    if is_main:
        with StallWatchdog(timeout_min * 60, _save_stalled(rank, step, timeout_min),
                           f"checking the room for it in {checkpoints_dir}"):  # (on a stalled file system too)
            try:
                checkpoints_dir.mkdir(parents=True, exist_ok=True)
                for stale in checkpoints_dir.iterdir():  # (this run holds the run directory's lock: no other writer)
                    # saves killed earlier, and checkpoints past this step: damaged ones that resume skipped (kept
                    # until now to be looked at; counted as complete by size, they would outlive good ones in the
                    # pruning)
                    if stale.name.startswith(TMP_PREFIX) or (stale.name.startswith("step_")
                                                             and _step_of(stale) > step):
                        shutil.rmtree(stale, ignore_errors=True)
                problem = _make_room(checkpoints_dir, keep_last)
                if problem is None:
                    tmp.mkdir()
            except OSError as error:
                problem = _describe(error, 0, tmp)
    problems = [x for x in gather(problem) if x is not None]  # rank 0's checks and mkdir, seen by every rank
    checksums: dict[str, list] = {}
    own_error = None
    # what write_files writes is not known: its folder, until the files are fsynced and read back
    with StallWatchdog(timeout_min * 60, _save_stalled(rank, step, timeout_min),
                       f"writing its files into {tmp}") as watchdog:
        if not problems:
            try:
                write_files(tmp)
            except Exception as error:  # noqa: BLE001: every rank must hear of it (below), whatever it is
                problem, own_error = _describe_write_error(error, rank, tmp), error
            problems = [x for x in gather(problem) if x is not None]  # every rank's writes: all agree
        if not problems:  # every rank has written: each makes its share durable and reads it back for its checksum
            try:
                shares = gather(None)  # (a barrier that also counts the ranks)
                for name in _deal(tmp, len(shares))[rank]:
                    watchdog.doing = f"fsyncing and reading back {tmp / name}"
                    checksums[name] = list(_read_and_hash(tmp / name, _hash_name(), fsync=True))
            except OSError as error:
                problem = _describe(error, rank, tmp)
            results = gather((problem, checksums))
            problems = [p for p, _ in results if p is not None]
            checksums = {name: value for _, share in results for name, value in share.items()}
        if not problems and is_main:  # rank 0 alone: the manifest, the rename; every rank hears how it went
            try:
                watchdog.doing = f"writing and fsyncing the manifest of {tmp}"
                _write_manifest(tmp, step, meta, checksums, started)
                if final.exists():  # a checkpoint of the same step from an earlier attempt
                    shutil.rmtree(final)
                watchdog.doing = f"renaming {tmp} and fsyncing {checkpoints_dir}"
                os.replace(tmp, final)
                _fsync_dir(checkpoints_dir)
            except OSError as error:
                problem = _describe(error, rank, tmp)
        if not problems:
            problems = [x for x in gather(problem if is_main else None) if x is not None]
    if problems:
        if is_main:
            shutil.rmtree(tmp, ignore_errors=True)
        barrier()
        if own_error is not None and not _is_io_error(own_error):
            raise own_error  # a bug, not the file system: its traceback, here (the others stop with the sentence)
        raise CheckpointError(_failure(checkpoints_dir, step, problems, keep_last))
    if is_main:
        _prune(checkpoints_dir, keep_last)
    barrier()
    return final


def _deal(tmp: Path, world_size: int) -> list[list[str]]:
    """The files under `tmp` dealt out to the ranks for fsync and checksum: the largest first, each to the rank with
    the fewest bytes so far (the same answer on every rank, from the same listing)."""
    files = sorted(((p.stat().st_size, p.relative_to(tmp).as_posix()) for p in tmp.rglob("*") if p.is_file()),
                   key=lambda pair: (-pair[0], pair[1]))
    shares, loads = [[] for _ in range(world_size)], [0] * world_size
    for size, name in files:
        least = loads.index(min(loads))
        shares[least].append(name)
        loads[least] += size
    return shares


def _write_manifest(tmp: Path, step: int, meta: dict, checksums: dict[str, list], started: float) -> None:
    """Rank 0, every rank's files durable: the manifest (each file's size and checksum), fsynced with every folder
    of the checkpoint. A file some rank's listing missed (a stale directory cache on another node) is read here."""
    files, sums = {}, {}
    for path in sorted(tmp.rglob("*")):
        if path.is_file():
            name = path.relative_to(tmp).as_posix()
            size, digest = checksums.get(name) or _read_and_hash(path, _hash_name(), fsync=True)
            files[name], sums[name] = size, digest
    for folder in sorted((p for p in tmp.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)):
        _fsync_dir(folder)
    manifest = {"step": step, "time": time.time(), "files": files, "checksums": sums,
                "save_s": round(time.time() - started, 3), **meta}
    with open(tmp / MANIFEST, "w") as handle:
        json.dump(manifest, handle, indent=2)
        handle.flush()
        os.fsync(handle.fileno())
    _fsync_dir(tmp)


def _fsync_dir(folder: Path) -> None:
    descriptor = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


# ------------------------------------------------------------------------------------------------------ room

def _bytes(count: float) -> str:
    for unit in ("bytes", "KB", "MB", "GB", "TB"):
        if count < 1000 or unit == "TB":
            return f"{count:,.0f} {unit}" if unit == "bytes" else f"{count:.1f} {unit}"
        count /= 1000


def _complete_by_size(checkpoints_dir: Path) -> list[Path]:
    return sorted((p for p in checkpoints_dir.iterdir() if p.name.startswith("step_") and is_complete(p)),
                  key=_step_of)


def _needed(checkpoints_dir: Path) -> tuple[int, int, str] | None:
    """(bytes, inodes, what they come from) a new checkpoint is expected to take: the newest complete one's size plus
    SPACE_MARGIN. None before the first checkpoint (nothing to go by)."""
    complete = _complete_by_size(checkpoints_dir)
    if not complete:
        return None
    files = list(read_manifest(complete[-1])["files"])
    folders = {Path(name).parent for name in files}
    inodes = len(files) + len(folders) + 1  # its files, its folders (the checkpoint's own included), the manifest
    return (int(checkpoint_size(read_manifest(complete[-1])) * (1 + SPACE_MARGIN)), inodes,
            f"the size of {complete[-1].name} plus {SPACE_MARGIN:.0%}")


def _free(folder: Path) -> tuple[int, int | None]:
    """(bytes, inodes) a user may still write on `folder`'s file system; inodes None where it does not count them."""
    stats = os.statvfs(folder)
    return stats.f_bavail * stats.f_frsize, (stats.f_favail if stats.f_files else None)


def _shortfall(checkpoints_dir: Path, needed: tuple[int, int, str]) -> str | None:
    need_bytes, need_inodes, why = needed
    free_bytes, free_inodes = _free(checkpoints_dir)
    if free_bytes < need_bytes:
        return (f"{checkpoints_dir} has {_bytes(free_bytes)} free on its file system and the checkpoint needs about "
                f"{_bytes(need_bytes)} ({why})")
    if free_inodes is not None and free_inodes < need_inodes:
        return (f"{checkpoints_dir} has {free_inodes:,} free inodes (files) on its file system and the checkpoint "
                f"needs {need_inodes:,}")
    if _quota_refuses(checkpoints_dir, need_bytes):
        return (f"{checkpoints_dir} has {_bytes(free_bytes)} free on its file system, but a quota refused to reserve "
                f"the {_bytes(need_bytes)} the checkpoint needs ({why}): EDQUOT")
    return None


# statvfs does not see quotas (per user, group, project or fileset: Jean Zay's $WORK and $SCRATCH have them, Lustre's
# and GPFS's are kept by their servers, btrfs's qgroups by the file system), and each file system's quota tool prints
# its own format. What they all enforce is the allocation itself: asking fallocate(2) for the checkpoint's size in one
# file answers EDQUOT at once where the quota cannot hold it, writing nothing, and the blocks go back at the unlink.
# Called through libc: os.posix_fallocate falls back to writing zeros where fallocate is not supported.
_RESERVATION = ".space-check"


def _quota_refuses(folder: Path, size: int) -> bool:
    """Whether a quota refuses `size` bytes in `folder` (fallocate's EDQUOT). Any other answer (done, not supported,
    ENOSPC on one Lustre target while the file system as a whole has room) leaves it to the write to say."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_longlong, ctypes.c_longlong]
    path = folder / _RESERVATION
    try:
        fd = os.open(path, os.O_CREAT | os.O_WRONLY | os.O_TRUNC, 0o600)
    except OSError:
        return False
    try:
        refused = libc.fallocate(fd, 0, 0, size) != 0 and ctypes.get_errno() == errno.EDQUOT
    finally:
        os.close(fd)
        path.unlink(missing_ok=True)
    return refused


def _make_room(checkpoints_dir: Path, keep_last: int) -> str | None:
    """Rank 0, before a save: None if the file system has room for it, after removing, oldest first and only as many
    as needed, the checkpoints that `keep_last` would remove after it anyway (never the best, never the newest);
    else why not, in words."""
    needed = _needed(checkpoints_dir)
    if needed is None:
        return None
    shortfall, removed = _shortfall(checkpoints_dir, needed), []
    complete, best = _complete_by_size(checkpoints_dir), _best(checkpoints_dir)
    for old in complete[:len(complete) - max(keep_last - 1, 1)]:
        if shortfall is None:
            break
        if old != best:
            shutil.rmtree(old, ignore_errors=True)
            removed.append(old.name)
            shortfall = _shortfall(checkpoints_dir, needed)
    if shortfall is None or not removed:
        return shortfall
    return (f"{shortfall}, even after removing {', '.join(removed)} (which train.keep_last={keep_last} would remove "
            f"after this save)")


# ------------------------------------------------------------------------------------------------------ errors

def _describe(error: OSError, rank: int, where: Path) -> str:
    name = errno.errorcode.get(error.errno, "") if error.errno else ""
    what = error.filename or f"into {where}"  # (a write that fails after the open names no file)
    return f"rank {rank} could not write {what} ({name + ': ' if name else ''}{error.strerror or error})"


# How the writers say a write failed when they raise something else than OSError: safetensors ("I/O error: No space
# left on device (os error 28)"), torch.save's C++ writer ("[enforce fail at inline_container.cc:672] . unexpected pos
# 576 vs 534" on a full tmpfs: no errno at all; "PytorchStreamWriter failed writing file ...: file write failed").
_FULL_WORDS = ("No space left", "os error 28")
_QUOTA_WORDS = ("Disk quota exceeded", "os error 122")
_WRITE_WORDS = _FULL_WORDS + _QUOTA_WORDS + ("I/O error", "file write failed", "inline_container",
                                             "PytorchStreamWriter")


def _is_io_error(error: BaseException) -> bool:
    return isinstance(error, OSError) or any(word in str(error) for word in _WRITE_WORDS)


def _describe_write_error(error: Exception, rank: int, tmp: Path) -> str:
    """A rank's failure while writing its part, in words: an OSError's errno; a writer's failure recognised by its
    words, told full when the file system has (almost) no room left at that moment, before the partial folder goes;
    anything else as a failure of that rank (a bug: it keeps its traceback there)."""
    if isinstance(error, OSError):
        return _describe(error, rank, tmp)
    message = " ".join(str(error).split())[:300]
    if not _is_io_error(error):
        return f"rank {rank} failed while writing into {tmp} ({type(error).__name__}: {message})"
    full = any(word in str(error) for word in _FULL_WORDS)
    if not full:
        try:
            free_bytes, free_inodes = _free(tmp)
            full = free_bytes < (1 << 20) or free_inodes == 0
        except OSError:
            pass
    what = "EDQUOT: a quota is exhausted" if any(word in str(error) for word in _QUOTA_WORDS) else \
        "ENOSPC: the file system is full" if full else "an I/O error"
    return f"rank {rank} could not write into {tmp} ({what}; {type(error).__name__}: {message})"


_ROOM_WORDS = ("ENOSPC", "EDQUOT", "free on its file system", "free inodes")


def _failure(checkpoints_dir: Path, step: int, problems: list[str], keep_last: int) -> str:
    """The sentence every rank stops with: the first problem, the room needed and left, what is kept, what to do."""
    complete = _complete_by_size(checkpoints_dir) if checkpoints_dir.is_dir() else []
    room, fix = "", "free space or fix permissions"
    if any(word in problem for problem in problems for word in _ROOM_WORDS):
        needed = _needed(checkpoints_dir)
        quota = any("EDQUOT" in problem for problem in problems)
        if needed is not None and "free on its file system" not in problems[0] and "free inodes" not in problems[0]:
            room = f"; the checkpoint needs about {_bytes(needed[0])} ({needed[2]})" + (
                "" if quota else  # the file system's free space is not what ran out
                f" and {checkpoints_dir} has {_bytes(_free(checkpoints_dir)[0])} free once the partial checkpoint is "
                f"removed")
        if quota:
            room += " (a quota: see it with idr_quota_user on Jean Zay, quota -s, or lfs quota -h -u $USER on Lustre)"
        fix = "free space there" + (f" (or lower train.keep_last, now {keep_last})" if len(complete) > 1 else "")
    kept = f"the previous checkpoint is kept ({complete[-1].name})" if complete else "no earlier checkpoint exists"
    run_dir = checkpoints_dir.parent
    again = f"python -m llmft.launch resume={run_dir}" if (run_dir / "config.yaml").is_file() else "resume"
    more = f" (and {len(problems) - 1} more rank(s))" if len(problems) > 1 else ""
    return (f"the checkpoint of step {step} failed: {problems[0]}{more}{room}; {kept} and training stops: {fix}, "
            f"then {again}.")


# ------------------------------------------------------------------------------------------------------ watchdog

class StallWatchdog:
    """Ends this process when the work it guards outlives `limit_s`: a thread cannot interrupt a read or a write
    blocked on a stalled file system (a hard-mounted NFS waits for ever), so it writes `message(watchdog)` (what was
    being done, `doing`, for how long, and what to do) on stderr and calls os._exit; the other ranks then stop at
    their collective timeout or by torchrun. Around a save (here) and the universal-checkpoint conversion
    (strategies/deepspeed.py).

    That thread runs only when the blocked call releases the GIL. torch's and safetensors' writers hold it while
    they write (measured on a stalling FUSE file system: the sentence came when the file system answered, 298 s
    late), so a process of its own (`_Watcher`) holds a copy of the sentence, kept current as `doing` changes, and
    says it `WATCHER_GRACE_S` after the limit, then SIGKILLs this process, when this process could not."""

    def __init__(self, limit_s: float, message: Callable[["StallWatchdog"], str], doing: str):
        self.limit_s, self.message = limit_s, message
        self.started = time.monotonic()
        self.done = threading.Event()
        self._doing = doing

    @property
    def doing(self) -> str:
        return self._doing

    @doing.setter
    def doing(self, value: str) -> None:
        self._doing = value
        self._arm_watcher()

    def _arm_watcher(self) -> None:
        """The sentence as the watcher would say it (waited: the limit and its grace) and when, to the watcher."""
        fire_at = self.started + self.limit_s + WATCHER_GRACE_S
        as_then = _AsOf(self, started=time.monotonic() - (self.limit_s + WATCHER_GRACE_S))
        _Watcher.send(f"A\t{fire_at!r}\t{' '.join(self.message(as_then).split())}")

    def __enter__(self) -> "StallWatchdog":
        self._arm_watcher()
        threading.Thread(target=self._watch, name="llmft-stall-watchdog", daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self.done.set()
        _Watcher.send("D")

    def _watch(self) -> None:
        deadline = self.started + self.limit_s
        while not self.done.wait(min(1.0, max(0.0, deadline - time.monotonic()))):
            if time.monotonic() >= deadline:
                break
            self._arm_watcher()  # a `doing` the message reads from elsewhere (the conversion's) kept current
        else:
            return
        _Watcher.send("D")  # this thread says it: the watcher stays silent
        try:  # os.write, not sys.stderr: its lock may be held by the blocked thread
            os.write(2, (self.message(self) + "\n").encode())
        finally:
            os._exit(USER_ERROR_EXIT_CODE)


class _AsOf:
    """A StallWatchdog seen with another start time (what its message reads: `started`, `doing`)."""

    def __init__(self, watchdog: StallWatchdog, started: float):
        self.started, self.doing = started, watchdog.doing


WATCHER_GRACE_S = 5.0
# The watcher: reads `A<TAB>fire_at<TAB>sentence` (arm, CLOCK_MONOTONIC is the machine's) and `D` (disarm) lines on
# stdin; at fire_at it writes the sentence on its stderr (this process's) and SIGKILLs the process; it ends when the
# process closes the pipe (it ended). Python without site or user paths: a few milliseconds to start.
_WATCHER_CODE = r"""
import os, select, signal, sys, time
watched, fire_at, sentence, pending = int(sys.argv[1]), None, "", b""
while True:
    wait = None if fire_at is None else max(0.0, fire_at - time.monotonic())
    if select.select([0], [], [], wait)[0]:
        chunk = os.read(0, 1 << 16)
        if not chunk:
            break
        *lines, pending = (pending + chunk).split(b"\n")
        for line in lines:
            fields = line.decode().split("\t", 2)
            fire_at, sentence = (float(fields[1]), fields[2]) if fields[0] == "A" else (None, sentence)
    elif fire_at is not None and time.monotonic() >= fire_at:
        os.write(2, (sentence + "\n").encode())
        os.kill(watched, signal.SIGKILL)
        break
"""


class _Watcher:
    """The one watcher process of this process, started at the first StallWatchdog."""

    process = None
    lock = threading.Lock()

    @classmethod
    def send(cls, line: str) -> None:
        with cls.lock:
            try:
                if cls.process is None or cls.process.poll() is not None:
                    cls.process = subprocess.Popen([sys.executable, "-I", "-S", "-c", _WATCHER_CODE, str(os.getpid())],
                                                   stdin=subprocess.PIPE, stdout=subprocess.DEVNULL)
                cls.process.stdin.write((line + "\n").encode())
                cls.process.stdin.flush()
            except OSError:
                pass  # no watcher (no process left to start): the thread alone guards


def guard_write(doing: str, timeout_min: float = DEFAULT_SAVE_TIMEOUT_MIN, rank: int = 0) -> StallWatchdog:
    """A StallWatchdog for the run directory's other writes (the metrics and TensorBoard, the final model,
    summary.json): on a stalled file system they block in the kernel like a save, and a run of one rank has no
    collective timeout to end it, so it would hang silently until the job's time limit."""
    return StallWatchdog(timeout_min * 60, _stalled(rank, "", "the last checkpoint", "writes there", timeout_min),
                         doing)


def _save_stalled(rank: int, step: int, timeout_min: float) -> Callable[[StallWatchdog], str]:
    return _stalled(rank, f"on the checkpoint of step {step}, ", "the previous checkpoint", "saves", timeout_min)


def _stalled(rank: int, on: str, kept: str, slow: str, timeout_min: float) -> Callable[[StallWatchdog], str]:
    """The sentence of a rank whose write outlived train.save_timeout_min (a save's, or another write's)."""
    return lambda watchdog: (
        f"llmft: rank {rank} has waited {time.monotonic() - watchdog.started:.0f} s {on}{watchdog.doing}, longer "
        f"than train.save_timeout_min={timeout_min:g}: its file system seems stalled, so this rank ends now instead "
        f"of hanging ({kept} is kept); resume once the file system answers, or raise train.save_timeout_min if "
        f"{slow} are this slow.")


# ------------------------------------------------------------------------------------------------------ pruning

def _best(checkpoints_dir: Path) -> Path | None:
    """The complete checkpoint with the lowest validation loss of its own step, if any was evaluated."""
    evaluated = [(read_manifest(p).get("val_loss"), p) for p in _complete_by_size(checkpoints_dir)]
    evaluated = [(loss, p) for loss, p in evaluated if loss is not None]
    return min(evaluated, key=lambda pair: pair[0])[1] if evaluated else None


def _prune(checkpoints_dir: Path, keep_last: int) -> None:
    """Keep the last `keep_last` complete checkpoints, and the one with the best validation loss."""
    best = _best(checkpoints_dir)
    for old in _complete_by_size(checkpoints_dir)[:-keep_last]:
        if old != best:
            shutil.rmtree(old, ignore_errors=True)
