"""`confguard demo` (what `make demo` runs) as a child process: it must finish within a
minute, exit 0, and print the summary table with every scripted expectation met."""

from __future__ import annotations

import re
import time
from pathlib import Path

from _daemon_harness import REPO, run_cli
from daemon.service.audit import verify


async def test_demo_runs_to_a_clean_summary(tmp_path: Path) -> None:
    out_dir = tmp_path / "demo-output"
    started = time.monotonic()
    code, out, err = await run_cli("demo", "--config", str(REPO / "config.yaml"), "--out", str(out_dir),
                                   timeout=60.0)
    took = time.monotonic() - started
    assert code == 0, out + err
    assert took < 60.0
    assert "Traceback" not in out + err
    lines = out.splitlines()
    assert lines[0] == f"daemon log: {out_dir / 'daemon.log'}"
    assert re.match(r"sandbox: Genesys Cloud stand-in at http://127\.0\.0\.1:\d+$", lines[1])
    summary = next(i for i, ln in enumerate(lines) if ln.startswith("SUMMARY"))
    assert re.fullmatch(r"SUMMARY  calls 10   parties \d+   removed 5/5   near-miss parties untouched "
                        r"(\d+)/\1", lines[summary]), lines[summary]
    table = lines[summary + 2: lines.index("-" * 78, summary + 2)]
    assert table[0].split() == ["rule", "disconnected", "observed", "suppressed", "other"]
    rows = {r.split()[0]: [int(x) for x in r.split()[1:]] for r in table[1:]}
    assert rows == {
        "blocked-number-in-conference": [1, 0, 0, 0],
        "flagged-interaction": [0, 1, 0, 0],
        "flagged-party": [1, 0, 0, 0],
        "no-outside-party-on-payments": [1, 0, 0, 0],
        "supervisor-monitor-time-limit": [1, 0, 0, 0],
        "third-party-needs-recording": [1, 0, 0, 0],
    }
    assert any(ln.startswith("event-to-removal (sandbox publish -> PATCH received, 3 event-triggered removals)")
               for ln in lines)
    audit_line = next(ln for ln in lines if ln.startswith("audit: "))
    assert "chain intact, 12 records" in audit_line
    assert not [ln for ln in lines if ln.startswith("PROBLEM")]
    # the audit file it names verifies independently, and the daemon's log went to the file
    report = verify([out_dir / "audit.jsonl"])
    assert report.ok and report.records == 12
    assert (out_dir / "daemon.log").stat().st_size > 0
    # make demo's summary is also kept in demo-output/summary.txt, as printed
    saved = (out_dir / "summary.txt").read_text(encoding="utf-8")
    printed = "\n".join(lines[summary - 1: lines.index(f"summary also in {out_dir / 'summary.txt'}")]) + "\n"
    assert saved == printed and saved.startswith("=" * 78 + "\nSUMMARY  calls 10")


async def test_demo_with_an_unusable_out_folder_exits_2(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    for out in (blocker, blocker / "below"):
        code, stdout, err = await run_cli("demo", "--config", str(REPO / "config.yaml"), "--out", str(out))
        assert code == 2 and stdout == ""
        assert err.startswith(f"confguard: cannot use --out {out}: ") and err.count("\n") == 1, err


async def test_demo_with_a_missing_config_exits_2(tmp_path: Path) -> None:
    code, _, err = await run_cli("demo", "--config", str(tmp_path / "none.yaml"), "--out", str(tmp_path / "o"))
    assert code == 2 and err == f"confguard: config file not found: {tmp_path / 'none.yaml'}\n"
