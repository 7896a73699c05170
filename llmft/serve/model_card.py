"""Share an export on the Hugging Face Hub: its model card, and the upload (or, offline, the command for later).

    card = model_card(run_dir, cfg, record, license="apache-2.0", base_model_id=None)
    offline_reason()                 -> None online, else why not (HF_HUB_OFFLINE, no route to the Hub)
    upload(folder, "org/name", private=True)

The card (README.md, YAML front matter with `license`) says what the model is and how it was made from what the run
directory records: the base model, a summary of the data in counts only (conversations, samples, tokens, what was
dropped, how many personal data were replaced; never a text of a conversation), the training config (secrets
redacted), the training and validation losses, and the evaluation metrics of `python -m llmft.eval` when it ran.
Uploading uses huggingface_hub's HfApi; a compute node without network is told so in one sentence, with the command
to run from a login node.
"""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path
from urllib.parse import urlparse

import yaml

from llmft import __version__
from llmft.config.compose import to_container
from llmft.config.redact import redact_config
from llmft.config.schema import PeftMethod
from llmft.errors import UserError
from llmft.rundir.files import read_config, read_provenance, read_summary
from llmft.data.prepare.data_config import prepared_report_path
from llmft.rundir.layout import eval_report_path

NOT_UPLOADED = ["llmft_export.json"]  # local paths of this machine: kept beside the export, not shared
HUB_TIMEOUT_S = 3.0


class PushError(UserError):
    """The export cannot be uploaded from here (offline, not logged in, repository refused): one sentence."""


# ------------------------------------------------------------------------------------------------ what the card says


def base_model_id(cfg, override: str | None = None) -> str | None:
    """The base model's Hub id for the card: `override`, else the last two parts of model.path when they read like
    `org/name` (how Hugging Face folders are laid out on shared storage: .../meta-llama/Llama-3.2-1B-Instruct);
    None for model=tiny, whose random base exists nowhere else."""
    if override:
        return override
    if not cfg.model.path:
        return None
    parts = Path(os.path.expandvars(str(cfg.model.path))).parts
    return "/".join(parts[-2:]) if len(parts) >= 2 else None


def base_license(base_dir: Path | None) -> str | None:
    """The `license` of the base model's own card (README.md front matter in its folder), if it has one."""
    card = base_dir / "README.md" if base_dir else None
    if card is None or not card.is_file():
        return None
    text = card.read_text(errors="replace")
    if not text.startswith("---"):
        return None
    try:
        front = yaml.safe_load(text.split("---", 2)[1]) or {}
    except yaml.YAMLError:
        return None
    license_ = front.get("license") if isinstance(front, dict) else None
    return str(license_) if license_ else None


def data_summary(run_dir: Path, cfg) -> dict:
    """The prepare report of the run's data (data.output_dir/report.json, else the copy in summary.json), reduced to
    counts: nothing here quotes a conversation."""
    report = None
    output_dir = cfg.data.output_dir
    if output_dir:
        path = prepared_report_path(output_dir)
        if path.is_file():
            report = json.loads(path.read_text())
    if report is None:
        report = read_summary(run_dir).get("data")
    if not report:
        return {}
    source = report.get("path")
    summary = {
        "format": report.get("format"),
        "source_file": Path(str(source)).name if source else None,
        "records_read": report.get("records_read"),
        "records_skipped": report.get("num_skipped"),
        "conversations": report.get("num_conversations"),
        "dropped": report.get("dropped") or {},
        "samples_dropped": report.get("samples_dropped") or {},
        "pii_replacements": report.get("pii_replacements") or {},
        "samples": report.get("samples") or {},
        "tokens": report.get("tokens") or {},
        "supervised_tokens": report.get("supervised_tokens") or {},
        "sources": [{k: s.get(k) for k in ("name", "weight", "samples", "share")} for s in report.get("sources") or []],
    }
    kept = {k: v for k, v in summary.items() if v not in (None, [], {})}
    kept["pii_replacements"] = summary["pii_replacements"]  # zero replacements is worth saying too
    return kept


def eval_summary(run_dir: Path) -> dict | None:
    """The metric rows of RUN_DIR/eval/report.json (scores only: its samples quote the data and stay here)."""
    path = eval_report_path(run_dir)
    if not path.is_file():
        return None
    from llmft.serve.evaluation import metric_rows

    report = json.loads(path.read_text())
    source = report.get("source", {})
    return {"num_samples": report.get("num_samples"), "models": list(report.get("metrics", {})),
            "where": source.get("kind", "held-out split"), "rows": metric_rows(report)}


def _counts(values: dict) -> str:
    return ", ".join(f"{key}: {value}" for key, value in values.items()) or "none"


def without_local_paths(value):
    """Absolute paths of this cluster (home folders carry login names) cut to their last part."""
    if isinstance(value, dict):
        return {k: without_local_paths(v) for k, v in value.items()}
    if isinstance(value, list):
        return [without_local_paths(v) for v in value]
    if isinstance(value, str) and value.startswith(("/", "~")) and "\n" not in value:
        return f"<local>/{Path(value).name}"
    return value


def model_card(run_dir: Path, cfg, record: dict, license: str, base_id: str | None, repo_id: str = "REPO") -> str:
    """The README.md of an export: front matter (license, base model, library, tags) and the sections."""
    from huggingface_hub import ModelCardData

    kind = record["kind"]
    library = {"adapter": "peft", "gguf": "gguf"}.get(kind, "transformers")
    tags = ["llmft", "text-generation"] + (["lora"] if cfg.peft.method is not PeftMethod.full else []) + \
        (["gguf", "llama.cpp"] if kind == "gguf" else [])
    front = ModelCardData(license=license, base_model=base_id, library_name=library, tags=tags,
                          pipeline_tag="text-generation")
    summary = read_summary(run_dir)
    provenance = read_provenance(run_dir)
    data = data_summary(run_dir, cfg)
    what = {"adapter": f"a LoRA adapter (r={record.get('r')}, alpha={record.get('lora_alpha')}) for",
            "merged": "the merge of a LoRA adapter into", "full": "a full fine-tune of",
            "gguf": f"a GGUF file ({record.get('gguf_dtype')}) for llama.cpp and Ollama, merged from a fine-tune of"}
    base_text = f"[{base_id}](https://huggingface.co/{base_id})" if base_id else \
        "a small random-weight Llama built by llmft (model=tiny), for testing only"
    lines = [f"---\n{front.to_yaml()}\n---", "", f"# {cfg.model.name} fine-tuned with llmft", "",
             f"This is {what.get(kind, kind)} {base_text}, trained with "
             f"llmft {provenance.get('llmft_version', __version__)}"
             f"{' (commit ' + provenance['git_commit'][:12] + ')' if provenance.get('git_commit') else ''}.", ""]
    lines += ["## Training data", ""]
    if data:
        pii = data.get("pii_replacements") or {}
        lines += [f"- format: {data.get('format', 'unknown')}"
                  f"{', file ' + data['source_file'] if data.get('source_file') else ''}",
                  f"- conversations kept: {data.get('conversations', '?')} of {data.get('records_read', '?')} records "
                  f"read; dropped: {_counts(data.get('dropped', {}))}",
                  f"- personal data replaced before training: {sum(pii.values())} ({_counts(pii)})",
                  f"- samples: {_counts(data.get('samples', {}))}; tokens: {_counts(data.get('tokens', {}))}; "
                  f"supervised (assistant) tokens: {_counts(data.get('supervised_tokens', {}))}"]
        if data.get("samples_dropped"):
            lines.append(f"- samples dropped: {_counts(data['samples_dropped'])}")
        for source in data.get("sources", []):
            lines.append(f"- source {source['name']}: weight {source['weight']}, {source['samples']} training samples "
                         f"(share {source['share']})")
        lines += ["", "Counts only: the conversations themselves are not published with the model.", ""]
    else:
        lines += ["The run directory records no data report.", ""]
    lines += ["## Training", ""]
    if summary:
        lines += [f"- steps: {summary.get('steps')} of {summary.get('total_steps')}, on {summary.get('world_size', 1)} "
                  f"rank(s)",
                  f"- training loss: {_number(summary.get('first_loss'))} -> {_number(summary.get('final_loss'))}; "
                  f"validation loss: {_number(summary.get('final_val_loss'))}",
                  f"- trainable parameters: {summary.get('num_trainable_parameters')} of "
                  f"{summary.get('num_parameters')}", ""]
    # the config as the run saved it (already redacted when written; redacted again in case it was edited)
    config = without_local_paths(redact_config(to_container(read_config(run_dir))))
    for private in ("run_dir", "runs_root"):  # where the run lived on this cluster: no business of the readers
        config.pop(private, None)
    lines += ["<details><summary>Training configuration (secrets redacted)</summary>", "", "```yaml",
              yaml.safe_dump(config, sort_keys=False, allow_unicode=True).rstrip(), "```", "", "</details>", ""]
    evaluation = eval_summary(run_dir)
    lines += ["## Evaluation", ""]
    if evaluation:
        titles = {"base": "base", "finetuned": "fine-tuned"}
        lines += [f"{evaluation['num_samples']} examples ({evaluation['where']}), scored by `python -m llmft.eval`:",
                  "", "| metric | " + " | ".join(titles.get(m, m) for m in evaluation["models"]) + " |",
                  "|---|" + "---|" * len(evaluation["models"])]
        lines += [f"| {name} | " + " | ".join(values) + " |" for name, values in evaluation["rows"]]
        lines.append("")
    else:
        lines += ["Not evaluated (`python -m llmft.eval run=RUN_DIR` writes the scores this section shows).", ""]
    lines += ["## Use", "", usage_text(kind, base_id, repo_id), ""]
    return "\n".join(lines)


def _number(value) -> str:
    return "-" if value is None else f"{value:.4f}"


def usage_text(kind: str, base_id: str | None, repo_id: str) -> str:
    """How to load what the repository holds, in a few lines."""
    folder = repo_id.split("/")[-1]
    if kind == "adapter":
        code = ["from peft import PeftModel", "from transformers import AutoModelForCausalLM, AutoTokenizer", "",
                f'base = AutoModelForCausalLM.from_pretrained("{base_id or "BASE_MODEL"}")',
                f'model = PeftModel.from_pretrained(base, "{repo_id}")',
                f'tokenizer = AutoTokenizer.from_pretrained("{repo_id}")  # with the chat template of training']
        return "```python\n" + "\n".join(code) + "\n```"
    if kind == "gguf":
        code = [f"hf download {repo_id} --local-dir {folder} && cd {folder}",
                "ollama create NAME -f Modelfile && ollama run NAME   # Ollama",
                "llama-cli -m model.gguf -cnv   # llama.cpp"]
        return "```sh\n" + "\n".join(code) + "\n```"
    code = ["from transformers import AutoModelForCausalLM, AutoTokenizer", "",
            f'model = AutoModelForCausalLM.from_pretrained("{repo_id}")',
            f'tokenizer = AutoTokenizer.from_pretrained("{repo_id}")']
    return "```python\n" + "\n".join(code) + "\n```"


def write_model_card(folder: Path, text: str) -> Path:
    path = folder / "README.md"  # replaces PEFT's empty template card copied from final/
    path.write_text(text)
    return path


# ------------------------------------------------------------------------------------------------ the upload


def hub_endpoint() -> str:
    return os.environ.get("HF_ENDPOINT") or "https://huggingface.co"


def offline_reason(timeout_s: float = HUB_TIMEOUT_S) -> str | None:
    """None when the Hub can be reached from here; else why not, in a few words."""
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on"):
        return "HF_HUB_OFFLINE is set"
    url = urlparse(hub_endpoint())
    host, port = url.hostname or "huggingface.co", url.port or (443 if url.scheme != "http" else 80)
    try:
        socket.create_connection((host, port), timeout=timeout_s).close()
    except OSError:
        return f"{host} cannot be reached"
    return None


def login_node_command(repo_id: str, folder: Path, private: bool) -> str:
    excludes = " ".join(f"--exclude {name}" for name in NOT_UPLOADED)
    return f"hf upload {repo_id} {folder} . {excludes} {'--private' if private else '--no-private'}"


def upload(folder: Path, repo_id: str, private: bool) -> str:
    """Create the repository (private unless asked otherwise) if needed and upload the folder; returns its URL."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    api = HfApi()
    try:
        api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
        commit = api.upload_folder(repo_id=repo_id, repo_type="model", folder_path=str(folder),
                                   ignore_patterns=NOT_UPLOADED, commit_message=f"Upload {folder.name} from llmft")
    except HfHubHTTPError as error:
        status = getattr(error.response, "status_code", None)
        hint = " (log in with `hf auth login` or set HF_TOKEN)" if status in (401, 403) else ""
        raise PushError(f"the Hub refused the upload to {repo_id}: {str(error).splitlines()[0]}{hint}.") from None
    return getattr(commit, "repo_url", None) or f"{hub_endpoint()}/{repo_id}"
