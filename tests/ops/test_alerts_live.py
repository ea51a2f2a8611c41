"""The alert rules against what a running daemon really exports: confguard runs against the
sandbox, Genesys answers a removal with 403, and the series scraped from /metrics are fed
to `promtool test rules`, which must fire ConfguardRemovalForbidden with those exact labels
(and keep ConfguardSafetyValveTripped / ConfguardNotReady quiet)."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path
from typing import Any

import yaml

from _daemon_harness import DaemonProcess, credentials_env, sample, sandbox_queue, write_config
from _promtool import promtool
from daemon.sandbox import Sandbox

ALERTS = Path(__file__).resolve().parents[2] / "ops" / "prometheus" / "confguard-alerts.yml"
INSTANCE = "cg1:9464"
AGENT_ID = "a11ce000-0000-4000-8000-00000000000a"


def _series(metrics: str, name: str, **labels: str) -> list[str]:
    """The exposition's series (`name{...}`) of `name` whose labels include `labels`."""
    out = []
    for line in metrics.splitlines():
        head = line.rpartition(" ")[0]
        if head.split("{", 1)[0] != name:
            continue
        got = dict(re.findall(r'(\w+)="([^"]*)"', head))
        if all(got.get(k) == v for k, v in labels.items()):
            out.append(head)
    return out


def _with_instance(series: str) -> str:
    name, _, rest = series.partition("{")
    return f'{name}{{instance="{INSTANCE}",{rest}' if rest else f'{name}{{instance="{INSTANCE}"}}'


def _annotations(alert: str, labels: dict[str, str]) -> dict[str, str]:
    doc = yaml.safe_load(ALERTS.read_text(encoding="utf-8"))
    rule = next(r for g in doc["groups"] for r in g["rules"] if r["alert"] == alert)
    return {k: re.sub(r"\{\{ \$labels\.(\w+) \}\}", lambda m: labels.get(m.group(1), ""), v)
            for k, v in rule["annotations"].items()}


async def test_a_real_403_fires_the_forbidden_alert(sandbox: Sandbox, tmp_path: Path) -> None:
    queue = sandbox_queue(sandbox)
    w = sandbox.world
    if AGENT_ID not in w.users:
        w.create_user("Alice Agent", AGENT_ID)
    config = write_config(tmp_path, sandbox.base_url, queues=[queue])
    d = DaemonProcess(config, credentials_env(sandbox), tmp_path)
    await d.start()
    try:
        await d.wait_ready()
        sandbox.faults.add_burst("PATCH", r"/participants/[^/]+$", 403, 1)
        conv = w.start_call(queue)
        w.connect_agent(conv.id, AGENT_ID)
        ext = w.add_external(conv.id, "tel:+14155550123")
        w.set_attributes(conv.id, ext.id, {"complianceFlag": "true"})
        metrics = await d.wait_metrics(lambda t: _series(t, "confguard_api_requests_total",
                                                         method="PATCH", status="403"),
                                       timeout=20)
    finally:
        sandbox.faults.reset()
        await d.close()

    forbidden = _series(metrics, "confguard_api_requests_total", method="PATCH", status="403")
    assert len(forbidden) == 1, forbidden
    valve = _series(metrics, "confguard_safety_valve_tripped")
    running = _series(metrics, "confguard_daemon_state", confguard_daemon_state="running")
    assert valve and running and sample(metrics, "confguard_daemon_state",
                                        confguard_daemon_state="running") == 1.0
    labels = dict(re.findall(r'(\w+)="([^"]*)"', forbidden[0]))
    labels["instance"] = INSTANCE
    tests: dict[str, Any] = {
        "rule_files": [str(ALERTS)],
        "evaluation_interval": "1m",
        "tests": [{
            "interval": "1m",
            "input_series": [
                {"series": _with_instance(forbidden[0]), "values": "0 0 1 1 1"},
                {"series": _with_instance(valve[0]), "values": "0x4"},
                {"series": _with_instance(running[0]), "values": "1x4"},
            ],
            "alert_rule_test": [
                {"eval_time": "3m", "alertname": "ConfguardRemovalForbidden", "exp_alerts": [{
                    "exp_labels": {**labels, "severity": "critical"},
                    "exp_annotations": _annotations("ConfguardRemovalForbidden", labels)}]},
                {"eval_time": "3m", "alertname": "ConfguardSafetyValveTripped", "exp_alerts": []},
                {"eval_time": "3m", "alertname": "ConfguardNotReady", "exp_alerts": []},
            ],
        }],
    }
    path = tmp_path / "live.test.yml"
    path.write_text(yaml.safe_dump(tests, sort_keys=False), encoding="utf-8")
    res = subprocess.run([promtool(), "test", "rules", str(path)], capture_output=True, text=True,
                         timeout=60)
    assert res.returncode == 0, res.stdout + res.stderr
