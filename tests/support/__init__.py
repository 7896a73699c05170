"""What the tests share, importable from every test folder (pyproject.toml's `pythonpath = ["tests"]`):

- support.runs: the repository, `python -m llmft.<module>` as a user types it, and what a run writes (metrics);
- support.early: commands started right after collection (EarlyCommand), for tests that wait on a long subprocess;
- support.torchrun: runs on several local ranks in one torchrun of support/torchrun_harness.py;
- support.torchrun_harness: the script those torchruns run (not imported for its code, only for its probe inputs);
- support.slurm_cluster: the real two-node SLURM of tools/local-slurm.sh.

Fixtures and hooks stay in conftest.py files; test modules never import from conftest or from each other.
"""
