"""`llmft eval`'s answers come from batches (left padding, a KV cache): greedy, each answer must be the one the model
gives to its prompt alone. Checked against stock `model.generate` on one unpadded prompt at a time, on a tiny
random-weight Llama (with and without a LoRA adapter, prompts of many lengths, rows that stop early and rows cut at
max_new_tokens) and on the real SmolLM2-135M-Instruct (a few prompts, a few tokens)."""

from __future__ import annotations

import pytest
import torch

from llmft.serve.inference import Generation, generate
from support.models_get import converted  # noqa: F401  (the session's folder)

PHRASES = ["my job stays pending", "the quota of my project is full", "how do I load the CUDA module",
           "srun: error: node r12i4n3: task 7: Out Of Memory", "bonjour, mon compte est bloqué depuis hier",
           "which partition for a short test", "ssh key refused on the login node", "python cannot find torch"]


def prompts_of_many_lengths() -> list[str]:
    """Prompts from a few tokens to a hundred, out of length order: each batch needs padding."""
    return [" ".join(PHRASES[(i + k) % len(PHRASES)] for k in range(1 + (i * 5) % 9)) for i in range(11)]


@pytest.fixture(scope="module")
def tiny_model_and_tokenizer():
    from transformers import LlamaConfig, LlamaForCausalLM

    from llmft.data.tokenize.tokenizer import train_tiny_tokenizer

    tokenizer = train_tiny_tokenizer(PHRASES * 4, 400)
    torch.manual_seed(0)
    # initializer_range 0.2 (HF's default is 0.02): logits far apart, so an answer is a property of the model, not of
    # rounding; the attention is sdpa, as the real runs'
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, initializer_range=0.2,
                         pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    model = LlamaForCausalLM(config).eval()
    return model, tokenizer


def one_at_a_time(model, tokenizer, prompts: list[str], stop_ids: list[int], max_new_tokens: int) -> list[list[int]]:
    """Stock transformers: each prompt alone, no padding, greedy; its new tokens up to its first stop token."""
    answers = []
    for prompt in prompts:
        ids = tokenizer(prompt, add_special_tokens=False, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            tokens = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                                    do_sample=False, eos_token_id=stop_ids, pad_token_id=tokenizer.pad_token_id,
                                    top_k=None, top_p=None, temperature=None)[0, ids.shape[1]:].tolist()
        end = next((k + 1 for k, t in enumerate(tokens) if t in stop_ids), len(tokens))
        answers.append(tokens[:end])
    return answers


def as_generations(tokenizer, answers: list[list[int]], stop_ids: list[int]) -> list[Generation]:
    return [Generation(tokenizer.decode(tokens, skip_special_tokens=True).strip(), len(tokens),
                       bool(tokens) and tokens[-1] in stop_ids) for tokens in answers]


def stop_tokens_reached_midway(answers: list[list[int]]) -> list[int]:
    """A token that ends some answers early and not others (the tiny tokenizer's eos never comes from random
    weights): the rows of a batch then stop at different steps."""
    counts: dict[int, int] = {}
    for tokens in answers:
        for token in set(tokens[2:-2]):
            counts[token] = counts.get(token, 0) + 1
    return [min(counts, key=lambda t: (abs(counts[t] - len(answers) / 2), t))]


@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_batched_greedy_answers_are_those_of_each_prompt_alone(tiny_model_and_tokenizer, padding_side):
    """Batches of 4 (last one of 3) and a batch of all 11: the same tokens, texts, counts and stop flags as stock
    generate on each prompt alone, whichever side the tokenizer pads by default (generate pads on the left)."""
    model, tokenizer = tiny_model_and_tokenizer
    tokenizer.padding_side = padding_side
    prompts = prompts_of_many_lengths()
    lengths = {len(tokenizer(p, add_special_tokens=False)["input_ids"]) for p in prompts}
    assert len(lengths) >= 8 and max(lengths) > 4 * min(lengths)
    max_new_tokens = 20
    stop_ids = stop_tokens_reached_midway(one_at_a_time(model, tokenizer, prompts, [], max_new_tokens))
    alone = as_generations(tokenizer, one_at_a_time(model, tokenizer, prompts, stop_ids, max_new_tokens), stop_ids)
    assert 0 < sum(g.stopped for g in alone) < len(alone)  # rows that stop early and rows cut at max_new_tokens
    for batch_size in (4, len(prompts)):
        assert generate(model, tokenizer, prompts, stop_ids, max_new_tokens, batch_size) == alone, batch_size


def test_batched_answers_with_an_adapter_on_and_off(tiny_model_and_tokenizer):
    """A LoRA on every projection (B not zero, so it changes the answers): batched answers with the adapter on, and
    off under `disable_adapter()` (evaluation's base model), equal each prompt's answer alone."""
    from peft import LoraConfig, get_peft_model

    base, tokenizer = tiny_model_and_tokenizer
    tokenizer.padding_side = "left"
    torch.manual_seed(1)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj"],
                                            init_lora_weights=False)).eval()
    try:
        prompts, stop_ids = prompts_of_many_lengths(), [tokenizer.eos_token_id]
        tuned_alone = one_at_a_time(model, tokenizer, prompts, stop_ids, 16)
        with model.disable_adapter():
            base_alone = one_at_a_time(model, tokenizer, prompts, stop_ids, 16)
            assert generate(model, tokenizer, prompts, stop_ids, 16, 4) == as_generations(tokenizer, base_alone,
                                                                                        stop_ids)
        assert tuned_alone != base_alone
        assert generate(model, tokenizer, prompts, stop_ids, 16, 4) == as_generations(tokenizer, tuned_alone,
                                                                                    stop_ids)
    finally:
        model.unload()  # the module fixture's model without its LoRA layers again


@pytest.mark.slow
def test_batched_answers_on_the_real_model(converted):  # noqa: F811
    """SmolLM2-135M-Instruct (the session's `models get` folder), five chat prompts of different lengths, 12 new
    tokens: the batch's answers are each prompt's alone."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = converted[0]
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    questions = ["Hi", "What does SLURM stand for?", "My job has been pending for two days on the gpu partition, "
                 "squeue says (Priority). What can I do to make it start sooner?", "Bonjour, c'est quoi un inode ?",
                 "Explain in one sentence what a GPU is."]
    prompts = [tokenizer.apply_chat_template([{"role": "user", "content": q}], tokenize=False,
                                             add_generation_prompt=True) for q in questions]
    stop_ids = [tokenizer.convert_tokens_to_ids("<|im_end|>")]
    alone = as_generations(tokenizer, one_at_a_time(model, tokenizer, prompts, stop_ids, 12), stop_ids)
    assert generate(model, tokenizer, prompts, stop_ids, 12, len(prompts)) == alone
