"""The GPU check: what only a GPU can confirm, in one run of a few minutes, one summary line per check.

    tools/gpu-check.sh                 # on a machine with one NVIDIA GPU (torch and transformers installed)
    python tools/gpu_check.py --cpu    # the same checks on the CPU in fp32: proves the script itself works

Checks (each prints `check NAME: ok|FAILED ...` and its figures):
  precision      train.precision=auto picks bf16 on a GPU with native bf16 (fp32 on V100: emulated)
  binding        the rank binds its GPU before init_process_group(device_id=...), CUDA RNG state of its device only
  strategies     the tiny model in bf16 under single, fsdp and zero3 (world size 1, NCCL): losses agree (5e-2 in
                 bf16), adapters complete
  packing        the SDPA path with packed rows (block-diagonal) and flash-attention's varlen path (if installed)
                 give the unpacked logits
  loss           the chunked loss (and Liger's, if installed) against full logits under bf16 autocast on a
                 128,256-id vocabulary: loss, gradients, and the peak memory of each
  throughput     a Llama-3.2-1B-shaped random model (LoRA, packed 2048-token rows): tokens/s, peak memory per
                 interval, MFU against the GPU's bf16 peak
The last line: `gpu-check: N ok, M failed` (exit code 1 if any failed). Figures go into BENCHMARKS.md by hand.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
RESULTS: list[tuple[str, bool, str]] = []


def check(name: str):
    def wrap(function):
        def run(*args):
            started = time.time()
            try:
                detail = function(*args)
                RESULTS.append((name, True, detail))
            except Exception as error:  # a failed check is reported, the others still run
                traceback.print_exc()
                RESULTS.append((name, False, f"{type(error).__name__}: {str(error).splitlines()[0][:300]}"))
            status, detail = ("ok" if RESULTS[-1][1] else "FAILED"), RESULTS[-1][2]
            print(f"check {name}: {status} ({time.time() - started:.0f} s) {detail}", flush=True)
        return run
    return wrap


def launch(args: list[str], run_dir: Path, timeout: int = 600) -> dict:
    command = [sys.executable, "-m", "llmft.launch", *args, f"run_dir={run_dir}"]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=timeout)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed: {result.stderr.strip().splitlines()[-1:]}")
    return json.loads((run_dir / "summary.json").read_text())


def losses(run_dir: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()
            if "\"loss\"" in line]


@check("precision")
def precision_check(cpu: bool) -> str:
    import torch

    from llmft.training.precision import uses_bf16

    if cpu:
        return "skipped on the CPU (fp32)"
    name = torch.cuda.get_device_name(0)
    native = torch.cuda.is_bf16_supported(including_emulation=False)
    chosen = uses_bf16("auto", "cuda")
    assert chosen == native, f"auto chose bf16={chosen} on {name}, native bf16={native}"
    return f"{name}: auto -> {'bf16' if chosen else 'fp32'}"


@check("binding")
def binding_check(cpu: bool) -> str:
    import torch

    from llmft.training.loop import rng_state
    from llmft.training.topology import Topology

    if cpu:
        return "skipped on the CPU"
    os.environ.update({"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0"})
    topology = Topology.from_env()
    state = rng_state(topology.device)
    assert isinstance(state["cuda"], torch.Tensor), "the CUDA RNG state is not this device's alone"
    assert torch.cuda.current_device() == topology.local_rank
    return f"device {topology.device}, CUDA RNG state of that device only"


@check("strategies")
def strategies_check(cpu: bool, work: Path) -> str:
    common = ["train.max_steps=20", "train.log_every=1", "train.eval_every=20", "train.save_every=0", "peft.dropout=0",
              f"train.precision={'fp32' if cpu else 'bf16'}", "parallelism.zero3_param_persistence_threshold=0",
              "parallelism.zero3_model_persistence_threshold=0"]
    curves, figures = {}, []
    for strategy in ("single", "fsdp", "zero3"):
        summary = launch([*common, f"parallelism={strategy}"], work / strategy)
        curves[strategy] = losses(work / strategy)
        figures.append(f"{strategy} {summary['final_loss']:.4f}")
    tolerance = 1e-4 if cpu else 5e-2
    for strategy in ("fsdp", "zero3"):
        worst = max(abs(a - b) for a, b in zip(curves["single"], curves[strategy]))
        assert worst <= tolerance, f"{strategy} leaves the single-GPU curve by {worst:.3g}"
    return "final losses " + ", ".join(figures)


@check("packing")
def packing_check(cpu: bool) -> str:
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
    figures = []
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
        assert worst <= tolerance, f"{kind}: packed logits differ by {worst:.3g}"
        figures.append(f"{kind} max diff {worst:.2g}")
    return ", ".join(figures)


@check("loss")
def loss_check(cpu: bool) -> str:
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
        loss_sum, count = loss.token_losses(model, batch, bf16=not cpu)
        (loss_sum / count).backward()
        peak = torch.cuda.max_memory_allocated() / 2**30 if not cpu else float("nan")
        results[head] = (float(loss_sum / count), model.model.embed_tokens.weight.grad.double().flatten(), peak)
        del model
    reference_loss, reference_grad, reference_peak = results["full_logits"]
    figures = [f"full_logits loss {reference_loss:.4f} peak {reference_peak:.2f} GB"]
    for head in heads:
        value, grad, peak = results[head]
        cosine = float(torch.nn.functional.cosine_similarity(grad, reference_grad, dim=0))
        assert abs(value - reference_loss) <= (1e-5 if cpu else 2e-2) * abs(reference_loss), (head, value)
        assert cosine >= (0.99999 if cpu else 0.99), (head, cosine)
        figures.append(f"{head} loss {value:.4f} grad cosine {cosine:.5f} peak {peak:.2f} GB")
    return "; ".join(figures)


@check("throughput")
def throughput_check(cpu: bool, work: Path) -> str:
    if cpu:
        return "skipped on the CPU (a 1B-shaped model)"
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaConfig, LlamaForCausalLM

    from llmft.data.tokenize.tokenizer import train_tiny_tokenizer

    folder = work / "llama-1b-shaped"
    folder.mkdir(exist_ok=True)
    texts = [m["content"] for line in (REPO / "llmft/data/samples/tickets_sample.chat.jsonl").read_text().splitlines()
             for m in json.loads(line)["messages"]]
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
                     work / "throughput")
    records = [json.loads(line) for line in (work / "throughput/metrics.jsonl").read_text().splitlines()]
    last = [r for r in records if "tokens_per_s" in r][-1]
    return (f"{last['tokens_per_s']:,.0f} tokens/s, peak {last['peak_memory_gb']:.1f} GB, "
            f"MFU {last.get('mfu', float('nan')):.1%}, {summary['num_parameters'] / 1e9:.2f} B parameters")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu", action="store_true", help="the same checks on the CPU (fp32), to test the script")
    parser.add_argument("--work", default=None, help="a folder for the runs (default: a temporary one)")
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    work = Path(args.work or tempfile.mkdtemp(prefix="llmft-gpu-check-"))
    work.mkdir(parents=True, exist_ok=True)
    precision_check(args.cpu)
    binding_check(args.cpu)
    strategies_check(args.cpu, work)
    packing_check(args.cpu)
    loss_check(args.cpu)
    throughput_check(args.cpu, work)
    failed = [name for name, ok, _ in RESULTS if not ok]
    print(f"gpu-check: {len(RESULTS) - len(failed)} ok, {len(failed)} failed" + (f" ({', '.join(failed)})"
                                                                               if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
