"""A bare CONNECT relay for bench/egress.py: the ceiling of any relay on this machine.

No policy, no credential, no audit, no bounds: threads wait in accept(2); each reads a CONNECT
head, connects to the address it names, answers 200 and relays both ways with splice(2) through
a pipe, one poll(2) over both sockets (the same syscalls the egress proxy's relay makes). What it
loses against a direct connection is the cost of a second TCP connection and a third busy process
on the machine, not of any decision: the egress proxy cannot do better than this.
"""

from __future__ import annotations

import fcntl
import os
import select
import socket
import threading

CHUNK = 1 << 20
FLAGS = os.SPLICE_F_MOVE | os.SPLICE_F_NONBLOCK


def _relay(client: socket.socket, upstream: socket.socket) -> None:
    pipe_r, pipe_w = os.pipe2(os.O_NONBLOCK)
    fcntl.fcntl(pipe_w, 1031, CHUNK)  # F_SETPIPE_SZ
    other = {client.fileno(): upstream, upstream.fileno(): client}
    poller = select.poll()
    for fd in other:
        poller.register(fd, select.POLLIN)
    open_ways = 2
    try:
        while open_ways:
            for fd, _ in poller.poll():
                dst = other[fd]
                for _ in range(16):
                    try:
                        n = os.splice(fd, pipe_w, CHUNK, flags=FLAGS)
                    except BlockingIOError:
                        break
                    if n == 0:  # EOF: pass the half-close on
                        poller.unregister(fd)
                        open_ways -= 1
                        dst.shutdown(socket.SHUT_WR)
                        break
                    while n:
                        try:
                            n -= os.splice(pipe_r, dst.fileno(), n, flags=FLAGS)
                        except BlockingIOError:  # the destination is full: wait until it drains
                            waiter = select.poll()
                            waiter.register(dst, select.POLLOUT)
                            waiter.poll(1000)
    except OSError:
        pass  # a reset ends the relay
    finally:
        os.close(pipe_r)
        os.close(pipe_w)


def _serve(listener: socket.socket) -> None:
    while True:
        client, _ = listener.accept()
        with client:
            client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            head = b""
            while b"\r\n\r\n" not in head:
                data = client.recv(65536)
                if not data:
                    break
                head += data
            if not head.startswith(b"CONNECT "):
                continue  # a readiness probe, or anything else: closed
            host, _, port = head.split(b" ", 2)[1].decode().rpartition(":")
            with socket.create_connection((host, int(port))) as upstream:
                upstream.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                client.sendall(b"HTTP/1.1 200 Connection established\r\n\r\n")
                rest = head.split(b"\r\n\r\n", 1)[1]
                if rest:
                    upstream.sendall(rest)
                client.setblocking(False)
                upstream.setblocking(False)
                _relay(client, upstream)


def serve(host: str, port: int, threads: int = 8) -> None:
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind((host, port))
    listener.listen(1024)
    for _ in range(threads):
        threading.Thread(target=_serve, args=(listener,), daemon=True).start()
    threading.Event().wait()
