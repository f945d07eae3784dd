"""Byte relaying for the egress proxy: buffered reads, idle tracking, request-body framing."""

from __future__ import annotations

import re
from typing import Any

import anyio
from anyio.abc import ByteStream

from ._http import BadRequest

BUF = 256 * 1024
_HEX = re.compile(rb"^[0-9a-fA-F]{1,15}$")
_GONE = (anyio.EndOfStream, anyio.BrokenResourceError, anyio.ClosedResourceError, OSError)


class Activity:
    """Last time a byte moved in either direction; ``watch`` cancels after ``idle`` seconds of none."""

    def __init__(self) -> None:
        self.last = anyio.current_time()

    async def watch(self, idle: float, scope: anyio.CancelScope) -> None:
        while True:
            remaining = self.last + idle - anyio.current_time()
            if remaining <= 0:
                scope.cancel()
                return
            await anyio.sleep(remaining)


class Reader:
    """A stream with a look-ahead buffer (the head, the ClientHello, chunk-size lines)."""

    def __init__(self, stream: ByteStream):
        self.stream = stream
        self.buffer = b""

    async def fill(self) -> None:
        self.buffer += await self.stream.receive(BUF)

    async def read_until(self, sep: bytes, limit: int) -> bytes | None:
        """Bytes before ``sep`` (consumed with it), or None once more than ``limit`` arrive without it."""
        start = 0
        while True:
            idx = self.buffer.find(sep, start)
            if 0 <= idx <= limit:
                out, self.buffer = self.buffer[:idx], self.buffer[idx + len(sep):]
                return out
            if len(self.buffer) > limit:
                return None
            start = max(0, len(self.buffer) - len(sep) + 1)
            await self.fill()

    def take(self, n: int) -> bytes:
        out, self.buffer = self.buffer[:n], self.buffer[n:]
        return out

    def take_all(self) -> bytes:
        return self.take(len(self.buffer))

    async def receive(self) -> bytes:
        if self.buffer:
            return self.take_all()
        return await self.stream.receive(BUF)


async def pump(src: Any, dst: ByteStream, activity: Activity, counter: Any, eof: bool = True) -> None:
    """Copy ``src`` to ``dst`` until EOF or error; half-close ``dst`` at EOF when ``eof``."""
    try:
        while True:
            data = await src.receive(BUF)
            activity.last = anyio.current_time()
            await dst.send(data)
            counter.inc(len(data))
    except anyio.EndOfStream:
        if eof:
            try:
                await dst.send_eof()
            except _GONE:
                pass
    except _GONE:
        pass


async def relay_body(reader: Reader, dst: ByteStream, framing: tuple[str, int], activity: Activity,
                     counter: Any) -> None:
    """Send exactly the request body the head announced; bytes after it are never relayed."""
    kind, length = framing
    if kind == "length":
        await _copy(reader, dst, length, activity, counter)
    elif kind == "chunked":
        while True:
            line = await reader.read_until(b"\r\n", 4096)
            if line is None:
                raise BadRequest("malformed_chunk")
            size_text = line.split(b";", 1)[0].strip(b" \t")
            if not _HEX.match(size_text):
                raise BadRequest("malformed_chunk")
            size = int(size_text, 16)
            await dst.send(line + b"\r\n")
            if size == 0:
                break
            await _copy(reader, dst, size, activity, counter)
            if await reader.read_until(b"\r\n", 0) is None:
                raise BadRequest("malformed_chunk")
            await dst.send(b"\r\n")
        for _ in range(64):  # trailer section, bounded
            trailer = await reader.read_until(b"\r\n", 8192)
            if trailer is None:
                raise BadRequest("malformed_chunk")
            await dst.send(trailer + b"\r\n")
            if not trailer:
                return
        raise BadRequest("malformed_chunk")


async def _copy(reader: Reader, dst: ByteStream, n: int, activity: Activity, counter: Any) -> None:
    while n > 0:
        if not reader.buffer:
            await reader.fill()
        data = reader.take(min(n, len(reader.buffer)))
        activity.last = anyio.current_time()
        await dst.send(data)
        counter.inc(len(data))
        n -= len(data)
