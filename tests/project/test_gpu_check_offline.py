"""The GPU check installs on a GPU node without internet, and grades what it claims to.

The two halves of tools/gpu-check.sh as on Jean Zay: `prepare` here, with the package registry (the CPU build of torch
stands in for the CUDA one, several GB), then `run --cpu` in a network namespace of its own with only a loopback
(`unshare --net`, as root): a fresh venv installed from the wheelhouse alone, then the checks on the CPU, read from
their JSON. prepare's downloads are kept in ~/.cache/llmft-tests/gpu-check-downloads: it still resolves and builds
everything (llmft and DeepSpeed as wheels, the target platform's wheels), but a second run downloads nothing.
The precision check's table and its verdict on GPUs it cannot see are tested with stand-ins for torch.cuda.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from support.early import EARLY, EarlyCommand
from support.runs import REPO

SCRIPT = REPO / "tools" / "gpu-check.sh"
DOWNLOAD_CACHE = Path.home() / ".cache" / "llmft-tests" / "gpu-check-downloads"
PYTHON_VERSION = "%d.%d" % sys.version_info[:2]


def load_gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", REPO / "tools" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


gpu_check = load_gpu_check()


# ------------------------------------------------------------------------------------------ precision

def test_the_expected_precision_follows_the_compute_capability():
    table = {None: ("fp32",),  # the CPU
             (6, 0): ("fp16", "fp32"), (7, 0): ("fp16", "fp32"), (7, 5): ("fp16", "fp32"),  # P100, V100, T4
             (8, 0): ("bf16",), (8, 6): ("bf16",), (8, 9): ("bf16",), (9, 0): ("bf16",), (10, 0): ("bf16",)}
    assert {capability: gpu_check.expected_precisions(capability) for capability in table} == table


def stand_in_gpu(monkeypatch, name: str, capability: tuple[int, int]) -> None:
    """torch.cuda answering as one GPU of this name and compute capability (what llmft and the check ask it)."""
    properties = SimpleNamespace(name=name, major=capability[0], minor=capability[1], total_memory=32 * 2**30)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device=None: properties)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)


@pytest.mark.parametrize("name, capability, chosen", [
    ("Tesla V100-SXM2-32GB", (7, 0), "fp16"),
    ("Tesla T4", (7, 5), "fp16"),
    ("NVIDIA A100-SXM4-80GB", (8, 0), "bf16"),
    ("NVIDIA H100 80GB HBM3", (9, 0), "bf16"),
])
def test_the_precision_check_grades_llmft_on_stand_in_gpus(monkeypatch, tmp_path, name, capability, chosen):
    stand_in_gpu(monkeypatch, name, capability)
    summary, figures = gpu_check.precision_check(False, gpu_check.Budget(60), tmp_path)
    assert figures["device"] == name and figures["capability"] == "%d.%d" % capability
    assert figures["chosen"] == chosen and chosen in figures["expected"], figures
    assert summary == f"{name} (compute capability {figures['capability']}): auto -> {figures['chosen']}"


def test_the_precision_check_fails_where_llmft_would_take_emulated_bf16(monkeypatch, tmp_path):
    """A torch that counts emulated bf16 as support (what `is_bf16_supported()` does unless told not to) makes
    llmft pick bf16 on a V100: the check must say so, since it grades llmft against its own table."""
    stand_in_gpu(monkeypatch, "Tesla V100-SXM2-32GB", (7, 0))
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    with pytest.raises(AssertionError, match=r"auto chose bf16 on Tesla V100-SXM2-32GB \(compute capability 7.0\), "
                                             r"which calls for fp16 or fp32"):
        gpu_check.precision_check(False, gpu_check.Budget(60), tmp_path)


# ------------------------------------------------------------------------------------------ the time budget

def test_checks_that_find_no_time_left_are_recorded_as_not_run(tmp_path, capsys):
    out = tmp_path / "gpu-check.json"
    status = gpu_check.run_checks(True, out, tmp_path, gpu_check.Budget(0), ["precision", "strategies"])
    report = json.loads(out.read_text())
    assert status == 1
    assert [(c["name"], c["status"]) for c in report["checks"]] == [("precision", "not run"),
                                                                    ("strategies", "not run")]
    assert report["counts"] == {"ok": 0, "failed": 0, "skipped": 0, "not run": 2}
    assert "gpu-check: 0 ok, 0 failed, 0 skipped, 2 not run" in capsys.readouterr().out


def test_a_launch_is_not_started_with_less_time_left_than_it_needs(tmp_path):
    with pytest.raises(gpu_check.OutOfTime, match="s left for `llmft.launch train.max_steps=1`"):
        gpu_check.launch(["train.max_steps=1"], tmp_path / "run", gpu_check.Budget(gpu_check.MIN_LAUNCH_S - 1))
    assert not (tmp_path / "run").exists()


# ------------------------------------------------------------------------------------------ prepare, then run offline

# prepare, then run in a network namespace with a loopback and nothing else (gloo's ranks meet on it), where pip's
# configuration here (a find-links folder, local indexes) and a PYTHONPATH (as Jean Zay's modules set one; its llmft
# cannot be imported) must not reach the install. Minutes of CPU, most of it on one core: started in the background
# with the paced conversions of training/test_universal_conversion.py, which with the SLURM tests after them leave a
# core idle a third of the time (measured: started with the SLURM tests alone, it slowed them by 66 s), read at the end.
PREPARE_THEN_RUN_OFFLINE = r"""
set -u
folder=$1 script=$2 version=$3 cache=$4
export PYTHON=$5
unset PYTHONPATH
mkdir -p "$cache" "$folder/scratch" "$folder/shadow/llmft" "$folder/out"
if ! "$script" prepare "$folder/wheelhouse" --python "$version" --torch torch==2.13.0+cpu --extras deepspeed \
        --cache "$cache" > "$folder/prepare.log" 2>&1; then
    echo "prepare failed:"; tail -c 4000 "$folder/prepare.log"; exit 1
fi
echo "raise ImportError('llmft imported from PYTHONPATH, not the venv')" > "$folder/shadow/llmft/__init__.py"
TMPDIR="$folder/scratch" PIP_INDEX_URL=http://127.0.0.1:9/simple PIP_FIND_LINKS=/opt/wheels \
    PYTHONPATH="$folder/shadow" unshare --net sh -c 'ip link set lo up && exec "$0" "$@"' \
    "$script" run "$folder/wheelhouse" --cpu --out "$folder/out/gpu-check.json" --venv "$folder/venv"
"""
OFFLINE_CHECK = EarlyCommand(lambda folder: ["bash", "-c", PREPARE_THEN_RUN_OFFLINE, "bash", str(folder), str(SCRIPT),
                                             PYTHON_VERSION, str(DOWNLOAD_CACHE), sys.executable],
                             timeout=1500, start_with="training/test_universal_conversion.py")
for _test in ("test_prepare_gathers_every_wheel_for_the_target_with_pins_and_hashes",
              "test_run_installs_from_the_wheelhouse_alone_without_a_network_and_passes_on_the_cpu"):
    EARLY[f"tests/project/test_gpu_check_offline.py::{_test}"] = OFFLINE_CHECK


@pytest.fixture(scope="module")
def offline_check() -> tuple[Path, subprocess.CompletedProcess]:
    """(its folder, the offline run's output) once prepare and the offline run have finished."""
    result = OFFLINE_CHECK.finished()
    assert result.returncode == 0, f"exited {result.returncode}\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
    return OFFLINE_CHECK.folder, result


@pytest.fixture(scope="module")
def wheelhouse(offline_check) -> Path:
    return offline_check[0] / "wheelhouse"


def normalised(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def wheel_files(folder: Path) -> dict[str, Path]:
    return {normalised(path.name.split("-")[0]): path for path in folder.glob("*.whl")}


def installs_on_the_target(wheel: str) -> bool:
    """The wheel's tags fit CPython of this version on glibc 2.28 or older, x86_64 (manylinux_2_28_x86_64)."""
    pythons, abi, platforms = wheel.removesuffix(".whl").split("-")[-3:]
    version = int(PYTHON_VERSION.replace(".", ""))
    python_fits = any(tag in ("py3", f"py{version}", f"cp{version}") or (abi == "abi3" and tag.startswith("cp")
                                                                         and int(tag[2:]) <= version)
                      for tag in pythons.split("."))
    platform_fits = any(tag in ("any", "manylinux2014_x86_64", "manylinux2010_x86_64", "manylinux1_x86_64")
                        or (re.fullmatch(r"manylinux_2_\d+_x86_64", tag) and int(tag.split("_")[2]) <= 28)
                        for tag in platforms.split("."))
    return python_fits and platform_fits


@pytest.mark.slow
def test_prepare_gathers_every_wheel_for_the_target_with_pins_and_hashes(wheelhouse):
    wheels = wheel_files(wheelhouse)
    manifest = json.loads((wheelhouse / "manifest.json").read_text())
    assert manifest["num_wheels"] == len(wheels) == len(list(wheelhouse.glob("*.whl")))
    assert manifest["bytes"] == sum(path.stat().st_size for path in wheels.values())
    assert (manifest["python"], manifest["platform"]) == (PYTHON_VERSION, "manylinux_2_28_x86_64")
    # llmft built from this checkout, DeepSpeed built from its source, and what DeepSpeed needs with it
    assert {"llmft", "deepspeed", "torch", "pip", "hjson", "msgpack", "ninja", "py-cpuinfo", "einops",
            "pydantic"} <= set(wheels), sorted(wheels)
    assert wheels["deepspeed"].name == "deepspeed-0.19.8-py3-none-any.whl"
    assert wheels["torch"].name.startswith("torch-2.13.0+cpu-")
    # every wheel installs on the target: its Python (or any), glibc 2.28 or older on x86_64 (or any platform);
    # this machine's own pip takes tensorboard-data-server's manylinux_2_31 wheel, the target its py3-none-any one
    assert [path.name for path in wheels.values() if not installs_on_the_target(path.name)] == []
    assert wheels["tensorboard-data-server"].name.endswith("-py3-none-any.whl")
    # the versions constraints.txt pins, and requirements.txt naming every file with its sha256
    pins = {normalised(name): version for name, version in (line.split("==") for line in
            (REPO / "constraints.txt").read_text().splitlines() if "==" in line and not line.startswith("#"))}
    for name, path in wheels.items():
        pinned = pins.get(name)
        assert pinned is None or path.name.split("-")[1].split("+")[0] == pinned, (path.name, pinned)
    lines = [line for line in (wheelhouse / "requirements.txt").read_text().splitlines() if not line.startswith("#")]
    assert len(lines) == len(wheels)
    for line in lines:
        requirement, digest = line.split(" --hash=sha256:")
        name, version = requirement.split("==")
        path = wheels[normalised(name)]
        assert path.name.split("-")[1] == version
        assert hashlib.sha256(path.read_bytes()).hexdigest() == digest, path.name
    assert (wheelhouse / "gpu_check.py").read_text() == (REPO / "tools" / "gpu_check.py").read_text()


@pytest.mark.slow
def test_run_installs_from_the_wheelhouse_alone_without_a_network_and_passes_on_the_cpu(offline_check, tmp_path):
    folder, result = offline_check
    wheelhouse, venv, scratch = folder / "wheelhouse", folder / "venv", folder / "scratch"
    out = folder / "out" / "gpu-check.json"
    assert f"install from {wheelhouse} alone (no index)" in result.stdout, result.stdout
    install_log = next(scratch.glob("llmft-gpu-check.*/install.log")).read_text()
    assert f"Looking in links: {wheelhouse}\n" in install_log, install_log[-2000:]
    # what the venv holds is the wheelhouse, exactly, and its llmft is the wheel's, not this checkout
    listed = subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "list", "--format=json"], capture_output=True,
                            text=True, check=True, env={"PIP_CONFIG_FILE": os.devnull}).stdout
    installed = {(normalised(p["name"]), p["version"]) for p in json.loads(listed)}
    expected = {(name, path.name.split("-")[1]) for name, path in wheel_files(wheelhouse).items()}
    assert installed == expected, installed ^ expected
    where = subprocess.run([str(venv / "bin" / "python"), "-c", "import llmft; print(llmft.__file__)"],
                           capture_output=True, text=True, check=True, cwd=tmp_path,
                           env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"}).stdout.strip()
    assert Path(where).is_relative_to(venv), where

    report = json.loads(out.read_text())
    statuses = {check["name"]: check["status"] for check in report["checks"]}
    assert statuses == {"precision": "ok", "binding": "ok", "strategies": "ok", "packing": "ok", "loss": "ok",
                        "throughput": "skipped"}, report["checks"]
    assert report["counts"] == {"ok": 5, "failed": 0, "skipped": 1, "not run": 0}
    assert report["device"]["type"] == "cpu" and report["versions"]["torch"] == "2.13.0+cpu"
    assert report["versions"]["deepspeed"] == "0.19.8" and report["seconds"] <= report["budget_s"] == 480
    figures = {check["name"]: check["figures"] for check in report["checks"]}
    assert figures["precision"]["chosen"] == "fp32" and figures["precision"]["expected"] == ["fp32"]
    binding = figures["binding"]
    assert binding["backend"] == "gloo" and binding["num_ranks"] == 2
    assert [rank["all_reduce"] for rank in binding["ranks"]] == [3.0, 3.0]
    strategies = figures["strategies"]
    assert set(strategies["final_loss"]) == {"single", "fsdp", "zero3"}
    assert max(strategies["max_gap_to_single"].values()) <= 1e-4
    assert figures["packing"]["sdpa"]["max_logit_diff"] <= 1e-4
    assert figures["loss"]["chunked"]["grad_cosine_to_full_logits"] >= 0.99999
    # the printed table: one row per check, then the summary line
    assert re.search(r"^strategies +ok +\d+ +final losses single ", result.stdout, re.M), result.stdout
    assert "gpu-check: 5 ok, 0 failed, 1 skipped, 0 not run in " in result.stdout
