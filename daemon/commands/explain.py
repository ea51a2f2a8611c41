"""`confguard explain`: why each rule does or does not fire for each party of one call.

    confguard explain --config config.yaml (--conversation ID | --call CALL.json)
                      [--party ID] [--rule NAME]... [--at TIME] [--json]

For every rule and every party (or the one `--party` names): each top-level condition as
written, the value it saw and its verdict, the call conditions, the timers (`hold_for`
elapsed/remaining, `connected_seconds` thresholds) and the final result. `--rule NAME` shows
only that rule (repeatable). Values are shown as the call has them: a phone field as written
(`sip:...@host`, with the normalised form it was compared as), a false `has_party` as
`none`, `(absent)` only for a field that is not there. It starts from
`RuleEngine.explain` and then lets the same engine the daemon runs judge the snapshot and
run its clock forward (24 h at most, no I/O), so "fires in 10 s" is what the daemon
would do if nothing about the call changed.

`--conversation` reads the call over REST (`GET /api/v2/conversations/calls/{id}`, with the
config's Genesys settings and credentials); `--call` reads a saved `CallConversation`
JSON (offline). `--at` (ISO-8601 or epoch seconds; default: now) is the instant the
snapshot is judged at; it matters for `connected_seconds`. A snapshot cannot say how long
a `hold_for` has already been holding: the hold is counted from `--at`, as the daemon
counts it from the moment it first sees the conditions hold.

Exit codes: 0 explained, 2 bad config / call file / arguments, 3 no such call or party,
4 permission refused, 5 API or network failure.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import orjson

from daemon.config import Config, load_config, load_lists, resolve_credentials
from daemon.commands.eject import uuid_arg
from daemon.core.ids import ConversationId, ParticipantId, RuleName
from daemon.core.model import Call, Participant
from daemon.core.rules import CompiledRule, RuleEngine, RuleSet, Verdict, compile_rules
from daemon.core.state import CallStore
from daemon.core.timefmt import format_time, parse_time
from daemon.errors import ConfigError, NotFoundError, TargetError

#: How far the clock is run forward to find timers that would fire (seconds).
HORIZON = 86_400.0
_MAX_TIMER_STEPS = 10_000


@dataclass(slots=True, frozen=True)
class RuleResult:
    """One rule judged for one party."""

    rule: CompiledRule
    verdict: Verdict
    fires_at: float | None  # when the engine decides, if nothing changes (None: never)

    def result(self, now: float, judged: bool) -> str:
        if not judged:
            return "not judged: the party has left the call"
        if self.fires_at is not None and self.fires_at <= now:
            return "FIRES now"
        if self.fires_at is not None:
            why = "hold_for" if self.verdict.holds else "a time condition"
            return f"FIRES in {_secs(self.fires_at - now)} if nothing changes ({why})"
        if self.verdict.holds:  # pragma: no cover - a holding rule always fires or has a timer
            return "holds"
        return f"no: {len(self.verdict.failed)} condition(s) false"

    def code(self, now: float, judged: bool) -> str:
        if not judged:
            return "not_judged"
        if self.fires_at is None:
            return "no"
        return "fires_now" if self.fires_at <= now else "fires_later"


def _secs(x: float) -> str:
    """Seconds for people: to 0.1 s (timers wake 1 ms after a threshold, on purpose)."""
    r = round(x, 1)
    return f"{int(r)}s" if r.is_integer() else f"{r:g}s"


def _show(value: object) -> str:
    if value is None:
        return "(absent)"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return _secs(value).removesuffix("s")
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(str(v) for v in value) + "]"
    return str(value)


#: Party fields compared after phone normalisation: shown as written, with the compared form.
PHONE_FIELDS = ("address", "ani", "dnis")


def _seen(key: str, value: object, p: Participant) -> str:
    """What a condition saw, for people: a phone field as the party has it (SIP addresses
    included), with the normalised form it was compared as when that differs; `has_party`
    that matched no other party as `none` (false, not absent); `(absent)` only for a field
    the party or call does not have."""
    if key in PHONE_FIELDS:
        raw = getattr(p, key, None)
        if raw is not None:
            return str(raw) if value is None or str(value) == str(raw) else f"{raw} (compared as {value})"
    if key.endswith("has_party") and value is None:
        return "none"
    return _show(value)


def load_call_file(path: Path) -> dict[str, Any]:
    """A saved CallConversation (as GET /api/v2/conversations/calls/{id} returns it)."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read call file {path}: {exc.strerror or exc}") from None
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise ConfigError(f"{path}: not JSON ({exc})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a CallConversation object, got {type(data).__name__}")
    return data


async def fetch_call(config: Config, conversation_id: str) -> dict[str, Any]:
    """GET the call over REST with the config's Genesys settings."""
    from daemon.genesys.api import GenesysClient

    credentials = resolve_credentials(config.genesys, base_dir=config.base_dir)
    async with GenesysClient(config.genesys, credentials) as client:
        return await client.get_call(ConversationId(conversation_id))


@dataclass(slots=True)
class Explanation:
    call: Call
    now: float
    ruleset: RuleSet
    parties: list[tuple[Participant, list[RuleResult]]]


def explain_call(ruleset: RuleSet, conv: dict[str, Any], now: float,
                 party: str | None = None, rules: Sequence[str] = ()) -> Explanation:
    """Judge one conversation snapshot at `now`; see the module docstring. `rules`: only
    these rules are shown (all are still judged: the result is the daemon's); a name the
    config does not have is a ConfigError naming the rules it has."""
    unknown = [r for r in rules if r not in ruleset.by_name]
    if unknown:
        raise ConfigError(f"--rule: no rule {', '.join(repr(r) for r in unknown)} in the config "
                          f"(enabled rules: {', '.join(ruleset.by_name)})")
    store = CallStore()
    change = store.apply(conv, now, received_at=now, source="resync")
    if change is None:
        raise ConfigError("not a CallConversation: it needs a string 'id' and a 'participants' list")
    call = change.call
    if party is not None and ParticipantId(party) not in call.participants:
        raise TargetError(f"call {call.id} has no participant {party}; participants: "
                          f"{', '.join(call.participants)}")
    engine = RuleEngine(ruleset)
    fires: dict[tuple[RuleName, ParticipantId], float] = {}
    for d in engine.on_change(change, now):
        fires.setdefault((d.rule, d.participant_id), d.decided_at)
    # Run the clock forward: what would the daemon do if nothing about the call changed?
    for _ in range(_MAX_TIMER_STEPS):
        deadline = engine.next_deadline()
        if deadline is None or deadline > now + HORIZON:
            break
        for d in engine.due(deadline):
            fires.setdefault((d.rule, d.participant_id), d.decided_at)
        after = engine.next_deadline()
        if after is not None and after <= deadline:  # a timer that does not move on
            break
    out: list[tuple[Participant, list[RuleResult]]] = []
    by_name = ruleset.by_name
    for p in call.participants.values():
        if party is not None and p.id != party:
            continue
        results = [RuleResult(by_name[v.rule], v, fires.get((v.rule, p.id)))
                   for v in engine.explain(call, p, now) if not rules or v.rule in rules]
        out.append((p, results))
    return Explanation(call, now, ruleset, out)


def _timer(r: RuleResult, now: float) -> str | None:
    rule = r.rule
    if rule.hold is not None:
        if r.verdict.holds and r.fires_at is not None:
            remaining = max(0.0, r.fires_at - now)
            return (f"hold_for {_secs(rule.hold)}: holding; elapsed {_secs(rule.hold - remaining)}, "
                    f"remaining {_secs(remaining)} (counted from this snapshot)")
        return f"hold_for {_secs(rule.hold)}: not holding (starts when every condition holds)"
    if rule.flip is not None and not r.verdict.holds and r.fires_at is not None:
        return f"time condition becomes true at {format_time(r.fires_at)} (in {_secs(r.fires_at - now)})"
    return None


def _party_title(p: Participant) -> str:
    bits = [p.purpose or "no purpose", p.state or "no state"]
    if p.name:
        bits.append(repr(p.name))
    if p.address:
        bits.append(p.address)
    if p.user_id:
        bits.append(f"user {p.user_id}")
    return f"party {p.id} ({', '.join(bits)})"


def render_table(ex: Explanation, out: TextIO) -> None:
    call = ex.call
    print(f"call {call.id} judged at {format_time(ex.now)}: {len(call.participants)} parties, "
          f"{call.connected_parties} connected, recording_state {_show(call.recording_state)}, "
          f"mode {ex.ruleset.mode}", file=out)
    disabled = ex.ruleset.disabled
    print(f"{len(ex.ruleset.rules)} rule(s) enabled" +
          (f"; disabled (not judged): {', '.join(disabled)}" if disabled else ""), file=out)
    for p, results in ex.parties:
        judged = p.is_live
        print("", file=out)
        print(_party_title(p), file=out)
        if not results:
            print("  (no rules enabled)", file=out)
        for r in results:
            rule = r.rule
            extra = f", hold_for {_secs(rule.hold)}" if rule.hold is not None else ""
            print(f"  rule {rule.name}  ({rule.action}, {rule.severity}{extra})", file=out)
            rows = [(c.scope, c.text, ", ".join(f"{k}={_seen(k, v, p)}" for k, v in c.values.items()) or "-",
                     "yes" if c.holds else "NO") for c in r.verdict.conditions]
            w1 = max((len(x[1]) for x in rows), default=0)
            w2 = max((len(x[2]) for x in rows), default=0)
            for scope, text, seen, verdict in rows:
                print(f"    {scope:<6} {text:<{w1}}  saw {seen:<{w2}}  {verdict}", file=out)
            timer = _timer(r, ex.now)
            if timer:
                print(f"    {'timer':<6} {timer}", file=out)
            print(f"    {'result':<6} {r.result(ex.now, judged)}", file=out)


def to_json(ex: Explanation) -> dict[str, Any]:
    call = ex.call
    parties = []
    for p, results in ex.parties:
        judged = p.is_live
        rules = []
        for r in results:
            remaining = None
            if r.rule.hold is not None and r.verdict.holds and r.fires_at is not None:
                remaining = round(max(0.0, r.fires_at - ex.now), 3)
            rules.append({
                "rule": r.rule.name, "action": r.rule.action, "severity": r.rule.severity,
                "hold_for_seconds": r.rule.hold,
                "conditions": [{"scope": c.scope, "condition": c.text, "values": c.values,
                                "holds": c.holds} for c in r.verdict.conditions],
                "holds": r.verdict.holds,
                "hold": None if remaining is None or r.rule.hold is None else
                {"elapsed_seconds": round(r.rule.hold - remaining, 3), "remaining_seconds": remaining},
                "result": r.code(ex.now, judged),
                "fires_at": None if r.fires_at is None else format_time(r.fires_at),
                "fires_in_seconds": None if r.fires_at is None else round(max(0.0, r.fires_at - ex.now), 3),
            })
        parties.append({"participant_id": p.id, "purpose": p.purpose, "state": p.state,
                        "judged": judged, "rules": rules})
    return {"conversation_id": call.id, "judged_at": format_time(ex.now), "mode": ex.ruleset.mode,
            "disabled_rules": list(ex.ruleset.disabled),
            "recording_state": call.recording_state, "connected_parties": call.connected_parties,
            "parties": parties}


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "explain", help="show, condition by condition, why each rule does or does not fire on a call",
        description="For each rule and party of one call: every condition with the value it "
                    "saw and its verdict, the timers and the final result.",
        epilog="exit codes: 0 ok, 2 bad config/call file, 3 no such call or party, "
               "4 permission refused, 5 API/network failure")
    p.add_argument("--config", default="config.yaml", help="path to config.yaml (default: %(default)s)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--conversation", metavar="ID", help="read the call over REST")
    src.add_argument("--call", metavar="FILE.json", help="a saved CallConversation JSON (offline)")
    p.add_argument("--party", metavar="ID", help="only this participant")
    p.add_argument("--rule", metavar="NAME", action="append", default=[],
                   help="only this rule (repeat for several; all are still judged)")
    p.add_argument("--at", metavar="TIME", help="judge at this instant (ISO-8601 or epoch seconds; default now)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=explain_command)


_LAST_EPOCH = 253_402_300_799.0  # 9999-12-31T23:59:59Z


def _instant(text: str | None) -> float:
    """--at as epoch seconds (now when absent); a ConfigError for anything else."""
    if text is None:
        return time.time()
    try:
        t: float | None = float(text)
    except ValueError:
        t = parse_time(text)
    if t is None or not 0.0 <= t <= _LAST_EPOCH:  # also NaN and infinities
        raise ConfigError(f"--at: expected an ISO-8601 time (2026-11-21T09:15:02Z) or epoch "
                          f"seconds, got {text!r}")
    return t


def explain_command(args: Any, out: TextIO | None = None) -> int:
    out = out or sys.stdout  # looked up per call: tests capture it
    config = load_config(args.config)
    ruleset = compile_rules(config, load_lists(config))
    now = _instant(args.at)
    if args.call:
        conv = load_call_file(Path(args.call))
    else:
        conversation = uuid_arg("conversation", args.conversation)  # exit 2: nothing sent
        try:
            conv = asyncio.run(fetch_call(config, conversation))
        except NotFoundError:
            raise TargetError(f"no call {args.conversation} in Genesys Cloud (404)") from None
    ex = explain_call(ruleset, conv, now, args.party, args.rule)
    if args.json:
        out.write(json.dumps(to_json(ex), indent=2, default=str) + "\n")
    else:
        render_table(ex, out)
    return 0
