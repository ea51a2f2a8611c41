"""The sandbox's driver can be used from its documentation alone: every operation is
described (`OPS`: fields, answer, example), `GET /sandbox/ops` and `confguard sandbox --help`
list them, an unknown operation answers with the list, and every documented example body
works against the default world. Over real sockets on 127.0.0.1."""

from __future__ import annotations

import json
from typing import Any

import aiohttp
import pytest

from daemon.commands.cli import main
from daemon.sandbox import Sandbox
from daemon.sandbox.scenario import OPS, _ops, load_scenario


def test_every_implemented_operation_is_described() -> None:
    sb = Sandbox("127.0.0.1", 0)
    assert [s.name for s in OPS] and {s.name for s in OPS} == set(_ops(sb))
    assert len({s.name for s in OPS}) == len(OPS)


async def test_unknown_operation_answers_with_the_list(sandbox: Sandbox) -> None:
    async with aiohttp.ClientSession() as s:
        async with s.post(sandbox.base_url + "/sandbox/help", json={}) as r:
            assert r.status == 404
            body = await r.json()
    assert "unknown sandbox op 'help'" in body["message"]
    for spec in OPS:
        assert spec.name in body["message"]


async def test_ops_route_describes_each_operation(sandbox: Sandbox) -> None:
    async with aiohttp.ClientSession() as s:
        async with s.get(sandbox.base_url + "/sandbox/ops") as r:
            assert r.status == 200
            listed = (await r.json())["operations"]
    assert [o["name"] for o in listed] == [s.name for s in OPS]
    for o in listed:
        assert o["path"] == f"/sandbox/{o['name']}" and o["summary"] and o["answers"]
        assert all({"name", "required", "meaning"} <= set(f) for f in o["fields"])


async def test_every_example_body_works(sandbox: Sandbox) -> None:
    """The examples of docs/sandbox.md (the same `OPS`), placeholders filled with ids of the
    default world, in an order where each finds what it needs."""
    w = sandbox.world
    load_scenario(w, "default")  # what `confguard sandbox` starts with
    queue = next(q.id for q in w.queues.values() if q.name == "Sales")
    agent = next(u.id for u in w.users.values() if u.name == "Alice Agent")
    ids: dict[str, str] = {"<queue id>": queue, "<user id>": agent}
    examples = {s.name: s.example for s in OPS}
    last = ("touch", "hangup", "end_call", "forget_call")
    order = [s.name for s in OPS if s.name not in last] + list(last)

    def fill(value: Any) -> Any:
        if isinstance(value, str):
            return ids.get(value, value)
        if isinstance(value, dict):
            return {k: fill(v) for k, v in value.items()}
        return value

    async with aiohttp.ClientSession() as s:
        for name in order:
            body = fill(examples[name])
            assert "<" not in json.dumps(body), (name, body)
            async with s.post(f"{sandbox.base_url}/sandbox/{name}", json=body) as r:
                answer = await r.json()
                assert r.status == 200, (name, answer)
            result = answer["result"]
            if name == "start_call":
                ids["<call id>"] = result["id"]
            elif name == "connect_agent":
                ids["<agent participant id>"] = result["id"]
            elif name == "add_external":
                ids["<participant id>"] = result["id"]
    assert ids["<call id>"] not in {c for c in w.calls}  # forget_call, the last one, took it


def test_help_lists_every_operation_and_field(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["sandbox", "--help"]) == 0
    out = capsys.readouterr().out
    for spec in OPS:
        line = next(x for x in out.splitlines() if x.strip().startswith(spec.name + " {"))
        for f in spec.fields:
            assert f.name in line, (spec.name, f.name)
    assert "curl" in out and "docs/sandbox.md" in out
