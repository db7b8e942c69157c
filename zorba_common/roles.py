"""Which install role each command belongs to, and the launcher every console script goes through.

One distribution, two roles (extras): `pip install 'zorba-edge[client]'` brings the model side
(torch, transformers, gguf) and `pip install 'zorba-edge[server]'` the aggregation server's
(scipy, PostgreSQL, Prometheus); the simulator and the quickstart need both (`[lab]`). Every
command is installed in every role, so the launcher checks, before importing anything heavy,
that the command's role is importable here and otherwise refuses in one line naming the
install that fixes it, instead of a `ModuleNotFoundError` traceback from deep inside.

This module imports only the standard library: it must run in a venv that has neither role.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from zorba_common import __version__

EXIT_MISSING_ROLE = 2


@dataclass(frozen=True)
class Role:
    """An extra of the distribution: its name and the modules that prove it is installed."""

    extra: str
    modules: tuple[str, ...]


# Import names (not distribution names) of each role's requirements/*.txt; optional ones
# (bitsandbytes: CUDA only; psycopg: PostgreSQL only) are left out so a working install is
# never refused.
BASE = Role("", ("aiohttp", "msgpack", "numpy", "safetensors"))
CLIENT = Role("client", ("torch", "transformers", "tokenizers", "gguf", "psutil", "rich"))
SERVER = Role("server", ("scipy", "prometheus_client"))


@dataclass(frozen=True)
class Command:
    """A console script: the role(s) it needs, the extra that installs them, its real entry."""

    prog: str
    roles: tuple[Role, ...]
    extra: str
    target: str  # "module:function", imported only once the roles are present


COMMANDS = {c.prog: c for c in (
    Command("zorba-edge", (BASE, CLIENT), "client", "zorba_edge.client.cli:main"),
    Command("zorba-server", (BASE, SERVER), "server", "zorba_server.cli:main"),
    Command("zorba-simulate", (BASE, CLIENT, SERVER), "lab", "zorba_sim.cli:main"),
    Command("zorba-quickstart", (BASE, CLIENT, SERVER), "lab", "zorba_lab.quickstart:main"),
)}


def docs_location() -> str:
    """Where the user's guide is: installed with the package (share/doc/zorba-edge/guide), or the
    checkout's docs/guide when running from a source tree."""
    installed = Path(sys.prefix) / "share" / "doc" / "zorba-edge" / "guide"
    if installed.is_dir():
        return str(installed)
    source = Path(__file__).resolve().parents[1] / "docs" / "guide"
    return str(source) if source.is_dir() else "docs/guide/ in the zorba-edge source distribution"


def version_text(prog: str) -> str:
    return f"{prog} {__version__}"


def _importable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a broken parent package, or a module set to None
        return False


def missing_modules(command: Command, importable: Callable[[str], bool] = _importable) -> list[str]:
    return [m for role in command.roles for m in role.modules if not importable(m)]


def refusal(command: Command, missing: Sequence[str]) -> str:
    return (f"{command.prog}: this command needs {', '.join(missing)}, not installed in this "
            f"environment ({sys.prefix}): pip install 'zorba-edge[{command.extra}]'")


def launch(prog: str, argv: Sequence[str] | None = None,
           importable: Callable[[str], bool] = _importable) -> int:
    """Run the command `prog` if its role is installed here; else print one line and return 2.
    `--version` answers in any role."""
    command = COMMANDS[prog]
    args = list(sys.argv[1:] if argv is None else argv)
    missing = missing_modules(command, importable)
    if missing:
        if args == ["--version"]:
            print(version_text(prog))
            return 0
        print(refusal(command, missing), file=sys.stderr)
        return EXIT_MISSING_ROLE
    module, function = command.target.split(":")
    entry: Callable[[Sequence[str]], int] = getattr(importlib.import_module(module), function)
    return int(entry(args) or 0)


# The console scripts of pyproject.toml, one per command.
def zorba_edge() -> int:
    return launch("zorba-edge")


def zorba_server() -> int:
    return launch("zorba-server")


def zorba_simulate() -> int:
    return launch("zorba-simulate")


def zorba_quickstart() -> int:
    return launch("zorba-quickstart")
