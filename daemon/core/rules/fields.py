"""The field registry: what rules can test, of which type, with which operators.

Public shape (the JSON Schema of rules is generated from it, see `confguard check --schema`):

- `FIELDS: Mapping[str, FieldSpec]`, keyed by the name as written in a rule: party fields
  under `when:` (`purpose`, `address`, ...), call fields under `call:` (`recording_state`,
  ...; written `call.<name>` inside `when:`). `FieldSpec` has `name`, `scope` (`party` |
  `call`), `type` (a `FieldKind`: str, phone, bool, num, attr, set) and `operators` (the
  operators valid for it, in `OPERATORS` order).
- `ATTRIBUTES`: the `FieldSpec` of `attributes.<key>` (participant data, any key).
- `HAS_PARTY`: `call.has_party`, which takes a mapping of party conditions, not operators.
- `COMBINATORS` (`any`, `all`, `not`), `OPERATORS`, `operators_for(kind)`.

`PARTY_FIELDS` / `CALL_FIELDS` map the same names to the compiler's `Field`s (their Python
expression in generated predicates, getter, cost), for the compiler and `explain`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Final, Literal

from daemon.core.model import Call, Participant
from daemon.core.phone import normalize_phone

Path_ = tuple[str | int, ...]
Pred = Callable[[Call, Participant, float], bool]
Getter = Callable[[Call, Participant, float], object]
FlipFn = Callable[[Call, Participant, float], "float | None"]

FieldKind = Literal["str", "phone", "bool", "num", "attr", "set"]
Scope = Literal["party", "call"]


@lru_cache(maxsize=65536)
def norm(value: str) -> str:
    """Cached phone normalisation (`daemon.core.phone.normalize_phone`)."""
    return normalize_phone(value)


def nn(value: str | None) -> str | None:
    """Null-safe cached phone normalisation (`NP` in generated predicates)."""
    return None if value is None else norm(value)


def num(value: object) -> float | None:
    """A participant-data string as a number, or None when it is not one (never raises;
    `NUM` in generated predicates)."""
    if value is None:
        return None
    try:
        x = float(value)  # type: ignore[arg-type]  # whatever float() refuses is not a number
    except (TypeError, ValueError):
        return None
    return None if math.isnan(x) else x


@dataclass(frozen=True, slots=True)
class Field:
    """A field rules can test, as the compiler sees it. `expr` is its Python expression over
    `c` (call), `p` (party) and `n` (now) in generated predicates; `get` the same as a
    function (for `Decision.matched` and explain)."""

    label: str  # as shown in Decision.matched: "purpose", "attributes.x", "call.connected_parties"
    kind: FieldKind
    expr: str
    get: Getter  # phone fields: normalised value
    cost: int  # lower runs first
    raw_expr: str | None = None  # phone fields: the value as Genesys sent it
    time_dependent: bool = False


def party_attr(name: str) -> Getter:
    def get(c: Call, p: Participant, n: float) -> object:
        return getattr(p, name)
    return get


def _party_phone(name: str) -> Getter:
    def get(c: Call, p: Participant, n: float) -> object:
        return nn(getattr(p, name))
    return get


def call_attr(name: str) -> Getter:
    def get(c: Call, p: Participant, n: float) -> object:
        return getattr(c, name)
    return get


def get_connected_seconds(c: Call, p: Participant, n: float) -> object:
    return p.connected_seconds(n)


_STR_PARTY = ("id", "name", "direction", "user_id", "queue_id", "team_id", "external_contact_id",
              "external_organization_id", "flagged_reason", "provider",
              "monitored_participant_id", "coached_participant_id", "barged_participant_id")
_PHONE_PARTY = ("address", "ani", "dnis")
_BOOL_PARTY = ("held", "muted", "confined", "recording")

PARTY_FIELDS: Final[dict[str, Field]] = {
    "purpose": Field("purpose", "str", "p.purpose", party_attr("purpose"), 0),
    "state": Field("state", "str", "p.state", party_attr("state"), 1),
    **{n: Field(n, "str", f"p.{n}", party_attr(n), 3) for n in _STR_PARTY},
    **{n: Field(n, "phone", f"NP(p.{n})", _party_phone(n), 4, raw_expr=f"p.{n}") for n in _PHONE_PARTY},
    **{n: Field(n, "bool", f"p.{n}", party_attr(n), 2) for n in _BOOL_PARTY},
    "connected_seconds": Field("connected_seconds", "num", "p.connected_seconds(n)",
                               get_connected_seconds, 4, time_dependent=True),
}

CALL_FIELDS: Final[dict[str, Field]] = {
    "id": Field("call.id", "str", "c.id", call_attr("id"), 6),
    "recording_state": Field("call.recording_state", "str", "c.recording_state",
                             call_attr("recording_state"), 6),
    "secure_pause": Field("call.secure_pause", "bool", "c.secure_pause", call_attr("secure_pause"), 6),
    "connected_parties": Field("call.connected_parties", "num", "c.connected_parties",
                               call_attr("connected_parties"), 7),
    "queue_ids": Field("call.queue_ids", "set", "c.queue_ids", call_attr("queue_ids"), 7),
}
CALL_SPECIAL: Final = ("has_party",)
COMBINATORS: Final = ("any", "all", "not")
OPERATORS: Final = ("equals", "not_equals", "in", "not_in", "in_list", "not_in_list", "matches",
                    "contains", "starts_with", "exists", "gt", "gte", "lt", "lte")
NUMERIC_OPS: Final = {"gt": ">", "gte": ">=", "lt": "<", "lte": "<="}
TEXT_OPS: Final = ("matches", "contains", "starts_with")
LIST_OPS: Final = ("in_list", "not_in_list")


def attr_field(key: str, expr: str = "") -> Field:
    """The field `attributes.<key>` (participant data); `expr` its generated expression."""
    def get(c: Call, p: Participant, n: float) -> object:
        return p.attributes.get(key)
    return Field(f"attributes.{key}", "attr", expr, get, 5)


def operators_for(kind: FieldKind) -> tuple[str, ...]:
    """The operators the compiler accepts on a field of this kind (in `OPERATORS` order):
    numeric comparisons only on numbers and participant data; text operators and named
    lists not on booleans and numbers; equals/in/exists on everything."""
    out: list[str] = []
    for op in OPERATORS:
        if op in NUMERIC_OPS and kind not in ("num", "attr"):
            continue
        if (op in TEXT_OPS or op in LIST_OPS) and kind in ("bool", "num"):
            continue
        out.append(op)
    return tuple(out)


@dataclass(frozen=True, slots=True)
class FieldSpec:
    """One field of the rule format: its `name` as written in a rule, its `scope` (a party
    field under `when:`, a call field under `call:`), its `type` and the `operators` valid
    for it."""

    name: str
    scope: Scope
    type: FieldKind
    operators: tuple[str, ...]


def _specs() -> dict[str, FieldSpec]:
    out: dict[str, FieldSpec] = {}
    for name, f in PARTY_FIELDS.items():
        out[name] = FieldSpec(name, "party", f.kind, operators_for(f.kind))
    for name, f in CALL_FIELDS.items():
        # party and call both have `id`: the call one is keyed as written inside `when:`
        key = name if name not in out else f"call.{name}"
        out[key] = FieldSpec(name, "call", f.kind, operators_for(f.kind))
    return out


FIELDS: Final[Mapping[str, FieldSpec]] = _specs()
ATTRIBUTES: Final = FieldSpec("attributes.<key>", "party", "attr", operators_for("attr"))
HAS_PARTY: Final = FieldSpec("has_party", "call", "str", ())


def seen(fields: Sequence[Field], call: Call, party: Participant, now: float) -> dict[str, object]:
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
