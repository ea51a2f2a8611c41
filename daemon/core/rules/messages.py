"""Rule messages: `{placeholder}` templates checked at load, rendered per decision.

Placeholders: `{party.<field>}` (as Genesys sent it), `{party.attributes.<key>}`,
`{call.<field>}`, `{rule.name|description|severity|action|tags}`. A renderer converts
every value to text (`-` when missing), caps the message at 2,000 characters and never
raises (a message must never stop a decision).
"""

from __future__ import annotations

import string
from collections.abc import Callable
from typing import Final

from daemon.config import RuleSpec
from daemon.core.logs import get_logger
from daemon.core.model import Call, Participant
from daemon.core.rules.fields import (
    CALL_FIELDS,
    PARTY_FIELDS,
    Getter,
    Path_,
    attr_field,
    get_connected_seconds,
    party_attr,
)
from daemon.errors import ConfigError

log = get_logger(__name__)

MESSAGE_MAX: Final = 2000
MISSING_TEXT: Final = "-"
DEFAULT_MESSAGE: Final = "{rule.name}: {party.purpose} party {party.id} on call {call.id}"

Renderer = Callable[[Call, Participant, float], str]
ErrorAt = Callable[[Path_, str], ConfigError]
_PARTY_PLACEHOLDERS: Final = (*PARTY_FIELDS, "connected_time", "end_time", "disconnect_type")


def display(value: object) -> str:
    """A field value as message text."""
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


def _constant(value: object) -> Getter:
    def get(c: Call, p: Participant, n: float) -> object:
        return value
    return get


def compile_message(spec: RuleSpec, template: str, path: Path_, err: ErrorAt) -> Renderer:
    """Check placeholders at load (`err(path, message)` builds the located ConfigError);
    the renderer converts every value to text and never raises."""
    try:
        parts = list(string.Formatter().parse(template))
    except ValueError as exc:
        raise err(path, f"bad message template: {exc} (write {{{{ and }}}} for literal braces)") from None
    pieces: list[str | Getter] = []
    rule_values = {"name": spec.name, "description": spec.description, "severity": spec.severity,
                   "action": spec.action, "tags": ",".join(spec.tags)}
    for literal, name, fmt, conv in parts:
        if literal:
            pieces.append(literal)
        if name is None:
            continue
        if fmt or conv:
            raise err(path, f"placeholder {{{name}}}: format specs and conversions are not supported")
        getter: Getter | None = None
        if name.startswith("party.attributes.") and len(name) > len("party.attributes."):
            getter = attr_field(name[len("party.attributes."):]).get
        elif name.startswith("party.") and name[6:] in _PARTY_PLACEHOLDERS:
            if name[6:] == "connected_seconds":
                getter = get_connected_seconds
            else:
                getter = party_attr(name[6:])  # as sent: an operator reads +44 20..., not +4420...
        elif name.startswith("call.") and name[5:] in CALL_FIELDS:
            getter = CALL_FIELDS[name[5:]].get
        elif name.startswith("rule.") and name[5:] in rule_values:
            getter = _constant(rule_values[name[5:]])
        if getter is None:
            raise err(path, f"unknown placeholder {{{name}}} in message; use {{party.<field>}}, "
                            f"{{party.attributes.<key>}}, {{call.<field>}} or "
                            f"{{rule.name|description|severity|action|tags}}")
        pieces.append(getter)
    frozen = tuple(pieces)

    def render(c: Call, p: Participant, n: float) -> str:
        try:
            out = "".join(x if isinstance(x, str) else display(x(c, p, n)) for x in frozen)
        except Exception:  # a message must never stop a decision
            log.warning("rule_message_render_failed", rule=spec.name)
            return f"rule {spec.name} matched"
        return out if len(out) <= MESSAGE_MAX else out[:MESSAGE_MAX - 3] + "..."
    return render
