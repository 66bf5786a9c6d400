"""The package's shape, checked on its source (docs/design.md, "Module layout"): ranks only in
moe_dist.parallel, procedures callable without the command line, short functions, and the
run folder's file names spelled in one module."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "moe_dist"
SOURCES = sorted(PACKAGE.rglob("*.py"))
MAX_FUNCTION_LINES = 60


def _imports(path: Path) -> set[str]:
    """Every module name ``path`` imports (at any depth: lazy imports count)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def _relative(path: Path) -> str:
    return str(path.relative_to(PACKAGE.parent))


def test_the_sources_were_found():
    assert len(SOURCES) > 40 and PACKAGE / "train" / "trainer.py" in SOURCES


def test_torch_distributed_is_used_only_inside_moe_dist_parallel():
    offenders = [_relative(p) for p in SOURCES if "parallel" not in p.relative_to(PACKAGE).parts[:1]
                 and any(n == "torch.distributed" or n.startswith("torch.distributed.") for n in _imports(p))]
    assert offenders == []


def test_procedures_do_not_import_the_command_line():
    offenders = [_relative(p) for p in (PACKAGE / "experiments").glob("*.py")
                 if any(n == "moe_dist.cli" or n.startswith("moe_dist.cli.") for n in _imports(p))]
    assert offenders == []


def test_no_function_is_longer_than_sixty_lines():
    long = []
    for path in SOURCES:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    long.append(f"{_relative(path)}:{node.lineno} {node.name} ({lines} lines)")
    assert long == []


@pytest.mark.parametrize("name", ["metrics.json", "config.yaml"])
def test_run_folder_file_names_are_spelled_only_by_rundir(name):
    """Code (not docstrings or comments) names the run folder's files in moe_dist/rundir.py alone."""
    offenders = []
    for path in SOURCES:
        if path.name == "rundir.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and node.value == name:
                offenders.append(f"{_relative(path)}:{node.lineno}")
    assert offenders == []
