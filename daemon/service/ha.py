"""High availability: the PostgreSQL lease and the shared decisions table (asyncpg).

`HaNode` runs the lease loop for one host. The policy (who may send, when to renew) lives
in the sans-I/O `daemon.core.lease.LeasePolicy`; this module only talks to the database:

- Table `confguard_lease` (one row per lease name): `holder` (node), `epoch` (the fencing
  token, +1 at every change of holder), `expires_at` and `renewed_at` (by the DATABASE's
  clock, `clock_timestamp()`), `holder_pid` (the holder's backend pid).
- Renewal (leader, every `takeover_after / 3`): ONE statement,
  `UPDATE ... SET expires_at = clock_timestamp() + takeover_after WHERE name AND holder = me
  AND epoch = mine`. No row updated: the lease was taken (epoch moved) -> standby at once.
- Take-over (standby, every `poll_interval`): in one transaction, `SELECT ... FOR UPDATE`
  the row; take it (epoch + 1) when it has no holder, has expired by the database clock, or
  its holder's database session is gone (`holder_pid`, written by every renewal, is no
  longer in `pg_stat_activity`: the common case of a killed process, whose socket the
  kernel closed, is taken over at once instead of after `takeover_after`; this plays the
  part of a session advisory lock, without the lock's hand-over races). When an expired
  holder's session is still there (a frozen process keeps its socket open), it is ended
  with `pg_terminate_backend`, so the frozen process finds its connection gone when it
  wakes.
- Any database error or timeout: the connection is dropped and the node fails closed
  (`LeasePolicy.failed`); it reconnects at the next attempt. A connection that closes under
  us (database restart, `pg_terminate_backend`) fails closed at once (termination listener).
- SIGTERM: `release()` sets the row's holder to NULL so the standby takes over at its next
  poll (well under a second).
- Database unreachable at start-up: the node WAITS as `no-lease` (deciding, auditing
  `standby`, never sending) and retries every poll interval, logging `ha_db_unreachable`
  (at most every 10 s) with the reason. It never enforces without a lease.

Table `confguard_decisions`: a leader writes one row per removal it is about to send (node,
epoch, call, party, rule) and sets its `outcome` when the action ends. The rows are written
by a background writer started in the same turn as the PATCH (never awaited on the hot
path). A new leader reads, on take-over, the rows of the last `2 * takeover_after` and the
ones never closed: their calls are re-read before it sends anything, and rows of another
node with no outcome are closed (an outcome record in the new leader's audit, and the
row's `outcome`); a node's own rows are left to its own enforcer and, after a restart, to
the start-up closing from its own audit trail. Rows older than a day are deleted by the
leader (hourly).

Passwords in the DSN never reach a log line: errors are reported by type and message
only (asyncpg does not echo the DSN), and the DSN is logged with its password masked.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import structlog

from daemon.core.ids import ConversationId, ParticipantId, RuleName
from daemon.core.lease import LeasePolicy, LeaseView, Role, ROLES
from daemon.core.model import Decision
from daemon.service.recovery import Unfinished, close_unfinished
from daemon.service.metrics import Metrics

log = structlog.get_logger(__name__)

__all__ = ["HaGate", "HaNode", "Takeover", "UnfinishedDecision", "SCHEMA", "mask_dsn", "within"]

SCHEMA = """
CREATE TABLE IF NOT EXISTS confguard_lease (
    name        text PRIMARY KEY,
    holder      text,
    epoch       bigint NOT NULL DEFAULT 0,
    expires_at  timestamptz NOT NULL DEFAULT '-infinity',
    renewed_at  timestamptz,
    holder_pid  integer
);
CREATE TABLE IF NOT EXISTS confguard_decisions (
    id              bigserial PRIMARY KEY,
    lease           text NOT NULL,
    node            text NOT NULL,
    epoch           bigint NOT NULL,
    conversation_id text NOT NULL,
    participant_id  text NOT NULL,
    rule            text NOT NULL,
    decided_at      timestamptz NOT NULL DEFAULT clock_timestamp(),
    outcome         text,
    closed_at       timestamptz
);
CREATE INDEX IF NOT EXISTS confguard_decisions_lease_time ON confguard_decisions (lease, decided_at);
"""

#: What "the database did not answer" looks like: network errors, timeouts, server errors,
#: a closed connection, and the driver's own state errors on a connection that is dying
#: (e.g. after `pg_terminate_backend` while this process was frozen).
DB_ERRORS: tuple[type[BaseException], ...] = (
    OSError, asyncio.TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError,
    asyncpg.exceptions.InternalClientError)

MAX_PENDING_WRITES = 10_000
UNREACHABLE_LOG_EVERY = 10.0  # seconds between repeated ha_db_unreachable lines


def mask_dsn(dsn: str) -> str:
    """The DSN with any password replaced by `***` (for log lines)."""
    try:
        parts = urlsplit(dsn)
    except ValueError:
        return "<unparsable dsn>"
    if parts.password is None:
        return dsn
    netloc = parts.netloc.rsplit("@", 1)[1]
    user = parts.username or ""
    return urlunsplit(parts._replace(netloc=f"{user}:***@{netloc}"))


@dataclass(frozen=True, slots=True)
class UnfinishedDecision:
    """A row of `confguard_decisions` seen at take-over."""

    id: int
    node: str
    epoch: int
    conversation_id: ConversationId
    participant_id: ParticipantId
    rule: RuleName
    outcome: str | None
    age: float  # seconds since it was decided, by the database clock


def boottime() -> float:
    """Seconds on CLOCK_BOOTTIME (Linux): like CLOCK_MONOTONIC, but it keeps counting while
    the host is suspended, so a leader whose host slept through its lease finds the lease
    run out when it wakes (on CLOCK_MONOTONIC the sleep would not count and the lease would
    look valid for its remaining time). Elsewhere `time.monotonic()`."""
    return time.clock_gettime(_BOOTTIME)


_BOOTTIME: int = getattr(time, "CLOCK_BOOTTIME", time.CLOCK_MONOTONIC)


class HaNode:
    """One host's part in the lease. See the module docstring.

    `dsn`: the PostgreSQL DSN. `lease`: the lease name. `node`: this host's name.
    `policy`: the LeasePolicy (its `takeover_after` is the lease lifetime). `metrics`: a
    `daemon.service.metrics.Metrics` or None. `on_term(epoch)`: called (synchronously, on
    the loop) when this node becomes leader for a new term; `on_lost()` when it stops
    being leader. `clock`: seconds on CLOCK_BOOTTIME (`boottime`), which counts a suspend.
    """

    def __init__(self, dsn: str, *, lease: str, node: str, policy: LeasePolicy,
                 metrics: Metrics | None = None, on_term: Callable[[int], None] | None = None,
                 on_lost: Callable[[str], None] | None = None,
                 clock: Callable[[], float] = boottime,
                 connect_timeout: float | None = None) -> None:
        self.dsn = dsn
        self.lease = lease
        self.node = node
        self.policy = policy
        self.metrics = metrics
        self.on_term = on_term
        self.on_lost = on_lost
        self._clock = clock
        self._timeout = connect_timeout or max(0.5, policy.renew_interval)
        self._conn: Any = None  # asyncpg.Connection for the lease row
        self._data: Any = None  # asyncpg.Connection for the decisions table
        self._schema_ready = False
        self._wake = asyncio.Event()
        self._writes: deque[tuple[str, tuple[Any, ...]]] = deque()
        self._writes_wake = asyncio.Event()
        self._dropped_writes = 0
        self._last_unreachable_log = -1e18
        self._stopping = False
        self._last_role: Role | None = None
        self.renewals = {"ok": 0, "failed": 0, "lost": 0}
        self.last_renew_seconds: float | None = None

    # ------------------------------------------------------------------ state

    def may_send(self) -> bool:
        return self.policy.may_send(self._clock())

    def send_budget(self) -> float:
        """Seconds left to write a PATCH under the current lease (0: not now)."""
        return self.policy.send_budget(self._clock())

    @property
    def role(self) -> Role:
        return self.policy.role(self._clock())

    @property
    def epoch(self) -> int:
        return self.policy.epoch

    def lease_age(self) -> float | None:
        return self.policy.lease_age(self._clock())

    def health(self) -> dict[str, Any]:
        """The `/healthz` keys: role, epoch, node, lease_age (seconds since the lease was
        last renewed, by us or by its holder; None when unknown)."""
        age = self.lease_age()
        return {"role": self.role.value, "epoch": self.epoch, "node": self.node,
                "lease_age": None if age is None else round(age, 3)}

    def update_metrics(self) -> None:
        m = self.metrics
        role = self.role
        if m is not None:
            for r in ROLES:
                m.ha_role.labels(role=r).set(1 if r == role.value else 0)
            m.ha_epoch.set(self.epoch)
            m.ha_send_margin_seconds.set(self.policy.safety_margin)
            age = self.lease_age()
            m.ha_lease_age_seconds.set(age if age is not None else 0)
        if role is not self._last_role:
            old, self._last_role = self._last_role, role
            log.info("ha_role", old=old.value if old else None, new=role.value,
                     epoch=self.epoch, node=self.node, holder=self.policy.holder)

    def _count(self, result: str) -> None:
        self.renewals[result] += 1
        if self.metrics is not None:
            self.metrics.ha_renewals.labels(result=result).inc()

    # ------------------------------------------------------------------ connection

    async def _connect(self) -> Any:
        if self._conn is not None and not self._conn.is_closed():
            return self._conn
        self._conn = None
        conn = await asyncpg.connect(self.dsn, timeout=self._timeout,
                                     server_settings={"application_name": f"confguard:{self.node}"})
        conn.add_termination_listener(self._terminated)
        if not self._schema_ready:
            try:
                async with conn.transaction():
                    # Two hosts creating the tables at once would race in the catalog.
                    await conn.execute("SELECT pg_advisory_xact_lock(hashtextextended('confguard-schema', 0))")
                    await conn.execute(SCHEMA)
                    await conn.execute("INSERT INTO confguard_lease (name) VALUES ($1) "
                                       "ON CONFLICT (name) DO NOTHING", self.lease)
            except BaseException:
                await _close(conn)
                raise
            self._schema_ready = True
        self._conn = conn
        log.info("ha_db_connected", dsn=mask_dsn(self.dsn), lease=self.lease, node=self.node)
        return conn

    def _terminated(self, conn: Any) -> None:
        """The lease connection closed under us: fail closed now, not at the next renewal."""
        if conn is not self._conn or self._stopping:
            return
        self._conn = None
        was_leader = self.policy.is_leader
        self.policy.failed()
        log.warning("ha_db_connection_lost", node=self.node, was_leader=was_leader,
                    detail="sending stops until the lease is renewed")
        if was_leader:
            self._count("failed")
            self._lost("database connection lost")
        self.update_metrics()
        self._wake.set()

    def _lost(self, why: str) -> None:
        if self.on_lost is not None:
            try:
                self.on_lost(why)
            except Exception:
                log.exception("ha_on_lost_failed")

    async def _drop(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            await _close(conn)

    def _abort(self) -> None:
        """Drop the lease connection at once (no close handshake: it is failing)."""
        conn, self._conn = self._conn, None
        if conn is not None and not conn.is_closed():
            conn.terminate()

    async def _renew_or_take(self, was_leader: bool) -> LeaseView:
        conn = await self._connect()
        return await (self._renew(conn) if was_leader else self._take(conn))

    # ------------------------------------------------------------------ one attempt

    async def attempt(self) -> bool:
        """One renewal (leader) or take-over attempt. Returns True when it started a new
        leader term. Never raises for database trouble: it fails closed instead."""
        sent_at = self._clock()
        self.policy.attempt_started(sent_at)
        was_leader = self.policy.is_leader
        # A hard deadline of our own around the driver's timeouts: after a freeze (SIGSTOP)
        # or a connection torn down mid-query, the driver's cancel handshake can wait on a
        # dead socket; the lease loop must never wait with it.
        exc: BaseException | None = None
        view: LeaseView | None = None
        try:
            view = await within(self._renew_or_take(was_leader), 2 * self._timeout + 0.5)
        except DB_ERRORS as caught:  # asyncio.TimeoutError (our deadline) included
            exc = caught
        if view is None:
            self.policy.failed()
            if was_leader:
                self._count("failed")
                self._lost(f"renewal failed: {type(exc).__name__}")
            self._unreachable(exc or asyncio.TimeoutError())
            self._abort()
            self.update_metrics()
            return False
        self.last_renew_seconds = self._clock() - sent_at
        became = self.policy.succeeded(sent_at, view)
        if was_leader:
            if view.ours:
                self._count("ok")
            else:
                self._count("lost")
                log.warning("ha_lease_lost", node=self.node, holder=view.holder, epoch=view.epoch,
                            detail="another node holds the lease; sending stops, deciding goes on")
                self._lost(f"lease taken by {view.holder} (epoch {view.epoch})")
        if became:
            log.warning("ha_became_leader", node=self.node, epoch=view.epoch, lease=self.lease)
            if self.on_term is not None:
                try:
                    self.on_term(view.epoch)
                except Exception:
                    log.exception("ha_on_term_failed")
        self.update_metrics()
        return became

    def _unreachable(self, exc: BaseException) -> None:
        now = self._clock()
        if now - self._last_unreachable_log >= UNREACHABLE_LOG_EVERY:
            self._last_unreachable_log = now
            log.error("ha_db_unreachable", node=self.node, lease=self.lease,
                      error_type=type(exc).__name__, error=str(exc)[:300] or type(exc).__name__,
                      detail="no lease: deciding as standby, sending nothing; retrying")

    async def _renew(self, conn: Any) -> LeaseView:
        row = await conn.fetchrow(
            "UPDATE confguard_lease SET expires_at = clock_timestamp() + make_interval(secs => $4), "
            "renewed_at = clock_timestamp(), holder_pid = pg_backend_pid() "
            "WHERE name = $1 AND holder = $2 AND epoch = $3 RETURNING epoch",
            self.lease, self.node, self.policy.epoch, self.policy.takeover_after,
            timeout=self._timeout)
        if row is not None:
            return LeaseView(self.node, int(row["epoch"]), True)
        current = await conn.fetchrow(
            "SELECT holder, epoch, extract(epoch FROM clock_timestamp() - renewed_at)::float8 AS age "
            "FROM confguard_lease WHERE name = $1", self.lease, timeout=self._timeout)
        if current is None:
            return LeaseView(None, self.policy.epoch, False)
        return LeaseView(current["holder"], int(current["epoch"]), False, current["age"])

    async def _take(self, conn: Any) -> LeaseView:
        terminate: int | None = None
        select = ("SELECT holder, epoch, holder_pid, expires_at <= clock_timestamp() AS expired, "
                  "extract(epoch FROM clock_timestamp() - renewed_at)::float8 AS age, "
                  "(holder_pid IS NULL OR NOT EXISTS (SELECT 1 FROM pg_stat_activity a "
                  "WHERE a.pid = holder_pid)) AS session_gone "
                  "FROM confguard_lease WHERE name = $1 FOR UPDATE")
        async with conn.transaction():
            row = await conn.fetchrow(select, self.lease, timeout=self._timeout)
            if row is None:  # deleted by hand: create it again
                await conn.execute("INSERT INTO confguard_lease (name) VALUES ($1) "
                                   "ON CONFLICT (name) DO NOTHING", self.lease, timeout=self._timeout)
                row = await conn.fetchrow(select, self.lease, timeout=self._timeout)
            assert row is not None
            holder, epoch = row["holder"], int(row["epoch"])
            free = holder is None or bool(row["expired"])
            if not free and row["session_gone"]:
                # The holder renews through its own session and records that session's pid;
                # when that session is gone (a killed process, whose socket the kernel
                # closed), its holder cannot send either: no need to wait for the expiry.
                # (A live holder whose session dropped has already stopped sending: it
                # fails closed the moment its connection closes.)
                log.info("ha_holder_session_gone", node=self.node, holder=holder, epoch=epoch)
                free = True
            if not free:
                return LeaseView(holder, epoch, False, row["age"])
            if holder is not None and row["holder_pid"] is not None and not row["session_gone"]:
                terminate = int(row["holder_pid"])
            new = await conn.fetchval(
                "UPDATE confguard_lease SET holder = $2, epoch = epoch + 1, "
                "expires_at = clock_timestamp() + make_interval(secs => $3), "
                "renewed_at = clock_timestamp(), holder_pid = pg_backend_pid() "
                "WHERE name = $1 RETURNING epoch", self.lease, self.node,
                self.policy.takeover_after, timeout=self._timeout)
        if terminate is not None:
            # A frozen holder keeps its session open; end it, so that the frozen process
            # finds its connection gone (and fails closed) the moment it wakes. Best effort.
            with contextlib.suppress(*DB_ERRORS):
                ended = await conn.fetchval(
                    "SELECT pg_terminate_backend($1) FROM pg_stat_activity "
                    "WHERE pid = $1 AND pid <> pg_backend_pid()", terminate, timeout=self._timeout)
                if ended:
                    log.info("ha_old_holder_session_ended", holder=holder, pid=terminate)
        return LeaseView(self.node, int(new), True)

    # ------------------------------------------------------------------ loop

    async def run(self, stop: asyncio.Event, *, on_term: Callable[[int], None] | None = None,
                  on_lost: Callable[[str], None] | None = None) -> None:
        """Renew or try to take the lease until `stop` is set (then call `release`). Each
        attempt is bounded; a failure fails closed and is retried at the next poll.
        `on_term`/`on_lost`, when given, replace the constructor's for this run (the daemon
        builds its `Takeover` after the node)."""
        if on_term is not None:
            self.on_term = on_term
        if on_lost is not None:
            self.on_lost = on_lost
        writer = asyncio.create_task(self._writer(stop), name="ha-writer")
        try:
            while not stop.is_set():
                now = self._clock()
                due = self.policy.next_attempt(now)
                if due > now:
                    self._wake.clear()
                    # Wake at the due time, at a stop, or when the connection closed under us.
                    waits = [asyncio.ensure_future(self._wake.wait()), asyncio.ensure_future(stop.wait())]
                    _, pending = await asyncio.wait(waits, timeout=due - now,
                                                    return_when=asyncio.FIRST_COMPLETED)
                    for w in waits:
                        w.cancel()
                    self.update_metrics()  # a lease running out locally shows at once
                    continue
                try:
                    await self.attempt()
                except Exception:  # a bug here must not end the loop: fail closed, go on
                    log.exception("ha_attempt_crashed", node=self.node)
                    was_leader = self.policy.is_leader
                    self.policy.failed()
                    if was_leader:
                        self._count("failed")
                        self._lost("lease attempt crashed")
                    self._abort()
                    self.update_metrics()
                    await asyncio.sleep(self.policy.poll_interval)
        finally:
            writer.cancel()
            writer.add_done_callback(_retrieve)
            await asyncio.wait({writer}, timeout=1.0)

    async def release(self) -> None:
        """Hand the lease back (shutdown), so the standby takes over at its next poll; then
        close the connections. Bounded by the attempt timeout."""
        self._stopping = True
        was = self.policy.is_leader
        epoch = self.policy.epoch
        self.policy.released()
        if was and self._conn is not None and not self._conn.is_closed():
            try:
                await within(self._conn.execute(
                    "UPDATE confguard_lease SET holder = NULL, expires_at = '-infinity', holder_pid = NULL "
                    "WHERE name = $1 AND holder = $2 AND epoch = $3", self.lease, self.node, epoch,
                    timeout=self._timeout), self._timeout + 0.5)
                log.info("ha_lease_released", node=self.node, epoch=epoch)
            except DB_ERRORS as exc:
                log.warning("ha_lease_release_failed", error_type=type(exc).__name__,
                            detail="the standby takes over when the lease expires")
        with contextlib.suppress(asyncio.TimeoutError):
            await within(self._flush_writes(), 2 * self._timeout + 0.5)
        await self._drop()
        data, self._data = self._data, None
        if data is not None:
            await _close(data)
        self.update_metrics()

    # ------------------------------------------------------------------ decisions table

    def record_intent(self, conversation_id: ConversationId, participant_id: ParticipantId,
                      rule: RuleName) -> None:
        """A removal is about to be sent by this leader (call it right before the PATCH).
        Queued for the background writer: the hot path never waits on the database."""
        self._queue("INSERT INTO confguard_decisions (lease, node, epoch, conversation_id, "
                    "participant_id, rule) VALUES ($1, $2, $3, $4, $5, $6)",
                    (self.lease, self.node, self.policy.epoch, conversation_id, participant_id, rule))

    def record_outcome(self, conversation_id: ConversationId, participant_id: ParticipantId,
                       rule: RuleName, outcome: str) -> None:
        """Close this node's open row(s) for the party and rule with `outcome`."""
        self._queue("UPDATE confguard_decisions SET outcome = $6, closed_at = clock_timestamp() "
                    "WHERE lease = $1 AND node = $2 AND conversation_id = $3 AND participant_id = $4 "
                    "AND rule = $5 AND outcome IS NULL",
                    (self.lease, self.node, conversation_id, participant_id, rule, outcome))

    def _queue(self, sql: str, args: tuple[Any, ...]) -> None:
        if len(self._writes) >= MAX_PENDING_WRITES:
            self._dropped_writes += 1
            if self._dropped_writes in (1, 10, 100) or self._dropped_writes % 1000 == 0:
                log.error("ha_decision_rows_dropped", dropped=self._dropped_writes,
                          detail="the database is not keeping up; the audit trail still has them")
            return
        self._writes.append((sql, args))
        self._writes_wake.set()

    async def _data_conn(self) -> Any:
        if self._data is None or self._data.is_closed():
            self._data = await asyncpg.connect(
                self.dsn, timeout=self._timeout,
                server_settings={"application_name": f"confguard:{self.node}:decisions"})
        return self._data

    async def _flush_writes(self) -> bool:
        """Write what is queued, in order. False (rows kept) when the database fails."""
        while self._writes:
            sql, args = self._writes[0]
            try:
                conn = await within(self._data_conn(), self._timeout + 0.5)
                await within(conn.execute(sql, *args, timeout=self._timeout), self._timeout + 0.5)
            except DB_ERRORS as exc:
                log.warning("ha_decision_row_failed", error_type=type(exc).__name__, queued=len(self._writes))
                data, self._data = self._data, None
                if data is not None:
                    await _close(data)
                return False
            self._writes.popleft()
        return True

    async def _writer(self, stop: asyncio.Event) -> None:
        last_prune = self._clock()
        while not stop.is_set():
            self._writes_wake.clear()
            if not self._writes:
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._writes_wake.wait(), timeout=5.0)
            try:
                flushed = await self._flush_writes()
            except Exception:  # a bug here must not end the writer: rows would pile up unseen
                log.exception("ha_writer_crashed", node=self.node)
                flushed = False
            if not flushed:
                await asyncio.sleep(self.policy.poll_interval)
            if self.policy.is_leader and self._clock() - last_prune > 3600:
                last_prune = self._clock()
                with contextlib.suppress(*DB_ERRORS):
                    conn = await self._data_conn()
                    await conn.execute("DELETE FROM confguard_decisions WHERE lease = $1 "
                                       "AND decided_at < clock_timestamp() - interval '1 day'", self.lease,
                                       timeout=self._timeout)

    async def recent_decisions(self, window: float) -> list[UnfinishedDecision]:
        """Rows of this lease decided in the last `window` seconds, or never closed (up to a
        day back), oldest first; past 10,000 such rows the newest 10,000 (those matter most at
        a take-over). Raises the database error (the caller decides)."""
        conn = await self._data_conn()
        rows = await conn.fetch(
            "SELECT id, node, epoch, conversation_id, participant_id, rule, outcome, "
            "extract(epoch FROM clock_timestamp() - decided_at)::float8 AS age "
            "FROM confguard_decisions WHERE lease = $1 AND (decided_at > clock_timestamp() - "
            "make_interval(secs => $2) OR (outcome IS NULL AND decided_at > clock_timestamp() - interval '1 day')) "
            "ORDER BY id DESC LIMIT 10000", self.lease, window, timeout=max(self._timeout, 2.0))
        rows = rows[::-1]  # oldest first
        return [UnfinishedDecision(int(r["id"]), r["node"], int(r["epoch"]),
                                   ConversationId(r["conversation_id"]), ParticipantId(r["participant_id"]),
                                   RuleName(r["rule"]), r["outcome"], float(r["age"]))
                for r in rows]

    async def close_decision(self, row_id: int, outcome: str) -> None:
        conn = await self._data_conn()
        await conn.execute("UPDATE confguard_decisions SET outcome = $2, closed_at = clock_timestamp() "
                           "WHERE id = $1 AND outcome IS NULL", row_id, outcome, timeout=self._timeout)


class HaGate:
    """The HA side of enforcement for one daemon: the send gate, the audit stamp, the
    decisions table hook and the role shown to the control API. Built on the `HaNode`
    before the enforcer (which asks it) and the `Takeover` (which opens it).

    - `may_send()` (the enforcer's send gate): the lease is valid on our clock AND the
      take-over of the current term is complete (`open(epoch)` by `Takeover`). Closed ->
      decisions are audited `standby`, nothing is sent. `close(why)` (the node lost the
      lease) shuts it at once.
    - `stamp()`: `node` and `epoch`, added to every audit record (`AuditLog(stamp=...)`).
    - The enforcer's typed decision hook (`daemon.service.enforcer.DecisionHook`):
      `decided(decision, mode)`, once the decision record is written: a disconnect decided
      in enforce mode while we may send gets a row in the decisions table;
      `ended(decision, outcome)`, once each outcome record is written: closes that row; a
      `standby` outcome is remembered (monotonic time) for the next take-over
      (`recent_standby`).
    """

    def __init__(self, node: HaNode, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.node = node
        self._clock = clock
        self._open_epoch: int | None = None
        self._intents: set[tuple[ConversationId, ParticipantId, RuleName]] = set()
        self._recent: dict[ConversationId, float] = {}  # conversation id -> monotonic time of a standby outcome

    def may_send(self) -> bool:
        return self._open_epoch is not None and self._open_epoch == self.node.epoch and self.node.may_send()

    def send_budget(self) -> float | None:
        """Seconds within which a PATCH must be fully written (pool wait, connect and
        write included) or be abandoned unsent: the lease's local validity (margin taken
        off) while the gate is open, else 0. The REST client checks it right before the
        body goes out and cuts a request still unwritten when it runs out."""
        if not self.may_send():
            return 0.0
        return self.node.send_budget()

    def open(self, epoch: int) -> None:
        """The take-over of term `epoch` is complete: removals may be sent."""
        self._open_epoch = epoch

    def close(self, why: str = "") -> None:
        """A new term began or the lease was lost: nothing is sent until `open`."""
        self._open_epoch = None

    def role_and_leader(self) -> tuple[str, str | None]:
        """(role, the leader's node when known) for the control API. `leader` only while
        the gate is open: during a take-over this node answers as standby."""
        role = self.node.role
        if role.value == "leader" and not self.may_send():
            return "standby", None
        return role.value, self.node.policy.holder

    def stamp(self) -> dict[str, Any]:
        return {"node": self.node.node, "epoch": self.node.epoch}

    def decided(self, d: Decision, mode: str) -> None:
        """The enforcer wrote `d`'s decision record (see the class docstring)."""
        if d.action != "disconnect" or mode != "enforce" or not self.may_send():
            return
        key = (d.conversation_id, d.participant_id, d.rule)
        self.node.record_intent(*key)
        self._intents.add(key)

    def ended(self, d: Decision, outcome: str) -> None:
        """The enforcer wrote an outcome record of `d` (see the class docstring)."""
        if d.action != "disconnect":
            return
        key = (d.conversation_id, d.participant_id, d.rule)
        if key in self._intents:
            self._intents.discard(key)
            self.node.record_outcome(*key, outcome)
        if outcome == "standby":
            now = self._clock()
            self._recent[key[0]] = now
            if len(self._recent) > 10_000:
                horizon = now - 2 * self.node.policy.takeover_after
                for cid in [c for c, t in self._recent.items() if t < horizon]:
                    del self._recent[cid]

    def recent_standby(self, horizon: float) -> set[ConversationId]:
        """Calls decided `standby` at or after `horizon` (monotonic s)."""
        return {cid for cid, t in self._recent.items() if t >= horizon}


class Takeover:
    """The take-over procedure of a new term (run by `HaNode` through `on_term`).

    Once the daemon is ready (`mark_ready`), re-read over REST, at ENFORCE priority, every
    call with a decision the old leader may have acted on in the last `2 * takeover_after`
    (its rows in the table, and the calls we ourselves decided `standby`), so the state in
    memory shows what the old leader removed; close the old leader's rows that have no
    outcome (`recovery.close_unfinished`); then open the gate and call
    `on_open("became_leader")`, which acts on every live party that still matches a
    disconnect rule. A party the old leader removed is final by then: nothing is sent for
    it. The whole take-over (rows and re-reads) is bounded by `takeover_after` seconds from
    the term's start; past that the gate opens anyway (a stuck API must not keep
    enforcement off).

    `read_call(cid)`: GET the call at ENFORCE priority and fold it into the state (None for
    404). `write(record)`: the audit sink. `on_open(reason)`: removals possible again.
    """

    def __init__(self, node: HaNode, gate: HaGate, *, read_call: Callable[[str], Any],
                 write: Callable[[dict[str, Any]], Any], on_open: Callable[[str], Any],
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.node = node
        self.gate = gate
        self._read_call = read_call
        self._write = write
        self._on_open = on_open
        self._clock = clock
        self._ready = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.last_takeover: dict[str, Any] | None = None

    def mark_ready(self) -> None:
        """The daemon can enforce (subscribed, the live calls listed; their reads may still
        be going on): a take-over may proceed. The daemon starts the lease loop only after
        this, so a node that cannot enforce yet never takes the lease."""
        self._ready.set()

    def on_term(self, epoch: int) -> None:
        """`HaNode`'s `on_term`: this node became leader for term `epoch`."""
        self.gate.close("new term")
        if self._task is not None and not self._task.done():
            self._task.cancel()
        self._task = asyncio.get_running_loop().create_task(self._takeover(epoch), name="ha-takeover")

    async def _takeover(self, epoch: int) -> None:
        started = self._clock()
        await self._ready.wait()  # set before the lease loop starts: no wait in practice
        window = 2 * self.node.policy.takeover_after
        # One bound for the whole take-over (rows and re-reads), counted from the term's start.
        deadline = started + self.node.policy.takeover_after

        def budget() -> float:
            return max(0.0, deadline - self._clock())

        rows: list[UnfinishedDecision] = []
        try:
            rows = await within(self.node.recent_decisions(window), budget())
        except DB_ERRORS as exc:
            log.error("ha_takeover_rows_unreadable", error_type=type(exc).__name__,
                      detail="re-reading only the calls this node decided as standby")
        horizon = self._clock() - window
        # Another node's rows only: this node's own decisions (an earlier term, or an earlier
        # run under the same node name) are finished by its own enforcer, or closed from its
        # own audit trail at start-up.
        mine = self.node.node
        rows = [r for r in rows if r.node != mine]
        calls = self.gate.recent_standby(horizon)
        calls |= {r.conversation_id for r in rows}
        unfinished = [Unfinished(r.rule, r.conversation_id, r.participant_id, node=r.node,
                                 epoch=r.epoch, row_id=r.id)
                      for r in rows if r.outcome is None]
        reread = 0
        closed = 0

        async def reread_all() -> None:
            nonlocal reread, closed
            for cid in sorted(calls):
                try:
                    await self._read_call(cid)
                except Exception as exc:  # noqa: BLE001 - one call must not stop the take-over
                    log.warning("ha_takeover_reread_failed", conversation_id=cid,
                                error=f"{type(exc).__name__}: {exc}")
                reread += 1
            closed = await close_unfinished(unfinished, read_call=self._read_call, write=self._write,
                                            closed_on="takeover", on_closed=self._close_row)

        try:
            await within(reread_all(), budget())
        except asyncio.TimeoutError:
            log.error("ha_takeover_reread_timeout", calls=len(calls), reread=reread,
                      timeout=self.node.policy.takeover_after,
                      detail="opening the send gate anyway")
        if self.node.epoch != epoch or not self.node.policy.is_leader:
            return  # lost again meanwhile
        self.gate.open(epoch)
        self.last_takeover = {"epoch": epoch, "calls": len(calls), "reread": reread,
                              "closed": closed, "seconds": round(self._clock() - started, 3)}
        log.warning("ha_takeover_done", **self.last_takeover)
        try:
            self._on_open("became_leader")
        except Exception:
            log.exception("ha_on_open_failed")

    async def _close_row(self, item: Unfinished, outcome: str) -> None:
        if item.row_id is not None:
            await self.node.close_decision(item.row_id, outcome)

    async def aclose(self) -> None:
        if self._task is not None and not self._task.done():
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)


async def within(aw: Any, seconds: float) -> Any:
    """`aw`'s result within `seconds`, else TimeoutError. Unlike `asyncio.wait_for`, it
    does not wait for the abandoned work to finish cancelling (a database driver stuck on a
    dead socket may take long to), so the caller's deadline holds."""
    task = asyncio.ensure_future(aw)
    try:
        done, _ = await asyncio.wait({task}, timeout=seconds)
    except asyncio.CancelledError:
        task.cancel()
        task.add_done_callback(_retrieve)
        raise
    if not done:
        task.cancel()
        task.add_done_callback(_retrieve)
        raise asyncio.TimeoutError(f"no answer within {seconds:g} s")
    return task.result()


def _retrieve(task: asyncio.Future[Any]) -> None:
    """Consume an abandoned task's result, so asyncio does not warn about it."""
    if not task.cancelled():
        task.exception()


async def _close(conn: Any) -> None:
    """Close gracefully for at most 1 s, else abort. Never waits on the driver beyond that
    (not even for its cancellation), never raises."""
    closing = asyncio.ensure_future(conn.close())
    done, _ = await asyncio.wait({closing}, timeout=1.0)
    if not done:
        closing.cancel()
        closing.add_done_callback(_retrieve)
        conn.terminate()
    elif not closing.cancelled() and closing.exception() is not None:
        conn.terminate()
