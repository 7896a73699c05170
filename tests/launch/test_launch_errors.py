"""A user's mistake at launch is one line naming the key and what to do, exit status 2, before a run directory
exists: a mistyped or unknown key, a value of the wrong type, a missing data path or staff rule, a missing extra
(with its pip command), a bad evaluation override."""

from __future__ import annotations

import pytest

from llmft.config.compose import compose
from llmft.config.validation import check_installed
from llmft.errors import UserError
from support.runs import run_llmft


@pytest.mark.parametrize("override, message", [
    ("train.lerning_rate=1e-4", "llmft: bad config: train.lerning_rate: Key 'lerning_rate' not in 'TrainConfig'"),
    ("train.warmup_step=3", "did you mean train.warmup_steps?"),
    ("train.lr=abc", "llmft: bad config: train.lr=abc: expected a float."),
    ("data.packing=maybe", "llmft: bad config: data.packing=maybe: expected a bool."),
    ("parallelism.strategy=fsdp2", "expected one of auto, single, ddp, fsdp"),
    ("+train.foo=1", "llmft: bad config: train.foo: Key 'foo' not in 'TrainConfig'"),
    ("data=tickets", "llmft: data.path is not set: add data.path=... to the command"),
    ("train.save_timeout_min=0", "llmft: train.save_timeout_min=0.0 must be positive."),
])
def test_a_user_error_is_one_line_exit_2_and_creates_nothing(tmp_path, override, message):
    result = run_llmft("launch", override, f"run_dir={tmp_path / 'run'}", timeout=120)
    assert result.returncode == 2, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and message in result.stderr, result.stderr
    assert not (tmp_path / "run").exists()


def test_tickets_without_a_staff_rule_is_refused_at_launch(tmp_path):
    result = run_llmft("launch", "data=tickets", "data.path=/etc/hostname", f"run_dir={tmp_path / 'run'}")
    assert result.returncode == 2 and "data.tickets.staff_domains" in result.stderr
    assert not (tmp_path / "run").exists()


def test_a_missing_extra_names_the_pip_command(monkeypatch):
    import llmft.config.validation as validation

    monkeypatch.setattr(validation, "find_spec", lambda name: None)
    with pytest.raises(UserError, match=r"parallelism=zero3 needs deepspeed, which is not installed: pip install "
                                        r"'llmft\[deepspeed\]'"):
        check_installed(compose(["parallelism=zero3", "launch.nproc=2"]), local=True)
    with pytest.raises(UserError, match=r"pip install 'llmft\[qlora\]'"):
        check_installed(compose(["peft=qlora"]), local=False)  # a cluster job: the GPU is there
    with pytest.raises(UserError, match=r"pip install 'llmft\[eval\]'"):
        check_installed(compose(["eval.after_train=true"]), local=False)


def test_eval_overrides_are_checked_at_launch(tmp_path):
    result = run_llmft("launch", "eval.overrides=[eval.max_new_tokns=4]", f"run_dir={tmp_path / 'run'}")
    assert result.returncode == 2 and "eval.max_new_tokns" in result.stderr, result.stderr
    assert not (tmp_path / "run").exists()
