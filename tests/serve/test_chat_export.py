"""Chat with a tiny run (one-shot and a conversation) and export it: the adapter alone for stock PEFT and vLLM, or
merged into one model that stock transformers loads and that gives base + adapter's logits."""

from __future__ import annotations

import io
import json
import shutil

import pytest
import torch

from llmft.config.compose import compose
from llmft.rundir import create as rundir
from llmft.serve.chat import Chat, ChatArgs, converse
from llmft.serve.export import main as export_main
from llmft.serve.export import vllm_adapter_problems
from llmft.training.loop import train
from support.runs import run_llmft

QUESTION = "My job is pending, why?"


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    cfg = compose(["train.max_steps=10", "train.eval_every=10", "train.save_every=0",
                   f"run_dir={tmp_path_factory.mktemp('chat') / 'run'}"])
    run_dir = rundir.create(cfg)
    train(cfg, run_dir)
    return run_dir


def stock_model(run_dir, adapter_dir=None):
    """Base + adapter through stock transformers and PEFT only."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(run_dir / "base_model")
    return PeftModel.from_pretrained(base, adapter_dir or run_dir / "final").eval()


def stock_answer(run_dir, messages, max_new_tokens: int) -> str:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(run_dir / "final")
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        out = stock_model(run_dir).generate(input_ids=ids, max_new_tokens=max_new_tokens, do_sample=False,
                                            eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()


def probe_ids(run_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(run_dir / "final")
    text = tokenizer.apply_chat_template([{"role": "user", "content": "Quota exceeded on $WORK, what now?"}],
                                         tokenize=False, add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]


@pytest.mark.slow
def test_one_shot_chat_prints_the_greedy_answer(tiny_run):
    result = run_llmft("chat", f"run={tiny_run}", f"prompt={QUESTION}", "max_new_tokens=10", timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip() == stock_answer(tiny_run, [{"role": "user", "content": QUESTION}], 10)
    assert result.stdout.strip()


def test_a_conversation_streams_and_keeps_its_history(tiny_run):
    chat = Chat(tiny_run, ChatArgs(max_new_tokens=6))
    streamed = io.StringIO()
    reply = chat.answer([{"role": "user", "content": QUESTION}], streamed)
    assert streamed.getvalue().strip() == reply == stock_answer(tiny_run, [{"role": "user", "content": QUESTION}], 6)

    lines = iter(["hello", "and then?", "/reset", "and then?", "/exit", "never read"])
    out = io.StringIO()
    converse(chat, read=lambda prompt: next(lines), out=out)
    answers = [line.removeprefix("assistant> ") for line in out.getvalue().splitlines()
               if line.startswith("assistant> ")]
    assert len(answers) == 3 and "(conversation forgotten)" in out.getvalue()
    first = stock_answer(tiny_run, [{"role": "user", "content": "hello"}], 6)
    assert answers[0].strip() == first
    assert answers[1].strip() == stock_answer(tiny_run, [{"role": "user", "content": "hello"},
                                                         {"role": "assistant", "content": first},
                                                         {"role": "user", "content": "and then?"}], 6)
    assert answers[2].strip() == stock_answer(tiny_run, [{"role": "user", "content": "and then?"}], 6)


def test_chat_with_the_adapter_disabled_is_the_base_model(tiny_run):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_run / "final")
    text = tokenizer.apply_chat_template([{"role": "user", "content": QUESTION}], tokenize=False,
                                         add_generation_prompt=True)
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
    base = AutoModelForCausalLM.from_pretrained(tiny_run / "base_model").eval()
    with torch.no_grad():
        out = base.generate(ids, max_new_tokens=6, do_sample=False, eos_token_id=tokenizer.eos_token_id,
                            pad_token_id=tokenizer.pad_token_id)
    expected = tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()
    reply = Chat(tiny_run, ChatArgs(max_new_tokens=6, adapter=False)).answer([{"role": "user", "content": QUESTION}],
                                                                            io.StringIO())
    assert reply == expected != stock_answer(tiny_run, [{"role": "user", "content": QUESTION}], 6)


@pytest.mark.slow
def test_merged_export_loads_with_stock_transformers_and_matches_base_plus_adapter(tiny_run, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "merged"
    result = run_llmft("export", f"run={tiny_run}", f"out={out}", "merge=true", timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"-> {out}" in result.stdout and "checked: reloaded with AutoModelForCausalLM.from_pretrained" in \
        result.stdout
    assert (out / "model.safetensors").is_file() and not list(out.glob("adapter_*"))
    merged = AutoModelForCausalLM.from_pretrained(out).eval()
    ids = probe_ids(tiny_run)
    with torch.no_grad():
        expected = stock_model(tiny_run)(input_ids=ids).logits
        got = merged(input_ids=ids).logits
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-4)
    assert float((got - expected).abs().max()) < 1e-3 * float(expected.abs().max())
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert tokenizer.chat_template == AutoTokenizer.from_pretrained(tiny_run / "final").chat_template
    assert tokenizer.eos_token_id in merged.generation_config.eos_token_id
    record = json.loads((out / "llmft_export.json").read_text())
    assert record["kind"] == "merged" and record["check"]["max_abs_logit_diff"] <= record["check"]["tolerance"]
    assert record["check"]["adapter_effect_max_abs_logit_diff"] > 100 * record["check"]["max_abs_logit_diff"]


def test_adapter_export_loads_with_stock_peft_and_suits_vllm(tiny_run, tmp_path, capsys):
    out = tmp_path / "adapter"
    assert export_main([f"run={tiny_run}", f"out={out}"]) == 0
    assert "vllm serve" in capsys.readouterr().out
    for name in ("adapter_model.safetensors", "adapter_config.json", "tokenizer.json", "llmft_export.json"):
        assert (out / name).is_file(), name
    assert vllm_adapter_problems(out) == []
    ids = probe_ids(tiny_run)
    with torch.no_grad():
        expected = stock_model(tiny_run)(input_ids=ids).logits
        got = stock_model(tiny_run, out)(input_ids=ids).logits
    torch.testing.assert_close(got, expected, rtol=0, atol=0)

    doctored = tmp_path / "doctored"
    shutil.copytree(out, doctored)
    config = json.loads((doctored / "adapter_config.json").read_text())
    config.update(modules_to_save=["lm_head"], use_dora=True, target_modules=["q_proj"])
    (doctored / "adapter_config.json").write_text(json.dumps(config))
    problems = vllm_adapter_problems(doctored)
    assert any("modules_to_save" in p for p in problems) and any("DoRA" in p for p in problems)
    assert any("k_proj, not a target module" in p for p in problems)


@pytest.mark.parametrize("arguments, message", [
    ([], "llmft: say which run:"),
    (["run=/no/such/run", "out=x"], "llmft: run=/no/such/run: no such directory."),
    (["run=.", "merge=perhaps"], "llmft: bad argument merge: Value 'perhaps' is not a valid bool"),
    (["run=.", "outt=x"], "llmft: bad argument outt: Key 'outt' not in 'ExportArgs'"),
])
def test_export_mistakes_are_one_line(arguments, message, capsys):
    assert export_main(arguments) == 2
    err = capsys.readouterr().err
    assert err.startswith(message) and len(err.strip().splitlines()) == 1, err


def test_export_refuses_a_folder_that_is_not_empty_and_a_run_without_final(tiny_run, tmp_path, capsys):
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "keep.txt").write_text("mine")
    assert export_main([f"run={tiny_run}", f"out={tmp_path / 'busy'}"]) == 2
    assert "exists and is not empty" in capsys.readouterr().err
    assert (tmp_path / "busy" / "keep.txt").read_text() == "mine"
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    shutil.copy(tiny_run / "config.yaml", unfinished)
    assert export_main([f"run={unfinished}", f"out={tmp_path / 'x'}"]) == 2
    assert "has no final model" in capsys.readouterr().err


def test_chat_mistakes_are_one_line():
    result = run_llmft("chat", "run=/no/such/run", "prompt=hi", timeout=60)
    assert result.returncode == 2 and result.stderr.strip() == "llmft: run=/no/such/run: no such directory."


def test_the_llmft_command_lists_eval_chat_and_export():
    from llmft.cli import available

    assert {"eval", "chat", "export"} <= set(available())


def test_a_bfloat16_merge_is_checked_within_its_precision(tiny_run, tmp_path):
    out = tmp_path / "merged-bf16"
    assert export_main([f"run={tiny_run}", f"out={out}", "merge=true", "dtype=bfloat16"]) == 0
    record = json.loads((out / "llmft_export.json").read_text())
    check = record["check"]
    assert record["dtype"] == "bfloat16" and 0 < check["max_abs_logit_diff"] <= check["tolerance"]
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
