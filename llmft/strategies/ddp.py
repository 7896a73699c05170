"""DistributedDataParallel: a full replica per rank, gradients all-reduced (averaged) in backward.

Checkpoints and export are the single-process ones (replicas are identical, rank 0 writes).
"""

from __future__ import annotations

from torch.nn.parallel import DistributedDataParallel

from llmft.strategies.single import SingleStrategy


class DDPStrategy(SingleStrategy):
    def wrap(self, model, trainable, lr_lambda):
        device_ids = [self.topology.local_rank] if self.topology.device_type == "cuda" else None
        ddp_model = DistributedDataParallel(model, device_ids=device_ids)
        super().wrap(model, trainable, lr_lambda)
        self.ddp_model = ddp_model
        return ddp_model

    def unwrap(self):
        return self.model
