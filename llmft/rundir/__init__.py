"""The run directory: the unit of reproducibility, and the one package that spells its file names.

    RUN_DIR/config.yaml       the resolved config (re-run with `python -m llmft.train RUN_DIR`)
    RUN_DIR/provenance.json   llmft version, git commit (and whether the tree was dirty), command, host, time, resumes,
                              the run it started from (init_from)
    RUN_DIR/metrics.jsonl     one line per logging step / evaluation
    RUN_DIR/jobs.jsonl        every SLURM job submitted for the run (training and evaluation)
    RUN_DIR/.llmft.lock       the process or job that trains into it (`lock.py`)
    RUN_DIR/checkpoints/      step_<N>/ folders, each complete (its manifest.json) or absent (`checkpoints.py`)
    RUN_DIR/base_model/       model=tiny only: the random-weight base the adapter applies to
    RUN_DIR/final/            the adapter (or full model) with the tokenizer and its chat template
    RUN_DIR/logs/             each rank's output (torchrun)
    RUN_DIR/tensorboard/      TensorBoard event files
    RUN_DIR/mlflow.json       train.mlflow=true: the MLflow store and run this run logs to
    RUN_DIR/reference_logps.pt  DPO/KTO with a precomputed reference: its log-probabilities, made before step 1
    RUN_DIR/eval/             `llmft eval`'s report.json and answers
    RUN_DIR/export/<format>/  `llmft export`'s default output
    RUN_DIR/summary.json      status, steps, first/final loss, validation loss, sizes, timing

    layout.py       the paths above
    create.py       a new run directory: its lock, config and provenance
    files.py        typed reads and writes: config.yaml (the schema's typed config), summary.json, provenance.json,
                    metrics.jsonl, jobs.jsonl
    status.py       a run's status (summary, metrics, SLURM), for `llmft.runs` and the sweeps
    lock.py         one writer per run directory
    checkpoints.py  the checkpoints' layout, manifests and listing (the files inside come from the strategy)
    init_from.py    a run that starts from another run's final model: the config it takes, the adapter it loads
    lifetime.py     processes that die with their parent (the launcher's torchrun, each rank)

No torch here: the launcher and `llmft.runs` use it on the login node.
"""
