"""The import rules docs/architecture.md states, checked on every module's imports (parsed with
`ast`: lazy imports inside functions and type-checking imports count too)."""

from __future__ import annotations

import ast
import functools
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BENCH = "zorba_lab.compare"
ROOMS = ("zorba_common", "zorba_edge", "zorba_server", "zorba_sim", "zorba_flower", "zorba_lab", BENCH)
PRODUCT = ("zorba_common", "zorba_edge", "zorba_server", "zorba_sim", "zorba_flower", "zorba_lab")
MAY_IMPORT = {
    "zorba_common": set(),
    "zorba_edge": {"zorba_common"},
    "zorba_server": {"zorba_common"},
    "zorba_sim": {"zorba_common", "zorba_edge", "zorba_server"},
    "zorba_flower": {"zorba_common", "zorba_edge", "zorba_server"},
    "zorba_lab": {"zorba_common", "zorba_edge", "zorba_server"},
    BENCH: {"zorba_common", "zorba_edge", "zorba_server", "zorba_sim", "zorba_lab"},
}
TORCH_IN_COMMON = {"zorba_common.noise"}
"""The one shared module that needs torch (a direction is tensor ops on the tensor's device)."""
MAX_SERVER_MODULE_LINES = 450
"""A server module longer than this is doing several jobs: split it (issue 28 split RoundEngine)."""


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def room(module: str) -> str:
    """The room of a module of ours: the bench package, else its top-level package."""
    return BENCH if module == BENCH or module.startswith(BENCH + ".") else module.split(".")[0]


def modules() -> dict[str, Path]:
    found = {}
    for package in PRODUCT:
        for path in sorted((ROOT / package).rglob("*.py")):
            found[module_name(path)] = path
    return found


MODULES = modules()


@functools.cache
def imports(path: Path) -> tuple[str, ...]:
    """Every module `path` imports, relative imports resolved to absolute names."""
    module = module_name(path)
    return imports_in(path.read_text(), module, is_package=path.name == "__init__.py")


def imports_in(text: str, module: str, *, is_package: bool = False) -> tuple[str, ...]:
    package = module if is_package else module.rpartition(".")[0]
    found: list[str] = []
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, ast.Import):
            found += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([base] if base else [])])
            found.append(base)
            # `from zorba_server import errors` imports the module zorba_server.errors
            found += [f"{base}.{alias.name}" for alias in node.names
                      if f"{base}.{alias.name}" in MODULES]
    return tuple(found)


def broken(source: str, module: str, names: tuple[str, ...]) -> list[str]:
    """The imports of `module` (in room `source`) that its room may not make."""
    return [f"{module} imports {name}" for name in names
            if ours(name) and room(name) != source and room(name) not in MAY_IMPORT[source]]


def ours(name: str) -> bool:
    return name.split(".")[0] in PRODUCT


@pytest.mark.parametrize("source", sorted(MAY_IMPORT))
def test_each_room_imports_only_the_rooms_it_may(source: str) -> None:
    found = sorted({line for module, path in MODULES.items() if room(module) == source
                    for line in broken(source, module, imports(path))})
    assert found == [], "docs/architecture.md's rooms: " + "; ".join(found)


def closure(start: str) -> set[str]:
    """`start` and every module of ours it imports, directly or through others."""
    seen, todo = set(), [start]
    while todo:
        module = todo.pop()
        if module in seen or module not in MODULES:
            continue
        seen.add(module)
        todo += [name for name in imports(MODULES[module]) if ours(name)]
    return seen


def imports_torch(module: str) -> bool:
    return any(name.split(".")[0] == "torch" for name in imports(MODULES[module]))


def test_the_server_never_imports_torch_not_even_through_a_shared_module() -> None:
    reached = set().union(*(closure(m) for m in MODULES if room(m) == "zorba_server"))
    assert sorted(m for m in reached if imports_torch(m)) == []
    assert not any(room(m) == "zorba_edge" for m in reached)


def test_in_the_shared_package_only_the_directions_need_torch() -> None:
    assert {m for m in MODULES if room(m) == "zorba_common" and imports_torch(m)} == TORCH_IN_COMMON


def test_the_checker_sees_a_lazy_or_relative_forbidden_import() -> None:
    # A rule that cannot fail proves nothing.
    lazy = "def f() -> None:\n    from zorba_edge.engine import zo\n"
    assert "zorba_server.x imports zorba_edge.engine" in broken(
        "zorba_server", "zorba_server.x", imports_in(lazy, "zorba_server.x"))
    relative = "from ..compare import stats\n"
    names = imports_in(relative, "zorba_lab.replay_x.y")
    assert names[0] == "zorba_lab.compare" and room(names[0]) == BENCH
    assert broken("zorba_lab", "zorba_lab.replay_x.y", names) != []


def too_long(paths: dict[str, Path], limit: int) -> list[str]:
    """The modules of `paths` with more than `limit` lines, with their length."""
    lengths = {module: len(path.read_text().splitlines()) for module, path in paths.items()}
    return [f"{module}: {n} lines" for module, n in sorted(lengths.items()) if n > limit]


def test_no_server_module_passes_the_line_limit() -> None:
    server = {module: path for module, path in MODULES.items() if room(module) == "zorba_server"}
    assert len(server) > 30  # the walk found the server's modules, its subpackages included
    assert too_long(server, MAX_SERVER_MODULE_LINES) == [], (
        f"docs/architecture.md: no zorba_server module passes {MAX_SERVER_MODULE_LINES} lines; "
        "move a cohesive part into a module of its own")


def test_the_line_limit_sees_a_long_module(tmp_path: Path) -> None:
    # A rule that cannot fail proves nothing.
    long, short = tmp_path / "long.py", tmp_path / "short.py"
    long.write_text("x = 1\n" * 451)
    short.write_text("x = 1\n" * 450)
    assert too_long({"long": long, "short": short}, 450) == ["long: 451 lines"]
