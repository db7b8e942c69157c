"""A newer client registers with an older server (issue 26, item 5): the server's strict
decoder refuses the optional profile field it does not know (`base_rms`), and the client
registers again without it, saying so once in its log; any other refusal stands."""

from __future__ import annotations

import dataclasses
import logging
import typing
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from server_fakes import profile
from test_client_transport import FAST, msgpack_response
from test_safety_server import RMS

from zorba_common.codec import SchemaError, decode
from zorba_common.messages import (
    DeviceProfile,
    ErrorBody,
    HyperParams,
    RegisterRequest,
    RegisterResponse,
    RunInfo,
)
from zorba_edge.client.errors import ServerRefusedError
from zorba_edge.client.older_server import unknown_fields, without_unknown
from zorba_edge.client.transport import ServerClient

RUN = RunInfo("run-1", 7, 16, 4, "fp", HyperParams(0.01, 0.001, 8, 64), 30.0, 5.0, 1e6)


def older(cls: type, drop: str, replace: dict[str, type]) -> type:
    """`cls` as a server of an earlier revision knew it: without the field `drop`."""
    hints = typing.get_type_hints(cls)
    fields = [(f.name, replace.get(f.name, hints[f.name]), f) for f in dataclasses.fields(cls)
              if f.name != drop]
    return dataclasses.make_dataclass(f"Old{cls.__name__}", fields, frozen=True)


OLD_PROFILE = older(DeviceProfile, "base_rms", {})
OLD_REQUEST = older(RegisterRequest, "", {"profile": OLD_PROFILE})


class OlderServer:
    """POST /v1/clients decoded as a server before `base_rms` did, answered as the real app
    answers (201, or 400 with the decoder's message)."""

    def __init__(self) -> None:
        self.bodies: list[bytes] = []

    async def register(self, request: web.Request) -> web.Response:
        self.bodies.append(await request.read())
        try:
            decode(OLD_REQUEST, self.bodies[-1], max_bytes=1 << 20)
        except SchemaError as exc:
            return msgpack_response(ErrorBody(exc.code, str(exc)), 400)
        return msgpack_response(RegisterResponse("c-1", "tok", RUN), 201)


async def register_with_older_server(request: RegisterRequest) -> tuple[Any, OlderServer]:
    older_server = OlderServer()
    app = web.Application()
    app.router.add_post("/v1/clients", older_server.register)
    server = TestServer(app)
    await server.start_server()
    try:
        async with ServerClient(str(server.make_url("/")), backoff=FAST) as client:
            return await client.register(request), older_server
    finally:
        await server.close()


@pytest.mark.asyncio
async def test_a_new_client_registers_with_an_older_server_without_the_optional_field(
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="zorba_edge.client")
    request = RegisterRequest("secret", profile(name="dev", base_rms=RMS))
    response, server = await register_with_older_server(request)
    assert response.client_id == "c-1"
    assert len(server.bodies) == 2  # refused once, then accepted without base_rms
    sent = decode(OLD_REQUEST, server.bodies[1], max_bytes=1 << 20)
    assert sent.profile.name == "dev"
    said = [r.getMessage() for r in caplog.records if "does not know the profile field" in r.getMessage()]
    assert len(said) == 1 and "base_rms" in said[0]
    # A client without the field is accepted at once, as before.
    plain, server = await register_with_older_server(RegisterRequest("secret", profile()))
    assert plain.client_id == "c-1" and len(server.bodies) == 1


def test_only_a_refusal_naming_optional_fields_the_request_carried_is_answered_without_them() -> None:
    request = RegisterRequest("secret", profile(base_rms=RMS))

    def refused(message: str, status: int = 400) -> ServerRefusedError:
        return ServerRefusedError(status, "invalid_message", message)

    named = refused("body.profile: unknown field(s) ['base_rms']; DeviceProfile has [...]")
    assert unknown_fields(named) == ("base_rms",)
    plainer = without_unknown(request, named)
    assert plainer is not None and plainer.profile.base_rms is None
    assert plainer.profile == dataclasses.replace(request.profile, base_rms=None)
    # A field that is not optional, another refusal, another status, or a field not sent: no.
    assert without_unknown(request, refused("body: unknown field(s) ['protocol']; ...")) is None
    assert without_unknown(request, refused("body.profile.num_samples: must be > 0")) is None
    assert without_unknown(request, refused("unknown field(s) ['base_rms']", 403)) is None
    assert without_unknown(RegisterRequest("secret", profile()), named) is None


def test_a_server_that_knows_neither_optional_field_gets_the_profile_without_both() -> None:
    request = RegisterRequest("secret", profile(base_rms=RMS, fluency_curvature=660.0))
    named = ServerRefusedError(400, "invalid_message", "body.profile: unknown field(s) "
                               "['base_rms', 'fluency_curvature']; DeviceProfile has [...]")
    plainer = without_unknown(request, named)
    assert plainer is not None
    assert plainer.profile == dataclasses.replace(request.profile, base_rms=None, fluency_curvature=None)
