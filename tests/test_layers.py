"""The package's layers import in one direction, the algorithm knows neither torch nor vLLM, no module is a
grab bag (docs/design.md shows the layers)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "ouroboros_vllm"
# Lowest first: a module may import its own layer and those before it, never one after it.
LAYERS = ["files", "algorithm", "runtime", "vllm_plugin", "tools"]
# Third-party packages each layer must not import (at any depth: a lazy import inside a function counts).
FORBIDDEN = {
    "files": {"numpy", "torch", "transformers", "vllm"},
    "algorithm": {"torch", "transformers", "vllm"},
    "runtime": {"vllm"},
}
MAX_LINES = 300


def modules() -> dict[str, Path]:
    """Dotted name -> file, for every module of the package but its root ``__init__`` (the lazy entry point)."""
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        if name != "ouroboros_vllm":
            found[name] = path
    return found


def imports(path: Path) -> set[str]:
    """Every module ``path`` imports, at any depth (absolute names)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found |= {f"{node.module}.{alias.name}" for alias in node.names}
    return found


def layer(name: str) -> str:
    return name.split(".")[1]


def internal(name: str, known: dict[str, Path]) -> str | None:
    """The package module ``name`` refers to (``from pkg import module`` names the module), if any."""
    while name.startswith("ouroboros_vllm."):
        if name in known:
            return name
        name = name.rsplit(".", 1)[0]
    return None


def test_every_module_belongs_to_a_layer():
    assert {layer(name) for name in modules()} == set(LAYERS)


def test_layers_import_in_one_direction():
    known = modules()
    wrong = []
    for name, path in known.items():
        for target in filter(None, (internal(i, known) for i in imports(path))):
            if LAYERS.index(layer(target)) > LAYERS.index(layer(name)):
                wrong.append(f"{name} imports {target}")
    assert not wrong, "\n".join(wrong)


@pytest.mark.parametrize("layer_name", sorted(FORBIDDEN))
def test_lower_layers_do_not_import_heavy_packages(layer_name):
    wrong = [
        f"{name} imports {module}"
        for name, path in modules().items()
        if layer(name) == layer_name
        for module in imports(path)
        if module.split(".")[0] in FORBIDDEN[layer_name]
    ]
    assert not wrong, "\n".join(wrong)


def test_the_algorithm_runs_without_torch_or_vllm():
    names = [name for name in modules() if layer(name) == "algorithm"]
    code = (
        "import sys\n"
        + "".join(f"import {name}\n" for name in names)
        + "print(sorted(m for m in ('torch', 'transformers', 'vllm') if m in sys.modules))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


def test_no_import_cycle():
    known = modules()
    graph = {
        name: {t for t in (internal(i, known) for i in imports(path)) if t and t != name}
        for name, path in known.items()
    }
    state: dict[str, str] = {}

    def visit(node: str, stack: list[str]) -> None:
        state[node] = "open"
        stack = stack + [node]
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                pytest.fail("import cycle: " + " -> ".join(stack[stack.index(nxt) :] + [nxt]))
            if nxt not in state:
                visit(nxt, stack)
        state[node] = "done"

    for name in sorted(graph):
        if name not in state:
            visit(name, [])


def test_no_module_is_a_grab_bag():
    long = {name: n for name, path in modules().items() if (n := len(path.read_text().splitlines())) > MAX_LINES}
    assert not long, f"modules over {MAX_LINES} lines: {long}"
