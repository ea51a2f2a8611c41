"""The HA lease policy, sans I/O: who may send removals, and when to talk to the database.

Two confguard hosts contend for one lease (a database row: name, holder node, epoch, expiry
by the database's clock). This module decides, from the results the I/O layer reports and
a monotonic `now` (seconds, `time.monotonic()`), three things:

- `may_send(now)`: True only while this node is leader AND its lease, as last renewed, is
  still valid on its OWN monotonic clock minus `safety_margin`. The validity is counted
  from the moment the successful renewal was *sent* (`sent_at`), not answered: the
  database set `expires_at = db_now + takeover_after` at some instant after `sent_at`, so
  `sent_at + takeover_after` is never later than the database's view. The margin covers
  clock-rate drift between the hosts and a PATCH that is already on the wire when the
  lease runs out. A frozen process (SIGSTOP, host stall) that wakes up finds its monotonic
  clock moved on (CLOCK_MONOTONIC keeps counting while a process is stopped), so it sends
  nothing before it has renewed again.
- `role(now)`: `leader` (holding a valid lease), `standby` (the database answered and
  someone else holds the lease) or `no-lease` (we cannot tell: the database is not
  reachable, or our own lease ran out locally before a renewal answered).
- `next_attempt(now)`: when the I/O layer should next renew (leader: every
  `takeover_after / 3`) or try to take the lease (standby/no-lease: every `poll_interval`).

Fail closed: a failed renewal, a lost lease (the row's epoch or holder moved) or a lease
that ran out locally closes `may_send` at once; the node keeps deciding as standby.

The epoch is the fencing token: it goes up by one every time the lease changes hands, so
an audit record's `epoch` names exactly one leader term.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass

__all__ = ["Role", "LeasePolicy", "LeaseView", "ROLES"]


class Role(enum.Enum):
    """The node's role; values are the `/healthz` `role` and the metric's `role` label."""

    LEADER = "leader"
    STANDBY = "standby"
    NO_LEASE = "no-lease"


ROLES: tuple[str, ...] = tuple(r.value for r in Role)


@dataclass(frozen=True, slots=True)
class LeaseView:
    """What the database said about the lease row after an attempt: who holds it, its
    epoch, whether that holder is us, and (when known) how many seconds ago, by the
    database's clock, the holder last renewed it."""

    holder: str | None
    epoch: int
    ours: bool
    age: float | None = None


class LeasePolicy:
    """The lease state machine for one node. All times are monotonic seconds.

    `takeover_after`: the lease's lifetime in the database (seconds); a leader silent that
    long loses it. `safety_margin`: seconds before the local expiry at which sending stops
    (default: a fifth of `takeover_after`, at least 0.2 s, at most 2 s). `poll_interval`:
    seconds between take-over attempts while not leader (default `takeover_after / 4`,
    at most 1 s, so a standby takes an expired lease within about a second of its expiry).
    """

    def __init__(self, takeover_after: float, *, safety_margin: float | None = None,
                 poll_interval: float | None = None) -> None:
        if not math.isfinite(takeover_after) or takeover_after <= 0:
            raise ValueError("takeover_after must be a positive number of seconds")
        margin = (min(2.0, max(0.2, takeover_after / 5)) if safety_margin is None
                  else safety_margin)
        if not 0 <= margin < takeover_after * 2 / 3:
            raise ValueError("safety_margin must be >= 0 and leave room for renewals "
                             "(< 2/3 of takeover_after)")
        self.takeover_after = float(takeover_after)
        self.safety_margin = float(margin)
        self.renew_interval = self.takeover_after / 3
        self.poll_interval = (min(1.0, self.takeover_after / 4) if poll_interval is None
                              else float(poll_interval))
        if self.poll_interval <= 0:
            raise ValueError("poll_interval must be positive")
        self._leader = False
        self._valid_until: float | None = None  # monotonic; meaningful while _leader
        self._renewed_at: float | None = None  # sent_at of the last successful renewal
        self._reachable = False  # the last attempt got an answer from the database
        self._last_attempt: float | None = None
        self._seen: tuple[float, float] | None = None  # (holder's renewal age, at) as a standby
        self.epoch = 0  # our epoch while leader; else the last epoch the database showed
        self.holder: str | None = None

    # ------------------------------------------------------------------ queries

    def may_send(self, now: float) -> bool:
        """Whether a removal may be sent now (see the module docstring)."""
        return self._leader and self._valid_until is not None and now < self._valid_until

    def send_budget(self, now: float) -> float:
        """Seconds from `now` until sending must stop (the local validity, margin already
        taken off); 0 when it may not send now. A PATCH must be fully written within it."""
        if not self.may_send(now):
            return 0.0
        assert self._valid_until is not None
        return self._valid_until - now

    def role(self, now: float) -> Role:
        if self.may_send(now):
            return Role.LEADER
        if self._leader or not self._reachable:
            return Role.NO_LEASE  # our lease ran out locally, or the database is silent
        return Role.STANDBY

    def lease_age(self, now: float) -> float | None:
        """Seconds since the lease was last renewed: by us (from when the renewal was sent)
        while leader; else by its holder, as the database last showed it (aged on our
        clock since). None when neither is known (never reached the database)."""
        if self._leader and self._renewed_at is not None:
            return max(0.0, now - self._renewed_at)
        if self._seen is not None:
            age, at = self._seen
            return max(0.0, age + now - at)
        return None

    @property
    def is_leader(self) -> bool:
        """True from a successful acquisition until the lease is lost, released or a
        renewal fails (even if it has run out locally: `may_send` says whether to send)."""
        return self._leader

    def next_attempt(self, now: float) -> float:
        """The monotonic time of the next renewal (leader) or take-over attempt."""
        if self._last_attempt is None:
            return now
        step = self.renew_interval if self._leader else self.poll_interval
        due = self._last_attempt + step
        if self._leader and self._valid_until is not None:
            # Never let the lease run out locally for want of trying.
            due = min(due, self._valid_until - self.safety_margin)
        return due

    # ------------------------------------------------------------------ results

    def attempt_started(self, sent_at: float) -> None:
        """The I/O layer sent a renewal or take-over attempt at `sent_at`."""
        self._last_attempt = sent_at

    def succeeded(self, sent_at: float, view: LeaseView) -> bool:
        """The attempt sent at `sent_at` got an answer. `view.ours`: we hold the lease with
        `view.epoch`. Returns True when this made us leader (a new term began)."""
        self._reachable = True
        self.holder = view.holder
        if not view.ours:
            self._leader = False
            self._valid_until = None
            self.epoch = view.epoch
            self._seen = (view.age, sent_at) if view.age is not None and view.holder else None
            return False
        became = not self._leader or view.epoch != self.epoch
        self._leader = True
        self.epoch = view.epoch
        self._renewed_at = sent_at
        self._valid_until = sent_at + self.takeover_after - self.safety_margin
        return became

    def failed(self) -> None:
        """The attempt got no answer (connection lost, timeout, database error): stop
        sending at once."""
        self._reachable = False
        self._seen = None
        self._leader = False
        self._valid_until = None

    def released(self) -> None:
        """We handed the lease back (shutdown): stop sending."""
        self._leader = False
        self._valid_until = None
        self.holder = None
