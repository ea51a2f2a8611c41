"""Configuration: `config.yaml` into typed, validated settings, or a `FILE:LINE:COL:` error.

One module per job (this package re-exports the common names, so `from daemon.config
import Config, load_config, ...` keeps working):
- `source`: YAML text -> plain data + node positions (`compose_with_positions`, `ConfigSource`).
- `models`: the pydantic settings (`Config`, `GenesysSettings`, `RuleSpec`, ...).
- `values`: value parsers shared with the rules and the schema (`parse_duration`,
  `DURATION_PATTERN`, `Duration`, HOST:PORT checks).
- `secrets`: the one secret reader (files, systemd credentials, environment) and the one
  rule for relative paths (relative to config.yaml); `resolve_credentials`, `resolve_ha_dsn`.
- `loader`: `load_config(path)`, `parse_config(text)`, `load_lists(cfg)` (list files).

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

from daemon.config.loader import load_config, load_list_file, load_lists, parse_config
from daemon.config.models import (
    CALLER_NAME_PATTERN,
    DOMAINS,
    REGIONS,
    SCHEMA_VERSION,
    AuditSettings,
    Config,
    ControlCaller,
    ControlSettings,
    EventBridgeSettings,
    GenesysSettings,
    HaSettings,
    ListSpec,
    LoggingSettings,
    OpsSettings,
    RuleSpec,
    SafetySettings,
    SubscriptionSettings,
)
from daemon.config.secrets import (
    CLIENT_ID_ENVS,
    CLIENT_SECRET_ENVS,
    REGION_ENVS,
    Credentials,
    read_secret,
    resolve_credentials,
    resolve_ha_dsn,
    resolve_path,
    systemd_credential,
)
from daemon.config.source import ConfigSource, Path_, compose_with_positions
from daemon.config.values import DURATION_PATTERN, Duration, parse_duration
from daemon.errors import ConfigError, CredentialsError

__all__ = [
    "CALLER_NAME_PATTERN", "CLIENT_ID_ENVS", "CLIENT_SECRET_ENVS", "DOMAINS", "DURATION_PATTERN",
    "REGIONS", "REGION_ENVS", "SCHEMA_VERSION", "AuditSettings", "Config", "ConfigError", "ConfigSource",
    "ControlCaller", "ControlSettings", "Credentials", "CredentialsError", "Duration", "EventBridgeSettings", "GenesysSettings", "HaSettings",
    "ListSpec", "LoggingSettings", "OpsSettings", "Path_", "RuleSpec", "SafetySettings",
    "SubscriptionSettings", "compose_with_positions", "load_config", "load_list_file", "load_lists",
    "parse_config", "parse_duration", "read_secret", "resolve_credentials", "resolve_ha_dsn",
    "resolve_path", "systemd_credential",
]
