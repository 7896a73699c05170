"""DeepSpeed ZeRO-2 / ZeRO-3 (optionally with the optimizer offloaded to CPU) through `deepspeed.initialize`.

The DeepSpeed config is generated from ours (batch sizes, precision, stage, offload, clipping, optimizer) and a user
JSON file (`parallelism.deepspeed_config`) is merged over it. Checkpoints are DeepSpeed's own (frozen weights
excluded); the adapter is exported by gathering the partitioned LoRA tensors on rank 0.

DeepSpeed's own checkpoint loads on the world size that wrote it only. On another one, rank 0 first converts it
once into DeepSpeed's universal checkpoint (`deepspeed.checkpoint.ds_to_universal`: one file per parameter and
optimizer moment, whole), written beside the original in the same checkpoint folder under a temporary name and
renamed when complete, and every rank loads that (`load_universal`), taking its own partition. The conversion can
take longer than the collective timeout for a full fine-tuning: it has its own limit, logs its progress, and one
interrupted (a kill, a stop signal, its limit) continues at the next attempt where it stopped (`universal_checkpoint`).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import sys
import time
import traceback
from argparse import Namespace
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch

from llmft.config.schema import Parallelism, PeftMethod
from llmft.rundir import checkpoints
from llmft.rundir.checkpoints import CheckpointError, StallWatchdog
from llmft.training import signals
from llmft.training.strategies.single import replan_lr

CHECKPOINT_TAG = "deepspeed"
UNIVERSAL_TAG = "universal"  # step_<N>/universal/: the universal form of step_<N>/deepspeed/, made on demand


def merge(base: dict, override: dict) -> dict:
    merged = dict(base)
    for key, value in override.items():
        merged[key] = merge(merged[key], value) if isinstance(value, dict) and isinstance(merged.get(key), dict) \
            else value
    return merged


def deepspeed_config(cfg, world_size: int, compute, num_trainable: int | None = None) -> dict:
    """`compute`: the autocast dtype (None for fp32): DeepSpeed's bf16 mode, or its fp16 mode with its dynamic loss
    scaler (loss_scale 0), which skips a step whose gradients overflow as torch's GradScaler does."""
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
        "bf16": {"enabled": compute is torch.bfloat16},
        "fp16": {"enabled": compute is torch.float16, "loss_scale": 0, "initial_scale_power": 16},
        # Reduce and accumulate gradients in fp32 as FSDP2 does (reduce_dtype=float32): by default both follow the
        # model's dtype, so under bf16 the strategies would differ in precision. fp16 keeps DeepSpeed's own path
        # (fp16 gradients under its loss scale), the combination its fp16 optimizers are written for.
        **({"communication_data_type": "fp32", "data_types": {"grad_accum_dtype": "fp32"}}
           if compute is torch.bfloat16 else {}),
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


# torch's JIT build of a DeepSpeed op (torch.utils.cpp_extension, for instance the CPU's shm_comm or a fused
# optimizer) holds `<extensions folder>/<op>/lock` while it compiles and removes it after. A rank killed mid-build (a
# time limit, scancel, a node failure) leaves it behind, and every later job that loads the op waits on it forever in
# torch's FileBaton, printing nothing. A live build writes its objects into that folder: a lock in a folder where
# nothing was written for this long has no build behind it.
DEAD_BUILD_LOCK_S = 600


def extensions_folder() -> Path:
    """Where torch builds its JIT extensions: $TORCH_EXTENSIONS_DIR, else torch's cache folder (cpp_extension's
    `_get_build_directory` adds `py<version>_<cuda or cpu>/` under it, which the search below goes into)."""
    if os.environ.get("TORCH_EXTENSIONS_DIR"):
        return Path(os.environ["TORCH_EXTENSIONS_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "torch_extensions"


def remove_dead_build_locks(folder: Path, now: float | None = None) -> list[str]:
    """Removes the build locks of `folder` (<op>/lock, or py*/<op>/lock) whose build folder has not changed for
    DEAD_BUILD_LOCK_S; the lines that say what it removed, and which live builds a rank will wait for."""
    now = time.time() if now is None else now
    lines = []
    for lock_file in [*folder.glob("*/lock"), *folder.glob("*/*/lock")]:
        try:
            last_write = max(path.stat().st_mtime for path in [lock_file.parent, *lock_file.parent.iterdir()])
        except FileNotFoundError:
            continue  # a build that just ended
        idle_s = now - last_write
        if idle_s < DEAD_BUILD_LOCK_S:
            lines.append(f"llmft: DeepSpeed's op {lock_file.parent.name} is being built by another process (lock "
                         f"{lock_file}, last write {idle_s:.0f} s ago): this rank waits for it")
            continue
        try:
            lock_file.unlink()
        except FileNotFoundError:
            continue  # another rank removed it first
        lines.append(f"llmft: removed {lock_file}, a build lock left by a process killed while it built DeepSpeed's "
                     f"op {lock_file.parent.name} (nothing written there for {idle_s / 60:.0f} min): torch would wait "
                     f"on it forever; the op is built again")
    return lines


class DeepSpeedStrategy:
    builds_on_meta = False

    def __init__(self, cfg, topology, compute):
        for line in remove_dead_build_locks(extensions_folder()):  # before anything loads an op
            print(line, file=sys.stderr, flush=True)
        self.cfg = cfg
        self.topology = topology
        self.compute = compute  # the autocast dtype, None for fp32 (training/precision.py)
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
                deepspeed_config(self.cfg, self.topology.world_size, self.compute))
        yield

    def place(self, model) -> None:
        if any(hasattr(p, "ds_id") for p in model.parameters()):
            return  # partitioned by zero.Init while loading: each rank holds its part on its device already
        model.to(self.topology.device)

    def no_gradient_sync(self):
        return nullcontext()  # the engine reduces at its accumulation boundary (it counts micro-batches itself)

    def wrap(self, model, trainable, lr_lambda):
        import deepspeed

        config = deepspeed_config(self.cfg, self.topology.world_size, self.compute, sum(p.numel() for p in trainable))
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
        tag = universal_checkpoint(folder, saved_world_size, self.topology, self.cfg.train.save_timeout_min).name \
            if universal else CHECKPOINT_TAG
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


# ------------------------------------------------------------------------------------------ the universal checkpoint

# The conversion's own time limit: the larger of train.save_timeout_min and the checkpoint's size at this rate.
# DeepSpeed's conversion reads the ZeRO files, writes them split per parameter, reads those back and writes them
# merged: about four passes over the optimizer state, one file per parameter and moment. Measured on this machine's
# disk: 80-107 MB/s of checkpoint (a ZeRO-3 checkpoint of 201M parameters, 2.4 GB: 23-30 s; DeepSpeed's own
# conversion, not fsynced, 63-129 MB/s). 25 MB/s, four times slower, bounds a stall, not the work: an 8B full
# fine-tuning's 96 GB of optimizer state gets 64 min for the 15-20 min it would take here.
CONVERSION_BYTES_PER_S = 25e6
# The waiting ranks give rank 0 this much more, so that its own sentence (which says what it was doing) comes first.
WAIT_GRACE_S = 60.0
POLL_S = 1.0  # how often a waiting rank asks the store whether rank 0 is done
PROGRESS_EVERY_S = 30.0  # at most one progress line this often within a phase of the conversion
JOURNAL = ".progress.jsonl"  # in the conversion's temporary folder: the work items finished, with their files' sizes


def conversion_limit_s(source: Path, timeout_min: float) -> float:
    """How long the conversion of the ZeRO checkpoint folder `source` may take (see CONVERSION_BYTES_PER_S)."""
    size = sum(path.stat().st_size for path in source.rglob("*") if path.is_file())
    return max(timeout_min * 60, size / CONVERSION_BYTES_PER_S)


def universal_checkpoint(folder: Path, saved_world_size: int, topology, timeout_min: float) -> Path:
    """`folder/universal`, DeepSpeed's universal form of `folder/deepspeed` (every rank calls it).

    Rank 0 converts it if it is not there yet, into `folder/.tmp-universal`, renamed when whole; the checkpoint's own
    files are never touched, so it stays loadable on its own world size. The conversion continues where a previous
    attempt stopped (`_ResumableConversion`), and a stop signal on any rank leaves it off after the part under way:
    every rank then raises `signals.StoppedEarly`. Its time is bounded by its own limit (`conversion_limit_s`), not
    by the collective timeout: the other ranks poll the process group's store for the outcome instead of waiting in
    a collective, and rank 0 ends itself past the limit (`_Watchdog`). If rank 0 fails, every rank stops with its
    error."""
    limit_s = conversion_limit_s(folder / CHECKPOINT_TAG, timeout_min)
    # The default store of the process group: a key-value server, no collective, so no collective timeout (and with
    # it NCCL's watchdog) while rank 0 works. torch has no public accessor for it.
    store = None
    if topology.is_distributed:
        import torch.distributed as dist

        store = dist.distributed_c10d._get_default_store()
    keys = {"outcome": f"llmft/universal/{folder}/outcome", "stop": f"llmft/universal/{folder}/stop"}
    if topology.is_main:
        outcome = _convert_on_rank0(folder, saved_world_size, topology, limit_s, store, keys)
    else:
        outcome = _wait_for_rank0(folder, topology, limit_s, store, keys)
    if outcome["stopped"]:
        raise signals.StoppedEarly(f"converting {folder.name} to DeepSpeed's universal checkpoint (what it finished "
                                   f"is kept for the next attempt)")
    if outcome["problem"]:
        raise CheckpointError(f"converting {folder} to DeepSpeed's universal checkpoint (to resume on "
                              f"{topology.world_size} ranks instead of {saved_world_size}) failed on rank 0: "
                              f"{outcome['problem']}; resume with the original number of ranks, or free space and "
                              f"retry (the conversion continues where it stopped).")
    return folder / UNIVERSAL_TAG


def _convert_on_rank0(folder: Path, saved_world_size: int, topology, limit_s: float, store, keys: dict) -> dict:
    """Rank 0's part: convert unless done before, and publish the outcome for the others ({problem, stopped})."""
    target, tmp = folder / UNIVERSAL_TAG, folder / f"{checkpoints.TMP_PREFIX}{UNIVERSAL_TAG}"
    outcome = {"problem": None, "stopped": False}
    try:
        if not target.is_dir():
            print(f"resume: {folder.name} was saved by {saved_world_size} rank(s) and this run has "
                  f"{topology.world_size}: converting it to DeepSpeed's universal checkpoint in {target} (once, "
                  f"continued where it stopped if interrupted; its limit: {limit_s:.0f} s, from "
                  f"train.save_timeout_min and the checkpoint's size)", flush=True)
            conversion = _ResumableConversion(
                folder / CHECKPOINT_TAG, tmp, folder.name,
                should_stop=lambda: bool(signals.received()) or (store is not None and store.check([keys["stop"]])))
            with StallWatchdog(limit_s, _conversion_stalled(folder.name, limit_s, conversion), "converting"):
                conversion.run()
            os.replace(tmp, target)
            _fsync_folder(folder)
    except _LeftOff:
        outcome["stopped"] = True
    except OSError as error:  # a full disk, a quota: what is finished stays in `tmp` for the next attempt
        outcome["problem"] = f"{type(error).__name__}: {error}"
    except Exception as error:  # a DeepSpeed conversion failure: every rank must stop, not wait for ever
        if not topology.is_distributed:
            raise
        traceback.print_exc()  # a bug here or in DeepSpeed: its traceback, then every rank stops together
        outcome["problem"] = f"{type(error).__name__}: {error}"
    except BaseException as error:  # a second Ctrl-C, a SystemExit: the others stop too, then this one goes on
        if store is not None:
            store.set(keys["outcome"], json.dumps({"problem": f"rank 0 ended: {type(error).__name__}",
                                                   "stopped": False}))
        raise
    if store is not None:
        store.set(keys["outcome"], json.dumps(outcome))
    return outcome


def _wait_for_rank0(folder: Path, topology, limit_s: float, store, keys: dict) -> dict:
    """The other ranks' part: wait for rank 0's outcome in the store (no collective, so no collective timeout),
    pass on a stop signal this rank recorded meanwhile, and give up past the conversion's limit."""
    started = time.monotonic()
    passed_on = False
    while not store.check([keys["outcome"]]):
        if signals.received() and not passed_on:
            store.set(keys["stop"], str(signals.received()))
            passed_on = True
        waited = time.monotonic() - started
        if waited > limit_s + WAIT_GRACE_S:
            raise CheckpointError(f"rank {topology.rank} waited {waited:.0f} s for rank 0 to convert {folder} to "
                                  f"DeepSpeed's universal checkpoint, longer than its limit of {limit_s:.0f} s: see "
                                  f"rank 0's log; resume to continue the conversion where it stopped, with a larger "
                                  f"train.save_timeout_min if it is this slow.")
        time.sleep(POLL_S)
    return json.loads(store.get(keys["outcome"]))


def _fsync_folder(folder: Path) -> None:
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


class _LeftOff(Exception):
    """A stop signal: the conversion left off after its last finished work item."""


def _conversion_stalled(label: str, limit_s: float, conversion: "_ResumableConversion"):
    """What rank 0 says when the conversion outlives its limit (StallWatchdog ends it; torchrun then ends the other
    ranks, which would give up WAIT_GRACE_S later anyway). What was finished is kept for the next attempt."""
    return lambda watchdog: (
        f"llmft: rank 0 has converted {label} to DeepSpeed's universal checkpoint for {limit_s:.0f} s, its limit "
        f"(train.save_timeout_min, or longer for a large checkpoint), and is {conversion.doing}: its file system "
        f"seems stalled, so this rank ends now instead of hanging; resume to continue the conversion where it "
        f"stopped, with a larger train.save_timeout_min if it is this slow.")


class _ResumableConversion:
    """deepspeed.checkpoint.ds_to_universal.main, run so that an interrupted conversion continues where it stopped.

    DeepSpeed converts in three phases: 1. each rank's optimizer shard is split into one file per parameter, moment
    and rank (`tmp/<parameter>/<tp>/<moment>.<rank>`); 2. each parameter's files are merged into
    `zero/<parameter>/<moment>.pt`; 3. the optimizer's common state and the model-states files are written. Phases 1
    and 2 are lists of independent work items run by `_do_parallel_work`, and every tensor is written by
    `_save_checkpoint`. Its main() and its per-item functions are used as they are; those two helpers are replaced
    while it runs, because they are what it does badly here:

    - `_save_checkpoint` writes in place (a file cut by a kill looks like a whole one): here under a hidden name,
      renamed when whole, and recorded for the work item under way;
    - `_do_parallel_work` runs every item again on every attempt, and reports through tqdm only: here each item a
      previous attempt finished is skipped, the others are run one by one (as DeepSpeed does with one worker), their
      files fsynced and appended with their sizes to the journal (JOURNAL), the progress logged, and a stop asked for
      (`should_stop`) honoured between two items.

    At the start, a journal entry is trusted only if its files are all there with the sizes it recorded (a file lost
    or cut by a node crash gets its item redone), and every file no trusted entry lists is removed. Phase 3 is
    short and always redone. Once phase 2 is complete, phase 1 is not needed again (DeepSpeed removes its files)."""

    EXTRACT = ("extract_zero_shards", "extract_zero_shards_stage3")
    MERGE = ("merge_tp_slices", "merge_zero3_slices")

    def __init__(self, source: Path, output: Path, label: str, should_stop):
        self.source, self.output, self.label, self.should_stop = source, output, label, should_stop
        self.journal_path = output / JOURNAL
        self.written: list[str] | None = None  # the files the work item under way wrote
        self.done: dict[tuple[str, str], dict] = {}  # (phase, item) -> its journal entry, for the finished items
        self.merge_complete = False
        self.doing = "reading the checkpoint's metadata"  # what it is doing now (the watchdog says it)
        self.started = self.last_line = time.monotonic()
        self.out = sys.stdout  # DeepSpeed's own output is hidden while it runs, not this class's

    def run(self) -> None:
        import deepspeed
        from deepspeed.checkpoint import ds_to_universal

        self._resume_journal(deepspeed.__version__)
        args = Namespace(input_folder=str(self.source), output_folder=str(self.output), num_extract_workers=1,
                         num_merge_workers=1, keep_temp_folder=False, strict=True,
                         inject_missing_state=True)  # ZeRO-2 checkpoints lack the universal-info record: add it
        replaced = {"_do_parallel_work": self._work, "_save_checkpoint": self._save}
        originals = {name: getattr(ds_to_universal, name) for name in replaced}
        try:
            for name, function in replaced.items():
                setattr(ds_to_universal, name, function)
            with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
                ds_to_universal.main(args)
        finally:
            for name, function in originals.items():
                setattr(ds_to_universal, name, function)
            self.journal.close()
        # ds_to_universal also points `latest_universal` in the parent folder at its output: we name the tag ourselves
        (self.output.parent / "latest_universal").unlink(missing_ok=True)
        self.journal_path.unlink()
        self.log(f"done in {self.elapsed()}")

    # -------------------------------------------------------------------------------------------- the journal

    def _resume_journal(self, deepspeed_version: str) -> None:
        """Take over what a previous attempt finished (`done`, `merge_complete`), remove everything else from the
        output, and open the journal for this attempt's items."""
        header = {"deepspeed": deepspeed_version}  # another DeepSpeed may write other files: then start afresh
        entries = []
        if self.journal_path.is_file():
            lines = self.journal_path.read_text().splitlines()
            for number, line in enumerate(lines):
                try:
                    record = json.loads(line)
                except ValueError:
                    break  # the line a kill cut, and nothing after it
                if number == 0 and record != header:
                    break
                if number > 0:
                    entries.append(record)
        merged_count = None
        for entry in entries:
            if "complete" in entry:
                merged_count = entry["complete"]
            elif all((self.output / name).is_file() and (self.output / name).stat().st_size == size
                     for name, size in entry["files"].items()):
                self.done[(entry["phase"], entry["item"])] = entry
        self.merge_complete = merged_count is not None and \
            merged_count == sum(phase == "merge" for phase, _ in self.done)
        trusted = {name for entry in self.done.values() for name in entry["files"]}
        if self.output.is_dir():
            for path in self.output.rglob("*"):
                if path.is_file() and str(path.relative_to(self.output)) not in trusted:
                    path.unlink()
        self.output.mkdir(parents=True, exist_ok=True)
        kept = [header, *self.done.values()] + ([{"phase": "merge", "complete": merged_count}]
                                                if self.merge_complete else [])
        rewritten = self.output / f"{JOURNAL}.partial"
        rewritten.write_text("".join(json.dumps(record) + "\n" for record in kept))
        os.replace(rewritten, self.journal_path)
        self.journal = open(self.journal_path, "a")

    def _append(self, record: dict) -> None:
        self.journal.write(json.dumps(record) + "\n")
        self.journal.flush()
        os.fsync(self.journal.fileno())

    # ---------------------------------------------------------------------------- what replaces DeepSpeed's

    def _save(self, file_path: str, state) -> None:
        """DeepSpeed's `_save_checkpoint`, written whole or not at all, and recorded for the item under way."""
        folder, name = os.path.split(file_path)
        os.makedirs(folder, exist_ok=True)
        partial = os.path.join(folder, f".{name}.partial")  # hidden: DeepSpeed's globs of `<moment>.*` skip it
        torch.save(state, partial)
        os.replace(partial, file_path)
        if self.written is not None:
            self.written.append(file_path)

    def _work(self, do_work, work_chunks, num_workers) -> list:
        """DeepSpeed's `_do_parallel_work` for phases 1 and 2: the finished items skipped, the others run and
        journaled one by one. Another function (a part this class does not know, such as AutoEP's experts) runs as
        DeepSpeed would run it, not resumable: its files are redone by the next attempt."""
        function = getattr(do_work, "func", do_work).__name__
        phase = "extract" if function in self.EXTRACT else "merge" if function in self.MERGE else None
        items = list(work_chunks)
        if phase is None:
            return [do_work(item) for item in items]
        if phase == "extract" and self.merge_complete:
            self.log("1/3 splitting the optimizer shards: not needed, every parameter was merged before")
            return [None] * len(items)
        keys = [self._key(phase, item) for item in items]
        reused = sum((phase, key) in self.done for key in keys)
        self.log((f"1/3 splitting the optimizer shards of {len(items)} rank(s) into per-parameter files"
                  if phase == "extract" else f"2/3 merging {len(items)} parameters") + f" ({reused} done before)")
        results = []
        for index, (key, item) in enumerate(zip(keys, items)):
            entry = self.done.get((phase, key))
            if entry is None:
                if self.should_stop():
                    self.log(f"left off at a stop signal, after {index} of {len(items)} "
                             + ("rank shards" if phase == "extract" else "parameters"))
                    raise _LeftOff()
                self.doing = (f"splitting the optimizer shard of rank {item[-1]}" if phase == "extract" else
                              f"merging parameter {key} ({index + 1} of {len(items)})")
                entry = self._run_item(phase, key, do_work, item)
            results.append(entry["result"])
            self._progress(phase, index + 1, len(items), reused)
        if phase == "merge":
            self._append({"phase": "merge", "complete": len(items)})
            self.doing = "writing the optimizer's common state and the model states"
            self.log(f"3/3 {self.doing}")
        return results

    def _run_item(self, phase: str, key: str, do_work, item) -> dict:
        """One work item: DeepSpeed's function, then its files fsynced and journaled with their sizes."""
        self.written = []
        result = do_work(item)
        files = {}
        for path in self.written:
            descriptor = os.open(path, os.O_RDONLY)
            try:
                os.fsync(descriptor)
                files[str(Path(path).relative_to(self.output))] = os.fstat(descriptor).st_size
            finally:
                os.close(descriptor)
        for folder in {os.path.dirname(path) for path in self.written}:
            _fsync_folder(Path(folder))  # the renames
        self.written = None
        # merge_tp_slices returns the name patterns it did not use (DeepSpeed's strict check): a set, kept as a list
        entry = {"phase": phase, "item": key, "files": files,
                 "result": sorted(result) if isinstance(result, set) else result}
        self._append(entry)
        return entry

    @staticmethod
    def _key(phase: str, item) -> str:
        """A work item's name in the journal: the rank indices of a shard, or the parameter's name."""
        if phase == "extract":
            return "-".join(map(str, item))
        return item if isinstance(item, str) else item[0]

    # ---------------------------------------------------------------------------------------------- progress

    def _progress(self, phase: str, finished: int, total: int, reused: int) -> None:
        now = time.monotonic()
        if finished < total and now - self.last_line < PROGRESS_EVERY_S:
            return
        self.log((f"1/3 split {finished} of {total} rank shards" if phase == "extract" else
                  f"2/3 merged {finished} of {total} parameters") + f" ({reused} done before), {self.elapsed()}")

    def elapsed(self) -> str:
        seconds = time.monotonic() - self.started
        return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.1f} min"

    def log(self, message: str) -> None:
        self.last_line = time.monotonic()
        print(f"resume: converting {self.label}: {message}", file=self.out, flush=True)
