"""The GPU check: what only a GPU can confirm, in one run of at most 8 minutes, as one JSON file and a table.

    tools/gpu-check.sh run WHEELHOUSE               # on the GPU node: a fresh venv from the wheelhouse runs this file
    python tools/gpu_check.py --cpu --out out.json  # where llmft is installed: the same checks on the CPU (fp32),
                                                    # which proves the script itself works

Checks (docs/gpu-check.md says what each figure means):
  precision   train.precision=auto picks what the device's compute capability calls for: bf16 from 8.0 (A100,
              H100), fp16 with a loss scaler or fp32 before (V100 7.0: bf16 there is emulated); fp32 on the CPU
  binding     each rank binds its device and joins a real process group (NCCL on GPUs, gloo on the CPU, one rank
              per visible GPU, two on the CPU): an all-reduce and a barrier on the bound device, the CUDA RNG
              state of that device only
  strategies  the tiny model under single, fsdp and zero3 (bf16 on a GPU): the loss curves agree (5e-2 in bf16)
  packing     packed rows (block-diagonal SDPA, and flash-attention's varlen path if installed) give the
              unpacked logits
  loss        the chunked loss (and Liger's, if installed) against full logits on a 128,256-id vocabulary: loss,
              gradient, peak memory of each
  throughput  a Llama-3.2-1B-shaped random model (LoRA, packed 2048-token rows): tokens/s, peak memory, MFU
              (skipped on the CPU)

The checks share one time budget (--budget-s, 480 s): a training launch gets the time left in it, never a fixed limit
of its own; a check that cannot start in time is recorded as "not run". The JSON (--out) is written before the first
check and after each one, so a run cut short still tells what it did. Exit status 1 when a check failed or did not run.
Only the standard library is imported at the top: the checks import torch and llmft inside.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path

DEFAULT_BUDGET_S = 480  # the whole check on one GPU: 8 minutes
# A training launch needs about this much at the least (interpreter, torch, model and data on a slow file system):
# a check whose launch would get less is not started.
MIN_LAUNCH_S = 30


class Skipped(Exception):
    """A check that does not apply here (the 1B-shaped model on the CPU)."""


class OutOfTime(Exception):
    """The budget ran out before this check, or one of its launches, could start."""


@dataclass
class Result:
    name: str
    status: str = "not run"  # ok | failed | skipped | not run
    seconds: float = 0.0
    summary: str = ""
    figures: dict = field(default_factory=dict)


@dataclass
class Budget:
    seconds: float
    started: float = field(default_factory=time.monotonic)

    def left(self) -> float:
        return self.seconds - (time.monotonic() - self.started)


# ------------------------------------------------------------------------------------------ precision

def expected_precisions(capability: tuple[int, int] | None) -> tuple[str, ...]:
    """What train.precision=auto may pick on a device of this CUDA compute capability (None: the CPU).

    bf16 from Ampere (8.0: A100; 8.6, 8.9, 9.0: H100, 10.0) on, where the tensor cores run it; before (Pascal 6.x,
    Volta 7.0: V100, Turing 7.5: T4) bf16 is emulated and slow, so fp16 with a loss scaler or fp32; the CPU: fp32
    (exact, deterministic). Written here, not read from llmft, so that the check does not grade llmft by itself."""
    if capability is None:
        return ("fp32",)
    return ("bf16",) if tuple(capability) >= (8, 0) else ("fp16", "fp32")


def chosen_precision(device_type: str) -> str:
    """What llmft picks for train.precision=auto on this device."""
    from llmft.training.precision import NAMES, compute_dtype

    return NAMES[compute_dtype("auto", device_type)]


def precision_check(cpu: bool, budget: Budget, work: Path) -> tuple[str, dict]:
    import torch

    if cpu:
        name, capability = platform.processor() or platform.machine(), None
    else:
        name, capability = torch.cuda.get_device_name(0), tuple(torch.cuda.get_device_capability(0))
    chosen, expected = chosen_precision("cpu" if cpu else "cuda"), expected_precisions(capability)
    figures = {"device": name, "capability": ".".join(map(str, capability)) if capability else None,
               "chosen": chosen, "expected": list(expected)}
    where = f"{name} (compute capability {figures['capability']})" if capability else f"the CPU ({name})"
    assert chosen in expected, f"auto chose {chosen} on {where}, which calls for {' or '.join(expected)}"
    return f"{where}: auto -> {chosen}", figures


# ------------------------------------------------------------------------------------------ binding

def binding_rank() -> None:
    """One rank of the binding check, in its own process with torchrun's variables: llmft's topology binds the
    device and joins the process group, then an all-reduce and a barrier run on the bound device. Prints one JSON
    line of figures."""
    import datetime

    import torch
    import torch.distributed as dist

    from llmft.training.loop import rng_state
    from llmft.training.topology import Topology

    topology = Topology.from_env()
    cuda = topology.device_type == "cuda"
    topology.init_process_group(timeout_min=2)
    if not dist.is_initialized():
        # One rank (a node with one GPU): llmft trains without a process group there; make the one it would make for
        # several ranks, so that NCCL still runs on the bound device.
        extra = {}
        if cuda:
            torch.cuda.set_device(topology.device)
            extra["device_id"] = topology.device
        dist.init_process_group("nccl" if cuda else "gloo", rank=0, world_size=1,
                                timeout=datetime.timedelta(minutes=2), **extra)
    total = torch.full((1,), float(topology.rank + 1), device=topology.device)
    dist.all_reduce(total)
    dist.barrier()
    bound = dist.group.WORLD.bound_device_id
    figures = {"rank": topology.rank, "backend": dist.get_backend(), "device": str(topology.device),
               "current_device": torch.cuda.current_device() if cuda else None,
               "bound_device": str(bound) if bound is not None else None,
               "all_reduce": total.item(),
               "rng_state_of_this_device": isinstance(rng_state(topology.device).get("cuda"), torch.Tensor)
               if cuda else None}
    dist.destroy_process_group()
    print(json.dumps(figures), flush=True)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def binding_check(cpu: bool, budget: Budget, work: Path) -> tuple[str, dict]:
    import torch

    num_ranks = 2 if cpu else torch.cuda.device_count()
    # the ranks are started as torchrun starts them; a SLURM step's variables (srun on the GPU node) would win over
    # RANK in Topology.from_env and make every rank rank 0
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), WORLD_SIZE=str(num_ranks),
               LOCAL_WORLD_SIZE=str(num_ranks))
    ranks = [subprocess.Popen([sys.executable, __file__, "--binding-rank"], cwd=work, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              env={**env, "RANK": str(rank), "LOCAL_RANK": str(rank)}) for rank in range(num_ranks)]
    outputs = []
    for rank, process in enumerate(ranks):
        try:
            stdout, stderr = process.communicate(timeout=max(1.0, budget.left()))
        except subprocess.TimeoutExpired:
            for other in ranks:
                other.kill()
            raise OutOfTime(f"rank {rank} of {num_ranks} did not finish within the budget")
        assert process.returncode == 0, f"rank {rank} exited {process.returncode}: {stderr.strip()[-500:]}"
        outputs.append(json.loads(stdout.strip().splitlines()[-1]))
    expected_sum = num_ranks * (num_ranks + 1) / 2
    for rank, figures in enumerate(outputs):
        assert figures["backend"] == ("gloo" if cpu else "nccl"), f"rank {rank}: backend {figures['backend']}"
        assert figures["all_reduce"] == expected_sum, f"rank {rank}: all-reduce gave {figures['all_reduce']}"
        if not cpu:
            device = f"cuda:{figures['current_device']}"
            assert figures["device"] == device, f"rank {rank} runs on {figures['device']}, bound to {device}"
            assert figures["bound_device"] == device, f"rank {rank}: the process group is bound to " \
                                                      f"{figures['bound_device']}, the rank to {device}"
            assert figures["rng_state_of_this_device"], f"rank {rank}: the CUDA RNG state is not its device's alone"
    devices = [figures["device"] for figures in outputs]
    assert cpu or len(set(devices)) == num_ranks, f"ranks share a GPU: {devices}"
    backend = outputs[0]["backend"]
    return (f"{num_ranks} rank(s), {backend} on {', '.join(devices)}: all-reduce {outputs[0]['all_reduce']:g}"
            f" (expected {expected_sum:g})", {"num_ranks": num_ranks, "backend": backend, "ranks": outputs})


# ------------------------------------------------------------------------------------------ training launches

def launch(args: list[str], run_dir: Path, budget: Budget) -> dict:
    """`python -m llmft.launch ARGS run_dir=RUN_DIR` with the time left in the budget; its summary.json."""
    timeout = budget.left()
    if timeout < MIN_LAUNCH_S:
        raise OutOfTime(f"{timeout:.0f} s left for `llmft.launch {' '.join(args)}`")
    command = [sys.executable, "-m", "llmft.launch", *args, f"run_dir={run_dir}"]
    # its own session, so that a launch cut short is killed with every process it started
    process = subprocess.Popen(command, cwd=run_dir.parent, text=True, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, start_new_session=True)
    try:
        _, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.communicate()
        raise OutOfTime(f"`llmft.launch {' '.join(args)}` still ran when the budget ended ({timeout:.0f} s left)")
    if process.returncode != 0:
        raise RuntimeError(f"llmft.launch {' '.join(args)} exited {process.returncode}: "
                           f"{stderr.strip().splitlines()[-1:]}")
    return json.loads((run_dir / "summary.json").read_text())


def losses(run_dir: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()
            if "\"loss\"" in line]


def strategies_check(cpu: bool, budget: Budget, work: Path) -> tuple[str, dict]:
    num_steps = 8 if cpu else 20  # the CPU run proves the script; the GPU run compares curves long enough to drift
    common = [f"train.max_steps={num_steps}", "train.log_every=1", f"train.eval_every={num_steps}",
              "train.save_every=0", "peft.dropout=0", f"train.precision={'fp32' if cpu else 'bf16'}",
              "parallelism.zero3_param_persistence_threshold=0", "parallelism.zero3_model_persistence_threshold=0"]
    curves, final = {}, {}
    for strategy in ("single", "fsdp", "zero3"):
        summary = launch([*common, f"parallelism={strategy}"], work / strategy, budget)
        curves[strategy], final[strategy] = losses(work / strategy), summary["final_loss"]
    tolerance = 1e-4 if cpu else 5e-2
    gaps = {strategy: max(abs(a - b) for a, b in zip(curves["single"], curves[strategy]))
            for strategy in ("fsdp", "zero3")}
    figures = {"num_steps": num_steps, "final_loss": final, "max_gap_to_single": gaps, "tolerance": tolerance}
    for strategy, gap in gaps.items():
        assert gap <= tolerance, f"{strategy} leaves the single-GPU curve by {gap:.3g} (tolerance {tolerance:g})"
    return "final losses " + ", ".join(f"{s} {v:.4f}" for s, v in final.items()), figures


# ------------------------------------------------------------------------------------------ in-process checks

def packing_check(cpu: bool, budget: Budget, work: Path) -> tuple[str, dict]:
    import importlib.util

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from llmft.data.tokenize.batching import collate
    from llmft.data.tokenize.templating import Sample

    device = torch.device("cpu" if cpu else "cuda")
    dtype = torch.float32 if cpu else torch.bfloat16
    kinds = ["sdpa"] + (["flash_attention_2"] if not cpu and importlib.util.find_spec("flash_attn") else [])
    generator = torch.Generator().manual_seed(0)
    samples = [Sample(torch.randint(5, 500, (n,), generator=generator).tolist(), [-100] * n) for n in (37, 64, 23)]
    packed = Sample([t for s in samples for t in s.input_ids], [t for s in samples for t in s.labels],
                    [len(s.input_ids) for s in samples])
    figures = {}
    for kind in kinds:
        torch.manual_seed(0)
        config = LlamaConfig(vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, attn_implementation=kind, use_cache=False)
        model = LlamaForCausalLM(config).to(device, dtype).eval()
        with torch.no_grad():
            alone = [model(input_ids=torch.tensor([s.input_ids], device=device)).logits[0] for s in samples]
            batch = collate([packed], 0, flatten=kind.startswith("flash"))
            batch.pop("num_tokens"), batch.pop("labels")
            together = model(**{k: v.to(device) for k, v in batch.items()}).logits[0]
        worst = (torch.cat(alone) - together).abs().max().item()
        tolerance = 1e-4 if cpu else 3e-2 * torch.cat(alone).abs().max().item()
        figures[kind] = {"max_logit_diff": worst, "tolerance": tolerance}
        assert worst <= tolerance, f"{kind}: packed logits differ by {worst:.3g} (tolerance {tolerance:.3g})"
    return ", ".join(f"{kind} max diff {f['max_logit_diff']:.2g}" for kind, f in figures.items()), figures


def loss_check(cpu: bool, budget: Budget, work: Path) -> tuple[str, dict]:
    import copy
    import importlib.util

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from llmft.data.tokenize.batching import collate
    from llmft.data.tokenize.templating import IGNORE_INDEX, Sample
    from llmft.training import loss

    device = torch.device("cpu" if cpu else "cuda")
    vocab = 8192 if cpu else 128256
    config = LlamaConfig(vocab_size=vocab, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, use_cache=False, tie_word_embeddings=True)
    torch.manual_seed(0)
    plain = LlamaForCausalLM(config).to(device)
    generator = torch.Generator().manual_seed(0)
    rows = []
    for _ in range(2):
        ids = torch.randint(3, vocab, (2048,), generator=generator).tolist()
        rows.append(Sample(input_ids=ids, labels=[IGNORE_INDEX] * 900 + ids[900:]))
    batch = loss.with_loss_index(collate(rows, pad_token_id=0))
    batch.pop("num_tokens")
    batch = {k: v.to(device) for k, v in batch.items()}
    heads = ["chunked"] + (["liger"] if not cpu and importlib.util.find_spec("liger_kernel") else [])
    results = {}
    for head in ["full_logits", *heads]:
        model = copy.deepcopy(plain)
        loss.install(model, head, device.type)
        if not cpu:
            torch.cuda.reset_peak_memory_stats()
        loss_sum, count = loss.token_losses(model, batch, None if cpu else torch.bfloat16)
        (loss_sum / count).backward()
        peak = torch.cuda.max_memory_allocated() / 2**30 if not cpu else None
        results[head] = ((loss_sum / count).item(), model.model.embed_tokens.weight.grad.double().flatten(), peak)
        del model
    reference_loss, reference_grad, _ = results["full_logits"]
    figures = {head: {"loss": value, "peak_memory_gb": peak} for head, (value, _, peak) in results.items()}
    for head in heads:
        value, grad, _ = results[head]
        cosine = float(torch.nn.functional.cosine_similarity(grad, reference_grad, dim=0))
        figures[head]["grad_cosine_to_full_logits"] = cosine
        assert abs(value - reference_loss) <= (1e-5 if cpu else 2e-2) * abs(reference_loss), (head, value)
        assert cosine >= (0.99999 if cpu else 0.99), (head, cosine)

    def line(head: str) -> str:
        f = figures[head]
        peak = f" peak {f['peak_memory_gb']:.2f} GB" if f["peak_memory_gb"] is not None else ""
        cosine = f" grad cosine {f['grad_cosine_to_full_logits']:.5f}" if head != "full_logits" else ""
        return f"{head} loss {f['loss']:.4f}{cosine}{peak}"
    return "; ".join(line(head) for head in figures), figures


def throughput_check(cpu: bool, budget: Budget, work: Path) -> tuple[str, dict]:
    if cpu:
        raise Skipped("a 1B-shaped model: GPU only")
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaConfig, LlamaForCausalLM

    import llmft
    from llmft.data.tokenize.tokenizer import train_tiny_tokenizer

    folder = work / "llama-1b-shaped"
    folder.mkdir(exist_ok=True)
    sample = Path(llmft.__file__).parent / "data" / "samples" / "tickets_sample.chat.jsonl"
    texts = [m["content"] for line in sample.read_text().splitlines() for m in json.loads(line)["messages"]]
    tokenizer = train_tiny_tokenizer(texts, 2048)
    config = LlamaConfig(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                         num_attention_heads=32, num_key_value_heads=8, tie_word_embeddings=True, dtype="bfloat16",
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    with torch.device("cuda"):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    save_file({k: v.contiguous().cpu() for k, v in model.state_dict().items() if k != "lm_head.weight"},
              folder / "model.safetensors", metadata={"format": "pt"})
    config.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    del model
    torch.cuda.empty_cache()
    summary = launch(["model=llama3_2_1b", f"model.path={folder}", "model.max_seq_len=2048", "train.max_steps=30",
                      "train.log_every=10", "train.eval_every=1000", "train.save_every=0",
                      "train.micro_batch_size=2", "data.validation_fraction=0", "train.activation_checkpointing=true"],
                     work / "throughput", budget)
    records = [json.loads(line) for line in (work / "throughput/metrics.jsonl").read_text().splitlines()]
    last = [r for r in records if "tokens_per_s" in r][-1]
    figures = {"tokens_per_s": last["tokens_per_s"], "peak_memory_gb": last["peak_memory_gb"],
               "mfu": last.get("mfu"), "num_parameters": summary["num_parameters"]}
    mfu = f"{figures['mfu']:.1%}" if figures["mfu"] is not None else "n/a"
    return (f"{figures['tokens_per_s']:,.0f} tokens/s, peak {figures['peak_memory_gb']:.1f} GB, MFU {mfu}, "
            f"{figures['num_parameters'] / 1e9:.2f} B parameters"), figures


CHECKS = {"precision": precision_check, "binding": binding_check, "strategies": strategies_check,
          "packing": packing_check, "loss": loss_check, "throughput": throughput_check}


# ------------------------------------------------------------------------------------------ the run

def environment(cpu: bool) -> dict:
    import importlib.metadata

    import torch

    versions = {"python": platform.python_version(), "cuda": torch.version.cuda}
    for package in ("torch", "llmft", "transformers", "peft", "deepspeed", "liger-kernel", "flash-attn"):
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = None
    if cpu:
        device = {"type": "cpu", "name": platform.processor() or platform.machine(), "count": os.cpu_count()}
    else:
        properties = torch.cuda.get_device_properties(0)
        device = {"type": "cuda", "name": properties.name, "capability": f"{properties.major}.{properties.minor}",
                  "memory_gb": round(properties.total_memory / 2**30, 1), "count": torch.cuda.device_count()}
    return {"device": device, "versions": versions}


def write_report(path: Path, report: dict, results: list[Result]) -> None:
    report["checks"] = [asdict(result) for result in results]
    report["counts"] = {status: sum(r.status == status for r in results)
                        for status in ("ok", "failed", "skipped", "not run")}
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(json.dumps(report, indent=1) + "\n")
    temporary.replace(path)


def table(results: list[Result]) -> str:
    width = max(len(r.name) for r in results)
    lines = [f"{'check':<{width}}  {'status':<8} {'s':>4}  figures", "-" * (width + 24)]
    lines += [f"{r.name:<{width}}  {r.status:<8} {r.seconds:>4.0f}  {r.summary}" for r in results]
    return "\n".join(lines)


def run_checks(cpu: bool, out: Path, work: Path, budget: Budget, names: list[str]) -> int:
    results = [Result(name) for name in names]
    report = {"started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "seconds": 0.0, "budget_s": budget.seconds,
              "cpu": cpu, **environment(cpu)}
    write_report(out, report, results)
    for result in results:
        started = time.monotonic()
        try:
            if budget.left() <= 0:
                raise OutOfTime("the budget ran out before this check")
            result.summary, result.figures = CHECKS[result.name](cpu, budget, work)
            result.status = "ok"
        except Skipped as reason:
            result.status, result.summary = "skipped", str(reason)
        except OutOfTime as reason:
            result.status, result.summary = "not run", f"out of time: {reason}"
        except Exception as error:  # a failed check is recorded, the others still run
            traceback.print_exc()
            result.status, result.summary = "failed", f"{type(error).__name__}: {str(error).splitlines()[0][:300]}"
        result.seconds = round(time.monotonic() - started, 1)
        print(f"check {result.name}: {result.status} ({result.seconds:.0f} s) {result.summary}", flush=True)
        report["seconds"] = round(time.monotonic() - budget.started, 1)
        write_report(out, report, results)
    print("\n" + table(results))
    counts = report["counts"]
    print(f"\ngpu-check: {counts['ok']} ok, {counts['failed']} failed, {counts['skipped']} skipped, "
          f"{counts['not run']} not run in {report['seconds']:.0f} s of {budget.seconds:.0f}; figures in {out}")
    return 1 if counts["failed"] or counts["not run"] else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu", action="store_true", help="the same checks on the CPU (fp32), to test the script")
    parser.add_argument("--out", default="gpu-check.json", help="the JSON file of the results (default: %(default)s)")
    parser.add_argument("--work", default=None, help="a folder for the runs (default: a temporary one)")
    parser.add_argument("--budget-s", type=float, default=DEFAULT_BUDGET_S,
                        help="the time all the checks share (default: %(default)s)")
    parser.add_argument("--only", default=",".join(CHECKS), help="the checks to run, comma-separated")
    parser.add_argument("--binding-rank", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.binding_rank:
        binding_rank()
        return 0
    names = args.only.split(",")
    unknown = sorted(set(names) - set(CHECKS))
    if unknown:
        parser.error(f"--only {','.join(unknown)}: no such check; the checks are {', '.join(CHECKS)}")
    budget = Budget(args.budget_s)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    if args.cpu:  # on a GPU node too: torch, the ranks and the launches see no GPU
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    work = Path(args.work or tempfile.mkdtemp(prefix="llmft-gpu-check-"))
    work.mkdir(parents=True, exist_ok=True)
    return run_checks(args.cpu, Path(args.out).resolve(), work.resolve(), budget, names)


if __name__ == "__main__":
    sys.exit(main())
