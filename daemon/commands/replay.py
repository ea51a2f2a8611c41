"""`confguard replay`: run the rules over recorded notification messages on a virtual clock.

Input (EVENTS.jsonl), one JSON object a line, as `confguard run --record FILE` writes it:

    {"ts": 1763716502.345, "raw": "<the WebSocket frame, verbatim>"}

`ts` is the receive time in epoch seconds; `received_at` (ISO-8601) is accepted in its place,
and `message` (the frame as a JSON object) in place of `raw`. Blank lines and lines starting
with `#` are skipped. The clock is virtual: each frame is applied at its `ts`, and `hold_for`
and time-based timers fire at their deadlines in between, exactly as they did live. What
the live daemon learnt over REST (its start-up resync, resyncs after gaps) is not in the
recording: a call already live when recording began is first seen at its next frame.

Expectations (EXPECT.yaml), in the manner of `promtool test rules`:

    rules:
      flagged-party:
        acted_on:                       # these parties must be decided on by this rule
          - participant: 3f1c...        # required
            conversation: 9a2b...       # optional
            by: 5s                      # optional: at most 5 s after the first recorded frame
                                        #   (or an ISO-8601 time)
        not_acted_on:                   # these must not be
          - participant: 77aa...
      blocked-number-in-conference: []  # an empty list: this rule must not fire at all

A rule not named in the file is not checked. Exit codes: 0 all expectations hold (or none
given), 1 a mismatch (the differences are printed), 2 an unusable config, events or
expectations file.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import orjson

from daemon.config import Config, ConfigSource, Path_, compose_with_positions, load_config, load_lists
from daemon.core.engine import Engine
from daemon.errors import ReplayError
from daemon.core.model import Decision
from daemon.core.rules import RuleEngine, compile_rules, parse_duration
from daemon.core.state import CallStore
from daemon.core.timefmt import format_time, parse_time


@dataclass(slots=True, frozen=True)
class Frame:
    ts: float
    raw: str
    line: int


def read_frames(path: Path) -> Iterator[Frame]:
    """Yield recorded frames; ReplayError names file:line for an unusable line."""
    try:
        fh = path.open("rb")
    except OSError as exc:
        raise ReplayError(f"cannot read events file {path}: {exc.strerror or exc}") from None
    with fh:
        for n, line in enumerate(fh, 1):
            if not line.strip() or line.lstrip().startswith(b"#"):
                continue
            try:
                obj = orjson.loads(line)
            except orjson.JSONDecodeError as exc:
                raise ReplayError(f"{path}:{n}: not a JSON object ({exc})") from None
            if not isinstance(obj, dict):
                raise ReplayError(f"{path}:{n}: expected an object with 'ts' and 'raw'")
            ts: Any = obj.get("ts")
            if ts is None and isinstance(obj.get("received_at"), str):
                ts = parse_time(obj["received_at"])
                if ts is None:
                    raise ReplayError(f"{path}:{n}: received_at is not an ISO-8601 time")
            if not isinstance(ts, (int, float)) or isinstance(ts, bool):
                raise ReplayError(f"{path}:{n}: missing receive time: expected 'ts' (epoch seconds) or 'received_at'")
            if isinstance(obj.get("raw"), str):
                raw = obj["raw"]
            elif "message" in obj:
                raw = orjson.dumps(obj["message"]).decode()
            else:
                raise ReplayError(f"{path}:{n}: missing frame: expected 'raw' (string) or 'message' (object)")
            yield Frame(float(ts), raw, n)


@dataclass(slots=True)
class ReplayResult:
    decisions: list[Decision] = field(default_factory=list)
    frames: int = 0
    rejected: int = 0
    first_ts: float | None = None
    last_ts: float | None = None


def replay(config: Config, frames: Iterator[Frame], *, extend: float = 0.0,
           on_decision: Any = None) -> ReplayResult:
    """Feed frames through the real engine on a virtual clock; timers fire at their deadlines."""
    rules = RuleEngine(compile_rules(config, load_lists(config)))
    engine = Engine(rules, CallStore())
    result = ReplayResult()
    now = float("-inf")

    def emit(ds: list[Decision]) -> None:
        for d in ds:
            result.decisions.append(d)
            if on_decision is not None:
                on_decision(d)

    def advance(to: float) -> None:
        deadline = engine.next_deadline()
        while deadline is not None and deadline <= to:
            emit(engine.tick(deadline))
            nxt = engine.next_deadline()
            if nxt is not None and nxt <= deadline:  # a timer that does not move on: stop, not spin
                break
            deadline = nxt

    for frame in frames:
        now = max(now, frame.ts)  # the virtual clock never runs backwards
        if result.first_ts is None:
            result.first_ts = now
        advance(now)
        fed = engine.feed(frame.raw, now)
        result.frames += 1
        if getattr(fed.message, "reason", None) is not None:
            result.rejected += 1
        emit(fed.decisions)
    if result.first_ts is not None:
        result.last_ts = now
        advance(now + extend)
    return result


# ---------------------------------------------------------------------- expectations


@dataclass(slots=True, frozen=True)
class Expectation:
    rule: str
    participant: str
    conversation: str | None
    by: float | None  # absolute epoch seconds, resolved against the first frame
    by_text: str | None
    must: bool
    where: str


def load_expectations(path: Path, config: Config, first_ts: float | None) -> tuple[list[Expectation], set[str]]:
    """Parse EXPECT.yaml. Returns (expectations, rules asserted to fire never)."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ReplayError(f"cannot read expectations file {path}: {exc.strerror or exc}") from None
    data, src = compose_with_positions(text, str(path))
    known = {r.name for r in config.rules}
    if not isinstance(data, dict) or set(data) - {"rules"} or not isinstance(data.get("rules"), dict):
        raise src.error((), "expected a top-level mapping 'rules:' of rule name to expectations")
    out: list[Expectation] = []
    silent: set[str] = set()
    for rule, spec in data["rules"].items():
        if rule not in known:
            raise src.error(("rules", rule), f"unknown rule {rule!r}; rules in the config: {', '.join(sorted(known))}", key=True)
        if spec in (None, []):
            silent.add(rule)
            continue
        if not isinstance(spec, dict) or set(spec) - {"acted_on", "not_acted_on"}:
            raise src.error(("rules", rule), "expected 'acted_on' and/or 'not_acted_on' lists, or [] for 'never fires'")
        for key, must in (("acted_on", True), ("not_acted_on", False)):
            items = spec.get(key) or []
            if not isinstance(items, list):
                raise src.error(("rules", rule, key), f"{key} must be a list")
            out += [_expectation(rule, item, must, ("rules", rule, key, i), src, path, first_ts)
                    for i, item in enumerate(items)]
    return out, silent


def _expectation(rule: str, item: object, must: bool, path_: Path_, src: ConfigSource, path: Path,
                 first_ts: float | None) -> Expectation:
    """One item of an `acted_on`/`not_acted_on` list: a participant id, or a mapping with
    `participant`, optional `conversation` and (acted_on only) `by`."""
    if isinstance(item, str):
        item = {"participant": item}
    if not isinstance(item, dict) or not isinstance(item.get("participant"), str) or \
            set(item) - {"participant", "conversation", "by"}:
        raise src.error(path_, "expected {participant: ID, conversation: ID (optional), by: 5s or ISO time (optional)}")
    by_raw = item.get("by")
    by: float | None = None
    if by_raw is not None:
        if must is False:
            raise src.error(path_ + ("by",), "'by' only applies to acted_on")
        by = _deadline(by_raw, path_ + ("by",), src, first_ts)
    return Expectation(rule, item["participant"], item.get("conversation"), by,
                       None if by_raw is None else str(by_raw), must,
                       f"{path}:{src.position(path_)[0] or 1}")


def _deadline(by_raw: object, where: Path_, src: ConfigSource, first_ts: float | None) -> float:
    """`by:` as epoch seconds: a duration after the first frame, or an ISO-8601 time."""
    seconds = parse_duration(by_raw)
    if seconds is not None:
        return (first_ts or 0.0) + seconds
    by = parse_time(str(by_raw))
    if by is None:
        raise src.error(where, f"'by' must be a duration such as 5s or an ISO-8601 time, got {by_raw!r}")
    return by


def check_expectations(result: ReplayResult, expectations: list[Expectation], silent: set[str]) -> list[str]:
    """Every mismatch as one human-readable line; empty when everything holds."""
    problems: list[str] = []
    fired: dict[tuple[str, str], list[Decision]] = {}
    for d in result.decisions:
        fired.setdefault((d.rule, d.participant_id), []).append(d)
    for e in expectations:
        hits = [d for d in fired.get((e.rule, e.participant), [])
                if e.conversation is None or d.conversation_id == e.conversation]
        if e.must and not hits:
            problems.append(f"{e.where}: rule {e.rule!r} should have acted on participant {e.participant}, but did not")
        elif e.must and e.by is not None and hits[0].decided_at > e.by + 1e-9:
            problems.append(f"{e.where}: rule {e.rule!r} acted on participant {e.participant} at "
                            f"{format_time(hits[0].decided_at)}, later than expected (by {e.by_text} = {format_time(e.by)})")
        elif not e.must and hits:
            problems.append(f"{e.where}: rule {e.rule!r} acted on participant {e.participant} at "
                            f"{format_time(hits[0].decided_at)}, but must not have")
    for rule in sorted(silent):
        for d in (d for d in result.decisions if d.rule == rule):
            problems.append(f"rule {rule!r} must not fire, but acted on participant {d.participant_id} "
                            f"in conversation {d.conversation_id} at {format_time(d.decided_at)}")
    return problems


def describe(d: Decision) -> str:
    matched = ", ".join(f"{k}={v!r}" for k, v in d.matched.items())
    return (f"{format_time(d.decided_at)}  {d.action:<10} {d.rule}  conversation={d.conversation_id} "
            f"participant={d.participant_id} purpose={d.purpose}  [{matched}]")


# ---------------------------------------------------------------------- CLI


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "replay", help="run the rules over recorded events on a virtual clock",
        description="Run the rules over recorded notification messages (as written by "
                    "`confguard run --record FILE`) and print each decision. With --expect, "
                    "check the decisions like `promtool test rules`.",
        epilog="exit codes: 0 ok, 1 expectation mismatch, 2 bad config/events/expectations file")
    p.add_argument("--config", default="config.yaml", help="path to config.yaml (default: %(default)s)")
    p.add_argument("events", metavar="EVENTS.jsonl", help="recorded frames, one JSON object a line")
    p.add_argument("--expect", metavar="EXPECT.yaml", help="expectations to check")
    p.add_argument("--extend", type=float, default=0.0, metavar="SECONDS",
                   help="keep the virtual clock running this long after the last frame (default 0)")
    p.set_defaults(func=replay_command)


def replay_command(args: Any, out: TextIO = sys.stdout) -> int:
    config = load_config(args.config)
    result = replay(config, read_frames(Path(args.events)), extend=args.extend,
                    on_decision=lambda d: print(describe(d), file=out))
    print(f"{result.frames} frames, {result.rejected} rejected, {len(result.decisions)} decisions", file=out)
    if not args.expect:
        return 0
    expectations, silent = load_expectations(Path(args.expect), config, result.first_ts)
    problems = check_expectations(result, expectations, silent)
    if problems:
        print(f"FAIL: {len(problems)} expectation(s) not met:", file=out)
        for line in problems:
            print(f"  - {line}", file=out)
        return 1
    print(f"ok: {len(expectations) + len(silent)} expectation(s) met", file=out)
    return 0
