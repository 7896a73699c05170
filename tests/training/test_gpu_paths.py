"""The GPU-only paths, checked on the CPU where they can be (issue 17): what each asks of torch and DeepSpeed is
recorded through stand-ins for the CUDA calls. What only a GPU can confirm is in tools/gpu-check.sh."""

from __future__ import annotations

import types

import pytest
import torch

from llmft.config.compose import compose
from llmft.errors import ConfigError
from llmft.launch.estimate import inference_gpus
from llmft.training import precision, strategies
from llmft.training.loop import rng_state, set_rng_state
from llmft.training.metrics import MemoryMeter
from llmft.training.model import full_numel
from llmft.training.flops import peak_flops
from llmft.training.strategies.deepspeed import deepspeed_config
from llmft.training.topology import Topology


def test_bf16_only_where_the_gpu_has_it_natively(monkeypatch):
    # a V100: bf16 only by emulation, which is_bf16_supported() counts unless told not to
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: including_emulation)
    assert precision.compute_dtype("auto", "cuda") is torch.float16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)  # an A100
    assert precision.compute_dtype("auto", "cuda") is torch.bfloat16
    assert precision.compute_dtype("auto", "cpu") is None and precision.compute_dtype("bf16", "cpu") is torch.bfloat16


@pytest.mark.parametrize("gpu, capability, compute, peak", [
    ("Tesla V100-SXM2-32GB", (7, 0), torch.float16, 125e12),  # no bf16 tensor cores: fp16 and a loss scaler
    ("Tesla T4", (7, 5), torch.float16, 65e12),
    ("NVIDIA A100-SXM4-80GB", (8, 0), torch.bfloat16, 312e12),
    ("NVIDIA H100 80GB HBM3", (9, 0), torch.bfloat16, 989e12),
])
def test_precision_and_peak_follow_the_compute_capability(gpu, capability, compute, peak):
    chosen = precision.compute_dtype("auto", "cuda", native_bf16=precision.native_bf16_of(capability))
    assert chosen is compute
    assert peak_flops(gpu, precision.NAMES[chosen]) == peak
    assert (precision.loss_scaler(chosen, "cpu") is not None) is (chosen is torch.float16)
    assert peak_flops(gpu, "fp32") != peak  # an fp32 run is not measured against the tensor-core peak


def test_deepspeed_reduces_and_accumulates_in_fp32_like_fsdp():
    cfg = compose(["parallelism=zero3", "launch.nproc=2"])
    config = deepspeed_config(cfg, 2, torch.bfloat16)
    assert config["bf16"]["enabled"] and config["communication_data_type"] == "fp32"
    assert config["data_types"]["grad_accum_dtype"] == "fp32" and not config["fp16"]["enabled"]
    assert "communication_data_type" not in deepspeed_config(cfg, 2, None)
    fp16 = deepspeed_config(cfg, 2, torch.float16)  # DeepSpeed's own fp16 path, with its dynamic loss scale
    assert fp16["fp16"] == {"enabled": True, "loss_scale": 0, "initial_scale_power": 16}
    assert not fp16["bf16"]["enabled"]


def test_four_bit_weights_count_their_real_size():
    packed = torch.nn.Parameter(torch.empty(4096 * 4096 // 2, 1, dtype=torch.uint8), requires_grad=False)
    packed.quant_state = types.SimpleNamespace(shape=torch.Size([4096, 4096]))  # what bitsandbytes' Params4bit has
    assert full_numel(packed) == 4096 * 4096
    assert full_numel(torch.nn.Parameter(torch.empty(3, 5))) == 15


def isolate_rank_variables(monkeypatch) -> None:
    """What export_env writes is put back after the test (set, then deleted: monkeypatch restores the absence)."""
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "TORCHELASTIC_RUN_ID"):
        monkeypatch.setenv(name, "unset")
        monkeypatch.delenv(name)


def test_the_rank_variables_are_set_from_srun_alone(monkeypatch):
    isolate_rank_variables(monkeypatch)
    monkeypatch.setenv("SLURM_STEP_ID", "0")
    monkeypatch.setenv("RANK", "0")  # inherited from the submitting shell: srun's variables win inside a step
    monkeypatch.setenv("SLURM_PROCID", "5")
    monkeypatch.setenv("SLURM_NTASKS", "8")
    monkeypatch.setenv("SLURM_LOCALID", "1")
    monkeypatch.setenv("SLURM_NNODES", "2")
    topology = Topology.from_env()
    topology.export_env()
    import os

    assert (os.environ["RANK"], os.environ["WORLD_SIZE"], os.environ["LOCAL_RANK"]) == ("5", "8", "1")
    assert os.environ["LOCAL_WORLD_SIZE"] == "4"


def test_the_gpu_is_bound_before_the_process_group_and_given_to_it(monkeypatch):
    isolate_rank_variables(monkeypatch)
    calls = []
    monkeypatch.setattr(torch.cuda, "set_device", lambda index: calls.append(("set_device", index)))
    import torch.distributed as dist

    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", lambda **kwargs: calls.append(("init", kwargs)))
    Topology(world_size=8, rank=3, local_rank=3, num_nodes=1, device_type="cuda").init_process_group(7)
    assert calls[0] == ("set_device", torch.device("cuda:3"))
    init = calls[1][1]
    assert init["backend"] == "nccl" and init["device_id"] == torch.device("cuda:3")
    assert init["timeout"].total_seconds() == 7 * 60


@pytest.mark.parametrize("visible, local_rank, expected", [
    (4, 3, 3),  # --gres=gpu:4: every task sees the node's 4 GPUs
    (8, 3, 3),  # more GPUs than ranks on the node (a partial node)
    (1, 3, 0),  # --gpus-per-task=1 / --gpu-bind: CUDA_VISIBLE_DEVICES holds this task's GPU alone
    (2, 3, None),  # two GPUs for four ranks: no binding gives each rank its own GPU
])
def test_the_gpu_is_chosen_among_the_visible_devices(monkeypatch, visible, local_rank, expected):
    isolate_rank_variables(monkeypatch)
    for name, value in (("SLURM_PROCID", "7"), ("SLURM_NTASKS", "8"), ("SLURM_LOCALID", str(local_rank)),
                        ("SLURM_NNODES", "2"), ("SLURM_STEP_ID", "0")):
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: visible)
    if expected is None:
        with pytest.raises(RuntimeError, match="sees 2 GPUs for 4 ranks on its node: give each task one GPU"):
            Topology.from_env()
        return
    topology = Topology.from_env()
    assert topology.local_rank == local_rank and topology.device == torch.device("cuda", expected)
    calls = []
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: calls.append(device))
    import torch.distributed as dist

    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", lambda **kwargs: calls.append(kwargs["device_id"]))
    topology.init_process_group()
    assert calls == [torch.device("cuda", expected)] * 2  # bound, then given to the process group
    import os

    assert os.environ["LOCAL_RANK"] == str(expected)  # the index DeepSpeed's engine binds


def test_the_cuda_rng_state_is_this_ranks_device_only(monkeypatch):
    asked = []
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device: asked.append(device) or torch.tensor([7]))
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, device: asked.append(("set", device)))
    state = rng_state(torch.device("cuda:3"))
    assert asked == [torch.device("cuda:3")] and torch.equal(state["cuda"], torch.tensor([7]))
    set_rng_state(state, torch.device("cuda:1"))  # resumed on a node with fewer GPUs: its own device, no index error
    assert asked[-1] == ("set", torch.device("cuda:1"))
    set_rng_state({**state, "cuda": [torch.tensor([1])] * 8}, torch.device("cuda:1"))  # an old all-GPU state: skipped
    assert asked[-1] == ("set", torch.device("cuda:1"))


def test_peak_memory_is_per_interval(monkeypatch):
    peaks = iter([5 * 2**30, 2 * 2**30, 3 * 2**30])
    resets = []
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device: next(peaks))
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda device: resets.append(device))
    meter = MemoryMeter(torch.device("cuda:0"))  # the first interval starts here (5 GiB before: forgotten)
    assert meter.interval_peak_gb() == 2.0 and meter.interval_peak_gb() == 3.0 and len(resets) == 3


def test_the_strategy_is_settled_from_the_ranks_real_number():
    cfg = compose(["parallelism=auto"])  # what an sbatch template's prepare_only run writes
    assert strategies.build(cfg, Topology(2, 0, 0, 1, "cpu"), None).name == "ddp"
    assert strategies.build(cfg, Topology(1, 0, 0, 1, "cpu"), None).name == "single"
    with pytest.raises(ConfigError, match="need a distributed strategy"):
        strategies.build(compose(["parallelism=single"]), Topology(2, 0, 0, 1, "cpu"), None)


def test_the_evaluation_job_asks_for_the_gpus_the_model_needs():
    assert inference_gpus(compose(["model=tiny"]), 80, 8) == 1
    assert inference_gpus(compose(["model=llama3_8b"]), 80, 8) == 1  # 16 GB of bf16 weights
    seventy_b = ["model=llama3_8b", "model.arch.hidden_size=8192", "model.arch.intermediate_size=28672",
                 "model.arch.num_hidden_layers=80", "model.arch.num_attention_heads=64"]
    assert inference_gpus(compose(seventy_b), 80, 8) == 3  # 141 GB of bf16 weights, x1.3, over 72 GB usable
    assert inference_gpus(compose(seventy_b), 80, 2) == 2  # never more than a node has


def test_a_whole_model_is_written_shard_by_shard_and_reloads(tmp_path):
    """peft=full export streams the gathered tensors into safetensors shards (rank 0 never holds the whole model);
    the folder reloads with stock from_pretrained and gives the same logits."""
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    from llmft.training.final import write_sharded

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                                         num_attention_heads=4, num_key_value_heads=2)).eval()
    gathered = ((name, param.detach().cpu()) for name, param in model.named_parameters())
    write_sharded(gathered, tmp_path, max_shard_bytes=64 * 1024)
    model.config.save_pretrained(tmp_path)
    shards = sorted(p.name for p in tmp_path.glob("model-*-of-*.safetensors"))
    assert len(shards) > 3 and (tmp_path / "model.safetensors.index.json").exists()
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path, local_files_only=True).eval()
    ids = torch.tensor([[5, 17, 42, 99, 7]])
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, reloaded(input_ids=ids).logits)


@pytest.mark.parametrize("installed, overrides, refused", [
    ("0.19.2", ["parallelism=zero3", "train.activation_checkpointing=true"], True),
    ("0.18.9", ["parallelism=zero3_offload", "train.activation_checkpointing=true"], True),
    ("0.19.3", ["parallelism=zero3", "train.activation_checkpointing=true"], False),  # the fixed release
    ("0.19.2", ["parallelism=zero3", "train.activation_checkpointing=false"], False),
    ("0.19.2", ["parallelism=zero3", "train.activation_checkpointing=true", "peft=full"], False),  # nothing frozen
    ("0.16.0", ["parallelism=zero2", "train.activation_checkpointing=true"], False),  # parameters not partitioned
])
def test_a_deepspeed_release_that_fails_zero3_lora_with_checkpointing_is_refused(monkeypatch, installed, overrides,
                                                                               refused):
    import importlib.metadata

    from llmft.config.compose import typed_config
    from llmft.config.validation import check_installed

    monkeypatch.setattr(importlib.metadata, "version", lambda name: installed if name == "deepspeed" else "1.0")
    cfg = typed_config(compose(overrides))
    if refused:
        with pytest.raises(ConfigError, match=rf"deepspeed {installed} fails in backward .* pip install "
                                              r"'deepspeed>=0.19.3', or set train.activation_checkpointing=false"):
            check_installed(cfg, local=False)
    else:
        check_installed(cfg, local=False)


def test_liger_is_not_taken_for_a_trainable_head_under_zero3(monkeypatch):
    """Liger computes the head's gradient outside the head module: under ZeRO-3 a trainable head (full fine-tuning)
    is partitioned there, so auto takes the chunked head through its module and an explicit liger is refused (at
    launch, and at install); a frozen head (LoRA) and the other strategies keep Liger."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from llmft.config.validation import check_loss_head
    from llmft.training import loss

    monkeypatch.setattr(loss, "liger_available", lambda device_type: True)  # CUDA with liger-kernel installed
    config = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2)
    expected = {(True, True): "chunked", (True, False): "liger", (False, True): "liger", (False, False): "liger"}
    for (partitioned, head_trains), head in expected.items():
        model = LlamaForCausalLM(config)
        model.lm_head.weight.requires_grad_(head_trains)
        assert loss.install(model, "auto", "cuda", partitioned) == head, (partitioned, head_trains)
    model = LlamaForCausalLM(config)
    with pytest.raises(ConfigError, match="train.loss_head=liger cannot train the LM head under ZeRO-3"):
        loss.install(model, "liger", "cuda", partitioned=True)
    for strategy in ("zero3", "zero3_offload"):
        with pytest.raises(ConfigError, match=f"loss_head=liger cannot train the LM head under parallelism={strategy}"):
            check_loss_head(compose([f"parallelism={strategy}", "peft=full", "train.loss_head=liger"]))
    for overrides in (["parallelism=zero3", "train.loss_head=liger"], ["parallelism=zero2", "peft=full",
                                                                        "train.loss_head=liger"]):
        check_loss_head(compose(overrides))  # LoRA's frozen head, or a strategy that keeps the head whole


def test_fp16_scales_the_loss_skips_an_overflowing_step_and_checkpoints_its_scale(tmp_path):
    """A V100's fp16 (precision=auto there): the loss scaler of single/ddp, on this CPU's float16 autocast."""
    from llmft.training.strategies.single import SingleStrategy

    cfg = compose(["train.precision=fp16", "train.max_grad_norm=1.0"])
    topology = Topology(1, 0, 0, 1, "cpu")

    def fresh():
        torch.manual_seed(0)
        model = torch.nn.Linear(4, 1)
        strategy = SingleStrategy(cfg, topology, torch.float16)
        strategy.wrap(model, list(model.parameters()), lambda step: 1.0)
        return model, strategy

    model, strategy = fresh()
    before = model.weight.detach().clone()
    with precision.autocast(torch.float16, "cpu"):
        loss = model(torch.ones(2, 4)).float().sum()
    strategy.backward(loss * 1e35)  # times the 65,536 scale: inf gradients in fp32
    assert not torch.isfinite(strategy.step())
    assert torch.equal(model.weight, before) and strategy.scaler.get_scale() == 32768.0  # skipped, scale halved
    strategy.backward(model(torch.ones(2, 4)).sum())
    assert torch.isfinite(strategy.step()) and not torch.equal(model.weight, before)
    strategy.save(tmp_path)
    resumed_model, resumed = fresh()
    resumed.load(tmp_path)
    assert resumed.scaler.state_dict() == strategy.scaler.state_dict()
    assert torch.equal(resumed_model.weight, model.weight)
