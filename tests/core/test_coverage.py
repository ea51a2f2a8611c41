"""core/coverage: the reading order (classes with ageing) and the coverage books."""

from __future__ import annotations

import pytest

from daemon.core.coverage import Candidate, CallClass, Coverage, read_order
from daemon.core.ids import ConversationId as C

CONF, OUT, OTHER = CallClass.CONFERENCE, CallClass.OUTSIDE, CallClass.OTHER


def test_stale_together_is_strict_class_order_more_parties_first_then_listed_order() -> None:
    cands = [Candidate(C("r1"), OTHER, 100.0, 2), Candidate(C("o1"), OUT, 100.0, 2),
             Candidate(C("c3"), CONF, 100.0, 3), Candidate(C("o2"), OUT, 100.0, 2),
             Candidate(C("c4"), CONF, 100.0, 4), Candidate(C("r2"), OTHER, 100.0, 1)]
    assert read_order(cands, age_step=60) == ["c4", "c3", "o1", "o2", "r1", "r2"]


def test_ageing_a_call_that_waited_a_class_longer_goes_first() -> None:
    # A routed call last current 701 s ago against conferences current 100 s ago: with a
    # 300 s step its key (-701 + 600) is below theirs (-100): it is not starved.
    now = 10_000.0
    cands = [Candidate(C("conf"), CONF, now - 100), Candidate(C("old_other"), OTHER, now - 701),
             Candidate(C("out"), OUT, now - 100), Candidate(C("new_other"), OTHER, now - 100)]
    assert read_order(cands, age_step=300) == ["old_other", "conf", "out", "new_other"]
    # One second less waiting and it is behind the conference, still before the outside call.
    cands[1] = Candidate(C("old_other"), OTHER, now - 499)
    assert read_order(cands, age_step=300) == ["conf", "old_other", "out", "new_other"]


def test_never_read_goes_first_duplicates_once_and_age_step_checked() -> None:
    cands = [Candidate(C("known"), CONF, 5.0), Candidate(C("new"), OUT, 0.0),
             Candidate(C("known"), OTHER, 0.0)]
    assert read_order(cands, age_step=1.0) == ["new", "known"]
    with pytest.raises(ValueError):
        read_order(cands, age_step=0)


def test_coverage_moves_with_reads_events_and_ends() -> None:
    cov = Coverage()
    assert cov.snapshot(0.0).as_dict() == {"calls_known": 0, "calls_read": 0,
                                           "conferences_unread": 0, "oldest_unread_seconds": 0.0}
    cov.stale([(C("a"), True), (C("b"), False), (C("c"), False)], since=100.0)
    snap = cov.snapshot(130.0)
    assert (snap.calls_known, snap.calls_read, snap.conferences_unread) == (3, 0, 1)
    assert snap.oldest_unread_seconds == 30.0 and snap.calls_unread == 3
    assert snap.oldest_conference_unread_seconds == 30.0
    assert snap.status_line() == "resync 0/3 calls read, 0/1 conferences"
    cov.seen(C("a"), 131.0)  # a read (or an event)
    cov.seen(C("b"), 99.0)  # older than what made it stale: still unread
    snap = cov.snapshot(140.0)
    assert (snap.calls_read, snap.conferences_unread) == (1, 0)
    assert snap.oldest_conference_unread_seconds == 0.0
    assert snap.status_line() == "resync 1/3 calls read, 1/1 conferences"
    # An event for a call nobody listed: known and read at once; becoming a conference.
    cov.seen(C("d"), 141.0, conference=True)
    assert cov.snapshot(141.0).calls_known == 4 and cov.snapshot(141.0).conferences_known == 2
    # A call seen after a resync began stays read when that resync lists it later.
    cov.stale([(C("d"), True)], since=140.5)
    assert not cov.is_unread(C("d"))
    # A second stale listing keeps the earlier time of what is still unread.
    cov.stale([(C("b"), False), (C("a"), True)], since=150.0)
    assert cov.snapshot(160.0).oldest_unread_seconds == 60.0 and cov.is_unread(C("a"))
    cov.seen(C("b"), 161.0, ended=True)
    cov.gone(C("c"))
    cov.seen(C("a"), 162.0)
    snap = cov.snapshot(170.0)
    assert snap.as_dict() == {"calls_known": 2, "calls_read": 2, "conferences_unread": 0,
                              "oldest_unread_seconds": 0.0}
