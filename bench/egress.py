"""Egress proxy speed: a large transfer and per-connection latency, vs direct and vs tinyproxy.

Everything runs on loopback in this one run: an origin (its own process, sendfile), the
risoluto egress proxy (its own process, the real EgressProxy with a registered sandbox
credential and allowlist), tinyproxy (Debian package, started here with a config in a
temporary directory) and a blocking client. Targets: proxy throughput >= 0.5x direct and
>= 1.5x tinyproxy; added p50 latency per new connection <= 1 ms.

    .venv/bin/python bench/egress.py [--mib 512] [--requests 400]
"""

from __future__ import annotations

import argparse
import base64
import multiprocessing as mp
import os
import shutil
import socket
import socketserver
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _servers import free_port  # bench/ is on sys.path when run as a script

HOST = "127.0.0.1"
SECRET = "bench-secret-" + "z" * 16
AUTH = "Proxy-Authorization: Basic " + base64.b64encode(f"sbx-bench:{SECRET}".encode()).decode() + "\r\n"


# -- origin ------------------------------------------------------------------------------
def run_origin(port: int, blob: str) -> None:
    class Handler(socketserver.BaseRequestHandler):
        def handle(self) -> None:
            data = b""
            while b"\r\n\r\n" not in data:
                chunk = self.request.recv(65536)
                if not chunk:
                    return
                data += chunk
            path = data.split(b" ", 2)[1].decode()
            size = int(path.rsplit("/", 1)[1]) if path.startswith("/big/") else 2
            self.request.sendall(f"HTTP/1.1 200 OK\r\nContent-Length: {size}\r\nConnection: close\r\n\r\n".encode())
            if size == 2:
                self.request.sendall(b"ok")
                return
            with open(blob, "rb") as f:
                blob_size = os.fstat(f.fileno()).st_size
                while size > 0:
                    sent = os.sendfile(self.request.fileno(), f.fileno(), 0, min(size, blob_size))
                    size -= sent

    socketserver.ThreadingTCPServer.allow_reuse_address = True
    socketserver.ThreadingTCPServer.daemon_threads = True
    with socketserver.ThreadingTCPServer((HOST, port), Handler) as server:
        server.serve_forever()


# -- the risoluto proxy ------------------------------------------------------------------
def run_proxy(port: int, origin_port: int, data_dir: str) -> None:
    import anyio

    from risoluto.kernel import Kernel
    from risoluto.plugins.egress._metrics import metrics_for
    from risoluto.plugins.egress.allowlist import Allowlist
    from risoluto.plugins.egress._proxy import Client, EgressProxy
    from risoluto.settings import build_settings

    settings = build_settings({"egress": {"allowPrivateNetworks": ["127.0.0.0/8"], "maxConnections": 512}},
                              None, {"DATA_DIR": data_dir})
    kernel = Kernel(settings)
    proxy = EgressProxy(lambda: kernel.settings.egress, kernel.hooks.egress_decision, metrics_for(kernel))
    proxy.register(Client(username="sbx-bench", secret=SECRET.encode(), sandbox="sbx-bench",
                          allowlist=Allowlist([f"{HOST}:{origin_port}"]), addresses=frozenset({HOST})))
    import logging

    logging.getLogger("risoluto.egress").setLevel(logging.WARNING)  # the decision log is not the benchmark
    anyio.run(proxy.serve, HOST, port)


# -- client ------------------------------------------------------------------------------
def fetch(target: tuple[str, int], path: str, proxied: bool, origin_port: int, buf: memoryview) -> int:
    """One request on a new connection; returns the body size read."""
    with socket.create_connection(target) as s:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        url = f"http://{HOST}:{origin_port}{path}" if proxied else path
        s.sendall(f"GET {url} HTTP/1.1\r\nHost: {HOST}:{origin_port}\r\n{AUTH if proxied else ''}\r\n".encode())
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = s.recv(65536)
            if not chunk:
                raise RuntimeError(f"connection closed before the head; got {head[:200]!r}")
            head += chunk
        header, _, body = head.partition(b"\r\n\r\n")
        if not header.startswith(b"HTTP/1.1 200") and not header.startswith(b"HTTP/1.0 200"):
            raise RuntimeError(f"unexpected answer: {header[:200]!r}")
        lines = header.split(b"\r\n")
        length = int(next(line.split(b":")[1] for line in lines if line.lower().startswith(b"content-length")))
        got = len(body)
        while got < length:
            n = s.recv_into(buf)
            if not n:
                break
            got += n
        return got


def transfer(target: tuple[str, int], proxied: bool, origin_port: int, mib: int) -> float:
    """MB/s of one large download on a new connection."""
    buf = memoryview(bytearray(4 * 1024 * 1024))
    start = time.perf_counter()
    got = fetch(target, f"/big/{mib * 1024 * 1024}", proxied, origin_port, buf)
    elapsed = time.perf_counter() - start
    assert got == mib * 1024 * 1024, got
    return got / elapsed / 1e6


def latency(target: tuple[str, int], proxied: bool, origin_port: int, n: int) -> list[float]:
    buf = memoryview(bytearray(65536))
    for _ in range(20):  # warm-up
        fetch(target, "/small", proxied, origin_port, buf)
    times = []
    for _ in range(n):
        start = time.perf_counter()
        fetch(target, "/small", proxied, origin_port, buf)
        times.append((time.perf_counter() - start) * 1000)
    return times


def wait_port(port: int, proc: mp.Process | subprocess.Popen, what: str) -> None:
    deadline = time.time() + 15
    while time.time() < deadline:
        try:
            socket.create_connection((HOST, port), timeout=0.2).close()
            return
        except OSError:
            alive = proc.poll() is None if isinstance(proc, subprocess.Popen) else proc.is_alive()
            if not alive:
                raise SystemExit(f"{what} exited before listening") from None
            time.sleep(0.05)
    raise SystemExit(f"{what} did not listen on {port}")


def start_tinyproxy(tmp: Path, origin_port: int) -> tuple[subprocess.Popen, int]:
    binary = shutil.which("tinyproxy")
    if binary is None:
        raise SystemExit("tinyproxy not found: apt-get install -y tinyproxy (the baseline of this benchmark)")
    port = free_port()
    conf = tmp / "tinyproxy.conf"
    conf.write_text(
        f"Port {port}\nListen {HOST}\nTimeout 600\nMaxClients 512\nAllow {HOST}\nDisableViaHeader Yes\n"
        f"LogLevel Critical\nLogFile \"{tmp}/tinyproxy.log\"\nPidFile \"{tmp}/tinyproxy.pid\"\n"
        f"ConnectPort {origin_port}\n"
    )
    proc = subprocess.Popen([binary, "-d", "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_port(port, proc, "tinyproxy")
    return proc, port


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--mib", type=int, default=512, help="size of the large transfer (MiB)")
    parser.add_argument("--rounds", type=int, default=5, help="large transfers per path (best is kept)")
    parser.add_argument("--requests", type=int, default=400, help="new connections timed per path")
    args = parser.parse_args()
    ctx = mp.get_context("spawn")
    with tempfile.TemporaryDirectory() as tmpdir:
        tmp = Path(tmpdir)
        blob = tmp / "blob"
        blob.write_bytes(os.urandom(1024 * 1024) * 64)
        origin_port, proxy_port = free_port(), free_port()
        origin = ctx.Process(target=run_origin, args=(origin_port, str(blob)), daemon=True)
        origin.start()
        wait_port(origin_port, origin, "origin")
        proxy = ctx.Process(target=run_proxy, args=(proxy_port, origin_port, str(tmp)), daemon=True)
        proxy.start()
        wait_port(proxy_port, proxy, "risoluto proxy")
        tiny, tiny_port = start_tinyproxy(tmp, origin_port)
        try:
            paths = {"direct": ((HOST, origin_port), False), "risoluto": ((HOST, proxy_port), True),
                     "tinyproxy": ((HOST, tiny_port), True)}
            # interleaved rounds, best of each: background load on the host hits every path alike
            tput = {name: 0.0 for name in paths}
            for _ in range(args.rounds):
                for name, (t, p) in paths.items():
                    tput[name] = max(tput[name], transfer(t, p, origin_port, args.mib))
            lat = {name: latency(t, p, origin_port, args.requests) for name, (t, p) in paths.items()}
        finally:
            tiny.terminate()
            tiny.wait()
            for proc in (proxy, origin):
                proc.terminate()
                proc.join()
    p50 = {name: statistics.median(v) for name, v in lat.items()}
    p95 = {name: statistics.quantiles(v, n=20)[18] for name, v in lat.items()}
    print(f"large transfer ({args.mib} MiB, best of {args.rounds}, MB/s):")
    for name, value in tput.items():
        print(f"  {name:<10} {value:10.0f}")
    print(f"new connection + small GET ({args.requests} requests, ms):")
    for name in lat:
        print(f"  {name:<10} p50 {p50[name]:.3f}  p95 {p95[name]:.3f}")
    vs_direct = tput["risoluto"] / tput["direct"]
    vs_tiny = tput["risoluto"] / tput["tinyproxy"]
    added = p50["risoluto"] - p50["direct"]
    print("ratios:")
    print(f"  throughput risoluto/direct    {vs_direct:.2f}x  (target >= 0.5)")
    print(f"  throughput risoluto/tinyproxy {vs_tiny:.2f}x  (target >= 1.5)")
    print(f"  added p50 latency per connection {added:.3f} ms  (target <= 1.0; tinyproxy adds "
          f"{p50['tinyproxy'] - p50['direct']:.3f} ms)")
    ok = vs_direct >= 0.5 and vs_tiny >= 1.5 and added <= 1.0
    print("targets met" if ok else "TARGETS NOT MET")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
