"""The training loop: one function that reads top to bottom.

    python -m llmft.train RUN_DIR      # one process per rank; the config is RUN_DIR/config.yaml

`llmft.launch` creates the run directory and starts this (in-process for a local run). The stages:
setup -> data -> model (load -> PEFT -> activation checkpointing -> device) -> optimizer and schedule ->
resume -> loop (step, log, evaluate, checkpoint) -> final save and summary.
"""

from __future__ import annotations

import json
import math
import os
import random
import signal
import sys
import threading
import time
import warnings
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import peft  # noqa: F401  (imported here, not inside the load: the load's memory figure is the model's alone)
import torch
import torch.distributed as dist
import torch.nn.functional as F

from llmft import checkpoint
from llmft.config import ConfigError, load_run_config
from llmft.data.batching import collate, epoch_order
from llmft.data.records import DataError
from llmft.data.pipeline import build_splits, load_run_tokenizer, read_conversations
from llmft.data.templating import IGNORE_INDEX, TemplateError
from llmft.metrics import MetricsLog
from llmft.model import (
    apply_peft,
    build_on_meta,
    build_tiny_model,
    count_parameters,
    init_lora_weights,
    load_pretrained_model,
)
from llmft.export import save_final
from llmft.flops import flops_per_token, peak_flops
from llmft.tokenizer import load_tokenizer
from llmft.strategies.fsdp import decoder_layers
from llmft.topology import Topology
from llmft import strategies


class Interrupted(Exception):
    """The run stopped at a signal after checkpointing; `requeued` when the SLURM job was put back in the queue."""

    def __init__(self, step: int, signal_name: str, requeued: bool):
        super().__init__(f"stopped by {signal_name} at step {step}")
        self.step, self.signal_name, self.requeued = step, signal_name, requeued


class StopSignals:
    """SIGUSR2 (SLURM's warning before the time limit) and SIGTERM (scancel, preemption, the limit itself) ask the
    run to stop. The handler only records the signal: ranks agree at the next step boundary (a collective), write
    the checkpoint of that step together, and stop. Checkpointing inside the handler would interrupt a collective.
    """

    SIGNALS = (signal.SIGUSR2, signal.SIGTERM)

    def __init__(self):
        self.received = 0
        self.previous = {}
        if threading.current_thread() is threading.main_thread():
            self.previous = {s: signal.signal(s, self._record) for s in self.SIGNALS}

    def _record(self, signum, frame) -> None:
        self.received = signum

    def agreed(self, topology: Topology) -> int:
        """The signal any rank received (0: none). Every rank calls it at the same step."""
        if not topology.is_distributed:
            return self.received
        flag = torch.tensor([self.received], dtype=torch.int64, device=topology.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return int(flag.item())

    def restore(self) -> None:
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)


def requeue_slurm_job(cfg, topology: Topology) -> bool:
    """Rank 0 puts the SLURM job back in the queue (below cluster.max_requeues); the next attempt resumes."""
    job_id = os.environ.get("SLURM_JOB_ID")
    restarts = int(os.environ.get("SLURM_RESTART_COUNT", "0"))
    max_requeues = cfg.cluster.max_requeues if cfg.cluster is not None else 3  # sbatch templates: no profile
    if not job_id or restarts >= max_requeues:
        return False
    if topology.is_main:
        import subprocess

        subprocess.run(["scontrol", "requeue", job_id], check=True, timeout=60)
    return True


@dataclass
class TrainResult:
    summary: dict
    model: torch.nn.Module
    tokenizer: object


def log(topology: Topology, message: str) -> None:
    if topology.is_main:
        print(message, flush=True)


def barrier(topology: Topology) -> None:
    if topology.is_distributed:
        dist.barrier()


def all_reduce_sum(value: float, topology: Topology) -> float:
    if not topology.is_distributed:
        return value
    tensor = torch.tensor([float(value)], dtype=torch.float64)
    if topology.device_type == "cuda":
        tensor = tensor.to(topology.device)
    dist.all_reduce(tensor)
    return tensor.item()


def resident_mb() -> float:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def reset_peak_resident() -> None:
    """Start a new high-water mark of resident memory (Linux: writing 5 to clear_refs resets VmHWM)."""
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
    except OSError:
        pass  # then the peak since the process started is reported: an overestimate, never an underestimate


def peak_resident_mb() -> float:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 2**10  # kB
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10


def peak_memory_gb(device) -> float:
    """Peak GPU memory allocated by torch, or the process's peak resident memory on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # kilobytes on Linux


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
def evaluate(model, samples, micro_batch_size: int, pad_token_id: int, precision: str, device,
             flatten: bool = False) -> float:
    model.eval()
    total_loss, total_tokens = 0.0, 0
    for start in range(0, len(samples), micro_batch_size):
        rows = samples[start : start + micro_batch_size]
        batch = {k: v.to(device) for k, v in collate(rows, pad_token_id, flatten=flatten).items()}
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
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")  # transformers 5, through PEFT
    # ---------------------------------------------------------------- setup
    topology = Topology.from_env()
    device = topology.device
    os.umask(int(str(cfg.umask), 8))  # every rank writes into the run directory (see rundir.apply_umask)
    if topology.is_distributed and not dist.is_initialized():
        # rank and world size from the topology (torchrun's or SLURM's variables); MASTER_ADDR / MASTER_PORT from
        # the environment (torchrun, submitit, or the sbatch templates in slurm/)
        dist.init_process_group(backend="nccl" if topology.device_type == "cuda" else "gloo",
                                rank=topology.rank, world_size=topology.world_size)
    strategy = strategies.build(cfg, topology)
    tcfg = cfg.train
    precision = str(getattr(tcfg.precision, "value", tcfg.precision))
    seed_everything(tcfg.seed)
    if device.type == "cpu":
        torch.use_deterministic_algorithms(True)
    log(topology, f"llmft: model={cfg.model.name} peft={cfg.peft.method.value} "
                  f"strategy={cfg.parallelism.strategy.value} world_size={topology.world_size} device={device}")

    # ---------------------------------------------------------------- data and tokenizer
    conversations, read_report = read_conversations(cfg.data)
    if cfg.model.path is None:  # the tiny model: a tokenizer trained on this run's texts, by rank 0
        tokenizer_dir = run_dir / "base_model"
        if topology.is_main:
            load_run_tokenizer(cfg, conversations).save_pretrained(tokenizer_dir)
        barrier(topology)
        tokenizer = load_tokenizer(str(tokenizer_dir), None)
    else:
        tokenizer = load_tokenizer(cfg.model.path, cfg.model.fallback_chat_template)
    splits, prep_counts = build_splits(conversations, tokenizer, cfg.data, cfg.model.max_seq_len)
    train_samples, val_samples = splits["train"], splits["validation"]
    log(topology, f"data: {len(conversations)} conversations ({len(read_report['skipped'])} bad records skipped), "
                  f"{len(train_samples)} train / {len(val_samples)} validation samples")

    # ---------------------------------------------------------------- model: load -> PEFT -> AC -> compile -> device
    rss_before_load_mb = resident_mb()
    reset_peak_resident()  # the peak of the load itself, not of the data preparation before it
    if cfg.model.path is None:
        model = build_tiny_model(cfg.model.tiny, tokenizer, tcfg.seed, cfg.model.max_seq_len)
        base_model_path = run_dir / "base_model"
        if topology.is_main:  # the base the adapter applies to, so stock PEFT can load the result
            model.save_pretrained(base_model_path)
    elif strategy.builds_on_meta:  # no weights yet: each rank loads its shards once sharded
        model = build_on_meta(cfg.model, cfg.peft)
        base_model_path = Path(cfg.model.path)
    else:
        with strategy.loading_context():  # ZeRO-3: partitioned as it loads (deepspeed.zero.Init)
            model = load_pretrained_model(cfg.model, cfg.peft, topology.local_rank)
        base_model_path = Path(cfg.model.path)
    model.config.use_cache = False
    model = apply_peft(model, cfg.peft, cfg.model)
    on_meta = any(p.is_meta for p in model.parameters())
    partitioned = any(hasattr(p, "ds_id") for p in model.parameters())  # ZeRO-3 placed them while loading
    if not on_meta:
        init_lora_weights(model, tcfg.seed)  # seeded by name: the same LoRA start for every strategy
    if tcfg.activation_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if tcfg.compile:  # per layer, like torchtitan: small graphs, compiled once and reused by every layer
        for layer in decoder_layers(model):
            layer.compile()
    placed = on_meta or partitioned or cfg.peft.method.value == "qlora"  # QLoRA: device_map put it on its GPU
    if not placed:
        model.to(device)
    model.train()
    num_params, num_trainable = count_parameters(model)
    log(topology, f"model: {num_params:,} parameters, {num_trainable:,} trainable")

    # ---------------------------------------------------------------- shard, optimizer and schedule
    # The data is one stream of samples, epoch after epoch, each epoch in an order fixed by (seed, epoch); a step
    # takes the next `samples_per_step`. The data position is thus one integer (samples consumed), independent of
    # how the step is split into ranks and micro-batches, so a run resumes exactly on another world size.
    micro_batch_across_ranks = tcfg.micro_batch_size * topology.world_size
    samples_per_step = micro_batch_across_ranks * tcfg.grad_accum_steps
    total_steps = math.ceil(tcfg.epochs * len(train_samples) / samples_per_step)
    if tcfg.max_steps > 0:
        total_steps = min(total_steps, tcfg.max_steps)
    peft_model = model  # the PEFT (or HF) model, for evaluation and export; `model` becomes the wrapped one
    model = strategy.wrap(model, [p for p in model.parameters() if p.requires_grad],
                          lambda s: warmup_cosine(s, tcfg.warmup_steps, total_steps, tcfg.min_lr_ratio))
    sharding = strategy.sharding_report()  # now: after a forward FSDP2 keeps the root's parameters unsharded
    # Host RAM that loading and sharding took on this rank, summed over ranks (peak since start minus before).
    load_rss_mb = all_reduce_sum(peak_resident_mb() - rss_before_load_mb, topology)
    log(topology, f"memory: loading the model took {load_rss_mb:,.0f} MB of host RAM over {topology.world_size} "
                  f"rank(s)")

    # ---------------------------------------------------------------- resume
    step, samples_consumed = 0, 0
    checkpoints_dir = run_dir / "checkpoints"
    latest, incomplete = checkpoint.find_latest(checkpoints_dir)
    for folder in incomplete:
        log(topology, f"checkpoint: ignoring incomplete {folder}")
    if latest is not None:
        strategy.load(latest)
        state = torch.load(latest / f"state_rank{topology.rank}.pt" if (latest / f"state_rank{topology.rank}.pt")
                           .exists() else latest / "state_rank0.pt", weights_only=False)
        set_rng_state(state["rng"])
        step, samples_consumed = state["step"], state["samples_consumed"]
        log(topology, f"resume: from {latest} (step {step}, saved with world size "
                      f"{checkpoint.read_manifest(latest)['world_size']})")

    def save_checkpoint() -> None:
        def write(folder: Path) -> None:
            strategy.save(folder)
            torch.save({"rng": rng_state(), "step": step, "samples_consumed": samples_consumed},
                       folder / f"state_rank{topology.rank}.pt")

        meta = {"world_size": topology.world_size, "strategy": cfg.parallelism.strategy.value, "val_loss": val_loss}
        path = checkpoint.save(checkpoints_dir, step, write, meta, tcfg.keep_last, barrier=lambda: barrier(topology),
                               is_main=topology.is_main)
        log(topology, f"checkpoint: {path}")

    # flash-attention finds sample boundaries from restarting positions only in a single row: lay packed rows end
    # to end (SDPA and eager get a block-diagonal mask from the positions of each row)
    flash_attention = cfg.model.attn_implementation.startswith("flash")

    def next_micro_batch() -> dict:
        """This rank's share (every world_size-th sample) of the next micro-batch across ranks."""
        nonlocal samples_consumed
        positions = range(samples_consumed, samples_consumed + micro_batch_across_ranks)
        stream = [epoch_order(len(train_samples), tcfg.seed, k // len(train_samples))[k % len(train_samples)]
                  for k in positions]
        mine = stream[topology.rank :: topology.world_size]
        samples_consumed += micro_batch_across_ranks
        batch = collate([train_samples[i] for i in mine], tokenizer.pad_token_id, flatten=flash_attention)
        return {k: v.to(device) for k, v in batch.items()}

    # ---------------------------------------------------------------- loop
    metrics = MetricsLog(run_dir / "metrics.jsonl", total_steps, step, enabled=topology.is_main, use_wandb=tcfg.wandb)
    first_loss = last_loss = val_loss = None
    step_start, tokens_since_log, supervised_since_log, sequences_since_log = time.time(), 0, 0, 0
    hf_config = peft_model.config
    gpu_peak_flops = peak_flops(torch.cuda.get_device_name(device)) if device.type == "cuda" else None
    stop = StopSignals()
    while step < total_steps:
        micro_batches = [next_micro_batch() for _ in range(tcfg.grad_accum_steps)]
        # Normalise by the supervised tokens of the whole step, so accumulation does not change the loss.
        # and across ranks: every rank divides by the global count; the gradient averaging of DDP, FSDP and ZeRO
        # divides by the world size, which the factor world_size undoes. The result is the exact token-mean
        # gradient of the global batch, whatever the strategy and the number of ranks.
        num_supervised = int(all_reduce_sum(
            sum(int((b["labels"][:, 1:] != IGNORE_INDEX).sum()) for b in micro_batches), topology))
        step_loss_sum = 0.0
        for batch in micro_batches:
            loss_sum, _ = token_losses(model, batch, precision, device.type)
            strategy.backward(loss_sum * topology.world_size / max(1, num_supervised))
            step_loss_sum += float(loss_sum.detach())
            tokens_since_log += int(batch["num_tokens"])
            sequences_since_log += int(batch.get("num_sequences", batch["input_ids"].shape[0]))
        supervised_since_log += num_supervised
        grad_norm = strategy.step()
        step_loss = all_reduce_sum(step_loss_sum, topology) / max(1, num_supervised)
        step += 1
        first_loss = step_loss if first_loss is None else first_loss
        last_loss = step_loss

        if step % tcfg.log_every == 0 or step == total_steps:
            elapsed = time.time() - step_start
            record = {
                "step": step,
                "epoch": samples_consumed / len(train_samples),
                "loss": step_loss,
                "lr": strategy.lr(),
                "grad_norm": grad_norm,
                "tokens_per_s": all_reduce_sum(tokens_since_log, topology) / elapsed,
                "tokens_per_s_per_rank": tokens_since_log / elapsed,
                "supervised_tokens_per_s": supervised_since_log / elapsed,
            }
            record["peak_memory_gb"] = peak_memory_gb(device)
            if gpu_peak_flops:  # MFU with the LoRA-aware FLOPs count (llmft/flops.py)
                per_token = flops_per_token(num_params, num_trainable, hf_config.num_hidden_layers,
                                            hf_config.hidden_size, tokens_since_log / max(1, sequences_since_log),
                                            lora=cfg.peft.method.value != "full")
                record["mfu"] = per_token * record["tokens_per_s_per_rank"] / gpu_peak_flops
            metrics.write(record)
            metrics.show(step, record)
            step_start, tokens_since_log, supervised_since_log, sequences_since_log = time.time(), 0, 0, 0
        if step % tcfg.eval_every == 0 or step == total_steps:
            val_loss = evaluate(model, val_samples, tcfg.micro_batch_size, tokenizer.pad_token_id, precision, device,
                                flash_attention)
            metrics.write({"step": step, "val_loss": val_loss})
            metrics.show(step, {"val_loss": val_loss})
        saved = tcfg.save_every > 0 and step % tcfg.save_every == 0 and step < total_steps
        if saved:
            save_checkpoint()
        stop_signal = stop.agreed(topology)
        if stop_signal:
            if not saved:
                save_checkpoint()
            barrier(topology)
            metrics.close()
            stop.restore()
            raise Interrupted(step, signal.Signals(stop_signal).name, requeue_slurm_job(cfg, topology))
    metrics.close()
    stop.restore()

    # ---------------------------------------------------------------- final save and summary
    final_dir = run_dir / "final"
    trainable_state = strategy.trainable_state_for_export()  # a collective: every rank takes part
    if topology.is_main:
        save_final(peft_model, trainable_state, tokenizer, final_dir, base_model_path)
    barrier(topology)
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
        "strategy": cfg.parallelism.strategy.value,
        "sharding_rank0": sharding,
        "load_host_rss_mb_all_ranks": load_rss_mb,
        "wall_time_s": time.time() - started,
        "final_dir": str(final_dir),
        "base_model_path": str(base_model_path),
    }
    if topology.is_main:
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    return TrainResult(summary, peft_model, tokenizer)


def run(run_dir: Path) -> TrainResult:
    """Train from a run directory, recording a failure in summary.json before it propagates."""
    cfg = load_run_config(run_dir)
    try:
        return train(cfg, run_dir)
    except Interrupted as stop:
        if Topology.from_env().is_main:
            summary = {"status": "requeued" if stop.requeued else "interrupted", "step": stop.step,
                       "signal": stop.signal_name, "resume": f"python -m llmft.launch resume={Path(run_dir).resolve()}"}
            (Path(run_dir) / "summary.json").write_text(json.dumps(summary, indent=2))
        raise
    except Exception as error:
        if Topology.from_env().is_main:
            summary = {"status": "failed", "error": f"{type(error).__name__}: {error}"}
            (Path(run_dir) / "summary.json").write_text(json.dumps(summary, indent=2))
        raise
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m llmft.train RUN_DIR   (the run directory that llmft.launch created)", file=sys.stderr)
        return 2
    try:
        run(Path(argv[0]))
    except (ConfigError, DataError, TemplateError, checkpoint.CheckpointError) as error:
        print(f"llmft: {error}", file=sys.stderr)
        return 2
    except Interrupted as stop:
        if Topology.from_env().is_main:
            print(f"llmft: {stop}; the checkpoint is saved. Continue with: "
                  f"python -m llmft.launch resume={Path(argv[0]).resolve()}", file=sys.stderr)
        return 3
    if Topology.from_env().is_main and "TORCHELASTIC_RUN_ID" not in os.environ:  # torchrun: launch prints it
        print(f"run dir: {Path(argv[0]).resolve()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
