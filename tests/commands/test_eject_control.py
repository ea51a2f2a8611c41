"""`confguard eject --control URL --token-file FILE`: the CLI (a real subprocess) asks a
running daemon (in-process, over the sandbox) to remove the party; exit codes as eject's."""

from __future__ import annotations

import os
import socket
from pathlib import Path

from _control_stack import control_stack, wait_tracked
from _daemon_harness import run_cli


def _env() -> dict[str, str]:
    # The CLI must not need Genesys credentials in this mode.
    return {k: v for k, v in os.environ.items() if "GENESYS" not in k}


async def test_eject_through_the_daemon(tmp_path: Path) -> None:
    async with control_stack(tmp_path) as (sb, daemon, api, q):
        w = sb.world
        conv = w.start_call(q)
        w.connect_agent(conv.id, w.create_user("Agent").id)
        ext = w.add_external(conv.id, "tel:+442079460999")
        twin_a = w.add_external(conv.id, "tel:+14155550001", name="Twin")
        twin_b = w.add_external(conv.id, "tel:+14155550002", name="twin")
        await wait_tracked(daemon, conv.id, twin_b.id)
        url = api.base
        token = str(tmp_path / "orchestrator.token")
        base = ("eject", "--control", url, "--token-file", token, "--conversation", conv.id)

        code, out, err = await run_cli(*base, "--address", "+44 20 7946 0999", "--dry-run", env=_env())
        assert code == 0 and "POST" in out and "Bearer ***" in out, (out, err)
        assert sb.journal.patches(conv.id) == []

        code, out, err = await run_cli(*base, "--address", "+44 20 7946 0999",
                                       "--reason", "case 77", env=_env())
        assert code == 0, (out, err)
        assert f"removed {ext.id}" in out
        assert [r.path.rsplit("/", 1)[1] for r in sb.journal.patches(conv.id)] == [ext.id]

        code, out, err = await run_cli(*base, "--participant", ext.id, env=_env())
        assert code == 0 and "already left" in out, (out, err)  # party_gone: nothing to do

        code, out, err = await run_cli(*base, "--name", "TWIN", env=_env())
        assert code == 1 and twin_a.id in out and twin_b.id in out, (out, err)

        code, out, err = await run_cli("eject", "--control", url, "--token-file", token,
                                       "--conversation", "00000000-0000-4000-8000-000000006000", "--name", "x", env=_env())
        assert code == 3, (out, err)
        requests = len(sb.journal.requests)
        for bad in ("no-such-call", "..", ".", "%2e", "a/b"):  # issue 21: exit 2, nothing sent
            code, out, err = await run_cli("eject", "--control", url, "--token-file", token,
                                           "--conversation", bad, "--name", "x", env=_env())
            assert code == 2 and "not a Genesys id" in err and "Traceback" not in err, (bad, err)
            code, out, err = await run_cli(*base, "--participant", bad, env=_env())
            assert code == 2 and "not a Genesys id" in err, (bad, err)
        assert len(sb.journal.requests) == requests

        bad = tmp_path / "bad.token"
        bad.write_text("definitely-not-a-configured-token\n")
        code, out, err = await run_cli("eject", "--control", url, "--token-file", str(bad),
                                       "--conversation", conv.id, "--name", "Twin", env=_env())
        assert code == 4 and "definitely-not" not in out + err, (out, err)
        assert len(sb.journal.patches(conv.id)) == 1


async def test_eject_control_argument_errors_and_unreachable(tmp_path: Path) -> None:
    token = tmp_path / "t.token"
    token.write_text("some-token-value-1234567890\n")
    code, _, err = await run_cli("eject", "--control", "http://127.0.0.1:9", "--conversation",
                                 "00000000-0000-4000-8000-000000006000", "--name", "x", env=_env())
    assert code == 2 and "--token-file" in err
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    code, _, err = await run_cli("eject", "--control", f"http://127.0.0.1:{port}", "--token-file",
                                 str(token), "--conversation", "00000000-0000-4000-8000-000000006000", "--name", "x", env=_env())
    assert code == 5 and "cannot reach the daemon" in err
    assert "some-token-value" not in err
    code, _, err = await run_cli("eject", "--control", f"http://127.0.0.1:{port}", "--token-file",
                                 str(tmp_path / "missing"), "--conversation", "00000000-0000-4000-8000-000000006000", "--name", "x",
                                 env=_env())
    assert code == 2 and "--token-file" in err


async def test_polling_waits_out_a_429_from_the_callers_own_limit() -> None:
    """Edge case a live daemon cannot produce quickly (a removal slower than the caller's
    limit): a mock transport answers the first poll 429, the next one final."""
    import io

    import httpx

    from daemon.commands.eject_control import eject_via_control

    polls: list[int] = []

    def handler(request: httpx.Request) -> httpx.Response:
        assert request.headers["Authorization"] == "Bearer tok-1234567890abcdef"
        if request.method == "POST":
            return httpx.Response(202, json={"id": "e1", "state": "pending",
                                             "conversationId": "c", "participantId": "p"})
        polls.append(1)
        if len(polls) == 1:
            return httpx.Response(429, headers={"Retry-After": "0.1"},
                                  json={"status": 429, "code": "rate_limited", "message": "slow down"})
        return httpx.Response(200, json={"id": "e1", "state": "disconnected", "httpStatus": 202,
                                         "attempts": 1})
    out = io.StringIO()
    code = await eject_via_control("http://127.0.0.1:1", "tok-1234567890abcdef",
                                   {"conversationId": "c", "participantId": "p"}, out=out,
                                   transport=httpx.MockTransport(handler), wait_seconds=10)
    assert code == 0 and len(polls) == 2 and "removed p" in out.getvalue()
