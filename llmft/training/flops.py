"""Training FLOPs per token and model FLOPs utilisation (MFU). Pure Python: `plan` uses it on the login node.

Per token, with N parameters, L layers, hidden size d and context length T (PaLM, appendix B):
  full fine-tuning: 6N + 12*L*d*T
  LoRA:             4N + 12*L*d*T + 6*N_lora   (frozen weights skip the weight-gradient matmul)
"""

from __future__ import annotations

# Dense tensor-core peak, FLOP/s per GPU, by compute precision (training/precision.py's names). fp32: the plain fp32
# peak (a run in fp32 gets no tensor cores unless TF32 is on). A V100 has no bf16 tensor cores: precision=auto runs
# fp16 there, which is what its 125 TFLOP/s count.
PEAK_FLOPS = {
    "A100": {"bf16": 312e12, "fp16": 312e12, "fp32": 19.5e12},
    "H100": {"bf16": 989e12, "fp16": 989e12, "fp32": 67e12},
    "H200": {"bf16": 989e12, "fp16": 989e12, "fp32": 67e12},
    "V100": {"fp16": 125e12, "fp32": 15.7e12},
    "T4": {"fp16": 65e12, "fp32": 8.1e12},
}


def flops_per_token(num_params: int, num_trainable: int, num_layers: int, hidden_size: int, seq_len: float,
                    lora: bool) -> float:
    attention = 12 * num_layers * hidden_size * seq_len
    if lora:
        return 4 * num_params + attention + 6 * num_trainable
    return 6 * num_params + attention


def peak_flops(device_name: str, precision: str = "bf16") -> float | None:
    """The peak of a GPU from its name (`torch.cuda.get_device_name()`) at a compute precision (bf16, fp16, fp32),
    or None when unknown (a CPU, or bf16 on a GPU that only emulates it)."""
    upper = device_name.upper()
    peaks = next((peaks for kind, peaks in PEAK_FLOPS.items() if kind in upper), {})
    return peaks.get(precision)
