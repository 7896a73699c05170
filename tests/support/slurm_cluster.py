"""The real two-node SLURM cluster of ``tools/local-slurm.sh``, for tests that submit jobs (not a test file).

One cluster serves every test: two nodes ``n1`` and ``n2`` (``tools/local-slurm.sh start --nodes 2``: two slurmd on
this machine, each with its own hostname and the node names resolvable inside its jobs). A one-node job lands on
either; ``cluster.nodes=2`` spans both. ``ensure_local_slurm()`` starts the cluster if it is not running (a no-op
taking ~0.2 s when it is; ~4 s from stopped; ~12 s the first time, plus the package installation on a fresh
machine; a one-node cluster started by hand in the same STATE_DIR is stopped and started again with two nodes) and
returns the environment the SLURM commands, submitit and llmft need (``SLURM_CONF``, ``LLMFT_SLURM_STATE_DIR``),
read from ``STATE_DIR/env.sh``. Called again after a test killed a node (``kill_node``), it starts that node's
slurmd again and returns the node to service. If the cluster cannot start it raises ``LocalSlurmError`` carrying
the script's output: a test needing SLURM fails loudly, it is never skipped. STATE_DIR is
``$LLMFT_SLURM_STATE_DIR`` when set (a cluster started by hand with ``eval "$(tools/local-slurm.sh start --nodes 2
DIR)"``), else /tmp/llmft-slurm. Concurrent callers (two pytest runs) are serialized with a lock file beside
STATE_DIR, so they never start two clusters at once.

Nothing starts SLURM before pytest (CI runs only ``python -m pytest``): every test that submits jobs or runs SLURM
commands must take a session-scoped fixture calling ``ensure_local_slurm()``, as tests/cluster/test_slurm.py does.

Usage in a test module or ``conftest.py``::

    import pytest
    from support.slurm_cluster import ensure_local_slurm   # tests/ is on sys.path (pyproject's pytest pythonpath)

    @pytest.fixture(scope="session")
    def slurm_cluster_env() -> dict[str, str]:
        return ensure_local_slurm()

    @pytest.fixture
    def slurm_env(slurm_cluster_env, monkeypatch, tmp_path):
        for key, value in slurm_cluster_env.items():
            monkeypatch.setenv(key, value)   # sbatch/sacct/submitit in this process find the cluster
        return slurm_cluster_env

    def test_submitit_ranks(slurm_env, tmp_path):
        import submitit
        executor = submitit.AutoExecutor(folder=tmp_path / "%j", cluster="slurm")  # job ids restart at 1 after a
        executor.update_parameters(tasks_per_node=2, slurm_partition="debug", timeout_min=5)  # fresh start: use
        job = executor.submit(lambda: submitit.JobEnvironment().global_rank)                   # per-test folders
        assert job.results() == [0, 1]   # several tasks: results(), or job.task(0).result()

Subprocesses get the cluster with ``subprocess.run([...], env={**os.environ, **slurm_env})``.

What the cluster offers (see tools/README.md): nodes ``n1`` and ``n2``, both in the partitions ``debug`` (default),
``gpu_p5``, ``gpu_p6``, ``gpu_p13``, each with the features ``a100,h100,v100-32g`` and ``--gres=gpu:N`` up to 8
(fake devices, CUDA_VISIBLE_DEVICES is set); accounts ``root`` (default) and ``abc@a100``, ``abc@h100``,
``abc@v100``; Jean Zay's QoS names with their MaxWall.
The script needs root; it leaves the cluster running (``tools/local-slurm.sh stop`` stops it).
"""

from __future__ import annotations

import fcntl
import os
import shlex
import signal
import subprocess
import time
from pathlib import Path

from support.runs import REPO

SCRIPT = REPO / "tools" / "local-slurm.sh"
DEFAULT_STATE_DIR = Path("/tmp/llmft-slurm")


class LocalSlurmError(RuntimeError):
    """tools/local-slurm.sh could not start the cluster (the message holds its output)."""


def read_env_file(path: Path) -> dict[str, str]:
    """The variables of an env.sh made of `export NAME=VALUE` lines (VALUE shell-quoted)."""
    env = {}
    for line in Path(path).read_text().splitlines():
        words = shlex.split(line, comments=True)
        if len(words) == 2 and words[0] == "export" and "=" in words[1]:
            name, value = words[1].split("=", 1)
            env[name] = value
    return env


NUM_NODES = 2


def state_dir_of(state_dir: str | os.PathLike | None = None) -> Path:
    return Path(state_dir or os.environ.get("LLMFT_SLURM_STATE_DIR") or DEFAULT_STATE_DIR).resolve()


def ensure_local_slurm(state_dir: str | os.PathLike | None = None, timeout: float = 900,
                       nodes: int = NUM_NODES) -> dict[str, str]:
    """Start the local SLURM cluster with `nodes` nodes unless it runs so (idempotent) and return the env vars to
    use it; a node whose slurmd died is started again and returned to service.

    Raises LocalSlurmError with the script's stdout and stderr when it fails or times out (the timeout covers a
    package installation on a fresh CI machine).
    """
    state = state_dir_of(state_dir)
    state.parent.mkdir(parents=True, exist_ok=True)
    with open(state.parent / f".{state.name}.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        return _start(state, timeout, nodes)


def kill_node(node: str, state_dir: str | os.PathLike | None = None) -> list[int]:
    """The node dies: SIGKILL to its slurmd and to every process started under it (slurmstepd, the job's tasks),
    found as the processes in the slurmd's UTS namespace (tools/local-slurm.sh starts each node's slurmd in its own).
    Returns the pids killed. `ensure_local_slurm()` brings the node back."""
    pid_file = state_dir_of(state_dir) / "run" / f"slurmd-{node}.pid"
    slurmd = int(pid_file.read_text().strip())
    namespace = os.readlink(f"/proc/{slurmd}/ns/uts")
    if namespace == os.readlink("/proc/self/ns/uts"):
        raise LocalSlurmError(f"slurmd {node} ({slurmd}) shares this machine's UTS namespace: not a node of a "
                              f"multi-node cluster")
    victims = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if os.readlink(entry / "ns" / "uts") == namespace:
                    victims.append(int(entry.name))
            except OSError:  # gone, or a kernel thread
                continue
    for pid in victims:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    deadline = time.time() + 10
    while time.time() < deadline and any(_running(pid) for pid in victims):
        time.sleep(0.05)
    return victims


def _running(pid: int) -> bool:
    """The process exists and is not a zombie (a killed daemon waits for this machine's init to reap it)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except (OSError, IndexError):
        return False


def _start(state: Path, timeout: float, nodes: int) -> dict[str, str]:
    command = ["bash", str(SCRIPT), "start", "--nodes", str(nodes), str(state)]
    try:
        proc = subprocess.run(command, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired as error:
        raise LocalSlurmError(f"{shlex.join(command)} timed out after {timeout:.0f} s\n"
                              f"--- stdout\n{_text(error.stdout)}\n--- stderr\n{_text(error.stderr)}") from error
    except OSError as error:
        raise LocalSlurmError(f"cannot run {shlex.join(command)}: {error}") from error
    if proc.returncode != 0:
        raise LocalSlurmError(f"{shlex.join(command)} failed with exit status {proc.returncode}\n"
                              f"--- stdout\n{proc.stdout}\n--- stderr\n{proc.stderr}")
    env_file = state / "env.sh"
    env = read_env_file(env_file) if env_file.is_file() else {}
    if "SLURM_CONF" not in env:
        raise LocalSlurmError(f"{shlex.join(command)} succeeded but {env_file} has no SLURM_CONF\n"
                              f"--- stdout\n{proc.stdout}\n--- stderr\n{proc.stderr}")
    return env


def _text(data: str | bytes | None) -> str:
    if data is None:
        return ""
    return data.decode(errors="replace") if isinstance(data, bytes) else data
