"""What the loss optimises, from a batch: supervised fine-tuning, DPO or KTO (`objective=sft|dpo|kto`).

    objective = build(cfg, ...)                      an `Objective`: the loop holds one and learns nothing else
    objective.before_training(splits, ...)           what it needs first (DPO/KTO: maybe a reference table)
    batch = objective.micro_batch(split, indices)    this rank's share of a micro-batch across ranks (host tensors)
    loss_sum, sums = objective.loss(model, batch)    summed loss (backward), metric sums (device, no sync)
    objective.metrics(reduced sums)                  the metrics of a step or of the validation set

The loop divides `loss_sum` by the step's `count` summed over micro-batches and ranks: supervised tokens for SFT (the
token-mean), pairs for DPO, examples for KTO (the example-mean TRL takes), so every strategy and any number of ranks
gives the loss of the whole global batch.

The reference model of DPO and KTO is the model before this run: with LoRA / QLoRA the same model with its adapter
disabled (no second copy in memory); with full fine-tuning, a LoRA that starts from another run's adapter (init_from:
disabling it would give that run's base, not its model) or `objective.precompute_reference=true`, its sequence
log-probabilities computed once before the first step and stored in the run directory (`reference_logps.pt`), so a
resume finds them. The log-probability of a completion is the sum over its supervised tokens (the completion and its
end-of-turn token), as in TRL's DPOTrainer; tests/training/test_preference_tuning.py checks the loss and LoRA
gradients against TRL's.
"""

from __future__ import annotations

import hashlib
import os
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Protocol

import torch
import torch.nn.functional as F

from llmft.config.schema import DpoLoss, ObjectiveKind, PeftMethod
from llmft.config.validation import precomputes_reference
from llmft.data.tokenize.batching import collate
from llmft.data.tokenize.templating import IGNORE_INDEX
from llmft.errors import UserError
from llmft.rundir.init_from import starting_adapter
from llmft.rundir.layout import reference_logps_path
from llmft.training.loss import supervised_token_losses, token_losses, with_loss_index


@dataclass
class MicroBatch:
    inputs: dict  # tensors (host, then device): the model's inputs plus what the objective reads
    count: int  # what the loss is averaged over: supervised tokens (sft), pairs (dpo), examples (kto)
    tokens: int  # real tokens, for throughput
    supervised_tokens: int
    sequences: int  # real sequences (packed rows hold several)

    def to(self, device) -> "MicroBatch":
        self.inputs = {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v  # max_length: an int
                       for k, v in self.inputs.items()}
        return self


class Objective(Protocol):
    """Every member of an objective that the loop uses (training/loop.py); one class per objective below."""

    name: str

    def before_training(self, splits: dict[str, list], micro_batch_size: int, topology, run_dir: Path,
                        resumed: bool, log: Callable[[str], None]) -> None:
        """Whatever must exist before the first step (collective: every rank calls it). `resumed`: the run already
        trained some steps (a resume)."""

    def micro_batch(self, items: list, indices: list[int], rank: int, world_size: int,
                    split: str = "train") -> MicroBatch:
        """This rank's share (every world_size-th of `indices`) of a micro-batch across ranks, on the host."""

    def loss(self, model, batch: MicroBatch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The summed loss of the batch (divided by the step's global `count` by the loop) and metric sums, on the
        device: no host sync."""

    def metrics(self, sums: dict[str, float], count: float) -> dict[str, float]:
        """The logged metrics from the sums reduced over micro-batches and ranks."""


class SupervisedFineTuning:
    """Cross-entropy on the assistant tokens; the loss is the token-mean over the global batch."""

    name = "sft"

    def __init__(self, pad_token_id: int, compute, flatten: bool):
        self.pad_token_id, self.compute, self.flatten = pad_token_id, compute, flatten

    def before_training(self, splits, micro_batch_size, topology, run_dir, resumed, log) -> None:
        pass  # nothing: the data is all it needs

    def micro_batch(self, items: list, indices: list[int], rank: int, world_size: int, split: str = "train",
                    with_reference: bool = True) -> MicroBatch:
        mine = [items[i] for i in indices[rank::world_size]]
        batch = with_loss_index(collate(mine, self.pad_token_id, flatten=self.flatten))
        batch.pop("num_tokens")
        supervised = batch["loss_index"].numel()  # known on the host: no sync
        return MicroBatch(batch, supervised, sum(len(s.input_ids) for s in mine), supervised,
                          sum(len(s.seq_lengths or [0]) for s in mine))

    def loss(self, model, batch: MicroBatch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        loss_sum, _ = token_losses(model, batch.inputs, self.compute)
        return loss_sum, {}

    def metrics(self, sums: dict[str, float], count: float) -> dict[str, float]:
        return {}


class _Preference:
    """What DPO and KTO share: rows of prompt + completion, padded (never packed), sequence log-probabilities under
    the policy and the reference."""

    def __init__(self, objective_cfg, peft_model, pad_token_id: int, compute, all_reduce, uses_adapter: bool,
                 installed_head: bool, device, precompute_reference: bool = False):
        self.cfg = objective_cfg
        self.precompute_reference = precompute_reference
        self.installed_head, self.device = installed_head, device
        self.beta = float(objective_cfg.beta)
        self.peft_model = peft_model  # unwrapped: the reference forward needs no gradient reduction
        self.pad_token_id, self.compute, self.all_reduce = pad_token_id, compute, all_reduce
        self.uses_adapter = uses_adapter  # the reference is this model with its adapter disabled
        self.reference_table: dict[str, torch.Tensor] | None = None  # split -> [items, rows per item]

    # ---------------------------------------------------------------------------------------------- batches

    def pad(self, rows: list, extra: dict) -> dict:
        batch = with_loss_index(collate(rows, self.pad_token_id))
        batch.pop("num_tokens")
        width = batch["labels"].shape[1] - 1
        batch["loss_row"] = torch.div(batch["loss_index"], max(1, width), rounding_mode="floor")
        batch["row_tokens"] = torch.bincount(batch["loss_row"], minlength=len(rows)).to(torch.float32)
        batch.update(extra)
        return batch

    # ---------------------------------------------------------------------------------------------- log-probs

    def sequence_logps(self, model, inputs: dict) -> torch.Tensor:
        """Sum of log-probabilities of each row's supervised tokens, [rows] (fp32)."""
        model_inputs = {k: inputs[k] for k in ("input_ids", "attention_mask", "labels", "loss_index") if k in inputs}
        token_nll = supervised_token_losses(model, model_inputs, self.compute, self.installed_head)
        rows = inputs["input_ids"].shape[0]
        return -torch.zeros(rows, dtype=torch.float32, device=token_nll.device).index_add_(
            0, inputs["loss_row"], token_nll.float())

    @torch.no_grad()
    def reference_logps(self, inputs: dict) -> torch.Tensor:
        if "reference_logps" in inputs:
            return inputs["reference_logps"]
        with self.peft_model.disable_adapter() if self.uses_adapter else nullcontext():
            return self.sequence_logps(self.peft_model, inputs)

    # ---------------------------------------------------------------------------------------------- the table

    def attach_reference(self, batch: dict, split: str, indices: list[int], rank: int, world_size: int):
        if self.reference_table is None:
            return
        table = self.reference_table[split]
        mine = torch.tensor(indices[rank::world_size], dtype=torch.long)
        batch["reference_logps"] = self.reference_rows(table[mine])

    def reference_rows(self, per_item: torch.Tensor) -> torch.Tensor:
        """[items, rows per item] -> the order of the batch's rows."""
        return per_item.t().reshape(-1)

    def before_training(self, splits: dict[str, list], micro_batch_size: int, topology, run_dir: Path,
                        resumed: bool, log) -> None:
        """With a precomputed reference: its table, made or read back (`fill_reference_table`); else nothing (the
        reference is the model with its adapter disabled, at every step)."""
        if self.precompute_reference:
            self.fill_reference_table(splits, micro_batch_size, topology.rank, topology.world_size, run_dir,
                                      resumed, topology.is_main, topology.barrier, log)

    def fill_reference_table(self, splits: dict[str, list], micro_batch_size: int, rank: int, world_size: int,
                             run_dir: Path, started: bool, is_main: bool, barrier, log) -> None:
        """The reference's log-probabilities of every item of every split, computed once (each rank its share of
        each micro-batch, summed over ranks) and saved in the run directory, where a resume finds them. Read from
        there when they exist and match the data."""
        path = reference_logps_path(run_dir)
        fingerprint = data_fingerprint(splits)
        if path.exists():
            saved = torch.load(path, weights_only=True)
            if saved.get("fingerprint") == fingerprint:
                self.reference_table = {k: v for k, v in saved.items() if k != "fingerprint"}
                log(f"reference: log-probabilities read from {path}")
                return
            if started and not self.uses_adapter:
                raise UserError(f"{path} was computed on other data and the reference model is gone (training "
                                f"has moved past the model it started from): start a new run.")
        if started and not self.uses_adapter:
            raise UserError(f"{path} is missing and the reference model is gone (training has moved "
                            f"past the model it started from): start a new run.")
        was_training = self.peft_model.training
        self.peft_model.eval()
        table = {}
        for split, items in splits.items():
            per_item = torch.zeros(len(items), self.rows_per_item, dtype=torch.float64)
            step = micro_batch_size * world_size
            for start in range(0, len(items), step):  # every rank runs as many forwards (FSDP, ZeRO-3 need it)
                real = list(range(start, min(start + step, len(items))))
                indices = real + [real[-1]] * (step - len(real))  # the last micro-batch: repeats, not written
                batch = self.micro_batch(items, indices, rank, world_size, split, with_reference=False)
                logps = self.reference_logps(batch.to(self.device).inputs).double().cpu()
                for position, row in zip(range(rank, step, world_size), logps.reshape(self.rows_per_item, -1).t()):
                    if position < len(real):
                        per_item[real[position]] = row
            table[split] = self.all_reduce(per_item).cpu().float()
        self.peft_model.train(was_training)
        self.reference_table = table
        if is_main:
            tmp = path.with_name(path.name + ".tmp")
            torch.save({"fingerprint": fingerprint, **table}, tmp)
            os.replace(tmp, path)
        barrier()
        log(f"reference: log-probabilities of {sum(len(v) for v in splits.values())} examples computed before "
            f"training, saved in {path}")


class DirectPreferenceOptimization(_Preference):
    """DPO (Rafailov et al. 2023) with TRL's sigmoid and IPO losses; the loss is the mean over pairs."""

    name = "dpo"
    rows_per_item = 2  # chosen, rejected

    def micro_batch(self, items: list, indices: list[int], rank: int, world_size: int, split: str = "train",
                    with_reference: bool = True) -> MicroBatch:
        mine = [items[i] for i in indices[rank::world_size]]
        rows = [p.chosen for p in mine] + [p.rejected for p in mine]  # TRL's order: chosen rows, then rejected
        batch = self.pad(rows, {})
        if with_reference:
            self.attach_reference(batch, split, indices, rank, world_size)
        supervised = batch["loss_index"].numel()
        return MicroBatch(batch, len(mine), sum(len(r.input_ids) for r in rows), supervised, len(rows))

    def loss(self, model, batch: MicroBatch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        inputs = batch.inputs
        reference = self.reference_logps(inputs).float()  # first: its activations are gone before the policy's
        policy = self.sequence_logps(model, inputs)
        pairs = policy.shape[0] // 2
        chosen_ratio = policy[:pairs] - reference[:pairs]
        rejected_ratio = policy[pairs:] - reference[pairs:]
        if self.cfg.loss is DpoLoss.ipo:  # TRL: the per-token mean log-ratios
            tokens = inputs["row_tokens"].clamp(min=1.0)
            delta = chosen_ratio / tokens[:pairs] - rejected_ratio / tokens[pairs:]
            losses = (delta - 1.0 / (2.0 * self.beta)) ** 2
        else:
            delta = chosen_ratio - rejected_ratio
            smoothing = float(self.cfg.label_smoothing)
            losses = -(1.0 - smoothing) * F.logsigmoid(self.beta * delta) - smoothing * F.logsigmoid(-self.beta * delta)
        chosen_reward, rejected_reward = (self.beta * chosen_ratio).detach(), (self.beta * rejected_ratio).detach()
        sums = {"rewards_chosen": chosen_reward.sum(), "rewards_rejected": rejected_reward.sum(),
                "reward_accuracy": (chosen_reward > rejected_reward).float().sum()}
        return losses.sum(), sums

    def metrics(self, sums: dict[str, float], count: float) -> dict[str, float]:
        count = max(count, 1.0)
        out = {key: sums[key] / count for key in ("rewards_chosen", "rewards_rejected", "reward_accuracy")}
        out["reward_margin"] = out["rewards_chosen"] - out["rewards_rejected"]
        return out


class KahnemanTverskyOptimization(_Preference):
    """KTO (Ethayarajh et al. 2024) as TRL computes it: the KL term estimated from mismatched (prompt, completion)
    pairs (each prompt with the completion of the split's previous example), its mean over the micro-batch on all ranks,
    clamped at 0 and detached; the loss is the weighted mean over examples."""

    name = "kto"
    rows_per_item = 2  # the example, its mismatched KL row

    def micro_batch(self, items: list, indices: list[int], rank: int, world_size: int, split: str = "train",
                    with_reference: bool = True) -> MicroBatch:
        mine_indices = indices[rank::world_size]
        mine = [items[i] for i in mine_indices]
        # the KL row of example i: its prompt with the completion of example i - 1 of its split (fixed per example,
        # as TRL's dataset-wide shift: the same on any number of ranks, and precomputable)
        mismatched = [mismatched_row(items[i], items[(i - 1) % len(items)]) for i in mine_indices]
        rows = [e.sample for e in mine] + mismatched
        desirable = torch.tensor([e.desirable for e in mine], dtype=torch.bool)
        batch = self.pad(rows, {"desirable": desirable})
        if with_reference:
            self.attach_reference(batch, split, indices, rank, world_size)
        supervised = int((batch["loss_row"] < len(mine)).sum())
        return MicroBatch(batch, len(mine), sum(len(s.input_ids) for s in rows[: len(mine)]), supervised, len(mine))

    def loss(self, model, batch: MicroBatch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        inputs = batch.inputs
        reference = self.reference_logps(inputs).float()
        policy = self.sequence_logps(model, inputs)
        n = policy.shape[0] // 2
        ratio = policy[:n] - reference[:n]
        kl_sums = torch.stack([(policy[n:] - reference[n:]).detach().sum().double(),
                               torch.tensor(float(n), dtype=torch.float64, device=policy.device)])
        kl_sums = self.all_reduce(kl_sums)
        kl = (kl_sums[0] / kl_sums[1].clamp(min=1.0)).clamp(min=0).float()
        desirable = inputs["desirable"]
        losses = torch.where(desirable,
                             float(self.cfg.desirable_weight) * (1 - torch.sigmoid(self.beta * (ratio - kl))),
                             float(self.cfg.undesirable_weight) * (1 - torch.sigmoid(self.beta * (kl - ratio))))
        reward = (self.beta * ratio).detach()
        good = desirable.float()
        sums = {"rewards_chosen": (reward * good).sum(), "chosen": good.sum(),
                "rewards_rejected": (reward * (1 - good)).sum(), "rejected": (1 - good).sum(),
                "kl": kl.detach() * n}  # summed over micro-batches and ranks, then divided by the examples
        return losses.sum(), sums

    def metrics(self, sums: dict[str, float], count: float) -> dict[str, float]:
        out = {"rewards_chosen": sums["rewards_chosen"] / max(sums["chosen"], 1.0),
               "rewards_rejected": sums["rewards_rejected"] / max(sums["rejected"], 1.0),
               "kl": sums["kl"] / max(count, 1.0)}
        out["reward_margin"] = out["rewards_chosen"] - out["rewards_rejected"]
        return out


def mismatched_row(example, other):
    """`example`'s prompt followed by `other`'s completion, labels on the completion, no longer than the longer of
    the two (both fit max_seq_len)."""
    prompt = example.sample.input_ids[: example.prompt_length]
    limit = max(len(example.sample.input_ids), len(other.sample.input_ids))
    ids = (prompt + other.sample.input_ids[other.prompt_length:])[:limit]
    labels = ([IGNORE_INDEX] * len(prompt) + other.sample.labels[other.prompt_length:])[:limit]
    return type(example.sample)(input_ids=ids, labels=labels)


def build(cfg, peft_model, pad_token_id: int, compute, flatten: bool, all_reduce, loss_head: str,
          device) -> Objective:
    kind = cfg.objective.kind
    if kind is ObjectiveKind.sft:
        return SupervisedFineTuning(pad_token_id, compute, flatten)
    cls = DirectPreferenceOptimization if kind is ObjectiveKind.dpo else KahnemanTverskyOptimization
    # The reference is the model the run starts from. A LoRA that starts from another run's adapter (init_from) is
    # that model only before the first step, and disabling it would give the base: its log-probabilities are
    # computed then, with the adapter on, as for full fine-tuning.
    from_adapter = starting_adapter(cfg) is not None
    return cls(cfg.objective, peft_model, pad_token_id, compute, all_reduce,
               cfg.peft.method is not PeftMethod.full and not from_adapter, loss_head != "full_logits", device,
               precomputes_reference(cfg) or from_adapter)


def data_fingerprint(splits: dict[str, list]) -> str:
    """A hash of every item's token ids, labels and prompt length: the reference table belongs to this data."""
    digest = hashlib.sha256()
    for split in sorted(splits):
        digest.update(split.encode())
        for item in splits[split]:
            for sample in (getattr(item, "chosen", None), getattr(item, "rejected", None), getattr(item, "sample", None)):
                if sample is not None:
                    digest.update(torch.tensor(sample.input_ids, dtype=torch.int64).numpy().tobytes())
                    digest.update(torch.tensor(sample.labels, dtype=torch.int64).numpy().tobytes())
            digest.update(str((getattr(item, "prompt_length", 0), getattr(item, "desirable", None))).encode())
    return digest.hexdigest()

