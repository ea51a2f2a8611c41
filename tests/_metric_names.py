"""Which metric names a PromQL expression uses, and which ones confguard exports.

`exported_metric_names()` is every sample name of `daemon.service.metrics.Metrics` (counters
with `_total`, histograms with `_bucket`/`_sum`/`_count`, info with `_info`...), plus the
names the team agreed for metrics still being added (AGREED), plus Prometheus' own `up`.
`missing_agreed()` lists the agreed names the Metrics class does not have yet.
"""

from __future__ import annotations

import re

from daemon.service.metrics import Metrics

# Agreed across the team (the names the alerts and the dashboard are written against),
# as exposed on /metrics.
AGREED: frozenset[str] = frozenset({
    "confguard_budget_allowed", "confguard_budget_used", "confguard_budget_remaining",
    "confguard_budget_reset_seconds", "confguard_rate_limited_total",
    "confguard_reconcile_budget_share", "confguard_resync_errors_total",
    "confguard_ha_role", "confguard_ha_epoch", "confguard_ha_lease_age_seconds",
    "confguard_ha_renewals_total", "confguard_control_requests_total",
    "confguard_control_auth_failures_total", "confguard_control_rate_limited_total",
    "confguard_audit_unsynced_seconds",
})
PROMETHEUS_OWN: frozenset[str] = frozenset({"up"})

_SUFFIXES = {
    "counter": ("_total", "_created"),
    "histogram": ("_bucket", "_sum", "_count", "_created"),
    "summary": ("", "_sum", "_count", "_created"),
    "info": ("_info",),
    "gauge": ("",),
    "stateset": ("",),
    "unknown": ("",),
    "gaugehistogram": ("_bucket", "_gsum", "_gcount"),
}


def registry_metric_names() -> frozenset[str]:
    """Every sample name the Metrics class can expose."""
    out: set[str] = set()
    for family in Metrics().registry.collect():
        for suffix in _SUFFIXES.get(family.type, ("",)):
            out.add(family.name + suffix)
    return frozenset(out)


# Labels Prometheus adds (target labels) or the exposition adds (histogram buckets).
_EXTRA_LABELS = frozenset({"instance", "job", "le", "quantile"})


def metric_labels() -> dict[str, frozenset[str]]:
    """Sample name -> the label names it carries (its own, plus instance/job/le)."""
    out: dict[str, frozenset[str]] = {"up": _EXTRA_LABELS}
    m = Metrics()
    for value in vars(m).values():
        name = getattr(value, "_name", None)
        labels = getattr(value, "_labelnames", None)
        kind = getattr(value, "_type", None)
        if not isinstance(name, str) or labels is None:
            continue
        own = frozenset(labels) | _EXTRA_LABELS
        if kind == "stateset":  # Enum: the state is a label named like the metric
            own |= {name}
        for suffix in _SUFFIXES.get(str(kind), ("",)):
            out[name + suffix] = own
    return out


_SELECTOR = re.compile(r"(?<![\w:])([a-zA-Z_:][\w:]*)\s*\{([^{}]*)\}")
_MATCHER = re.compile(r"([a-zA-Z_]\w*)\s*(?:=~|!~|!=|=)")


def selectors_in(expr: str) -> list[tuple[str, set[str]]]:
    """(metric name, label names matched) for each `name{...}` selector in `expr`."""
    text = _STRING.sub('""', expr)
    return [(m.group(1), set(_MATCHER.findall(m.group(2)))) for m in _SELECTOR.finditer(text)]


def exported_metric_names() -> frozenset[str]:
    return registry_metric_names() | AGREED | PROMETHEUS_OWN


def missing_agreed() -> frozenset[str]:
    return AGREED - registry_metric_names()


_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_MATCHERS = re.compile(r"\{[^{}]*\}")
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^()]*\)")
_IDENT = re.compile(r"(?<![\w:.$])([a-zA-Z_:][\w:]*)(?![\w:]|\s*\()")
_KEYWORDS = frozenset({"and", "or", "unless", "by", "without", "on", "ignoring", "group_left",
                       "group_right", "bool", "offset", "inf", "nan", "Inf", "NaN"})


def metric_names_in(expr: str) -> set[str]:
    """Metric names in a PromQL expression (function names, label names, keywords and
    durations excluded)."""
    text = _STRING.sub('""', expr)
    text = _MATCHERS.sub("{}", text)
    text = _GROUPING.sub(" ", text)
    text = re.sub(r"\[[^\]]*\]", "[]", text)  # range selectors: [5m], [5m:1m]
    names = set()
    for m in _IDENT.finditer(text):
        word = m.group(1)
        if word in _KEYWORDS or re.fullmatch(r"\d+\w*", word):
            continue
        names.add(word)
    return names
