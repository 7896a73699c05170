"""The layers hold: imports point down (launch -> serve -> training -> data -> clients -> rundir -> config -> errors),
never in a circle, and the login-node commands import no torch, transformers, peft or deepspeed."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from support.runs import REPO

PACKAGE = REPO / "llmft"
# Top to bottom. A module may import from its own layer and the layers below it, never above.
LAYERS = ["launch", "serve", "training", "data", "clients", "rundir", "config", "errors"]
ENTRY_POINTS = {"llmft.cli", "llmft.train", "llmft.plan", "llmft.runs", "llmft.eval", "llmft.chat", "llmft.export",
                "llmft.models", "llmft.launch.__main__", "llmft.data.__main__", "llmft"}
HEAVY = ("torch", "transformers", "peft", "deepspeed")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def llmft_imports(path: Path, known: set[str]) -> set[str]:
    """Every llmft module `path` imports, at the top or inside functions (`from llmft.x import y`: x.y if a module)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [f"{node.module}.{alias.name}" if f"{node.module}.{alias.name}" in known else node.module
                     for alias in node.names]
        else:
            continue
        found.update(n for n in names if n == "llmft" or n.startswith("llmft."))
    return found


def import_graph() -> dict[str, set[str]]:
    files = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    return {name: llmft_imports(path, set(files)) - {name} for name, path in files.items()}


def layer_of(module: str) -> str | None:
    parts = module.split(".")
    if len(parts) < 2:
        return None
    if parts[1] == "config" and len(parts) > 2 and parts[2] == "data_schema":
        return "config"
    return parts[1] if parts[1] in LAYERS else None


def test_imports_point_down_the_layers():
    wrong = []
    for module, imports in import_graph().items():
        if module in ENTRY_POINTS or layer_of(module) is None:
            continue
        for target in imports:
            if target == "llmft" or layer_of(target) is None:
                continue
            if LAYERS.index(layer_of(target)) < LAYERS.index(layer_of(module)):
                wrong.append(f"{module} -> {target}")
    assert not wrong, "imports that run up the layers: " + ", ".join(sorted(wrong))


def test_no_import_circle_between_llmft_modules():
    graph = import_graph()
    # Tarjan's strongly connected components: any component of more than one module is a circle
    index, low, stack, on_stack, circles, counter = {}, {}, [], set(), [], [0]

    def visit(node: str) -> None:
        index[node] = low[node] = counter[0]
        counter[0] += 1
        stack.append(node)
        on_stack.add(node)
        for target in graph.get(node, ()):
            if target not in graph:
                continue
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                circles.append(sorted(component))

    for node in graph:
        if node not in index:
            visit(node)
    assert not circles, f"import circles: {circles}"


def heavy_imports(*command: str, cwd: Path = REPO) -> list[str]:
    """The heavy packages a command imports, read from `python -X importtime` (every import, lazy ones included)."""
    result = subprocess.run([sys.executable, "-X", "importtime", *command], cwd=cwd, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    imported = {line.rsplit("|", 1)[-1].strip() for line in result.stderr.splitlines() if line.startswith("import time:")}
    return sorted(name for name in imported if name.split(".")[0] in HEAVY)


@pytest.mark.parametrize("command", [
    ["-m", "llmft.plan", "+cluster=jeanzay", "cluster.account=abc", "model=llama3_8b"],
    ["-m", "llmft.plan"],
    ["-m", "llmft.launch", "--cfg", "job"],
    ["-m", "llmft.runs", "/nonexistent-runs-root"],
    ["-m", "llmft.models", "list"],
    ["-c", "import llmft.launch.command, llmft.launch.plan, llmft.launch.runs, llmft.launch.slurm, "
           "llmft.launch.estimate, llmft.launch.models, llmft.launch.model_import, llmft.config.validation, "
           "llmft.config.known_models, llmft.rundir.create, llmft.rundir.files, llmft.rundir.status, "
           "llmft.rundir.lock, llmft.rundir.checkpoints, llmft.rundir.lifetime"],
], ids=["plan-jeanzay", "plan-local", "launch-cfg-job", "runs", "models-list", "import-launch-layer"])
def test_the_login_node_commands_import_no_torch(command):
    assert heavy_imports(*command) == []


def test_tests_do_not_import_from_other_test_modules():
    wrong = []
    for path in (REPO / "tests").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("test_"):
                wrong.append(f"{path.name} imports {node.module}")
            if isinstance(node, ast.Import):
                wrong += [f"{path.name} imports {a.name}" for a in node.names if a.name.startswith("test_")]
    assert not wrong, wrong
