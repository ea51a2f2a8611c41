"""The `confguard` command line: help and usage errors, and `confguard run` flags
(`--observe`, `--record`) as a real child process against the sandbox."""

from __future__ import annotations

import asyncio
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from _daemon_harness import (FLAGGED_RULE, REPO, SALES, DaemonProcess, audit_records,
                             credentials_env, read_jsonl, run_cli, sandbox_queue, wait_until,
                             write_config)
from daemon.commands.cli import COMMAND_MODULES, main
from daemon.sandbox import Sandbox

COMMANDS = ("run", "check", "replay", "demo", "eject", "audit", "sandbox", "test", "explain")
CONSOLE_SCRIPT = Path(sys.executable).parent / "confguard"


async def _exec(*argv: str) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(*argv, stdout=asyncio.subprocess.PIPE,
                                                stderr=asyncio.subprocess.PIPE, cwd=str(REPO))
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def test_help_is_the_same_from_the_script_and_python_m() -> None:
    assert CONSOLE_SCRIPT.exists(), "the confguard console script is not installed in the venv"
    (c1, out1, err1), (c2, out2, err2) = await asyncio.gather(
        _exec(str(CONSOLE_SCRIPT), "--help"), _exec(sys.executable, "-m", "daemon", "--help"))
    assert (c1, c2) == (0, 0), err1 + err2
    assert out1 == out2
    assert out1.startswith("usage: confguard ")
    listed = re.search(r"\{([a-z,]+)\}|COMMAND", out1)
    assert listed
    for command in COMMANDS:
        assert re.search(rf"^\s+{command}\s+\S", out1, re.M), (command, out1)
    assert "exit codes" in out1 and err1 == err2 == ""


async def test_unknown_subcommand_and_missing_subcommand_exit_2() -> None:
    (c1, out1, err1), (c2, out2, err2) = await asyncio.gather(
        _exec(sys.executable, "-m", "daemon", "frobnicate"), _exec(str(CONSOLE_SCRIPT)))
    assert c1 == 2 and out1 == ""
    assert "invalid choice: 'frobnicate'" in err1 and "Traceback" not in err1
    assert c2 == 2 and out2 == "" and err2.startswith("usage: confguard ")


def test_every_command_module_is_listed() -> None:
    assert len(COMMAND_MODULES) == len(COMMANDS)


@pytest.mark.parametrize("command", COMMANDS)
def test_each_subcommand_help(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main([command, "--help"]) == 0
    out, err = capsys.readouterr()
    assert out.startswith(f"usage: confguard {command}"), out
    assert err == ""
    if command in ("run", "check", "replay", "demo"):
        assert "--config" in out


def test_bad_option_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["run", "--no-such-option"]) == 2
    assert "unrecognized arguments: --no-such-option" in capsys.readouterr().err


async def test_run_with_a_bad_config_exits_2_with_its_position(tmp_path: Path) -> None:
    cfg = write_config(tmp_path, "http://127.0.0.1:9", extra_top="modee: observe\n")
    code, out, err = await run_cli("run", "--config", str(cfg))
    assert code == 2 and out == ""
    line = cfg.read_text().splitlines().index("modee: observe") + 1
    assert err == f"{cfg}:{line}:1: unknown key 'modee'; check the spelling (allowed keys are " \
                  "in docs/configuration.md)\n"
    code, out, err = await run_cli("run", "--config", str(tmp_path / "missing.yaml"))
    assert code == 2 and err == f"confguard: config file not found: {tmp_path / 'missing.yaml'}\n"


async def test_run_observe_and_record_then_replay(sandbox: Sandbox, tmp_path: Path) -> None:
    """`run --observe --record FILE`: decides and audits but sends nothing; every frame is
    recorded; replaying the recording makes the same decision."""
    sandbox_queue(sandbox)
    agent = sandbox.world.create_user("Alice Agent").id
    cfg = write_config(tmp_path, sandbox.base_url, rules=FLAGGED_RULE)
    record = tmp_path / "frames.jsonl"
    d = DaemonProcess(cfg, credentials_env(sandbox), tmp_path, args=("--observe", "--record", str(record)))
    await d.start()
    try:
        body = await d.wait_ready()
        assert body["details"]["mode"] == "observe"
        w = sandbox.world
        conv = w.start_call(SALES)
        w.connect_agent(conv.id, agent)
        ext = w.add_external(conv.id, "tel:+14155550123")
        w.set_attributes(conv.id, ext.id, {"complianceFlag": "true"})
        await wait_until(lambda: [r for r in audit_records(tmp_path) if r["type"] == "outcome"], 10,
                         "the observed outcome")
        d.send(signal.SIGTERM)
        assert await d.wait_exit() == 0
    finally:
        await d.close()
    records = audit_records(tmp_path)
    decision = next(r for r in records if r["type"] == "decision")
    assert (decision["rule"], decision["participant_id"], decision["mode"]) == ("flagged-party", ext.id, "observe")
    assert [(r["outcome"], r["participant_id"]) for r in records if r["type"] == "outcome"] == [("observed", ext.id)]
    assert sandbox.journal.patches() == [] and conv.party(ext.id).state == "connected"

    frames = read_jsonl(record)
    assert len(frames) >= 4 and all(isinstance(f["ts"], float) and isinstance(f["raw"], str) for f in frames)
    assert sum(1 for f in frames if SALES in f["raw"] and conv.id in f["raw"]) >= 4
    code, out, err = await run_cli("replay", "--config", str(cfg), str(record))
    assert code == 0, err
    decided = [ln for ln in out.splitlines() if " flagged-party " in ln]
    assert len(decided) == 1 and f"conversation={conv.id} participant={ext.id} " in decided[0]


async def test_run_with_the_ops_port_taken_exits_2_without_a_traceback(tmp_path: Path) -> None:
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        cfg = write_config(tmp_path, "http://127.0.0.1:9")
        cfg.write_text(cfg.read_text().replace("listen: 127.0.0.1:0", f"listen: 127.0.0.1:{port}"))
        code, out, err = await run_cli("run", "--config", str(cfg),
                                       env={"GENESYSCLOUD_OAUTHCLIENT_ID": "id", "GENESYSCLOUD_OAUTHCLIENT_SECRET": "s",
                                            "PATH": "/usr/bin:/bin"})
    assert code == 2, err
    assert "Traceback" not in err
    line = cfg.read_text().splitlines().index(f"  listen: 127.0.0.1:{port}") + 1
    assert re.search(rf"^{re.escape(str(cfg))}:{line}:\d+: ops\.listen 127\.0\.0\.1:{port}: cannot listen: .*"
                     r"address already in use", err, re.M), err


async def test_run_with_an_unwritable_record_file_exits_2(tmp_path: Path) -> None:
    cfg = write_config(tmp_path, "http://127.0.0.1:9")
    target = tmp_path / "no-such-folder" / "frames.jsonl"
    code, _, err = await run_cli("run", "--config", str(cfg), "--record", str(target))
    assert code == 2
    assert err == f"confguard: cannot open the --record file {target}: No such file or directory\n"


async def test_record_file_is_complete_while_running_and_after_a_kill(sandbox: Sandbox, tmp_path: Path) -> None:
    """Frames reach the --record file as they arrive (a recording matters most when the
    daemon dies: systemd's watchdog sends SIGKILL), so it can be replayed at any time."""
    sandbox.heartbeat_interval = 3600.0  # no heartbeat frames pushing earlier ones out
    sandbox_queue(sandbox)
    agent = sandbox.world.create_user("Alice Agent").id
    cfg = write_config(tmp_path, sandbox.base_url, rules=FLAGGED_RULE)
    record = tmp_path / "frames.jsonl"
    d = DaemonProcess(cfg, credentials_env(sandbox), tmp_path, args=("--record", str(record)))
    await d.start()
    try:
        await d.wait_ready()
        w = sandbox.world
        conv = w.start_call(SALES)
        w.connect_agent(conv.id, agent)
        ext = w.add_external(conv.id, "tel:+14155550123")
        w.set_attributes(conv.id, ext.id, {"complianceFlag": "true"})
        await wait_until(lambda: conv.party(ext.id).state == "disconnected", 10, "the removal")
        published = sum(1 for e in sandbox.journal.events if e.conversation_id == conv.id)
        await wait_until(lambda: sum(1 for f in read_jsonl(record) if conv.id in f["raw"]) >= published, 10,
                         "every published event in the record file while the daemon runs")
        d.send(signal.SIGKILL)
        await d.wait_exit()
    finally:
        await d.close()
    assert record.read_bytes().endswith(b"\n")
    code, out, err = await run_cli("replay", "--config", str(cfg), str(record))
    assert code == 0, err
    assert sum(1 for ln in out.splitlines() if f" flagged-party  conversation={conv.id} participant={ext.id} " in ln) == 1


def test_a_reader_that_goes_away_stops_output_without_a_traceback() -> None:
    """`confguard check --schema | head -1`: the pipe closes before the command writes."""
    proc = subprocess.Popen([sys.executable, "-m", "daemon", "check", "--schema"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=REPO)
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.close()  # long before the interpreter has imported the CLI
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=60) == 141
    assert "Traceback" not in err and "BrokenPipe" not in err, err
