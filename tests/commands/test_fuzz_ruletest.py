"""Hostile rule-test files: `confguard test` either runs them or rejects them with a located
ConfigError (exit 2); it never crashes or hangs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from daemon.commands.ruletest import load_test_file, run_case
from daemon.config import load_config
from daemon.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]
CONFIG = load_config(ROOT / "config.yaml")

scalars = st.one_of(st.none(), st.booleans(), st.integers(-10**20, 10**20),
                    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=12),
                    st.sampled_from(["0s", "10s", "-1s", "1e400", "never", "999999999s", "5m",
                                     "connected", "external", "paused", "flagged-party"]))
values = st.recursive(scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=8), inner, max_size=3)),
    max_leaves=8)
party_keys = st.sampled_from(["purpose", "state", "address", "attributes", "connected_for",
                              "held", "user_id", "monitored_participant_id", "bogus"])
party = st.dictionaries(party_keys, values, max_size=4)
step = st.fixed_dictionaries({"at": values}, optional={
    "recording_state": values, "secure_pause": values,
    "parties": st.one_of(values, st.dictionaries(st.sampled_from(["p1", "p2"]), party, max_size=2))})
expect = st.fixed_dictionaries({}, optional={
    "rule": st.one_of(values, st.sampled_from([r.name for r in CONFIG.rules])),
    "party": st.one_of(values, st.sampled_from(["p1", "p2"])), "at": values,
    "call": values, "tolerance": values})
test = st.fixed_dictionaries({}, optional={
    "name": values, "until": values, "expect": st.one_of(values, st.lists(expect, max_size=3)),
    "calls": st.one_of(values, st.dictionaries(st.sampled_from(["c1", "c2"]), st.fixed_dictionaries(
        {}, optional={"timeline": st.one_of(values, st.lists(step, max_size=4)), "queue": values}),
        max_size=2))})
document = st.fixed_dictionaries({"config": st.just(str(ROOT / "config.yaml"))}, optional={
    "tolerance": values, "tests": st.one_of(values, st.lists(test, max_size=2))})


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(document)
def test_hostile_test_files_are_run_or_rejected(tmp_path_factory: Any, doc: dict[str, Any]) -> None:
    path = tmp_path_factory.mktemp("fuzz") / "t.test.yaml"
    path.write_text(yaml.safe_dump(doc, allow_unicode=True), encoding="utf-8")
    try:
        tf = load_test_file(path)
    except ConfigError as exc:
        assert exc.file == str(path) or "cannot read" in str(exc)
        return
    for case in tf.cases:
        run_case(CONFIG, case)
