"""The egress proxy's connection threads: each connection is served on a thread of its own.

Why threads and not the event loop: a proxied connection is a short chain of waits (the head,
the upstream connect, the client's first flight, then the relay), and on an event loop every
wait costs a loop iteration, a future and a task step in Python, several times per
connection. A thread blocked in accept(2), recv(2) or poll(2) is woken by the kernel directly,
as in tinyproxy; the GIL is released while it waits, and the relay moves bytes with splice(2)
without entering Python. What needs the event loop (a DNS lookup, an approval held for the
operator, the credential broker's terminated connections) is called through the proxy's portal.

The pool is elastic: ``spare`` threads wait in accept(2); a thread that takes a connection
starts another when none is left waiting (up to ``limit()``), and a thread whose connection
ended leaves when enough others already wait. ``stop`` wakes every waiting thread and shuts
down every socket in use, so each thread ends promptly and before its sockets are closed.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from typing import Callable

log = logging.getLogger("risoluto.egress")


class ConnectionThreads:
    def __init__(self, listener: socket.socket, serve: Callable[[socket.socket, str], None], *,
                 spare: int, limit: Callable[[], int], name: str = "risoluto-egress"):
        self._listener = listener  # blocking: threads wait in accept(2)
        self._serve = serve
        self._spare = spare
        self._limit = limit
        self._name = name
        self._lock = threading.Lock()
        self._idle = 0
        self._count = 0
        self._live: set[socket.socket] = set()
        self._ended = threading.Event()
        self.stopping = False

    @property
    def count(self) -> int:
        return self._count

    def start(self) -> None:
        with self._lock:
            for _ in range(self._spare):
                self._spawn_locked()

    def track(self, sock: socket.socket) -> None:
        """Shut ``sock`` down if the proxy stops while it is in use."""
        with self._lock:
            if self.stopping:
                raise OSError("the egress proxy is stopping")
            self._live.add(sock)

    def untrack(self, sock: socket.socket) -> None:
        with self._lock:
            self._live.discard(sock)

    def stop(self) -> None:
        """Wake every thread: waiting ones leave accept(2), busy ones see their sockets shut down."""
        with self._lock:
            self.stopping = True
            live = list(self._live)
            if self._count == 0:
                self._ended.set()
        for sock in [self._listener, *live]:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass  # not connected, or closed meanwhile

    def join(self, timeout: float) -> bool:
        """Wait (blocking) until every thread has ended; False on timeout."""
        return self._ended.wait(timeout)

    def _spawn_locked(self) -> None:
        self._count += 1
        threading.Thread(target=self._run, name=self._name, daemon=True).start()

    def _run(self) -> None:
        try:
            while self._wait_for_work():
                try:
                    sock, peer = self._listener.accept()
                except OSError as exc:
                    if not self._accept_failed(exc):
                        return
                    continue
                if not self._took(sock):
                    return
                try:
                    self._serve(sock, str(peer[0]))
                finally:
                    self.untrack(sock)
        finally:
            with self._lock:
                self._count -= 1
                if self._count == 0 and self.stopping:
                    self._ended.set()

    def _wait_for_work(self) -> bool:
        """Become a waiting thread; False when this one should leave (stop, or enough others wait)."""
        with self._lock:
            if self.stopping or self._idle >= self._spare:
                return False
            self._idle += 1
            return True

    def _took(self, sock: socket.socket) -> bool:
        with self._lock:
            self._idle -= 1
            if self.stopping:
                sock.close()
                return False
            self._live.add(sock)
            if self._idle == 0 and self._count < self._limit():
                self._spawn_locked()  # someone must be in accept(2) for the next connection
            return True

    def _accept_failed(self, exc: OSError) -> bool:
        """After a failed accept(2): True to try again (after a pause for EMFILE and friends)."""
        with self._lock:
            self._idle -= 1
            if self.stopping:
                return False
        log.error("egress proxy: accept failed: %s", exc.strerror or exc)
        time.sleep(0.1)
        return True
