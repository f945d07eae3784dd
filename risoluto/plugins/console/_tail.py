"""The last lines of a log file, read backwards in chunks (the audit route and the traffic series
share it). A private library of the console plugins."""

from __future__ import annotations

import os
from pathlib import Path

MAX_TAIL_BYTES = 4 * 1024 * 1024
_CHUNK = 64 * 1024


def tail_lines(path: Path, count: int, max_bytes: int = MAX_TAIL_BYTES) -> list[bytes]:
    """The last ``count`` complete lines of ``path``, newest first (reads at most ``max_bytes``)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | getattr(os, "O_NOFOLLOW", 0))
    except FileNotFoundError:
        return []
    with os.fdopen(fd, "rb") as fh:
        end = fh.seek(0, os.SEEK_END)
        pos, buf, lines = end, b"", list[bytes]()
        while pos > 0 and len(lines) < count and end - pos < max_bytes:
            step = min(_CHUNK, pos)
            pos -= step
            fh.seek(pos)
            buf = fh.read(step) + buf
            parts = buf.split(b"\n")
            buf = parts[0]  # maybe a partial line: completed by the next chunk
            lines.extend(reversed([p for p in parts[1:] if p.strip()]))
        if pos == 0 and buf.strip() and len(lines) < count:
            lines.append(buf)
    return lines[:count]
