"""config.yaml and the files it names, as an attacker or a bad day would write them: every
case a `FILE:LINE:COL` ConfigError at once (no expansion, no endless read, no wait)."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from daemon.config import ConfigError, load_config, load_lists, parse_config, read_secret
from daemon.config.loader import MAX_CONFIG_BYTES, MAX_LIST_VALUES, load_list_file
from daemon.config.secrets import read_file

BOMB = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"{n}: &{n} [{', '.join([f'*{p}'] * 9)}]\n" for p, n in zip("abcdefgh", "bcdefghi"))


def test_an_alias_bomb_is_refused_before_expansion() -> None:
    started = time.monotonic()
    with pytest.raises(ConfigError, match=r"^config\.yaml:1:4: YAML anchors and aliases"):
        parse_config(BOMB)
    assert time.monotonic() - started < 2.0


def test_a_self_referencing_alias_and_deep_nesting() -> None:
    with pytest.raises(ConfigError, match="aliases"):
        parse_config("x: &r [*r]\n")
    with pytest.raises(ConfigError, match=r"^config\.yaml:1:\d+: invalid YAML"):
        parse_config("a: " + "[" * 5000 + "]" * 5000 + "\n")


def test_nul_bytes_in_values_and_keys_are_located() -> None:
    with pytest.raises(ConfigError, match=r"^config\.yaml:2:9: a NUL character"):
        parse_config('audit:\n  path: "a\\0b"\n')
    with pytest.raises(ConfigError, match=r"^config\.yaml:1:1: a NUL character .* key"):
        parse_config('"k\\0": 1\n')
    with pytest.raises(ConfigError, match=r"^config\.yaml:\d+:\d+: a NUL"):
        parse_config('lists: {l: {values: ["a\\0"]}}\n')


def test_only_regular_files_of_bounded_size_are_read(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "fifo")
    started = time.monotonic()
    with pytest.raises(ConfigError, match="it is a FIFO"):
        load_config(tmp_path / "fifo")
    with pytest.raises(ConfigError, match="it is a FIFO"):
        load_list_file(tmp_path / "fifo")
    with pytest.raises(ConfigError, match="it is a device"):
        load_list_file(Path("/dev/zero"))
    with pytest.raises(ConfigError, match="it is a directory"):
        load_list_file(tmp_path)
    with pytest.raises(ConfigError, match="it is a FIFO"):
        read_secret(tmp_path / "fifo", "control.callers.x")
    assert time.monotonic() - started < 2.0
    big = tmp_path / "big.yaml"
    big.write_bytes(b"#" * (MAX_CONFIG_BYTES + 1))
    with pytest.raises(ConfigError, match="more than the"):
        load_config(big)
    with pytest.raises(ConfigError, match="a NUL character in the path"):
        read_file(Path("a\0b"), "x", max_bytes=10)


def test_list_limits_are_located_at_the_list(tmp_path: Path) -> None:
    (tmp_path / "many.txt").write_text("".join(f"{i}\n" for i in range(MAX_LIST_VALUES + 1)))
    (tmp_path / "config.yaml").write_text("lists:\n  many: {file: many.txt}\n  nul: {file: nul.txt}\n")
    cfg = load_config(tmp_path / "config.yaml")
    with pytest.raises(ConfigError, match=r"config\.yaml:2:\d+: list 'many': list file .* more than"):
        load_lists(cfg)
    (tmp_path / "many.txt").write_text("+1\n")
    (tmp_path / "nul.txt").write_text("+1\n+2\x00\n")
    with pytest.raises(ConfigError, match=r"config\.yaml:3:\d+: list 'nul': .*nul\.txt:2: a NUL"):
        load_lists(cfg)


def test_listener_settings_and_tls_keys() -> None:
    cfg = parse_config("ops: {header_timeout: 2s, idle_timeout: 1m, max_connections: 8,\n"
                       "      tls: {cert_file: a.crt, key_file: a.key}}\n"
                       "control:\n  listen: 127.0.0.1:9465\n"
                       "  tls: {cert_file: c.crt, key_file: c.key, client_ca_file: ca.crt}\n"
                       "  callers: {bot: {client_cert_cn: bot}}\n")
    assert (cfg.ops.header_timeout, cfg.ops.idle_timeout, cfg.ops.max_connections) == (2.0, 60.0, 8)
    assert cfg.ops.tls is not None and cfg.ops.tls.cert_file == "a.crt"
    assert cfg.control.tls is not None and cfg.control.tls.client_ca_file == "ca.crt"
    with pytest.raises(ConfigError, match=r"^config\.yaml:3:\d+: client_cert_cn needs control\.tls\.client_ca_file"):
        parse_config("control:\n  listen: 127.0.0.1:9465\n  callers: {bot: {client_cert_cn: bot}}\n")
    with pytest.raises(ConfigError, match="unknown key 'client_ca_file'"):
        parse_config("ops: {tls: {cert_file: a, key_file: b, client_ca_file: c}}\n")
    with pytest.raises(ConfigError, match="max_connections"):
        parse_config("ops: {max_connections: 0}\n")
