"""Every model family `model.tiny.family` builds (Llama, Mistral, Qwen 2 and 3, Gemma 3, Phi-3, GPT-2, BLOOM, a dense
DeepSeek-V3): its LoRA targets are every projection of its decoder layers; plan counts its parameters as transformers
builds them, and those of each real model's profile; the chunked loss equals its full-logits loss; a folder of it
loads on the meta device and from its shards. On 2 ranks, every family trains with LoRA under DDP and FSDP2 (one
torchrun for all; GPT-2, BLOOM and Gemma 3 also from a base-model folder, sharded as they load), its adapter reloads
with stock PEFT to the same logits, and its merged export checks out."""

from __future__ import annotations

import io
import math
import os
import subprocess
from contextlib import redirect_stdout

import pytest
import torch

from llmft.config.compose import compose
from llmft.config.families import LORA_TARGETS, ModelFamily
from llmft.errors import ConfigError
from support.runs import REPO, read_metrics
from support.torchrun import harness_command
from support.torchrun_harness import FAMILIES_PROBE_IDS as PROBE_IDS

FAMILIES = [family.value for family in ModelFamily]
# Small enough that a family's run takes a second or two on one CPU core
TINY = ["model.tiny.hidden_size=64", "model.tiny.intermediate_size=128", "model.tiny.num_attention_heads=4",
        "model.tiny.num_key_value_heads=2", "model.tiny.vocab_size=512"]
# The profiles of real models that name a family other than Llama's, with their family
PROFILES = {"qwen3_8b": "qwen3", "gemma3_4b": "gemma3", "phi3_mini": "phi3", "bloom_7b1": "bloom", "gpt2": "gpt2",
            "qwen2_5_1_5b": "qwen2", "deepseek_r1_distill_qwen_1_5b": "qwen2", "mistral_7b": "mistral",
            "qwen2_5_7b": "qwen2"}


def family_overrides(family: str) -> list[str]:
    """BLOOM's ALiBi has no position ids: its samples cannot be packed (validation refuses it)."""
    return [f"model.tiny.family={family}", *TINY] + (["data.packing=false"] if family == "bloom" else [])


def tiny_tokenizer():
    from llmft.data.tokenize.tokenizer import train_tiny_tokenizer

    texts = [line for line in (REPO / "llmft/data/samples/tickets_sample.chat.jsonl").read_text().splitlines()]
    return train_tiny_tokenizer(texts, 512)


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


def built(family: str, tokenizer):
    from llmft.training.model import build_tiny_model

    cfg = compose(family_overrides(family) + ["peft.dropout=0"])
    model = build_tiny_model(cfg.model.tiny, tokenizer, seed=0, max_seq_len=cfg.model.max_seq_len)
    model.config.use_cache = False  # as load_model sets it (a cache also turns off transformers' packed masks)
    return cfg, model


def leaf_name(name: str) -> str:
    return name.rsplit(".", 1)[-1]


@pytest.mark.parametrize("family", FAMILIES)
def test_the_lora_targets_are_every_projection_of_the_decoder_layers(family, tokenizer):
    from llmft.training.model import apply_peft, decoder_layers

    cfg, model = built(family, tokenizer)
    assert list(cfg.model.lora_target_modules) == LORA_TARGETS[ModelFamily(family)]
    projections = {leaf_name(name) for layer in decoder_layers(model) for name, module in layer.named_modules()
                   if type(module).__name__ in ("Linear", "Conv1D")}
    assert projections == set(cfg.model.lora_target_modules)
    peft_model = apply_peft(model, cfg.peft, cfg.model)
    adapted = {leaf_name(name) for name, module in peft_model.named_modules() if hasattr(module, "lora_A")}
    assert adapted == projections
    holders = {name.split(".")[-2] for name, module in peft_model.named_modules()
               if hasattr(module, "lora_A")}  # the module holding each adapted projection
    assert any("att" in holder for holder in holders) and "mlp" in holders, holders
    assert peft_model.peft_config["default"].fan_in_fan_out == (family == "gpt2")  # GPT-2's Conv1D stores (in, out)


def test_a_target_that_matches_no_module_is_one_sentence(tokenizer):
    from llmft.training.model import apply_peft

    cfg, model = built("phi3", tokenizer)
    cfg.peft.target_modules = ["self_attn.qkv_proj", "gate_proj"]  # PEFT's suffixes are names too
    with pytest.raises(ConfigError, match=r"^LoRA target\(s\) gate_proj match no module of Phi3ForCausalLM: set "
                                          r"peft.target_modules to some of its layers \(down_proj, gate_up_proj, "
                                          r"lm_head, o_proj, qkv_proj\)\.$"):
        apply_peft(model, cfg.peft, cfg.model)


def test_a_family_name_is_checked_and_bloom_refuses_packing():
    from llmft.config.validation import validate

    with pytest.raises(ConfigError) as error:
        compose(["model.tiny.family=gpt3"])
    assert str(error.value) == ("bad config: model.tiny.family=gpt3: expected one of llama, mistral, qwen2, qwen3, "
                                "gemma3, phi3, gpt2, bloom, deepseek_v3.")
    with pytest.raises(ConfigError, match=r"^model=tiny is a bloom model \(ALiBi: no position ids\), so packed "
                                          r"samples would attend to each other: set data.packing=false\.$"):
        validate(compose(["model.tiny.family=bloom", "data.packing=true"]))  # asked for: auto trains unpacked
    with pytest.raises(ConfigError, match="eager attention only: set model.attn_implementation=eager"):
        validate(compose(["model=bloom_7b1", "data.packing=false", "model.attn_implementation=sdpa"]),
                 check_paths=False)
    validate(compose(["model.tiny.family=bloom", "data.packing=false"]))


def test_the_default_family_is_todays_llama_weight_for_weight(tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg, model = built("llama", tokenizer)
    tiny = cfg.model.tiny
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=tiny.hidden_size,
                         intermediate_size=tiny.intermediate_size, num_hidden_layers=tiny.num_hidden_layers,
                         num_attention_heads=tiny.num_attention_heads, num_key_value_heads=tiny.num_key_value_heads,
                         max_position_embeddings=256, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                         tie_word_embeddings=False, initializer_range=tiny.initializer_range)
    torch.manual_seed(0)
    before = LlamaForCausalLM(config).state_dict()
    assert compose([]).model.tiny.family == ModelFamily.llama
    assert before.keys() == model.state_dict().keys()
    assert all(torch.equal(before[name], tensor) for name, tensor in model.state_dict().items())


@pytest.mark.parametrize("family", FAMILIES)
def test_plan_counts_the_parameters_transformers_builds(family, tokenizer):
    from peft import get_peft_model_state_dict

    from llmft.launch.estimate import arch_of, arch_parameter_counts
    from llmft.training.model import apply_peft

    cfg, model = built(family, tokenizer)
    cfg.model.tiny.vocab_size = len(tokenizer)  # the trained tokenizer may stop short of vocab_size
    total, trainable, _ = arch_parameter_counts(arch_of(cfg.model), list(cfg.model.lora_target_modules), cfg.peft.r)
    base = sum(p.numel() for p in model.parameters())
    peft_model = apply_peft(model, cfg.peft, cfg.model)
    adapter = sum(t.numel() for t in get_peft_model_state_dict(peft_model).values())
    assert (total - trainable, trainable) == (base, adapter)


def profile_model_on_meta(profile: str):
    """The transformers model of a profile's published shape, on the meta device (no memory)."""
    import transformers

    from llmft.training.model import FAMILY_CLASSES, family_config

    arch = compose([f"model={profile}", "model.path=/nowhere"]).model.arch
    config = family_config(arch.family, arch.hidden_size, arch.intermediate_size, arch.num_hidden_layers,
                           arch.num_attention_heads, arch.num_key_value_heads, arch.vocab_size,
                           max_positions=arch.position_embeddings or 4096, head_dim=arch.head_dim,
                           tie_word_embeddings=arch.tie_word_embeddings)
    with torch.device("meta"):
        return getattr(transformers, FAMILY_CLASSES[arch.family][1])(config)


@pytest.mark.parametrize("profile", sorted(PROFILES))
def test_each_profile_counts_what_transformers_builds_and_plans(profile):
    from llmft.launch.estimate import arch_of, arch_parameter_counts
    from llmft.launch.plan import plan
    from llmft.training.model import check_lora_targets

    cfg = compose([f"model={profile}", "model.path=/nowhere"])
    assert cfg.model.arch.family == ModelFamily(PROFILES[profile])
    model = profile_model_on_meta(profile)
    check_lora_targets(model, list(cfg.model.lora_target_modules))  # the profile's targets exist in the model
    total, _, _ = arch_parameter_counts(arch_of(cfg.model), None, 0)
    assert total == sum(p.numel() for p in model.parameters())
    out = io.StringIO()
    with redirect_stdout(out):
        assert plan([f"model={profile}", "model.path=/nowhere", "+cluster=jeanzay", "cluster.account=abc",
                     "train.max_steps=100"]) == 0
    lines = out.getvalue()
    with_lora, lora, _ = arch_parameter_counts(arch_of(cfg.model), list(cfg.model.lora_target_modules), 16)
    assert f"parameters  {with_lora / 1e9:.2f} B, {lora / 1e6:.1f} M trainable" in lines
    assert "verdict     fits in 80 GB" in lines and "GPU-hours" in lines


def test_published_config_files_read_as_their_profiles():
    """The shapes plan reads from the original config.json files equal the profiles': BigScience's BLOOM file
    (n_embed, num_attention_heads, no tie key) and google/gemma-3-4b-it's minimal text_config (the rest is
    Gemma3TextConfig's defaults)."""
    from llmft.launch.estimate import arch_from_config_json, arch_of, arch_parameter_counts

    bloom = {"model_type": "bloom", "n_embed": 4096, "n_inner": None, "n_layer": 30, "num_attention_heads": 32,
             "vocab_size": 250880, "seq_length": 2048}
    gemma = {"model_type": "gemma3", "text_config": {"hidden_size": 2560, "intermediate_size": 10240,
                                                     "model_type": "gemma3_text", "num_hidden_layers": 34,
                                                     "sliding_window": 1024}}
    gemma = {**gemma, **gemma["text_config"]}  # as read_model_config merges it
    gpt2 = {"model_type": "gpt2", "n_embd": 768, "n_layer": 12, "n_head": 12, "n_positions": 1024, "n_ctx": 1024,
            "vocab_size": 50257}
    for profile, config in (("bloom_7b1", bloom), ("gemma3_4b", gemma), ("gpt2", gpt2)):
        profile_arch = arch_of(compose([f"model={profile}", "model.path=/nowhere"]).model)
        assert arch_from_config_json(config) == profile_arch, profile
        assert arch_parameter_counts(arch_from_config_json(config), None, 0) == \
            arch_parameter_counts(profile_arch, None, 0)


def test_published_sizes_of_well_known_models():
    from llmft.launch.estimate import arch_of, arch_parameter_counts

    def total(profile):
        return arch_parameter_counts(arch_of(compose([f"model={profile}", "model.path=/nowhere"]).model), None, 0)[0]

    assert total("gpt2") == 124_439_808  # GPT-2 small: "124M"
    assert total("bloom_7b1") == 7_069_016_064  # the bloom-7b1 model card
    # GPT-2 and BLOOM have a plain MLP (two matrices), not a gated one (three)
    from llmft.launch.estimate import Arch
    assert [name for name, _, _ in Arch(8, 32, 1, 2, 2, 10, family="gpt2").linear_shapes()] == \
        ["c_attn", "c_proj", "c_fc", "c_proj"]


def full_and_chunked_losses(peft_model, batch: dict) -> tuple[tuple, tuple]:
    """(loss sum, supervised tokens) of `batch` by the model's own full-logits forward, then by llmft's chunked head
    installed for the call (the model's forward is restored after)."""
    from llmft.training.loss import install, token_losses, with_loss_index

    full = token_losses(peft_model, dict(batch), compute=None)
    hf_model = peft_model.get_base_model()
    forward = hf_model.forward
    assert install(hf_model, "auto", "cpu") == "chunked"
    chunked = token_losses(peft_model, with_loss_index(dict(batch)), compute=None)
    hf_model.forward = forward
    return full, chunked


@pytest.mark.parametrize("family", FAMILIES)
def test_the_chunked_loss_equals_the_full_logits_loss(family, tokenizer):
    from llmft.training.loss import full_logits_reason
    from llmft.training.model import apply_peft, init_lora_weights

    cfg, model = built(family, tokenizer)
    assert full_logits_reason(model) is None  # no family here scales its logits (Gemma 3 has no soft-capping)
    peft_model = apply_peft(model, cfg.peft, cfg.model)
    init_lora_weights(peft_model, 0)
    with torch.no_grad():  # an adapter that changes the outputs
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.1)
    ids = torch.randint(5, len(tokenizer), (2, 12), generator=torch.Generator().manual_seed(0))
    labels = ids.clone()
    labels[:, :4] = -100
    batches = {"padded": {"attention_mask": torch.ones_like(ids)}}
    if family != "bloom":  # two samples packed in each row: positions restart
        batches["packed"] = {"position_ids": torch.arange(6).repeat(2, 2)}
    for kind, extra in batches.items():
        full, chunked = full_and_chunked_losses(peft_model, {"input_ids": ids, "labels": labels, **extra})
        assert int(chunked[1]) == int(full[1]) == 16
        assert float(chunked[0]) == pytest.approx(float(full[0]), rel=1e-5), kind


@pytest.mark.parametrize("family", ["gemma3", "phi3", "mistral"])
def test_a_sliding_window_shorter_than_a_packed_row_keeps_the_chunked_loss_exact(family, tokenizer):
    """Gemma 3 (1024 on most layers) and Phi-3-mini (2047) slide a window shorter than their profiles' rows (4096)."""
    from llmft.training.model import apply_peft

    cfg, model = built(family, tokenizer)
    model.config.sliding_window = 3
    peft_model = apply_peft(model, cfg.peft, cfg.model)
    ids = torch.randint(5, len(tokenizer), (2, 16), generator=torch.Generator().manual_seed(0))
    labels = ids.clone()
    labels[:, :2] = -100
    batch = {"input_ids": ids, "labels": labels, "position_ids": torch.arange(8).repeat(2, 2)}  # 2 samples a row
    full, chunked = full_and_chunked_losses(peft_model, batch)
    assert float(chunked[0]) == pytest.approx(float(full[0]), rel=1e-5)


def multimodal_gemma3(folder):
    """A tiny Gemma3ForConditionalGeneration (a language model and a SigLIP image encoder), saved in `folder`."""
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration, Gemma3TextConfig, SiglipVisionConfig

    text = Gemma3TextConfig(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=16)
    vision = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                                image_size=28, patch_size=14)
    config = Gemma3Config(text_config=text.to_dict(), vision_config=vision.to_dict(), mm_tokens_per_image=4,
                          image_token_index=299, boi_token_index=297, eoi_token_index=298)
    torch.manual_seed(0)
    Gemma3ForConditionalGeneration(config).save_pretrained(folder)
    return compose(["model=gemma3_4b", f"model.path={folder}", "model.dtype=float32", "peft.dropout=0"])


def test_a_multimodal_gemma3_folder_trains_its_language_model_only(tmp_path):
    """gemma3_4b's folder holds Gemma3ForConditionalGeneration (text and image encoder): LoRA goes on the language
    model only, the chunked loss equals its full logits on text, and plan counts the language model."""
    from llmft.config.families import read_model_config
    from llmft.launch.estimate import arch_from_config_json, arch_parameter_counts
    from llmft.training.model import apply_peft, load_pretrained_model

    cfg = multimodal_gemma3(tmp_path)
    model = load_pretrained_model(cfg.model)
    model.config.use_cache = False
    language_model = sum(p.numel() for p in model.model.language_model.parameters())
    assert arch_parameter_counts(arch_from_config_json(read_model_config(str(tmp_path))), None, 0)[0] == \
        language_model  # its head is tied to the embedding
    peft_model = apply_peft(model, cfg.peft, cfg.model)
    adapted = [name for name, module in peft_model.named_modules() if hasattr(module, "lora_A")]
    assert len(adapted) == 2 * 7 and all(".language_model.layers." in name for name in adapted)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.1)
    ids = torch.randint(5, 290, (2, 12), generator=torch.Generator().manual_seed(0))
    labels = ids.clone()
    labels[:, :4] = -100
    for extra in ({"attention_mask": torch.ones_like(ids)}, {"position_ids": torch.arange(6).repeat(2, 2)}):
        full, chunked = full_and_chunked_losses(peft_model, {"input_ids": ids, "labels": labels, **extra})
        assert float(chunked[0]) == pytest.approx(float(full[0]), rel=1e-5)


def test_a_target_peft_leaves_without_an_adapter_is_one_sentence(tmp_path):
    """fc1 exists only in the image encoder (SigLIP's MLP), which llmft excludes: PEFT would adapt q_proj and only
    warn about fc1."""
    from llmft.training.model import apply_peft, load_pretrained_model

    cfg = multimodal_gemma3(tmp_path)
    cfg.peft.target_modules = ["q_proj", "fc1"]
    with pytest.raises(ConfigError, match=r"^PEFT put no adapter on fc1 of Gemma3ForConditionalGeneration: remove it "
                                          r"from peft.target_modules\.$"):
        apply_peft(load_pretrained_model(cfg.model), cfg.peft, cfg.model)


@pytest.mark.parametrize("family", FAMILIES)
def test_a_saved_model_loads_on_meta_and_from_its_shards(family, tokenizer, tmp_path):
    """The path of a real model under DDP (rank 0 reads) and FSDP2 (each rank its rows): build_on_meta, then
    load_weights, gives from_pretrained's logits; GPT-2 and BLOOM also from files saved without the `transformer.`
    prefix (as the original checkpoints are), their tied head read from the embedding."""
    import types

    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM

    from llmft.training.model import allocate, build_on_meta, load_weights

    cfg, model = built(family, tokenizer)
    model.config.tie_word_embeddings = family in ("gpt2", "bloom", "gemma3")
    model.tie_weights()
    model.save_pretrained(tmp_path)
    if family in ("gpt2", "bloom"):
        tensors = load_file(tmp_path / "model.safetensors")
        save_file({name.removeprefix("transformer."): t.contiguous() for name, t in tensors.items()},
                  tmp_path / "model.safetensors", metadata={"format": "pt"})
    attention = "eager" if family == "bloom" else "sdpa"  # transformers has no SDPA for BLOOM
    reference = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation=attention).eval()
    skeleton = build_on_meta(types.SimpleNamespace(path=str(tmp_path), dtype="float32"), None, attention)
    allocate(skeleton, torch.device("cpu"))
    load_weights(skeleton, tmp_path)
    ids = torch.tensor(PROBE_IDS)
    with torch.no_grad():
        torch.testing.assert_close(skeleton.eval()(input_ids=ids).logits, reference(input_ids=ids).logits,
                                   rtol=0, atol=0)


# Families whose real models are base models with a tied head (and, for GPT-2 and BLOOM, checkpoints without the
# `transformer.` prefix): also trained from a folder (model.path) under FSDP2, each rank reading its rows
FROM_DISK = ["gpt2", "bloom", "gemma3"]


def base_model_folder(family: str, tokenizer, folder):
    """A tiny model of `family` saved as a real base model would be: tied head, no chat template (llmft's fallback
    template applies), GPT-2 and BLOOM's weights without the `transformer.` prefix."""
    import copy

    from safetensors.torch import load_file, save_file

    _, model = built(family, tokenizer)
    model.config.tie_word_embeddings = True
    model.tie_weights()
    model.save_pretrained(folder)
    if family in ("gpt2", "bloom"):
        tensors = load_file(folder / "model.safetensors")
        save_file({name.removeprefix("transformer."): t.contiguous() for name, t in tensors.items()},
                  folder / "model.safetensors", metadata={"format": "pt"})
    base_tokenizer = copy.deepcopy(tokenizer)
    base_tokenizer.chat_template = None
    base_tokenizer.save_pretrained(folder)
    return folder


class FamilyRuns:
    """Every family's 2-rank runs (ddp, fsdp, and fsdp from a base-model folder for FROM_DISK) in one torchrun of
    support/torchrun_harness.py (train_families), started in the background; results() waits for it."""

    def __init__(self, root, tokenizer):
        from llmft.rundir import create as rundir

        common = ["launch.nproc=2", "peft.dropout=0", "train.max_steps=2", "train.warmup_steps=0",
                  "train.log_every=1", "train.eval_every=2", "train.save_every=0", "train.micro_batch_size=2"]
        self.run_dirs = {}
        for family in FAMILIES:
            for strategy in ("ddp", "fsdp"):
                self.run_dirs[family, strategy] = root / f"{family}-{strategy}"
                rundir.create(compose(family_overrides(family) + common + [
                    f"parallelism={strategy}", f"run_dir={self.run_dirs[family, strategy]}"]))
        for family in FROM_DISK:
            folder = base_model_folder(family, tokenizer, root / f"{family}-base")
            self.run_dirs[family, "fsdp_from_disk"] = root / f"{family}-fsdp_from_disk"
            rundir.create(compose(family_overrides(family) + common + [
                "parallelism=fsdp", f"run_dir={self.run_dirs[family, 'fsdp_from_disk']}", f"model.path={folder}"]
                + (["model.attn_implementation=eager"] if family == "bloom" else [])))
        self.out, self.log = root / "families.pt", root / "families.log"
        command = harness_command(2, "train_families", self.out, self.run_dirs.values())
        with open(self.log, "w") as log:
            self.process = subprocess.Popen(command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                                            env={**os.environ, "OMP_NUM_THREADS": "1"})

    def results(self) -> dict:
        code = self.process.wait(timeout=900)
        assert code == 0, self.log.read_text()[-8000:]
        return torch.load(self.out, weights_only=False)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()  # torchrun passes it on to its ranks
            self.process.wait(timeout=60)


TRAINS = "test_every_family_trains_on_two_ranks_reloads_with_stock_peft_and_exports_merged"


@pytest.fixture(scope="module")
def family_runs(tmp_path_factory, tokenizer):
    runs = FamilyRuns(tmp_path_factory.mktemp("families"), tokenizer)
    yield runs
    runs.stop()


@pytest.fixture(scope="module", autouse=True)
def start_the_family_runs_first(request):
    """When the test of the 2-rank runs is selected, its torchrun starts with this module's first test: it trains
    while the single-process tests before it run (each leaves a core idle)."""
    if any(item.name == TRAINS and item.module is request.module for item in request.session.items):
        request.getfixturevalue("family_runs")


@pytest.mark.slow
def test_every_family_trains_on_two_ranks_reloads_with_stock_peft_and_exports_merged(tmp_path, family_runs):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from llmft.serve.export import main as export_main

    run_dirs, results = family_runs.run_dirs, family_runs.results()
    ids = torch.tensor(PROBE_IDS)
    for (family, strategy), run_dir in run_dirs.items():
        where = (family, strategy)
        losses = [m["loss"] for m in read_metrics(run_dir) if "loss" in m]
        assert len(losses) == 2 and all(math.isfinite(loss) for loss in losses) and losses[0] != losses[1], where
        summary = results[str(run_dir)]["summary"]
        assert summary["status"] == "completed" and summary["num_train_samples"] > 10, where
        trained = results[str(run_dir)]["logits"]
        base = AutoModelForCausalLM.from_pretrained(summary["base_model_path"]).eval()
        with torch.no_grad():
            base_logits = base(input_ids=ids).logits
            reloaded = PeftModel.from_pretrained(base, run_dir / "final").eval()(input_ids=ids).logits
        torch.testing.assert_close(reloaded, trained, rtol=0, atol=1e-5, msg=lambda m: f"{where}: {m}")
        assert float((trained - base_logits).abs().max()) > 1e-3, where  # the adapter learned something
        if strategy == "fsdp_from_disk":  # a base model's tokenizer: llmft's fallback template, closed by eos
            assert "### assistant" in AutoTokenizer.from_pretrained(run_dir / "final").chat_template, where
        if strategy == "ddp":
            merged_dir = tmp_path / f"merged-{family}"
            assert export_main([f"run={run_dir}", f"out={merged_dir}", "merge=true"]) == 0, where
            merged = AutoModelForCausalLM.from_pretrained(merged_dir).eval()
            with torch.no_grad():
                torch.testing.assert_close(merged(input_ids=ids).logits, trained, rtol=0, atol=1e-4)
