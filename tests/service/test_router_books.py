"""EventRouter.step: the enforcer first, the books after. When a step starts a PATCH task,
its books (`StepAccounts.note`: gauges, coverage, rejection lines, latency) run on the
loop's next iteration, after that task's first step has begun writing the PATCH; a step
that starts none is booked at once. Over real sockets: the client talks to the sandbox."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson

from _wait import wait_until
from daemon.config import Credentials, GenesysSettings, load_lists, parse_config
from daemon.core.engine import Engine
from daemon.core.rules import RuleEngine, compile_rules
from daemon.core.state import CallStore
from daemon.genesys.api import GenesysClient
from daemon.genesys.ratelimit import RequestLimiter
from daemon.sandbox import Sandbox
from daemon.service.audit import AuditLog
from daemon.service.enforcer import Enforcer
from daemon.service.metrics import Metrics
from daemon.service.router import EventRouter, StepAccounts

RULES = ("subscriptions: {queues: [Sales]}\n"
         "rules:\n  - name: flagged\n    when: {purpose: customer, attributes.complianceFlag: 'true'}\n"
         "    action: disconnect\n"
         "audit: {path: audit.jsonl, sync_before_patch: false}\nops: {enabled: false}\n")


class BookedAccounts(StepAccounts):
    """StepAccounts that record, at each `note`, how far each running PATCH had got
    (`written`: the attempt whose PATCH the client last began to write; 0: none)."""

    enforcer: Enforcer | None = None
    booked: list[dict[Any, int]]

    def note(self, step: Any, **kw: Any) -> None:
        assert self.enforcer is not None
        self.booked.append({key: a.written for key, a in self.enforcer._actions.items()})
        super().note(step, **kw)


async def test_a_step_that_starts_a_patch_is_booked_after_the_patch_is_on_its_way(
        sandbox: Sandbox, tmp_path: Path) -> None:
    w = sandbox.world
    sales = w.create_queue("Sales").id
    conv, quiet = w.start_call(sales), w.start_call(sales)
    customer = conv.participants[0]

    cfg = parse_config(RULES, file=str(tmp_path / "config.yaml"), base_dir=tmp_path)
    engine = Engine(RuleEngine(compile_rules(cfg, load_lists(cfg))), CallStore())
    metrics = Metrics()
    settings = GenesysSettings(api_base_url=sandbox.base_url, login_base_url=sandbox.base_url,
                               max_retries=0)
    audit = AuditLog(tmp_path / "audit.jsonl", max_bytes=1 << 20)
    audit.open()
    async with GenesysClient(settings, Credentials(sandbox.client_id, sandbox.client_secret),
                             limiter=RequestLimiter(60000)) as client:
        await client.get_call(conv.id)  # a token and a warm connection: the PATCH goes at once
        accounts = BookedAccounts(engine, metrics)
        accounts.booked = []
        enforcer = Enforcer(client, audit, engine, mode="enforce", metrics=metrics,
                            note_step=accounts.note_rest, sync_before_patch=False,
                            confirm_timeout=0.2)
        accounts.enforcer = enforcer
        router = EventRouter(engine, enforcer, accounts, client, metrics, on_gap=lambda r: None)

        def frame(c: Any) -> bytes:
            return orjson.dumps({"topicName": c.topics()[0], "eventBody": c.event_body()})

        # No decision: booked at once.
        router.frame(frame(quiet), 1.0, source="websocket")
        assert accounts.booked == [{}]

        w.set_attributes(conv.id, customer.id, {"complianceFlag": "true"})
        router.frame(frame(conv), 2.0, source="websocket")
        assert len(accounts.booked) == 1, "booked before the PATCH task ran"
        await wait_until(lambda: len(accounts.booked) == 2, 10.0, "the books")
        assert accounts.booked[1] == {(conv.id, customer.id): 1}
        assert metrics.tracked_calls._value.get() == 2
        await wait_until(lambda: sandbox.journal.patches(conv.id), 10.0, "the PATCH")
        await enforcer.drain(5.0)
    audit.close()
