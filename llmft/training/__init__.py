"""Inside a rank: the training loop (`loop.py`), the model loader (`model.py`), the parallelism strategies
(`strategies/`), checkpoints, stop signals, metrics, the topology and the final save. Started by `llmft.launch`
(in-process, through torchrun, or as SLURM tasks) as `python -m llmft.train RUN_DIR`.

This file imports nothing, so the login node can read `llmft.training.flops` (pure Python) for `plan`."""
