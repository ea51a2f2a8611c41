"""Start-up and gaps at contact-centre scale (issue 18): confguard's order against the naive
one, side by side in ONE run (alternated per size), at 1,500 and 5,000 live calls.

    .venv/bin/python bench/startup_scale.py [--sizes 1500,5000] [--scale 20] [--smoke] [--json]

Each size runs twice, `confguard` then `naive`, each against a fresh sandbox (its own
process, no legacy `inin-ratelimit-*` headers, as Genesys today) holding the live calls in
one queue: every fifth a conference (customer, agent, external; 20%), the rest routed
(customer, agent); on 5 conferences spread over analytics' listing order the customer
already carries `complianceFlag: "true"`. The real `Daemon` (the shipped flagged-party
rule) starts into it.

- `confguard`: today's code. READY once subscribed and the calls are listed; reads after
  it in `daemon.core.coverage.read_order` (conferences, then calls with an outside party,
  then the rest, with ageing).
- `naive` (the anchor, the order before issue 18): one GET per call in discovery order,
  READY at the end (here: READY is counted when the last call is read).

Then, with the same calls live, every socket is dropped and, during the gap, the customer
of the conference analytics lists last is flagged (its event lost with the sockets; the
sandbox's `lose next 1` fault makes sure): reconnect (the gap resync begins) -> removal.

COMPRESSED TIME, as bench/budget_reconcile.py: the limiter's window runs `--scale` times
faster (`RequestLimiter(300, window=60/scale)`, 20% reserve: 240 resync reads a window),
and so do the daemon's clock (reconciliation: interval 300 s, share 0.25) and every
figure below except READY, which needs no budget wait and is given in real seconds (the
calls are listed with ~55 requests). REST round trips (a few ms) are not scaled: reads are
relatively `scale` x slower than in real time (conservative). The sandbox's own budget is
off, so the limiter's books are what count; a 429 would be the limiter's bug.

Reported per variant: start -> READY, -> last flagged removal, -> every conference read,
-> every call read; reconnect -> removal of the party flagged in the gap; 429s; the
reconciliation share of the allowance over the run (<= 0.25). `--smoke`: 60 calls.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common  # noqa: E402

QUEUE = "Customer Service"
FLAGGED = 5
ALLOWED = 300
SHARE = 0.25


def sandbox_process(conn: Connection) -> None:
    _common.run_quietly(_sandbox_main, conn)


async def _sandbox_main(conn: Connection) -> None:
    sb, queue, users = await _common.start_one_queue_sandbox(conn, seed=18, queue=QUEUE)
    w = sb.world
    loop = asyncio.get_running_loop()
    flagged: list[str] = []
    confs: list[tuple[str, str]] = []  # (conversation, customer) in listing order
    while True:
        cmd = await loop.run_in_executor(None, conn.recv)
        op = cmd["op"]
        if op == "setup":
            for i in range(cmd["calls"]):
                conv = w.start_call(queue, ani=f"tel:+1415{i:07d}")
                w.connect_agent(conv.id, users[i % len(users)])
                if i % 5 == 4:
                    w.add_external(conv.id, f"tel:+1212{i:07d}")
                    confs.append((conv.id, conv.participants[0].id))
            n = len(confs)
            for k in range(FLAGGED):  # spread over the listing: k/5 + 1/10 of the way
                cid, cust = confs[min(n - 2, (2 * k + 1) * n // (2 * FLAGGED))]
                w.set_attributes(cid, cust, {"complianceFlag": "true"})
                flagged.append(f"/api/v2/conversations/calls/{cid}/participants/{cust}")
            sb.journal.clear()
            conn.send({"calls": len(w.active_calls()), "conferences": n})
        elif op == "gap":
            cid, cust = confs[-1]
            sb.drop_sockets()
            sb.faults.configure({"lose": {"next": 1}})
            w.set_attributes(cid, cust, {"complianceFlag": "true"})
            path = f"/api/v2/conversations/calls/{cid}/participants/{cust}"
            conn.send({"path": path, "at": time.time()})
        elif op == "patched":
            done = {r.path: r.time for r in sb.journal.requests if r.method == "PATCH" and r.status < 300}
            conn.send({p: done.get(p) for p in cmd["paths"]})
        elif op == "report":
            done = {r.path: r.time for r in sb.journal.requests if r.method == "PATCH" and r.status < 300}
            conn.send({"flagged": [done.get(p) for p in flagged],
                       "gets": sum(1 for r in sb.journal.requests if r.method == "GET"),
                       "rate_limited": sum(1 for r in sb.journal.requests if r.status == 429),
                       "legacy_headers": sb.faults.legacy_headers})
        else:
            await sb.stop()
            conn.send(True)
            return


@contextmanager
def _patched(scale: float, naive: bool) -> Iterator[None]:
    """The limiter's window compressed `scale` x; for `naive`, the reading order is the
    listing order (analytics, then the store)."""
    from daemon.genesys import api, resync
    from daemon.genesys.ratelimit import RequestLimiter

    orig_init, orig_order = api.GenesysClient.__init__, resync.read_order

    def init(self: Any, *a: Any, **k: Any) -> None:
        orig_init(self, *a, **k)
        self.limiter = RequestLimiter(ALLOWED, window=60.0 / scale, enforce_reserve=0.2)

    def listing_order(cands: Any, *, age_step: float = 0.0) -> list[Any]:
        return list(dict.fromkeys(c.id for c in cands))

    api.GenesysClient.__init__ = init  # type: ignore[method-assign]
    if naive:
        resync.read_order = listing_order  # type: ignore[assignment]
    try:
        yield
    finally:
        api.GenesysClient.__init__ = orig_init  # type: ignore[method-assign]
        resync.read_order = orig_order


async def _until(pred: Callable[[], bool], timeout: float) -> float | None:
    """time.time() when `pred()` first held (polled every 20 ms), None after `timeout` s."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return time.time()
        await asyncio.sleep(0.02)
    return None


async def run_one(calls: int, scale: float, variant: str) -> dict[str, Any]:
    from daemon.config import load_config
    from daemon.service.lifecycle import Daemon

    t0_epoch, m0 = time.time(), time.monotonic()

    def scaled() -> float:
        return t0_epoch + (time.monotonic() - m0) * scale

    out: dict[str, Any] = {"variant": variant, "calls": calls}
    async with _common.SandboxProcess(sandbox_process) as remote:
        world = await remote.ask({"op": "setup", "calls": calls})
        out["conferences"] = world["conferences"]
        with _common.daemon_folder() as tmp, _patched(scale, variant == "naive"):
            path = _common.config_for_sandbox(
                tmp, remote.info, n_rules=1, queues=[QUEUE],
                overrides={"logging.level": "warning", "subscriptions.reconcile_share": SHARE,
                           "safety.max_disconnects_per_minute": 1_000_000})
            daemon = Daemon(load_config(path), config_path=path, clock=scaled)
            start = time.time()
            await daemon.start()
            ready = time.time()
            try:
                cov = daemon.coverage
                confs_read = await _until(
                    lambda: cov.snapshot(scaled()).conferences_unread == 0, 60.0 * calls / 240 / scale + 60)
                all_read = await _until(
                    lambda: cov.snapshot(scaled()).calls_unread == 0, 60.0 * calls / 240 / scale + 60)
                assert daemon.resyncer is not None and daemon.client is not None
                limiter = daemon.client.limiter
                gap = await remote.ask({"op": "gap"})
                began = daemon.resyncer.completed
                reconnect = await _until(lambda: daemon.resyncer is not None and (
                    daemon.resyncer.running or daemon.resyncer.completed > began), 60)
                removed_at = None
                deadline = time.monotonic() + 60.0 * calls / 240 / scale + 60
                while time.monotonic() < deadline:
                    removed_at = (await remote.ask({"op": "patched", "paths": [gap["path"]]}))[gap["path"]]
                    if removed_at is not None:
                        break
                    await asyncio.sleep(0.05)
                elapsed_windows = (time.monotonic() - m0) * scale / 60.0
                out["reconcile_share"] = round(
                    limiter.granted["tag:reconcile"] / (ALLOWED * elapsed_windows), 3)
                out["limiter_rate_limited"] = dict(limiter.rate_limited_count)
            finally:
                await daemon.stop()
        rep = await remote.ask({"op": "report"})

    def s(at: float | None, since: float = start) -> float | None:
        return None if at is None else round((at - since) * scale, 1)

    flagged = rep["flagged"]
    out["ready_real_s"] = round(((all_read or ready) if variant == "naive" else ready) - start, 2)
    if variant == "naive":
        out["ready_s"] = s(all_read)
    out["last_flagged_removal_s"] = None if None in flagged else s(max(flagged))
    out["flagged_removed"] = sum(1 for f in flagged if f is not None)
    out["every_conference_read_s"] = s(confs_read)
    out["every_call_read_s"] = s(all_read)
    out["gap_reconnect_to_removal_s"] = s(removed_at, reconnect) if reconnect else None
    out["gap_flag_to_removal_s"] = s(removed_at, gap["at"])
    out["rate_limited_429"] = rep["rate_limited"]
    out["gets"] = rep["gets"]
    out["legacy_headers"] = rep["legacy_headers"]
    out["load"] = _common.load()
    return out


async def run(args: argparse.Namespace) -> dict[str, Any]:
    sizes = [int(x) for x in args.sizes.split(",")]
    results: dict[str, Any] = {"bench": "startup_scale", "scale": args.scale, "allowed": ALLOWED,
                               "reconcile_share": SHARE, "runs": []}
    for n in sizes:  # alternated: the machine's noise hits both orders alike
        for variant in ("confguard", "naive"):
            results["runs"].append(await run_one(n, args.scale, variant))
    return results


def summary(r: dict[str, Any]) -> str:
    lines = [f"start-up and gaps at scale: {r['allowed']}/min, time x{r['scale']}, "
             f"reconcile share {r['reconcile_share']} (seconds are Genesys seconds; READY real)"]
    for x in r["runs"]:
        lines.append(
            f"  {x['calls']:>5} calls ({x['conferences']} conferences) {x['variant']:>9}: "
            f"READY {x['ready_real_s']} s real{' / ' + str(x.get('ready_s')) + ' s' if 'ready_s' in x else ''}, "
            f"last flagged removal {x['last_flagged_removal_s']} s ({x['flagged_removed']}/5), "
            f"conferences read {x['every_conference_read_s']} s, all read {x['every_call_read_s']} s, "
            f"gap reconnect->removal {x['gap_reconnect_to_removal_s']} s, 429s {x['rate_limited_429']}, "
            f"reconcile share {x['reconcile_share']}, load {x['load']}")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="1500,5000", help="live calls, comma-separated")
    ap.add_argument("--scale", type=float, default=20.0, help="time compression factor")
    _common.run_cli(ap, run, summary, smoke_help="60 calls, time x20", smoke={"sizes": "60"})


if __name__ == "__main__":
    main()
