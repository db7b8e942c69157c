"""Registration: the run's secret and protocol version, and the bearer token a client proves
who it is with afterwards (pure: no I/O). Whether its device can train is members.py.

A client registers with the run's enrolment secret, speaking this server's protocol; it gets
a client id and a bearer token. Only the token's hash is kept (the store holds the hashes),
so a copy of the database does not let anyone act as a client.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TypeVar

from zorba_common.messages import PROTOCOL_VERSION, RegisterRequest
from zorba_server import errors

M = TypeVar("M")

MIN_SECRET_CHARS = 16
"""The shortest enrolment secret a server accepts without --insecure-secret."""


def new_secret() -> str:
    """A fresh random enrolment secret (32 URL-safe characters, 192 bits)."""
    return secrets.token_urlsafe(24)


def check_enrolment(request: RegisterRequest, secret: str) -> None:
    """Refuse a registration without the run's secret or in another protocol version."""
    if not hmac.compare_digest(request.enrolment_secret.encode(), secret.encode()):
        raise errors.forbidden("wrong enrolment secret: ask the run's operator for it")
    if request.protocol != PROTOCOL_VERSION:
        raise errors.bad_request(
            "protocol_version",
            f"client speaks protocol {request.protocol}, this server {PROTOCOL_VERSION}: "
            "upgrade the older side")


def token_hash(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


@dataclass(frozen=True)
class Credentials:
    """What a new client gets: its id and its bearer token (and the hash the server keeps)."""

    client_id: str
    token: str

    @classmethod
    def new(cls) -> Credentials:
        return cls("c-" + secrets.token_hex(8), secrets.token_urlsafe(32))

    @property
    def token_hash(self) -> bytes:
        return token_hash(self.token)


class Tokens:
    """Client ids by the hash of their bearer token."""

    def __init__(self) -> None:
        self._by_hash: dict[bytes, str] = {}

    def add(self, digest: bytes, client_id: str) -> None:
        self._by_hash[digest] = client_id

    def holder(self, token: str | None, members: Mapping[str, M]) -> M:
        """The member `token` belongs to, or an unauthorized refusal."""
        if not token:
            raise errors.unauthorized(
                "missing bearer token: send 'Authorization: Bearer <token>' from POST /v1/clients")
        client_id = self._by_hash.get(token_hash(token))
        member = members.get(client_id) if client_id is not None else None
        if member is None:
            raise errors.unauthorized("unknown bearer token: register again with POST /v1/clients")
        return member
