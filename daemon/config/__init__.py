"""Configuration: `config.yaml` into typed, validated settings, or a `FILE:LINE:COL:` error.

Contract:
- `load_config(path)` returns a `Config` or raises `ConfigError` whose `str()` is
  `config.yaml:LINE:COL: <what is wrong, what was expected>`. The CLI prints it and exits 2.
- Unknown keys are errors everywhere: a typo in compliance configuration must never pass
  silently.
- Credentials never live in this file: they come from the environment
  (`GENESYSCLOUD_OAUTHCLIENT_ID`/`_SECRET`, or `GENESYS_CLOUD_CLIENT_ID`/`_SECRET`) or from
  files (`genesys.client_id_file`/`client_secret_file`, or systemd's `$CREDENTIALS_DIRECTORY`
  with `genesys_client_id`/`genesys_client_secret`). See `resolve_credentials`.
- `Config.source` keeps the node positions, so later stages (the rule compiler, list loader)
  can report `file:line:col` for what they find wrong.
"""

from __future__ import annotations

import os
import re
import socket
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

import yaml
from pydantic import (BaseModel, BeforeValidator, ConfigDict, Field, StrictFloat, StrictInt, StrictStr, ValidationError,
                      WithJsonSchema, field_validator)

from daemon.errors import ConfigError, CredentialsError

try:  # the libyaml-backed loader is several times faster; fall back to pure Python
    from yaml import CSafeLoader as _Loader
except ImportError:  # pragma: no cover - depends on how PyYAML was built
    from yaml import SafeLoader as _Loader  # type: ignore[assignment]

Path_ = tuple[str | int, ...]

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

CLIENT_ID_ENVS = ("GENESYSCLOUD_OAUTHCLIENT_ID", "GENESYS_CLOUD_CLIENT_ID")
CLIENT_SECRET_ENVS = ("GENESYSCLOUD_OAUTHCLIENT_SECRET", "GENESYS_CLOUD_CLIENT_SECRET")
REGION_ENVS = ("GENESYSCLOUD_REGION", "GENESYS_CLOUD_REGION")


# ---------------------------------------------------------------- YAML with positions


@dataclass(slots=True)
class ConfigSource:
    """Where each node of a loaded YAML document stands, for `file:line:col` messages.

    `values[path]` is the (line, col) of the value at `path`; `keys[path]` that of its
    mapping key. Paths are tuples of keys and list indexes, e.g. `("rules", 2, "when")`.
    """

    file: str
    values: dict[Path_, tuple[int, int]] = field(default_factory=dict)
    keys: dict[Path_, tuple[int, int]] = field(default_factory=dict)
    base_dir: Path = field(default_factory=Path)
    constructor: yaml.constructor.SafeConstructor = field(
        default_factory=yaml.constructor.SafeConstructor, repr=False, compare=False)

    def position(self, path: Path_, *, key: bool = False) -> tuple[int | None, int | None]:
        """The nearest known position for `path`, walking up to its parents."""
        p = tuple(path)
        while True:
            table = self.keys if key and p in self.keys else self.values
            if p in table:
                return table[p]
            if not p:
                return None, None
            p = p[:-1]

    def error(self, path: Path_, message: str, *, key: bool = False) -> ConfigError:
        line, col = self.position(path, key=key)
        return ConfigError(message, file=self.file, line=line, col=col)


class _NoDupLoader(_Loader):
    pass


def compose_with_positions(text: str, file: str) -> tuple[Any, ConfigSource]:
    """Parse YAML text into plain Python data plus a `ConfigSource` of node positions.

    Raises ConfigError for syntax errors and duplicate keys (YAML silently keeps the last).
    """
    src = ConfigSource(file=file)
    try:
        node = yaml.compose(text, Loader=_NoDupLoader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        problem = exc.problem or exc.context or "invalid YAML"
        raise ConfigError(f"invalid YAML: {problem}", file=file,
                          line=mark.line + 1 if mark else None,
                          col=mark.column + 1 if mark else None) from None
    except yaml.reader.ReaderError as exc:
        # Unacceptable characters carry a character offset, not a mark: locate it by hand.
        pos = max(0, min(int(exc.position), len(text)))
        line = text.count("\n", 0, pos) + 1
        col = pos - (text.rfind("\n", 0, pos) + 1) + 1
        char = exc.character if isinstance(exc.character, str) else chr(exc.character)
        raise ConfigError(f"invalid YAML: unacceptable character U+{ord(char):04X} "
                          f"(control characters are not allowed)", file=file, line=line,
                          col=col) from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"invalid YAML: {exc}", file=file) from None
    if node is None:
        return {}, src
    return _build(node, (), src), src


def _build(node: yaml.Node, path: Path_, src: ConfigSource) -> Any:
    src.values[path] = (node.start_mark.line + 1, node.start_mark.column + 1)
    if isinstance(node, yaml.MappingNode):
        out: dict[str, Any] = {}
        for knode, vnode in node.value:
            if not isinstance(knode, yaml.ScalarNode):
                raise ConfigError("mapping keys must be plain text", file=src.file,
                                  line=knode.start_mark.line + 1, col=knode.start_mark.column + 1)
            if knode.tag == "tag:yaml.org,2002:merge":
                raise ConfigError("YAML merge keys (<<) are not supported; write the keys out",
                                  file=src.file, line=knode.start_mark.line + 1,
                                  col=knode.start_mark.column + 1)
            k = str(knode.value)
            if k in out:
                raise ConfigError(f"duplicate key {k!r}: each key may appear once", file=src.file,
                                  line=knode.start_mark.line + 1, col=knode.start_mark.column + 1)
            src.keys[path + (k,)] = (knode.start_mark.line + 1, knode.start_mark.column + 1)
            out[k] = _build(vnode, path + (k,), src)
        return out
    if isinstance(node, yaml.SequenceNode):
        return [_build(v, path + (i,), src) for i, v in enumerate(node.value)]
    # Scalars: the resolver's tag decides the type (int, float, bool, null, str).
    try:
        return src.constructor.construct_object(node, deep=True)
    except yaml.YAMLError as exc:
        raise ConfigError(f"invalid value: {exc}", file=src.file,
                          line=node.start_mark.line + 1, col=node.start_mark.column + 1) from None


# ---------------------------------------------------------------- the settings


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
        description="Requests per 60 s window assumed until Genesys' inin-ratelimit-* headers say otherwise.")
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
        region = self.region or _env_first(REGION_ENVS) or "mypurecloud.com"
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


class AuditSettings(_Strict):
    path: str = "audit/confguard-audit.jsonl"
    max_bytes: int = Field(default=64 * 1024 * 1024, ge=4096)
    fsync_interval: float = Field(default=1.0, gt=0, le=1.0)


_DURATION_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*$")
_DURATION_UNIT = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}


def _seconds(value: object) -> object:
    """"15s", "500ms", "2m", "1h" or a number -> seconds; numbers are left to pydantic's
    float check (and its bounds), anything else is rejected here with the accepted forms."""
    if isinstance(value, str):
        m = _DURATION_RE.match(value)
        if m:
            return float(m.group(1)) * _DURATION_UNIT[m.group(2)]
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        return value
    raise ValueError(f"expected a duration such as 5s, 500ms, 2m or a number of seconds, got {value!r}")


#: A duration key: seconds as a number, or a string such as "15s", "500ms", "2m". (The
#: JSON schema says both forms, so editors accept "15s"; the bounds are checked on load.)
Duration = Annotated[float, BeforeValidator(_seconds), WithJsonSchema({"anyOf": [
    {"type": "number", "exclusiveMinimum": 0},
    {"type": "string", "pattern": _DURATION_RE.pattern}]})]


def _check_listen(v: str, example: str) -> str:
    """`v` when it is HOST:PORT (port 0-65535), else a ValueError quoting `example`."""
    host, sep, port = v.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"expected HOST:PORT such as {example}, got {v!r}")
    return v


def _listen_host(listen: str) -> str:
    return listen.rpartition(":")[0].strip("[]")


def _listen_port(listen: str) -> int:
    return int(listen.rpartition(":")[2])


class OpsSettings(_Strict):
    listen: str = "127.0.0.1:9464"
    enabled: bool = True
    shutdown_timeout: Duration = Field(
        default=15.0, gt=0, le=3600,
        description="Seconds from SIGTERM to exit: drain in-flight removals, close the stream, "
                    "fsync the audit. Keep it below the unit's TimeoutStopSec (20 s).")

    @field_validator("listen")
    @classmethod
    def _host_port(cls, v: str) -> str:
        return _check_listen(v, "127.0.0.1:9464")

    @property
    def host(self) -> str:
        return _listen_host(self.listen)

    @property
    def port(self) -> int:
        return _listen_port(self.listen)


CALLER_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"


class ControlCaller(_Strict):
    """One control-API caller. `token_file` (relative to config.yaml) holds its bearer token;
    without it the systemd credential `control_token_<name>` is used."""

    token_file: str | None = None


class ControlSettings(_Strict):
    """The control API (`daemon.service.control`): off unless `listen` is set."""

    listen: str | None = Field(default=None, description="HOST:PORT of the control API; absent: no API.")
    callers: dict[str, ControlCaller] = Field(default_factory=dict)
    max_requests_per_minute: int = Field(default=120, ge=1, le=1_000_000,
                                         description="Requests a minute per caller; more: 429.")

    @field_validator("listen")
    @classmethod
    def _host_port(cls, v: str | None) -> str | None:
        return v if v is None else _check_listen(v, "127.0.0.1:9465")

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
        return _listen_host(self.listen or "")

    @property
    def port(self) -> int:
        return _listen_port(self.listen or ":0")


class LoggingSettings(_Strict):
    level: Literal["debug", "info", "warning", "error", "critical"] = "info"
    format: Literal["auto", "json", "console"] = "auto"




class HaSettings(_Strict):
    """`ha:`: a hot standby with a PostgreSQL lease (README "High availability").
    `backend: none` (the default) is one host, as before: no database is used."""

    backend: Literal["none", "postgres"] = "none"
    dsn: str | None = Field(default=None, description="postgresql://user@host:5432/db; or dsn_file, or the systemd credential ha_dsn.")
    dsn_file: str | None = None
    lease: str = Field(default="confguard", min_length=1, max_length=200)
    takeover_after: Duration = Field(default=5.0, ge=1.0, le=300.0,
                                     description="Seconds a lost leader may be silent before the standby takes over.")
    node: str | None = Field(default=None, min_length=1, max_length=200,
                             description="This host's name in the lease and the audit; default: the host name.")

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

    source: ConfigSource | None = Field(default=None, exclude=True)

    def resolve_path(self, p: str) -> Path:
        """A path from the config, relative to the config file's folder."""
        path = Path(p)
        if not path.is_absolute() and self.source is not None:
            path = self.source.base_dir / path
        return path


# ---------------------------------------------------------------- loading


def _dotted(path: Path_) -> str:
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _describe(err: Mapping[str, Any], path: Path_) -> str:
    kind = err.get("type", "")
    loc = _dotted(path)
    if path and path[-1] == "hold_for":
        return f"{loc}: expected a duration such as 10s, 2m, 500ms or a number of seconds, got {err.get('input')!r}"
    if kind == "extra_forbidden":
        return f"unknown key {str(err['loc'][-1])!r}; check the spelling (allowed keys are in the README's configuration reference)"
    if kind == "missing":
        where = f" in {loc}" if loc else ""
        return f"missing required key {str(err['loc'][-1])!r}{where}"
    if kind == "literal_error":
        expected = err.get("ctx", {}).get("expected", "")
        return f"{loc}: got {err.get('input')!r}, expected one of {expected}"
    msg = str(err.get("msg", "invalid value"))
    msg = msg.removeprefix("Value error, ")
    return f"{loc}: {msg}" if loc else msg


def parse_config(text: str, file: str = "config.yaml", base_dir: Path | None = None) -> Config:
    """Validate YAML text as a Config; raises ConfigError located at the first problem."""
    data, src = compose_with_positions(text, file)
    src.base_dir = base_dir or Path(".")
    if not isinstance(data, dict):
        raise src.error((), "the top level must be a mapping of sections (genesys, subscriptions, rules, ...)")
    version = data.get("schema_version", SCHEMA_VERSION)
    if isinstance(version, int) and not isinstance(version, bool) and version > SCHEMA_VERSION:
        raise src.error(("schema_version",),
                        f"schema_version {version} is newer than this confguard understands "
                        f"(up to {SCHEMA_VERSION}); upgrade confguard")
    try:
        cfg = Config.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        loc = _data_path(data, tuple(first.get("loc", ())))
        raise src.error(loc, _describe(first, loc), key=first.get("type") == "extra_forbidden") from None
    names: dict[str, int] = {}
    for i, rule in enumerate(cfg.rules):
        if rule.name in names:
            raise src.error(("rules", i, "name"),
                            f"duplicate rule name {rule.name!r} (first at rules[{names[rule.name]}]); names must be unique")
        names[rule.name] = i
    for name, spec in cfg.lists.items():
        if (spec.file is None) == (spec.values is None):
            raise src.error(("lists", name), f"list {name!r} needs exactly one of 'file' or 'values'")
    if cfg.ha.dsn is not None and cfg.ha.dsn_file is not None:
        raise src.error(("ha", "dsn_file"), "ha: give one of 'dsn' or 'dsn_file', not both")
    if cfg.control.listen is not None and not cfg.control.callers:
        raise src.error(("control", "listen"),
                        "control.listen is set but control.callers names no caller: nobody could "
                        "use the API (add e.g. callers: {orchestrator: {token_file: orchestrator.token}})")
    return cfg.model_copy(update={"source": src})


def _data_path(data: Any, loc: tuple[Any, ...]) -> Path_:
    """The part of a pydantic error location that exists in the data (pydantic inserts
    union-branch names such as 'str' that are not keys); an unknown key is kept last."""
    out: list[str | int] = []
    node = data
    for part in loc:
        if isinstance(node, dict) and part in node:
            node = node[part]
            out.append(part)
        elif isinstance(node, list) and isinstance(part, int) and 0 <= part < len(node):
            node = node[part]
            out.append(part)
        elif isinstance(node, dict) and isinstance(part, str) and not out[-1:] == [part]:
            continue
    return tuple(out)


def load_config(path: str | os.PathLike[str]) -> Config:
    """Read and validate a config file. Raises ConfigError (never a traceback for bad input)."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {p}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read config file {p}: {exc.__class__.__name__}: {exc}") from None
    return parse_config(text, file=str(path), base_dir=p.parent)


def load_list_file(path: Path) -> list[str]:
    """One value a line; blank lines and '#' comments ignored; surrounding spaces stripped."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise ConfigError(f"list file not found: {path}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read list file {path}: {exc}") from None
    out = []
    for line in lines:
        value = line.split("#", 1)[0].strip()
        if value:
            out.append(value)
    return out


def load_lists(cfg: Config) -> dict[str, frozenset[str]]:
    """The contents of every list under `lists:` (files resolved against the config's
    folder). A file that cannot be read is a ConfigError located at its `file:` key."""
    src = cfg.source or ConfigSource(file="<config>")
    out: dict[str, frozenset[str]] = {}
    for name, spec in cfg.lists.items():
        if spec.file is not None:
            try:
                values = load_list_file(cfg.resolve_path(spec.file))
            except ConfigError as exc:
                raise src.error(("lists", name, "file"), f"list {name!r}: {exc.message}") from None
        else:
            values = [str(v) for v in spec.values or ()]
        out[name] = frozenset(values)
    return out


# ---------------------------------------------------------------- credentials


@dataclass(frozen=True, slots=True)
class Credentials:
    """OAuth client credentials. `repr` hides the secret so it never reaches a log."""

    client_id: str
    client_secret: str = field(repr=False)

    def __repr__(self) -> str:
        return f"Credentials(client_id={self.client_id!r}, client_secret='***')"


def _env_first(names: tuple[str, ...], env: Mapping[str, str] | None = None) -> str | None:
    env = os.environ if env is None else env
    for n in names:
        v = env.get(n, "").strip()
        if v:
            return v
    return None


def systemd_credential(name: str, env: Mapping[str, str] | None = None) -> Path | None:
    """The file of systemd credential `name` (`$CREDENTIALS_DIRECTORY/<name>`, as
    `LoadCredential=` makes it), or None when the service was not given it."""
    env = os.environ if env is None else env
    cred_dir = env.get("CREDENTIALS_DIRECTORY")
    if cred_dir and (Path(cred_dir) / name).is_file():
        return Path(cred_dir) / name
    return None


def _read_secret_file(path: Path, what: str) -> str:
    try:
        value = path.read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise CredentialsError(f"cannot read {what} file {path}: {exc.strerror or exc}") from None
    if not value:
        raise CredentialsError(f"{what} file {path} is empty")
    return value


def resolve_credentials(settings: GenesysSettings, env: Mapping[str, str] | None = None) -> Credentials:
    """Find the client id and secret: config-named files, then environment, then systemd
    credentials (`$CREDENTIALS_DIRECTORY/genesys_client_id`, `.../genesys_client_secret`)."""
    env = os.environ if env is None else env

    def pick(file_setting: str | None, envs: tuple[str, ...], cred_name: str, what: str) -> str | None:
        if file_setting:
            return _read_secret_file(Path(file_setting), what)
        from_env = _env_first(envs, env)
        if from_env:
            return from_env
        credential = systemd_credential(cred_name, env)
        if credential is not None:
            return _read_secret_file(credential, what)
        return None

    cid = pick(settings.client_id_file, CLIENT_ID_ENVS, "genesys_client_id", "client id")
    secret = pick(settings.client_secret_file, CLIENT_SECRET_ENVS, "genesys_client_secret", "client secret")
    if not cid or not secret:
        missing = "client id" if not cid else "client secret"
        raise CredentialsError(
            f"no OAuth {missing} found: set {CLIENT_ID_ENVS[0]} and {CLIENT_SECRET_ENVS[0]} "
            f"(or {CLIENT_ID_ENVS[1]}/{CLIENT_SECRET_ENVS[1]}), or genesys.client_id_file and "
            f"genesys.client_secret_file, or systemd credentials genesys_client_id/genesys_client_secret")
    return Credentials(cid, secret)


# ---------------------------------------------------------------- HA database


def resolve_ha_dsn(settings: HaSettings, env: Mapping[str, str] | None = None) -> str:
    """The PostgreSQL DSN for `ha.backend: postgres`: `ha.dsn`, else `ha.dsn_file`, else the
    systemd credential `ha_dsn` (`$CREDENTIALS_DIRECTORY/ha_dsn`). Raises ConfigError naming
    where it looked (never the DSN itself: it may carry a password)."""
    if settings.dsn:
        return settings.dsn
    if settings.dsn_file:
        path = Path(settings.dsn_file)
        try:
            value = path.read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise ConfigError(f"ha.dsn_file: cannot read {path}: {exc.strerror or exc}") from None
        if not value:
            raise ConfigError(f"ha.dsn_file: {path} is empty")
        return value
    credential = systemd_credential("ha_dsn", env)
    if credential is not None:
        value = credential.read_text(encoding="utf-8").strip()
        if value:
            return value
    raise ConfigError("ha.backend is postgres but no database is named: set ha.dsn or "
                      "ha.dsn_file, or the systemd credential ha_dsn")
