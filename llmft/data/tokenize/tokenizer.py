"""The run's tokenizer: loaded from the model folder, or trained on the data for `model=tiny`.

Whatever its origin, the tokenizer leaves this module with a chat template, an end-of-turn token as `eos_token`
and a pad token. Labels come from the chat template and padding is masked by position, never by token id, so
even pad == eos cannot mask the end of an assistant turn (how the anchors' models never learn to stop). It is saved with the run and with the final adapter, so inference uses the exact template training used.
"""

from __future__ import annotations

from typing import Iterable

from llmft.data.preferences.dpo_kto import training_texts

# ChatML, the fallback for the tiny model and for base models whose tokenizer has no template. The
# `{% generation %}` markers let transformers return assistant masks; llmft computes masks itself (templating.py)
# but keeps them so stock tools (TRL's assistant_only_loss) read the template the same way.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['role'] == 'assistant' %}{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}"
    "{% else %}{{ message['content'] + '<|im_end|>' }}{% endif %}"
    "{{ '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# For a base tokenizer that lacks ChatML's special tokens: the same layout, closed by the tokenizer's own eos token.
FALLBACK_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '### ' + message['role'] + '\n' }}"
    "{% if message['role'] == 'assistant' %}{% generation %}{{ message['content'] + eos_token }}{% endgeneration %}"
    "{% else %}{{ message['content'] }}{% endif %}"
    "{{ '\n\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '### assistant\n' }}{% endif %}"
)

TINY_SPECIAL_TOKENS = ["<|pad|>", "<|begin_of_text|>", "<|im_start|>", "<|im_end|>"]


def train_tiny_tokenizer(texts: Iterable[str], vocab_size: int):
    """A byte-level BPE trained on the run's own texts (no hub, no download), with ChatML special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=TINY_SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(texts, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        bos_token="<|begin_of_text|>",
        eos_token="<|im_end|>",
        pad_token="<|pad|>",
    )
    tokenizer.chat_template = CHATML_TEMPLATE
    return tokenizer


def load_tokenizer(model_path: str, fallback_chat_template: str | None):
    """The tokenizer of a local Hugging Face model folder, made ready for chat fine-tuning."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_path, local_files_only=True)
    if not tokenizer.chat_template:
        # A base model: train with a known template and save it with the adapter.
        tokenizer.chat_template = fallback_chat_template or FALLBACK_TEMPLATE
    if tokenizer.eos_token is None:
        raise ValueError(f"the tokenizer in {model_path} has no eos_token; llmft needs one to end assistant turns")
    if tokenizer.pad_token is None:
        # Adding a token would resize the embeddings and make the adapter unusable on the stock base model;
        # padding is masked by position, so any existing token will do.
        tokenizer.pad_token = tokenizer.unk_token or tokenizer.eos_token
    return tokenizer


def tokenizer_for_run(cfg, conversations):
    """The run's tokenizer: the model's, or for model=tiny a BPE trained on these conversations' texts (preference
    records: their prompts and every completion, rejected ones included), or the one data.prepared=DIR was made with."""
    if cfg.model.path is None and cfg.data.prepared:  # (build_splits checks it is the one DIR's samples were made with)
        from pathlib import Path

        from llmft.data.prepare.prepared_source import prepared_dir_of

        return load_tokenizer(str(Path(prepared_dir_of(cfg.data)) / "tokenizer"), None)
    if cfg.model.path is None:
        return train_tiny_tokenizer(training_texts(conversations), cfg.model.tiny.vocab_size)
    return load_tokenizer(cfg.model.path, cfg.model.fallback_chat_template)
