"""The local run end to end on the tiny model: run directory, loss, adapter, loading from a local folder."""

from __future__ import annotations

import json
import sys

import pytest
import torch

from llmft.config.compose import compose
from llmft.rundir import create as rundir
from llmft.training.loop import train
from support.early import EARLY, EarlyCommand
from support.runs import read_metrics, run_llmft

FAST = ["train.max_steps=40", "train.eval_every=20", "train.save_every=20", "train.log_every=5"]
QUICK = ["train.log_every=1", "train.eval_every=100", "train.micro_batch_size=4"]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    cfg = compose(FAST + [f"run_dir={tmp_path_factory.mktemp('tiny') / 'run'}"])
    run_dir = rundir.create(cfg)
    return run_dir, train(cfg, run_dir)


def test_run_directory_holds_what_the_readme_promises(tiny_run):
    run_dir, result = tiny_run
    for name in ["config.yaml", "provenance.json", "metrics.jsonl", "summary.json",
                 "final/adapter_model.safetensors", "final/adapter_config.json", "final/tokenizer.json",
                 "base_model/config.json", "checkpoints/step_20/manifest.json"]:
        assert (run_dir / name).is_file(), name
    assert "chat_template" in (run_dir / "final/tokenizer_config.json").read_text() or \
        (run_dir / "final/chat_template.jinja").is_file()
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["steps"] == 40
    train_records = [r for r in read_metrics(run_dir) if "loss" in r]
    assert {"step", "loss", "lr", "grad_norm", "tokens_per_s"} <= set(train_records[0])
    assert any("val_loss" in r for r in read_metrics(run_dir))
    assert summary["final_loss"] < summary["first_loss"]


def test_saved_adapter_gives_the_same_logits_through_stock_peft(tiny_run):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    run_dir, result = tiny_run
    base = AutoModelForCausalLM.from_pretrained(run_dir / "base_model")
    reloaded = PeftModel.from_pretrained(base, run_dir / "final").eval()
    trained = result.model.eval()
    ids = result.tokenizer.apply_chat_template(
        [{"role": "user", "content": "My job is pending, why?"}], add_generation_prompt=True, return_tensors="pt",
        return_dict=True,
    )["input_ids"]
    with torch.no_grad():
        expected, got = trained(input_ids=ids).logits, reloaded(input_ids=ids).logits
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)
    assert json.loads((run_dir / "final/adapter_config.json").read_text())["base_model_name_or_path"] == str(
        run_dir / "base_model")


def test_a_model_loads_from_a_local_hugging_face_folder(tiny_run, tmp_path):
    """`model.path` pointing at files written first: the real from_pretrained(local_path) code path."""
    base_dir = tiny_run[0] / "base_model"
    cfg = compose(["model=llama3_2_1b", f"model.path={base_dir}", "model.dtype=float32", "model.max_seq_len=256",
                   "train=debug", "train.max_steps=6", "train.eval_every=3", f"run_dir={tmp_path / 'run'}"])
    run_dir = rundir.create(cfg)
    result = train(cfg, run_dir)
    assert result.summary["steps"] == 6
    assert json.loads((run_dir / "final/adapter_config.json").read_text())["base_model_name_or_path"] == str(base_dir)


def test_qlora_on_a_machine_without_cuda_is_a_clear_error(tmp_path):
    result = run_llmft("launch", "peft=qlora", f"run_dir={tmp_path / 'run'}")
    assert result.returncode != 0
    assert "qlora needs a CUDA GPU" in result.stderr and "Traceback" not in result.stderr


EARLY["tests/training/test_train.py::test_the_readme_demo_command"] = EarlyCommand(  # one process, a minute and more
    lambda folder: [sys.executable, "-m", "llmft.launch", f"run_dir={folder / 'demo'}"], timeout=180)


@pytest.mark.slow
def test_the_readme_demo_command(early_command):
    """README command 1: `python -m llmft.launch` with no argument (here with run_dir to find it). Started when the
    tests are collected (support/early.py): it trains on a core the earlier tests leave idle."""
    result = early_command.finished()
    demo = early_command.folder / "demo"
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().splitlines()[-1] == f"run dir: {demo}"
    summary = json.loads((demo / "summary.json").read_text())
    assert summary["steps"] >= 200
    assert summary["final_loss"] < 0.7 * summary["first_loss"], summary


@pytest.mark.slow
def test_compiled_layers_give_the_same_losses(tmp_path):
    """train.compile=true: torch.compile per decoder layer (inductor, on the CPU here), same numbers."""
    common = ["train.max_steps=4", "train.log_every=1", "train.eval_every=4", "train.save_every=0", "peft.dropout=0"]
    curves = {}
    for compiled in ("false", "true"):
        cfg = compose(common + [f"train.compile={compiled}", f"run_dir={tmp_path / compiled}"])
        train(cfg, rundir.create(cfg))
        curves[compiled] = [r["loss"] for r in read_metrics(tmp_path / compiled) if "loss" in r]
    assert curves["true"] == pytest.approx(curves["false"], abs=1e-4)


def test_training_on_every_ticket_is_allowed(tmp_path):
    cfg = compose(["data.validation_fraction=0", "train.max_steps=3", *QUICK, f"run_dir={tmp_path}"])
    summary = train(cfg, rundir.create(cfg)).summary
    assert summary["status"] == "completed" and summary["num_validation_samples"] == 0
    assert summary["final_val_loss"] is None
