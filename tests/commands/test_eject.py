"""`confguard eject`: target resolution (pure, over hand-built `CallConversation` bodies) and
the command end to end as a subprocess against the sandbox on 127.0.0.1."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import structlog

from _wait import wait_until
from daemon.commands.cli import exit_code_for, main
from daemon.commands.eject import Selector, party_table, resolve_target
from daemon.errors import (AuthError, ConfigError, CredentialsError, ForbiddenError,
                           NotFoundError, ServerError, TargetError, TransportError)
from daemon.sandbox import Sandbox
from daemon.sandbox.journal import RequestRecord

CID = "9a7b6c5d-1111-4222-8333-444455556666"
CUSTOMER = "c0000000-0000-4000-8000-000000000001"
AGENT = "a0000000-0000-4000-8000-000000000002"
EXTERNAL = "e0000000-0000-4000-8000-000000000003"
ACD = "d0000000-0000-4000-8000-000000000004"
AGENT_USER = "u0000000-0000-4000-8000-00000000aaaa"
CONTACT = "x0000000-0000-4000-8000-00000000bbbb"


def participant(pid: str, *, purpose: str, name: str | None = None, address: str | None = None,
                ani: str | None = None, dnis: str | None = None, state: str = "connected",
                user: tuple[str, str] | None = None, external_contact: str | None = None,
                direction: str = "inbound") -> dict[str, Any]:
    """A CallMediaParticipant as GET /api/v2/conversations/calls/{id} returns it."""
    p: dict[str, Any] = {
        "id": pid, "purpose": purpose, "state": state, "direction": direction,
        "startTime": "2026-11-21T09:15:00.000Z", "connectedTime": "2026-11-21T09:15:02.345Z",
        "held": False, "muted": False, "confined": False, "recording": False,
        "recordingState": "none", "provider": "Edge", "attributes": {},
        "wrapupRequired": False,
    }
    if name is not None:
        p["name"] = name
    if address is not None:
        p["address"] = address
    if ani is not None:
        p["ani"] = ani
    if dnis is not None:
        p["dnis"] = dnis
    if user is not None:
        p["user"] = {"id": user[0], "name": user[1], "selfUri": f"/api/v2/users/{user[0]}"}
    if external_contact is not None:
        p["externalContact"] = {"id": external_contact,
                                "selfUri": f"/api/v2/externalcontacts/contacts/{external_contact}"}
    if state in ("disconnected", "terminated"):
        p["endTime"] = "2026-11-21T09:16:00.000Z"
        p["disconnectType"] = "client"
    return p


def call_conversation(cid: str, participants: list[dict[str, Any]]) -> dict[str, Any]:
    """A CallConversation body."""
    return {"id": cid, "participants": participants, "otherMediaUris": [],
            "recordingState": "none", "maxParticipants": 6, "securePause": False,
            "divisions": [], "selfUri": f"/api/v2/conversations/calls/{cid}"}


def conference() -> dict[str, Any]:
    """A three-party conference (customer, agent, external party) plus an ended ACD leg."""
    return call_conversation(CID, [
        participant(CUSTOMER, purpose="customer", name="Pat Customer",
                    address="tel:+44 20 7946 0000", ani="tel:+44 20 7946 0000",
                    dnis="tel:+18005550100", external_contact=CONTACT),
        participant(ACD, purpose="acd", name="Sales", address="sip:acd@example",
                    state="disconnected"),
        participant(AGENT, purpose="agent", name="Alex Agent", user=(AGENT_USER, "Alex Agent"),
                    address="sip:alex@example.mypurecloud.ie", direction="outbound"),
        participant(EXTERNAL, purpose="external", name="Third Party",
                    address="sip:+442079460999@carrier.example;user=phone",
                    dnis="tel:+442079460999", direction="outbound"),
    ])


# ---------------------------------------------------------------- resolution (pure)


@pytest.mark.parametrize("selector, expected", [
    (Selector("participant", EXTERNAL), EXTERNAL),
    (Selector("user", AGENT_USER), AGENT),
    (Selector("external_contact", CONTACT), CUSTOMER),
    (Selector("address", "+442079460000"), CUSTOMER),
    (Selector("address", "tel:+44 20 7946 0000"), CUSTOMER),
    (Selector("address", "+44 (20) 7946-0999"), EXTERNAL),   # sip: address with ;user=phone
    (Selector("address", "+18005550100"), CUSTOMER),         # dnis
    (Selector("name", "third PARTY"), EXTERNAL),
    (Selector("name", "  Alex Agent "), AGENT),
])
def test_resolves_exactly_one_live_target(selector: Selector, expected: str) -> None:
    res = resolve_target(conference(), selector)
    assert res.outcome == "target"
    assert res.target is not None and res.target["id"] == expected


def test_no_match_ambiguous_and_gone() -> None:
    call = conference()
    assert resolve_target(call, Selector("address", "+15550000000")).outcome == "none"
    assert resolve_target(call, Selector("name", "Third")).outcome == "none"  # exact only
    gone = resolve_target(call, Selector("participant", ACD))
    assert gone.outcome == "gone" and gone.matches[0]["id"] == ACD
    call["participants"].append(participant("e2", purpose="external", name="Third Party"))
    amb = resolve_target(call, Selector("name", "Third Party"))
    assert amb.outcome == "ambiguous"
    assert {p["id"] for p in amb.live} == {EXTERNAL, "e2"}


def test_a_live_leg_wins_over_an_ended_leg_of_the_same_person() -> None:
    call = conference()
    call["participants"].append(participant("old", purpose="external", name="Third Party",
                                            state="terminated"))
    res = resolve_target(call, Selector("name", "Third Party"))
    assert res.outcome == "target" and res.target is not None and res.target["id"] == EXTERNAL


def test_malformed_participants_are_skipped() -> None:
    call = {"id": CID, "participants": [None, "x", {"name": "no id"},
                                        participant("p1", purpose="agent", name="Ok")]}
    assert resolve_target(call, Selector("name", "ok")).outcome == "target"
    assert resolve_target({"id": CID}, Selector("name", "ok")).outcome == "none"
    assert resolve_target({"id": CID, "participants": "nope"}, Selector("name", "ok")).outcome == "none"


def test_party_table_is_aligned() -> None:
    lines = party_table(conference()["participants"]).splitlines()
    assert lines[0].split() == ["PARTICIPANT", "PURPOSE", "NAME", "ADDRESS", "USER", "STATE"]
    assert len(lines) == 5
    col = lines[0].index("PURPOSE")
    assert all(line[col - 2:col] == "  " for line in lines)
    assert "Alex Agent" in lines[3] and lines[3].rstrip().endswith("connected")


def test_exit_code_mapping() -> None:
    assert exit_code_for(ConfigError("x")) == 2
    assert exit_code_for(CredentialsError("x")) == 2
    assert exit_code_for(TargetError("x")) == 3
    assert exit_code_for(NotFoundError("x")) == 3
    assert exit_code_for(ForbiddenError("x")) == 4
    assert exit_code_for(AuthError("x", status=401)) == 4
    assert exit_code_for(AuthError("x", status=503)) == 5
    assert exit_code_for(ServerError("x")) == 5
    assert exit_code_for(TransportError("x")) == 5


@pytest.fixture
def restore_structlog() -> Iterator[None]:
    # cli.main configures structlog and the root logger; keep other tests' logging untouched.
    before = list(logging.getLogger().handlers)
    level = logging.getLogger().level
    yield
    structlog.reset_defaults()
    root = logging.getLogger()
    for h in list(root.handlers):
        if h not in before:
            root.removeHandler(h)
    root.setLevel(level)


@pytest.mark.usefixtures("restore_structlog")
def test_bad_arguments_exit_2_without_traceback(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["eject", "--conversation", CID]) == 2
    assert main(["eject", "--conversation", CID, "--name", "a", "--user", "b"]) == 2
    assert main(["eject", "--conversation", CID, "--name", " ", "--config", "/nonexistent.yaml"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert "confguard: --name must not be empty" in err


# ---------------------------------------------------------------- subprocess, end to end


@dataclass
class Run:
    code: int
    out: str
    err: str


@dataclass
class Org:
    """The sandbox with one live conference: customer Pat (address and ani
    `tel:+44 20 7946 0000`), the ended ACD leg, agent Alex (user AGENT_USER) and the
    external party "Third Party" at `sip:+442079460999@carrier.example;user=phone`."""

    sb: Sandbox
    cid: str
    customer: str
    acd: str
    agent: str
    external: str

    @property
    def origin(self) -> str:
        return self.sb.base_url

    def patches(self) -> list[RequestRecord]:
        return list(self.sb.journal.patches())

    def token_requests(self) -> list[RequestRecord]:
        return [r for r in self.sb.journal.requests if r.path == "/oauth/token" and r.status == 200]

    def gets(self) -> list[RequestRecord]:
        return [r for r in self.sb.journal.requests if r.method == "GET" and "/conversations/calls/" in r.path]

    def burst(self, method: str, status: int, count: int, retry_after: float | None = None) -> None:
        """The next `count` requests of `method` on the call answer `status`."""
        self.sb.faults.add_burst(method, "/api/v2/conversations/calls/.*", status, count, retry_after)


@pytest.fixture
async def org(sandbox: Sandbox) -> Org:
    w = sandbox.world
    queue = w.create_queue("Sales").id
    w.create_user("Alex Agent", AGENT_USER)
    conv = w.start_call(queue, ani="tel:+44 20 7946 0000", customer_name="Pat Customer")
    customer = next(p.id for p in conv.participants if p.purpose == "customer")
    acd = next(p.id for p in conv.participants if p.purpose == "acd")
    agent = w.connect_agent(conv.id, AGENT_USER).id
    external = w.add_external(conv.id, "sip:+442079460999@carrier.example;user=phone",
                              name="Third Party").id
    return Org(sandbox, conv.id, customer, acd, agent, external)


def write_config(tmp_path: Path, origin: str) -> Path:
    cfg = tmp_path / "config.yaml"
    cfg.write_text(
        "genesys:\n"
        f"  api_base_url: {origin}\n"
        f"  login_base_url: {origin}\n"
        "  max_retries: 2\n", encoding="utf-8")
    return cfg


def _env(client_id: str, secret: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("GENESYS", "CREDENTIALS_DIRECTORY"))}
    env["GENESYSCLOUD_OAUTHCLIENT_ID"] = client_id
    env["GENESYSCLOUD_OAUTHCLIENT_SECRET"] = secret
    return env


async def eject(tmp_path: Path, org: Org, *args: str, secret: str | None = None,
                client_id: str | None = None, config: bool = True,
                log_level: str | None = None) -> Run:
    env = _env(client_id or org.sb.client_id, secret or org.sb.client_secret)
    argv = [sys.executable, "-m", "daemon"]
    if log_level:
        argv += ["--log-level", log_level]
    argv.append("eject")
    if config:
        argv += ["--config", str(write_config(tmp_path, org.origin))]
    proc = await asyncio.create_subprocess_exec(
        *argv, *args, cwd=tmp_path, env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    return Run(proc.returncode, out.decode(), err.decode())


async def test_subprocess_removes_one_party_with_the_exact_patch(tmp_path: Path, org: Org) -> None:
    run = await eject(tmp_path, org, "--conversation", org.cid, "--address", "+442079460999",
                      log_level="debug")
    assert run.code == 0, run.err
    assert "api_request" in run.err  # debug logs went to stderr ...
    (patch,) = org.patches()
    assert patch.method == "PATCH"
    assert patch.path == f"/api/v2/conversations/calls/{org.cid}/participants/{org.external}"
    assert patch.body == {"state": "disconnected"}
    assert patch.content_type == "application/json"
    assert patch.client_id == org.sb.client_id  # a bearer token of our client
    assert patch.status == 202
    assert len(org.token_requests()) == 1
    # The table, then the confirmation naming who is still connected.
    assert "PARTICIPANT" in run.out and "Third Party" in run.out
    assert f"removed {org.external}" in run.out
    still = run.out.split("still on the call:", 1)[1]
    assert org.customer in still and org.agent in still and org.external not in still
    assert not org.sb.world.get_call(org.cid).party(org.external).live
    tokens = list(org.sb.world.tokens)
    assert org.sb.client_secret not in run.out + run.err
    assert tokens and all(t not in run.out + run.err for t in tokens)  # ... without the token


async def test_subprocess_ambiguous_target_sends_nothing(tmp_path: Path, org: Org) -> None:
    second = org.sb.world.add_external(org.cid, "tel:+14155550199", name="Third Party").id
    run = await eject(tmp_path, org, "--conversation", org.cid, "--name", "third party")
    assert run.code == 1
    assert org.patches() == []
    assert org.external in run.out and second in run.out
    assert "--participant" in run.err


async def test_subprocess_403_names_the_missing_permission(tmp_path: Path, org: Org) -> None:
    # An OAuth client whose role lacks every permission the participant PATCH accepts.
    client = org.sb.world.add_client(permissions={"conversation:communication:view"})
    run = await eject(tmp_path, org, "--conversation", org.cid, "--participant", org.agent,
                      client_id=client.id, secret=client.secret)
    assert run.code == 4
    assert len(org.patches()) == 1  # a 403 is not retried
    lines = [line for line in run.err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("confguard: ")
    assert "conversation:communication:disconnect" in lines[0]
    assert "Traceback" not in run.err


async def test_subprocess_no_such_party_or_call_exits_3(tmp_path: Path, org: Org) -> None:
    nobody = "00000000-0000-4000-8000-00000000beef"
    run = await eject(tmp_path, org, "--conversation", org.cid, "--user", nobody)
    assert run.code == 3
    assert "no party" in run.err and f"user '{nobody}'" in run.err
    run = await eject(tmp_path, org, "--conversation", "00000000-0000-4000-8000-000000006000",
                      "--user", nobody)
    assert run.code == 3
    assert "was not found" in run.err
    assert org.patches() == []


async def test_subprocess_already_gone_and_dry_run(tmp_path: Path, org: Org) -> None:
    run = await eject(tmp_path, org, "--conversation", org.cid, "--participant", org.acd)
    assert run.code == 0
    assert "already left" in run.out
    run = await eject(tmp_path, org, "--conversation", org.cid, "--name", "Pat Customer",
                      "--dry-run")
    assert run.code == 0
    assert (f"PATCH {org.origin}/api/v2/conversations/calls/{org.cid}/participants/{org.customer}"
            in run.out)
    assert '{"state": "disconnected"}' in run.out
    assert org.patches() == []


async def test_subprocess_409_is_retried_then_succeeds(tmp_path: Path, org: Org) -> None:
    org.burst("PATCH", 409, 2)
    run = await eject(tmp_path, org, "--conversation", org.cid, "--participant", org.external)
    assert run.code == 0, run.err
    assert [p.status for p in org.patches()] == [409, 409, 202]


async def test_subprocess_429_waits_for_retry_after(tmp_path: Path, org: Org) -> None:
    org.burst("PATCH", 429, 1, retry_after=1)
    run = await eject(tmp_path, org, "--conversation", org.cid, "--participant", org.external)
    assert run.code == 0, run.err
    patches = org.patches()
    assert [p.status for p in patches] == [429, 202]
    assert patches[1].time - patches[0].time >= 0.9  # Retry-After: 1 was honoured


async def test_subprocess_refused_credentials(tmp_path: Path, org: Org) -> None:
    run = await eject(tmp_path, org, "--conversation", org.cid, "--participant", org.external,
                      secret="wrong-secret-value")
    assert run.code == 4
    assert "refused (invalid_client)" in run.err
    assert "wrong-secret-value" not in run.err + run.out
    assert org.patches() == []


async def test_subprocess_server_errors_exit_5(tmp_path: Path, org: Org) -> None:
    org.burst("PATCH", 503, 100)
    run = await eject(tmp_path, org, "--conversation", org.cid, "--participant", org.external)
    assert run.code == 5
    assert len(org.patches()) == 3  # max_retries: 2 in the config
    assert "HTTP 503" in run.err


async def test_subprocess_unconfirmed_removal_exits_6(tmp_path: Path, org: Org) -> None:
    org.sb.faults.ignore_disconnects = True  # accepts the PATCH, the party stays connected
    run = await eject(tmp_path, org, "--conversation", org.cid, "--participant", org.external)
    assert run.code == 6
    assert "not confirmed" in run.err
    assert [p.status for p in org.patches()] == [202]


async def test_subprocess_bad_config_exits_2(tmp_path: Path, org: Org) -> None:
    (tmp_path / "config.yaml").write_text("genesys:\n  regoin: eu-west-1\n", encoding="utf-8")
    run = await eject(tmp_path, org, "--conversation", org.cid, "--participant", org.external,
                      config=False)  # picks ./config.yaml by default
    assert run.code == 2
    assert "config.yaml:2:3" in run.err and "regoin" in run.err
    assert "Traceback" not in run.err


async def test_subprocess_401_after_refresh_says_credentials_refused(tmp_path: Path, org: Org) -> None:
    org.burst("GET", 401, 100)
    run = await eject(tmp_path, org, "--conversation", org.cid, "--participant", org.external)
    assert run.code == 4
    assert "credentials were refused" in run.err
    assert len(org.token_requests()) == 2  # one refresh, then one retry, then give up
    assert len(org.gets()) == 2
    assert org.patches() == []


def test_help_documents_exit_codes(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["eject", "--help"]) == 0
    out = capsys.readouterr().out
    for line in ("0  done", "1  ambiguous", "2  bad configuration", "3  no such call",
                 "4  permission denied", "5  API or network failure", "6  removal accepted"):
        assert line in out
    assert main(["--help"]) == 0
    assert "eject" in capsys.readouterr().out


async def test_subprocess_ctrl_c_exits_130_without_traceback(tmp_path: Path, org: Org) -> None:
    org.sb.faults.latency = 30.0  # every /api/v2 request is held 30 s: the GET hangs
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "daemon", "eject", "--config",
        str(write_config(tmp_path, org.origin)), "--conversation", org.cid,
        "--participant", org.external, cwd=tmp_path, env=_env(org.sb.client_id, org.sb.client_secret),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    try:
        # up to 20 s for the interpreter to start and send the GET (seen as it arrives)
        await wait_until(lambda: any(m == "GET" and "/conversations/calls/" in p
                                     for m, p in org.sb.journal.arrivals), 20, "the GET to arrive")
        proc.send_signal(signal.SIGINT)
        out, err = await asyncio.wait_for(proc.communicate(), 20)
    finally:
        org.sb.faults.latency = 0.0
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode == 130
    assert "Traceback" not in err.decode()
    assert "interrupted" in err.decode()
    assert org.patches() == []


def test_every_listed_command_module_imports_and_registers() -> None:
    import argparse
    import importlib

    from daemon.commands.cli import COMMAND_MODULES

    missing = []
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError:
            missing.append(name)
            continue
        sub = argparse.ArgumentParser().add_subparsers()
        module.register(sub)
        assert sub.choices, f"{name}.register added no subcommand"
    assert not missing, f"cli.COMMAND_MODULES lists modules that do not exist: {missing}"


@pytest.mark.usefixtures("restore_structlog")
def test_unreachable_service_exits_5(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    import socket

    with socket.socket() as s:  # a port that was free a moment ago: connection refused
        s.bind(("127.0.0.1", 0))
        origin = f"http://127.0.0.1:{s.getsockname()[1]}"
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"genesys:\n  api_base_url: {origin}\n  login_base_url: {origin}\n"
                   "  max_retries: 0\n", encoding="utf-8")
    for name in ("GENESYS_CLOUD_CLIENT_ID", "GENESYS_CLOUD_CLIENT_SECRET", "CREDENTIALS_DIRECTORY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("GENESYSCLOUD_OAUTHCLIENT_ID", "id")
    monkeypatch.setenv("GENESYSCLOUD_OAUTHCLIENT_SECRET", "very-secret-value")
    code = main(["eject", "--config", str(cfg), "--conversation", CID, "--participant", "00000000-0000-4000-8000-00000000beef"])
    err = capsys.readouterr().err
    assert code == 5
    assert "cannot reach the Genesys login service" in err
    assert "very-secret-value" not in err
    assert "Traceback" not in err
