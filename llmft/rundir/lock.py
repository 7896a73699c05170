"""One writer per run directory: `RUN_DIR/.llmft.lock` names the process (or SLURM job) that trains into it.

The launcher takes the lock before it starts a local run or submits a job; rank 0 of the run claims it for itself
when it starts (host, pid, SLURM job id) and releases it when it ends, however it ends. A second launch into the
same run directory (`resume=RUN_DIR`, or `run_dir=` of a live run) is refused with one sentence naming the holder
while the holder is alive, and takes over a stale lock, saying so.

Alive, on a shared file system (GPFS, Lustre) where pids mean nothing across nodes:
- a SLURM job id: the job is pending or running by `squeue` (an unanswered `squeue` counts as alive: we cannot tell);
- the same host: the pid exists and is an llmft process (a recycled pid is not);
- another host without a job: the lock was touched within `STALE_AFTER_S` (rank 0 touches it at every log step).

No torch here: the launcher uses it on the login node.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import time
from pathlib import Path

from llmft.errors import UserError

LOCK_NAME = ".llmft.lock"
STALE_AFTER_S = 15 * 60
LIVE_JOB_STATES = {"PENDING", "RUNNING", "CONFIGURING", "COMPLETING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED",
                   "RESIZING", "SUSPENDED", "STOPPED", "SIGNALING", "STAGE_OUT"}


class RunDirectoryInUse(UserError):
    """Another process or job trains into this run directory."""


def lock_path(run_dir: Path) -> Path:
    return Path(run_dir) / LOCK_NAME


def read_holder(run_dir: Path) -> dict | None:
    try:
        return json.loads(lock_path(run_dir).read_text())
    except (OSError, ValueError):
        return None


def this_process(job_id: str | None = None) -> dict:
    return {"host": socket.gethostname(), "pid": os.getpid(), "job_id": job_id or os.environ.get("SLURM_JOB_ID"),
            "since": time.strftime("%Y-%m-%dT%H:%M:%S%z")}


def describe(holder: dict) -> str:
    job = f"SLURM job {holder['job_id']}" if holder.get("job_id") else None
    process = f"process {holder.get('pid')} on {holder.get('host')}"
    return f"{job} ({process})" if job else process


def job_state(job_id: str) -> str | None:
    """The job's state from squeue, "" when squeue no longer lists it, None when squeue cannot answer."""
    try:
        result = subprocess.run(["squeue", "-h", "-j", str(job_id), "-o", "%T"], capture_output=True, text=True,
                                timeout=20)
    except (OSError, subprocess.SubprocessError):
        return None
    if result.returncode != 0:
        return "" if "Invalid job id" in result.stderr else None
    return result.stdout.strip().splitlines()[0] if result.stdout.strip() else ""


def pid_is_llmft(pid: int) -> bool:
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return False
    return "llmft" in cmdline or "torch.distributed.run" in cmdline


def is_alive(holder: dict, lock_mtime: float) -> bool:
    if holder.get("job_id"):
        state = job_state(holder["job_id"])
        if state is None:  # no answer from SLURM: fall back on the heartbeat
            return time.time() - lock_mtime < STALE_AFTER_S
        return state.split()[0] in LIVE_JOB_STATES if state else False
    if holder.get("host") == socket.gethostname():
        return bool(holder.get("pid")) and pid_is_llmft(int(holder["pid"]))
    return time.time() - lock_mtime < STALE_AFTER_S


def ancestors() -> set[int]:
    """This process and its parents (a rank under torchrun under the launcher: all of them are 'us')."""
    pids, pid = set(), os.getpid()
    while pid > 1 and pid not in pids:
        pids.add(pid)
        try:
            pid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            break
    return pids


def is_us(holder: dict) -> bool:
    job = os.environ.get("SLURM_JOB_ID")
    if holder.get("job_id") and job and str(holder["job_id"]) == job:
        return True
    return holder.get("host") == socket.gethostname() and holder.get("pid") in ancestors()


def acquire(run_dir: Path, job_id: str | None = None, log=print) -> dict:
    """Take the lock for this process (and job); RunDirectoryInUse when a live holder has it. Returns the holder."""
    path = lock_path(run_dir)
    mine = this_process(job_id)
    for _ in range(3):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o640)  # atomic on NFS v3+, GPFS, Lustre
        except FileExistsError:
            holder = read_holder(run_dir)
            try:
                mtime = path.stat().st_mtime
            except OSError:
                continue  # released meanwhile: try again
            if holder is not None and not is_us(holder) and is_alive(holder, mtime):
                raise RunDirectoryInUse(
                    f"{run_dir} is in use by {describe(holder)}, since {holder.get('since')}: wait for it to end "
                    + (f"or cancel it (scancel {holder['job_id']})" if holder.get("job_id") else
                       f"or stop it (kill {holder.get('pid')} on {holder.get('host')})") + ", then resume.")
            if holder is not None and not is_us(holder):
                log(f"llmft: taking over the stale lock of {describe(holder)} on {run_dir}")
            path.unlink(missing_ok=True)
            continue
        with os.fdopen(fd, "w") as handle:
            json.dump(mine, handle)
        return mine
    raise RunDirectoryInUse(f"{run_dir}: could not take {path} (another launch is taking it right now).")


def restamp(run_dir: Path, job_id: str | None = None) -> None:
    """Write this process (and job) as the holder of a lock we hold already (after submission, or in rank 0)."""
    tmp = lock_path(run_dir).with_name(LOCK_NAME + f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(this_process(job_id)))
    os.replace(tmp, lock_path(run_dir))


def heartbeat(run_dir: Path) -> None:
    try:
        os.utime(lock_path(run_dir))
    except OSError:
        pass


def release(run_dir: Path) -> None:
    """Remove the lock if this process (or its job, or a parent) holds it."""
    holder = read_holder(run_dir)
    if holder is not None and is_us(holder):
        lock_path(run_dir).unlink(missing_ok=True)
