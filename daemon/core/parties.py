"""Which party of a call a person or a service means: selectors and their resolution.

Pure (no I/O): `eject` and the control API both resolve "the party with this user id /
address / name" through `resolve_target`, so they agree on every edge (phone numbers are
compared after `normalize_phone`, names case-insensitively, final-state parties are "gone").
Calls are the Genesys `CallConversation` JSON shape (camelCase dicts).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

from daemon.core.model import is_final_state
from daemon.core.phone import normalize_phone

__all__ = ["SelectorKind", "Selector", "Resolution", "participants_of", "is_live", "resolve_target"]

SelectorKind = Literal["participant", "user", "external_contact", "address", "name"]


@dataclass(frozen=True)
class Selector:
    """How the operator named the party to remove."""

    kind: SelectorKind
    value: str

    def describe(self) -> str:
        return f"{self.kind.replace('_', ' ')} {self.value!r}"

    def matches(self, p: Mapping[str, object]) -> bool:
        if self.kind == "participant":
            return _s(p.get("id")) == self.value.strip()
        if self.kind == "user":
            return _ref_id(p.get("user")) == self.value.strip()
        if self.kind == "external_contact":
            return _ref_id(p.get("externalContact")) == self.value.strip()
        if self.kind == "address":
            want = normalize_phone(self.value)
            return any(normalize_phone(v) == want
                       for v in (_s(p.get(k)) for k in ("address", "ani", "dnis")) if v)
        name = _s(p.get("name"))
        return name is not None and name.strip().casefold() == self.value.strip().casefold()


@dataclass(frozen=True)
class Resolution:
    """The outcome of matching a selector against a call's participants.

    `outcome`: "target" (exactly one live match, in `target`), "ambiguous" (several live
    matches, in `live`), "gone" (only final-state matches), "none" (no match at all).
    """

    outcome: Literal["target", "ambiguous", "gone", "none"]
    matches: tuple[dict[str, object], ...] = ()
    live: tuple[dict[str, object], ...] = ()
    target: dict[str, object] | None = field(default=None)


def participants_of(call: Mapping[str, object]) -> list[dict[str, object]]:
    """The call's participant objects (malformed entries skipped)."""
    parts = call.get("participants")
    if not isinstance(parts, list):
        return []
    return [p for p in parts if isinstance(p, dict) and isinstance(p.get("id"), str)]


def is_live(p: Mapping[str, object]) -> bool:
    return not is_final_state(p.get("state"))


def resolve_target(call: Mapping[str, object], selector: Selector) -> Resolution:
    """Match `selector` against the call's parties. Pure; no I/O."""
    matches = tuple(p for p in participants_of(call) if selector.matches(p))
    live = tuple(p for p in matches if is_live(p))
    if not matches:
        return Resolution("none")
    if len(live) == 1:
        return Resolution("target", matches, live, live[0])
    if len(live) > 1:
        return Resolution("ambiguous", matches, live)
    return Resolution("gone", matches, live)


def _s(v: object) -> str | None:
    return v if isinstance(v, str) else None


def _ref_id(v: object) -> str | None:
    return _s(v.get("id")) if isinstance(v, dict) else None
