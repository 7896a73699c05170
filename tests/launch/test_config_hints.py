"""Mistakes a user of other fine-tuning tools makes, answered with the fix: a key under its name elsewhere
(`train.learning_rate`, `peft.rank`, `num_epochs`) or in the wrong group (`train.r`) gets "did you mean" the llmft key;
a list key takes one value or a comma list without brackets, and where a list cannot be read the sentence says the
bracket syntax with the command that ran; every optional package a launch lacks is named in one sentence with one pip
command."""

from __future__ import annotations

import pytest

from llmft.config.arguments import UsageError, parse_arguments
from llmft.config.compose import bracket_lists, compose, one_line_error
from llmft.config.validation import check_installed
from llmft.errors import ConfigError, UserError
from llmft.serve.chat import ChatArgs
from llmft.serve.evaluation import EvalArgs
from support.runs import run_llmft


@pytest.mark.parametrize("override, meant", [
    ("train.learning_rate=1e-4", "train.lr"),
    ("peft.rank=8", "peft.r"),
    ("num_epochs=3", "train.epochs"),
    ("train.num_train_epochs=3", "train.epochs"),
    ("batch_size=8", "train.micro_batch_size"),
    ("train.per_device_train_batch_size=8", "train.micro_batch_size"),
    ("gradient_accumulation_steps=4", "train.grad_accum_steps"),
    ("peft.lora_alpha=16", "peft.alpha"),
    ("peft.lora_dropout=0.1", "peft.dropout"),
    ("max_length=1024", "model.max_seq_len"),
    ("model.max_seq_length=1024", "model.max_seq_len"),
    ("train.gradient_checkpointing=true", "train.activation_checkpointing"),
    ("train.r=8", "peft.r"),  # the right name in the wrong group
    ("model.lr=1e-4", "train.lr"),
    ("lr=1e-4", "train.lr"),
    ("train.warmup_step=3", "train.warmup_steps"),  # a misspelling in its group, as before
])
def test_a_key_named_as_other_tools_name_it_gets_the_llmft_key(override, meant):
    with pytest.raises(ConfigError) as refused:
        compose([override])
    assert str(refused.value).endswith(f"did you mean {meant}?"), str(refused.value)


def test_the_hint_reaches_the_user_in_one_line_from_launch(tmp_path):
    result = run_llmft("launch", "train.learning_rate=1e-4", "peft.r=8", f"run_dir={tmp_path / 'run'}", timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip() == ("llmft: bad config: train.learning_rate: Key 'learning_rate' not in "
                                     "'TrainConfig'; did you mean train.lr?")
    assert not (tmp_path / "run").exists()


def test_the_arguments_of_eval_chat_and_export_get_a_hint_too():
    with pytest.raises(UsageError, match=r"bad argument max_tokens: .*did you mean max_new_tokens\?"):
        parse_arguments(["max_tokens=20"], ChatArgs, "usage")
    with pytest.raises(UsageError, match=r"bad argument eval\.max_tokens: .*did you mean eval\.max_new_tokens\?"):
        parse_arguments(["eval.max_tokens=20"], EvalArgs, "usage")
    with pytest.raises(UsageError, match=r"did you mean eval\.limit\?"):
        parse_arguments(["limit=20"], EvalArgs, "usage")  # the key in its group


@pytest.mark.parametrize("given, expected", [
    ("hpc-support.example.org", ["hpc-support.example.org"]),  # one value, no brackets: the user's journey
    ("hpc-support.example.org,idris.fr", ["hpc-support.example.org", "idris.fr"]),  # a comma list
    ("[hpc-support.example.org]", ["hpc-support.example.org"]),  # brackets, as before
    ("", []),
])
def test_a_list_key_takes_one_value_or_a_comma_list_without_brackets(given, expected):
    cfg = compose(["data=tickets", "data.path=export.mbox", f"data.tickets.staff_domains={given}"])
    assert list(cfg.data.tickets.staff_domains) == expected


def test_list_values_keep_their_text_and_other_keys_are_left_to_hydra():
    cfg = compose(["peft.target_modules=q_proj,v_proj", "eval.overrides=eval.limit=200",
                   "data.scrub.keep=Jean Zay,1e-4,true"])
    assert list(cfg.peft.target_modules) == ["q_proj", "v_proj"]
    assert list(cfg.eval.overrides) == ["eval.limit=200"]
    assert list(cfg.data.scrub.keep) == ["Jean Zay", "1e-4", "true"]  # texts, not a float and a bool
    untouched = ["train.lr=1e-4", "-m", "peft.target_modules=null", "+data.tickets.staff_domains=[a.org]",
                 "~peft.target_modules", "peft.target_modules=choice([q_proj],[v_proj])"]
    assert bracket_lists(untouched) == untouched
    assert bracket_lists(["+data.tickets.staff_domains=a.org"]) == ["+data.tickets.staff_domains=[a.org]"]


def test_a_list_key_on_the_data_prepare_command_line_prepares(tmp_path):
    """The journey of issue 26: `data prepare` with the staff domain given bare; before, OmegaConf's "str is not a
    ListConfig" and a hint at llmft.launch."""
    result = run_llmft("data", "prepare", "--cfg", "data=tickets", "data.format=email", "data.path=export.mbox",
                       "data.tickets.staff_domains=hpc-support.example.org", timeout=120)
    assert result.returncode == 0, result.stderr
    assert "- hpc-support.example.org" in result.stdout


def test_a_list_that_cannot_be_read_says_the_bracket_syntax_with_the_command_that_ran():
    omegaconf_says = ("Invalid value assigned: str is not a ListConfig, list or tuple.\n"
                      "    full_key: data.tickets.staff_domains\n    object_type=TicketsConfig")
    message = one_line_error(omegaconf_says)
    assert message.startswith("bad config: data.tickets.staff_domains takes a list: python -m llmft.launch ... "
                              "'data.tickets.staff_domains=[first,second]'"), message
    # a mixture's source is composed as a whole: no bare value is turned into a list there
    result = run_llmft("data", "prepare", "data=mixture",
                       "data.sources=[{path: a.jsonl, weight: 1, format: email, tickets: {staff_domains: a.org}}]",
                       timeout=120)
    assert result.returncode == 2
    line = result.stderr.strip()
    assert line == ("llmft: bad config: tickets.staff_domains takes a list: write staff_domains: [first, second] in "
                    "the value of data.sources given to python -m llmft.data prepare."), line
    result = run_llmft("plan", "data.tickets={staff_domains: a.org}", timeout=120)  # a group given as a whole
    assert result.returncode == 2
    assert result.stderr.strip() == (
        "llmft: bad config: data.tickets.staff_domains takes a list: python -m llmft.plan ... "
        "'data.tickets.staff_domains=[first,second]' (the quotes keep the brackets from the shell; one value alone: "
        "data.tickets.staff_domains=first)."), result.stderr


def test_a_comma_in_a_text_key_says_how_to_sweep_or_quote(tmp_path):
    result = run_llmft("launch", "train.lr=1e-4,2e-4", f"run_dir={tmp_path / 'run'}", timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip() == ("llmft: bad config: train.lr=1e-4,2e-4: a comma separates the values of a sweep: "
                                     "add -m for one run per value (python -m llmft.launch -m train.lr=1e-4,2e-4), or "
                                     "quote a text that holds commas: 'train.lr=\"1e-4,2e-4\"'.")


def test_every_missing_extra_of_a_launch_is_named_in_one_sentence(monkeypatch):
    """Before, each was found by its own failure: install deepspeed, launch again, install mlflow..."""
    import llmft.config.validation as validation

    monkeypatch.setattr(validation, "find_spec", lambda name: None)
    cfg = compose(["parallelism=zero3", "launch.nproc=2", "train.mlflow=true", "eval.after_train=true"])
    with pytest.raises(UserError) as refused:
        check_installed(cfg, local=True)
    message = str(refused.value)
    assert message.startswith("parallelism=zero3 needs deepspeed, eval.after_train=true needs rouge-score and "
                              "sacrebleu"), message
    assert "and train.mlflow=true needs mlflow-skinny and sqlalchemy and alembic, which are not installed" in message
    assert message.endswith("pip install 'llmft[deepspeed,eval,mlflow]' (from a clone: pip install -e "
                            "'.[deepspeed,eval,mlflow]').")
    assert len(message.splitlines()) == 1
