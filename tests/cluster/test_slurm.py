"""On the real SLURM of tools/local-slurm.sh (two nodes; these jobs use one): submission through submitit,
sbatch --test-only of every template and rendered script, a USR2 while a submitit job loads (nothing to save,
requeue) then mid-run (checkpoint, requeue, resume), and while a template job loads, and a failing job."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file

from llmft.config.compose import compose
from support.runs import REPO, read_metrics
from support.slurm_cluster import ensure_local_slurm

pytestmark = pytest.mark.slow

TINY = ["train.max_steps=40", "train.log_every=1", "train.eval_every=20", "train.save_every=0", "peft.dropout=0"]
# the jobs whose loss curves are compared with local_two_rank_ddp's: 6 steps show a curve as well as 40 (the start-up
# of each rank costs more than all of its steps)
SHORT = ["train.max_steps=6", "train.log_every=1", "train.eval_every=6", "train.save_every=0", "peft.dropout=0",
         "parallelism.zero3_param_persistence_threshold=0", "parallelism.zero3_model_persistence_threshold=0"]


@pytest.fixture(scope="session")
def slurm_env() -> dict[str, str]:
    """Starts the local SLURM cluster unless it runs (CI does not start it beforehand): every test here takes this
    fixture, so running any one of them alone gets the cluster. A failure to start fails the tests, never skips."""
    return ensure_local_slurm()


def llmft(args: list[str], env: dict, timeout: float = 400) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "llmft.launch", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "OMP_NUM_THREADS": "1", **env})


def losses(run_dir: Path) -> list[float]:
    return [r["loss"] for r in read_metrics(run_dir) if "loss" in r]


def job_id_of(run_dir: Path) -> str:
    return json.loads((run_dir / "jobs.jsonl").read_text().splitlines()[-1])["job_id"]


class LocalRun:
    """`llmft.launch` of a local run, started in the background (it overlaps with the SLURM jobs it is compared
    with) and waited for when its run directory is asked."""

    def __init__(self, run_dir: Path, args: list[str]):
        self.run_dir, self.log = run_dir, run_dir.parent / f"{run_dir.name}.log"
        with open(self.log, "w") as log:
            self.process = subprocess.Popen([sys.executable, "-m", "llmft.launch", *args, f"run_dir={run_dir}"],
                                            cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                                            env={**os.environ, "OMP_NUM_THREADS": "1"})

    def finished(self) -> Path:
        assert self.process.wait(timeout=600) == 0, self.log.read_text()[-3000:]
        return self.run_dir

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()  # the launcher stops its torchrun and ranks
            self.process.wait(timeout=60)


@pytest.fixture(scope="module")
def local_two_rank_ddp(tmp_path_factory):
    """The local 2-rank DDP run of SHORT that the SLURM jobs of SHORT must reproduce, once for the module."""
    run = LocalRun(tmp_path_factory.mktemp("local") / "ddp", ["parallelism=ddp", "launch.nproc=2", *SHORT])
    yield run
    run.stop()


@pytest.fixture
def start_local_run(tmp_path):
    """start_local_run(name, args): a LocalRun in tmp_path / name, stopped at the end of the test if it still runs."""
    runs = []
    yield lambda name, args: runs.append(LocalRun(tmp_path / name, args)) or runs[-1]
    for run in runs:
        run.stop()


def test_two_task_job_gives_the_local_two_rank_losses(slurm_env, local_two_rank_ddp, tmp_path):
    on_slurm = llmft(["+cluster=localslurm", "launch.wait=true", *SHORT, f"run_dir={tmp_path / 'slurm'}"], slurm_env)
    assert on_slurm.returncode == 0, on_slurm.stdout + on_slurm.stderr
    assert "submitted job" in on_slurm.stdout and f"run dir: {tmp_path / 'slurm'}" in on_slurm.stdout
    summary = json.loads((tmp_path / "slurm/summary.json").read_text())
    assert summary["status"] == "completed" and summary["world_size"] == 2 and summary["strategy"] == "ddp"
    assert len(losses(tmp_path / "slurm")) == 6
    assert losses(tmp_path / "slurm") == pytest.approx(losses(local_two_rank_ddp.finished()), abs=1e-6)
    assert (tmp_path / "slurm/submit.sbatch").read_text().count("#SBATCH --ntasks-per-node=2") == 1


def test_sbatch_accepts_every_template_and_rendered_script(slurm_env, tmp_path):
    from llmft.launch import slurm

    env = {**os.environ, **slurm_env}
    scripts = {
        "slurm/jeanzay_a100.sbatch": ["--account=abc@a100"],
        "slurm/jeanzay_h100.sbatch": ["--account=abc@h100"],
        "slurm/generic.sbatch": ["--partition=debug"],  # its placeholder partition `gpu` does not exist here
    }
    for gpu in ("a100", "h100", "v100"):
        cfg = compose(["+cluster=jeanzay", f"cluster.gpu={gpu}", "cluster.account=abc", "cluster.time=10:00:00"])
        script = tmp_path / f"jeanzay_{gpu}.sh"
        script.write_text(slurm.sbatch_script(slurm.make_executor(cfg, tmp_path / gpu)))
        scripts[str(script)] = []
    cfg = compose(["+cluster=slurm", "cluster.kinds.default.partition=debug"])
    generic = tmp_path / "generic.sh"
    generic.write_text(slurm.sbatch_script(slurm.make_executor(cfg, tmp_path / "generic")))
    scripts[str(generic)] = []
    for script, options in scripts.items():
        result = subprocess.run(["sbatch", "--test-only", *options, script], cwd=REPO, env=env, capture_output=True,
                                text=True, timeout=60)
        assert result.returncode == 0 and "to start at" in result.stderr, (script, result.stderr)


def test_usr2_while_loading_then_mid_run_requeues_twice_and_ends_like_an_uninterrupted_run(slurm_env,
                                                                                           start_local_run, tmp_path):
    """A submitit job: USR2 while its ranks load (nothing to save, one line, requeued), then USR2 mid-run in the next
    attempt (checkpoint, requeued), then the third attempt resumes and ends with the uninterrupted run's adapter."""
    run_dir = tmp_path / "slurm"
    # the signal comes at step 8 or later, and the requeued attempt still crosses an evaluation (step 15)
    long_run = ["train.max_steps=30", "train.log_every=1", "train.eval_every=15", "train.save_every=0"]
    submitted = llmft(["+cluster=localslurm", *long_run, f"run_dir={run_dir}"], slurm_env)
    assert submitted.returncode == 0, submitted.stderr
    job_id = job_id_of(run_dir)
    env = {**os.environ, **slurm_env}

    def logs() -> str:
        return "".join(p.read_text() for p in (run_dir / "slurm").glob("*_0_log.*"))

    deadline = time.time() + 400
    while time.time() < deadline and "llmft: model=" not in logs():
        time.sleep(0.1)  # the ranks have joined; the data and the model load next
    subprocess.run(["scancel", "--signal=USR2", job_id], env=env, check=True, timeout=30)
    while time.time() < deadline and "llmft: stopped by SIGUSR2" not in logs():
        time.sleep(0.05)  # (read before the next attempt's srun truncates the log)
    stopped = [line for line in logs().splitlines() if "llmft: stopped by SIGUSR2" in line]
    assert len(stopped) == 1 and "before training: nothing new to save; the SLURM job is requeued" in stopped[0], \
        logs()[-3000:]
    assert not (run_dir / "checkpoints").exists() or not list((run_dir / "checkpoints").glob("step_*"))
    while time.time() < deadline:  # requeued, then the next attempt trains
        if (run_dir / "metrics.jsonl").exists() and len(losses(run_dir)) >= 8:
            break
        time.sleep(0.2)
    subprocess.run(["scancel", "--signal=USR2", job_id], env=env, check=True, timeout=30)
    local = None
    while time.time() < deadline:  # requeued, resumed, completed
        summary = json.loads((run_dir / "summary.json").read_text()) if (run_dir / "summary.json").exists() else {}
        status = summary.get("status")
        if status in ("requeued", "interrupted") and summary.get("step", 0) >= 8 and local is None:  # 2nd stop
            # the uninterrupted run, overlapping with the requeued attempt; not before the job requeued itself: more
            # load then widens the window in which the requeue's SIGTERM ends `scontrol requeue` before it returns
            local = start_local_run("local", ["parallelism=ddp", "launch.nproc=2", *long_run])
        if status in ("completed", "failed"):
            break
        time.sleep(1)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "completed", summary
    assert "resume: from" in logs()
    attempts = subprocess.run(["sacct", "-j", job_id, "--duplicates", "-X", "-n", "-P", "-o", "State"], env=env,
                              capture_output=True, text=True, timeout=30).stdout.split()
    assert attempts[:2] == ["REQUEUED", "REQUEUED"] and len(attempts) == 3, attempts  # twice, then completed
    expected = load_file((local or start_local_run("local", ["parallelism=ddp", "launch.nproc=2", *long_run]))
                         .finished() / "final/adapter_model.safetensors")
    got = load_file(run_dir / "final/adapter_model.safetensors")
    assert all(torch.equal(expected[name], got[name]) for name in expected)


def test_a_failing_job_is_reported_as_failed_with_its_log(slurm_env, tmp_path):
    data = tmp_path / "no_answers.jsonl"
    data.write_text(json.dumps({"messages": [{"role": "user", "content": "hello?"}]}) + "\n")
    result = llmft(["+cluster=localslurm", "launch.wait=true", "data=chat_jsonl", f"data.path={data}",
                    *TINY, f"run_dir={tmp_path / 'run'}"], slurm_env)
    assert result.returncode == 1
    line = result.stderr.strip().splitlines()[-1]
    assert "failed" in line and "its log: " in line, result.stderr
    log = Path(line.split("its log: ")[1])
    assert log.exists() and log.stat().st_size > 0
    assert json.loads((tmp_path / "run/summary.json").read_text())["status"] == "failed"


def test_multirun_submits_one_job_per_combination_each_with_its_run_directory(slurm_env, tmp_path):
    result = llmft(["-m", "+cluster=localslurm", "train.lr=1e-4,3e-4", "train.max_steps=2",
                    f"runs_root={tmp_path}"], slurm_env)
    assert result.returncode == 0, result.stderr
    run_dirs = sorted(p for p in tmp_path.iterdir() if (p / "config.yaml").exists())
    assert len(run_dirs) == 2 and result.stdout.count("submitted job") == 2
    assert sorted(OmegaConf.load(d / "config.yaml").train.lr for d in run_dirs) == [1e-4, 3e-4]
    job_ids = [job_id_of(d) for d in run_dirs]
    assert len(set(job_ids)) == 2
    subprocess.run(["scancel", *job_ids], env={**os.environ, **slurm_env}, timeout=30)


def test_evaluation_after_training_is_a_dependent_job(slurm_env, tmp_path):
    """The training task would abort in the interpreter's teardown once done (tests/support/teardown_abort, as a
    library's leftover threads can): the job must still end COMPLETED, or the evaluation (afterok) never starts."""
    run_dir = tmp_path / "run"
    secret = "sk-test-judge-key-0123456789"
    aborting = {**slurm_env, "PYTHONPATH": str(REPO / "tests/support/teardown_abort")}
    result = llmft(["+cluster=localslurm", "eval.after_train=true",
                    f"eval.overrides=['eval.limit=2','eval.max_new_tokens=4','eval.judge_api_key={secret}']",
                    "train.max_steps=4", "train.eval_every=2", f"run_dir={run_dir}"], aborting)
    assert result.returncode == 0, result.stderr
    written = [p for p in run_dir.rglob("*") if p.is_file() and secret.encode() in p.read_bytes()]
    assert not written, f"the judge's key was written to {written}"  # it travels in the job's environment
    jobs = [json.loads(line) for line in (run_dir / "jobs.jsonl").read_text().splitlines()]
    train_job, eval_job = jobs[0]["job_id"], jobs[1]["job_id"]
    assert jobs[1]["kind"] == "eval" and jobs[1]["after"] == train_job
    env = {**os.environ, **slurm_env}
    shown = subprocess.run(["scontrol", "show", "job", eval_job], env=env, capture_output=True, text=True).stdout
    assert f"Dependency=afterok:{train_job}" in shown or "JobState=COMPLETED" in shown or "RUNNING" in shown, shown
    deadline = time.time() + 300
    while time.time() < deadline and not (run_dir / "eval/report.json").exists():
        shown = subprocess.run(["scontrol", "show", "job", eval_job], env=env, capture_output=True, text=True).stdout
        assert "DependencyNeverSatisfied" not in shown, f"the training job did not end COMPLETED: {shown}"
        time.sleep(1)
    assert (run_dir / "eval/report.json").exists(), "the evaluation job did not write its report"


def test_the_sbatch_templates_train_one_synchronised_model(slurm_env, local_two_rank_ddp, tmp_path):
    """The templates prepare the run without a cluster (launch.prepare_only) and srun the ranks: `auto` must become
    ddp from the job's 2 tasks (not `single` from the preparing process), and DeepSpeed must find LOCAL_RANK."""
    env = {**os.environ, **slurm_env, "OMP_NUM_THREADS": "1",
           "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
           "BASH_FUNC_module%%": "() {  :\n}"}  # Jean Zay's `module load` lines: a no-op here
    jobs = {  # `auto` on the Jean Zay template (the ranks settle it alike under every one); ddp on the generic one: below
        "generic-fsdp": ("slurm/generic.sbatch", ["--partition=debug"], ["parallelism=fsdp"]),
        "generic-zero3": ("slurm/generic.sbatch", ["--partition=debug"], ["parallelism=zero3"]),
        "jeanzay-auto": ("slurm/jeanzay_a100.sbatch", ["--account=abc@a100", "--gres=gpu:2"], ["parallelism=auto"]),
    }
    job_ids = {}
    for name, (template, options, overrides) in jobs.items():
        submitted = subprocess.run(
            ["sbatch", "--parsable", "--ntasks-per-node=2", "--nodes=1", "--cpus-per-task=1", "--time=00:20:00",
             *options, str(REPO / template), *SHORT, *overrides],
            cwd=tmp_path, env={**env, "RUN_DIR": str(tmp_path / name)}, capture_output=True, text=True, timeout=60)
        assert submitted.returncode == 0, submitted.stderr
        job_ids[name] = submitted.stdout.strip().split(";")[0]
    local = local_two_rank_ddp.finished()
    deadline = time.time() + 600
    for name in jobs:
        summary = tmp_path / name / "summary.json"
        while time.time() < deadline and not summary.exists():
            time.sleep(1)
        logs = "".join(p.read_text() for p in tmp_path.glob(f"*-{job_ids[name]}.out"))
        assert summary.exists(), f"{name}: no summary; its log: {logs[-3000:]}"
        result = json.loads(summary.read_text())
        assert result["status"] == "completed" and result["world_size"] == 2, (name, result, logs[-3000:])
        assert result["strategy"] == {"auto": "ddp"}.get(name.split("-")[1], name.split("-")[1]), (name, result)
        assert losses(tmp_path / name) == pytest.approx(losses(local), abs=1e-4), name


def test_usr2_while_a_template_job_loads_requeues_it_and_the_next_attempt_completes(slurm_env, tmp_path):
    """USR2 before the first step (the ranks of an sbatch template job are loading the data and the model), sent to the
    batch shell, which passes it on: nothing to save, one line, the job requeues itself, and its next attempt trains
    from step 0 to the end."""
    env = {**os.environ, **slurm_env, "OMP_NUM_THREADS": "1",
           "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", "RUN_DIR": str(tmp_path / "run")}
    submitted = subprocess.run(
        ["sbatch", "--parsable", "--ntasks-per-node=2", "--nodes=1", "--cpus-per-task=1", "--time=00:20:00",
         "--partition=debug", str(REPO / "slurm/generic.sbatch"), *SHORT, "parallelism=ddp"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert submitted.returncode == 0, submitted.stderr
    job_id = submitted.stdout.strip().split(";")[0]
    log = tmp_path / f"llmft-{job_id}.out"
    deadline = time.time() + 300
    while time.time() < deadline and "llmft: model=" not in (log.read_text() if log.exists() else ""):
        time.sleep(0.1)  # the ranks have joined; the data and the model load next
    # to the batch shell only (as --signal=B:USR2 would): the template passes it on to the ranks
    subprocess.run(["scancel", "--batch", "--signal=USR2", job_id], env=env, check=True, timeout=30)
    summary = tmp_path / "run/summary.json"
    while time.time() < deadline and not (summary.exists() and json.loads(summary.read_text())["status"] in
                                          ("completed", "failed")):
        time.sleep(1)
    result = json.loads(summary.read_text())
    assert result["status"] == "completed" and result["steps"] == 6, (result, log.read_text()[-3000:])
    stopped = [line for line in log.read_text().splitlines() if "llmft: stopped by SIGUSR2" in line]
    assert len(stopped) == 1 and "before training: nothing new to save; the SLURM job is requeued" in stopped[0], \
        log.read_text()[-3000:]
    attempts = subprocess.run(["sacct", "-j", job_id, "--duplicates", "-X", "-n", "-P", "-o", "State"], env=env,
                              capture_output=True, text=True, timeout=30).stdout.split()
    assert len(attempts) >= 2 and attempts[0] == "REQUEUED", attempts
