"""The shipped Grafana dashboard (ops/grafana/confguard.json): every query parses as PromQL
(promtool checks a rule file generated from them) and names only metrics confguard exports."""

from __future__ import annotations

import json
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

from _metric_names import (exported_metric_names, metric_labels, metric_names_in, missing_agreed,
                           selectors_in)
from _promtool import promtool

DASHBOARD = Path(__file__).resolve().parents[2] / "ops" / "grafana" / "confguard.json"

# Grafana's template variables, replaced by concrete values so promtool can parse the query.
GRAFANA_VARS = {"$__rate_interval": "5m", "$__interval": "1m", "$__range": "1h",
                "$instance": ".*", "${instance}": ".*", "$job": "confguard", "${job}": "confguard"}
REQUIRED_TOPICS = ("decisions", "removal", "time to removal", "stream", "gap", "budget",
                   "resync", "audit")


def _panels(node: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for p in node.get("panels", []):
        yield p
        yield from _panels(p)


def _queries() -> list[tuple[str, str]]:
    dash = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    out = [(p.get("title", "?"), t["expr"]) for p in _panels(dash) for t in p.get("targets", [])
           if t.get("expr")]
    return out


def _concrete(expr: str) -> str:
    for var, value in GRAFANA_VARS.items():
        expr = expr.replace(var, value)
    assert "$" not in expr, f"unknown Grafana variable in {expr!r}"
    return expr


def test_dashboard_has_queries_for_every_topic() -> None:
    dash = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    titles = " | ".join(p.get("title", "").lower() for p in _panels(dash))
    for topic in REQUIRED_TOPICS:
        assert topic in titles, topic
    assert len(_queries()) >= 20


def test_every_query_parses_with_promtool(tmp_path: Path) -> None:
    rules = [{"record": f"confguard_dashboard:query_{i}", "expr": _concrete(expr)}
             for i, (_, expr) in enumerate(_queries())]
    path = tmp_path / "dashboard-queries.rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}),
                    encoding="utf-8")
    res = subprocess.run([promtool(), "check", "rules", str(path)], capture_output=True,
                         text=True, timeout=60)
    assert res.returncode == 0, res.stdout + res.stderr
    assert f"{len(rules)} rules found" in res.stdout


def test_every_query_names_only_exported_metrics() -> None:
    known = exported_metric_names()
    for title, expr in _queries():
        unknown = metric_names_in(expr) - known
        assert not unknown, f"panel {title!r}: not exported by confguard: {sorted(unknown)}"


def test_template_variables_name_exported_metrics() -> None:
    dash = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    known = exported_metric_names()
    for var in dash["templating"]["list"]:
        q = var.get("query")
        text = q.get("query", "") if isinstance(q, dict) else str(q or "")
        m = re.fullmatch(r"label_values\((\w+)(?:\{[^}]*\})?,\s*\w+\)", text)
        if var.get("type") == "query":
            assert m is not None, text
            assert m.group(1) in known


def test_every_query_matches_only_labels_the_metric_has() -> None:
    labels = metric_labels()
    for title, expr in _queries():
        for name, used in selectors_in(expr):
            assert name in labels, f"panel {title!r}: {name} not in the Metrics registry"
            assert used <= labels[name], f"panel {title!r}: {name} has no label {sorted(used - labels[name])}"


def test_agreed_metrics_are_in_the_registry() -> None:
    """The alerts and the dashboard use metrics the team agreed on; all must be exported."""
    assert missing_agreed() == frozenset(), "agreed metrics missing from daemon/service/metrics.py"


def _datasource_refs(node: object) -> list[object]:
    """Every `datasource` value anywhere in the dashboard (panels, targets, variables)."""
    out: list[object] = []
    if isinstance(node, dict):
        for k, v in node.items():
            if k == "datasource":
                out.append(v)
            out += _datasource_refs(v)
    elif isinstance(node, list):
        for v in node:
            out += _datasource_refs(v)
    return out


def test_import_asks_one_datasource_question_and_uses_the_answer() -> None:
    """Grafana's import asks one question per `__inputs` entry: one, for the Prometheus data
    source, and its answer is used (the `datasource` variable defaults to it; every panel
    and variable queries through that variable)."""
    dash = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    inputs = dash["__inputs"]
    assert [(i["name"], i["type"], i["pluginId"]) for i in inputs] == [("DS_PROMETHEUS", "datasource", "prometheus")]
    body = {k: v for k, v in dash.items() if k != "__inputs"}
    assert "${DS_PROMETHEUS}" in json.dumps(body), "the import's datasource answer is never used"
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["current"]["value"] == "${DS_PROMETHEUS}"
    refs = _datasource_refs(body["panels"]) + _datasource_refs(body["templating"])
    assert refs and all(r == {"type": "prometheus", "uid": "${datasource}"} for r in refs if r is not None), refs
    assert {"type": "datasource", "id": "prometheus"}.items() <= next(
        r for r in dash["__requires"] if r["type"] == "datasource").items()


def test_job_is_a_variable_not_hard_coded() -> None:
    dash = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    assert variables["job"]["type"] == "query" and variables["job"]["current"]["value"] == "confguard"
    exprs = [e for _, e in _queries()]
    assert not [e for e in exprs if re.search(r'job\s*=~?\s*"(?!\$job)', e)], "a query hard-codes a job"
    assert any(re.search(r'\bup\{[^}]*job=~"\$job"', e) for e in exprs)
    assert "$job" in json.dumps(variables["instance"]["query"])
