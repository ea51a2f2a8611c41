"""Benchmark 5: bytes per tracked call at 10,000 live conference calls.

    .venv/bin/python bench/memory.py [--calls 10000] [--json]

The frames (the sandbox World's own serialisation of `--calls` live 4-party conference
calls: customer, ACD leg, agent, external party, plus the set-up events of each call) are
generated first and written to a temporary file. A fresh child process then reads them as
one bytes blob (so the world that produced them is not in its heap), builds the Engine with
the 50-rule RuleEngine and a CallStore, reads VmRSS from /proc/self/status, feeds every
frame through `Engine.feed`, collects garbage, and reads VmRSS again.
Figure: (RSS after - RSS before) / tracked calls. Target: < 10 KB per call.
"""

from __future__ import annotations

import argparse
import gc
import json
import random
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common  # noqa: E402
import ingest  # noqa: E402


def rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def write_frames(n_calls: int, path: Path) -> int:
    rng = random.Random(3)
    world, rec, queues, users = ingest.build_world(n_calls)
    for _ in range(n_calls):
        ingest.new_call(world, rng, queues, users)
    with path.open("wb") as fh:
        for raw, _ in rec.frames:
            fh.write(len(raw).to_bytes(4, "big"))
            fh.write(raw)
    return len(rec.frames)


def child(frames_path: Path, config_path: Path) -> dict[str, Any]:
    blob = frames_path.read_bytes()
    engine = ingest.make_engine(config_path)
    view = memoryview(blob)
    gc.collect()
    before = rss_bytes()
    pos = 0
    now = ingest.T0
    n = 0
    while pos < len(blob):
        size = int.from_bytes(view[pos:pos + 4], "big")
        engine.feed(bytes(view[pos + 4:pos + 4 + size]), now)
        pos += 4 + size
        n += 1
    gc.collect()
    after = rss_bytes()
    calls = len(engine.store)
    live_parties = sum(sum(1 for p in c.participants.values() if not p.is_final)
                       for c in (engine.store.get(cid) for cid in engine.store.tracked_ids()) if c)
    return {"bench": "memory", "calls": calls, "frames": n, "rss_before": before, "rss_after": after,
            "bytes_per_call": round((after - before) / max(1, calls)),
            "live_parties": live_parties, "load": _common.load(), "target": "< 10240 bytes per call"}


def measure(calls: int = 10_000) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        t = Path(tmp)
        config_path = _common.write_config(t, n_rules=50)
        write_frames(calls, t / "frames.bin")
        out = subprocess.run([sys.executable, __file__, "--child", str(t / "frames.bin"), str(config_path)],
                             capture_output=True, text=True, timeout=600, check=True)
        return dict(json.loads(out.stdout.strip().splitlines()[-1]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--calls", type=int, default=10_000)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--child", nargs=2, metavar=("FRAMES", "CONFIG"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(Path(args.child[0]), Path(args.child[1]))))
        return
    r = measure(args.calls)
    if args.json:
        print(json.dumps(r))
        return
    print(f"memory: {r['bytes_per_call']:,} bytes per tracked call ({r['calls']} live calls, "
          f"{r['live_parties']} live parties, {r['frames']} frames; RSS {r['rss_before'] / 2**20:.1f} -> "
          f"{r['rss_after'] / 2**20:.1f} MiB); load {r['load']}")


if __name__ == "__main__":
    main()
