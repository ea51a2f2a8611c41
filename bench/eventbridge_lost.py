"""A breaking event lost on the WebSocket: time to removal with the EventBridge queue and
without it (reconciliation only), side by side in one run, at 1,000 and 5,000 live calls.

    .venv/bin/python bench/eventbridge_lost.py [--calls 1000] [--conference-share 0.2]
                                               [--scale 100] [--minutes 40] [--lost 10]
                                               [--eb-delay 1.0] [--smoke] [--json]

One sandbox (child process) publishes every change of its world as Genesys detail events
into a real SQS queue (moto's server, a child process on 127.0.0.1), `--eb-delay` seconds
after the WebSocket, as EventBridge would. It holds `--calls` live calls in each of two
queues, `--conference-share` of them conferences (customer, agent, external):

- **with the queue**: daemon W (in this process, real clock, today's defaults) subscribes
  to queue "EventBridge" and consumes the SQS queue (`eventbridge:`). Its detail events
  are org-wide, so it also sees every event of the other queue's calls (out of scope).
- **without** (reconciliation only): daemon R (in this process) subscribes to queue
  "Reconcile" with no `eventbridge:` section, reconciling with today's defaults
  (`reconcile_interval` 300 s, `reconcile_share` 0.25, 300 requests/min) in COMPRESSED
  TIME exactly as bench/budget_reconcile.py does (its clock, the reconciler's and the
  limiter's window x`--scale`; figures reported in scaled seconds). Compressing the queue
  side would scale its real REST and SQS round trips by the same factor, so W runs on the
  real clock and its figures are real seconds.

After one (scaled) reconcile interval of warm-up, `--lost` times for each side, alternated
at random moments over the same window, a conference's external party gets
`complianceFlag: "true"`: for W that change is lost on the WebSocket only (the queue has
it), for R it is lost everywhere. Each daemon has its own OAuth client, so the sandbox's
journal tells whose request was whose. Background: every 0.5 s a harmless attribute
changes on a random call of each queue (delivered everywhere: its detail event must cost
W nothing). Reported: time to removal (flag -> PATCH received; for W also message sent to
SQS -> PATCH), extra GETs per lost event, and W's GETs on calls with no lost event
(requests spent on detail events the state already showed: goal 0).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import random
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common  # noqa: E402

EB_QUEUE, REC_QUEUE = "EventBridge", "Reconcile"
EB_CLIENT, REC_CLIENT = ("bench-eventbridge", "secret-eb"), ("bench-reconcile", "secret-rec")
AWS_ENV = {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "eu-west-1",
           "AWS_REGION": "eu-west-1", "AWS_EC2_METADATA_DISABLED": "true",
           "AWS_CONFIG_FILE": "/nonexistent/confguard-bench", "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent/confguard-bench"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def moto_process() -> Iterator[str]:
    """moto's server in a child process on 127.0.0.1; yields its endpoint URL."""
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
                break
            if time.monotonic() > deadline or proc.poll() is not None:
                raise RuntimeError("moto server did not start")
            time.sleep(0.1)
        yield url
    finally:
        proc.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(10)
        if proc.poll() is None:
            proc.kill()


def sandbox_process(conn: Connection, queue_url: str, endpoint: str, delay: float,
                    kinds: list[str] | None) -> None:
    os.environ.update(AWS_ENV)
    _common.run_quietly(_sandbox_main, conn, queue_url, endpoint, delay, kinds)


class _World:
    """The sandbox side of the bench: the two queues' calls, the lost events, the report."""

    def __init__(self, sb: Any) -> None:
        w = sb.world
        self.sb, self.w = sb, w
        self.queues = {"eb": w.create_queue(EB_QUEUE).id, "rec": w.create_queue(REC_QUEUE).id}
        self.users = [w.create_user(f"Agent {i}").id for i in range(100)]
        self.confs: dict[str, list[tuple[str, str]]] = {"eb": [], "rec": []}
        self.calls: dict[str, list[str]] = {"eb": [], "rec": []}
        self.lost: list[dict[str, Any]] = []
        self.rng = random.Random(13)

    async def setup(self, cmd: dict[str, Any]) -> Any:
        w = self.w
        for side, qid in self.queues.items():
            for i in range(cmd["calls"]):
                conv = w.start_call(qid, ani=f"tel:+1415{i:07d}")
                w.connect_agent(conv.id, self.users[i % len(self.users)])
                self.calls[side].append(conv.id)
                if i < cmd["conferences"]:
                    self.confs[side].append((conv.id, w.add_external(conv.id, f"tel:+1212{i:07d}").id))
                if i % 200 == 0:
                    await asyncio.sleep(0)  # let the sockets and the SQS sender run
            self.rng.shuffle(self.confs[side])
        return len(w.active_calls())

    async def queued(self, cmd: dict[str, Any]) -> Any:
        eb = self.sb.eventbridge
        return {"pending": eb.pending, "sent": eb.stats.sent}

    async def mark(self, cmd: dict[str, Any]) -> Any:
        reqs = self.sb.journal.requests
        return reqs[-1].seq if reqs else 0

    async def lose_one(self, cmd: dict[str, Any]) -> Any:
        side = cmd["side"]
        cid, ext = self.confs[side].pop()
        self.sb.faults.lose_change("websocket" if side == "eb" else "both", cid)
        at = time.time()
        self.w.set_attributes(cid, ext, {"complianceFlag": "true"})
        self.lost.append({"side": side, "cid": cid, "flagged_at": at,
                          "path": f"/api/v2/conversations/calls/{cid}/participants/{ext}"})
        return True

    async def background(self, cmd: dict[str, Any]) -> Any:
        for side in ("eb", "rec"):
            cid = self.rng.choice(self.calls[side])
            conv = self.w.calls.get(cid)
            if conv is not None and conv.end is None:
                self.w.set_attributes(cid, conv.participants[0].id, {"note": str(self.rng.random())})
        return True

    async def report(self, cmd: dict[str, Any]) -> Any:
        since, requests = cmd["since"], list(self.sb.journal.requests)
        first: dict[str, float] = {}
        for r in requests:
            if r.method == "PATCH":
                first.setdefault(r.path, r.time)
        eb = self.sb.eventbridge
        sent_at = {cid: t for t, cid, kind in eb.stats.sent_log if kind == "attributes"}  # the last: the flag
        for x in self.lost:
            client = EB_CLIENT[0] if x["side"] == "eb" else REC_CLIENT[0]
            x["patched_at"] = first.get(x["path"])
            x["queue_sent_at"] = sent_at.get(x["cid"]) if x["side"] == "eb" else None
            x["gets"] = sum(1 for r in requests if r.method == "GET" and r.client_id == client
                            and f"/calls/{x['cid']}" in r.path and r.time >= x["flagged_at"])
        lost_cids = {x["cid"] for x in self.lost}
        later = [r for r in requests if r.seq > since and r.method == "GET"]
        eb_other = sum(1 for r in later if r.client_id == EB_CLIENT[0] and "/conversations/calls/" in r.path
                       and r.path.rsplit("/", 1)[-1] not in lost_cids)
        rec_gets = sum(1 for r in later if r.client_id == REC_CLIENT[0])
        return {"lost": self.lost, "eb_gets_on_other_calls": eb_other, "rec_gets": rec_gets,
                "sqs_sent": eb.stats.sent, "sqs_send_errors": eb.stats.send_errors}


async def _sandbox_main(conn: Connection, queue_url: str, endpoint: str, delay: float,
                        kinds: list[str] | None) -> None:
    from daemon.sandbox import Sandbox

    sb = Sandbox(heartbeat_interval=30.0, request_budget=None, seed=13, eventbridge_queue_url=queue_url,
                 eventbridge_endpoint_url=endpoint, eventbridge_kinds=kinds)
    sb.faults.eventbridge_delay = delay
    for cid, secret in (EB_CLIENT, REC_CLIENT):
        sb.world.add_client(cid, secret)
    await sb.start()
    world = _World(sb)
    conn.send(_common.sandbox_hello(sb))
    loop = asyncio.get_running_loop()
    ops = {"setup": world.setup, "queued": world.queued, "mark": world.mark, "lose_one": world.lose_one,
           "background": world.background, "report": world.report}
    while True:
        cmd = await loop.run_in_executor(None, conn.recv)
        op = ops.get(cmd["op"])
        if op is None:
            await sb.stop()
            conn.send(True)
            return
        conn.send(await op(cmd))


async def run(args: argparse.Namespace) -> dict[str, Any]:
    os.environ.update(AWS_ENV)
    from daemon.config import load_config
    from daemon.service.eventbridge import EventBridgeSource
    from daemon.service.lifecycle import Daemon

    scale = float(args.scale)
    scaled = _common.scaled_clock(scale)
    interval, share, allowed = 300.0, 0.25, 300
    n_conf = round(args.calls * args.conference_share)
    results: dict[str, Any] = {"bench": "eventbridge_lost", "calls": args.calls, "conferences": n_conf,
                               "scale": scale, "minutes": args.minutes, "eb_delay_s": args.eb_delay,
                               "lost_per_side": args.lost, "machine": _common.machine()}
    rng = random.Random(args.seed)
    with moto_process() as endpoint:
        import boto3

        sqs = boto3.client("sqs", region_name="eu-west-1", endpoint_url=endpoint)
        queue_url = sqs.create_queue(QueueName="confguard-bench", Attributes={"VisibilityTimeout": "60"})["QueueUrl"]
        kinds = None if args.kinds == "all" else args.kinds.split(",")
        results["topic_filter"] = args.kinds
        async with _common.SandboxProcess(sandbox_process, queue_url, endpoint, args.eb_delay, kinds,
                                          ask_timeout=1200) as remote:
            info = remote.info
            with _common.daemon_folder() as tmp:
                base = {"logging.level": "warning", "subscriptions.resync_on_start": False,
                        "safety.max_disconnects_per_minute": 1_000_000}
                path_w = _common.config_for_sandbox(
                    tmp / "w", info, n_rules=1, queues=[EB_QUEUE],
                    overrides={**base, "eventbridge": {"queue_url": queue_url, "endpoint_url": endpoint,
                                                       "wait_seconds": 20}})
                path_r = _common.config_for_sandbox(
                    tmp / "r", info, n_rules=1, queues=[REC_QUEUE],
                    overrides={**base, "subscriptions.reconcile_interval": 0})
                os.environ["GENESYSCLOUD_OAUTHCLIENT_ID"], os.environ["GENESYSCLOUD_OAUTHCLIENT_SECRET"] = EB_CLIENT
                dw = Daemon(load_config(path_w), config_path=path_w)
                await dw.start()
                os.environ["GENESYSCLOUD_OAUTHCLIENT_ID"], os.environ["GENESYSCLOUD_OAUTHCLIENT_SECRET"] = REC_CLIENT
                dr = Daemon(load_config(path_r), config_path=path_r, clock=scaled)
                await dr.start()
                stop = asyncio.Event()
                task: asyncio.Task[None] | None = None
                try:
                    setup0 = time.monotonic()
                    await remote.ask({"op": "setup", "calls": args.calls, "conferences": n_conf})
                    results["tracked_with_queue"] = await _common.wait_tracked(dw, args.calls, 300)
                    results["tracked_without"] = await _common.wait_tracked(dr, args.calls, 300)
                    # the setup's detail events (all already shown by the WebSocket) drain first
                    src = next(s for s in dw.sources if isinstance(s, EventBridgeSource))
                    q: dict[str, int] = {"sent": 0, "pending": 0}
                    for _ in range(6000):
                        q = await remote.ask({"op": "queued"})
                        if q["pending"] == 0 and src.counts["deleted"] >= q["sent"]:
                            break
                        await asyncio.sleep(0.1)
                    results["setup_s"] = round(time.monotonic() - setup0, 1)
                    results["setup_sqs_messages"] = q["sent"]
                    since = await remote.ask({"op": "mark"})
                    skipped0 = dict(src.decider.counts)
                    # the reconciler's clock moves on from here: its calls were all learnt before
                    rec, limiter, task = _common.start_compressed_reconciler(
                        dr, scaled, stop, scale=scale, interval=interval, share=share, allowed=allowed)
                    start_real = time.monotonic()
                    run_real = args.minutes * 60.0 / scale
                    warm_real = interval / scale
                    moments = sorted(rng.uniform(warm_real, run_real * 0.8) for _ in range(2 * args.lost))
                    sides = ["eb", "rec"] * args.lost
                    next_bg = start_real
                    granted0 = limiter.granted["tag:reconcile"]
                    while time.monotonic() - start_real < run_real:
                        el = time.monotonic() - start_real
                        if moments and el >= moments[0]:
                            moments.pop(0)
                            await remote.ask({"op": "lose_one", "side": sides.pop(0)})
                        if time.monotonic() >= next_bg:
                            next_bg += 0.5
                            await remote.ask({"op": "background"})
                        await asyncio.sleep(0.01)
                    await asyncio.sleep(3 * args.eb_delay + 2)  # the last queue messages
                    results["reconcile_reads"] = limiter.granted["tag:reconcile"] - granted0
                    results["decider"] = {k: v - skipped0.get(k, 0) for k, v in src.decider.counts.items()}
                    results["source_counts"] = dict(src.counts)
                finally:
                    await _common.end_task(stop, task)
                    await dw.stop()
                    await dr.stop()
            rep = await remote.ask({"op": "report", "since": since})
    sides_out: dict[str, Any] = {}
    for side, factor in (("eb", 1.0), ("rec", scale)):
        xs = [x for x in rep["lost"] if x["side"] == side]
        times = [round((x["patched_at"] - x["flagged_at"]) * factor, 2) for x in xs if x["patched_at"] is not None]
        out: dict[str, Any] = {"lost": len(xs), "found": len(times), "to_removal_s": times,
                               "p50_s": _common.pct(times, 0.5) if times else None,
                               "max_s": max(times) if times else None,
                               "gets_per_lost_event": [x["gets"] for x in xs]}
        if side == "eb":
            arr = [round(x["patched_at"] - x["queue_sent_at"], 3) for x in xs
                   if x["patched_at"] is not None and x["queue_sent_at"] is not None]
            out["from_queue_arrival_s"] = arr
            out["from_queue_arrival_max_s"] = max(arr) if arr else None
        sides_out["with_queue" if side == "eb" else "without_queue"] = out
    results.update(sides_out)
    results["without_queue"]["reconcile_reads_per_found"] = (
        round(results["reconcile_reads"] / results["without_queue"]["found"], 1)
        if results["without_queue"]["found"] else None)
    results["gets_on_reflected_events"] = rep["eb_gets_on_other_calls"]
    results["sqs_messages"] = rep["sqs_sent"]
    results["sqs_send_errors"] = rep["sqs_send_errors"]
    results["load"] = _common.load()
    return results


def summary(r: dict[str, Any]) -> str:
    w, o = r["with_queue"], r["without_queue"]
    return "\n".join([
        f"lost breaking events: {r['calls']} live calls per side ({r['conferences']} conferences), "
        f"EventBridge delay {r['eb_delay_s']} s, load {r['load']}",
        f"  with the queue: found {w['found']}/{w['lost']}, flag -> PATCH p50 {w['p50_s']} s max {w['max_s']} s "
        f"(queue arrival -> PATCH max {w['from_queue_arrival_max_s']} s); GETs per lost event "
        f"{w['gets_per_lost_event']}",
        f"  without (reconciliation, x{r['scale']} compressed): found {o['found']}/{o['lost']}, p50 {o['p50_s']} s "
        f"max {o['max_s']} s; reconcile reads per found event {o['reconcile_reads_per_found']}",
        f"  GETs on detail events the state already showed: {r['gets_on_reflected_events']}; decider "
        f"{r['decider']}"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--calls", type=int, default=1000, help="live calls per side")
    ap.add_argument("--conference-share", type=float, default=0.2)
    ap.add_argument("--scale", type=float, default=100.0, help="time compression of the reconciliation side")
    ap.add_argument("--minutes", type=float, default=40.0, help="scaled minutes to run")
    ap.add_argument("--lost", type=int, default=10, help="lost breaking events per side")
    ap.add_argument("--eb-delay", type=float, default=1.0, help="seconds EventBridge lags the WebSocket")
    ap.add_argument("--kinds", default="attributes",
                    help="detail kinds the integration publishes (its topic filter), comma-separated, or "
                         "'all' (default attributes: moto's receive costs ~80 ms a message on a loaded "
                         "2-core machine, too slow for every start/end event of 10,000 calls)")
    ap.add_argument("--seed", type=int, default=7)
    _common.run_cli(ap, run, summary, smoke_help="50 calls a side, 6 scaled minutes, 1 event a side",
                    smoke={"calls": 50, "minutes": 6.0, "lost": 1})


if __name__ == "__main__":
    main()
