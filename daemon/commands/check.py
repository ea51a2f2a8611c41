"""`confguard check`: validate config.yaml before it goes live.

Offline (default): the whole file, every rule (fields, operators, regexes, types), every
list file, placeholders; any problem is printed as `file:line:col: message` and exits 2.

`--online` also proves the configuration against Genesys Cloud: fetches a token, resolves
queue names, creates a notification channel, subscribes every topic with
`ignoreErrors=true`, reports each Rejected topic with its reason and missing permissions,
then removes the subscriptions again (a channel cannot be deleted; unconnected, it
expires by itself and is the first one Genesys retires). With an `eventbridge:` section it
also checks the SQS queue (exists, attributes readable; its visibility timeout and redrive
policy named, a missing dead-letter queue warned about; no message is received).

`--schema` prints the JSON Schema of config.yaml (draft 2020-12) and exits 0: generated
from the pydantic models of `daemon.config`, with the rules' `when`/`call` conditions
spelt out from the rule field registry (`daemon.core.rules.FIELDS`), so an editor (the YAML
language server) can complete and check field names, operators and value types. The
committed copy is docs/config.schema.json (tests/commands/test_schema.py keeps it current).

Exit codes: 0 ok, 1 online check found problems (a queue name not found, rejected topics, no such
SQS queue), 2 invalid configuration, 4 credentials refused or permission missing, 5 API or network
failure.
"""

from __future__ import annotations

import asyncio
import json
import sys
from typing import Any, TextIO

from pydantic.json_schema import GenerateJsonSchema
from pydantic_core import PydanticOmit, core_schema

from daemon.genesys.api import GenesysClient
from daemon.config import DURATION_PATTERN, Config, load_config, load_lists, resolve_credentials
from daemon.errors import ConfigError, ConfigErrors
from daemon.core.rules import ATTRIBUTES, COMBINATORS, FIELDS, HAS_PARTY, FieldSpec, compile_rules
from daemon.genesys import permissions
from daemon.genesys.scope import resolve_scope, shard


def load_all(path: str) -> Config:
    """`load_config` and every rule and list compiled, reporting every problem in one pass:
    when the file has problems in some rules, the other rules are still compiled, and the
    whole lot is raised together (ConfigErrors, in file order)."""
    problems: list[ConfigError] = []
    try:
        config = load_config(path)
    except ConfigErrors as exc:
        if not isinstance(exc.config, Config):
            raise
        problems.extend(exc.errors)
        config = exc.config
    try:
        summary(config)
    except ConfigError as exc:
        problems.append(exc)
    ConfigErrors.raise_all(problems)
    return config


def summary(config: Config) -> str:
    compile_rules(config, load_lists(config))  # raises ConfigError with file:line:col for any rule or list problem
    subs = config.subscriptions
    if not subs.queues and not subs.users:
        # `confguard run` refuses to start on this; check must not call it ok.
        message = ("nothing to subscribe: subscriptions.queues and subscriptions.users are both "
                   "empty; add the queues (ids or names) or users (ids) whose calls confguard watches")
        raise (config.source.error(("subscriptions", "queues"), message, key=True) if config.source
               else ConfigError(message))
    enabled = [r for r in config.rules if r.enabled]
    return (f"ok: {config.source.file if config.source else 'config'}: {len(enabled)} rule(s) enabled "
            f"of {len(config.rules)}, {len(config.lists)} list(s), "
            f"{len(config.subscriptions.queues)} queue(s) and {len(config.subscriptions.users)} user(s) in scope, "
            f"mode {config.mode}, max {config.safety.max_disconnects_per_minute} disconnects/min")


async def online_check(config: Config, out: TextIO) -> int:
    credentials = resolve_credentials(config.genesys, base_dir=config.base_dir)
    async with GenesysClient(config.genesys, credentials) as client:
        await client.tokens.token()
        print(f"ok: token issued by {config.genesys.login_origin}", file=out)
        failures: list[str] = []
        lines, passed = permissions.summary(permissions.judge(permissions.needs_for(config),
                                                              await permissions.learn(client)))
        for line in lines:
            print(line, file=out)
        print(f"note: not checked: {permissions.DIVISION_NOTE}", file=out)
        if not passed:
            failures.append("a permission the daemon needs is missing")
        out.flush()
        # A queue name that does not resolve: SubscriptionError, one line on stderr, exit 1.
        scope = await resolve_scope(client, config.subscriptions)
        print(f"ok: {len(scope.queue_ids)} queue(s), {len(scope.user_ids)} user(s) -> {len(scope.topics)} topic(s)",
              file=out)
        problems = 0
        for i, topics in enumerate(shard(list(scope.topics))):
            channel = await client.create_channel()
            try:
                await client.put_subscriptions(channel.id, topics, ignore_errors=True)
                states = await client.get_subscriptions(channel.id)
                permitted = {s.id for s in states if s.state == "Permitted"}
                for s in states:
                    if s.state != "Permitted":
                        problems += 1
                        perms = ", ".join(s.missing_permissions) or "none named"
                        print(f"REJECTED: {s.id}: {s.rejection_reason or s.state}; missing permissions: {perms}",
                              file=out)
                for t in topics:
                    if t not in permitted and not any(s.id == t for s in states):
                        problems += 1
                        print(f"REJECTED: {t}: not in the channel's subscriptions after subscribing", file=out)
                print(f"ok: channel {i + 1}: {len(permitted)} of {len(topics)} topic(s) permitted", file=out)
            finally:
                await client.delete_subscriptions(channel.id)
        if problems:
            failures.append(f"{problems} topic(s) rejected: compliance coverage would have a gap")
        if failures:
            print(f"FAIL: {'; '.join(failures)}", file=out)
            return 1
    if config.eventbridge.enabled:
        code = await check_eventbridge(config, out)
        if code:
            return code
    print("ok: online check passed; subscriptions removed again", file=out)
    return 0


async def check_eventbridge(config: Config, out: TextIO) -> int:
    """The `eventbridge:` queue: it exists and its attributes are readable; its visibility
    timeout and redrive policy are named. 0 ok, 1 no such queue, 4 access or credentials
    refused, 5 unreachable or another AWS failure."""
    from daemon.service.aws import describe_aws_error
    from daemon.service.eventbridge import check_queue

    try:
        report = await check_queue(config.eventbridge)
    except Exception as exc:  # noqa: BLE001 - every AWS failure is reported, none is a crash
        failure = describe_aws_error(exc)
        print(f"FAIL: eventbridge queue {config.eventbridge.queue_url}: {failure.kind}: "
              f"{failure.code}: {failure.message}", file=out)
        return {"not_found": 1, "access_denied": 4, "credentials": 4}.get(failure.kind, 5)
    for line in report.lines():
        print(line, file=out)
    return 0


# ---------------------------------------------------------------------- JSON Schema

SCHEMA_DIALECT = "https://json-schema.org/draft/2020-12/schema"
SCHEMA_PATH = "docs/config.schema.json"

_OP_HELP = {
    "equals": "equal to this value (a bare value means equals)",
    "not_equals": "not equal to this value (an absent field is not equal)",
    "in": "one of these values",
    "not_in": "none of these values (an absent field is none of them)",
    "in_list": "in the named list under 'lists:'",
    "not_in_list": "not in the named list under 'lists:'",
    "matches": "matches this regular expression in full",
    "contains": "contains this text",
    "starts_with": "starts with this text",
    "exists": "true: the field is present; false: it is absent",
    "gt": "greater than this number", "gte": "greater than or equal to this number",
    "lt": "less than this number", "lte": "less than or equal to this number",
}
# JSON types a comparison value may have, per field type of the rule registry.
_VALUE_TYPES: dict[str, list[str]] = {
    "str": ["string", "integer"], "phone": ["string", "integer"], "set": ["string", "integer"],
    "bool": ["boolean"], "num": ["number"], "attr": ["string", "number", "boolean"],
}


class _OmitUnrepresentable(GenerateJsonSchema):
    """Leaves out what JSON cannot hold (Config.source, attached after loading)."""

    def handle_invalid_for_json_schema(self, schema: core_schema.CoreSchema,
                                       error_info: str) -> dict[str, Any]:
        raise PydanticOmit


def _operator(op: str, kind: str) -> dict[str, Any]:
    """The schema of one operator's argument on a field of type `kind`."""
    value: dict[str, Any] = {"type": _VALUE_TYPES[kind]}
    schema: dict[str, Any]
    if op in ("equals", "not_equals"):
        schema = dict(value)
    elif op in ("in", "not_in"):
        schema = {"type": "array", "items": value, "minItems": 1}
    elif op == "exists":
        schema = {"type": "boolean"}
    elif op in ("gt", "gte", "lt", "lte"):
        schema = {"type": "number"}
    elif op in ("matches", "contains", "starts_with"):
        schema = {"type": "string", **({"format": "regex"} if op == "matches" else {})}
    elif op in ("in_list", "not_in_list"):
        schema = {"type": "string"}
    else:  # a new operator in the registry must be described here (test_schema fails)
        raise AssertionError(f"operator {op!r} has no schema")
    schema["description"] = _OP_HELP.get(op, op)
    return schema


def _condition(kind: str, operators: tuple[str, ...]) -> dict[str, Any]:
    """A field's condition: a bare value (equals) or a mapping of its operators."""
    return {
        "description": f"a {kind} field: a value (equals) or a mapping of operators",
        "anyOf": [
            {"type": _VALUE_TYPES[kind]},
            {"type": "object", "properties": {op: _operator(op, kind) for op in operators},
             "additionalProperties": False, "minProperties": 1},
        ],
    }


def _rule_conditions() -> dict[str, Any]:
    """$defs for the rules' `when` (party) and `call` condition mappings, from the rule
    field registry (daemon.core.rules.FIELDS: name, scope, type, operators)."""
    defs: dict[str, Any] = {}

    def ref(spec: FieldSpec) -> dict[str, Any]:
        key = f"Field_{spec.type}"
        cond = _condition(spec.type, spec.operators)
        if defs.setdefault(key, cond) != cond:  # operators differ within a type: inline it
            return {**cond, "description": f"{spec.scope} field {spec.name}"}
        return {"$ref": f"#/$defs/{key}", "description": f"{spec.scope} field {spec.name}"}

    party_props: dict[str, Any] = {}
    call_props: dict[str, Any] = {}
    for spec in FIELDS.values():
        if spec.scope == "party":
            party_props[spec.name] = ref(spec)
        else:
            call_props[spec.name] = ref(spec)
            party_props[f"call.{spec.name}"] = ref(spec)  # a call field inside `when:`
    has_party = {"$ref": "#/$defs/PartyConditions",
                 "description": "another party of the call matches these party conditions"}
    call_props[HAS_PARTY.name] = has_party
    party_props[f"call.{HAS_PARTY.name}"] = has_party

    def combinators(group_ref: str) -> dict[str, Any]:
        assert set(COMBINATORS) == {"any", "all", "not"}
        group = {"$ref": group_ref}
        return {"any": {"type": "array", "items": group, "minItems": 1,
                        "description": "at least one of these condition mappings holds"},
                "all": {"type": "array", "items": group, "minItems": 1,
                        "description": "every one of these condition mappings holds"},
                "not": {**group, "description": "this condition mapping does not hold"}}

    defs["PartyConditions"] = {
        "type": "object", "minProperties": 1, "additionalProperties": False,
        "description": "Conditions on the party being judged; every one must hold.",
        "properties": {**party_props, **combinators("#/$defs/PartyConditions")},
        "patternProperties": {"^attributes\\..+$": {**ref(ATTRIBUTES),
                                                     "description": "participant data (text)"}},
    }
    defs["CallConditions"] = {
        "type": "object", "minProperties": 1, "additionalProperties": False,
        "description": "Conditions on the call as a whole; every one must hold.",
        "properties": {**call_props, **combinators("#/$defs/CallConditions")},
    }
    return defs


def config_schema() -> dict[str, Any]:
    """The JSON Schema of config.yaml: the pydantic models, plus the rule conditions."""
    schema: dict[str, Any] = Config.model_json_schema(schema_generator=_OmitUnrepresentable)
    schema["properties"].pop("source", None)
    defs: dict[str, Any] = schema.setdefault("$defs", {})
    defs.pop("ConfigSource", None)
    defs.update(_rule_conditions())
    rule = defs["RuleSpec"]["properties"]
    rule["when"] = {"$ref": "#/$defs/PartyConditions"}
    rule["call"] = {"$ref": "#/$defs/CallConditions"}
    rule["hold_for"] = {
        "description": "how long the conditions must hold before the rule fires",
        "anyOf": [{"type": "string", "pattern": DURATION_PATTERN},
                  {"type": "number", "minimum": 0}, {"type": "null"}]}
    rule["when"]["description"] = "conditions on the party being judged"
    rule["call"]["description"] = "conditions on the call as a whole"
    schema.pop("title", None)
    return {"$schema": SCHEMA_DIALECT, "title": "confguard config.yaml", **schema}


def schema_text() -> str:
    """`config_schema()` as committed in docs/config.schema.json."""
    return json.dumps(config_schema(), indent=2, ensure_ascii=False) + "\n"


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "check", help="validate config.yaml (and with --online, against Genesys Cloud)",
        description="Validate config.yaml offline; --online also checks credentials, queue names and topic permissions.",
        epilog="exit codes: 0 ok, 1 a queue name not found or a topic rejected, 2 invalid config, 4 credentials or permission refused, 5 API/network failure")
    p.add_argument("--config", default="config.yaml", help="path to config.yaml (default: %(default)s)")
    p.add_argument("--online", action="store_true", help="also check against Genesys Cloud, then clean up")
    p.add_argument("--schema", action="store_true",
                   help=f"print the JSON Schema of config.yaml (committed as {SCHEMA_PATH}) and exit")
    p.set_defaults(func=check_command)


def check_command(args: Any, out: TextIO = sys.stdout) -> int:
    if getattr(args, "schema", False):
        out.write(schema_text())
        return 0
    # A ConfigError reaches daemon.cli.main, which prints it as bare FILE:LINE:COL: message
    # (ConfigErrors: one such line per problem).
    config = load_all(args.config)
    print(summary(config), file=out)
    if config.audit.signing_key_file:  # a key that cannot be read would stop `run` at start
        from daemon.config.secrets import resolve_signing_key_file
        from daemon.errors import AuditError
        from daemon.service.checkpoint import key_id, load_private_key

        try:
            key_file = resolve_signing_key_file(config.audit, base_dir=config.base_dir)
            assert key_file is not None
            kid = key_id(load_private_key(key_file).public_key())
        except AuditError as exc:  # as any config mistake: FILE:LINE:COL: message, exit 2
            message = f"audit.signing_key_file: {exc}"
            raise (config.source.error(("audit", "signing_key_file"), message) if config.source
                   else ConfigError(message)) from None
        print(f"audit checkpoints: signed with key {kid}, every {config.audit.checkpoint_interval:g} s", file=out)
    if not args.online:
        return 0
    return asyncio.run(online_check(config, out))
