"""Identifier types and the checks every id from outside passes before it can reach a URL.

Genesys ids are opaque strings, UUIDs in practice (conversations, participants, users,
queues, external contacts); NewType keeps them apart.

- `is_uuid(v)`: `v` is a UUID in its usual 8-4-4-4-12 hex form. The control API and the
  CLI accept nothing else for a Genesys id (400 / exit 2, no request).
- `is_path_id(v)`: `v` can stand as one URL path segment and change nothing else: 1-128
  letters, digits, `_`, `-` or `.`, but not dots alone (`.`/`..`, which httpx resolves as
  dot segments: `calls/..` became `GET /api/v2/conversations`), and never `/`, `%`, `?`,
  `#` or whitespace (`platform.api`, a limits namespace, passes). The
  REST client refuses any path id that is not (`daemon.genesys.api`), and events whose
  conversation id is not are rejected (`invalid_id`). Channel ids (`streaming-...`) pass.
"""

import re
from typing import Final, NewType

ConversationId = NewType("ConversationId", str)
ParticipantId = NewType("ParticipantId", str)
UserId = NewType("UserId", str)
QueueId = NewType("QueueId", str)
ChannelId = NewType("ChannelId", str)
RuleName = NewType("RuleName", str)
Topic = NewType("Topic", str)

UUID_PATTERN: Final = r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$"
PATH_ID_PATTERN: Final = r"^(?!\.+$)[A-Za-z0-9_.-]{1,128}$"
_UUID: Final = re.compile(UUID_PATTERN[:-1] + r"\Z")
_PATH_ID: Final = re.compile(PATH_ID_PATTERN[:-1] + r"\Z")


def is_uuid(value: object) -> bool:
    """True when `value` is a str holding a UUID (8-4-4-4-12 hex digits, any case)."""
    return isinstance(value, str) and _UUID.match(value) is not None


def is_path_id(value: object) -> bool:
    """True when `value` is a str that is safe as one URL path segment (see module doc)."""
    return isinstance(value, str) and _PATH_ID.match(value) is not None
