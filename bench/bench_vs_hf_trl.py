#!/usr/bin/env python3
"""llmft against the tools people would pick instead, on a Llama-3.2-1B-shaped model or on the real SmolLM2-135M:
supervised tokens/s and peak RSS.

    python bench/bench_vs_hf_trl.py [--layers 2] [--steps 4] [--quick] [--llmft-root DIR]
    python bench/bench_vs_hf_trl.py --model smollm2 [--steps 24] [--model-path DIR]

Needs `trl` (pip install trl; it leaves torch and transformers as they are). CPU, fp32. Sized for about 15 minutes
on a quiet 2-core machine: 4 steps of 2,048-token rows per contender, a 128,256-id output layer (BENCHMARKS.md has
the measured times). `--quick` is a smoke run: a narrow 1-layer body, the same vocabulary, 3 steps.

`--model smollm2`: a deep, narrow, real model instead, where most of the time is in the layers, not the head:
SmolLM2-135M-Instruct's folder (`python -m llmft.models get smollm2-135m-instruct`; 30 layers, hidden 576, 9 heads /
3 KV heads, a 49,152-id tied head, its pretrained weights in fp32) with its own tokenizer and chat template, trained
as llmft's profile for it trains it (model=smollm2_135m: max_seq_len 512, train=small: AdamW lr 1e-3, 3 warmup
steps, clip 1.0; LoRA r=16 on every linear layer but the head), about 10 minutes in all. The conversations:
`--steps` groups of 2 tickets that fit a 512-token row together, taken in the seeded order
(`conversations_in_groups`: two tickets of this tokenizer fill most of a row, so the 1B shape's "first N" rarely
packs into exactly N / 2 rows); llmft packs each group into one row, HF gets batches of 2 conversations padded to
the longer, TRL packs them itself. HF and TRL read the folder's template with `{% generation %}` markers added around
each reply and its `<|im_end|>` (their assistant masks need them; `SMOLLM2_TEMPLATE_WITH_GENERATION`), checked to
render every ticket to the same text as the folder's own. The step-overhead run (model=tiny) is the 1B run's.
Everything below holds for both shapes but where it names the 1B shape's sizes.

The model. Llama-3.2-1B's shape (vocabulary 128,256, hidden 2,048, intermediate 8,192, 32 heads / 8 KV heads,
head_dim 64, llama3 RoPE, tied embeddings) with `--layers` decoder layers instead of 16, random weights (seed 0,
initializer_range 0.02), float32, saved once with `save_pretrained` and loaded by every contender with
`AutoModelForCausalLM.from_pretrained(dtype=float32)` (SDPA attention). There is no Hugging Face Hub here: the
tokenizer is a byte-level BPE trained on the bundled tickets (`train_tiny_tokenizer`, ChatML special tokens and
llmft's ChatML template, whose `{% generation %}` block covers each reply and its `<|im_end|>`). The BPE stops at
about 5.4k ids on this little text; ids from there to 128,255 exist in the model and are never fed, but every
logit row still spans the 128,256 ids, so the output layer costs what Llama-3.2-1B's does.

The data. The bundled tickets (`data=tickets_sample`), read and cleaned by llmft once, shuffled with seed 0; the
script takes the first N = steps * B conversations, with B the largest batch for which llmft's best-fit packing
makes exactly `steps` rows of max_seq_len (2,048) tokens. Those N conversations go to every contender as one chat
JSONL file; each trains one epoch over them in exactly `steps` optimizer steps, so all three see the same samples and
train on the same supervised tokens (the table's "sup. all steps" column checks it; a mismatch is flagged).
LoRA and optimizer are llmft's own settings for model=llama3_2_1b, read from its config and given to HF and TRL:
peft=lora (today r=16, alpha=32, dropout 0.05 on q,k,v,o,gate,up,down) and train=default (AdamW lr 2e-4, 20
warmup steps, clip 1.0, seed 0); no gradient accumulation, no activation checkpointing (`--activation-checkpointing`
turns it on for all three), fp32 (no autocast).

The contenders, each in its own fresh process (so each one's peak is its own):
- llmft: `llmft.training.loop.train` in-process, model=llama3_2_1b with model.path=the random model,
  model.dtype=float32, model.max_seq_len=2048, data.path=the N conversations, data.validation_fraction=0,
  micro-batch 1 packed row of 2,048 tokens per step, everything else llmft's defaults (train=default).
- HF Trainer: `transformers.Trainer` on the conversations tokenized by `apply_chat_template(...,
  return_assistant_tokens_mask=True)`, labels -100 outside the assistant masks, batches of B conversations padded
  to the longest by `DataCollatorForSeq2Seq` (label pad -100): what a Trainer user writes.
- TRL: `trl.SFTTrainer` on the same conversations as a conversational dataset ({"messages": [...]}), with
  `SFTConfig(packing=True, assistant_only_loss=True, max_length=2048, per_device_train_batch_size=1)` and
  `peft_config=LoraConfig(...)`: TRL's documented way for conversations (its `packing_strategy="bfd"` default turns
  padding-free on: each step is one row of packed conversations, flattened, positions restarting per conversation;
  TRL computes the loss with its chunked "fused LM head"). assistant_only_loss needs `{% generation %}` markers,
  which the template has (TRL warns when the end-of-turn token is outside them; it is inside). completion_only_loss
  would need a prompt-completion dataset, one row per assistant turn, which repeats the context of multi-turn
  conversations: not the same samples, so not used. TRL's own defaults that differ from the Trainer's
  (gradient_checkpointing=True, bf16=True) are set like the other two: off, fp32. TRL's docs say packing is meant
  for FlashAttention; on CPU the packed row runs SDPA with the block-diagonal mask transformers builds from the
  restarting position ids, the same mechanism llmft's packed rows use. On a CPU TRL's fused head runs its torch
  fallback: every position scored, not only the supervised ones (that needs its Triton kernel: CUDA or XPU), each
  [4096 x 32768] logits tile walked by several elementwise passes, and recomputed in backward. So the figure against
  TRL measures TRL's CPU path; it says little about TRL on a GPU.

What is timed. Each contender's steps are stamped when an optimizer step ends (llmft: `Trainer.train_step`
returns; HF and TRL: `on_step_end`, after optimizer, scheduler and zero_grad). The timed window runs from the end of
step 1 (the warmup step, excluded alike for all) to the end of the last step: it holds steps 2..S whole (fetching
and collating the batch, forward, loss, backward, clipping, optimizer) and whatever each tool does between steps
(logging, callbacks). Model build and load, tokenization, packing and the final save are outside it. Supervised
tokens are counted from each step's batch as each tool hands it to its model: labels != -100 after the shift
(labels[:, 1:]), summed over steps 2..S; "positions" are the batch's token slots, padding included.
supervised tokens/s = those tokens / that window. Peak memory: the contender's process's resident high-water mark
(VmHWM) over its whole life, model load included (the fp32 weights, ~1.5 GB at 2 layers, are in every figure).
VmHWM rather than ru_maxrss: Linux carries the parent's high-water mark across fork+exec into ru_maxrss. llmft
resets VmHWM itself (its per-interval memory figure writes /proc/self/clear_refs); in its process each reset first
folds the mark so far into the peak, so llmft's figure is its whole-process peak like the others'.

Step overhead. A separate process runs llmft's default local run (model=tiny, train=debug: 8 packed rows of 256
tokens per step) for `--overhead-steps` steps with Trainer.forward_backward, Strategy.backward, Strategy.step,
Trainer.next_micro_batch and Trainer.log_metrics wrapped by timers (monkeypatched in that process only, llmft's code
untouched). From the end of step 1 to the end of the last, minus validation and checkpoint time (periodic work,
printed apart): overhead = the time outside forward (loss included), backward and optimizer step, as a share of
the step time. On a CPU there is no device to wait for, so "synchronisation" is not exercised here. The share
depends on the load: other processes slow the 2-thread compute far more than the one-thread host work, so a loaded
machine understates it. The per-step CPU time of collation and logging (time.thread_time) is printed too: it does
not depend on the load, and against a quiet machine's step time it gives the quiet share.

The last line is `ratios: tokens_per_s_vs_hf=X peak_memory_vs_hf=Y tokens_per_s_vs_trl=Z peak_memory_vs_trl=W`
(llmft / HF and llmft / TRL).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
IGNORE_INDEX = -100

# Llama-3.2-1B's published config.json, but for the number of layers (an option).
LLAMA_3_2_1B = dict(
    vocab_size=128_256, hidden_size=2048, intermediate_size=8192, num_attention_heads=32, num_key_value_heads=8,
    head_dim=64, tie_word_embeddings=True, max_position_embeddings=131_072, rms_norm_eps=1e-5,
    initializer_range=0.02,
    rope_parameters={"rope_type": "llama3", "rope_theta": 500_000.0, "factor": 32.0, "high_freq_factor": 4.0,
                     "low_freq_factor": 1.0, "original_max_position_embeddings": 8192},
)
# --quick: the same vocabulary (the output layer is the point), a narrow body.
QUICK_SHAPE = {**LLAMA_3_2_1B, "hidden_size": 256, "intermediate_size": 1024, "num_attention_heads": 4,
               "num_key_value_heads": 2}

SEED = 0

# --model: the llmft model profile each shape trains as (conf/model/), whose LoRA and optimizer settings all use
LLMFT_MODEL = {"llama-3.2-1b": "llama3_2_1b", "smollm2": "smollm2_135m"}
SMOLLM2_STEPS = 24  # about 10 minutes for the three contenders on a quiet 2-core machine (BENCHMARKS.md)

# SmolLM2-135M-Instruct's own chat template (the folder's chat_template.jinja: ChatML, a default system prompt) with
# `{% generation %}` around each reply and its <|im_end|>, which HF's assistant masks and TRL's assistant_only_loss
# need; the same text for every conversation (child_prepare checks it on every ticket).
SMOLLM2_TEMPLATE_WITH_GENERATION = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}{% if message['role'] == 'assistant' %}{{ '<|im_start|>assistant\n' }}{% generation %}"
    "{{ message['content'] + '<|im_end|>' }}{% endgeneration %}{{ '\n' }}"
    "{% else %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def peak_rss_mb() -> float:
    """This process's resident high-water mark (VmHWM), in MB."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


class ProcessPeak:
    """The process's peak RSS since it started, kept across the resets of VmHWM that llmft does itself (its
    MemoryMeter and its load figure write /proc/self/clear_refs to start a new high-water mark)."""

    def __init__(self):
        self.folded = 0.0

    def fold(self) -> None:
        self.folded = max(self.folded, peak_rss_mb())

    def peak_mb(self) -> float:
        self.fold()
        return self.folded

    def guard_llmft_resets(self) -> int:
        """Fold the high-water mark in before each of llmft's resets; returns how many names were wrapped."""
        from llmft.training import metrics

        original = metrics.reset_peak_resident

        def reset_peak_resident():
            self.fold()
            original()

        wrapped = 0
        for module in list(sys.modules.values()):
            if getattr(module, "__name__", "").startswith("llmft") and \
                    getattr(module, "reset_peak_resident", None) is original:
                module.reset_peak_resident = reset_peak_resident
                wrapped += 1
        return wrapped


PEAK = ProcessPeak()


def supervised_targets(labels) -> int:
    """Tokens that carry a loss in a batch: labels != -100 after the next-token shift."""
    return int((labels[:, 1:] != IGNORE_INDEX).sum())


def read_chat_jsonl(path: Path) -> list[list[dict]]:
    return [json.loads(line)["messages"] for line in path.read_text().splitlines() if line.strip()]


class StepRecorder:
    """Per optimizer step: the time it ended, its supervised tokens and positions; the first step's loss."""

    def __init__(self):
        self.step_ends: list[float] = []
        self.supervised: list[int] = []
        self.positions: list[int] = []
        self.first_loss: float | None = None

    def batch(self, labels) -> None:
        """A micro-batch of the step under way (counted when its step begins, so len == steps started)."""
        if len(self.supervised) == len(self.step_ends):
            self.supervised.append(0)
            self.positions.append(0)
        self.supervised[-1] += supervised_targets(labels)
        self.positions[-1] += labels.numel()

    def step_end(self) -> None:
        self.step_ends.append(time.perf_counter())

    def result(self, name: str, **extra) -> dict:
        steps = len(self.step_ends)
        if steps < 2:
            raise RuntimeError(f"{name}: {steps} optimizer step(s); the timing needs at least 2")
        return {
            "name": name,
            "steps": steps,
            "timed_steps": steps - 1,
            "timed_seconds": self.step_ends[-1] - self.step_ends[0],
            "timed_supervised": sum(self.supervised[1:steps]),
            "timed_positions": sum(self.positions[1:steps]),
            "supervised_all_steps": sum(self.supervised[:steps]),
            "positions_per_step": sum(self.positions[:steps]) / steps,
            "step_seconds": [b - a for a, b in zip(self.step_ends, self.step_ends[1:])],
            "first_loss": self.first_loss,
            "peak_rss_mb": PEAK.peak_mb(),
            **extra,
        }


# ------------------------------------------------------------------------------------------------ children


def child_prepare(setup: dict) -> dict:
    """The tokenizer, the model and the conversations every contender trains on."""
    sys.path.insert(0, setup["llmft_root"])
    from llmft.config.compose import compose
    from llmft.data.prepare.reading import read_conversations
    from llmft.data.tokenize.templating import tokenize_many

    work, steps, max_seq_len = Path(setup["work"]), setup["steps"], setup["max_seq_len"]
    # llmft's own settings for this model, which HF and TRL then copy: LoRA (peft=lora) and optimizer (the train=
    # profile the model selects: train=default for llama3_2_1b, train=small for smollm2_135m)
    cfg = compose([f"model={LLMFT_MODEL[setup['model']]}"])
    lora = {"r": cfg.peft.r, "lora_alpha": cfg.peft.alpha, "lora_dropout": cfg.peft.dropout,
            "target_modules": list(cfg.peft.target_modules or cfg.model.lora_target_modules)}
    optimizer = {"learning_rate": cfg.train.lr, "warmup_steps": cfg.train.warmup_steps,
                 "weight_decay": cfg.train.weight_decay, "adam_beta1": cfg.train.adam_beta1,
                 "adam_beta2": cfg.train.adam_beta2, "max_grad_norm": cfg.train.max_grad_norm, "seed": cfg.train.seed}
    conversations, _ = read_conversations(cfg.data)  # data=tickets_sample, cleaned and scrubbed by llmft
    if setup["model"] == "smollm2":
        model = smollm2_files(setup, cfg, conversations, work)
    else:
        model = random_llama_files(setup, conversations, work)
    tokenizer = model.pop("tokenizer")
    hf_tokenizer = model.pop("hf_tokenizer")

    order = list(range(len(conversations)))
    random.Random(SEED).shuffle(order)
    samples = tokenize_many(tokenizer, [c.messages for c in conversations])
    if setup["model"] == "smollm2":
        batch, picked = conversations_in_groups(samples, order, steps, max_seq_len)
    else:
        batch, picked = first_conversations_that_pack(samples, order, steps, max_seq_len)
    subset_path = work / "conversations.chat.jsonl"
    subset_path.write_text("".join(json.dumps({"messages": conversations[i].messages}) + "\n" for i in picked))
    # llmft tokenizes turn by turn; HF and TRL render the whole conversation: the same ids and masks?
    same = 0
    for i in picked:
        whole = hf_tokenizer.apply_chat_template(conversations[i].messages, tokenize=True, return_dict=True,
                                                 return_assistant_tokens_mask=True)
        labels = [t if m else IGNORE_INDEX for t, m in zip(whole["input_ids"], whole["assistant_masks"])]
        same += whole["input_ids"] == samples[i].input_ids and labels[1:] == samples[i].labels[1:]
    return {
        **model,
        "lora": lora,
        "optimizer": optimizer,
        "subset_path": str(subset_path),
        "num_conversations_bundled": len(conversations),
        "num_conversations": len(picked),
        "hf_batch_size": batch,
        "tokenizer_size": len(tokenizer),
        "subset_tokens": sum(len(samples[i].input_ids) for i in picked),
        "subset_supervised": sum(sum(1 for t in samples[i].labels[1:] if t != IGNORE_INDEX) for i in picked),
        "tokenizations_agree": same,
    }


def random_llama_files(setup: dict, conversations, work: Path) -> dict:
    """The Llama-3.2-1B-shaped model with random weights and a BPE trained on the tickets, saved in one folder."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from llmft.data.tokenize.tokenizer import train_tiny_tokenizer

    tokenizer = train_tiny_tokenizer([m["content"] for c in conversations for m in c.messages], 32_000)
    model_dir = work / "model"
    tokenizer.save_pretrained(model_dir)
    shape = {**(QUICK_SHAPE if setup["quick"] else LLAMA_3_2_1B), "num_hidden_layers": setup["layers"]}
    config = LlamaConfig(**shape, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(SEED)
    model = LlamaForCausalLM(config)
    model.save_pretrained(model_dir)
    return {"tokenizer": tokenizer, "hf_tokenizer": tokenizer, "model_dir": str(model_dir),
            "tokenizer_dir": str(model_dir), "num_parameters": sum(p.numel() for p in model.parameters()),
            "shape": {k: v for k, v in shape.items() if k != "rope_parameters"}}


def smollm2_files(setup: dict, cfg, conversations, work: Path) -> dict:
    """The SmolLM2-135M-Instruct folder as it is, for every contender; for HF and TRL a copy of its tokenizer whose
    template carries `{% generation %}` markers around each reply and its `<|im_end|>` (what their assistant masks
    need), checked to render every conversation exactly as the folder's own template does."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from llmft.data.tokenize.tokenizer import load_tokenizer

    model_dir = Path(setup["model_path"] or cfg.model.path).expanduser()
    if not (model_dir / "config.json").exists():
        raise SystemExit(f"{model_dir} is not the SmolLM2-135M-Instruct folder: run python -m llmft.models get "
                         f"smollm2-135m-instruct, or pass --model-path")
    tokenizer = load_tokenizer(str(model_dir), cfg.model.fallback_chat_template)
    hf_tokenizer = load_tokenizer(str(model_dir), cfg.model.fallback_chat_template)
    hf_tokenizer.chat_template = SMOLLM2_TEMPLATE_WITH_GENERATION
    for conversation in conversations:
        if hf_tokenizer.apply_chat_template(conversation.messages, tokenize=False) != \
                tokenizer.apply_chat_template(conversation.messages, tokenize=False):
            raise SystemExit(f"{model_dir}'s chat template renders the tickets otherwise than SmolLM2-135M-Instruct's "
                             f"with generation markers (bench_vs_hf_trl.SMOLLM2_TEMPLATE_WITH_GENERATION): is it "
                             f"that model's folder?")
    tokenizer_dir = work / "tokenizer"
    hf_tokenizer.save_pretrained(tokenizer_dir)
    config = AutoConfig.from_pretrained(model_dir, local_files_only=True)
    with torch.device("meta"):
        num_parameters = sum(p.numel() for p in AutoModelForCausalLM.from_config(config).parameters())
    shape = {key: getattr(config, key) for key in ("vocab_size", "hidden_size", "intermediate_size",
                                                   "num_attention_heads", "num_key_value_heads", "head_dim",
                                                   "num_hidden_layers", "tie_word_embeddings")}
    return {"tokenizer": tokenizer, "hf_tokenizer": hf_tokenizer, "model_dir": str(model_dir),
            "tokenizer_dir": str(tokenizer_dir), "num_parameters": num_parameters, "shape": shape}


def first_conversations_that_pack(samples, order, steps: int, max_seq_len: int) -> tuple[int, list[int]]:
    """The first N = steps * B conversations of the seeded order, B the largest batch that packs into `steps` rows."""
    from llmft.data.tokenize.packing import pack_best_fit

    for batch in range(len(samples) // steps, 0, -1):
        picked = order[: steps * batch]
        if len(pack_best_fit([samples[i] for i in picked], max_seq_len)) == steps:
            return batch, picked
    raise SystemExit(f"no subset of the bundled tickets packs into exactly {steps} rows of {max_seq_len} tokens; "
                     f"try another --steps")


def conversations_in_groups(samples, order, steps: int, max_seq_len: int, batch: int = 2) -> tuple[int, list[int]]:
    """`steps` groups of `batch` conversations that fit one row together, taken in the seeded order (each into the
    open group it fits most tightly, a new group when none), with a token of room per conversation (an end token a
    tool may append). Rows of 512 tokens hold about two tickets of SmolLM2's tokenizer, so the first N of the order
    (the 1B shape's rule) rarely pack into exactly N / 2 rows; these do, and best-fit packing is checked to agree."""
    from llmft.data.tokenize.packing import pack_best_fit

    room = max_seq_len - batch
    open_groups: list[list[int]] = []
    picked: list[int] = []
    for index in order:
        length = len(samples[index].input_ids)
        fits = [g for g in open_groups if sum(len(samples[i].input_ids) for i in g) + length <= room]
        if not fits:
            open_groups.append([index])
            continue
        group = min(fits, key=lambda g: room - sum(len(samples[i].input_ids) for i in g) - length)
        group.append(index)
        if len(group) == batch:
            open_groups.remove(group)
            picked += group
            if len(picked) == steps * batch:
                break
    if len(picked) < steps * batch or len(pack_best_fit([samples[i] for i in picked], max_seq_len)) != steps:
        raise SystemExit(f"the bundled tickets do not give {steps} rows of {batch} conversations in "
                         f"{max_seq_len} tokens; try fewer --steps")
    return batch, picked


def instrument_llmft(loop, recorder: StepRecorder) -> None:
    """Stamp the end of each optimizer step and count each micro-batch's targets (monkeypatched, this process)."""
    trainer_class = loop.Trainer
    train_step, next_micro_batch = trainer_class.train_step, trainer_class.next_micro_batch

    def timed_train_step(self, *args, **kwargs):
        result = train_step(self, *args, **kwargs)
        recorder.step_end()
        if recorder.first_loss is None and getattr(self.progress, "first_loss", None) is not None:
            recorder.first_loss = float(self.progress.first_loss)
        return result

    def counted_next_micro_batch(self, *args, **kwargs):
        batch = next_micro_batch(self, *args, **kwargs)
        recorder.batch(batch.inputs["labels"])
        return batch

    trainer_class.train_step = timed_train_step
    trainer_class.next_micro_batch = counted_next_micro_batch


def child_llmft(setup: dict) -> dict:
    sys.path.insert(0, setup["llmft_root"])
    from llmft.config.compose import compose
    from llmft.rundir import create as rundir
    from llmft.training import loop

    if not PEAK.guard_llmft_resets():
        raise RuntimeError("llmft's reset_peak_resident was not found: the peak RSS would miss llmft's own resets")
    recorder = StepRecorder()
    instrument_llmft(loop, recorder)
    cfg = compose([
        f"model={LLMFT_MODEL[setup['model']]}", f"model.path={setup['model_dir']}", "model.dtype=float32",
        f"model.max_seq_len={setup['max_seq_len']}", f"data.path={setup['subset_path']}",
        "data.validation_fraction=0", "train.micro_batch_size=1", "train.grad_accum_steps=1",
        f"train.activation_checkpointing={str(setup['activation_checkpointing']).lower()}",
        f"train.max_steps={setup['steps']}",
        f"run_dir={Path(setup['work']) / ('llmft_run' + setup['tag'])}",
    ])
    run_dir = rundir.create(cfg)
    summary = loop.train(cfg, run_dir).summary
    data = summary["data"]
    return recorder.result("llmft", rows=summary["num_train_samples"], samples=data["samples"]["train"],
                           supervised_dataset=data["supervised_tokens"]["train"])


def hf_callback(recorder: StepRecorder):
    from transformers import TrainerCallback

    class StepEnd(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            recorder.step_end()

    return StepEnd()


def count_training_steps(trainer, recorder: StepRecorder) -> None:
    """Count each micro-batch's targets as the trainer hands it to the model; keep the first step's loss."""
    training_step = trainer.training_step

    def counted(model, inputs, *args, **kwargs):
        recorder.batch(inputs["labels"])
        loss = training_step(model, inputs, *args, **kwargs)
        if recorder.first_loss is None:
            recorder.first_loss = float(loss)
        return loss

    trainer.training_step = counted


def load_base_model(setup: dict):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(setup["model_dir"], dtype=torch.float32, attn_implementation="sdpa")
    model.config.use_cache = False
    return model


def common_arguments(setup: dict, name: str) -> dict:
    ac = setup["activation_checkpointing"]
    return dict(
        output_dir=str(Path(setup["work"]) / (name + setup["tag"])), max_steps=setup["steps"],
        gradient_accumulation_steps=1,
        **setup["optimizer"], lr_scheduler_type="cosine", save_strategy="no", report_to=[], use_cpu=True,
        dataloader_num_workers=0, disable_tqdm=True, bf16=False, gradient_checkpointing=ac,
        gradient_checkpointing_kwargs={"use_reentrant": False} if ac else None,
    )


def child_hf(setup: dict) -> dict:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoTokenizer, DataCollatorForSeq2Seq, Trainer, TrainingArguments

    tokenizer = AutoTokenizer.from_pretrained(setup["tokenizer_dir"])
    dataset = []
    for messages in read_chat_jsonl(Path(setup["subset_path"])):
        encoded = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True,
                                                return_assistant_tokens_mask=True)
        ids = list(encoded["input_ids"])
        labels = [t if m else IGNORE_INDEX for t, m in zip(ids, encoded["assistant_masks"])]
        dataset.append({"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels})
    model = get_peft_model(load_base_model(setup), LoraConfig(**setup["lora"], task_type="CAUSAL_LM"))
    recorder = StepRecorder()
    trainer = Trainer(
        model=model,
        args=TrainingArguments(**common_arguments(setup, "hf"), per_device_train_batch_size=setup["hf_batch_size"]),
        train_dataset=dataset,
        data_collator=DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=IGNORE_INDEX),
        callbacks=[hf_callback(recorder)],
    )
    count_training_steps(trainer, recorder)
    trainer.train()
    return recorder.result("hf", samples=len(dataset))


def child_trl(setup: dict) -> dict:
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoTokenizer
    from trl import SFTConfig, SFTTrainer
    import trl

    tokenizer = AutoTokenizer.from_pretrained(setup["tokenizer_dir"])
    dataset = Dataset.from_list([{"messages": m} for m in read_chat_jsonl(Path(setup["subset_path"]))])
    recorder = StepRecorder()
    trainer = SFTTrainer(
        model=load_base_model(setup),
        args=SFTConfig(**common_arguments(setup, "trl"), per_device_train_batch_size=1,
                       max_length=setup["max_seq_len"], packing=True, assistant_only_loss=True),
        train_dataset=dataset,
        processing_class=tokenizer,
        peft_config=LoraConfig(**setup["lora"], task_type="CAUSAL_LM"),
        callbacks=[hf_callback(recorder)],
    )
    count_training_steps(trainer, recorder)
    trainer.train()
    return recorder.result("trl", rows=len(trainer.train_dataset), samples=len(dataset), trl_version=trl.__version__)


def child_overhead(setup: dict) -> dict:
    """llmft's default local run (model=tiny, packing) with its step's parts timed."""
    sys.path.insert(0, setup["llmft_root"])
    from llmft.config.compose import compose
    from llmft.rundir import create as rundir
    from llmft.training import loop

    totals = {"forward_backward": 0.0, "backward": 0.0, "optimizer": 0.0, "next_micro_batch": 0.0,
              "log_metrics": 0.0, "validate": 0.0, "save_checkpoint": 0.0}
    step_ends: list[float] = []
    snapshots: list[dict] = []  # the totals at the end of each step

    cpu = {"next_micro_batch": 0.0, "log_metrics": 0.0}  # this thread's CPU time: what the host work costs unloaded

    def timed(function, key):
        def wrapper(*args, **kwargs):
            start, start_cpu = time.perf_counter(), time.thread_time()
            try:
                return function(*args, **kwargs)
            finally:
                totals[key] += time.perf_counter() - start
                if key in cpu:
                    cpu[key] += time.thread_time() - start_cpu
        return wrapper

    trainer_class = loop.Trainer
    for key in ("forward_backward", "next_micro_batch", "log_metrics", "validate", "save_checkpoint"):
        setattr(trainer_class, key, timed(getattr(trainer_class, key), key))
    train, train_step = trainer_class.train, trainer_class.train_step

    def instrumented_train(self, *args, **kwargs):  # the strategy exists now: time its backward and step
        self.strategy.backward = timed(self.strategy.backward, "backward")
        self.strategy.step = timed(self.strategy.step, "optimizer")
        return train(self, *args, **kwargs)

    def stamped_train_step(self, *args, **kwargs):
        result = train_step(self, *args, **kwargs)
        step_ends.append(time.perf_counter())
        snapshots.append({**totals, **{f"{k}_cpu": v for k, v in cpu.items()}})
        return result

    trainer_class.train, trainer_class.train_step = instrumented_train, stamped_train_step
    cfg = compose([f"train.max_steps={setup['overhead_steps']}", f"run_dir={Path(setup['work']) / 'overhead_run'}"])
    summary = loop.train(cfg, rundir.create(cfg)).summary
    # from the end of step 1 to the end of the last step; the validation and checkpoints after the last step are out
    last = len(step_ends) - 1
    part = {k: snapshots[last][k] - snapshots[0][k] for k in snapshots[0]}
    window = step_ends[last] - step_ends[0] - part["validate"] - part["save_checkpoint"]
    compute = part["forward_backward"] + part["optimizer"]  # backward runs inside forward_backward
    return {
        "steps_timed": last, "window_s": window, "overhead_share": (window - compute) / window,
        "forward_s": part["forward_backward"] - part["backward"], "backward_s": part["backward"],
        "optimizer_s": part["optimizer"], "collation_s": part["next_micro_batch"],
        "logging_s": part["log_metrics"],
        "collation_cpu_ms_per_step": 1000 * part["next_micro_batch_cpu"] / last,
        "logging_cpu_ms_per_step": 1000 * part["log_metrics_cpu"] / last,
        "step_ms": 1000 * window / last,
        "other_s": window - compute - part["next_micro_batch"] - part["log_metrics"],
        "validation_and_checkpoints_s": part["validate"] + part["save_checkpoint"],
        "micro_batch_size": cfg.train.micro_batch_size, "max_seq_len": cfg.model.max_seq_len,
        "model": cfg.model.name, "packing": bool(cfg.data.packing), "rows": summary["num_train_samples"],
    }


CHILDREN = {"prepare": child_prepare, "llmft": child_llmft, "hf": child_hf, "trl": child_trl,
            "overhead": child_overhead}


# ------------------------------------------------------------------------------------------------ parent


def run_child(name: str, setup: dict, work: Path, tag: str = "") -> dict:
    stem = work / f"{name}{tag}"
    setup_path, out_path, log_path = Path(f"{stem}.setup.json"), Path(f"{stem}.json"), Path(f"{stem}.log")
    setup_path.write_text(json.dumps({**setup, "tag": tag}))  # tag: each run's own output folders
    env = {**os.environ, "OMP_NUM_THREADS": str(os.cpu_count() or 1), "TOKENIZERS_PARALLELISM": "false",
           "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "HF_HUB_DISABLE_TELEMETRY": "1", "TRANSFORMERS_VERBOSITY": "error"}
    for variable in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):  # one process, one rank, whatever the caller runs under
        env.pop(variable, None)
    load = os.getloadavg()[0]
    print(f"[{time.strftime('%H:%M:%S')}] {name}: running (load {load:.2f}, log {log_path})", flush=True)
    start = time.time()
    with open(log_path, "w") as log:
        code = subprocess.run([sys.executable, __file__, "--child", name, str(setup_path), str(out_path)],
                              stdout=log, stderr=subprocess.STDOUT, env=env, cwd=work).returncode
    if code != 0:
        tail = log_path.read_text().splitlines()[-40:]
        sys.exit(f"{name} failed (exit {code}); the end of {log_path}:\n" + "\n".join(tail))
    result = json.loads(out_path.read_text())
    result["wall_s"], result["load_before"], result["load_after"] = time.time() - start, load, os.getloadavg()[0]
    print(f"[{time.strftime('%H:%M:%S')}] {name}: done in {result['wall_s']:.0f} s "
          f"(load {result['load_after']:.2f})", flush=True)
    return result


def llmft_revision(root: Path) -> str:
    try:
        out = subprocess.run(["git", "-C", str(root), "log", "-1", "--format=%h %s"], capture_output=True,
                             text=True, timeout=10)
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--", "llmft"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
        if out.returncode != 0:
            return f"{root} (not a git checkout)"
        return f"{out.stdout.strip()[:80]}" + (" + uncommitted changes under llmft/" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def best_run(runs: list[dict]) -> dict:
    """The fastest of a contender's runs (supervised tokens/s), with every run's figure and the highest peak."""
    for run in runs:
        run["tokens_per_s"] = run["timed_supervised"] / run["timed_seconds"]
    best = dict(max(runs, key=lambda run: run["tokens_per_s"]))
    best["all_tokens_per_s"] = [run["tokens_per_s"] for run in runs]
    best["peak_rss_mb"] = max(run["peak_rss_mb"] for run in runs)
    return best


def print_report(setup: dict, results: dict, overhead: dict | None) -> None:
    if results:
        print_contenders(setup, results)
    if overhead is not None:
        o = overhead
        print(f"\nllmft step overhead, model={o['model']} (packing={o['packing']}, micro-batch {o['micro_batch_size']} "
              f"rows of {o['max_seq_len']}), {o['steps_timed']} steps timed ({o['window_s']:.2f} s without "
              f"{o['validation_and_checkpoints_s']:.2f} s of validation and checkpoints): forward+loss "
              f"{o['forward_s']:.2f} s, backward {o['backward_s']:.2f} s, optimizer {o['optimizer_s']:.2f} s, "
              f"collation {o['collation_s']:.3f} s, logging {o['logging_s']:.3f} s, other {o['other_s']:.3f} s "
              f"(load {o['load_before']:.1f}-{o['load_after']:.1f}); per step: {o['step_ms']:.1f} ms wall, collation "
              f"{o['collation_cpu_ms_per_step']:.2f} ms and logging {o['logging_cpu_ms_per_step']:.2f} ms of CPU time")
        print(f"step_overhead: {100 * o['overhead_share']:.2f}%")
    if {"llmft", "hf", "trl"} <= results.keys():
        ours, hf, trl = results["llmft"], results["hf"], results["trl"]
        print(f"ratios: tokens_per_s_vs_hf={ours['tokens_per_s'] / hf['tokens_per_s']:.2f} "
              f"peak_memory_vs_hf={ours['peak_rss_mb'] / hf['peak_rss_mb']:.2f} "
              f"tokens_per_s_vs_trl={ours['tokens_per_s'] / trl['tokens_per_s']:.2f} "
              f"peak_memory_vs_trl={ours['peak_rss_mb'] / trl['peak_rss_mb']:.2f}")


def print_contenders(setup: dict, results: dict) -> None:
    shape = setup["shape"]
    if setup["model"] == "smollm2":
        print(f"\nSmolLM2-135M-Instruct ({setup['model_dir']}), {shape['num_hidden_layers']} layers (hidden "
              f"{shape['hidden_size']}, intermediate {shape['intermediate_size']}, {shape['num_attention_heads']} heads / "
              f"{shape['num_key_value_heads']} KV heads, vocabulary {shape['vocab_size']:,}, tied), "
              f"{setup['num_parameters'] / 1e6:.0f}M parameters, fp32 on CPU ({os.cpu_count()} cores), LoRA "
              f"r={setup['lora']['r']} on {','.join(setup['lora']['target_modules'])}; {setup['num_conversations']} of "
              f"the {setup['num_conversations_bundled']} bundled tickets, {setup['steps']} optimizer steps (step 1 "
              f"untimed), max_seq_len {setup['max_seq_len']}, activation checkpointing "
              f"{'on' if setup['activation_checkpointing'] else 'off'}; llmft: {setup['llmft_revision']}")
        print(f"tokenizer: the model's own ({setup['tokenizer_size']:,} ids) and its chat template (for HF and TRL with "
              f"{{% generation %}} markers, the same text); llmft's turn-by-turn tokenization and "
              f"apply_chat_template's agree on {setup['tokenizations_agree']}/{setup['num_conversations']} "
              f"conversations; the N conversations hold {setup['subset_supervised']:,} supervised tokens")
    else:
        print(f"\nLlama-3.2-1B shape, {shape['num_hidden_layers']} layer(s) (hidden {shape['hidden_size']}, vocabulary "
              f"{shape['vocab_size']:,}, tied), {setup['num_parameters'] / 1e6:.0f}M parameters, fp32 on CPU "
              f"({os.cpu_count()} cores), LoRA r={setup['lora']['r']}; {setup['num_conversations']} of the "
              f"{setup['num_conversations_bundled']} bundled tickets, {setup['steps']} optimizer steps (step 1 "
              f"untimed), max_seq_len {setup['max_seq_len']}, activation checkpointing "
              f"{'on' if setup['activation_checkpointing'] else 'off'}; llmft: {setup['llmft_revision']}")
        print(f"tokenizer: {setup['tokenizer_size']:,} BPE ids trained on the tickets; llmft's turn-by-turn "
              f"tokenization and apply_chat_template's agree on {setup['tokenizations_agree']}/"
              f"{setup['num_conversations']} conversations; the N conversations hold {setup['subset_supervised']:,} "
              f"supervised tokens")
    layouts = {
        "llmft": f"llmft (packed rows, 1 x {setup['max_seq_len']})",
        "hf": f"HF Trainer (padded, {setup['hf_batch_size']} convs)",
        "trl": f"TRL SFTTrainer {results.get('trl', {}).get('trl_version', '')} (packed)",
    }
    header = (f"{'contender':<36} {'steps':>5} {'positions/step':>14} {'sup. all steps':>14} {'sup. timed':>10} "
              f"{'timed s':>8} {'sup. tok/s':>10} {'peak RSS MB':>11} {'loss@1':>7} {'load':>9}  timed steps (s)")
    print("\n" + header + "\n" + "-" * len(header))
    for name, result in results.items():
        loss = f"{result['first_loss']:.3f}" if result.get("first_loss") is not None else "-"
        print(f"{layouts[name]:<36} {result['steps']:>5} {result['positions_per_step']:>14,.0f} "
              f"{result['supervised_all_steps']:>14,} {result['timed_supervised']:>10,} "
              f"{result['timed_seconds']:>8.1f} {result['tokens_per_s']:>10.1f} {result['peak_rss_mb']:>11,.0f} "
              f"{loss:>7} {result['load_before']:>4.1f}-{result['load_after']:<4.1f} "
              f"{' '.join(f'{t:.1f}' for t in result['step_seconds'])}")
    if any(len(r["all_tokens_per_s"]) > 1 for r in results.values()):
        print("runs (sup. tok/s, in order; the table shows the fastest and the highest peak): " + "; ".join(
            f"{n} " + " ".join(f"{t:.1f}" for t in r["all_tokens_per_s"]) for n, r in results.items()))
    sup = {r["supervised_all_steps"] for r in results.values()}
    steps = {r["steps"] for r in results.values()}
    if len(sup) > 1 or steps != {setup["steps"]}:
        print(f"WARNING: the contenders did not train the same supervised tokens / steps: "
              f"{ {n: (r['steps'], r['supervised_all_steps']) for n, r in results.items()} }")
    if "trl" in results and results["trl"].get("rows") != setup["steps"]:
        print(f"WARNING: TRL packed the conversations into {results['trl'].get('rows')} rows, not {setup['steps']}")
    print("load: the 1-minute load average when each contender started and ended (os.getloadavg)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=sorted(LLMFT_MODEL), default="llama-3.2-1b",
                        help="llama-3.2-1b: its shape, random weights, --layers deep (the default); smollm2: the real "
                             "SmolLM2-135M-Instruct folder")
    parser.add_argument("--model-path", type=Path, help="with --model smollm2: its folder (default: model=smollm2_135m's)")
    parser.add_argument("--layers", type=int, help="decoder layers of the Llama-3.2-1B shape (default 2; it has 16)")
    parser.add_argument("--steps", type=int, help="optimizer steps per contender, the first untimed (default: 4 for "
                                                  f"llama-3.2-1b, {SMOLLM2_STEPS} for smollm2)")
    parser.add_argument("--max-seq-len", type=int, help="tokens per packed row (default: 2048 for llama-3.2-1b, the "
                                                        "model profile's 512 for smollm2)")
    parser.add_argument("--overhead-steps", type=int, default=100, help="steps of the tiny run for step_overhead")
    parser.add_argument("--activation-checkpointing", action="store_true", help="on for all three contenders")
    parser.add_argument("--contenders", default="llmft,hf,trl", help="comma-separated subset of llmft,hf,trl")
    parser.add_argument("--no-overhead", action="store_true", help="skip the step-overhead run")
    parser.add_argument("--repeats", type=int, default=1,
                        help="runs per contender, interleaved; the table keeps each one's fastest (noisy machines)")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: hidden 256, 1 layer, 3 steps, 20 overhead steps (vocabulary 128,256 kept)")
    parser.add_argument("--llmft-root", type=Path, default=REPO,
                        help="folder holding the llmft package to benchmark (default: this checkout)")
    parser.add_argument("--work-dir", type=Path, help="keep the model, logs and run directories here")
    parser.add_argument("--child", nargs=3, metavar=("NAME", "SETUP", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        name, setup_path, out_path = args.child
        result = CHILDREN[name](json.loads(Path(setup_path).read_text()))
        Path(out_path).write_text(json.dumps(result))
        return
    smollm2 = args.model == "smollm2"
    if smollm2 and (args.quick or args.layers is not None):
        parser.error("--quick and --layers shape the Llama-3.2-1B model, not --model smollm2")
    if args.model_path is not None and not smollm2:
        parser.error("--model-path is for --model smollm2 (the Llama-3.2-1B shape is built here with random weights)")
    args.layers = 30 if smollm2 else (args.layers or 2)
    args.steps = args.steps or (SMOLLM2_STEPS if smollm2 else 4)
    args.max_seq_len = args.max_seq_len or (512 if smollm2 else 2048)
    if args.quick:
        args.layers, args.steps, args.overhead_steps = 1, 3, 20
    if smollm2:  # the step overhead is measured on model=tiny, whatever the shape: the 1B run reports it
        args.no_overhead = True
    if args.steps < 2:
        parser.error("--steps must be at least 2 (step 1 is the untimed warmup)")
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    contenders = [c.strip() for c in args.contenders.split(",") if c.strip()]
    if not set(contenders) <= {"llmft", "hf", "trl"}:
        parser.error("--contenders takes llmft, hf and trl")
    if "trl" in contenders and importlib.util.find_spec("trl") is None:
        sys.exit("this benchmark needs TRL: pip install trl")
    scratch = None if args.work_dir else tempfile.TemporaryDirectory(prefix="bench_vs_hf_trl_")
    work = (args.work_dir or Path(scratch.name)).resolve()
    work.mkdir(parents=True, exist_ok=True)
    started = time.time()
    try:
        setup = {"work": str(work), "llmft_root": str(args.llmft_root.resolve()), "steps": args.steps,
                 "model": args.model, "model_path": str(args.model_path) if args.model_path else None,
                 "max_seq_len": args.max_seq_len, "layers": args.layers, "quick": args.quick,
                 "activation_checkpointing": args.activation_checkpointing, "overhead_steps": args.overhead_steps,
                 "llmft_revision": llmft_revision(args.llmft_root)}
        if contenders:
            setup.update(run_child("prepare", setup, work))
        runs: dict[str, list[dict]] = {name: [] for name in contenders}
        for repeat in range(args.repeats):  # interleaved, so a burst of load elsewhere hits one run, not one tool
            for name in contenders:
                runs[name].append(run_child(name, setup, work, tag=f"_{repeat + 1}" if args.repeats > 1 else ""))
        results = {name: best_run(name_runs) for name, name_runs in runs.items()}
        overhead = None if args.no_overhead else run_child("overhead", setup, work)
        print(f"\ntotal wall time {time.time() - started:.0f} s")
        print_report(setup, results, overhead)
    finally:
        if scratch is not None:
            scratch.cleanup()


if __name__ == "__main__":
    main()
