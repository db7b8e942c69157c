"""Why the server refuses a request, as domain errors: a kind, a stable code and a message.

Raised before anything changes, so a refusal never alters state. The engine and the
coordinator know nothing of HTTP; `app.py` maps each kind to a status (`HTTP_STATUS`).
"""

from __future__ import annotations

from zorba_common.errors import ZorbaError


class Refusal(ZorbaError):
    """A refused request."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class Malformed(Refusal):
    """The request cannot be understood."""


class Unauthenticated(Refusal):
    """No or an unknown client token."""


class Forbidden(Refusal):
    """The caller may not do this (wrong enrolment secret)."""


class NotFound(Refusal):
    """What the request names does not exist."""


class Conflict(Refusal):
    """The request contradicts the run's state (a closed round, another model, a used key)."""


class TooLarge(Refusal):
    """The body exceeds its limit."""


class UnsupportedMediaType(Refusal):
    """The body is not in the endpoint's format."""


class Unprocessable(Refusal):
    """Understood, but its content is refused (a budget too small, a wrong step)."""


class Unavailable(Refusal):
    """The server cannot answer yet."""


class TooManyRequests(Refusal):
    """The caller must wait `retry_after_s` before asking again (too many failed enrolments)."""

    def __init__(self, code: str, message: str, retry_after_s: float) -> None:
        super().__init__(code, message)
        self.retry_after_s = retry_after_s


def bad_request(code: str, message: str) -> Refusal:
    return Malformed(code, message)


def unauthorized(message: str) -> Refusal:
    return Unauthenticated("unauthorized", message)


def forbidden(message: str) -> Refusal:
    return Forbidden("forbidden", message)


def not_found(code: str, message: str) -> Refusal:
    return NotFound(code, message)


def conflict(code: str, message: str) -> Refusal:
    return Conflict(code, message)


def too_large(message: str) -> Refusal:
    return TooLarge("too_large", message)


def unsupported_media_type(message: str) -> Refusal:
    return UnsupportedMediaType("unsupported_media_type", message)


def unprocessable(code: str, message: str) -> Refusal:
    return Unprocessable(code, message)


def starting() -> Refusal:
    return Unavailable("starting", "the server is starting: retry in a moment")
