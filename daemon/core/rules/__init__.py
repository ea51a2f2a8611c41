"""Compliance rules: YAML rule specs compiled once into predicates, and a sans-I/O engine.

Contract (see docs/architecture.md and docs/rules.md). One module
per job:

- `fields`: the field registry (`FIELDS: Mapping[str, FieldSpec]`: name, scope party|call,
  type, valid operators; `OPERATORS`, `COMBINATORS`), the source of the rules' JSON Schema;
- `compiler`: `compile_rules(cfg, lists)` checks every rule (enabled or not) and returns a
  `RuleSet`; anything that cannot work is a `ConfigError` located `file:line:col`;
- `codegen`: conditions as generated Python predicates, fused per party purpose;
- `messages`: `{placeholder}` message templates;
- `ruleset`: `CompiledRule`, `RuleSet` (per-purpose plans);
- `timers`: the hold_for / time-condition timer heap;
- `engine`: `RuleEngine`, edge-triggered evaluation (`on_change`, `due`, `rejudge`,
  `swap`, `explain`); the edge state is the shared `daemon.core.enforcement.Enforcement`.

The safety valve and "who was acted on" are the enforcement policy's
(`daemon.core.enforcement`); list files are read by `daemon.config.load_lists`, whose
result `compile_rules` takes.
All times are epoch seconds (float). Nothing here does I/O, reads a clock or blocks.
"""

from daemon.config.values import parse_duration
from daemon.core.rules.compiler import compile_rules
from daemon.core.rules.engine import ConditionVerdict, RuleEngine, Verdict
from daemon.core.rules.fields import (
    ATTRIBUTES,
    CALL_FIELDS,
    CALL_SPECIAL,
    COMBINATORS,
    FIELDS,
    HAS_PARTY,
    OPERATORS,
    PARTY_FIELDS,
    Field,
    FieldKind,
    FieldSpec,
    operators_for,
)
from daemon.core.rules.messages import DEFAULT_MESSAGE, MISSING_TEXT
from daemon.core.rules.ruleset import CompiledRule, Plan, RuleSet

__all__ = [
    "ATTRIBUTES", "CALL_FIELDS", "CALL_SPECIAL", "COMBINATORS", "DEFAULT_MESSAGE", "FIELDS",
    "HAS_PARTY", "MISSING_TEXT", "OPERATORS", "PARTY_FIELDS", "CompiledRule",
    "ConditionVerdict", "Field", "FieldKind", "FieldSpec", "Plan", "RuleEngine", "RuleSet",
    "Verdict", "compile_rules", "operators_for", "parse_duration",
]
