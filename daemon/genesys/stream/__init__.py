"""The notification stream: channels, subscriptions, WebSockets, watchdog and self-healing.

`StreamManager(client, topics, on_message=..., on_gap=..., settings=StreamSettings(...))`
keeps every topic subscribed on
one channel per shard of at most 1000 topics (`daemon.genesys.scope.shard`), one WebSocket per
channel, for as long as it runs.

Lifecycle:
- `await start()`: create the channels one after another (Genesys throttles parallel channel
  creation), subscribe each shard with `PUT ...?ignoreErrors=true`, then read the set back
  with `GET`. Any topic that is Rejected (or missing from the read-back) raises
  `SubscriptionError` naming every such topic, its `rejectionReason` and
  `missingPermissions`: a silent hole in compliance coverage is worse than not starting.
  Then one WebSocket per channel is opened.
- `await run()`: returns after `stop()`; raises only if supervision itself failed (a bug),
  and the stream is then not ready. A topic refused when re-subscribing after start (a
  queue deleted, a permission withdrawn) is not fatal, since dropping every topic would be
  worse, but it is loud: logged as an error, listed in `rejected_topics`, and `ready` stays
  False until a later re-subscription (each reconnect/handover, or a reload) succeeds.
- `await stop()`: closes the sockets and deletes the channels' subscriptions (best effort,
  bounded by `stop_timeout` seconds).

Hot path: `on_message(raw, received_at) -> Message` is called synchronously for EVERY data
frame, with the frame exactly as received and `clock()` at receipt (epoch seconds), and
returns the frame parsed (`daemon.core.events.Message`: the consumer, the engine, parses
each frame once). The stream reads the control messages it needs (heartbeat,
`socket_closing`, `"result": "404"`) from that return value and parses nothing itself.
Every frame, whatever it is, counts as a sign of life for the watchdog.

Self-healing (per shard): every decision below is made by a sans-I/O `ShardSupervisor`
(`daemon.genesys.stream.supervisor`: events and `now` in, actions out, unit-tested without
sockets or a clock); the thin asyncio layer that feeds it and carries out its actions is
`connection` (`StreamManager`, the public face), `driver` (one task per shard),
`subscriptions` (channels, subscribing with read-back, a reload's update with roll-back)
and `pump` (the sockets); every timing and limit is one `settings.StreamSettings`.
- Watchdog: no frame for `heartbeat_timeout_factor x heartbeat_interval` seconds -> send
  `{"message": "ping"}`; no frame at all within `ping_timeout` -> drop the socket and
  reconnect (gap reason `heartbeat_timeout`).
- Reconnect: jittered, capped exponential back-off (`backoff=(initial, max)`, a
  `daemon.genesys.retry.RetryPolicy`; `retry=` replaces it whole). The first
  retry after a healthy connection is immediate. The back-off is NOT reset by a successful
  handshake, only once a connection has proved healthy (a heartbeat arrived, or it stayed
  up `healthy_after` seconds), so a server that accepts and drops at once cannot cause a
  hot loop.
- Before reconnecting to the same channel, `HEAD` checks it still exists. 404 (or a
  `"result": "404"` frame, or a 404 on the WebSocket handshake) -> the channel is gone:
  invalidate the token, create a new channel, re-subscribe (reasons `channel_gone`,
  `channel_expired` when past its expiry, `token_expired` when the token was at fault or a
  401 came back).
- `v2.system.socket_closing` and the channel refresh (`expires - channel_refresh_before`)
  are make-before-break handovers: a NEW channel with the same topics is created,
  subscribed and connected while the old socket still delivers; only then is the old one
  retired (after a short overlap, or its first frame on the new socket). Events seen on both
  are duplicates the state store drops. If the old socket closed before the new one was
  up, events may have been lost, and only then is `on_gap` called.
- After every reconnect or replacement where events may have been missed, `on_gap(reason)`
  is called (after the new socket is up, so a resync it triggers sees the new stream).

`ready` is True when every shard has a live socket, no topic is refused and no gap is open. A gap opens when
`on_gap` is called and is closed by `mark_resynced()` (the daemon calls it after a
completed resync).

`update_topics(new)` (config reload) subscribes added topics (POST to shards with room, new
shards/channels when needed) and re-PUTs shards that lost topics, without touching
unchanged shards or reconnecting anything. It is all or nothing: a refused topic or a
failed request rolls every shard back and raises `SubscriptionError`. Added topics open a
gap (`topics_added`): calls already live on a newly covered queue must be found by a resync.
"""

from daemon.genesys.stream.connection import StreamManager
from daemon.genesys.stream.settings import StreamSettings
from daemon.genesys.stream.subscriptions import StreamClient, TokensLike, TopicStateLike
from daemon.genesys.stream.supervisor import (
    RECONNECT_RETRY,
    Backoff,
    ChannelLike,
    ShardSupervisor,
    SupervisorSettings,
)

__all__ = [
    "RECONNECT_RETRY", "Backoff", "ChannelLike", "ShardSupervisor", "StreamClient",
    "StreamManager", "StreamSettings", "SupervisorSettings", "TokensLike", "TopicStateLike",
]
