"""DeepSpeed ZeRO-2 / ZeRO-3 (optionally with the optimizer offloaded to CPU) through `deepspeed.initialize`.

The DeepSpeed config is generated from ours (batch sizes, precision, stage, offload, clipping, optimizer) and a user
JSON file (`parallelism.deepspeed_config`) is merged over it. Checkpoints are DeepSpeed's own (frozen weights
excluded); the adapter is exported by gathering the partitioned LoRA tensors on rank 0.

DeepSpeed's own checkpoint loads on the world size that wrote it only. On another one, rank 0 first converts it
once into DeepSpeed's universal checkpoint (`deepspeed.checkpoint.ds_to_universal`: one file per parameter and
optimizer moment, whole), written beside the original in the same checkpoint folder under a temporary name and
renamed when complete, and every rank loads that (`load_universal`), taking its own partition.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import traceback
from argparse import Namespace
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch

from llmft.config.schema import Parallelism, PeftMethod
from llmft.rundir import checkpoints
from llmft.rundir.checkpoints import CheckpointError
from llmft.training.strategies.single import replan_lr

CHECKPOINT_TAG = "deepspeed"
UNIVERSAL_TAG = "universal"  # step_<N>/universal/: the universal form of step_<N>/deepspeed/, made on demand


def merge(base: dict, override: dict) -> dict:
    merged = dict(base)
    for key, value in override.items():
        merged[key] = merge(merged[key], value) if isinstance(value, dict) and isinstance(merged.get(key), dict) \
            else value
    return merged


def deepspeed_config(cfg, world_size: int, bf16: bool, num_trainable: int | None = None) -> dict:
    strategy = cfg.parallelism.strategy
    tcfg = cfg.train
    zero = {"stage": 2 if strategy is Parallelism.zero2 else 3}
    if zero["stage"] == 2 and num_trainable:
        # ZeRO-2's gradient buckets default to 5e8 elements (2 GB in fp32) whatever the model: no more than the
        # trainable elements (a LoRA's few million). Same losses; the tiny model's step on CPU 15x faster (3 s -> 0.2 s).
        zero["reduce_bucket_size"] = zero["allgather_bucket_size"] = min(500_000_000, num_trainable)
    if zero["stage"] == 3 and num_trainable:  # the same 5e8-element default for ZeRO-3's reduction buffer
        zero["reduce_bucket_size"] = min(500_000_000, num_trainable)
    if zero["stage"] == 3:
        zero["stage3_param_persistence_threshold"] = cfg.parallelism.zero3_param_persistence_threshold
        zero["stage3_model_persistence_threshold"] = cfg.parallelism.zero3_model_persistence_threshold
        zero["stage3_gather_16bit_weights_on_model_save"] = False
    if strategy is Parallelism.zero3_offload:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    config = {
        "train_micro_batch_size_per_gpu": tcfg.micro_batch_size,
        "gradient_accumulation_steps": tcfg.grad_accum_steps,
        "train_batch_size": tcfg.micro_batch_size * tcfg.grad_accum_steps * world_size,
        "gradient_clipping": tcfg.max_grad_norm,
        "bf16": {"enabled": bf16},
        # Reduce and accumulate gradients in fp32 as FSDP2 does (reduce_dtype=float32): by default both follow the
        # model's dtype, so under bf16 the strategies would differ in precision.
        **({"communication_data_type": "fp32", "data_types": {"grad_accum_dtype": "fp32"}} if bf16 else {}),
        "zero_optimization": zero,
        "optimizer": {
            "type": "AdamW",
            # torch_adam: torch's AdamW (the same update as the other strategies; no CPU-Adam build step).
            "params": {"lr": tcfg.lr, "betas": [tcfg.adam_beta1, tcfg.adam_beta2], "eps": 1e-8,
                       "weight_decay": tcfg.weight_decay, "torch_adam": True},
        },
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if cfg.parallelism.deepspeed_config:
        config = merge(config, json.loads(Path(cfg.parallelism.deepspeed_config).read_text()))
    return config


class DeepSpeedStrategy:
    builds_on_meta = False

    def __init__(self, cfg, topology, bf16: bool):
        self.cfg = cfg
        self.topology = topology
        self.bf16 = bf16
        self.name = cfg.parallelism.strategy.value
        self.stage3 = cfg.parallelism.strategy in (Parallelism.zero3, Parallelism.zero3_offload)
        # ZeRO-2 broadcasts rank 0's parameters when it wraps (DeepSpeedEngine._broadcast_model); ZeRO-3 partitions
        self.broadcasts_from_rank0 = not self.stage3
        self.partitions_parameters = self.stage3
        self.engine = None
        self.hf_deepspeed_config = None

    def full_shape(self, param) -> tuple[int, ...]:
        """ZeRO-3 leaves an empty tensor in the parameter and its whole shape in `ds_shape`."""
        return tuple(getattr(param, "ds_shape", None) or param.shape)

    @contextmanager
    def loading_context(self):
        """ZeRO-3: transformers builds and loads the model under `deepspeed.zero.Init` while a HfDeepSpeedConfig is
        alive, partitioning every parameter as it is created, so no rank holds the whole model. transformers keeps
        only a weak reference to that config: the strategy holds it for the rest of the run (save and export read
        it too). ZeRO-2: nothing."""
        if self.stage3:
            import deepspeed
            from transformers.integrations import HfDeepSpeedConfig

            deepspeed.init_distributed()  # DeepSpeed's view of the process group, for its batch-size checks
            self.hf_deepspeed_config = HfDeepSpeedConfig(
                deepspeed_config(self.cfg, self.topology.world_size, self.bf16))
        yield

    def place(self, model) -> None:
        if any(hasattr(p, "ds_id") for p in model.parameters()):
            return  # partitioned by zero.Init while loading: each rank holds its part on its device already
        model.to(self.topology.device)

    def no_gradient_sync(self):
        return nullcontext()  # the engine reduces at its accumulation boundary (it counts micro-batches itself)

    def wrap(self, model, trainable, lr_lambda):
        import deepspeed

        config = deepspeed_config(self.cfg, self.topology.world_size, self.bf16, sum(p.numel() for p in trainable))
        self.engine, _, _, _ = deepspeed.initialize(
            model=model,
            model_parameters=trainable,
            config=config,
            lr_scheduler=lambda optimizer: torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda),
        )
        return self.engine

    def backward(self, loss):
        # Our loss is already normalised over the whole accumulated step: no further division by DeepSpeed.
        # engine.step() after every backward is how DeepSpeed counts micro-batches; it only updates the weights
        # (clip, optimizer, LR schedule) at the accumulation boundary.
        self.engine.backward(loss, scale_wrt_gas=False)
        self.engine.step()

    def step(self):
        norm = self.engine.get_global_grad_norm()
        return norm if norm is not None else float("nan")

    def lr(self) -> float:
        return self.engine.lr_scheduler.get_last_lr()[0]

    def save(self, folder: Path) -> None:
        self.engine.save_checkpoint(str(folder), tag=CHECKPOINT_TAG, save_latest=False,
                                    exclude_frozen_parameters=self.cfg.peft.method is not PeftMethod.full)

    def load(self, folder: Path) -> None:
        """Same world size: DeepSpeed's own checkpoint. Another one: its universal form (converted once by rank 0,
        see `universal_checkpoint`), from which each rank takes its partition of the weights and optimizer moments;
        the LR schedule and DeepSpeed's step counters come from the saved model-states file as usual."""
        saved_world_size = checkpoints.read_manifest(folder)["world_size"]
        universal = saved_world_size != self.topology.world_size
        tag = universal_checkpoint(folder, saved_world_size, self.topology).name if universal else CHECKPOINT_TAG
        # DeepSpeed reads `checkpoint.load_universal` from the engine's config at load time only: set it for this one
        # load instead of in the config, so that a run started on its own world size never depends on it.
        self.engine._config.load_universal_checkpoint = universal
        try:
            path, _ = self.engine.load_checkpoint(str(folder), tag=tag, load_optimizer_states=True,
                                                  load_lr_scheduler_states=True,
                                                  load_module_strict=self.cfg.peft.method is PeftMethod.full)
        finally:
            self.engine._config.load_universal_checkpoint = False
        if path is None:
            raise RuntimeError(f"DeepSpeed found no checkpoint in {folder / tag}")
        replan_lr(self.engine.lr_scheduler)

    def sharding_report(self) -> dict:
        """ZeRO-3 parameters carry `ds_tensor` (this rank's partition) and `ds_numel` (the full size)."""
        params = list(self.engine.module.parameters())
        return {
            "local_numel": sum(p.ds_tensor.numel() if hasattr(p, "ds_tensor") else p.numel() for p in params),
            "global_numel": sum(getattr(p, "ds_numel", p.numel()) for p in params),
            "sharded_params": sum(hasattr(p, "ds_tensor") for p in params),
        }

    def export_tensors(self):
        """Gathered module by module (ZeRO-3: a collective, every rank iterates to the end): the GPUs hold one module's
        parameters whole at a time, never the whole model; rank 0 copies them to its CPU as they come."""
        import deepspeed

        for module_name, module in self.engine.module.named_modules():
            named = [(n, p) for n, p in module.named_parameters(recurse=False) if p.requires_grad]
            if not named:
                continue
            with deepspeed.zero.GatheredParameters([p for _, p in named], modifier_rank=None, enabled=self.stage3):
                for name, param in named:
                    full_name = f"{module_name}.{name}" if module_name else name
                    yield full_name, param.detach().cpu().clone() if self.topology.is_main else None


def universal_checkpoint(folder: Path, saved_world_size: int, topology) -> Path:
    """`folder/universal`, DeepSpeed's universal form of `folder/deepspeed` (collective: every rank calls it).

    Rank 0 converts if it is not there yet, into `folder/.tmp-universal`, renamed when whole: a conversion killed
    half-way leaves only the temporary folder, which the next attempt starts again; the original files are never
    touched, so the checkpoint stays loadable on its own world size. The other ranks wait (up to
    `train.collective_timeout_min`); if rank 0 fails, every rank stops with its error."""
    target = folder / UNIVERSAL_TAG
    problem = None
    if topology.is_main and not target.is_dir():
        print(f"resume: {folder.name} was saved by {saved_world_size} rank(s) and this run has {topology.world_size}: "
              f"converting it to DeepSpeed's universal checkpoint in {target} (once; the other ranks wait, up to "
              f"train.collective_timeout_min)", flush=True)
        tmp = folder / f"{checkpoints.TMP_PREFIX}{UNIVERSAL_TAG}"
        try:
            _convert_to_universal(folder / CHECKPOINT_TAG, tmp)
            os.replace(tmp, target)
        except OSError as error:
            problem = f"{type(error).__name__}: {error}"
            shutil.rmtree(tmp, ignore_errors=True)
        except Exception as error:  # a DeepSpeed conversion failure: every rank must stop, not wait at the gather
            shutil.rmtree(tmp, ignore_errors=True)
            if not topology.is_distributed:
                raise
            traceback.print_exc()  # a bug here or in DeepSpeed: its traceback, then every rank stops together
            problem = f"{type(error).__name__}: {error}"
    problems = [p for p in topology.gather(problem) if p is not None]
    if problems:
        raise CheckpointError(f"converting {folder} to DeepSpeed's universal checkpoint (to resume on "
                              f"{topology.world_size} ranks instead of {saved_world_size}) failed on rank 0: "
                              f"{problems[0]}; resume with the original number of ranks, or free space and retry.")
    return target


def _convert_to_universal(source: Path, output: Path) -> None:
    """deepspeed.checkpoint.ds_to_universal in this process (no worker processes), its progress output hidden."""
    from deepspeed.checkpoint import ds_to_universal

    shutil.rmtree(output, ignore_errors=True)
    args = Namespace(input_folder=str(source), output_folder=str(output), num_extract_workers=1,
                     num_merge_workers=1, keep_temp_folder=False, strict=True,
                     inject_missing_state=True)  # ZeRO-2 checkpoints lack the universal-info record: add it
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        ds_to_universal.main(args)
    # ds_to_universal also points `latest_universal` in the parent folder at its output: we name the tag ourselves
    (output.parent / "latest_universal").unlink(missing_ok=True)
