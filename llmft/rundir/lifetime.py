"""Processes that die with their parent: a rank must not outlive the launcher that started it.

torchrun starts each rank in a session of its own, so killing the launcher's process group (`kill -9`, the OOM
killer, a closed SSH session) leaves the ranks training and writing checkpoints, and a `resume=` started next trains
beside them. Linux's PR_SET_PDEATHSIG sends a signal to a process when its parent dies: the launcher asks it for
torchrun, and each rank asks it for itself, with SIGTERM, which the loop treats as a stop signal (checkpoint at the
next step, then exit). Torch-free: the launcher uses it.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import signal
import sys

PR_SET_PDEATHSIG = 1


def die_with_parent(signum: int = signal.SIGTERM) -> None:
    """Ask the kernel to send `signum` to this process when its parent exits (Linux; elsewhere nothing)."""
    if not sys.platform.startswith("linux"):
        return
    parent = os.getppid()
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, int(signum), 0, 0, 0)
    if os.getppid() != parent:  # the parent died before the request: the signal will never come, act now
        os.kill(os.getpid(), signum)
