"""Benchmark: parse + CallStore.apply throughput, and bytes per tracked call.

    .venv/bin/python bench/ingest_state.py                 # both figures
    .venv/bin/python bench/ingest_state.py --profile       # plus a cProfile of the hot loop
    .venv/bin/python bench/ingest_state.py --engine        # through Engine.feed with a no-op rule stub
    .venv/bin/python bench/ingest_state.py --config config.yaml   # Engine.feed with the real rules

Throughput: `--calls` live conference calls of 4 parties (customer, agent, external, acd),
each frame the whole conversation (~2.5 KB of Genesys-shaped JSON, many fields the store
ignores), as the notification service sends it. The stream mixes what a real one carries:
one party changes a field (hold, mute, attributes, recording), duplicates, and calls
ending and being replaced by new ones. Frames are built up front; the timed loop is
`parse_message` + `CallStore.apply` (+ `evict` every 1,000 frames), timed in process CPU
time (other work on the machine does not count), best of `--repeat` runs.

Memory: tracemalloc growth after `--mem-calls` distinct live 4-party calls are applied
(frames discarded), divided by the number of calls.

Every loop is bounded by the command-line sizes.
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import pstats
import random
import sys
import time
import tracemalloc
import uuid
from pathlib import Path
from typing import Any

import orjson

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from daemon.core.engine import Engine, RuleEvaluator  # noqa: E402
from daemon.core.events import CallEvent, parse_message  # noqa: E402
from daemon.core.ids import ConversationId  # noqa: E402
from daemon.core.model import Change, Decision  # noqa: E402
from daemon.core.state import CallStore  # noqa: E402
from daemon.core.timefmt import format_time  # noqa: E402

T0 = 1_795_000_000.0
QUEUES = [str(uuid.UUID(int=i + 1)) for i in range(20)]


def make_party(rng: random.Random, purpose: str, start: float) -> dict[str, Any]:
    pid = str(uuid.UUID(int=rng.getrandbits(128)))
    queue = rng.choice(QUEUES)
    p: dict[str, Any] = {
        "id": pid,
        "name": {"customer": "Mobile Number, United Kingdom", "agent": "Jane Agent",
                 "external": "External Party", "acd": "Sales Queue"}[purpose],
        "address": f"tel:+4420{rng.randrange(10**7, 10**8)}",
        "startTime": format_time(start),
        "connectedTime": format_time(start + 2.345),
        "purpose": purpose,
        "state": "connected",
        "initialState": "alerting" if purpose == "agent" else "offering",
        "direction": "inbound",
        "held": False,
        "wrapupRequired": purpose == "agent",
        "provider": "Edge",
        "peer": str(uuid.UUID(int=rng.getrandbits(128))),
        "muted": False,
        "confined": False,
        "recording": purpose != "acd",
        "recordingState": "active",
        "securePause": False,
        "ani": f"tel:+4420{rng.randrange(10**7, 10**8)}",
        "dnis": "tel:+18005550199",
        "mediaRoles": ["full"],
        "attributes": {"ivr.language": "en-GB", "ivr.intent": "billing",
                       "crm.caseId": f"CASE-{rng.randrange(10**6)}"},
    }
    if purpose in ("agent", "acd"):
        p["queue"] = {"id": queue, "name": "Sales"}
    if purpose == "agent":
        uid = str(uuid.UUID(int=rng.getrandbits(128)))
        p["user"] = {"id": uid, "name": "Jane Agent"}
        p["team"] = {"id": str(uuid.UUID(int=7)), "name": "Team"}
    if purpose == "customer":
        p["externalContact"] = {"id": str(uuid.UUID(int=rng.getrandbits(128)))}
    return p


def make_call(rng: random.Random, start: float) -> dict[str, Any]:
    cid = str(uuid.UUID(int=rng.getrandbits(128)))
    return {
        "id": cid,
        "name": "Inbound call",
        "participants": [make_party(rng, purpose, start)
                         for purpose in ("customer", "acd", "agent", "external")],
        "otherMediaUris": [],
        "address": "tel:+18005550199",
        "utilizationLabelId": str(uuid.UUID(int=9)),
        "divisions": [{"division": {"id": str(uuid.UUID(int=10)), "selfUri": "/api/v2/authorization/divisions/10"},
                       "entities": [{"id": str(uuid.UUID(int=11))}]}],
        "recordingState": "active",
        "securePause": False,
        "maxParticipants": 6,
    }


def envelope(conv: dict[str, Any]) -> bytes:
    q = conv["participants"][1].get("queue", {}).get("id", QUEUES[0])
    return orjson.dumps({"topicName": f"v2.routing.queues.{q}.conversations.calls", "version": "2",
                         "eventBody": conv, "metadata": {"CorrelationId": str(uuid.uuid4())}})


def make_stream(n_frames: int, n_calls: int, seed: int = 7) -> list[tuple[bytes, float]]:
    """A bounded stream of (frame, now) pairs over `n_calls` concurrently live calls."""
    rng = random.Random(seed)
    now = T0
    live = [make_call(rng, now) for _ in range(n_calls)]
    out: list[tuple[bytes, float]] = [(envelope(c), now) for c in live]  # each call seen once
    while len(out) < n_frames:
        now += 0.0005
        i = rng.randrange(n_calls)
        conv = live[i]
        roll = rng.random()
        parts = conv["participants"]
        if roll < 0.15:
            pass  # duplicate delivery
        elif roll < 0.99:
            p = rng.choice(parts)
            field = rng.choice(("held", "muted", "recording", "attributes"))
            if field == "attributes":
                p["attributes"] = dict(p["attributes"], step=str(len(out)))
            else:
                p[field] = not p[field]
        else:
            for p in parts:  # the call ends; a new one replaces it
                p["state"] = "disconnected"
                p["endTime"] = format_time(now)
                p["disconnectType"] = "client"
            out.append((envelope(conv), now))
            live[i] = conv = make_call(rng, now)
        out.append((envelope(conv), now))
    return out[:n_frames]


class NoRules:
    """A rule evaluator that never decides (measures the engine's own overhead)."""

    def on_change(self, change: Change, now: float, /) -> list[Decision]:
        return []

    def due(self, now: float, /) -> list[Decision]:
        return []

    def next_deadline(self) -> float | None:
        return None

    def forget_call(self, conversation_id: ConversationId, /) -> None:
        return None


def run_store(stream: list[tuple[bytes, float]]) -> tuple[float, CallStore, int]:
    store = CallStore(ended_grace=30.0)
    changes = 0
    apply = store.apply
    t = time.process_time()
    for n, (raw, now) in enumerate(stream):
        msg = parse_message(raw)
        if isinstance(msg, CallEvent) and apply(msg.body, now, received_at=now) is not None:
            changes += 1
        if n % 1000 == 0:
            store.evict(now)
    return time.process_time() - t, store, changes


def make_rules(config: str | None) -> RuleEvaluator:
    if config is None:
        return NoRules()
    from daemon.config import load_config, load_lists
    from daemon.core.rules import RuleEngine, compile_rules
    cfg = load_config(config)
    return RuleEngine(compile_rules(cfg, load_lists(cfg)))


def run_engine(stream: list[tuple[bytes, float]], config: str | None = None) -> tuple[float, CallStore, int]:
    engine = Engine(make_rules(config), CallStore(ended_grace=30.0))
    t = time.process_time()
    for n, (raw, now) in enumerate(stream):
        engine.feed(raw, now)
        if n % 1000 == 0:
            engine.tick(now)
    return time.process_time() - t, engine.store, engine.counters["changes"]


def bytes_per_call(n_calls: int) -> tuple[float, int]:
    rng = random.Random(11)
    store = CallStore()
    gc.collect()
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    for i in range(n_calls):
        raw = envelope(make_call(rng, T0 + i))
        msg = parse_message(raw)
        assert isinstance(msg, CallEvent)
        store.apply(msg.body, T0 + i)
        del raw, msg
    gc.collect()
    after = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    assert len(store) == n_calls
    return (after - before) / n_calls, len(store)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--frames", type=int, default=100_000)
    ap.add_argument("--calls", type=int, default=1_000)
    ap.add_argument("--mem-calls", type=int, default=10_000)
    ap.add_argument("--engine", action="store_true", help="time Engine.feed (no-op rules) instead")
    ap.add_argument("--config", help="time Engine.feed with the RuleEngine compiled from this config")
    ap.add_argument("--repeat", type=int, default=3, help="timed runs; the best is reported")
    ap.add_argument("--profile", action="store_true")
    args = ap.parse_args()

    stream = make_stream(args.frames, args.calls)
    avg = sum(len(r) for r, _ in stream) / len(stream)
    def runner(frames: list[tuple[bytes, float]]) -> tuple[float, CallStore, int]:
        if args.engine or args.config:
            return run_engine(frames, args.config)
        return run_store(frames)

    runner(stream[: min(len(stream), 5_000)])  # warm-up
    runs = [runner(stream) for _ in range(max(1, args.repeat))]
    elapsed, store, changes = min(runs, key=lambda r: r[0])
    what = ("parse_message + CallStore.apply" if not (args.engine or args.config)
            else f"Engine.feed (rules from {args.config})" if args.config else "Engine.feed (no-op rules)")
    print(f"{what}: {len(stream)} frames (avg {avg:.0f} B, {args.calls} live 4-party calls), "
          f"{changes} changes, {len(stream) / elapsed:,.0f} events/s per CPU-second "
          f"({elapsed * 1e6 / len(stream):.1f} us/event, best of {len(runs)})")
    print(f"  store stats: {store.stats}")
    if args.profile:
        prof = cProfile.Profile()
        prof.enable()
        runner(stream)
        prof.disable()
        pstats.Stats(prof).sort_stats("tottime").print_stats(12)
    per_call, n = bytes_per_call(args.mem_calls)
    print(f"memory: {per_call:,.0f} bytes per tracked call at {n} live 4-party calls (tracemalloc)")


if __name__ == "__main__":
    main()
