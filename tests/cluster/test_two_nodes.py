"""On the two nodes n1 and n2 of tools/local-slurm.sh: a run submitted with llmft's launcher across both nodes trains
like the same number of local DDP ranks (under ddp and hsdp), and a run whose second node dies mid-run fails, says
why, and resumes.

The nodes are two slurmd on this machine, each in its own UTS and mount namespaces (hostname n1 / n2, the names
resolvable inside jobs): the rendezvous (MASTER_ADDR=n1, the port rank 0 publishes), the SLURM variables of the
second node (SLURM_NODEID=1, its own SLURM_LOCALID 0..) and the failure of one node are the real ones.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from support.runs import REPO, read_metrics
from support.slurm_cluster import ensure_local_slurm, kill_node
from support.torchrun import COMMON, FROM_DISK

pytestmark = pytest.mark.slow

# long enough to kill the second node while it trains (a step takes ~0.3 s here), with a checkpoint before
STEPS = ["train.max_steps=30", "train.log_every=1", "train.eval_every=15", "train.save_every=5", "peft.dropout=0"]
TWO_NODES = ["+cluster=localslurm", "cluster.nodes=2"]
LIVE = {"PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "REQUEUED"}


@pytest.fixture(scope="session")
def slurm_env() -> dict[str, str]:
    """The two-node cluster (started unless it runs), as in tests/cluster/test_slurm.py."""
    return ensure_local_slurm()


def llmft_command(args: list[str]) -> list[str]:
    return [sys.executable, "-m", "llmft.launch", *args]


def llmft(args: list[str], env: dict, timeout: float = 400) -> subprocess.CompletedProcess:
    return subprocess.run(llmft_command(args), cwd=REPO, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **env})


def losses(run_dir: Path) -> list[float]:
    return [r["loss"] for r in read_metrics(run_dir) if "loss" in r]


def job_ids(run_dir: Path) -> list[str]:
    return [json.loads(line)["job_id"] for line in (run_dir / "jobs.jsonl").read_text().splitlines()]


def sacct(job_id: str, fields: str, env: dict) -> list[str]:
    out = subprocess.run(["sacct", "-j", job_id, "-X", "-n", "-P", "-o", fields], env={**os.environ, **env},
                         capture_output=True, text=True, timeout=30).stdout
    return out.strip().splitlines()[-1].split("|") if out.strip() else []


def job_state(job_id: str, env: dict) -> str:
    """The job's state by sacct ("" before sacct knows it; CANCELLED without its "by UID")."""
    return (sacct(job_id, "State", env) or [""])[0].split(" ")[0]


def wait_until(condition, timeout: float, what: str, poll: float = 0.2):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(poll)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def rank_placements(run_dir: Path, job_id: str) -> set[tuple]:
    """(hostname, SLURM_NODEID, local rank, global rank) of each task, from the line submitit writes in each task's
    log when it starts (its JobEnvironment reads SLURM_NODEID, SLURM_LOCALID and SLURM_PROCID)."""
    pattern = re.compile(r"Starting with JobEnvironment\(job_id=\d+, hostname=(\S+), local_rank=(\d+)\(\d+\), "
                         r"node=(\d+)\(\d+\), global_rank=(\d+)\(\d+\)\)")
    seen = set()
    for log in (run_dir / "slurm").glob(f"{job_id}_*_log.out"):
        for host, local_rank, node, rank in pattern.findall(log.read_text()):
            seen.add((host, int(node), int(local_rank), int(rank)))
    return seen


class LocalRuns:
    """The local torchrun runs the two-node runs are compared with, started in the background at once (they
    overlap with the SLURM jobs) and waited for when their losses are asked. (The 4-rank one is conftest.py's
    local_four_rank_runs, shared with tests/training/test_hsdp.py.)"""

    def __init__(self, root: Path):
        self.root, self.procs = root, {}
        for nproc in (2,):
            run_dir = root / f"local{nproc}"
            command = llmft_command(["parallelism=ddp", f"launch.nproc={nproc}", *STEPS, f"run_dir={run_dir}"])
            with open(root / f"local{nproc}.log", "w") as log:
                self.procs[nproc] = subprocess.Popen(command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                                                     env={**os.environ, "OMP_NUM_THREADS": "1"})

    def losses(self, nproc: int) -> list[float]:
        code = self.procs[nproc].wait(timeout=600)
        assert code == 0, (self.root / f"local{nproc}.log").read_text()[-3000:]
        return losses(self.root / f"local{nproc}")

    def stop(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()


@pytest.fixture(scope="module")
def local_runs(tmp_path_factory):
    runs = LocalRuns(tmp_path_factory.mktemp("local"))
    yield runs
    runs.stop()


def test_two_nodes_by_two_tasks_give_the_local_four_rank_ddp_losses_under_ddp_and_hsdp(slurm_env, local_runs,
                                                                                       local_four_rank_runs, tmp_path):
    """Two jobs at once, ddp and hsdp. Ranks 0 and 1 on n1, 2 and 3 on n2 (each node its own SLURM_NODEID and local
    ranks 0, 1), the rendezvous on n1, and the losses of four local DDP ranks. hsdp shards within a node's two ranks
    (shard_size 0: one node's, from SLURM's node count) and replicates across the nodes: each rank holds half of
    every parameter. The model is read from disk (each rank its rows under hsdp), in the config of the local 4-rank
    runs of tests/training/test_hsdp.py (conftest.py's local_four_rank_runs), whose ddp run is the reference.
    (local_runs: the next test's, started here to overlap with these jobs.)"""
    base, local_dirs, local = local_four_rank_runs
    jobs = {}
    for strategy in ("ddp", "hsdp"):
        run_dir, log = tmp_path / strategy, tmp_path / f"{strategy}.log"
        command = llmft_command([*TWO_NODES, "cluster.gpus_per_node=2", "launch.wait=true", f"parallelism={strategy}",
                                 *COMMON, *FROM_DISK, f"model.path={base}", f"run_dir={run_dir}"])
        with open(log, "w") as out:
            jobs[strategy] = subprocess.Popen(command, cwd=REPO, stdout=out, stderr=subprocess.STDOUT,
                                              env={**os.environ, "OMP_NUM_THREADS": "1", **slurm_env})
    local.results()  # started now unless tests/training/test_hsdp.py ran it: it overlaps with the jobs
    expected = losses(local_dirs["ddp"])
    for strategy, launcher in jobs.items():
        run_dir, log = tmp_path / strategy, tmp_path / f"{strategy}.log"
        assert launcher.wait(timeout=600) == 0, log.read_text()[-3000:]
        summary = json.loads((run_dir / "summary.json").read_text())
        assert summary["status"] == "completed" and summary["world_size"] == 4, summary
        assert summary["strategy"] == strategy, summary
        assert "#SBATCH --nodes=2" in (run_dir / "submit.sbatch").read_text()
        [job_id] = job_ids(run_dir)
        assert sacct(job_id, "NodeList,NNodes", slurm_env) == ["n[1-2]", "2"]
        assert rank_placements(run_dir, job_id) == {("n1", 0, 0, 0), ("n1", 0, 1, 1), ("n2", 1, 0, 2),
                                                    ("n2", 1, 1, 3)}
        assert json.loads((run_dir / f"slurm/rendezvous-{job_id}-0.json").read_text())["host"] == "n1"  # MASTER_ADDR
        assert losses(run_dir) == pytest.approx(expected, abs=1e-5), strategy
    sharding = json.loads((tmp_path / "hsdp/summary.json").read_text())["sharding_rank0"]
    assert sharding["sharded_params"] > 0 and sharding["local_numel"] * 2 == pytest.approx(sharding["global_numel"],
                                                                                            rel=0.05), sharding


def test_a_run_whose_second_node_dies_fails_says_why_and_resumes_to_the_local_two_rank_losses(
        slurm_env, local_runs, tmp_path):
    """2 nodes x 1 task. n2 dies (its slurmd, slurmstepd and rank are SIGKILLed) while the run trains: rank 0 on n1
    fails in its next collective and says so in summary.json; once n2 is back the job ends FAILED, `llmft.runs`
    shows the run failed with that one-line reason, and `llmft.launch resume=RUN_DIR` continues it on both nodes
    from its last checkpoint to the end: the whole loss curve is the local two-rank one."""
    env = {**os.environ, **slurm_env}
    run_dir = tmp_path / "run"
    submitted = llmft([*TWO_NODES, "cluster.gpus_per_node=1", *STEPS, f"run_dir={run_dir}"], slurm_env)
    assert submitted.returncode == 0, submitted.stdout + submitted.stderr
    [job_id] = job_ids(run_dir)
    try:
        def training_after_a_checkpoint():
            summary = run_dir / "summary.json"
            assert not summary.exists(), f"the run ended before n2 was killed: {summary.read_text()}"
            return (run_dir / "checkpoints/step_5").is_dir() and (run_dir / "metrics.jsonl").exists() \
                and len(losses(run_dir)) >= 7

        wait_until(training_after_a_checkpoint, 300, "the job to train past its first checkpoint", poll=0.1)
        assert rank_placements(run_dir, job_id) == {("n1", 0, 0, 0), ("n2", 1, 0, 1)}
        killed = kill_node("n2")
        assert len(killed) >= 3, killed  # slurmd, slurmstepd, the rank (and its helpers)

        def failed_summary():
            path = run_dir / "summary.json"
            return path.exists() and json.loads(path.read_text())["status"] == "failed"

        wait_until(failed_summary, 120, "rank 0 to record the failure in summary.json")
    finally:
        ensure_local_slurm()  # n2 comes back: its slurmd again, the node resumed (the next tests need both nodes)
    wait_until(lambda: job_state(job_id, slurm_env) not in {"", *LIVE}, 120, f"job {job_id} to end once n2 is back")
    assert sacct(job_id, "State,NodeList", slurm_env) == ["FAILED", "n[1-2]"]
    error = json.loads((run_dir / "summary.json").read_text())["error"]
    assert error and "\n" not in error, error

    listed = subprocess.run([sys.executable, "-m", "llmft.runs", str(tmp_path)], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=60)
    assert listed.returncode == 0 and re.search(r"^run +failed +" + job_id, listed.stdout, re.M), listed.stdout
    shown = subprocess.run([sys.executable, "-m", "llmft.runs", "show", str(run_dir)], cwd=REPO, env=env,
                           capture_output=True, text=True, timeout=60)
    assert f"error: {error}" in shown.stdout.splitlines(), shown.stdout

    resumed = llmft([f"resume={run_dir}", "launch.wait=true"], slurm_env)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    step = int(re.search(r"resume: .* from step (\d+)", resumed.stdout).group(1))
    assert step >= 5 and step % 5 == 0, resumed.stdout
    first, second = job_ids(run_dir)
    assert first == job_id and sacct(second, "NodeList", slurm_env) == ["n[1-2]"]
    wait_until(lambda: job_state(second, slurm_env) == "COMPLETED", 30, f"sacct to show job {second} completed")
    assert "resume: from" in "".join(p.read_text() for p in (run_dir / "slurm").glob(f"{second}_0_log.*"))
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["world_size"] == 2, summary
    assert losses(run_dir) == pytest.approx(local_runs.losses(2), abs=1e-5)
    nodes = subprocess.run(["sinfo", "-h", "-N", "-p", "debug", "-o", "%N %T"], env=env, capture_output=True,
                           text=True, timeout=30).stdout.split()
    assert nodes[0::2] == ["n1", "n2"] and set(nodes[1::2]) <= {"idle", "mixed", "allocated"}, nodes  # usable
