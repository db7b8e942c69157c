"""The fleet kit in deploy/: systemd units that systemd accepts, a compose file that wires the
server to PostgreSQL, a server image that installs the server role only. Docker does not run
on the CI machine, so the image is checked by reading it (its install step, `pip install
'zorba-edge[server]'` from the wheel, is what test_server_install.py runs in a venv)."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

if sys.version_info >= (3, 11):
    import tomllib
else:
    import tomli as tomllib

REPO = Path(__file__).resolve().parents[1]
DEPLOY = REPO / "deploy"
UNITS = sorted((DEPLOY / "systemd").glob("*.service"))


def _unit(path: Path) -> dict[str, str]:
    """key -> value of a unit file (the last one wins, as systemd reads single-valued keys)."""
    entries = re.findall(r"^(\w+)=(.*)$", path.read_text(), flags=re.M)
    return dict(entries)


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
@pytest.mark.parametrize("unit", UNITS, ids=lambda p: p.name)
def test_systemd_accepts_the_unit(unit: Path, tmp_path: Path) -> None:
    # verify checks that ExecStart's program exists: point it at a stand-in under tmp_path.
    text = unit.read_text()
    for program in re.findall(r"^ExecStart=(\S+)", text, flags=re.M):
        stand_in = tmp_path / program.lstrip("/")
        stand_in.parent.mkdir(parents=True, exist_ok=True)
        stand_in.write_text("#!/bin/sh\n")
        stand_in.chmod(0o755)
        text = text.replace(f"ExecStart={program}", f"ExecStart={stand_in}")
    copy = tmp_path / unit.name
    copy.write_text(text)
    done = subprocess.run(["systemd-analyze", "verify", "--man=no", str(copy)], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0 and not done.stderr.strip(), done.stderr


@pytest.mark.parametrize("unit", UNITS, ids=lambda p: p.name)
def test_units_run_in_the_foreground_and_restart_on_failure_only(unit: Path) -> None:
    keys = _unit(unit)
    assert keys["Type"] == "exec" and keys["Restart"] == "on-failure" and keys["KillSignal"] == "SIGTERM"
    assert "--daemon" not in keys["ExecStart"]
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert Path(keys["ExecStart"].split()[0]).name in scripts


def test_compose_wires_the_server_to_postgres_without_secrets_in_argv() -> None:
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    server, postgres = compose["services"]["server"], compose["services"]["postgres"]
    assert (REPO / server["build"]["context"].replace("..", ".") / server["build"]["dockerfile"]).is_file()
    assert server["depends_on"]["postgres"]["condition"] == "service_healthy" and "healthcheck" in postgres
    db = server["command"][server["command"].index("--db") + 1]
    assert db == f"postgresql://{postgres['environment']['POSTGRES_USER']}@postgres:5432/" \
                 f"{postgres['environment']['POSTGRES_DB']}"
    assert "PGPASSWORD" in server["environment"] and "ZORBA_ENROLMENT_SECRET" in server["environment"]
    env_keys = set(re.findall(r"^(\w+)=", (DEPLOY / "env.example").read_text(), flags=re.M))
    assert env_keys == {"POSTGRES_PASSWORD", "ZORBA_ENROLMENT_SECRET"}


def test_the_server_image_installs_the_server_role_from_the_checkout() -> None:
    dockerfile = (DEPLOY / "server" / "Dockerfile").read_text()
    for source in re.findall(r"^COPY (?!--from)(.+) \S+$", dockerfile, flags=re.M):
        for path in source.split():
            assert (REPO / path).exists(), f"the Dockerfile copies {path}, which is not in the repository"
    assert '"${whl}[server]"' in dockerfile and "torch" not in dockerfile.split("FROM python")[2]
    assert re.search(r'^VOLUME \["/var/lib/zorba"\]', dockerfile, flags=re.M)
    assert re.search(r'^CMD \["--db", "/var/lib/zorba/', dockerfile, flags=re.M)
    assert re.search(r"^USER zorba$", dockerfile, flags=re.M)
