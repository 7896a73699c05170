"""Write the final model of a run: the PEFT adapter (or the whole model for full fine-tuning) with its tokenizer.

The adapter is checked before it is accepted: every LoRA tensor of the trained model is in the file with its full
shape, and lora_B is not all zeros (an untrained or partially gathered adapter is the anchors' silent failure).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path


class ExportError(Exception):
    pass


def check_adapter(saved: dict, expected: dict) -> None:
    """Refuse an empty or partial adapter. `expected`: the trained model's adapter tensors, by saved name."""
    if not saved:
        raise ExportError("the adapter is empty: no LoRA tensor was saved")
    missing = sorted(set(expected) - set(saved))
    if missing:
        raise ExportError(f"the adapter misses {len(missing)} tensors, e.g. {missing[0]}")
    for name, tensor in expected.items():
        if tuple(saved[name].shape) != tuple(tensor.shape):
            raise ExportError(f"{name} has shape {tuple(saved[name].shape)} instead of {tuple(tensor.shape)}")
    lora_b = [t for n, t in saved.items() if "lora_B" in n]
    if lora_b and all(float(t.abs().max()) == 0.0 for t in lora_b):
        raise ExportError("every lora_B tensor is zero: the adapter learned nothing (or was saved before training)")


def save_final(model, tokenizer, final_dir: Path, base_model_path: Path) -> None:
    """Save into a temporary folder, check, and rename into place: `final/` is complete or absent."""
    from peft import PeftModel, get_peft_model_state_dict
    from safetensors.torch import load_file

    final_dir = Path(final_dir)
    tmp = final_dir.with_name(final_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    if isinstance(model, PeftModel):
        for peft_config in model.peft_config.values():
            peft_config.base_model_name_or_path = str(base_model_path)
        model.save_pretrained(tmp)
        expected = get_peft_model_state_dict(model)
        check_adapter(load_file(tmp / "adapter_model.safetensors"), expected)
    else:
        model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    if final_dir.exists():
        shutil.rmtree(final_dir)
    os.replace(tmp, final_dir)
