"""The login-node layer: compose and validate a config, create the run directory (`llmft.rundir`), run locally or
submit to SLURM, plan a job (`plan`, `estimate`), list runs (`runs`). Imports no torch, transformers, peft or
deepspeed, at import time or later: a login node starts it in about a second. Training itself runs in
`llmft.training`, in each rank."""
