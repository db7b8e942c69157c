"""Starting and stopping the demo's server and client processes.

Each process gets its own log file and process group, so a stop reaches it (and only it)
and a crash leaves its output for the reader. HF_HUB_OFFLINE=1 keeps everything local.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import sys
from dataclasses import dataclass
from pathlib import Path

import psutil

from zorba_common.errors import ZorbaError

LISTENING = re.compile(r"zorba-server listening on (https?://\S+)")


class DemoError(ZorbaError):
    """A demo process failed to start or died; the message names its log file."""


def offline_env(threads: int | None = None) -> dict[str, str]:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONUNBUFFERED="1")
    if threads is not None:
        # torch reads these at import; the clients' --threads sets the intra-op pool too.
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(threads)
    return env


@dataclass
class Managed:
    """One child process: its log, and the resident-memory peak sampled from outside."""

    name: str
    process: asyncio.subprocess.Process
    log_path: Path
    sampled_peak_rss: int = 0

    def sample_rss(self) -> int:
        """Current RSS (0 once gone); the kernel's VmHWM is the client's own (it resets it)."""
        try:
            rss = psutil.Process(self.process.pid).memory_info().rss
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            return 0
        self.sampled_peak_rss = max(self.sampled_peak_rss, rss)
        return rss

    @property
    def running(self) -> bool:
        return self.process.returncode is None

    def tail(self, lines: int = 15) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    async def stop(self, timeout_s: float = 30.0) -> int:
        """SIGTERM (clean stop), then SIGKILL after `timeout_s`; returns the exit code."""
        if self.running:
            self.process.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(self.process.wait(), timeout_s)
            except asyncio.TimeoutError:
                self.process.kill()
                await self.process.wait()
        return int(self.process.returncode or 0)


async def spawn(name: str, args: list[str], log_path: Path, env: dict[str, str]) -> Managed:
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "wb") as log:
        process = await asyncio.create_subprocess_exec(
            sys.executable, *args, stdout=log, stderr=asyncio.subprocess.STDOUT, env=env,
            stdin=asyncio.subprocess.DEVNULL, start_new_session=True)
    return Managed(name, process, log_path)


async def start_server(config_path: Path, log_path: Path, *, timeout_s: float = 120.0) -> tuple[
        Managed, str]:
    """`zorba-server --config FILE` on a free port; returns it and the URL it printed."""
    server = await spawn("server", ["-m", "zorba_server", "--config", str(config_path),
                                    "--port", "0", "--log-level", "WARNING"],
                         log_path, offline_env())
    loop = asyncio.get_running_loop()
    give_up = loop.time() + timeout_s
    while loop.time() < give_up:
        found = LISTENING.search(log_path.read_text(errors="replace"))
        if found:
            return server, found.group(1)
        if not server.running:
            raise DemoError(f"zorba-server exited with code {server.process.returncode}; its log "
                            f"{log_path} ends:\n{server.tail()}")
        await asyncio.sleep(0.2)
    await server.stop()
    raise DemoError(f"zorba-server did not start listening within {timeout_s:.0f} s; see {log_path}")
