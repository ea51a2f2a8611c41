"""`confguard check`, offline and `--online` against the sandbox, as a real child process.

Offline: the shipped config.yaml passes; each kind of mistake exits 2 with exactly one
`FILE:LINE:COL: message` line on stderr and no traceback. Online: permitted topics exit 0
and leave no subscription behind; a rejected topic is named with its reason and missing
permissions (exit 1); refused credentials exit 4 without echoing the secret.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest

from _daemon_harness import REPO, SALES, SUPPORT, credentials_env, run_cli, write_config
from daemon.sandbox import Sandbox

SHIPPED = REPO / "config.yaml"


def _shipped_copy(folder: Path, name: str, old: str, new: str) -> Path:
    """A copy of the shipped config (and its list file) with `old` replaced by `new`."""
    text = SHIPPED.read_text()
    assert old in text, old
    shutil.copy(REPO / "blocked-numbers.txt", folder / "blocked-numbers.txt")
    changed = text.replace(old, new, 1)
    path = folder / name
    path.write_text(changed)
    return path


async def test_shipped_config_is_valid() -> None:
    code, out, err = await run_cli("check", "--config", str(SHIPPED))
    assert code == 0, err
    assert out.startswith("ok: ") and "6 rule(s) enabled of 6, 2 list(s)" in out
    assert "Traceback" not in err


BAD = {
    "unknown-key": ("mode: enforce\n", "mode: enforce\nmoed: observe\n", "moed",
                    r"unknown key 'moed'; check the spelling.*", 1),
    "bad-regex": ('attributes.complianceFlag: "true"', 'attributes.complianceFlag: {matches: "tr(ue"}',
                  "{matches", r"rule 'flagged-party': bad regular expression 'tr\(ue': .*", None),
    "missing-list": ("address: {in_list: blocked_numbers}", "address: {in_list: blocked_nmbers}",
                     "blocked_nmbers", r"rule 'blocked-number-in-conference': unknown list 'blocked_nmbers' \(lists: blocked_numbers, trusted_supervisors\)", None),
    "unknown-rule-field": ("    severity: critical\n    tags: [PCI-DSS-3.2.1]",
                           "    severity: critical\n    priority: 5\n    tags: [PCI-DSS-3.2.1]",
                           "priority", r"rule 'flagged-party': unknown key 'priority'.*", 5),
    "missing-list-file": ("{file: blocked-numbers.txt}", "{file: nope.txt}", "nope.txt",
                          r"list 'blocked_numbers': list file not found: \S*/nope\.txt", None),
}


@pytest.mark.parametrize("case", sorted(BAD))
async def test_bad_config_exits_2_with_file_line_col(tmp_path: Path, case: str) -> None:
    old, new, marker, message, col = BAD[case]
    path = _shipped_copy(tmp_path, f"{case}.yaml", old, new)
    text = path.read_text()
    line = text[: text.index(marker)].count("\n") + 1
    code, out, err = await run_cli("check", "--config", str(path))
    assert code == 2
    assert out == ""
    lines = err.splitlines()
    assert len(lines) == 1, err
    m = re.fullmatch(rf"{re.escape(str(path))}:(\d+):(\d+): (.*)", lines[0])
    assert m, lines[0]
    assert int(m.group(1)) == line, (lines[0], line)
    # the column points into the offending line (at the key, or at the value)
    assert 1 <= int(m.group(2)) <= len(text.splitlines()[line - 1])
    if col is not None:  # a key: its own column
        assert int(m.group(2)) == col
    assert re.fullmatch(message, m.group(3)), m.group(3)
    assert "Traceback" not in err


async def test_missing_config_file_is_one_clear_line(tmp_path: Path) -> None:
    code, out, err = await run_cli("check", "--config", str(tmp_path / "nope.yaml"))
    assert code == 2 and out == ""
    assert err.strip() == f"confguard: config file not found: {tmp_path / 'nope.yaml'}"


# ---------------------------------------------------------------------- --online


def _online_config(sb: Sandbox, folder: Path, queues: list[str]) -> Path:
    sb.world.create_queue("Sales", SALES)
    sb.world.create_queue("Support", SUPPORT)
    return write_config(folder, sb.base_url, queues=queues)


async def test_online_all_permitted_then_cleaned_up(sandbox: Sandbox, tmp_path: Path) -> None:
    cfg = _online_config(sandbox, tmp_path, [SALES, "Support"])
    code, out, err = await run_cli("check", "--config", str(cfg), "--online", env=credentials_env(sandbox))
    assert code == 0, out + err
    assert f"ok: token issued by {sandbox.base_url}" in out
    assert "ok: 2 queue(s), 0 user(s) -> 2 topic(s)" in out
    assert "ok: channel 1: 2 of 2 topic(s) permitted" in out
    assert out.rstrip().endswith("ok: online check passed; subscriptions removed again")
    # the sandbox saw the subscription and its removal; nothing stays subscribed
    paths = [(r.method, r.path, r.status) for r in sandbox.journal.requests]
    (channel_id,) = list(sandbox.world.channels)
    subs = f"/api/v2/notifications/channels/{channel_id}/subscriptions"
    assert ("PUT", subs, 200) in paths
    assert any(m == "DELETE" and p == subs and s < 300 for m, p, s in paths), paths
    assert sandbox.world.channels[channel_id].topics == {}
    assert sandbox.world.topic_index == {}
    assert sandbox.client_secret not in out + err


async def test_online_unknown_queue_is_rejected(sandbox: Sandbox, tmp_path: Path) -> None:
    ghost = "99999999-9999-4999-8999-999999999999"
    cfg = _online_config(sandbox, tmp_path, [SALES, ghost])
    code, out, err = await run_cli("check", "--config", str(cfg), "--online", env=credentials_env(sandbox))
    assert code == 1, out + err
    rejected = [line for line in out.splitlines() if line.startswith("REJECTED")]
    assert rejected == [f"REJECTED: v2.routing.queues.{ghost}.conversations.calls: "
                        f"Queue not found: {ghost}; missing permissions: none named"]
    assert "ok: channel 1: 1 of 2 topic(s) permitted" in out
    assert "FAIL: 1 topic(s) rejected" in out
    assert sandbox.world.topic_index == {}  # cleaned up on failure too


async def test_online_missing_permission_is_named(sandbox: Sandbox, tmp_path: Path) -> None:
    cfg = _online_config(sandbox, tmp_path, [SALES])
    sandbox.world.clients[sandbox.client_id].permissions.discard("routing:queue:view")
    code, out, err = await run_cli("check", "--config", str(cfg), "--online", env=credentials_env(sandbox))
    assert code == 1, out + err
    assert (f"REJECTED: v2.routing.queues.{SALES}.conversations.calls: Missing permissions; "
            "missing permissions: routing:queue:view") in out


async def test_online_wrong_secret_exits_4_without_the_secret(sandbox: Sandbox, tmp_path: Path) -> None:
    cfg = _online_config(sandbox, tmp_path, [SALES])
    wrong = "not-the-secret-0123456789abcdef"
    code, out, err = await run_cli("check", "--config", str(cfg), "--online",
                                   env=credentials_env(sandbox, GENESYSCLOUD_OAUTHCLIENT_SECRET=wrong))
    assert code == 4, out + err
    assert out.startswith("ok: ")  # the offline part passed
    lines = [line for line in err.splitlines() if line.startswith("confguard: ")]
    assert len(lines) == 1, err
    assert "client id or secret was refused" in lines[0] and "GENESYSCLOUD_OAUTHCLIENT_SECRET" in lines[0]
    assert "Traceback" not in err
    assert wrong not in out + err and sandbox.client_secret not in out + err
    assert sandbox.world.channels == {}  # nothing was created


async def test_online_without_credentials_exits_2(sandbox: Sandbox, tmp_path: Path) -> None:
    cfg = _online_config(sandbox, tmp_path, [SALES])
    env = credentials_env(sandbox)
    for name in ("GENESYSCLOUD_OAUTHCLIENT_ID", "GENESYSCLOUD_OAUTHCLIENT_SECRET",
                 "GENESYS_CLOUD_CLIENT_ID", "GENESYS_CLOUD_CLIENT_SECRET", "CREDENTIALS_DIRECTORY"):
        env.pop(name, None)
    code, out, err = await run_cli("check", "--config", str(cfg), "--online", env=env)
    assert code == 2, out + err
    assert err.startswith("confguard: ") and len(err.strip().splitlines()) == 1


async def test_online_unreachable_login_exits_5(tmp_path: Path) -> None:
    import socket

    with socket.socket() as s:  # a port that was free a moment ago: nothing listens there
        s.bind(("127.0.0.1", 0))
        origin = f"http://127.0.0.1:{s.getsockname()[1]}"
    cfg = write_config(tmp_path, origin)
    env = {"GENESYSCLOUD_OAUTHCLIENT_ID": "id", "GENESYSCLOUD_OAUTHCLIENT_SECRET": "secret-xyz",
           "PATH": "/usr/bin:/bin"}
    code, out, err = await run_cli("check", "--config", str(cfg), "--online", env=env)
    assert code == 5, out + err
    lines = [ln for ln in err.splitlines() if ln.startswith("confguard: ")]
    assert len(lines) == 1 and f"cannot reach the Genesys login service at {origin}" in lines[0]
    assert "secret-xyz" not in out + err and "Traceback" not in err


@pytest.mark.parametrize("body", ["schema_version: 1\n", "schema_version: 1\nsubscriptions:\n  queues: []\n  users: []\n"])
async def test_nothing_to_subscribe_is_not_ok(tmp_path: Path, body: str) -> None:
    """`confguard run` refuses to start without queues or users; check must say so too."""
    cfg = tmp_path / "config.yaml"
    cfg.write_text(body)
    code, out, err = await run_cli("check", "--config", str(cfg))
    assert code == 2 and out == ""
    line = 3 if "queues" in body else 1
    assert re.fullmatch(rf"{re.escape(str(cfg))}:{line}:\d+: nothing to subscribe: subscriptions\.queues "
                        r"and subscriptions\.users are both empty; .*\n", err), err


async def test_online_unknown_queue_name_is_named(sandbox: Sandbox, tmp_path: Path) -> None:
    cfg = _online_config(sandbox, tmp_path, [SALES, "Collectoins"])
    code, out, err = await run_cli("check", "--config", str(cfg), "--online", env=credentials_env(sandbox))
    assert code == 1, out + err
    lines = [ln for ln in err.splitlines() if ln.startswith("confguard: ")]
    assert len(lines) == 1 and "'Collectoins'" in lines[0], err
    assert sandbox.world.channels == {}  # failed before creating anything


async def test_signing_key_is_checked_offline(tmp_path: Path) -> None:
    """audit.signing_key_file: a readable Ed25519 key is named by its id; an unreadable one
    is a config error at its line (exit 2), not a failure at the daemon's start."""
    from daemon.service.checkpoint import generate_keypair

    kid = generate_keypair(tmp_path / "k.pem", tmp_path / "k.pub")
    good = _shipped_copy(tmp_path, "good.yaml", "  fsync_interval: 1.0",
                         f"  fsync_interval: 1.0\n  signing_key_file: {tmp_path / 'k.pem'}")
    code, out, err = await run_cli("check", "--config", str(good))
    assert code == 0, err
    assert f"audit checkpoints: signed with key {kid}, every 60 s" in out
    bad = _shipped_copy(tmp_path, "bad.yaml", "  fsync_interval: 1.0",
                        "  fsync_interval: 1.0\n  signing_key_file: k.pub")  # the PUBLIC key
    code, out, err = await run_cli("check", "--config", str(bad))
    assert code == 2 and len(err.splitlines()) == 1, err
    assert re.fullmatch(rf"{re.escape(str(bad))}:\d+:\d+: audit.signing_key_file: .*not an unencrypted PEM private key.*",
                        err.strip()), err
