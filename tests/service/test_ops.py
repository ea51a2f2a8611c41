"""Ops endpoint and metrics over a real socket on 127.0.0.1 (ephemeral port)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from daemon.service.metrics import DAEMON_STATES, Metrics
from daemon.service.ops import HealthStatus, OpsServer


class Health:
    def __init__(self) -> None:
        self.status = HealthStatus(state="subscribing", ready=False, reason="subscribing 3 of 12 topics")
        self.fail = False

    def __call__(self) -> HealthStatus:
        if self.fail:
            raise RuntimeError("boom")
        return self.status


@pytest.fixture
async def served() -> AsyncIterator[tuple[Metrics, Health, OpsServer, httpx.AsyncClient]]:
    metrics = Metrics()
    health = Health()
    server = OpsServer(metrics, health)
    port = await server.start("127.0.0.1", 0)
    assert port > 0 and server.port == port
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=10) as client:
        yield metrics, health, server, client
    await server.stop()


async def test_metrics_endpoint(served: tuple[Metrics, Health, OpsServer, httpx.AsyncClient]) -> None:
    metrics, _, _, client = served
    metrics.events_received.labels(topic="v2.routing.queues.q1.conversations.calls").inc(3)
    metrics.decisions.labels(rule="r1", action="disconnect", mode="enforce").inc()
    metrics.event_to_request_seconds.observe(0.0042)
    metrics.daemon_state.state("running")
    metrics.tracked_calls.set(17)
    r = await client.get("/metrics")
    assert r.status_code == 200
    assert r.headers["content-type"] == "text/plain; version=0.0.4; charset=utf-8"
    families = {f.name: f for f in text_string_to_metric_families(r.text)}
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for f in families.values() for s in f.samples}
    assert samples[("confguard_events_received_total",
                    (("topic", "v2.routing.queues.q1.conversations.calls"),))] == 3
    assert samples[("confguard_decisions_total",
                    (("action", "disconnect"), ("mode", "enforce"), ("rule", "r1")))] == 1
    assert samples[("confguard_event_to_request_seconds_bucket", (("le", "0.005"),))] == 1
    assert samples[("confguard_event_to_request_seconds_bucket", (("le", "0.0025"),))] == 0
    assert samples[("confguard_daemon_state", (("confguard_daemon_state", "running"),))] == 1
    assert samples[("confguard_daemon_state", (("confguard_daemon_state", "starting"),))] == 0
    assert samples[("confguard_tracked_calls", ())] == 17
    assert ("confguard_build_info" in {s.name for f in families.values() for s in f.samples})


async def test_healthz_and_readyz(served: tuple[Metrics, Health, OpsServer, httpx.AsyncClient]) -> None:
    _, health, _, client = served
    r = await client.get("/healthz")
    assert r.status_code == 200 and r.json() == {"status": "ok", "state": "subscribing"}
    r = await client.get("/readyz")
    assert r.status_code == 503
    assert r.headers["content-type"].startswith("application/json")
    assert r.json()["status"] == "not_ready" and r.json()["reason"] == "subscribing 3 of 12 topics"

    health.status = HealthStatus(state="running", ready=True, details={"topics": 12})
    r = await client.get("/readyz")
    assert r.status_code == 200
    assert r.json() == {"status": "ready", "state": "running", "details": {"topics": 12}}

    health.status = HealthStatus(state="degraded", ready=False, reason=None)
    r = await client.get("/readyz")
    assert r.status_code == 503 and r.json()["reason"] == "state is degraded"


async def test_health_callback_failure(served: tuple[Metrics, Health, OpsServer, httpx.AsyncClient]) -> None:
    _, health, _, client = served
    health.fail = True
    r = await client.get("/readyz")
    assert r.status_code == 503 and r.json()["reason"] == "health check failed"
    assert "boom" not in r.text
    r = await client.get("/healthz")
    assert r.status_code == 500


async def test_unknown_path_404(served: tuple[Metrics, Health, OpsServer, httpx.AsyncClient]) -> None:
    _, _, _, client = served
    assert (await client.get("/nope")).status_code == 404
    assert (await client.post("/metrics")).status_code == 405


async def test_binds_exactly_the_host_and_stops() -> None:
    server = OpsServer(Metrics(), lambda: HealthStatus("running", True))
    port = await server.start("127.0.0.1", 0)
    # Exactly one listening socket, on the loopback address asked for (no wildcard).
    assert server.addresses == [("127.0.0.1", port)]
    await server.stop()
    await server.stop()  # idempotent
    with pytest.raises(httpx.ConnectError):
        async with httpx.AsyncClient(timeout=5) as c:
            await c.get(f"http://127.0.0.1:{port}/healthz")
    assert server.addresses == []


async def test_port_in_use_raises() -> None:
    a = OpsServer(Metrics(), lambda: HealthStatus("running", True))
    port = await a.start("127.0.0.1", 0)
    b = OpsServer(Metrics(), lambda: HealthStatus("running", True))
    try:
        with pytest.raises(OSError):
            await b.start("127.0.0.1", port)
    finally:
        await a.stop()
        await b.stop()


def test_metrics_independent_registries_and_contract() -> None:
    m1, m2 = Metrics(), Metrics()  # no "Duplicated timeseries" error: private registries
    m1.outcomes.labels(rule="r", outcome="disconnected").inc()
    assert b'confguard_outcomes_total{outcome="disconnected",rule="r"} 1.0' in m1.render()
    assert b"confguard_outcomes_total{" not in m2.render()
    for name in ("events_received", "events_rejected", "event_to_decision_seconds",
                 "event_to_request_seconds", "decisions", "outcomes", "reconnects", "resyncs",
                 "resync_duration_seconds", "resync_last_calls", "resync_last_seconds",
                 "tracked_calls", "channels", "channel_age_seconds", "token_age_seconds",
                 "safety_valve_tripped", "api_requests", "api_errors", "stream_gaps",
                 "subscribed_topics", "daemon_state", "audit_records", "config_reloads",
                 "build_info"):
        assert hasattr(m1, name), name
    assert DAEMON_STATES == ("starting", "subscribing", "resyncing", "running", "degraded",
                             "reloading", "draining", "stopped")
    m1.api_requests.labels(method="PATCH", route="/api/v2/conversations/calls/{id}/participants/{id}",
                           status="202").inc()
    m1.channel_age_seconds.labels(channel="ch1").set(12)
    text = m1.render().decode()
    assert all(line.startswith(("#", "confguard_")) for line in text.splitlines() if line)
