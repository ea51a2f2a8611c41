"""The sans-I/O lease policy (daemon.core.lease): who may send, and when to renew."""

from __future__ import annotations

import pytest

from daemon.core.lease import LeasePolicy, LeaseView, Role

ME = LeaseView(holder="a", epoch=3, ours=True)
OTHER = LeaseView(holder="b", epoch=4, ours=False)


def test_a_fresh_policy_has_no_lease_and_tries_at_once() -> None:
    p = LeasePolicy(6.0)
    assert p.role(0.0) is Role.NO_LEASE and not p.may_send(0.0)
    assert p.next_attempt(10.0) == 10.0
    assert p.lease_age(10.0) is None


def test_leader_may_send_until_the_renewal_time_plus_lease_minus_margin() -> None:
    p = LeasePolicy(6.0, safety_margin=1.0)
    p.attempt_started(100.0)
    assert p.succeeded(100.0, ME) is True  # a new term
    assert p.role(100.5) is Role.LEADER and p.epoch == 3
    assert p.may_send(104.99)
    assert not p.may_send(105.0)  # 100 + 6 - 1: counted from when the renewal was SENT
    assert p.role(105.0) is Role.NO_LEASE  # ran out locally: fail closed
    assert p.lease_age(101.5) == pytest.approx(1.5)


def test_renewals_are_due_every_third_of_takeover_after() -> None:
    p = LeasePolicy(6.0, safety_margin=1.0)
    p.attempt_started(0.0)
    p.succeeded(0.0, ME)
    assert p.next_attempt(0.1) == pytest.approx(2.0)
    p.attempt_started(2.0)
    assert p.succeeded(2.0, ME) is False  # same term renewed
    assert p.may_send(6.9) and not p.may_send(7.0)


def test_a_failed_renewal_closes_the_gate_at_once() -> None:
    p = LeasePolicy(6.0)
    p.attempt_started(0.0)
    p.succeeded(0.0, ME)
    assert p.may_send(0.5)
    p.failed()
    assert not p.may_send(0.5) and p.role(0.5) is Role.NO_LEASE and not p.is_leader
    # Standby/no-lease polls more often than a leader renews.
    p.attempt_started(1.0)
    assert p.next_attempt(1.0) == pytest.approx(1.0 + p.poll_interval)


def test_epoch_moved_means_standby() -> None:
    p = LeasePolicy(6.0)
    p.attempt_started(0.0)
    p.succeeded(0.0, ME)
    p.attempt_started(2.0)
    assert p.succeeded(2.0, OTHER) is False
    assert p.role(2.1) is Role.STANDBY and not p.may_send(2.1)
    assert p.epoch == 4 and p.holder == "b"


def test_a_takeover_with_a_new_epoch_is_a_new_term() -> None:
    p = LeasePolicy(6.0)
    p.attempt_started(0.0)
    assert p.succeeded(0.0, OTHER) is False
    p.attempt_started(1.0)
    assert p.succeeded(1.0, LeaseView("a", 5, True)) is True
    assert p.epoch == 5 and p.role(1.0) is Role.LEADER


def test_a_frozen_leader_that_wakes_sends_nothing() -> None:
    """SIGSTOP for longer than the lease: the monotonic clock moved on while stopped."""
    p = LeasePolicy(2.0)
    p.attempt_started(0.0)
    p.succeeded(0.0, ME)
    assert p.may_send(0.1)
    assert not p.may_send(30.0)  # woke 30 s later, before any renewal answered
    assert p.next_attempt(30.0) <= 30.0  # and a renewal is overdue


def test_released_stops_sending() -> None:
    p = LeasePolicy(6.0)
    p.attempt_started(0.0)
    p.succeeded(0.0, ME)
    p.released()
    assert not p.may_send(0.1) and not p.is_leader


@pytest.mark.parametrize("bad", [0.0, -1.0, float("nan"), float("inf")])
def test_bad_takeover_after_is_refused(bad: float) -> None:
    with pytest.raises(ValueError):
        LeasePolicy(bad)


def test_margin_must_leave_room_for_renewals() -> None:
    with pytest.raises(ValueError):
        LeasePolicy(3.0, safety_margin=2.5)
    assert LeasePolicy(2.0).safety_margin == pytest.approx(0.4)
    assert LeasePolicy(60.0).safety_margin == 2.0


def test_a_standby_reports_the_holders_lease_age() -> None:
    p = LeasePolicy(6.0)
    p.attempt_started(10.0)
    p.succeeded(10.0, LeaseView("b", 4, False, age=0.5))
    assert p.lease_age(11.0) == pytest.approx(1.5)  # aged on our clock since the answer
    p.failed()
    assert p.lease_age(11.0) is None  # the database is silent: unknown
