"""Preference tuning (objective=dpo|kto, training/objectives.py): the loss against TRL's DPOTrainer on the same batch
and model, a DPO run from the bundled pairs (ln 2 at the first step, then the loss falls and the reward accuracy
rises), a signal and resume that ends bitwise equal, the adapter reloaded with stock PEFT, KTO, full fine-tuning with
precomputed reference log-probabilities, and the same DPO losses under ddp, fsdp and zero3 on 2 ranks."""

from __future__ import annotations

import copy
import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from llmft.config.compose import compose
from llmft.config.validation import validate
from llmft.data.tokenize.templating import IGNORE_INDEX, Sample
from llmft.errors import ConfigError
from llmft.training import loss as supervised_loss
from llmft.training import objectives
from support.runs import REPO, read_metrics, run_llmft, wait_for_step

DPO = ["objective=dpo", "data=preferences_sample", "model.max_seq_len=384", "train.log_every=1",
       "train.micro_batch_size=4", "peft.dropout=0"]


# ------------------------------------------------------------------------------------------------ against TRL


def tiny_peft_model(vocab: int):
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, use_cache=False)
    base = LlamaForCausalLM(config)
    lora = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"], lora_dropout=0.0)
    return base, lora, get_peft_model(copy.deepcopy(base), lora)


def pairs_of(examples):
    from llmft.data.preferences.dpo_kto import PreferencePair

    def sample(prompt, completion):
        return Sample(input_ids=prompt + completion, labels=[IGNORE_INDEX] * len(prompt) + completion)

    return [PreferencePair(chosen=sample(e["prompt_ids"], e["chosen_ids"]),
                           rejected=sample(e["prompt_ids"], e["rejected_ids"]), prompt_length=len(e["prompt_ids"]))
            for e in examples]


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo"])
def test_dpo_loss_and_lora_gradients_equal_trl_dpo_trainer(tmp_path, loss_type):
    import trl  # test-only dependency, in the dev extra: a missing trl fails here rather than skipping
    from datasets import Dataset
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast
    from trl.trainer.dpo_trainer import DataCollatorForPreference

    vocab = 96
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(
        {f"t{i}": i for i in range(vocab)}, unk_token="t0")), pad_token="t0", eos_token="t1")
    tokenizer.chat_template = "{% for m in messages %}{{ m['content'] }} {% endfor %}"
    base, lora, _ = tiny_peft_model(vocab)
    dataset = Dataset.from_list([{"prompt": [{"role": "user", "content": "t5 t6"}],
                                  "chosen": [{"role": "assistant", "content": "t7"}],
                                  "rejected": [{"role": "assistant", "content": "t8"}]}] * 2)
    args = trl.DPOConfig(output_dir=str(tmp_path / "trl"), beta=0.2, loss_type=[loss_type], report_to="none",
                         use_cpu=True, per_device_train_batch_size=2, bf16=False)
    trainer = trl.DPOTrainer(model=copy.deepcopy(base), args=args, train_dataset=dataset, processing_class=tokenizer,
                             peft_config=lora)
    policy = trainer.model  # a fresh adapter: the reference is the model with it disabled, as in llmft
    with torch.no_grad():  # an adapter that already moved, or policy == reference and the test is weak
        for name, param in policy.named_parameters():
            if "lora_" in name:
                param.normal_(0.0, 0.05, generator=torch.Generator().manual_seed(len(name)))

    generator = torch.Generator().manual_seed(1)

    def ids(n):
        return torch.randint(2, vocab, (n,), generator=generator).tolist()

    examples = [{"prompt_ids": ids(9), "chosen_ids": ids(5), "rejected_ids": ids(7)},
                {"prompt_ids": ids(4), "chosen_ids": ids(11), "rejected_ids": ids(3)},
                {"prompt_ids": ids(13), "chosen_ids": ids(2), "rejected_ids": ids(6)}]
    policy.train()
    trl_loss = trainer._compute_loss(policy, DataCollatorForPreference(pad_token_id=0)(examples), False)
    trl_loss.backward()
    trl_grads = {n: p.grad.clone() for n, p in policy.named_parameters() if p.requires_grad}

    from peft import get_peft_model

    ours = get_peft_model(copy.deepcopy(base), lora)
    ours.load_state_dict({n: p.detach() for n, p in policy.state_dict().items()}, strict=False)
    for name, param in ours.named_parameters():  # the same adapter weights
        if "lora_" in name:
            assert torch.equal(param, dict(policy.named_parameters())[name]), name
    assert supervised_loss.install(ours.get_base_model(), "chunked", "cpu") == "chunked"
    cfg = OmegaConf.create({"beta": 0.2, "loss": loss_type, "label_smoothing": 0.0})
    cfg = OmegaConf.merge(OmegaConf.structured(objectives_config()), cfg)
    objective = objectives.DirectPreferenceOptimization(cfg, ours, 0, None, lambda t: t, True, True,
                                                        torch.device("cpu"))
    items = pairs_of(examples)
    batch = objective.micro_batch(items, [0, 1, 2], 0, 1)
    loss_sum, sums = objective.loss(ours, batch)
    (loss_sum / batch.count).backward()
    assert float(loss_sum / batch.count) == pytest.approx(float(trl_loss), abs=1e-5)
    assert abs(float(loss_sum / batch.count) - math.log(2)) > 1e-3  # the adapter moved the policy
    checked = 0
    for name, param in ours.named_parameters():
        if param.requires_grad:
            expected = trl_grads[name]
            assert expected.abs().sum() > 0, name
            assert (param.grad - expected).abs().max() <= 1e-5 * max(1.0, float(expected.abs().max())), name
            checked += 1
    assert checked == len(trl_grads) > 0


def objectives_config():
    from llmft.config.schema import ObjectiveConfig

    return ObjectiveConfig


# ------------------------------------------------------------------------------------------------ configuration


def test_objectives_are_checked_against_the_data_and_the_method():
    with pytest.raises(ConfigError, match=r"objective=dpo trains on data.format=preference_jsonl"):
        validate(compose(["objective=dpo"]))
    with pytest.raises(ConfigError, match=r"add objective=dpo"):
        validate(compose(["data=preferences_sample"]))
    with pytest.raises(ConfigError, match=r"objective.beta=0.0 must be positive"):
        validate(compose(DPO + ["objective.beta=0"]))
    with pytest.raises(ConfigError, match=r"objective.precompute_reference=true"):
        validate(compose(DPO + ["peft=full", "objective.precompute_reference=false"]))
    with pytest.raises(ConfigError, match=r"train.micro_batch_size=1 x 1 rank\(s\) must be at least 2"):
        validate(compose(["objective=kto", "data=kto_sample", "train.micro_batch_size=1"]))
    with pytest.raises(ConfigError, match=r"label_smoothing applies to objective.loss=sigmoid only"):
        validate(compose(DPO + ["objective.loss=ipo", "objective.label_smoothing=0.1"]))
    validate(compose(DPO))
    validate(compose(["objective=kto", "data=kto_sample"]))


# ------------------------------------------------------------------------------------------------ runs


def start(run_dir: Path, overrides: list[str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "llmft.launch", *overrides, f"run_dir={run_dir}"], cwd=REPO,
                            env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)




@pytest.mark.slow
def test_a_dpo_run_learns_the_preferences_and_resumes_bitwise(tmp_path):
    """30 steps on the bundled pairs: ln 2 at the first step (a fresh adapter: policy == reference), then the loss
    falls and the reward accuracy rises. The same run stopped by a signal and resumed ends with the same adapter, bit
    for bit; the adapter loads with stock PEFT; `llmft runs` shows the rewards."""
    run = DPO + ["train.max_steps=30", "train.eval_every=15", "train.save_every=0", "train.lr=2e-3"]
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    whole_process, cut_process = start(whole, run), start(cut, run)
    wait_for_step(cut, 6, cut_process)
    cut_process.send_signal(signal.SIGUSR2)
    out, err = cut_process.communicate(timeout=300)
    assert cut_process.returncode == 3, out[-2000:] + err[-3000:]
    resumed = subprocess.Popen([sys.executable, "-m", "llmft.launch", f"resume={cut}"], cwd=REPO, text=True,
                               env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE)  # while the whole run trains on (one process each)
    out, err = whole_process.communicate(timeout=600)
    assert whole_process.returncode == 0, out[-2000:] + err[-3000:]
    out, err = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, out[-2000:] + err[-3000:]

    records = [r for r in read_metrics(whole) if "loss" in r]
    assert len(records) == 30
    assert records[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert records[0]["reward_margin"] == pytest.approx(0.0, abs=1e-6)
    first, last = records[:5], records[-5:]
    mean = lambda rs, key: sum(r[key] for r in rs) / len(rs)  # noqa: E731
    assert mean(last, "loss") < mean(first, "loss") - 0.05, [r["loss"] for r in records]
    assert mean(last, "reward_accuracy") > mean(first, "reward_accuracy") + 0.2, \
        [r["reward_accuracy"] for r in records]
    assert mean(last, "reward_margin") > 0
    validation = [r for r in read_metrics(whole) if "val_loss" in r]
    assert [r["step"] for r in validation] == [15, 30] and "val_reward_accuracy" in validation[-1]

    from safetensors.torch import load_file

    expected, got = (load_file(d / "final/adapter_model.safetensors") for d in (whole, cut))
    assert expected.keys() == got.keys()
    for name in expected:
        assert torch.equal(expected[name], got[name]), name

    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    summary = json.loads((whole / "summary.json").read_text())
    base = AutoModelForCausalLM.from_pretrained(summary["base_model_path"])
    reloaded = PeftModel.from_pretrained(base, whole / "final")
    assert any(float(p.abs().sum()) > 0 for n, p in reloaded.named_parameters() if "lora_B" in n)

    listing = run_llmft("runs", f"runs_root={tmp_path}")
    assert listing.returncode == 0, listing.stderr
    assert "rewards: reward_accuracy=" in listing.stdout


@pytest.mark.slow
def test_kto_and_full_fine_tuning_with_precomputed_reference(tmp_path):
    """KTO on the bundled good/bad answers trains (ln-free start: its loss starts at 0.5 per example with a fresh
    adapter and KL 0); DPO with full fine-tuning computes the reference log-probabilities once, before the first
    step, into the run directory (first loss ln 2)."""
    full = tmp_path / "full"
    # the two runs at once (one process each)
    kto = start(tmp_path / "kto", ["objective=kto", "data=kto_sample", "model.max_seq_len=384", "train.max_steps=8",
                                   "train.log_every=1", "train.micro_batch_size=4", "train.lr=2e-3", "peft.dropout=0"])
    run = start(full, [*DPO, "peft=full", "train.max_steps=3", "train.save_every=0", "train.lr=1e-4"])
    kto_out, kto_err = kto.communicate(timeout=600)
    assert kto.returncode == 0, kto_out[-2000:] + kto_err[-3000:]
    records = [r for r in read_metrics(tmp_path / "kto") if "loss" in r]
    assert records[0]["loss"] == pytest.approx(0.5, abs=1e-6)  # 1 - sigmoid(0) for every example
    assert records[0]["kl"] == pytest.approx(0.0, abs=1e-6)
    assert sum(r["loss"] for r in records[-3:]) / 3 < 0.5 - 0.01, [r["loss"] for r in records]
    assert sum(r["reward_margin"] for r in records[-3:]) > 0

    out, err = run.communicate(timeout=600)
    assert run.returncode == 0, out[-2000:] + err[-3000:]
    assert "reference: log-probabilities of" in out and (full / "reference_logps.pt").exists()
    records = [r for r in read_metrics(full) if "loss" in r]
    assert records[0]["loss"] == pytest.approx(math.log(2), abs=1e-5)
    assert records[-1]["reward_accuracy"] >= 0.5


@pytest.mark.slow
def test_dpo_losses_are_the_same_under_ddp_fsdp_and_zero3(tmp_path):
    """2 ranks of 2 pairs under each strategy against one process of 4 pairs: the same DPO loss at every step (1e-4)
    and the same reward accuracy."""
    from support.torchrun import train_ranks_batch

    run = DPO + ["train.max_steps=4", "train.eval_every=4", "train.save_every=0", "train.lr=2e-3"]
    single = start(tmp_path / "single", [*run, "train.micro_batch_size=4"])  # overlaps with the 2-rank runs
    strategies = ["ddp", "fsdp", "zero3"]
    train_ranks_batch(2, {tmp_path / s: run + [f"parallelism={s}", "train.micro_batch_size=2"] for s in strategies})
    out, err = single.communicate(timeout=600)
    assert single.returncode == 0, out[-2000:] + err[-3000:]
    expected = [r for r in read_metrics(tmp_path / "single") if "loss" in r]
    for strategy in strategies:
        got = [r for r in read_metrics(tmp_path / strategy) if "loss" in r]
        assert len(got) == len(expected) == 4, strategy
        for mine, theirs in zip(got, expected):
            assert mine["loss"] == pytest.approx(theirs["loss"], abs=1e-4), (strategy, mine["step"])
            assert mine["reward_accuracy"] == pytest.approx(theirs["reward_accuracy"], abs=1e-6), strategy


def test_plan_counts_two_sequences_per_example_and_the_reference_forward():
    from llmft.launch.estimate import estimate

    def memory(*overrides):
        return estimate(compose(["model=llama3_8b", *overrides]), 1, 80).memory

    sft = memory()
    dpo = memory("objective=dpo", "data=preferences_sample")
    assert dpo["activations"] > 1.5 * sft["activations"] and "reference_forward" not in sft
    assert dpo["reference_forward"] > 0  # LoRA: the adapter disabled, one forward without gradients
    full = memory("objective=dpo", "data=preferences_sample", "peft=full", "parallelism=fsdp")
    assert "reference_forward" not in full  # full fine-tuning: log-probabilities computed before training
