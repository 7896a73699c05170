"""python -m llmft.export run=RUN_DIR [out=DIR] [merge=true | format=gguf] [push=ORG/NAME]: a run's adapter for stock
PEFT and vLLM, one merged model for any tool that reads Hugging Face folders, or one GGUF file for llama.cpp and
Ollama; checked before anything is written. out= defaults to RUN_DIR/export/<adapter|merged|gguf>. push=ORG/NAME adds
a model card and uploads the export to the Hub."""

from __future__ import annotations

import json
import os
import shutil
import sys
from dataclasses import dataclass, field
from importlib.util import find_spec
from pathlib import Path
from typing import Optional

from llmft.config.arguments import UsageError, parse_arguments
from llmft.errors import missing_extra, run_command
from llmft.rundir.layout import export_dir
from llmft.serve.inference import base_model_dir, is_adapter_run, run_config, run_directory, stop_token_ids, torch_dtype
from llmft.training.final import ExportError, check_adapter


USAGE = ("python -m llmft.export run=RUN_DIR [out=DIR] [merge=true | format=gguf [gguf.dtype=f16|bf16|q8_0|f32]] "
         "[push=ORG/NAME [private=true] [license=ID]] [base=DIR] [dtype=float32|bfloat16|float16]")

# What the merged model is checked on: conversations rendered with the run's chat template.
PROBE_CONVERSATIONS = [
    [{"role": "user", "content": "My job is pending, why?"}],
    [{"role": "user", "content": "How do I copy files to the cluster?"},
     {"role": "assistant", "content": "Use scp or rsync from your machine to the login node."},
     {"role": "user", "content": "Et pour un dossier entier ?"}],
]


@dataclass
class GGUFArgs:
    dtype: str = "f16"  # the 2-D weights in the file: f16 | bf16 | q8_0 | f32 (norms stay f32, as llama.cpp's own)


@dataclass
class ExportArgs:
    run: Optional[str] = None
    out: Optional[str] = None  # the folder to create (new or empty); default RUN_DIR/export/<adapter|merged|gguf>
    merge: bool = False  # true: one merged model instead of the adapter alone
    format: str = "hf"  # hf: Hugging Face folders (adapter or merge=true); gguf: one GGUF file, merged
    gguf: GGUFArgs = field(default_factory=GGUFArgs)
    base: Optional[str] = None  # the base model's folder, if it moved since training
    # merge=true: the merged weights' dtype (default: the run's model.dtype); format=gguf: the dtype the merge is
    # computed in before the file's own rounding (default float32; bfloat16 halves the memory of a large model)
    dtype: Optional[str] = None
    push: Optional[str] = None  # ORG/NAME: write a model card and upload the export to the Hugging Face Hub
    private: bool = True  # push=: create the repository private (a model trained on tickets is not public by default)
    license: Optional[str] = None  # push=: the card's license (default: the base model card's, else "other")
    base_model_id: Optional[str] = None  # push=: the base's Hub id (default: the last two parts of model.path)


def vllm_adapter_problems(adapter_dir: Path) -> list[str]:
    """Why vLLM's LoRA loader would refuse this PEFT adapter folder (empty: it would load it).

    vLLM reads adapter_config.json (r, lora_alpha and target_modules required; no modules_to_save, no DoRA, bias
    only with --enable-lora-bias) and tensors named `base_model.model.<module>.lora_A|lora_B.weight` for target
    modules. The rank must also be at most the server's --max-lora-rank.
    """
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


def merged_in_memory(run_dir: Path, cfg, base_override: str | None, dtype: str):
    """The run's model with the adapter merged into the base (peft=full: final/ itself), in `dtype`, and its
    tokenizer; nothing written."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(run_dir / "final", local_files_only=True)
    if not is_adapter_run(run_dir):
        return AutoModelForCausalLM.from_pretrained(run_dir / "final", dtype=torch_dtype(dtype),
                                                    local_files_only=True).eval(), tokenizer
    base = AutoModelForCausalLM.from_pretrained(base_model_dir(run_dir, cfg, base_override), dtype=torch_dtype(dtype),
                                                local_files_only=True)
    return PeftModel.from_pretrained(base, run_dir / "final").merge_and_unload().eval(), tokenizer


def model_config_of(run_dir: Path, cfg, base_override: str | None):
    from transformers import AutoConfig

    folder = base_model_dir(run_dir, cfg, base_override) if is_adapter_run(run_dir) else run_dir / "final"
    return AutoConfig.from_pretrained(folder, local_files_only=True)


def export_gguf(run_dir: Path, cfg, out: Path, gguf_dtype: str, base_override: str | None = None,
                dtype: str | None = None) -> dict:
    """The merged model as out/model.gguf (tensors, hyper-parameters, tokenizer and chat template) with an Ollama
    Modelfile beside it; accepted only if gguf.GGUFReader reads back every tensor of the merged model within the
    dtype's rounding and every key llama.cpp needs."""
    import gc

    from llmft.serve import gguf_export

    gguf_export.check_architecture(model_config_of(run_dir, cfg, base_override))  # before minutes of loading
    dtype = dtype or "float32"  # one rounding only, the file's own
    tmp = _fresh_output(out)
    tmp.mkdir(parents=True)
    try:
        model, tokenizer = merged_in_memory(run_dir, cfg, base_override, dtype)
        stop_ids = stop_token_ids(tokenizer, cfg.data)
        path = tmp / gguf_export.GGUF_FILE_NAME
        types = gguf_export.write_gguf(model, tokenizer, path, gguf_dtype, stop_ids,
                                       gguf_export.safe_model_name(f"{cfg.model.name}-{run_dir.name}"))
        check = gguf_export.check_gguf(path, model, tokenizer, gguf_dtype, stop_ids, out / path.name)
        modelfile = gguf_export.ollama_modelfile(tokenizer, gguf_export.token_texts(tokenizer, stop_ids),
                                                 cfg.data.system_prompt, PROBE_CONVERSATIONS)
        (tmp / "Modelfile").write_text(modelfile)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    del model
    gc.collect()
    size_bytes = path.stat().st_size
    counts: dict[str, int] = {}
    for tensor_type in types.values():
        counts[tensor_type] = counts.get(tensor_type, 0) + 1
    return _finish(tmp, out, {
        "run_dir": str(run_dir), "kind": "gguf", "gguf_dtype": gguf_dtype, "merge_dtype": dtype,
        "file": gguf_export.GGUF_FILE_NAME, "size_bytes": size_bytes, "tensor_types": counts,
        "ollama_template": "TEMPLATE" in modelfile, "check": check,
    })


def push_export(run_dir: Path, cfg, out: Path, args: ExportArgs) -> None:
    """Write the model card into the export `out` and upload it, or, offline, say so and how to upload it later."""
    from llmft.serve import model_card

    record = json.loads((out / "llmft_export.json").read_text())
    base_dir = base_model_dir(run_dir, cfg, args.base) if cfg.model.path or is_adapter_run(run_dir) else None
    license_ = args.license or model_card.base_license(base_dir) or "other"
    base_id = model_card.base_model_id(cfg, args.base_model_id)
    card = model_card.model_card(run_dir, cfg, record, license_, base_id, args.push)
    model_card.write_model_card(out, card)
    adapter_config = out / "adapter_config.json"
    if base_id and adapter_config.is_file():  # on the Hub, the adapter names its base by Hub id, not a local folder
        config = json.loads(adapter_config.read_text())
        config["base_model_name_or_path"] = base_id
        adapter_config.write_text(json.dumps(config, indent=2, sort_keys=True))
    print(f"push: model card (license {license_}) -> {out / 'README.md'}")
    offline = model_card.offline_reason()
    if offline:
        raise model_card.PushError(
            f"nothing was uploaded: this machine is offline ({offline}); the export and its card are ready in {out}, "
            f"upload them from a login node with: {model_card.login_node_command(args.push, out, args.private)}")
    url = model_card.upload(out, args.push, args.private)
    print(f"push: uploaded {out} to {url} ({'private' if args.private else 'public'})")


def default_out(run_dir: Path, args: ExportArgs) -> Path:
    kind = "gguf" if args.format == "gguf" else "merged" if args.merge else "adapter"
    return export_dir(run_dir, kind)


def is_export_of(out: Path, run_dir: Path) -> bool:
    """`out` is a finished export of this run (push= again after an offline refusal uploads it as it is)."""
    record = out / "llmft_export.json"
    return record.is_file() and json.loads(record.read_text()).get("run_dir") == str(run_dir)


HELP = f"""
usage: {USAGE}

merge=false (default): the adapter alone, for stock PEFT or vLLM --enable-lora.
merge=true: base + adapter merged into one model, checked against base + adapter.
format=gguf: the merged model as one GGUF file for llama.cpp and Ollama (with a Modelfile), read back and checked
  (needs the gguf extra: pip install 'llmft[gguf]').
push=ORG/NAME: a model card beside the export, uploaded to the Hugging Face Hub (offline: the command to upload it
  from a login node).
out=DIR: a new or empty folder; default RUN_DIR/export/adapter, RUN_DIR/export/merged or RUN_DIR/export/gguf.

Examples:
  python -m llmft.export run=RUN_DIR                                  # the adapter, in RUN_DIR/export/adapter
  python -m llmft.export run=RUN_DIR format=gguf                      # RUN_DIR/export/gguf/model.gguf
  python -m llmft.export run=RUN_DIR out=$WORK/models/tickets-merged merge=true
  python -m llmft.export run=RUN_DIR push=my-lab/tickets-lora
"""


def main(argv: list[str] | None = None) -> int:
    return run_command(export, argv, HELP)


def export(argv: list[str]) -> int:
    args = parse_arguments(argv, ExportArgs, USAGE)
    run_dir = run_directory(args.run, USAGE)
    if args.dtype not in (None, "float32", "bfloat16", "float16"):
        raise UsageError(f"dtype={args.dtype} must be float32, bfloat16 or float16.")
    if args.format not in ("hf", "gguf"):
        raise UsageError(f"format={args.format} must be hf (Hugging Face folders) or gguf (one file for llama.cpp).")
    if args.gguf.dtype not in ("f16", "bf16", "q8_0", "f32"):
        raise UsageError(f"gguf.dtype={args.gguf.dtype} must be f16, bf16, q8_0 or f32.")
    if args.push is not None and (args.push.count("/") != 1 or not all(args.push.split("/"))):
        raise UsageError(f"push={args.push} must name a Hub repository as ORG/NAME (or USER/NAME).")
    cfg = run_config(run_dir)
    os.umask(int(str(cfg.umask), 8))  # a model trained on private tickets is no more readable than its run
    out = Path(os.path.expandvars(args.out)).expanduser().resolve() if args.out else default_out(run_dir, args)
    if not args.out and not (args.push and is_export_of(out, run_dir)) and out.exists() and any(out.iterdir()):
        raise UsageError(f"{out} holds an earlier export of this run: remove it (rm -r {out}) or give another folder "
                         f"with out=DIR.")
    if args.push and is_export_of(out, run_dir):
        print(f"export: {out} already holds an export of this run; sharing it as it is")
    elif args.format == "gguf":
        if find_spec("gguf") is None:
            raise missing_extra("gguf", "gguf", "format=gguf")
        record = export_gguf(run_dir, cfg, out, args.gguf.dtype, args.base, args.dtype)
        worst = record["check"]["worst_tensor"]
        print(f"export: GGUF ({record['gguf_dtype']}, {record['size_bytes'] / 2**20:.1f} MiB, tokenizer and chat "
              f"template in its metadata) -> {out / record['file']}")
        print(f"  checked: read back with gguf.GGUFReader, {record['check']['tensors']} tensors within their "
              f"format's rounding (largest difference {worst['max_abs_diff']:.2g}, in {worst['tensor']}), every "
              f"llama.* and tokenizer key present")
        print(f"  Ollama: cd {out} && ollama create NAME -f Modelfile; llama.cpp: llama-cli -m {out / record['file']}")
    elif not is_adapter_run(run_dir):  # peft=full: final/ is already a whole model
        tmp = _fresh_output(out)
        shutil.copytree(run_dir / "final", tmp)
        _finish(tmp, out, {"run_dir": str(run_dir), "kind": "full"})
        print(f"export: this run trained the whole model; {run_dir / 'final'} copied to {out}")
    elif args.merge:
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
    if args.push:
        push_export(run_dir, cfg, out, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
