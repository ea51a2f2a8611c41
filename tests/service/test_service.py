"""The daemon's lifecycle: signals, reload, drain, systemd notify, ops endpoints.

Most tests run `python -m daemon run --config FILE` as a real child process against the
sandbox, which runs in the test's event loop on 127.0.0.1:<ephemeral>; the child reaches it
over real sockets. What happened is read from the sandbox (world, journal, sockets), the
daemon's JSON log lines, its audit file and its ops endpoints. Every wait is bounded.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import signal
import time
from datetime import datetime
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import orjson
import pytest
import structlog.testing

from _daemon_harness import (BLOCKED_RULE, FLAGGED_RULE, SALES, SUPPORT, DaemonProcess,
                             audit_records, credentials_env, sample, sandbox_agent, sandbox_queue, started,
                             wait_until, write_config)
from daemon.service.audit import verify
from daemon.config import load_config
from daemon.core.ids import ConversationId
from daemon.service.metrics import DAEMON_STATES, Metrics
from daemon.sandbox import Sandbox
from daemon.sandbox.world import Conversation, Party
from daemon.service.lifecycle import Daemon, State

AGENT = "a11ce000-0000-4000-8000-00000000000a"


@contextlib.asynccontextmanager
async def daemon_process(sb: Sandbox, folder: Path, *, env_extra: dict[str, str] | None = None,
                         ops_extra: str = "", **cfg: Any) -> AsyncIterator[DaemonProcess]:
    """`ops_extra`: more `ops:` keys, as YAML lines indented two spaces."""
    sandbox_agent(sb, AGENT, "Alice Agent")
    config = write_config(folder, sb.base_url, **cfg)
    if ops_extra:
        config.write_text(config.read_text().replace("\nops:\n", f"\nops:\n{ops_extra}", 1))
    async with started(DaemonProcess(config, credentials_env(sb, **(env_extra or {})), folder), sb) as d:
        yield d


def flagged_call(sb: Sandbox, queue: str = SALES, flag: str = "true",
                 address: str = "tel:+14155550123") -> tuple[Conversation, Party]:
    """A call with an agent and an external party whose complianceFlag is `flag`."""
    w = sb.world
    conv = w.start_call(queue)
    w.connect_agent(conv.id, AGENT)
    ext = w.add_external(conv.id, address, name="Partner")
    w.set_attributes(conv.id, ext.id, {"complianceFlag": flag})
    return conv, ext


def patched(sb: Sandbox, conv: Conversation, party: Party) -> list[Any]:
    return [r for r in sb.journal.patches(conv.id) if r.path.endswith(party.id)]


async def removed(sb: Sandbox, conv: Conversation, party: Party, timeout: float = 10.0,
                  label: str = "") -> None:
    await wait_until(lambda: conv.party(party.id).state == "disconnected" and patched(sb, conv, party),
                     timeout, f"party {party.id} {label} to be removed by a PATCH")


# ---------------------------------------------------------------------- signals


async def test_sigterm_lets_an_in_flight_disconnect_finish(sandbox: Sandbox, tmp_path: Path) -> None:
    async with daemon_process(sandbox, tmp_path) as d:
        await d.wait_ready()
        hold = asyncio.Event()
        sandbox.faults.hold_disconnects = hold  # the PATCH stays in flight until released
        conv, ext = flagged_call(sandbox)
        await wait_until(lambda: [r for r in audit_records(tmp_path) if r["type"] == "decision"],
                         10, "the decision record (written just before the PATCH is sent)")
        await wait_until(lambda: any(m == "PATCH" and f"/participants/{ext.id}" in p
                                     for m, p in sandbox.journal.arrivals), 10, "the PATCH to arrive")
        assert patched(sandbox, conv, ext) == [], "the PATCH must still be in flight"
        assert conv.party(ext.id).state == "connected"
        sent_at = time.time()
        d.send(signal.SIGTERM)
        # while it drains: alive, but not ready (a load balancer or probe stops sending work)
        draining = await d.wait_http("/readyz", 503, timeout=5)
        assert draining["state"] == "draining" and draining["reason"] == "draining"
        assert draining["details"]["in_flight"] == 1
        st, raw = await d.get("/healthz")
        assert st == 200 and b'"state":"draining"' in raw
        hold.set()  # Genesys answers now: the drain must wait for this answer
        assert await d.wait_exit(20) == 0
        (patch,) = patched(sandbox, conv, ext)
        assert patch.status == 202 and patch.body == {"state": "disconnected"}
        assert conv.party(ext.id).state == "disconnected"
        records = audit_records(tmp_path)
        outcomes = [r for r in records if r["type"] == "outcome"]
        assert [(o["participant_id"], o["outcome"]) for o in outcomes] == [(ext.id, "disconnected")]
        report = verify([tmp_path / "audit"])
        assert report.ok, report.problem
        assert report.records == len(records)
        assert d.events("stop_requested", signal="SIGTERM")
        stopped = d.events("daemon_state", new="stopped")
        assert stopped and stopped[-1]["abandoned"] == 0
        assert d.events("daemon_state", new="draining")
        # the PATCH reached the sandbox before the signal, its outcome was audited after it:
        # the drain waited for the answer
        assert patch.time < sent_at
        assert datetime.fromisoformat(outcomes[0]["time"].replace("Z", "+00:00")).timestamp() > sent_at


async def test_sighup_good_config_adds_rule_and_queue_without_dropping_subscriptions(
        sandbox: Sandbox, tmp_path: Path) -> None:
    sandbox_queue(sandbox, SUPPORT, "Support")
    async with daemon_process(sandbox, tmp_path) as d:
        await d.wait_ready()
        assert len(sandbox.world.channels) == 1 and len(sandbox.conns) == 1
        (channel_id, conn), = sandbox.conns.items()
        since = sandbox.journal.requests[-1].seq

        # Before: a blocked number is not a rule yet, Support is not watched.
        before, ext = flagged_call(sandbox, flag="false", address="tel:+14155550999")
        topic = f"v2.routing.queues.{SALES}.conversations.calls"
        await d.wait_metrics(lambda t: (sample(t, "confguard_events_received_total", topic=topic) or 0) >= 4,
                             what="the daemon to receive the events of the first call")

        write_config(tmp_path, sandbox.base_url, rules=FLAGGED_RULE + BLOCKED_RULE,
                     queues=[SALES, SUPPORT])
        d.send(signal.SIGHUP)
        await d.wait_event("reloaded")
        await d.wait_http("/readyz", 200)

        # The unchanged subscription was not dropped: same channel, same socket object,
        # no new channel created; the new queue's topic was added to it.
        assert list(sandbox.conns) == [channel_id] and sandbox.conns[channel_id] is conn
        assert len(sandbox.world.channels) == 1
        after = [r for r in sandbox.journal.requests if r.seq > since]
        assert not [r for r in after if r.method == "POST" and r.path == "/api/v2/notifications/channels"]
        subs = [r for r in after if r.path.endswith("/subscriptions")]
        assert subs and all(r.method in ("POST", "GET") for r in subs), [(r.method, r.path) for r in subs]
        topics = set(sandbox.world.channels[channel_id].topics)
        assert f"v2.routing.queues.{SALES}.conversations.calls" in topics
        assert f"v2.routing.queues.{SUPPORT}.conversations.calls" in topics

        # The new rule is enforced, on the old queue and on the new one.
        conv, blocked = flagged_call(sandbox, flag="false", address="tel:+14155550999")
        await removed(sandbox, conv, blocked, label="(blocked, Sales)")
        conv2, flagged = flagged_call(sandbox, queue=SUPPORT)
        await removed(sandbox, conv2, flagged, label="(flagged, Support)")
        # the call from before the reload is re-judged by the resync the new topic caused,
        # or by its next event: the new rule applies to it as well
        sandbox.world.touch(before.id)
        await removed(sandbox, before, ext, label="(blocked, before the reload)")
        metrics = await d.metrics()
        assert 'confguard_config_reloads_total{result="ok"} 1.0' in metrics
        assert d.events("daemon_state", new="reloading")


async def test_sighup_during_a_reload_is_not_lost(sandbox: Sandbox, tmp_path: Path) -> None:
    """The file changes again while a (slow) reload runs and a second SIGHUP comes: the
    second version must end up in force, not be ignored."""
    sandbox_queue(sandbox, SUPPORT, "Support")
    async with daemon_process(sandbox, tmp_path) as d:
        await d.wait_ready()
        write_config(tmp_path, sandbox.base_url, queues=[SALES, "Support"])
        sandbox.faults.latency = 1.0  # the queue-name lookup and subscription calls are slow
        d.send(signal.SIGHUP)
        await d.wait_event("daemon_state", new="reloading")
        write_config(tmp_path, sandbox.base_url, rules=FLAGGED_RULE + BLOCKED_RULE, queues=[SALES, "Support"])
        d.send(signal.SIGHUP)
        await d.wait_event("reload_queued")
        await d.wait_event("reloaded", count=2, timeout=30)
        sandbox.faults.latency = 0.0
        await d.wait_http("/readyz", 200)
        assert d.events("reloaded")[-1]["rules"] == 2
        conv, blocked = flagged_call(sandbox, flag="false", address="tel:+14155550999")
        await removed(sandbox, conv, blocked, label="(blocked: the rule of the second file)")


async def test_sighup_bad_config_keeps_old_rules(sandbox: Sandbox, tmp_path: Path) -> None:
    async with daemon_process(sandbox, tmp_path) as d:
        await d.wait_ready()
        cfg = tmp_path / "config.yaml"
        good = cfg.read_text()
        cfg.write_text(good.replace("mode: enforce", "mode: enforce\nmood: happy"))
        d.send(signal.SIGHUP)
        rec = await d.wait_event("reload_rejected")
        assert re.fullmatch(rf"{re.escape(str(cfg))}:\d+:1: unknown key 'mood'.*", rec["error"]), rec["error"]
        assert rec["level"] == "error"
        assert "Traceback" not in d.text()
        await d.wait_http("/readyz", 200)
        assert d.proc is not None and d.proc.returncode is None
        conv, ext = flagged_call(sandbox)  # the old rule still acts
        await removed(sandbox, conv, ext)
        metrics = await d.metrics()
        assert 'confguard_config_reloads_total{result="rejected"} 1.0' in metrics
        assert 'confguard_daemon_state{confguard_daemon_state="running"} 1.0' in metrics
        d.send(signal.SIGTERM)
        assert await d.wait_exit() == 0


async def test_second_sigint_forces_exit(sandbox: Sandbox, tmp_path: Path) -> None:
    """The second signal cuts the drain short, but the audit is still fsynced and the
    abandoned removal still gets its outcome record; exit code 1."""
    async with daemon_process(sandbox, tmp_path) as d:
        await d.wait_ready()
        sandbox.faults.latency = 30.0  # the PATCH hangs: the drain would wait its full bound
        conv, ext = flagged_call(sandbox)
        await wait_until(lambda: [r for r in audit_records(tmp_path) if r["type"] == "decision"],
                         10, "the decision record")
        d.send(signal.SIGINT)
        await d.wait_event("daemon_state", new="draining")
        sent_at = time.monotonic()
        d.send(signal.SIGINT)
        assert await d.wait_exit(10) == 1
        assert time.monotonic() - sent_at < 8.0, "the second signal did not cut the wait short"
        assert d.events("second_signal_exit_now", signal="SIGINT")
        assert not d.events("daemon_state", new="stopped")  # not a graceful stop
        (closed,) = d.events("audit_closed")
        assert closed["synced"] is True  # fsynced before exiting
        (forced,) = d.events("shutdown_forced_exit")
        assert forced["exit_code"] == 1 and forced["abandoned"] == 1
        records = audit_records(tmp_path)
        assert closed["seq"] == records[-1]["seq"]
        outcomes = [r for r in records if r["type"] == "outcome"]
        assert [(o["participant_id"], o["outcome"]) for o in outcomes] == [(ext.id, "unconfirmed")]
        report = verify([tmp_path / "audit"])
        assert report.ok, report.problem


async def test_shutdown_has_one_deadline(sandbox: Sandbox, tmp_path: Path) -> None:
    """`ops.shutdown_timeout` bounds the whole shutdown, even when every request to Genesys
    hangs (the PATCH in flight and the unsubscribe on close): exit 0 at the deadline, the
    removal audited `unconfirmed`, the audit fsynced."""
    timeout = 3.0
    async with daemon_process(sandbox, tmp_path, ops_extra=f"  shutdown_timeout: {timeout:g}s\n") as d:
        await d.wait_ready()
        sandbox.faults.latency = 30.0  # everything hangs from now on
        conv, ext = flagged_call(sandbox)
        await wait_until(lambda: [r for r in audit_records(tmp_path) if r["type"] == "decision"
                                  and r["participant_id"] == ext.id], 10, "the decision record")
        sent_at = time.monotonic()
        d.send(signal.SIGTERM)
        assert await d.wait_exit(20) == 0
        took = time.monotonic() - sent_at
        assert took < timeout + 7.0, f"shutdown took {took:.1f} s against a {timeout} s deadline"
        (started,) = d.events("shutdown_started")
        assert started["timeout"] == timeout
        (stopped,) = d.events("daemon_state", new="stopped")
        assert stopped["abandoned"] == 1
        assert stopped["seconds"] <= timeout + 2.0, stopped  # measured inside the daemon
        assert d.events("audit_closed", synced=True)
        outcomes = [r for r in audit_records(tmp_path) if r["type"] == "outcome"
                    and r["participant_id"] == ext.id]
        assert [o["outcome"] for o in outcomes] == ["unconfirmed"]
        assert verify([tmp_path / "audit"]).ok


async def test_startup_failure_exits_with_clear_message(sandbox: Sandbox, tmp_path: Path) -> None:
    """Refused credentials: one `confguard: ...` line, exit 4, no traceback, no secret."""
    async with daemon_process(sandbox, tmp_path, env_extra={
            "GENESYSCLOUD_OAUTHCLIENT_SECRET": "wrong-secret-s3cr3t"}) as d:
        code = await d.wait_exit(20)
        assert code == 4, d.text()
        err = d.stderr_path.read_text()
        assert err.count("confguard: ") == 1 and "Traceback" not in err
        assert "wrong-secret-s3cr3t" not in d.text() and sandbox.client_secret not in d.text()


# ---------------------------------------------------------------------- in-process drain bound


async def test_drain_abandons_in_flight_after_timeout(sandbox: Sandbox, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    sandbox_queue(sandbox)
    sandbox.world.create_user("Alice Agent", AGENT)
    monkeypatch.setenv("GENESYSCLOUD_OAUTHCLIENT_ID", sandbox.client_id)
    monkeypatch.setenv("GENESYSCLOUD_OAUTHCLIENT_SECRET", sandbox.client_secret)
    config = load_config(write_config(tmp_path, sandbox.base_url, ops=False))
    daemon = Daemon(config, drain_timeout=0.3)
    await asyncio.wait_for(daemon.start(), 20)
    try:
        assert daemon.state is State.RUNNING and daemon.health().ready
        sandbox.faults.latency = 8.0
        conv, ext = flagged_call(sandbox)
        await wait_until(lambda: daemon.enforcer is not None and daemon.enforcer.in_flight == 1,
                         10, "the disconnect to be in flight")
        # ... and its PATCH written (after the decision record's fdatasync): event-to-request
        # is observed at that moment.
        await wait_until(lambda: sum(x.value for m in daemon.metrics.event_to_request_seconds.collect()
                                     for x in m.samples if x.name.endswith("_count")) >= 1,
                         10, "the PATCH to be written")
        # ... and arrived at the sandbox, so it is held the 8 s (resetting the latency before
        # it arrived let it through at once now and then: a flake, outcome disconnected).
        await wait_until(lambda: any(m == "PATCH" and f"/participants/{ext.id}" in p
                                     for m, p in sandbox.journal.arrivals), 10, "the PATCH to arrive")
        sandbox.faults.latency = 0.0
        started = time.monotonic()
        await asyncio.wait_for(daemon.stop(), 20)
        took = time.monotonic() - started
    finally:
        sandbox.faults.reset()
        await daemon.stop()
    assert daemon.state.value == "stopped"
    assert took < 6.0, f"stop() waited {took:.1f} s: the drain bound (0.3 s) was not applied"
    outcomes = [r for r in audit_records(tmp_path) if r["type"] == "outcome"]
    assert [(o["participant_id"], o["outcome"]) for o in outcomes] == [(ext.id, "unconfirmed")]
    assert outcomes[0]["error"]
    assert verify([tmp_path / "audit"]).ok
    assert daemon.metrics.outcomes.labels(rule="flagged-party", outcome="unconfirmed")._value.get() == 1


async def test_sigusr1_resumes_after_safety_valve(sandbox: Sandbox, tmp_path: Path) -> None:
    async with daemon_process(sandbox, tmp_path) as d:
        cfg = tmp_path / "config.yaml"
        cfg.write_text(cfg.read_text().replace("max_disconnects_per_minute: 30",
                                               "max_disconnects_per_minute: 1"))
        await d.wait_ready()
        c1, e1 = flagged_call(sandbox)
        await removed(sandbox, c1, e1)
        c2, e2 = flagged_call(sandbox)
        await wait_until(lambda: [r for r in audit_records(tmp_path)
                                  if r["type"] == "outcome" and r["outcome"] == "suppressed"],
                         10, "a suppressed outcome (valve tripped)")
        assert 'confguard_safety_valve_tripped 1.0' in await d.metrics()
        assert conv_party_state(c2, e2) == "connected"
        d.send(signal.SIGUSR1)
        await d.wait_event("safety_valve_reset")
        assert 'confguard_safety_valve_tripped 0.0' in await d.metrics()
        sandbox.world.set_attributes(c2.id, e2.id, {"complianceFlag": "true", "again": "1"})
        await removed(sandbox, c2, e2)


def conv_party_state(conv: Conversation, party: Party) -> str:
    return conv.party(party.id).state


# ---------------------------------------------------------------------- ops endpoints


async def test_ops_endpoints_from_the_running_daemon(sandbox: Sandbox, tmp_path: Path) -> None:
    async with daemon_process(sandbox, tmp_path) as d:
        body = await d.wait_ready()
        assert body["status"] == "ready" and body["state"] == "running"
        assert body["details"]["mode"] == "enforce" and body["details"]["safety_valve_tripped"] is False
        st, raw = await d.get("/healthz")
        health = orjson.loads(raw)
        assert st == 200 and (health["state"], health["status"]) == ("running", "ok")
        # the request budget block (this sandbox sends no budget headers: 300 is assumed)
        assert health["budget"]["allowed"] == 300 and health["budget"]["learnt"] is False
        assert 0 < health["budget"]["used"] <= 300

        # traffic: one removal, one near miss
        conv, ext = flagged_call(sandbox)
        await removed(sandbox, conv, ext)
        near, keep = flagged_call(sandbox, flag="false")
        await wait_until(lambda: len(sandbox.world.calls) == 2, 5, "two calls")

        # a gap: drop the socket and make the resync fail for a while (5xx burst)
        sandbox.faults.add_burst("POST", "/analytics/conversations/details/query", 503, 6)
        dropped = sandbox.drop_sockets()
        assert dropped == 1
        not_ready = await d.wait_http("/readyz", 503)
        assert not_ready["status"] == "not_ready" and not_ready["reason"]
        st, raw = await d.get("/healthz")
        assert st == 200  # alive, just not ready
        await d.wait_http("/readyz", 200, timeout=30)

        # gauges such as tracked_calls are refreshed at least once a second
        text = await d.wait_metrics(lambda t: sample(t, "confguard_tracked_calls") == 2, 5,
                                    "tracked_calls to show both calls")
        families = {m.group(1) for m in re.finditer(r"^# TYPE (\S+) ", text, re.M)}
        expected = {m.group(1) for m in re.finditer(r"^# TYPE (\S+) ", Metrics().render().decode(), re.M)}
        assert len(expected) >= 24
        assert expected <= families, expected - families
        topic = f"v2.routing.queues.{SALES}.conversations.calls"
        assert (sample(text, "confguard_events_received_total", topic=topic) or 0) >= 4
        assert sample(text, "confguard_decisions_total", rule="flagged-party",
                       action="disconnect", mode="enforce") == 1
        assert sample(text, "confguard_outcomes_total", rule="flagged-party", outcome="disconnected") == 1
        assert sample(text, "confguard_event_to_decision_seconds_count") == 1
        assert sample(text, "confguard_event_to_request_seconds_count") == 1
        assert (sample(text, "confguard_reconnects_total") or 0) >= 1
        assert (sample(text, "confguard_stream_gaps_total") or 0) >= 1
        resyncs = sum(float(v) for v in re.findall(r"^confguard_resyncs_total\{[^}]*\} (\S+)$", text, re.M))
        assert resyncs >= 2  # startup + after the gap
        assert (sample(text, "confguard_resync_duration_seconds_count") or 0) >= 2
        assert sample(text, "confguard_channels") == 1
        assert sample(text, "confguard_subscribed_topics") == 1
        token_age = sample(text, "confguard_token_age_seconds")
        assert token_age is not None and 0 <= token_age < 600
        assert sample(text, "confguard_safety_valve_tripped") == 0
        assert (sample(text, "confguard_api_requests_total", method="PATCH", status="202") or 0) >= 1
        assert (sample(text, "confguard_api_requests_total", method="POST", status="503") or 0) >= 1
        assert (sample(text, "confguard_api_errors_total", status="503") or 0) >= 1
        for state in DAEMON_STATES:
            assert sample(text, "confguard_daemon_state", confguard_daemon_state=state) == \
                (1.0 if state == "running" else 0.0)
        assert (sample(text, "confguard_audit_records_total", type="decision") or 0) >= 1
        assert conv_party_state(near, keep) == "connected"


# ---------------------------------------------------------------------- reload edge cases (in-process)


@contextlib.asynccontextmanager
async def in_process(sb: Sandbox, folder: Path, monkeypatch: pytest.MonkeyPatch,
                     **cfg: Any) -> AsyncIterator[Daemon]:
    """A started in-process Daemon (max_retries 4) on a config.yaml in `folder`."""
    sandbox_agent(sb, AGENT, "Alice Agent")
    monkeypatch.setenv("GENESYSCLOUD_OAUTHCLIENT_ID", sb.client_id)
    monkeypatch.setenv("GENESYSCLOUD_OAUTHCLIENT_SECRET", sb.client_secret)
    path = write_config(folder, sb.base_url, ops=False, max_retries=4, **cfg)
    daemon = Daemon(load_config(path), config_path=path, drain_timeout=1.0)
    await asyncio.wait_for(daemon.start(), 20)
    try:
        yield daemon
    finally:
        sb.faults.reset()
        await asyncio.wait_for(daemon.stop(), 20)


async def test_rejected_reload_during_a_gap_that_closes_meanwhile_ends_ready(
        sandbox: Sandbox, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A reload rejected while the daemon was DEGRADED must not leave it DEGRADED (and
    not ready) when the gap was closed by a resync during the reload."""
    async with in_process(sandbox, tmp_path, monkeypatch) as daemon:
        config = tmp_path / "config.yaml"
        # the new file names a queue whose lookup fails after a few retries (5xx)
        # (the client's retries take 4-7 s before the lookup fails)
        write_config(tmp_path, sandbox.base_url, ops=False, max_retries=4, queues=[SALES, "Collections"])
        sandbox.faults.add_burst("GET", "/api/v2/routing/queues", 503, 50)
        # a gap whose first resync fails (3 answers: the request and its 2 retries): the daemon
        # stays DEGRADED and retries the resync 1 s later, while the reload is under way
        sandbox.faults.add_burst("POST", "/analytics/conversations/details/query", 503, 3)
        sandbox.drop_sockets()
        await wait_until(lambda: daemon.state is State.DEGRADED, 10, "the gap (DEGRADED)")
        ok = await asyncio.wait_for(daemon.reload(), 30)
        assert ok is False
        assert daemon.rules.ruleset.by_name.keys() == {"flagged-party"}
        assert config.exists()
        await wait_until(lambda: daemon.health().ready and daemon.state is State.RUNNING, 10,
                         f"ready and running again (state {daemon.state.value}, "
                         f"gap {daemon._gap_reason})")


@pytest.mark.parametrize(("content", "message"), [
    ("", r"nothing to subscribe: .*"),  # an empty file must not silently drop every subscription
    ("- just\n- a list\n", r".*config\.yaml:1:1: .*"),
    ("schema_version: 1\nrules:\n  - name: x\n    when: {purpose: {in_list: nope}}\n    action: disconnect\n",
     r".*:4:\d+: rule 'x': unknown list 'nope'.*"),
    ("\x00\x01\x02 binary", r".*config\.yaml.*"),
])
async def test_unusable_reload_files_are_rejected(sandbox: Sandbox, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch,
                                                  content: str, message: str) -> None:
    async with in_process(sandbox, tmp_path, monkeypatch) as daemon:
        (tmp_path / "config.yaml").write_text(content)
        with structlog.testing.capture_logs() as logs:
            assert await asyncio.wait_for(daemon.reload(), 10) is False
        (rejected,) = [r for r in logs if r["event"] == "reload_rejected"]
        assert re.fullmatch(message, rejected["error"]), rejected["error"]
        assert daemon.state is State.RUNNING and daemon.health().ready
        assert daemon.metrics.config_reloads.labels(result="rejected")._value.get() == 1
        assert daemon.rules.ruleset.by_name.keys() == {"flagged-party"}
        conv, ext = flagged_call(sandbox)
        await removed(sandbox, conv, ext)


async def test_sigterm_during_startup_exits_0_promptly(sandbox: Sandbox, tmp_path: Path) -> None:
    async with daemon_process(sandbox, tmp_path) as d:
        sandbox.faults.latency = 30.0  # every /api/v2 request hangs: start-up cannot finish
        await d.wait_event("daemon_state", new="subscribing")
        d.send(signal.SIGTERM)
        sandbox.faults.latency = 0.0
        assert await d.wait_exit(15) == 0
        assert not d.events("daemon_state", new="running")
        assert d.events("daemon_state", new="stopped")
        assert "Traceback" not in d.text()


async def test_reload_applies_a_changed_list_and_mode(sandbox: Sandbox, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """config.yaml unchanged, only the list file edited: SIGHUP's reload re-reads it. Then a
    switch to `mode: observe` applies to the next decision (audited, nothing sent)."""
    async with in_process(sandbox, tmp_path, monkeypatch, rules=BLOCKED_RULE,
                          blocked=["+14155550999"]) as daemon:
        conv, ext = flagged_call(sandbox, flag="false", address="tel:+14155550888")
        def seen() -> bool:
            call = daemon.engine.store.get(ConversationId(conv.id))
            return call is not None and ext.id in call.participants
        await wait_until(seen, 10, "the daemon to see the external party")
        assert conv.party(ext.id).state == "connected"
        (tmp_path / "blocked.txt").write_text("+14155550999\n+1 (415) 555-0888\n")
        assert await daemon.reload() is True
        await removed(sandbox, conv, ext, label="(number added to the list; judged at reload)")

        cfg = tmp_path / "config.yaml"
        cfg.write_text(cfg.read_text().replace("mode: enforce", "mode: observe"))
        assert await daemon.reload() is True
        assert daemon.mode == "observe" and daemon.enforcer is not None and daemon.enforcer.mode == "observe"
        conv2, ext2 = flagged_call(sandbox, flag="false", address="tel:+14155550888")
        await wait_until(lambda: [r for r in audit_records(tmp_path)
                                  if r["type"] == "outcome" and r["participant_id"] == ext2.id], 10,
                         "the observed outcome")
        outcome = next(r for r in audit_records(tmp_path) if r["type"] == "outcome" and r["participant_id"] == ext2.id)
        assert outcome["outcome"] == "observed"
        assert patched(sandbox, conv2, ext2) == [] and conv2.party(ext2.id).state == "connected"
        assert daemon.health().details["mode"] == "observe"


async def test_reload_names_settings_that_need_a_restart(sandbox: Sandbox, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    async with in_process(sandbox, tmp_path, monkeypatch) as daemon:
        cfg = tmp_path / "config.yaml"
        text = cfg.read_text()
        cfg.write_text(text.replace("path: audit/audit.jsonl", "path: elsewhere/audit.jsonl")
                       .replace("level: info", "level: debug"))
        with structlog.testing.capture_logs() as logs:
            assert await daemon.reload() is True
        (warning,) = [r for r in logs if r["event"] == "reload_needs_restart"]
        assert warning["settings"] == ["audit", "logging"] and warning["log_level"] == "warning"
        assert daemon.audit.path == tmp_path / "audit" / "audit.jsonl"  # unchanged, as the warning says
        cfg.write_text(text.replace("mode: enforce", "mode: observe"))
        with structlog.testing.capture_logs() as logs:
            assert await daemon.reload() is True
        assert not [r for r in logs if r["event"] == "reload_needs_restart"]
