"""Chaos soak: the real Daemon against the sandbox on 127.0.0.1 for CONFGUARD_SOAK_SECONDS
(default 60; `make soak` runs 600), with a fault injected every few seconds from a bounded
rotating list, while calls with and without rule breakers come and go.

Faults (in rotation): dropped sockets, socket_closing with a short grace, channel expiry,
token expiry, token revocation, 429 and 5xx bursts on the PATCH and on the GET endpoint,
duplicated, reordered and lost events (any, or precisely a breaker's breaking event),
malformed frames. A lost event has no gap signal (Genesys never says it lost one), and a
call with a breaker in it gets no further events here: the daemon's periodic
reconciliation (`subscriptions.reconcile_interval`, 3 s here) or a resync after another
fault must find the breaker. `test_lost_breaking_event_is_recovered_by_reconciliation`
isolates the reconciliation: one lost event, no other fault, no later event.

Counted from the sandbox's own journal and world: breakers removed, breakers missed,
parties removed wrongly, duplicate PATCHes (more than one 2xx PATCH for one party), worst
time to removal (publish of the breaking event -> arrival of the PATCH, sandbox clock).
Asserted: zero missed, zero wrong, zero duplicates. Run with -s to see the counts.
"""

from __future__ import annotations

import asyncio
import os
import random
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from daemon.config import Config, parse_config
from daemon.service.logs import configure_logging
from daemon.sandbox import Sandbox
from daemon.sandbox.world import World, WorldError
from daemon.service.lifecycle import Daemon, State
from _logging_state import preserved_logging
from _rules_helpers import shipped_rule

SOAK_SECONDS = float(os.environ.get("CONFGUARD_SOAK_SECONDS", "60"))
FAULT_EVERY = 3.0  # seconds between faults
MAX_LIVE_CALLS = 40
NEW_CALLS_PER_S = 4.0
TOUCHES_PER_S = 20.0
BREAKER_SHARE = 0.35
RECONCILE_INTERVAL = float(os.environ.get("CONFGUARD_SOAK_RECONCILE", "3"))
DRAIN_SECONDS = 30.0  # generous: `make test` may run on a busy machine
BLOCKED = "tel:+442079460999"


def _config(tmp: Path, base_url: str) -> Config:
    (tmp / "blocked-numbers.txt").write_text("+44 20 7946 0999\n")
    text = f"""
schema_version: 1
genesys:
  api_base_url: {base_url}
  login_base_url: {base_url}
  max_retries: 8
  connect_timeout: 2
  read_timeout: 3
subscriptions:
  queues: [Sales]
  users: []
  reconcile_interval: {RECONCILE_INTERVAL}
mode: enforce
safety:
  max_disconnects_per_minute: 100000
lists:
  blocked_numbers: {{file: blocked-numbers.txt}}
rules:
{shipped_rule("flagged-party")}{shipped_rule("blocked-number-in-conference")}audit:
  path: audit/soak.jsonl
  fsync_interval: 1.0
ops:
  enabled: false
logging:
  level: warning
"""
    return parse_config(text, file=str(tmp / "config.yaml"), base_dir=tmp)


@dataclass
class Breaker:
    cid: str
    pid: str
    kind: str
    event_seq: int = 0
    event_ns: int = 0
    lost: bool = False  # its breaking event reached no socket (lose_breaker, or a socket down)


def party_live(w: World, b: Breaker) -> bool:
    """The breaker's party is still connected. The sandbox forgets calls 600 s after they
    end (GET then answers 404, as Genesys does): a forgotten call has no live party."""
    conv = w.calls.get(b.cid)
    return conv is not None and conv.party(b.pid).live


@dataclass
class Soak:
    sb: Sandbox
    rng: random.Random
    queue: str
    agents: list[str]
    breakers: dict[str, Breaker] = field(default_factory=dict)  # party path -> breaker
    live: dict[str, float] = field(default_factory=dict)  # cid -> planned end (monotonic)
    pending_breaks: list[tuple[float, str, str]] = field(default_factory=list)
    faults: Counter[str] = field(default_factory=Counter)
    lose_next_breaker: bool = False
    calls_started: int = 0
    touches: int = 0
    n: int = 0

    @property
    def world(self) -> World:
        return self.sb.world

    def new_call(self, now: float) -> None:
        w = self.world
        self.n += 1
        roll = self.rng.random()
        ani = BLOCKED if roll < 0.05 else f"tel:+1415555{self.n % 10000:04d}"  # near miss: customer
        conv = w.start_call(self.queue, ani=ani, customer_name=f"Customer {self.n}")
        w.connect_agent(conv.id, self.rng.choice(self.agents))
        self.calls_started += 1
        self.live[conv.id] = now + self.rng.uniform(3.0, 10.0)
        kind = self.rng.random()
        if kind < BREAKER_SHARE / 2:  # blocked number conferenced in: breaks on arrival
            ext = w.add_external(conv.id, BLOCKED, name="Unknown")
            self._breaker(conv.id, ext.id, "blocked")
        else:
            ext = w.add_external(conv.id, f"tel:+1212555{self.n % 10000:04d}", name="Partner")
            if kind < BREAKER_SHARE:  # flagged a little later
                self.pending_breaks.append((now + self.rng.uniform(0.1, 2.0), conv.id, ext.id))
            elif kind < 0.6:  # near miss: the flag says false
                w.set_attributes(conv.id, ext.id, {"complianceFlag": "false"})

    def _breaker(self, cid: str, pid: str, kind: str) -> None:
        ev = self.sb.journal.events[-1]
        assert ev.conversation_id == cid
        self.breakers[f"/api/v2/conversations/calls/{cid}/participants/{pid}"] = Breaker(
            cid, pid, kind, ev.seq, ev.perf_ns, lost=ev.sockets == 0)

    def flag_due(self, now: float) -> None:
        due = [b for b in self.pending_breaks if b[0] <= now]
        self.pending_breaks = [b for b in self.pending_breaks if b[0] > now]
        for _, cid, pid in due:
            lost = self.lose_next_breaker
            if lost:  # the breaking event itself never reaches anyone
                self.lose_next_breaker = False
                self.sb.faults.configure({"lose": {"next": 1}})
            self.world.set_attributes(cid, pid, {"complianceFlag": "true"})
            self._breaker(cid, pid, "flagged")
            if lost:
                self.breakers[f"/api/v2/conversations/calls/{cid}/participants/{pid}"].lost = True

    def end_calls(self, now: float) -> None:
        """End calls past their lifetime, but never a breaker's call before the breaker is
        out (otherwise a miss would be hidden by the hang-up)."""
        waiting = {cid for _, cid, _ in self.pending_breaks}
        for cid, end in list(self.live.items()):
            if end > now or cid in waiting:
                continue
            conv = self.world.get_call(cid)
            if any(b.cid == cid and party_live(self.world, b) for b in self.breakers.values()):
                continue
            del self.live[cid]
            if conv.end is None:
                self.world.end_call(cid)

    def touch(self) -> None:
        # Never a call whose breaker is still in it: a later event would carry the breaking
        # state again and hide a lost one, which only reconciliation may recover.
        out = {b.cid for b in self.breakers.values() if b.cid in self.live and party_live(self.world, b)}
        out |= {cid for _, cid, _ in self.pending_breaks}
        candidates = [cid for cid in self.live if cid not in out]
        if not candidates:
            return
        cid = self.rng.choice(candidates)
        conv = self.world.get_call(cid)
        try:
            if self.rng.random() < 0.5:
                p = self.rng.choice(conv.participants)
                self.world.set_attributes(cid, p.id, {"crm.step": str(self.touches)})
            else:
                self.world.touch(cid)
        except WorldError:
            return
        self.touches += 1

    def fault(self, i: int) -> str:
        sb = self.sb
        kinds = ("drop_sockets", "socket_closing", "expire_channel", "expire_tokens", "patch_429",
                 "get_5xx", "duplicate", "lose", "revoke_tokens", "patch_5xx", "get_429",
                 "reorder", "malformed", "lose_breaker")
        kind = kinds[i % len(kinds)]
        f = sb.faults
        if kind == "drop_sockets":
            sb.drop_sockets()
        elif kind == "socket_closing":
            sb.socket_closing(grace=0.5)
        elif kind == "expire_channel":
            for cid in list(sb.conns)[:1]:
                sb.expire_channel(cid)
        elif kind == "expire_tokens":
            sb.world.expire_tokens(None)
        elif kind == "revoke_tokens":
            sb.world.revoke_tokens(None)
        elif kind == "patch_429":
            f.add_burst("PATCH", r"/participants/", 429, 3, retry_after=1)
        elif kind == "patch_5xx":
            f.add_burst("PATCH", r"/participants/", 503, 3)
        elif kind == "get_429":
            f.add_burst("GET", r"/api/v2/conversations/calls/", 429, 5, retry_after=1)
        elif kind == "get_5xx":
            f.add_burst("GET", r"/api/v2/conversations/calls/", 500, 5)
        elif kind == "duplicate":
            f.configure({"duplicate": {"next": 5}})
        elif kind == "lose":
            f.configure({"lose": {"next": 3}})  # whatever comes next, breaker or not
        elif kind == "lose_breaker":
            self.lose_next_breaker = True
        elif kind == "reorder":
            f.configure({"reorder": {"next": 3}})
        else:
            f.configure({"malformed": {"next": 3}})
        self.faults[kind] += 1
        return kind


@pytest.fixture
def quiet_logs(tmp_path: Path) -> Iterator[Path]:
    """The daemon's warnings go to a file (faults make many); restored afterwards."""
    path = tmp_path / "daemon.log"
    with path.open("w") as fh, preserved_logging():
        configure_logging("warning", "json", stream=fh)
        yield path


@pytest.mark.slow
async def test_soak_under_rotating_faults(tmp_path: Path, quiet_logs: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    sb = Sandbox(heartbeat_interval=1.0, closing_grace=0.5, seed=11)
    await sb.start()
    daemon: Daemon | None = None
    try:
        w = sb.world
        queue = w.create_queue("Sales").id
        agents = [w.create_user(f"Agent {i}").id for i in range(10)]
        for name in ("GENESYS_CLOUD_CLIENT_ID", "GENESYS_CLOUD_CLIENT_SECRET"):
            monkeypatch.delenv(name, raising=False)
        monkeypatch.setenv("GENESYSCLOUD_OAUTHCLIENT_ID", sb.client_id)
        monkeypatch.setenv("GENESYSCLOUD_OAUTHCLIENT_SECRET", sb.client_secret)
        daemon = Daemon(_config(tmp_path, sb.base_url), drain_timeout=2.0)
        await asyncio.wait_for(daemon.start(), timeout=20.0)
        assert daemon.state is State.RUNNING

        soak = Soak(sb, random.Random(7), queue, agents)
        loop = asyncio.get_running_loop()
        start = loop.time()
        end = start + SOAK_SECONDS
        next_fault = start + FAULT_EVERY
        fault_i = 0
        tick = 0.05
        call_acc = touch_acc = 0.0
        # Bounded: one iteration per tick until the soak time is up.
        for _ in range(2 * int(SOAK_SECONDS / tick) + 10):  # the clock ends it first
            now = loop.time()
            if now >= end:
                break
            call_acc += NEW_CALLS_PER_S * tick
            touch_acc += TOUCHES_PER_S * tick
            while call_acc >= 1.0:
                call_acc -= 1.0
                if len(soak.live) < MAX_LIVE_CALLS:
                    soak.new_call(now)
            while touch_acc >= 1.0:
                touch_acc -= 1.0
                soak.touch()
            soak.flag_due(now)
            soak.end_calls(now)
            if now >= next_fault:
                soak.fault(fault_i)
                fault_i += 1
                next_fault += FAULT_EVERY  # on a fixed cadence: lateness does not accumulate
            await asyncio.sleep(tick)

        # Drain: no new faults, flag what is still pending, wait for every breaker.
        soak.flag_due(float("inf"))
        sb.faults.reset()
        deadline = loop.time() + DRAIN_SECONDS
        while loop.time() < deadline:
            if not any(party_live(w, b) for b in soak.breakers.values()):
                break
            await asyncio.sleep(0.1)
        await asyncio.sleep(0.5)  # late duplicates, if any, would land now
        for _ in range(int(DRAIN_SECONDS / 0.1)):  # and the daemon is healthy again
            if daemon.state is State.RUNNING and daemon.health().ready:
                break
            await asyncio.sleep(0.1)

        ours = sb.client_id
        patches = [r for r in sb.journal.requests
                   if r.method == "PATCH" and "/participants/" in r.path and r.client_id == ours]
        ok = Counter(r.path for r in patches if 200 <= r.status < 300)
        first: dict[str, int] = {}
        for r in patches:
            first.setdefault(r.path, r.perf_ns)
        removed = [p for p, b in soak.breakers.items() if ok[p] >= 1 and not party_live(w, b)]
        missed = [p for p in soak.breakers if p not in set(removed)]
        wrong = [p for p in ok if p not in soak.breakers]
        dups = {p: n for p, n in ok.items() if n > 1}
        ttr = sorted((first[p] - soak.breakers[p].event_ns) / 1e6 for p in removed if p in first)
        worst = ttr[-1] if ttr else 0.0
        p50 = ttr[len(ttr) // 2] if ttr else 0.0
        p99 = ttr[min(len(ttr) - 1, round(0.99 * (len(ttr) - 1)))] if ttr else 0.0
        lost_ttr = sorted((first[p] - soak.breakers[p].event_ns) / 1e6 for p in removed
                          if p in first and soak.breakers[p].lost)
        seen_ttr = [x for x in ttr if x not in lost_ttr]
        # Injected bursts are answered before the token is read (client id None).
        statuses = Counter(r.status for r in sb.journal.requests
                           if r.client_id in (ours, None) and r.path.startswith("/api/v2/"))
        m = daemon.metrics
        print(f"\nSOAK {SOAK_SECONDS:.0f}s: calls {soak.calls_started}, touches {soak.touches}, "
              f"faults {dict(soak.faults)}")
        print(f"SOAK breakers {len(soak.breakers)}: removed {len(removed)}, missed {len(missed)}, "
              f"wrongly removed {len(wrong)}, duplicate PATCHes {len(dups)}, "
              f"time to removal p50 {p50:.1f} ms, p99 {p99:.1f} ms, worst {worst:.1f} ms; "
              f"breakers whose breaking event reached no socket (lost, or sent while the socket "
              f"was down): {len(lost_ttr)}, recovered over REST in "
              f"{', '.join(f'{x / 1000:.1f}' for x in lost_ttr)} s; worst of the others "
              f"{(max(seen_ttr) if seen_ttr else 0.0):.1f} ms")
        print(f"SOAK daemon requests by status {dict(sorted(statuses.items()))}, "
              f"engine rejected { {k: v for k, v in daemon.engine.rejected.items() if v} }, resyncs "
              f"{ {s.labels['reason']: int(s.value) for s in _samples(m.resyncs)} }, "
              f"state {daemon.state.value}, "
              f"load {os.getloadavg()[0]:.2f}")
        assert daemon.state is State.RUNNING and daemon.health().ready, daemon.health()
        assert not missed, f"breakers never removed: {missed[:5]}"
        assert not wrong, f"parties removed that broke no rule: {wrong[:5]}"
        assert not dups, f"parties PATCHed more than once: {dups}"
        assert len(soak.breakers) >= SOAK_SECONDS / 10, "too few breakers for a meaningful soak"
        assert sum(soak.faults.values()) >= 0.9 * SOAK_SECONDS / FAULT_EVERY - 1
    finally:
        if daemon is not None:
            await asyncio.wait_for(daemon.stop(), timeout=20.0)
        await sb.stop()


def _samples(metric: Any) -> list[Any]:
    return [s for fam in metric.collect() for s in fam.samples if s.name.endswith("_total")]


async def test_lost_breaking_event_is_recovered_by_reconciliation(
        tmp_path: Path, quiet_logs: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No gap, no later event: only the periodic re-read can find this breaker."""
    sb = Sandbox(heartbeat_interval=1.0)
    await sb.start()
    daemon: Daemon | None = None
    try:
        w = sb.world
        queue = w.create_queue("Sales").id
        agent = w.create_user("Agent").id
        for name in ("GENESYS_CLOUD_CLIENT_ID", "GENESYS_CLOUD_CLIENT_SECRET"):
            monkeypatch.delenv(name, raising=False)
        monkeypatch.setenv("GENESYSCLOUD_OAUTHCLIENT_ID", sb.client_id)
        monkeypatch.setenv("GENESYSCLOUD_OAUTHCLIENT_SECRET", sb.client_secret)
        text_cfg = _config(tmp_path, sb.base_url)
        cfg = text_cfg.model_copy(update={"subscriptions": text_cfg.subscriptions.model_copy(
            update={"reconcile_interval": 1.0})})
        daemon = Daemon(cfg, drain_timeout=2.0)
        await asyncio.wait_for(daemon.start(), timeout=20.0)
        conv = w.start_call(queue)
        w.connect_agent(conv.id, agent)
        ext = w.add_external(conv.id, "tel:+12125550100")
        for _ in range(200):  # the daemon knows the call (bounded: 10 s)
            call = daemon.engine.store.get(conv.id)
            if call is not None and ext.id in call.participants:
                break
            await asyncio.sleep(0.05)
        else:
            raise AssertionError("the daemon never saw the call")
        sb.faults.configure({"lose": {"next": 1}})
        w.set_attributes(conv.id, ext.id, {"complianceFlag": "true"})
        assert sb.journal.events[-1].conversation_id == conv.id
        for _ in range(200):  # removed within 10 s, by a GET of the call, not by an event
            if not w.get_call(conv.id).party(ext.id).live:
                break
            await asyncio.sleep(0.05)
        else:
            raise AssertionError("a breaker whose event was lost was never removed")
        reads = sb.journal.find("GET", f"/api/v2/conversations/calls/{conv.id}")
        assert reads, "removed without re-reading the call"
        assert daemon.state is State.RUNNING
        assert len(sb.journal.patches(conv.id)) == 1
    finally:
        if daemon is not None:
            await asyncio.wait_for(daemon.stop(), timeout=20.0)
        await sb.stop()
