"""The training loop, as a recipe with named steps (torchtune's shape, torchtitan's step split).

    python -m llmft.train RUN_DIR      # one process per rank; the config is RUN_DIR/config.yaml

`llmft.launch` creates the run directory and starts this (in-process for one rank, else torchrun or SLURM tasks).

    Trainer(cfg, run_dir)   setup: process group -> strategy -> data and tokenizer -> model -> wrap (optimizer)
    Trainer.train()         resume, then per step: train_step -> log -> validate -> checkpoint -> stop signals,
                            then the final export
      train_step()            the micro-batches of one optimizer step, one gradient reduction, the optimizer
        forward_backward()    one micro-batch: the objective's loss (sft, dpo, kto: training/objectives.py), backward

State that must survive a restart is `TrainState` (step, samples consumed) plus the RNG states, written with every
checkpoint. The data is one stream of samples, epoch after epoch, each epoch in an order fixed by (seed, epoch); a
step takes the next `samples_per_step`, so the data position is one integer, valid on any world size.
"""

from __future__ import annotations

import json
import math
import os
import random
import signal
import subprocess
import sys
import time
import warnings
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import peft  # noqa: F401  (imported here, not inside the load: the load's memory figure is the model's alone)
import torch
import torch.distributed as dist

from llmft.config.families import model_family
from llmft.config.schema import PeftMethod
from llmft.data.tokenize.batching import epoch_order
from llmft.data.prepare.reading import read_conversations
from llmft.data.prepare.samples_for_run import build_splits
from llmft.data.tokenize.tokenizer import load_tokenizer, tokenizer_for_run
from llmft.errors import UserError, report
from llmft.rundir import checkpoints, lock
from llmft.rundir.files import read_config, write_summary as write_summary_file
from llmft.rundir.init_from import starting_adapter
from llmft.rundir.layout import checkpoints_dir, metrics_path
from llmft.rundir.lifetime import LAUNCHER_PID_ENV, die_with_launcher
from llmft.config.compose import to_container
from llmft.training import attention, objectives, precision, strategies, tracking
from llmft.training.final import save_final
from llmft.training.flops import flops_per_token, peak_flops
from llmft.training import loss as supervised_loss
from llmft.training.metrics import (MemoryMeter, MetricsLog, peak_resident_mb, quiet_progress_bars,
                                    reset_peak_resident, resident_mb)
from llmft.training.model import causal_lm_class, count_parameters, load_model
from llmft.training import signals
from llmft.training.signals import EXPORT_GRACE_S, Interrupted, StopSignals, requeue_slurm_job
from llmft.training.time_limit import WRITE_BYTES_PER_S, TimeLimit, busiest_writer_bytes, job_end_time
from llmft.training.topology import Topology, cpu_binding_warning


@dataclass
class TrainState:
    """What a checkpoint restores besides the weights, the optimizer and the RNG states."""

    step: int = 0
    samples_consumed: int = 0


@dataclass
class Progress:
    """What the run has seen so far, for the log, the checkpoints' manifests and summary.json."""

    first_loss: float | None = None
    logged_first_loss: float | None = None  # a resumed run's first loss, from metrics.jsonl (rank 0)
    last_loss: float | None = None
    val_loss: float | None = None
    val_loss_step: int | None = None  # the step `val_loss` was measured at
    # since the last log line: kept on the device or as Python ints, read at logging steps only
    loss_sum: torch.Tensor | None = None  # the last step's summed losses on this rank
    count: torch.Tensor | None = None  # and what they average over (supervised tokens, pairs...) on all ranks
    sums: dict = field(default_factory=dict)  # the last step's metric sums of the objective on this rank
    grad_norm: torch.Tensor | float | None = None
    tokens: int = 0
    supervised_tokens: int = 0
    sequences: int = 0
    interval_start: float = field(default_factory=time.time)


@dataclass
class TrainResult:
    summary: dict
    model: torch.nn.Module
    tokenizer: object


class Trainer:
    def __init__(self, cfg, run_dir: Path):
        self.cfg, self.tcfg, self.run_dir = cfg, cfg.train, Path(run_dir)
        self.started = time.time()
        self.tracking: tracking.MlflowTracking | None = None  # rank 0 with train.mlflow=true, from train()
        self.state, self.progress = TrainState(), Progress()
        # a stop signal recorded since the process started is honoured at each boundary before the first step
        self._setup_process()
        self._setup_data()
        self.stop_before_training("reading the data")
        self._setup_model()
        self.stop_before_training("loading the model")

    # ------------------------------------------------------------------------------------------------ setup

    def _setup_process(self) -> None:
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")  # transformers 5, through PEFT
        self.topology = topology = Topology.from_env()
        quiet_progress_bars()
        die_with_launcher()  # under torchrun: SIGKILL if torchrun dies before training (python -m llmft.train asks first)
        if topology.is_main:  # one writer per run directory: this rank holds it until the run ends
            lock.acquire(self.run_dir, log=self.log)
        self.device = topology.device
        os.umask(int(str(self.cfg.umask), 8))  # every rank writes into the run directory (see llmft.rundir.create)
        topology.init_process_group(self.tcfg.collective_timeout_min)
        self.stop = StopSignals(topology)
        self.compute = precision.compute_dtype(self.tcfg.precision, topology.device_type)
        self.strategy = strategies.build(self.cfg, topology, self.compute)
        random.seed(self.tcfg.seed)
        np.random.seed(self.tcfg.seed)
        torch.manual_seed(self.tcfg.seed)
        if self.device.type == "cpu":
            torch.use_deterministic_algorithms(True)
        self.stop_before_training("starting")  # before the line below: a signal sent once it shows is a later phase's
        self.log(f"llmft: model={self.cfg.model.name} peft={self.cfg.peft.method.value} strategy={self.strategy.name} "
                 f"world_size={topology.world_size} device={self.device} precision={precision.NAMES[self.compute]}")
        binding = cpu_binding_warning()
        if binding:
            self.log(binding)

    def _setup_data(self) -> None:
        cfg, topology = self.cfg, self.topology
        conversations, self.read_report = read_conversations(cfg.data)
        if cfg.model.path is None:  # the tiny model: a tokenizer trained on this run's texts, by rank 0
            tokenizer_dir = self.run_dir / "base_model"
            if topology.is_main:
                tokenizer_for_run(cfg, conversations).save_pretrained(tokenizer_dir)
            topology.barrier()
            self.tokenizer = load_tokenizer(str(tokenizer_dir), None)
        else:
            self.tokenizer = load_tokenizer(cfg.model.path, cfg.model.fallback_chat_template)
        splits, self.prep_counts = build_splits(conversations, self.tokenizer, cfg.data, cfg.model.max_seq_len)
        self.train_samples, self.val_samples = splits["train"], splits["validation"]
        on_gpu = self.device.type == "cuda"
        self.attention = attention.choose(
            cfg.model.attn_implementation, model_family(cfg.model), self.device.type, self.compute is not None,
            "packed_rows" in self.prep_counts, causal_lm_class(cfg.model) if on_gpu else None,
            torch.cuda.get_device_capability(self.device) if on_gpu else None, compiled=cfg.train.compile)
        self.flatten = attention.lays_rows_end_to_end(self.attention)
        samples = self.prep_counts["samples"]  # the same counts as summary.json's data.samples / data.packed_rows
        rows = self.prep_counts.get("packed_rows")
        self.log(f"data: {len(conversations)} conversations ({len(self.read_report['skipped'])} bad records skipped),"
                 f" {samples['train']} train / {samples['validation']} validation samples"
                 + (f", packed into {rows['train']} / {rows['validation']} rows of {cfg.model.max_seq_len} tokens"
                    if rows else "") + f"; attention: {self.attention}")

    def _setup_model(self) -> None:
        tcfg, topology = self.tcfg, self.topology
        rss_before_load_mb = resident_mb()
        reset_peak_resident()  # the peak of the load itself, not of the data preparation before it
        model, self.base_model_path = load_model(self.cfg, self.strategy, self.tokenizer, self.run_dir, topology,
                                                self.attention, self.compute)
        self.num_params, self.num_trainable = count_parameters(model, self.strategy.full_shape)
        hf_model = model.get_base_model() if hasattr(model, "get_base_model") else model
        self.loss_head = supervised_loss.install(hf_model, tcfg.loss_head, topology.device_type,
                                                 self.strategy.partitions_parameters)
        self.log(f"model: {self.num_params:,} parameters, {self.num_trainable:,} trainable; loss head: "
                 f"{self.loss_head}")
        if starting_adapter(self.cfg) is not None:
            self.log(f"model: the LoRA starts from the final adapter of {self.cfg.init_from} (init_from)")
        self.micro_batch_across_ranks = tcfg.micro_batch_size * topology.world_size
        self.total_steps = self.plan_steps(self.micro_batch_across_ranks * tcfg.grad_accum_steps)
        self.peft_model = model  # the PEFT (or HF) model, for export; `self.model` is the wrapped one
        self.model = self.strategy.wrap(
            model, [p for p in model.parameters() if p.requires_grad],
            lambda s: warmup_cosine(s, tcfg.warmup_steps, self.total_steps, tcfg.min_lr_ratio))
        self.sharding = self.strategy.sharding_report()  # now: after a forward FSDP2 keeps the root unsharded
        # Host RAM that loading and sharding took on this rank, summed over ranks (peak since start minus before).
        self.load_rss_mb = float(self.all_reduce(torch.tensor(peak_resident_mb() - rss_before_load_mb,
                                                              dtype=torch.float64)))
        self.log(f"memory: loading the model took {self.load_rss_mb:,.0f} MB of host RAM over "
                 f"{topology.world_size} rank(s)")
        hf_config = self.peft_model.config
        self.gpu_peak_flops = peak_flops(torch.cuda.get_device_name(self.device), precision.NAMES[self.compute]) \
            if self.device.type == "cuda" else None
        self.num_layers, self.hidden_size = hf_config.num_hidden_layers, hf_config.hidden_size
        self.memory = MemoryMeter(self.device)
        self.objective = objectives.build(self.cfg, self.peft_model, self.tokenizer.pad_token_id, self.compute,
                                          self.flatten, self.all_reduce, self.loss_head, self.device)

    def plan_steps(self, samples_per_step: int) -> int:
        """The run's optimizer steps: as many as train.epochs take, capped by train.max_steps; a cap from the epochs
        that stops the run before train.max_steps is said, with the train.epochs that would reach it."""
        tcfg = self.tcfg
        num_train = len(self.train_samples)
        epoch_steps = math.ceil(tcfg.epochs * num_train / samples_per_step)
        if tcfg.max_steps <= 0:
            return epoch_steps
        if 0 < epoch_steps < tcfg.max_steps:
            epochs = f"{tcfg.epochs} epoch{' ends' if tcfg.epochs == 1 else 's end'}"
            reach = math.ceil(tcfg.max_steps * samples_per_step / num_train)
            self.log(f"train.max_steps={tcfg.max_steps} but {epochs} at step {epoch_steps} ({num_train} samples, "
                     f"{samples_per_step} a step): stopping there; raise train.epochs (train.epochs={reach} reaches "
                     f"step {tcfg.max_steps}).")
        return min(epoch_steps, tcfg.max_steps)

    # ------------------------------------------------------------------------------------------------ the loop

    def train(self) -> TrainResult:
        self.resume()
        self.stop_before_training("resuming")
        self.objective.before_training({"train": self.train_samples, "validation": self.val_samples},
                                       self.tcfg.micro_batch_size, self.topology, self.run_dir,
                                       resumed=self.state.step > 0, log=self.log)
        self.stop_before_training("preparing the objective")
        die_with_launcher(signal.SIGTERM)  # from here torchrun's death stops the run at the next step, checkpointed
        if self.topology.is_main:
            forget_metrics_after(metrics_path(self.run_dir), self.state.step)
        if self.topology.is_main and self.tcfg.mlflow:  # ended with the run's status when summary.json is written
            self.tracking = tracking.MlflowTracking(self.run_dir, to_container(self.cfg), self.strategy.name,
                                                    self.topology.world_size)
        metrics = MetricsLog(metrics_path(self.run_dir), self.total_steps, self.state.step,
                             enabled=self.topology.is_main, use_wandb=self.tcfg.wandb, mlflow=self.tracking,
                             guard=self.guard_write)
        job_id = os.environ.get("SLURM_JOB_ID")
        sharded = self.strategy.name not in ("single", "ddp")
        self.time_limit = TimeLimit(
            self.cfg.cluster.signal_delay_s if self.cfg.cluster is not None else 120,
            job_end_time(job_id) if job_id and self.topology.is_main else None, self.log,
            busiest_writer_bytes(self.num_trainable, self.topology.world_size, sharded) / WRITE_BYTES_PER_S)
        with metrics:
            while self.state.step < self.total_steps:
                with self.time_limit.timed("step"):
                    self.train_step()
                step, last = self.state.step, self.state.step == self.total_steps
                if step % self.tcfg.log_every == 0 or last:
                    self.log_metrics(metrics)
                validating = step % self.tcfg.eval_every == 0 or last
                # a stop agreed now skips the validation: the margin before the time limit is for the checkpoint
                stop_signal = self.stop.agreed(self.time_limit_stop()) if validating else 0
                if validating and not stop_signal:
                    with self.time_limit.timed("validation"):
                        self.validate(metrics)
                # the last step too: a completed run trains on from it (resume= with a larger train.max_steps)
                saved = last or (self.tcfg.save_every > 0 and step % self.tcfg.save_every == 0)
                if saved:
                    with self.time_limit.timed("save"):
                        self.save_checkpoint()
                stop_signal = stop_signal or self.stop.agreed(self.time_limit_stop())
                if stop_signal:
                    self.stop_at_signal(stop_signal, saved)
        return self.finish()

    def time_limit_stop(self) -> int:
        """Rank 0's own reason to stop (signals.TIME_LIMIT): the job's end is nearer than a stop costs and SLURM's
        USR2 would come too late for it (training/time_limit.py); 0 otherwise."""
        if not (self.topology.is_main and self.time_limit.near()):
            return 0
        self.log(f"time limit: the job ends in {self.time_limit.end_time - time.time():.0f} s and a stop costs "
                 f"{self.time_limit.stop_cost():.0f} s: checkpointing and requeueing now")
        return signals.TIME_LIMIT

    def train_step(self) -> None:
        """One optimizer step over `grad_accum_steps` micro-batches, normalised by the objective's count (supervised
        tokens, pairs, examples) of the whole step on all ranks: every rank divides by the global count, and the
        factor world_size undoes the gradient averaging of DDP, FSDP and ZeRO. The result is the exact mean gradient
        of the global batch, whatever the strategy, the number of ranks and of micro-batches. Gradients are reduced
        once, at the last micro-batch."""
        micro_batches = [self.next_micro_batch() for _ in range(self.tcfg.grad_accum_steps)]
        count = self.all_reduce(torch.tensor(sum(b.count for b in micro_batches), dtype=torch.float64))
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        sums: dict[str, torch.Tensor] = {}
        for index, batch in enumerate(micro_batches):
            last = index == len(micro_batches) - 1
            with nullcontext() if last else self.strategy.no_gradient_sync():
                loss, batch_sums = self.forward_backward(batch, count)
            loss_sum += loss
            for key, value in batch_sums.items():
                sums[key] = sums.get(key, 0.0) + value.double()
        self.progress.grad_norm = self.strategy.step()
        self.progress.loss_sum, self.progress.count, self.progress.sums = loss_sum, count, sums  # on device
        self.state.step += 1
        if self.progress.first_loss is None:
            self.progress.first_loss = self.step_loss()  # host sync: the first step only

    def forward_backward(self, batch: objectives.MicroBatch, count: torch.Tensor):
        loss_sum, sums = self.objective.loss(self.model, batch)
        self.strategy.backward(loss_sum * self.topology.world_size / count.clamp(min=1).to(loss_sum.dtype))
        return loss_sum.detach().double(), sums

    def next_micro_batch(self) -> objectives.MicroBatch:
        """This rank's share (every world_size-th sample) of the next micro-batch across ranks, on its device, with
        its count (from the samples on the host: no device sync)."""
        num_train = len(self.train_samples)
        positions = range(self.state.samples_consumed, self.state.samples_consumed + self.micro_batch_across_ranks)
        stream = [epoch_order(num_train, self.tcfg.seed, k // num_train)[k % num_train] for k in positions]
        self.state.samples_consumed += self.micro_batch_across_ranks
        batch = self.objective.micro_batch(self.train_samples, stream, self.topology.rank, self.topology.world_size)
        self.progress.tokens += batch.tokens
        self.progress.supervised_tokens += batch.supervised_tokens
        self.progress.sequences += batch.sequences  # real sequences, not packed rows
        return batch.to(self.device)

    # ------------------------------------------------------------------------------------------------ log, validate

    def step_loss(self) -> float:
        """The last step's token-mean loss over all ranks (a collective and a host read: every rank calls it, at the
        first step and at logging steps only)."""
        return float(self.all_reduce(self.progress.loss_sum.clone())) / max(1.0, float(self.progress.count))

    def log_metrics(self, metrics: MetricsLog) -> None:
        progress = self.progress
        progress.last_loss = self.step_loss()  # host syncs: at logging steps only
        elapsed = max(1e-9, time.time() - progress.interval_start)
        tokens_all_ranks = float(self.all_reduce(torch.tensor(progress.tokens, dtype=torch.float64)))
        supervised_all_ranks = float(self.all_reduce(torch.tensor(progress.supervised_tokens, dtype=torch.float64)))
        record = {
            "step": self.state.step,
            "epoch": self.state.samples_consumed / len(self.train_samples),
            "loss": progress.last_loss,
            "lr": self.strategy.lr(),
            "grad_norm": float(progress.grad_norm),
            "tokens_per_s": tokens_all_ranks / elapsed,
            "tokens_per_s_per_rank": progress.tokens / elapsed,
            "supervised_tokens_per_s": supervised_all_ranks / elapsed,
            "peak_memory_gb": float(self.all_reduce(torch.tensor(self.memory.interval_peak_gb(),
                                                                 dtype=torch.float64), op="max")),
        }
        if self.gpu_peak_flops:  # MFU with the LoRA-aware FLOPs count (training/flops.py), per real sequence
            per_token = flops_per_token(self.num_params, self.num_trainable, self.num_layers, self.hidden_size,
                                        progress.tokens / max(1, progress.sequences),
                                        lora=self.cfg.peft.method is not PeftMethod.full)
            record["mfu"] = per_token * record["tokens_per_s_per_rank"] / self.gpu_peak_flops
        if progress.sums:  # DPO / KTO: rewards, margins, accuracy of the last step over all ranks
            names = sorted(progress.sums)
            reduced = self.all_reduce(torch.stack([progress.sums[k].reshape(()) for k in names]))
            record.update(self.objective.metrics(dict(zip(names, reduced.tolist())), float(progress.count)))
        metrics.write(record)
        metrics.show(self.state.step, record)
        if self.topology.is_main:
            lock.heartbeat(self.run_dir)
        progress.tokens = progress.supervised_tokens = progress.sequences = 0
        progress.interval_start = time.time()

    def validate(self, metrics: MetricsLog) -> None:
        if not self.val_samples:  # data.validation_fraction=0: every ticket trains
            return
        val_loss, val_metrics = validation_loss(self.model, self.objective, self.val_samples,
                                                self.tcfg.micro_batch_size, self.device)
        self.progress.val_loss, self.progress.val_loss_step = val_loss, self.state.step
        record = {"val_loss": val_loss, **{f"val_{k}": v for k, v in val_metrics.items()}}
        metrics.write({"step": self.state.step, **record})
        metrics.show(self.state.step, record)

    # ------------------------------------------------------------------------------------------------ checkpoints

    def save_checkpoint(self) -> None:
        state = self.state

        def write(folder: Path) -> None:
            self.strategy.save(folder)
            torch.save({"rng": rng_state(self.device), **asdict(state)}, folder / f"state_rank{self.topology.rank}.pt")

        # a checkpoint is ranked by the validation loss of its own step, never by an older one
        own_val_loss = self.progress.val_loss if self.progress.val_loss_step == state.step else None
        meta = {"world_size": self.topology.world_size, "strategy": self.strategy.name, "val_loss": own_val_loss,
                "total_steps": self.total_steps}  # the steps its LR schedule was planned for
        path = checkpoints.save(checkpoints_dir(self.run_dir), state.step, write, meta, self.tcfg.keep_last,
                               barrier=self.topology.barrier, is_main=self.topology.is_main,
                               gather=self.topology.gather, rank=self.topology.rank,
                               timeout_min=self.tcfg.save_timeout_min)
        self.log(f"checkpoint: {path}")

    def resume(self) -> None:
        """Continue from the newest complete checkpoint on this job's ranks, whatever their number when it was written:
        the data position is a sample count and every strategy reshards its state (replicas need nothing, FSDP2's DCP
        reshards, ZeRO goes through DeepSpeed's universal checkpoint). The step must take as many samples as the
        checkpoint's steps did (`llmft.launch resume=` adjusts train.grad_accum_steps to keep it), else the data
        position and the LR schedule would mean something else: refused."""
        latest, incomplete = checkpoints.find_latest(checkpoints_dir(self.run_dir))
        for skipped in incomplete:  # each says what is wrong and what is resumed from instead
            self.log(f"checkpoint: skipping {skipped}")
        if latest is None:
            return
        manifest = checkpoints.read_manifest(latest)
        saved_world_size = manifest["world_size"]
        own = latest / f"state_rank{self.topology.rank}.pt"  # a rank the checkpoint did not have starts from rank 0's
        saved = torch.load(own if own.exists() else latest / "state_rank0.pt", weights_only=False)
        samples_per_step = self.micro_batch_across_ranks * self.tcfg.grad_accum_steps
        if saved["samples_consumed"] != saved["step"] * samples_per_step:
            raise UserError(
                f"{latest} was trained with {saved['samples_consumed'] // max(1, saved['step'])} samples per optimizer "
                f"step and this job takes {samples_per_step} (train.micro_batch_size={self.tcfg.micro_batch_size} x "
                f"{self.topology.world_size} ranks x train.grad_accum_steps={self.tcfg.grad_accum_steps}): resume it "
                f"with python -m llmft.launch resume={self.run_dir}, which keeps the global batch on any number of "
                f"ranks by adjusting train.grad_accum_steps.")
        try:
            self.strategy.load(latest)
        except signals.StoppedEarly as stopped:  # a rank recorded a stop signal: the ranks agree on it and stop
            self.state = TrainState(step=saved["step"], samples_consumed=saved["samples_consumed"])  # the last saved
            self.stop_before_training(stopped.phase)
            raise
        set_rng_state(saved["rng"], self.device)
        self.state = TrainState(step=saved["step"], samples_consumed=saved["samples_consumed"])
        self.progress_until(self.state.step)
        self.log(f"resume: from {latest} (step {self.state.step}, saved with world size {saved_world_size}"
                 + (f", now {self.topology.world_size}" if saved_world_size != self.topology.world_size else "") + ")")
        planned = manifest.get("total_steps")  # (checkpoints older than this record: not known)
        if planned is not None and planned != self.total_steps:  # the strategy re-planned the LR at load: say so
            self.log(f"resume: the LR schedule is re-planned over {self.total_steps} steps instead of {planned} "
                     f"(warmup {self.tcfg.warmup_steps}, then cosine to {self.tcfg.min_lr_ratio} x train.lr): step "
                     f"{self.state.step + 1} trains at lr {self.strategy.lr():.3g}")

    def progress_until(self, step: int) -> None:
        """The losses the run had logged by `step` (metrics.jsonl), for rank 0's summary.json: a resumed run reports
        its first loss, and its last ones even when nothing is left to train (a run stopped during its final
        export). Not `first_loss`, which every rank reads at the first step (a collective)."""
        path = metrics_path(self.run_dir)
        if not self.topology.is_main or not path.exists():
            return
        for line in path.read_text().splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue  # a line cut by a crash
            if record.get("step", 0) > step:
                continue
            if "loss" in record:
                if self.progress.logged_first_loss is None:
                    self.progress.logged_first_loss = record["loss"]
                self.progress.last_loss = record["loss"]
            if "val_loss" in record:
                self.progress.val_loss, self.progress.val_loss_step = record["val_loss"], record["step"]

    def stop_at_signal(self, stop_signal: int, saved: bool, phase: str | None = None) -> None:
        """Stop every rank together (they agreed on `stop_signal`): the checkpoint of this step unless `saved`
        (before the first step there is nothing new to save, during the export the last step's is saved), then
        rank 0 requeues the SLURM job."""
        if not saved:
            self.save_checkpoint()
        self.topology.barrier()
        raise Interrupted(self.state.step, signals.name_of(stop_signal),
                          requeue_slurm_job(self.max_requeues(), self.topology), phase)

    def max_requeues(self) -> int:
        return self.cfg.cluster.max_requeues if self.cfg.cluster is not None else 3  # templates: no cluster profile

    def stop_before_training(self, phase: str) -> None:
        """A phase boundary before the first step: the ranks agree on a stop signal recorded so far, and stop."""
        stop_signal = self.stop.agreed()
        if stop_signal:
            self.stop_at_signal(stop_signal, saved=True, phase=phase)

    def finish(self) -> TrainResult:
        """The final model, then summary.json. A stop signal does not cut the export (a collective under fsdp and
        zero3, seconds for an adapter; final/ appears whole or not at all): one that came before it stopped the loop
        at the last step, with its checkpoint. An export still running `EXPORT_GRACE_S` after a signal (a whole
        model) gets the SLURM job requeued and goes on: it finishes, or SLURM ends it and the next attempt, with
        nothing left to train, writes final/ from the last step's checkpoint."""
        final_dir = self.run_dir / "final"
        export_started, self.export_requeued = time.time(), False
        tensors = self.strategy.export_tensors()  # gathered one at a time: every rank iterates to the end
        if self.topology.is_main:
            with self.guard_write(f"writing the final model into {final_dir}"):
                save_final(self.peft_model, self.requeued_when_late(tensors), self.strategy.full_shape,
                           self.tokenizer, final_dir, self.base_model_path)
        else:
            for _ in tensors:
                pass
        self.topology.barrier()
        late_signal = self.stop.agreed()
        if late_signal:
            self.log(f"llmft: {signal.Signals(late_signal).name} came during the final export, which finished in "
                     f"{time.time() - export_started:.1f} s: the run is complete"
                     + (" (the requeued job finds it so)" if self.export_requeued else ""))
        summary = {
            "status": "completed",
            "steps": self.state.step,
            "total_steps": self.total_steps,
            "first_loss": self.progress.logged_first_loss if self.progress.logged_first_loss is not None
            else self.progress.first_loss,
            "final_loss": self.progress.last_loss,
            "final_val_loss": self.progress.val_loss,
            "num_parameters": self.num_params,
            "num_trainable_parameters": self.num_trainable,
            "num_train_samples": len(self.train_samples),  # rows the loop draws from (packed rows when packing)
            "num_validation_samples": len(self.val_samples),
            "data": {**self.read_report, **self.prep_counts},
            "world_size": self.topology.world_size,
            "strategy": self.strategy.name,
            "precision": precision.NAMES[self.compute],
            "sharding_rank0": self.sharding,
            "load_host_rss_mb_all_ranks": self.load_rss_mb,
            "wall_time_s": time.time() - self.started,
            "final_dir": str(final_dir),
            "base_model_path": str(self.base_model_path),
            "init_from": self.cfg.init_from,  # the run whose final model this one started from (or None)
        }
        if self.topology.is_main:
            write_summary(self.run_dir, summary, self.tracking, self.tcfg.save_timeout_min)
        return TrainResult(summary, self.peft_model, self.tokenizer)

    def guard_write(self, doing: str) -> checkpoints.StallWatchdog:
        return checkpoints.guard_write(doing, self.tcfg.save_timeout_min, self.topology.rank)

    def requeued_when_late(self, tensors):
        """Rank 0's `tensors`, as they come; once this rank's stop signal is EXPORT_GRACE_S old, the SLURM job is
        requeued (once), summary.json and one line say so, and the export goes on (no collective: under single and
        ddp the other ranks wait at the barrier)."""
        asked = False
        for item in tensors:
            yield item
            waited = signals.seconds_since_received()
            if not asked and waited is not None and waited >= EXPORT_GRACE_S:
                asked = True
                self.export_requeued = self.requeue_during_export(waited)

    def requeue_during_export(self, waited: float) -> bool:
        try:
            if not requeue_slurm_job(self.max_requeues(), self.topology):
                return False  # not a SLURM job (or no requeue left): the export goes on to its end
        except (OSError, subprocess.SubprocessError) as error:  # the export goes on, whatever SLURM says
            self.log(f"llmft: the final export still runs {waited:.0f} s after a stop signal, and the SLURM job could "
                     f"not be requeued: {error}")
            return False
        name = signal.Signals(signals.received()).name
        resume = f"python -m llmft.launch resume={self.run_dir.resolve()}"
        message = (f"{name} came while writing the final model after step {self.state.step}, which still runs "
                   f"{waited:.0f} s later: the SLURM job is requeued; if this attempt ends first, the next one writes "
                   f"final/ from the checkpoint of step {self.state.step}")
        write_summary_file(self.run_dir, {"status": "requeued", "step": self.state.step, "signal": name,
                                          "phase": "writing the final model", "resume": resume, "message": message})
        self.log(f"llmft: {message}")
        return True

    # ------------------------------------------------------------------------------------------------ helpers

    def log(self, message: str) -> None:
        if self.topology.is_main:
            print(message, flush=True)

    def all_reduce(self, tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
        """A reduction over ranks on this rank's device (no host sync); the tensor itself with one rank."""
        tensor = tensor.to(self.device)
        if self.topology.is_distributed:
            dist.all_reduce(tensor, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
        return tensor


def warmup_cosine(step: int, warmup_steps: int, total_steps: int, min_lr_ratio: float) -> float:
    """LR multiplier: linear warmup from 0, then cosine decay to `min_lr_ratio`."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


@torch.no_grad()
def validation_loss(model, objective, samples, micro_batch_size: int, device) -> tuple[float, dict[str, float]]:
    """The objective's mean loss (token-mean for sft) on `samples`, and its metrics (every rank computes them on all
    of the samples)."""
    model.eval()
    total_loss = torch.zeros((), dtype=torch.float64, device=device)
    total_count = 0
    sums: dict[str, torch.Tensor] = {}
    for start in range(0, len(samples), micro_batch_size):
        indices = list(range(start, min(start + micro_batch_size, len(samples))))
        batch = objective.micro_batch(samples, indices, 0, 1, split="validation").to(device)
        loss_sum, batch_sums = objective.loss(model, batch)
        total_loss += loss_sum.double()
        total_count += batch.count
        for key, value in batch_sums.items():
            sums[key] = sums.get(key, 0.0) + value.double()
    model.train()
    metrics = objective.metrics({k: float(v) for k, v in sums.items()}, float(total_count)) if sums else {}
    return float(total_loss) / max(1, total_count), metrics


def rng_state(device: torch.device) -> dict:
    """Python, NumPy and torch RNG states, and the CUDA one of this rank's own GPU (a resume on nodes with another
    number of GPUs then finds what it needs)."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict, device: torch.device) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and isinstance(state.get("cuda"), torch.Tensor):
        torch.cuda.set_rng_state(state["cuda"], device)


def forget_metrics_after(path: Path, step: int) -> None:
    """Drop the records of steps after `step` (trained before a crash, after the checkpoint we resume from): they
    are trained again, and metrics.jsonl never holds a step twice."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line).get("step", 0) <= step:
                kept.append(line)
        except ValueError:
            continue  # a line cut by a crash
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(line + "\n" for line in kept))
    os.replace(tmp, path)


def write_summary(run_dir: Path, summary: dict, mlflow: "tracking.MlflowTracking | None",
                  timeout_min: float = checkpoints.DEFAULT_SAVE_TIMEOUT_MIN) -> None:
    """summary.json, then the MLflow run (if any) ended with the same status; bounded in time like a save."""
    with checkpoints.guard_write(f"writing {run_dir / 'summary.json'}", timeout_min):
        write_summary_file(run_dir, summary)
        if mlflow is not None:
            mlflow.end(summary)


def train(cfg, run_dir: Path) -> TrainResult:
    return Trainer(cfg, run_dir).train()


def run(run_dir: Path) -> TrainResult:
    """Train from a run directory; whatever stops the run, summary.json says how and why before it propagates. Stop
    signals are recorded from here (for submitit's tasks; `python -m llmft.train` records them from its start)."""
    with signals.recording():
        return _run(run_dir)


def _run(run_dir: Path) -> TrainResult:
    cfg = read_config(run_dir)
    is_main = Topology.from_env().is_main
    trainer = None
    try:
        trainer = Trainer(cfg, run_dir)
        return trainer.train()
    except Interrupted as stop:
        if is_main:
            write_summary(run_dir, stop.summary(run_dir), trainer.tracking if trainer else None,
                          cfg.train.save_timeout_min)
        raise
    except BaseException as error:  # KeyboardInterrupt (a second Ctrl-C) and SystemExit included
        if is_main:
            reason = str(error).strip().splitlines()[0] if str(error).strip() else ""
            write_summary(run_dir, {"status": "failed", "error": f"{type(error).__name__}: {reason}".rstrip(": ")},
                          trainer.tracking if trainer else None, cfg.train.save_timeout_min)
        raise
    finally:
        if is_main:
            lock.release(run_dir)
        if dist.is_initialized():
            dist.destroy_process_group()


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1 or argv[0] in ("-h", "--help"):
        print("usage: python -m llmft.train RUN_DIR   (a run directory that llmft.launch created)",
              file=sys.stdout if argv[:1] in (["-h"], ["--help"]) else sys.stderr)
        return 0 if argv[:1] in (["-h"], ["--help"]) else 2
    try:
        run(Path(argv[0]))
    except UserError as error:
        return report(error)
    except Interrupted as stop:
        if Topology.from_env().is_main and LAUNCHER_PID_ENV not in os.environ:  # llmft.launch's torchrun: it prints
            print(f"llmft: {stop.sentence(f'python -m llmft.launch resume={Path(argv[0]).resolve()}')}",
                  file=sys.stderr)
        return 3
    if Topology.from_env().is_main and "TORCHELASTIC_RUN_ID" not in os.environ:  # torchrun: launch prints it
        print(f"run dir: {Path(argv[0]).resolve()}")
    return 0
