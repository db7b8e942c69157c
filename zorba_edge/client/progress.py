"""How a slow step shows its progress: a bar on a terminal, a log line every few seconds
otherwise (a log file, a pipe, systemd), so that no wait of minutes is silent."""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable
from types import TracebackType
from typing import Any

log = logging.getLogger("zorba_edge.client")

LOG_INTERVAL_S = 10.0
"""Off a terminal, at most one line this often (and one when the step is done)."""


class ProgressReporter:
    """A `progress(done, total)` callback for one step, used as a context manager.

    On a terminal it draws a rich progress bar on stderr (stdout stays the command's
    output, e.g. `--json`) from the first report until done reaches total, so reporters of
    successive steps may be entered together (rich shows one live display at a time);
    elsewhere it logs `what: done/total` when `interval_s` has passed since the start or
    the last line, and when done reaches total.
    """

    def __init__(self, what: str, *, interactive: bool | None = None,
                 interval_s: float = LOG_INTERVAL_S,
                 clock: Callable[[], float] = time.monotonic,
                 logger: logging.Logger = log) -> None:
        self.what = what
        self.interactive = sys.stderr.isatty() if interactive is None else interactive
        self.interval_s = interval_s
        self._clock = clock
        self._log = logger
        self._bar: Any = None
        self._task: Any = None
        self._started = self._last = clock()

    def __enter__(self) -> ProgressReporter:
        self._started = self._last = self._clock()
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 traceback: TracebackType | None) -> None:
        self._stop_bar()

    def _stop_bar(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None

    def __call__(self, done: int, total: int) -> None:
        if self.interactive:
            if self._bar is None and done < total:
                from rich.console import Console
                from rich.progress import Progress

                self._bar = Progress(console=Console(stderr=True), transient=False)
                self._task = self._bar.add_task(self.what, total=total)
                self._bar.start()
            if self._bar is not None:
                self._bar.update(self._task, completed=done, total=total)
            if done >= total:
                self._stop_bar()
            return
        now = self._clock()
        if done >= total:
            self._log.info("%s: %d/%d, done in %.0f s", self.what, done, total,
                           now - self._started)
            self._last = now
        elif now - self._last >= self.interval_s:
            self._log.info("%s: %d/%d (%.0f s)", self.what, done, total, now - self._started)
            self._last = now
