"""What differs per parallelism strategy, behind one small interface; one module per strategy.

Every strategy object offers the same methods, which the training loop calls and nothing else:

    wrap(model, trainable_params, lr_lambda) -> model   shard or replicate; build optimizer and LR schedule
    backward(loss)                                      loss already normalised for the global batch
    step() -> grad_norm                                 clip, optimizer and scheduler step, zero grads
    lr() -> float
    save(folder) / load(folder)                         model-or-adapter and optimizer state (collective)
    trainable_state_for_export() -> dict | None         full adapter (or model) tensors on rank 0, None elsewhere
    unwrap() -> the PEFT / HF model for evaluation and export metadata

`single` and `ddp` hold full replicas; `fsdp` shards with FSDP2 (`fully_shard`) and checkpoints with DCP;
`zero2`, `zero3` and `zero3_offload` go through `deepspeed.initialize`.
"""

from __future__ import annotations


def build(cfg, topology):
    from llmft.config import settle_strategy

    settle_strategy(cfg, topology.world_size)
    name = cfg.parallelism.strategy.value
    if name == "single":
        from llmft.strategies.single import SingleStrategy

        return SingleStrategy(cfg, topology)
    if name == "ddp":
        from llmft.strategies.ddp import DDPStrategy

        return DDPStrategy(cfg, topology)
    if name == "fsdp":
        from llmft.strategies.fsdp import FSDPStrategy

        return FSDPStrategy(cfg, topology)
    from llmft.strategies.deepspeed import DeepSpeedStrategy

    return DeepSpeedStrategy(cfg, topology)
