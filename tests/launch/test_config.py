"""Every YAML in conf/ composes and validates; bad overrides give one line naming the key."""

from __future__ import annotations

import pytest
from omegaconf import OmegaConf

from llmft.config.compose import CONF_DIR, compose
from llmft.config.validation import validate
from llmft.errors import ConfigError
from support.runs import REPO, run_llmft

GROUPS = ["model", "data", "peft", "parallelism", "train", "objective"]
# preference data trains with its objective (and the other way round): validation refuses the mismatch
OBJECTIVE_OF_DATA = {"preferences_sample": "dpo", "preference_jsonl": "dpo", "kto_sample": "kto", "kto_jsonl": "kto"}
DATA_OF_OBJECTIVE = {"dpo": "preferences_sample", "kto": "kto_sample"}


def options(group: str) -> list[str]:
    found = sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))
    assert found, f"no option for {group} in {CONF_DIR}"  # an empty list would skip the test silently
    return found


@pytest.mark.parametrize("group,option", [(g, o) for g in GROUPS for o in options(g)])
def test_every_group_option_composes_and_validates(group, option):
    overrides = [f"{group}={option}"]
    if group == "data" and option == "chat_jsonl":
        overrides.append("data.path=" + str(REPO / "llmft/data/samples/tickets_sample.chat.jsonl"))
    if group == "parallelism" and option != "single":
        overrides.append("launch.nproc=2")
    if group == "data" and option in OBJECTIVE_OF_DATA:
        overrides.append(f"objective={OBJECTIVE_OF_DATA[option]}")
    if group == "objective" and option in DATA_OF_OBJECTIVE:
        overrides.append(f"data={DATA_OF_OBJECTIVE[option]}")
    cfg = compose(overrides)
    validate(cfg, check_paths=False)
    assert OmegaConf.to_container(cfg, resolve=True)  # every interpolation resolves


def test_tiny_model_picks_the_debug_schedule_unless_told_otherwise():
    assert compose([]).train.max_steps == compose(["train=debug"]).train.max_steps
    assert compose(["train=default"]).train.lr == compose(["model=llama7b"]).train.lr == 2e-4


def test_model_paths_default_to_the_jean_zay_copy(monkeypatch):
    monkeypatch.setenv("DSDIR", "/gpfsdswork/dataset")
    cfg = compose(["model=llama7b"])
    assert cfg.model.path == "/gpfsdswork/dataset/HuggingFace_Models/meta-llama/Llama-2-7b-hf"
    assert compose(["model=llama7b", "model.path=/data/llama"]).model.path == "/data/llama"


def test_cross_field_validation_names_the_key():
    cfg = compose(["train.micro_batch_size=0"])
    with pytest.raises(ConfigError, match="train.micro_batch_size"):
        validate(cfg)
    cfg = compose(["data.path=/nonexistent/file.jsonl"])
    with pytest.raises(ConfigError, match="data.path"):
        validate(cfg)


def test_launch_prints_the_composed_config_with_hydras_flag():
    result = run_llmft("launch", "--cfg", "job", "model=llama7b", "train.lr=1e-4")
    assert result.returncode == 0, result.stderr
    cfg = OmegaConf.create(result.stdout)
    assert cfg.model.name == "llama7b" and cfg.train.lr == 1e-4 and "cluster" in cfg


@pytest.mark.parametrize("override,names", [
    ("train.lerning_rate=1e-4", "train.lerning_rate"),
    ("train.lr=fast", "train.lr"),
    ("peft.method=lorra", "peft.method"),
    ("model=gpt5", "model"),
    ("train.micro_batch_size=-1", "train.micro_batch_size"),
])
def test_bad_override_exits_nonzero_with_one_line_naming_the_key(override, names, tmp_path):
    result = run_llmft("launch", override, f"run_dir={tmp_path / 'run'}")
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert names in lines[0] and "Traceback" not in result.stderr
    assert not (tmp_path / "run").exists()  # nothing was created for a bad config


def test_console_script_maps_subcommands_to_modules():
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    llmft = shutil.which("llmft") or str(Path(sys.executable).parent / "llmft")
    result = subprocess.run([llmft, "launch", "--cfg", "job", "model=mistral_7b"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert OmegaConf.create(result.stdout).model.name == "mistral_7b"
    assert subprocess.run([llmft, "nonsense"], capture_output=True, text=True).returncode == 2
