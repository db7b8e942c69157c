"""The server runs without torch: importing it never imports torch, and `make server-install`
gives a virtual environment where `zorba-server` works and torch is absent."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def test_importing_the_server_and_its_cli_never_imports_torch() -> None:
    # A fresh interpreter: this one has imported torch for other tests already.
    code = ("import sys, zorba_server.cli, zorba_server.app, zorba_server.storage; "
            "heavy = sorted(m for m in ('torch', 'transformers', 'bitsandbytes', 'gguf') "
            "if m in sys.modules); print(heavy); sys.exit(1 if heavy else 0)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, f"the server imported {done.stdout.strip()}: {done.stderr[-2000:]}"


@pytest.mark.slow
def test_make_server_install_gives_a_working_server_without_torch(tmp_path: Path) -> None:
    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    venv = tmp_path / "server-venv"
    # The build runs in a copy: `pip install .` writes build/ and egg-info beside the sources.
    src = tmp_path / "src"
    shutil.copytree(REPO, src, ignore=shutil.ignore_patterns(
        ".venv", ".git", "build", "*.egg-info", "__pycache__", ".pytest_cache", ".ruff_cache", "runs"))
    done = subprocess.run(["make", "-C", str(src), "server-install", f"VENV={venv}",
                           f"PYTHON={sys.executable}"], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    helped = subprocess.run([str(venv / "bin" / "zorba-server"), "--help"], capture_output=True,
                            text=True, timeout=120)
    assert helped.returncode == 0, helped.stderr[-2000:]
    assert "usage: zorba-server" in helped.stdout
    no_torch = subprocess.run([str(venv / "bin" / "python"), "-c", "import torch"],
                              capture_output=True, text=True, timeout=120)
    assert no_torch.returncode != 0 and "No module named 'torch'" in no_torch.stderr
