"""The house rules of avmp_triton/ that a reader relies on (issue 9), checked on the source text:
no function longer than 80 lines, no import of another module's private names, and no reading of
another object's private attributes outside memory/ (where the model mirrors the allocator)."""
import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "avmp_triton"
MAX_LINES = 80
SOURCES = sorted(PACKAGE.rglob("*.py"))


def _tree(path: Path) -> ast.Module:
    return ast.parse(path.read_text(), filename=str(path))


def _where(path: Path, node) -> str:
    return f"{path.relative_to(PACKAGE.parent)}:{node.lineno}"


def test_the_walk_sees_every_layer():
    layers = {p.parent.name for p in SOURCES}
    assert {"memory", "kernels", "ops", "reference", "engine", "sim"} <= layers, layers


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(PACKAGE.parent)))
def test_house_rules(path):
    long, private_imports, private_reads = [], [], []
    for node in ast.walk(_tree(path)):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            n = node.end_lineno - node.lineno + 1
            if n > MAX_LINES:
                long.append(f"{_where(path, node)} {node.name}: {n} lines")
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("avmp_triton"):
            private_imports += [f"{_where(path, node)} {node.module}.{a.name}" for a in node.names
                                if a.name.startswith("_") and a.name != "_triton_env"]
        elif (isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__")
              and not (isinstance(node.value, ast.Name) and node.value.id in ("self", "cls"))
              and path.parent.name != "memory"):
            private_reads.append(f"{_where(path, node)} {ast.unparse(node)}")
    assert not long, f"functions over {MAX_LINES} lines: {long}"
    assert not private_imports, f"private names imported from other modules: {private_imports}"
    assert not private_reads, f"private attributes of other objects read: {private_reads}"


PERF_SCRIPTS = sorted((PACKAGE.parent / "perf").glob("*.py"))


@pytest.mark.parametrize("path", PERF_SCRIPTS, ids=lambda p: p.name)
def test_perf_scripts_parse(path):
    """The GPU benchmarks run only on a lent device: a syntax error must show here, not there."""
    compile(path.read_text(), str(path), "exec")
