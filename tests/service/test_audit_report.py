"""`confguard audit report`: the numbers equal what the trail holds, in JSON, CSV and HTML;
the HTML is self-contained and a headless Chromium renders it to a non-blank screenshot
holding the same numbers."""

from __future__ import annotations

import contextlib
import csv
import io
import os
import shutil
import struct
import subprocess
import tempfile
import zlib
from collections import Counter
from pathlib import Path
from typing import Any

import orjson
import pytest

from daemon.commands.audit import main as audit_main
from daemon.service.audit import AuditLog
from daemon.service.checkpoint import Checkpointer, generate_keypair, load_private_key

DAY1 = 1_796_083_200.0  # 2026-12-01T00:00:00Z
DAY2 = DAY1 + 86_400.0


def _cli(*args: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = audit_main(list(args))
    return code, out.getvalue(), err.getvalue()


class Clock:
    def __init__(self, t: float) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def _decision(rule: str, cid: str, pid: str, at: float, caller: str | None = None) -> dict[str, Any]:
    rec: dict[str, Any] = {"type": "decision", "rule": rule, "conversation_id": cid, "participant_id": pid,
                           "mode": "enforce", "action": "disconnect", "decided_at": at, "received_at": at}
    if caller:
        rec["origin"] = {"caller": caller, "reason": "by hand"}
    return rec


def _outcome(rule: str, cid: str, pid: str, outcome: str, error: str | None = None) -> dict[str, Any]:
    return {"type": "outcome", "rule": rule, "conversation_id": cid, "participant_id": pid,
            "action": "disconnect", "outcome": outcome, "http_status": 202, "attempts": 1,
            "event_to_request_ms": 1.0, "error": error}


def _trail(tmp: Path) -> tuple[Path, Path]:
    """A two-day trail with known numbers, checkpointed; (folder, public key)."""
    priv, pub = tmp / "k.pem", tmp / "k.pub"
    generate_keypair(priv, pub)
    clock = Clock(DAY1)
    cpr = Checkpointer(lambda hook: AuditLog(tmp / "audit" / "audit.jsonl", max_bytes=1 << 20, clock=clock, rotation=hook), load_private_key(priv), node="host-a", clock=clock)
    log = cpr.audit
    log.open()
    plan = [  # (day start, rule, cid, pid, outcome, seconds to the outcome, caller)
        (DAY1, "flagged", "c1", "p1", "disconnected", 0.4, None),
        (DAY1, "flagged", "c2", "p2", "disconnected", 1.5, None),
        (DAY1, "blocked", "c3", "p3", "suppressed", 0.0, None),
        (DAY1, "manual", "c4", "p4", "disconnected", 3.0, "ops-bot"),
        (DAY2, "flagged", "c5", "p5", "failed", 2.0, None),
        (DAY2, "blocked", "c6", "p6", "disconnected", 12.0, None),
        (DAY2, "flagged", "c7", "p7", "unknown", 0.0, None),
    ]
    for n, (day, rule, cid, pid, outcome, secs, caller) in enumerate(plan):
        at = day + 3600 + n * 60
        clock.t = at
        log.write(_decision(rule, cid, pid, at, caller))
        if rule == "blocked" and outcome == "disconnected":  # an unconfirmed try, then the retry
            clock.t = at + secs / 2
            log.write(_outcome(rule, cid, pid, "unconfirmed", "not seen gone; sending once more"))
        clock.t = at + secs
        log.write(_outcome(rule, cid, pid, outcome, None if outcome == "disconnected" else f"{outcome} because"))
        if n == 3:
            cpr.checkpoint_now()
    clock.t = DAY2 + 7200
    cpr.checkpoint_now()
    log.close()
    return tmp / "audit", pub


def _expected(folder: Path) -> dict[str, Any]:
    """The numbers, computed straight from the trail's records (independently of the report)."""
    recs = [orjson.loads(x) for x in (folder / "audit.jsonl").read_bytes().splitlines()]
    decisions = [r for r in recs if r["type"] == "decision"]
    final = {}
    for r in recs:
        if r["type"] == "outcome" and r["outcome"] != "unconfirmed":
            final[(r["rule"], r["conversation_id"])] = r
    removed = [d for d in decisions if final[(d["rule"], d["conversation_id"])]["outcome"] == "disconnected"]
    return {"decisions": len(decisions), "removals": len(removed),
            "per_rule": dict(Counter(d["rule"] for d in removed)),
            "not_removed": sorted(d["conversation_id"] for d in decisions if d not in removed)}


def test_json_numbers_equal_the_trail(tmp_path: Path) -> None:
    folder, pub = _trail(tmp_path)
    want = _expected(folder)
    out = tmp_path / "r.json"
    code, text, err = _cli("report", str(folder), "--format", "json", "--out", str(out),
                           "--public-key", str(pub))
    assert code == 0, err
    got = orjson.loads(out.read_bytes())
    assert got["decisions"] == want["decisions"] == 7
    assert got["removals"] == want["removals"] == 4
    assert got["removals_per_rule"] == want["per_rule"] == {"flagged": 2, "blocked": 1, "manual": 1}
    assert got["removals_per_day"] == {"2026-12-01": {"flagged": 2, "manual": 1}, "2026-12-02": {"blocked": 1}}
    assert sorted(r["conversation_id"] for r in got["not_removed"]) == want["not_removed"] == ["c3", "c5", "c7"]
    assert {r["outcome"] for r in got["not_removed"]} == {"suppressed", "failed", "unknown"}
    ttr = got["time_to_removal"]
    assert ttr["count"] == 4 and ttr["min"] == pytest.approx(0.4, abs=0.002)
    assert ttr["max"] == pytest.approx(12.0, abs=0.002) and ttr["p50"] == pytest.approx(1.5, abs=0.002)
    assert [b["count"] for b in got["histogram"]] == [1, 0, 1, 1, 0, 1, 0]
    assert {q["requested_by"]: q["removals"] for q in got["requesters"]} == {
        "control API: ops-bot": 1, "rule: blocked": 1, "rule: flagged": 2}
    v = got["verification"]
    assert v["chain"] == "intact" and v["problems"] == [] and v["end_covered"]
    assert "2 checkpoint(s) with a valid signature" in v["signatures"]


def test_since_until_select_one_day(tmp_path: Path) -> None:
    folder, _ = _trail(tmp_path)
    code, text, _ = _cli("report", str(folder), "--format", "json", "--since", "2026-12-02",
                         "--until", "2026-12-03")
    assert code == 0
    got = orjson.loads(text)
    assert got["decisions"] == 3 and got["removals"] == 1 and got["removals_per_rule"] == {"blocked": 1}
    assert got["verification"]["signatures"].startswith("not checked")
    code, _, err = _cli("report", str(folder), "--format", "json", "--since", "yesterday")
    assert code == 2 and "expected a date" in err


def test_csv_has_one_row_per_decision(tmp_path: Path) -> None:
    folder, _ = _trail(tmp_path)
    code, text, _ = _cli("report", str(folder), "--format", "csv")
    assert code == 0
    rows = list(csv.DictReader(io.StringIO(text)))
    want = _expected(folder)
    assert len(rows) == want["decisions"]
    assert Counter(r["rule"] for r in rows if r["outcome"] == "disconnected") == Counter(want["per_rule"])
    assert {r["requested_by"] for r in rows if r["rule"] == "manual"} == {"control API: ops-bot"}
    assert [r["seconds_to_removal"] for r in rows if r["conversation_id"] == "c6"] == ["12.0"]


def _chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None:
        if os.environ.get("CI"):
            pytest.fail("chromium is not installed (.ci/run installs the Debian package)")
        pytest.skip("chromium is not installed: apt-get install chromium (.ci/run does this)")
    return found


def _render(html: Path, tmp: Path) -> tuple[bytes, str]:
    """(PNG screenshot, the DOM as rendered) from headless Chromium, with a fresh profile."""
    exe = _chromium()
    shot = tmp / "shot.png"
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
             "--disable-component-update", "--disable-sync", "--no-first-run",
             "--window-size=1000,1400"]
    with tempfile.TemporaryDirectory(prefix="confguard-chromium-") as profile:
        subprocess.run([exe, *flags, f"--user-data-dir={profile}", f"--screenshot={shot}",
                        html.as_uri()], capture_output=True, timeout=90, check=True)
    with tempfile.TemporaryDirectory(prefix="confguard-chromium-") as profile:
        dom = subprocess.run([exe, *flags, f"--user-data-dir={profile}", "--dump-dom", html.as_uri()],
                             capture_output=True, timeout=90, check=True, text=True).stdout
    return shot.read_bytes(), dom


def _pixels(png: bytes) -> tuple[int, int, list[bytes]]:
    """(width, height, rows of RGB(A) bytes) of an 8-bit RGB or RGBA PNG (what Chromium
    writes), unfiltered."""
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    pos, idat = 8, b""
    width = height = bpp = 0
    while pos < len(png):
        (length,) = struct.unpack(">I", png[pos:pos + 4])
        kind, body = png[pos + 4:pos + 8], png[pos + 8:pos + 8 + length]
        pos += 12 + length
        if kind == b"IHDR":
            width, height, depth, color = struct.unpack(">IIBB", body[:10])
            assert depth == 8 and color in (2, 6), (depth, color)
            bpp = 3 if color == 2 else 4
        elif kind == b"IDAT":
            idat += body
    raw = zlib.decompress(idat)
    stride = width * bpp
    rows: list[bytes] = []
    prev = bytearray(stride)
    for y in range(height):
        f = raw[y * (stride + 1)]
        line = bytearray(raw[y * (stride + 1) + 1:(y + 1) * (stride + 1)])
        for i in range(stride):
            a = line[i - bpp] if i >= bpp else 0
            b = prev[i]
            c = prev[i - bpp] if i >= bpp else 0
            if f == 1:
                line[i] = (line[i] + a) & 255
            elif f == 2:
                line[i] = (line[i] + b) & 255
            elif f == 3:
                line[i] = (line[i] + (a + b) // 2) & 255
            elif f == 4:
                p = a + b - c
                pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                line[i] = (line[i] + (a if pa <= pb and pa <= pc else b if pb <= pc else c)) & 255
        rows.append(bytes(line))
        prev = line
    return width, height, rows


def test_html_is_self_contained_and_renders_in_chromium(tmp_path: Path) -> None:
    folder, pub = _trail(tmp_path)
    out = tmp_path / "report.html"
    code, _, err = _cli("report", str(folder), "--format", "html", "--out", str(out), "--public-key", str(pub))
    assert code == 0, err
    text = out.read_text()
    for banned in ("<script", "http://", "https://", "<link", "@import", "url("):
        assert banned not in text.replace('xmlns="http://www.w3.org/2000/svg"', ""), banned
    assert text.count("<svg") == 3
    want = _expected(folder)
    png, dom = _render(out, tmp_path)
    assert f'<td class="n" id="removals">{want["removals"]}</td>' in dom
    assert f'<td class="n" id="decisions">{want["decisions"]}</td>' in dom
    assert f'<td class="n" id="not-removed">{len(want["not_removed"])}</td>' in dom
    for rule, n in want["per_rule"].items():
        assert f'<tr><td>{rule}</td><td class="n">{n}</td></tr>' in dom
    assert "verified" in dom and "NOT verified" not in dom
    width, height, rows = _pixels(png)
    assert (width, height) == (1000, 1400)
    colours = Counter(px for row in rows[::7] for px in (row[i:i + 3] for i in range(0, len(row), 21)))
    background, share = colours.most_common(1)[0]
    total = sum(colours.values())
    assert background == b"\xff\xff\xff" and share < 0.97 * total, "the screenshot is blank"
    # The bar charts are drawn: their blue and green appear.
    assert colours[bytes.fromhex("1f5fa8")] > 0 and colours[bytes.fromhex("2e8b57")] > 0
