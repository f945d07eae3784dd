"""Egress proxy speed: large transfers and per-connection latency, vs direct and vs tinyproxy.

Everything runs on loopback in this one run: an origin (its own process, sendfile), the
risoluto egress proxy twice (its own processes, the real EgressProxy with a registered sandbox
credential and allowlist: once with the decision audit writing to a file, once counting in
memory only), tinyproxy (Debian package, started here with a config in a temporary directory),
a bare splice relay (``_bare_relay``: no decisions at all, the ceiling of any relay here) and a
blocking client. Paths: ``direct``, CONNECT tunnels through each proxy (``tunnel``,
``tunnel-noaudit``, ``tiny-tunnel``, ``bare-tunnel``) and plain HTTP through the two proxies
(``http``, ``tiny-http``). New connections are timed on direct, tunnel, tiny-tunnel, http and
tiny-http only: on two cores, each further Python process in the interleave slows the paths
after it (the bare relay there moved the tunnel's added p50 by about 0.05 ms).

A loopback "direct" transfer is itself unsteady on a busy machine (its speed varies with the
transfer size and with what else runs), so the yardstick is made steady first: several sizes,
all paths interleaved in every round, each figure the median of the rounds with its spread
(min-max). A ratio is the median of the per-round ratios (the two transfers of a pair ran one
after the other, so load that comes and goes falls on both), judged at the size where direct
was steadiest (smallest spread relative to its median). Targets: tunnel >= 0.9x direct and >= 4x
tinyproxy's tunnel; audit on within 5% of audit off; added p50 per new connection <= tinyproxy's.

    .venv/bin/python bench/egress.py [--sizes 64,256,512] [--rounds 5] [--requests 400]
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

import _bare_relay  # bench/ is on sys.path when run as a script
from _servers import free_port, wait_port

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
def run_proxy(port: int, origin_port: int, data_dir: str, audit: bool = True) -> None:
    # bench/ holds a secrets.py of its own: drop it from the path before the kernel imports the stdlib's
    here = Path(__file__).resolve().parent
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != here]
    import anyio

    from risoluto.kernel import Kernel
    from risoluto.plugins.egress._audit import audit_for
    from risoluto.plugins.egress._metrics import metrics_for
    from risoluto.plugins.egress._hosts import Allowlist
    from risoluto.plugins.egress._proxy import Client, EgressProxy
    from risoluto.settings import build_settings

    settings = build_settings({"egress": {"allowPrivateNetworks": ["127.0.0.0/8"], "maxConnections": 512}},
                              None, {"DATA_DIR": data_dir})
    kernel = Kernel(settings)
    proxy = EgressProxy(lambda: kernel.settings.egress, kernel.hooks.egress_decision, metrics_for(kernel),
                        audit=audit_for(kernel) if audit else None)  # None: counted in memory, no file
    proxy.register(Client(username="sbx-bench", secret=SECRET.encode(), sandbox="sbx-bench",
                          allowlist=Allowlist([f"{HOST}:{origin_port}"]), addresses=frozenset({HOST})))
    import logging

    logging.getLogger("risoluto.egress").setLevel(logging.WARNING)  # the decision log is not the benchmark
    anyio.run(proxy.serve, HOST, port)


# -- client ------------------------------------------------------------------------------
def fetch(target: tuple[str, int], path: str, mode: str, origin_port: int, buf: memoryview) -> int:
    """One request on a new connection (``mode``: direct, http, tunnel); returns the body size read."""
    with socket.create_connection(target) as s:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if mode == "tunnel":
            s.sendall(f"CONNECT {HOST}:{origin_port} HTTP/1.1\r\nHost: {HOST}:{origin_port}\r\n{AUTH}\r\n".encode())
            answer = b""
            while b"\r\n\r\n" not in answer:
                chunk = s.recv(4096)
                if not chunk:
                    raise RuntimeError(f"tunnel closed before its answer; got {answer[:200]!r}")
                answer += chunk
            if b" 200 " not in answer.split(b"\r\n", 1)[0]:
                raise RuntimeError(f"tunnel refused: {answer[:200]!r}")
        url = f"http://{HOST}:{origin_port}{path}" if mode == "http" else path
        auth = AUTH if mode == "http" else ""
        s.sendall(f"GET {url} HTTP/1.1\r\nHost: {HOST}:{origin_port}\r\n{auth}\r\n".encode())
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


def transfer(target: tuple[str, int], mode: str, origin_port: int, mib: int) -> float:
    """MB/s of one large download on a new connection."""
    buf = memoryview(bytearray(4 * 1024 * 1024))
    start = time.perf_counter()
    got = fetch(target, f"/big/{mib * 1024 * 1024}", mode, origin_port, buf)
    elapsed = time.perf_counter() - start
    assert got == mib * 1024 * 1024, got
    return got / elapsed / 1e6


def latency(paths: dict[str, tuple[tuple[str, int], str]], origin_port: int, n: int) -> dict[str, list[float]]:
    """Milliseconds per new connection + small GET, the paths interleaved request by request."""
    buf = memoryview(bytearray(65536))
    for target, mode in paths.values():  # warm-up
        for _ in range(20):
            fetch(target, "/small", mode, origin_port, buf)
    times: dict[str, list[float]] = {name: [] for name in paths}
    for _ in range(n):
        for name, (target, mode) in paths.items():
            start = time.perf_counter()
            fetch(target, "/small", mode, origin_port, buf)
            times[name].append((time.perf_counter() - start) * 1000)
    return times


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
    wait_port(port, proc, "tinyproxy", timeout=15)
    return proc, port


def spread(values: list[float]) -> str:
    return f"{statistics.median(values):7.0f} ({min(values):.0f}-{max(values):.0f})"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="64,256,512", help="sizes of the large transfers (MiB, comma-separated)")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds of every size and path")
    parser.add_argument("--requests", type=int, default=400, help="new connections timed per path")
    args = parser.parse_args()
    sizes = [int(x) for x in args.sizes.split(",")]
    ctx = mp.get_context("spawn")
    with tempfile.TemporaryDirectory() as tmpdir:
        tmp = Path(tmpdir)
        blob = tmp / "blob"
        blob.write_bytes(os.urandom(1024 * 1024) * 64)
        origin_port, proxy_port, quiet_port = free_port(), free_port(), free_port()
        origin = ctx.Process(target=run_origin, args=(origin_port, str(blob)), daemon=True)
        origin.start()
        wait_port(origin_port, origin, "origin", timeout=15)
        (tmp / "audited").mkdir()
        (tmp / "quiet").mkdir()
        proxy = ctx.Process(target=run_proxy, args=(proxy_port, origin_port, str(tmp / "audited")), daemon=True)
        proxy.start()
        quiet = ctx.Process(target=run_proxy, args=(quiet_port, origin_port, str(tmp / "quiet"), False), daemon=True)
        quiet.start()
        wait_port(proxy_port, proxy, "risoluto proxy", timeout=15)
        wait_port(quiet_port, quiet, "risoluto proxy (no audit)", timeout=15)
        tiny, tiny_port = start_tinyproxy(tmp, origin_port)
        bare_port = free_port()
        bare = ctx.Process(target=_bare_relay.serve, args=(HOST, bare_port), daemon=True)
        bare.start()
        wait_port(bare_port, bare, "bare relay", timeout=15)
        try:
            paths = {
                "direct": ((HOST, origin_port), "direct"),
                "tunnel": ((HOST, proxy_port), "tunnel"),
                "tunnel-noaudit": ((HOST, quiet_port), "tunnel"),
                "tiny-tunnel": ((HOST, tiny_port), "tunnel"),
                "bare-tunnel": ((HOST, bare_port), "tunnel"),
                "http": ((HOST, proxy_port), "http"),
                "tiny-http": ((HOST, tiny_port), "http"),
            }
            # interleaved: every round runs every size through every path, so load from other jobs
            # on the host falls on all of them alike
            tput: dict[int, dict[str, list[float]]] = {mib: {name: [] for name in paths} for mib in sizes}
            for _ in range(args.rounds):
                for mib in sizes:
                    for name, (t, mode) in paths.items():
                        tput[mib][name].append(transfer(t, mode, origin_port, mib))
            lat = latency({k: v for k, v in paths.items() if k in ("direct", "tunnel", "tiny-tunnel", "http",
                                                                     "tiny-http")}, origin_port, args.requests)
            audit_lines = sum(1 for _ in open(tmp / "audited" / "egress-audit.log"))
        finally:
            tiny.terminate()
            tiny.wait()
            for proc in (proxy, quiet, bare, origin):
                proc.terminate()
                proc.join()
    print(f"large transfers, MB/s: median of {args.rounds} interleaved rounds (min-max)")
    print("  " + "size".ljust(8) + "".join(name.rjust(22) for name in paths))
    for mib in sizes:
        print(f"  {mib:>4} MiB" + "".join(spread(tput[mib][name]).rjust(22) for name in paths))
    # judge where the yardstick held still: the size with the smallest relative spread of direct
    def steadiness(mib: int) -> float:
        d = tput[mib]["direct"]
        return (max(d) - min(d)) / statistics.median(d)

    def ratio(mib: int, a: str, b: str) -> float:
        """Median of the per-round ratios a/b at ``mib`` (a pair ran back to back)."""
        return statistics.median(x / y for x, y in zip(tput[mib][a], tput[mib][b], strict=True))

    steady = min(sizes, key=steadiness)
    p50 = {name: statistics.median(v) for name, v in lat.items()}
    p95 = {name: statistics.quantiles(v, n=20)[18] for name, v in lat.items()}
    print(f"new connection + small GET ({args.requests} requests per path, interleaved, ms):")
    for name in lat:
        print(f"  {name:<14} p50 {p50[name]:.3f}  p95 {p95[name]:.3f}")
    print(f"audit lines written by the audited proxy: {audit_lines}")
    vs_direct = ratio(steady, "tunnel", "direct")
    vs_tiny = ratio(steady, "tunnel", "tiny-tunnel")
    audit_cost = ratio(steady, "tunnel", "tunnel-noaudit")
    added = p50["tunnel"] - p50["direct"]
    tiny_added = p50["tiny-tunnel"] - p50["direct"]
    print(f"ratios at {steady} MiB (direct steadiest there: spread {steadiness(steady):.0%} of its median), "
          "each the median of the per-round ratios:")
    for mib in sizes:
        print(f"  [{mib} MiB: tunnel/direct {ratio(mib, 'tunnel', 'direct'):.2f}x, bare relay/direct "
              f"{ratio(mib, 'bare-tunnel', 'direct'):.2f}x, direct spread {steadiness(mib):.0%}]")
    print(f"  tunnel/direct                 {vs_direct:.2f}x  (target >= 0.9; the bare splice relay, no decisions "
          f"at all: {ratio(steady, 'bare-tunnel', 'direct'):.2f}x)")
    print(f"  tunnel/bare relay             {ratio(steady, 'tunnel', 'bare-tunnel'):.2f}x  (what the decisions cost "
          "a bulk transfer)")
    print(f"  tunnel/tinyproxy tunnel       {vs_tiny:.2f}x  (target >= 4; a relay adds a second TCP connection to "
          f"a direct one, and direct itself is {ratio(steady, 'direct', 'tiny-tunnel'):.2f}x tinyproxy here)")
    print(f"  audit on / audit off          {audit_cost:.2f}x  (target >= 0.95)")
    print(f"  plain HTTP/direct             {ratio(steady, 'http', 'direct'):.2f}x  (tinyproxy: "
          f"{ratio(steady, 'tiny-http', 'direct'):.2f}x)")
    print(f"  added p50 per new connection (tunnel) {added:.3f} ms  (target <= tinyproxy's {tiny_added:.3f} ms)")
    print(f"  added p50 per new connection (plain HTTP) {p50['http'] - p50['direct']:.3f} ms  (tinyproxy "
          f"{p50['tiny-http'] - p50['direct']:.3f} ms)")
    ok = vs_direct >= 0.9 and vs_tiny >= 4 and audit_cost >= 0.95 and added <= tiny_added
    print("targets met" if ok else "TARGETS NOT MET")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
