"""The control API's request and response bodies (pydantic). These models validate what
callers send AND generate the OpenAPI document (`openapi.py`), so the two cannot drift.

Field names are camelCase, like Genesys' own JSON. Times are ISO-8601 UTC with milliseconds
and a `Z` suffix (`2026-11-21T09:15:02.345Z`), or null when the moment has not come.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, model_validator

from daemon.core.ids import UUID_PATTERN

#: The request fields that name the party; exactly one must be given.
SELECTORS: tuple[str, ...] = ("participantId", "userId", "externalContactId", "address", "name")

#: Every `state` an ejection can be in: `pending` until the enforcer writes its outcome.
EjectionState = Literal["pending", "disconnected", "already_gone", "failed", "suppressed",
                        "observed", "unconfirmed", "standby", "unknown"]
FINAL_EJECTION_STATES: frozenset[str] = frozenset(
    {"disconnected", "already_gone", "failed", "suppressed", "observed", "unconfirmed",
     "standby", "unknown"})

#: A Genesys id: a UUID, checked before it can reach any URL (`daemon.core.ids`).
Uuid = Annotated[str, StringConstraints(strip_whitespace=True, pattern=UUID_PATTERN)]
Text = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=256)]
Reason = Annotated[str, StringConstraints(strip_whitespace=True, max_length=1000)]


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


def _one_selector_schema(schema: dict[str, Any]) -> None:
    # The "exactly one selector" rule, for OpenAPI readers (the validator below enforces it).
    schema["oneOf"] = [{"required": [s]} for s in SELECTORS]


class EjectionRequest(_Body):
    """`POST /v1/ejections`: remove one party of a live call. Name the party with exactly
    one of `participantId`, `userId`, `externalContactId`, `address` (a phone number or
    address, compared with `address`, `ani` and `dnis` after normalisation, as `confguard
    eject --address` does) or `name` (case-insensitive, exact)."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True,
                              json_schema_extra=_one_selector_schema)

    conversationId: Uuid = Field(description="The call's conversation id (a UUID).")
    participantId: Uuid | None = Field(default=None, description="Participant id.")
    userId: Uuid | None = Field(default=None, description="User id of an agent/user party.")
    externalContactId: Uuid | None = Field(default=None, description="External contact id.")
    address: Text | None = Field(default=None, description="Phone number or address, any format.")
    name: Text | None = Field(default=None, description="Party name (case-insensitive, exact).")
    reason: Reason | None = Field(default=None, description="Why; written to the audit trail.")

    @model_validator(mode="after")
    def _exactly_one_selector(self) -> EjectionRequest:
        given = [s for s in SELECTORS if getattr(self, s) is not None]
        if len(given) != 1:
            what = "none" if not given else ", ".join(given)
            raise ValueError(f"name the party with exactly one of {', '.join(SELECTORS)} "
                             f"(got {what})")
        return self

    @property
    def selector(self) -> tuple[str, str]:
        """(field name, value) of the one selector given."""
        for s in SELECTORS:
            value = getattr(self, s)
            if value is not None:
                return s, str(value)
        raise AssertionError("validated request without a selector")  # pragma: no cover


class EjectionAccepted(_Body):
    """202 answer to `POST /v1/ejections`: the decision is audited; `state` is `pending`
    until the enforcer has an outcome (then one of the final states)."""

    id: str = Field(description="The ejection id, for GET /v1/ejections/{id}.")
    state: EjectionState
    conversationId: str
    participantId: str


class Ejection(_Body):
    """`GET /v1/ejections/{id}`: where one removal stands."""

    id: str
    state: EjectionState
    conversationId: str
    participantId: str
    caller: str = Field(description="The caller that asked for it.")
    reason: str | None
    httpStatus: int | None = Field(description="HTTP status Genesys gave the last PATCH; "
                                               "null when nothing was sent.")
    attempts: int = Field(description="PATCHes sent for it.")
    requestedAt: str = Field(description="When the request was accepted.")
    sentAt: str | None = Field(description="When the first PATCH was written.")
    confirmedAt: str | None = Field(description="When the party was seen gone.")
    error: str | None = Field(description="What went wrong or why nothing was sent.")


class Party(_Body):
    """One participant as confguard holds it in memory."""

    id: str
    name: str | None
    purpose: str | None
    state: str | None
    direction: str | None
    address: str | None
    ani: str | None
    dnis: str | None
    userId: str | None
    queueId: str | None
    externalContactId: str | None
    attributes: dict[str, str]
    connectedTime: str | None
    endTime: str | None


class CallView(_Body):
    """`GET /v1/calls/{conversationId}`: the call as confguard holds it (no Genesys request)."""

    conversationId: str
    recordingState: str | None
    securePause: bool | None
    ended: bool
    lastUpdate: str | None = Field(description="When confguard last applied a change to it.")
    parties: list[Party]


class ErrorBody(_Body):
    """Every error answer: the HTTP status again, a stable snake_case `code`, and a message."""

    status: int
    code: str
    message: str


class Candidate(_Body):
    participantId: str
    name: str | None
    purpose: str | None


class AmbiguousBody(ErrorBody):
    """409: several live parties match; nothing was done. Pick one by `participantId`."""

    candidates: list[Candidate]


class UnavailableBody(ErrorBody):
    """503: this daemon does not act now (standby, no lease, or draining)."""

    leader: str | None = Field(description="The node holding the lease, when known.")
