"""Install per role, from a built wheel: `zorba-edge[server]` gives a working server without
torch, `zorba-edge[client]` the model side without the server's dependencies, and in each
venv the other role's commands refuse in one line naming the install that fixes them.

The server venv is built in CI (about 40 s: no torch). The client venv needs torch and
transformers (minutes, GBs), so it is built only when ZORBA_TEST_CLIENT_WHEEL=1; its
dependency list and its refusals are checked without it below."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
import zipfile
from email.parser import Parser
from pathlib import Path

import pytest
from packaging.requirements import Requirement

from zorba_common import __version__
from zorba_common.roles import COMMANDS, EXIT_MISSING_ROLE, launch

REPO = Path(__file__).resolve().parents[1]
SERVER_ONLY = {"scipy", "prometheus-client", "psycopg"}
CLIENT_ONLY = {"torch", "transformers", "tokenizers", "gguf", "bitsandbytes", "psutil", "nvidia-ml-py",
               "rich"}
# Where the dev/CI machines keep the CPU torch: a bare `torch` requirement pulls the CUDA build.
CPU_TORCH = "torch==2.13.0"


def test_importing_the_server_and_its_cli_never_imports_torch() -> None:
    # A fresh interpreter: this one has imported torch for other tests already.
    code = ("import sys, zorba_server.cli, zorba_server.app, zorba_server.storage; "
            "heavy = sorted(m for m in ('torch', 'transformers', 'bitsandbytes', 'gguf') "
            "if m in sys.modules); print(heavy); sys.exit(1 if heavy else 0)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, f"the server imported {done.stdout.strip()}: {done.stderr[-2000:]}"


def test_a_command_of_a_missing_role_refuses_in_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    absent = {"torch", "transformers"}
    code = launch("zorba-edge", ["run", "--server", "http://x"], importable=lambda m: m not in absent)
    err = capsys.readouterr().err
    assert code == EXIT_MISSING_ROLE
    assert err.count("\n") == 1 and "torch, transformers" in err
    assert "pip install 'zorba-edge[client]'" in err


def test_version_answers_even_where_the_role_is_missing(capsys: pytest.CaptureFixture[str]) -> None:
    for prog in COMMANDS:
        assert launch(prog, ["--version"], importable=lambda m: False) == 0
        assert capsys.readouterr().out == f"{prog} {__version__}\n"


@pytest.mark.parametrize("module, prog", [("zorba_edge", "zorba-edge"), ("zorba_server", "zorba-server"),
                                          ("zorba_sim", "zorba-simulate"), ("zorba_lab", "zorba-quickstart")])
def test_python_dash_m_runs_each_command(module: str, prog: str) -> None:
    done = subprocess.run([sys.executable, "-m", module, "--version"], capture_output=True, text=True,
                          timeout=120, cwd=REPO)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout == f"{prog} {__version__}\n"


@pytest.fixture(scope="module")
def source_copy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # Builds run in a copy: building writes build/ and egg-info beside the sources.
    src = tmp_path_factory.mktemp("build") / "src"
    shutil.copytree(REPO, src, ignore=shutil.ignore_patterns(
        ".venv*", ".git", "build", "dist", "*.egg-info", "__pycache__", ".pytest_cache", ".ruff_cache",
        "runs", ".env"))
    return src


@pytest.fixture(scope="module")
def wheel(source_copy: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    src = source_copy
    done = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                           "-w", str(out), str(src)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    (built,) = out.glob("zorba_edge-*.whl")
    return built


def _metadata(wheel: Path) -> tuple[dict[str, set[str]], list[str], str]:
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
        metadata = next(n for n in names if n.endswith(".dist-info/METADATA"))
        meta = Parser().parsestr(zf.read(metadata).decode())
    by_extra: dict[str, set[str]] = {}
    for line in meta.get_all("Requires-Dist") or []:
        req = Requirement(line)
        extras = [e for e in ("client", "server", "lab", "flower", "flower-simulation", "test")
                  if req.marker is not None and req.marker.evaluate({"extra": e, "sys_platform": "linux"})]
        for extra in extras or [""]:
            by_extra.setdefault(extra, set()).add(req.name)
    return by_extra, names, meta.as_string()


def test_the_wheel_splits_its_dependencies_by_role(wheel: Path) -> None:
    by_extra, names, meta = _metadata(wheel)
    assert not (by_extra[""] & (SERVER_ONLY | CLIENT_ONLY)), "base dependencies must serve both roles"
    assert by_extra["client"] >= CLIENT_ONLY and not by_extra["client"] & SERVER_ONLY
    assert by_extra["server"] >= SERVER_ONLY and not by_extra["server"] & CLIENT_ONLY
    assert "License-Expression: Apache-2.0" in meta and "Project-URL:" in meta and "Classifier:" in meta
    assert any(n.endswith("licenses/LICENSE") for n in names)
    assert any("/data/share/doc/zorba-edge/guide/" in n for n in names), "the user's guide is not installed"
    assert any(n.endswith("/data/share/doc/zorba-edge/systemd/zorba-edge.service") for n in names)
    assert not any(n.startswith("tests/") for n in names)


def _clean_env() -> dict[str, str]:
    # A venv of its own: nothing of this checkout (PYTHONPATH, an egg-info) may stand in for
    # the installed wheel.
    return {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}


def test_the_sdist_ships_the_guide_and_the_fleet_kit_and_leaves_the_tests_out(
        source_copy: Path, tmp_path: Path) -> None:
    code = f"from setuptools import build_meta; print(build_meta.build_sdist({str(tmp_path)!r}))"
    done = subprocess.run([sys.executable, "-c", code], cwd=source_copy, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    with tarfile.open(tmp_path / done.stdout.strip().splitlines()[-1]) as tar:
        names = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
    assert {"LICENSE", "docs/guide/install.md", "deploy/compose.yaml", "deploy/server/Dockerfile",
            "requirements/base.txt", "zorba_common/roles.py"} <= names
    assert not any(n.startswith(("tests/", "benchmarks/")) for n in names)


def _venv(path: Path, *requirements: str) -> Path:
    subprocess.run([sys.executable, "-m", "venv", str(path)], check=True, timeout=300)
    done = subprocess.run([str(path / "bin" / "python"), "-m", "pip", "install", "-q", *requirements],
                          capture_output=True, text=True, timeout=900, env=_clean_env(), cwd=path)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    return path / "bin"


def _run(bin_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(bin_dir / args[0]), *args[1:]], capture_output=True, text=True, timeout=300,
                          env=_clean_env(), cwd=bin_dir)


def _assert_refuses(done: subprocess.CompletedProcess[str], extra: str) -> None:
    assert done.returncode == EXIT_MISSING_ROLE, done.stderr[-2000:]
    assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr, done.stderr
    assert f"pip install 'zorba-edge[{extra}]'" in done.stderr


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_the_server_role_runs_the_server_without_torch(wheel: Path, tmp_path: Path) -> None:
    bin_dir = _venv(tmp_path / "server", f"{wheel}[server]")
    helped = _run(bin_dir, "zorba-server", "--help")
    assert helped.returncode == 0 and "usage: zorba-server" in helped.stdout, helped.stderr[-2000:]
    guide = tmp_path / "server" / "share" / "doc" / "zorba-edge" / "guide"
    assert str(guide) in helped.stdout.replace("\n", "")
    version = _run(bin_dir, "python", "-m", "zorba_server", "--version")
    assert version.stdout == f"zorba-server {__version__}\n"
    no_torch = _run(bin_dir, "python", "-c", "import torch")
    assert no_torch.returncode != 0 and "No module named 'torch'" in no_torch.stderr
    _assert_refuses(_run(bin_dir, "zorba-edge", "run", "--server", "http://127.0.0.1:1", "--data", "x"),
                    "client")
    _assert_refuses(_run(bin_dir, "python", "-m", "zorba_sim"), "lab")
    _assert_refuses(_run(bin_dir, "zorba-quickstart"), "lab")
    assert _run(bin_dir, "zorba-edge", "--version").stdout == f"zorba-edge {__version__}\n"


@pytest.mark.slow
@pytest.mark.timeout(1800)
@pytest.mark.skipif(os.environ.get("ZORBA_TEST_CLIENT_WHEEL") != "1",
                    reason="installs torch and transformers (GBs): set ZORBA_TEST_CLIENT_WHEEL=1")
def test_the_client_role_runs_the_client_without_server_dependencies(wheel: Path, tmp_path: Path) -> None:
    bin_dir = _venv(tmp_path / "client", CPU_TORCH, f"{wheel}[client]")
    helped = _run(bin_dir, "zorba-edge", "export", "--help")
    assert helped.returncode == 0 and "usage: zorba-edge export" in helped.stdout, helped.stderr[-2000:]
    no_scipy = _run(bin_dir, "python", "-c", "import scipy")
    assert no_scipy.returncode != 0
    _assert_refuses(_run(bin_dir, "zorba-server"), "server")
    _assert_refuses(_run(bin_dir, "python", "-m", "zorba_lab"), "lab")
