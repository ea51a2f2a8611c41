"""Compiled rules and the rule set: what `compile_rules` returns and the engine runs.

`RuleSet.plan_for(purpose)` gives, per party purpose (cached, bounded), the plain rules
that purpose admits fused into one generated matcher, and the stateful ones (hold_for,
time conditions) to be judged one by one with their timers.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final, Literal

from daemon.config import SafetySettings
from daemon.core.ids import RuleName
from daemon.core.model import Action, Call, Participant, Severity
from daemon.core.rules.codegen import Matcher, fuse, loop
from daemon.core.rules.fields import Field, FlipFn, Pred, seen
from daemon.core.rules.messages import Renderer

_PURPOSE_CACHE_MAX: Final = 512


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
    fields: tuple[Field, ...]
    render: Renderer
    fingerprint: str
    conditions: tuple[tuple[str, Pred], ...]  # top-level conditions, for explain
    description: str | None = None
    condition_fields: tuple[tuple[Field, ...], ...] = ()  # per condition: the fields it reads
    test_expr: str = "True"  # the generated expression behind `test` (for fused plans)

    @property
    def stateful(self) -> bool:
        return self.hold is not None or self.flip is not None

    def check(self, call: Call, party: Participant, now: float) -> bool:
        return self.admits(party.purpose) and self.test(call, party, now)

    def matched(self, call: Call, party: Participant, now: float) -> dict[str, object]:
        """The value of every field the rule reads (for `Decision.matched`)."""
        return seen(self.fields, call, party, now)


@dataclass(eq=False)
class RuleSet:
    """The compiled configuration: enabled rules, mode, safety settings and list contents."""

    rules: tuple[CompiledRule, ...]
    mode: Literal["enforce", "observe"]
    safety: SafetySettings
    lists: Mapping[str, frozenset[str]]
    disabled: tuple[RuleName, ...] = ()
    namespace: dict[str, Any] = field(default_factory=dict, repr=False)  # generated code's names
    _plans: dict[str | None, Plan] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        self.by_name: dict[RuleName, CompiledRule] = {r.name: r for r in self.rules}

    def rules_for(self, purpose: str | None) -> tuple[CompiledRule, ...]:
        """The rules whose purpose conditions admit this purpose."""
        return tuple(r for r in self.rules if r.admits(purpose))

    def plan_for(self, purpose: str | None) -> Plan:
        """How to judge a party of this purpose (cached per purpose, bounded)."""
        hit = self._plans.get(purpose)
        if hit is not None:
            return hit
        admitted = self.rules_for(purpose)
        plain = tuple(r for r in admitted if not r.stateful)
        timed = tuple((r.name, r.test, r.static if r.flip else r.test, r)
                      for r in admitted if r.stateful)
        cacheable = len(self._plans) < _PURPOSE_CACHE_MAX  # purposes come from outside: bound it
        tests = [r.test for r in plain]
        fused = fuse([r.test_expr for r in plain], tests, self.namespace) \
            if cacheable and self.namespace else loop(tests)
        plan = Plan(fused, plain, timed)
        if cacheable:
            self._plans[purpose] = plan
        return plan


Step = tuple[RuleName, Pred, Pred, CompiledRule]


@dataclass(frozen=True, slots=True)
class Plan:
    """`fused(c, p, n)` gives the indexes into `plain` of the plain rules whose conditions
    hold, in one generated function (no call per rule). `timed` are hold_for/time rules as
    (name, test, gate, rule): when `gate` is false the rule cannot hold now or by timer."""

    fused: Matcher
    plain: tuple[CompiledRule, ...]
    timed: tuple[Step, ...]
