"""Labels sit exactly on the assistant replies and their end-of-turn token, and nothing ships without them."""

from __future__ import annotations

import pytest
from omegaconf import OmegaConf

from llmft.config.data_schema import DataConfig
from llmft.data.prepare.tokenizing import preflight
from llmft.data.prepare.samples_for_run import build_splits
from llmft.data.readers.records import Conversation
from llmft.data.tokenize.templating import IGNORE_INDEX, TemplateError, tokenize_conversation, windows
from llmft.data.tokenize.tokenizer import train_tiny_tokenizer
from support.masks import supervised_runs

# A Llama-3-style template: a header before each turn, <|eot_id|> after it, nothing between turns.
LLAMA3_STYLE = (
    "{{ '<|begin_of_text|>' }}{% for m in messages %}"
    "{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\n\n' + m['content'] + '<|eot_id|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
CONVERSATION = [
    {"role": "user", "content": "My job is pending with reason QOSMaxGRESPerUser. Why?"},
    {"role": "assistant", "content": "You already use the maximum number of GPUs allowed by your QoS."},
    {"role": "user", "content": "Merci ! Et pour le quota de fichiers ?"},
    {"role": "assistant", "content": "Utilisez `idr_quota_user` pour voir vos inodes."},
]


@pytest.fixture(scope="module")
def tokenizer():
    texts = [m["content"] for m in CONVERSATION] * 20 + ["system user assistant header eot"]
    return train_tiny_tokenizer(texts, vocab_size=400)


def test_chatml_supervises_each_reply_and_its_end_token_and_nothing_else(tokenizer):
    sample = tokenize_conversation(tokenizer, CONVERSATION, system_prompt="You are the HPC support assistant.")
    replies = [m["content"] + "<|im_end|>" for m in CONVERSATION if m["role"] == "assistant"]
    assert supervised_runs(tokenizer, sample) == replies
    # what is not supervised is the rest of the rendering: system prompt, user turns, headers, the newline after
    # <|im_end|> (ChatML puts it between turns, the model never generates it)
    full = tokenizer.apply_chat_template(
        [{"role": "system", "content": "You are the HPC support assistant."}] + CONVERSATION, tokenize=False)
    assert tokenizer.decode(sample.input_ids, skip_special_tokens=False) == full
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    supervised_ends = [i for i, label in enumerate(sample.labels) if label == end]
    assert len(supervised_ends) == 2 and all(sample.input_ids[i + 1] != end for i in supervised_ends[:-1])


def test_llama3_style_template_supervises_reply_and_eot(tokenizer):
    tokenizer = train_tiny_tokenizer([m["content"] for m in CONVERSATION] * 20, vocab_size=400)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]})
    tokenizer.chat_template = LLAMA3_STYLE
    sample = tokenize_conversation(tokenizer, CONVERSATION, end_of_turn="<|eot_id|>")
    assert supervised_runs(tokenizer, sample) == [m["content"] + "<|eot_id|>" for m in CONVERSATION
                                                   if m["role"] == "assistant"]


def test_preflight_fails_loudly_when_the_end_of_turn_is_never_supervised(tokenizer):
    sample = tokenize_conversation(tokenizer, CONVERSATION)
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    broken = type(sample)(sample.input_ids, [IGNORE_INDEX if l == end else l for l in sample.labels])
    with pytest.raises(TemplateError, match="never supervised"):
        preflight({"train": [broken]}, "<|im_end|>", end)
    nothing = type(sample)(sample.input_ids, [IGNORE_INDEX] * len(sample.labels))
    with pytest.raises(TemplateError, match="no sample has a supervised token"):
        preflight({"train": [nothing]}, "<|im_end|>", end)


def test_a_template_whose_end_token_is_not_the_configured_one_stops_before_training(tokenizer):
    cfg = OmegaConf.merge(OmegaConf.structured(DataConfig), {"name": "t", "path": "x", "end_of_turn_token": "<|pad|>"})
    with pytest.raises(TemplateError, match="never supervised"):
        build_splits([Conversation("a", CONVERSATION, "f:1")] * 3, tokenizer, cfg, 512)
    cfg.end_of_turn_token = "not-a-token"
    with pytest.raises(TemplateError, match="not a single token"):
        build_splits([Conversation("a", CONVERSATION, "f:1")], tokenizer, cfg, 512)


def test_long_conversations_become_windows_of_whole_exchanges_each_with_supervision(tokenizer):
    long = CONVERSATION * 6
    full = tokenize_conversation(tokenizer, long)
    max_len = len(full.input_ids) // 3
    samples, dropped = windows(tokenizer, long, max_len, "Be brief.", None)
    assert dropped == 0 and len(samples) >= 3
    for sample in samples:
        assert len(sample.input_ids) <= max_len
        runs = supervised_runs(tokenizer, sample)
        assert runs and all(run.endswith("<|im_end|>") for run in runs)
        assert tokenizer.decode(sample.input_ids, skip_special_tokens=False).startswith("<|im_start|>system\nBe brief.")
    # every reply of the conversation is supervised in exactly one window
    all_runs = [run for sample in samples for run in supervised_runs(tokenizer, sample)]
    assert all_runs == [m["content"] + "<|im_end|>" for m in long if m["role"] == "assistant"]


def test_an_exchange_longer_than_the_limit_is_dropped_and_counted_never_cut(tokenizer):
    huge = [{"role": "user", "content": "log line " * 400}, {"role": "assistant", "content": "Your job ran out of memory."}]
    samples, dropped = windows(tokenizer, huge + CONVERSATION, 120, None, None)
    assert dropped == 1
    assert all(s.num_supervised > 0 and len(s.input_ids) <= 120 for s in samples)


MISTRAL_STYLE = (  # bos_token, raise_exception and loop variables, as the stock Mistral template uses them
    "{{ bos_token }}{% for message in messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% else %}{{ message['content'] + eos_token }}{% endif %}{% endfor %}"
)


@pytest.mark.parametrize("template", ["chatml", "fallback", "llama3", "mistral"])
def test_the_direct_renderer_and_token_ids_give_what_the_transformers_wrappers_give(tokenizer, template):
    """ChatRenderer renders transformers' compiled template directly and token_ids reads the Rust tokenizer: both
    must give what apply_chat_template and tokenizer(...) give, for every prefix the masks are built from."""
    from copy import deepcopy

    from llmft.data.tokenize.templating import ChatRenderer, token_ids
    from llmft.data.tokenize.tokenizer import FALLBACK_TEMPLATE

    tok = deepcopy(tokenizer)
    tok.chat_template = {"chatml": tok.chat_template, "fallback": FALLBACK_TEMPLATE, "llama3": LLAMA3_STYLE,
                         "mistral": MISTRAL_STYLE}[template]
    render = ChatRenderer(tok)
    for end in range(1, len(CONVERSATION) + 1):
        for generation_prompt in (True, False):
            expected = tok.apply_chat_template(CONVERSATION[:end], tokenize=False,
                                               add_generation_prompt=generation_prompt)
            assert render(CONVERSATION[:end], generation_prompt) == expected
    assert render.compiled is not None  # the direct path stayed on
    texts = [m["content"] for m in CONVERSATION] + ["<|im_start|>user\nQuota ?<|im_end|>\n", ""]
    assert token_ids(tok, texts) == tok(texts, add_special_tokens=False)["input_ids"]


def test_a_direct_render_that_differs_from_the_wrapper_falls_back_to_it(tokenizer):
    """(another transformers release rendering otherwise: the first conversation is checked, then the wrapper is used)"""
    from types import SimpleNamespace

    from llmft.data.tokenize.templating import ChatRenderer, token_ids

    render = ChatRenderer(tokenizer)
    render.compiled = SimpleNamespace(render=lambda **_: "something else")  # (transformers' own stays untouched)
    expected = tokenizer.apply_chat_template(CONVERSATION, tokenize=False)
    assert render(CONVERSATION, False) == expected and render.compiled is None
    assert render(CONVERSATION[:2], True) == tokenizer.apply_chat_template(CONVERSATION[:2], tokenize=False,
                                                                            add_generation_prompt=True)
    # a tokenizer left truncating by an earlier call: token_ids goes through tokenizer(...), which resets it
    tokenizer._tokenizer.enable_truncation(max_length=3)
    try:
        assert token_ids(tokenizer, [CONVERSATION[0]["content"]]) == \
            [tokenizer(CONVERSATION[0]["content"], add_special_tokens=False)["input_ids"]]
    finally:
        tokenizer._tokenizer.no_truncation()
