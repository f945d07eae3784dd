"""``GET /api/v1/stats/series``: per-minute counts over the last hour, for the console's chart.

- ``requests`` and ``rate_limited`` (429s) come from in-memory per-minute counters fed by
  ``risoluto_request_completed`` (every request, refused ones included). They start at zero
  when the server starts: a restart forgets the hour before it.
- ``egress`` counts the decisions written to ``<DATA_DIR>/egress-audit.log`` in each minute
  (read from its end, at most ``MAX_EGRESS_TAIL_BYTES``), or is ``null`` when this server
  keeps no such log. Reading the log rather than counting in memory means decisions made
  by another process of the same DATA_DIR are counted too.

Each list has ``MINUTES`` entries, oldest first; the last is the current (partial) minute,
whose first second is ``start + (MINUTES - 1) * 60`` (UNIX seconds).
"""

from __future__ import annotations

import json
import threading
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import anyio
from quart import Blueprint

from risoluto.hookspecs import hookimpl
from risoluto.hookspecs.auth import RequestInfo
from risoluto.openapi import api

from ._tail import tail_lines

MINUTES = 60
EGRESS_LOG = "egress-audit.log"
MAX_EGRESS_TAIL_BYTES = 16 * 1024 * 1024
MAX_EGRESS_LINES = 200_000
_STATE = "console.stats"
_COUNTS = {"type": "array", "items": {"type": "integer"}, "minItems": MINUTES, "maxItems": MINUTES}
SERIES = {
    "type": "object", "required": ["minute_seconds", "start", "requests", "rate_limited", "egress"],
    "additionalProperties": False,
    "properties": {
        "minute_seconds": {"type": "integer"}, "start": {"type": "integer"},
        "requests": _COUNTS, "rate_limited": _COUNTS, "egress": {"oneOf": [_COUNTS, {"type": "null"}]},
    },
}


class MinuteCounters:
    """Counts per UNIX minute for the last ``MINUTES`` minutes: a ring indexed by minute."""

    def __init__(self) -> None:
        self._minute = [-1] * MINUTES
        self._requests = [0] * MINUTES
        self._limited = [0] * MINUTES
        self._lock = threading.Lock()

    def count(self, limited: bool, now: float | None = None) -> None:
        minute = int((time.time() if now is None else now) // 60)
        slot = minute % MINUTES
        with self._lock:
            if self._minute[slot] != minute:  # a slot last used an hour (or more) ago
                self._minute[slot], self._requests[slot], self._limited[slot] = minute, 0, 0
            self._requests[slot] += 1
            if limited:
                self._limited[slot] += 1

    def series(self, now: float | None = None) -> tuple[int, list[int], list[int]]:
        last = int((time.time() if now is None else now) // 60)
        first = last - MINUTES + 1
        requests, limited = [0] * MINUTES, [0] * MINUTES
        with self._lock:
            for i, minute in enumerate(range(first, last + 1)):
                slot = minute % MINUTES
                if self._minute[slot] == minute:
                    requests[i], limited[i] = self._requests[slot], self._limited[slot]
        return first * 60, requests, limited


def counters_of(kernel: Any) -> MinuteCounters:
    found = kernel.state.get(_STATE)
    if found is None:
        found = kernel.state[_STATE] = MinuteCounters()
    return found


def _epoch(at: Any) -> float | None:
    if not isinstance(at, str):
        return None
    try:
        return datetime.fromisoformat(at.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


_last: dict[Path, tuple[tuple[int, int, int, int], list[int]]] = {}


def egress_per_minute(path: Path, start: int) -> list[int] | None:
    """Decisions per minute since ``start`` from the egress audit log; None without the log.
    The answer is reused while the file and the hour are unchanged (every open tab asks)."""
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    key = (st.st_ino, st.st_size, st.st_mtime_ns, start)
    cached = _last.get(path)
    if cached is not None and cached[0] == key:
        return list(cached[1])
    counts = _count(path, start)
    _last.clear()  # one DATA_DIR per process in practice; never grows
    _last[path] = (key, counts)
    return list(counts)


def _count(path: Path, start: int) -> list[int]:
    counts = [0] * MINUTES
    for raw in tail_lines(path, MAX_EGRESS_LINES, MAX_EGRESS_TAIL_BYTES):  # newest first
        try:
            at = _epoch(json.loads(raw).get("at"))
        except (ValueError, AttributeError):
            continue
        if at is None:
            continue
        if at < start:
            break  # older than the hour: every line before it is older still
        index = int((at - start) // 60)
        if 0 <= index < MINUTES:
            counts[index] += 1
    return counts


@hookimpl
def risoluto_request_completed(kernel: Any, info: RequestInfo, status: int) -> None:
    try:
        counters_of(kernel).count(info.rate_limited or status == 429)
    except Exception:  # an observer never breaks a response
        pass


@hookimpl
def risoluto_app_blueprints(kernel: Any) -> list[Any]:
    counters_of(kernel)
    bp = Blueprint("risoluto_stats", __name__)

    @bp.get("/api/v1/stats/series")
    @api("Requests, 429s and egress decisions per minute over the last hour (oldest first)",
         tags=("observability",), responses={200: SERIES})
    async def series() -> Any:
        start, requests, limited = counters_of(kernel).series()
        path = kernel.settings.data_path / EGRESS_LOG
        egress = await anyio.to_thread.run_sync(egress_per_minute, path, start)
        return {"minute_seconds": 60, "start": start, "requests": requests, "rate_limited": limited, "egress": egress}

    return [bp]

