"""The settings: one pydantic model per section of config.yaml, and `Config`, the whole.

Contract: every model forbids unknown keys and is frozen. Field docs (`description`) feed the
JSON Schema (`confguard check --schema`, docs/config.schema.json). Validation of the whole
file, with `file:line:col` messages, is `daemon.config.loader.parse_config`; secrets named
here (`*_file`, systemd credentials, environment) are read by `daemon.config.secrets`.
No I/O, except that `GenesysSettings.domain` reads the region from the environment when
the file names none.
"""

from __future__ import annotations

import re
import socket
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, StrictFloat, StrictInt, StrictStr, field_validator

from daemon.config.secrets import REGION_ENVS, env_first, resolve_path
from daemon.config.source import ConfigSource
from daemon.config.values import Duration, check_http_url, check_listen, listen_host, listen_port, queue_region

SCHEMA_VERSION = 1

# The SDK's PureCloudRegionHosts: domain by AWS region name.
REGIONS: dict[str, str] = {
    "us-east-1": "mypurecloud.com",
    "us-east-2": "use2.us-gov-pure.cloud",
    "us-west-2": "usw2.pure.cloud",
    "ca-central-1": "cac1.pure.cloud",
    "mx-central-1": "mxc1.pure.cloud",
    "sa-east-1": "sae1.pure.cloud",
    "eu-west-1": "mypurecloud.ie",
    "eu-west-2": "euw2.pure.cloud",
    "eu-central-1": "mypurecloud.de",
    "eu-central-2": "euc2.pure.cloud",
    "eusc-de-east-1": "edee1.eusc-pure.cloud",
    "me-central-1": "mec1.pure.cloud",
    "ap-south-1": "aps1.pure.cloud",
    "ap-southeast-1": "apse1.pure.cloud",
    "ap-southeast-2": "mypurecloud.com.au",
    "ap-northeast-1": "mypurecloud.jp",
    "ap-northeast-2": "apne2.pure.cloud",
    "ap-northeast-3": "apne3.pure.cloud",
}
DOMAINS = frozenset(REGIONS.values())


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class GenesysSettings(_Strict):
    """Where Genesys Cloud is and how to authenticate (secrets come from env or files)."""

    region: str | None = Field(default=None, description="Domain (mypurecloud.ie) or AWS name (eu-west-1).")
    api_base_url: str | None = Field(default=None, description="Origin such as http://127.0.0.1:8080; /api/v2/... is appended.")
    login_base_url: str | None = Field(default=None, description="Origin; /oauth/token is appended.")
    client_id_file: str | None = None
    client_secret_file: str | None = None
    requests_per_minute: int = Field(
        default=300, ge=1, le=100_000,
        description="Requests per token per sliding 60 s window, until the limits API or a "
                    "429's limit.value says otherwise.")
    enforce_reserve: float = Field(
        default=0.2, ge=0.0, lt=1.0,
        description="Fraction of every budget window kept for removals (PATCHes); resync, "
                    "reconciliation and scope lookups together may spend the rest.")
    connect_timeout: float = Field(default=5.0, gt=0, le=120)
    read_timeout: float = Field(default=10.0, gt=0, le=300)
    max_retries: int = Field(default=4, ge=0, le=20)
    token_refresh_margin: float = Field(default=300.0, ge=0, description="Seconds before expiry to fetch a new token.")

    @field_validator("region")
    @classmethod
    def _known_region(cls, v: str | None) -> str | None:
        if v is None:
            return v
        v = v.strip().lower()
        if v in REGIONS or v in DOMAINS:
            return v
        raise ValueError(
            f"unknown region {v!r}; expected a domain such as mypurecloud.ie or an AWS region "
            f"such as eu-west-1 (known: {', '.join(sorted(REGIONS))})")

    @field_validator("api_base_url", "login_base_url")
    @classmethod
    def _origin(cls, v: str | None) -> str | None:
        if v is None:
            return v
        parts = urlsplit(v)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise ValueError(f"expected an origin such as https://api.mypurecloud.ie or http://127.0.0.1:8080, got {v!r}")
        if parts.path not in ("", "/") or parts.query:
            raise ValueError(f"expected an origin without a path (confguard appends /api/v2/... itself), got {v!r}")
        return f"{parts.scheme}://{parts.netloc}"

    @property
    def domain(self) -> str:
        region = self.region or env_first(REGION_ENVS) or "mypurecloud.com"
        region = region.strip().lower()
        return REGIONS.get(region, region)

    @property
    def api_origin(self) -> str:
        return self.api_base_url or f"https://api.{self.domain}"

    @property
    def login_origin(self) -> str:
        return self.login_base_url or f"https://login.{self.domain}"


class SubscriptionSettings(_Strict):
    """Which calls are in scope: queues (ids or names) and users (ids)."""

    queues: list[str] = Field(default_factory=list)
    users: list[str] = Field(default_factory=list)
    heartbeat_timeout_factor: float = Field(default=2.0, ge=1.0, le=10.0)
    channel_refresh_before: float = Field(default=3600.0, ge=60, description="Seconds before a channel's 24 h expiry to replace it.")
    resync_on_start: bool = True
    reconcile_interval: float = Field(
        default=300.0, ge=0,
        description="Seconds between periodic re-reads of the in-scope calls (0: never). Genesys "
                    "never says it lost an event; this bounds how long a lost one can hide a breaker.")
    reconcile_share: float = Field(
        default=0.25, gt=0.0, le=1.0,
        description="Fraction of every budget window that reconciliation may spend at most.")
    compression: bool = Field(
        default=False,
        description="Offer permessage-deflate on the notification WebSocket. Off: the frames are "
                    "small and compressing and inflating each one delays the removal; on where "
                    "the link, not the latency, is short.")


class SafetySettings(_Strict):
    max_disconnects_per_minute: int = Field(default=30, ge=0)


class ListSpec(_Strict):
    """A named list for `in_list`/`not_in_list`: from a file (one value a line, '#' comments)
    or inline values. Exactly one of the two."""

    file: str | None = None
    values: list[str | int] | None = None


class RuleSpec(_Strict):
    """One rule as written. `when`/`call` are checked and compiled by `daemon.rules`."""

    name: str = Field(min_length=1)
    description: str | None = None
    when: dict[str, Any] = Field(default_factory=dict)
    call: dict[str, Any] = Field(default_factory=dict)
    hold_for: StrictStr | StrictInt | StrictFloat | None = None
    action: Literal["disconnect", "observe"]
    enabled: bool = True
    severity: Literal["info", "warning", "critical"] = "warning"
    tags: list[str] = Field(default_factory=list)
    message: str | None = None


class CheckpointS3Settings(_Strict):
    """`audit.checkpoint_s3:` one object per signed checkpoint in an S3 bucket with Object
    Lock (docs/audit.md). Credentials: the standard AWS chain, never from here."""

    bucket: str = Field(min_length=3, max_length=63, pattern=r"^[a-z0-9][a-z0-9.\-]*[a-z0-9]$",
                        description="The bucket (created with Object Lock and a default retention, compliance mode recommended).")
    prefix: str = Field(default="confguard", max_length=500, description="Key prefix; objects are <prefix>/<node>/<seq>-<hash>.json.")
    region: str | None = Field(default=None, pattern=r"^[a-z]{2}(-[a-z]+)+-\d+$",
                               description="AWS region; default: the AWS chain's.")
    endpoint_url: str | None = Field(default=None, description="Another S3 endpoint (tests, S3-compatible stores); null: AWS.")

    @field_validator("endpoint_url")
    @classmethod
    def _url(cls, v: str | None) -> str | None:
        return check_http_url(v, "https://s3.eu-west-1.amazonaws.com")


class AuditSettings(_Strict):
    path: str = "audit/confguard-audit.jsonl"
    max_bytes: int = Field(default=64 * 1024 * 1024, ge=4096)
    fsync_interval: float = Field(default=1.0, gt=0, le=1.0)
    sync_before_patch: bool = Field(
        default=True, description="fdatasync each decision record before its PATCH (group commit). false only to measure the cost: a power loss could then lose the record of a removal that happened.")
    checkpoint_interval: Duration = Field(
        default=60.0, ge=0.1, le=86400,
        description="Signed checkpoints of the trail: this often (and at rotation and shutdown) when records were written. Needs a signing key.")
    signing_key_file: str | None = Field(
        default=None, description="Ed25519 private key (PEM, `confguard audit keygen`); or the systemd credential audit_signing_key. None of both: no checkpoints.")
    checkpoint_s3: CheckpointS3Settings | None = Field(
        default=None, description="Also store each checkpoint in this S3 bucket (Object Lock).")


class TlsSettings(_Strict):
    """`tls:` of a listener: PEM files, relative to config.yaml. Re-read on every reload
    (SIGHUP), so a renewed certificate takes effect without a restart."""

    cert_file: str = Field(min_length=1, description="PEM certificate chain (server certificate first).")
    key_file: str = Field(min_length=1, description="PEM private key of cert_file.")


class ControlTlsSettings(TlsSettings):
    """`control.tls:`; with `client_ca_file`, every client must present a certificate signed
    by that CA (a caller may then be named by its certificate: `callers.<name>.client_cert_cn`)."""

    client_ca_file: str | None = Field(default=None, description="PEM CA certificate(s) client certificates must chain to.")


class ListenerSettings(_Strict):
    """What the ops and control listeners share (`daemon.service.listener`)."""

    header_timeout: Duration = Field(
        default=10.0, gt=0, le=300,
        description="Seconds a client may take to send a request's line and headers (and a "
                    "TLS handshake, and a control request's body); slower: the connection is closed.")
    idle_timeout: Duration = Field(
        default=60.0, gt=0, le=3600,
        description="Seconds a kept-alive connection may sit without a request before it is closed.")
    max_connections: int = Field(
        default=64, ge=1, le=100_000,
        description="Open connections at most; past it new connections are refused (reset) "
                    "while the open ones keep working.")


class OpsSettings(ListenerSettings):
    listen: str = "127.0.0.1:9464"
    enabled: bool = True
    tls: TlsSettings | None = Field(default=None, description="Serve HTTPS with these files; absent: plain HTTP.")
    shutdown_timeout: Duration = Field(
        default=15.0, gt=0, le=3600,
        description="Seconds from SIGTERM to exit: drain in-flight removals, close the stream, "
                    "fsync the audit. Keep it below the unit's TimeoutStopSec (20 s).")

    @field_validator("listen")
    @classmethod
    def _host_port(cls, v: str) -> str:
        return check_listen(v, "127.0.0.1:9464")

    @property
    def host(self) -> str:
        return listen_host(self.listen)

    @property
    def port(self) -> int:
        return listen_port(self.listen)


CALLER_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"


class ControlCaller(_Strict):
    """One control-API caller. `token_file` (relative to config.yaml) holds its bearer token;
    without it the systemd credential `control_token_<name>` is used."""

    token_file: str | None = None
    client_cert_cn: str | None = Field(
        default=None, min_length=1, max_length=200,
        description="Subject CN of a client certificate (control.tls.client_ca_file) that "
                    "identifies this caller without a token.")


class ControlSettings(ListenerSettings):
    """The control API (`daemon.service.control`): off unless `listen` is set."""

    listen: str | None = Field(default=None, description="HOST:PORT of the control API; absent: no API.")
    tls: ControlTlsSettings | None = Field(default=None, description="Serve HTTPS with these files; absent: plain HTTP.")
    callers: dict[str, ControlCaller] = Field(default_factory=dict)
    max_requests_per_minute: int = Field(default=120, ge=1, le=1_000_000,
                                         description="Requests a minute per caller; more: 429.")

    @field_validator("listen")
    @classmethod
    def _host_port(cls, v: str | None) -> str | None:
        return v if v is None else check_listen(v, "127.0.0.1:9465")

    @field_validator("callers")
    @classmethod
    def _caller_names(cls, v: dict[str, ControlCaller]) -> dict[str, ControlCaller]:
        for name in v:
            if not re.match(CALLER_NAME_PATTERN, name):
                raise ValueError(f"caller name {name!r}: use 1-64 letters, digits, '_', '.' or '-' "
                                 f"(it names a metric label and a systemd credential)")
        return v

    @property
    def enabled(self) -> bool:
        return self.listen is not None

    @property
    def host(self) -> str:
        return listen_host(self.listen or "")

    @property
    def port(self) -> int:
        return listen_port(self.listen or ":0")


class LoggingSettings(_Strict):
    level: Literal["debug", "info", "warning", "error", "critical"] = "info"
    format: Literal["auto", "json", "console"] = "auto"

class HaSettings(_Strict):
    """`ha:`: a hot standby with a PostgreSQL lease (docs/ha.md).
    `backend: none` (the default) is one host, as before: no database is used."""

    backend: Literal["none", "postgres"] = "none"
    dsn: str | None = Field(default=None, description="postgresql://user@host:5432/db; or dsn_file, or the systemd credential ha_dsn.")
    dsn_file: str | None = None
    lease: str = Field(default="confguard", min_length=1, max_length=200)
    takeover_after: Duration = Field(default=5.0, ge=1.0, le=300.0,
                                     description="Seconds a lost leader may be silent before the standby takes over.")
    node: str | None = Field(default=None, min_length=1, max_length=200,
                             description="This host's name in the lease and the audit; default: the host name.")
    safety_margin: Duration | None = Field(
        default=None, ge=0, le=200,
        description="Seconds before its lease runs out (on its own clock) at which a leader stops "
                    "writing removals; a PATCH not fully written by then is abandoned unsent. Must "
                    "exceed the one-way network delay to Genesys. Default: takeover_after / 5, "
                    "between 0.2 and 2 s; below 2/3 of takeover_after.")

    @field_validator("dsn")
    @classmethod
    def _dsn(cls, v: str | None) -> str | None:
        if v is None:
            return v
        if urlsplit(v).scheme not in ("postgresql", "postgres"):
            raise ValueError("expected a URL such as postgresql://confguard@db.example:5432/confguard")
        return v

    @property
    def enabled(self) -> bool:
        return self.backend != "none"

    @property
    def node_name(self) -> str:
        return self.node or socket.gethostname()


class EventBridgeSettings(_Strict):
    """`eventbridge:`: Genesys conversation detail events through Amazon EventBridge and an
    SQS queue, a durable second input beside the WebSocket (README "Durable input with
    Amazon EventBridge"). Off unless `queue_url` is set. AWS credentials come from the
    standard AWS chain (environment, shared config, instance or task role), never from here."""

    queue_url: str | None = Field(default=None, description="The SQS queue this host consumes (its own queue: one per HA node); absent: off.")
    region: str | None = Field(default=None, pattern=r"^[a-z]{2}(-[a-z]+)+-\d+$",
                               description="AWS region; default: taken from queue_url (else the AWS chain's).")
    endpoint_url: str | None = Field(default=None, description="A local SQS endpoint (tests, the sandbox); null: AWS.")
    wait_seconds: int = Field(default=20, ge=0, le=20, description="SQS long poll, seconds (0-20).")

    @field_validator("queue_url", "endpoint_url")
    @classmethod
    def _url(cls, v: str | None) -> str | None:
        return check_http_url(v, "https://sqs.eu-west-1.amazonaws.com/123456789012/confguard-host-a")

    @property
    def enabled(self) -> bool:
        return self.queue_url is not None

    @property
    def effective_region(self) -> str | None:
        """`region`, else the one `queue_url` names, else None (the AWS chain decides)."""
        if self.region is not None:
            return self.region
        return queue_region(self.queue_url) if self.queue_url else None


class Config(_Strict):
    """The whole of config.yaml. `source` is attached after validation (positions)."""

    model_config = ConfigDict(extra="forbid", frozen=True, arbitrary_types_allowed=True)

    schema_version: int = 1
    genesys: GenesysSettings = Field(default_factory=GenesysSettings)
    subscriptions: SubscriptionSettings = Field(default_factory=SubscriptionSettings)
    mode: Literal["enforce", "observe"] = "enforce"
    safety: SafetySettings = Field(default_factory=SafetySettings)
    lists: dict[str, ListSpec] = Field(default_factory=dict)
    rules: list[RuleSpec] = Field(default_factory=list)
    audit: AuditSettings = Field(default_factory=AuditSettings)
    ops: OpsSettings = Field(default_factory=OpsSettings)
    logging: LoggingSettings = Field(default_factory=LoggingSettings)
    ha: HaSettings = Field(default_factory=HaSettings)
    control: ControlSettings = Field(default_factory=ControlSettings)
    eventbridge: EventBridgeSettings = Field(default_factory=EventBridgeSettings)

    source: ConfigSource | None = Field(default=None, exclude=True)

    @property
    def base_dir(self) -> Path | None:
        """The folder of config.yaml (relative paths in the file are relative to it); None
        for a Config built without a source."""
        return self.source.base_dir if self.source is not None else None

    def resolve_path(self, p: str) -> Path:
        """A path from the config, relative to the config file's folder."""
        return resolve_path(p, self.base_dir)
