"""python -m llmft.plan [group=option ...] [group.key=value ...]: what a launch would do, without doing it.

Takes the overrides of `python -m llmft.launch` and prints the resources, parameters, memory per GPU with the verdict
(fits or not, and what to change), FLOPs, GPU-hours and requeues, and the exact sbatch script launch would submit.
Submits nothing, creates nothing but a scratch folder for submitit's renderer. Imports no torch.

    python -m llmft.plan model=llama3_8b +cluster=jeanzay cluster.account=abc
    python -m llmft.plan +cluster=jeanzay cluster.gpu=h100 cluster.nodes=2 model=llama3_8b peft=full parallelism=fsdp
    python -m llmft.plan model=smollm2_135m                      # a local run: parameters and memory
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

from omegaconf import DictConfig

from llmft.config.compose import compose, config_help
from llmft.config.validation import model_path_problem, settle_parallelism, validate
from llmft.errors import run_command
from llmft.launch import slurm
from llmft.launch.estimate import (GiB, advice, estimate, gpu_hours, hsdp_advice, largest_micro_batch,
                                   requeues_needed)
from llmft.training.time_limit import (REQUEUE_S, SAFETY, WRITE_BYTES_PER_S, advised_margin_s,
                                        busiest_writer_bytes)


ASSUMED_MFU = 0.4  # what FSDP LoRA / full fine-tuning of 7B models reaches on A100 and H100 (40-55 %)


def estimate_lines(cfg: DictConfig, world: int, gpu_memory_gb: float | None, peak_tflops: float | None,
                   qos_minutes: int | None, ranks_per_node: int | None = None) -> list[str]:
    ranks_per_node = ranks_per_node or world
    result = estimate(cfg, world, gpu_memory_gb, ranks_per_node)
    if result is None:
        return ["estimate     unknown model shape: give model.path with a config.json"]
    memory = ", ".join(f"{name.replace('_', ' ')} {value / GiB:.1f}" for name, value in result.memory.items())
    lines = [
        f"parameters  {result.total_params / 1e9:.2f} B, {result.trainable_params / 1e6:.1f} M trainable",
        f"memory/GPU  {result.memory_total / GiB:.1f} GiB ({memory} GiB; micro-batch "
        f"{cfg.train.micro_batch_size} x {cfg.model.max_seq_len} tokens, activation checkpointing "
        f"{'on' if cfg.train.activation_checkpointing else 'off'})",
    ]
    if result.fits is not None:
        verdict = "fits" if result.fits else "does NOT fit"
        lines.append(f"verdict     {verdict} in {gpu_memory_gb:.0f} GB per GPU (90% usable)")
        if not result.fits:
            lines.append("change      " + "; or ".join(advice(cfg, result, world, ranks_per_node)))
        else:
            hsdp = hsdp_advice(cfg, world, gpu_memory_gb, ranks_per_node)
            if hsdp:
                lines.append(f"advice      {hsdp}")
            largest = largest_micro_batch(cfg, world, gpu_memory_gb, ranks_per_node=ranks_per_node)
            if largest > cfg.train.micro_batch_size:
                lines.append(f"room        train.micro_batch_size up to {largest} fits (lower train.grad_accum_steps "
                             f"to keep the samples per step)")
    lines.append(f"compute     {result.flops_per_token / 1e9:.1f} GFLOP per token, {result.tokens_per_step:,} tokens "
                 f"per step")
    train_tokens = prepared_train_tokens(cfg)
    if cfg.train.max_steps > 0:
        total_tokens, what = cfg.train.max_steps * result.tokens_per_step, f"{cfg.train.max_steps} steps"
    elif train_tokens:
        total_tokens, what = cfg.train.epochs * train_tokens, f"{cfg.train.epochs} epoch(s) of {train_tokens:,} tokens"
    else:
        total_tokens, what = None, ""
        lines.append("cost        set train.max_steps, or data.prepared=DIR (a prepared dataset), for GPU-hours")
    if total_tokens and peak_tflops:
        hours = gpu_hours(result, total_tokens, world, peak_tflops, ASSUMED_MFU)
        wall = hours / world
        requeue = f", {requeues_needed(wall, qos_minutes)} requeue(s) at the QoS limit" if qos_minutes else ""
        lines.append(f"cost        {hours:,.1f} GPU-hours ({wall:,.1f} h wall) for {what} at "
                     f"{ASSUMED_MFU:.0%} MFU{requeue}")
    if peak_tflops and cfg.cluster is not None:
        lines.append(stop_line(cfg, result, world, peak_tflops))
    return lines


def stop_line(cfg: DictConfig, result, world: int, peak_tflops: float) -> str:
    """What a stop at the time limit costs (a step and the checkpoint the busiest rank writes), against the USR2
    margin; the margin to give when it is short (the run would then stop on its own before the limit)."""
    sharded = cfg.parallelism.strategy.value not in ("single", "ddp")
    busiest = busiest_writer_bytes(result.trainable_params, world, sharded)
    save_s = busiest / WRITE_BYTES_PER_S
    step_s = result.tokens_per_step * result.flops_per_token / (ASSUMED_MFU * peak_tflops * 1e12 * world)
    cost = step_s + save_s + REQUEUE_S
    margin = cfg.cluster.signal_delay_s
    verdict = "enough" if SAFETY * cost <= margin else \
        f"short: give cluster.signal_delay_s={advised_margin_s(cost)} (else the run stops itself before the limit)"
    writer = "each rank writes" if sharded else "rank 0 writes"
    return (f"checkpoint  {writer} {busiest / 1e9:.1f} GB a save (~{save_s:.0f} s at {WRITE_BYTES_PER_S / 1e9:.1f} "
            f"GB/s); a stop at the time limit ~{cost:.0f} s (a step, the save, the requeue): USR2 "
            f"{margin} s before is {verdict}")


def prepared_train_tokens(cfg: DictConfig) -> int | None:
    """Training tokens of one epoch, from the report of `python -m llmft.data prepare` (data.prepared)."""
    import json

    from llmft.data.prepare.data_config import prepared_report_path

    folder = cfg.data.prepared or cfg.data.output_dir
    report = prepared_report_path(folder) if folder else None
    if report is None or not report.is_file():
        return None
    tokens = json.loads(report.read_text()).get("tokens")
    return tokens.get("train") if isinstance(tokens, dict) else tokens


def describe(cfg: DictConfig) -> str:
    lines = [f"model       {cfg.model.name} ({cfg.model.path or 'built: random weights'})"]
    method = "method      peft={}  parallelism={}"
    if cfg.cluster is None:
        cfg.parallelism.strategy = settle_parallelism(cfg, cfg.launch.nproc)  # what each rank will settle `auto` to
        lines.append(method.format(cfg.peft.method.value, cfg.parallelism.strategy.value))
        lines.append(f"where       local, {cfg.launch.nproc} process(es); add +cluster=NAME to plan a SLURM job")
        lines += estimate_lines(cfg, cfg.launch.nproc, None, None, None)
        return "\n".join(lines)
    resources = slurm.resolve(cfg)  # also settles parallelism=auto for this many ranks
    lines.append(method.format(cfg.peft.method.value, cfg.parallelism.strategy.value))
    lines += [
        f"cluster     {cfg.cluster.name}, {resources.kind} nodes (partition {resources.partition}, "
        f"constraint {resources.constraint})",
        f"resources   {resources.nodes} node(s) x {resources.gpus_per_node} GPU(s) = {resources.world_size} ranks, "
        f"{resources.cpus_per_task} CPUs per task",
        f"time        {resources.time} (QoS {resources.qos or 'default'}"
        + (f", limit {resources.qos_max_time}" if resources.qos_max_time else "") + ")",
        f"account     {resources.account or '(default)'}",
        f"requeues    up to {cfg.cluster.max_requeues} at the time limit (USR2 {cfg.cluster.signal_delay_s} s before)",
    ]
    kind = cfg.cluster.kinds[resources.kind]
    qos_minutes = slurm.parse_time(resources.qos_max_time) if resources.qos_max_time else resources.minutes
    lines += estimate_lines(cfg, resources.world_size, kind.memory_gb, kind.peak_tflops, qos_minutes,
                            resources.gpus_per_node)
    with tempfile.TemporaryDirectory() as scratch:
        executor = slurm.make_executor(cfg, Path(scratch) / "RUN_DIR", render_only=True)
        script = slurm.sbatch_script(executor).replace(str(Path(scratch) / "RUN_DIR"), "RUN_DIR")
    lines += ["", "sbatch script (RUN_DIR: the run directory created at submission):", "", script]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    return run_command(plan, argv, f"{__doc__.strip()}\n\n{config_help()}")


def plan(overrides: list[str]) -> int:
    cfg = compose(overrides)
    validate(cfg, check_paths=False)
    print(describe(cfg))
    problem = model_path_problem(cfg)
    if problem:
        print(f"\nwarning: {problem} (launch checks it again and refuses a missing model)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
