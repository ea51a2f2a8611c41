"""Shared helpers for the benchmarks: the machine line, load average, percentiles, the
50-rule configuration (the six shipped rules plus 44 realistic variants), a daemon
config pointed at a sandbox, the sandbox in a child process (`SandboxProcess`, with
`sandbox_hello` and `start_one_queue_sandbox` on its side), a compressed clock
(`scaled_clock`) and the end of a benchmark's main() (`run_cli`: --smoke, --json, run, print).

Not a benchmark itself; imported by the scripts in bench/.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import multiprocessing as mp
import os
import platform
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Coroutine, Iterator, Sequence
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

import yaml

#: The tree whose daemon code and config.yaml are measured: this one, or the one named by
#: CONFGUARD_BENCH_ROOT (budget_burst.py --against: the code before a change, same scripts).
ROOT = Path(os.environ.get("CONFGUARD_BENCH_ROOT") or Path(__file__).resolve().parent.parent)
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
elif sys.path.index(str(ROOT)) > 0:  # ahead of a bench script's own folder's parent
    sys.path.remove(str(ROOT))
    sys.path.insert(0, str(ROOT))

from daemon.config import Config, load_config  # noqa: E402

if TYPE_CHECKING:
    from daemon.genesys.ratelimit import RequestLimiter
    from daemon.genesys.reconcile import Reconciler
    from daemon.sandbox import Sandbox
    from daemon.service.lifecycle import Daemon

SHIPPED_CONFIG = ROOT / "config.yaml"
PAYMENTS_QUEUE = "0d5c7a44-3f2e-4b1a-8c9d-6e7f8a9b0c1d"


def machine() -> dict[str, Any]:
    """nproc, CPU model (/proc/cpuinfo), Python version, kernel."""
    model = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"nproc": os.cpu_count(), "cpu": model, "python": platform.python_version(),
            "kernel": platform.release()}


def load() -> str:
    """The 1/5/15-minute load averages as text (other engineers share the machine)."""
    a, b, c = os.getloadavg()
    return f"{a:.2f}/{b:.2f}/{c:.2f}"


def pct(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..1) of a non-empty list."""
    xs = sorted(values)
    if not xs:
        return float("nan")
    return xs[min(len(xs) - 1, max(0, round(q * (len(xs) - 1))))]


def fmt(v: float | None, digits: int) -> str:
    """`v` with `digits` decimals for a summary line; "-" for None or NaN (`pct` of nothing)."""
    return "-" if v is None or v != v else f"{v:.{digits}f}"


def now_utc() -> str:
    return time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())


def scaled_clock(scale: float) -> Callable[[], float]:
    """A clock for COMPRESSED TIME: epoch seconds that start at now and run `scale` times
    faster than real time (read from time.monotonic)."""
    t0, m0 = time.time(), time.monotonic()

    def scaled() -> float:
        return t0 + (time.monotonic() - m0) * scale

    return scaled


def run_cli(ap: argparse.ArgumentParser,
            run: Callable[[argparse.Namespace], Coroutine[Any, Any, dict[str, Any]]],
            summary: Callable[[dict[str, Any]], str], *, smoke_help: str, smoke: dict[str, Any],
            check: Callable[[argparse.Namespace], str | None] | None = None) -> None:
    """The end of a benchmark's main(): adds --smoke (help `smoke_help`) and --json to `ap`
    and parses the command line; under --smoke, sets each argument named in `smoke` to its
    value there; `check(args)`, when given, returns an error message for arguments that do
    not fit (`ap.error`, exit 2) or None; then runs `run(args)` in a new event loop and
    prints its result as one JSON line (--json) or as `summary(result)`."""
    ap.add_argument("--smoke", action="store_true", help=smoke_help)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    if args.smoke:
        for name, value in smoke.items():
            setattr(args, name, value)
    problem = check(args) if check is not None else None
    if problem is not None:
        ap.error(problem)
    r = asyncio.run(run(args))
    print(json.dumps(r) if args.json else summary(r))


# --------------------------------------------------------------------------- 50 rules

def variant_rules(n: int = 44, queue_ids: list[str] | None = None) -> list[dict[str, Any]]:
    """`n` realistic rule variants on top of the shipped six: other participant-data flags,
    named lists, queues (has_party / queue_ids), regexes on numbers and names, numeric
    thresholds, and a few time-based (connected_seconds) and hold_for rules. None of them
    fires on an ordinary customer + agent + external call without the specific trigger."""
    qs = queue_ids or [f"00000000-0000-4000-8000-{i:012d}" for i in range(1, 9)]
    out: list[dict[str, Any]] = []
    kinds = 11
    for i in range(n):
        k = i % kinds
        name = f"variant-{i:02d}"
        r: dict[str, Any]
        if k == 0:  # another upstream compliance flag
            r = {"when": {"purpose": {"in": ["customer", "external"]},
                          f"attributes.pciFlag{i}": "true"}, "action": "disconnect"}
        elif k == 1:  # blocked list on ani
            r = {"when": {"purpose": "customer", "ani": {"in_list": "blocked_numbers"}},
                 "call": {"connected_parties": {"gte": 3}}, "action": "observe"}
        elif k == 2:  # queue-scoped outside party
            r = {"when": {"purpose": "external", "attributes.partnerTier": {"not_in": ["gold", "silver"]}},
                 "call": {"has_party": {"purpose": "acd", "queue_id": qs[i % len(qs)]},
                          "recording_state": "paused"},
                 "action": "disconnect"}
        elif k == 3:  # premium-rate numbers by regex
            r = {"when": {"purpose": "external", "address": {"matches": rf"\+?(?:44)?9{i % 10}\d{{7,9}}"}},
                 "action": "disconnect", "severity": "critical"}
        elif k == 4:  # risk thresholds
            r = {"when": {"attributes.riskScore": {"gte": 90 + i % 10}, "purpose": {"not_equals": "agent"}},
                 "action": "observe"}
        elif k == 5:  # secure pause with an outside party
            r = {"when": {"purpose": "external", "state": "connected"},
                 "call": {"secure_pause": True, "queue_ids": {"contains": qs[i % len(qs)]}},
                 "action": "disconnect"}
        elif k == 6:  # supervisor coaching limit (time-based)
            r = {"when": {"coached_participant_id": {"exists": True},
                          "user_id": {"not_in_list": "trusted_supervisors"},
                          "connected_seconds": {"gt": 1200 + 60 * i}},
                 "action": "disconnect"}
        elif k == 7:  # names from a watch list pattern
            r = {"when": {"purpose": {"in": ["external", "customer"]},
                          "name": {"matches": rf"(?i).*(?:test|fraud){i}.*"}},
                 "action": "observe"}
        elif k == 8:  # unrecorded external party for a while (hold_for)
            r = {"when": {"purpose": "external", "state": "connected",
                          f"attributes.needsRecording{i}": "yes"},
                 "call": {"recording_state": {"not_in": ["active"]}},
                 "hold_for": f"{5 + i % 20}s", "action": "disconnect"}
        elif k == 9:  # country prefix limits
            r = {"when": {"purpose": "external", "address": {"starts_with": f"+8{i % 10}"},
                          "direction": "outbound"},
                 "call": {"connected_parties": {"gte": 3}}, "action": "disconnect"}
        else:  # flagged interaction with a held party
            r = {"when": {"any": [{"flagged_reason": {"exists": True}},
                                  {f"attributes.fraudScore{i}": {"gt": 70}}],
                          "held": True, "not": {"purpose": "agent"}},
                 "action": "observe"}
        out.append({"name": name, **r})
    return out


def write_config(out_dir: Path, *, n_rules: int = 50, sandbox_base: str | None = None,
                 queues: list[str] | None = None, users: list[str] | None = None,
                 queue_ids_for_rules: list[str] | None = None,
                 overrides: dict[str, Any] | None = None) -> Path:
    """config.yaml in `out_dir`: the shipped file, its rules padded to `n_rules` with
    `variant_rules`, optionally pointed at a sandbox (api/login base, subscriptions, a
    private audit file, ops on an ephemeral port). Returns its path."""
    out_dir.mkdir(parents=True, exist_ok=True)
    data = yaml.safe_load(SHIPPED_CONFIG.read_text())
    shutil.copy(ROOT / "blocked-numbers.txt", out_dir / "blocked-numbers.txt")
    extra = max(0, n_rules - len(data["rules"]))
    data["rules"] = data["rules"][:n_rules] + variant_rules(extra, queue_ids_for_rules)
    data["audit"]["path"] = str(out_dir / "audit.jsonl")
    data["ops"]["listen"] = "127.0.0.1:0"
    if sandbox_base is not None:
        data["genesys"]["api_base_url"] = sandbox_base
        data["genesys"]["login_base_url"] = sandbox_base
    if queues is not None:
        data["subscriptions"]["queues"] = queues
    if users is not None:
        data["subscriptions"]["users"] = users
    for dotted, value in (overrides or {}).items():
        node = data
        *head, last = dotted.split(".")
        for k in head:
            node = node.setdefault(k, {})
        node[last] = value
    path = out_dir / "config.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def load_bench_config(path: Path) -> Config:
    return load_config(path)


def config_for_sandbox(out_dir: Path, info: dict[str, Any], **kw: Any) -> Path:
    """`write_config(out_dir, sandbox_base=info["base"], **kw)` for the sandbox whose hello
    is `info` (`sandbox_hello`), and that sandbox's OAuth client exported as
    GENESYSCLOUD_OAUTHCLIENT_ID / GENESYSCLOUD_OAUTHCLIENT_SECRET, where the daemon reads
    its credentials. Returns the config's path."""
    path = write_config(out_dir, sandbox_base=info["base"], **kw)
    os.environ["GENESYSCLOUD_OAUTHCLIENT_ID"] = info["client_id"]
    os.environ["GENESYSCLOUD_OAUTHCLIENT_SECRET"] = info["secret"]
    return path


@contextlib.contextmanager
def daemon_folder() -> Iterator[Path]:
    """A temporary folder for an in-process `Daemon` (its config.yaml and audit file), with
    this process's logging (warning level, JSON) sent to daemon.log in it for the duration:
    log lines then cost no terminal I/O and cannot skew the figures. Removed on exit."""
    from daemon.service.logs import configure_logging

    with tempfile.TemporaryDirectory() as tmp, open(Path(tmp) / "daemon.log", "w") as logf:
        configure_logging("warning", "json", stream=logf)
        yield Path(tmp)


def in_daemon_ms(audit_path: Path, quantiles: Sequence[float]) -> dict[str, float] | None:
    """confguard's own share of each removal, in ms: frame received -> PATCH about to be
    sent, the `event_to_request_ms` of the outcome records in the audit file at
    `audit_path` and its rotated siblings (<stem>*.jsonl). Returned as {"pNN": ... for each
    of `quantiles` (0..1, nearest rank), "max": ..., "n": count}; None when there is none."""
    inside: list[float] = []
    for p in sorted(audit_path.parent.glob(audit_path.stem + "*.jsonl")):
        for line in p.read_text().splitlines():
            rec = json.loads(line) if line.strip() else {}
            if rec.get("type") == "outcome" and rec.get("event_to_request_ms") is not None:
                inside.append(float(rec["event_to_request_ms"]))
    if not inside:
        return None
    out: dict[str, float] = {f"p{round(q * 100)}": pct(inside, q) for q in quantiles}
    return {**out, "max": max(inside), "n": len(inside)}


async def wait_tracked(daemon: Daemon, calls: int, timeout: float) -> int:
    """Wait, polling every 50 ms for at most `timeout` seconds, until `daemon` holds `calls`
    calls in memory; returns how many it holds then (fewer on time-out, which the benchmark
    reports as `tracked_by_daemon` rather than failing)."""
    end = time.monotonic() + timeout
    while len(daemon.engine.store) < calls and time.monotonic() < end:
        await asyncio.sleep(0.05)
    return len(daemon.engine.store)


def start_compressed_reconciler(daemon: Daemon, clock: Callable[[], float], stop: asyncio.Event, *,
                                scale: float, interval: float, share: float, allowed: int,
                                ) -> tuple[Reconciler, RequestLimiter, asyncio.Task[None]]:
    """Reconciliation in COMPRESSED TIME on the started `daemon` (which has a client and a
    resyncer): its client's limiter replaced by `RequestLimiter(allowed, window=60/scale)`
    with a 20% enforcement reserve, and a `Reconciler` (`interval`, `share`, that limiter,
    the daemon's metrics, `clock`, idle wake-up 5/scale s, no discovery) running until
    `stop` is set, in a task. Returns the reconciler, the limiter and the task (end it with
    `end_task`)."""
    from daemon.genesys.ratelimit import RequestLimiter
    from daemon.genesys.reconcile import Reconciler

    assert daemon.client is not None and daemon.resyncer is not None
    limiter = RequestLimiter(allowed, window=60.0 / scale, enforce_reserve=0.2)
    daemon.client.limiter = limiter
    rec = Reconciler(daemon.resyncer, interval=interval, share=share, limiter=limiter,
                     metrics=daemon.metrics, clock=clock, idle=5.0 / scale, discover=False)
    return rec, limiter, asyncio.create_task(rec.run(stop))


async def end_task(stop: asyncio.Event, task: asyncio.Task[None] | None) -> None:
    """Set `stop`; then cancel `task`, when there is one, and wait for it to end (its
    exception, if any, ignored)."""
    stop.set()
    if task is not None:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


def run_quietly(main: Callable[..., Coroutine[Any, Any, None]], *args: Any) -> None:
    """Entry of a benchmark's helper process (e.g. the sandbox): its logs go nowhere, so
    they cost no terminal I/O and cannot skew the figures; then `asyncio.run(main(*args))`."""
    import asyncio

    from daemon.service.logs import configure_logging

    with open(os.devnull, "w") as devnull:
        configure_logging("warning", "json", stream=devnull)
        asyncio.run(main(*args))


# --------------------------------------------------------------------------- sandbox process

def sandbox_hello(sb: Sandbox, **extra: Any) -> dict[str, Any]:
    """The first message a sandbox process sends its parent (`SandboxProcess.info`): the
    sandbox's base URL and the daemon's OAuth client as `base`, `client_id`, `secret`, plus
    whatever else the benchmark needs (`extra`)."""
    return {"base": sb.base_url, "client_id": sb.client_id, "secret": sb.client_secret, **extra}


async def start_one_queue_sandbox(conn: Connection, *, seed: int, agents: int = 100,
                                  request_budget: int | None = None,
                                  queue: str = "Customer Service") -> tuple[Sandbox, str, list[str]]:
    """A started sandbox (heartbeat every 30 s, its own request budget `request_budget` a
    minute or none, `seed`) whose world holds one queue named `queue` and `agents` users
    "Agent 0".. ; its hello (`sandbox_hello`) sent to the parent over `conn`. Returns the
    sandbox, the queue's id and the users' ids."""
    from daemon.sandbox import Sandbox

    sb = Sandbox(heartbeat_interval=30.0, request_budget=request_budget, seed=seed)
    await sb.start()
    w = sb.world
    queue_id = w.create_queue(queue).id
    users = [w.create_user(f"Agent {i}").id for i in range(agents)]
    conn.send(sandbox_hello(sb))
    return sb, queue_id, users


def end_process(proc: BaseProcess, join_timeout: float) -> None:
    """Join `proc` for up to `join_timeout` seconds, then terminate it if it still runs."""
    proc.join(join_timeout)
    if proc.is_alive():
        proc.terminate()


class SandboxProcess:
    """A benchmark's sandbox in a child process ("spawn": its own interpreter and event
    loop, so serving the daemon never shares a loop with what is measured), spoken to over
    a Pipe: each command is a dict `{"op": ...}` answered by one message; `{"op": "stop"}`
    stops the sandbox and is answered before the child exits.

    `async with SandboxProcess(target, *args) as sandbox:` starts `target(conn, *args)`
    and waits up to `start_timeout` seconds for its hello (`sandbox.info`, see
    `sandbox_hello`). Leaving (or `close()`, which may come earlier and is then a no-op)
    sends "stop", waits up to 20 s for its answer (errors ignored: the child may be gone),
    then joins the child for up to `join_timeout` seconds and terminates it if still alive.
    """

    def __init__(self, target: Callable[..., None], *args: Any, start_timeout: float = 30.0,
                 ask_timeout: float = 600.0, join_timeout: float = 5.0) -> None:
        ctx = mp.get_context("spawn")
        self.conn, there = ctx.Pipe()
        self.proc = ctx.Process(target=target, args=(there, *args), daemon=True)
        self.start_timeout, self.ask_timeout, self.join_timeout = start_timeout, ask_timeout, join_timeout
        self.info: dict[str, Any] = {}
        self._closed = False

    async def __aenter__(self) -> SandboxProcess:
        self.proc.start()
        try:
            if not await asyncio.get_running_loop().run_in_executor(None, self.conn.poll,
                                                                     self.start_timeout):
                raise TimeoutError("sandbox process did not start")
            self.info = self.conn.recv()
        except BaseException:
            await self.close()
            raise
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.close()

    async def ask(self, cmd: dict[str, Any], timeout: float | None = None) -> Any:
        """Send `cmd`, return the child's answer; TimeoutError after `timeout` seconds
        (default `ask_timeout`) without one."""
        timeout = self.ask_timeout if timeout is None else timeout
        self.conn.send(cmd)
        if not await asyncio.get_running_loop().run_in_executor(None, self.conn.poll, timeout):
            raise TimeoutError(f"sandbox did not answer {cmd['op']} within {timeout} s")
        return self.conn.recv()

    async def close(self) -> None:
        """Stop the sandbox and end the child (see the class docstring); once."""
        if self._closed:
            return
        self._closed = True
        try:
            await self.ask({"op": "stop"}, timeout=20.0)
        except Exception:
            pass
        end_process(self.proc, self.join_timeout)
