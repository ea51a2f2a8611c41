"""The notification stream's settings as one value (like httpx's `Timeout`/`Limits`):
`StreamSettings`, given whole to `StreamManager(..., settings=...)`. Times are seconds."""

from __future__ import annotations

from dataclasses import dataclass

from daemon.genesys.retry import RetryPolicy
from daemon.genesys.scope import MAX_CHANNELS, MAX_TOPICS_PER_CHANNEL
from daemon.genesys.stream.supervisor import RECONNECT_RETRY, SupervisorSettings


@dataclass(frozen=True, slots=True)
class StreamSettings:
    """How the stream keeps its sockets.

    - `heartbeat_interval`: the service's heartbeat period; `heartbeat_timeout_factor` x it
      with no frame -> a ping; no frame within `ping_timeout` (default: half the heartbeat,
      0.2 to 10 s) -> the socket is dropped and reconnected.
    - `channel_refresh_before`: a channel is replaced (make-before-break) this long before
      it expires.
    - `backoff=(initial, cap)`: the reconnect back-off's times (`RECONNECT_RETRY`'s shape);
      `retry`, when given, replaces that whole `RetryPolicy` (its `max_attempts` is ignored:
      reconnects never stop). `healthy_after`: a socket up this long (or one heartbeat)
      resets the back-off.
    - `handover_overlap`: how long a replaced socket still delivers after its successor is
      up (until the successor's first frame at most).
    - `per_channel` topics per channel, `max_channels` channels (Genesys' limits).
    - `connect_timeout` (WebSocket handshake), `stop_timeout` (unsubscribing at stop),
      `max_frame_bytes` (a larger frame ends the socket).
    - `compression`: offer permessage-deflate (RFC 7692) in the handshake. Off: the frames
      are small JSON (a few KB each), and compressing each one at the server and inflating
      it here is time spent between the event and the removal (about 0.2 ms a frame in the
      burst bench, bench/RESULTS.md issue 22). Turn it on where the link, not the
      latency, is what is short (config: `subscriptions.compression`).
    """

    heartbeat_interval: float = 30.0
    heartbeat_timeout_factor: float = 2.0
    ping_timeout: float | None = None
    channel_refresh_before: float = 3600.0
    backoff: tuple[float, float] = (0.5, 30.0)
    retry: RetryPolicy | None = None
    healthy_after: float = 10.0
    handover_overlap: float = 2.0
    per_channel: int = MAX_TOPICS_PER_CHANNEL
    max_channels: int = MAX_CHANNELS
    connect_timeout: float = 10.0
    stop_timeout: float = 5.0
    max_frame_bytes: int = 16 * 1024 * 1024
    compression: bool = False

    @property
    def effective_ping_timeout(self) -> float:
        if self.ping_timeout is not None:
            return self.ping_timeout
        return min(10.0, max(0.2, self.heartbeat_interval / 2))

    def supervisor(self) -> SupervisorSettings:
        """The settings of each shard's `ShardSupervisor`."""
        ping_timeout = self.effective_ping_timeout
        policy = self.retry or RECONNECT_RETRY.replace(initial=self.backoff[0], cap=self.backoff[1])
        return SupervisorSettings(
            silence_limit=self.heartbeat_timeout_factor * self.heartbeat_interval,
            ping_timeout=ping_timeout, healthy_after=self.healthy_after,
            channel_refresh_before=self.channel_refresh_before,
            retry=policy.replace(max_attempts=None),
            tick=max(0.05, min(1.0, self.heartbeat_interval / 4, ping_timeout / 2)))
