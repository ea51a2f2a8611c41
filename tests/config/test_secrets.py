"""daemon.config.secrets and values: one secret reader, one rule for relative paths
(relative to config.yaml, with the old working-directory rule of genesys.client_*_file and
ha.dsn_file still honoured, with a warning), one duration parser."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import structlog

from daemon.commands.check import config_schema
from daemon.config import (DURATION_PATTERN, ConfigError, load_config, parse_duration, read_secret,
                           resolve_credentials, resolve_ha_dsn)
from daemon.errors import CredentialsError


def _config(tmp_path: Path, body: str) -> Path:
    folder = tmp_path / "etc"
    folder.mkdir(exist_ok=True)
    path = folder / "config.yaml"
    path.write_text("schema_version: 1\n" + body)
    return path


def test_client_files_are_relative_to_config_yaml(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = _config(tmp_path, "genesys:\n  client_id_file: id.txt\n  client_secret_file: sub/secret.txt\n")
    (path.parent / "id.txt").write_text("the-id\n")
    (path.parent / "sub").mkdir()
    (path.parent / "sub" / "secret.txt").write_text("the-secret\n")
    monkeypatch.chdir(tmp_path)  # not the config's folder
    cfg = load_config(path)
    creds = resolve_credentials(cfg.genesys, env={}, base_dir=cfg.base_dir)
    assert (creds.client_id, creds.client_secret) == ("the-id", "the-secret")


def test_dsn_file_is_relative_to_config_yaml(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = _config(tmp_path, "ha:\n  backend: postgres\n  dsn_file: dsn\n")
    (path.parent / "dsn").write_text("postgresql://u@h/db\n")
    monkeypatch.chdir(tmp_path)
    cfg = load_config(path)
    assert resolve_ha_dsn(cfg.ha, env={}, base_dir=cfg.base_dir) == "postgresql://u@h/db"


def test_the_old_working_directory_rule_still_reads_with_a_warning(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = _config(tmp_path, "genesys:\n  client_id_file: id.txt\n  client_secret_file: secret.txt\n"
                             "ha:\n  backend: postgres\n  dsn_file: dsn\n")
    (tmp_path / "id.txt").write_text("cwd-id\n")
    (tmp_path / "secret.txt").write_text("cwd-secret\n")
    (tmp_path / "dsn").write_text("postgresql://cwd@h/db\n")
    monkeypatch.chdir(tmp_path)
    cfg = load_config(path)
    with structlog.testing.capture_logs() as logs:
        creds = resolve_credentials(cfg.genesys, env={}, base_dir=cfg.base_dir)
        dsn = resolve_ha_dsn(cfg.ha, env={}, base_dir=cfg.base_dir)
    assert (creds.client_id, creds.client_secret, dsn) == ("cwd-id", "cwd-secret", "postgresql://cwd@h/db")
    warned = [e["key"] for e in logs if e["event"] == "config_path_relative_to_cwd"]
    assert warned == ["genesys.client_id_file", "genesys.client_secret_file", "ha.dsn_file"]
    assert all("cwd-secret" not in str(e) and "postgresql" not in str(e) for e in logs)
    # Beside config.yaml wins when both exist.
    (path.parent / "id.txt").write_text("beside-id\n")
    assert resolve_credentials(cfg.genesys, env={}, base_dir=cfg.base_dir).client_id == "beside-id"


def test_one_reader_one_message_shape(tmp_path: Path) -> None:
    (tmp_path / "empty").write_text(" \n")
    (tmp_path / "binary").write_bytes(b"\xff\xfe\x00")
    with pytest.raises(ConfigError, match=r"^ha\.dsn_file: .*empty is empty$"):
        read_secret(tmp_path / "empty", "ha.dsn_file")
    with pytest.raises(CredentialsError, match=r"^genesys\.client_id_file: cannot read .*: UnicodeDecodeError$"):
        read_secret(tmp_path / "binary", "genesys.client_id_file", CredentialsError)
    with pytest.raises(ConfigError, match=r"cannot read .*nowhere: No such file"):
        read_secret(tmp_path / "nowhere", "x")
    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "genesys_client_id").write_text("")
    with pytest.raises(CredentialsError, match="systemd credential genesys_client_id: .* is empty"):
        resolve_credentials(load_config(_config(tmp_path, "")).genesys, env={"CREDENTIALS_DIRECTORY": str(creds)})


@pytest.mark.parametrize(("text", "seconds"), [("500ms", 0.5), ("10s", 10.0), ("2m", 120.0), ("1h", 3600.0),
                                               (" 10 ", 10.0), ("1.5", 1.5), (3, 3.0), (0, 0.0)])
def test_one_duration_parser_for_config_rules_and_schema(text: object, seconds: float) -> None:
    assert parse_duration(text) == seconds
    if isinstance(text, str):
        schema = config_schema()
        hold = schema["$defs"]["RuleSpec"]["properties"]["hold_for"]["anyOf"][0]["pattern"]
        shutdown = schema["$defs"]["OpsSettings"]["properties"]["shutdown_timeout"]["anyOf"][1]["pattern"]
        assert hold == shutdown == DURATION_PATTERN
        assert re.match(DURATION_PATTERN, text)


@pytest.mark.parametrize("value", ["soon", "-1s", "1d", "", True, None, -1, float("inf"), [1]])
def test_not_durations(value: object) -> None:
    assert parse_duration(value) is None
