"""TLS: given a certificate and key, the server speaks HTTPS only."""

from __future__ import annotations

import shutil
import ssl
import subprocess
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from server_fakes import config_dict

from zorba_server.app import create_app
from zorba_server.cli import ssl_context
from zorba_server.config import ConfigError, config_from_dict

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl CLI")


def self_signed(tmp_path: Path) -> tuple[Path, Path]:
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj",
         "/CN=localhost", "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key),
         "-out", str(cert)],
        check=True, capture_output=True)
    return cert, key


async def tls_runner(tmp_path: Path) -> tuple[Path, Any, web.AppRunner]:
    """A self-signed certificate, the server config that serves it, and the set-up runner."""
    cert, key = self_signed(tmp_path)
    data = config_dict(tmp_path / "db.sqlite3")
    data["server"] = {"tls_cert": str(cert), "tls_key": str(key)}
    config = config_from_dict(data)
    runner = web.AppRunner(create_app(config))
    await runner.setup()
    return cert, config, runner


@pytest.mark.asyncio
async def test_with_a_certificate_the_api_is_served_over_https(tmp_path: Path) -> None:
    cert, config, runner = await tls_runner(tmp_path)
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=ssl_context(config))
    await site.start()
    port = runner.addresses[0][1]
    try:
        trusting = ssl.create_default_context(cafile=str(cert))
        async with aiohttp.ClientSession() as http:
            resp = await http.get(f"https://127.0.0.1:{port}/v1/status", ssl=trusting)
            assert resp.status == 200 and (await resp.json())["version"] == 0
            with pytest.raises(aiohttp.ClientError):
                await http.get(f"http://127.0.0.1:{port}/v1/status")
    finally:
        await runner.cleanup()


def test_an_unreadable_certificate_is_a_config_error(tmp_path: Path) -> None:
    data = config_dict(tmp_path / "db.sqlite3")
    data["server"] = {"tls_cert": str(tmp_path / "missing.pem"), "tls_key": str(tmp_path / "k")}
    with pytest.raises(ConfigError, match=r"missing.pem \(--tls-cert\) does not exist"):
        ssl_context(config_from_dict(data))
    (tmp_path / "missing.pem").write_text("not a certificate")
    with pytest.raises(ConfigError, match=r"/k \(--tls-key\) does not exist"):
        ssl_context(config_from_dict(data))
    (tmp_path / "k").write_text("not a key")
    with pytest.raises(ConfigError, match="cannot load the TLS certificate .*missing.pem"):
        ssl_context(config_from_dict(data))


@pytest.mark.asyncio
async def test_https_through_the_head_guard_as_zorba_server_listens(tmp_path: Path) -> None:
    """zorba-server listens through http_edge.listen (a deadline on request heads): TLS
    connections pass through it like plain ones."""
    import socket

    from zorba_server.http_edge import HeadLimits, listen

    cert, config, runner = await tls_runner(tmp_path)
    sock = socket.create_server(("127.0.0.1", 0))
    listening = await listen(runner, sock, ssl_context(config), HeadLimits(timeout_s=30))
    port = sock.getsockname()[1]
    try:
        trusting = ssl.create_default_context(cafile=str(cert))
        async with aiohttp.ClientSession() as http:
            resp = await http.get(f"https://127.0.0.1:{port}/healthz", ssl=trusting)
            assert resp.status == 200 and await resp.text() == "ok\n"
        assert not listening.pending  # the head arrived: nothing left waiting
    finally:
        listening.close()
        await runner.cleanup()
