"""Byte moving for the egress proxy: non-blocking sockets, idle bounds, zero-copy relaying.

Once a request is judged, the bytes of a tunnel or a response are moved kernel-to-kernel with
``splice(2)`` through a pipe (Linux), never copied into Python; elsewhere ``recv``/``send``.
Everything here runs on the connection's own proxy thread (see ``_threads``): one poll(2) over
the directions still open, then a bounded number of splice rounds for each one that is ready.

- A tunnel is relayed both ways (``tunnel_sync``) until both sides closed.
- A plain-HTTP answer is relayed one way (``relay_sync``); a request body, when there is one,
  goes up framed exactly as its head announced (``relay_body_sync``).

``Conn`` and ``Reader`` have both forms: ``recv``/``fill`` for the event loop (the credential
broker's terminated connections), ``recv_sync``/``fill_sync``/``read_until_sync`` for proxy
threads (poll(2) with the idle bound).
"""

from __future__ import annotations

import fcntl
import os
import re
import select
import socket
import time
from typing import Any

import anyio

from ._http import BadRequest

BUF = 256 * 1024
PIPE_SIZE = 1024 * 1024
_HEX = re.compile(rb"^[0-9a-fA-F]{1,15}\Z")
_SPLICE = hasattr(os, "splice")
_SPLICE_FLAGS = (getattr(os, "SPLICE_F_MOVE", 0) | getattr(os, "SPLICE_F_NONBLOCK", 0)) if _SPLICE else 0
STEP_ROUNDS = 16  # reads per direction per wake-up of a tunnel's poll: poll(2) only when a side would block
POOLED_PIPES = 64  # empty pipes kept for the next exchanges (2 descriptors each)
_PIPES: list[tuple[int, int]] = []


class IdleTimeout(Exception):
    """No byte moved in either direction for the idle bound."""


class Activity:
    """Last time a byte moved in either direction of one exchange (``time.monotonic``: relay
    threads touch it too)."""

    def __init__(self, idle: float):
        self.idle = idle
        self.last = time.monotonic()

    def touch(self) -> None:
        self.last = time.monotonic()

    def left(self) -> float:
        return self.last + self.idle - time.monotonic()


class Conn:
    """One non-blocking TCP socket. ``recv`` returns b"" at EOF; errors are OSError."""

    def __init__(self, sock: socket.socket):
        sock.setblocking(False)
        self.sock = sock
        self.fd = sock.fileno()

    async def wait(self, readable: bool, activity: Activity | None = None) -> None:
        """Wait until the socket is ready; with ``activity``, raise IdleTimeout once idle."""
        waiter = anyio.wait_readable if readable else anyio.wait_writable
        if activity is None:
            await waiter(self.sock)
            return
        while True:
            left = activity.left()
            if left <= 0:
                raise IdleTimeout
            with anyio.move_on_after(left):
                await waiter(self.sock)
                return

    async def recv(self, n: int = BUF, activity: Activity | None = None) -> bytes:
        while True:
            try:
                return self.sock.recv(n)
            except BlockingIOError:
                await self.wait(True, activity)

    async def send(self, data: bytes, activity: Activity | None = None) -> None:
        view = memoryview(data)
        while view:
            try:
                view = view[self.sock.send(view):]
            except BlockingIOError:
                await self.wait(False, activity)

    # -- the same on a proxy thread: poll(2) with the idle bound, no event loop ----------
    def wait_sync(self, readable: bool, activity: Activity) -> None:
        left = activity.left()
        if left <= 0 or not _ready_now(self.fd, select.POLLIN if readable else select.POLLOUT, left):
            raise IdleTimeout

    def recv_sync(self, activity: Activity, n: int = BUF) -> bytes:
        while True:
            try:
                return self.sock.recv(n)
            except BlockingIOError:
                self.wait_sync(True, activity)

    def send_sync(self, data: bytes, activity: Activity) -> None:
        view = memoryview(data)
        while view:
            try:
                view = view[self.sock.send(view):]
            except BlockingIOError:
                self.wait_sync(False, activity)

    def send_eof(self) -> None:
        try:
            self.sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass

    def close(self) -> None:
        self.sock.close()


def _ready_now(fd: int, events: int, wait: float = 0.0) -> bool:
    """Whether ``fd`` is ready within ``wait`` seconds (one poll(2), no event loop round trip)."""
    poller = select.poll()
    poller.register(fd, events)
    return bool(poller.poll(wait * 1000))


def _start_connect(host: str, port: int) -> tuple[socket.socket, bool]:
    """A non-blocking TCP socket to exactly ``host`` (an IP address, never a name: no lookup
    happens here) with its connect started; True when it connected at once (a near origin)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            sock.connect((host, port))
        except BlockingIOError:
            return sock, False
        return sock, True
    except BaseException:
        sock.close()
        raise


def _connected(sock: socket.socket) -> Conn:
    err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
    if err:
        raise OSError(err, os.strerror(err))
    return Conn(sock)


async def open_connection(host: str, port: int) -> Conn:
    """Connect to exactly ``host`` (an IP address)."""
    sock, done = _start_connect(host, port)
    try:
        if not done and not _ready_now(sock.fileno(), select.POLLOUT):  # often connected already
            await anyio.wait_writable(sock)
        return _connected(sock)
    except BaseException:
        sock.close()
        raise


def connect_sync(host: str, port: int, timeout: float) -> Conn:
    """``open_connection`` for a proxy thread; IdleTimeout when not connected within ``timeout``.
    The wait is the socket module's own (poll(2) in C): less Python on every connection's path."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.settimeout(timeout)
        try:
            sock.connect((host, port))  # exactly the address we checked: never a name, no lookup
        except TimeoutError:
            raise IdleTimeout from None
        return Conn(sock)
    except BaseException:
        sock.close()
        raise


class Reader:
    """A connection with a look-ahead buffer (the head, the ClientHello, chunk-size lines)."""

    def __init__(self, conn: Conn):
        self.conn = conn
        self.buffer = b""

    async def fill(self) -> None:
        data = await self.conn.recv(BUF)
        if not data:
            raise anyio.EndOfStream
        self.buffer += data

    def fill_sync(self, activity: Activity) -> None:
        """``fill`` for a proxy thread; IdleTimeout once ``activity`` runs out."""
        data = self.conn.recv_sync(activity)
        if not data:
            raise anyio.EndOfStream
        self.buffer += data

    def read_until_sync(self, sep: bytes, limit: int, activity: Activity) -> bytes | None:
        """``read_until`` for a proxy thread."""
        start = 0
        while True:
            done, out, start = self._cut(sep, limit, start)
            if done:
                return out
            self.fill_sync(activity)

    def _cut(self, sep: bytes, limit: int, start: int) -> tuple[bool, bytes | None, int]:
        """(finished, bytes before ``sep`` or None when over ``limit``, where the next search starts)."""
        idx = self.buffer.find(sep, start)
        if 0 <= idx <= limit:
            out, self.buffer = self.buffer[:idx], self.buffer[idx + len(sep):]
            return True, out, 0
        if len(self.buffer) > limit:
            return True, None, 0
        return False, None, max(0, len(self.buffer) - len(sep) + 1)

    def take(self, n: int) -> bytes:
        out, self.buffer = self.buffer[:n], self.buffer[n:]
        return out

    def take_all(self) -> bytes:
        return self.take(len(self.buffer))


def _take_pipe() -> tuple[int, int]:
    """An empty pipe: from the pool, or a new one (made 1 MiB once, not per exchange)."""
    if _PIPES:
        return _PIPES.pop()
    rpipe, wpipe = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        fcntl.fcntl(wpipe, getattr(fcntl, "F_SETPIPE_SZ", 1031), PIPE_SIZE)
    except OSError:
        pass  # a smaller pipe only means more rounds
    return rpipe, wpipe


def _give_pipe(pipe: tuple[int, int], empty: bool) -> None:
    """Back to the pool when known empty, else closed (its leftover bytes must never reach another tunnel)."""
    if empty and len(_PIPES) < POOLED_PIPES:
        _PIPES.append(pipe)
    else:
        os.close(pipe[0])
        os.close(pipe[1])


class _Way:
    """One direction of a tunnel relayed on a proxy thread: ``src`` -> pipe -> ``dst`` with
    splice(2) (the bytes never enter Python), or through a buffer without splice."""

    def __init__(self, src: Conn, dst: Conn, counter: Any, half_close: bool = True):
        self.src, self.dst, self.counter = src, dst, counter
        self.half_close = half_close  # pass src's EOF on to dst at once (else dst ends when closed)
        self.pipe = _take_pipe() if _SPLICE else None
        self.pending = 0  # bytes read from src and not yet written to dst
        self.buffer = b""  # the same without splice
        self.done = False

    def interest(self) -> tuple[int, int]:
        """(fd, poll event) this direction waits for; (-1, 0) once finished."""
        if self.done:
            return -1, 0
        return (self.dst.fd, select.POLLOUT) if self.pending else (self.src.fd, select.POLLIN)

    def step(self, activity: Activity) -> None:
        """Move what can move now without blocking (a bounded number of rounds, so the other
        direction gets its turn); OSError on a reset."""
        for _ in range(STEP_ROUNDS):
            if self.done or (self.pending and not self._flush()):
                return
            try:
                if self.pipe is not None:
                    n = os.splice(self.src.fd, self.pipe[1], PIPE_SIZE, flags=_SPLICE_FLAGS)
                else:
                    self.buffer = self.src.sock.recv(BUF)
                    n = len(self.buffer)
            except BlockingIOError:
                return
            if n == 0:  # EOF: pass the half-close on, the other direction goes on
                self.done = True
                if self.half_close:
                    self.dst.send_eof()
                return
            activity.touch()
            self.pending = n
            self._flush()

    def _flush(self) -> bool:
        """Write what is pending; True when nothing is left."""
        while self.pending:
            try:
                if self.pipe is not None:
                    moved = os.splice(self.pipe[0], self.dst.fd, self.pending, flags=_SPLICE_FLAGS)
                else:
                    moved = self.dst.sock.send(self.buffer[-self.pending:])
            except BlockingIOError:
                return False
            self.pending -= moved
            self.counter.inc(moved)
        return True

    def close(self) -> None:
        if self.pipe is not None:
            _give_pipe(self.pipe, self.pending == 0)
            self.pipe = None


def _reregister(poller: Any, registered: dict[int, int], interests: list[tuple[int, int]]) -> dict[int, int]:
    wanted: dict[int, int] = {}
    for fd, event in interests:
        if fd >= 0:
            wanted[fd] = wanted.get(fd, 0) | event
    for fd in registered.keys() - wanted.keys():
        poller.unregister(fd)  # a finished side: its hang-up must not wake the loop
    for fd, events in wanted.items():
        if registered.get(fd) != events:
            poller.register(fd, events)  # registers or modifies
    return wanted


def tunnel_sync(client: Conn, upstream: Conn, activity: Activity, up: Any, down: Any) -> None:
    """Relay an established tunnel both ways on the calling proxy thread until both sides have
    closed. IdleTimeout when nothing moved for the idle bound, OSError on a reset; a server stop
    shuts the sockets down, which ends it at once."""
    _relay((_Way(client, upstream, up), _Way(upstream, client, down)), activity)


def relay_sync(src: Conn, dst: Conn, activity: Activity, counter: Any) -> None:
    """Relay ``src`` -> ``dst`` until ``src`` ends (a plain-HTTP answer), as ``tunnel_sync``.
    ``dst`` is not half-closed: the client sees the end when the proxy closes the connection,
    after the exchange is audited."""
    _relay((_Way(src, dst, counter, half_close=False),), activity)


def _relay(ways: tuple[_Way, ...], activity: Activity) -> None:
    """One poll(2) waits for whichever direction can move; nothing goes through the event loop."""
    poller = select.poll()
    registered: dict[int, int] = {}
    interests: list[tuple[int, int]] = []
    try:
        while not all(way.done for way in ways):
            now = [way.interest() for way in ways]
            if now != interests:  # re-register only when a direction starts waiting for something else
                interests = now
                registered = _reregister(poller, registered, now)
            left = activity.left()
            if left <= 0:
                raise IdleTimeout
            ready = {fd for fd, _ in poller.poll(left * 1000)}
            for way, (fd, _) in zip(ways, interests, strict=True):
                if fd in ready:  # a hang-up or error shows here too, and the step's splice reports it
                    way.step(activity)
    finally:
        for way in ways:
            way.close()


def relay_body_sync(reader: Reader, dst: Conn, framing: tuple[str, int], activity: Activity,
                    counter: Any) -> None:
    """Send exactly the request body the head announced; bytes after it are never relayed.
    BadRequest for a malformed chunked body, IdleTimeout, EndOfStream or OSError otherwise."""
    kind, length = framing
    if kind == "length":
        _copy_sync(reader, dst, length, activity, counter)
    elif kind == "chunked":
        while True:
            line = reader.read_until_sync(b"\r\n", 4096, activity)
            size_text = (line or b"").split(b";", 1)[0].strip(b" \t")
            if line is None or not _HEX.match(size_text):
                raise BadRequest("malformed_chunk")
            size = int(size_text, 16)
            dst.send_sync(line + b"\r\n", activity)
            if size == 0:
                break
            _copy_sync(reader, dst, size, activity, counter)
            if reader.read_until_sync(b"\r\n", 0, activity) is None:
                raise BadRequest("malformed_chunk")
            dst.send_sync(b"\r\n", activity)
        for _ in range(64):  # trailer section, bounded
            trailer = reader.read_until_sync(b"\r\n", 8192, activity)
            if trailer is None:
                raise BadRequest("malformed_chunk")
            dst.send_sync(trailer + b"\r\n", activity)
            if not trailer:
                return
        raise BadRequest("malformed_chunk")


def _copy_sync(reader: Reader, dst: Conn, n: int, activity: Activity, counter: Any) -> None:
    while n > 0:
        if not reader.buffer:
            reader.fill_sync(activity)
        data = reader.take(min(n, len(reader.buffer)))
        activity.touch()
        dst.send_sync(data, activity)
        counter.inc(len(data))
        n -= len(data)
