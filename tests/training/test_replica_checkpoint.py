"""Replicas (ddp) write a checkpoint together: rank 0 the weights, every rank its share of the optimizer's moments;
any number of ranks reads it back whole."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from llmft.config.compose import compose
from llmft.rundir import checkpoints
from llmft.training.strategies.single import SingleStrategy
from llmft.training.topology import Topology


def replica(topology: Topology) -> tuple[torch.nn.Module, SingleStrategy]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(*(torch.nn.Linear(8, 8) for _ in range(5)))  # 10 parameters
    strategy = SingleStrategy(compose(["train.precision=fp16"]), topology, torch.float16)  # with a scaler's state
    strategy.wrap(model, list(model.parameters()), lambda step: 1.0)
    return model, strategy


def trained(topology: Topology) -> SingleStrategy:
    _, strategy = replica(topology)
    for step in range(2):
        strategy.backward(sum(param.sum() for param in strategy.trainable) * 0.1 * (step + 1))
        strategy.step()
    return strategy


def save_on_ranks(rank: int, world: int, root: str, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    topology = Topology(world, rank, rank, 1, "cpu")
    strategy = trained(topology)
    checkpoints.save(checkpoints_root(root), 2, strategy.save, {}, keep_last=1, barrier=topology.barrier,
                     is_main=topology.is_main, gather=topology.gather, rank=rank)
    dist.destroy_process_group()


def checkpoints_root(root) -> "os.PathLike":
    from pathlib import Path

    return Path(root) / "checkpoints"


def test_two_replicas_share_the_moments_and_one_rank_reads_them_back_whole(tmp_path):
    mp.spawn(save_on_ranks, args=(2, str(tmp_path), 29761), nprocs=2)
    folder, _ = checkpoints.find_latest(checkpoints_root(tmp_path))
    assert folder is not None and folder.name == "step_2"  # complete: every file in the manifest, checksums right
    parts = sorted(p.name for p in folder.glob("optimizer_moments_*"))
    assert parts == ["optimizer_moments_0_of_2.pt", "optimizer_moments_1_of_2.pt"]
    shares = [torch.load(folder / name, weights_only=False) for name in parts]
    assert sorted(shares[0]) == [0, 2, 4, 6, 8] and sorted(shares[1]) == [1, 3, 5, 7, 9]  # every other parameter

    expected = trained(Topology(1, 0, 0, 1, "cpu"))  # the same two steps on one process
    model, resumed = replica(Topology(1, 0, 0, 1, "cpu"))
    resumed.load(folder)
    loaded, reference = resumed.optimizer.state_dict(), expected.optimizer.state_dict()
    assert loaded["state"].keys() == reference["state"].keys()
    for index, moments in reference["state"].items():
        for key, value in moments.items():
            assert torch.equal(loaded["state"][index][key], value), (index, key)
    assert loaded["param_groups"] == reference["param_groups"]
    assert resumed.scaler.state_dict() == expected.scaler.state_dict()
    for param, reference_param in zip(model.parameters(), expected.trainable):
        assert torch.equal(param, reference_param)
