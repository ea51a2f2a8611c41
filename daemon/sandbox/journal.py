"""What the sandbox saw and did: every request received and every event published.

Each record has `time` (time.time(), epoch seconds) and `perf_ns` (time.perf_counter_ns())
so tests can assert which PATCH calls arrived and benchmarks can measure event-to-PATCH
latency within one process. The journal is bounded (oldest records dropped past `maxlen`).
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import asdict, dataclass
from typing import Any


@dataclass(slots=True, frozen=True)
class RequestRecord:
    seq: int
    time: float
    perf_ns: int
    method: str
    path: str
    query: dict[str, str]
    body: Any
    status: int
    client_id: str | None
    content_type: str | None = None


@dataclass(slots=True, frozen=True)
class EventRecord:
    seq: int
    time: float
    perf_ns: int
    conversation_id: str
    correlation_id: str
    topics: tuple[str, ...]
    sockets: int
    """How many open sockets the event was queued to (0: nobody listening, event lost)."""


class Journal:
    def __init__(self, maxlen: int = 200_000) -> None:
        self.requests: deque[RequestRecord] = deque(maxlen=maxlen)
        self.events: deque[EventRecord] = deque(maxlen=maxlen)
        self._req_seq = 0
        self._ev_seq = 0
        #: (method, path) of every request as it arrives (body read), just before any
        #: injected latency starts and before its answer (`requests` records it once
        #: answered): a test can see that a request it holds has come in and is held.
        self.arrivals: deque[tuple[str, str]] = deque(maxlen=maxlen)

    def request(self, method: str, path: str, query: dict[str, str], body: Any, status: int,
                client_id: str | None, *, at: float | None = None,
                perf_ns: int | None = None, content_type: str | None = None) -> RequestRecord:
        self._req_seq += 1
        r = RequestRecord(self._req_seq, time.time() if at is None else at,
                          time.perf_counter_ns() if perf_ns is None else perf_ns,
                          method, path, query, body, status, client_id, content_type)
        self.requests.append(r)
        return r

    def event(self, conversation_id: str, correlation_id: str, topics: tuple[str, ...],
              sockets: int, at: float, perf_ns: int) -> EventRecord:
        self._ev_seq += 1
        e = EventRecord(self._ev_seq, at, perf_ns, conversation_id, correlation_id, topics,
                        sockets)
        self.events.append(e)
        return e

    def find(self, method: str | None = None, path_contains: str | None = None,
             status: int | None = None) -> list[RequestRecord]:
        return [r for r in self.requests
                if (method is None or r.method == method)
                and (path_contains is None or path_contains in r.path)
                and (status is None or r.status == status)]

    def patches(self, conversation_id: str | None = None) -> list[RequestRecord]:
        """PATCH .../participants/{pid} requests (disconnects and other state changes)."""
        return [r for r in self.requests if r.method == "PATCH" and "/participants/" in r.path
                and not r.path.endswith("/attributes")
                and (conversation_id is None or f"/calls/{conversation_id}/" in r.path)]

    def clear(self) -> None:
        self.requests.clear()
        self.events.clear()
        self.arrivals.clear()

    def as_dict(self, since_request: int = 0, since_event: int = 0) -> dict[str, Any]:
        return {"requests": [asdict(r) for r in self.requests if r.seq > since_request],
                "events": [{**asdict(e), "topics": list(e.topics)}
                           for e in self.events if e.seq > since_event]}
