"""The llmft command line: every command has its help, an unknown subcommand is named."""

from __future__ import annotations

import subprocess
import sys

import pytest

from support.runs import REPO, run_llmft


@pytest.mark.parametrize("module", ["launch", "train", "data", "plan", "runs", "eval", "chat", "export", "models"])
def test_every_command_has_help(module):
    result = run_llmft(module, "--help", timeout=120)
    assert result.returncode == 0 and result.stdout.strip() and not result.stderr.strip(), result.stderr


def test_an_unknown_subcommand_is_named():
    result = subprocess.run([sys.executable, "-m", "llmft.cli", "foo"], capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 2 and result.stderr.startswith("llmft: unknown command 'foo'")
