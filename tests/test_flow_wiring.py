"""Flows only wire: every computation is a Prefect task (retried, visible in the UI), so flow
modules import no solver, kernel or torch, and what they call from the task layer are tasks."""
from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest
from prefect import Task

FLOWS_DIR = Path(__file__).resolve().parents[1] / "flows"
# layerquant.tasks.progress is exempt below: the UI's progress bar (a Prefect artifact), no work of the run's
FLOW_MODULES = sorted(p for p in FLOWS_DIR.glob("*.py") if p.name != "__init__.py")
# the math layers, and the libraries that only math needs
FORBIDDEN_IMPORTS = ("layerquant.solvers", "layerquant.kernels", "torch", "numpy", "safetensors", "pulp", "transformers")
# tensor methods: a flow that calls one is doing math on data it should only pass by reference
TENSOR_METHODS = {"float", "half", "bfloat16", "double", "to", "cuda", "cpu", "numpy", "contiguous", "view", "reshape",
                  "matmul", "sum", "mean", "abs", "detach", "clone"}


def imports_of(tree: ast.Module) -> list[tuple[str, list[str]]]:
    """(module, names imported from it) for every import in the file, at any depth."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(alias.name, []) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.append((node.module, [alias.name for alias in node.names]))
    return found


def forbidden(module: str) -> bool:
    return any(module == f or module.startswith(f + ".") for f in FORBIDDEN_IMPORTS)


@pytest.mark.parametrize("path", FLOW_MODULES, ids=lambda p: p.name)
def test_flow_module_imports_no_math(path):
    tree = ast.parse(path.read_text(), filename=str(path))
    bad = [module for module, _ in imports_of(tree) if forbidden(module)]
    assert not bad, f"{path.name} imports {bad}: move the computation into a task"


@pytest.mark.parametrize("path", FLOW_MODULES, ids=lambda p: p.name)
def test_flow_module_calls_no_tensor_methods(path):
    tree = ast.parse(path.read_text(), filename=str(path))
    calls = [f"line {node.lineno}: .{node.func.attr}()" for node in ast.walk(tree)
             if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in TENSOR_METHODS]
    assert not calls, f"{path.name} does tensor operations: {calls}"


@pytest.mark.parametrize("path", FLOW_MODULES, ids=lambda p: p.name)
def test_flow_module_takes_only_tasks_from_the_task_layer(path):
    """A helper function imported from tasks/ would run inside the flow: no retries, not in the UI."""
    tree = ast.parse(path.read_text(), filename=str(path))
    for module, names in imports_of(tree):
        if module.startswith("layerquant.tasks") and module != "layerquant.tasks.progress":
            loaded = importlib.import_module(module)
            not_tasks = [name for name in names if not isinstance(getattr(loaded, name), Task)]
            assert not not_tasks, f"{path.name} imports {not_tasks} from {module}, which are not tasks"


def test_the_checks_see_a_violation():
    """The criteria catch what they are meant to (a test that can never fail proves nothing)."""
    tree = ast.parse("import torch\nfrom layerquant.solvers.allocation import more_generous\nx = w.float()\n")
    assert [m for m, _ in imports_of(tree) if forbidden(m)] == ["torch", "layerquant.solvers.allocation"]
    assert any(isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute) and n.func.attr in TENSOR_METHODS for n in ast.walk(tree))
    from layerquant.tasks import planning

    assert not isinstance(planning.higgs_coefficient, Task) and isinstance(planning.fit_higgs, Task)


def test_flow_tasks_have_readable_names_and_retry_transient_failures():
    """Every task a flow calls shows up in the UI under a run name and retries I/O failures."""
    from layerquant.tasks.context import retry_transient

    for path in FLOW_MODULES:
        tree = ast.parse(path.read_text(), filename=str(path))
        for module, names in imports_of(tree):
            if not module.startswith("layerquant.tasks") or module == "layerquant.tasks.progress":
                continue
            loaded = importlib.import_module(module)
            for name in names:
                task = getattr(loaded, name)
                assert task.task_run_name, f"{module}.{name} has no task_run_name"
                assert task.retries >= 1 and task.retry_condition_fn is retry_transient, f"{module}.{name} does not retry"
