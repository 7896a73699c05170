"""A run that starts from another run's final model (`init_from=RUN_DIR`, llmft/rundir/init_from.py).

An SFT run from a LoRA run, trained at a learning rate too small to move any weight, must end with that run's adapter
bit for bit and its validation loss (a fresh adapter would end with other weights: the check fails if init_from is
ignored), on one process and on 2 ranks under ddp, fsdp and zero3; full fine-tuning from a full run likewise with its
weights. DPO from an SFT run starts at ln 2 and its reference log-probabilities are those of the SFT model (stock
PEFT's PeftModel of that run), not of the base. from-eval prints commands that launch as printed. What cannot load
is refused in one sentence."""

from __future__ import annotations

import json
import math
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from llmft.config.compose import compose
from llmft.errors import ConfigError
from llmft.rundir import create as rundir
from llmft.rundir.init_from import starting_config
from support.runs import REPO, read_metrics, run_llmft

# the run to start from: a LoRA of rank 8 (not the default 16: the runs started from it must take it from the run)
SFT = ["train.max_steps=6", "train.log_every=1", "train.eval_every=6", "train.save_every=0", "train.micro_batch_size=4",
       "peft.dropout=0", "peft.r=8", "model.max_seq_len=384"]
# a run that starts from it and cannot move a weight: AdamW's first steps are about lr per weight, 1e-30 is below
# the float32 spacing of every weight of the adapter
STILL = ["train.max_steps=2", "train.lr=1e-30", "train.log_every=1", "train.eval_every=1", "train.save_every=0"]


@pytest.fixture(scope="module")
def sft_run(tmp_path_factory) -> Path:
    run_dir = (tmp_path_factory.mktemp("init_from") / "sft").resolve()  # as the launcher records it
    result = run_llmft("launch", *SFT, f"run_dir={run_dir}")
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    return run_dir


def summary(run_dir: Path) -> dict:
    return json.loads((run_dir / "summary.json").read_text())


def adapter(run_dir: Path) -> dict:
    return load_file(run_dir / "final" / "adapter_model.safetensors")


def assert_same_tensors(expected: dict, got: dict) -> None:
    assert expected.keys() == got.keys()
    for name in expected:
        assert torch.equal(expected[name], got[name]), name


def val_loss_at(run_dir: Path, step: int) -> float:
    return next(r["val_loss"] for r in read_metrics(run_dir) if "val_loss" in r and r["step"] == step)


# ------------------------------------------------------------------------------------------------ sft, one process


def test_sft_from_a_lora_run_starts_from_its_adapter(sft_run, tmp_path):
    run_dir = tmp_path / "more"
    result = run_llmft("launch", f"init_from={sft_run}", *STILL, "train.micro_batch_size=4", f"run_dir={run_dir}")
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    assert (f"init_from: this run starts from {sft_run}: its lora adapter (peft.r=8), trained on as this run's lora "
            f"adapter, on its base model {sft_run / 'base_model'}.") in result.stdout
    assert f"model: the LoRA starts from the final adapter of {sft_run} (init_from)" in result.stdout
    assert_same_tensors(adapter(sft_run), adapter(run_dir))
    # after one step that moved nothing, the validation loss of the run it started from
    assert val_loss_at(run_dir, 1) == pytest.approx(summary(sft_run)["final_val_loss"], abs=1e-6)

    saved = json.loads((run_dir / "provenance.json").read_text())["init_from"]
    assert saved["run_dir"] == str(sft_run) and saved["kind"] == "adapter" and saved["steps"] == 6
    assert saved["objective"] == "sft" and saved["model_path"] == str(sft_run / "base_model")
    assert summary(run_dir)["init_from"] == str(sft_run)
    from llmft.rundir.files import read_config

    config = read_config(run_dir)  # what came with the run: its model (and base) and its adapter's shape
    assert config.model.path == str(sft_run / "base_model") and config.peft.r == 8 and config.model.max_seq_len == 384


# ------------------------------------------------------------------------------------------------ dpo's reference


@pytest.mark.slow
def test_dpo_from_an_sft_run_has_the_sft_model_as_its_reference(sft_run, tmp_path):
    """The reference log-probabilities the run computed before its first step equal those of the SFT model loaded
    by stock PEFT (base + the SFT run's adapter), and differ from the base's (the reference of a fresh adapter); the
    first DPO loss is ln 2, the policy starting as that reference."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from llmft.data.prepare.reading import read_conversations
    from llmft.data.prepare.samples_for_run import build_splits
    from llmft.data.tokenize.tokenizer import load_tokenizer
    from llmft.rundir.files import read_config
    from llmft.training import objectives

    pairs = REPO / "llmft" / "data" / "samples" / "preferences_sample.jsonl"
    run_dir = tmp_path / "dpo"
    result = run_llmft("launch", "objective=dpo", "data=preference_jsonl", f"data.path={pairs}", f"init_from={sft_run}",
                       "train.max_steps=3", "train.log_every=1", "train.eval_every=3", "train.save_every=0",
                       "train.micro_batch_size=4", f"run_dir={run_dir}")
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    assert "the DPO reference is that model (its log-probabilities computed once before the first step)" in \
        result.stdout
    records = [r for r in read_metrics(run_dir) if "loss" in r]
    assert records[0]["loss"] == pytest.approx(math.log(2), abs=1e-5)
    assert records[0]["reward_margin"] == pytest.approx(0.0, abs=1e-4)

    cfg = read_config(run_dir)
    tokenizer = load_tokenizer(cfg.model.path, cfg.model.fallback_chat_template)
    conversations, _ = read_conversations(cfg.data)
    splits, _ = build_splits(conversations, tokenizer, cfg.data, cfg.model.max_seq_len)
    table = torch.load(run_dir / "reference_logps.pt", weights_only=True)
    sft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(sft_run / "base_model"),
                                          sft_run / "final").eval()
    objective = objectives.DirectPreferenceOptimization(cfg.objective, sft_model, tokenizer.pad_token_id, None,
                                                        lambda t: t, False, False, torch.device("cpu"))

    def logps(items: list) -> torch.Tensor:  # [items, (chosen, rejected)], 8 pairs a forward
        rows = []
        for start in range(0, len(items), 8):
            indices = list(range(start, min(start + 8, len(items))))
            batch = objective.micro_batch(items, indices, 0, 1, with_reference=False)
            with torch.no_grad():
                both = objective.sequence_logps(sft_model, batch.inputs)
            rows.append(torch.stack([both[:len(indices)], both[len(indices):]], dim=1))
        return torch.cat(rows)

    gaps = []
    for split in ("train", "validation"):
        expected = logps(splits[split])
        assert table[split].shape == expected.shape and len(expected) > 0, split
        assert torch.allclose(table[split], expected, rtol=1e-5, atol=1e-3), \
            (split, float((table[split] - expected).abs().max()))
        with sft_model.disable_adapter():  # the base: what the reference was before init_from
            gaps.append(float((table[split] - logps(splits[split])).abs().max()))
    assert min(gaps) > 0.1, gaps  # the SFT run moved the model: the check above tells the two apart


# ------------------------------------------------------------------------------------------------ strategies


@pytest.mark.slow
def test_runs_from_a_run_start_from_its_model_under_ddp_fsdp_and_zero3(sft_run, tmp_path):
    """On 2 ranks (gloo): LoRA from the LoRA run under ddp, fsdp and zero3, and full fine-tuning from a full run under
    fsdp (built on meta, each rank reading its rows of that run's final weights), end with the weights they started
    from, bit for bit, and the validation loss of the run they started from."""
    from support.torchrun import harness_command

    full = tmp_path / "full"
    result = run_llmft("launch", "peft=full", "train.max_steps=2", "train.eval_every=2", "train.save_every=0",
                       "train.micro_batch_size=4", "train.lr=1e-4", f"run_dir={full}")
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    runs = {tmp_path / s: [f"parallelism={s}", f"init_from={sft_run}"] for s in ("ddp", "fsdp")}
    runs[tmp_path / "full_fsdp"] = ["parallelism=fsdp", f"init_from={full}"]
    runs[tmp_path / "zero3"] = ["parallelism=zero3", f"init_from={sft_run}"]  # last: ZeRO-3 stays on in the process
    for run_dir, overrides in runs.items():
        given = [*STILL, *overrides, "train.micro_batch_size=2", "launch.nproc=2",
                 "parallelism.zero3_param_persistence_threshold=0", "parallelism.zero3_model_persistence_threshold=0",
                 f"run_dir={run_dir}"]
        cfg, _ = starting_config(compose(given), given)
        rundir.create(cfg)
    out = tmp_path / "harness.pt"
    trained = subprocess.run(harness_command(2, "train_and_probe", out, list(runs)), cwd=REPO, capture_output=True,
                             text=True, timeout=900, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert trained.returncode == 0, trained.stdout[-3000:] + trained.stderr[-5000:]
    results = torch.load(out, weights_only=False)
    for strategy in ("ddp", "fsdp", "zero3"):
        run_dir = tmp_path / strategy
        assert results[str(run_dir)]["summary"]["strategy"] == strategy
        assert_same_tensors(adapter(sft_run), adapter(run_dir))
        assert val_loss_at(run_dir, 1) == pytest.approx(summary(sft_run)["final_val_loss"], abs=1e-5), strategy
    assert results[str(tmp_path / "full_fsdp")]["kinds"]["num_dtensor"] > 0  # really sharded
    assert_same_tensors(load_file(full / "final" / "model.safetensors"),
                        load_file(tmp_path / "full_fsdp" / "final" / "model.safetensors"))
    assert val_loss_at(tmp_path / "full_fsdp", 1) == pytest.approx(summary(full)["final_val_loss"], abs=1e-5)


# ------------------------------------------------------------------------------------------------ refusals


def test_what_cannot_start_from_the_run_is_refused_in_one_sentence(sft_run, tmp_path):
    def refusal(*overrides: str) -> str:
        given = [f"init_from={sft_run}", *overrides]
        with pytest.raises(ConfigError) as error:
            starting_config(compose(given), given)
        return str(error.value)

    assert "its adapter has peft.r=8 and this run asks peft.r=16" in refusal("peft.r=16")
    assert "its adapter has peft.alpha=32 and this run asks peft.alpha=8" in refusal("peft.alpha=8")
    assert "peft.target_modules=[q_proj,v_proj]" in refusal("peft.target_modules=[q_proj,v_proj]")
    assert "holds a LoRA adapter, which peft=full cannot start from: merge it first" in refusal("peft=full")
    assert f"init_from={sft_run} trained model=tiny and this command composes model=smollm2_135m: add model=tiny" in \
        refusal("model=smollm2_135m")
    assert "model.tiny.hidden_size=64 would load another: leave it out" in refusal("model.tiny.hidden_size=64")
    assert "model.path=/elsewhere would load another" in refusal("model.path=/elsewhere")
    assert "leave objective.precompute_reference=false out" in refusal("objective=dpo", "data=preferences_sample",
                                                                     "objective.precompute_reference=false")
    # how it runs may change; what it loads comes from the run
    given = [f"init_from={sft_run}", "peft.dropout=0.1", "model.max_seq_len=128", "train.lr=1e-3"]
    cfg, line = starting_config(compose(given), given)
    assert (cfg.peft.r, cfg.peft.dropout, cfg.model.max_seq_len, cfg.train.lr) == (8, 0.1, 128, 1e-3)
    assert cfg.model.path == str(sft_run / "base_model") and line.startswith("init_from: this run starts from")

    # as a user meets them: exit code 2, one line, nothing created
    nowhere = run_llmft("launch", f"init_from={tmp_path / 'nowhere'}", f"run_dir={tmp_path / 'a'}")
    assert nowhere.returncode == 2 and len(nowhere.stderr.strip().splitlines()) == 1, nowhere.stderr
    assert "is not a run directory (no config.yaml" in nowhere.stderr and not (tmp_path / "a").exists()
    unfinished = tmp_path / "unfinished"
    assert run_llmft("launch", "launch.prepare_only=true", f"run_dir={unfinished}").returncode == 0
    result = run_llmft("launch", f"init_from={unfinished}", "launch.prepare_only=true", f"run_dir={tmp_path / 'b'}")
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert f"init_from={unfinished} has no final model" in result.stderr
    assert f"python -m llmft.launch resume={unfinished}" in result.stderr


# ------------------------------------------------------------------------------------------------ from-eval


def test_from_eval_prints_commands_that_start_from_the_run(sft_run, tmp_path):
    """The commands `llmft data from-eval RUN_DIR` prints after writing the pairs and the KTO examples launch as
    printed (their run directory made, prepare_only), and start from the evaluated run."""
    verdicts = ["incorrect", "correct", "incorrect", "partially correct", "correct", "incorrect"] * 2
    samples = [{"id": f"t{i}", "source": "tickets", "prompt": [{"role": "user", "content": f"My job {i} is pending."}],
                "reference": "Your job waits for nodes: squeue --start shows when it starts.",
                "finetuned": {"output": "Reboot." if verdict == "incorrect" else "It waits for nodes.",
                              "stopped": True, "judge": {"verdict": verdict, "reason": "compared"}}}
               for i, verdict in enumerate(verdicts)]
    (sft_run / "eval").mkdir(exist_ok=True)
    (sft_run / "eval" / "report.json").write_text(json.dumps({"samples": samples}))
    result = run_llmft("data", "from-eval", str(sft_run), timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    commands = [line.split("train on them from this run with: ", 1)[1] for line in result.stdout.splitlines()
                if "train on them from this run with: " in line]
    pairs, examples = sft_run / "eval" / "preferences.jsonl", sft_run / "eval" / "kto.jsonl"
    assert commands == [
        f"python -m llmft.launch objective=dpo data=preference_jsonl data.path={pairs} init_from={sft_run}",
        f"python -m llmft.launch objective=kto data=kto_jsonl data.path={examples} init_from={sft_run}"]
    for index, command in enumerate(commands):
        run_dir = tmp_path / f"run{index}"
        launched = subprocess.run([sys.executable, "-m", "llmft.launch", *shlex.split(command)[3:],
                                   "launch.prepare_only=true", f"run_dir={run_dir}"], cwd=REPO, capture_output=True,
                                  text=True, timeout=120)
        assert launched.returncode == 0, launched.stderr[-3000:]
        assert f"init_from: this run starts from {sft_run}" in launched.stdout
        assert json.loads((run_dir / "provenance.json").read_text())["init_from"]["run_dir"] == str(sft_run)
