"""Fault injector: a rank (LOCAL_RANK in its environment) that aborts in the interpreter's teardown, after its work
is done, as a library's C++ thread or destructor can there (a ZeRO-3 rank of this project's tests did once:
"terminate called without an active exception", SIGABRT, after a completed run).

Put this folder on PYTHONPATH: Python's site imports it in every process; the object below is freed when the
interpreter clears the modules at its teardown, and its __del__ aborts the process if it is a rank by then (submitit
exports LOCAL_RANK during the task, so it is read at the end). Other processes (the launcher, torchrun's agent, an
evaluation job) end as usual."""

import os


class _AbortInTeardown:
    def __del__(self, abort=os.abort, environ=os.environ, write=os.write):
        if "LOCAL_RANK" in environ:
            write(2, b"teardown_abort: this rank aborts in the interpreter's teardown\n")
            abort()


_planted = _AbortInTeardown()
