"""Per-hop timestamps of confguard's removal path, for bench/budget_burst.py `--hops`.

Not a benchmark itself, and never imported by the daemon: `install()` wraps, in THIS
process only, the functions a frame passes on its way to the PATCH, each wrapper taking
`time.perf_counter_ns()` (CLOCK_MONOTONIC on Linux: the same clock as the sandbox's
`perf_ns` in its own process, so the hops line up with the sandbox's publish and receipt
stamps). Hops, per flagged conversation (its first removal only):

    rx          websockets' protocol got bytes from the socket (`Connection.data_received`;
                the last call before the frame was handed over)
    on_message  the stream handed the frame to the daemon (`EventRouter.frame`, or
                `Daemon._on_message` in trees before the router; the daemon's own
                `received_at` is taken just before, by the stream)
    fed         `Engine.feed` returned: parsed, applied to the state, rules evaluated
    submit      `Enforcer.submit` entered (metrics and `_handle`'s gauges before it)
    logged      the `decision` log line built and written (`Enforcer._log_decision` returned)
    audited     the decision record written (`AuditLog.write` returned)
    submitted   `Enforcer.submit` returned (admission, the PATCH task created)
    task        the PATCH task began to run (`Enforcer._run`: the next loop turn or later)
    on_send     the client is about to send (limiter slot and token taken; the audit's
                `event_to_request_ms` ends here)
    send        the request object built and handed over (`GenesysClient._exchange`
                entered; `httpx.AsyncClient.send` in trees before it)
    transport   the httpx transport's `handle_async_request` entered
    written     the first bytes of the PATCH handed to the socket (`transport.write` or
                `writelines` of the asyncio selector transport, whatever library calls it)

Each wrapper costs about a microsecond; the sum is stated with the figures. `install()`
returns a `Probe`; `Probe.rows()` gives one dict per conversation with the stamps above.
"""

from __future__ import annotations

import asyncio.selector_events
import time
from collections.abc import Callable
from typing import Any

HOPS = ("rx", "on_message", "fed", "submit", "logged", "audited", "submitted", "task",
        "on_send", "send", "transport", "written")

_PATCH = b"PATCH /api/v2/conversations/calls/"


class Probe:
    """The stamps collected since `install()`; `rows()` per conversation."""

    def __init__(self) -> None:
        self.last_rx = 0
        self.frame: dict[str, int] | None = None
        self.by_cid: dict[str, dict[str, int]] = {}
        self._undo: list[Callable[[], None]] = []

    def stamp(self, cid: str, hop: str) -> None:
        row = self.by_cid.get(cid)
        if row is not None and hop not in row:
            row[hop] = time.perf_counter_ns()

    def rows(self) -> dict[str, dict[str, int]]:
        return self.by_cid

    def uninstall(self) -> None:
        for undo in reversed(self._undo):
            undo()
        self._undo.clear()

    def _patch(self, owner: Any, name: str, make: Callable[[Any], Any]) -> None:
        orig = getattr(owner, name)
        setattr(owner, name, make(orig))
        self._undo.append(lambda: setattr(owner, name, orig))


def install() -> Probe:
    """Wrap the hot path's functions (see the module docstring); undo with `uninstall()`."""
    import httpx
    import websockets.asyncio.connection as wsconn

    from daemon.core.engine import Engine
    from daemon.service import enforcer as enf
    from daemon.service.audit import AuditLog

    p = Probe()
    p._patch(wsconn.Connection, "data_received", lambda orig: _data_received(p, orig))
    try:
        from daemon.service.router import EventRouter
    except ImportError:  # a tree before the router (the code before a change)
        from daemon.service.lifecycle import Daemon

        p._patch(Daemon, "_on_message", lambda orig: _on_message(p, orig))
    else:
        p._patch(EventRouter, "frame", lambda orig: _on_message(p, orig))
    p._patch(Engine, "feed", lambda orig: _feed(p, orig))
    p._patch(enf.Enforcer, "submit", lambda orig: _submit(p, orig))
    p._patch(enf.Enforcer, "_log_decision", lambda orig: _after(p, orig, "logged"))
    p._patch(AuditLog, "write", lambda orig: _audit_write(p, orig))
    p._patch(enf.Enforcer, "_run", lambda orig: _run(p, orig))
    p._patch(enf.Enforcer, "_sending", lambda orig: _sending(p, orig))
    from daemon.genesys.api import GenesysClient

    # The request built, handed to the exchange: `GenesysClient._exchange` (issue 22), or
    # httpx's `AsyncClient.send` in trees before it.
    sender = GenesysClient if hasattr(GenesysClient, "_exchange") else httpx.AsyncClient
    p._patch(sender, "_exchange" if sender is GenesysClient else "send",
             lambda orig: _request_hop(p, orig, "send"))
    for cls in _transport_classes():
        p._patch(cls, "handle_async_request", lambda orig: _request_hop(p, orig, "transport"))
    watch_patch_writes(p, lambda cid: p.stamp(cid, "written"))
    return p


_now = time.perf_counter_ns


def _data_received(p: Probe, orig: Any) -> Any:
    def f(self: Any, data: bytes) -> None:
        p.last_rx = _now()
        orig(self, data)
    return f


def _on_message(p: Probe, orig: Any) -> Any:
    def f(self: Any, raw: Any, received_at: float, **kw: Any) -> Any:
        p.frame = {"rx": p.last_rx, "on_message": _now()}
        try:
            return orig(self, raw, received_at, **kw)
        finally:
            p.frame = None
    return f


def _feed(p: Probe, orig: Any) -> Any:
    def f(self: Any, *a: Any, **kw: Any) -> Any:
        out = orig(self, *a, **kw)
        if p.frame is not None:
            p.frame["fed"] = _now()
        return out
    return f


def _submit(p: Probe, orig: Any) -> Any:
    def f(self: Any, decision: Any) -> Any:
        t = _now()
        cid = str(decision.conversation_id)
        if p.frame is not None and cid not in p.by_cid and decision.action == "disconnect":
            p.by_cid[cid] = {**p.frame, "submit": t}
        out = orig(self, decision)
        p.stamp(cid, "submitted")
        return out
    return f


def _after(p: Probe, orig: Any, hop: str) -> Any:
    def f(self: Any, d: Any, *a: Any, **kw: Any) -> Any:
        out = orig(self, d, *a, **kw)
        p.stamp(str(d.conversation_id), hop)
        return out
    return f


def _audit_write(p: Probe, orig: Any) -> Any:
    def f(self: Any, record: dict[str, Any]) -> Any:
        out = orig(self, record)
        if record.get("type") == "decision":
            p.stamp(str(record.get("conversation_id")), "audited")
        return out
    return f


def _run(p: Probe, orig: Any) -> Any:
    async def f(self: Any, action: Any) -> None:
        p.stamp(str(action.key[0]), "task")
        await orig(self, action)
    return f


def _sending(p: Probe, orig: Any) -> Any:
    def f(self: Any, action: Any) -> None:
        p.stamp(str(action.key[0]), "on_send")
        orig(self, action)
    return f


def _cid_of(request: Any) -> str | None:
    """The conversation id of a PATCH of a call's participant (from the URL's raw path, an
    attribute httpx keeps: `str(request.url)` would rebuild the URL inside the hop)."""
    if request.method != "PATCH":
        return None
    parts = request.url.raw_path.split(b"/conversations/calls/", 1)
    return parts[1].split(b"/", 1)[0].decode("ascii", "replace") if len(parts) == 2 else None


def _request_hop(p: Probe, orig: Any, hop: str) -> Any:
    async def f(self: Any, request: Any, **kw: Any) -> Any:
        cid = _cid_of(request)
        if cid is not None:
            p.stamp(cid, hop)
        return await orig(self, request, **kw)
    return f


def watch_patch_writes(p: Probe, seen: Callable[[str], None]) -> None:
    """Call `seen(conversation id)` whenever this process hands the first bytes of a PATCH
    of a call's participant to a socket (`write`, or `writelines`: aiohttp may write headers
    and body in one call); undone with `p.uninstall()`. Used for confguard's `written` hop
    and, in its own process, for the minimal client's."""
    def written(data: Any) -> None:
        if bytes(data[:len(_PATCH)]) == _PATCH:
            head = bytes(data[len(_PATCH):len(_PATCH) + 80])
            seen(head.split(b"/", 1)[0].decode("ascii", "replace"))

    def write(orig: Any) -> Any:
        def f(self: Any, data: Any) -> None:
            written(data)
            orig(self, data)
        return f

    def writelines(orig: Any) -> Any:
        def f(self: Any, chunks: Any) -> None:
            chunks = list(chunks)
            if chunks:
                written(chunks[0])
            orig(self, chunks)
        return f

    sock = asyncio.selector_events._SelectorSocketTransport
    p._patch(sock, "write", write)
    p._patch(sock, "writelines", writelines)


def _transport_classes() -> list[type]:
    import httpx

    out: list[type] = [httpx.AsyncHTTPTransport]
    try:  # the tree under test's own: Http11Transport, or AiohttpTransport before it
        from daemon.genesys import transport as ours
    except ImportError:  # a tree before both
        pass
    else:
        out += [getattr(ours, n) for n in ("Http11Transport", "AiohttpTransport")
                if hasattr(ours, n)]
    try:
        from httpx_aiohttp import AiohttpTransport
    except ImportError:
        pass
    else:
        out.append(AiohttpTransport)
    return out


def breakdown(rows: dict[str, dict[str, int]], published: dict[str, int],
              received: dict[str, int]) -> dict[str, Any]:
    """Per hop, the p50/p90 (ms) of the time since the previous hop (in the order the hops
    happened), over the conversations that have every stamp; plus `publish` (the sandbox published the event) first and
    `sandbox` (the sandbox received the PATCH) last, from the sandbox's stamps."""
    from _common import pct

    fulls = []
    for cid, row in rows.items():
        if cid in published and cid in received:
            full = {"publish": published[cid], **row, "sandbox": received[cid]}
            if all(h in full for h in HOPS):
                fulls.append(full)
    # The hops in the order they happened (the median offset from the frame's arrival):
    # code that moves work (the decision line after the PATCH) changes the order.
    if not fulls:
        return {"n": 0}
    offset = {h: pct([f[h] - f["on_message"] for f in fulls], 0.5) for h in HOPS}
    order = ("publish", *sorted(HOPS, key=lambda h: offset[h]), "sandbox")
    deltas: dict[str, list[float]] = {h: [] for h in order[1:]}
    total: list[float] = []
    inside: list[float] = []
    n = 0
    for full in fulls:
        n += 1
        for a, b in zip(order, order[1:]):
            deltas[b].append((full[b] - full[a]) / 1e6)
        total.append((full["sandbox"] - full["publish"]) / 1e6)
        inside.append((full["written"] - full["on_message"]) / 1e6)
    if not n:
        return {"n": 0}
    return {"n": n, "order": list(order),
            "hops_ms": {h: {"p50": round(pct(v, 0.5), 4), "p90": round(pct(v, 0.9), 4)}
                        for h, v in deltas.items()},
            "on_message_to_written_ms": {"p50": round(pct(inside, 0.5), 4),
                                         "p99": round(pct(inside, 0.99), 4)},
            "publish_to_sandbox_ms": {"p50": round(pct(total, 0.5), 4),
                                      "p99": round(pct(total, 0.99), 4)}}
