"""Prometheus metrics. One `Metrics` object per process, each with its OWN registry (never
prometheus_client's global one), so tests can create as many as they like.

The attribute names below are a contract other modules rely on. Every metric name starts
with `confguard_`; prometheus_client adds `_total` to counters and `_bucket`/`_sum`/`_count`
to histograms on exposition.

Cardinality: `events_received{topic}` has one series per subscribed topic. With 2,500
queue topics that is 2,500 series (a few hundred KB of scrape), which Prometheus handles
well; `rule`/`outcome`/`action`/`mode` labels are bounded by the rule set, `route` by the
fixed set of API routes (templates such as `/api/v2/conversations/calls/{id}`, never raw
paths with ids), `channel` by the handful of notification channels.

Latency histograms use buckets from 0.1 ms to 1 s: the daemon's job is to act within
milliseconds of an event, so resolution is concentrated there.
"""

from __future__ import annotations

import platform
from collections.abc import Callable
from importlib import metadata
from typing import Any, Protocol

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Enum,
    Gauge,
    Histogram,
    Info,
    generate_latest,
)

__all__ = ["Metrics", "DAEMON_STATES", "LATENCY_BUCKETS", "CONTENT_TYPE"]

#: Seconds. 0.1 ms .. 1 s, roughly 1-2.5-5 per decade.
LATENCY_BUCKETS: tuple[float, ...] = (
    0.0001, 0.00025, 0.0005,
    0.001, 0.0025, 0.005,
    0.01, 0.025, 0.05,
    0.1, 0.25, 0.5,
    1.0,
)
#: Seconds. A resync reads every tracked call: tenths of a second to minutes.
RESYNC_BUCKETS: tuple[float, ...] = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)

#: Seconds. Events from a queue arrive in about a second; EventBridge retries for four days.
EVENT_AGE_BUCKETS: tuple[float, ...] = (0.25, 0.5, 1, 2, 5, 10, 30, 60, 300, 1800, 3600, 21600, 86400, 345600)

DAEMON_STATES: tuple[str, ...] = (
    "starting", "subscribing", "resyncing", "running", "degraded", "reloading", "draining",
    "stopped",
)

#: The Content-Type of `Metrics.render()`: Prometheus text format 0.0.4, which every
#: Prometheus version parses. (prometheus_client >= 0.22 calls its default "1.0.0", but the
#: bytes for our legacy-valid names are the same, and older scrapers reject "1.0.0".)
CONTENT_TYPE: str = "text/plain; version=0.0.4; charset=utf-8"


class BudgetView(Protocol):
    """What `track_budget` reads (`daemon.genesys.ratelimit.BudgetSnapshot` has it)."""

    @property
    def allowed(self) -> int: ...
    @property
    def used(self) -> int: ...
    @property
    def remaining(self) -> int: ...
    @property
    def reset_seconds(self) -> float: ...


class CoverageView(Protocol):
    """What `track_coverage` reads (`daemon.core.coverage.CoverageSnapshot` has it)."""

    @property
    def calls_unread(self) -> int: ...
    @property
    def conferences_unread(self) -> int: ...
    @property
    def oldest_unread_seconds(self) -> float: ...
    @property
    def oldest_conference_unread_seconds(self) -> float: ...


def _version() -> str:
    try:
        return metadata.version("confguard")
    except metadata.PackageNotFoundError:
        return "unknown"


class Metrics:
    """All confguard metrics on a private registry. See the module docstring for units.

    Modules take this object (or `Metrics | None`) and call its typed attributes directly;
    there is no lookup by name, so a misspelt metric is a mypy error, not a dropped sample.
    `tests/service/test_metrics_registry.py` checks that every attribute the code touches is
    registered and exported.
    """

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry(auto_describe=True)
        p = "confguard_"

        # -- events and decisions
        self.events_received: Counter = Counter(
            p + "events_received", "Notification messages received, by topic.", ["topic"],
            registry=r)
        self.events_rejected: Counter = Counter(
            p + "events_rejected",
            "Malformed or unusable messages, by source (websocket, rest, ...) and reason.",
            ["source", "reason"],
            registry=r)
        self.event_to_decision_seconds: Histogram = Histogram(
            p + "event_to_decision_seconds",
            "Seconds from a message's receipt to the rule decision it caused.",
            buckets=LATENCY_BUCKETS, registry=r)
        self.event_to_request_seconds: Histogram = Histogram(
            p + "event_to_request_seconds",
            "Seconds from a message's receipt to the disconnect request being sent.",
            buckets=LATENCY_BUCKETS, registry=r)
        self.decisions: Counter = Counter(
            p + "decisions", "Rule matches, by rule, action and mode.", ["rule", "action", "mode"],
            registry=r)
        self.outcomes: Counter = Counter(
            p + "outcomes", "Enforcement outcomes (disconnected, already_gone, failed, "
            "unconfirmed, observed, suppressed), by rule.", ["rule", "outcome"], registry=r)

        # -- stream and resync
        self.reconnects: Counter = Counter(
            p + "reconnects", "Notification WebSocket reconnects, by reason.", ["reason"],
            registry=r)
        self.stream_gaps: Counter = Counter(
            p + "stream_gaps", "Times events may have been missed (gap), by reason.", ["reason"],
            registry=r)
        self.resyncs: Counter = Counter(
            p + "resyncs", "Resyncs of call state over REST, by reason.", ["reason"], registry=r)
        self.resync_duration_seconds: Histogram = Histogram(
            p + "resync_duration_seconds", "Seconds a resync took.", buckets=RESYNC_BUCKETS,
            registry=r)
        self.resync_errors: Counter = Counter(
            p + "resync_errors", "REST reads that failed during a resync pass (a call's GET "
            "other than 404, or a failed discovery attempt), by kind (reconcile: the periodic "
            "anti-entropy pass; resync: start-up and gaps).", ["kind"], registry=r)
        self.resync_last_calls: Gauge = Gauge(
            p + "resync_last_calls", "Calls read by the last resync.", registry=r)
        self.resync_last_seconds: Gauge = Gauge(
            p + "resync_last_seconds", "Seconds the last resync took.", registry=r)
        self.tracked_calls: Gauge = Gauge(
            p + "tracked_calls", "Calls currently held in memory.", registry=r)
        self.stream_connections: Counter = Counter(
            p + "stream_connections", "Notification WebSocket connections opened (first "
            "connects, reconnects and channel handovers).", registry=r)
        self.channels: Gauge = Gauge(
            p + "channels", "Notification channels open.", registry=r)
        self.channel_age_seconds: Gauge = Gauge(
            p + "channel_age_seconds", "Seconds since each channel was created.", ["channel"],
            registry=r)
        self.subscribed_topics: Gauge = Gauge(
            p + "subscribed_topics", "Topics currently subscribed across channels.", registry=r)
        self.token_age_seconds: Gauge = Gauge(
            p + "token_age_seconds", "Seconds since the OAuth token in use was issued.",
            registry=r)

        # -- API
        self.api_requests: Counter = Counter(
            p + "api_requests", "Genesys REST requests, by method, route template and status "
            "(0 = no HTTP answer).", ["method", "route", "status"], registry=r)
        self.api_errors: Counter = Counter(
            p + "api_errors", "Genesys REST requests that failed, by status.", ["status"],
            registry=r)

        # -- request budget (daemon.genesys.ratelimit; the gauges read the limiter at scrape)
        self.budget_allowed = Gauge(
            p + "budget_allowed", "Requests allowed in the current budget window (learnt from "
            "Genesys' inin-ratelimit-allowed, else genesys.requests_per_minute).", registry=r)
        self.budget_used = Gauge(
            p + "budget_used", "Requests counted in the current budget window.", registry=r)
        self.budget_remaining = Gauge(
            p + "budget_remaining", "Requests left in the current budget window.", registry=r)
        self.budget_reset_seconds = Gauge(
            p + "budget_reset_seconds", "Seconds until the budget window resets (0: none under way).",
            registry=r)
        self.calls_unread = Gauge(
            p + "calls_unread", "Live calls known whose current state has not been read yet "
            "(a resync's reads under way; an event counts as a read).", registry=r)
        self.coverage_oldest_unread_seconds = Gauge(
            p + "coverage_oldest_unread_seconds", "Seconds the call unread the longest has been "
            "unread (0: every known call read).", registry=r)
        self.coverage_oldest_conference_unread_seconds = Gauge(
            p + "coverage_oldest_conference_unread_seconds", "Seconds the conference unread the "
            "longest has been unread (0: every known conference read).", registry=r)
        self.conferences_unread = Gauge(
            p + "conferences_unread", "Known conferences whose current state has not been read yet.",
            registry=r)
        self.rate_limited = Counter(
            p + "rate_limited", "HTTP 429 answers, by the request's priority (enforce, normal, "
            "resync).", ["priority"], registry=r)
        self.reconcile_budget_share = Gauge(
            p + "reconcile_budget_share", "Fraction (0..1) of the window's allowance that "
            "reconciliation used over its last interval.", registry=r)

        # -- safety, lifecycle, audit, config
        self.safety_valve_tripped: Gauge = Gauge(
            p + "safety_valve_tripped", "1 while the safety valve holds disconnects back.",
            registry=r)
        self.daemon_state: Enum = Enum(
            p + "daemon_state", "Lifecycle state of the daemon.", states=list(DAEMON_STATES),
            registry=r)
        self.audit_records: Counter = Counter(
            p + "audit_records", "Audit records written, by type.", ["type"], registry=r)
        self.audit_unsynced_seconds: Gauge = Gauge(
            p + "audit_unsynced_seconds", "Age in seconds of the oldest audit record written "
            "but not yet fsynced; 0 when every record is synced.", registry=r)
        self.audit_checkpoints: Counter = Counter(
            p + "audit_checkpoints", "Signed audit checkpoints, by sink (trail: written into the "
            "chain and logged; postgres; s3) and result (ok, failed: retried).", ["sink", "result"],
            registry=r)
        self.audit_checkpoints_queued: Gauge = Gauge(
            p + "audit_checkpoints_queued", "Checkpoints waiting for a sink (all sinks together).",
            registry=r)
        self.config_reloads: Counter = Counter(
            p + "config_reloads", "Configuration reloads, by result (ok, rejected).", ["result"],
            registry=r)

        # -- high availability (daemon.service.ha; zero/absent with ha.backend: none)
        self.ha_role: Gauge = Gauge(
            p + "ha_role", "1 for this node's current HA role (leader, standby, no-lease), 0 for "
            "the others.", ["role"], registry=r)
        self.ha_send_margin_seconds: Gauge = Gauge(
            p + "ha_send_margin_seconds", "Seconds before its lease runs out (its own clock) at "
            "which a leader stops writing removals (ha.safety_margin); must exceed the one-way "
            "delay to Genesys.", registry=r)
        self.ha_epoch: Gauge = Gauge(
            p + "ha_epoch", "The lease epoch (fencing token) this node holds or last saw.",
            registry=r)
        self.ha_lease_age_seconds: Gauge = Gauge(
            p + "ha_lease_age_seconds", "Seconds since the lease was last renewed: by this "
            "node while leader, else by its holder as the database showed it (0 when unknown).",
            registry=r)
        self.ha_renewals: Counter = Counter(
            p + "ha_renewals", "Lease renewals by a leader, by result (ok, failed, lost).",
            ["result"], registry=r)

        # -- control API (daemon.service.control)
        self.control_requests: Counter = Counter(
            p + "control_requests", "Control API requests, by caller (unauthenticated: '-'), "
            "route template and HTTP status.", ["caller", "route", "status"], registry=r)
        self.control_auth_failures: Counter = Counter(
            p + "control_auth_failures", "Control API requests refused 401, by reason "
            "(missing, unknown_token).", ["reason"], registry=r)
        self.control_rate_limited: Counter = Counter(
            p + "control_rate_limited", "Control API requests refused 429 by the per-caller "
            "limit, by caller.", ["caller"], registry=r)
        # -- the ops and control listeners (daemon.service.listener)
        self.listener_rejections: Counter = Counter(
            p + "listener_rejections", "Connections or requests the ops/control listeners "
            "refused or cut, by listener (ops, control) and reason (over_capacity, "
            "header_timeout, bad_request, body_timeout, handler_error, login_throttled).",
            ["listener", "reason"], registry=r)
        # -- event sources beside the WebSocket (daemon.service.eventbridge)
        self.source_messages: Counter = Counter(
            p + "source_messages", "Messages of a queue source, by source and stage (received, "
            "handled, rejected, deleted).", ["source", "stage"], registry=r)
        self.source_event_age_seconds: Histogram = Histogram(
            p + "source_event_age_seconds", "Age of an event when it arrived from a queue source "
            "(now - the event's publish time), seconds.", ["source"], buckets=EVENT_AGE_BUCKETS,
            registry=r)
        self.source_rereads: Counter = Counter(
            p + "source_rereads", "Calls re-read because a queue source's event showed what the "
            "state did not, by source and reason (unknown_participant, attributes_differ, "
            "ended_but_connected, unseen_call_in_scope).", ["source", "reason"], registry=r)
        self.source_skipped: Counter = Counter(
            p + "source_skipped", "Queue-source events that cost no request, by source and reason "
            "(reflected, older, duplicate, out_of_scope, ended_call, not_tracked).",
            ["source", "reason"], registry=r)
        self.source_errors: Counter = Counter(
            p + "source_errors", "Failed calls of a queue source to its queue, by source and kind "
            "(unreachable, access_denied, credentials, not_found, throttled, other).",
            ["source", "kind"], registry=r)
        self.source_up: Gauge = Gauge(
            p + "source_up", "1 while a queue source is receiving, 0 while it is down, degraded "
            "or stopped.", ["source"], registry=r)
        self.build_info: Info = Info(
            p + "build", "Version and build of the running daemon.", registry=r)
        self.build_info.info({"version": _version(), "python": platform.python_version()})
        self._children: dict[tuple[object, ...], Any] = {}  # `child`

    def track_budget(self, snapshot: Callable[[], BudgetView]) -> None:
        """Read the budget gauges from `snapshot()` (e.g. `RequestLimiter.snapshot`) at each
        scrape, so they are never stale and the request path does no metric work."""
        self.budget_allowed.set_function(lambda: float(snapshot().allowed))
        self.budget_used.set_function(lambda: float(snapshot().used))
        self.budget_remaining.set_function(lambda: float(snapshot().remaining))
        self.budget_reset_seconds.set_function(lambda: float(snapshot().reset_seconds))

    def track_coverage(self, snapshot: Callable[[], CoverageView]) -> None:
        """Read the coverage gauges from `snapshot()` (the daemon's `Coverage.snapshot` at
        now) at each scrape."""
        self.calls_unread.set_function(lambda: float(snapshot().calls_unread))
        self.conferences_unread.set_function(lambda: float(snapshot().conferences_unread))
        self.coverage_oldest_unread_seconds.set_function(
            lambda: float(snapshot().oldest_unread_seconds))
        self.coverage_oldest_conference_unread_seconds.set_function(
            lambda: float(snapshot().oldest_conference_unread_seconds))

    def child(self, metric: Any, *values: str) -> Any:
        """`metric.labels(*values)`, kept per metric and label values: `labels()` builds
        and looks up its key under a lock each time (~2-5 us). For the hot path's counts
        (decisions, outcomes, audit records, events by topic). It keeps one entry per
        child the metric itself keeps for ever, so it is exactly as bounded as the metric's
        own label values."""
        key = (id(metric), *values)
        found = self._children.get(key)
        if found is None:
            found = self._children[key] = metric.labels(*values)
        return found

    def note_listener_rejection(self, listener: str, reason: str) -> None:
        """Count one listener rejection (the `Listener` `on_reject` hook)."""
        self.listener_rejections.labels(listener=listener, reason=reason).inc()

    def render(self) -> bytes:
        """The Prometheus text exposition of every metric."""
        data: bytes = generate_latest(self.registry)
        return data

    @property
    def content_type(self) -> str:
        return CONTENT_TYPE
