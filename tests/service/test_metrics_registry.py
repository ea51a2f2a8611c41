"""Every metric the code touches exists on `Metrics`, is registered on its registry and is
exported by `/metrics` (over a real socket on 127.0.0.1).

The code calls metrics as typed attributes (`self._metrics.reconnects.labels(...)`), so mypy
already rejects a misspelt one; this test also catches a metric that is defined but not
registered, or registered but never exported, and any return of lookups by string.
"""

from __future__ import annotations

import ast
from pathlib import Path

import httpx
from prometheus_client.metrics import MetricWrapperBase
from prometheus_client.parser import text_string_to_metric_families

from daemon.service.metrics import Metrics
from daemon.service.ops import HealthStatus, OpsServer

DAEMON = Path(__file__).resolve().parents[2] / "daemon"
#: Names that hold the one Metrics object in daemon/ (`metrics`, `self.metrics`, `self._metrics`).
HOLDERS = {"metrics", "_metrics"}
#: Attributes of Metrics that are not metrics: the registry and the methods/properties.
NOT_METRICS = {"registry"} | {n for n in dir(Metrics) if not n.startswith("__")}


def _touched() -> dict[str, list[str]]:
    """Metric attribute -> places (`file:line`) in daemon/ that use it."""
    found: dict[str, list[str]] = {}
    for path in sorted(DAEMON.rglob("*.py")):
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            if not isinstance(node, ast.Attribute):
                continue
            holder = node.value
            name = (holder.id if isinstance(holder, ast.Name)
                    else holder.attr if isinstance(holder, ast.Attribute) else None)
            if name in HOLDERS and node.attr not in NOT_METRICS:
                found.setdefault(node.attr, []).append(f"{path.relative_to(DAEMON)}:{node.lineno}")
    return found


def _collectors(m: Metrics) -> dict[str, MetricWrapperBase]:
    return {k: v for k, v in vars(m).items() if isinstance(v, MetricWrapperBase)}


def test_code_touches_metrics_at_all() -> None:
    """The scan sees the call sites (guards against the scan itself going blind)."""
    touched = _touched()
    for attr in ("reconnects", "stream_connections", "resync_errors", "outcomes", "audit_records"):
        assert attr in touched, attr


def test_metrics_parameters_are_typed() -> None:
    """Every `metrics` parameter or attribute in daemon/ is annotated `Metrics` (or
    `Metrics | None`), never `Any`: a misspelt metric is then a mypy error."""
    untyped = []
    for path in sorted(DAEMON.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            args: list[ast.arg] = []
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                args = [*node.args.posonlyargs, *node.args.args, *node.args.kwonlyargs]
            for a in args:
                if a.arg in HOLDERS and (a.annotation is None or "Metrics" not in ast.unparse(a.annotation)):
                    untyped.append(f"{path.relative_to(DAEMON)}:{a.lineno} {a.arg}")
    assert untyped == []


def test_no_lookup_by_string() -> None:
    """No `getattr(metrics, "name")` and no reading of prometheus_client's private label names."""
    for path in sorted(DAEMON.rglob("*.py")):
        text = path.read_text()
        assert "_labelnames" not in text, path
        tree = ast.parse(text)
        for node in ast.walk(tree):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
                    and node.func.id == "getattr" and node.args):
                target = node.args[0]
                name = (target.id if isinstance(target, ast.Name)
                        else target.attr if isinstance(target, ast.Attribute) else None)
                assert name not in HOLDERS, f"{path}:{node.lineno}: getattr on metrics"


async def test_every_touched_metric_is_registered_and_exported() -> None:
    m = Metrics()
    collectors = _collectors(m)
    touched = _touched()
    unknown = {a: where for a, where in touched.items() if a not in collectors}
    assert not unknown, f"metrics used in daemon/ but not defined on Metrics: {unknown}"

    registered = {fam.name for fam in m.registry.collect()}
    server = OpsServer(m, lambda: HealthStatus(state="running", ready=True))
    port = await server.start("127.0.0.1", 0)
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=10) as client:
            r = await client.get("/metrics")
    finally:
        await server.stop()
    assert r.status_code == 200
    # Family names as exported; prometheus_client suffixes counters `_total`, infos `_info`.
    helped = {line.split()[2] for line in r.text.splitlines() if line.startswith("# HELP ")}
    exported = {n.removesuffix("_total").removesuffix("_info") for n in helped}
    exported |= {fam.name for fam in text_string_to_metric_families(r.text)}
    for attr, metric in collectors.items():
        # The family name, without the `_total` prometheus_client adds to counters.
        for name in (fam.name for fam in metric.collect()):
            assert name.startswith("confguard_"), attr
            assert name in registered, f"{attr} ({name}) is not on the Metrics registry"
            assert name in exported, f"{attr} ({name}) is missing from /metrics"


def test_agreed_names() -> None:
    """The names other components and the alerting rules are written against."""
    names = {a: c.collect()[0].name for a, c in _collectors(Metrics()).items()}
    assert names["resync_errors"] == "confguard_resync_errors"
    assert names["stream_connections"] == "confguard_stream_connections"
    assert names["audit_unsynced_seconds"] == "confguard_audit_unsynced_seconds"
    assert Metrics().resync_errors.labels(kind="reconcile") is not None


def test_audit_unsynced_seconds_follows_the_writer(tmp_path: Path) -> None:
    from daemon.service.audit import AuditLog

    now = [1000.0]
    m = Metrics()
    audit = AuditLog(tmp_path / "audit.jsonl", max_bytes=1 << 20, clock=lambda: now[0])
    m.audit_unsynced_seconds.set_function(audit.unsynced_seconds)

    def value() -> float | None:
        return m.registry.get_sample_value("confguard_audit_unsynced_seconds")

    audit.open()
    try:
        assert value() == 0.0
        audit.write({"type": "decision"})
        now[0] += 2.5
        audit.write({"type": "outcome"})  # the oldest unsynced record sets the age
        now[0] += 0.5
        assert value() == 3.0
        audit.sync()
        assert value() == 0.0
    finally:
        audit.close()
    assert value() == 0.0


def test_child_is_the_labelled_child_kept_once_per_label_values() -> None:
    """`Metrics.child(metric, *values)` is `metric.labels(*values)`, looked up once per
    metric and label values; its counts are the metric's own in the exposition."""
    m = Metrics()
    a = m.child(m.audit_records, "decision")
    assert a is m.child(m.audit_records, "decision") is m.audit_records.labels("decision")
    assert m.child(m.audit_records, "outcome") is not a
    assert m.child(m.events_received, "decision") is not a  # per metric, not per values only
    a.inc()
    m.child(m.audit_records, "decision").inc()
    samples = {(s.name, s.labels.get("type")): s.value
               for f in text_string_to_metric_families(m.render().decode())
               for s in f.samples}
    assert samples[("confguard_audit_records_total", "decision")] == 2.0
