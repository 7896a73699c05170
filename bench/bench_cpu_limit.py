#!/usr/bin/env python3
"""The training step against this CPU's limit: what share of the machine's fp32 matmul throughput one llmft step
reaches on a real model, and where the rest of the step goes.

    python bench/bench_cpu_limit.py [--steps 8] [--profiled-steps 3] [--model-path DIR] [--trace FILE]

Needs the SmolLM2-135M-Instruct folder (`python -m llmft.models get smollm2-135m-instruct`); about 3 minutes on a
quiet 2-core machine. CPU, fp32, torch's default threads (one per core). Run it alone: two processes on two cores
slow each other several times, and a thread of a parallel matmul that loses its core stalls the whole op.

1. The limit. The GEMMs of one step of model=smollm2_135m (a packed row of `model.max_seq_len` tokens, LoRA on every
   linear layer but the tied head) are listed from the model's config: per layer the forward of q, k, v, o, gate, up
   and down ([T, in] x [in, out]) and, since the input's gradient flows down to the first adapter, their transposes
   in backward ([T, out] x [out, in]); the LM head on the supervised rows, forward and its gradient. Each shape is
   timed alone with `torch.mm` on random fp32 matrices (the median of 0.1 s of repeats; the fastest of three rounds
   over all shapes, so a burst of load elsewhere does not lower the limit). The machine's throughput on the model's
   shapes is the step's GEMM FLOPs over the time those GEMMs take at the measured speeds.
   LoRA's rank-r matmuls are timed and printed too, not counted in the limit: they are the step's, not the model's.
2. The step. llmft's own training loop (`llmft.training.loop.train`, model=smollm2_135m, the bundled tickets, every
   default of train=small but validation off), in this process: `--warmup-steps` untimed steps, then `--steps`
   timed ones (from the end of one optimizer step to the end of the next: data, forward, loss, backward, clip,
   optimizer). FLOPs counted as llmft's MFU figure counts them (llmft/training/flops.py: 4N + 12 L d T + 6 N_lora
   per token with LoRA, T the mean real sequence length of the step's row), from each step's tokens and sequences.
   step FLOP/s = those FLOPs / the timed seconds.
3. The breakdown. `--profiled-steps` more steps run under torch.profiler (CPU, with shapes). Forward hooks open a
   profiler range per part of the model (the LoRA layer, its frozen `base_layer`, the attention module, the RMS
   norms, the MLP's activation, the decoder layer's residuals, the model outside its decoder: the loss head); the
   backward of each op is attributed to the part whose forward made it (the autograd node's sequence number); a
   matmul of a LoRA layer none of whose operands has a dimension of the LoRA rank is the frozen layer's (llmft's fused
   LoRA layers run it themselves: training/fused_lora.py); the optimizer step (clip, AdamW, schedule, zero_grad) and
   the fetch of the micro-batch are ranges of their own. Each op's self time is summed per part (the ops taking most
   of it named, ms per step): the parts add up to the profiled steps' time. Profiling slows small ops more than large
   ones: read the shares, not the milliseconds, as the step's.

The last line is `limit: step_flops_share=X`: step FLOP/s over the machine's throughput on the model's GEMM shapes.
Goal on a quiet machine: X >= 0.5. It measures and asserts nothing.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

# The parts of the breakdown, in print order.
PARTS = ["layer matmuls", "LoRA", "attention", "norms and activations", "loss head", "optimizer", "data", "other"]


# ------------------------------------------------------------------------------------------------ the limit


def step_gemms(config, tokens: int, supervised: int, lora_rank: int, lora_targets: list[str]) -> list[dict]:
    """The matmuls of one LoRA training step of a Llama-shaped model on `tokens` positions, each with its count:
    [m, k] x [k, n]. The frozen weights get no weight gradient; the head runs on the supervised rows only."""
    d, inner = config.hidden_size, config.intermediate_size
    head_dim = getattr(config, "head_dim", None) or d // config.num_attention_heads
    out = {"q_proj": config.num_attention_heads * head_dim, "k_proj": config.num_key_value_heads * head_dim,
           "v_proj": config.num_key_value_heads * head_dim, "o_proj": d, "gate_proj": inner, "up_proj": inner,
           "down_proj": d}
    fan_in = {**{name: d for name in out}, "o_proj": config.num_attention_heads * head_dim, "down_proj": inner}
    layers = config.num_hidden_layers
    gemms = []
    for name in out:
        i, o = fan_in[name], out[name]
        gemms.append({"what": f"{name} forward", "shape": (tokens, i, o), "count": layers, "lora": False})
        gemms.append({"what": f"{name} input gradient", "shape": (tokens, o, i), "count": layers, "lora": False})
        if name in lora_targets:  # x A^T, (x A^T) B^T; backward: the input's and both weights' gradients
            r = lora_rank
            gemms += [
                {"what": f"{name} LoRA A forward", "shape": (tokens, i, r), "count": layers, "lora": True},
                {"what": f"{name} LoRA B forward", "shape": (tokens, r, o), "count": layers, "lora": True},
                {"what": f"{name} LoRA B gradients", "shape": (tokens, o, r), "count": 2 * layers, "lora": True},
                {"what": f"{name} LoRA A gradients", "shape": (r, tokens, i), "count": 2 * layers, "lora": True},
            ]
    vocab = config.vocab_size
    gemms.append({"what": "LM head forward (supervised rows)", "shape": (supervised, d, vocab), "count": 1,
                  "lora": False})
    gemms.append({"what": "LM head row gradient", "shape": (supervised, vocab, d), "count": 1, "lora": False})
    return gemms


def time_mm(m: int, k: int, n: int, seconds: float) -> float:
    """Median seconds of one [m, k] x [k, n] fp32 torch.mm (the output preallocated), after a warm-up."""
    import torch

    generator = torch.Generator().manual_seed(0)
    a, b = torch.randn(m, k, generator=generator), torch.randn(k, n, generator=generator)
    out = torch.empty(m, n)
    for _ in range(3):
        torch.mm(a, b, out=out)
    times, started = [], time.perf_counter()
    while time.perf_counter() - started < seconds or len(times) < 5:
        begin = time.perf_counter()
        torch.mm(a, b, out=out)
        times.append(time.perf_counter() - begin)
    times.sort()
    return times[len(times) // 2]


def measure_limit(gemms: list[dict], rounds: int = 3) -> float:
    """Times each distinct shape in `rounds` rounds over all shapes and keeps its fastest round (what the machine
    can do, not what a burst of load elsewhere left of it); prints the table; returns the FLOP/s of the model's
    (non-LoRA) GEMMs."""
    speed: dict[tuple, float] = {}
    shapes = list(dict.fromkeys(g["shape"] for g in gemms))
    for _ in range(rounds):
        for shape in shapes:
            speed[shape] = max(speed.get(shape, 0.0), 2 * shape[0] * shape[1] * shape[2] / time_mm(*shape, 0.1))
    print(f"\nfp32 torch.mm on {torch_threads()} thread(s), each shape alone (the fastest of {rounds} rounds):")
    print(f"  {'GEMM':<34} {'m x k x n':>20} {'count':>6} {'GFLOP/s':>8}")
    for gemm in gemms:
        shape = gemm["shape"]
        print(f"  {gemm['what']:<34} {' x '.join(map(str, shape)):>20} {gemm['count']:>6} "
              f"{speed[shape] / 1e9:>8.1f}")
    model_gemms = [g for g in gemms if not g["lora"]]
    flops = sum(2 * g["shape"][0] * g["shape"][1] * g["shape"][2] * g["count"] for g in model_gemms)
    seconds = sum(2 * g["shape"][0] * g["shape"][1] * g["shape"][2] * g["count"] / speed[g["shape"]]
                  for g in model_gemms)
    lora = [g for g in gemms if g["lora"]]
    lora_flops = sum(2 * g["shape"][0] * g["shape"][1] * g["shape"][2] * g["count"] for g in lora)
    lora_seconds = sum(2 * g["shape"][0] * g["shape"][1] * g["shape"][2] * g["count"] / speed[g["shape"]]
                       for g in lora)
    print(f"  the model's GEMMs of one step: {flops / 1e9:.1f} GFLOP in {seconds:.3f} s at these speeds: "
          f"{flops / seconds / 1e9:.1f} GFLOP/s (the limit); LoRA's: {lora_flops / 1e9:.1f} GFLOP in "
          f"{lora_seconds:.3f} s ({lora_flops / lora_seconds / 1e9:.1f} GFLOP/s)")
    return flops / seconds


def torch_threads() -> int:
    import torch

    return torch.get_num_threads()


# ------------------------------------------------------------------------------------------------ the breakdown


class PartRanges:
    """Profiler ranges named after the part of the model each module belongs to, opened by forward hooks."""

    def __init__(self):
        self.handles, self.open = [], []

    def mark(self, module, part: str) -> None:
        import torch

        def enter(_module, _args):
            scope = torch.profiler.record_function(f"part:{part}")
            scope.__enter__()
            self.open.append(scope)

        def leave(_module, _args, _output):
            self.open.pop().__exit__(None, None, None)

        self.handles += [module.register_forward_pre_hook(enter), module.register_forward_hook(leave)]

    def install(self, model) -> int:
        """Marks every part of a PEFT-wrapped decoder; returns the number of LoRA layers found."""
        from peft.tuners.lora import LoraLayer

        self.mark(model, "loss head")  # the model outside its decoder: the supervised rows' head and loss
        lora_layers = 0
        for name, module in model.named_modules():
            kind = type(module).__name__
            if isinstance(module, LoraLayer):
                self.mark(module, "LoRA")
                self.mark(module.base_layer, "layer matmuls")
                lora_layers += 1
            elif kind.endswith("DecoderLayer"):
                self.mark(module, "norms and activations")  # its own ops: the residual additions
            elif kind.endswith("RMSNorm") or kind.endswith("MLP"):  # the MLP's own ops: act(gate) * up
                self.mark(module, "norms and activations")
            elif kind.endswith("Attention") or kind.endswith("RotaryEmbedding"):
                self.mark(module, "attention")
            elif kind.endswith("Model") and hasattr(module, "layers"):
                self.mark(module, "other")  # the decoder's own ops: the embedding, the positions
        return lora_layers

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []


def part_of_backward(name: str) -> str | None:
    """Backward nodes whose forward ran without recording a sequence number (custom autograd functions)."""
    return "loss head" if "LinearCrossEntropy" in name else None


MATMULS = {"aten::mm", "aten::addmm", "aten::bmm", "aten::matmul", "aten::linear"}


def breakdown(events, lora_rank: int) -> tuple[dict[str, float], dict[str, dict[str, float]]]:
    """Self CPU time (µs) per part, and per part per op name, from a profile's events (see the module's docstring).
    A matmul inside a LoRA layer none of whose operands has a dimension of the LoRA rank is the frozen base layer's
    (llmft's fused LoRA layers run the base matmul themselves: training/fused_lora.py)."""
    forward_part: dict[int, str] = {}
    time_of: dict[str, float] = defaultdict(float)
    ops_of: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    evaluate = "autograd::engine::evaluate_function: "

    def owner(event):
        """The nearest enclosing part range or backward node."""
        node = event
        while node is not None:
            if node.name.startswith("part:"):
                return "part", node.name[len("part:"):]
            if node.name.startswith(evaluate):
                return "backward", node
            node = node.cpu_parent
        return None, None

    events = list(events)
    for event in events:  # the forward ops first: which part made each autograd node
        kind, value = owner(event)
        if kind == "part" and event.sequence_nr >= 0:
            forward_part.setdefault(event.sequence_nr, value)
    for event in events:
        kind, value = owner(event)
        if kind == "part":
            part = value
        elif kind == "backward":
            part = forward_part.get(value.sequence_nr) or part_of_backward(value.name) or "other"
        else:
            part = "other"
        if part == "LoRA" and event.name in MATMULS and event.input_shapes and \
                not any(lora_rank in shape for shape in event.input_shapes if shape):
            part = "layer matmuls"
        time_of[part] += event.self_cpu_time_total
        ops_of[part][event.name] += event.self_cpu_time_total
    return time_of, ops_of


# ------------------------------------------------------------------------------------------------ the step


def run_step_measurement(args) -> dict:
    import torch

    from llmft.config.compose import compose
    from llmft.rundir import create as rundir
    from llmft.training import loop
    from llmft.training.flops import flops_per_token

    total_steps = args.warmup_steps + args.steps + args.profiled_steps
    step_ends: list[float] = []
    batches: list[tuple[int, int, int]] = []  # (tokens, sequences, supervised) of each step's micro-batch
    ranges = PartRanges()
    state = {"profiler": None, "trainer": None}
    trainer_class = loop.Trainer
    train_step, next_micro_batch, step_method = (trainer_class.train_step, trainer_class.next_micro_batch,
                                                 trainer_class.train)

    def profiled_range(name, function):
        def wrapper(*a, **k):
            with torch.profiler.record_function(f"part:{name}"):
                return function(*a, **k)
        return wrapper

    def instrumented_train(self, *a, **k):
        state["trainer"] = self
        self.strategy.step = profiled_range("optimizer", self.strategy.step)
        return step_method(self, *a, **k)

    def stamped_train_step(self, *a, **k):
        if len(step_ends) == args.warmup_steps + args.steps and args.profiled_steps:
            ranges.install(self.peft_model)
            state["profiler"] = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU],
                                                       record_shapes=True)
            state["profiler"].__enter__()
            state["profiled_start"] = time.perf_counter()
        result = train_step(self, *a, **k)
        step_ends.append(time.perf_counter())
        if state["profiler"] is not None and len(step_ends) == total_steps:
            state["profiled_seconds"] = step_ends[-1] - state["profiled_start"]
            state["profiler"].__exit__(None, None, None)
            ranges.remove()
        return result

    def counted_next_micro_batch(self, *a, **k):
        with torch.profiler.record_function("part:data"):
            batch = next_micro_batch(self, *a, **k)
        batches.append((batch.tokens, batch.sequences, batch.supervised_tokens))
        return batch

    trainer_class.train, trainer_class.train_step = instrumented_train, stamped_train_step
    trainer_class.next_micro_batch = counted_next_micro_batch
    overrides = ["model=smollm2_135m", "data.validation_fraction=0", f"train.max_steps={total_steps}",
                 f"train.log_every={total_steps}", "train.save_every=0", f"run_dir={args.work / 'run'}"]
    if args.model_path:
        overrides.append(f"model.path={args.model_path}")
    cfg = compose(overrides + args.overrides)
    if cfg.train.grad_accum_steps != 1 or cfg.train.micro_batch_size != 1:
        sys.exit("this benchmark times one packed row per step: keep train.micro_batch_size=1 and grad_accum_steps=1")
    started = time.time()
    loop.train(cfg, rundir.create(cfg))
    trainer = state["trainer"]
    config = trainer.peft_model.config
    timed = range(args.warmup_steps, args.warmup_steps + args.steps)
    seconds = [step_ends[i] - step_ends[i - 1] for i in timed if i > 0]
    flops = []
    for i in timed:
        if i == 0:
            continue
        tokens, sequences, _ = batches[i]
        per_token = flops_per_token(trainer.num_params, trainer.num_trainable, config.num_hidden_layers,
                                    config.hidden_size, tokens / max(1, sequences), lora=True)
        flops.append(per_token * tokens)
    return {
        "cfg": cfg, "config": config, "trainer": trainer, "step_seconds": seconds, "step_flops": flops,
        "batches": batches, "profiler": state["profiler"], "profiled_seconds": state.get("profiled_seconds"),
        "lora_layers": len([m for m in trainer.peft_model.modules() if hasattr(m, "lora_A")]),
        "wall_s": time.time() - started,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=8, help="timed optimizer steps")
    parser.add_argument("--warmup-steps", type=int, default=2, help="untimed steps first")
    parser.add_argument("--profiled-steps", type=int, default=3, help="steps under torch.profiler, after the timed")
    parser.add_argument("--model-path", help="the SmolLM2-135M-Instruct folder (default: model=smollm2_135m's)")
    parser.add_argument("--trace", type=Path, help="write the profiled steps' Chrome trace here")
    parser.add_argument("--work-dir", type=Path, help="keep the run directory here")
    parser.add_argument("--top-ops", type=int, default=4, help="ops named per part of the breakdown (ms/step)")
    parser.add_argument("overrides", nargs="*", help="more llmft config overrides (key=value)")
    args = parser.parse_args()
    if args.steps < 2 or args.warmup_steps < 1:
        parser.error("--steps must be at least 2 and --warmup-steps at least 1")
    import torch

    scratch = None if args.work_dir else tempfile.TemporaryDirectory(prefix="bench_cpu_limit_")
    args.work = (args.work_dir or Path(scratch.name)).resolve()
    load_before = os.getloadavg()[0]
    print(f"bench_cpu_limit: {os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"load {load_before:.2f}", flush=True)
    try:
        step = run_step_measurement(args)
        load_after_step = os.getloadavg()[0]
        config, cfg, trainer = step["config"], step["cfg"], step["trainer"]
        timed_batches = step["batches"][args.warmup_steps:args.warmup_steps + args.steps]
        tokens = round(sum(b[0] for b in timed_batches) / len(timed_batches))
        supervised = round(sum(b[2] for b in timed_batches) / len(timed_batches))
        gemms = step_gemms(config, tokens, supervised, cfg.peft.r,
                           list(cfg.peft.target_modules or cfg.model.lora_target_modules))
        limit = measure_limit(gemms)
        load_after = os.getloadavg()[0]
        seconds, flops = step["step_seconds"], step["step_flops"]
        achieved = sum(flops) / sum(seconds)
        ordered = sorted(seconds)
        print(f"\nthe step: model={cfg.model.name} ({trainer.num_params / 1e6:.1f}M parameters, "
              f"{trainer.num_trainable / 1e6:.2f}M trainable in {step['lora_layers']} LoRA layers), one packed row of "
              f"{cfg.model.max_seq_len} ({tokens} real tokens, {supervised} supervised on average), loss head "
              f"{trainer.loss_head}, activation checkpointing {'on' if cfg.train.activation_checkpointing else 'off'}, "
              f"compile {'on' if cfg.train.compile else 'off'}")
        print(f"  step seconds: {' '.join(f'{t:.2f}' for t in seconds)}")
        print(f"  {len(seconds)} timed steps: median {ordered[len(ordered) // 2]:.3f} s, fastest {ordered[0]:.3f} s, "
              f"slowest {ordered[-1]:.3f} s; {sum(flops) / len(flops) / 1e9:.1f} GFLOP per step (MFU count): "
              f"{achieved / 1e9:.1f} GFLOP/s")
        profiler = step["profiler"]
        if profiler is not None:
            if args.trace:
                profiler.export_chrome_trace(str(args.trace))
            parts, ops = breakdown(profiler.events(), cfg.peft.r)
            total = sum(parts.values())
            n = args.profiled_steps
            print(f"\nbreakdown of {n} profiled steps ({step['profiled_seconds'] / n:.3f} s a step under the profiler; "
                  f"self CPU time of each op, by the part of the model whose forward made it):")
            for part in PARTS + sorted(set(parts) - set(PARTS)):
                if part in parts:
                    top = sorted(ops[part].items(), key=lambda item: -item[1])[:args.top_ops]
                    print(f"  {part:<24} {parts[part] / 1e3 / n:>9.1f} ms/step {100 * parts[part] / total:>6.1f}%   "
                          + ", ".join(f"{name.removeprefix('aten::')} {t / 1e3 / n:.0f}" for name, t in top))
            matmul_flops = sum(2 * g["shape"][0] * g["shape"][1] * g["shape"][2] * g["count"] for g in gemms
                               if not g["lora"] and "LM head" not in g["what"])
            print(f"  layer matmuls in the step: {matmul_flops / 1e9:.1f} GFLOP at "
                  f"{matmul_flops / (parts['layer matmuls'] / 1e6 / n) / 1e9:.1f} GFLOP/s (under the profiler)")
        print(f"\nload: {load_before:.2f} before, {load_after_step:.2f} after the step, {load_after:.2f} at the end "
              f"(1-minute average); {step['wall_s']:.0f} s of training")
        print(f"limit: step_flops_share={achieved / limit:.2f}")
    finally:
        if scratch is not None:
            scratch.cleanup()


if __name__ == "__main__":
    main()
