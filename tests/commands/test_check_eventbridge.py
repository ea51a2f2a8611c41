"""`confguard check --online` with an `eventbridge:` section: the SQS queue (a real moto
server on 127.0.0.1) is checked, its visibility timeout and redrive policy named."""

from __future__ import annotations

from pathlib import Path

from _daemon_harness import SALES, credentials_env, run_cli, write_config
from _moto import MotoServer, moto_server, unique_name  # noqa: F401

from daemon.sandbox import Sandbox


def _config(sb: Sandbox, folder: Path, moto: MotoServer, url: str) -> Path:
    sb.world.create_queue("Sales", SALES)
    return write_config(folder, sb.base_url, extra_top=(
        f"eventbridge:\n  queue_url: {url}\n  endpoint_url: {moto.endpoint_url}\n"))


async def test_online_names_visibility_timeout_and_redrive_policy(
        sandbox: Sandbox, moto_server: MotoServer, tmp_path: Path) -> None:  # noqa: F811
    dlq = moto_server.create_queue(unique_name("check-dlq"))
    url = moto_server.create_queue(unique_name("check"), visibility_timeout=45,
                                   dead_letter_arn=moto_server.queue_arn(dlq), max_receive_count=4)
    cfg = _config(sandbox, tmp_path, moto_server, url)
    code, out, err = await run_cli("check", "--config", str(cfg), "--online", env=credentials_env(sandbox))
    assert code == 0, out + err
    assert f"ok: eventbridge queue {url} exists" in out
    assert "ok: eventbridge queue visibility timeout 45 s" in out
    assert f"redrive policy: dead-letter queue {moto_server.queue_arn(dlq)}, maxReceiveCount 4" in out
    assert out.rstrip().endswith("ok: online check passed; subscriptions removed again")
    assert "testing" not in out + err  # the (fake) AWS secret never shows


async def test_online_warns_without_a_dead_letter_queue_and_fails_for_a_missing_queue(
        sandbox: Sandbox, moto_server: MotoServer, tmp_path: Path) -> None:  # noqa: F811
    url = moto_server.create_queue(unique_name("check"))
    cfg = _config(sandbox, tmp_path / "a", moto_server, url)
    code, out, err = await run_cli("check", "--config", str(cfg), "--online", env=credentials_env(sandbox))
    assert code == 0, out + err
    assert "WARN: eventbridge queue has no redrive policy" in out
    missing = url.rsplit("/", 1)[0] + "/" + unique_name("nope")
    cfg = write_config(tmp_path / "b", sandbox.base_url, extra_top=(
        f"eventbridge:\n  queue_url: {missing}\n  endpoint_url: {moto_server.endpoint_url}\n"))
    code, out, err = await run_cli("check", "--config", str(cfg), "--online", env=credentials_env(sandbox))
    assert code == 1, out + err
    assert f"FAIL: eventbridge queue {missing}: not_found" in out
