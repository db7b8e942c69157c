"""A throwaway PostgreSQL server for the store tests: initdb + pg_ctl in a temporary folder,
listening on a unix socket only, started by the tests themselves and removed after them."""

from __future__ import annotations

import glob
import itertools
import os
import pwd
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

INSTALL_HINT = ("PostgreSQL server binaries (initdb, pg_ctl) not found: install them with "
                "`apt-get install postgresql-15` (.ci/run does)")


def find_bin_dir() -> Path | None:
    """Where initdb and pg_ctl are: on PATH, or Debian's /usr/lib/postgresql/<version>/bin."""
    on_path = shutil.which("initdb")
    if on_path is not None and shutil.which("pg_ctl") is not None:
        return Path(on_path).resolve().parent
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), reverse=True)
    return Path(candidates[0]).parent if candidates else None


@dataclass
class PostgresServer:
    bin_dir: Path
    data: Path
    socket_dir: Path
    user: str | None
    """The OS user the server runs as when the tests run as root (PostgreSQL refuses root)."""
    _names: Iterator[int] = itertools.count()

    def _run(self, *args: str) -> None:
        command = [str(self.bin_dir / args[0]), *args[1:]]
        if self.user is not None:
            pw = pwd.getpwnam(self.user)
            command = ["setpriv", f"--reuid={pw.pw_uid}", f"--regid={pw.pw_gid}", "--clear-groups",
                       *command]
        done = subprocess.run(command, capture_output=True, text=True, timeout=120)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(args[:2])} failed: {done.stdout}{done.stderr}")

    def start(self) -> None:
        self._run("pg_ctl", "start", "-w", "-D", str(self.data), "-l", str(self.data / "log"),
                  "-o", f"-c listen_addresses='' -c unix_socket_directories='{self.socket_dir}'")

    def stop(self, mode: str = "fast") -> None:
        """`immediate` is a crash: no checkpoint, the server recovers from its WAL on start."""
        self._run("pg_ctl", "stop", "-w", "-D", str(self.data), "-m", mode)

    def conninfo(self, dbname: str = "postgres") -> str:
        return f"host={self.socket_dir} user=zorba dbname={dbname}"

    def new_database(self) -> str:
        """A fresh, empty database; its libpq key=value connection string."""
        return self.conninfo(self._create_database())

    def new_database_url(self) -> str:
        """A fresh, empty database as the `postgresql://` URL `zorba-server --db` takes."""
        return f"postgresql://zorba@/{self._create_database()}?host={self.socket_dir}"

    def _create_database(self) -> str:
        import psycopg

        name = f"t{os.getpid()}_{next(self._names)}"
        with psycopg.connect(self.conninfo(), autocommit=True) as conn:
            conn.execute(f"CREATE DATABASE {name}")
        return name


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    bin_dir = find_bin_dir()
    if bin_dir is None:
        if os.environ.get("CI"):  # .ci/run installs them: a skip there would hide a gap
            pytest.fail(INSTALL_HINT)
        pytest.skip(INSTALL_HINT)
    # Not pytest's tmp_path: its parents are private to root, and the server may run as
    # another user; a short path also keeps the socket's name under its length limit.
    root = Path(tempfile.mkdtemp(prefix="zorba-pg-"))
    user = None
    if os.geteuid() == 0:
        user = "postgres" if _user_exists("postgres") else "nobody"
        os.chown(root, pwd.getpwnam(user).pw_uid, pwd.getpwnam(user).pw_gid)
    server = PostgresServer(bin_dir, root / "data", root, user)
    server._run("initdb", "-D", str(server.data), "-U", "zorba", "--auth=trust", "-E", "UTF8",
                "--no-sync")
    server.start()
    try:
        yield server
    finally:
        try:
            server.stop("immediate")
        finally:
            shutil.rmtree(root, ignore_errors=True)


def _user_exists(name: str) -> bool:
    try:
        pwd.getpwnam(name)
    except KeyError:
        return False
    return True
