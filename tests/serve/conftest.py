"""What the GGUF tests of this folder share: the tiny run they export, once, and stock PEFT's merge of it
(test_export_gguf.py reads the file with our own reader, test_gguf_read_by_transformers.py with transformers')."""

from __future__ import annotations

import pytest
import torch

from support.runs import trained_in_process


@pytest.fixture(scope="package")
def gguf_tiny_run(tmp_path_factory):
    """Six LoRA steps on the tiny random-weight Llama: its adapter moves the logits by about 1.8."""
    return trained_in_process(["train.max_steps=6", "train.eval_every=6", "train.save_every=0"],
                              tmp_path_factory.mktemp("gguf") / "run")


@pytest.fixture(scope="package")
def stock_merge(gguf_tiny_run):
    """Base + adapter merged by stock PEFT, and the run's tokenizer: what the file must hold."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = AutoModelForCausalLM.from_pretrained(gguf_tiny_run / "base_model", dtype=torch.float32)
    merged = PeftModel.from_pretrained(base, gguf_tiny_run / "final").merge_and_unload().eval()
    return merged, AutoTokenizer.from_pretrained(gguf_tiny_run / "final")
