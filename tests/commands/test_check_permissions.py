"""`check --online` tells the truth about permissions, and a refused removal at run time makes
`/readyz` name the missing permission. The token learns its own permissions from
`GET /api/v2/tokens/me` (its OAuth client's roles) and `GET /api/v2/authorization/roles/{id}`;
everything over real sockets against the sandbox, which checks each permission where Genesys
does."""

from __future__ import annotations

import signal
from pathlib import Path

from sandbox_fixtures import SandboxClient

from _daemon_harness import (SALES, SUPPORT, DaemonProcess, credentials_env, run_cli, sandbox_queue,
                             write_config)
from daemon.genesys.permissions import Learnt, Need, Role, judge, role_permissions, summary
from daemon.sandbox import Sandbox

DISCONNECT = "conversation:communication:disconnect"


def _config(sb: Sandbox, folder: Path, queues: list[str]) -> Path:
    sb.world.create_queue("Sales", SALES)
    sb.world.create_queue("Support", SUPPORT)
    return write_config(folder, sb.base_url, queues=queues)


def _revoke(sb: Sandbox, *permissions: str) -> None:
    sb.world.clients[sb.client_id].permissions.difference_update(permissions)


async def test_all_permissions_present_passes(sandbox: Sandbox, tmp_path: Path) -> None:
    cfg = _config(sandbox, tmp_path, [SALES, "Support"])
    code, out, err = await run_cli("check", "--config", str(cfg), "--online", env=credentials_env(sandbox))
    assert code == 0, out + err
    assert f"ok: {DISCONNECT} through role" in out
    assert "ok: analytics:conversationDetail:view through role" in out
    assert "ok: routing:queue:view through role" in out  # a queue is named by name
    assert "not checked: division scope" in out
    assert out.rstrip().endswith("ok: online check passed; subscriptions removed again")


async def test_revoked_removal_permission_is_named_and_fails(sandbox: Sandbox, tmp_path: Path) -> None:
    cfg = _config(sandbox, tmp_path, [SALES])
    _revoke(sandbox, DISCONNECT)
    code, out, err = await run_cli("check", "--config", str(cfg), "--online", env=credentials_env(sandbox))
    assert code == 1, out + err
    missing = [line for line in out.splitlines() if line.startswith("MISSING:")]
    assert len(missing) == 1 and missing[0].startswith(f"MISSING: {DISCONNECT} (removing a party")
    assert "FAIL: a permission the daemon needs is missing" in out
    assert "ok: online check passed" not in out
    assert sandbox.world.topic_index == {}  # the topic part still ran and cleaned up


async def test_every_missing_permission_is_named(sandbox: Sandbox, tmp_path: Path) -> None:
    cfg = _config(sandbox, tmp_path, [SALES])
    _revoke(sandbox, DISCONNECT, "analytics:conversationDetail:view")
    code, out, err = await run_cli("check", "--config", str(cfg), "--online", env=credentials_env(sandbox))
    assert code == 1, out + err
    named = {line.split()[1] for line in out.splitlines() if line.startswith("MISSING:")}
    assert named == {DISCONNECT, "analytics:conversationDetail:view"}


async def test_queue_lookup_permission_for_named_queues(sandbox: Sandbox, tmp_path: Path) -> None:
    """Named queues need routing:queue:view for the lookup: named, then the lookup's 403."""
    cfg = _config(sandbox, tmp_path, ["Sales"])
    _revoke(sandbox, "routing:queue:view")
    code, out, err = await run_cli("check", "--config", str(cfg), "--online", env=credentials_env(sandbox))
    assert code != 0, out + err
    assert "MISSING: routing:queue:view (looking up queues named in subscriptions.queues" in out
    assert "routing:queue:view" in err  # the lookup itself was refused, naming it


async def test_unreadable_role_is_not_checked_and_passes(sandbox: Sandbox, tmp_path: Path) -> None:
    """Without authorization:role:view the client cannot read its role: each permission is
    `not checked: <permission> (<why>)`, and with everything checkable passing, exit 0."""
    cfg = _config(sandbox, tmp_path, [SALES])
    _revoke(sandbox, "authorization:role:view")
    code, out, err = await run_cli("check", "--config", str(cfg), "--online", env=credentials_env(sandbox))
    assert code == 0, out + err
    assert (f"not checked: {DISCONNECT} (role {sandbox.world.clients[sandbox.client_id].role_id}: "
            "GET /api/v2/authorization/roles/{roleId} answered 403: reading it needs "
            "authorization:role:view, which the client lacks)") in out
    assert "not checked: analytics:conversationDetail:view (" in out
    assert "MISSING" not in out


async def test_observe_mode_reports_removal_without_failing(sandbox: Sandbox, tmp_path: Path) -> None:
    sandbox.world.create_queue("Sales", SALES)
    cfg = write_config(tmp_path, sandbox.base_url, queues=[SALES])
    cfg.write_text(cfg.read_text().replace("mode: enforce", "mode: observe"))
    _revoke(sandbox, DISCONNECT)
    code, out, err = await run_cli("check", "--config", str(cfg), "--online", env=credentials_env(sandbox))
    assert code == 0, out + err
    assert f"missing, not needed in this mode: {DISCONNECT}" in out


def test_judge_reads_policies_with_wildcards() -> None:
    role = {"name": "ops", "permissions": ["routing:queue:view", "bad"],
            "permissionPolicies": [{"domain": "conversation", "entityName": "*", "actionSet": ["disconnect"]},
                                   {"domain": "analytics", "entityName": "conversationDetail", "actionSet": ["*"]},
                                   {"domain": 3}, "junk"]}
    perms = role_permissions(role)
    assert perms == ("analytics:conversationDetail:*", "conversation:*:disconnect", "routing:queue:view")
    learnt = Learnt("c", (Role("r1", "d", "ops", perms),))
    needs = [Need((DISCONNECT,), "remove"), Need(("analytics:conversationDetail:view",), "resync"),
             Need(("directory:user:view",), "x")]
    verdicts = judge(needs, learnt)
    assert [v.status for v in verdicts] == ["ok", "ok", "missing"]
    lines, passed = summary(verdicts)
    assert not passed and lines[2].startswith("MISSING: directory:user:view (x)")
    # a role that could not be read hides the answer: not checked, never missing
    learnt = Learnt("c", (Role("r1", "d", "ops", ()), Role("r2", "d", error="403")))
    assert judge(needs[:1], learnt)[0].status == "not_checked"
    assert judge(needs[:1], Learnt(error="GET /api/v2/tokens/me answered 403"))[0].status == "not_checked"
    assert judge(needs[:1], Learnt("c", ()))[0].detail == "the OAuth client has no role"


async def _removal_refused(sandbox: Sandbox, tmp_path: Path) -> tuple[DaemonProcess, str]:
    """A running daemon whose client lost the removal permission, and the participant id of
    a flagged party it then failed to remove."""
    sandbox_queue(sandbox)
    cfg = write_config(tmp_path, sandbox.base_url, queues=[SALES])
    daemon = await DaemonProcess(cfg, credentials_env(sandbox), tmp_path).start()
    await daemon.wait_ready(30)
    _revoke(sandbox, DISCONNECT)
    w = sandbox.world
    conv = w.start_call(SALES)
    agent = w.create_user("Alice")
    w.connect_agent(conv.id, agent.id)
    ext = w.add_external(conv.id)
    w.set_attributes(conv.id, ext.id, {"complianceFlag": "true"})
    await daemon.wait_event("enforce_forbidden")
    return daemon, ext.id


async def test_refused_removal_makes_readyz_name_the_permission(sandbox: Sandbox, tmp_path: Path) -> None:
    daemon, pid = await _removal_refused(sandbox, tmp_path)
    try:
        body = await daemon.wait_http("/readyz", 503)
        assert body["status"] == "not_ready"
        assert DISCONNECT in body["reason"] and body["reason"].startswith("degraded")
        assert body["details"]["missing_permissions"] == [DISCONNECT]
        assert [r.status for r in sandbox.journal.requests
                if r.method == "PATCH" and r.path.endswith(pid)] == [403]
        # granted again and reloaded: ready, and the next removal goes through
        sandbox.world.clients[sandbox.client_id].permissions.add(DISCONNECT)
        daemon.send(signal.SIGHUP)
        await daemon.wait_event("reloaded")
        await daemon.wait_http("/readyz", 200)
        w = sandbox.world
        conv = w.start_call(SALES)
        ext = w.add_external(conv.id)
        w.add_external(conv.id)
        w.set_attributes(conv.id, ext.id, {"complianceFlag": "true"})
        await daemon.wait_event("enforce_outcome", participant_id=ext.id)
        assert (await daemon.wait_http("/readyz", 200))["status"] == "ready"
    finally:
        daemon.send(signal.SIGTERM)
        await daemon.wait_exit()
        await daemon.close()


async def test_token_me_needs_no_permission_and_roles_need_role_view(
        sandbox: Sandbox, sandbox_client: SandboxClient) -> None:
    sandbox.world.clients[sandbox.client_id].permissions.clear()
    c = sandbox_client
    await c.login()
    st, body, _ = await c.request("GET", "/api/v2/tokens/me")
    assert st == 200 and body["OAuthClient"]["id"] == sandbox.client_id
    role_id = body["OAuthClient"]["roleDivisions"][0]["roleId"]
    st, body, _ = await c.request("GET", f"/api/v2/authorization/roles/{role_id}")
    assert st == 403 and "authorization:role:view" in body["message"]
    sandbox.world.clients[sandbox.client_id].permissions.add("authorization:role:view")
    st, body, _ = await c.request("GET", f"/api/v2/authorization/roles/{role_id}")
    assert st == 200 and body["permissions"] == ["authorization:role:view"]
    st, body, _ = await c.request("GET", "/api/v2/authorization/roles/no-such-role")
    assert st == 404
