"""Phone-number normalisation, so `tel:+44 20 7946 0000`, `+442079460000` and
`sip:+442079460000@host;user=phone` compare equal.

Rules: strip a `tel:`/`sip:`/`sips:` scheme, drop a `@host` part and `;params`, keep a leading
`+` and the digits, drop spaces, dots, dashes and brackets. A value without any digit is
returned lower-cased and stripped (SIP user names, "Anonymous").
"""

from __future__ import annotations

import re

_SCHEME = re.compile(r"^(?:tel|sip|sips):", re.IGNORECASE)
_NON_DIGIT = re.compile(r"[^0-9]")


def normalize_phone(value: str) -> str:
    """Canonical form of a phone-like value: `+` (if present) followed by digits only."""
    v = value.strip()
    v = _SCHEME.sub("", v)
    v = v.split(";", 1)[0].split("@", 1)[0].strip()
    digits = _NON_DIGIT.sub("", v)
    if not digits:
        return value.strip().lower()
    return "+" + digits if v.startswith("+") else digits
