"""Imports point one way: common <- config <- broker, worker, client <- tools <- supervisor <- cli.

Read from the source with `ast` (every import, including those inside functions), so a lazy import
that reaches up is caught as surely as a top-level one. Imports under ``if TYPE_CHECKING:`` are
annotations only and do not count. And the client library, what a client-only install imports,
loads none of the server's or the tools' heavy dependencies.
"""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import lipsync_cluster
from lipsync_cluster.common.extras import EXTRA_MODULES

PACKAGE = Path(lipsync_cluster.__file__).parent

# Tier of each top-level part of the package: a module may import its own part and lower tiers.
TIERS = {
    "lipsync_cluster": 0,  # the package itself: only __version__
    "common": 0,
    "config": 1,
    "gpu_select": 1,  # pure planning from the environment: usable by worker, supervisor and cli
    "broker": 2, "worker": 2, "client": 2,
    "tools": 3, "prepare": 3, "demo": 3, "gateway": 3, "integrations": 3,
    "supervisor": 4,
    "cli": 5,
}
# What a client-only install does not have: every extra's modules (the server's runtime, the tools').
HEAVY = tuple(sorted({m for modules in EXTRA_MODULES.values() for m in modules}))


def _part(module: str) -> str:
    parts = module.split(".")
    assert parts[0] == "lipsync_cluster", module
    return parts[1] if len(parts) > 1 else "lipsync_cluster"


def _module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or \
        (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(tree: ast.AST, module: str, is_package: bool):
    """(line, imported module) for every import of this package's own modules."""
    base = module.split(".") if is_package else module.split(".")[:-1]
    stack = [tree]
    while stack:
        node = stack.pop()
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child):
                stack.extend(child.orelse)  # the TYPE_CHECKING body is annotations only
                continue
            if isinstance(child, ast.Import):
                for alias in child.names:
                    if alias.name.split(".")[0] == "lipsync_cluster":
                        yield child.lineno, alias.name
            elif isinstance(child, ast.ImportFrom):
                if child.level:
                    anchor = base[:len(base) - (child.level - 1)]
                    target = ".".join(anchor + ([child.module] if child.module else []))
                else:
                    target = child.module or ""
                if target.split(".")[0] != "lipsync_cluster":
                    continue
                if target == "lipsync_cluster":  # `from .. import worker` names submodules
                    for alias in child.names:
                        yield child.lineno, f"lipsync_cluster.{alias.name}" if alias.name in TIERS else target
                else:
                    yield child.lineno, target
            stack.append(child)


def test_every_import_points_down():
    upward = []
    sources = sorted(PACKAGE.rglob("*.py"))
    assert len(sources) > 40, "the package's sources were found"
    for path in sources:
        module = _module_name(path)
        here = _part(module)
        assert here in TIERS, f"{module}: a new top-level part; give it a tier in this test"
        tree = ast.parse(path.read_text(), str(path))
        for line, target in _imports(tree, module, path.name == "__init__.py"):
            there = _part(target)
            assert there in TIERS, f"{path}:{line} imports {target}, a part with no tier"
            if there != here and there != "lipsync_cluster" and TIERS[there] >= TIERS[here]:
                upward.append(f"{path.relative_to(PACKAGE.parent)}:{line}: {here} (tier {TIERS[here]}) "
                              f"imports {target} (tier {TIERS[there]})")
    assert not upward, "imports that point up or sideways:\n" + "\n".join(upward)


def test_the_checker_sees_an_upward_import():
    """The walk above finds lazy, relative and from-package imports (a check that cannot fail is no check)."""
    src = ("from typing import TYPE_CHECKING\n"
           "if TYPE_CHECKING:\n    from ..config import Config\n"
           "def f():\n    from ..tools.render import render\n    from .. import worker\n")
    found = sorted(t for _, t in _imports(ast.parse(src), "lipsync_cluster.common.x", False))
    assert found == ["lipsync_cluster.tools.render", "lipsync_cluster.worker"]


def _loaded_after(statement: str) -> list[str]:
    probe = (f"import sys\n{statement}\n"
             f"print(' '.join(m for m in {HEAVY!r} if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return out.stdout.split()


@pytest.mark.processes
def test_the_client_library_loads_no_server_or_tool_dependency():
    assert _loaded_after("import lipsync_cluster.client") == []
    assert _loaded_after("from lipsync_cluster.client import Client, AsyncClient, StreamSession") == []


@pytest.mark.processes
def test_the_command_line_loads_no_server_or_tool_dependency():
    """`lipsync-cluster --help` and the management commands work on a client-only install."""
    assert _loaded_after("import lipsync_cluster.cli") == []
