"""The sandbox's pure state: OAuth clients and tokens, queues, users, calls, notification
channels and their topic subscriptions. No I/O, no asyncio: every method takes `now`
(epoch seconds) or reads the injected clock, and returns plain data.

Changes to calls are reported to `listeners` (callables taking the changed `Conversation`);
the server turns those into WebSocket events. Errors are raised as `WorldError` carrying the
HTTP status, Genesys-style error code and message the REST layer answers with.

Serialisation follows the official SDK models exactly: `event_body()` is the shape of
`QueueConversationCallEventTopicCallConversation` / `ConversationCallEventTopicCallConversation`,
`rest_body()` the shape of `CallConversation` (no `address`, no participant `initialState`).
Absent values are omitted, as Genesys does.
"""

from __future__ import annotations

import re
import secrets
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from daemon.core.timefmt import format_time

MAX_TOPICS_PER_CHANNEL = 1000
MAX_CHANNELS_PER_CLIENT = 20
DEFAULT_PERMISSIONS = frozenset({
    "conversation:communication:disconnect",
    "conversation:communication:view",
    "routing:queue:view",
    "analytics:conversationDetail:view",
    "notifications:channel:add",
    "authorization:role:view",
})
"""Permissions a new client gets (through its one role, see `Client.role_id`): those the
README's OAuth client set-up grants, and `authorization:role:view`. Checked where
Genesys checks them: the participant PATCH (any of `PARTICIPANT_PATCH_PERMISSIONS`), the
queue lookup and queue topics (`routing:queue:view`), the analytics query
(`analytics:conversationDetail:view`), reading a role (`authorization:role:view`)."""

DISCONNECT_PERMISSION = "conversation:communication:disconnect"
#: The participant PATCH needs any one of these (Genesys' documentation of the endpoint).
PARTICIPANT_PATCH_PERMISSIONS = ("conversation:communication:disconnect",
                                 "conversation:participant:wrapup", "conversation:call:record")
QUEUE_VIEW_PERMISSION = "routing:queue:view"
ANALYTICS_PERMISSION = "analytics:conversationDetail:view"
ROLE_VIEW_PERMISSION = "authorization:role:view"
ORG_ID = "5a0c2d1e-7b3f-4d2a-8e6c-1f9a0b3c4d5e"
ORG_NAME = "Sandbox Org"
ACTIVE_STATES = frozenset({"alerting", "dialing", "contacting", "offering", "connected"})
FINAL_STATES = frozenset({"disconnected", "terminated"})
DIVISION_ID = "3e7b7f2a-2f3c-4c6e-9a3d-5b0e8b7c1d00"
DIVISION_NAME = "Home"

_QUEUE_TOPIC = re.compile(r"^v2\.routing\.queues\.([^.]+)\.conversations\.calls$")
_USER_TOPIC = re.compile(r"^v2\.users\.([^.]+)\.conversations\.calls$")


def iso(ts: float | None) -> str | None:
    """Epoch seconds -> `2026-11-21T09:15:02.345Z` (UTC, milliseconds), None stays None."""
    return None if ts is None else format_time(ts)


def new_id() -> str:
    return str(uuid.uuid4())


class WorldError(Exception):
    """A request the world refuses. `status` is the HTTP status, `code` the Genesys error code."""

    def __init__(self, status: int, code: str, message: str, *,
                 details: Iterable[str] = ()) -> None:
        self.status = status
        self.code = code
        self.message = message
        self.details = list(details)
        super().__init__(message)


@dataclass(slots=True)
class Client:
    """An OAuth client (client credentials). Its `permissions` are those of its one role,
    `role_id` (granted in the home division), as `GET /api/v2/tokens/me` and
    `GET /api/v2/authorization/roles/{roleId}` show them."""

    id: str
    secret: str
    permissions: set[str]
    token_lifetime: float
    role_id: str = field(default_factory=lambda: str(uuid.uuid4()))

    def token_info(self) -> dict[str, Any]:
        """`GET /api/v2/tokens/me` for a token of this client (SDK model TokenInfo)."""
        org = {"id": ORG_ID, "name": ORG_NAME}
        return {"organization": org, "homeOrganization": org, "authorizedScope": [],
                "OAuthClient": {"id": self.id, "name": f"sandbox client {self.id[:8]}",
                                "authorizedGrantType": "CLIENT-CREDENTIALS", "scope": [],
                                "roleDivisions": [{"roleId": self.role_id, "divisionId": DIVISION_ID}],
                                "state": "active", "organization": org}}

    def role(self) -> dict[str, Any]:
        """`GET /api/v2/authorization/roles/{roleId}` for its role (SDK model
        DomainOrganizationRole): the permissions as strings and as policies."""
        policies = []
        for perm in sorted(self.permissions):
            domain, _, rest = perm.partition(":")
            entity, _, action = rest.partition(":")
            policies.append({"domain": domain, "entityName": entity, "actionSet": [action],
                             "allowConditions": False})
        return {"id": self.role_id, "name": f"sandbox role {self.id[:8]}",
                "description": "the sandbox client's permissions", "permissions": sorted(self.permissions),
                "permissionPolicies": policies, "userCount": 0, "default": False, "base": False,
                "selfUri": f"/api/v2/authorization/roles/{self.role_id}"}


@dataclass(slots=True)
class Token:
    value: str
    client_id: str
    issued_at: float
    expires_at: float
    revoked: bool = False

    def valid(self, now: float) -> bool:
        return not self.revoked and now < self.expires_at


@dataclass(slots=True)
class Queue:
    id: str
    name: str
    created: float


@dataclass(slots=True)
class User:
    id: str
    name: str


@dataclass(slots=True)
class Party:
    """One participant. Times are epoch seconds; names mirror the JSON fields."""

    id: str
    purpose: str
    state: str
    initial_state: str
    direction: str
    start_time: float
    name: str | None = None
    address: str | None = None
    ani: str | None = None
    dnis: str | None = None
    disconnect_type: str | None = None
    held: bool = False
    muted: bool = False
    confined: bool = False
    recording: bool = False
    recording_state: str = "none"
    connected_time: float | None = None
    end_time: float | None = None
    user_id: str | None = None
    user_name: str | None = None
    queue_id: str | None = None
    queue_name: str | None = None
    team_id: str | None = None
    external_contact_id: str | None = None
    external_organization_id: str | None = None
    attributes: dict[str, str] = field(default_factory=dict)
    flagged_reason: str | None = None
    provider: str = "Edge"
    peer: str | None = None
    monitored_participant_id: str | None = None
    coached_participant_id: str | None = None
    barged_participant_id: str | None = None
    consult_participant_id: str | None = None
    wrapup: dict[str, Any] | None = None
    error_info: dict[str, Any] | None = None

    @property
    def live(self) -> bool:
        return self.state not in FINAL_STATES

    def common(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "id": self.id, "name": self.name, "address": self.address,
            "startTime": iso(self.start_time), "connectedTime": iso(self.connected_time),
            "endTime": iso(self.end_time), "purpose": self.purpose, "state": self.state,
            "direction": self.direction, "disconnectType": self.disconnect_type,
            "held": self.held, "muted": self.muted, "confined": self.confined,
            "recording": self.recording, "recordingState": self.recording_state,
            "attributes": dict(self.attributes), "provider": self.provider, "peer": self.peer,
            "flaggedReason": self.flagged_reason, "ani": self.ani, "dnis": self.dnis,
            "monitoredParticipantId": self.monitored_participant_id,
            "coachedParticipantId": self.coached_participant_id,
            "bargedParticipantId": self.barged_participant_id,
            "consultParticipantId": self.consult_participant_id,
            "wrapup": self.wrapup, "errorInfo": self.error_info,
            "user": {"id": self.user_id, "name": self.user_name} if self.user_id else None,
            "queue": {"id": self.queue_id, "name": self.queue_name} if self.queue_id else None,
            "team": {"id": self.team_id} if self.team_id else None,
            "externalContact": ({"id": self.external_contact_id}
                                if self.external_contact_id else None),
            "externalOrganization": ({"id": self.external_organization_id}
                                     if self.external_organization_id else None),
        }
        if self.purpose in ("agent", "user"):
            d["wrapupRequired"] = False
        return {k: v for k, v in d.items() if v is not None}

    def event_dict(self) -> dict[str, Any]:
        d = self.common()
        d["initialState"] = self.initial_state
        return d

    def rest_dict(self) -> dict[str, Any]:
        d = self.common()
        for ref in ("user", "queue", "team", "externalContact", "externalOrganization"):
            if ref in d:
                kind = {"user": "users", "queue": "routing/queues", "team": "teams",
                        "externalContact": "externalcontacts/contacts",
                        "externalOrganization": "externalcontacts/organizations"}[ref]
                d[ref] = {**d[ref], "selfUri": f"/api/v2/{kind}/{d[ref]['id']}"}
        return d


@dataclass(slots=True)
class Conversation:
    id: str
    start: float
    address: str | None
    participants: list[Party] = field(default_factory=list)
    end: float | None = None
    recording_state: str = "none"
    secure_pause: bool = False
    max_participants: int = 10
    utilization_label_id: str | None = None
    version: int = 0

    def party(self, participant_id: str) -> Party:
        for p in self.participants:
            if p.id == participant_id:
                return p
        raise WorldError(404, "not.found", f"Participant {participant_id} not found "
                         f"in conversation {self.id}")

    def live_parties(self) -> list[Party]:
        return [p for p in self.participants if p.live]

    def queue_ids(self) -> list[str]:
        return list(dict.fromkeys(p.queue_id for p in self.participants if p.queue_id))

    def user_ids(self) -> list[str]:
        return list(dict.fromkeys(p.user_id for p in self.participants if p.user_id))

    def topics(self) -> list[str]:
        """Every notification topic this conversation is published on."""
        return ([f"v2.routing.queues.{q}.conversations.calls" for q in self.queue_ids()]
                + [f"v2.users.{u}.conversations.calls" for u in self.user_ids()])

    def _divisions(self, *, rest: bool) -> list[dict[str, Any]]:
        div: dict[str, Any] = {"id": DIVISION_ID}
        if rest:
            div = {"id": DIVISION_ID, "name": DIVISION_NAME,
                   "selfUri": f"/api/v2/authorization/divisions/{DIVISION_ID}"}
        ents = [{"id": q} for q in self.queue_ids()]
        return [{"division": div, "entities": ents}]

    def event_body(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "id": self.id,
            "participants": [p.event_dict() for p in self.participants],
            "recordingState": self.recording_state, "securePause": self.secure_pause,
            "maxParticipants": self.max_participants,
            "divisions": self._divisions(rest=False), "otherMediaUris": [],
        }
        if self.address is not None:
            d["address"] = self.address
        if self.utilization_label_id is not None:
            d["utilizationLabelId"] = self.utilization_label_id
        return d

    def rest_body(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "id": self.id,
            "participants": [p.rest_dict() for p in self.participants],
            "otherMediaUris": [], "recordingState": self.recording_state,
            "securePause": self.secure_pause, "maxParticipants": self.max_participants,
            "divisions": self._divisions(rest=True),
            "selfUri": f"/api/v2/conversations/calls/{self.id}",
        }
        if self.utilization_label_id is not None:
            d["utilizationLabelId"] = self.utilization_label_id
        return d

    def analytics_body(self) -> dict[str, Any]:
        """`AnalyticsConversationWithoutAttributes` for the details query."""
        parts: list[dict[str, Any]] = []
        for p in self.participants:
            seg: dict[str, Any] = {
                "segmentStart": iso(p.connected_time or p.start_time),
                "segmentType": "interact" if p.state == "connected" else "alert",
            }
            if p.end_time is not None:
                seg["segmentEnd"] = iso(p.end_time)
                seg["segmentType"] = "interact"
                seg["disconnectType"] = _ANALYTICS_DISCONNECT.get(p.disconnect_type or "",
                                                                  "other")
            if p.queue_id:
                seg["queueId"] = p.queue_id
            if (p.monitored_participant_id or p.coached_participant_id
                    or p.barged_participant_id):
                seg["segmentType"] = ("monitoring" if p.monitored_participant_id else
                                      "coaching" if p.coached_participant_id else "barging")
            sess: dict[str, Any] = {
                "sessionId": p.id, "mediaType": "voice", "direction": p.direction,
                "provider": p.provider, "segments": [seg],
            }
            for k, v in (("ani", p.ani), ("dnis", p.dnis), ("addressSelf", p.address),
                         ("peerId", p.peer),
                         ("monitoredParticipantId", p.monitored_participant_id),
                         ("coachedParticipantId", p.coached_participant_id),
                         ("bargedParticipantId", p.barged_participant_id)):
                if v is not None:
                    sess[k] = v
            ap: dict[str, Any] = {"participantId": p.id, "purpose": p.purpose,
                                  "sessions": [sess]}
            for k, v in (("participantName", p.name), ("userId", p.user_id),
                         ("teamId", p.team_id), ("externalContactId", p.external_contact_id),
                         ("externalOrganizationId", p.external_organization_id),
                         ("flaggedReason", p.flagged_reason)):
                if v is not None:
                    ap[k] = v
            parts.append(ap)
        d: dict[str, Any] = {
            "conversationId": self.id, "conversationStart": iso(self.start),
            "originatingDirection": self.participants[0].direction if self.participants
            else "inbound",
            "divisionIds": [DIVISION_ID], "participants": parts,
        }
        if self.end is not None:
            d["conversationEnd"] = iso(self.end)
        return d


_ANALYTICS_DISCONNECT = {
    "client": "client", "endpoint": "endpoint", "system": "system", "transfer": "transfer",
    "transfer.conference": "conferenceTransfer", "transfer.consult": "consultTransfer",
    "peer": "peer", "error": "error", "timeout": "timeout", "other": "other",
}


@dataclass(slots=True)
class TopicState:
    id: str
    state: str  # Permitted | Rejected
    rejection_reason: str | None = None
    missing_permissions: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"id": self.id, "state": self.state}
        if self.rejection_reason is not None:
            d["rejectionReason"] = self.rejection_reason
        if self.state == "Rejected":
            d["missingPermissions"] = list(self.missing_permissions)
        return d


@dataclass(slots=True)
class Channel:
    id: str
    client_id: str
    token: str
    created: float
    expires_at: float
    last_used: float
    topics: dict[str, TopicState] = field(default_factory=dict)
    connected: bool = False


class World:
    """All sandbox state. `clock` gives epoch seconds (time.time by default)."""

    def __init__(self, *, clock: Callable[[], float] = time.time, token_lifetime: float = 86400.0,
                 channel_lifetime: float = 86400.0, ended_retention: float = 600.0,
                 max_channels: int = MAX_CHANNELS_PER_CLIENT,
                 max_topics: int = MAX_TOPICS_PER_CHANNEL) -> None:
        self.clock = clock
        self.token_lifetime = token_lifetime
        self.channel_lifetime = channel_lifetime
        self.ended_retention = ended_retention
        self.max_channels = max_channels
        self.max_topics = max_topics
        self.clients: dict[str, Client] = {}
        self.tokens: dict[str, Token] = {}
        self.queues: dict[str, Queue] = {}
        self.users: dict[str, User] = {}
        self.calls: dict[str, Conversation] = {}
        self.channels: dict[str, Channel] = {}
        self.topic_index: dict[str, set[str]] = {}
        """topic -> ids of channels subscribed to it (Permitted only)."""
        self.listeners: list[Callable[[Conversation], None]] = []
        self.channel_listeners: list[Callable[[str, str], None]] = []
        """Called with (channel_id, reason) when a channel is removed."""

    # ---------------------------------------------------------------- clients and tokens
    def add_client(self, client_id: str | None = None, secret: str | None = None, *,
                   permissions: Iterable[str] = DEFAULT_PERMISSIONS,
                   token_lifetime: float | None = None) -> Client:
        c = Client(client_id or new_id(), secret or secrets.token_urlsafe(24), set(permissions),
                   self.token_lifetime if token_lifetime is None else token_lifetime)
        self.clients[c.id] = c
        return c

    def issue_token(self, client_id: str, secret: str) -> Token:
        c = self.clients.get(client_id)
        if c is None or not secrets.compare_digest(c.secret, secret):
            raise WorldError(401, "invalid_client", "client authentication failed")
        now = self.clock()
        t = Token(secrets.token_urlsafe(32), c.id, now, now + c.token_lifetime)
        self.tokens[t.value] = t
        return t

    def check_token(self, value: str | None) -> Token:
        if not value:
            raise WorldError(401, "bad.credentials", "No authentication bearer token specified "
                             "in authorization header.")
        t = self.tokens.get(value)
        if t is None or t.revoked:
            raise WorldError(401, "bad.credentials", "Invalid login credentials.")
        if not t.valid(self.clock()):
            raise WorldError(401, "bad.credentials", "Invalid login credentials. "
                             "The access token has expired.")
        return t

    def require(self, token: Token, permission: str) -> None:
        c = self.clients[token.client_id]
        if permission not in c.permissions:
            raise WorldError(403, "missing.permissions",
                             f"Missing permission: {permission}", details=[permission])

    def require_any(self, token: Token, permissions: Iterable[str]) -> None:
        """403 unless the token's client has one of `permissions`; the answer names the
        first (the one to grant)."""
        wanted = list(permissions)
        if not self.clients[token.client_id].permissions.intersection(wanted):
            raise WorldError(403, "missing.permissions", f"Missing permission: {wanted[0]}",
                             details=wanted[:1])

    def role(self, token: Token, role_id: str) -> dict[str, Any]:
        """A role as `GET /api/v2/authorization/roles/{roleId}` shows it."""
        self.require(token, ROLE_VIEW_PERMISSION)
        for c in self.clients.values():
            if c.role_id == role_id:
                return c.role()
        raise WorldError(404, "not.found", f"Role {role_id} not found")

    def expire_tokens(self, client_id: str | None = None) -> int:
        """Make tokens (of one client, or all) expire now. Returns how many."""
        now = self.clock()
        n = 0
        for t in self.tokens.values():
            if (client_id is None or t.client_id == client_id) and t.valid(now):
                t.expires_at = now
                n += 1
        return n

    def revoke_tokens(self, client_id: str | None = None) -> int:
        n = 0
        for t in self.tokens.values():
            if (client_id is None or t.client_id == client_id) and not t.revoked:
                t.revoked = True
                n += 1
        return n

    # ---------------------------------------------------------------- directory
    def create_queue(self, name: str, queue_id: str | None = None) -> Queue:
        q = Queue(queue_id or new_id(), name, self.clock())
        self.queues[q.id] = q
        return q

    def create_user(self, name: str, user_id: str | None = None) -> User:
        u = User(user_id or new_id(), name)
        self.users[u.id] = u
        return u

    def find_queues(self, name: str | None) -> list[Queue]:
        qs = sorted(self.queues.values(), key=lambda q: q.name.lower())
        if not name:
            return qs
        if name.endswith("*"):
            pre = name[:-1].lower()
            return [q for q in qs if q.name.lower().startswith(pre)]
        return [q for q in qs if q.name.lower() == name.lower()]

    # ---------------------------------------------------------------- calls
    def get_call(self, conversation_id: str) -> Conversation:
        c = self.calls.get(conversation_id)
        if c is None:
            raise WorldError(404, "not.found", f"Conversation {conversation_id} not found")
        return c

    def _changed(self, conv: Conversation) -> Conversation:
        conv.version += 1
        for fn in self.listeners:
            fn(conv)
        return conv

    def _live_call(self, conversation_id: str) -> Conversation:
        c = self.get_call(conversation_id)
        if c.end is not None:
            raise WorldError(400, "conversation.ended", f"Conversation {conversation_id} "
                             "has ended")
        return c

    def start_call(self, queue_id: str, *, ani: str = "tel:+14155550100",
                   dnis: str = "tel:+18005550199", customer_name: str = "Customer",
                   conversation_id: str | None = None) -> Conversation:
        """An inbound call into a queue: customer (connected) + acd (connected, in queue)."""
        q = self.queues.get(queue_id)
        if q is None:
            raise WorldError(404, "not.found", f"Queue {queue_id} not found")
        now = self.clock()
        conv = Conversation(conversation_id or new_id(), now, dnis)
        cust = Party(new_id(), "customer", "connected", "connected", "inbound", now,
                     name=customer_name, address=ani, ani=ani, dnis=dnis, connected_time=now,
                     peer=None)
        acd = Party(new_id(), "acd", "connected", "connected", "inbound", now, name=q.name,
                    address=dnis, ani=ani, dnis=dnis, connected_time=now, queue_id=q.id,
                    queue_name=q.name, peer=cust.id)
        cust.peer = acd.id
        conv.participants += [cust, acd]
        self.calls[conv.id] = conv
        return self._changed(conv)

    def connect_agent(self, conversation_id: str, user_id: str) -> Party:
        """ACD routes the call to an agent: the acd party leaves with disconnectType transfer."""
        conv = self._live_call(conversation_id)
        u = self._user(user_id)
        now = self.clock()
        acd = next((p for p in conv.participants if p.purpose == "acd" and p.live), None)
        queue_id = acd.queue_id if acd else None
        queue_name = acd.queue_name if acd else None
        if acd is not None:
            acd.state, acd.disconnect_type, acd.end_time = "disconnected", "transfer", now
        cust = next((p for p in conv.participants if p.purpose == "customer"), None)
        agent = Party(new_id(), "agent", "connected", "alerting", "inbound", now, name=u.name,
                      address=f"sip:{u.id}@localhost", ani=cust.ani if cust else None,
                      dnis=cust.dnis if cust else None, connected_time=now, user_id=u.id,
                      user_name=u.name, queue_id=queue_id, queue_name=queue_name,
                      peer=cust.id if cust else None)
        conv.participants.append(agent)
        self._changed(conv)
        return agent

    def add_external(self, conversation_id: str, address: str = "tel:+14155550123", *,
                     name: str | None = None) -> Party:
        """Conference in an external number (purpose external, outbound)."""
        conv = self._live_call(conversation_id)
        now = self.clock()
        p = Party(new_id(), "external", "connected", "dialing", "outbound", now, name=name,
                  address=address, ani=address, dnis=address, connected_time=now)
        conv.participants.append(p)
        self._changed(conv)
        return p

    def add_agent(self, conversation_id: str, user_id: str) -> Party:
        """Conference in another agent (a consult that became a conference)."""
        conv = self._live_call(conversation_id)
        u = self._user(user_id)
        now = self.clock()
        p = Party(new_id(), "agent", "connected", "alerting", "outbound", now, name=u.name,
                  address=f"sip:{u.id}@localhost", connected_time=now, user_id=u.id,
                  user_name=u.name)
        conv.participants.append(p)
        self._changed(conv)
        return p

    def add_supervisor(self, conversation_id: str, user_id: str, target_participant_id: str,
                       mode: str = "monitor") -> Party:
        """A supervisor who monitors, coaches or barges: purpose agent with the matching
        monitoredParticipantId / coachedParticipantId / bargedParticipantId."""
        if mode not in ("monitor", "coach", "barge"):
            raise WorldError(400, "bad.request", f"mode must be monitor, coach or barge: {mode}")
        conv = self._live_call(conversation_id)
        conv.party(target_participant_id)
        u = self._user(user_id)
        now = self.clock()
        p = Party(new_id(), "agent", "connected", "dialing", "outbound", now, name=u.name,
                  address=f"sip:{u.id}@localhost", connected_time=now, user_id=u.id,
                  user_name=u.name, muted=mode == "monitor")
        if mode == "monitor":
            p.monitored_participant_id = target_participant_id
        elif mode == "coach":
            p.coached_participant_id = target_participant_id
        else:
            p.barged_participant_id = target_participant_id
        conv.participants.append(p)
        self._changed(conv)
        return p

    def _user(self, user_id: str) -> User:
        u = self.users.get(user_id)
        if u is None:
            raise WorldError(404, "not.found", f"User {user_id} not found")
        return u

    def disconnect(self, conversation_id: str, participant_id: str,
                   disconnect_type: str = "client") -> bool:
        """End one party. The call ends when fewer than two parties remain connected.
        Returns False (no change) when the party was already final."""
        conv = self.get_call(conversation_id)
        p = conv.party(participant_id)
        if not p.live:
            return False
        now = self.clock()
        p.state, p.disconnect_type, p.end_time = "disconnected", disconnect_type, now
        p.held = False
        live = conv.live_parties()
        if len(live) < 2:
            for o in live:
                o.state, o.disconnect_type, o.end_time = "disconnected", "peer", now
            conv.end = now
        self._changed(conv)
        return True

    def end_call(self, conversation_id: str, disconnect_type: str = "endpoint") -> None:
        conv = self._live_call(conversation_id)
        now = self.clock()
        for p in conv.live_parties():
            p.state, p.disconnect_type, p.end_time = "disconnected", disconnect_type, now
        conv.end = now
        self._changed(conv)

    def set_attributes(self, conversation_id: str, participant_id: str,
                       attributes: dict[str, str]) -> None:
        """Merge string attributes into a participant (Genesys semantics: keys are replaced)."""
        conv = self.get_call(conversation_id)
        p = conv.party(participant_id)
        for k, v in attributes.items():
            if not isinstance(k, str) or not isinstance(v, str):
                raise WorldError(400, "bad.request", "attributes must map strings to strings")
        p.attributes.update(attributes)
        self._changed(conv)

    def set_flag(self, conversation_id: str, participant_id: str, reason: str | None) -> None:
        if reason not in (None, "general"):
            raise WorldError(400, "bad.request", f"flaggedReason must be 'general': {reason}")
        conv = self.get_call(conversation_id)
        conv.party(participant_id).flagged_reason = reason
        self._changed(conv)

    def set_party_state(self, conversation_id: str, participant_id: str, *,
                        held: bool | None = None, muted: bool | None = None,
                        confined: bool | None = None, recording: bool | None = None) -> None:
        conv = self._live_call(conversation_id)
        p = conv.party(participant_id)
        if held is not None:
            p.held = held
        if muted is not None:
            p.muted = muted
        if confined is not None:
            p.confined = confined
        if recording is not None:
            p.recording = recording
            p.recording_state = "active" if recording else "none"
        self._changed(conv)

    def set_recording(self, conversation_id: str, state: str) -> None:
        """Conversation recordingState: none | active | paused (securePause follows paused)."""
        if state not in ("none", "active", "paused"):
            raise WorldError(400, "bad.request", f"recordingState must be none, active or "
                             f"paused: {state}")
        conv = self._live_call(conversation_id)
        conv.recording_state = state
        conv.secure_pause = state == "paused"
        for p in conv.live_parties():
            p.recording = state == "active"
            p.recording_state = state
        self._changed(conv)

    def touch(self, conversation_id: str) -> None:
        """Republish a conversation without changing it (an update Genesys sends anyway)."""
        self._changed(self.get_call(conversation_id))

    def forget_call(self, conversation_id: str) -> None:
        """Drop a call from the world at once (GET/PATCH then answer 404), no event."""
        self.get_call(conversation_id)
        del self.calls[conversation_id]

    def active_calls(self) -> list[Conversation]:
        return [c for c in self.calls.values() if c.end is None]

    def evict_ended(self) -> int:
        """Forget calls that ended more than `ended_retention` seconds ago (GET then 404s)."""
        limit = self.clock() - self.ended_retention
        gone = [cid for cid, c in self.calls.items() if c.end is not None and c.end < limit]
        for cid in gone:
            del self.calls[cid]
        return len(gone)

    # ---------------------------------------------------------------- channels
    def create_channel(self, token: Token, connect_base: str) -> Channel:
        """A new channel; the 21st for a client retires its least recently used one,
        unconnected channels first."""
        now = self.clock()
        mine = [c for c in self.channels.values() if c.client_id == token.client_id]
        if len(mine) >= self.max_channels:
            victim = min(mine, key=lambda c: (c.connected, c.last_used))
            self.remove_channel(victim.id, "retired: channel limit reached")
        ch = Channel("streaming-" + new_id(), token.client_id, token.value, now,
                     now + self.channel_lifetime, now)
        self.channels[ch.id] = ch
        return ch

    def channel(self, channel_id: str, client_id: str | None = None) -> Channel:
        ch = self.channels.get(channel_id)
        if ch is None or (client_id is not None and ch.client_id != client_id):
            raise WorldError(404, "not.found", f"Channel {channel_id} not found")
        return ch

    def remove_channel(self, channel_id: str, reason: str) -> None:
        ch = self.channels.pop(channel_id, None)
        if ch is None:
            return
        for t in ch.topics:
            subs = self.topic_index.get(t)
            if subs is not None:
                subs.discard(channel_id)
                if not subs:
                    del self.topic_index[t]
        for fn in self.channel_listeners:
            fn(channel_id, reason)

    def _judge_topic(self, client: Client, topic: str) -> TopicState:
        m = _QUEUE_TOPIC.match(topic)
        if m:
            if m.group(1) not in self.queues:
                return TopicState(topic, "Rejected", "Queue not found: " + m.group(1), [])
            if QUEUE_VIEW_PERMISSION not in client.permissions:
                return TopicState(topic, "Rejected", "Missing permissions",
                                  [QUEUE_VIEW_PERMISSION])
            return TopicState(topic, "Permitted")
        m = _USER_TOPIC.match(topic)
        if m:
            if m.group(1) not in self.users:
                return TopicState(topic, "Rejected", "User not found: " + m.group(1), [])
            return TopicState(topic, "Permitted")
        if topic.startswith("v2."):
            # Other topics are accepted and simply never fire in the sandbox.
            return TopicState(topic, "Permitted")
        return TopicState(topic, "Rejected", "Invalid topic name: " + topic, [])

    def subscribe(self, channel_id: str, client_id: str, topics: list[str], *, replace: bool,
                  ignore_errors: bool) -> list[TopicState]:
        """PUT (replace=True) or POST (add) subscriptions. Returns the channel's topic list.

        Without `ignore_errors`, any rejected topic fails the whole request (400, nothing
        changes); with it, permitted topics are subscribed and rejected ones reported."""
        ch = self.channel(channel_id, client_id)
        client = self.clients[client_id]
        judged = [self._judge_topic(client, t) for t in dict.fromkeys(topics)]
        bad = [j for j in judged if j.state == "Rejected"]
        if bad and not ignore_errors:
            listing = ", ".join(f"{j.id} ({j.rejection_reason})" for j in bad)
            missing = sorted({m for j in bad for m in j.missing_permissions})
            if all(j.missing_permissions for j in bad):
                # only permission failures: what ignoreErrors exists for (SDK docs)
                raise WorldError(403, "missing.permissions",
                                 f"Missing permission: {', '.join(missing)}; topics rejected: "
                                 + listing, details=[j.id for j in bad])
            raise WorldError(400, "notification.subscription.topics.rejected",
                             "Topics rejected: " + listing, details=[j.id for j in bad])
        keep = {} if replace else {k: v for k, v in ch.topics.items() if v.state == "Permitted"}
        for j in judged:
            keep[j.id] = j
        permitted = [k for k, v in keep.items() if v.state == "Permitted"]
        if len(permitted) > self.max_topics:
            raise WorldError(400, "notification.subscription.topics.limit",
                             f"Too many topics: {len(permitted)} exceeds the limit of "
                             f"{self.max_topics} per channel")
        for t in ch.topics:
            subs = self.topic_index.get(t)
            if subs is not None:
                subs.discard(ch.id)
                if not subs:
                    del self.topic_index[t]
        ch.topics = keep
        for t in permitted:
            self.topic_index.setdefault(t, set()).add(ch.id)
        now = self.clock()
        ch.last_used = now
        ch.expires_at = now + self.channel_lifetime
        return list(keep.values())

    def unsubscribe_all(self, channel_id: str, client_id: str) -> None:
        self.subscribe(channel_id, client_id, [], replace=True, ignore_errors=True)

    def expire_channel(self, channel_id: str) -> None:
        self.channel(channel_id).expires_at = self.clock()

    def reap_channels(self) -> list[tuple[str, str]]:
        """Remove channels that expired or whose creating token is no longer valid."""
        now = self.clock()
        out: list[tuple[str, str]] = []
        for ch in list(self.channels.values()):
            tok = self.tokens.get(ch.token)
            if now >= ch.expires_at:
                out.append((ch.id, "channel expired"))
            elif tok is None or not tok.valid(now):
                out.append((ch.id, "the token that created the channel is no longer valid"))
        for cid, why in out:
            self.remove_channel(cid, why)
        return out
