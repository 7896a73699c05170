#!/usr/bin/env bash
# The GPU check (tools/gpu_check.py) on a machine with one NVIDIA GPU, torch and transformers preinstalled, no
# internet: the other Python dependencies come as wheels prepared here beforehand.
#
#   tools/gpu-check.sh --prepare WHEELS_DIR   # here (with internet to PyPI): the wheels llmft needs besides torch
#   tools/gpu-check.sh WHEELS_DIR             # there: install them and llmft (no index), run every check
#
# Prints one line per check and, last, `gpu-check: N ok, M failed`. Put the figures into BENCHMARKS.md.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "${1:-}" = "--prepare" ]; then
    wheels=${2:?usage: tools/gpu-check.sh --prepare WHEELS_DIR}
    mkdir -p "$wheels"
    # everything llmft and the deepspeed extra need, except torch (the GPU machine has its own CUDA build)
    python -m pip download --dest "$wheels" --only-binary=:all: --python-version 3.11 \
        "transformers>=4.56" "peft>=0.17" "datasets>=3.0" "hydra-core>=1.3.2,<1.4" "omegaconf>=2.3" "submitit>=1.5" \
        "safetensors>=0.4" "tokenizers>=0.21" "tqdm>=4.66" "tensorboard>=2.15" "matplotlib>=3.7" 2>&1 | tail -1
    python -m pip download --dest "$wheels" --no-deps deepspeed 2>&1 | tail -1
    python -m pip wheel --no-deps --no-build-isolation --wheel-dir "$wheels" . 2>&1 | tail -1
    echo "wheels in $wheels: copy the folder and this repository to the GPU machine"
    exit 0
fi
wheels=${1:-}
if [ -n "$wheels" ]; then
    python -m pip install --no-index --find-links "$wheels" llmft deepspeed 2>&1 | tail -1
fi
timeout 480 python tools/gpu_check.py "${@:2}"
