"""`zorba-edge run --daemon`: detach from the terminal, log to a file, keep a pid file.

The classic POSIX double fork: the first child starts a new session (no controlling
terminal), the second can never acquire one. The pid file is claimed with O_EXCL so two
daemons cannot share one state, and a stale file (its process gone) is taken over.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import sys
from pathlib import Path

from zorba_edge.client.errors import UsageError


def running_pid(pid_file: Path) -> int | None:
    """The pid in `pid_file` if that process is alive, else None."""
    try:
        pid = int(pid_file.read_text().strip())
    except (OSError, ValueError):
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:
        return pid  # alive, owned by someone else
    return pid


def claim_pid_file(pid_file: Path) -> None:
    """Write our pid to `pid_file`, or UsageError if a live daemon holds it."""
    pid_file.parent.mkdir(parents=True, exist_ok=True)
    other = running_pid(pid_file)
    if other is not None and other != os.getpid():
        raise UsageError(f"{pid_file}: a zorba-edge daemon already runs as pid {other}; stop it "
                         f"(kill {other}) or choose another --pid-file and --state")
    with contextlib.suppress(FileNotFoundError):
        pid_file.unlink()
    fd = os.open(pid_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    with os.fdopen(fd, "w") as handle:
        handle.write(f"{os.getpid()}\n")
    atexit.register(_release, pid_file, os.getpid())


def _release(pid_file: Path, pid: int) -> None:
    if running_pid(pid_file) == pid:
        with contextlib.suppress(OSError):
            pid_file.unlink()


def detach(log_file: Path, pid_file: Path) -> bool:
    """Fork into the background: False in the parent (which should exit), True in the daemon."""
    if os.name != "posix":
        raise UsageError("--daemon needs a POSIX system; on Windows run in the foreground "
                         "under a service manager")
    other = running_pid(pid_file)
    if other is not None:
        raise UsageError(f"{pid_file}: a zorba-edge daemon already runs as pid {other}")
    log_file.parent.mkdir(parents=True, exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    read_end, write_end = os.pipe()
    if os.fork() > 0:
        # Parent: wait until the daemon has its pid file, so the caller can rely on it.
        os.close(write_end)
        with os.fdopen(read_end, "rb") as ready:
            message = ready.read().decode()
        if message.startswith("error:"):
            raise UsageError(message[len("error:"):].strip())
        print(f"zorba-edge running in the background as pid {message.strip()}; log: {log_file}; "
              f"pid file: {pid_file}")
        return False
    os.close(read_end)
    os.setsid()
    if os.fork() > 0:
        os._exit(0)
    os.umask(0o022)
    try:
        claim_pid_file(pid_file)
    except (UsageError, OSError) as exc:
        os.write(write_end, f"error:{exc}".encode())
        os._exit(1)
    null = os.open(os.devnull, os.O_RDONLY)
    log_fd = os.open(log_file, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(null, 0)
    os.dup2(log_fd, 1)
    os.dup2(log_fd, 2)
    os.close(null)
    os.close(log_fd)
    os.write(write_end, str(os.getpid()).encode())
    os.close(write_end)
    return True
