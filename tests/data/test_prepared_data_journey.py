"""The data journey without a trap (issue 26).

- `data.prepared=DIR` alone trains on exactly what was prepared, with DIR's own data settings (the run's config.yaml
  records them), and the rank loads DIR's samples and tokenizer without reading the input again; data settings that
  disagree with DIR's, another model, another max_seq_len or input files changed since are refused at launch, before a
  run directory exists, in one sentence with the command that prepares again. Never another data set instead.
- A staff rule that matches no sender names the domains it saw and the key to set (tickets_jsonl and email).
- Bad records are on the console as `file:line: reason` (prepare, launch, the rank), and with data.strict=true one
  stops the launch before a run directory exists.
- A model that cannot pack (BLOOM's ALiBi) trains unpacked, said in one line, unless data.packing=true was asked for.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import yaml

from llmft.config.compose import SAMPLES_DIR, compose
from llmft.config.validation import validate
from llmft.data.prepare import prepared_source, reading
from llmft.data.prepare.command import prepare
from llmft.data.prepare.at_launch import data_for_launch
from llmft.data.prepare.reading import read_conversations, read_input
from llmft.data.prepare.samples_for_run import build_splits
from llmft.data.prepare.tokenizing import tokenize_rows
from llmft.data.readers.records import DataError
from llmft.data.tokenize.tokenizer import tokenizer_for_run
from llmft.errors import ConfigError
from support.helpdesk import generator
from support.runs import run_llmft

BAD_LINES = [  # (line, reason the report gives)
    "{not json",
    '{"id": "x1"}',
    '{"id": "x2", "messages": "hello"}',
    '{"id": "x3", "messages": []}',
    '{"id": "", "messages": [{"from": "a@b.fr", "body": "hi"}]}',
    '{"id": "x5", "messages": [{"body": "no author"}]}',
    '[1, 2, 3]',
]


def prepared_in_process(overrides: list[str]) -> dict:
    """`python -m llmft.data prepare OVERRIDES`, in this process (the same calls as the command)."""
    cfg = compose(overrides)
    validate(cfg, training=False)
    return prepare(cfg, overrides)


@pytest.fixture(scope="module")
def export(tmp_path_factory) -> Path:
    """A copy of the bundled raw helpdesk export (tickets JSONL), as a user's own file."""
    path = tmp_path_factory.mktemp("export") / "export.jsonl"
    shutil.copy(SAMPLES_DIR / "tickets_sample.jsonl", path)
    return path


@pytest.fixture(scope="module")
def prepared(export, tmp_path_factory) -> Path:
    out_dir = tmp_path_factory.mktemp("prepared") / "tickets-v1"
    result = run_llmft("data", "prepare", "data=tickets_sample_jsonl", f"data.path={export}",
                       f"data.output_dir={out_dir}", timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    return out_dir


def launch_overrides(prepared: Path, *more: str) -> list[str]:
    return [f"data.prepared={prepared}", *more]


def for_launch(overrides: list[str]):
    return data_for_launch(compose(overrides), overrides)


# ------------------------------------------------------------------------------------------------ data.prepared=DIR

@pytest.mark.slow
def test_prepared_dir_alone_trains_on_what_was_prepared(prepared, export, tmp_path):
    run_dir = tmp_path / "run"
    result = run_llmft("launch", f"data.prepared={prepared}", "train.max_steps=2", f"run_dir={run_dir}", timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "tokenizing in this process instead" not in result.stderr  # the silent fallback of issue 26
    assert f"data.prepared={prepared}: its own data settings: data=tickets_sample_jsonl, tickets_jsonl from " \
           f"{export}" in result.stderr
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())["data"]
    assert (saved["path"], saved["format"], saved["prepared"]) == (str(export), "tickets_jsonl", str(prepared))
    assert saved["tickets"]["staff_domains"] == ["support.example-hpc.fr"]
    report = json.loads((prepared / "report.json").read_text())
    data = json.loads((run_dir / "summary.json").read_text())["data"]
    assert data["reused_prepared"] is True and data["samples"] == report["samples"]
    assert data["fingerprint"] == report["fingerprint"]


def test_the_rank_takes_the_prepared_samples_without_reading_the_input(prepared, monkeypatch):
    def no_reading(*_):
        raise AssertionError("the input was read again")

    monkeypatch.setattr(reading, "read_input", no_reading)
    monkeypatch.setattr(prepared_source, "content_hash", no_reading)  # untouched files: sizes and times suffice
    cfg = for_launch(launch_overrides(prepared))
    conversations, read_report = read_conversations(cfg.data)
    tokenizer = tokenizer_for_run(cfg, conversations)
    splits, counts = build_splits(conversations, tokenizer, cfg.data, cfg.model.max_seq_len)
    report = json.loads((prepared / "report.json").read_text())
    assert counts["reused_prepared"] is True and counts["samples"] == report["samples"]
    assert len(splits["train"]) == report["packed_rows"]["train"]
    assert len(conversations) == report["num_conversations"] == read_report["num_conversations"]


def test_evaluation_still_gets_the_conversations_of_a_prepared_run(prepared, export):
    cfg = for_launch(launch_overrides(prepared))
    conversations, _ = read_conversations(cfg.data)
    fresh, _ = read_input(compose(["data=tickets_sample_jsonl", f"data.path={export}"]).data)
    assert [c.id for c in conversations] == [c.id for c in fresh]  # read when something goes through them


def test_the_same_data_settings_given_again_are_accepted(prepared, export):
    cfg = for_launch(launch_overrides(prepared, "data=tickets_sample_jsonl", f"data.path={export}"))
    assert cfg.data.path == str(export)


@pytest.mark.parametrize("given, key, recorded, ours", [
    (["data=tickets_sample_mbox"], "data.path", "EXPORT", str(SAMPLES_DIR / "tickets_sample.mbox")),
    (["data=tickets_sample_jsonl", "data.path=EXPORT", "data.validation_fraction=0.2"], "data.validation_fraction",
     "0.1", "0.2"),
    (["data.path=EXPORT", "data.format=tickets_jsonl", "data.tickets.staff_domains=[other.org]"],
     "data.tickets.staff_domains", "[support.example-hpc.fr]", "[other.org]"),
])
def test_data_settings_that_disagree_are_refused_naming_the_key(prepared, export, given, key, recorded, ours):
    given = [o.replace("EXPORT", str(export)) for o in given]
    with pytest.raises(DataError) as error:
        for_launch(launch_overrides(prepared, *given))
    recorded = recorded.replace("EXPORT", str(export))
    assert str(error.value).startswith(f"data.prepared={prepared} was prepared with {key}={recorded}, but this run "
                                       f"has {key}={ours}: leave the data settings out to train on {prepared} as it "
                                       f"was prepared, or prepare these settings into a folder of their own "
                                       f"(`python -m llmft.data prepare ")
    assert str(error.value).endswith("data.output_dir=NEW_DIR`) and train with data.prepared=NEW_DIR.")


def test_a_disagreement_is_one_line_and_no_run_directory(prepared, tmp_path):
    runs = tmp_path / "runs"
    result = run_llmft("launch", "data=tickets_sample_mbox", f"data.prepared={prepared}",
                       env={"LLMFT_RUNS_ROOT": str(runs)}, timeout=300)
    assert result.returncode == 2, result.stderr[-2000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"llmft: data.prepared={prepared} was prepared with data.path=")
    assert not runs.exists() or not any(runs.iterdir())


def test_another_model_or_sequence_length_is_refused_with_the_command_that_prepares_again(prepared, export,
                                                                                          tmp_path):
    with pytest.raises(DataError) as error:
        for_launch(launch_overrides(prepared, "model=smollm2_135m", f"model.path={tmp_path}"))
    assert str(error.value) == (
        f"data.prepared={prepared} was tokenized for model=tiny, not for this run's model=smollm2_135m ({tmp_path}): "
        f"prepare the data for this model (`python -m llmft.data prepare data=tickets_sample_jsonl "
        f"data.path={export} model=smollm2_135m model.path={tmp_path} data.output_dir=NEW_DIR`) and train with "
        f"data.prepared=NEW_DIR, or train with model=tiny.")
    with pytest.raises(DataError, match=r"was cut and packed for model.max_seq_len=256, not this run's 128: leave "
                                        r"model.max_seq_len at 256, or prepare again \(`python -m llmft.data prepare "
                                        r"data=tickets_sample_jsonl .* model.max_seq_len=128 data.output_dir=NEW_DIR`"):
        for_launch(launch_overrides(prepared, "model.max_seq_len=128"))


def test_changed_input_files_are_refused_touched_ones_are_not(tmp_path, monkeypatch):
    export = tmp_path / "export.jsonl"
    shutil.copy(SAMPLES_DIR / "tickets_sample.jsonl", export)
    out_dir = tmp_path / "prepared"
    prepared_in_process(["data=tickets_sample_jsonl", f"data.path={export}", f"data.output_dir={out_dir}",
                         "data.num_workers=1"])
    overrides = launch_overrides(out_dir)
    os.utime(export, ns=(export.stat().st_atime_ns, export.stat().st_mtime_ns + 10**9))  # a touch, a copy
    hashed = []
    real_hash = prepared_source.content_hash
    monkeypatch.setattr(prepared_source, "content_hash", lambda file: hashed.append(file) or real_hash(file))
    for_launch(overrides)  # the same content: accepted, after hashing it
    assert hashed == [export]
    size = export.stat().st_size
    with open(export, "a") as handle:
        handle.write(export.read_text().splitlines()[0] + "\n")
    message = (f"data.prepared={out_dir} was made from other input files than today's ({export} changed since "
               f"({size} bytes then, {export.stat().st_size} now)): prepare it again (`python -m llmft.data prepare "
               f"data=tickets_sample_jsonl data.path={export} data.num_workers=1 data.output_dir={out_dir}`), or "
               f"restore the files it was made from.")
    with pytest.raises(DataError) as error:
        for_launch(overrides)
    assert str(error.value) == message
    cfg = compose(overrides)  # a job queued before the change: its rank refuses as well, never reading the export
    cfg.data = compose(["data=tickets_sample_jsonl", f"data.path={export}", f"data.prepared={out_dir}"]).data
    conversations, _ = read_conversations(cfg.data)
    with pytest.raises(DataError) as error:
        build_splits(conversations, tokenizer_for_run(cfg, conversations), cfg.data, cfg.model.max_seq_len)
    assert str(error.value) == message


def test_a_folder_without_manifest_or_from_an_earlier_llmft_says_so(prepared, tmp_path):
    with pytest.raises(DataError, match=rf"^data.prepared={tmp_path} holds no prepared dataset \(no manifest.json\)"):
        for_launch(launch_overrides(tmp_path))
    old = tmp_path / "old"
    shutil.copytree(prepared, old)
    manifest = json.loads((old / "manifest.json").read_text())
    (old / "manifest.json").write_text(json.dumps({"fingerprint": manifest["fingerprint"],
                                                   "counts": manifest["counts"]}))
    with pytest.raises(DataError, match=rf"^data.prepared={old} was prepared by an earlier llmft, whose manifest does "
                                        r"not say what it was made from: prepare it again"):
        for_launch(launch_overrides(old))


# ------------------------------------------------------------------------------------------------ the staff rule

@pytest.fixture(scope="module")
def helpdesk(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("helpdesk")
    assert generator().main([str(out), "--seed", "3", "--tickets", "40"]) == 0
    return out


def test_a_staff_rule_that_matches_no_sender_names_the_domains_and_the_key(helpdesk, tmp_path):
    result = run_llmft("data", "prepare", "data=tickets", "data.format=email", f"data.path={helpdesk / 'mbox'}",
                       "data.tickets.staff_domains=[hpc-support.example.org]", f"data.output_dir={tmp_path}",
                       timeout=300)
    assert result.returncode == 2, result.stderr[-2000:]
    line, = result.stderr.strip().splitlines()
    assert line.startswith(f"llmft: no usable conversation in {helpdesk / 'mbox'} (")
    assert "; the staff rule data.tickets.staff_domains=[hpc-support.example.org] matched no sender, and the " \
           "senders' domains found in most tickets are idris.fr (" in line
    assert line.endswith(": set data.tickets.staff_domains=[idris.fr] if that is the support team's domain (or list "
                         "its members in data.tickets.staff_addresses=[...]).")
    data = compose(["data=tickets", f"data.path={helpdesk / 'tickets.jsonl'}",
                    "data.tickets.staff_domains=[]", "data.tickets.staff_addresses=[nobody@example.org]"]).data
    with pytest.raises(DataError, match=r"the staff rule data.tickets.staff_addresses=\[nobody@example.org\] matched "
                                        r"no sender, and the senders' domains found in most tickets are idris.fr "
                                        r"\(\d+ tickets\), .*: set data.tickets.staff_domains=\[idris.fr\]"):
        read_input(data)


# ------------------------------------------------------------------------------------------------ bad records

@pytest.fixture(scope="module")
def bad_export(tmp_path_factory) -> Path:
    """The bundled raw export with seven malformed records among its tickets."""
    path = tmp_path_factory.mktemp("bad") / "export.jsonl"
    good = (SAMPLES_DIR / "tickets_sample.jsonl").read_text().splitlines()
    lines = [*good[:5], *BAD_LINES[:4], *good[5:], *BAD_LINES[4:]]
    path.write_text("\n".join(lines) + "\n")
    return path


def test_prepare_prints_the_first_bad_records_in_full_and_counts_the_rest(bad_export, tmp_path):
    result = run_llmft("data", "prepare", "data=tickets_sample_jsonl", f"data.path={bad_export}",
                       f"data.output_dir={tmp_path}", timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    skipped = json.loads((tmp_path / "report.json").read_text())["skipped"]
    assert len(skipped) == 7 and skipped[0].startswith(f"{bad_export}:6: ")
    start = result.stdout.splitlines().index("skipped 7 bad records (data.strict=true stops at the first):")
    assert result.stdout.splitlines()[start + 1:start + 7] == [f"  {s}" for s in skipped[:5]] + \
        ["  ... and 2 more (all in report.json)"]


def test_the_rank_prints_them_too(bad_export, capsys):
    read_conversations(compose(["data=tickets_sample_jsonl", f"data.path={bad_export}"]).data)
    err = capsys.readouterr().err.splitlines()
    assert err[0] == "llmft: skipped 7 bad records (data.strict=true stops at the first):"
    assert err[-1] == "  ... and 2 more (all in report.json, or a run's summary.json)"


def test_strict_stops_the_launch_before_a_run_directory_exists(bad_export, tmp_path):
    runs = tmp_path / "runs"
    result = run_llmft("launch", "data=tickets_sample_jsonl", f"data.path={bad_export}", "data.strict=true",
                       env={"LLMFT_RUNS_ROOT": str(runs)}, timeout=300)
    assert result.returncode == 2, result.stderr[-2000:]
    assert result.stderr.strip().splitlines() == [
        f"llmft: {bad_export}:6: bad JSON (Expecting property name enclosed in double quotes)"
        f" (data.strict=true stops at the first bad record; fix or remove it)."]
    assert not runs.exists() or not any(runs.iterdir())


def test_a_prepared_folder_says_its_bad_records_and_strict_refuses_them(bad_export, tmp_path, capsys):
    out_dir = tmp_path / "prepared"
    prepared_in_process(["data=tickets_sample_jsonl", f"data.path={bad_export}", f"data.output_dir={out_dir}"])
    capsys.readouterr()
    cfg = for_launch(launch_overrides(out_dir))
    assert capsys.readouterr().err.startswith(f"llmft: data.prepared={out_dir}: its own data settings")
    read_conversations(cfg.data)  # the rank, as it starts
    err = capsys.readouterr().err.splitlines()
    assert err[0] == "llmft: skipped 7 bad records (data.strict=true stops at the first):" and \
        err[1].startswith(f"  {bad_export}:6: bad JSON")
    with pytest.raises(DataError, match=rf"^{bad_export}:6: bad JSON .* \(data.strict=true, and "
                                        rf"data.prepared={out_dir} skipped 7 bad record\(s\) when it was prepared: fix "
                                        r"them and prepare again, or leave data.strict out\)\.$"):
        for_launch(launch_overrides(out_dir, "data.strict=true"))


# ------------------------------------------------------------------------------------------------ packing

def test_a_family_that_cannot_pack_trains_unpacked_unless_packing_was_asked_for(capsys):
    cfg = compose(["model.tiny.family=bloom"])
    assert cfg.data.packing is None  # auto
    validate(cfg)
    assert cfg.data.packing is False
    assert capsys.readouterr().out.strip() == ("llmft: model=tiny is a bloom model (ALiBi: no position ids): training "
                                               "unpacked, one sample a row (data.packing=false).")
    with pytest.raises(ConfigError, match=r"so packed samples would attend to each other: set data.packing=false\.$"):
        validate(compose(["model.tiny.family=bloom", "data.packing=true"]))
    other = compose([])
    validate(other)
    assert other.data.packing is True and capsys.readouterr().out == ""


def test_auto_packing_packs_where_the_launch_did_not_settle_it():
    cfg = compose(["data.num_workers=1"])
    conversations, _ = read_input(cfg.data)
    tokenizer = tokenizer_for_run(cfg, conversations)
    counts = tokenize_rows(conversations, tokenizer, cfg.data, cfg.model.max_seq_len).counts
    assert cfg.data.packing is None and counts["packing"] is True and "packed_rows" in counts
