"""The tamper-evident audit trail: JSON Lines with a SHA-256 hash chain, rotation and fsync.

Every line is one record, serialised canonically (orjson, sorted keys, compact, no trailing
spaces) and ending in `\\n`. `AuditLog.write` adds four fields:

- `seq`: 1, 2, 3, ... across rotations (never restarts);
- `time`: when the record was written, ISO-8601 UTC with milliseconds (`...T12:00:00.123Z`);
- `prev_hash`: the `hash` of the previous record (64 zeros for the very first record);
- `hash`: hex SHA-256 of the canonical serialisation of the record WITHOUT `hash`.

Because `hash` covers `prev_hash`, changing, inserting or deleting any record breaks the
chain at that point, and `verify` names the first `file:line` where it breaks. (Deleting the
last records of the newest file cannot be told from "they were never written"; ship the
trail to a separate store, or compare `seq` with the `confguard_audit_records_total`
metric, if that matters.)

Durability: `write` hands the line to the OS before it returns (so a crash of the process
loses nothing; the caller writes the decision record BEFORE sending the disconnect).
`fdatasync` (surviving a power loss) happens within `fsync_interval` seconds, from
`run_syncer` in a worker thread so the event loop never waits on the disk, and on `close`.
`await wait_durable()` returns once every record written before the call is on disk: the
enforcer awaits it before each removal's first PATCH. Concurrent waiters share one
fdatasync (group commit): decisions written while a sync runs are covered by the next one.
While the disk is fast (the last fdatasync took under `INLINE_SYNC_MAX`, 2 ms), that sync
runs on the loop itself, without a worker thread's hand-offs (queue, GIL, the loop's
wake-up): the wait before the PATCH went from 0.89 to 0.65 ms p50 in the burst bench
(bench/RESULTS.md, issue 22); a slower disk goes back to the worker thread, so the loop
never stalls for long.

No silent loss: a torn last line (a write cut by a power loss) is moved to a
quarantine file beside the trail (`<file>.quarantine.<YYYYmmddTHHMMSSZ>.<offset>`) and the
chain continues with a `type: truncated` record naming the file, the offset, the length
and SHA-256 of the quarantined bytes. The writer never reuses a `seq`: `open` takes the
highest of the trail's last seq and the seq recorded in the checkpoint state file beside
the trail (`<stem>.checkpoint.json`, written by `daemon.service.checkpoint`); when the
trail holds less than that (it was cut), a `type: gap` record says which seqs are missing
(`skipped: [first, last]`), carries the seq after them, and `verify` reports the gap.

Rotation: when the next line would take the live file past `max_bytes`, the live file is
renamed to `<stem>.<YYYYmmddTHHMMSSZ>.<last seq, 12 digits>.jsonl` in the same folder and
a new live file is started; the chain simply continues.

This module is not part of the sans-I/O core; it may use asyncio.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import re
import threading
import time
from collections.abc import Callable, Collection, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

import orjson
import structlog

from daemon.errors import AuditError
from daemon.core.enforcement import OUTCOMES, Outcome  # one definition, re-exported here
from daemon.core.model import Decision
from daemon.core.timefmt import format_time

log = structlog.get_logger(__name__)

__all__ = [
    "AuditLog",
    "Outcome",
    "OUTCOMES",
    "VerifyReport",
    "decision_record",
    "outcome_record",
    "rotated_files",
    "verify",
]

ZERO_HASH = "0" * 64
RESERVED = ("seq", "time", "prev_hash", "hash")
#: Record types that may skip seqs (a declared gap: `skipped: [first, last]`).
GAP_TYPES = ("gap",)
_OPTS = orjson.OPT_SORT_KEYS | orjson.OPT_NON_STR_KEYS
#: Seconds: `wait_durable` fdatasyncs on the loop itself while the last fdatasync took less
#: than this, in a worker thread otherwise (see the module docstring).
INLINE_SYNC_MAX = 0.002



# ---------------------------------------------------------------- canonical form and hashing


def _canonical(record: dict[str, Any]) -> bytes:
    return orjson.dumps(record, option=_OPTS)


def _record_hash(record: dict[str, Any]) -> str:
    body = {k: v for k, v in record.items() if k != "hash"}
    return hashlib.sha256(_canonical(body)).hexdigest()


def _normalise(record: dict[str, Any]) -> dict[str, Any]:
    """JSON-shaped copy of `record` (tuples -> lists, odd values -> str), so that what is
    hashed is exactly what a reader parses back."""
    try:
        out = orjson.loads(orjson.dumps(record, option=_OPTS, default=str))
    except (TypeError, orjson.JSONEncodeError) as exc:
        raise AuditError(f"audit record cannot be serialised: {exc}") from None
    if not isinstance(out, dict):
        raise AuditError("audit record must be a JSON object")
    return out


def _stem(path: Path) -> str:
    return path.name[: -len(".jsonl")] if path.name.endswith(".jsonl") else path.name


def checkpoint_state_path(path: Path) -> Path:
    """Where the last checkpoint of the trail at `path` (its live file) is kept."""
    return path.with_name(f"{_stem(path)}.checkpoint.json")


def read_checkpoint_state(path: Path) -> dict[str, Any] | None:
    """The checkpoint state beside the trail at `path`: `{"checkpoint": {...}, "record_seq":
    N}` (N: the seq of the checkpoint's own record in the trail), or None when there is none.
    An unreadable or malformed file is logged (`audit_checkpoint_state_unusable`) and
    treated as absent: the off-host checkpoints still catch what it would have."""
    state_path = checkpoint_state_path(path)
    try:
        raw = state_path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as exc:
        log.error("audit_checkpoint_state_unusable", path=str(state_path), error=exc.strerror or str(exc))
        return None
    try:
        state = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        log.error("audit_checkpoint_state_unusable", path=str(state_path), error=str(exc))
        return None
    if (not isinstance(state, dict) or not isinstance(state.get("checkpoint"), dict)
            or not isinstance(state.get("record_seq"), int)):
        log.error("audit_checkpoint_state_unusable", path=str(state_path), error="unexpected shape")
        return None
    return state


_ROTATED = re.compile(r"^(?P<stem>.+)\.(?P<ts>\d{8}T\d{6}Z)\.(?P<seq>\d+)\.jsonl$")


def _rotated_files(folder: Path, stem: str | None = None) -> list[Path]:
    """Rotated audit files in `folder` (of `stem`, or of any stem), oldest first (by seq)."""
    found: list[tuple[int, str, Path]] = []
    try:
        entries = list(folder.iterdir())
    except FileNotFoundError:
        return []
    for p in entries:
        m = _ROTATED.match(p.name)
        if m and (stem is None or m["stem"] == stem) and p.is_file():
            found.append((int(m["seq"]), p.name, p))
    return [p for _, _, p in sorted(found)]


def rotated_files(path: Path) -> list[Path]:
    """The rotated files of the audit log at `path` (its folder, its stem), oldest first:
    the audit's own file naming, for readers such as `daemon.service.recovery`."""
    return _rotated_files(path.parent, _stem(path))


# ---------------------------------------------------------------- the writer


class RotationHook(Protocol):
    """What `AuditLog(rotation=...)` calls right before the live file is rotated, so a
    checkpoint record can close the file (`daemon.service.checkpoint.Checkpointer`)."""

    def before_rotate(self) -> None:
        """Called with no arguments; may call the trail's `write`. An exception is logged
        (`audit_before_rotate_failed`) and the rotation goes on."""


class AuditLog:
    """An append-only, hash-chained JSON Lines audit trail.

    `path` is the live file; `max_bytes` the size at which it rotates; `fsync_interval`
    (seconds) the longest a written record may wait for fsync when `run_syncer` runs;
    `clock` gives epoch seconds for the `time` field and `last_sync`. `on_record`, if
    given, is called with each written record's `type` (e.g. to count it in metrics).
    `stamp` (default None): when given, its fields (HA: `node` and `epoch`) are added to
    every record not already carrying them. `rotation` (default None): a `RotationHook`
    called right before each rotation (a checkpointer builds the trail with itself here).
    `inline_sync_max` (seconds): `wait_durable` syncs on the loop while the last fdatasync
    took less than this, else in a worker thread (module docstring).

    Use from one thread (the event loop); `sync` may run in a worker thread meanwhile.
    """

    def __init__(self, path: Path, *, max_bytes: int, fsync_interval: float = 1.0,
                 clock: Callable[[], float] = time.time,
                 on_record: Callable[[str], None] | None = None,
                 stamp: Callable[[], dict[str, Any]] | None = None,
                 rotation: RotationHook | None = None,
                 inline_sync_max: float = INLINE_SYNC_MAX) -> None:
        if max_bytes <= 0:
            raise ValueError("max_bytes must be positive")
        if fsync_interval <= 0:
            raise ValueError("fsync_interval must be positive")
        self.path = Path(path)
        self.max_bytes = max_bytes
        self.fsync_interval = fsync_interval
        self._clock = clock
        self._on_record = on_record
        self._stamp = stamp
        self._rotation = rotation
        self._rotating = False
        self._sync_task: asyncio.Future[None] | None = None
        self._fd: int | None = None
        self._size = 0
        self._seq = 0
        self._last_hash = ZERO_HASH
        self._lock = threading.Lock()  # guards the fd against close/rotate during a sync
        self._written_gen = 0  # bumped per write; compared with _synced_gen
        self._synced_gen = 0
        self.last_sync: float | None = None  # clock() of the last completed fsync
        #: Seconds the last fdatasync took (monotonic; 0.0 before the first): decides
        #: whether `wait_durable` syncs on the loop or in a worker thread.
        self.last_sync_seconds = 0.0
        self.inline_sync_max = inline_sync_max
        # clock() of the oldest record not yet fsynced (an upper bound after a sync that
        # raced with writes), None when all are synced. Guarded by `_lock`.
        self._unsynced_since: float | None = None
        self.rotations = 0

    # -- properties

    @property
    def seq(self) -> int:
        """The seq of the last record written (0 before the first)."""
        return self._seq

    @property
    def last_hash(self) -> str:
        return self._last_hash

    @property
    def is_open(self) -> bool:
        return self._fd is not None

    @property
    def needs_sync(self) -> bool:
        """True when records were written since the last fsync."""
        return self._written_gen != self._synced_gen

    def unsynced_seconds(self) -> float:
        """Age in seconds (by `clock`) of the oldest record written but not yet fsynced;
        0.0 when every record is synced. Cheap; meant for a gauge read at scrape time."""
        since = self._unsynced_since
        return 0.0 if since is None else max(0.0, self._clock() - since)

    # -- lifecycle

    def open(self) -> None:
        """Create the folder (0o750) and live file (0o640) as needed, and resume the chain
        from the last record of the live file, or of the newest rotated file.

        A torn last line of the live file is quarantined and a `truncated` record written
        (module docstring); when the checkpoint state says a higher seq was written than
        the trail holds, a `gap` record is written. Raises AuditError (naming file and line)
        when the last complete record is corrupt: appending after it would hide the damage,
        so an operator must look first.
        """
        if self._fd is not None:
            return
        try:
            self.path.parent.mkdir(mode=0o750, parents=True, exist_ok=True)
        except OSError as exc:
            raise AuditError(f"cannot create audit folder {self.path.parent}: "
                             f"{exc.strerror or exc}") from None
        seq, last_hash = 0, ZERO_HASH
        size = 0
        torn: dict[str, Any] | None = None
        try:
            if self.path.exists():
                torn = _quarantine_torn_tail(self.path, self._clock())
                size = self.path.stat().st_size
            source = self.path if size > 0 else None
            if source is None:
                rotated = _rotated_files(self.path.parent, _stem(self.path))
                source = rotated[-1] if rotated else None
            if source is not None:
                seq, last_hash = _last_record(source)
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)
        except OSError as exc:
            raise AuditError(f"cannot open audit trail {self.path}: {exc.strerror or exc}") from None
        self._fd, self._size, self._seq, self._last_hash = fd, size, seq, last_hash
        self._written_gen = self._synced_gen = 0
        log.info("audit_opened", path=str(self.path), seq=seq, size=size)
        if torn is not None:
            log.error("audit_tail_quarantined", **torn)
            self.write({"type": "truncated", **torn,
                        "detail": "the last line was incomplete (a write cut short, e.g. by a "
                                  "power loss); its bytes were moved to the quarantine file"})
        self._continue_after_checkpoint()

    def _continue_after_checkpoint(self) -> None:
        """Never reuse a seq: when the checkpoint state names a higher seq than the trail
        holds, write a `gap` record carrying the next seq after it."""
        state = read_checkpoint_state(self.path)
        if state is None:
            return
        floor = int(state["record_seq"])
        if floor <= self._seq:
            return
        cp = state["checkpoint"]
        first = self._seq + 1
        log.critical("audit_trail_cut", trail_seq=self._seq, checkpoint_seq=floor,
                     missing=floor - self._seq, path=str(self.path),
                     detail="the trail holds fewer records than its last checkpoint covered")
        self._seq = floor  # the gap record gets floor + 1
        gap = {"type": "gap", "skipped": [first, floor],
               "checkpoint": {"seq": cp.get("seq"), "time": cp.get("time"),
                              "head_hash": cp.get("head_hash")},
               "detail": f"records seq {first} to {floor} were written (the last checkpoint "
                         f"covered them) but the trail no longer holds them"}
        # write() uses _seq + 1 and the chain's last hash: the chain stays linked.
        self.write(gap)

    def close(self) -> None:
        """fsync and close. Idempotent."""
        if self._fd is None:
            return
        self.sync()
        with self._lock:
            fd, self._fd = self._fd, None
            if fd is not None:
                os.close(fd)

    def __enter__(self) -> AuditLog:
        self.open()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- writing

    def write(self, record: dict[str, Any]) -> dict[str, Any]:
        """Append one record and hand it to the OS before returning.

        Returns the record as written (with `seq`, `time`, `prev_hash`, `hash`). Fields with
        those names in `record` are replaced. Raises AuditError when the trail is closed or
        the write fails (the file is then cut back to its previous length, best effort).
        """
        if self._fd is None:
            raise AuditError(f"audit trail {self.path} is not open")
        rec = _normalise({k: v for k, v in record.items() if k not in RESERVED})
        if self._stamp is not None:
            for key, value in self._stamp().items():
                rec.setdefault(key, value)
        rec["seq"] = self._seq + 1
        now = self._clock()
        rec["time"] = format_time(now)
        rec["prev_hash"] = self._last_hash
        rec["hash"] = _record_hash(rec)
        line = _canonical(rec) + b"\n"
        if self._size > 0 and self._size + len(line) > self.max_bytes and not self._rotating:
            if self._rotation is not None:
                self._rotating = True
                try:
                    self._rotation.before_rotate()  # writes into the file about to be rotated
                except Exception:  # a failed checkpoint must not lose the record itself
                    log.exception("audit_before_rotate_failed")
                finally:
                    self._rotating = False
                self._rotate()
                return self.write(record)  # seq/prev_hash may have moved on: build it again
            self._rotate()
        self._append(line)
        self._seq = rec["seq"]
        self._last_hash = rec["hash"]
        with self._lock:  # a sync in a worker thread reads both
            self._written_gen += 1
            if self._unsynced_since is None:
                self._unsynced_since = now
        if self._on_record is not None:
            self._on_record(str(rec.get("type", "")))
        return rec

    def _append(self, line: bytes) -> None:
        fd = self._fd
        assert fd is not None
        view = memoryview(line)
        try:
            while view:
                n = os.write(fd, view)
                view = view[n:]
        except OSError as exc:
            try:
                os.ftruncate(fd, self._size)
            except OSError:
                pass
            raise AuditError(f"cannot write audit trail {self.path}: {exc.strerror or exc}") from None
        self._size += len(line)

    def _rotate(self) -> None:
        """Rename the live file aside (fsynced first) and start a new one. Blocks briefly:
        rotation happens once per `max_bytes`."""
        stamp = datetime.fromtimestamp(self._clock(), UTC).strftime("%Y%m%dT%H%M%SZ")
        target = self.path.with_name(f"{_stem(self.path)}.{stamp}.{self._seq:012d}.jsonl")
        try:
            with self._lock:
                old = self._fd
                assert old is not None
                os.fsync(old)
                os.rename(self.path, target)
                fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC,
                             0o640)
                self._fd = fd
                os.close(old)
            _fsync_dir(self.path.parent)
        except OSError as exc:
            raise AuditError(f"cannot rotate audit trail {self.path} to {target}: "
                             f"{exc.strerror or exc}") from None
        self._size = 0
        self._synced_gen = self._written_gen  # the old file was fsynced
        self._unsynced_since = None
        self.last_sync = self._clock()
        self.rotations += 1
        log.info("audit_rotated", path=str(self.path), rotated_to=str(target), seq=self._seq)

    # -- durability

    def sync(self) -> None:
        """fsync what was written so far. Safe to call from a worker thread while the loop
        keeps writing (the fd is duplicated so a rotation cannot pull it away)."""
        with self._lock:
            if self._fd is None:
                return
            gen = self._written_gen
            captured_at = self._clock()
            fd = os.dup(self._fd)
        started = time.monotonic()
        try:
            os.fdatasync(fd)  # the data and the file's size: what reading it back needs
        except OSError as exc:
            raise AuditError(f"cannot fsync audit trail {self.path}: {exc.strerror or exc}") from None
        finally:
            os.close(fd)
            self.last_sync_seconds = time.monotonic() - started
        with self._lock:
            self._synced_gen = max(self._synced_gen, gen)
            # Records written during the fsync are not covered; they are no older than
            # `captured_at`, so the age reported stays an upper bound.
            self._unsynced_since = None if self._written_gen == self._synced_gen else captured_at
        self.last_sync = self._clock()

    @property
    def syncs_inline(self) -> bool:
        """Whether `wait_durable` fdatasyncs on the loop itself: the disk was fast last time
        (under `inline_sync_max` seconds, default `INLINE_SYNC_MAX`) and no sync is under
        way in a worker thread."""
        fut = self._sync_task
        return self.last_sync_seconds < self.inline_sync_max and (fut is None or fut.done())

    def sync_soon(self) -> None:
        """Start an fdatasync in a worker thread now, unless one is under way or the disk
        is fast enough for `wait_durable` to sync on the loop (call from the event loop
        right after writing a record that `wait_durable` will wait for: a slow disk works
        while the loop goes on with this turn)."""
        if self._fd is not None and self.needs_sync and not self.syncs_inline:
            self._shared_sync()

    def _shared_sync(self) -> asyncio.Future[None]:
        fut = self._sync_task
        if fut is None or fut.done():
            fut = asyncio.get_running_loop().run_in_executor(None, self.sync)
            fut.add_done_callback(_retrieve)
            self._sync_task = fut
        return fut

    async def wait_durable(self) -> None:
        """Return once every record written before the call is on disk (fdatasync).

        Group commit: one sync runs at a time, on the loop while the disk is fast (see the
        module docstring), else in a worker thread; callers arriving while it runs wait for
        it and then share the next one, which covers every record written meanwhile. Raises AuditError when the sync fails (the caller must not act as if the
        record were durable)."""
        target = self._written_gen
        while self._synced_gen < target and self._fd is not None:
            if self.syncs_inline:
                self.sync()  # one fast fdatasync, covering every record written so far
            else:
                await asyncio.shield(self._shared_sync())

    async def run_syncer(self, stop_event: asyncio.Event) -> None:
        """fsync (in a worker thread) at most `fsync_interval` seconds after any write,
        until `stop_event` is set; then one last sync. Errors are logged and retried at the
        next interval (the caller's metrics/health see `needs_sync` staying True)."""
        while not stop_event.is_set():
            try:
                await asyncio.wait_for(stop_event.wait(), timeout=self.fsync_interval)
            except TimeoutError:
                pass
            if self.needs_sync:
                try:
                    await asyncio.to_thread(self.sync)
                except AuditError as exc:
                    log.error("audit_fsync_failed", error=str(exc))
        if self.needs_sync:
            await asyncio.to_thread(self.sync)


def _retrieve(task: asyncio.Future[None]) -> None:
    """Mark a shared sync's exception as seen (its waiters got it, or none was left)."""
    if not task.cancelled():
        task.exception()


def _quarantine_torn_tail(path: Path, now: float) -> dict[str, Any] | None:
    """When the last line of `path` has no end of line (a write cut short), move its bytes
    to `<name>.quarantine.<YYYYmmddTHHMMSSZ>.<offset>` beside it (fsynced, then the live
    file is cut back to the end of its last complete line and fsynced). Returns the facts
    for the `truncated` record (file, offset, bytes, sha256, quarantine), or None when
    the file ends cleanly."""
    with open(path, "r+b") as f:
        end = f.seek(0, os.SEEK_END)
        if end == 0:
            return None
        f.seek(end - 1)
        if f.read(1) == b"\n":
            return None
        # Find the start of the torn line: the byte after the last newline.
        pos, cut = end, 0
        while pos > 0:
            step = min(64 * 1024, pos)
            pos -= step
            f.seek(pos)
            block = f.read(step)
            i = block.rfind(b"\n")
            if i != -1:
                cut = pos + i + 1
                break
        f.seek(cut)
        torn = f.read(end - cut)
        stamp = datetime.fromtimestamp(now, UTC).strftime("%Y%m%dT%H%M%SZ")
        target = path.with_name(f"{path.name}.quarantine.{stamp}.{cut}")
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o640)
        try:
            os.write(fd, torn)
            os.fsync(fd)
        finally:
            os.close(fd)
        _fsync_dir(path.parent)
        f.truncate(cut)
        f.flush()
        os.fsync(f.fileno())
    return {"file": path.name, "offset": cut, "bytes": len(torn),
            "sha256": hashlib.sha256(torn).hexdigest(), "quarantine": target.name}


def _fsync_dir(folder: Path) -> None:
    """Make a rename durable (best effort; not every filesystem allows it)."""
    try:
        fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _last_record(path: Path) -> tuple[int, str]:
    """(seq, hash) of the last record of `path`; AuditError naming file:line when it is
    truncated or corrupt."""
    with open(path, "rb") as f:
        data_end = f.seek(0, os.SEEK_END)
        if data_end == 0:
            return 0, ZERO_HASH
        # Read backwards until we hold the whole last line.
        block = 64 * 1024
        pos = data_end
        tail = b""
        while pos > 0:
            step = min(block, pos)
            pos -= step
            f.seek(pos)
            tail = f.read(step) + tail
            if tail.find(b"\n", 0, len(tail) - 1) != -1:
                break
        f.seek(0)
        newlines = 0
        while chunk := f.read(1 << 20):
            newlines += chunk.count(b"\n")
    complete = tail.endswith(b"\n")
    last = tail[tail.rfind(b"\n", 0, len(tail) - 1) + 1:]
    line_no = newlines if complete else newlines + 1
    where = f"{path}:{line_no}"
    if not complete:
        raise AuditError(f"{where}: last audit record is incomplete (a truncated write?); "
                         f"inspect the file and run `confguard audit verify` before restarting")
    problem, rec = _check_line(last)
    if problem is not None or rec is None:
        raise AuditError(f"{where}: last audit record is unusable ({problem}); "
                         f"inspect the file and run `confguard audit verify` before restarting")
    return int(rec["seq"]), str(rec["hash"])


def _check_line(raw: bytes) -> tuple[str | None, dict[str, Any] | None]:
    """(problem, record): the record's own integrity (parse, fields, hash, canonical form)."""
    if not raw.endswith(b"\n"):
        return "record is incomplete (no end of line): a truncated write", None
    body = raw[:-1]
    if not body.strip():
        return "empty line", None
    try:
        rec = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        return f"not valid JSON ({exc}); the record was changed or damaged", None
    if not isinstance(rec, dict):
        return "not a JSON object; the record was changed or damaged", None
    seq = rec.get("seq")
    if not isinstance(seq, int) or isinstance(seq, bool) or seq < 1:
        return "missing or invalid seq; the record was changed or damaged", None
    for key in ("hash", "prev_hash"):
        v = rec.get(key)
        if not isinstance(v, str) or not re.fullmatch(r"[0-9a-f]{64}", v):
            return f"record seq {seq} has a missing or invalid {key}", None
    expected = _record_hash(rec)
    if expected != rec["hash"]:
        return (f"record seq {seq} has hash {rec['hash']} but its content hashes to "
                f"{expected}; the record was changed"), None
    if _canonical(rec) != body:
        return (f"record seq {seq} is not in canonical form (bytes were changed without "
                f"changing the parsed content)"), None
    return None, rec


# ---------------------------------------------------------------- record builders


def decision_record(decision: Decision, *, mode: str) -> dict[str, Any]:
    """The `type: decision` record for a rule match. `mode` is `enforce` or `observe`;
    `action` is what the rule asks for (`disconnect`/`observe`). Times are epoch seconds.
    A manual decision (control API) also has `origin`: `{"caller", "reason"}`."""
    record: dict[str, Any] = {
        "type": "decision",
        "rule": decision.rule,
        "conversation_id": decision.conversation_id,
        "participant_id": decision.participant_id,
        "purpose": decision.purpose,
        "matched": dict(decision.matched),
        "mode": mode,
        "action": decision.action,
        "severity": decision.severity,
        "tags": list(decision.tags),
        "message": decision.message,
        "decided_at": decision.decided_at,
        "received_at": decision.received_at,
    }
    if decision.origin is not None:
        record["origin"] = {"caller": decision.origin.caller, "reason": decision.origin.reason}
    return record


def outcome_record(decision: Decision, *, outcome: str, http_status: int | None, attempts: int,
                   event_to_request_ms: float | None, error: str | None) -> dict[str, Any]:
    """The `type: outcome` record: what enforcement did about `decision`.

    `outcome` is one of OUTCOMES: `disconnected` (PATCH accepted and the party is gone),
    `already_gone` (404 / final before we acted), `failed` (gave up), `unconfirmed`
    (PATCH accepted, removal not yet seen), `observed` (observe mode/action: nothing sent),
    `suppressed` (the safety valve held it back, or draining, or already acted on),
    `standby` (HA: decided but not sent, not the leader), `unknown` (a decision whose PATCH
    outcome was never written, closed on start-up/takeover). `event_to_request_ms` is from the
    triggering message's receipt to the PATCH being sent.
    """
    if outcome not in OUTCOMES:
        raise ValueError(f"unknown outcome {outcome!r}; expected one of {sorted(OUTCOMES)}")
    return {
        "type": "outcome",
        "rule": decision.rule,
        "conversation_id": decision.conversation_id,
        "participant_id": decision.participant_id,
        "action": decision.action,
        "outcome": outcome,
        "http_status": http_status,
        "attempts": attempts,
        "event_to_request_ms": event_to_request_ms,
        "error": error,
    }


# ---------------------------------------------------------------- verification


@dataclass(frozen=True, slots=True)
class VerifyReport:
    """`ok` when every record is intact and linked; `problem` is the first break as
    `file:line: what`. `records`/`files` count what was read up to the break. `gaps`:
    declared losses found on the way (a quarantined torn line: `truncated`; seqs a `gap`
    record says are missing), each as `file:line: what`; a chain with gaps is still `ok`
    (linked), the caller decides what a gap means. `last_seq`/`last_hash`: of the last
    record read. `heads`: for each seq asked for in `want`, (hash, prev_hash, `file:line`,
    the record's `checkpoint_hash` field or None). `checkpoints`: the `checkpoint` records' signed checkpoints
    with their `file:line`. `first_time`/`last_time`: of the first and last record."""

    ok: bool
    records: int
    files: int
    problem: str | None = None
    gaps: tuple[str, ...] = ()
    truncated: int = 0
    skipped: tuple[tuple[int, int], ...] = ()
    last_seq: int = 0
    last_hash: str = ZERO_HASH
    heads: dict[int, tuple[str, str, str, str | None]] = field(default_factory=dict)
    checkpoints: tuple[tuple[dict[str, Any], str], ...] = ()
    first_time: str | None = None
    last_time: str | None = None


def audit_files(paths: Sequence[Path]) -> list[Path]:
    """Expand `paths` into the ordered file list: a folder means its rotated files (by
    seq) then its live `*.jsonl` files (by name). Raises AuditError when a path is missing
    or a folder holds no audit files."""
    out: list[Path] = []
    for p in paths:
        p = Path(p)
        if p.is_dir():
            rotated = _rotated_files(p)
            try:
                live = sorted(q for q in p.iterdir()
                              if q.is_file() and q.name.endswith(".jsonl") and not _ROTATED.match(q.name))
            except OSError as exc:
                raise AuditError(f"cannot read folder {p}: {exc.strerror or exc}") from None
            if not rotated and not live:
                raise AuditError(f"{p}: no audit files (*.jsonl) in this folder")
            out.extend(rotated)
            out.extend(live)
        elif p.is_file():
            out.append(p)
        else:
            raise AuditError(f"{p}: no such file or folder")
    return out


def _lines(path: Path) -> Iterator[bytes]:
    with open(path, "rb") as f:
        yield from f


def verify(paths: Sequence[Path], *, want: Collection[int] = ()) -> VerifyReport:
    """Check the chain over `paths` (files, or folders of audit files) in order.

    Each line must parse, be in canonical form, hash to its `hash`; `seq` must go up by
    exactly 1 from 1 (a `gap` record may skip the seqs its `skipped: [first, last]` names,
    reported in `gaps`), and `prev_hash` must equal the previous record's hash (64 zeros
    for seq 1). The first break is reported as `file:line: what`. `want`: seqs whose hash
    to collect in `heads` (checkpoints to compare with). Raises AuditError when input
    cannot be read at all (missing file, permission), so callers can tell "unreadable"
    from "broken".
    """
    files = audit_files(paths)
    wanted = set(want)
    st = _Scan()
    for n_file, path in enumerate(files, start=1):
        try:
            for line_no, raw in enumerate(_lines(path), start=1):
                problem = st.step(raw, f"{path}:{line_no}", wanted)
                if problem is not None:
                    return st.report(False, n_file, problem)
        except OSError as exc:
            raise AuditError(f"cannot read {path}: {exc.strerror or exc}") from None
    return st.report(True, len(files), None)


class _Scan:
    """The running state of `verify` over one chain."""

    def __init__(self) -> None:
        self.records = 0
        self.prev_seq = 0
        self.prev_hash = ZERO_HASH
        self.gaps: list[str] = []
        self.truncated = 0
        self.skipped: list[tuple[int, int]] = []
        self.heads: dict[int, tuple[str, str, str, str | None]] = {}
        self.checkpoints: list[tuple[dict[str, Any], str]] = []
        self.first_time: str | None = None
        self.last_time: str | None = None

    def report(self, ok: bool, files: int, problem: str | None) -> VerifyReport:
        return VerifyReport(ok, self.records, files, problem, tuple(self.gaps), self.truncated,
                            tuple(self.skipped), self.prev_seq, self.prev_hash, self.heads,
                            tuple(self.checkpoints), self.first_time, self.last_time)

    def step(self, raw: bytes, where: str, wanted: set[int]) -> str | None:
        """Take one line; the problem as `file:line: what`, or None."""
        problem, rec = _check_line(raw)
        if problem is not None or rec is None:
            return f"{where}: {problem}"
        seq = rec["seq"]
        declared = _declared_skip(rec, self.prev_seq) if seq != self.prev_seq + 1 else None
        if (seq != self.prev_seq + 1 and declared is None) or rec["prev_hash"] != self.prev_hash:
            return f"{where}: {_link_problem(seq, rec['prev_hash'], self.prev_seq, self.prev_hash)}"
        if declared is not None:
            self.skipped.append(declared)
            self.gaps.append(f"{where}: records seq {declared[0]} to {declared[1]} are missing "
                             f"(declared by a gap record: {rec.get('detail', '')})")
        kind = rec.get("type")
        if kind == "truncated":
            self.truncated += 1
            self.gaps.append(f"{where}: {rec.get('bytes')} byte(s) of a torn record at offset "
                             f"{rec.get('offset')} of {rec.get('file')} were quarantined in "
                             f"{rec.get('quarantine')} (sha256 {rec.get('sha256')})")
        elif kind == "checkpoint" and isinstance(rec.get("checkpoint"), dict):
            self.checkpoints.append((rec["checkpoint"], where))
        self.records += 1
        self.prev_seq = seq
        self.prev_hash = rec["hash"]
        t = rec.get("time")
        if isinstance(t, str):
            self.first_time = self.first_time or t
            self.last_time = t
        if seq in wanted:
            cp_hash = rec.get("checkpoint_hash")
            self.heads[seq] = (rec["hash"], rec["prev_hash"], where,
                               cp_hash if isinstance(cp_hash, str) else None)
        return None


def _declared_skip(rec: dict[str, Any], prev_seq: int) -> tuple[int, int] | None:
    """(first, last) when `rec` is a `gap` record whose `skipped` names exactly the seqs
    between `prev_seq` and its own."""
    skipped = rec.get("skipped")
    if (rec.get("type") in GAP_TYPES and isinstance(skipped, list) and len(skipped) == 2
            and skipped[0] == prev_seq + 1 and skipped[1] == rec["seq"] - 1 and prev_seq > 0):
        return int(skipped[0]), int(skipped[1])
    return None


def _link_problem(seq: int, prev_hash: str, prev_seq: int, expected: str) -> str:
    if prev_seq == 0:
        return (f"record seq {seq} has prev_hash {prev_hash} but the chain must start at "
                f"seq 1 with prev_hash {ZERO_HASH}; earlier records or files are missing")
    gap = ""
    if seq > prev_seq + 1:
        gap = f" ({seq - prev_seq - 1} record(s) missing)"
    elif seq <= prev_seq:
        gap = " (seq went backwards or repeated)"
    return (f"record seq {seq} follows seq {prev_seq}{gap} and has prev_hash {prev_hash} but "
            f"the previous record's hash is {expected}; a record was deleted or changed")
