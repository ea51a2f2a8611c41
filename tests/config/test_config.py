"""config.yaml: typed settings or a `FILE:LINE:COL: message` error, and credentials resolution."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from daemon.config import (Credentials, load_config, parse_config, resolve_credentials,
                           GenesysSettings)
from daemon.errors import ConfigError, CredentialsError

ROOT = Path(__file__).resolve().parents[2]


def error_of(text: str) -> str:
    with pytest.raises(ConfigError) as info:
        parse_config(text, file="config.yaml")
    return str(info.value)


def test_shipped_config_loads() -> None:
    cfg = load_config(ROOT / "config.yaml")
    assert [r.name for r in cfg.rules] == [
        "flagged-party", "blocked-number-in-conference", "third-party-needs-recording",
        "supervisor-monitor-time-limit", "no-outside-party-on-payments", "flagged-interaction"]
    assert cfg.genesys.api_origin == "https://api.mypurecloud.ie"
    assert cfg.genesys.login_origin == "https://login.mypurecloud.ie"
    assert cfg.resolve_path(cfg.audit.path) == ROOT / "audit" / "confguard-audit.jsonl"


@pytest.mark.parametrize(("text", "expected"), [
    ("genesys:\n  region: eu-west-1\n  regoin: x\n", "config.yaml:3:3: unknown key 'regoin'"),
    ("subscriptions:\n  queues: [a]\n  userz: [b]\n", "config.yaml:3:3: unknown key 'userz'"),
    ("mode: enforc\n", "config.yaml:1:7: mode: got 'enforc', expected one of 'enforce' or 'observe'"),
    ("genesys:\n  region: mars\n", "config.yaml:2:11: genesys.region: unknown region 'mars'"),
    ("genesys:\n  api_base_url: http://127.0.0.1:8080/api/v2\n",
     "config.yaml:2:17: genesys.api_base_url: expected an origin without a path"),
    ("genesys:\n  api_base_url: ftp://x\n", "config.yaml:2:17: genesys.api_base_url: expected an origin"),
    ("ops:\n  listen: nowhere\n", "config.yaml:2:11: ops.listen: expected HOST:PORT"),
    ("rules:\n  - name: a\n    when: {purpose: x}\n    action: disconnect\n"
     "  - name: a\n    when: {purpose: y}\n    action: observe\n",
     "config.yaml:5:11: duplicate rule name 'a'"),
    ("rules:\n  - name: a\n    when: {purpose: x}\n", "config.yaml:2:5: rule 'a': missing required key 'action'"),
    ("a: [1\n", "config.yaml:2:1: invalid YAML"),
    ("genesys: {region: eu-west-1}\ngenesys: {region: eu-west-2}\n", "config.yaml:2:1: duplicate key 'genesys'"),
    ("schema_version: 2\n", "config.yaml:1:17: schema_version 2 is newer than this confguard understands"),
    ("- just\n- a list\n", "config.yaml:1:1: the top level must be a mapping"),
    ("lists:\n  x: {}\n", "config.yaml:2:6: list 'x' needs exactly one of 'file' or 'values'"),
    ("rules:\n  - name: a\n    when: {purpose: x}\n    hold_for: true\n    action: disconnect\n",
     "config.yaml:4:15: rule 'a': hold_for: expected a duration"),
])
def test_errors_name_file_line_and_column(text: str, expected: str) -> None:
    assert error_of(text).startswith(expected)


def test_cli_prints_one_line_and_exits_2(tmp_path: Path) -> None:
    bad = tmp_path / "config.yaml"
    bad.write_text("genesys:\n  region: eu-west-1\nsafety:\n  max_disconnect_per_minute: 5\n")
    proc = subprocess.run([sys.executable, "-m", "daemon", "check", "--config", str(bad)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.strip() == (f"{bad}:4:3: unknown key 'max_disconnect_per_minute'; check the "
                                   "spelling (allowed keys are in docs/configuration.md)")
    assert "Traceback" not in proc.stderr


def test_missing_and_unreadable_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
    (tmp_path / "bin.yaml").write_bytes(b"\xff\xfe\x00")
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_config(tmp_path / "bin.yaml")


def test_region_forms() -> None:
    assert GenesysSettings(region="eu-west-1").domain == "mypurecloud.ie"
    assert GenesysSettings(region="mypurecloud.ie").domain == "mypurecloud.ie"
    assert GenesysSettings(region="AP-SOUTHEAST-2").api_origin == "https://api.mypurecloud.com.au"
    s = GenesysSettings(api_base_url="http://127.0.0.1:8080/", login_base_url="http://127.0.0.1:9090")
    assert s.api_origin == "http://127.0.0.1:8080"
    assert s.login_origin == "http://127.0.0.1:9090"


def test_credentials_from_env_both_spellings() -> None:
    s = GenesysSettings()
    c = resolve_credentials(s, env={"GENESYSCLOUD_OAUTHCLIENT_ID": "id1", "GENESYSCLOUD_OAUTHCLIENT_SECRET": "s1"})
    assert (c.client_id, c.client_secret) == ("id1", "s1")
    c = resolve_credentials(s, env={"GENESYS_CLOUD_CLIENT_ID": "id2", "GENESYS_CLOUD_CLIENT_SECRET": "s2"})
    assert (c.client_id, c.client_secret) == ("id2", "s2")


def test_credentials_from_files_and_systemd(tmp_path: Path) -> None:
    (tmp_path / "genesys_client_id").write_text("cid\n")
    (tmp_path / "genesys_client_secret").write_text("topsecret\n")
    c = resolve_credentials(GenesysSettings(), env={"CREDENTIALS_DIRECTORY": str(tmp_path)})
    assert (c.client_id, c.client_secret) == ("cid", "topsecret")
    s = GenesysSettings(client_id_file=str(tmp_path / "genesys_client_id"),
                        client_secret_file=str(tmp_path / "genesys_client_secret"))
    assert resolve_credentials(s, env={}).client_secret == "topsecret"


def test_missing_credentials_message_names_the_variables() -> None:
    with pytest.raises(CredentialsError) as info:
        resolve_credentials(GenesysSettings(), env={"GENESYSCLOUD_OAUTHCLIENT_ID": "x"})
    assert "client secret" in str(info.value)
    assert "GENESYSCLOUD_OAUTHCLIENT_SECRET" in str(info.value)


def test_secret_never_in_repr() -> None:
    c = Credentials("the-id", "the-secret-value")
    assert "the-secret-value" not in repr(c)
    assert "the-secret-value" not in str(c)


@pytest.mark.parametrize(("value", "seconds"), [("15s", 15.0), ("500ms", 0.5), ("2m", 120.0),
                                                ("3", 3.0), ("1.5", 1.5)])
def test_ops_shutdown_timeout_is_a_duration(value: str, seconds: float) -> None:
    assert parse_config(f"ops:\n  shutdown_timeout: {value}\n").ops.shutdown_timeout == seconds
    assert parse_config("").ops.shutdown_timeout == 15.0


@pytest.mark.parametrize("value", ["soon", "true", "0", "-1s", "[1]"])
def test_ops_shutdown_timeout_rejects_non_durations(value: str) -> None:
    with pytest.raises(ConfigError, match=r"^config\.yaml:2:21: ops\.shutdown_timeout: "):
        parse_config(f"ops:\n  shutdown_timeout: {value}\n")


def test_ops_shutdown_timeout_schema_accepts_both_forms() -> None:
    """Editors validating config.yaml against docs/config.schema.json accept "15s" and 15."""
    import jsonschema

    from daemon.commands.check import config_schema

    validator = jsonschema.Draft202012Validator(config_schema())
    for value in ("15s", "500ms", 15, 2.5):
        assert not list(validator.iter_errors({"ops": {"shutdown_timeout": value}})), value
    for value in ("soon", 0, True):
        assert list(validator.iter_errors({"ops": {"shutdown_timeout": value}})), value


# ------------------------------------------------------------------ eventbridge (issue 19)


def test_eventbridge_is_off_by_default_and_takes_the_region_from_the_queue_url(tmp_path: Path) -> None:
    from daemon.config import EventBridgeSettings, parse_config

    assert not parse_config("{}\n").eventbridge.enabled
    eb = parse_config(
        "eventbridge:\n"
        "  queue_url: https://sqs.eu-west-1.amazonaws.com/123456789012/confguard-host-a\n"
        "  region: null\n  endpoint_url: null\n  wait_seconds: 20\n").eventbridge
    assert eb.enabled and eb.effective_region == "eu-west-1" and eb.wait_seconds == 20
    local = EventBridgeSettings(queue_url="http://127.0.0.1:5000/123456789012/q",
                                endpoint_url="http://127.0.0.1:5000")
    assert local.effective_region is None
    assert EventBridgeSettings(queue_url="http://127.0.0.1:5000/1/q", region="us-west-2").effective_region == "us-west-2"


@pytest.mark.parametrize(("text", "where"), [
    ("eventbridge:\n  queue_url: sqs-queue\n", "2:14"),
    ("eventbridge:\n  queue_url: https://sqs.eu-west-1.amazonaws.com/1/q\n  wait_seconds: 21\n", "3:17"),
    ("eventbridge:\n  queue_url: https://sqs.eu-west-1.amazonaws.com/1/q\n  region: Europe\n", "3:11"),
    ("eventbridge:\n  queue_url: https://sqs.eu-west-1.amazonaws.com/1/q\n  visibility: 30\n", "3:3"),
])
def test_eventbridge_errors_name_the_line(text: str, where: str) -> None:
    from daemon.config import parse_config

    with pytest.raises(ConfigError) as e:
        parse_config(text)
    assert f":{where}:" in str(e.value), str(e.value)
