"""`llmft export` without `out=` (the user story's `llmft export run=R format=gguf`): the export goes to
RUN_DIR/export/<adapter|merged|gguf>; an earlier export there is named with the way on, never overwritten; a missing
extra is named with its pip command in one sentence."""

from __future__ import annotations

import importlib.util
import json
import shutil

import pytest

from llmft.serve.export import main as export_main


@pytest.fixture
def run_copy(gguf_tiny_run, tmp_path):
    """A copy of the shared tiny run, whose export/ folder this test may fill."""
    return shutil.copytree(gguf_tiny_run, tmp_path / "run")


def test_an_export_without_out_goes_to_the_run_directory(run_copy, capsys):
    assert export_main([f"run={run_copy}", "format=gguf"]) == 0
    gguf_dir = run_copy / "export" / "gguf"
    assert (gguf_dir / "model.gguf").is_file() and (gguf_dir / "Modelfile").is_file()
    assert json.loads((gguf_dir / "llmft_export.json").read_text())["kind"] == "gguf"
    assert f"-> {gguf_dir / 'model.gguf'}" in capsys.readouterr().out
    assert export_main([f"run={run_copy}"]) == 0  # the adapter, beside it
    assert (run_copy / "export" / "adapter" / "adapter_model.safetensors").is_file()

    assert export_main([f"run={run_copy}", "format=gguf"]) == 2  # again: the earlier export is kept
    said = capsys.readouterr().err.strip()
    assert said == (f"llmft: {gguf_dir} holds an earlier export of this run: remove it (rm -r {gguf_dir}) or give "
                    f"another folder with out=DIR."), said
    assert (gguf_dir / "model.gguf").is_file()


def test_a_missing_gguf_package_is_one_sentence_with_the_pip_command(run_copy, monkeypatch, capsys):
    import llmft.serve.export as export

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(export, "find_spec", lambda name, *a: None if name == "gguf" else find_spec(name, *a))
    assert export_main([f"run={run_copy}", "format=gguf"]) == 2
    assert capsys.readouterr().err.strip() == (
        "llmft: format=gguf needs gguf, which is not installed: pip install 'llmft[gguf]' (from a clone: pip install "
        "-e '.[gguf]').")
    assert not (run_copy / "export").exists()
