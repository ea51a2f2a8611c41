"""The `ha:` section of config.yaml and where the DSN comes from."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from daemon.config import parse_config, resolve_ha_dsn
from daemon.errors import ConfigError


def test_default_is_one_host_without_a_database() -> None:
    cfg = parse_config("schema_version: 1\n", file="config.yaml")
    assert cfg.ha.backend == "none" and not cfg.ha.enabled
    assert cfg.ha.takeover_after == 5.0 and cfg.ha.lease == "confguard"
    assert cfg.ha.node_name == socket.gethostname()


def test_the_contract_keys() -> None:
    cfg = parse_config("""schema_version: 1
ha:
  backend: postgres
  dsn: postgresql://confguard@db.example:5432/confguard
  lease: confguard-prod
  takeover_after: 5s
  node: host-a
""", file="config.yaml")
    ha = cfg.ha
    assert ha.enabled and ha.lease == "confguard-prod" and ha.node_name == "host-a"
    assert ha.takeover_after == 5.0
    assert resolve_ha_dsn(ha, env={}) == "postgresql://confguard@db.example:5432/confguard"


@pytest.mark.parametrize("value,seconds", [("2500ms", 2.5), ("2s", 2.0), (3, 3.0), ("1m", 60.0)])
def test_takeover_after_durations(value: object, seconds: float) -> None:
    cfg = parse_config(f"schema_version: 1\nha:\n  takeover_after: {value}\n", file="config.yaml")
    assert cfg.ha.takeover_after == seconds


@pytest.mark.parametrize("body,expect", [
    ("  backend: mysql\n", "config.yaml:3:12: ha.backend: got 'mysql', expected one of 'none' or 'postgres'"),
    ("  takeover_after: soon\n", "config.yaml:3:19: ha.takeover_after: expected a duration such as 5s"),
    ("  takeover_after: 0.5s\n", "config.yaml:3:19: ha.takeover_after: Input should be greater than or equal to 1"),
    ("  dsn: mysql://x\n", "config.yaml:3:8: ha.dsn: expected a URL such as postgresql://"),
    ("  dsn: postgresql://x\n  dsn_file: /x\n", "config.yaml:4:13: ha: give one of 'dsn' or 'dsn_file', not both"),
    ("  leese: x\n", "config.yaml:3:3: unknown key 'leese'"),
])
def test_bad_ha_settings_are_located(body: str, expect: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_config("schema_version: 1\nha:\n" + body, file="config.yaml")
    assert str(err.value).startswith(expect), str(err.value)


def test_dsn_from_a_file_or_the_systemd_credential(tmp_path: Path) -> None:
    f = tmp_path / "dsn"
    f.write_text("postgresql://u:secret@h/db\n")
    cfg = parse_config(f"schema_version: 1\nha:\n  backend: postgres\n  dsn_file: {f}\n", file="c.yaml")
    assert resolve_ha_dsn(cfg.ha, env={}) == "postgresql://u:secret@h/db"
    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "ha_dsn").write_text("postgresql://from@credential/db\n")
    cfg = parse_config("schema_version: 1\nha:\n  backend: postgres\n", file="c.yaml")
    assert resolve_ha_dsn(cfg.ha, env={"CREDENTIALS_DIRECTORY": str(creds)}) == "postgresql://from@credential/db"


def test_no_dsn_anywhere_is_a_clear_error_without_secrets(tmp_path: Path) -> None:
    cfg = parse_config("schema_version: 1\nha:\n  backend: postgres\n", file="c.yaml")
    with pytest.raises(ConfigError, match="set ha.dsn or ha.dsn_file, or the systemd credential ha_dsn"):
        resolve_ha_dsn(cfg.ha, env={})
    (tmp_path / "empty").write_text("\n")
    cfg = parse_config(f"schema_version: 1\nha:\n  backend: postgres\n  dsn_file: {tmp_path / 'empty'}\n",
                       file="c.yaml")
    with pytest.raises(ConfigError, match="is empty"):
        resolve_ha_dsn(cfg.ha, env={})
