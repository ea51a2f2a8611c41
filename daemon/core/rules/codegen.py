"""Code generation: condition trees as Python expressions, compiled once into predicates.

A condition compiles to a `Node`: a boolean expression over `c` (the call), `p` (the party)
and `n` (now, epoch s) plus names the compiler bound in a `Namespace` (constants and the
helpers `NP`, phone normalisation, and `NUM`, text as a number). Generated code sees only
those names, never text from the configuration. `fuse` turns the plain rules admitted for
one purpose into one function that tests them all, computing shared sub-expressions once.
`time_flip` gives the next instant a time condition (`connected_seconds`) may change.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

from daemon.core.model import Call, Participant
from daemon.core.rules.fields import Field, FlipFn, Pred, nn, num

# A time threshold is scheduled this long after the exact instant, so float rounding of
# `now - connected_time` can never leave the condition one ulp short at the wake-up.
TIME_EPSILON: Final = 0.001

Matcher = Callable[[Call, Participant, float], "tuple[int, ...]"]


class TooComplex(Exception):
    """Python could not compile a generated expression (nesting too deep)."""


@dataclass(frozen=True, slots=True)
class Node:
    expr: str  # a Python boolean expression over c, p, n and the compiler's constants
    fields: tuple[Field, ...]  # every field that took part (for Decision.matched)
    deps: frozenset[str]  # labels it reads; {"purpose"} alone makes it a prefilter
    cost: int
    flip: FlipFn | None  # earliest future time its truth may change with no event
    text: str  # how it was written, for explain


def min_flip(flips: Sequence[FlipFn]) -> FlipFn | None:
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


def merge_fields(nodes: Iterable[Node]) -> tuple[Field, ...]:
    out: dict[str, Field] = {}
    for nd in nodes:
        for f in nd.fields:
            out.setdefault(f.label, f)
    return tuple(out.values())


def and_nodes(nodes: Sequence[Node], text: str) -> Node:
    ordered = sorted(nodes, key=lambda nd: nd.cost)  # stable: written order among equals
    return Node(
        expr=" and ".join(f"({nd.expr})" for nd in ordered) if ordered else "True",
        fields=merge_fields(ordered),
        deps=frozenset().union(*(nd.deps for nd in ordered)),
        cost=max((nd.cost for nd in ordered), default=0),
        flip=min_flip([nd.flip for nd in ordered if nd.flip is not None]),
        text=text,
    )


def time_flip(thresholds: list[float]) -> FlipFn:
    """For `connected_seconds`: the next instant a threshold is crossed, for a party that is
    connected and still on the call (an ended party's time is frozen)."""
    ts = sorted(set(thresholds))

    def flip(c: Call, p: Participant, n: float) -> float | None:
        ct = p.connected_time
        if ct is None or p.end_time is not None:
            return None
        for x in ts:
            at = ct + x + TIME_EPSILON
            if at > n:
                return at
        return None
    return flip


@dataclass(slots=True)
class Namespace:
    """The names generated predicates see: helpers and constants, never config text."""

    ns: dict[str, Any] = field(default_factory=lambda: {"__builtins__": {"any": any, "bool": bool},
                                                        "NP": nn, "NUM": num})
    shared: dict[tuple[type, object], str] = field(default_factory=dict)

    def const(self, value: object) -> str:
        """A name for `value` in generated code. Equal scalars share a name, so identical
        sub-expressions of different rules read the same and can be computed once (`fuse`)."""
        key = (type(value), value) if type(value) in (str, int, float, bool) else None
        if key is not None and key in self.shared:
            return self.shared[key]
        name = f"K{len(self.ns)}"
        self.ns[name] = value
        if key is not None:
            self.shared[key] = name
        return name

    def make(self, expr: str) -> Pred:
        """Compile a generated expression into a function (c, p, n) -> bool. Raises
        TooComplex when Python cannot compile it."""
        code = f"def _pred(c, p, n):\n    return {expr}\n"
        scope: dict[str, Any] = {}
        try:
            exec(compile(code, "<rule>", "exec"), self.ns, scope)  # noqa: S102 - generated, no config text
        except (SyntaxError, RecursionError, MemoryError):
            raise TooComplex(expr[:80]) from None
        pred: Pred = scope["_pred"]
        return pred


# Sub-expressions worth computing once per party when several rules use them: phone
# normalisation, participant data (as text and as a number), derived counts.
HOISTABLE: Final = re.compile(r"NUM\(p\.attributes\.get\(K\d+\)\)|NP\(p\.\w+\)"
                              r"|p\.attributes\.get\(K\d+\)|p\.connected_seconds\(n\)|c\.connected_parties")


def fuse(exprs: Sequence[str], tests: Sequence[Pred], namespace: dict[str, Any]) -> Matcher:
    """One generated function testing every expression in turn: it returns the indexes of
    those that hold. Falls back to `loop(tests)` when Python cannot compile it."""
    counts: dict[str, int] = {}
    for e in exprs:
        for m in HOISTABLE.finditer(e):
            counts[m.group(0)] = counts.get(m.group(0), 0) + 1
    hoisted = {text: f"_e{i}" for i, text in enumerate(t for t, c in counts.items() if c > 1)}
    lines = ["def _match(c, p, n):", "    hits = ()"]
    lines.extend(f"    {name} = {text}" for text, name in hoisted.items())
    for i, e in enumerate(exprs):
        expr = HOISTABLE.sub(lambda m: hoisted.get(m.group(0), m.group(0)), e)
        lines.append(f"    if {expr}:")
        lines.append(f"        hits += ({i},)")
    lines.append("    return hits")
    scope: dict[str, Any] = {}
    try:
        exec(compile("\n".join(lines) + "\n", "<rules>", "exec"), namespace, scope)  # noqa: S102
    except (SyntaxError, RecursionError, MemoryError):  # pragma: no cover - each rule compiled alone
        return loop(tests)
    fused: Matcher = scope["_match"]
    return fused


def loop(tests: Sequence[Pred]) -> Matcher:
    """The unfused matcher: each predicate called in turn."""
    t = tuple(tests)

    def match(c: Call, p: Participant, n: float) -> tuple[int, ...]:
        return tuple(i for i, f in enumerate(t) if f(c, p, n))
    return match
