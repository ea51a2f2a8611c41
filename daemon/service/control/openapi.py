"""The control API's OpenAPI 3.1 document, generated from the pydantic models that validate
the requests (`models.py`), so the document cannot drift from the code.

    python -m daemon.service.control > docs/control-api.json

`docs/control-api.json` is committed; a test fails when it is not current.
"""

from __future__ import annotations

import functools
import json
from typing import Any

from pydantic import BaseModel
from pydantic.json_schema import JsonSchemaMode, models_json_schema

from daemon.core.ids import UUID_PATTERN

from daemon.service.control.models import (AmbiguousBody, CallView, Ejection, EjectionAccepted,
                                           EjectionRequest, ErrorBody, UnavailableBody)

_MODELS: list[tuple[type[BaseModel], JsonSchemaMode]] = [
    (EjectionRequest, "validation"), (EjectionAccepted, "serialization"),
    (Ejection, "serialization"), (CallView, "serialization"), (ErrorBody, "serialization"),
    (AmbiguousBody, "serialization"), (UnavailableBody, "serialization"),
]


def _ref(model: type[BaseModel]) -> dict[str, Any]:
    return {"$ref": f"#/components/schemas/{model.__name__}"}


def _json(model: type[BaseModel], description: str, **headers: str) -> dict[str, Any]:
    out: dict[str, Any] = {"description": description,
                           "content": {"application/json": {"schema": _ref(model)}}}
    if headers:
        out["headers"] = {h: {"description": d, "schema": {"type": "string"}}
                          for h, d in headers.items()}
    return out


_COMMON = {
    "401": _json(ErrorBody, "No Authorization header, or an unknown token.",
                 **{"WWW-Authenticate": 'Bearer realm="confguard"'}),
    "429": _json(ErrorBody, "More than control.max_requests_per_minute from this caller, or "
                            "(code too_many_failed_logins) too many failed logins from this address.",
                 **{"Retry-After": "Seconds to wait."}),
}


def build_document() -> dict[str, Any]:
    """The OpenAPI document as plain data."""
    _, defs = models_json_schema(_MODELS, ref_template="#/components/schemas/{model}")
    schemas = defs.get("$defs", {})
    idem = {"name": "Idempotency-Key", "in": "header", "required": False,
            "description": "The same key from the same caller within 24 h returns the first "
                           "202 answer (same id) and sends nothing again.",
            "schema": {"type": "string", "minLength": 1, "maxLength": 255}}
    return {
        "openapi": "3.1.0",
        "info": {"title": "confguard control API", "version": "1",
                 "description": "Ask a running confguard daemon to remove one party from a "
                                "live Genesys Cloud call, and read the calls it holds in memory. "
                                "Every route needs Authorization: Bearer <token>."},
        "security": [{"bearerAuth": []}],
        "paths": {
            "/v1/ejections": {"post": {
                "operationId": "createEjection",
                "summary": "Remove one live party (audited, then PATCHed by the enforcer).",
                "parameters": [idem],
                "requestBody": {"required": True, "content": {"application/json": {
                    "schema": _ref(EjectionRequest)}}},
                "responses": {
                    "202": _json(EjectionAccepted, "One live party resolved; the decision is audited."),
                    "400": _json(ErrorBody, "Bad JSON, an unknown field, no selector or several, "
                                            "or an id that is not a UUID (code invalid_id)."),
                    **_COMMON,
                    "404": _json(ErrorBody, "No such call or party, or the party has already left "
                                            "(code party_gone)."),
                    "409": _json(AmbiguousBody, "Several live parties match; nothing was done."),
                    "413": _json(ErrorBody, "Body larger than 64 KiB."),
                    "422": _json(ErrorBody, "Idempotency-Key reused with a different body."),
                    "502": _json(ErrorBody, "Reading the call from Genesys failed."),
                    "503": _json(UnavailableBody, "Not the leader (standby, no lease) or draining.",
                                 **{"Retry-After": "Seconds to wait."}),
                }}},
            "/v1/ejections/{id}": {"get": {
                "operationId": "getEjection",
                "summary": "Where one removal stands (the caller's own ejections only).",
                "parameters": [{"name": "id", "in": "path", "required": True,
                                "schema": {"type": "string", "pattern": UUID_PATTERN}}],
                "responses": {"200": _json(Ejection, "The ejection."), **_COMMON,
                              "400": _json(ErrorBody, "The id is not a UUID (code invalid_id)."),
                              "404": _json(ErrorBody, "No such ejection for this caller.")}}},
            "/v1/calls/{conversationId}": {"get": {
                "operationId": "getCall",
                "summary": "The call as confguard holds it in memory (no Genesys request).",
                "parameters": [{"name": "conversationId", "in": "path", "required": True,
                                "schema": {"type": "string", "pattern": UUID_PATTERN}}],
                "responses": {"200": _json(CallView, "The call."), **_COMMON,
                              "400": _json(ErrorBody, "The id is not a UUID (code invalid_id)."),
                              "404": _json(ErrorBody, "The call is not tracked.")}}},
            "/v1/openapi.json": {"get": {
                "operationId": "getOpenapi", "summary": "This document.",
                "responses": {"200": {"description": "The OpenAPI document.",
                                      "content": {"application/json": {}}}, **_COMMON}}},
        },
        "components": {
            "securitySchemes": {"bearerAuth": {"type": "http", "scheme": "bearer"}},
            "schemas": schemas,
        },
    }


def render() -> str:
    """The document as committed in docs/control-api.json (sorted keys, 2-space indent)."""
    return json.dumps(build_document(), indent=2, sort_keys=True) + "\n"


@functools.cache
def document_bytes() -> bytes:
    return render().encode()
