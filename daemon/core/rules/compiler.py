"""The rule compiler: YAML rule specs -> checked `CompiledRule`s, errors located.

`compile_rules(cfg, lists)` checks every rule (enabled or not) and returns a `RuleSet` of
generated predicates for the enabled ones; `lists` are the loaded lists
(`daemon.config.load_lists(cfg)`). Anything that cannot work is a `ConfigError`
located `file:line:col` at the offending key or value (a wrong type, an operator that
cannot work on a field, an unknown list or placeholder, a bad regex or duration...).
Nothing of the YAML is interpreted per event. List contents are read by the caller
(`daemon.config.load_lists`); this module reads no file. Durations are parsed by the one
duration parser, `daemon.config.values.parse_duration` (re-exported here).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from daemon.config import Config, ConfigSource, RuleSpec
from daemon.config.values import parse_duration
from daemon.core.ids import ConversationId, ParticipantId, RuleName
from daemon.core.model import Call, Participant
from daemon.core.rules.codegen import Namespace, Node, TooComplex, and_nodes, merge_fields, min_flip, time_flip
from daemon.core.rules.fields import (
    CALL_FIELDS,
    CALL_SPECIAL,
    COMBINATORS,
    NUMERIC_OPS,
    OPERATORS,
    PARTY_FIELDS,
    Field,
    FlipFn,
    Path_,
    Pred,
    attr_field,
    norm,
)
from daemon.core.rules.messages import DEFAULT_MESSAGE, compile_message
from daemon.core.rules.ruleset import CompiledRule, RuleSet
from daemon.errors import ConfigError, ConfigErrors

_MAX_DEPTH = 24


@dataclass(slots=True)
class _Ctx:
    src: ConfigSource
    lists: dict[str, frozenset[str]]
    used_lists: set[str] = field(default_factory=set)
    names: Namespace = field(default_factory=Namespace)

    def err(self, path: Path_, message: str, *, key: bool = False) -> ConfigError:
        return self.src.error(path, message, key=key)

    def const(self, value: object) -> str:
        return self.names.const(value)

    def make(self, expr: str, path: Path_) -> Pred:
        """Compile a generated expression into a function (c, p, n) -> bool."""
        try:
            return self.names.make(expr)
        except TooComplex:
            raise self.err(path, "condition too complex to compile; split it into several rules") from None


def _short(value: object) -> str:
    text = json.dumps(value, default=str, ensure_ascii=False)
    return text if len(text) <= 80 else text[:77] + "..."



def _type_name(value: object) -> str:
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


class _Compiler:
    def __init__(self, ctx: _Ctx) -> None:
        self.ctx = ctx
        self.depth = 0

    # -- groups ---------------------------------------------------------------

    def group(self, mapping: object, path: Path_, context: Literal["party", "call"]) -> Node:
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
        return and_nodes(nodes, " and ".join(nd.text for nd in nodes))

    def entry(self, key: str, value: object, path: Path_, context: Literal["party", "call"]) -> Node:
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
            return self.field_conditions(attr_field(attr, f"p.attributes.get({self.ctx.const(attr)})"), value, path)
        fld = PARTY_FIELDS.get(key)
        if fld is None:
            hint = ""
            if key in CALL_FIELDS or key in CALL_SPECIAL:
                hint = f" ({key!r} is a call field: put it under 'call:' or write 'call.{key}')"
            known = ", ".join([*PARTY_FIELDS, "attributes.<key>"])
            raise self.ctx.err(path, f"unknown party field {key!r}{hint}; known party fields: "
                                     f"{known}; combinators: any, all, not", key=True)
        return self.field_conditions(fld, value, path)

    def combinator(self, key: str, value: object, path: Path_, context: Literal["party", "call"]) -> Node:
        if key == "not":
            inner = self.group(value, path, context)
            return Node(f"not ({inner.expr})", inner.fields, inner.deps, inner.cost + 1,
                         inner.flip, f"not ({inner.text})")
        if not isinstance(value, list) or not value:
            raise self.ctx.err(path, f"{key!r} takes a non-empty list of condition mappings, "
                                     f"e.g. {key}: [{{purpose: external}}, {{state: connected}}]; "
                                     f"got {_type_name(value)}")
        subs = [self.group(v, path + (i,), context) for i, v in enumerate(value)]
        if key == "all":
            return and_nodes(subs, "all(" + "; ".join(s.text for s in subs) + ")")
        subs.sort(key=lambda s: s.cost)
        return Node(" or ".join(f"({s.expr})" for s in subs), merge_fields(subs),
                     frozenset().union(*(s.deps for s in subs)), max(s.cost for s in subs) + 1,
                     min_flip([s.flip for s in subs if s.flip is not None]),
                     "any(" + "; ".join(s.text for s in subs) + ")")

    def has_party(self, value: object, path: Path_) -> Node:
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

        def get(c: Call, p: Participant, n: float) -> object:
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
        fld = Field("call.has_party", "str", "", get, 9)
        h = self.ctx.const(other_match)
        return Node(f"{h}(c, p, n) is not None", (fld,), frozenset({"call.has_party"}), 9, flip,
                     f"call.has_party({inner.text})")

    # -- one field ------------------------------------------------------------

    def field_conditions(self, fld: Field, value: object, path: Path_) -> Node:
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
            return and_nodes(nodes, " and ".join(nd.text for nd in nodes))
        if isinstance(value, list):
            raise self.ctx.err(path, f"a bare list for {fld.label!r} is ambiguous: write "
                                     f"{{in: [...]}} (any of these) instead")
        if value is None:
            raise self.ctx.err(path, f"a bare null for {fld.label!r}: write {{exists: false}} "
                                     f"to require that the field is absent")
        return self.op(fld, "equals", value, path)

    def op(self, fld: Field, op: str, arg: object, path: Path_) -> Node:
        expr, flip = self._test(fld, op, arg, path)
        text = f"{fld.label} {op} {_short(arg)}"
        cost = fld.cost + (3 if op == "matches" else 0)
        return Node(expr, (fld,), frozenset({fld.label}), cost, flip, text)

    def _cannot(self, fld: Field, op: str, path: Path_, why: str) -> ConfigError:
        return self.ctx.err(path, f"operator {op!r} cannot work on {fld.label!r}: {why}", key=True)

    def _scalar(self, fld: Field, arg: object, path: Path_, op: str) -> Any:
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
        return norm(text) if kind == "phone" else text

    def _list(self, fld: Field, arg: object, path: Path_, op: str) -> list[Any]:
        if not isinstance(arg, list):
            raise self.ctx.err(path, f"{op} needs a list, e.g. {op}: [a, b]; got {_type_name(arg)} "
                                     f"{_short(arg)} (for a single value use equals)")
        return [self._scalar(fld, v, path + (i,), op) for i, v in enumerate(arg)]

    def _named_list(self, fld: Field, arg: object, path: Path_, op: str) -> frozenset[str]:
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
            return frozenset(norm(v) for v in values)
        return values

    def _test(self, fld: Field, op: str, arg: object, path: Path_) -> tuple[str, FlipFn | None]:
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

        if op in NUMERIC_OPS:
            if kind not in ("num", "attr"):
                what = "true/false" if kind == "bool" else "text"
                raise self._cannot(fld, op, path, f"it is {what}, not a number")
            if isinstance(arg, bool) or not isinstance(arg, (int, float)) or not math.isfinite(arg):
                raise self.ctx.err(path, f"{op} needs a number, got {_type_name(arg)} {_short(arg)}")
            x = float(arg)
            value = f"NUM({v})" if kind == "attr" else v
            flip = time_flip([x]) if fld.time_dependent else None
            return f"(v := {value}) is not None and v {NUMERIC_OPS[op]} {k(x)}", flip

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
        flip = time_flip([float(w) for w in wanted]) if fld.time_dependent else None
        return (f"not ({expr})" if op in ("not_equals", "not_in") else expr), flip

    def _membership(self, fld: Field, wanted: list[Any]) -> str:
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

    def _text_op(self, fld: Field, op: str, arg: str, path: Path_) -> str:
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
        x = k(norm(arg) if fld.kind == "phone" else arg)
        if op == "contains":
            if fld.kind == "set":
                return f"{x} in {v}"
            return f"(s := {v}) is not None and {x} in s"
        if fld.kind == "set":
            return f"any(y.startswith({x}) for y in {v})"
        return f"(s := {v}) is not None and s.startswith({x})"


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
    top: list[Node] = []
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
    render = compile_message(spec, spec.message if spec.message is not None else DEFAULT_MESSAGE,
                             base + ("message",), ctx.err)
    # Conditions that read only `purpose` become a per-purpose prefilter (RuleSet.rules_for),
    # so a rule for external parties costs nothing when an agent is judged.
    only_purpose = frozenset({"purpose"})
    top_preds = [ctx.make(nd.expr, base) for nd in top]
    prefilter = [pr for nd, pr in zip(top, top_preds) if nd.deps == only_purpose]
    rest = [nd for nd in top if nd.deps != only_purpose]
    body = and_nodes(rest, "")
    allnodes = and_nodes(top, "")
    static = and_nodes([nd for nd in rest if nd.flip is None], "")
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


def _named(rule: str, exc: ConfigError) -> ConfigError:
    """`exc` with its rule named (`rule 'NAME': ...`), unless it already names it."""
    if exc.message.startswith(f"rule {rule!r}"):
        return exc
    return ConfigError(f"rule {rule!r}: {exc.message}", file=exc.file, line=exc.line, col=exc.col)


def compile_rules(cfg: Config, lists: Mapping[str, frozenset[str]]) -> RuleSet:
    """Check and compile every rule of `cfg` against the loaded `lists` (name -> values, as
    `daemon.config.load_lists(cfg)` returns them; nothing is read here).

    Raises ConfigError `file:line:col: rule 'NAME': ...` at the offending key or value: the
    first problem of every rule, all in one ConfigErrors when several rules have one. Disabled
    rules are checked too (a typo is caught before someone enables the rule) but not run.
    """
    src = cfg.source or ConfigSource(file="<config>")
    ctx = _Ctx(src=src, lists=dict(lists))
    rules: list[CompiledRule] = []
    disabled: list[RuleName] = []
    problems: list[ConfigError] = []
    for i, spec in enumerate(cfg.rules):
        try:
            compiled = _compile_one(spec, i, ctx)
        except ConfigErrors as exc:
            problems.extend(_named(spec.name, e) for e in exc.errors)
            continue
        except ConfigError as exc:  # the first problem of this rule; the next rules go on
            problems.append(_named(spec.name, exc))
            continue
        if spec.enabled:
            rules.append(compiled)
        else:
            disabled.append(compiled.name)
    ConfigErrors.raise_all(problems)
    return RuleSet(rules=tuple(rules), mode=cfg.mode, safety=cfg.safety, lists=dict(ctx.lists),
                   disabled=tuple(disabled), namespace=ctx.names.ns)


