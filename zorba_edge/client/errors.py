"""Errors of the edge client. Each says what was wrong and what the user can do about it."""

from __future__ import annotations

from zorba_common.errors import ZorbaError


class BudgetError(ZorbaError):
    """The device cannot hold what the run needs within its memory budget."""


class DeviceError(ZorbaError, ValueError):
    """A --device that this machine does not have, or a malformed size or device spec."""


class StateFileError(ZorbaError):
    """The client's state file cannot be read or written."""


class ServerUnavailableError(ZorbaError):
    """The server could not be reached before the user's give-up time ran out."""


class ServerRefusedError(ZorbaError):
    """The server answered with an error (4xx): retrying the same request will not help."""

    def __init__(self, status: int, code: str, message: str, *, path: str = "") -> None:
        where = f" on {path}" if path else ""
        super().__init__(f"server refused{where} (HTTP {status}, {code}): {message}")
        self.status = status
        self.code = code
        self.server_message = message


class UsageError(ZorbaError, ValueError):
    """A command-line value that cannot work (a malformed URL, a missing secret, ...)."""
