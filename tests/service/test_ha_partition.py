"""The deposed leader, over real sockets: node A reaches PostgreSQL through a TCP proxy
that is cut (a partition) and Genesys (the sandbox) through a proxy that adds 0.3 s each
way; node B reaches both directly. While A loses its lease and B takes over, 24 parties
are flagged one after another. Then: every party is removed, no PATCH from A arrives
after B's take-over, and the two audit trails agree with the sandbox on who removed whom.

The timing assumption under test (docs/ha.md): `ha.safety_margin` (1 s here) exceeds the
one-way delay to Genesys (0.3 s), so a PATCH fully written before A's deadline reaches
Genesys before A's lease expires in the database, and B cannot take it over before that.
"""

from __future__ import annotations

import asyncio
import time
from datetime import datetime
from pathlib import Path
from typing import Any

from _ha_harness import audit, flag, flagged_call, ha_daemon, new_lease, ok_patches, wait_ops, wait_role, wait_until
from _postgres import PostgresServer, postgres  # noqa: F401  (fixture)
from _tcp_proxy import TcpProxy
from daemon.sandbox import Sandbox

TAKEOVER = 3.0
MARGIN = 1.0
DELAY = 0.3
PARTIES = 24


def _ts(record: dict[str, Any]) -> float:
    return datetime.fromisoformat(str(record["timestamp"]).replace("Z", "+00:00")).timestamp()


async def test_no_patch_from_the_deposed_leader_after_the_take_over(
        sandbox: Sandbox, postgres: PostgresServer, tmp_path: Path) -> None:  # noqa: F811
    lease = new_lease()
    pg_proxy = TcpProxy("127.0.0.1", postgres.port)
    api_proxy = TcpProxy("127.0.0.1", int(sandbox.base_url.rsplit(":", 1)[1]))
    await pg_proxy.start()
    await api_proxy.start()
    a = ha_daemon(sandbox, postgres, tmp_path / "a", "host-a", lease, takeover=TAKEOVER,
                  dsn=postgres.dsn.replace(f":{postgres.port}/", f":{pg_proxy.port}/"))
    b = ha_daemon(sandbox, postgres, tmp_path / "b", "host-b", lease, takeover=TAKEOVER)
    for d in (a, b):
        text = d.config.read_text().replace("  node: host-", f"  safety_margin: {MARGIN:g}s\n  node: host-")
        d.config.write_text(text)
    a.config.write_text(a.config.read_text().replace(
        sandbox.base_url, f"http://127.0.0.1:{api_proxy.port}"))
    agent = sandbox.world.create_user("Agent").id
    try:
        await a.start()
        await wait_ops(a)
        await wait_role(a, "leader", 30)
        await b.start()
        await wait_ops(b)
        await b.wait_http("/readyz", 200, 30)
        await wait_role(b, "standby", 15)
        assert 'confguard_ha_send_margin_seconds 1.0' in await a.metrics()
        calls = [flagged_call(sandbox, agent) for _ in range(PARTIES)]
        await asyncio.sleep(1.0)  # both hold every call in memory

        api_proxy.delay = DELAY  # A's path to Genesys is slow from now on ...
        pg_proxy.cut = True  # ... and A is cut off from the database
        cut_at = time.time()
        for conv, cust in calls:  # flagged across A's last moments, the gap and B's term
            flag(sandbox, conv, cust)
            await asyncio.sleep(0.2)
        await wait_until(lambda: b.events("ha_became_leader"), 15, "B's take-over")
        await wait_until(lambda: all(ok_patches(sandbox, c, p) for c, p in calls), 30,
                         "every party removed")
        await asyncio.sleep(2 * DELAY + 1.0)  # anything of A's still on the way has arrived
    finally:
        pg_proxy.cut = False
        await a.close()
        await b.close()
        await pg_proxy.stop()
        await api_proxy.stop()

    took_over = _ts(b.events("ha_became_leader")[-1])
    assert took_over > cut_at
    a_patches = [r for r in sandbox.journal.patches() if r.client_id == "client-host-a" and r.time >= cut_at]
    late = [(r.path, round(r.time - took_over, 3)) for r in a_patches if r.time >= took_over - 0.05]
    assert late == [], late  # nothing of the deposed leader's lands after the take-over

    node_of = {"client-host-a": "host-a", "client-host-b": "host-b"}
    audits = {"host-a": audit(a), "host-b": audit(b)}
    removed_by = {"host-a": 0, "host-b": 0}
    for conv, cust in calls:
        by_journal = {node_of[r.client_id] for r in ok_patches(sandbox, conv, cust)}
        by_audit = {node for node, records in audits.items()
                    if any(r.get("type") == "outcome" and r.get("participant_id") == cust.id
                           and r.get("outcome") == "disconnected" for r in records)}
        assert len(by_journal) == 1 and by_journal == by_audit, (cust.id, by_journal, by_audit)
        removed_by[by_journal.pop()] += 1
    assert removed_by["host-b"] >= 1, removed_by  # B took over and acted
    print(f"removed by A before the take-over: {removed_by['host-a']}, by B: {removed_by['host-b']}; "
          f"A's PATCHes after the cut: {len(a_patches)}, last {max((r.time for r in a_patches), default=cut_at) - took_over:+.3f} s "
          f"from the take-over; abandoned: {len(a.events('api_request_abandoned'))}")
