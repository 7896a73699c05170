"""Checkpoints that are complete or absent: written under a temporary name, renamed when whole.

Layout: `checkpoints/step_<N>/` holding the strategy's files and `manifest.json`, written last (step, world size,
strategy, every file with its size). A folder without a manifest, or whose files do not match it, is incomplete:
resume ignores it and says so. The rename is atomic on POSIX file systems (Lustre and GPFS included).

A ZeRO checkpoint resumed on another number of ranks also gets `step_<N>/universal/`, DeepSpeed's universal form of
its files, made once by rank 0 the same way (under `.tmp-universal`, renamed when whole) and never listed in the
manifest: the checkpoint's own files are untouched and it stays complete and loadable on its own world size.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import time
from pathlib import Path
from typing import Callable

from llmft.errors import UserError

MANIFEST = "manifest.json"


class CheckpointError(UserError):
    """A checkpoint could not be written (disk full, quota, permissions): the run stops, the previous one stays."""
TMP_PREFIX = ".tmp-"


def _step_of(path: Path) -> int:
    return int(path.name.removeprefix("step_"))


def is_complete(path: Path) -> bool:
    manifest_path = path / MANIFEST
    if not manifest_path.is_file():
        return False
    try:
        manifest = json.loads(manifest_path.read_text())
        return all((path / name).is_file() and (path / name).stat().st_size == size
                   for name, size in manifest["files"].items())
    except (ValueError, KeyError, OSError):
        return False


def find_latest(checkpoints_dir: Path) -> tuple[Path | None, list[Path]]:
    """The newest complete checkpoint, and the incomplete folders found on the way (for the log)."""
    if not checkpoints_dir.is_dir():
        return None, []
    candidates = sorted(
        (p for p in checkpoints_dir.iterdir() if p.is_dir() and p.name.startswith("step_")),
        key=_step_of, reverse=True,
    )
    incomplete = [p for p in checkpoints_dir.iterdir() if p.name.startswith(TMP_PREFIX)]
    for candidate in candidates:
        if is_complete(candidate):
            return candidate, incomplete
        incomplete.append(candidate)
    return None, incomplete


def read_manifest(path: Path) -> dict:
    return json.loads((path / MANIFEST).read_text())


def save(checkpoints_dir: Path, step: int, write_files: Callable[[Path], None], meta: dict, keep_last: int,
         barrier: Callable[[], None] = lambda: None, is_main: bool = True,
         gather: Callable[[object], list] = lambda value: [value], rank: int = 0) -> Path:
    """Write a checkpoint through `write_files(tmp_dir)`, add the manifest, rename into place, prune old ones.

    Collective when distributed: every rank calls it and writes its part. Every rank then reports success or its
    error (`gather`: one value per rank, on every rank), so all ranks stop together when one fails (a full quota on
    one node must not leave the others waiting at a barrier); the first error is named (rank, path, errno) and the
    previous checkpoint stays. Rank 0 alone writes the manifest and renames.
    """
    final = checkpoints_dir / f"step_{step}"
    tmp = checkpoints_dir / f"{TMP_PREFIX}step_{step}"
    problem = None
    if is_main:
        try:
            checkpoints_dir.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir()
        except OSError as error:
            problem = _describe(error, 0, tmp)
    problems = [x for x in gather(problem) if x is not None]  # rank 0's mkdir, seen by every rank
    if not problems:
        try:
            write_files(tmp)
        except OSError as error:
            problem = _describe(error, rank, tmp)
        problems = [x for x in gather(problem) if x is not None]  # every rank's writes: all agree
    if problems:
        if is_main:
            shutil.rmtree(tmp, ignore_errors=True)
        barrier()
        raise CheckpointError(
            f"the checkpoint of step {step} failed: {problems[0]}"
            + (f" (and {len(problems) - 1} more rank(s))" if len(problems) > 1 else "")
            + "; the previous checkpoint is kept and training stops: free space or fix permissions, then resume."
        )
    if not is_main:
        barrier()
        return final
    files = {p.relative_to(tmp).as_posix(): p.stat().st_size for p in sorted(tmp.rglob("*")) if p.is_file()}
    manifest = {"step": step, "time": time.time(), "files": files, **meta}
    with open(tmp / MANIFEST, "w") as handle:
        json.dump(manifest, handle, indent=2)
        handle.flush()
        os.fsync(handle.fileno())
    if final.exists():  # a checkpoint of the same step from an earlier attempt
        shutil.rmtree(final)
    os.replace(tmp, final)
    _prune(checkpoints_dir, keep_last)
    barrier()
    return final


def _describe(error: OSError, rank: int, where: Path) -> str:
    name = errno.errorcode.get(error.errno, "") if error.errno else ""
    return (f"rank {rank} could not write {error.filename or where} ({name + ': ' if name else ''}"
            f"{error.strerror or error})")


def _prune(checkpoints_dir: Path, keep_last: int) -> None:
    """Keep the last `keep_last` complete checkpoints, and the one with the best validation loss."""
    complete = sorted((p for p in checkpoints_dir.iterdir() if p.name.startswith("step_") and is_complete(p)),
                      key=_step_of)
    evaluated = [(read_manifest(p).get("val_loss"), p) for p in complete]
    evaluated = [(loss, p) for loss, p in evaluated if loss is not None]
    best = min(evaluated, key=lambda pair: pair[0])[1] if evaluated else None
    for old in complete[:-keep_last]:
        if old != best:
            shutil.rmtree(old, ignore_errors=True)
