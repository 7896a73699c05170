"""A non-editable install works: the wheel carries the config groups and the samples, and an installed copy, run
outside the source tree, composes its config and trains.

The wheel is built offline from a copy of the source tree (what git tracks plus new files it does not ignore), with
`pip wheel --no-build-isolation` (setuptools is already installed: torch requires it). It is installed into a fresh
venv without its dependencies; a .pth file then lets that venv import them from the venv running the tests. That
.pth adds the directory as a plain path, so its .pth files (the editable install's finder) are not run: `llmft`
comes from the new venv only, which the tests check.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

from support.runs import REPO

pytestmark = pytest.mark.slow

COPY_IGNORE = shutil.ignore_patterns(".git", ".venv", "venv", "build", "dist", "*.egg-info", "__pycache__", "runs",
                                     "multirun", "outputs", ".pytest_cache")


def copy_source(dest: Path) -> Path:
    """The source tree without build outputs, virtualenvs or runs: git's files when git knows the tree."""
    try:
        listed = subprocess.run(["git", "-C", str(REPO), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                                capture_output=True, check=True, timeout=60).stdout.decode().split("\0")
    except (OSError, subprocess.SubprocessError):
        shutil.copytree(REPO, dest, ignore=COPY_IGNORE)
        return dest
    for name in filter(None, listed):
        source = REPO / name
        if source.is_file():  # a tracked file deleted in the work tree is skipped
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, dest / name)
    return dest


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    return {**env, "OMP_NUM_THREADS": "1", **extra}


def run(command: list[str], cwd: Path, timeout: float = 600, env: dict | None = None) -> subprocess.CompletedProcess:
    result = subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env or clean_env())
    assert result.returncode == 0, f"{command} exited {result.returncode}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("wheel")
    source = copy_source(root / "src")
    run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q",
         "-w", str(root / "dist"), str(source)], cwd=root)
    wheels = list((root / "dist").glob("llmft-*.whl"))
    assert len(wheels) == 1, wheels
    return wheels[0]


@pytest.fixture(scope="module")
def venv(wheel, tmp_path_factory) -> Path:
    """A fresh venv with the wheel installed (no dependencies), seeing the test venv's packages through a .pth."""
    root = tmp_path_factory.mktemp("venv") / "venv"
    run([sys.executable, "-m", "venv", "--without-pip", str(root)], cwd=root.parent)
    python = root / "bin" / "python"
    # installed before the .pth exists, so pip sees no llmft already installed (the editable one of the test venv)
    run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "--no-index", "-q", str(wheel)],
        cwd=root.parent)
    paths = run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], cwd=root.parent)
    site_packages = Path(paths.stdout.strip())
    ours = dict.fromkeys(sysconfig.get_paths()[key] for key in ("purelib", "platlib"))
    (site_packages / "_llmft_test_deps.pth").write_text("".join(f"{path}\n" for path in ours))
    return root


def test_the_wheel_holds_every_config_group_and_the_samples(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    package = REPO / "llmft"
    # the source tree's top-level conf/ is the wheel's llmft/conf/
    expected = {"llmft/" + path.relative_to(REPO).as_posix() for path in (REPO / "conf").rglob("*.yaml")}
    expected |= {path.relative_to(REPO).as_posix() for path in (package / "data" / "samples").iterdir() if path.is_file()}
    assert "llmft/conf/config.yaml" in expected and any(n.startswith("llmft/conf/model/") for n in expected)
    assert "llmft/data/samples/tickets_sample.chat.jsonl" in expected
    assert sorted(expected - names) == []
    # nothing outside the package (no top-level conf/, tests/ or tools/)
    assert all(n.startswith(("llmft/", "llmft-")) for n in names), sorted(n for n in names if not n.startswith("llmft"))


def test_the_installed_wheel_composes_its_config_outside_the_source_tree(venv, tmp_path):
    python = str(venv / "bin" / "python")
    where = run([python, "-c", "import llmft, llmft.config.compose as c, torch; print(llmft.__file__); "
                               "print(c.CONF_DIR); import sys; print(*sys.path, sep='\\n')"], cwd=tmp_path)
    llmft_file, conf_dir, *path = where.stdout.splitlines()
    assert Path(llmft_file).is_relative_to(venv), llmft_file
    assert Path(conf_dir).is_relative_to(venv) and (Path(conf_dir) / "config.yaml").is_file(), conf_dir
    assert str(REPO) not in path, path
    job = run([python, "-m", "llmft.launch", "--cfg", "job"], cwd=tmp_path)
    assert "model:" in job.stdout and "name: tiny" in job.stdout and "train:" in job.stdout, job.stdout
    script = run([str(venv / "bin" / "llmft"), "launch", "--cfg", "job", "model=llama7b"], cwd=tmp_path)
    assert "name: llama7b" in script.stdout, script.stdout


def test_the_installed_wheel_trains_outside_the_source_tree(venv, tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    run_dir = tmp_path / "run"
    result = run([str(venv / "bin" / "python"), "-m", "llmft.launch", "train.max_steps=5", "train.log_every=1",
                  "train.eval_every=5", "train.save_every=0", f"run_dir={run_dir}"], cwd=work)
    assert f"run dir: {run_dir}" in result.stdout, result.stdout
    assert (run_dir / "final" / "adapter_config.json").is_file()
