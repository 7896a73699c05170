"""Use a finished run: its arguments, its model (base + adapter), its prompts, and batched generation.

`python -m llmft.eval`, `llmft.chat` and `llmft.export` share this. A run's model is the base it was trained on
(`RUN_DIR/base_model` for model=tiny, else `model.path`) with the adapter of `RUN_DIR/final`, and its tokenizer is
the one saved in `final/`, with the exact chat template training used. Prompts are rendered as training rendered
them (the run's `data.system_prompt` first) and tokenized without special tokens, as training tokenized them.

No torch at import time: the commands parse and check their arguments in a fraction of a second first.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path

from llmft.config.arguments import UsageError
from llmft.rundir import layout
from llmft.rundir.files import read_config, read_summary
from llmft.data.tokenize.templating import with_system_prompt

# transformers 5 warns through PEFT on every model load; nothing a user can act on
warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")


def run_directory(text: str | None, usage: str) -> Path:
    """The run directory named by `run=`, checked: it exists, has its config and a final model."""
    if not text:
        raise UsageError(f"say which run: {usage}")
    run_dir = Path(os.path.expandvars(text)).expanduser().resolve()
    if not run_dir.is_dir():
        raise UsageError(f"run={text}: no such directory.")
    if not layout.is_run_dir(run_dir):
        raise UsageError(f"run={text} is not a run directory (no config.yaml): give a folder made by llmft.launch.")
    final = layout.final_dir(run_dir)
    if not (final / "adapter_config.json").is_file() and not (final / "config.json").is_file():
        status = ""
        if layout.summary_path(run_dir).is_file():
            status = f" (summary.json says: {read_summary(run_dir).get('status', 'unknown')})"
        raise UsageError(f"run={text} has no final model in {final}{status}: the run has not completed; continue it "
                         f"with `python -m llmft.launch resume={run_dir}`.")
    return run_dir


def run_config(run_dir: Path):
    """The run's saved config, checked against the schema (ConfigError in one sentence otherwise)."""
    return read_config(run_dir)


def is_adapter_run(run_dir: Path) -> bool:
    return (layout.final_dir(run_dir) / "adapter_config.json").is_file()


def base_model_dir(run_dir: Path, cfg, override: str | None = None) -> Path:
    """The base model the run's adapter applies to: `override`, `RUN_DIR/base_model` (model=tiny) or `model.path`.

    Resolved from the run directory rather than the adapter's `base_model_name_or_path`, so a run directory that
    was moved (copied off the cluster) still finds its tiny base; `base=DIR` covers a model that moved.
    """
    if override:
        path = Path(os.path.expandvars(override)).expanduser().resolve()
        source = f"base={override}"
    elif cfg.model.path is None:
        path, source = layout.tiny_base_dir(run_dir), "the run's base_model/"
    else:
        path = Path(os.path.expandvars(cfg.model.path)).expanduser()
        source = f"model.path={cfg.model.path}"
    if not (path / "config.json").is_file():
        raise UsageError(f"the base model ({source}) is not a local Hugging Face folder (no config.json in {path}): "
                         f"pass the base model's folder with base=DIR.")
    return path


def torch_dtype(name: str):
    import torch

    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def load_saved_tokenizer(run_dir: Path):
    """The tokenizer saved with the run's final model, with its chat template, padding on the left (generation)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(layout.final_dir(run_dir), local_files_only=True)
    if not tokenizer.chat_template:
        raise UsageError(f"{layout.final_dir(run_dir)} has no chat template: was it written by llmft?")
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def device_for_inference():
    import torch

    return torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")


def load_base(path: Path, cfg, dtype: str | None = None):
    """The base model from a local folder; on GPUs spread over the visible devices (device_map=auto)."""
    import torch
    from transformers import AutoModelForCausalLM

    extra = {"device_map": "auto"} if torch.cuda.is_available() else {}
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype(dtype or cfg.model.dtype),
                                                local_files_only=True, **extra)


def load_run_model(run_dir: Path, cfg, base_override: str | None = None):
    """The fine-tuned model for inference: base + adapter (a PeftModel: `disable_adapter()` gives the base), or
    for peft=full the whole model of `final/`. Returns (model, base_path)."""
    from transformers import AutoModelForCausalLM

    if is_adapter_run(run_dir):
        from peft import PeftModel

        base_path = base_model_dir(run_dir, cfg, base_override)
        base = load_base(base_path, cfg)
        model = PeftModel.from_pretrained(base, layout.final_dir(run_dir), is_trainable=False)
    else:
        base_path = Path(cfg.model.path) if cfg.model.path else None
        model = AutoModelForCausalLM.from_pretrained(layout.final_dir(run_dir), dtype=torch_dtype(cfg.model.dtype),
                                                     local_files_only=True)
    if not hasattr(model, "hf_device_map"):
        model.to(device_for_inference())
    model.eval()
    model.config.use_cache = True
    return model, base_path


def input_device(model):
    return next(model.parameters()).device


def stop_token_ids(tokenizer, data_cfg) -> list[int]:
    """Generation stops at the token that closes an assistant turn in training (data.end_of_turn_token, else eos)."""
    ids = [tokenizer.eos_token_id]
    end_of_turn = data_cfg.end_of_turn_token
    if end_of_turn:
        token_ids = tokenizer(end_of_turn, add_special_tokens=False)["input_ids"]
        if len(token_ids) == 1:
            ids.insert(0, token_ids[0])
    return [i for i in dict.fromkeys(ids) if i is not None]


def prompt_messages(messages: list[dict[str, str]], system_prompt: str | None) -> list[dict[str, str]]:
    """The messages before a reply, with the run's system prompt first when they have none (as in training)."""
    return with_system_prompt([{"role": m["role"], "content": m["content"]} for m in messages], system_prompt)


def render_prompt(tokenizer, messages: list[dict[str, str]]) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def fit_prompt(tokenizer, messages: list[dict[str, str]], max_tokens: int) -> tuple[str, int, int] | None:
    """The rendered prompt, its token count and the number of earliest exchanges dropped so that it fits in
    `max_tokens` (the run's model.max_seq_len: as training cut long conversations into windows of whole
    exchanges, the system prompt kept). None when the last user turn alone does not fit."""
    system = [m for m in messages[:1] if m["role"] == "system"]
    rest = messages[len(system):]
    dropped = 0
    while True:
        text = render_prompt(tokenizer, system + rest)
        num_tokens = len(tokenizer(text, add_special_tokens=False)["input_ids"])
        if num_tokens <= max_tokens:
            return text, num_tokens, dropped
        next_user = [i for i, m in enumerate(rest) if m["role"] == "user" and i > 0]
        if not next_user:
            return None
        rest = rest[next_user[0]:]
        dropped += 1


@dataclass
class Generation:
    text: str
    num_tokens: int  # generated tokens, the stop token included
    stopped: bool  # ended with a stop token (else cut at max_new_tokens)


def generation_config(tokenizer, stop_ids: list[int], max_new_tokens: int, temperature: float, top_p: float):
    from transformers import GenerationConfig

    sampling = temperature > 0
    return GenerationConfig(max_new_tokens=max_new_tokens, do_sample=sampling,
                            temperature=temperature if sampling else None, top_p=top_p if sampling else None,
                            top_k=None, eos_token_id=stop_ids, pad_token_id=tokenizer.pad_token_id)


def generate(model, tokenizer, prompts: list[str], stop_ids: list[int], max_new_tokens: int, batch_size: int,
             temperature: float = 0.0, top_p: float = 1.0, seed: int = 0, progress=None) -> list[Generation]:
    """Answers to rendered prompts, in batches of similar lengths (left padding), returned in the prompts' order.

    Greedy when temperature is 0: the answer of a prompt does not depend on the batch it is in (each is the one
    stock `generate` gives the prompt alone: tests/serve/test_batched_generation.py).
    """
    import torch

    config = generation_config(tokenizer, stop_ids, max_new_tokens, temperature, top_p)
    torch.manual_seed(seed)
    lengths = [len(ids) for ids in tokenizer(prompts, add_special_tokens=False)["input_ids"]] if prompts else []
    order = sorted(range(len(prompts)), key=lambda i: -lengths[i])
    results: list[Generation | None] = [None] * len(prompts)
    device = input_device(model)
    for start in range(0, len(order), batch_size):
        indices = order[start:start + batch_size]
        # left padding whatever the tokenizer's default: each row's last prompt token is the last column, where the
        # next token is read, and generate numbers the positions from the first real token
        batch = tokenizer([prompts[i] for i in indices], add_special_tokens=False, padding=True, padding_side="left",
                          return_tensors="pt")
        batch = {k: v.to(device) for k, v in batch.items()}
        with torch.no_grad():
            output = model.generate(**batch, generation_config=config)
        new_tokens = output[:, batch["input_ids"].shape[1]:].tolist()
        for i, tokens in zip(indices, new_tokens):
            end = next((k + 1 for k, t in enumerate(tokens) if t in stop_ids), None)
            kept = tokens[:end] if end else tokens  # rows pad only after their stop token
            text = tokenizer.decode(kept, skip_special_tokens=True).strip()
            results[i] = Generation(text, len(kept), end is not None)
        if progress:
            progress(min(start + batch_size, len(order)), len(order))
    return results  # type: ignore[return-value]


def answer_losses(model, tokenizer, prompts: list[str], answers: list[str], end_of_turn_id: int, max_tokens: int,
                  batch_size: int) -> list[tuple[float, int]]:
    """Per rendered prompt, (the summed loss in nats, the number of tokens) of its answer followed by the token that
    ends the turn, teacher-forced, as training supervises a reply; cut at `max_tokens` in all (model.max_seq_len)."""
    import torch

    prompt_ids = tokenizer(prompts, add_special_tokens=False)["input_ids"] if prompts else []
    answer_ids = [ids + [end_of_turn_id] for ids in tokenizer(answers, add_special_tokens=False)["input_ids"]] \
        if answers else []
    rows = [(p + a)[:max_tokens] for p, a in zip(prompt_ids, answer_ids)]
    device = input_device(model)
    results: list[tuple[float, int]] = []
    for start in range(0, len(rows), batch_size):
        batch = rows[start:start + batch_size]
        width = max(len(row) for row in batch)
        input_ids = torch.full((len(batch), width), tokenizer.pad_token_id, dtype=torch.long)
        labels = torch.full((len(batch), width), -100, dtype=torch.long)
        for i, row in enumerate(batch):  # right padding: positions as in training
            input_ids[i, :len(row)] = torch.tensor(row)
            first_answer = len(prompt_ids[start + i])
            labels[i, first_answer:len(row)] = torch.tensor(row[first_answer:], dtype=torch.long)
        attention = (torch.arange(width)[None, :] < torch.tensor([len(r) for r in batch])[:, None]).long()
        with torch.no_grad():
            logits = model(input_ids=input_ids.to(device), attention_mask=attention.to(device)).logits.float()
        losses = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), labels[:, 1:].to(device),
                                                   reduction="none", ignore_index=-100)
        counted = labels[:, 1:] != -100
        results += [(float(losses[i].sum()), int(counted[i].sum())) for i in range(len(batch))]
    return results

