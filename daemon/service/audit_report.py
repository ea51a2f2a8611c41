"""`confguard audit report`: what the audit trail says about a period, for compliance officers.

`build_report(paths, since=, until=)` reads the trail (files or folders, as `verify`) and
returns plain data (`Report`): removals per rule and per day, the time from decision to
confirmed removal (its distribution), every suppressed / failed / unknown (and other
non-removal) outcome of an enforced decision, who asked (the rule, or the control-API
caller), and the verification status of the period (the chain, and which checkpoints
cover it). Renderers: `to_json`, `to_csv` (one row per decision), `to_html` (one
self-contained file: inline CSS and SVG charts, no script, no network, printable).

Definitions (seconds and UTC throughout):

- a record is in the period when its `time` is in [since, until);
- a decision is matched with the first later `outcome` record of the same rule, call and
  party; an `unconfirmed` outcome followed by another outcome (the retry) is superseded
  by it; a decision with no outcome in the files is `pending`;
- a removal is a decision whose outcome is `disconnected`; its time to removal is the
  outcome record's `time` minus the decision's `decided_at`;
- a removal counts for the day (UTC) of its decision.
"""

from __future__ import annotations

import csv
import html
import io
import math
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson

from daemon.core.timefmt import format_time, parse_time
from daemon.errors import AuditError
from daemon.service.audit import audit_files, verify

__all__ = ["Report", "build_report", "to_csv", "to_html", "to_json", "HISTOGRAM_EDGES"]

#: Upper bounds (seconds) of the time-to-removal histogram's buckets; the last is open.
HISTOGRAM_EDGES = (0.5, 1.0, 2.0, 5.0, 10.0, 30.0)
LISTED_OUTCOMES_MAX = 5000


@dataclass(slots=True)
class Row:
    """One decision and what became of it (a CSV row)."""

    decided_at: str
    rule: str
    requested_by: str
    conversation_id: str
    participant_id: str
    mode: str
    action: str
    outcome: str
    outcome_time: str | None
    seconds_to_removal: float | None
    http_status: int | None
    error: str | None
    seq: int


@dataclass(slots=True)
class Report:
    """Plain data; see the module docstring for the definitions."""

    since: str | None
    until: str | None
    files: list[str]
    records: int
    decisions: int
    removals: int
    removals_per_rule: dict[str, int]
    removals_per_day: dict[str, dict[str, int]]
    time_to_removal: dict[str, float | int | None]
    histogram: list[dict[str, Any]]
    outcomes: dict[str, int]
    not_removed: list[dict[str, Any]]
    requesters: list[dict[str, Any]]
    verification: dict[str, Any]
    rows: list[Row] = field(default_factory=list)


def _epoch(s: object) -> float | None:
    if isinstance(s, (int, float)) and not isinstance(s, bool):
        return float(s)
    return parse_time(s)


def _requester(rec: dict[str, Any]) -> str:
    origin = rec.get("origin")
    if isinstance(origin, dict) and origin.get("caller"):
        return f"control API: {origin['caller']}"
    return f"rule: {rec.get('rule')}"


def _percentile(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile (q in [0, 100]); None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    k = max(1, math.ceil(q / 100.0 * len(ordered)))
    return ordered[k - 1]


def _read(paths: Sequence[Path]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for path in audit_files(paths):
        try:
            with open(path, "rb") as f:
                for raw in f:
                    try:
                        rec = orjson.loads(raw)
                    except orjson.JSONDecodeError:
                        continue  # verify reports it; the report covers what can be read
                    if isinstance(rec, dict):
                        out.append(rec)
        except OSError as exc:
            raise AuditError(f"cannot read {path}: {exc.strerror or exc}") from None
    return out


def build_report(paths: Sequence[Path], *, since: float | None = None, until: float | None = None,
                 verification: dict[str, Any] | None = None) -> Report:
    """The report over the trail at `paths` for [since, until) (epoch seconds; None: open).
    `verification`: what `audit verify` found (default: the chain alone, and the trail's own
    checkpoint records, their signatures unchecked). Raises AuditError when unreadable."""
    records = _read(paths)
    in_period = [r for r in records if _in(r, since, until)]
    rows = _rows(records, since, until)
    removed = [r for r in rows if r.outcome == "disconnected"]
    per_rule = Counter(r.rule for r in removed)
    per_day: dict[str, Counter[str]] = defaultdict(Counter)
    for r in removed:
        per_day[r.decided_at[:10]][r.rule] += 1
    durations = [r.seconds_to_removal for r in removed if r.seconds_to_removal is not None]
    requesters: dict[str, Counter[str]] = defaultdict(Counter)
    for r in rows:
        requesters[r.requested_by]["decisions"] += 1
        if r.outcome == "disconnected":
            requesters[r.requested_by]["removals"] += 1
    not_removed = [asdict(r) for r in rows
                   if r.mode == "enforce" and r.action == "disconnect"
                   and r.outcome not in ("disconnected",)][:LISTED_OUTCOMES_MAX]
    return Report(
        since=format_time(since) if since is not None else None,
        until=format_time(until) if until is not None else None,
        files=[str(p) for p in audit_files(paths)],
        records=len(in_period),
        decisions=len(rows),
        removals=len(removed),
        removals_per_rule=dict(sorted(per_rule.items())),
        removals_per_day={day: dict(sorted(c.items())) for day, c in sorted(per_day.items())},
        time_to_removal={
            "count": len(durations),
            "min": min(durations) if durations else None,
            "p50": _percentile(durations, 50), "p90": _percentile(durations, 90),
            "p99": _percentile(durations, 99),
            "max": max(durations) if durations else None,
        },
        histogram=_histogram(durations),
        outcomes=dict(sorted(Counter(r.outcome for r in rows).items())),
        not_removed=not_removed,
        requesters=[{"requested_by": k, "decisions": v["decisions"], "removals": v["removals"]}
                    for k, v in sorted(requesters.items())],
        verification=verification if verification is not None else _chain_status(paths, records, since, until),
        rows=rows,
    )


def _in(rec: dict[str, Any], since: float | None, until: float | None) -> bool:
    t = _epoch(rec.get("time"))
    if t is None:
        return False
    return (since is None or t >= since) and (until is None or t < until)


def _rows(records: list[dict[str, Any]], since: float | None, until: float | None) -> list[Row]:
    """Every decision in the period, matched with its outcome (module docstring)."""
    open_: dict[tuple[str, str, str], list[Row]] = defaultdict(list)
    rows: list[Row] = []
    decided: dict[int, float] = {}
    for rec in records:
        kind = rec.get("type")
        key = (str(rec.get("rule")), str(rec.get("conversation_id")), str(rec.get("participant_id")))
        if kind == "decision":
            if not _in(rec, since, until):
                continue
            at = _epoch(rec.get("decided_at")) or _epoch(rec.get("time")) or 0.0
            row = Row(format_time(at), key[0], _requester(rec), key[1], key[2], str(rec.get("mode")),
                      str(rec.get("action")), "pending", None, None, None, None, int(rec.get("seq", 0)))
            decided[id(row)] = at
            rows.append(row)
            open_[key].append(row)
        elif kind == "outcome" and open_.get(key):
            row = open_[key][0]
            outcome = str(rec.get("outcome"))
            row.outcome, row.outcome_time = outcome, rec.get("time")
            row.http_status, row.error = rec.get("http_status"), rec.get("error")
            if outcome == "disconnected":
                t = _epoch(rec.get("time"))
                if t is not None:
                    row.seconds_to_removal = round(max(0.0, t - decided[id(row)]), 3)
            if outcome != "unconfirmed":  # an unconfirmed PATCH is retried: the next one decides
                open_[key].pop(0)
    return rows


def _histogram(durations: list[float]) -> list[dict[str, Any]]:
    counts = [0] * (len(HISTOGRAM_EDGES) + 1)
    for d in durations:
        i = next((n for n, edge in enumerate(HISTOGRAM_EDGES) if d < edge), len(HISTOGRAM_EDGES))
        counts[i] += 1
    labels = [f"< {HISTOGRAM_EDGES[0]:g} s"]
    labels += [f"{a:g}–{b:g} s" for a, b in zip(HISTOGRAM_EDGES, HISTOGRAM_EDGES[1:])]
    labels.append(f"≥ {HISTOGRAM_EDGES[-1]:g} s")
    return [{"bucket": label, "count": c} for label, c in zip(labels, counts)]


def _chain_status(paths: Sequence[Path], records: list[dict[str, Any]], since: float | None,
                  until: float | None) -> dict[str, Any]:
    report = verify(paths)
    cps = [r["checkpoint"] for r in records
           if r.get("type") == "checkpoint" and isinstance(r.get("checkpoint"), dict)]
    return _coverage(cps, report.ok, report.problem, report.last_seq, list(report.gaps), since, until,
                     signatures="not checked (give --public-key)")


def _coverage(cps: list[dict[str, Any]], ok: bool, problem: str | None, last_seq: int,
              gaps: list[str], since: float | None, until: float | None, *, signatures: str,
              problems: Sequence[str] = ()) -> dict[str, Any]:
    """Which checkpoints cover the period: those signed in it, and the first one after it
    (which covers its end)."""
    def t(cp: dict[str, Any]) -> float:
        return _epoch(cp.get("time")) or 0.0
    cps = sorted(cps, key=lambda c: (int(c.get("seq", 0)), t(c)))
    inside = [c for c in cps if (since is None or t(c) >= since) and (until is None or t(c) < until)]
    after = [c for c in cps if until is not None and t(c) >= until][:1]
    covering = inside + after
    last = cps[-1] if cps else None
    end_covered = bool(after) or (until is None and last is not None and int(last["seq"]) >= last_seq)
    return {
        "chain": "intact" if ok else f"broken: {problem}",
        "gaps": gaps,
        "signatures": signatures,
        "problems": list(problems),
        "checkpoints": [{"seq": c.get("seq"), "time": c.get("time"), "node": c.get("node")}
                        for c in covering],
        "last_checkpoint": {"seq": last.get("seq"), "time": last.get("time")} if last else None,
        "last_seq": last_seq,
        "end_covered": end_covered,
        "uncovered_records": 0 if last is None and last_seq == 0 else
        max(0, last_seq - (int(last["seq"]) if last else 0)),
    }


def coverage_from_check(result: Any, since: float | None, until: float | None) -> dict[str, Any]:
    """The verification block from an `audit_check.CheckResult` (signatures checked)."""
    report = result.report
    cps = [c.checkpoint for c in result.good]
    return _coverage(cps, report.ok, report.problem, report.last_seq, list(report.gaps), since, until,
                     signatures=f"{result.checkpoints} checkpoint(s) with a valid signature",
                     problems=result.problems)


# ---------------------------------------------------------------- renderers


def to_json(report: Report) -> bytes:
    return orjson.dumps(asdict(report), option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS) + b"\n"


CSV_COLUMNS = ("decided_at", "rule", "requested_by", "conversation_id", "participant_id", "mode",
               "action", "outcome", "outcome_time", "seconds_to_removal", "http_status", "error", "seq")


def to_csv(report: Report) -> bytes:
    """One row per decision in the period (columns CSV_COLUMNS)."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(CSV_COLUMNS)
    for r in report.rows:
        d = asdict(r)
        w.writerow(["" if d[c] is None else d[c] for c in CSV_COLUMNS])
    return buf.getvalue().encode()


def _e(v: object) -> str:
    return html.escape("" if v is None else str(v))


def _bars(items: list[tuple[str, int]], *, title: str, width: int = 640, bar: int = 22) -> str:
    """A horizontal bar chart as inline SVG (labels left, counts right)."""
    if not items:
        return f'<p class="empty">{_e(title)}: nothing in this period.</p>'
    top = max(c for _, c in items) or 1
    label_w, count_w = 220, 60
    span = width - label_w - count_w
    h = bar * len(items) + 8
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{h}" role="img" '
             f'aria-label="{_e(title)}" viewBox="0 0 {width} {h}">']
    for n, (label, count) in enumerate(items):
        y = 4 + n * bar
        w = max(1.0, span * count / top) if count else 0.0
        parts.append(f'<text x="{label_w - 6}" y="{y + bar * 0.68:.1f}" text-anchor="end" '
                     f'font-size="12">{_e(label[:34])}</text>')
        parts.append(f'<rect x="{label_w}" y="{y + 3}" width="{w:.1f}" height="{bar - 6}" fill="#1f5fa8"/>')
        parts.append(f'<text x="{label_w + w + 6:.1f}" y="{y + bar * 0.68:.1f}" font-size="12">{count}</text>')
    parts.append("</svg>")
    return "".join(parts)


def _columns(items: list[tuple[str, int]], *, title: str, width: int = 640, height: int = 200) -> str:
    """A vertical bar chart as inline SVG (one column per item)."""
    if not items:
        return f'<p class="empty">{_e(title)}: nothing in this period.</p>'
    top = max(c for _, c in items) or 1
    base = height - 28  # the x axis; labels below it, counts above each column
    plot_h = base - 18
    col = (width - 20) / len(items)
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" role="img" '
             f'aria-label="{_e(title)}" viewBox="0 0 {width} {height}">',
             f'<line x1="10" y1="{base}" x2="{width - 10}" y2="{base}" stroke="#555"/>']
    for n, (label, count) in enumerate(items):
        x = 10 + n * col
        h = plot_h * count / top
        parts.append(f'<rect x="{x + col * 0.15:.1f}" y="{base - h:.1f}" width="{col * 0.7:.1f}" '
                     f'height="{h:.1f}" fill="#2e8b57"/>')
        parts.append(f'<text x="{x + col / 2:.1f}" y="{base - h - 4:.1f}" text-anchor="middle" '
                     f'font-size="11">{count}</text>')
        parts.append(f'<text x="{x + col / 2:.1f}" y="{height - 10}" text-anchor="middle" '
                     f'font-size="10">{_e(label)}</text>')
    parts.append("</svg>")
    return "".join(parts)


_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,Helvetica,Arial,sans-serif;margin:2em;color:#111;background:#fff}
h1{font-size:1.5em;margin-bottom:.2em}h2{font-size:1.15em;margin-top:1.6em;border-bottom:1px solid #ccc}
table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #bbb;padding:.25em .6em;text-align:left;font-size:.9em}
th{background:#eef}td.n{text-align:right;font-variant-numeric:tabular-nums}
.ok{color:#1a7f37;font-weight:bold}.bad{color:#b00020;font-weight:bold}.empty{color:#666}
.summary td:first-child{font-weight:bold}
@media print{body{margin:0}h2{break-after:avoid}table,svg{break-inside:avoid}}
"""


def to_html(report: Report) -> bytes:
    """One self-contained HTML file: inline CSS and SVG, no script, no external resource."""
    v = report.verification
    good = v["chain"] == "intact" and not v.get("problems") and not any("missing" in g for g in v["gaps"])
    status = ('<span class="ok">verified</span>' if good else '<span class="bad">NOT verified</span>')
    period = f"{report.since or 'the first record'} to {report.until or 'the last record'}"
    ttr = report.time_to_removal
    out = [
        "<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
        "<title>confguard audit report</title>", f"<style>{_CSS}</style></head><body>",
        "<h1>confguard audit report</h1>",
        f"<p>Period: {_e(period)} (UTC). Trail: {_e(', '.join(report.files))}.</p>",
        '<table class="summary">',
        f'<tr><td>Decisions</td><td class="n" id="decisions">{report.decisions}</td></tr>',
        f'<tr><td>Removals (confirmed)</td><td class="n" id="removals">{report.removals}</td></tr>',
        f'<tr><td>Not removed (enforced decisions)</td><td class="n" id="not-removed">{len(report.not_removed)}</td></tr>',
        f'<tr><td>Audit records in the period</td><td class="n">{report.records}</td></tr>',
        f"<tr><td>Verification</td><td>{status}</td></tr>",
        "</table>",
        "<h2>Removals per rule</h2>",
        _bars(sorted(report.removals_per_rule.items(), key=lambda kv: (-kv[1], kv[0])), title="Removals per rule"),
        _table(["Rule", "Removals"], [[k, n] for k, n in report.removals_per_rule.items()], "per-rule"),
        "<h2>Removals per day</h2>",
        _columns([(d[5:], sum(c.values())) for d, c in report.removals_per_day.items()], title="Removals per day"),
        _table(["Day", "Rule", "Removals"], [[d, r, n] for d, c in report.removals_per_day.items()
                                            for r, n in c.items()], "per-day"),
        "<h2>Time from decision to confirmed removal</h2>",
        _columns([(b["bucket"], b["count"]) for b in report.histogram], title="Time to removal"),
        _table(["Removals", "Min", "Median", "p90", "p99", "Max"],
               [[ttr["count"], *[_secs(ttr[k]) for k in ("min", "p50", "p90", "p99", "max")]]], "ttr"),
        "<h2>Outcomes</h2>",
        _table(["Outcome", "Decisions"], [[k, n] for k, n in report.outcomes.items()], "outcomes"),
        "<h2>Not removed: suppressed, failed, unknown and other outcomes</h2>",
        _table(["Decided", "Rule", "Requested by", "Conversation", "Participant", "Outcome", "Error"],
               [[r["decided_at"], r["rule"], r["requested_by"], r["conversation_id"], r["participant_id"],
                 r["outcome"], r["error"]] for r in report.not_removed], "not-removed-list"),
        "<h2>Who asked</h2>",
        _table(["Requested by", "Decisions", "Removals"],
               [[q["requested_by"], q["decisions"], q["removals"]] for q in report.requesters], "requesters"),
        "<h2>Verification of the period</h2>",
        _verification(v),
        "</body></html>",
    ]
    return "\n".join(out).encode()


def _secs(v: object) -> str:
    return "" if v is None else f"{float(v):.3f} s"  # type: ignore[arg-type]


def _table(head: list[str], rows: list[list[Any]], ident: str) -> str:
    if not rows:
        return '<p class="empty">None.</p>'
    out = [f'<table id="{ident}"><tr>' + "".join(f"<th>{_e(h)}</th>" for h in head) + "</tr>"]
    for row in rows:
        cells = "".join(f'<td class="n">{_e(c)}</td>' if isinstance(c, (int, float)) and not isinstance(c, bool)
                        else f"<td>{_e(c)}</td>" for c in row)
        out.append(f"<tr>{cells}</tr>")
    out.append("</table>")
    return "".join(out)


def _verification(v: dict[str, Any]) -> str:
    items = [f"<li>Hash chain: {_e(v['chain'])}</li>",
             f"<li>Checkpoint signatures: {_e(v['signatures'])}</li>"]
    for g in v["gaps"]:
        items.append(f'<li class="bad">Gap: {_e(g)}</li>')
    for p in v.get("problems", []):
        items.append(f'<li class="bad">Contradicted: {_e(p)}</li>')
    cps = v["checkpoints"]
    if cps:
        items.append("<li>Checkpoints covering the period: " + ", ".join(
            f"seq {_e(c['seq'])} at {_e(c['time'])}" for c in cps) + "</li>")
    else:
        items.append('<li class="bad">No checkpoint covers this period.</li>')
    if not v["end_covered"]:
        items.append(f"<li>Not covered: {_e(v['uncovered_records'])} record(s) after the last "
                     f"checkpoint; they cannot be proven complete.</li>")
    return "<ul>" + "".join(items) + "</ul>"


def parse_when(text: str) -> float:
    """`2026-12-01` (midnight UTC) or an ISO-8601 time (naive: UTC) -> epoch seconds.
    ValueError with the accepted forms otherwise."""
    t = parse_time(text)
    if t is None:
        try:
            t = datetime.fromisoformat(text).replace(tzinfo=UTC).timestamp() if "T" not in text else None
        except ValueError:
            t = None
    if t is None:
        raise ValueError(f"expected a date (2026-12-01) or an ISO-8601 time (2026-12-01T09:00:00Z), got {text!r}")
    return t
