"""Request budget, burst: many removals at once, confguard side by side with a minimal client.

    .venv/bin/python bench/budget_burst.py [--conferences 200] [--gap-ms 10] [--budget 300]
                                           [--smoke] [--json]

One run, one sandbox (its own process), `--budget` requests per token per 60 s window
enforced by the sandbox as Genesys does (fixed window from the token's first request,
`inin-ratelimit-*` headers, 429 past it):

- confguard: the real `Daemon` in this process (the shipped config.yaml rules, default
  genesys settings: `requests_per_minute` 300 is only its assumption until the first answer's
  headers), started before the calls exist;
- the minimal client, its own process and OAuth client: a token, a channel subscribed to
  the queue, the socket, and on each event whose customer carries `complianceFlag: "true"`
  a PATCH {"state": "disconnected"} for that call's external party (a 429 is retried after
  its Retry-After; nothing else). It removes the other party of the same call so that the
  two clients never race for one party: both get the same event, both send one PATCH.

Then `--conferences` live conference calls (customer, agent, external) are set up, and
each customer is flagged `--gap-ms` apart. Latency = the sandbox's perf_counter_ns when it
published the flag event -> its perf_counter_ns when that client's first PATCH for its
party (confguard: the customer, minimal: the external) arrived (same process, same clock), per client. Reported: p50/p99/max, PATCHes,
429s, requests per client, the allowance confguard learnt. Target (budget 300): confguard
p99 <= 1.5 x the minimal client's, 0 x 429. `--smoke`: 10 conferences, checks it runs.

Side by side, the two clients and the sandbox share the machine's cores, and how the
scheduler places three busy processes on two cores decides much of each round (a client
sharing a core with the sandbox waits for it). `--solo` takes that out: each round runs
each client alone (`--only`), pinned with the sandbox on a core of its own (`--pin`:
sandbox on the first allowed CPU, the client on the second; Linux); the ratio is
confguard's p99 over the minimal client's of the same round. The side-by-side run stays
the one the target names; `--solo` says what each client costs by itself.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import multiprocessing as mp
import sys
import time
from collections import Counter
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common  # noqa: E402
import _hops  # noqa: E402

QUEUE = "Customer Service"

# ----------------------------------------------------------------------------- sandbox side


def sandbox_process(conn: Connection, budget: int) -> None:
    _common.run_quietly(_sandbox_main, conn, budget)


async def _sandbox_main(conn: Connection, budget: int) -> None:
    from daemon.sandbox import Sandbox

    sb = Sandbox(heartbeat_interval=30.0, request_budget=budget or None, seed=11)
    await sb.start()
    w = sb.world
    queue = w.create_queue(QUEUE).id
    users = [w.create_user(f"Agent {i}").id for i in range(50)]
    minimal = w.add_client()
    conn.send(_common.sandbox_hello(sb, queue=queue, minimal_id=minimal.id,
                                    minimal_secret=minimal.secret))
    loop = asyncio.get_running_loop()
    calls: list[tuple[str, str, str]] = []  # (conversation id, customer id, external id)
    names = {sb.client_id: "confguard", minimal.id: "minimal"}

    async def burst(n: int, gap: float, settle: float, raw: bool,
                    clients: list[str]) -> dict[str, Any]:
        seq0 = sb.journal._req_seq
        flags: list[tuple[str, str, str, int]] = []
        t0 = time.monotonic()
        for cid, pid, ext in calls[:n]:
            w.set_attributes(cid, pid, {"complianceFlag": "true"})
            ev = sb.journal.events[-1]
            flags.append((cid, pid, ext, ev.perf_ns))
            await asyncio.sleep(gap)
        inject = time.monotonic() - t0
        base = "/api/v2/conversations/calls/{}/participants/{}"
        target = {sb.client_id: 1, minimal.id: 2}  # index into the flag tuple: whose party
        wanted = {base.format(f[0], f[target[c]]) for f in flags for c in target
                  if names[c] in clients}
        deadline = time.monotonic() + settle
        while time.monotonic() < deadline:
            got = {(r.client_id, r.path) for r in sb.journal.requests
                   if r.seq > seq0 and r.method == "PATCH" and r.status < 300 and r.path in wanted}
            if len(got) >= len(wanted):
                break
            await asyncio.sleep(0.1)
        first: dict[tuple[str | None, str], int] = {}
        per: dict[str, Counter[str]] = {}
        for r in sb.journal.requests:
            if r.seq <= seq0:
                continue
            who = names.get(r.client_id or "", r.client_id or "-")
            c = per.setdefault(who, Counter())
            c["requests"] += 1
            c[f"{r.method} {r.status}"] += 1
            if r.method == "PATCH" and r.path in wanted and r.status < 300:
                first.setdefault((r.client_id, r.path), r.perf_ns)
        out: dict[str, Any] = {"flags": len(flags), "inject_seconds": round(inject, 2),
                               "load": _common.load()}
        if raw:  # per flag: conversation, publish ns, confguard's first PATCH ns (for --hops)
            out["raw"] = [[f[0], f[3], first.get((sb.client_id, base.format(f[0], f[1])))]
                          for f in flags]
        for client_id, who in names.items():
            if who in clients:
                out[who] = _client_figures(flags, first, client_id, target[client_id], base,
                                           per.get(who, Counter()))
        return out

    while True:
        cmd = await loop.run_in_executor(None, conn.recv)
        op = cmd["op"]
        if op == "setup":
            for i in range(cmd["conferences"]):
                conv = w.start_call(queue, ani=f"tel:+1415555{i:04d}", customer_name=f"Customer {i}")
                w.connect_agent(conv.id, users[i % len(users)])
                w.set_recording(conv.id, "active")  # the shipped rules want it
                ext = w.add_external(conv.id, f"tel:+1212555{i:04d}", name="Partner")
                calls.append((conv.id, conv.participants[0].id, ext.id))
            conn.send(len(calls))
        elif op == "burst":
            conn.send(await burst(cmd["n"], cmd["gap"], cmd["settle"], cmd.get("raw", False),
                                  cmd.get("clients", ["confguard", "minimal"])))
        else:
            await sb.stop()
            conn.send(True)
            return


def _client_figures(flags: list[tuple[str, str, str, int]],
                    first: dict[tuple[str | None, str], int], client_id: str, which: int,
                    base: str, counts: Counter[str]) -> dict[str, Any]:
    """One client's latencies (publish -> its first 2xx PATCH of its party, ms) and counts."""
    lat = []
    for f in flags:
        ns = first.get((client_id, base.format(f[0], f[which])))
        if ns is not None:
            lat.append((ns - f[3]) / 1e6)
    return {"patched": len(lat), "p50_ms": _common.pct(lat, 0.5),
            "p99_ms": _common.pct(lat, 0.99), "max_ms": max(lat) if lat else None,
            "requests": counts.get("requests", 0),
            "status_429": sum(v for k, v in counts.items() if k.endswith(" 429")),
            "statuses": {k: v for k, v in counts.items() if k != "requests"}}


# ----------------------------------------------------------------------------- minimal client


def minimal_process(conn: Connection, base: str, client_id: str, secret: str, queue: str,
                    hops: bool = False) -> None:
    _common.run_quietly(_minimal_main, conn, base, client_id, secret, queue, hops)


async def _minimal_main(conn: Connection, base: str, client_id: str, secret: str,
                        queue: str, hops: bool = False) -> None:
    """Token, channel, socket, PATCH on flag: the least a client can do.

    With `hops`: its own share, measured as `--hops` measures confguard's (`on_message`:
    the socket library handed the frame over, before the JSON is parsed; `written`: the
    PATCH's first bytes handed to the socket), sent back as one list of ms when the socket
    closes."""
    seen: dict[str, int] = {}
    written: dict[str, int] = {}
    probe = _hops.Probe()
    if hops:
        _hops.watch_patch_writes(probe, lambda cid: written.setdefault(cid, time.perf_counter_ns()))
    try:
        await _minimal_loop(conn, base, client_id, secret, queue, seen)
    finally:
        probe.uninstall()
        if hops:
            conn.send({"on_message_to_written_ms": [(written[c] - t) / 1e6
                                                    for c, t in seen.items() if c in written]})


async def _minimal_loop(conn: Connection, base: str, client_id: str, secret: str, queue: str,
                        seen: dict[str, int]) -> None:
    """The minimal client's work; `seen`: when each call's flag frame was handed over."""
    import aiohttp
    import orjson

    async with aiohttp.ClientSession() as s:
        basic = base64.b64encode(f"{client_id}:{secret}".encode()).decode()
        async with s.post(base + "/oauth/token", data={"grant_type": "client_credentials"},
                          headers={"Authorization": "Basic " + basic}) as r:
            token = (await r.json())["access_token"]
        auth = {"Authorization": f"Bearer {token}"}
        async with s.post(base + "/api/v2/notifications/channels", headers=auth) as r:
            ch = await r.json()
        topic = f"v2.routing.queues.{queue}.conversations.calls"
        async with s.put(base + f"/api/v2/notifications/channels/{ch['id']}/subscriptions",
                         json=[{"id": topic}], headers=auth) as r:
            assert r.status == 200
        done: set[str] = set()
        stats = Counter[str]()

        async def patch(cid: str, pid: str) -> None:
            url = base + f"/api/v2/conversations/calls/{cid}/participants/{pid}"
            for _ in range(10):
                async with s.patch(url, json={"state": "disconnected"}, headers=auth) as r:
                    stats[str(r.status)] += 1
                    if r.status != 429:
                        return
                    await asyncio.sleep(float(r.headers.get("Retry-After", "1")))

        tasks: set[asyncio.Task[None]] = set()
        async with s.ws_connect(ch["connectUri"]) as ws:
            conn.send("ready")
            async for msg in ws:
                t = time.perf_counter_ns()
                if msg.type != aiohttp.WSMsgType.TEXT:
                    break
                m = orjson.loads(msg.data)
                body = m.get("eventBody") or {}
                ps = body.get("participants") or []
                if not any(p.get("purpose") == "customer"
                           and (p.get("attributes") or {}).get("complianceFlag") == "true"
                           for p in ps):
                    continue
                for p in ps:
                    if (p.get("purpose") == "external" and p.get("state") == "connected"
                            and p["id"] not in done):
                        done.add(p["id"])
                        seen.setdefault(body["id"], t)
                        task = asyncio.create_task(patch(body["id"], p["id"]))
                        tasks.add(task)
                        task.add_done_callback(tasks.discard)


# ----------------------------------------------------------------------------- bench side


async def run(args: argparse.Namespace) -> dict[str, Any]:
    ctx = mp.get_context("spawn")
    mproc = None
    clients = [args.only] if args.only else ["confguard", "minimal"]
    results: dict[str, Any] = {"bench": "budget_burst", "conferences": args.conferences,
                               "gap_ms": args.gap_ms, "budget_per_minute": args.budget}
    cpus = _pin_cpus() if args.pin else None
    if cpus is not None:
        _pin(0, cpus[1])  # this process: confguard (threads made later inherit it)
        results["pinned"] = {"sandbox": cpus[0], "clients": cpus[1]}
    async with _common.SandboxProcess(sandbox_process, args.budget) as remote:
        try:
            info = remote.info
            if cpus is not None:
                _pin(remote.proc.pid, cpus[0])
            if "minimal" in clients:
                mhere, mthere = ctx.Pipe()
                mproc = ctx.Process(target=minimal_process, daemon=True,
                                    args=(mthere, info["base"], info["minimal_id"],
                                          info["minimal_secret"], info["queue"], args.hops))
                mproc.start()
                if not await asyncio.get_running_loop().run_in_executor(None, mhere.poll, 30.0):
                    raise TimeoutError("minimal client did not start")
                mhere.recv()
                if cpus is not None:
                    _pin(mproc.pid, cpus[1])
            burst = {"op": "burst", "n": args.conferences, "gap": args.gap_ms / 1000.0,
                     "settle": args.settle, "clients": clients}
            if "confguard" in clients:
                await _with_daemon(args, info, remote, burst, results)
            else:
                await remote.ask({"op": "setup", "conferences": args.conferences})
                await asyncio.sleep(1.0)
                results.update(await remote.ask(burst))
        finally:
            await remote.close()  # first: the minimal client's socket ends with the sandbox
            if mproc is not None and args.hops and "minimal" in results and await asyncio.get_running_loop(
                    ).run_in_executor(None, mhere.poll, 10.0):
                own = mhere.recv().get("on_message_to_written_ms") or []
                if own:
                    results["minimal"]["on_message_to_written_ms"] = {
                        "p50": round(_common.pct(own, 0.5), 4), "p99": round(_common.pct(own, 0.99), 4),
                        "n": len(own)}
            if mproc is not None:
                _common.end_process(mproc, 5.0)
    c, m = results.get("confguard"), results.get("minimal")
    if c and m and c.get("p99_ms") and m.get("p99_ms"):
        results["ratio_p99"] = round(c["p99_ms"] / m["p99_ms"], 2)
    results["target"] = "confguard p99 <= 1.5 x minimal p99, 0 x 429"
    return results


async def _with_daemon(args: argparse.Namespace, info: dict[str, Any],
                       remote: _common.SandboxProcess, burst: dict[str, Any],
                       results: dict[str, Any]) -> None:
    """confguard's side of a run: the real Daemon in this process through the burst."""
    from daemon.config import load_config
    from daemon.service.lifecycle import Daemon

    with _common.daemon_folder() as tmp:
        path = _common.config_for_sandbox(
            tmp, info, n_rules=6, queues=[QUEUE],
            overrides={"safety.max_disconnects_per_minute": 1_000_000, "logging.level": "warning",
                       **dict(_setting(x) for x in args.set)})
        # Before the Daemon is made: the stream keeps the bound `_on_message`.
        probe = _hops.install() if args.hops else None
        daemon = Daemon(load_config(path), config_path=path)
        await daemon.start()
        try:
            await remote.ask({"op": "setup", "conferences": args.conferences})
            results["tracked_by_daemon"] = await _common.wait_tracked(daemon, args.conferences, 60)
            await asyncio.sleep(1.0)
            profiler = _profiler(args.profile)
            try:
                r = await remote.ask({**burst, "raw": probe is not None})
            finally:
                if profiler is not None:
                    profiler.stop()
                    Path(args.profile).write_text(profiler.output_text(show_all=False))
                    results["profile"] = args.profile
                if probe is not None:
                    probe.uninstall()
            raw = r.pop("raw", None)
            if probe is not None and raw:
                results["hops"] = _hops.breakdown(
                    probe.rows(), {c: ev for c, ev, _ in raw},
                    {c: ns for c, _, ns in raw if ns is not None})
            assert daemon.client is not None
            snap = daemon.client.limiter.snapshot()
            r["confguard"]["learnt_allowed"] = snap.allowed
            r["confguard"]["learnt"] = snap.learnt
            r["confguard"]["rate_limited_seen"] = dict(snap.rate_limited)
            results.update(r)
        finally:
            await daemon.stop()
        # confguard's own share: frame received -> PATCH about to be sent (its audit).
        inside = _common.in_daemon_ms(tmp / "audit.jsonl", (0.5, 0.99))
        if inside and "confguard" in results:
            results["confguard"]["in_daemon_ms"] = inside


def _pin_cpus() -> tuple[int, int]:
    """(the sandbox's CPU, the clients' CPU): the first two this process may run on."""
    import os

    allowed = sorted(os.sched_getaffinity(0))
    if len(allowed) < 2:
        raise SystemExit("--pin needs two CPUs")
    return allowed[0], allowed[1]


def _pin(pid: int, cpu: int) -> None:
    """Pin every thread of process `pid` (0: this one) to `cpu`; threads made later
    inherit it."""
    import os

    real = pid or os.getpid()
    for tid in os.listdir(f"/proc/{real}/task"):
        os.sched_setaffinity(int(tid), {cpu})


def _profiler(path: str | None) -> Any:
    """A started pyinstrument Profiler (1 ms sampling) when `path` is given, else None."""
    if not path:
        return None
    from pyinstrument import Profiler

    prof = Profiler(interval=0.001, async_mode="disabled")
    prof.start()
    return prof


def summary(r: dict[str, Any]) -> str:
    lines = [f"burst: {r['conferences']} conferences, customers flagged {r['gap_ms']} ms apart, "
             f"sandbox budget {r['budget_per_minute']}/min, load {r.get('load')}"]
    for who in ("confguard", "minimal"):
        x = r.get(who) or {}
        lines.append(f"  {who:<10} patched {x.get('patched')}/{r.get('flags')}  p50 "
                     f"{_common.fmt(x.get('p50_ms'), 1)} p99 {_common.fmt(x.get('p99_ms'), 1)} max {_common.fmt(x.get('max_ms'), 1)} ms  "
                     f"429s {x.get('status_429')}  requests {x.get('statuses')}"
                     + (f"  learnt allowance {x.get('learnt_allowed')}" if who == "confguard" else ""))
    if "in_daemon_ms" in (r.get("confguard") or {}):
        lines.append(f"  confguard in-daemon (frame received -> PATCH sent): {r['confguard']['in_daemon_ms']}")
    if "ratio_p99" in r:
        lines.append(f"  confguard p99 / minimal p99 = {r['ratio_p99']}")
    h = r.get("hops") or {}
    if h.get("n"):
        lines.append(f"  hops (p50 ms since the previous one, {h['n']} removals): "
                     + ", ".join(f"{k} {v['p50']:.3f}" for k, v in h["hops_ms"].items()))
        lines.append(f"  frame handed over -> PATCH written: {h['on_message_to_written_ms']}; "
                     f"the minimal client's own: "
                     f"{(r.get('minimal') or {}).get('on_message_to_written_ms')}")
    return "\n".join(lines)


def _setting(text: str) -> tuple[str, Any]:
    """`--set dotted.key=VALUE` (VALUE read as YAML: 1, true, 5s, ...) -> (key, value)."""
    import yaml

    key, sep, value = text.partition("=")
    if not sep or not key:
        raise SystemExit(f"--set wants dotted.key=value, got {text!r}")
    return key.strip(), yaml.safe_load(value)


def _one_run(root: Path, args: argparse.Namespace, sets: list[str],
             only: str | None = None) -> dict[str, Any]:
    """One single-run of this script in its own process (a fresh sandbox and interpreter),
    with the daemon's code taken from `root` (CONFGUARD_BENCH_ROOT) and `sets` as --set;
    `only`: that client alone, pinned (`--only ... --pin`)."""
    import os
    import subprocess

    cmd = [sys.executable, str(Path(__file__).resolve()), "--json",
           "--conferences", str(args.conferences), "--gap-ms", str(args.gap_ms),
           "--budget", str(args.budget), "--settle", str(args.settle)]
    cmd += [a for x in sets for a in ("--set", x)]
    if args.hops:
        cmd.append("--hops")
    if only:
        cmd += ["--only", only, "--pin"]
    env = {**os.environ, "CONFGUARD_BENCH_ROOT": str(root)}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600,
                          check=False)
    if done.returncode != 0:
        raise SystemExit(f"run failed ({root}, {sets}):\n{done.stderr[-3000:]}")
    out: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return out


def _med(values: list[float]) -> float | None:
    xs = sorted(v for v in values if v is not None)
    if not xs:
        return None
    mid = len(xs) // 2
    return round(xs[mid] if len(xs) % 2 else (xs[mid - 1] + xs[mid]) / 2, 3)


def _aggregate(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Median (and min-max) over `runs` of the figures that decide the target."""
    def col(*path: str) -> list[float]:
        out = []
        for r in runs:
            x: Any = r
            for k in path:
                x = x.get(k) if isinstance(x, dict) else None
            if isinstance(x, (int, float)):
                out.append(float(x))
        return out

    ratios = col("ratio_p99")
    agg: dict[str, Any] = {
        "runs": len(runs),
        "ratio_p99": {"median": _med(ratios), "min": min(ratios, default=None),
                      "max": max(ratios, default=None), "all": ratios},
        "confguard_p50_ms": _med(col("confguard", "p50_ms")),
        "confguard_p99_ms": _med(col("confguard", "p99_ms")),
        "minimal_p50_ms": _med(col("minimal", "p50_ms")),
        "minimal_p99_ms": _med(col("minimal", "p99_ms")),
        "in_daemon_p50_ms": _med(col("confguard", "in_daemon_ms", "p50")),
        "in_daemon_p99_ms": _med(col("confguard", "in_daemon_ms", "p99")),
        "patched": [r.get("confguard", {}).get("patched") for r in runs],
        "status_429": [r.get("confguard", {}).get("status_429") for r in runs],
        "load": [r.get("load") for r in runs],
    }
    hops = [r["hops"] for r in runs if r.get("hops", {}).get("n")]
    if hops:
        agg["hops_p50_ms"] = {h: _med([x["hops_ms"][h]["p50"] for x in hops if h in x["hops_ms"]])
                              for h in hops[0]["hops_ms"]}
        agg["hops_order"] = [x["order"] for x in hops]
        agg["on_message_to_written_p50_ms"] = _med(
            [x["on_message_to_written_ms"]["p50"] for x in hops])
        agg["minimal_on_message_to_written_p50_ms"] = _med(
            col("minimal", "on_message_to_written_ms", "p50"))
    return agg


def alternate(args: argparse.Namespace) -> dict[str, Any]:
    """`--runs N` rounds; each round one run of this tree (A) and, with `--against DIR` or
    `--b-set`, one of variant B (DIR's daemon code and/or other settings), in alternating
    order (A B, B A, ...) so that the shared machine's drift hits both alike."""
    here = _common.ROOT
    variants = {"A": (here, list(args.set))}
    if args.against or args.b_set:
        root_b = Path(args.against).resolve() if args.against else here
        variants["B"] = (root_b, list(args.set) + list(args.b_set))
    runs: dict[str, list[dict[str, Any]]] = {k: [] for k in variants}
    for i in range(args.runs):
        order = list(variants) if i % 2 == 0 else list(reversed(variants))
        for k in order:
            r = _solo_pair(variants[k][0], args, variants[k][1], i) if args.solo \
                else _one_run(variants[k][0], args, variants[k][1])
            runs[k].append(r)
            print(f"round {i + 1} {k}: ratio {r.get('ratio_p99')} confguard p99 "
                  f"{_common.fmt(r.get('confguard', {}).get('p99_ms'), 2)} minimal p99 "
                  f"{_common.fmt(r.get('minimal', {}).get('p99_ms'), 2)} in-daemon "
                  f"{(r.get('confguard') or {}).get('in_daemon_ms')} load {r.get('load')}",
                  file=sys.stderr, flush=True)
    return {"bench": "budget_burst", "conferences": args.conferences, "gap_ms": args.gap_ms,
            "budget_per_minute": args.budget, "rounds": args.runs,
            "variants": {k: {"root": str(v[0]), "set": v[1], **_aggregate(runs[k]),
                             "each": runs[k]} for k, v in variants.items()},
            "target": "median ratio_p99 <= 1.5"}


def _solo_pair(root: Path, args: argparse.Namespace, sets: list[str], i: int) -> dict[str, Any]:
    """One `--solo` round of one variant: confguard alone and the minimal client alone,
    each pinned beside the sandbox (order alternated by round), as one result."""
    order = ["confguard", "minimal"] if i % 2 == 0 else ["minimal", "confguard"]
    got = {who: _one_run(root, args, sets, only=who) for who in order}
    r = got["confguard"]
    r["minimal"] = got["minimal"]["minimal"]
    c, m = r["confguard"].get("p99_ms"), r["minimal"].get("p99_ms")
    if c and m:
        r["ratio_p99"] = round(c / m, 2)
    r["solo"] = True
    return r


def alternate_summary(r: dict[str, Any]) -> str:
    lines = [f"burst x{r['rounds']} rounds: {r['conferences']} conferences, {r['gap_ms']} ms apart, "
             f"sandbox budget {r['budget_per_minute'] or 'off (no inin-ratelimit-* headers)'}"]
    for k, v in r["variants"].items():
        rat = v["ratio_p99"]
        lines.append(f"  {k} ({v['root']} {' '.join(v['set'])}): p99 ratio median {rat['median']} "
                     f"(range {rat['min']}-{rat['max']}, all {rat['all']})")
        lines.append(f"     confguard p50/p99 {v['confguard_p50_ms']}/{v['confguard_p99_ms']} ms, "
                     f"minimal {v['minimal_p50_ms']}/{v['minimal_p99_ms']} ms, in-daemon p50/p99 "
                     f"{v['in_daemon_p50_ms']}/{v['in_daemon_p99_ms']} ms, patched {v['patched']}, "
                     f"429s {v['status_429']}")
        if "hops_p50_ms" in v:
            lines.append(f"     hops p50 ms {v['hops_p50_ms']}; frame -> written p50 "
                         f"{v['on_message_to_written_p50_ms']} (the minimal client's own: "
                         f"{v.get('minimal_on_message_to_written_p50_ms')})")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--conferences", type=int, default=200)
    ap.add_argument("--gap-ms", type=float, default=10.0)
    ap.add_argument("--budget", type=int, default=300,
                    help="sandbox requests per token per 60 s; 0: no budget (no inin-ratelimit-* headers)")
    ap.add_argument("--settle", type=float, default=90.0, help="seconds to wait for the PATCHes")
    ap.add_argument("--smoke", action="store_true", help="10 conferences: check the script runs")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="a daemon config setting (dotted key, YAML value); repeatable")
    ap.add_argument("--hops", action="store_true",
                    help="per-hop timestamps of confguard's path (bench/_hops.py), and the "
                         "minimal client's own frame -> PATCH written")
    ap.add_argument("--profile", metavar="FILE", help="pyinstrument profile of the burst to FILE")
    ap.add_argument("--runs", type=int, default=1,
                    help="rounds, each in its own process: medians and spread (>= 5 to judge)")
    ap.add_argument("--against", metavar="DIR",
                    help="alternate each round with the daemon code in DIR (e.g. a git archive "
                         "of the commit before)")
    ap.add_argument("--b-set", action="append", default=[], metavar="KEY=VALUE",
                    help="settings of the alternated variant B (with or without --against)")
    ap.add_argument("--only", choices=["confguard", "minimal"],
                    help="run this client alone (the other's parties are left in the calls)")
    ap.add_argument("--pin", action="store_true",
                    help="the sandbox on the first allowed CPU, the client(s) on the second "
                         "(Linux sched_setaffinity)")
    ap.add_argument("--solo", action="store_true",
                    help="with --runs: each round runs each client alone and pinned "
                         "(--only ... --pin), the ratio taken between the two")
    args = ap.parse_args()
    if args.smoke:
        args.conferences, args.settle = 10, 15.0
    if args.runs > 1 or args.against or args.b_set or args.solo:
        r = alternate(args)
        print(json.dumps(r) if args.json else alternate_summary(r))
        return
    r = asyncio.run(run(args))
    print(json.dumps(r) if args.json else summary(r))


if __name__ == "__main__":
    main()
