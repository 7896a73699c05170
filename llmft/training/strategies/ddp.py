"""DistributedDataParallel: a full replica per rank, gradients all-reduced (averaged) in backward.

Checkpoints and export are the single-process ones (replicas are identical, rank 0 writes).
"""

from __future__ import annotations

from torch.nn.parallel import DistributedDataParallel

from llmft.training.strategies.single import SingleStrategy


class DDPStrategy(SingleStrategy):
    name = "ddp"
    broadcasts_from_rank0 = True  # DistributedDataParallel broadcasts rank 0's parameters and buffers when it wraps

    def wrap(self, model, trainable, lr_lambda):
        device_ids = [self.topology.device] if self.topology.device_type == "cuda" else None
        self.ddp_model = DistributedDataParallel(model, device_ids=device_ids)
        super().wrap(model, trainable, lr_lambda)  # self.model: the unwrapped model, for checkpoints and export
        return self.ddp_model

    def no_gradient_sync(self):
        return self.ddp_model.no_sync()  # DDP's own: no all-reduce until the last micro-batch's backward
