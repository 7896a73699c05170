"""llmft: fine-tune large language models on SLURM GPU clusters."""

import os

__version__ = "0.1.0"

# Offline first: Jean Zay's compute nodes (and llmft's CI) have no internet, and a library that tries the hub waits
# for timeouts. Models and data come from local folders. A user who wants the hub can export these as 0.
for _variable in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_HUB_DISABLE_TELEMETRY"):
    os.environ.setdefault(_variable, "1")
