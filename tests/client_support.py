"""Shared pieces of the client tests (not a test module): a tiny task with a learnable signal,
a tiny model saved with its tokenizer, and server/client subprocesses that tests can watch,
stop and kill. Nothing is downloaded."""

from __future__ import annotations

import json
import os
import queue
import random
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fixtures_text import make_tokenizer
from tiny_models import save_tiny_model, tiny_config
from transformers import PretrainedConfig, PreTrainedTokenizerFast

from zorba_edge.data.examples import ClassificationExample

SECRET = "client-test-secret"
REPO = Path(__file__).resolve().parents[1]
# One torch thread per process: several processes share two cores in these tests, and
# OpenMP threads that spin for a core another process holds make every step ~20x slower.
CHILD_ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "ZORBA_ENROLMENT_SECRET": SECRET,
             "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false"}


def signal_examples(count: int = 64, seed: int = 0) -> list[ClassificationExample]:
    """Four filler words and one cue word ('good' / 'bad') that decides the label."""
    rng = random.Random(seed)
    examples = []
    for i in range(count):
        label = i % 2
        words = [f"w{rng.randrange(100)}" for _ in range(4)] + ["good" if label else "bad"]
        rng.shuffle(words)
        examples.append(ClassificationExample(" ".join(words), label))
    return examples


def tiny_text_config(tokenizer: PreTrainedTokenizerFast, num_layers: int = 2) -> PretrainedConfig:
    return tiny_config("llama", num_layers=num_layers, hidden=32, vocab=len(tokenizer))


def write_jsonl(path: Path, examples: list[ClassificationExample]) -> Path:
    names = ("negative", "positive")
    path.write_text("".join(json.dumps({"text": e.text, "label": names[e.label]}) + "\n"
                            for e in examples))
    return path


@dataclass(frozen=True)
class TinyWorld:
    """A model directory (weights + tokenizer) and a JSONL data file for subprocess tests."""

    model_dir: Path
    data: Path


def make_world(root: Path) -> TinyWorld:
    tokenizer = make_tokenizer()
    model_dir = save_tiny_model(tiny_text_config(tokenizer), root / "model", seed=0)
    tokenizer.save_pretrained(model_dir)
    return TinyWorld(model_dir, write_jsonl(root / "data.jsonl", signal_examples()))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def server_toml(path: Path, db: Path, port: int, **run: Any) -> Path:
    settings = {"pool_size": 64, "lr": 0.03, "mu": 0.001, "batch_size": 8, "seq_len": 16,
                "round_duration_s": 8.0, "poll_timeout_s": 2.0, "max_steps": 8} | run
    lines = [f'enrolment_secret = "{SECRET}"', "[server]", 'host = "127.0.0.1"', f"port = {port}",
             "[storage]", f'path = "{db}"', 'synchronous = "normal"', "[run]"]
    lines += [f"{key} = {json.dumps(value)}" for key, value in settings.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


class Proc:
    """A child process whose output lines are collected as they come."""

    def __init__(self, args: list[str], log_path: Path, cwd: Path) -> None:
        self.args = args
        self.log_path = log_path
        env = os.environ | CHILD_ENV
        self.popen = subprocess.Popen(
            [sys.executable, *args], cwd=cwd, env=env, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, text=True, bufsize=1)
        self.lines: list[str] = []
        self._queue: queue.Queue[str | None] = queue.Queue()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.popen.stdout is not None
        with self.log_path.open("a") as log:
            for line in self.popen.stdout:
                log.write(line)
                log.flush()
                self._queue.put(line)
        self._queue.put(None)

    def _drain(self, timeout: float) -> bool:
        """Move queued lines to self.lines; False once the output has ended."""
        try:
            line = self._queue.get(timeout=timeout)
        except queue.Empty:
            return True
        if line is None:
            self._queue.put(None)
            return False
        self.lines.append(line)
        return True

    def wait_for(self, pattern: str, timeout: float = 60.0, *, count: int = 1) -> re.Match[str]:
        """The `count`-th output line matching `pattern` (waiting for it)."""
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        alive = True
        while True:
            matches = [m for m in map(regex.search, self.lines) if m]
            if len(matches) >= count:
                return matches[count - 1]
            if not alive or time.monotonic() >= deadline:
                raise AssertionError(
                    f"no line matching {pattern!r} (x{count}) from {' '.join(self.args[:3])} "
                    f"(exit {self.popen.poll()}); output:\n{self.output()}")
            alive = self._drain(min(max(deadline - time.monotonic(), 0.0), 0.5))

    def output(self) -> str:
        while True:
            try:
                line = self._queue.get_nowait()
            except queue.Empty:
                break
            if line is None:
                self._queue.put(None)
                break
            self.lines.append(line)
        return "".join(self.lines)

    def signal(self, signum: int) -> None:
        self.popen.send_signal(signum)

    def wait(self, timeout: float = 60.0) -> int:
        code = self.popen.wait(timeout=timeout)
        self._reader.join(timeout=5)
        self.output()
        return code

    def stop(self) -> None:
        """Make sure the child is gone (test clean-up)."""
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGKILL)
            self.popen.wait(timeout=30)


def start_server(root: Path, config: Path, name: str = "server") -> tuple[Proc, str]:
    proc = Proc(["-m", "zorba_server", "--config", str(config), "--log-level", "INFO"],
                root / f"{name}.log", root)
    match = proc.wait_for(r"listening on (http://\S+)", timeout=60)
    return proc, match.group(1)


def start_client(root: Path, world: TinyWorld, url: str, state: Path, *extra: str,
                 name: str = "client") -> Proc:
    args = ["-m", "zorba_edge.client", "run", "--server", url, "--data", str(world.data),
            "--model", str(world.model_dir), "--frozen-dtype", "fp32", "--state", str(state),
            "--step-time", "0.05", *extra]
    return Proc(args, root / f"{name}.log", root)


def wait_for_file(path: Path, pattern: str, timeout: float = 60.0) -> re.Match[str]:
    """The first match of `pattern` in the file at `path`, waiting for it to be written."""
    regex = re.compile(pattern)
    deadline = time.monotonic() + timeout
    while True:
        text = path.read_text() if path.exists() else ""
        match = regex.search(text)
        if match:
            return match
        if time.monotonic() >= deadline:
            raise AssertionError(f"no {pattern!r} in {path} after {timeout:.0f} s:\n{text[-3000:]}")
        time.sleep(0.2)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def http_get(url: str, token: str | None = None) -> bytes:
    import urllib.request

    request = urllib.request.Request(url)
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    with urllib.request.urlopen(request, timeout=10) as response:
        return response.read()
