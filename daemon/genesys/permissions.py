"""Which permissions the daemon needs from its OAuth client's role, and whether it has them.

A client-credentials token can learn its own permissions in two reads, both read-only:
- `GET /api/v2/tokens/me` (needs no permission): `OAuthClient.roleDivisions` lists the
  client's roles, each with the division it is granted in;
- `GET /api/v2/authorization/roles/{roleId}` (needs `authorization:role:view`): the role's
  `permissions` (strings `domain:entity:action`) and `permissionPolicies` (`domain`,
  `entityName`, `actionSet`; `*` matches anything).

`learn(client)` makes those reads (never one that changes anything) and `judge(needs,
learnt)` is pure: each need is `ok` (a readable role grants it), `missing` (every role was
read and none grants it) or `not_checked` (a role could not be read, or the client's roles
could not be learnt: the reason says which). What this cannot see: in which divisions the
calls and queues in scope live, so a permission granted only in another division still reads
as granted (`DIVISION_NOTE`).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol

from daemon.config import Config
from daemon.errors import ApiError
from daemon.genesys.scope import looks_like_uuid

#: The participant PATCH accepts any one of these (Genesys' documentation of the endpoint);
#: grant the first.
REMOVAL_PERMISSIONS = ("conversation:communication:disconnect", "conversation:participant:wrapup",
                       "conversation:call:record")
ANALYTICS_PERMISSION = "analytics:conversationDetail:view"
QUEUE_VIEW_PERMISSION = "routing:queue:view"
ROLE_VIEW_PERMISSION = "authorization:role:view"
DIVISION_NOTE = ("division scope: a permission granted only in a division other than the one "
                 "holding the calls and queues in scope reads as granted here")

Status = Literal["ok", "missing", "not_checked"]


@dataclass(frozen=True, slots=True)
class Need:
    """A permission the daemon needs (`any_of`: one of them suffices; the first is the one
    to grant) and what for. A need that is not `required` is reported, never a failure."""

    any_of: tuple[str, ...]
    purpose: str
    required: bool = True

    @property
    def permission(self) -> str:
        return self.any_of[0]


@dataclass(frozen=True, slots=True)
class Role:
    """One role of the client: its id, the division it is granted in, and its permissions
    (None when the role could not be read; `error` says why)."""

    id: str
    division_id: str | None
    name: str | None = None
    permissions: tuple[str, ...] | None = None
    error: str | None = None


@dataclass(frozen=True, slots=True)
class Learnt:
    """What the token could learn about itself. `error`: why nothing could be learnt."""

    client_id: str | None = None
    roles: tuple[Role, ...] = ()
    error: str | None = None


@dataclass(frozen=True, slots=True)
class Verdict:
    need: Need
    status: Status
    detail: str


def needs_for(config: Config) -> list[Need]:
    """What the daemon will ask of Genesys with `config`: removals (required in
    `mode: enforce`), the analytics query of every resync, and the queue lookup when a queue
    is named by name. Topics are judged by subscribing them (Genesys answers each)."""
    needs = [
        Need(REMOVAL_PERMISSIONS, "removing a party: PATCH /api/v2/conversations/calls/{id}/participants/{id}",
             required=config.mode == "enforce"),
        Need((ANALYTICS_PERMISSION,),
             "finding calls after a gap: POST /api/v2/analytics/conversations/details/query"),
    ]
    if any(not looks_like_uuid(str(q).strip()) for q in config.subscriptions.queues):
        needs.append(Need((QUEUE_VIEW_PERMISSION,),
                          "looking up queues named in subscriptions.queues: GET /api/v2/routing/queues"))
    return needs


def _matches(granted: str, wanted: str) -> bool:
    g, w = granted.split(":"), wanted.split(":")
    return len(g) == len(w) and all(a == "*" or a == b for a, b in zip(g, w))


def role_permissions(body: dict[str, Any]) -> tuple[str, ...]:
    """The permissions a DomainOrganizationRole body grants: its `permissions` strings and
    every `domain:entityName:action` of its `permissionPolicies` (malformed parts skipped)."""
    out: set[str] = set()
    perms = body.get("permissions")
    if isinstance(perms, list):
        out.update(p for p in perms if isinstance(p, str) and p.count(":") == 2)
    policies = body.get("permissionPolicies")
    for pol in policies if isinstance(policies, list) else ():
        if not isinstance(pol, dict):
            continue
        domain, entity, actions = pol.get("domain"), pol.get("entityName"), pol.get("actionSet")
        if isinstance(domain, str) and isinstance(entity, str) and isinstance(actions, list):
            out.update(f"{domain}:{entity}:{a}" for a in actions if isinstance(a, str))
    return tuple(sorted(out))


def judge(needs: Iterable[Need], learnt: Learnt) -> list[Verdict]:
    """One verdict per need (see the module docstring)."""
    out = []
    readable = [r for r in learnt.roles if r.permissions is not None]
    unreadable = [r for r in learnt.roles if r.permissions is None]
    for need in needs:
        if learnt.error is not None:
            out.append(Verdict(need, "not_checked", learnt.error))
            continue
        hit = next(((r, g, w) for r in readable for w in need.any_of for g in r.permissions or ()
                    if _matches(g, w)), None)
        if hit is not None:
            role, granted, wanted = hit
            out.append(Verdict(need, "ok", f"{wanted} through role {role.name or role.id}"
                               + (f" ({granted})" if granted != wanted else "")))
        elif unreadable:
            why = "; ".join(f"role {r.id}: {r.error}" for r in unreadable)
            out.append(Verdict(need, "not_checked", why))
        elif not learnt.roles:
            out.append(Verdict(need, "missing", "the OAuth client has no role"))
        else:
            alts = f" (or one of {', '.join(need.any_of[1:])})" if len(need.any_of) > 1 else ""
            out.append(Verdict(need, "missing", f"no role of the OAuth client grants it{alts}"))
    return out


class SelfReader(Protocol):
    async def token_info(self) -> dict[str, Any]: ...
    async def get_role(self, role_id: str) -> dict[str, Any]: ...


def _why(exc: ApiError, what: str, needs: str | None = None) -> str:
    if exc.status == 403 and needs:
        return f"{what} answered 403: reading it needs {needs}, which the client lacks"
    return f"{what} failed: {' '.join(str(exc).split())}"


async def learn(client: SelfReader) -> Learnt:
    """The client's roles and their permissions, read with the client's own token."""
    try:
        info = await client.token_info()
    except ApiError as exc:
        return Learnt(error=_why(exc, "GET /api/v2/tokens/me"))
    oauth = info.get("OAuthClient")
    if not isinstance(oauth, dict):
        return Learnt(error="GET /api/v2/tokens/me named no OAuth client (is this a user's token?)")
    grants = oauth.get("roleDivisions")
    pairs: list[tuple[str, str | None]] = []
    for g in grants if isinstance(grants, list) else ():
        if isinstance(g, dict) and isinstance(g.get("roleId"), str):
            division = g.get("divisionId")
            pairs.append((g["roleId"], division if isinstance(division, str) else None))
    roles: list[Role] = []
    for role_id in dict.fromkeys(r for r, _ in pairs):
        divisions = [d for r, d in pairs if r == role_id]
        try:
            body = await client.get_role(role_id)
        except ApiError as exc:
            roles.append(Role(role_id, divisions[0],
                              error=_why(exc, "GET /api/v2/authorization/roles/{roleId}", ROLE_VIEW_PERMISSION)))
            continue
        name = body.get("name")
        roles.append(Role(role_id, divisions[0], name if isinstance(name, str) else None,
                          role_permissions(body)))
    client_id = oauth.get("id")
    return Learnt(client_id if isinstance(client_id, str) else None, tuple(roles))


def summary(verdicts: Sequence[Verdict]) -> tuple[list[str], bool]:
    """Lines for `check --online` and whether every required, checkable need passed:
    `ok: <permission> (<purpose>; <how>)`, `MISSING: ...`, `not checked: <permission> (<why>)`."""
    lines = []
    passed = True
    for v in verdicts:
        need = v.need
        if v.status == "ok":
            lines.append(f"ok: {v.detail} ({need.purpose})")
        elif v.status == "missing":
            if need.required:
                passed = False
                lines.append(f"MISSING: {need.permission} ({need.purpose}): {v.detail}")
            else:
                lines.append(f"missing, not needed in this mode: {need.permission} ({need.purpose}; "
                             f"needed for mode: enforce): {v.detail}")
        else:
            lines.append(f"not checked: {need.permission} ({v.detail})")
    return lines, passed
