"""The training loop: one function that reads top to bottom.

    python -m llmft.train RUN_DIR      # one process per rank; the config is RUN_DIR/config.yaml

`llmft.launch` creates the run directory and starts this (in-process for a local run). The stages:
setup -> data -> model (load -> PEFT -> activation checkpointing -> device) -> optimizer and schedule ->
resume -> loop (step, log, evaluate, checkpoint) -> final save and summary.
"""

from __future__ import annotations

import json
import math
import random
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from llmft import checkpoint
from llmft.config import ConfigError, load_run_config
from llmft.data.batching import collate, epoch_order
from llmft.data.chat import DataError
from llmft.data.pipeline import build_splits, read_conversations
from llmft.data.templating import IGNORE_INDEX, TemplateError
from llmft.metrics import MetricsLog
from llmft.model import apply_peft, build_tiny_model, count_parameters, load_pretrained_model
from llmft.export import save_final
from llmft.tokenizer import load_tokenizer, train_tiny_tokenizer
from llmft.topology import Topology


@dataclass
class TrainResult:
    summary: dict
    model: torch.nn.Module
    tokenizer: object


def log(topology: Topology, message: str) -> None:
    if topology.is_main:
        print(message, flush=True)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def warmup_cosine(step: int, warmup_steps: int, total_steps: int, min_lr_ratio: float) -> float:
    """LR multiplier: linear warmup from 0, then cosine decay to `min_lr_ratio`."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def autocast_context(precision: str, device_type: str):
    """bf16 autocast where asked (`auto`: on a GPU that supports it); fp32 otherwise, which is exact on CPU."""
    use_bf16 = precision == "bf16" or (
        precision == "auto" and device_type == "cuda" and torch.cuda.is_bf16_supported()
    )
    return torch.autocast(device_type, dtype=torch.bfloat16) if use_bf16 else nullcontext()


def token_losses(model, batch: dict, precision: str, device_type: str) -> tuple[torch.Tensor, int]:
    """Sum of next-token cross-entropies over supervised positions, and their number."""
    inputs = {k: v for k, v in batch.items() if k not in ("labels", "num_tokens")}
    with autocast_context(precision, device_type):
        logits = model(**inputs).logits
    targets = batch["labels"][:, 1:]
    loss_sum = F.cross_entropy(
        logits[:, :-1].flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE_INDEX, reduction="sum"
    )
    return loss_sum, int((targets != IGNORE_INDEX).sum())


@torch.no_grad()
def evaluate(model, samples, micro_batch_size: int, pad_token_id: int, precision: str, device) -> float:
    model.eval()
    total_loss, total_tokens = 0.0, 0
    for start in range(0, len(samples), micro_batch_size):
        batch = {k: v.to(device) for k, v in collate(samples[start : start + micro_batch_size], pad_token_id).items()}
        loss_sum, num_tokens = token_losses(model, batch, precision, device.type)
        total_loss += float(loss_sum)
        total_tokens += num_tokens
    model.train()
    return total_loss / max(1, total_tokens)


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def train(cfg, run_dir: Path) -> TrainResult:
    started = time.time()
    run_dir = Path(run_dir)
    # ---------------------------------------------------------------- setup
    topology = Topology.from_env()
    device = topology.device
    tcfg = cfg.train
    precision = str(getattr(tcfg.precision, "value", tcfg.precision))
    seed_everything(tcfg.seed)
    if device.type == "cpu":
        torch.use_deterministic_algorithms(True)
    log(topology, f"llmft: model={cfg.model.name} peft={cfg.peft.method.value} "
                  f"strategy={cfg.parallelism.strategy.value} world_size={topology.world_size} device={device}")

    # ---------------------------------------------------------------- data and tokenizer
    conversations, read_report = read_conversations(cfg.data)
    if cfg.model.path is None:  # the tiny model: a tokenizer trained on this run's texts
        texts = [m["content"] for c in conversations for m in c.messages]
        tokenizer = train_tiny_tokenizer(texts, cfg.model.tiny.vocab_size)
    else:
        tokenizer = load_tokenizer(cfg.model.path, cfg.model.fallback_chat_template)
    splits, prep_counts = build_splits(conversations, tokenizer, cfg.data, cfg.model.max_seq_len)
    train_samples, val_samples = splits["train"], splits["validation"]
    log(topology, f"data: {len(conversations)} conversations ({len(read_report['skipped'])} bad records skipped), "
                  f"{len(train_samples)} train / {len(val_samples)} validation samples")

    # ---------------------------------------------------------------- model: load -> PEFT -> AC -> device
    if cfg.model.path is None:
        model = build_tiny_model(cfg.model.tiny, tokenizer, tcfg.seed, cfg.model.max_seq_len)
        base_model_path = run_dir / "base_model"
        if topology.is_main:  # the base the adapter applies to, so stock PEFT can load the result
            model.save_pretrained(base_model_path)
            tokenizer.save_pretrained(base_model_path)
    else:
        model = load_pretrained_model(cfg.model)
        base_model_path = Path(cfg.model.path)
    model.config.use_cache = False
    model = apply_peft(model, cfg.peft, cfg.model)
    if tcfg.activation_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.to(device)
    model.train()
    num_params, num_trainable = count_parameters(model)
    log(topology, f"model: {num_params:,} parameters, {num_trainable:,} trainable")

    # ---------------------------------------------------------------- optimizer and schedule
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(
        trainable, lr=tcfg.lr, betas=(tcfg.adam_beta1, tcfg.adam_beta2), weight_decay=tcfg.weight_decay
    )
    global_batch = tcfg.micro_batch_size * topology.world_size
    micro_batches_per_epoch = math.ceil(len(train_samples) / global_batch)
    total_steps = math.ceil(tcfg.epochs * micro_batches_per_epoch / tcfg.grad_accum_steps)
    if tcfg.max_steps > 0:
        total_steps = min(total_steps, tcfg.max_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: warmup_cosine(s, tcfg.warmup_steps, total_steps, tcfg.min_lr_ratio)
    )

    # ---------------------------------------------------------------- resume
    step, micro_batches_done = 0, 0  # the data position is the number of global micro-batches consumed
    checkpoints_dir = run_dir / "checkpoints"
    latest, incomplete = checkpoint.find_latest(checkpoints_dir)
    for folder in incomplete:
        log(topology, f"checkpoint: ignoring incomplete {folder}")
    if latest is not None:
        from safetensors.torch import load_file

        model.load_state_dict(load_file(latest / "trainable.safetensors", device=str(device)), strict=False)
        optimizer.load_state_dict(torch.load(latest / "optimizer.pt", weights_only=False))
        state = torch.load(latest / "state.pt", weights_only=False)
        scheduler.load_state_dict(state["scheduler"])
        set_rng_state(state["rng"])
        step, micro_batches_done = state["step"], state["micro_batches_done"]
        log(topology, f"resume: from {latest} (step {step})")

    def save_checkpoint() -> None:
        from safetensors.torch import save_file

        def write(folder: Path) -> None:
            save_file({n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad},
                      folder / "trainable.safetensors")
            torch.save(optimizer.state_dict(), folder / "optimizer.pt")
            torch.save({"scheduler": scheduler.state_dict(), "rng": rng_state(), "step": step,
                        "micro_batches_done": micro_batches_done}, folder / "state.pt")

        meta = {"world_size": topology.world_size, "strategy": cfg.parallelism.strategy.value}
        path = checkpoint.save(checkpoints_dir, step, write, meta, tcfg.keep_last)
        log(topology, f"checkpoint: {path}")

    def next_micro_batch() -> dict:
        """This rank's share of the next global micro-batch, in the order fixed by (seed, epoch)."""
        nonlocal micro_batches_done
        epoch, index = divmod(micro_batches_done, micro_batches_per_epoch)
        order = epoch_order(len(train_samples), tcfg.seed, epoch)
        chosen = order[index * global_batch : (index + 1) * global_batch]
        mine = chosen[topology.rank :: topology.world_size] or chosen[:1]
        micro_batches_done += 1
        return {k: v.to(device) for k, v in collate([train_samples[i] for i in mine], tokenizer.pad_token_id).items()}

    # ---------------------------------------------------------------- loop
    metrics = MetricsLog(run_dir / "metrics.jsonl", total_steps, step, enabled=topology.is_main)
    first_loss = last_loss = val_loss = None
    step_start, tokens_since_log, supervised_since_log = time.time(), 0, 0
    while step < total_steps:
        micro_batches = [next_micro_batch() for _ in range(tcfg.grad_accum_steps)]
        # Normalise by the supervised tokens of the whole step, so accumulation does not change the loss.
        num_supervised = sum(int((b["labels"][:, 1:] != IGNORE_INDEX).sum()) for b in micro_batches)
        step_loss = 0.0
        for batch in micro_batches:
            loss_sum, _ = token_losses(model, batch, precision, device.type)
            loss = loss_sum / max(1, num_supervised)
            loss.backward()
            step_loss += float(loss.detach())
            tokens_since_log += int(batch["num_tokens"])
        supervised_since_log += num_supervised
        grad_norm = float(torch.nn.utils.clip_grad_norm_(trainable, tcfg.max_grad_norm))
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        first_loss = step_loss if first_loss is None else first_loss
        last_loss = step_loss

        if step % tcfg.log_every == 0 or step == total_steps:
            elapsed = time.time() - step_start
            record = {
                "step": step,
                "epoch": micro_batches_done / micro_batches_per_epoch,
                "loss": step_loss,
                "lr": scheduler.get_last_lr()[0],
                "grad_norm": grad_norm,
                "tokens_per_s": tokens_since_log / elapsed,
                "supervised_tokens_per_s": supervised_since_log / elapsed,
            }
            metrics.write(record)
            metrics.show(step, record)
            step_start, tokens_since_log, supervised_since_log = time.time(), 0, 0
        if step % tcfg.eval_every == 0 or step == total_steps:
            val_loss = evaluate(model, val_samples, tcfg.micro_batch_size, tokenizer.pad_token_id, precision, device)
            metrics.write({"step": step, "val_loss": val_loss})
            metrics.show(step, {"val_loss": val_loss})
        if tcfg.save_every > 0 and step % tcfg.save_every == 0 and step < total_steps:
            save_checkpoint()
    metrics.close()

    # ---------------------------------------------------------------- final save and summary
    final_dir = run_dir / "final"
    if topology.is_main:
        save_final(model, tokenizer, final_dir, base_model_path)
    summary = {
        "status": "completed",
        "steps": step,
        "total_steps": total_steps,
        "first_loss": first_loss,
        "final_loss": last_loss,
        "final_val_loss": val_loss,
        "num_parameters": num_params,
        "num_trainable_parameters": num_trainable,
        "num_train_samples": len(train_samples),
        "num_validation_samples": len(val_samples),
        "data": {**read_report, **prep_counts},
        "world_size": topology.world_size,
        "wall_time_s": time.time() - started,
        "final_dir": str(final_dir),
        "base_model_path": str(base_model_path),
    }
    if topology.is_main:
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    return TrainResult(summary, model, tokenizer)


def run(run_dir: Path) -> TrainResult:
    """Train from a run directory, recording a failure in summary.json before it propagates."""
    cfg = load_run_config(run_dir)
    try:
        return train(cfg, run_dir)
    except Exception as error:
        summary_path = Path(run_dir) / "summary.json"
        summary_path.write_text(json.dumps({"status": "failed", "error": f"{type(error).__name__}: {error}"}, indent=2))
        raise


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m llmft.train RUN_DIR   (the run directory that llmft.launch created)", file=sys.stderr)
        return 2
    try:
        run(Path(argv[0]))
    except (ConfigError, DataError, TemplateError) as error:
        print(f"llmft: {error}", file=sys.stderr)
        return 2
    print(f"run dir: {Path(argv[0]).resolve()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
