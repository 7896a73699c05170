"""Commands started as soon as the tests are collected: a test module registers its command in EARLY under the
test's node id; tests/conftest.py starts those of the selected tests and stops them at the end of the session; the
test takes its command with the `early_command` fixture."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

from support.runs import REPO


class EarlyCommand:
    """A test's subprocess started as soon as the tests are collected (pytest_collection_finish), when that test is
    among them, so that it runs on the core that the earlier single-process tests leave idle, or at the first test
    of the file `start_with` (one whose tests leave a core idle); the test takes its result with finished(). Its
    folder is a temporary one, removed at the end of the session."""

    def __init__(self, argv_of, timeout: float, start_with: str | None = None):
        self.argv_of, self.timeout = argv_of, timeout
        self.start_with = start_with  # a test file (under tests/): started at its first test instead, if selected
        self.process: subprocess.Popen | None = None
        self.folder: Path | None = None
        self.result: subprocess.CompletedProcess | None = None

    def start(self) -> None:
        import tempfile

        if self.process is None:
            self.folder = Path(tempfile.mkdtemp(prefix="llmft-early-"))
            self.argv = self.argv_of(self.folder)
            self.started = time.time()
            with open(self.folder / "stdout", "w") as out, open(self.folder / "stderr", "w") as err:  # no pipe
                self.process = subprocess.Popen(self.argv, cwd=REPO, stdout=out, stderr=err,  # to fill and block
                                                env={**os.environ, "OMP_NUM_THREADS": "1"})

    def finished(self) -> subprocess.CompletedProcess:
        """The command's result (as subprocess.run gives it), waiting for it; its timeout counts from its start."""
        self.start()
        if self.result is None:
            try:
                self.process.wait(timeout=max(1.0, self.started + self.timeout - time.time()))
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
                raise
            self.result = subprocess.CompletedProcess(self.argv, self.process.returncode,
                                                      (self.folder / "stdout").read_text(),
                                                      (self.folder / "stderr").read_text())
        return self.result

    def stop(self) -> None:
        import shutil

        if self.process is not None and self.process.poll() is None:
            self.process.terminate()  # a torchrun passes it on to its ranks
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self.folder is not None:
            shutil.rmtree(self.folder, ignore_errors=True)


# test node id -> its early command (argv_of(folder) prepares what the command needs in its folder and returns its
# argv), registered by the test modules as they are collected: README command 1 (training/test_train.py), the
# torchrun of training/test_loss_strategies.py, the local sweep of launch/test_sweep.py.
EARLY: dict[str, EarlyCommand] = {}
