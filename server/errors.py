"""Errors the server answers with: an HTTP status, a stable code and a message for people."""

from __future__ import annotations

from zorba_edge.errors import ZorbaError


class ApiError(ZorbaError):
    """A refused request. Raised before anything changes, so a refusal never alters state."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


def bad_request(code: str, message: str) -> ApiError:
    return ApiError(400, code, message)


def unauthorized(message: str) -> ApiError:
    return ApiError(401, "unauthorized", message)


def forbidden(message: str) -> ApiError:
    return ApiError(403, "forbidden", message)


def not_found(code: str, message: str) -> ApiError:
    return ApiError(404, code, message)


def conflict(code: str, message: str) -> ApiError:
    return ApiError(409, code, message)


def too_large(message: str) -> ApiError:
    return ApiError(413, "too_large", message)


def unprocessable(code: str, message: str) -> ApiError:
    return ApiError(422, code, message)
