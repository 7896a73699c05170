"""Write the final model of a run: the PEFT adapter (or the whole model for full fine-tuning) with its tokenizer.

The adapter is checked before it is accepted: every LoRA tensor of the trained model is in the file with its full
shape, and lora_B is not all zeros (an untrained or partially gathered adapter is the anchors' silent failure).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from llmft.errors import UserError


class ExportError(UserError):
    pass


def check_adapter(saved: dict, expected_shapes: dict) -> None:
    """Refuse an empty or partial adapter. `expected_shapes`: the trained model's full LoRA shapes, by saved name."""
    if not saved:
        raise ExportError("the adapter is empty: no LoRA tensor was saved")
    missing = sorted(set(expected_shapes) - set(saved))
    if missing:
        raise ExportError(f"the adapter misses {len(missing)} tensors, e.g. {missing[0]}")
    for name, shape in expected_shapes.items():
        if tuple(saved[name].shape) != tuple(shape):
            raise ExportError(f"{name} has shape {tuple(saved[name].shape)} instead of {tuple(shape)}")
    lora_b = [t for n, t in saved.items() if "lora_B" in n]
    if lora_b and all(float(t.abs().max()) == 0.0 for t in lora_b):
        raise ExportError("every lora_B tensor is zero: the adapter learned nothing (or was saved before training)")


def save_final(model, tensors, full_shape, tokenizer, final_dir: Path, base_model_path: Path) -> None:
    """Write the final adapter (or model) from gathered full tensors: into a temporary folder, checked, renamed.

    `model` is the PEFT (or HF) model, possibly sharded; `tensors` yields (name, full tensor on the CPU) as the
    strategy gathers them (`Strategy.export_tensors`); `full_shape(param)` is a parameter's whole shape
    (`Strategy.full_shape`). An adapter is small: it is collected, then checked. A whole
    model (peft=full) is written as it comes, in safetensors shards, so rank 0 never holds more than one shard in
    host memory (70B in fp32 is 280 GB). Only rank 0 calls this.
    """
    final_dir = Path(final_dir)
    tmp = final_dir.with_name(final_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        _write(model, tensors, full_shape, tokenizer, tmp, base_model_path)
    except BaseException:  # a bad adapter, a full disk, an export abandoned at a stop signal: no half folder left
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if final_dir.exists():
        shutil.rmtree(final_dir)
    os.replace(tmp, final_dir)


def _write(model, tensors, full_shape, tokenizer, tmp: Path, base_model_path: Path) -> None:
    import torch
    from peft import PeftModel, get_peft_model_state_dict
    from safetensors.torch import load_file

    if isinstance(model, PeftModel):
        for peft_config in model.peft_config.values():
            peft_config.base_model_name_or_path = str(base_model_path)
        model.save_pretrained(tmp, state_dict=dict(tensors))
        shapes = {n: full_shape(p) for n, p in model.named_parameters() if p.requires_grad}
        expected = get_peft_model_state_dict(model, state_dict={
            n: torch.empty(shape, device="meta") for n, shape in shapes.items()})
        check_adapter(load_file(tmp / "adapter_model.safetensors"), {n: t.shape for n, t in expected.items()})
    else:
        tmp.mkdir(parents=True)
        write_sharded(tensors, tmp)
        model.config.save_pretrained(tmp)
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)


def write_sharded(tensors, folder: Path, max_shard_bytes: int = 5 * 2**30) -> None:
    """Tensors as they come into `model.safetensors`, or `model-0000i-of-0000N.safetensors` shards of at most
    `max_shard_bytes` with their index, the layout `from_pretrained` reads. Hand-written because `save_pretrained`
    wants the whole state dict in memory at once."""
    import json

    from safetensors.torch import save_file

    shard: dict = {}
    shard_bytes, total_bytes, written = 0, 0, []

    def flush() -> None:
        nonlocal shard, shard_bytes
        if shard:
            name = f"shard-{len(written) + 1:05d}.safetensors"
            save_file(shard, folder / name, metadata={"format": "pt"})
            written.append((name, list(shard)))
            shard, shard_bytes = {}, 0

    for name, tensor in tensors:
        tensor = tensor.contiguous()
        size = tensor.numel() * tensor.element_size()
        if shard and shard_bytes + size > max_shard_bytes:
            flush()
        shard[name] = tensor
        shard_bytes += size
        total_bytes += size
    flush()
    if len(written) == 1:
        os.replace(folder / written[0][0], folder / "model.safetensors")
        return
    weight_map = {}
    for index, (name, names) in enumerate(written, start=1):
        final_name = f"model-{index:05d}-of-{len(written):05d}.safetensors"
        os.replace(folder / name, folder / final_name)
        weight_map.update({tensor_name: final_name for tensor_name in names})
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total_bytes}, "weight_map": weight_map}, indent=2))
