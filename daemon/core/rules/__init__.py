"""Compliance rules: YAML rule specs compiled once into predicates, and a sans-I/O engine.

Contract (see docs/architecture.md and the README section "Compliance rules"):

- `compile_rules(cfg)` checks every rule (enabled or not), loads every declared list and
  returns a `RuleSet` of closures for the enabled rules. Anything that cannot work is a
  `ConfigError` located `file:line:col` at the offending key or value. Nothing of the YAML
  is interpreted per event.
- `RuleEngine.on_change(change, now)` judges every live party of the changed call against
  every rule and returns `Decision`s, edge-triggered per (rule, conversation, participant):
  a triple fires once, and again only after `rearm()`. `hold_for` and time-dependent
  conditions (`connected_seconds`) are driven by timers: `due(now)` fires what became true
  without any event; `next_deadline()` says when to call it.
- `SafetyValve` counts disconnects in a sliding 60 s window and trips when over budget.

All times are epoch seconds (float), the clock of `Change.received_at` and Genesys times.
This module imports no asyncio/httpx/websockets/aiohttp and never blocks.
"""

from __future__ import annotations

import heapq
import json
import math
import re
import string
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, Literal

from daemon.core.logs import get_logger

from daemon.config import Config, ConfigSource, RuleSpec, SafetySettings, load_list_file
from daemon.errors import ConfigError
from daemon.core.enforcement import FIRED, Enforcement
from daemon.core.ids import ConversationId, ParticipantId, RuleName
from daemon.core.model import Action, Call, Change, Decision, Participant, Severity
from daemon.core.phone import normalize_phone

log = get_logger(__name__)

Path_ = tuple[str | int, ...]
Pred = Callable[[Call, Participant, float], bool]
Getter = Callable[[Call, Participant, float], Any]
FlipFn = Callable[[Call, Participant, float], "float | None"]

# A time threshold is scheduled this long after the exact instant, so float rounding of
# `now - connected_time` can never leave the condition one ulp short at the wake-up.
_TIME_EPSILON = 0.001
_PURPOSE_CACHE_MAX = 512
_MESSAGE_MAX = 2000
MISSING_TEXT = "-"


@lru_cache(maxsize=65536)
def _norm(value: str) -> str:
    return normalize_phone(value)


def _num(value: Any) -> float | None:
    """A participant-data string as a number, or None when it is not one (never raises)."""
    if value is None:
        return None
    try:
        x = float(value)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(x) else x


# ---------------------------------------------------------------- fields

FieldKind = Literal["str", "phone", "bool", "num", "attr", "set"]


@dataclass(frozen=True, slots=True)
class _Field:
    """A field rules can test. `expr` is its Python expression over `c` (call), `p` (party)
    and `n` (now) in generated predicates; `get` the same as a function (for `matched`)."""

    label: str  # as shown in Decision.matched: "purpose", "attributes.x", "call.connected_parties"
    kind: FieldKind
    expr: str
    get: Getter  # phone fields: normalised value
    cost: int  # lower runs first
    raw_expr: str | None = None  # phone fields: the value as Genesys sent it
    time_dependent: bool = False


def _nn(value: str | None) -> str | None:
    """Null-safe cached phone normalisation."""
    return None if value is None else _norm(value)


def _pattr(name: str) -> Getter:
    def get(c: Call, p: Participant, n: float) -> Any:
        return getattr(p, name)
    return get


def _pphone(name: str) -> Getter:
    def get(c: Call, p: Participant, n: float) -> Any:
        return _nn(getattr(p, name))
    return get


def _cattr(name: str) -> Getter:
    def get(c: Call, p: Participant, n: float) -> Any:
        return getattr(c, name)
    return get


def _get_connected_seconds(c: Call, p: Participant, n: float) -> Any:
    return p.connected_seconds(n)


_STR_PARTY = ("id", "name", "direction", "user_id", "queue_id", "team_id", "external_contact_id",
              "external_organization_id", "flagged_reason", "provider",
              "monitored_participant_id", "coached_participant_id", "barged_participant_id")
_PHONE_PARTY = ("address", "ani", "dnis")
_BOOL_PARTY = ("held", "muted", "confined", "recording")

PARTY_FIELDS: dict[str, _Field] = {
    "purpose": _Field("purpose", "str", "p.purpose", _pattr("purpose"), 0),
    "state": _Field("state", "str", "p.state", _pattr("state"), 1),
    **{n: _Field(n, "str", f"p.{n}", _pattr(n), 3) for n in _STR_PARTY},
    **{n: _Field(n, "phone", f"NP(p.{n})", _pphone(n), 4, raw_expr=f"p.{n}") for n in _PHONE_PARTY},
    **{n: _Field(n, "bool", f"p.{n}", _pattr(n), 2) for n in _BOOL_PARTY},
    "connected_seconds": _Field("connected_seconds", "num", "p.connected_seconds(n)",
                                _get_connected_seconds, 4, time_dependent=True),
}

CALL_FIELDS: dict[str, _Field] = {
    "id": _Field("call.id", "str", "c.id", _cattr("id"), 6),
    "recording_state": _Field("call.recording_state", "str", "c.recording_state",
                              _cattr("recording_state"), 6),
    "secure_pause": _Field("call.secure_pause", "bool", "c.secure_pause", _cattr("secure_pause"), 6),
    "connected_parties": _Field("call.connected_parties", "num", "c.connected_parties",
                                _cattr("connected_parties"), 7),
    "queue_ids": _Field("call.queue_ids", "set", "c.queue_ids", _cattr("queue_ids"), 7),
}
CALL_SPECIAL = ("has_party",)
COMBINATORS = ("any", "all", "not")
OPERATORS = ("equals", "not_equals", "in", "not_in", "in_list", "not_in_list", "matches",
             "contains", "starts_with", "exists", "gt", "gte", "lt", "lte")
_NUMERIC_OPS = {"gt": ">", "gte": ">=", "lt": "<", "lte": "<="}
_MAX_DEPTH = 24


# ---------------------------------------------------------------- compiled nodes


@dataclass(frozen=True, slots=True)
class _Node:
    expr: str  # a Python boolean expression over c, p, n and the compiler's constants
    fields: tuple[_Field, ...]  # every field that took part (for Decision.matched)
    deps: frozenset[str]  # labels it reads; {"purpose"} alone makes it a prefilter
    cost: int
    flip: FlipFn | None  # earliest future time its truth may change with no event
    text: str  # how it was written, for explain


def _min_flip(flips: Sequence[FlipFn]) -> FlipFn | None:
    if not flips:
        return None
    if len(flips) == 1:
        return flips[0]
    t = tuple(flips)

    def flip(c: Call, p: Participant, n: float) -> float | None:
        best: float | None = None
        for f in t:
            x = f(c, p, n)
            if x is not None and (best is None or x < best):
                best = x
        return best
    return flip


def _merge_fields(nodes: Iterable[_Node]) -> tuple[_Field, ...]:
    out: dict[str, _Field] = {}
    for nd in nodes:
        for f in nd.fields:
            out.setdefault(f.label, f)
    return tuple(out.values())


def _and_nodes(nodes: Sequence[_Node], text: str) -> _Node:
    ordered = sorted(nodes, key=lambda nd: nd.cost)  # stable: written order among equals
    return _Node(
        expr=" and ".join(f"({nd.expr})" for nd in ordered) if ordered else "True",
        fields=_merge_fields(ordered),
        deps=frozenset().union(*(nd.deps for nd in ordered)),
        cost=max((nd.cost for nd in ordered), default=0),
        flip=_min_flip([nd.flip for nd in ordered if nd.flip is not None]),
        text=text,
    )


def _short(value: Any) -> str:
    text = json.dumps(value, default=str, ensure_ascii=False)
    return text if len(text) <= 80 else text[:77] + "..."


# ---------------------------------------------------------------- compiler


@dataclass(slots=True)
class _Ctx:
    src: ConfigSource
    lists: dict[str, frozenset[str]]
    used_lists: set[str] = field(default_factory=set)
    # Generated predicates see only these names: helpers and constants, never config text.
    ns: dict[str, Any] = field(default_factory=lambda: {"__builtins__": {"any": any, "bool": bool},
                                                        "NP": _nn, "NUM": _num})
    shared: dict[tuple[type, Any], str] = field(default_factory=dict)

    def err(self, path: Path_, message: str, *, key: bool = False) -> ConfigError:
        return self.src.error(path, message, key=key)

    def const(self, value: Any) -> str:
        """A name for `value` in generated code. Equal scalars share a name, so identical
        sub-expressions of different rules read the same and can be computed once (_fuse)."""
        key = (type(value), value) if type(value) in (str, int, float, bool) else None
        if key is not None and key in self.shared:
            return self.shared[key]
        name = f"K{len(self.ns)}"
        self.ns[name] = value
        if key is not None:
            self.shared[key] = name
        return name

    def make(self, expr: str, path: Path_) -> Pred:
        """Compile a generated expression into a function (c, p, n) -> bool."""
        code = f"def _pred(c, p, n):\n    return {expr}\n"
        scope: dict[str, Any] = {}
        try:
            exec(compile(code, "<rule>", "exec"), self.ns, scope)  # noqa: S102 - generated, no config text
        except (SyntaxError, RecursionError, MemoryError):
            raise self.err(path, "condition too complex to compile; split it into several rules") from None
        pred: Pred = scope["_pred"]
        return pred


def _type_name(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "text"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "a mapping"
    return type(value).__name__


def _attr_field(key: str, ctx: _Ctx | None) -> _Field:
    def get(c: Call, p: Participant, n: float) -> Any:
        return p.attributes.get(key)
    expr = f"p.attributes.get({ctx.const(key)})" if ctx is not None else ""
    return _Field(f"attributes.{key}", "attr", expr, get, 5)


class _Compiler:
    def __init__(self, ctx: _Ctx) -> None:
        self.ctx = ctx
        self.depth = 0

    # -- groups ---------------------------------------------------------------

    def group(self, mapping: Any, path: Path_, context: Literal["party", "call"]) -> _Node:
        """A mapping of conditions that must all hold."""
        if not isinstance(mapping, dict):
            raise self.ctx.err(path, f"expected a mapping of conditions, got {_type_name(mapping)}")
        if not mapping:
            raise self.ctx.err(path, "empty condition mapping: write at least one condition")
        self.depth += 1
        if self.depth > _MAX_DEPTH:
            raise self.ctx.err(path, f"conditions nested deeper than {_MAX_DEPTH} levels")
        try:
            nodes = [self.entry(k, v, path + (k,), context) for k, v in mapping.items()]
        finally:
            self.depth -= 1
        return _and_nodes(nodes, " and ".join(nd.text for nd in nodes))

    def entry(self, key: str, value: Any, path: Path_, context: Literal["party", "call"]) -> _Node:
        if key in COMBINATORS:
            return self.combinator(key, value, path, context)
        if context == "call" or key.startswith("call."):
            name = key.removeprefix("call.")
            if name == "has_party":
                return self.has_party(value, path)
            fld = CALL_FIELDS.get(name)
            if fld is None:
                known = ", ".join([*CALL_FIELDS, *CALL_SPECIAL])
                where = "call field" if context == "call" else "call field after 'call.'"
                raise self.ctx.err(path, f"unknown {where} {name!r}; known call fields: {known}; "
                                         f"combinators: any, all, not", key=True)
            return self.field_conditions(fld, value, path)
        if key.startswith("attributes."):
            attr = key[len("attributes."):]
            if not attr:
                raise self.ctx.err(path, "'attributes.' needs a participant data key, "
                                         "e.g. attributes.complianceFlag", key=True)
            return self.field_conditions(_attr_field(attr, self.ctx), value, path)
        fld = PARTY_FIELDS.get(key)
        if fld is None:
            hint = ""
            if key in CALL_FIELDS or key in CALL_SPECIAL:
                hint = f" ({key!r} is a call field: put it under 'call:' or write 'call.{key}')"
            known = ", ".join([*PARTY_FIELDS, "attributes.<key>"])
            raise self.ctx.err(path, f"unknown party field {key!r}{hint}; known party fields: "
                                     f"{known}; combinators: any, all, not", key=True)
        return self.field_conditions(fld, value, path)

    def combinator(self, key: str, value: Any, path: Path_, context: Literal["party", "call"]) -> _Node:
        if key == "not":
            inner = self.group(value, path, context)
            return _Node(f"not ({inner.expr})", inner.fields, inner.deps, inner.cost + 1,
                         inner.flip, f"not ({inner.text})")
        if not isinstance(value, list) or not value:
            raise self.ctx.err(path, f"{key!r} takes a non-empty list of condition mappings, "
                                     f"e.g. {key}: [{{purpose: external}}, {{state: connected}}]; "
                                     f"got {_type_name(value)}")
        subs = [self.group(v, path + (i,), context) for i, v in enumerate(value)]
        if key == "all":
            return _and_nodes(subs, "all(" + "; ".join(s.text for s in subs) + ")")
        subs.sort(key=lambda s: s.cost)
        return _Node(" or ".join(f"({s.expr})" for s in subs), _merge_fields(subs),
                     frozenset().union(*(s.deps for s in subs)), max(s.cost for s in subs) + 1,
                     _min_flip([s.flip for s in subs if s.flip is not None]),
                     "any(" + "; ".join(s.text for s in subs) + ")")

    def has_party(self, value: Any, path: Path_) -> _Node:
        if not isinstance(value, dict):
            raise self.ctx.err(path, "'has_party' takes a mapping of party conditions, "
                                     f"e.g. has_party: {{purpose: acd}}; got {_type_name(value)}")
        inner = self.group(value, path, "party")
        ip = self.ctx.make(inner.expr, path)

        def other_match(c: Call, p: Participant, n: float) -> Participant | None:
            pid = p.id
            for q in c.participants.values():
                if q.id != pid and ip(c, q, n):
                    return q
            return None

        def get(c: Call, p: Participant, n: float) -> Any:
            q = other_match(c, p, n)
            return None if q is None else q.id

        flip: FlipFn | None = None
        if inner.flip is not None:
            iflip = inner.flip

            def flip_others(c: Call, p: Participant, n: float) -> float | None:
                best: float | None = None
                for q in c.participants.values():
                    if q.id != p.id:
                        x = iflip(c, q, n)
                        if x is not None and (best is None or x < best):
                            best = x
                return best
            flip = flip_others
        fld = _Field("call.has_party", "str", "", get, 9)
        h = self.ctx.const(other_match)
        return _Node(f"{h}(c, p, n) is not None", (fld,), frozenset({"call.has_party"}), 9, flip,
                     f"call.has_party({inner.text})")

    # -- one field ------------------------------------------------------------

    def field_conditions(self, fld: _Field, value: Any, path: Path_) -> _Node:
        if isinstance(value, dict):
            if not value:
                raise self.ctx.err(path, f"empty operator mapping for {fld.label!r}; "
                                         f"operators: {', '.join(OPERATORS)}")
            nodes = []
            for op, arg in value.items():
                if op not in OPERATORS:
                    raise self.ctx.err(path + (op,), f"unknown operator {op!r} for {fld.label!r}; "
                                                     f"operators: {', '.join(OPERATORS)}", key=True)
                nodes.append(self.op(fld, op, arg, path + (op,)))
            return _and_nodes(nodes, " and ".join(nd.text for nd in nodes))
        if isinstance(value, list):
            raise self.ctx.err(path, f"a bare list for {fld.label!r} is ambiguous: write "
                                     f"{{in: [...]}} (any of these) instead")
        if value is None:
            raise self.ctx.err(path, f"a bare null for {fld.label!r}: write {{exists: false}} "
                                     f"to require that the field is absent")
        return self.op(fld, "equals", value, path)

    def op(self, fld: _Field, op: str, arg: Any, path: Path_) -> _Node:
        expr, flip = self._test(fld, op, arg, path)
        text = f"{fld.label} {op} {_short(arg)}"
        cost = fld.cost + (3 if op == "matches" else 0)
        return _Node(expr, (fld,), frozenset({fld.label}), cost, flip, text)

    def _cannot(self, fld: _Field, op: str, path: Path_, why: str) -> ConfigError:
        return self.ctx.err(path, f"operator {op!r} cannot work on {fld.label!r}: {why}", key=True)

    def _scalar(self, fld: _Field, arg: Any, path: Path_, op: str) -> Any:
        """Check one comparison value against the field's type; return it in comparable form."""
        kind = fld.kind
        if kind == "bool":
            if isinstance(arg, bool):
                return arg
            hint = (f"; write {str(arg).lower()} without quotes"
                    if isinstance(arg, str) and arg.strip().lower() in ("true", "false") else "")
            raise self.ctx.err(path, f"{fld.label!r} is true or false; {op} needs a boolean, "
                                     f"got {_type_name(arg)} {_short(arg)}{hint}")
        if kind == "num":
            if isinstance(arg, (int, float)) and not isinstance(arg, bool) and math.isfinite(arg):
                return float(arg)
            raise self.ctx.err(path, f"{fld.label!r} is a number; {op} needs a number, "
                                     f"got {_type_name(arg)} {_short(arg)}")
        if kind == "attr":
            if isinstance(arg, bool):
                return "true" if arg else "false"
            if isinstance(arg, (int, float)):
                if not math.isfinite(arg):
                    raise self.ctx.err(path, f"{op} needs a finite number")
                return float(arg)
            if isinstance(arg, str):
                return arg
            raise self.ctx.err(path, f"{op} on {fld.label!r} needs text or a number, "
                                     f"got {_type_name(arg)}")
        # str, phone, set: text; whole numbers are accepted as text (phone numbers, ids)
        if isinstance(arg, bool) or not isinstance(arg, (str, int)):
            raise self.ctx.err(path, f"{fld.label!r} is text; {op} needs text, got "
                                     f"{_type_name(arg)} {_short(arg)}")
        text = str(arg)
        return _norm(text) if kind == "phone" else text

    def _list(self, fld: _Field, arg: Any, path: Path_, op: str) -> list[Any]:
        if not isinstance(arg, list):
            raise self.ctx.err(path, f"{op} needs a list, e.g. {op}: [a, b]; got {_type_name(arg)} "
                                     f"{_short(arg)} (for a single value use equals)")
        return [self._scalar(fld, v, path + (i,), op) for i, v in enumerate(arg)]

    def _named_list(self, fld: _Field, arg: Any, path: Path_, op: str) -> frozenset[str]:
        if fld.kind in ("bool", "num"):
            raise self._cannot(fld, op, path, "lists hold text; use in/not_in with values")
        if not isinstance(arg, str):
            raise self.ctx.err(path, f"{op} takes the name of a list under 'lists:', "
                                     f"got {_type_name(arg)}")
        values = self.ctx.lists.get(arg)
        if values is None:
            known = ", ".join(sorted(self.ctx.lists)) or "none defined"
            raise self.ctx.err(path, f"unknown list {arg!r} (lists: {known})")
        self.ctx.used_lists.add(arg)
        if fld.kind == "phone":
            return frozenset(_norm(v) for v in values)
        return values

    def _test(self, fld: _Field, op: str, arg: Any, path: Path_) -> tuple[str, FlipFn | None]:
        v = fld.expr
        kind = fld.kind
        k = self.ctx.const

        if op == "exists":
            if not isinstance(arg, bool):
                raise self.ctx.err(path, f"exists takes true or false, got {_type_name(arg)} "
                                         f"{_short(arg)}")
            if kind == "set":
                return (f"bool({v})" if arg else f"not {v}"), None
            return (f"{v} is not None" if arg else f"{v} is None"), None

        if op in _NUMERIC_OPS:
            if kind not in ("num", "attr"):
                what = "true/false" if kind == "bool" else "text"
                raise self._cannot(fld, op, path, f"it is {what}, not a number")
            if isinstance(arg, bool) or not isinstance(arg, (int, float)) or not math.isfinite(arg):
                raise self.ctx.err(path, f"{op} needs a number, got {_type_name(arg)} {_short(arg)}")
            x = float(arg)
            value = f"NUM({v})" if kind == "attr" else v
            flip = _time_flip([x]) if fld.time_dependent else None
            return f"(v := {value}) is not None and v {_NUMERIC_OPS[op]} {k(x)}", flip

        if op in ("in_list", "not_in_list"):
            values = k(self._named_list(fld, arg, path, op))
            expr = f"not {values}.isdisjoint({v})" if kind == "set" else f"{v} in {values}"
            return (f"not ({expr})" if op == "not_in_list" else expr), None

        if op in ("matches", "contains", "starts_with"):
            if kind in ("bool", "num"):
                what = "true/false" if kind == "bool" else "a number"
                raise self._cannot(fld, op, path, f"it is {what}, not text")
            if not isinstance(arg, str):
                raise self.ctx.err(path, f"{op} needs text, got {_type_name(arg)} {_short(arg)}")
            return self._text_op(fld, op, arg, path), None

        # equals / not_equals / in / not_in
        if op in ("equals", "not_equals"):
            wanted = [self._scalar(fld, arg, path, op)]
        else:
            wanted = self._list(fld, arg, path, op)
        expr = self._membership(fld, wanted)
        flip = _time_flip([float(w) for w in wanted]) if fld.time_dependent else None
        return (f"not ({expr})" if op in ("not_equals", "not_in") else expr), flip

    def _membership(self, fld: _Field, wanted: list[Any]) -> str:
        """An expression: the field's value equals one of `wanted` (in comparable form)."""
        v = fld.expr
        k = self.ctx.const
        if fld.kind == "set":
            return f"not {k(frozenset(wanted))}.isdisjoint({v})"
        if fld.kind == "attr":
            strs = frozenset(w for w in wanted if isinstance(w, str))
            nums = frozenset(w for w in wanted if isinstance(w, float))
            if nums:
                # "80" and "80.0" both equal 80; a non-numeric value equals no number
                return f"(a := {v}) is not None and (a in {k(strs)} or NUM(a) in {k(nums)})"
            wanted = list(strs)
        if len(wanted) == 1:
            return f"{v} == {k(wanted[0])}"
        return f"{v} in {k(frozenset(wanted))}"

    def _text_op(self, fld: _Field, op: str, arg: str, path: Path_) -> str:
        v = fld.expr
        k = self.ctx.const
        if op == "matches":
            try:
                rx = re.compile(arg)
            except re.error as exc:
                raise self.ctx.err(path, f"bad regular expression {arg!r}: {exc}") from None
            full = k(rx.fullmatch)
            if fld.kind == "set":
                return f"any({full}(x) is not None for x in {v})"
            if fld.kind == "phone":
                # as sent (sip:...@host patterns) or normalised (+44... patterns)
                raw = fld.raw_expr
                return f"{raw} is not None and ({full}({raw}) is not None or {full}({v}) is not None)"
            return f"(s := {v}) is not None and {full}(s) is not None"
        x = k(_norm(arg) if fld.kind == "phone" else arg)
        if op == "contains":
            if fld.kind == "set":
                return f"{x} in {v}"
            return f"(s := {v}) is not None and {x} in s"
        if fld.kind == "set":
            return f"any(y.startswith({x}) for y in {v})"
        return f"(s := {v}) is not None and s.startswith({x})"


def _time_flip(thresholds: list[float]) -> FlipFn:
    """For `connected_seconds`: the next instant a threshold is crossed, for a party that is
    connected and still on the call (an ended party's time is frozen)."""
    ts = sorted(set(thresholds))

    def flip(c: Call, p: Participant, n: float) -> float | None:
        ct = p.connected_time
        if ct is None or p.end_time is not None:
            return None
        for x in ts:
            at = ct + x + _TIME_EPSILON
            if at > n:
                return at
        return None
    return flip


# ---------------------------------------------------------------- hold_for and messages

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*$")
_UNIT = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}


def parse_duration(value: Any) -> float | None:
    """Seconds from "500ms", "10s", "2m", "1h", "10" or a number; None when not a duration."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        x = float(value)
    elif isinstance(value, str):
        m = _DURATION.match(value)
        if not m:
            return None
        x = float(m.group(1)) * _UNIT[m.group(2)]
    else:
        return None
    return x if math.isfinite(x) and x >= 0 else None


def _display(value: Any) -> str:
    if value is None:
        return MISSING_TEXT
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return str(int(value)) if value.is_integer() else f"{value:.3f}"
    if isinstance(value, (set, frozenset)):
        return ",".join(sorted(value))
    if isinstance(value, (list, tuple)):
        return ",".join(str(v) for v in value)
    return str(value)


Renderer = Callable[[Call, Participant, float], str]
_PARTY_PLACEHOLDERS = (*PARTY_FIELDS, "connected_time", "end_time", "disconnect_type")


def _compile_message(spec: RuleSpec, template: str, path: Path_, ctx: _Ctx) -> Renderer:
    """Check placeholders at load; the renderer converts every value to text and never raises."""
    try:
        parts = list(string.Formatter().parse(template))
    except ValueError as exc:
        raise ctx.err(path, f"bad message template: {exc} (write {{{{ and }}}} for literal braces)") from None
    pieces: list[str | Getter] = []
    rule_values = {"name": spec.name, "description": spec.description, "severity": spec.severity,
                   "action": spec.action, "tags": ",".join(spec.tags)}
    for literal, name, fmt, conv in parts:
        if literal:
            pieces.append(literal)
        if name is None:
            continue
        if fmt or conv:
            raise ctx.err(path, f"placeholder {{{name}}}: format specs and conversions are not supported")
        getter: Getter | None = None
        if name.startswith("party.attributes.") and len(name) > len("party.attributes."):
            getter = _attr_field(name[len("party.attributes."):], None).get
        elif name.startswith("party.") and name[6:] in _PARTY_PLACEHOLDERS:
            if name[6:] == "connected_seconds":
                getter = _get_connected_seconds
            else:
                getter = _pattr(name[6:])  # as sent: an operator reads +44 20..., not +4420...
        elif name.startswith("call.") and name[5:] in CALL_FIELDS:
            getter = CALL_FIELDS[name[5:]].get
        elif name.startswith("rule.") and name[5:] in rule_values:
            const = rule_values[name[5:]]
            getter = (lambda v: lambda c, p, n: v)(const)
        if getter is None:
            raise ctx.err(path, f"unknown placeholder {{{name}}} in message; use {{party.<field>}}, "
                                f"{{party.attributes.<key>}}, {{call.<field>}} or "
                                f"{{rule.name|description|severity|action|tags}}")
        pieces.append(getter)
    frozen = tuple(pieces)

    def render(c: Call, p: Participant, n: float) -> str:
        try:
            out = "".join(x if isinstance(x, str) else _display(x(c, p, n)) for x in frozen)
        except Exception:  # a message must never stop a decision
            log.warning("rule_message_render_failed", rule=spec.name)
            return f"rule {spec.name} matched"
        return out if len(out) <= _MESSAGE_MAX else out[:_MESSAGE_MAX - 3] + "..."
    return render


DEFAULT_MESSAGE = "{rule.name}: {party.purpose} party {party.id} on call {call.id}"


# ---------------------------------------------------------------- rule set


@dataclass(frozen=True, slots=True, eq=False)
class CompiledRule:
    """One enabled rule, ready to run. `admits(purpose)` is the purpose-only prefilter;
    `test` the remaining conditions; `check` both (for timers and explain)."""

    name: RuleName
    action: Action
    severity: Severity
    tags: tuple[str, ...]
    hold: float | None  # seconds, hold_for
    admits: Callable[[str | None], bool]
    test: Pred
    flip: FlipFn | None  # next instant a time condition may change (connected_seconds)
    static: Pred  # the conditions that do not depend on time: false means no timer needed
    fields: tuple[_Field, ...]
    render: Renderer
    fingerprint: str
    conditions: tuple[tuple[str, Pred], ...]  # top-level conditions, for explain
    description: str | None = None
    condition_fields: tuple[tuple[_Field, ...], ...] = ()  # per condition: the fields it reads
    test_expr: str = "True"  # the generated expression behind `test` (for fused plans)

    @property
    def stateful(self) -> bool:
        return self.hold is not None or self.flip is not None

    def check(self, call: Call, party: Participant, now: float) -> bool:
        return self.admits(party.purpose) and self.test(call, party, now)

    def matched(self, call: Call, party: Participant, now: float) -> dict[str, object]:
        out: dict[str, object] = {}
        for f in self.fields:
            try:
                v = f.get(call, party, now)
            except Exception:  # pragma: no cover - getters read plain data
                v = None
            if isinstance(v, (set, frozenset)):
                v = sorted(v)
            elif isinstance(v, float):
                v = round(v, 3)
            out[f.label] = v
        return out


@dataclass(eq=False)
class RuleSet:
    """The compiled configuration: enabled rules, mode, safety settings and list contents."""

    rules: tuple[CompiledRule, ...]
    mode: Literal["enforce", "observe"]
    safety: SafetySettings
    lists: Mapping[str, frozenset[str]]
    disabled: tuple[RuleName, ...] = ()
    namespace: dict[str, Any] = field(default_factory=dict, repr=False)  # generated code's names
    _plans: dict[str | None, _Plan] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        self.by_name: dict[RuleName, CompiledRule] = {r.name: r for r in self.rules}

    def rules_for(self, purpose: str | None) -> tuple[CompiledRule, ...]:
        """The rules whose purpose conditions admit this purpose."""
        return tuple(r for r in self.rules if r.admits(purpose))

    def plan_for(self, purpose: str | None) -> _Plan:
        """How to judge a party of this purpose (cached per purpose, bounded)."""
        hit = self._plans.get(purpose)
        if hit is not None:
            return hit
        admitted = self.rules_for(purpose)
        plain = tuple(r for r in admitted if not r.stateful)
        timed = tuple((r.name, r.test, r.static if r.flip else r.test, r)
                      for r in admitted if r.stateful)
        cacheable = len(self._plans) < _PURPOSE_CACHE_MAX  # purposes come from outside: bound it
        fused = _fuse(plain, self.namespace) if cacheable and self.namespace else _loop(plain)
        plan = _Plan(fused, plain, timed)
        if cacheable:
            self._plans[purpose] = plan
        return plan


_Step = tuple[RuleName, Pred, Pred, CompiledRule]
Matcher = Callable[[Call, Participant, float], "tuple[int, ...]"]


@dataclass(frozen=True, slots=True)
class _Plan:
    """`fused(c, p, n)` gives the indexes into `plain` of the plain rules whose conditions
    hold, in one generated function (no call per rule). `timed` are hold_for/time rules as
    (name, test, gate, rule): when `gate` is false the rule cannot hold now or by timer."""

    fused: Matcher
    plain: tuple[CompiledRule, ...]
    timed: tuple[_Step, ...]


# Sub-expressions worth computing once per party when several rules use them: phone
# normalisation, participant data (as text and as a number), derived counts.
_HOISTABLE = re.compile(r"NUM\(p\.attributes\.get\(K\d+\)\)|NP\(p\.\w+\)"
                        r"|p\.attributes\.get\(K\d+\)|p\.connected_seconds\(n\)|c\.connected_parties")


def _fuse(rules: Sequence[CompiledRule], namespace: dict[str, Any]) -> Matcher:
    counts: dict[str, int] = {}
    for r in rules:
        for m in _HOISTABLE.finditer(r.test_expr):
            counts[m.group(0)] = counts.get(m.group(0), 0) + 1
    hoisted = {text: f"_e{i}" for i, text in enumerate(t for t, c in counts.items() if c > 1)}
    lines = ["def _match(c, p, n):", "    hits = ()"]
    lines.extend(f"    {name} = {text}" for text, name in hoisted.items())
    for i, r in enumerate(rules):
        expr = _HOISTABLE.sub(lambda m: hoisted.get(m.group(0), m.group(0)), r.test_expr)
        lines.append(f"    if {expr}:")
        lines.append(f"        hits += ({i},)")
    lines.append("    return hits")
    scope: dict[str, Any] = {}
    try:
        exec(compile("\n".join(lines) + "\n", "<rules>", "exec"), namespace, scope)  # noqa: S102
    except (SyntaxError, RecursionError, MemoryError):  # pragma: no cover - each rule compiled alone
        return _loop(rules)
    fused: Matcher = scope["_match"]
    return fused


def _loop(rules: Sequence[CompiledRule]) -> Matcher:
    tests = tuple(r.test for r in rules)

    def match(c: Call, p: Participant, n: float) -> tuple[int, ...]:
        return tuple(i for i, t in enumerate(tests) if t(c, p, n))
    return match


def _load_lists(cfg: Config, src: ConfigSource) -> dict[str, frozenset[str]]:
    out: dict[str, frozenset[str]] = {}
    for name, spec in cfg.lists.items():
        if spec.file is not None:
            try:
                values = load_list_file(cfg.resolve_path(spec.file))
            except ConfigError as exc:
                raise src.error(("lists", name, "file"), f"list {name!r}: {exc.message}") from None
        else:
            values = [str(v) for v in spec.values or ()]
        out[name] = frozenset(values)
    return out


def _purpose_admits(preds: Sequence[Pred]) -> Callable[[str | None], bool]:
    if not preds:
        return lambda purpose: True
    dummy_call = Call(id=ConversationId(""))

    def admits(purpose: str | None) -> bool:
        probe = Participant(id=ParticipantId(""), purpose=purpose)
        return all(f(dummy_call, probe, 0.0) for f in preds)
    return admits


def _compile_one(spec: RuleSpec, i: int, ctx: _Ctx) -> CompiledRule:
    base: Path_ = ("rules", i)
    if not spec.when and not spec.call:
        raise ctx.err(base, f"rule {spec.name!r} has no conditions: it would match every party; "
                            f"add 'when' and/or 'call' conditions")
    ctx.used_lists = set()
    comp = _Compiler(ctx)
    top: list[_Node] = []
    for k, v in spec.when.items():
        top.append(comp.entry(k, v, base + ("when", k), "party"))
    for k, v in spec.call.items():
        top.append(comp.entry(k, v, base + ("call", k), "call"))
    hold: float | None = None
    if spec.hold_for is not None:
        hold = parse_duration(spec.hold_for)
        if hold is None:
            raise ctx.err(base + ("hold_for",), f"bad hold_for {spec.hold_for!r}: expected a duration "
                                                f"such as 500ms, 10s, 2m, 1h or a number of seconds")
    render = _compile_message(spec, spec.message if spec.message is not None else DEFAULT_MESSAGE,
                              base + ("message",), ctx)
    # Conditions that read only `purpose` become a per-purpose prefilter (RuleSet.rules_for),
    # so a rule for external parties costs nothing when an agent is judged.
    only_purpose = frozenset({"purpose"})
    top_preds = [ctx.make(nd.expr, base) for nd in top]
    prefilter = [pr for nd, pr in zip(top, top_preds) if nd.deps == only_purpose]
    rest = [nd for nd in top if nd.deps != only_purpose]
    body = _and_nodes(rest, "")
    allnodes = _and_nodes(top, "")
    static = _and_nodes([nd for nd in rest if nd.flip is None], "")
    fingerprint = json.dumps({"when": spec.when, "call": spec.call, "hold": hold, "action": spec.action,
                              "lists": {n: sorted(ctx.lists[n]) for n in sorted(ctx.used_lists)}},
                             sort_keys=True, default=str)
    return CompiledRule(
        name=RuleName(spec.name), action=spec.action, severity=spec.severity, tags=tuple(spec.tags),
        hold=hold, admits=_purpose_admits(prefilter), test=ctx.make(body.expr, base),
        test_expr=body.expr,
        flip=allnodes.flip, static=ctx.make(static.expr, base) if allnodes.flip else _always,
        fields=allnodes.fields, render=render, fingerprint=fingerprint,
        conditions=tuple((nd.text, pr) for nd, pr in zip(top, top_preds)),
        condition_fields=tuple(nd.fields for nd in top),
        description=spec.description)


def _always(c: Call, p: Participant, n: float) -> bool:
    return True


def compile_rules(cfg: Config) -> RuleSet:
    """Check and compile every rule of `cfg`; load every declared list.

    Raises ConfigError `file:line:col: ...` at the offending key or value. Disabled rules
    are checked too (a typo is caught before someone enables the rule) but not run.
    """
    src = cfg.source or ConfigSource(file="<config>")
    ctx = _Ctx(src=src, lists=_load_lists(cfg, src))
    rules: list[CompiledRule] = []
    disabled: list[RuleName] = []
    for i, spec in enumerate(cfg.rules):
        compiled = _compile_one(spec, i, ctx)
        if spec.enabled:
            rules.append(compiled)
        else:
            disabled.append(compiled.name)
    return RuleSet(rules=tuple(rules), mode=cfg.mode, safety=cfg.safety, lists=dict(ctx.lists),
                   disabled=tuple(disabled), namespace=ctx.ns)


# ---------------------------------------------------------------- engine


@dataclass(slots=True)
class _Pending:
    hold_deadline: float | None  # when hold_for is satisfied (None: not holding yet)
    wake: float  # when due() must look again
    seq: int


@dataclass(slots=True)
class _CallState:
    call: Call
    pending: dict[tuple[RuleName, ParticipantId], _Pending] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class ConditionVerdict:
    """One top-level condition of a rule judged for a party: `text` as written, `scope`
    "call" when it reads only call fields, the value of each field it read, and whether
    it holds."""

    text: str
    scope: Literal["party", "call"]
    holds: bool
    values: dict[str, object]


@dataclass(frozen=True, slots=True)
class Verdict:
    """Why a rule does or does not hold for a party (for `explain` and replay)."""

    rule: RuleName
    holds: bool
    failed: tuple[str, ...]  # the top-level conditions that are false, as written
    values: dict[str, object]
    conditions: tuple[ConditionVerdict, ...] = ()  # every top-level condition, in written order


class RuleEngine:
    """Evaluates a RuleSet against call changes; keeps timer state per call.

    The edge state ("rule R fired for party P") lives in `enforcement` (the one owner of
    enforcement state, shared with the enforcer); one is made (with the rule set's valve
    budget) when none is given.
    """

    def __init__(self, ruleset: RuleSet, enforcement: Enforcement | None = None) -> None:
        self.ruleset = ruleset
        self.enforcement = enforcement if enforcement is not None else \
            Enforcement(ruleset.safety.max_disconnects_per_minute)
        self._calls: dict[ConversationId, _CallState] = {}
        self._heap: list[tuple[float, int, ConversationId, RuleName, ParticipantId]] = []
        self._seq = 0
        self._live_pending = 0
        self.evaluation_errors = 0  # rule judgments that raised (bad data); see _failed

    # -- events ---------------------------------------------------------------

    def on_change(self, change: Change, now: float) -> list[Decision]:
        """Judge every live party of `change.call`; return what newly fired."""
        call = change.call
        cs = self._calls.get(call.id)
        if cs is None:
            cs = self._calls[call.id] = _CallState(call)
        else:
            cs.call = call
            if cs.pending:
                for p in change.changed:
                    if p.is_final:
                        self._drop_party(cs, p.id)
        return self._evaluate_call(cs, now, change.received_at)

    def reevaluate(self, now: float) -> list[Decision]:
        """Judge every tracked call again (e.g. after `swap`, so new rules see live calls)."""
        out: list[Decision] = []
        for cs in list(self._calls.values()):
            out.extend(self._evaluate_call(cs, now, None))
        return out

    def _evaluate_call(self, cs: _CallState, now: float, received_at: float | None) -> list[Decision]:
        out: list[Decision] = []
        call = cs.call
        plan_for = self.ruleset.plan_for
        marks = self.enforcement.marks
        cmarks = marks(call.id)
        for party in call.participants.values():
            if party.is_final:
                continue
            fired = cmarks.get(party.id) if cmarks is not None else None
            plan = plan_for(party.purpose)
            if plan.plain:
                try:
                    hits = plan.fused(call, party, now)
                except Exception:  # unexpected data: judge rule by rule so one cannot mask others
                    hits = self._hits_one_by_one(plan.plain, call, party, now)
                for i in hits:
                    rule = plan.plain[i]
                    if fired is None or not fired.get(rule.name, 0) & FIRED:
                        out.append(self._fire(cs, rule, party, now, received_at))
                        cmarks = marks(call.id)
                        fired = cmarks.get(party.id) if cmarks is not None else None
            for name, test, gate, rule in plan.timed:
                if fired is not None and fired.get(name, 0) & FIRED:
                    continue
                try:
                    if gate(call, party, now):
                        d = self._judge_stateful(cs, rule, party, now, received_at,
                                                 True if gate is test else test(call, party, now))
                        if d is not None:
                            out.append(d)
                            cmarks = marks(call.id)
                            fired = cmarks.get(party.id) if cmarks is not None else None
                    elif cs.pending:
                        # cannot hold and no timer can make it hold: cancel what was pending
                        if cs.pending.pop((name, party.id), None) is not None:
                            self._live_pending -= 1
                except Exception as exc:
                    self._failed(rule, call, party, exc)
        return out

    def _hits_one_by_one(self, rules: Sequence[CompiledRule], call: Call, party: Participant,
                         now: float) -> tuple[int, ...]:
        hits: list[int] = []
        for i, rule in enumerate(rules):
            try:
                if rule.test(call, party, now):
                    hits.append(i)
            except Exception as exc:
                self._failed(rule, call, party, exc)
        return tuple(hits)

    def _failed(self, rule: CompiledRule, call: Call, party: Participant, exc: Exception) -> None:
        """A rule could not be judged (malformed data slipped through): counted, logged, and
        treated as not matching; the other rules still run."""
        self.evaluation_errors += 1
        log.warning("rule_evaluation_failed", rule=rule.name, conversation_id=call.id,
                    participant_id=party.id, error=exc.__class__.__name__)

    def _judge_stateful(self, cs: _CallState, rule: CompiledRule, party: Participant, now: float,
                        received_at: float | None, holds: bool) -> Decision | None:
        key = (rule.name, party.id)
        pend = cs.pending.get(key)
        call = cs.call
        if holds:
            if rule.hold is None:
                return self._fire(cs, rule, party, now, received_at)
            deadline = pend.hold_deadline if pend is not None and pend.hold_deadline is not None \
                else now + rule.hold
            if deadline <= now:
                return self._fire(cs, rule, party, now, received_at)
            wake = deadline
            if rule.flip is not None:
                f = rule.flip(call, party, now)
                if f is not None and f < wake:
                    wake = f
            self._schedule(cs, key, deadline, wake)
            return None
        f = None
        if rule.flip is not None and rule.static(call, party, now):
            f = rule.flip(call, party, now)
        if f is None:
            if pend is not None:
                del cs.pending[key]
                self._live_pending -= 1
        else:
            self._schedule(cs, key, None, f)
        return None

    def _schedule(self, cs: _CallState, key: tuple[RuleName, ParticipantId],
                  hold_deadline: float | None, wake: float) -> None:
        pend = cs.pending.get(key)
        if pend is not None and pend.wake == wake and pend.hold_deadline == hold_deadline:
            return
        self._seq += 1
        if pend is None:
            self._live_pending += 1
        cs.pending[key] = _Pending(hold_deadline, wake, self._seq)
        heapq.heappush(self._heap, (wake, self._seq, cs.call.id, key[0], key[1]))
        if len(self._heap) > 1024 and len(self._heap) > 4 * self._live_pending:
            self._compact()

    def _compact(self) -> None:
        self._heap = [(p.wake, p.seq, cid, k[0], k[1])
                      for cid, cs in self._calls.items() for k, p in cs.pending.items()]
        heapq.heapify(self._heap)

    def _fire(self, cs: _CallState, rule: CompiledRule, party: Participant, now: float,
              received_at: float | None) -> Decision:
        self.enforcement.mark(rule.name, cs.call.id, party.id, FIRED)
        if cs.pending.pop((rule.name, party.id), None) is not None:
            self._live_pending -= 1
        return self._decision(rule, cs.call, party, now, received_at)

    def _decision(self, rule: CompiledRule, call: Call, party: Participant, now: float,
                  received_at: float | None) -> Decision:
        return Decision(
            rule=rule.name, action=rule.action, conversation_id=call.id, participant_id=party.id,
            purpose=party.purpose, matched=rule.matched(call, party, now), severity=rule.severity,
            tags=rule.tags, message=rule.render(call, party, now), decided_at=now,
            received_at=received_at)

    def _drop_party(self, cs: _CallState, pid: ParticipantId) -> None:
        for key in [k for k in cs.pending if k[1] == pid]:
            del cs.pending[key]
            self._live_pending -= 1

    # -- timers ---------------------------------------------------------------

    def due(self, now: float) -> list[Decision]:
        """Fire hold_for rules whose deadline passed and time conditions that became true,
        judged against the current call state. Call at or after `next_deadline()`."""
        out: list[Decision] = []
        heap = self._heap
        while heap and heap[0][0] <= now:
            _, seq, cid, name, pid = heapq.heappop(heap)
            cs = self._calls.get(cid)
            if cs is None:
                continue
            pend = cs.pending.get((name, pid))
            if pend is None or pend.seq != seq:
                continue  # superseded or cancelled: lazy deletion
            rule = self.ruleset.by_name.get(name)
            party = cs.call.participants.get(pid)
            if rule is None or party is None or not party.is_live or \
                    self.enforcement.has_fired(name, cid, pid):
                del cs.pending[(name, pid)]
                self._live_pending -= 1
                continue
            try:
                d = self._judge_stateful(cs, rule, party, now, None, rule.check(cs.call, party, now))
            except Exception as exc:
                self._failed(rule, cs.call, party, exc)
                d = None
            if d is not None:
                out.append(d)
            else:
                after = cs.pending.get((name, pid))
                if after is not None and after.seq == seq:
                    # the same wake time came back (clock at the edge): never spin on it
                    del cs.pending[(name, pid)]
                    self._live_pending -= 1
        return out

    def next_deadline(self) -> float | None:
        """Earliest pending timer (epoch s), or None."""
        heap = self._heap
        while heap:
            wake, seq, cid, name, pid = heap[0]
            cs = self._calls.get(cid)
            pend = cs.pending.get((name, pid)) if cs is not None else None
            if pend is not None and pend.seq == seq:
                return wake
            heapq.heappop(heap)
        return None

    # -- state ----------------------------------------------------------------

    def rearm(self, rule: RuleName, conversation_id: ConversationId, participant_id: ParticipantId,
              *, at: float | None = None) -> None:
        """Let (rule, call, party) fire again (`Enforcement.rearm`). With `at`, `due(at)`
        re-judges the party even if no event arrives; without it, the next change does."""
        self.enforcement.rearm(rule, conversation_id, participant_id)
        cs = self._calls.get(conversation_id)
        if cs is not None and at is not None and rule in self.ruleset.by_name:
            self._schedule(cs, (rule, participant_id), None, at)

    def has_fired(self, rule: RuleName, conversation_id: ConversationId,
                  participant_id: ParticipantId) -> bool:
        return self.enforcement.has_fired(rule, conversation_id, participant_id)

    def rejudge(self, released: Sequence[tuple[RuleName, ConversationId, ParticipantId]],
                now: float) -> list[Decision]:
        """Removals are possible again: `released` are the held decisions
        (`Enforcement.release_held`). A released hold_for/time rule that still holds fires at
        once (its hold was already served); then every tracked call is judged again, so
        every live party that matches and has not been acted on is decided now."""
        out: list[Decision] = []
        by_name = self.ruleset.by_name
        for name, cid, pid in released:
            rule = by_name.get(name)
            cs = self._calls.get(cid)
            if rule is None or cs is None or not rule.stateful:
                continue
            party = cs.call.participants.get(pid)
            if party is None or not party.is_live or self.enforcement.has_fired(name, cid, pid):
                continue
            try:
                if rule.check(cs.call, party, now):
                    out.append(self._fire(cs, rule, party, now, None))
            except Exception as exc:
                self._failed(rule, cs.call, party, exc)
        out.extend(self.reevaluate(now))
        return out

    def forget_call(self, conversation_id: ConversationId) -> None:
        """Drop this engine's timer state for a call (its heap entries expire lazily); the
        call's marks are the `Enforcement`'s (`Engine` evicts both)."""
        cs = self._calls.pop(conversation_id, None)
        if cs is not None:
            self._live_pending -= len(cs.pending)

    def swap(self, ruleset: RuleSet) -> None:
        """Install a reloaded RuleSet. Fired and timer state survives only for rules whose
        name and definition (conditions, hold_for, action, used list contents) are unchanged."""
        old = self.ruleset.by_name
        keep = {r.name for r in ruleset.rules
                if r.name in old and old[r.name].fingerprint == r.fingerprint}
        self.ruleset = ruleset
        self.enforcement.keep_rules(keep)
        for cs in self._calls.values():
            for key in [k for k in cs.pending if k[0] not in keep]:
                del cs.pending[key]
                self._live_pending -= 1
        log.info("rules_swapped", rules=len(ruleset.rules), kept_state=len(keep))

    @property
    def tracked_calls(self) -> int:
        return len(self._calls)

    @property
    def pending_timers(self) -> int:
        return self._live_pending

    # -- stateless ------------------------------------------------------------

    def evaluate_party(self, call: Call, party: Participant, now: float) -> list[Decision]:
        """Decisions the rules' conditions give for `party` now, ignoring hold_for and
        edge state (nothing is recorded). For replay and explain."""
        return [self._decision(r, call, party, now, None)
                for r in self.ruleset.rules if r.check(call, party, now)]

    def explain(self, call: Call, party: Participant, now: float) -> list[Verdict]:
        """Per rule: does it hold, which top-level conditions fail, and every condition
        with the values it saw (ignoring hold_for and edge state; nothing is recorded)."""
        out: list[Verdict] = []
        for r in self.ruleset.rules:
            conds: list[ConditionVerdict] = []
            for i, (text, pred) in enumerate(r.conditions):
                try:
                    ok = bool(pred(call, party, now))
                except Exception as exc:  # bad data: judged false, as on_change does
                    self._failed(r, call, party, exc)
                    ok = False
                fields = r.condition_fields[i] if i < len(r.condition_fields) else ()
                scope: Literal["party", "call"] = (
                    "call" if fields and all(f.label.startswith("call.") for f in fields) else "party")
                conds.append(ConditionVerdict(text, scope, ok, _seen(fields, call, party, now)))
            failed = tuple(c.text for c in conds if not c.holds)
            out.append(Verdict(r.name, not failed, failed, r.matched(call, party, now), tuple(conds)))
        return out


def _seen(fields: Sequence[_Field], call: Call, party: Participant, now: float) -> dict[str, object]:
    """The value of each field as a rule sees it (sets sorted, floats to 3 places)."""
    out: dict[str, object] = {}
    for f in fields:
        try:
            v = f.get(call, party, now)
        except Exception:  # pragma: no cover - getters read plain data
            v = None
        if isinstance(v, (set, frozenset)):
            v = sorted(v)
        elif isinstance(v, float):
            v = round(v, 3)
        out[f.label] = v
    return out
