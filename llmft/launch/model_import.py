"""A GGUF file into an ordinary Hugging Face folder, checked against the GGUF itself (`python -m llmft.models get`).

transformers reads a GGUF (`from_pretrained(folder, gguf_file=...)`, with the `gguf` package) and dequantises its
weights to float32, but refuses to save the result ("quantized with gguf and is not serializable"). The folder is
made from a plain model of the same config holding the same tensors: config.json (without the GGUF's
quantization_config), model.safetensors in float32, generation_config.json, and the tokenizer with its chat template.
float32 because the dequantised weights are float32 values (each a block scale times a 4-bit code plus a block
minimum): bfloat16 would round them again and the folder would no longer be the GGUF's model.

The check reloads the folder with plain transformers, as training will, and compares it with the GGUF-loaded model:
every tensor bit for bit, the chat template's renderings and their token ids on a few conversations, and the logits
on those, which are then equal (same weights, same code, same process). Torch, transformers and gguf are imported
inside the functions: the command that calls this is a login-node tool.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from llmft.errors import UserError, missing_extra

# The conversations the folder is checked on: one turn, a conversation with its own system message, two turns, and
# the generation prompt after the last user message (what chat and eval render).
CHECK_CONVERSATIONS = [
    [{"role": "user", "content": "My job is pending, why?"}],
    [{"role": "system", "content": "You are the user-support assistant of a national HPC centre."},
     {"role": "user", "content": "How do I copy files to the cluster?"},
     {"role": "assistant", "content": "Use scp or rsync from your machine to the login node."}],
    [{"role": "user", "content": "How do I see my quota?"},
     {"role": "assistant", "content": "Run idr_quota_user on a login node."},
     {"role": "user", "content": "Et pour un dossier entier ? Mon job 4127533 attend depuis 3,5 h, déjà."}],
]
LOGITS_BOUND = 0.0  # equal: the folder's tensors are the GGUF-loaded model's, bit for bit, run by the same code


class ConversionError(UserError):
    """The folder would not be the GGUF's model: nothing is written."""


@dataclass
class ConversionCheck:
    num_tensors: int  # compared bit for bit
    num_conversations: int
    num_tokens: int
    max_abs_logit_diff: float
    num_parameters: int


def require_gguf_runtime() -> None:
    """transformers reads GGUF files through llama.cpp's `gguf` package (the `gguf` extra): checked before the
    download."""
    from importlib.util import find_spec

    if find_spec("gguf") is None:
        raise missing_extra("gguf", "gguf", "python -m llmft.models get (reading the model's GGUF file)")


def convert_gguf(gguf_path: Path, out_dir: Path, tokenizer_class: str | None = None) -> ConversionCheck:
    """Write the GGUF's model as a Hugging Face folder into `out_dir` (new or empty) and check it (ConversionCheck).
    `tokenizer_class`: the class tokenizer_config.json names (None: what transformers writes). ConversionError if the
    reloaded folder differs from the GGUF-loaded model in any tensor, rendering, token id or logit."""
    require_gguf_runtime()
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()
    folder, name = str(gguf_path.parent), gguf_path.name
    quiet = os.environ.get("TQDM_DISABLE")
    os.environ["TQDM_DISABLE"] = "1"  # transformers' GGUF reader draws its own tqdm bar
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        gguf_model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32).eval()
    finally:
        if quiet is None:
            os.environ.pop("TQDM_DISABLE", None)
        else:
            os.environ["TQDM_DISABLE"] = quiet

    config = gguf_model.config.to_dict()
    for key in ("quantization_config", "_name_or_path", "_model_name_or_path", "_commit_hash"):
        config.pop(key, None)
    config["dtype"] = "float32"
    plain_config = type(gguf_model.config).from_dict(config)
    with torch.device("meta"):
        plain = AutoModelForCausalLM.from_config(plain_config, dtype=torch.float32)
    plain.load_state_dict(gguf_model.state_dict(), assign=True, strict=True)
    plain.tie_weights()
    plain.generation_config = gguf_model.generation_config
    out_dir.mkdir(parents=True, exist_ok=True)
    plain.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    if tokenizer_class is not None:
        settings_path = out_dir / "tokenizer_config.json"
        settings = json.loads(settings_path.read_text())
        settings_path.write_text(json.dumps({**settings, "tokenizer_class": tokenizer_class}, indent=2) + "\n")
    del plain
    readable_by_umask(out_dir)
    return check_folder(out_dir, gguf_model, tokenizer)


def readable_by_umask(folder: Path) -> None:
    """The files as the user's umask says (safetensors are written 0600 through a temporary file): a folder on a
    project space is shared with the group like any other file the user writes there."""
    mask = os.umask(0)
    os.umask(mask)
    for path in folder.iterdir():
        if path.is_file():
            path.chmod(0o666 & ~mask)


def check_folder(out_dir: Path, gguf_model, gguf_tokenizer) -> ConversionCheck:
    """The folder, loaded by plain transformers, against the GGUF-loaded model and tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(out_dir, local_files_only=True, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(out_dir, local_files_only=True)
    if "quantization_config" in model.config.to_dict():
        raise ConversionError(f"{out_dir}/config.json still has the GGUF's quantization_config: a bug in llmft's "
                              f"conversion, nothing was kept.")
    expected, got = gguf_model.state_dict(), model.state_dict()
    if set(expected) != set(got):
        missing, extra = sorted(set(expected) - set(got))[:3], sorted(set(got) - set(expected))[:3]
        raise ConversionError(f"the converted folder's tensors ({len(got)}) are not the GGUF's ({len(expected)}): "
                              f"missing {missing}, extra {extra}: nothing was kept.")
    differing = [key for key in expected if expected[key].dtype != got[key].dtype or not torch.equal(expected[key],
                                                                                                       got[key])]
    if differing:
        raise ConversionError(f"{len(differing)} tensors of the converted folder differ from the GGUF's "
                              f"(first: {differing[0]}): nothing was kept.")
    largest, num_tokens = 0.0, 0
    for conversation in CHECK_CONVERSATIONS:
        generation = conversation[-1]["role"] != "assistant"
        text = tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=generation)
        gguf_text = gguf_tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=generation)
        if text != gguf_text:
            raise ConversionError(f"the converted folder's chat template renders {text[:60]!r}..., the GGUF's "
                                  f"{gguf_text[:60]!r}...: nothing was kept.")
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if ids != gguf_tokenizer(text, add_special_tokens=False)["input_ids"]:
            raise ConversionError("the converted folder's tokenizer splits a conversation otherwise than the GGUF's: "
                                  "nothing was kept.")
        with torch.no_grad():
            batch = torch.tensor([ids])
            difference = (model(batch).logits - gguf_model(batch).logits).abs().max().item()
        largest, num_tokens = max(largest, difference), num_tokens + len(ids)
    if largest > LOGITS_BOUND:
        raise ConversionError(f"the converted folder's logits differ from the GGUF's by up to {largest:.3g} (allowed: "
                              f"{LOGITS_BOUND}): nothing was kept.")
    return ConversionCheck(num_tensors=len(expected), num_conversations=len(CHECK_CONVERSATIONS),
                           num_tokens=num_tokens, max_abs_logit_diff=largest,
                           num_parameters=sum(p.numel() for p in model.parameters()))

