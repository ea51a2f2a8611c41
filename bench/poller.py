"""The vendor-tutorial approach, written honestly: poll every call once a second over REST
and PATCH the party away when the condition holds.

    .venv/bin/python bench/poller.py --base http://127.0.0.1:PORT --client-id ID \
        --secret SECRET --calls ids.txt [--seconds 60] [--interval 1.0] [--concurrency 64]

What it does (and what a tutorial script does): an OAuth client-credentials token; for each
conversation id it knows of, `GET /api/v2/conversations/calls/{id}` every `--interval`
seconds (the polls of one round are spread evenly over the interval, at most
`--concurrency` in flight); when a connected customer or external party carries participant
data `complianceFlag` = "true" (the shipped `flagged-party` rule), `PATCH
/api/v2/conversations/calls/{id}/participants/{pid}` `{"state": "disconnected"}` once.
429: honour Retry-After (every poll waits until then, like the SDK's retry). 401: get a new
token. Other errors: counted, the call is polled again next round.

It learns of calls from the list it is given (a head start: a real one must also discover
them, e.g. with an analytics query, which costs more requests). Used by bench/removal.py,
which runs it against the same sandbox and scenario as the daemon.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

DISCONNECTED = {"state": "disconnected"}


def breaks_rule(party: dict[str, Any]) -> bool:
    """The shipped `flagged-party` rule, as a tutorial would write it."""
    return (party.get("purpose") in ("customer", "external") and party.get("state") == "connected"
            and (party.get("attributes") or {}).get("complianceFlag") == "true")


@dataclass
class PollerStats:
    gets: int = 0
    patches: int = 0
    statuses: Counter[int] = field(default_factory=Counter)
    errors: int = 0
    rounds: int = 0
    late_rounds: int = 0
    """Rounds that took longer than the interval (the poller could not keep up)."""
    paused_s: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return {"gets": self.gets, "patches": self.patches, "errors": self.errors,
                "statuses": {str(k): v for k, v in sorted(self.statuses.items())},
                "rounds": self.rounds, "late_rounds": self.late_rounds,
                "paused_s": round(self.paused_s, 1)}


class Poller:
    def __init__(self, base: str, client_id: str, secret: str, call_ids: Callable[[], list[str]], *,
                 interval: float = 1.0, concurrency: int = 64) -> None:
        self.base = base.rstrip("/")
        self.client_id = client_id
        self.secret = secret
        self.call_ids = call_ids
        self.interval = interval
        self.sem = asyncio.Semaphore(concurrency)
        self.token: str | None = None
        self.paused_until = 0.0
        self.removed: set[tuple[str, str]] = set()
        self.stats = PollerStats()
        self.http = httpx.AsyncClient(base_url=self.base, timeout=10.0,
                                      limits=httpx.Limits(max_connections=concurrency,
                                                          max_keepalive_connections=concurrency))

    async def login(self) -> None:
        r = await self.http.post("/oauth/token", data={"grant_type": "client_credentials"},
                                 auth=(self.client_id, self.secret))
        r.raise_for_status()
        self.token = r.json()["access_token"]

    async def _request(self, method: str, path: str, body: Any = None) -> httpx.Response | None:
        now = time.monotonic()
        if now < self.paused_until:
            await asyncio.sleep(self.paused_until - now)
        if self.token is None:
            await self.login()
        try:
            r = await self.http.request(method, path, json=body,
                                        headers={"Authorization": f"Bearer {self.token}"})
        except httpx.HTTPError:
            self.stats.errors += 1
            return None
        self.stats.statuses[r.status_code] += 1
        if r.status_code == 429:
            retry = float(r.headers.get("Retry-After", "1") or 1)
            until = time.monotonic() + retry
            if until > self.paused_until:  # wall time spent paused, not summed per waiter
                self.stats.paused_s += until - max(self.paused_until, time.monotonic())
                self.paused_until = until
            return None
        if r.status_code == 401:
            self.token = None
            return None
        return r

    async def poll_one(self, cid: str) -> None:
        async with self.sem:
            self.stats.gets += 1
            r = await self._request("GET", f"/api/v2/conversations/calls/{cid}")
            if r is None or r.status_code != 200:
                return
            conv = r.json()
            for p in conv.get("participants") or []:
                key = (cid, p.get("id"))
                if breaks_rule(p) and key not in self.removed:
                    self.stats.patches += 1
                    pr = await self._request("PATCH", f"/api/v2/conversations/calls/{cid}/participants/{p['id']}",
                                             DISCONNECTED)
                    if pr is not None and pr.status_code < 300:
                        self.removed.add(key)

    async def run(self, stop: asyncio.Event) -> PollerStats:
        """Poll rounds until `stop` is set (bounded by the caller's event)."""
        await self.login()
        pending: set[asyncio.Task[None]] = set()
        try:
            while not stop.is_set():
                start = time.monotonic()
                ids = self.call_ids()
                step = self.interval / max(1, len(ids))
                for n, cid in enumerate(ids):
                    if stop.is_set():
                        break
                    due = start + n * step
                    delay = due - time.monotonic()
                    if delay > 0:
                        await asyncio.sleep(delay)
                    t = asyncio.create_task(self.poll_one(cid))
                    pending.add(t)
                    t.add_done_callback(pending.discard)
                self.stats.rounds += 1
                rest = start + self.interval - time.monotonic()
                if rest > 0:
                    try:
                        await asyncio.wait_for(stop.wait(), rest)
                    except TimeoutError:
                        pass
                else:
                    self.stats.late_rounds += 1
        finally:
            for t in pending:
                t.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
            await self.http.aclose()
        return self.stats


async def _main(args: argparse.Namespace) -> None:
    ids = [line.strip() for line in Path(args.calls).read_text().splitlines() if line.strip()]
    stop = asyncio.Event()
    asyncio.get_running_loop().call_later(args.seconds, stop.set)
    p = Poller(args.base, args.client_id, args.secret, lambda: ids, interval=args.interval,
               concurrency=args.concurrency)
    stats = await p.run(stop)
    print(json.dumps({"removed": len(p.removed), **stats.as_dict()}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", required=True)
    ap.add_argument("--client-id", required=True)
    ap.add_argument("--secret", required=True)
    ap.add_argument("--calls", required=True, help="file with one conversation id a line")
    ap.add_argument("--seconds", type=float, default=60.0)
    ap.add_argument("--interval", type=float, default=1.0)
    ap.add_argument("--concurrency", type=int, default=64)
    asyncio.run(_main(ap.parse_args()))


if __name__ == "__main__":
    main()
