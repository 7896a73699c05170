"""Processes that die with their parent: a rank must not outlive the launcher that started it; and what the launcher
reads of its ranks (their pids, the signals they catch) to forward a stop signal to them.

torchrun starts each rank in a session of its own, so killing the launcher's process group (`kill -9`, the OOM
killer, a closed SSH session) leaves the ranks training and writing checkpoints, and a `resume=` started next trains
beside them. Linux's PR_SET_PDEATHSIG sends a signal to a process when its parent dies: the launcher asks it for
torchrun (SIGTERM: torchrun then ends its ranks), and each rank asks it for itself: SIGKILL until training starts
(nothing is lost yet, and the rank may be inside C code that no Python handler interrupts, such as connecting to the
store of a torchrun that is gone), then SIGTERM, which the loop treats as a stop signal (checkpoint at the next step,
then exit).

The request only covers a parent alive when it is made. A rank asks for it first thing (before importing torch), but
its launcher may already be gone by then: the parent read is then init or a subreaper, and comparing the parent
before and after the request sees nothing. So the launcher passes its own pid down (LLMFT_LAUNCHER_PID, in torchrun's
environment, which the ranks inherit) and a rank checks the chain it expects: its parent (torchrun) alive, and
torchrun's parent the launcher. Torch-free: the launcher uses it.
"""

from __future__ import annotations

import atexit
import ctypes
import logging
import os
import signal
import sys
import threading
from typing import Callable

PR_SET_PDEATHSIG = 1
LAUNCHER_PID_ENV = "LLMFT_LAUNCHER_PID"  # set by llmft.launch for torchrun: the pid torchrun's parent must have

_expected_parent: int | None = None  # a rank under torchrun: torchrun's pid, read first thing


def die_with_parent(signum: int = signal.SIGTERM) -> None:
    """Ask the kernel to send `signum` to this process when its parent exits (Linux; elsewhere nothing). For a child
    right after fork (torchrun's preexec_fn): its parent is alive when this starts."""
    if not sys.platform.startswith("linux"):
        return
    parent = os.getppid()
    _request_death_signal(signum)
    if os.getppid() != parent:  # the parent died before the request: the signal will never come, act now
        os.kill(os.getpid(), signum)


def die_with_launcher(signum: int = signal.SIGKILL) -> None:
    """In a rank under torchrun: `signum` when torchrun dies, and at once when the launcher chain is already broken
    (torchrun gone, or torchrun's parent not the launcher of LLMFT_LAUNCHER_PID). Nothing elsewhere (a SLURM task, one
    process). Called first thing with SIGKILL, again with SIGTERM when training starts (the parent read the first
    time stays the expected one)."""
    global _expected_parent
    if not sys.platform.startswith("linux") or "TORCHELASTIC_RUN_ID" not in os.environ:
        return
    if _expected_parent is None:
        _expected_parent = os.getppid()
    _request_death_signal(signum)
    if launcher_gone():
        os.kill(os.getpid(), signum)


def launcher_gone() -> bool:
    """Whether this rank's launcher chain is broken: its parent is not the torchrun it started under, or (started by
    llmft.launch) torchrun's parent is not the launcher any more. False outside a rank under torchrun."""
    if _expected_parent is None:
        return False
    parent = os.getppid()
    if parent != _expected_parent:
        return True
    launcher = os.environ.get(LAUNCHER_PID_ENV, "")
    return launcher.isdigit() and parent_pid(parent) != int(launcher)


def parent_pid(pid: int) -> int | None:
    """The parent of process `pid` (from /proc), None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return int(stat.read().rsplit(")", 1)[1].split()[1])  # after the command name, which may hold spaces
    except (OSError, IndexError, ValueError):
        return None


def _request_death_signal(signum: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)  # this process's own symbols, libc's among them (no library search)
    libc.prctl(PR_SET_PDEATHSIG, int(signum), 0, 0, 0)


def child_pids(pid: int) -> list[int]:
    """The processes whose parent is `pid` (from /proc)."""
    children = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and parent_pid(int(entry)) == pid:
            children.append(int(entry))
    return children


def catches(pid: int, signum: int) -> bool:
    """Whether process `pid` has a handler for `signum` now (its SigCgt mask in /proc): a signal sent before would
    take its default action, or be ignored."""
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("SigCgt:"):
                    return bool(int(line.split()[1], 16) >> (int(signum) - 1) & 1)
    except (OSError, ValueError, IndexError):
        pass
    return False


# ------------------------------------------------------------------------------------------------- a rank's end
# A rank whose work is done and written ends without the interpreter's teardown. That teardown frees what the
# libraries left alive, in any order, while their C++ threads still run: DeepSpeed's ZeRO-3 keeps its engine, its
# parameters and through them torch's gloo process groups alive after destroy_process_group (cycles through C++ hooks,
# which Python's collector cannot see), so their worker threads outlive it. A completed ZeRO-3 run of this project's
# tests ended once with a rank aborting there ("terminate called without an active exception", SIGABRT): torchrun
# then calls the run failed, and SLURM marks the job FAILED, so an evaluation waiting on its success never starts.


def end_rank(code: int) -> None:
    """Ends this process with `code` as the interpreter would, less its teardown: the threads it would wait for are
    waited for, the exit handlers run, the streams are flushed."""
    threading._shutdown()  # what the interpreter's exit does first: thread pools' exit hooks, non-daemon threads joined
    atexit._run_exitfuncs()  # the handlers libraries registered (logging's flush, mlflow's, multiprocessing's)
    _flush_streams()
    os._exit(code)


def end_task_without_teardown() -> Callable[[], None]:
    """For a task that a library ends (submitit writes the result after the training function returns): from now on,
    if the returned `done()` was called and no exception reached the top, the process ends with 0 at the first exit
    handler registered from here, instead of going on to the teardown. Handlers registered before (logging's) are
    skipped, so the logs are flushed here."""
    state = {"done": False}
    previous_hook = sys.excepthook

    def failed(*exc_info) -> None:
        state["done"] = False
        previous_hook(*exc_info)

    def end_if_done() -> None:
        if state["done"]:
            logging.shutdown()
            _flush_streams()
            os._exit(0)

    sys.excepthook = failed
    atexit.register(end_if_done)
    return lambda: state.update(done=True)


def _flush_streams() -> None:
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a reader gone, a stream closed: nothing more can be said there
            pass
