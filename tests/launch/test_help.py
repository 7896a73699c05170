"""Every `--help` is llmft's own: the commands that compose a config list its groups with their options (read from
conf/, so a new option shows without a word written) and its keys (from the schema), with examples; Hydra's own help
is one flag away (`--hydra-help`). Output into a reader that went away (`llmft chat --help | head`) ends quietly."""

from __future__ import annotations

import signal
import subprocess
import sys

import pytest

from llmft.config.compose import CONF_DIR
from support.runs import REPO, run_llmft

COMMANDS = ["launch", "train", "data", "plan", "runs", "eval", "chat", "export", "models"]


@pytest.mark.parametrize("module", ["launch", "plan", "data"])
def test_the_commands_that_compose_a_config_list_its_groups_options_and_keys(module):
    result = run_llmft(module, "--help", timeout=120)
    assert result.returncode == 0 and not result.stderr.strip(), result.stderr
    shown = result.stdout
    assert "Powered by Hydra" not in shown and "== Configuration groups ==" in shown
    groups = shown.split("== Configuration groups ==", 1)[1].split("== Keys ==", 1)[0].split()
    for group in ("model", "data", "peft", "parallelism", "train", "objective", "+cluster"):
        options = sorted(p.stem for p in (CONF_DIR / group.lstrip("+")).glob("*.yaml"))
        listed = groups[groups.index(group) + 1:groups.index(group) + 1 + len(options)]
        assert [o.rstrip("*") for o in listed] == options, (group, listed)
    assert "tiny*" in groups and "lora*" in groups and "jeanzay" in groups  # defaults of conf/config.yaml marked
    keys = {line.split()[0]: line for line in shown.splitlines() if line.startswith("  ")}
    assert "lr" in keys["train"].split() and "r" in keys["peft"].split()
    assert "staff_domains" in keys["data.tickets"].split() and "tickets.*" in shown
    assert "a list takes [a,b], one value or a comma list" in shown


def test_launch_help_has_examples_and_hydras_help_is_one_flag_away():
    shown = run_llmft("launch", "--help", timeout=120).stdout
    assert shown.startswith("usage: python -m llmft.launch")
    assert "python -m llmft.launch -m train.lr=1e-4,2e-4 peft.r=8,16" in shown and "--hydra-help" in shown
    hydra = run_llmft("launch", "--hydra-help", timeout=120)
    assert hydra.returncode == 0 and "Hydra (" in hydra.stdout and "--multirun" in hydra.stdout


@pytest.mark.parametrize("module, says", [
    ("eval", ["eval.max_new_tokens", "eval.judge_url", "pip install 'llmft[eval]'"]),
    ("export", ["RUN_DIR/export/gguf", "format=gguf", "pip install 'llmft[gguf]'"]),
    ("chat", ["max_new_tokens", "prompt"]),
    ("runs", ["python -m llmft.runs sweep", "final loss, best and final validation loss and wall time"]),
])
def test_the_other_commands_name_their_keys_and_examples(module, says):
    result = run_llmft(module, "--help", timeout=120)
    assert result.returncode == 0 and not result.stderr.strip(), result.stderr
    assert all(s in result.stdout for s in says), result.stdout


@pytest.mark.parametrize("module", COMMANDS)
def test_output_into_a_closed_pipe_ends_quietly(module):
    """As `python -m llmft.X --help | head -0`: the reader is gone before the command writes. The command ends with
    0 or the shell's code for SIGPIPE (141), never a traceback or "bad config: [Errno 32] Broken pipe"."""
    process = subprocess.Popen([sys.executable, "-m", f"llmft.{module}", "--help"], cwd=REPO,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    process.stdout.close()  # the reader went away
    stderr = process.stderr.read().decode()
    code = process.wait(timeout=120)
    assert code in (0, 128 + signal.SIGPIPE, -signal.SIGPIPE) and not stderr.strip(), (code, stderr)
