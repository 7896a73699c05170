"""python -m llmft.export run=RUN_DIR out=DIR [merge=true]: a run's adapter for stock PEFT and vLLM, or one merged
model for any tool that reads Hugging Face folders; checked before anything is written."""

from __future__ import annotations

import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from llmft.config.arguments import UsageError, parse_arguments
from llmft.errors import run_command
from llmft.serve.inference import base_model_dir, is_adapter_run, run_config, run_directory, stop_token_ids, torch_dtype
from llmft.training.final import ExportError, check_adapter


USAGE = "python -m llmft.export run=RUN_DIR out=DIR [merge=true] [base=DIR] [dtype=float32|bfloat16|float16]"

# What the merged model is checked on: conversations rendered with the run's chat template.
PROBE_CONVERSATIONS = [
    [{"role": "user", "content": "My job is pending, why?"}],
    [{"role": "user", "content": "How do I copy files to the cluster?"},
     {"role": "assistant", "content": "Use scp or rsync from your machine to the login node."},
     {"role": "user", "content": "Et pour un dossier entier ?"}],
]


@dataclass
class ExportArgs:
    run: Optional[str] = None
    out: Optional[str] = None  # the folder to create (new or empty)
    merge: bool = False  # true: one merged model instead of the adapter alone
    base: Optional[str] = None  # the base model's folder, if it moved since training
    dtype: Optional[str] = None  # merge=true: the merged weights' dtype (default: the run's model.dtype)


def vllm_adapter_problems(adapter_dir: Path) -> list[str]:
    """Why vLLM's LoRA loader would refuse this PEFT adapter folder (empty: it would load it).

    vLLM reads adapter_config.json (r, lora_alpha and target_modules required; no modules_to_save, no DoRA, bias
    only with --enable-lora-bias) and tensors named `base_model.model.<module>.lora_A|lora_B.weight` for target
    modules. The rank must also be at most the server's --max-lora-rank.
    """
    import json
    import re

    from safetensors import safe_open

    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    problems = []
    if config.get("peft_type") != "LORA":
        problems.append(f"peft_type is {config.get('peft_type')!r}, not LORA")
    missing = [key for key in ("r", "lora_alpha", "target_modules") if config.get(key) in (None, [], "")]
    if missing:
        problems.append(f"adapter_config.json lacks {', '.join(missing)}")
    if config.get("modules_to_save"):
        problems.append(f"modules_to_save={config['modules_to_save']} (vLLM supports none)")
    if config.get("use_dora"):
        problems.append("use_dora=true (vLLM does not support DoRA)")
    if config.get("bias", "none") != "none":
        problems.append(f"bias={config['bias']} needs vLLM's --enable-lora-bias")
    targets = config.get("target_modules") or []
    name = re.compile(r"^base_model\.model\.(.+)\.lora_([AB])\.weight$")
    with safe_open(str(adapter_dir / "adapter_model.safetensors"), framework="pt") as tensors:
        for key in tensors.keys():
            match = name.match(key)
            if not match:
                problems.append(f"tensor {key} is not named base_model.model.<module>.lora_A|lora_B.weight")
                continue
            module = match.group(1).rsplit(".", 1)[-1]
            if isinstance(targets, list) and module not in targets:
                problems.append(f"tensor {key} is for {module}, not a target module")
            shape = tensors.get_slice(key).get_shape()
            rank = config.get("rank_pattern", {}).get(match.group(1), config.get("r"))
            if (shape[0] if match.group(2) == "A" else shape[1]) != rank:
                problems.append(f"tensor {key} has shape {tuple(shape)}, not rank {rank}")
    return problems


def _fresh_output(out: Path) -> Path:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ExportError(f"out={out} exists and is not empty: choose a new folder.")
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    return tmp


def _finish(tmp: Path, out: Path, record: dict) -> dict:
    import json
    import time

    record["created"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    (tmp / "llmft_export.json").write_text(json.dumps(record, indent=2))
    if out.exists():
        out.rmdir()  # empty (checked before)
    os.replace(tmp, out)
    return record


def export_adapter(run_dir: Path, cfg, out: Path, base_override: str | None = None) -> dict:
    """The run's adapter as a PEFT folder (adapter_model.safetensors, adapter_config.json, tokenizer with its chat
    template), checked: LoRA tensors present and trained, readable by stock PEFT, acceptable to vLLM."""
    import json

    from peft import PeftConfig
    from safetensors.torch import load_file


    tmp = _fresh_output(out)
    shutil.copytree(run_dir / "final", tmp)
    config_path = tmp / "adapter_config.json"
    config = json.loads(config_path.read_text())
    if base_override or cfg.model.path is None:  # the tiny base lives in the run directory, wherever it is now
        config["base_model_name_or_path"] = str(base_model_dir(run_dir, cfg, base_override))
        config_path.write_text(json.dumps(config, indent=2, sort_keys=True))
    check_adapter(load_file(tmp / "adapter_model.safetensors"), {})
    PeftConfig.from_pretrained(str(tmp))  # stock PEFT reads it
    problems = vllm_adapter_problems(tmp)
    return _finish(tmp, out, {"run_dir": str(run_dir), "kind": "adapter", "base": config["base_model_name_or_path"],
                              "r": config["r"], "lora_alpha": config["lora_alpha"],
                              "target_modules": sorted(config["target_modules"]), "vllm_problems": problems})


def _probe_inputs(tokenizer):
    return [tokenizer(tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True),
                      add_special_tokens=False, return_tensors="pt")["input_ids"] for messages in PROBE_CONVERSATIONS]


def export_merged(run_dir: Path, cfg, out: Path, base_override: str | None = None, dtype: str | None = None) -> dict:
    """Base + adapter merged into one model (save_pretrained: safetensors, config, generation config) with the
    tokenizer and its chat template, written to a temporary folder, then reloaded with stock
    `AutoModelForCausalLM.from_pretrained` and accepted only if its logits match base + adapter's."""
    import gc

    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer


    dtype = dtype or cfg.model.dtype
    tmp = _fresh_output(out)
    base_path = base_model_dir(run_dir, cfg, base_override)
    tokenizer = AutoTokenizer.from_pretrained(run_dir / "final", local_files_only=True)
    base = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch_dtype(dtype), local_files_only=True)
    model = PeftModel.from_pretrained(base, run_dir / "final").eval()
    probes = _probe_inputs(tokenizer)
    with torch.no_grad():
        expected = [model(input_ids=ids).logits.float() for ids in probes]
        with model.disable_adapter():
            base_logits = [model(input_ids=ids).logits.float() for ids in probes]
    merged = model.merge_and_unload()
    generation = merged.generation_config  # stop at the end-of-turn token training taught, whatever serves it
    eos = generation.eos_token_id if isinstance(generation.eos_token_id, list) else \
        [generation.eos_token_id] if generation.eos_token_id is not None else []
    generation.eos_token_id = list(dict.fromkeys(stop_token_ids(tokenizer, cfg.data) + eos))
    if generation.pad_token_id is None:
        generation.pad_token_id = tokenizer.pad_token_id
    merged.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    del merged, model, base
    gc.collect()
    reloaded = AutoModelForCausalLM.from_pretrained(tmp, dtype=torch_dtype(dtype), local_files_only=True).eval()
    with torch.no_grad():
        got = [reloaded(input_ids=ids).logits.float() for ids in probes]
    del reloaded
    max_diff = max(float((g - e).abs().max()) for g, e in zip(got, expected))
    scale = max(float(e.abs().max()) for e in expected)
    adapter_effect = max(float((e - b).abs().max()) for e, b in zip(expected, base_logits))
    # float32: the merge is exact up to summation order. bfloat16 / float16: W + BA rounded to 8 (11) bits moves the
    # tiny model's logits by up to ~2% of their largest value; 5% leaves room for deeper models.
    tolerance = (1e-4 if dtype == "float32" else 5e-2) * scale
    if max_diff > tolerance:
        shutil.rmtree(tmp, ignore_errors=True)
        raise ExportError(f"the merged model's logits differ from base + adapter by {max_diff:.3g} (tolerance "
                          f"{tolerance:.3g}); nothing was written to {out}.")
    return _finish(tmp, out, {
        "run_dir": str(run_dir), "kind": "merged", "base": str(base_path), "dtype": dtype,
        "files": sorted(p.name for p in tmp.iterdir()),
        "check": {"probes": len(probes), "max_abs_logit_diff": max_diff, "tolerance": tolerance,
                  "max_abs_logit": scale, "adapter_effect_max_abs_logit_diff": adapter_effect},
    })


def main(argv: list[str] | None = None) -> int:
    return run_command(export, argv, f"usage: {USAGE}\n\nmerge=false (default): the adapter alone, for stock PEFT or "
                                     "vLLM --enable-lora.\nmerge=true: base + adapter merged into one model, checked "
                                     "against base + adapter.")


def export(argv: list[str]) -> int:
    args = parse_arguments(argv, ExportArgs, USAGE)
    run_dir = run_directory(args.run, USAGE)
    if not args.out:
        raise UsageError(f"say where to write: {USAGE}")
    if args.dtype not in (None, "float32", "bfloat16", "float16"):
        raise UsageError(f"dtype={args.dtype} must be float32, bfloat16 or float16.")
    cfg = run_config(run_dir)
    os.umask(int(str(cfg.umask), 8))  # a model trained on private tickets is no more readable than its run
    out = Path(os.path.expandvars(args.out)).expanduser().resolve()
    if not is_adapter_run(run_dir):  # peft=full: final/ is already a whole model
        tmp = _fresh_output(out)
        shutil.copytree(run_dir / "final", tmp)
        _finish(tmp, out, {"run_dir": str(run_dir), "kind": "full"})
        print(f"export: this run trained the whole model; {run_dir / 'final'} copied to {out}")
        return 0
    if args.merge:
        record = export_merged(run_dir, cfg, out, args.base, args.dtype)
        check = record["check"]
        print(f"export: merged model ({record['dtype']}, safetensors, tokenizer with its chat template) -> {out}")
        print(f"  checked: reloaded with AutoModelForCausalLM.from_pretrained, its logits differ from base + "
              f"adapter by at most {check['max_abs_logit_diff']:.2g} on {check['probes']} prompts (the adapter "
              f"itself moves them by {check['adapter_effect_max_abs_logit_diff']:.2g})")
    else:
        record = export_adapter(run_dir, cfg, out, args.base)
        print(f"export: LoRA adapter (PEFT, r={record['r']}, alpha={record['lora_alpha']}, "
              f"{len(record['target_modules'])} target modules; base {record['base']}) -> {out}")
        if record["vllm_problems"]:
            print(f"  vLLM would refuse it: {'; '.join(record['vllm_problems'])}")
        else:
            rank = f" --max-lora-rank {record['r']}" if record["r"] > 16 else ""  # vLLM's default: 16
            print(f"  vLLM: vllm serve {record['base']} --enable-lora --lora-modules NAME={out}{rank}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
