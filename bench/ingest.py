"""Benchmark 1: events/s through parse + state update + rule evaluation, in process, one core.

    .venv/bin/python bench/ingest.py [--calls 1000] [--frames 40000] [--rounds 3] [--profile]

Setup: the 50-rule configuration (the six shipped rules + 44 variants, bench/_common.py)
compiled into the real `RuleEngine`, driven through `Engine.feed` exactly as the daemon's
hot path does. Payloads come from the sandbox's own `World` (the same serialisation the
sandbox publishes, unknown extra fields included): `--calls` live conference calls
(customer, ACD leg that has transferred, agent, external party = 4 parties), then a stream
of whole-conversation events: participant-data updates, hold/mute toggles, touches
(republished, unchanged), recording changes, and about 1% of calls ending and being
replaced by new ones (each new call brings its own 4 setup events). Frames are built up
front (not timed); the timed loop is `Engine.feed(frame, now)` plus `Engine.tick` every
1,000 frames. Best of `--rounds` (a fresh Engine each round).

Prints one JSON line (`--json`) or a human summary. Target: >= 20,000 events/s.
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import json
import pstats
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common  # noqa: E402
import orjson  # noqa: E402

from daemon.core.engine import Engine  # noqa: E402
from daemon.config import load_lists  # noqa: E402
from daemon.core.rules import RuleEngine, compile_rules  # noqa: E402
from daemon.sandbox.wire import EXTRA_PREFIX, _message  # noqa: E402
from daemon.sandbox.world import Conversation, World  # noqa: E402
from daemon.core.state import CallStore  # noqa: E402

T0 = 1_795_000_000.0


class Recorder:
    """World listener that serialises each change as the sandbox would publish it."""

    def __init__(self, clock: list[float]) -> None:
        self.frames: list[tuple[bytes, float]] = []
        self.clock = clock
        self.n = 0

    def __call__(self, conv: Conversation) -> None:
        body = conv.event_body()
        self.n += 1
        body[f"{EXTRA_PREFIX}{self.n % 7}"] = {"note": "unknown field", "n": self.n}
        if body["participants"]:
            body["participants"][0][f"{EXTRA_PREFIX}Flag"] = bool(self.n % 2)
        topic = conv.topics()[0]
        self.frames.append((_message(topic, orjson.dumps(body), f"corr-{self.n}"), self.clock[0]))


def build_world(n_calls: int, seed: int = 7) -> tuple[World, Recorder, list[str], list[str]]:
    clock = [T0]
    world = World(clock=lambda: clock[0])
    rec = Recorder(clock)
    queues = [world.create_queue("Customer Service").id,
              world.create_queue("Payments", _common.PAYMENTS_QUEUE).id]
    queues += [world.create_queue(f"Queue {i}").id for i in range(6)]
    users = [world.create_user(f"Agent {i}").id for i in range(200)]
    world.listeners.append(rec)
    return world, rec, queues, users


def new_call(world: World, rng: random.Random, queues: list[str], users: list[str]) -> str:
    # Payments calls with an outside party would fire a rule on every event; keep them out
    # of the background so the figure is the cost of judging, not of deciding.
    q = rng.choice([q for q in queues if q != _common.PAYMENTS_QUEUE])
    conv = world.start_call(q, ani=f"tel:+1415555{rng.randrange(10**4):04d}",
                            customer_name=f"Customer {rng.randrange(10**6)}")
    world.connect_agent(conv.id, rng.choice(users))
    world.set_recording(conv.id, "active")
    world.add_external(conv.id, f"tel:+1212555{rng.randrange(10**4):04d}", name="Partner")
    return conv.id


def make_stream(n_calls: int, n_frames: int, seed: int = 7) -> list[tuple[bytes, float]]:
    """`n_calls` live 4-party calls, then events on them until `n_frames` frames exist."""
    rng = random.Random(seed)
    world, rec, queues, users = build_world(n_calls, seed)
    clock = rec.clock
    live = [new_call(world, rng, queues, users) for _ in range(n_calls)]
    steps = 0
    while len(rec.frames) < n_frames and steps < n_frames * 2:
        steps += 1
        clock[0] += 0.0005
        i = rng.randrange(n_calls)
        cid = live[i]
        conv = world.get_call(cid)
        parties = conv.live_parties()
        roll = rng.random()
        p = rng.choice(parties)
        if roll < 0.40:
            world.set_attributes(cid, p.id, {"ivr.intent": rng.choice(("billing", "sales", "support")),
                                             "crm.step": str(steps)})
        elif roll < 0.65:
            world.set_party_state(cid, p.id, held=not p.held)
        elif roll < 0.80:
            world.set_party_state(cid, p.id, muted=not p.muted)
        elif roll < 0.95:
            world.touch(cid)
        elif roll < 0.99:
            world.set_attributes(cid, p.id, {"riskScore": str(rng.randrange(0, 80))})
        else:
            world.end_call(cid)
            live[i] = new_call(world, rng, queues, users)
    return rec.frames[:n_frames]


def make_engine(config_path: Path) -> Engine:
    cfg = _common.load_bench_config(config_path)
    return Engine(RuleEngine(compile_rules(cfg, load_lists(cfg))), CallStore())


def run_once(config_path: Path, frames: list[tuple[bytes, float]]) -> tuple[float, Engine]:
    engine = make_engine(config_path)
    feed, tick = engine.feed, engine.tick
    gc.collect()
    t = time.perf_counter()
    for n, (raw, now) in enumerate(frames):
        feed(raw, now)
        if n % 1000 == 999:
            tick(now)
    return time.perf_counter() - t, engine


def measure(calls: int = 1000, n_frames: int = 40_000, rounds: int = 3,
            profile: bool = False) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        config_path = _common.write_config(Path(tmp), n_rules=50)
        n_rules = len(_common.load_bench_config(config_path).rules)
        frames = make_stream(calls, n_frames)
        avg = sum(len(r) for r, _ in frames) / len(frames)
        run_once(config_path, frames[:3000])  # warm-up
        best = float("inf")
        engine: Engine | None = None
        loads = []
        for _ in range(rounds):
            loads.append(_common.load())
            elapsed, engine = run_once(config_path, frames)
            best = min(best, elapsed)
        assert engine is not None
        if profile:
            prof = cProfile.Profile()
            prof.enable()
            run_once(config_path, frames)
            prof.disable()
            pstats.Stats(prof).sort_stats("tottime").print_stats(20)
        return {
            "bench": "ingest", "events_per_s": round(len(frames) / best), "frames": len(frames),
            "avg_frame_bytes": round(avg), "calls": calls, "rules": n_rules, "rounds": rounds,
            "us_per_event": round(best * 1e6 / len(frames), 2), "tracked_calls": len(engine.store),
            "changes": engine.counters["changes"], "duplicates": engine.counters["duplicates"],
            "decisions": engine.counters["decisions"], "rejected": sum(engine.rejected.values()),
            "load": loads, "target": ">= 20000 events/s",
        }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--calls", type=int, default=1000)
    ap.add_argument("--frames", type=int, default=40_000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--json", action="store_true", help="print one JSON line")
    args = ap.parse_args()
    r = measure(args.calls, args.frames, args.rounds, args.profile)
    if args.json:
        print(json.dumps(r))
        return
    print(f"Engine.feed, {r['rules']} rules, {r['calls']} live 4-party calls, {r['frames']} frames "
          f"(avg {r['avg_frame_bytes']} B): {r['events_per_s']:,} events/s ({r['us_per_event']} us/event), "
          f"best of {r['rounds']}; load {r['load']}")
    print(f"  changes {r['changes']}, duplicates {r['duplicates']}, decisions {r['decisions']}, "
          f"rejected {r['rejected']}, tracked {r['tracked_calls']}")


if __name__ == "__main__":
    main()
