"""The egress decision audit: one JSON line per decision in ``<DATA_DIR>/egress-audit.log``.

Anything that decides about egress (the proxy, a credential broker, an approval) calls
``EgressAudit.record(Decision(...))``. ``record`` never blocks and never does I/O: it counts
the decision in the metrics, appends it to a bounded in-memory ring (what the decisions API
and its event stream read), and offers it to a bounded queue that one writer thread drains
to the file. When the writer falls behind and the queue is full, the line is dropped and
the drop counted (``risoluto_egress_audit_dropped_total``, the doctor, a log line): traffic
is never stalled by the audit, and no decision is lost without a trace.

The file is 0600 and rotated by size: past ``egress.audit.maxBytes`` it becomes
``egress-audit.log.1`` (the previous ``.1`` becomes ``.2`` ...), keeping the newest
``egress.audit.keep`` rotated files. The schema is documented in docs/egress.md.
"""

from __future__ import annotations

import collections
import json
import logging
import os
import queue
import threading
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import attrs

from risoluto.fsutil import ensure_private_dir

if TYPE_CHECKING:
    from risoluto.kernel import Kernel
    from risoluto.settings import EgressAuditConfig

    from ._metrics import EgressMetrics

log = logging.getLogger("risoluto.egress")

LOG_NAME = "egress-audit.log"
STATE_KEY = "egress.audit"
RING_SIZE = 1000  # the decisions API's largest page
QUEUE_SIZE = 16_384  # decisions waiting for the writer; beyond that they are dropped (and counted)
BATCH_WAIT_S = 0.05
_STOP = object()


def stamp(ts: float) -> str:
    """UTC ISO 8601 with milliseconds: 2026-12-07T00:12:03.123Z."""
    return datetime.fromtimestamp(ts, timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


@attrs.frozen(kw_only=True)
class Decision:
    """One egress decision. Empty strings are written as null (not applicable); ``credential``
    is the name of a credential the proxy injected, never its value."""

    verdict: str  # allow | deny | ask
    reason: str  # a snake_case code (docs/egress.md lists them)
    sandbox: str = ""
    issue: str = ""
    host: str = ""
    port: int = 0
    sni: str = ""
    method: str = ""
    path: str = ""
    rule: str = ""
    credential: str = ""
    bytes_up: int = 0
    bytes_down: int = 0
    duration_ms: int = 0
    approval: str = ""  # the approval id, on ask and answer lines
    principal: str = ""  # who answered an approval
    ts: float = attrs.field(factory=time.time)  # formatted only when written or read: the hot path stays cheap

    @property
    def at(self) -> str:
        return stamp(self.ts)

    def to_dict(self) -> dict[str, Any]:
        return {
            "at": self.at, "sandbox": self.sandbox or None, "issue": self.issue or None,
            "host": self.host or None, "port": self.port or None, "sni": self.sni or None,
            "method": self.method or None, "path": self.path or None, "verdict": self.verdict,
            "reason": self.reason, "rule": self.rule or None, "credential": self.credential or None,
            "bytes_up": self.bytes_up, "bytes_down": self.bytes_down, "duration_ms": self.duration_ms,
            "approval": self.approval or None, "principal": self.principal or None,
        }


class EgressAudit:
    """See the module docstring. ``path`` None keeps decisions in memory only (tests, tools)."""

    def __init__(self, path: Path | None, config: Callable[[], EgressAuditConfig],
                 metrics: EgressMetrics | None = None, queue_size: int = QUEUE_SIZE):
        self.path = path
        self._config = config
        self._metrics = metrics
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=queue_size)
        self._ring: collections.deque[tuple[int, Decision]] = collections.deque(maxlen=RING_SIZE)
        self._lock = threading.Lock()
        self._seq = 0
        self._writer: threading.Thread | None = None
        self.dropped = 0
        self.write_error = ""
        self._last_drop_log = 0.0
        self._counters: dict[tuple[str, str], Any] = {}
        self._fd = -1  # the open log file (writer thread only)

    # -- the hot path ---------------------------------------------------------------------
    def record(self, decision: Decision) -> None:
        """Count, keep and queue one decision. Never blocks; safe from any thread."""
        if self._metrics is not None:
            key = (decision.verdict, decision.reason)
            counter = self._counters.get(key)
            if counter is None:  # labels() is a locked dict lookup: keep the children at hand
                counter = self._counters[key] = self._metrics.decisions.labels(verdict=key[0], reason=key[1])
            counter.inc()
        with self._lock:
            self._seq += 1
            self._ring.append((self._seq, decision))
        if self.path is None:
            return
        self._ensure_writer()
        try:
            self._queue.put_nowait(decision)
        except queue.Full:
            self._drop(1)

    def _drop(self, n: int) -> None:
        self.dropped += n
        if self._metrics is not None:
            self._metrics.audit_dropped.inc(n)
        stamp = time.monotonic()
        if stamp - self._last_drop_log > 10:  # say so, without flooding the log
            self._last_drop_log = stamp
            log.warning("egress audit: %d decision line(s) dropped so far (the writer fell behind or failed%s)",
                        self.dropped, f": {self.write_error}" if self.write_error else "")

    # -- reading (the API) ----------------------------------------------------------------
    @property
    def last_seq(self) -> int:
        return self._seq

    def after(self, seq: int) -> list[tuple[int, Decision]]:
        """Decisions newer than ``seq``, oldest first (the event stream)."""
        with self._lock:
            return [item for item in self._ring if item[0] > seq]

    def recent(self, keep: Callable[[Decision], bool], limit: int) -> list[Decision]:
        """Up to ``limit`` kept decisions, newest first."""
        with self._lock:
            items = list(self._ring)
        out = []
        for _, decision in reversed(items):
            if keep(decision):
                out.append(decision)
                if len(out) >= limit:
                    break
        return out

    # -- the writer -----------------------------------------------------------------------
    def _ensure_writer(self) -> None:
        if self._writer is not None and self._writer.is_alive():
            return
        with self._lock:
            if self._writer is None or not self._writer.is_alive():
                self._writer = threading.Thread(target=self._write_loop, name="egress-audit", daemon=True)
                self._writer.start()

    def _write_loop(self) -> None:
        assert self.path is not None
        while True:
            batch = [self._queue.get()]
            if batch[0] is not _STOP:
                # let a batch gather: one wakeup of this thread per BATCH_WAIT_S under load, not one
                # per decision (each wakeup would take the GIL from the proxy's event loop)
                time.sleep(BATCH_WAIT_S)
            while len(batch) < 4096:  # one write() for whatever queued meanwhile
                try:
                    batch.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            stop = any(item is _STOP for item in batch)
            lines = [(json.dumps(d.to_dict(), ensure_ascii=False) + "\n").encode("utf-8")
                     for d in batch if d is not _STOP]
            if lines:
                try:
                    self._write(lines)
                    self.write_error = ""
                except OSError as exc:
                    self.write_error = f"{self.path}: {exc.strerror}"
                    self._close_file()  # reopened (and recreated if it went away) with the next batch
                    self._drop(len(lines))
            if stop:
                self._close_file()
                return

    def _write(self, lines: list[bytes]) -> None:
        """Append ``lines``, rotating before a line would take the file past ``maxBytes``; one
        ``write`` per file touched. The file stays open between batches (writer thread only)."""
        assert self.path is not None
        limit = self._config().max_bytes
        if self._fd >= 0 and not self._still_ours():
            self._close_file()  # moved or removed by someone else (logrotate): start a new file
        while lines:
            if self._fd < 0:
                ensure_private_dir(self.path.parent)
                self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW,
                                   0o600)
            size = os.fstat(self._fd).st_size
            take = 0
            while take < len(lines) and (size == 0 and take == 0 or size + len(lines[take]) <= limit):
                size += len(lines[take])
                take += 1
            if take:
                os.write(self._fd, b"".join(lines[:take]))
            lines = lines[take:]
            if lines:
                self._close_file()
                self._rotate()

    def _still_ours(self) -> bool:
        assert self.path is not None
        try:
            st, mine = os.stat(self.path), os.fstat(self._fd)
        except OSError:
            return False
        return (st.st_dev, st.st_ino) == (mine.st_dev, mine.st_ino)

    def _close_file(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def _rotate(self) -> None:
        """log -> log.1 -> log.2 ...; the oldest beyond ``keep`` is removed."""
        assert self.path is not None
        keep = self._config().keep
        base = str(self.path)
        try:
            os.unlink(f"{base}.{keep}")
        except FileNotFoundError:
            pass
        for i in range(keep - 1, 0, -1):
            try:
                os.replace(f"{base}.{i}", f"{base}.{i + 1}")
            except FileNotFoundError:
                pass
        os.replace(base, f"{base}.1")

    def close(self, timeout: float = 5.0) -> None:
        """Write what is queued, then stop the writer (a later ``record`` starts a new one)."""
        writer = self._writer
        if writer is None or not writer.is_alive():
            return
        try:
            self._queue.put(_STOP, timeout=timeout)
        except queue.Full:
            return
        writer.join(timeout)


def audit_for(kernel: Kernel) -> EgressAudit:
    """The kernel's decision audit, created on first use (one per kernel)."""
    from ._metrics import metrics_for

    audit = kernel.state.get(STATE_KEY)
    if audit is None:
        audit = kernel.state[STATE_KEY] = EgressAudit(
            kernel.settings.data_path / LOG_NAME, lambda: kernel.settings.egress.audit, metrics_for(kernel))
    return audit


__all__ = ["Decision", "EgressAudit", "LOG_NAME", "audit_for"]
