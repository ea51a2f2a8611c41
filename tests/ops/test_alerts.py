"""The shipped alert rules (ops/prometheus/confguard-alerts.yml): valid, complete, unit-tested
with `promtool test rules`, and written against metrics confguard exports."""

from __future__ import annotations

import subprocess
from pathlib import Path

import yaml

from _metric_names import exported_metric_names, metric_labels, metric_names_in, selectors_in
from _promtool import promtool

OPS = Path(__file__).resolve().parents[2] / "ops" / "prometheus"
ALERTS = OPS / "confguard-alerts.yml"
TESTS = OPS / "confguard-alerts.test.yml"
REQUIRED_SEVERITIES = {"info", "warning", "critical"}


def _rules() -> list[dict[str, object]]:
    doc = yaml.safe_load(ALERTS.read_text(encoding="utf-8"))
    return [r for g in doc["groups"] for r in g["rules"]]


def test_promtool_check_rules() -> None:
    res = subprocess.run([promtool(), "check", "rules", str(ALERTS)], capture_output=True,
                         text=True, timeout=60)
    assert res.returncode == 0, res.stdout + res.stderr


def test_promtool_unit_tests_pass() -> None:
    # promtool resolves rule_files relative to the test file's folder.
    res = subprocess.run([promtool(), "test", "rules", TESTS.name], cwd=OPS,
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "SUCCESS" in res.stdout


def test_every_alert_has_summary_description_severity() -> None:
    for rule in _rules():
        name = rule["alert"]
        labels = rule.get("labels") or {}
        ann = rule.get("annotations") or {}
        assert isinstance(labels, dict) and labels.get("severity") in REQUIRED_SEVERITIES, name
        assert isinstance(ann, dict) and ann.get("summary"), name
        assert isinstance(ann, dict) and len(str(ann.get("description", ""))) > 60, name


def test_every_alert_is_unit_tested_firing_and_silent() -> None:
    doc = yaml.safe_load(TESTS.read_text(encoding="utf-8"))
    firing: set[str] = set()
    silent: set[str] = set()
    for case in doc["tests"]:
        for t in case.get("alert_rule_test", []):
            (firing if t.get("exp_alerts") else silent).add(t["alertname"])
    names = {str(r["alert"]) for r in _rules()}
    assert names - firing == set(), "alerts never tested firing"
    assert names - silent == set(), "alerts never tested not firing"


def test_alerts_cover_the_issue() -> None:
    names = {str(r["alert"]) for r in _rules()}
    assert {"ConfguardDown", "ConfguardNotReady", "ConfguardSafetyValveTripped",
            "ConfguardRemovalForbidden", "ConfguardRemovalsUnconfirmed", "ConfguardStreamGap",
            "ConfguardResyncFailing", "ConfguardRequestBudgetLow", "ConfguardRemovalRateLimited",
            "ConfguardAuditFsyncLagging", "ConfguardNoLeader", "ConfguardTwoLeaders",
            "ConfguardRemovalFailed"} <= names


def test_alerts_name_only_exported_metrics() -> None:
    known = exported_metric_names()
    for rule in _rules():
        unknown = metric_names_in(str(rule["expr"])) - known
        assert not unknown, f"{rule['alert']}: not exported by confguard: {sorted(unknown)}"


def test_alerts_match_only_labels_the_metric_has() -> None:
    labels = metric_labels()
    for rule in _rules():
        for name, used in selectors_in(str(rule["expr"])):
            assert name in labels, f"{rule['alert']}: {name} not in the Metrics registry"
            assert used <= labels[name], f"{rule['alert']}: {name} has no label {sorted(used - labels[name])}"
