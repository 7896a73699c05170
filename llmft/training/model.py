"""The model of a run, from nothing to ready to wrap: `load_model` applies the fixed order

    load (built for model=tiny; on the meta device for FSDP2; under the strategy's loading context, which for ZeRO-3
    partitions while loading) -> PEFT -> LoRA init (seeded, or the adapter of the run it starts from: init_from)
    -> activation checkpointing -> compile -> device

and the strategy then shards or replicates it (`Strategy.wrap`). Every model-specific case (the tiny model, QLoRA's
4-bit load, the meta skeleton and its shards read from safetensors) lives here, not in the loop.
"""

from __future__ import annotations

import os
from pathlib import Path

from llmft.config.families import FIXED_MLP_RATIO, MULTI_HEAD_ONLY, ModelFamily, family_of, mla_dims, size_key
from llmft.config.schema import PeftMethod
from llmft.errors import ConfigError, missing_extra
from llmft.rundir.init_from import starting_adapter


# Each family's transformers classes (config, causal LM), for model=tiny and the tests' models of published shapes.
FAMILY_CLASSES = {
    ModelFamily.llama: ("LlamaConfig", "LlamaForCausalLM"),
    ModelFamily.mistral: ("MistralConfig", "MistralForCausalLM"),
    ModelFamily.qwen2: ("Qwen2Config", "Qwen2ForCausalLM"),
    ModelFamily.qwen3: ("Qwen3Config", "Qwen3ForCausalLM"),
    ModelFamily.gemma3: ("Gemma3TextConfig", "Gemma3ForCausalLM"),
    ModelFamily.phi3: ("Phi3Config", "Phi3ForCausalLM"),
    ModelFamily.gpt2: ("GPT2Config", "GPT2LMHeadModel"),
    ModelFamily.bloom: ("BloomConfig", "BloomForCausalLM"),
    ModelFamily.deepseek_v3: ("DeepseekV3Config", "DeepseekV3ForCausalLM"),
}


def family_config(family, hidden_size: int, intermediate_size: int, num_hidden_layers: int, num_attention_heads: int,
                  num_key_value_heads: int, vocab_size: int, max_positions: int, head_dim: int | None = None,
                  **settings):
    """A family's transformers config of the given sizes, under the family's own key names (GPT-2's n_embd,
    BLOOM's n_layer, ...); `settings` (token ids, tie_word_embeddings, initializer_range) pass as they are."""
    import transformers

    family = family_of(family)
    sizes = {"hidden_size": hidden_size, "intermediate_size": intermediate_size,
             "num_hidden_layers": num_hidden_layers, "num_attention_heads": num_attention_heads,
             "num_key_value_heads": num_key_value_heads}
    if family in (ModelFamily.gpt2, ModelFamily.bloom):  # no such key: as many key/value heads as heads
        del sizes["num_key_value_heads"]
    elif family in MULTI_HEAD_ONLY:  # DeepSeek's latent attention: a key and a value per head
        sizes["num_key_value_heads"] = num_attention_heads
    if family in FIXED_MLP_RATIO:
        del sizes["intermediate_size"]
    kwargs = {size_key(family, name): value for name, value in sizes.items()}
    kwargs["vocab_size"] = vocab_size
    if family == ModelFamily.gpt2:  # learned positions; dropout off (GPT-2's default 0.1), as every other family
        kwargs.update(n_positions=max_positions, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    elif family != ModelFamily.bloom:  # BLOOM: ALiBi, no position limit
        kwargs["max_position_embeddings"] = max_positions
    if family in (ModelFamily.qwen3, ModelFamily.gemma3):  # their configs default to 128 / 256
        kwargs["head_dim"] = head_dim or hidden_size // num_attention_heads
    if family == ModelFamily.gemma3:  # queries scaled by 1/sqrt(head_dim), as Gemma 3's published configs
        kwargs["query_pre_attn_scalar"] = kwargs["head_dim"]
    if family == ModelFamily.deepseek_v3:  # dense: no layer past first_k_dense_replace, so no MoE
        kwargs.update(mla_dims(hidden_size, num_attention_heads), first_k_dense_replace=num_hidden_layers)
    config_class, _ = FAMILY_CLASSES[family]
    return getattr(transformers, config_class)(**kwargs, **settings)


def build_tiny_model(tiny_cfg, tokenizer, seed: int, max_seq_len: int):
    """A small model of `model.tiny.family` (a Llama by default) with seeded random weights, sized to the run's
    tokenizer."""
    import torch
    import transformers

    family = family_of(tiny_cfg.family)
    config = family_config(
        family,
        vocab_size=len(tokenizer),
        hidden_size=tiny_cfg.hidden_size,
        intermediate_size=tiny_cfg.intermediate_size,
        num_hidden_layers=tiny_cfg.num_hidden_layers,
        num_attention_heads=tiny_cfg.num_attention_heads,
        num_key_value_heads=tiny_cfg.num_key_value_heads,
        max_positions=max(max_seq_len, 256),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=tiny_cfg.tie_word_embeddings,
        initializer_range=tiny_cfg.initializer_range,
    )
    torch.manual_seed(seed)
    return getattr(transformers, FAMILY_CLASSES[family][1])(config)


def quantization_kwargs(peft_cfg) -> dict:
    """peft=qlora as BitsAndBytesConfig arguments: the frozen base in 4 bits, computed in `peft.compute_dtype`
    (values checked at launch by llmft.config.validation)."""
    return {
        "load_in_4bit": True,
        "bnb_4bit_quant_type": peft_cfg.quant_type,
        "bnb_4bit_use_double_quant": bool(peft_cfg.double_quant),
        "bnb_4bit_compute_dtype": peft_cfg.compute_dtype,
    }


def require_qlora_runtime() -> None:
    """QLoRA needs a CUDA GPU and bitsandbytes: say so in one sentence rather than fail deep in the load."""
    import torch

    if not torch.cuda.is_available():
        raise ConfigError("peft=qlora needs a CUDA GPU (bitsandbytes 4-bit); on this machine use peft=lora.")
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise missing_extra("bitsandbytes", "qlora", "peft=qlora") from None


def weights_dtype(model_cfg, peft_cfg, compute=None) -> str:
    """Frozen weights stay in model.dtype; trained weights are kept in float32 (the optimizer's master copy), and the
    compute runs in bf16 through autocast, FSDP2's MixedPrecisionPolicy or DeepSpeed's bf16 mode. Adam updates on
    bf16 weights would lose most small steps to rounding. A bf16 base on an fp16 run (`compute`, a GPU without native
    bf16: V100) is kept in fp16, its matmuls would be emulated in bf16."""
    import torch

    if peft_cfg is not None and peft_cfg.method is PeftMethod.full:
        return "float32"
    if compute is torch.float16 and model_cfg.dtype == "bfloat16":
        return "float16"
    return model_cfg.dtype


def load_pretrained_model(model_cfg, peft_cfg=None, gpu_index: int = 0, attention: str = "sdpa", compute=None):
    """A local Hugging Face folder, read with `local_files_only` (compute nodes are offline), with the attention
    implementation the rank chose (training/attention.py)."""
    import torch
    from transformers import AutoModelForCausalLM

    path = Path(os.path.expandvars(model_cfg.path)).expanduser()
    if not (path / "config.json").exists():
        raise ConfigError(
            f"model.path={model_cfg.path} is not a Hugging Face model folder (no config.json): "
            "point model.path at a local copy of the model."
        )
    extra = {}
    if peft_cfg is not None and peft_cfg.method is PeftMethod.qlora:
        from transformers import BitsAndBytesConfig

        require_qlora_runtime()
        extra = {"quantization_config": BitsAndBytesConfig(**quantization_kwargs(peft_cfg)),
                 "device_map": {"": gpu_index}}
    model = AutoModelForCausalLM.from_pretrained(
        path,
        dtype=getattr(torch, weights_dtype(model_cfg, peft_cfg, compute)),
        local_files_only=True,
        attn_implementation=attention,
        **extra,
    )
    if extra:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    return model


def apply_peft(model, peft_cfg, model_cfg):
    """LoRA adapters on the target modules, or every weight trainable for full fine-tuning."""
    method = peft_cfg.method
    if method is PeftMethod.full:
        model.requires_grad_(True)
        return model
    if method is PeftMethod.qlora:
        require_qlora_runtime()
    from peft import LoraConfig, get_peft_model

    targets = list(peft_cfg.target_modules or model_cfg.lora_target_modules)
    targeted = check_lora_targets(model, targets)
    lora_config = LoraConfig(
        r=peft_cfg.r,
        lora_alpha=peft_cfg.alpha,
        lora_dropout=peft_cfg.dropout,
        target_modules=targets,
        exclude_modules=outside_language_model(model),
        # GPT-2's projections are transformers' Conv1D, whose weight is stored (in, out): PEFT must transpose
        # its update (it would otherwise switch this on itself, with a warning, but save the config without it).
        fan_in_fan_out=any(type(module).__name__ == "Conv1D" for module in targeted),
        task_type="CAUSAL_LM",
    )
    peft_model = get_peft_model(model, lora_config)
    adapted = [name for name, module in peft_model.named_modules() if hasattr(module, "lora_A")]
    skipped = [target for target in targets if not any(name.endswith("." + target) for name in adapted)]
    if skipped:  # PEFT only warns (e.g. a target found only in the image encoder that exclude_modules leaves out)
        raise ConfigError(f"PEFT put no adapter on {', '.join(skipped)} of {type(model).__name__}: remove "
                          f"{'it' if len(skipped) == 1 else 'them'} from peft.target_modules.")
    return peft_model


def outside_language_model(model) -> str | None:
    """For a multimodal model trained on text (Gemma 3's folders hold Gemma3ForConditionalGeneration): a PEFT
    `exclude_modules` pattern for every module outside its language model, so that the image encoder's q/k/v_proj
    get no adapter (they would never see an image). None for a text model."""
    import re

    if getattr(model.config, "vision_config", None) is None:
        return None
    decoder = model.get_decoder()
    prefix = next(name for name, module in model.named_modules() if module is decoder)
    return rf"(?!{re.escape(prefix)}\.).*"


def check_lora_targets(model, targets: list[str]) -> list:
    """The modules the LoRA targets name (as PEFT matches a list: the whole name or its last dotted parts); a target
    that matches none fails in one sentence listing the model's linear layers (PEFT would skip it silently when
    another target matches)."""
    modules = list(model.named_modules())
    matched = {target: [module for name, module in modules if name == target or name.endswith("." + target)]
               for target in targets}
    missing = [target for target, found in matched.items() if not found]
    if missing:
        linear = sorted({name.rsplit(".", 1)[-1] for name, module in modules
                         if type(module).__name__ in ("Linear", "Conv1D", "Linear4bit")})
        raise ConfigError(f"LoRA target(s) {', '.join(missing)} match no module of {type(model).__name__}: set "
                          f"peft.target_modules to some of its layers ({', '.join(linear)}).")
    return [module for found in matched.values() for module in found]


def full_numel(param, full_shape=None) -> int:
    """A parameter's number of weights, however it is stored: a bitsandbytes 4-bit tensor packs two weights per byte
    (numel() counts the bytes); a sharded or partitioned one counts its whole shape (`full_shape`: the strategy's)."""
    quant_state = getattr(param, "quant_state", None)
    if quant_state is not None and getattr(quant_state, "shape", None) is not None:
        shape = quant_state.shape
    else:
        shape = full_shape(param) if full_shape is not None else param.shape
    numel = 1
    for size in shape:
        numel *= int(size)
    return numel


def count_parameters(model, full_shape=None) -> tuple[int, int]:
    """(all, trainable) parameters of a model, sharded, partitioned or quantized alike (`full_shape`:
    `Strategy.full_shape`)."""
    sizes = [(full_numel(p, full_shape), p.requires_grad) for p in model.parameters()]
    return sum(n for n, _ in sizes), sum(n for n, trainable in sizes if trainable)


def causal_lm_class(model_cfg):
    """The transformers class the run's model is built as (None when the folder's type is not a causal LM the
    Auto class knows): what it says about the attention kernels it can run (training/attention.py)."""
    import transformers
    from transformers import AutoConfig, AutoModelForCausalLM

    if model_cfg.path is None:
        return getattr(transformers, FAMILY_CLASSES[family_of(model_cfg.tiny.family)][1])
    config = AutoConfig.from_pretrained(Path(os.path.expandvars(model_cfg.path)).expanduser(), local_files_only=True)
    try:
        return AutoModelForCausalLM._model_mapping[type(config)]
    except KeyError:
        return None


def build_on_meta(model_cfg, peft_cfg=None, attention: str = "sdpa", compute=None):
    """The model's skeleton with its parameters on the meta device (no memory); buffers (rotary tables) stay real.

    FSDP2 shards this skeleton, and each rank then reads only its shards from the safetensors files (`load_weights`
    with the rows of its shards, strategies/fsdp.py), so no rank ever holds a full copy of the weights in host RAM.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    path = Path(os.path.expandvars(model_cfg.path)).expanduser()
    config = AutoConfig.from_pretrained(path, local_files_only=True)
    # Straight on the meta device: accelerate's init_empty_weights creates each tensor on the CPU first, which under
    # deterministic mode (filling new memory) costs the model's size in resident memory.
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(
            config, dtype=getattr(torch, weights_dtype(model_cfg, peft_cfg, compute)), attn_implementation=attention
        )
    for module in model.modules():  # computed buffers (rotary tables) must be real: rebuild their small owners
        meta_buffers = [name for name, buffer in module.named_buffers(recurse=False) if buffer.is_meta]
        if not meta_buffers:
            continue
        try:
            fresh = type(module)(config=model.config)
        except TypeError:  # an owner not built from the config (Gemma 3's scaled embedding, whose weight is large):
            for name in meta_buffers:  # real buffers, filled by the model's own initialisation of that module
                module.register_buffer(name, torch.empty_like(getattr(module, name), device="cpu"), persistent=False)
            model._init_weights(module)
            continue
        for name in meta_buffers:
            module.register_buffer(name, getattr(fresh, name), persistent=False)
    return model


def checkpoint_name(parameter_name: str) -> str:
    """The name a parameter of the PEFT-wrapped model has in the base model's safetensors files."""
    name = parameter_name.removeprefix("base_model.model.")
    return name.replace(".base_layer.", ".")


def safetensors_index(model_path: Path) -> dict[str, Path]:
    """Tensor name -> the .safetensors file holding it (sharded checkpoints have an index json)."""
    import json

    index_file = model_path / "model.safetensors.index.json"
    if index_file.exists():
        weight_map = json.loads(index_file.read_text())["weight_map"]
        return {name: model_path / file for name, file in weight_map.items()}
    single = model_path / "model.safetensors"
    if not single.exists():
        raise ConfigError(f"{model_path} has no model.safetensors (or index): llmft loads safetensors weights only.")
    from safetensors import safe_open

    with safe_open(single, framework="pt") as handle:
        return {name: single for name in handle.keys()}


SAFETENSORS_DTYPES = {"BF16": "bfloat16", "F16": "float16", "F32": "float32", "F64": "float64", "I64": "int64"}


def read_rows(file: Path, name: str, start: int, end: int, header_cache: dict):
    """Rows [start, end) of a tensor in a .safetensors file, read with plain file I/O.

    Hand-written on purpose: safetensors' `safe_open` memory-maps the file, and every page a rank touches stays in
    its resident memory while the handle is open, so N ranks reading their shards would count the model again.
    Rows of a row-major tensor are one contiguous byte range: seek, read, done.
    """
    import json
    import struct

    import torch

    if file not in header_cache:
        with open(file, "rb") as handle:
            (header_size,) = struct.unpack("<Q", handle.read(8))
            header_cache[file] = (8 + header_size, json.loads(handle.read(header_size)))
    data_start, header = header_cache[file]
    entry = header[name]
    dtype = getattr(torch, SAFETENSORS_DTYPES[entry["dtype"]])
    shape = entry["shape"]
    row_numel = 1
    for size in shape[1:]:
        row_numel *= size
    row_bytes = row_numel * torch.empty(0, dtype=dtype).element_size()
    begin = data_start + entry["data_offsets"][0] + start * row_bytes
    buffer = bytearray((end - start) * row_bytes)
    with open(file, "rb") as handle:
        handle.seek(begin)
        handle.readinto(buffer)
    return torch.frombuffer(buffer, dtype=dtype).reshape([end - start, *shape[1:]]) if buffer else \
        torch.empty([0, *shape[1:]], dtype=dtype)


def whole_rows(param):
    """(the tensor to fill, first row, end row) of a parameter held whole: all of it. A sharding strategy gives its
    own (FSDP2: this rank's shard and its rows, strategies/fsdp.py)."""
    return param, 0, param.shape[0]


def load_weights(model, model_path: Path, local_rows=whole_rows) -> None:
    """Fill a model built on meta (then allocated) from the safetensors files, reading from disk only the rows of
    each parameter that `local_rows(param)` names, into the tensor it gives."""
    import torch

    index = safetensors_index(Path(model_path))
    hf_model = model.get_base_model() if hasattr(model, "get_base_model") else model
    tied = getattr(model.config, "tie_word_embeddings", False)
    input_embedding = hf_model.get_input_embeddings().weight
    embedding_name = next(checkpoint_name(n) for n, p in model.named_parameters(remove_duplicate=False)
                          if p is input_embedding)
    prefix = hf_model.base_model_prefix + "."
    headers: dict = {}
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                continue
            source = checkpoint_name(name)
            if source not in index and tied and param is hf_model.get_output_embeddings().weight:
                source = embedding_name  # a tied head: the file holds the embedding only (embed_tokens, wte, ...)
            if source not in index and source.removeprefix(prefix) in index:
                source = source.removeprefix(prefix)  # saved without the prefix (the original GPT-2 and BLOOM)
            if source not in index:
                raise ConfigError(f"{model_path} lacks the tensor {source}: is it the model the config names?")
            local, start, end = local_rows(param)
            local.copy_(read_rows(index[source], source, start, end, headers).to(local.dtype))


def init_lora_weights(model, seed: int, local_rows=whole_rows) -> None:
    """LoRA's initial values from the seed and each parameter's name: the same on every rank and every strategy,
    whether the model was built whole or sharded on meta (`local_rows`: as in `load_weights`). A: PEFT's
    Kaiming-uniform; B: zeros (so the adapted model starts equal to the base)."""
    import math
    import zlib

    import torch

    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_A" not in name and "lora_B" not in name:
                continue
            full = torch.empty(tuple(param.shape), dtype=torch.float32)
            if "lora_A" in name:
                generator = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
                torch.nn.init.kaiming_uniform_(full, a=math.sqrt(5), generator=generator)
            else:
                full.zero_()
            local, start, end = local_rows(param)
            local.copy_(full[start:end].to(local.dtype))


def load_adapter_weights(model, adapter_file: Path, local_rows=whole_rows) -> None:
    """Another run's LoRA adapter (init_from) as this run's starting point, trained on: each LoRA parameter
    (`...q_proj.lora_A.default.weight`) filled from the file's tensor of its module under PEFT's saved name
    (`...q_proj.lora_A.weight`), only the rows `local_rows(param)` names (as in `load_weights`). Every LoRA parameter
    must find its tensor, of its shape, and every tensor its parameter: ConfigError in one sentence otherwise (the
    launcher checks the same from the configs, llmft/rundir/init_from.py; this catches a file changed since)."""
    import re

    import torch
    from safetensors.torch import load_file

    if not Path(adapter_file).is_file():
        raise ConfigError(f"init_from: {adapter_file} is gone since the launch: put the run's final adapter back, or "
                          f"start a new run.")
    saved = load_file(str(adapter_file))
    used = set()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" not in name:
                continue
            key = re.sub(r"\.(lora_[A-Za-z]+)\.[^.]+\.weight$", r".\1.weight", name)  # without the adapter's name
            if key not in saved or tuple(saved[key].shape) != tuple(param.shape):
                found = f"has {key} of shape {tuple(saved[key].shape)}" if key in saved else f"has no {key}"
                raise ConfigError(f"init_from: {adapter_file} {found}, which this run's LoRA needs of shape "
                                  f"{tuple(param.shape)}: start from an adapter of the same peft.r and targets.")
            local, start, end = local_rows(param)
            local.copy_(saved[key][start:end].to(local.dtype))
            used.add(key)
    unused = sorted(set(saved) - used)
    if unused:
        more = f" (and {len(unused) - 1} more)" if len(unused) > 1 else ""
        raise ConfigError(f"init_from: {adapter_file} holds {unused[0]}{more} that this run's LoRA has no place for: "
                          f"start from an adapter of the same targets.")


def init_lora(model, cfg, local_rows=whole_rows) -> None:
    """The LoRA's starting values: another run's final adapter with init_from (`starting_adapter`), else seeded
    (`init_lora_weights`). Nothing for full fine-tuning."""
    adapter = starting_adapter(cfg)
    if adapter is not None:
        load_adapter_weights(model, adapter, local_rows)
    else:
        init_lora_weights(model, cfg.train.seed, local_rows)


def allocate(model, device) -> None:
    """Memory for a skeleton built on meta, on `device`, values left undefined; the computed buffers (rotary
    tables), real since `build_on_meta`, are kept."""
    import torch

    buffers = {name: buffer.clone() for name, buffer in model.named_buffers()}
    model.to_empty(device=device)
    with torch.no_grad():
        for name, buffer in model.named_buffers():
            buffer.copy_(buffers[name])


def decoder_layers(model) -> list:
    """The transformer blocks, by the class names the HF model lists as not splittable across devices: the unit of
    compilation and of FSDP2 sharding."""
    hf_model = model.get_base_model() if hasattr(model, "get_base_model") else model
    block_names = set(getattr(hf_model, "_no_split_modules", None) or [])
    layers = [m for m in model.modules() if type(m).__name__ in block_names]
    if not layers:
        raise RuntimeError(f"no decoder layer found in {type(hf_model).__name__} ({block_names})")
    return layers


def load_model(cfg, strategy, tokenizer, run_dir: Path, topology, attention: str, compute) -> tuple:
    """The run's model, ready for `strategy.wrap`, and the folder of the base model the adapter applies to;
    `attention`: the implementation the rank chose (training/attention.py), `compute` its autocast dtype.

    The order is fixed (torchtitan's, for the same reasons): PEFT before activation checkpointing so the checkpointed
    blocks hold the adapters; compile per decoder layer after checkpointing (small graphs compiled once, reused by
    every layer) and before sharding, which then wraps the compiled layers.
    """
    if cfg.model.path is None:  # model=tiny: built from its config with seeded weights, saved as the run's base
        model = build_tiny_model(cfg.model.tiny, tokenizer, cfg.train.seed, cfg.model.max_seq_len)
        model.set_attn_implementation(attention)
        base_model_path = run_dir / "base_model"
        if topology.is_main:  # the base the adapter applies to, so stock PEFT can load the result
            model.save_pretrained(base_model_path)
        topology.barrier()
    elif strategy.builds_on_meta:  # no weights yet: each rank loads its shards once sharded
        model = build_on_meta(cfg.model, cfg.peft, attention, compute)
        base_model_path = Path(cfg.model.path)
    elif strategy.broadcasts_from_rank0 and topology.is_distributed and cfg.peft.method is not PeftMethod.qlora:
        # DDP and ZeRO-2 give every replica rank 0's weights when they wrap (a broadcast): every rank builds the
        # skeleton and allocates it on its device; rank 0 alone reads the weights, tensor by tensor with plain file
        # I/O (from_pretrained's memory map would also count the file in its resident memory). No host copy per rank.
        model = build_on_meta(cfg.model, cfg.peft, attention, compute)
        base_model_path = Path(cfg.model.path)
    else:
        with strategy.loading_context():
            model = load_pretrained_model(cfg.model, cfg.peft, topology.device.index or 0, attention, compute)
        base_model_path = Path(cfg.model.path)
    model.config.use_cache = False
    model = apply_peft(model, cfg.peft, cfg.model)
    if cfg.peft.method is not PeftMethod.full:
        from llmft.training import fused_lora

        # LoRA's dropout and layers without their CPU overheads (fused_lora.py); the layers not under ZeRO-3, which
        # gathers lora_A / lora_B only when their own modules run
        fused_lora.install(model, fuse_layers=not strategy.partitions_parameters)
    if strategy.broadcasts_from_rank0 and any(p.is_meta for p in model.parameters()):
        allocate(model, topology.device)
        # to_empty gives each module a Parameter of its own (a meta tensor cannot take a real `.data`): a tied head
        # and embedding became two tensors, which full fine-tuning would train apart. Tied again before loading.
        hf_model = model.get_base_model() if hasattr(model, "get_base_model") else model
        if getattr(hf_model.config, "tie_word_embeddings", False):
            hf_model.tie_weights()
        if topology.is_main:  # the other ranks get these values when the strategy wraps
            load_weights(model, base_model_path)
    if not any(p.is_meta for p in model.parameters()):
        init_lora(model, cfg)  # seeded by name (the same LoRA start for every strategy), or init_from's adapter
    if cfg.train.activation_checkpointing:
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.25's name; the old one warns
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    # PEFT and transformers' checkpointing make the embeddings' output require grad (what reentrant checkpointing
    # needs): backward then runs through every frozen layer below the first adapter, down to the embeddings, for
    # nothing. Non-reentrant checkpointing (ours) does not need it, and the adapter's gradients are the same.
    if cfg.peft.method is not PeftMethod.full:
        hf_model = model.get_base_model() if hasattr(model, "get_base_model") else model
        hf_model.disable_input_require_grads()
    if cfg.train.compile:
        for layer in decoder_layers(model):
            layer.compile()
    strategy.place(model)
    model.train()
    return model, base_model_path
