"""Training FLOPs per token and model FLOPs utilisation (MFU). Pure Python: `plan` uses it on the login node.

Per token, with N parameters, L layers, hidden size d and context length T (PaLM, appendix B):
  full fine-tuning: 6N + 12*L*d*T
  LoRA:             4N + 12*L*d*T + 6*N_lora   (frozen weights skip the weight-gradient matmul)
"""

from __future__ import annotations

# Dense bf16 peak, FLOP/s per GPU.
PEAK_FLOPS = {"A100": 312e12, "H100": 989e12, "H200": 989e12, "V100": 125e12}


def flops_per_token(num_params: int, num_trainable: int, num_layers: int, hidden_size: int, seq_len: float,
                    lora: bool) -> float:
    attention = 12 * num_layers * hidden_size * seq_len
    if lora:
        return 4 * num_params + attention + 6 * num_trainable
    return 6 * num_params + attention


def peak_flops(device_name: str) -> float | None:
    """The peak of a GPU from its name (`torch.cuda.get_device_name()`), or None when unknown (CPU)."""
    upper = device_name.upper()
    return next((peak for kind, peak in PEAK_FLOPS.items() if kind in upper), None)
