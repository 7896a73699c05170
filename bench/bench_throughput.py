#!/usr/bin/env python3
"""CPU training throughput: an llmft run against a Hugging Face Trainer run, same model, data and settings.

    python bench/bench_throughput.py [--steps 60] [--micro-batch 8]

Both train LoRA (same rank, targets, learning rate, schedule, seed) on the tiny model (random weights, the same
base saved by llmft) over the bundled support tickets, in this one process, one after the other:
- llmft: `llmft.train.train` with its defaults (packed rows of model.max_seq_len, no padding);
- baseline: `transformers.Trainer` (use_cpu) on the same tokenized conversations, each sample padded per batch
  by DataCollatorForSeq2Seq, labels masked the same way (assistant turns only).
The figure compared is supervised tokens per second (tokens that carry a label, the tokens that teach), measured
from the second step to the last; printed with their ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("OMP_NUM_THREADS", str(os.cpu_count() or 1))


def llmft_run(steps: int, micro_batch: int, work: Path) -> tuple[float, Path]:
    from llmft.rundir import create as rundir
    from llmft.config.compose import compose
    from llmft.training.loop import train

    cfg = compose([f"train.max_steps={steps}", f"train.micro_batch_size={micro_batch}", "train.log_every=1",
                           f"train.eval_every={steps}", "train.save_every=0", f"run_dir={work / 'llmft'}"])
    run_dir = rundir.create(cfg)
    train(cfg, run_dir)
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    records = [r for r in records if "loss" in r][1:]  # from the second step
    supervised = sum(r["supervised_tokens_per_s"] for r in records) / len(records)
    return supervised, run_dir


class SupervisedTokenClock:
    """Counts supervised tokens and wall time from the second step to the end of a Trainer run."""

    def __init__(self):
        self.tokens = 0
        self.start = None
        self.seconds = 0.0


def trainer_run(steps: int, micro_batch: int, llmft_run_dir: Path, work: Path) -> float:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import (AutoModelForCausalLM, AutoTokenizer, DataCollatorForSeq2Seq, Trainer,
                              TrainerCallback, TrainingArguments)

    from llmft.rundir.files import read_config
    from llmft.data.prepare.reading import read_conversations
    from llmft.data.prepare.samples_for_run import build_splits

    cfg = read_config(llmft_run_dir)
    cfg.data.packing = False  # the baseline pads each batch, as Trainer users do
    tokenizer = AutoTokenizer.from_pretrained(llmft_run_dir / "base_model")
    conversations, _ = read_conversations(cfg.data)
    samples = build_splits(conversations, tokenizer, cfg.data, cfg.model.max_seq_len)[0]["train"]
    dataset = [{"input_ids": s.input_ids, "labels": s.labels, "attention_mask": [1] * len(s.input_ids)}
               for s in samples]
    model = AutoModelForCausalLM.from_pretrained(llmft_run_dir / "base_model")
    model = get_peft_model(model, LoraConfig(r=cfg.peft.r, lora_alpha=cfg.peft.alpha, lora_dropout=cfg.peft.dropout,
                                             target_modules=list(cfg.model.lora_target_modules),
                                             task_type="CAUSAL_LM"))
    clock = SupervisedTokenClock()
    collator = DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100)

    def counting_collator(features):
        batch = collator(features)
        if clock.start is not None:
            clock.tokens += int((batch["labels"][:, 1:] != -100).sum())
        return batch

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 1:
                clock.start = time.perf_counter()

        def on_train_end(self, args, state, control, **kwargs):
            clock.seconds = time.perf_counter() - clock.start

    arguments = TrainingArguments(
        output_dir=str(work / "trainer"), max_steps=steps, per_device_train_batch_size=micro_batch,
        learning_rate=cfg.train.lr, warmup_steps=cfg.train.warmup_steps, lr_scheduler_type="cosine",
        max_grad_norm=cfg.train.max_grad_norm, logging_steps=10**6, save_strategy="no", report_to=[],
        use_cpu=True, seed=cfg.train.seed, dataloader_num_workers=0, disable_tqdm=True,
    )
    trainer = Trainer(model=model, args=arguments, train_dataset=dataset, data_collator=counting_collator,
                      callbacks=[Clock()])
    torch.manual_seed(cfg.train.seed)
    trainer.train()
    return clock.tokens / clock.seconds


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--micro-batch", type=int, default=8)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        work = Path(scratch)
        ours, run_dir = llmft_run(args.steps, args.micro_batch, work)
        baseline = trainer_run(args.steps, args.micro_batch, run_dir, work)
    print(f"\nsupervised tokens/s on CPU ({os.cpu_count()} cores), tiny model, LoRA, {args.steps} steps, "
          f"micro-batch {args.micro_batch}:")
    print(f"  llmft (packed)              {ours:10.0f}")
    print(f"  HF Trainer (padded batches) {baseline:10.0f}")
    print(f"  ratio llmft / Trainer       {ours / baseline:10.2f}")


if __name__ == "__main__":
    main()
