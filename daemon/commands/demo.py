"""`confguard demo`: the whole thing working, on this machine, in under a minute.

Starts the sandbox (a local fake Genesys Cloud on 127.0.0.1) and the real daemon with the
shipped `config.yaml` rules (only the Genesys origins, the audit path and the ops port are
pointed at the demo), plays a scripted set of conference calls, some breaking a rule and
some almost breaking one, prints each decision and outcome as the audit trail records it,
and ends with a summary (also written to OUT/summary.txt): calls, parties, removals per rule, event-to-removal latency
p50/p99 (sandbox publish -> PATCH received, both on the sandbox's clock), whether every
near-miss party is still connected, and where the audit file is (verified).

Exit code 0 when every scripted expectation held, 1 otherwise.
"""

from __future__ import annotations

import asyncio
import io
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import orjson

from daemon.service.audit import verify
from daemon.config import Config, load_config
from daemon.sandbox.server import Sandbox
from daemon.sandbox.world import Party, World
from daemon.service.lifecycle import Daemon
from daemon.core.timefmt import parse_time

PAYMENTS_QUEUE = "0d5c7a44-3f2e-4b1a-8c9d-6e7f8a9b0c1d"
TRUSTED_SUPERVISOR = "6f1c2a9e-0b3d-4c8e-9a57-2d1e4b7c8f01"
BLOCKED = "tel:+442079460999"  # listed in blocked-numbers.txt as "+44 20 7946 0999"
TIMER_RULES = frozenset({"third-party-needs-recording", "supervisor-monitor-time-limit"})


@dataclass(slots=True)
class Scripted:
    """One scripted call: what it shows, who must be removed (by which rule), who must stay."""

    label: str
    conversation_id: str
    remove: dict[str, str] = field(default_factory=dict)  # participant id -> rule
    keep: list[str] = field(default_factory=list)  # participant ids that must stay connected
    observe: dict[str, str] = field(default_factory=dict)  # participant id -> observe-only rule


def _demo_config(shipped: Config, sandbox: Sandbox, out_dir: Path) -> Config:
    g = shipped.genesys.model_copy(update={"api_base_url": sandbox.base_url, "login_base_url": sandbox.base_url})
    audit = shipped.audit.model_copy(update={"path": str(out_dir / "audit.jsonl")})
    ops = shipped.ops.model_copy(update={"listen": "127.0.0.1:0"})
    return shipped.model_copy(update={"genesys": g, "audit": audit, "ops": ops})


class Script:
    """Drives the sandbox world. Every call gets a connected agent; `recorded` sets the
    conversation's recordingState to active so the hold_for rule stays out of the way."""

    def __init__(self, world: World, cs_queue: str) -> None:
        self.world = world
        self.cs = cs_queue
        self.agents = [world.create_user(f"Agent {n}").id for n in ("Ada", "Ben", "Cy", "Di", "Ed",
                                                                    "Flo", "Gus", "Hal", "Ivy", "Jo")]
        self.supervisor = world.create_user("Sam Supervisor").id
        self.trusted = world.create_user("Tess Trusted", TRUSTED_SUPERVISOR).id
        self.calls: list[Scripted] = []
        self._n = 0

    def _call(self, label: str, *, queue: str | None = None, ani: str = "tel:+14155550100",
              recorded: bool = True) -> tuple[Scripted, Party, Party]:
        conv = self.world.start_call(queue or self.cs, ani=ani, customer_name=f"Customer {self._n + 1}")
        agent = self.world.connect_agent(conv.id, self.agents[self._n % len(self.agents)])
        self._n += 1
        if recorded:
            self.world.set_recording(conv.id, "active")
        customer = next(p for p in conv.participants if p.purpose == "customer")
        s = Scripted(label, conv.id, keep=[customer.id, agent.id])
        self.calls.append(s)
        return s, customer, agent

    async def play_immediate(self, pause: float) -> None:
        """Calls whose rule fires on an event; a short pause between calls, as on a real
        platform, so the figures measure the daemon rather than a burst queued behind it."""
        w = self.world
        s, _, _ = self._call("flagged external party")
        ext = w.add_external(s.conversation_id, "tel:+14155550123", name="Partner Bank")
        w.set_attributes(s.conversation_id, ext.id, {"complianceFlag": "true"})
        s.remove[ext.id] = "flagged-party"
        await asyncio.sleep(pause)

        s, _, _ = self._call("flag says false (near miss)")
        ext = w.add_external(s.conversation_id, "tel:+14155550124", name="Partner Bank")
        w.set_attributes(s.conversation_id, ext.id, {"complianceFlag": "false"})
        s.keep.append(ext.id)
        await asyncio.sleep(pause)

        s, _, _ = self._call("blocked number conferenced in")
        ext = w.add_external(s.conversation_id, BLOCKED, name="Unknown")
        s.remove[ext.id] = "blocked-number-in-conference"
        await asyncio.sleep(pause)

        self._call("customer calling from a blocked number (near miss: customer, not external)", ani=BLOCKED)

        s, _, _ = self._call("outside party on a payments call", queue=PAYMENTS_QUEUE)
        ext = w.add_external(s.conversation_id, "tel:+14155550125", name="Card Helpdesk")
        s.remove[ext.id] = "no-outside-party-on-payments"
        await asyncio.sleep(pause)

        s, _, _ = self._call("recorded call with an outside party (near miss)")
        ext = w.add_external(s.conversation_id, "tel:+14155550126", name="Interpreter")
        s.keep.append(ext.id)
        await asyncio.sleep(pause)

        s, customer, _ = self._call("risk score 85 (observe-only rule)")
        w.set_attributes(s.conversation_id, customer.id, {"riskScore": "85"})
        s.observe[customer.id] = "flagged-interaction"

    def play_timed(self) -> None:
        """Rules that fire on time alone: hold_for 10 s, and a supervisor at 600 s."""
        w = self.world
        s, _, _ = self._call("unrecorded call with an outside party (hold_for 10s)", recorded=False)
        ext = w.add_external(s.conversation_id, "tel:+14155550127", name="Consultant")
        s.remove[ext.id] = "third-party-needs-recording"

        for label, user, rule in (("supervisor monitoring for 10 minutes", self.supervisor, True),
                                  ("trusted supervisor monitoring for 10 minutes (near miss)", self.trusted, False)):
            s, _, agent = self._call(label)
            sup = w.add_supervisor(s.conversation_id, user, agent.id, "monitor")
            sup.connected_time = time.time() - 595.0  # joined 9 m 55 s ago: the limit is 600 s
            w.touch(s.conversation_id)
            if rule:
                s.remove[sup.id] = "supervisor-monitor-time-limit"
            else:
                s.keep.append(sup.id)


def _tail(path: Path, offset: int) -> tuple[list[dict[str, Any]], int]:
    try:
        with path.open("rb") as fh:
            fh.seek(offset)
            data = fh.read()
    except FileNotFoundError:
        return [], offset
    end = data.rfind(b"\n") + 1
    return [orjson.loads(line) for line in data[:end].splitlines() if line.strip()], offset + end


def _pct(values: list[float], q: float) -> float:
    xs = sorted(values)
    return xs[min(len(xs) - 1, max(0, round(q * (len(xs) - 1))))]


async def run_demo(config_path: Path, out: TextIO, *, out_dir: Path, timeout: float = 45.0) -> int:
    shipped = load_config(config_path)
    out_dir.mkdir(parents=True, exist_ok=True)
    audit_path = out_dir / "audit.jsonl"
    for old in out_dir.glob("audit*.jsonl"):
        old.unlink()
    sandbox = Sandbox(heartbeat_interval=5.0)
    await sandbox.start()
    daemon: Daemon | None = None
    try:
        world = sandbox.world
        world.create_queue("Customer Service")
        world.create_queue("Payments", PAYMENTS_QUEUE)
        cs = world.find_queues("Customer Service")[0].id
        os.environ["GENESYSCLOUD_OAUTHCLIENT_ID"] = sandbox.client_id
        os.environ["GENESYSCLOUD_OAUTHCLIENT_SECRET"] = sandbox.client_secret
        config = _demo_config(shipped, sandbox, out_dir)
        print(f"sandbox: Genesys Cloud stand-in at {sandbox.base_url}", file=out)
        daemon = Daemon(config, config_path=config_path)
        await daemon.start()
        print(f"daemon:  {daemon.state.value}, mode {daemon.mode}, {len(config.rules)} rules from {config_path}, "
              f"metrics at http://127.0.0.1:{daemon.ops_port}/metrics\n", file=out)

        script = Script(world, cs)
        started = time.time()
        script.play_timed()  # timers first: they run while the other calls play
        await script.play_immediate(pause=0.3)
        labels = {c.conversation_id: c.label for c in script.calls}
        expected = sum(len(c.remove) + len(c.observe) for c in script.calls)
        outcomes: list[dict[str, Any]] = []
        offset = 0
        deadline = started + timeout
        while time.time() < deadline:
            records, offset = _tail(audit_path, offset)
            for r in records:
                t = f"+{max(0.0, (parse_time(r.get('time')) or started) - started):5.1f}s"
                if r["type"] == "decision":
                    print(f"{t}  DECISION {r['action']:<10} {r['rule']:<30} {r.get('purpose') or '?':<9} "
                          f"on '{labels.get(r['conversation_id'], r['conversation_id'])}'", file=out)
                elif r["type"] == "outcome":
                    outcomes.append(r)
                    lat = r.get("event_to_request_ms")
                    print(f"{t}  OUTCOME  {r['outcome']:<10} {r['rule']:<30}"
                          + (f" (event to request {lat:.2f} ms)" if lat is not None else ""), file=out)
            if len({(o["rule"], o["participant_id"]) for o in outcomes}) >= expected:
                break
            await asyncio.sleep(0.05)

        # Judge: the sandbox's own view of every party.
        removed_ok, kept_ok, problems = 0, 0, []
        parties = 0
        for c in script.calls:
            conv = world.get_call(c.conversation_id)
            parties += len(conv.participants)
            for pid, rule in c.remove.items():
                p = conv.party(pid)
                patches = [r for r in sandbox.journal.patches(c.conversation_id) if r.path.endswith(pid)]
                if p.state == "disconnected" and len(patches) == 1:
                    removed_ok += 1
                else:
                    problems.append(f"'{c.label}': {rule} should have removed {pid} exactly once "
                                    f"(state {p.state}, {len(patches)} PATCH)")
            for pid in c.keep + list(c.observe):
                if conv.party(pid).state == "connected":
                    kept_ok += 1
                else:
                    problems.append(f"'{c.label}': party {pid} should still be connected")
        others = [r for r in sandbox.journal.patches()
                  if not any(r.path.endswith(pid) for c in script.calls for pid in c.remove)]
        problems += [f"unexpected PATCH {r.path}" for r in others]

        latencies = _latencies(sandbox, script)
        await daemon.stop()
        daemon = None
        report = verify([audit_path])
        buf = io.StringIO()
        _summary(buf, script, outcomes, parties, removed_ok, kept_ok, latencies, audit_path, report)
        for problem in problems:
            print(f"PROBLEM: {problem}", file=buf)
        out.write(buf.getvalue())
        summary_path = out_dir / "summary.txt"
        try:
            summary_path.write_text(buf.getvalue().lstrip("\n"), encoding="utf-8")
            print(f"summary also in {summary_path}", file=out)
        except OSError as exc:
            problems.append(f"cannot write {summary_path}: {exc.strerror or exc}")
            print(f"PROBLEM: {problems[-1]}", file=out)
        return 0 if not problems and report.ok else 1
    finally:
        if daemon is not None:
            await daemon.stop()
        await sandbox.stop()


def _latencies(sandbox: Sandbox, script: Script) -> list[float]:
    """Event-to-removal in ms for event-triggered rules: the last event the sandbox published
    for the call before the PATCH arrived, to the PATCH's arrival (both sandbox clocks)."""
    out: list[float] = []
    for c in script.calls:
        for pid, rule in c.remove.items():
            if rule in TIMER_RULES:
                continue
            patch = next((r for r in sandbox.journal.patches(c.conversation_id) if r.path.endswith(pid)), None)
            if patch is None:
                continue
            events = [e for e in sandbox.journal.events
                      if e.conversation_id == c.conversation_id and e.perf_ns <= patch.perf_ns]
            if events:
                out.append((patch.perf_ns - events[-1].perf_ns) / 1e6)
    return out


def _summary(out: TextIO, script: Script, outcomes: list[dict[str, Any]], parties: int, removed_ok: int,
             kept_ok: int, latencies: list[float], audit_path: Path, report: Any) -> None:
    per_rule: dict[str, dict[str, int]] = {}
    for o in outcomes:
        row = per_rule.setdefault(o["rule"], {})
        row[o["outcome"]] = row.get(o["outcome"], 0) + 1
    must_remove = sum(len(c.remove) for c in script.calls)
    must_keep = sum(len(c.keep) + len(c.observe) for c in script.calls)
    print("\n" + "=" * 78, file=out)
    print(f"SUMMARY  calls {len(script.calls)}   parties {parties}   "
          f"removed {removed_ok}/{must_remove}   near-miss parties untouched {kept_ok}/{must_keep}", file=out)
    print("-" * 78, file=out)
    print(f"{'rule':<32}{'disconnected':>13}{'observed':>10}{'suppressed':>11}{'other':>8}", file=out)
    for rule in sorted(per_rule):
        row = per_rule[rule]
        other = sum(v for k, v in row.items() if k not in ("disconnected", "observed", "suppressed"))
        print(f"{rule:<32}{row.get('disconnected', 0):>13}{row.get('observed', 0):>10}"
              f"{row.get('suppressed', 0):>11}{other:>8}", file=out)
    print("-" * 78, file=out)
    if latencies:
        print(f"event-to-removal (sandbox publish -> PATCH received, {len(latencies)} event-triggered removals): "
              f"p50 {_pct(latencies, 0.5):.2f} ms, p99 {_pct(latencies, 0.99):.2f} ms", file=out)
    print("timer rules (hold_for 10s, supervisor > 600 s) fire on time alone, with no event", file=out)
    status = f"chain intact, {report.records} records" if report.ok else f"BROKEN: {report.problem}"
    print(f"audit: {audit_path} ({status}); check it with: confguard audit verify {audit_path}", file=out)
    print("=" * 78, file=out)


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "demo", help="sandbox + daemon + scripted conference calls, with a summary",
        description="Start a local Genesys Cloud sandbox and the daemon with the config's rules, "
                    "play scripted conference calls and summarise what was removed. Finishes within a minute.")
    p.add_argument("--config", default="config.yaml", help="rules to demonstrate (default: %(default)s)")
    p.add_argument("--out", default="demo-output", help="folder for the demo's audit file (default: %(default)s)")
    p.set_defaults(func=demo_command)


def demo_command(args: Any) -> int:
    from daemon.service.logs import configure_logging

    out_dir = Path(args.out)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        log_file = (out_dir / "daemon.log").open("w", encoding="utf-8")
    except OSError as exc:  # a bad --out is a usage error, not a traceback
        print(f"confguard: cannot use --out {out_dir}: {exc.strerror or exc}", file=sys.stderr)
        return 2
    # The daemon's own log lines go to a file so the demo's screen stays readable.
    with log_file:
        configure_logging(getattr(args, "log_level", None) or "info", "json", stream=log_file)
        print(f"daemon log: {out_dir / 'daemon.log'}", file=sys.stdout)
        return asyncio.run(run_demo(Path(args.config), sys.stdout, out_dir=out_dir))
