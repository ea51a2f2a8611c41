"""REST round trip: the HTTP library under confguard's GenesysClient (httpx) vs bare aiohttp.

    .venv/bin/python bench/rest_roundtrip.py [--requests 2000] [--rounds 3] [--smoke] [--json]

One aiohttp server in its own process on 127.0.0.1 answers every request 202 with the
`inin-ratelimit-*` headers. In this process, sequentially: `--requests` PATCHes
`{"state": "disconnected"}` with an httpx.AsyncClient built as GenesysClient builds its own
(one pool, explicit timeouts, default headers), then the same with an aiohttp.ClientSession
(the burst bench's minimal client). Reported per client: p50/p90 round trip in ms (request
call -> answer read) and `written_p50_ms` (request call -> the PATCH's first bytes handed to
the socket, `bench/_hops.watch_patch_writes`), the best of `--rounds`; and whether `sniffio` is importable: httpcore
(under httpx) looks it up 4 times a request, and when it is missing every lookup is a failed
import that searches sys.path again (bench/RESULTS.md, "Request budget"). `--smoke`: 50
requests, 1 round.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import multiprocessing as mp
import sys
import time
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common  # noqa: E402
import _hops  # noqa: E402

PATH = "/api/v2/conversations/calls/c1/participants/p1"
_CALLED = [0.0]  # perf_counter() when the current request was called
_WRITTEN: list[float] = []  # ms from the call to its first PATCH bytes on the socket, each


def _called() -> float:
    _CALLED[0] = t = time.perf_counter()
    return t


def _seen_written(cid: str) -> None:
    if _CALLED[0]:
        _WRITTEN.append((time.perf_counter() - _CALLED[0]) * 1000.0)
        _CALLED[0] = 0.0


BUDGET = {"inin-ratelimit-count": "1", "inin-ratelimit-allowed": "3000",
          "inin-ratelimit-reset": "60"}


def server_process(conn: Connection) -> None:
    _common.run_quietly(_server_main, conn)


async def _server_main(conn: Connection) -> None:
    from aiohttp import web

    async def answer(request: web.Request) -> web.Response:
        await request.read()
        return web.json_response({}, status=202, headers=BUDGET)

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", answer)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    conn.send(port)
    await asyncio.get_running_loop().run_in_executor(None, conn.recv)  # until told to stop
    await runner.cleanup()


async def _httpx(url: str, n: int, transport_name: str = "httpcore") -> list[float]:
    import httpx

    timeout = httpx.Timeout(connect=10.0, read=10.0, write=10.0, pool=10.0)
    transport: httpx.AsyncBaseTransport | None = None  # httpx's own: httpcore on anyio
    if transport_name == "httpx_aiohttp":
        from httpx_aiohttp import AiohttpTransport

        transport = AiohttpTransport()
    elif transport_name == "confguard":
        from daemon.genesys.transport import default_transport

        transport = default_transport()
    out: list[float] = []
    async with httpx.AsyncClient(timeout=timeout, follow_redirects=False, transport=transport,
                                 headers={"User-Agent": "confguard/0.1",
                                          "Accept": "application/json"}) as c:
        for i in range(n + 20):  # the first 20 warm the pool
            t = _called()
            r = await c.request("PATCH", url, json={"state": "disconnected"},
                                headers={"Authorization": "Bearer x"})
            r.raise_for_status()
            if i >= 20:
                out.append((time.perf_counter() - t) * 1000.0)
    return out


async def _httpx_aiohttp(url: str, n: int) -> list[float]:
    """httpx over the `httpx-aiohttp` package's AiohttpTransport (not a dependency: skipped
    when it is not installed)."""
    return await _httpx(url, n, "httpx_aiohttp")


async def _httpx_confguard(url: str, n: int) -> list[float]:
    """httpx over confguard's own transport (`daemon.genesys.transport.default_transport()`:
    `Http11Transport`; `AiohttpTransport` in trees before it)."""
    return await _httpx(url, n, "confguard")


async def _genesys(url: str, n: int, ha: bool = False) -> list[float]:
    """The whole of confguard's client: `GenesysClient.disconnect_participant` (limiter slot,
    token, retry policy, metrics hook, the transport GenesysClient picks) against the
    same server; the token comes from a MockTransport-free stub (no OAuth round trip).
    `ha`: with a `send_budget` (as an HA leader sends: the body's write bounded by the
    lease; 30 s here, never reached)."""
    from daemon.config import Credentials, GenesysSettings
    from daemon.genesys.api import GenesysClient

    origin = url.split("/api/v2/", 1)[0]
    settings = GenesysSettings(api_base_url=origin, login_base_url=origin)
    client = GenesysClient(settings, Credentials(client_id="x", client_secret="y"))

    async def token() -> str:
        return "x"

    client.tokens.token = token  # type: ignore[method-assign]
    out: list[float] = []
    extra: dict[str, Any] = {"send_budget": lambda: 30.0} if ha else {}
    async with client:
        for i in range(n + 20):
            t = _called()
            await client.disconnect_participant("c1", "p1", **extra)
            if i >= 20:
                out.append((time.perf_counter() - t) * 1000.0)
    return out


async def _genesys_ha(url: str, n: int) -> list[float]:
    """`_genesys` as an HA leader sends (`send_budget`)."""
    return await _genesys(url, n, ha=True)


async def _aiohttp(url: str, n: int) -> list[float]:
    import aiohttp

    out: list[float] = []
    async with aiohttp.ClientSession() as s:
        for i in range(n + 20):
            t = _called()
            async with s.patch(url, json={"state": "disconnected"},
                               headers={"Authorization": "Bearer x"}) as r:
                await r.read()
                r.raise_for_status()
            if i >= 20:
                out.append((time.perf_counter() - t) * 1000.0)
    return out


async def run(args: argparse.Namespace) -> dict[str, Any]:
    ctx = mp.get_context("spawn")
    here, there = ctx.Pipe()
    proc = ctx.Process(target=server_process, args=(there,), daemon=True)
    proc.start()
    try:
        if not await asyncio.get_running_loop().run_in_executor(None, here.poll, 30.0):
            raise TimeoutError("server did not start")
        url = f"http://127.0.0.1:{here.recv()}{PATH}"
        best: dict[str, dict[str, float]] = {}
        probe = _hops.Probe()
        _hops.watch_patch_writes(probe, _seen_written)
        fns = {"httpx": _httpx, "httpx_aiohttp": _httpx_aiohttp,
               "httpx_confguard": _httpx_confguard, "genesys": _genesys,
               "genesys_ha": _genesys_ha, "aiohttp": _aiohttp}
        if importlib.util.find_spec("httpx_aiohttp") is None:
            del fns["httpx_aiohttp"]
        for i in range(args.rounds):
            order = [c for c in args.clients if c in fns]
            for name in order if i % 2 == 0 else reversed(order):  # alternated
                fn = fns[name]
                _WRITTEN.clear()
                lat = await fn(url, args.requests)
                written = _WRITTEN[20:]  # the first 20 warm the pool
                row = {"p50_ms": round(_common.pct(lat, 0.5), 3),
                       "p90_ms": round(_common.pct(lat, 0.9), 3),
                       "written_p50_ms": round(_common.pct(written, 0.5), 3) if written else None}
                if name not in best or row["p50_ms"] < best[name]["p50_ms"]:
                    best[name] = row
        here.send("stop")
        probe.uninstall()
    finally:
        _common.end_process(proc, 5.0)
    return {"bench": "rest_roundtrip", "requests": args.requests, "rounds": args.rounds,
            "sniffio": importlib.util.find_spec("sniffio") is not None, "load": _common.load(),
            **best,
            "extra_ms_p50": round(best["httpx"]["p50_ms"] - best["aiohttp"]["p50_ms"], 3)
            if "httpx" in best and "aiohttp" in best else None}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=2000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--smoke", action="store_true", help="50 requests, 1 round")
    ap.add_argument("--clients", nargs="+",
                    default=["httpx", "httpx_aiohttp", "httpx_confguard", "genesys", "genesys_ha",
                             "aiohttp"],
                    help="which clients, alternated round by round: httpx (its own transport, "
                         "httpcore), httpx_aiohttp (the httpx-aiohttp package's transport, when "
                         "installed), httpx_confguard (daemon.genesys.transport), genesys "
                         "(GenesysClient whole), genesys_ha (the same with an HA leader's "
                         "send_budget), aiohttp (bare)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    if args.smoke:
        args.requests, args.rounds = 50, 1
    import os

    from daemon.service.logs import configure_logging

    with open(os.devnull, "w") as devnull:  # as the daemon runs: warning and up, JSON
        configure_logging("warning", "json", stream=devnull)
        r = asyncio.run(run(args))
    if args.json:
        print(json.dumps(r))
    else:
        print(f"REST round trip, {r['requests']} sequential PATCHes, best of {r['rounds']} "
              f"(sniffio importable: {r['sniffio']}; load {r['load']})")
        for who in (c for c in ("httpx", "httpx_aiohttp", "httpx_confguard", "genesys", "aiohttp")
                    if c in r):
            print(f"  {who:<16} p50 {r[who]['p50_ms']:.3f} ms  p90 {r[who]['p90_ms']:.3f} ms")
        if r["extra_ms_p50"] is not None:
            print(f"  httpx costs {r['extra_ms_p50']:.3f} ms more per request (p50)")


if __name__ == "__main__":
    main()
