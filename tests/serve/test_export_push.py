"""push=ORG/NAME: the model card written beside the export (base model, data counts with the personal data replaced,
never a conversation; the redacted config; the evaluation's scores; a license), the refusal on an offline machine
with the command for a login node, and the upload through huggingface_hub's HfApi (mocked: no test reaches the
network)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

from llmft.config.compose import compose
from llmft.rundir import create as rundir
from llmft.serve import model_card
from llmft.serve.export import main as export_main
from llmft.training.loop import train
from support.runs import write_chat_jsonl

SECRET_TEXT = "the quarterly reactor budget of Jeanne"  # in every conversation: must never reach the card


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("push")
    conversations = [[("user", f"Hello, I am jeanne.martin{i}@example.org, call me at +33 6 12 34 56 "
                               f"{i % 90 + 10:02d}. My job {1000 + i} on {SECRET_TEXT} is pending, why?"),
                      ("assistant", f"Job {1000 + i} waits for resources: check it with squeue -j {1000 + i}.")]
                     for i in range(30)]
    data = write_chat_jsonl(folder / "tickets.jsonl", conversations)
    cfg = compose(["data=chat_jsonl", f"data.path={data}", "train.max_steps=2", "train.eval_every=2",
                   "train.save_every=0", f"run_dir={folder / 'run'}", "+eval.judge_api_key=sk-do-not-publish"])
    run_dir = rundir.create(cfg)
    train(cfg, run_dir)
    return run_dir


@pytest.fixture
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture
def hub(monkeypatch):
    """HfApi's network calls replaced by recorders; the machine counts as online."""
    from huggingface_hub import HfApi

    calls = []
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(model_card, "offline_reason", lambda timeout_s=0: None)
    monkeypatch.setattr(HfApi, "create_repo", lambda self, repo_id, **kw: calls.append(("create_repo", repo_id, kw)))

    def upload_folder(self, **kw):
        files = sorted(p.name for p in Path(kw["folder_path"]).iterdir())
        calls.append(("upload_folder", kw["repo_id"], {**kw, "files": files}))
        return type("CommitInfo", (), {"repo_url": f"https://huggingface.co/{kw['repo_id']}"})()

    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    return calls


def front_matter(card: str) -> dict:
    assert card.startswith("---\n")
    return yaml.safe_load(card.split("---", 2)[1])


def test_offline_push_writes_the_card_and_prints_the_command_for_a_login_node(tiny_run, tmp_path, offline, capsys):
    out = tmp_path / "adapter"
    assert export_main([f"run={tiny_run}", f"out={out}", "push=my-lab/hpc-support"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and err.startswith("llmft: nothing was uploaded: this machine is "
                                                                 "offline (HF_HUB_OFFLINE is set)")
    assert f"hf upload my-lab/hpc-support {out} . --exclude llmft_export.json --private" in err
    assert (out / "adapter_model.safetensors").is_file() and (out / "llmft_export.json").is_file()

    card = (out / "README.md").read_text()
    meta = front_matter(card)
    assert meta["license"] == "other" and meta["library_name"] == "peft" and "llmft" in meta["tags"]
    assert "base_model" not in meta  # model=tiny: a random base that exists nowhere else, and the card says so
    assert "random-weight Llama built by llmft" in card
    report = json.loads((tiny_run / "summary.json").read_text())["data"]
    assert sum(report["pii_replacements"].values()) >= 60  # an e-mail address and a phone number per conversation
    replaced = sum(report["pii_replacements"].values())
    assert f"personal data replaced before training: {replaced} (" in card
    assert all(f"{kind}: {n}" in card for kind, n in report["pii_replacements"].items())
    assert f"conversations kept: {report['num_conversations']} of {report['records_read']} records read" in card
    assert f"train: {report['samples']['train']}" in card
    for private in (SECRET_TEXT, "jeanne.martin", "@example.org", "squeue -j", "sk-do-not-publish", str(tiny_run)):
        assert private not in card, private
    config = yaml.safe_load(card.split("```yaml\n", 1)[1].split("```", 1)[0])
    assert config["model"]["name"] == "tiny" and config["peft"]["r"] == 16
    assert config["eval"]["judge_api_key"] == "<redacted>" and "run_dir" not in config
    assert config["data"]["path"] == "<local>/tickets.jsonl"  # paths on the cluster carry login names
    assert 'PeftModel.from_pretrained(base, "my-lab/hpc-support")' in card
    assert "validation loss: " in card and "Not evaluated" in card


def test_push_uploads_the_export_with_its_card_through_hfapi(tiny_run, tmp_path, hub, capsys):
    out = tmp_path / "merged"
    assert export_main([f"run={tiny_run}", f"out={out}", "merge=true", "push=my-lab/hpc-merged",
                        "license=apache-2.0", "private=false"]) == 0
    assert "push: uploaded" in capsys.readouterr().out
    (create, repo_id, create_args), (upload, upload_repo, upload_args) = hub
    assert (create, repo_id, create_args["private"], create_args["exist_ok"]) == \
        ("create_repo", "my-lab/hpc-merged", False, True)
    assert upload == "upload_folder" and upload_repo == "my-lab/hpc-merged"
    assert upload_args["folder_path"] == str(out) and upload_args["ignore_patterns"] == ["llmft_export.json"]
    assert {"README.md", "model.safetensors", "config.json", "tokenizer.json"} <= set(upload_args["files"])
    meta = front_matter((out / "README.md").read_text())
    assert meta["license"] == "apache-2.0" and meta["library_name"] == "transformers"


def test_a_pushed_adapter_names_its_base_by_hub_id(tiny_run, tmp_path, hub):
    out = tmp_path / "adapter"
    assert export_main([f"run={tiny_run}", f"out={out}", "push=my-lab/hpc-adapter",
                        "base_model_id=meta-llama/Llama-3.2-1B-Instruct"]) == 0
    assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] == \
        "meta-llama/Llama-3.2-1B-Instruct"
    card = (out / "README.md").read_text()
    assert front_matter(card)["base_model"] == "meta-llama/Llama-3.2-1B-Instruct"
    assert "[meta-llama/Llama-3.2-1B-Instruct](https://huggingface.co/meta-llama/Llama-3.2-1B-Instruct)" in card
    assert [call[0] for call in hub] == ["create_repo", "upload_folder"] and hub[0][2]["private"] is True


def test_a_pushed_gguf_export_carries_its_modelfile_and_says_how_to_run_it(tiny_run, tmp_path, hub):
    out = tmp_path / "gguf"
    assert export_main([f"run={tiny_run}", f"out={out}", "format=gguf", "gguf.dtype=q8_0", "push=my-lab/hpc-gguf"]) == 0
    assert {"model.gguf", "Modelfile", "README.md"} <= set(hub[1][2]["files"])
    card = (out / "README.md").read_text()
    assert front_matter(card)["library_name"] == "gguf" and "GGUF file (q8_0)" in card
    assert "hf download my-lab/hpc-gguf --local-dir hpc-gguf" in card and "ollama create NAME -f Modelfile" in card


def test_push_again_shares_an_existing_export_private_by_default_with_the_evaluation(tiny_run, tmp_path, offline,
                                                                                      monkeypatch, capsys):
    out = tmp_path / "adapter"
    assert export_main([f"run={tiny_run}", f"out={out}", "push=my-lab/hpc-support"]) == 2  # offline: card only
    eval_dir = tiny_run / "eval"
    eval_dir.mkdir()
    try:  # what llmft.eval writes, cut down: scores per model and samples that quote the data
        (eval_dir / "report.json").write_text(json.dumps({
            "num_samples": 3, "source": {"kind": "held-out split"}, "skipped_metrics": {"judge": "skipped"},
            "metrics": {"base": {"rougeL": 0.1234, "bleu": 1.5}, "finetuned": {"rougeL": 0.4321, "bleu": 12.25}},
            "samples": [{"reference": f"about {SECRET_TEXT}", "finetuned": {"output": "leaked answer"}}]}))
        monkeypatch.delenv("HF_HUB_OFFLINE")
        calls = []
        monkeypatch.setattr(model_card, "offline_reason", lambda timeout_s=0: None)
        monkeypatch.setattr(model_card, "upload", lambda folder, repo, private: calls.append((folder, repo, private))
                            or f"https://huggingface.co/{repo}")
        assert export_main([f"run={tiny_run}", f"out={out}", "push=my-lab/hpc-support"]) == 0
    finally:
        shutil.rmtree(eval_dir)
    assert "already holds an export of this run" in capsys.readouterr().out
    assert calls == [(out, "my-lab/hpc-support", True)]
    card = (out / "README.md").read_text()
    assert "| ROUGE-L (F, 0-1) | 0.123 | 0.432 |" in card and "| BLEU (corpus, 0-100) | 1.50 | 12.25 |" in card
    assert "3 examples (held-out split)" in card
    assert SECRET_TEXT not in card and "leaked answer" not in card


def test_offline_is_detected_without_the_variable_when_the_hub_cannot_be_reached(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # the discard port: nothing listens, nothing leaves
    assert model_card.offline_reason(timeout_s=1) == "127.0.0.1 cannot be reached"
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert model_card.offline_reason() == "HF_HUB_OFFLINE is set"


def test_the_hub_s_refusal_is_one_sentence(tmp_path, monkeypatch):
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    import httpx2 as httpx  # what huggingface_hub 2 speaks HTTP with

    response = httpx.Response(401, request=httpx.Request("POST", "https://huggingface.co/api/repos/create"))

    def refuse(self, repo_id, **kw):
        raise HfHubHTTPError("401 Client Error: Unauthorized for url", response=response)

    monkeypatch.setattr(HfApi, "create_repo", refuse)
    with pytest.raises(model_card.PushError, match=r"^the Hub refused the upload to a/b: 401 Client Error: "
                                                    r"Unauthorized for url \(log in with `hf auth login`"):
        model_card.upload(tmp_path, "a/b", private=True)


@pytest.mark.parametrize("push", ["no-slash", "a/b/c", "/name"])
def test_a_repository_name_that_is_not_org_slash_name_is_refused(tiny_run, push, capsys):
    assert export_main([f"run={tiny_run}", f"push={push}"]) == 2
    assert capsys.readouterr().err.startswith(f"llmft: push={push} must name a Hub repository as ORG/NAME")


def test_the_card_names_a_real_base_model_and_its_license(tmp_path):
    from omegaconf import OmegaConf

    (tmp_path / "README.md").write_text("---\nlicense: llama3.2\nlanguage: [en, fr]\n---\n# Llama\n")
    assert model_card.base_license(tmp_path) == "llama3.2"
    (tmp_path / "README.md").write_text("# no front matter\n")
    assert model_card.base_license(tmp_path) is None

    cfg = OmegaConf.create({"model": {"path": "/gpfsdswork/dataset/HuggingFace_Models/meta-llama/Llama-3.2-1B"}})
    assert model_card.base_model_id(cfg) == "meta-llama/Llama-3.2-1B"
    assert model_card.base_model_id(cfg, "org/other") == "org/other"
    assert model_card.base_model_id(OmegaConf.create({"model": {"path": None}})) is None
