"""The hardened ops and control listeners (`daemon.service.listener`) over real sockets on
127.0.0.1: slow-loris and idle connections are cut, the connection cap refuses new
connections while open ones keep working, malformed requests get a fixed answer with a
bounded number of log lines, the bearer token is never echoed or logged, failed logins are
throttled per address, and TLS (a CA made in the test) with reload and client certificates.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from structlog.testing import capture_logs

from _tls import TestCA
from daemon.service.control.auth import Authenticator, Caller, CallerLimiter
from daemon.service.control.server import ControlServer, LoginThrottle
from daemon.service.control.service import Availability, ControlService
from daemon.service.listener import (BAD_REQUEST_BODY, ErrorLogLimiter, ListenerLimits, TlsFiles,
                                     is_loopback)
from daemon.service.metrics import Metrics
from daemon.service.ops import HealthStatus, OpsServer

TOKEN = "s3cret-token-0123456789abcdef-XYZ"
GET = b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"


def _health() -> HealthStatus:
    return HealthStatus(state="running", ready=True)


def _rejections(metrics: Metrics, listener: str, reason: str) -> float:
    value = metrics.registry.get_sample_value(
        "confguard_listener_rejections_total", {"listener": listener, "reason": reason})
    return value or 0.0


@pytest.fixture
async def ops() -> AsyncIterator[tuple[OpsServer, Metrics]]:
    metrics = Metrics()
    server = OpsServer(metrics, _health,
                       limits=ListenerLimits(header_timeout=1.0, idle_timeout=1.5, max_connections=8))
    await server.start("127.0.0.1", 0)
    try:
        yield server, metrics
    finally:
        await server.stop()


def _control(metrics: Metrics, **kw: Any) -> ControlServer:
    import hashlib
    service = ControlService(lambda d: None, None, None,  # type: ignore[arg-type]
                             availability=lambda: Availability(True))
    auth = Authenticator([Caller("orchestrator", hashlib.sha256(TOKEN.encode()).digest())])
    return ControlServer(service, auth, CallerLimiter(10_000), metrics=metrics, **kw)


async def _answer(reader: asyncio.StreamReader, limit: float) -> bytes:
    """What the server sends within `limit` s or until it closes (a kept-alive answer)."""
    out = b""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + limit
    while (left := deadline - loop.time()) > 0:
        try:
            chunk = await asyncio.wait_for(reader.read(65536), left)
        except (asyncio.TimeoutError, ConnectionResetError):
            return out
        if not chunk:
            return out
        out += chunk
    return out


async def _until_closed(reader: asyncio.StreamReader, limit: float) -> bytes:
    """Everything the server sends until it closes the connection (within `limit` s)."""
    out = b""
    async with asyncio.timeout(limit):
        while True:
            try:
                chunk = await reader.read(65536)
            except ConnectionResetError:
                return out
            if not chunk:
                return out
            out += chunk


# ---------------------------------------------------------------- timeouts


async def test_slow_loris_connections_are_closed_within_the_header_timeout(
        ops: tuple[OpsServer, Metrics]) -> None:
    server, metrics = ops
    loop = asyncio.get_running_loop()

    async def loris() -> float:
        started = loop.time()
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        try:
            for byte in GET[:-4]:  # one header byte every 0.1 s, never the blank line
                writer.write(bytes([byte]))
                try:
                    await writer.drain()
                    data = await asyncio.wait_for(reader.read(1024), 0.1)
                except asyncio.TimeoutError:
                    continue
                except (ConnectionResetError, BrokenPipeError):
                    break
                if not data or data:  # closed (b"") or answered: either way it stopped
                    break
            return loop.time() - started
        finally:
            writer.close()

    took = await asyncio.gather(*(loris() for _ in range(6)))
    # Header timeout 1 s; the bytes would have taken 3+ s: each was cut at about 1 s.
    assert all(t < 2.5 for t in took), took
    assert _rejections(metrics, "ops", "header_timeout") == 6
    assert server.listener is not None
    for _ in range(100):  # bounded: the server notices the closes within a loop turn or two
        if server.listener.open_connections == 0:
            break
        await asyncio.sleep(0.02)
    assert server.listener.open_connections == 0


async def test_an_idle_keep_alive_connection_is_closed_and_a_later_slow_request_too(
        ops: tuple[OpsServer, Metrics]) -> None:
    server, _ = ops
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    writer.write(GET)
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    assert head.startswith(b"HTTP/1.1 200")
    started = asyncio.get_running_loop().time()
    await _until_closed(reader, 6.0)  # idle timeout 1.5 s
    assert asyncio.get_running_loop().time() - started < 4.0
    writer.close()

    # A second request that starts but never ends, on a kept-alive connection.
    reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
    writer.write(GET)
    await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    await reader.read(65536)
    writer.write(b"GET /healthz HTTP/1.1\r\nHo")
    started = asyncio.get_running_loop().time()
    await _until_closed(reader, 6.0)
    assert asyncio.get_running_loop().time() - started < 4.0
    writer.close()


# ---------------------------------------------------------------- the cap


async def test_past_the_cap_new_connections_are_refused_and_open_ones_keep_working(
        ops: tuple[OpsServer, Metrics]) -> None:
    server, metrics = ops
    assert server.listener is not None
    held = []
    for _ in range(8):  # the cap: each one answered once, so the server has accepted it
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(GET)
        await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        await asyncio.wait_for(reader.read(65536), 5)
        held.append((reader, writer))
    assert server.listener.open_connections == 8

    for _ in range(5):  # over the cap: reset or closed at once, never answered
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(GET)
        assert await _until_closed(reader, 3.0) == b""
        writer.close()
    assert _rejections(metrics, "ops", "over_capacity") == 5

    reader, writer = held[0]  # an open connection still gets answers
    writer.write(GET)
    assert (await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)).startswith(b"HTTP/1.1 200")
    await asyncio.wait_for(reader.read(65536), 5)

    for _, w in held:
        w.close()
    for _ in range(100):  # bounded
        if server.listener.open_connections == 0:
            break
        await asyncio.sleep(0.02)
    async with httpx.AsyncClient() as client:  # room again
        assert (await client.get(f"http://127.0.0.1:{server.port}/healthz")).status_code == 200


# ---------------------------------------------------------------- malformed requests


MALFORMED = [
    b"GARBAGE\r\n\r\n",
    b"GET /healthz HTTP/1.1\r\nHost: x\r\nBad Header\r\n\r\n",
    b"GET / HTTP/9.9\r\n\r\n",
    b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\x00" * 40,  # a TLS hello on plain HTTP
    b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Long: " + b"a" * 20000 + b"\r\n\r\n",
]


async def test_500_malformed_requests_give_a_fixed_answer_and_few_log_lines(
        ops: tuple[OpsServer, Metrics], caplog: pytest.LogCaptureFixture) -> None:
    server, metrics = ops
    caplog.set_level(logging.DEBUG)

    async def one(raw: bytes) -> bytes:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        try:
            writer.write(raw)
            return await _until_closed(reader, 5.0)
        finally:
            writer.close()

    with capture_logs() as logs:
        answers = []
        for start in range(0, 500, 5):  # 5 at a time, under the cap of 8
            answers += await asyncio.gather(*(one(MALFORMED[(start + i) % len(MALFORMED)])
                                              for i in range(5)))
    assert len(answers) == 500
    for a in answers:
        assert a == b"" or (a.startswith((b"HTTP/1.1 400", b"HTTP/1.0 400")) and a.endswith(BAD_REQUEST_BODY)), a[:300]
    assert sum(a.endswith(BAD_REQUEST_BODY) for a in answers) >= 400
    lines = [e for e in logs if e["event"] == "listener_rejected"]
    assert 1 <= len(lines) <= 4, lines  # one per kind per 10 s, with counts
    assert sum(e["count"] for e in lines) <= 500
    assert not [r for r in caplog.records if r.exc_info or r.levelno >= logging.ERROR], \
        [r.getMessage() for r in caplog.records][:5]
    assert _rejections(metrics, "ops", "bad_request") >= 400


def test_error_log_limiter_one_line_per_kind_per_interval() -> None:
    now = [0.0]
    lim = ErrorLogLimiter(10.0, clock=lambda: now[0])
    assert lim.note("a") == 1
    assert [lim.note("a") for _ in range(99)] == [None] * 99
    assert lim.note("b") == 1
    now[0] = 10.0
    assert lim.note("a") == 100  # the held-back 99 and this one


# ---------------------------------------------------------------- the token


async def test_the_token_is_never_in_an_answer_or_a_log(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    metrics = Metrics()
    server = _control(metrics, limits=ListenerLimits(header_timeout=1.0))
    port = await server.start("127.0.0.1", 0)
    probes = [
        # A raw LF after the token: aiohttp's own 400 quoted the whole header line.
        f"GET /v1/openapi.json HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\nX: y\r\n\r\n",
        f"GET /v1/openapi.json HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\n\r\n",
        f"GET /v1/{TOKEN} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\n\r\n",
        f"GET /v1/openapi.json HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}x\r\n\r\n",
        f"GET /v1/openapi.json?t={TOKEN} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\x00\r\n\r\n",
        f"GET /v1/openapi.json HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\nX-" + "a" * 9000 + "\r\n\r\n",
        f"POST /v1/ejections HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\n"
        f"Content-Type: application/json\r\nContent-Length: 60\r\n\r\n{{\"conversationId\": \"{TOKEN}\"}}",
        f"G\x01T / HTTP/1.1\r\nAuthorization: Bearer {TOKEN}\r\n\r\n",
    ]
    try:
        with capture_logs() as logs:
            for raw in probes:
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
                writer.write(raw.encode())
                answer = await _answer(reader, 1.5)
                writer.close()
                assert answer, raw[:60]
                assert TOKEN.encode() not in answer, answer
                assert TOKEN[:16].encode() not in answer, answer
    finally:
        await server.stop()
    everything = repr(logs) + "".join(r.getMessage() + repr(r.args) + repr(r.exc_info)
                                      for r in caplog.records)
    assert TOKEN[:16] not in everything
    assert metrics.render().find(TOKEN[:16].encode()) == -1


async def test_failed_logins_are_throttled_per_address() -> None:
    metrics = Metrics()
    server = _control(metrics, throttle=LoginThrottle(5))
    port = await server.start("127.0.0.1", 0)
    url = f"http://127.0.0.1:{port}/v1/openapi.json"
    try:
        async with httpx.AsyncClient() as client:
            good = {"Authorization": f"Bearer {TOKEN}"}
            assert (await client.get(url, headers=good)).status_code == 200
            statuses = [(await client.get(url, headers={"Authorization": f"Bearer wrong-{i}"})).status_code
                        for i in range(8)]
            assert statuses == [401] * 5 + [429] * 3
            refused = await client.get(url, headers=good)  # even the right token, for now
            assert refused.status_code == 429
            assert refused.json()["code"] == "too_many_failed_logins"
            assert int(refused.headers["Retry-After"]) >= 1
    finally:
        await server.stop()
    assert _rejections(metrics, "control", "login_throttled") == 4


def test_login_throttle_refills_and_stays_bounded() -> None:
    now = [0.0]
    throttle = LoginThrottle(6, max_addresses=3, clock=lambda: now[0])
    for _ in range(6):
        throttle.failed("a")
    assert throttle.wait("a") == pytest.approx(10.0)
    now[0] = 10.0
    assert throttle.wait("a") == 0.0
    for addr in ("b", "c", "d", "e"):
        throttle.failed(addr)
    assert len(throttle._buckets) == 3


# ---------------------------------------------------------------- TLS


def _client_context(ca: TestCA, cert: tuple[Path, Path] | None = None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(ca.cert_file))
    if cert is not None:
        ctx.load_cert_chain(str(cert[0]), str(cert[1]))
    return ctx


async def test_ops_over_tls_with_a_test_ca_and_a_reload(tmp_path: Path) -> None:
    ca1, ca2 = TestCA(tmp_path, "ca1"), TestCA(tmp_path, "ca2")
    files1 = TlsFiles(*ca1.issue("server", ip="127.0.0.1"))
    server = OpsServer(Metrics(), _health, tls=files1)
    port = await server.start("127.0.0.1", 0)
    url = f"https://127.0.0.1:{port}/healthz"
    try:
        async with httpx.AsyncClient(verify=_client_context(ca1)) as client:
            assert (await client.get(url)).status_code == 200
        async with httpx.AsyncClient() as plain:  # plain HTTP to a TLS port gets nothing
            with pytest.raises(httpx.HTTPError):
                await plain.get(f"http://127.0.0.1:{port}/healthz")
        assert server.listener is not None
        assert server.listener.reload_tls(TlsFiles(*ca2.issue("server", ip="127.0.0.1")))
        async with httpx.AsyncClient(verify=_client_context(ca2)) as client:  # new connections: new cert
            assert (await client.get(url)).status_code == 200
        async with httpx.AsyncClient(verify=_client_context(ca1)) as client:
            with pytest.raises(httpx.ConnectError):
                await client.get(url)
        from daemon.errors import ConfigError
        with pytest.raises(ConfigError, match="ops.tls"):
            server.listener.reload_tls(TlsFiles(tmp_path / "missing.crt", tmp_path / "missing.key"))
        async with httpx.AsyncClient(verify=_client_context(ca2)) as client:  # the old files stay
            assert (await client.get(url)).status_code == 200
    finally:
        await server.stop()


async def test_control_client_certificates_required_and_identify_the_caller(tmp_path: Path) -> None:
    server_ca, client_ca, rogue_ca = (TestCA(tmp_path, n) for n in ("srv", "clients", "rogue"))
    files = TlsFiles(*server_ca.issue("server", ip="127.0.0.1"), client_ca_file=client_ca.cert_file)
    server = _control(Metrics(), tls=files, cert_callers={"orch-cert": "orchestrator"})
    port = await server.start("127.0.0.1", 0)
    url = f"https://127.0.0.1:{port}/v1/openapi.json"
    good = client_ca.issue("orch-cert")
    unknown = client_ca.issue("somebody")
    rogue = rogue_ca.issue("orch-cert")  # the right name from the wrong CA
    try:
        for cert in (None, rogue):  # no certificate, or one from another CA: refused
            async with httpx.AsyncClient(verify=_client_context(server_ca, cert)) as client:
                with pytest.raises((httpx.ConnectError, httpx.ReadError, httpx.RemoteProtocolError)):
                    await client.get(url, headers={"Authorization": f"Bearer {TOKEN}"})
        async with httpx.AsyncClient(verify=_client_context(server_ca, good)) as client:
            assert (await client.get(url)).status_code == 200  # the certificate names the caller
        async with httpx.AsyncClient(verify=_client_context(server_ca, unknown)) as client:
            assert (await client.get(url)).status_code == 401  # a valid cert naming nobody
            assert (await client.get(url, headers={"Authorization": f"Bearer {TOKEN}"})).status_code == 200
    finally:
        await server.stop()


def test_loopback_addresses() -> None:
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("[::1]")
    assert is_loopback("localhost") and is_loopback("127.1.2.3")
    assert not is_loopback("0.0.0.0") and not is_loopback("10.0.0.1") and not is_loopback("example.com")


async def test_a_non_loopback_listener_without_tls_is_warned_about(
        monkeypatch: pytest.MonkeyPatch) -> None:
    import daemon.service.listener as listener_module

    for loopback, warned in ((True, False), (False, True)):
        monkeypatch.setattr(listener_module, "is_loopback", lambda host, lb=loopback: lb)
        server = OpsServer(Metrics(), _health)
        with capture_logs() as logs:
            await server.start("127.0.0.1", 0)  # bound on loopback; treated as if it were not
        await server.stop()
        assert any(e["event"] == "listener_without_tls" for e in logs) is warned, logs


async def test_the_loops_accept_errors_are_rate_limited(caplog: pytest.LogCaptureFixture) -> None:
    from daemon.service.listener import install_loop_error_filter

    loop = asyncio.get_running_loop()
    saved = loop.get_exception_handler()
    loop.set_exception_handler(None)
    try:
        install_loop_error_filter(loop)
        with capture_logs() as logs:
            for _ in range(1000):  # what EMFILE on accept() produces, once per attempt
                loop.call_exception_handler({"message": "socket.accept() out of system resource",
                                             "exception": OSError(24, "Too many open files")})
        lines = [e for e in logs if e["event"] == "loop_error"]
        assert len(lines) == 1 and lines[0]["count"] == 1, lines
    finally:
        loop.set_exception_handler(saved)
