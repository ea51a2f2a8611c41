"""`confguard test RULES_TEST.yaml...`: unit tests for rules, without recordings.

In the manner of `promtool test rules`: a test file names the config, describes calls as a
timeline of what happens to them, and expects which parties are acted on by which rule and
when. The timeline is turned into the notification frames Genesys would send (topic
`v2.routing.queues.{queue}.conversations.calls`, `eventBody` = the whole conversation) and
run through `daemon.commands.replay.replay`, the same engine on the same virtual clock as
`confguard replay`: `hold_for` and `connected_seconds` timers fire at their deadlines.

    # confguard test tests/rules/config.test.yaml
    config: ../../config.yaml          # relative to this file (--config overrides it)
    tolerance: 1s                      # optional (default 1s): how far from `at` a decision may be
    tests:
      - name: recording paused for 10 s removes the external party
        until: 2m                      # optional: run the clock to here (default: 1h after the last step)
        calls:
          c1:                          # the conversation id
            queue: 0d5c7a44-...        # optional: the queue the call came through (its topic
                                       # carries the events; an ended ACD leg `c1-acd` in that
                                       # queue joins the call unless a party names the queue)
            timeline:
              - at: 0s                 # a call with these parties and attributes
                recording_state: active
                parties:
                  agent-1: {purpose: agent, state: connected, user_id: u1}
                  ext-1:   {purpose: external, state: connected, address: "tel:+442079460000"}
              - at: 4s                 # the recording pauses
                recording_state: paused
              - at: 30s                # the party leaves
                parties:
                  ext-1: {state: disconnected}
        expect:
          - {rule: third-party-needs-recording, party: ext-1, at: 14s}
          - {rule: flagged-party, party: ext-1, at: never}

A step changes only what it names: `recording_state` / `secure_pause` of the call, and under
`parties` the fields of each party by id (a party not seen before joins; `attributes` are
merged key by key, `null` removes one). Party fields are the rule-format names (`purpose`,
`state`, `address`, `user_id`, `queue_id`, `flagged_reason`, `monitored_participant_id`,
`held`, ...). `connectedTime` is set when a party's state first becomes `connected`
(`connected_for: 590s` backdates it: connected 590 s before this step), `endTime` when it
becomes `disconnected` or `terminated`. Nothing disconnects a party by itself: a removal
the daemon would make is a later step, if the test needs it.

`expect` is complete: every decision of a test must be listed (a decision nobody expected
fails the test, as in promtool every alert firing must be listed). `at: never` says a rule
must not act on that party; `call:` may be left out when the party id is unique in the
test; `tolerance:` on an expectation overrides the file's.

Exit codes: 0 every test passed, 1 a test failed (the differences are printed, `-` for
what was expected, `+` for what happened), 2 an unusable test file (`file:line:col:
message`) or config.
"""

from __future__ import annotations

import math
import os
import sys
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import orjson

from daemon.commands.replay import Frame, replay
from daemon.config import Config, ConfigSource, compose_with_positions, load_config
from daemon.core.model import Decision
from daemon.core.rules import parse_duration
from daemon.core.timefmt import format_time
from daemon.errors import ConfigError

#: The virtual clock's zero (2026-01-01T00:00:00Z): `at: 10s` is this epoch + 10 s.
EPOCH = 1_767_225_600.0
DEFAULT_TOLERANCE = 1.0
DEFAULT_RUN_AFTER = 3600.0
DEFAULT_QUEUE = "00000000-0000-4000-8000-00000000c0fe"
#: The longest time a test may describe (30 days, in seconds): keeps every instant a real date.
MAX_SECONDS = 30 * 86_400.0

# Rule-format party field -> (notification JSON key, kind). Kinds: text, bool, ref ({id}).
PARTY_WIRE: dict[str, tuple[str, str]] = {
    "name": ("name", "text"), "purpose": ("purpose", "text"), "state": ("state", "text"),
    "direction": ("direction", "text"), "address": ("address", "text"), "ani": ("ani", "text"),
    "dnis": ("dnis", "text"), "provider": ("provider", "text"),
    "flagged_reason": ("flaggedReason", "text"), "disconnect_type": ("disconnectType", "text"),
    "monitored_participant_id": ("monitoredParticipantId", "text"),
    "coached_participant_id": ("coachedParticipantId", "text"),
    "barged_participant_id": ("bargedParticipantId", "text"),
    "held": ("held", "bool"), "muted": ("muted", "bool"), "confined": ("confined", "bool"),
    "recording": ("recording", "bool"),
    "user_id": ("user", "ref"), "queue_id": ("queue", "ref"), "team_id": ("team", "ref"),
    "external_contact_id": ("externalContact", "ref"),
    "external_organization_id": ("externalOrganization", "ref"),
}
PARTY_EXTRA = ("attributes", "connected_for")
# Enumerations from the SDK models (QueueConversationCallEventTopicCallMediaParticipant).
ENUMS: dict[str, tuple[str, ...]] = {
    "state": ("alerting", "dialing", "contacting", "offering", "connected", "disconnected",
              "terminated", "converting", "uploading", "transmitting", "scheduled", "parked",
              "none"),
    "direction": ("inbound", "outbound"),
    "flagged_reason": ("general",),
    "recording_state": ("none", "active", "paused"),
}
FINAL = ("disconnected", "terminated")
STEP_KEYS = ("at", "recording_state", "secure_pause", "parties")


def iso(ts: float) -> str:
    """Genesys' time format: ISO-8601 UTC with milliseconds and a Z."""
    return format_time(ts)


def fmt_seconds(t: float) -> str:
    """Seconds after the test's start, as a test file writes them (`10s`, `600.001s`)."""
    r = round(t, 3)
    return f"{int(r)}s" if r.is_integer() else f"{r:g}s"


# ---------------------------------------------------------------------- the test file


@dataclass(slots=True)
class ScriptStep:
    at: float
    call: str
    line: int
    recording_state: str | None = None
    secure_pause: bool | None = None
    sets_recording: bool = False
    sets_pause: bool = False
    parties: dict[str, dict[str, Any]] = field(default_factory=dict)


@dataclass(slots=True, frozen=True)
class Expect:
    rule: str
    call: str
    party: str
    at: float | None  # None: never
    tolerance: float
    line: int
    rule_at: tuple[int | None, int | None] = (None, None)  # where `rule:` is written


@dataclass(slots=True)
class Case:
    name: str
    line: int
    steps: list[ScriptStep]
    queues: dict[str, str]
    expect: list[Expect]
    until: float


@dataclass(slots=True)
class TestFile:
    path: Path
    config_path: Path
    cases: list[Case]


class _Reader:
    """Checks the test file node by node; every problem is a `file:line:col` ConfigError."""

    def __init__(self, src: ConfigSource) -> None:
        self.src = src

    def err(self, path: tuple[str | int, ...], message: str, *, key: bool = False) -> ConfigError:
        return self.src.error(path, message, key=key)

    def line(self, path: tuple[str | int, ...]) -> int:
        return self.src.position(path)[0] or 1

    def mapping(self, value: Any, path: tuple[str | int, ...], what: str) -> dict[str, Any]:
        if not isinstance(value, dict):
            raise self.err(path, f"{what}: expected a mapping")
        return value

    def keys(self, value: dict[str, Any], allowed: tuple[str, ...], path: tuple[str | int, ...],
             what: str) -> None:
        for k in value:
            if k not in allowed:
                raise self.err(path + (k,), f"unknown key {k!r} in {what}; allowed: "
                                            f"{', '.join(allowed)}", key=True)

    def duration(self, value: Any, path: tuple[str | int, ...], what: str) -> float:
        seconds = parse_duration(value)
        if seconds is None:
            raise self.err(path, f"{what}: expected a duration such as 0s, 10s, 500ms, 2m "
                                 f"or a number of seconds, got {value!r}")
        if seconds > MAX_SECONDS:
            raise self.err(path, f"{what}: {value!r} is longer than a test can describe "
                                 f"(at most 30 days)")
        return seconds

    def text(self, value: Any, path: tuple[str | int, ...], what: str) -> str:
        if isinstance(value, bool) or not isinstance(value, (str, int)) or value == "":
            raise self.err(path, f"{what}: expected text, got {value!r}")
        return str(value)


def load_test_file(path: Path, config_override: Path | None = None) -> TestFile:
    """Parse and check a RULES_TEST.yaml. Raises ConfigError `file:line:col: ...`."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read test file {path}: {getattr(exc, 'strerror', None) or exc}") from None
    data, src = compose_with_positions(text, str(path))
    r = _Reader(src)
    top = r.mapping(data, (), "the test file")
    r.keys(top, ("config", "tolerance", "tests"), (), "the test file")
    if config_override is not None:
        config_path = config_override
    elif "config" in top:
        config_path = path.parent / r.text(top["config"], ("config",), "config")
    else:
        raise r.err((), "missing 'config': the config file the rules come from, relative to this file")
    tolerance = DEFAULT_TOLERANCE
    if "tolerance" in top:
        tolerance = r.duration(top["tolerance"], ("tolerance",), "tolerance")
    tests = top.get("tests")
    if not isinstance(tests, list) or not tests:
        raise r.err(("tests",) if "tests" in top else (), "expected 'tests:', a non-empty list of tests")
    cases = [_case(r, t, ("tests", i), tolerance) for i, t in enumerate(tests)]
    return TestFile(path, config_path, cases)


def _case(r: _Reader, raw: Any, path: tuple[str | int, ...], tolerance: float) -> Case:
    t = r.mapping(raw, path, "a test")
    r.keys(t, ("name", "calls", "expect", "until"), path, "a test")
    name = r.text(t.get("name"), path + ("name",), "name") if "name" in t else f"test {path[-1]}"
    calls = r.mapping(t.get("calls"), path + ("calls",), "calls (conversation id: {timeline: [...]})")
    if not calls:
        raise r.err(path + ("calls",), "calls: describe at least one call")
    steps: list[ScriptStep] = []
    queues: dict[str, str] = {}
    parties_of: dict[str, set[str]] = {}
    for cid, spec in calls.items():
        cpath = path + ("calls", cid)
        c = r.mapping(spec, cpath, f"call {cid}")
        r.keys(c, ("queue", "timeline"), cpath, f"call {cid}")
        queues[cid] = r.text(c["queue"], cpath + ("queue",), "queue") if "queue" in c else DEFAULT_QUEUE
        timeline = c.get("timeline")
        if not isinstance(timeline, list) or not timeline:
            raise r.err(cpath + (("timeline",) if "timeline" in c else ()),
                        f"call {cid}: expected 'timeline:', a non-empty list of steps")
        seen: set[str] = set()
        last = -math.inf
        for j, raw_step in enumerate(timeline):
            step = _step(r, raw_step, cpath + ("timeline", j), str(cid), seen)
            if step.at < last:
                raise r.err(cpath + ("timeline", j, "at"), "steps must be in time order")
            last = step.at
            steps.append(step)
        parties_of[str(cid)] = seen
    expect_raw = t.get("expect")
    if not isinstance(expect_raw, list):
        raise r.err(path + (("expect",) if "expect" in t else ()),
                    "expected 'expect:', a list of {rule, party, at} (an empty list: no rule acts)")
    expect = [_expect(r, e, path + ("expect", k), tolerance, parties_of)
              for k, e in enumerate(expect_raw)]
    last_step = max(s.at for s in steps)
    until = (r.duration(t["until"], path + ("until",), "until") if "until" in t
             else min(MAX_SECONDS, last_step + DEFAULT_RUN_AFTER))
    if until < last_step:
        raise r.err(path + ("until",), f"until ({fmt_seconds(until)}) is before the last step "
                                       f"({fmt_seconds(last_step)})")
    steps.sort(key=lambda s: s.at)  # stable: calls' steps at the same time keep file order
    return Case(name, r.line(path), steps, queues, expect, until)


def _step(r: _Reader, raw: Any, path: tuple[str | int, ...], cid: str, seen: set[str]) -> ScriptStep:
    s = r.mapping(raw, path, "a timeline step")
    r.keys(s, STEP_KEYS, path, "a timeline step")
    if "at" not in s:
        raise r.err(path, "a timeline step needs 'at:' (seconds after the test's start, e.g. 0s)")
    step = ScriptStep(r.duration(s["at"], path + ("at",), "at"), cid, r.line(path))
    if "recording_state" in s:
        rs = s["recording_state"]
        if rs is not None and rs not in ENUMS["recording_state"]:
            raise r.err(path + ("recording_state",), f"recording_state: expected one of "
                                                     f"{', '.join(ENUMS['recording_state'])} or null, got {rs!r}")
        step.recording_state, step.sets_recording = rs, True
    if "secure_pause" in s:
        sp = s["secure_pause"]
        if sp is not None and not isinstance(sp, bool):
            raise r.err(path + ("secure_pause",), f"secure_pause: expected true or false, got {sp!r}")
        step.secure_pause, step.sets_pause = sp, True
    if "parties" in s:
        parties = r.mapping(s["parties"], path + ("parties",), "parties (party id: {fields})")
        for pid, fields in parties.items():
            ppath = path + ("parties", pid)
            step.parties[str(pid)] = _party_fields(r, fields, ppath, str(pid))
            seen.add(str(pid))
    return step


def _party_fields(r: _Reader, raw: Any, path: tuple[str | int, ...], pid: str) -> dict[str, Any]:
    f = r.mapping(raw, path, f"party {pid}")
    allowed = (*PARTY_WIRE, *PARTY_EXTRA)
    out: dict[str, Any] = {}
    for k, v in f.items():
        kp = path + (k,)
        if k not in allowed:
            raise r.err(kp, f"unknown party field {k!r}; known: {', '.join(allowed)}", key=True)
        if k == "attributes":
            attrs = r.mapping(v, kp, "attributes (participant data, text to text)")
            clean: dict[str, str | None] = {}
            for ak, av in attrs.items():
                if av is not None and (isinstance(av, (dict, list))):
                    raise r.err(kp + (ak,), f"attribute {ak!r}: participant data is text, got {av!r}")
                # Genesys participant data is text: 85 and true are sent as "85" and "true".
                clean[str(ak)] = None if av is None else (
                    ("true" if av else "false") if isinstance(av, bool) else str(av))
            out[k] = clean
        elif k == "connected_for":
            out[k] = r.duration(v, kp, "connected_for")
        elif v is None:
            out[k] = None
        elif PARTY_WIRE[k][1] == "bool":
            if not isinstance(v, bool):
                raise r.err(kp, f"{k}: expected true or false, got {v!r}")
            out[k] = v
        else:
            value = r.text(v, kp, k)
            if k in ENUMS and value not in ENUMS[k]:
                raise r.err(kp, f"{k}: expected one of {', '.join(ENUMS[k])}, got {value!r}")
            out[k] = value
    return out


def _expect(r: _Reader, raw: Any, path: tuple[str | int, ...], tolerance: float,
            parties_of: Mapping[str, set[str]]) -> Expect:
    e = r.mapping(raw, path, "an expectation ({rule, party, at})")
    r.keys(e, ("rule", "call", "party", "at", "tolerance"), path, "an expectation")
    for need in ("rule", "party", "at"):
        if need not in e:
            raise r.err(path, f"an expectation needs '{need}:' (e.g. {{rule: flagged-party, "
                              f"party: cust-1, at: 0s}} or at: never)")
    rule = r.text(e["rule"], path + ("rule",), "rule")
    party = r.text(e["party"], path + ("party",), "party")
    if "call" in e:
        call = r.text(e["call"], path + ("call",), "call")
        if call not in parties_of:
            raise r.err(path + ("call",), f"no call {call!r} in this test (calls: {', '.join(parties_of)})")
        if party not in parties_of[call]:
            raise r.err(path + ("party",), f"call {call} has no party {party!r}")
    else:
        owners = [c for c, ps in parties_of.items() if party in ps]
        if len(owners) != 1:
            raise r.err(path + ("party",), f"party {party!r} is in no call of this test" if not owners
                        else f"party {party!r} is in calls {', '.join(owners)}: say which with 'call:'")
        call = owners[0]
    at: float | None = None if e["at"] == "never" else r.duration(
        e["at"], path + ("at",), "at (or 'never')")
    tol = r.duration(e["tolerance"], path + ("tolerance",), "tolerance") if "tolerance" in e else tolerance
    return Expect(rule, call, party, at, tol, r.line(path), r.src.position(path + ("rule",)))


def check_rule_names(tf: TestFile, config: Config) -> None:
    """Every expected rule must exist in the config (enabled or not)."""
    known = {r.name for r in config.rules}
    for case in tf.cases:
        for e in case.expect:
            if e.rule not in known:
                raise ConfigError(f"unknown rule {e.rule!r}; rules in {tf.config_path}: "
                                  f"{', '.join(sorted(known))}", file=str(tf.path),
                                  line=e.rule_at[0], col=e.rule_at[1])


# ---------------------------------------------------------------------- running


def frames(case: Case) -> Iterator[Frame]:
    """The notification frames the case's timeline stands for, in time order."""
    calls: dict[str, dict[str, Any]] = {}
    parties: dict[str, dict[str, dict[str, Any]]] = {}
    named = _queues_named(case)
    for step in case.steps:
        ps = parties.setdefault(step.call, {})
        now = EPOCH + step.at
        call = calls.get(step.call)
        if call is None:
            call = calls[step.call] = {"id": step.call, "participants": []}
            queue = case.queues[step.call]
            if queue != DEFAULT_QUEUE and queue not in named.get(step.call, ()):
                # The call came through that queue, as a real call's ACD leg shows (it has
                # ended: the call was answered): `call.queue_ids`, `has_party` see it.
                call["participants"].append(acd_party(step.call, queue, now))
        if step.sets_recording:
            _put(call, "recordingState", step.recording_state)
        if step.sets_pause:
            _put(call, "securePause", step.secure_pause)
        for pid, fields in step.parties.items():
            wire = ps.get(pid)
            if wire is None:
                wire = ps[pid] = {"id": pid}
                call["participants"].append(wire)
            _apply_party(wire, fields, now)
        event = {"topicName": f"v2.routing.queues.{case.queues[step.call]}.conversations.calls",
                 "version": "2", "eventBody": call,
                 "metadata": {"CorrelationId": f"confguard-test-{step.line}"}}
        yield Frame(now, orjson.dumps(event).decode(), step.line)


def _queues_named(case: Case) -> dict[str, set[str]]:
    """The queue ids the parties of each call name themselves (`queue_id`)."""
    out: dict[str, set[str]] = {}
    for step in case.steps:
        for fields in step.parties.values():
            qid = fields.get("queue_id")
            if isinstance(qid, str):
                out.setdefault(step.call, set()).add(qid)
    return out


def acd_party(call_id: str, queue_id: str, now: float) -> dict[str, Any]:
    """The ended ACD leg that puts a test call given `queue:` in that queue."""
    return {"id": f"{call_id}-acd", "purpose": "acd", "name": "queue", "queue": {"id": queue_id},
            "state": "disconnected", "disconnectType": "transfer", "connectedTime": iso(now),
            "endTime": iso(now)}


def _put(obj: dict[str, Any], key: str, value: Any) -> None:
    if value is None:
        obj.pop(key, None)
    else:
        obj[key] = value


def _apply_party(wire: dict[str, Any], fields: Mapping[str, Any], now: float) -> None:
    for k, v in fields.items():
        if k == "attributes":
            attrs = wire.setdefault("attributes", {})
            for ak, av in v.items():
                _put(attrs, ak, av)
        elif k == "connected_for":
            wire["connectedTime"] = iso(now - v)
        else:
            key, kind = PARTY_WIRE[k]
            _put(wire, key, {"id": v} if kind == "ref" and v is not None else v)
    state = wire.get("state")
    if state == "connected" and "connectedTime" not in wire:
        wire["connectedTime"] = iso(now)
    if state in FINAL and "endTime" not in wire:
        wire["endTime"] = iso(now)


@dataclass(slots=True)
class Outcome:
    case: Case
    decisions: list[Decision]
    diff: list[str]

    @property
    def ok(self) -> bool:
        return not self.diff


def run_case(config: Config, case: Case) -> Outcome:
    got = list(frames(case))
    last = max(f.ts for f in got)
    result = replay(config, iter(got), extend=EPOCH + case.until - last)
    decisions = result.decisions
    return Outcome(case, decisions, compare(case.expect, decisions))


def compare(expect: list[Expect], decisions: list[Decision]) -> list[str]:
    """Diff lines: `- ` what was expected and did not happen, `+ ` what happened instead."""
    unused = list(decisions)
    out: list[str] = []

    def who(rule: str, call: str, party: str) -> str:
        return f"{rule}  call {call} party {party}"

    for e in expect:
        match = next((d for d in unused if d.rule == e.rule and d.conversation_id == e.call
                      and d.participant_id == e.party), None)
        if match is not None:
            unused.remove(match)
        t = None if match is None else match.decided_at - EPOCH
        if e.at is None:
            if t is not None:
                out.append(f"- {who(e.rule, e.call, e.party)}  never   (line {e.line})")
                out.append(f"+ {who(e.rule, e.call, e.party)}  at {fmt_seconds(t)}")
        elif t is None:
            out.append(f"- {who(e.rule, e.call, e.party)}  at {fmt_seconds(e.at)} "
                       f"±{fmt_seconds(e.tolerance)}   (line {e.line})")
            out.append(f"+ {who(e.rule, e.call, e.party)}  never acted on")
        elif abs(t - e.at) > e.tolerance + 1e-9:
            out.append(f"- {who(e.rule, e.call, e.party)}  at {fmt_seconds(e.at)} "
                       f"±{fmt_seconds(e.tolerance)}   (line {e.line})")
            out.append(f"+ {who(e.rule, e.call, e.party)}  at {fmt_seconds(t)}")
    for d in unused:
        out.append(f"+ {who(d.rule, d.conversation_id, d.participant_id)}  at "
                   f"{fmt_seconds(d.decided_at - EPOCH)}   (not expected)")
    return out


def run_file(path: Path, out: TextIO, *, config_override: Path | None = None,
             verbose: bool = False) -> tuple[int, int]:
    """Run one test file; print its report. Returns (tests, failures)."""
    tf = load_test_file(path, config_override)
    config = load_config(tf.config_path)
    check_rule_names(tf, config)
    failures = 0
    print(f"{path}: {len(tf.cases)} test(s), rules from {os.path.normpath(tf.config_path)}", file=out)
    for case in tf.cases:
        res = run_case(config, case)
        status = "ok  " if res.ok else "FAIL"
        print(f"  {status} {case.name}  ({path}:{case.line})", file=out)
        if verbose or not res.ok:
            for d in res.decisions:
                print(f"         decision: {d.rule} {d.action} call {d.conversation_id} "
                      f"party {d.participant_id} at {fmt_seconds(d.decided_at - EPOCH)}", file=out)
        if not res.ok:
            failures += 1
            print("         expected (-) / got (+):", file=out)
            for line in res.diff:
                print(f"         {line}", file=out)
    return len(tf.cases), failures


# ---------------------------------------------------------------------- CLI


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "test", help="run rule unit tests (calls described as timelines) on a virtual clock",
        description="Run rule unit tests in the manner of `promtool test rules`: each test "
                    "describes calls as a timeline and expects which parties are acted on by "
                    "which rule and when. Runs on replay's virtual clock.",
        epilog="exit codes: 0 all tests passed, 1 a test failed, 2 unusable test file or config")
    p.add_argument("files", metavar="RULES_TEST.yaml", nargs="+", help="test files")
    p.add_argument("--config", default=None,
                   help="use this config instead of the one each test file names")
    p.add_argument("-v", "--verbose", action="store_true", help="print every decision")
    p.set_defaults(func=test_command)


def test_command(args: Any, out: TextIO | None = None) -> int:
    out = out or sys.stdout  # looked up per call: tests capture it
    override = Path(args.config) if args.config else None
    tests = failures = 0
    for f in args.files:
        n, bad = run_file(Path(f), out, config_override=override, verbose=args.verbose)
        tests += n
        failures += bad
    if failures:
        print(f"FAILED: {failures} of {tests} test(s)", file=out)
        return 1
    print(f"SUCCESS: {tests} test(s) passed", file=out)
    return 0
