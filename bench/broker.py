"""Credential broker speed: a terminated, credential-injecting connection vs a plain CONNECT tunnel,
side by side with mitmproxy doing the same injection.

Everything runs on loopback in this one run: an HTTPS origin (its own process and CA, HTTP/1.1
keep-alive) on 127.0.0.1 and 127.0.0.2, the risoluto egress proxy (its own process: the real
EgressProxy and Broker; 127.0.0.1 is credentialed, so terminated; 127.0.0.2 is only allowlisted,
so an end-to-end tunnel), mitmproxy (``mitmdump`` with an addon that swaps the placeholder for
the real value, if found: ``--mitmdump PATH`` or on PATH) and a blocking TLS client.

Targets: keep-alive request with injection, added p50 <= 1.5 ms over the tunnel; first request on
a new connection (two handshakes), added p50 <= 5 ms; large download through the terminated
connection >= 0.4x the tunnel's throughput; against mitmproxy: throughput >= 2x, added latency
<= 0.5x.

Downloads are made by curl (C) from an origin that writes large TLS flights, so that neither end
limits the paths compared; the paths are interleaved, best of ``--rounds``. Besides MB/s the bench
prints each proxy's own CPU time per GB (from /proc): on a shared machine the wall-clock ratio
moves with other jobs' load, the CPU cost per byte much less.

    .venv/bin/python bench/broker.py [--mib 256] [--rounds 5] [--requests 300] [--mitmdump PATH]
"""

from __future__ import annotations

import argparse
import base64
import datetime
import ipaddress
import multiprocessing as mp
import os
import shutil
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from _servers import free_port, wait_port  # bench/ is on sys.path when run as a script

CRED_HOST, TUNNEL_HOST = "127.0.0.1", "127.0.0.2"
SECRET = "bench-proxy-secret-" + "z" * 16
AUTH = "Proxy-Authorization: Basic " + base64.b64encode(f"sbx-bench:{SECRET}".encode()).decode() + "\r\n"
REAL = "real-bench-token-" + "r" * 24


def make_origin_ca(tmp: Path) -> None:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.timezone.utc)
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "bench origin CA")])
    ca = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
          .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(hours=1))
          .not_valid_after(now + datetime.timedelta(days=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True).sign(key, hashes.SHA256()))
    leaf_key = ec.generate_private_key(ec.SECP256R1())
    sans = [x509.IPAddress(ipaddress.ip_address(h)) for h in (CRED_HOST, TUNNEL_HOST)]
    leaf = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "origin")]))
            .issuer_name(name).public_key(leaf_key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1)).not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName(sans), critical=False).sign(key, hashes.SHA256()))
    (tmp / "origin-ca.pem").write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    (tmp / "origin.pem").write_bytes(leaf.public_bytes(serialization.Encoding.PEM))
    (tmp / "origin.key").write_bytes(leaf_key.private_bytes(serialization.Encoding.PEM,
                                                            serialization.PrivateFormat.PKCS8,
                                                            serialization.NoEncryption()))


# -- origin: HTTPS, HTTP/1.1 keep-alive ---------------------------------------------------------
class BioTLS:
    """Blocking server-side TLS through memory BIOs, so that a large body leaves in a few big
    writes (an SSLSocket writes every 16 KiB record on its own: the origin would be the bottleneck)."""

    def __init__(self, sock: socket.socket, ctx: ssl.SSLContext):
        self.sock = sock
        self.incoming, self.outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.obj = ctx.wrap_bio(self.incoming, self.outgoing, server_side=True)
        while True:
            try:
                self.obj.do_handshake()
                break
            except ssl.SSLWantReadError:
                self._flush()
                self._feed()
        self._flush()

    def _flush(self) -> None:
        if self.outgoing.pending:
            self.sock.sendall(self.outgoing.read())

    def _feed(self) -> None:
        data = self.sock.recv(262144)
        if not data:
            raise EOFError
        self.incoming.write(data)

    def recv(self) -> bytes:
        while True:
            try:
                return self.obj.read(65536)
            except ssl.SSLWantReadError:
                self._flush()
                self._feed()
            except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
                return b""

    def sendall(self, data: bytes | memoryview) -> None:
        self.obj.write(data)
        self._flush()


def run_origin(port: int, tmp: str) -> None:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(f"{tmp}/origin.pem", f"{tmp}/origin.key")
    ctx.set_alpn_protocols(["http/1.1"])
    blob = memoryview(os.urandom(4 * 1024 * 1024))

    def serve(conn: socket.socket) -> None:
        try:
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            tls = BioTLS(conn, ctx)
            data = b""
            while True:
                while b"\r\n\r\n" not in data:
                    chunk = tls.recv()
                    if not chunk:
                        return
                    data += chunk
                head, _, data = data.partition(b"\r\n\r\n")
                path = head.split(b" ", 2)[1].decode()
                size = int(path.rsplit("/", 1)[1]) if path.startswith("/big/") else 2
                tls.sendall(f"HTTP/1.1 200 OK\r\nContent-Length: {size}\r\n\r\n".encode()
                            + (b"ok" if size == 2 and not path.startswith("/big/") else b""))
                while path.startswith("/big/") and size > 0:
                    n = min(size, len(blob))
                    tls.sendall(blob[:n])
                    size -= n
        except (OSError, ssl.SSLError, EOFError):
            pass
        finally:
            conn.close()

    def listen(host: str) -> None:
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(512)
        while True:
            conn, _ = sock.accept()
            threading.Thread(target=serve, args=(conn,), daemon=True).start()

    threading.Thread(target=listen, args=(TUNNEL_HOST,), daemon=True).start()
    listen(CRED_HOST)


# -- the risoluto proxy with its broker -----------------------------------------------------------
def run_proxy(port: int, origin_port: int, tmp: str) -> None:
    here = Path(__file__).resolve().parent
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != here]  # bench/secrets.py shadows the stdlib's
    if "secrets" in sys.modules and Path(getattr(sys.modules["secrets"], "__file__", "") or "/").parent == here:
        del sys.modules["secrets"]
    import logging

    import anyio
    import attrs

    from risoluto.backends import SecretsBackend
    from risoluto.kernel import Kernel
    from risoluto.plugins.egress._broker_launch import make_broker
    from risoluto.plugins.egress._metrics import metrics_for
    from risoluto.plugins.egress._hosts import Allowlist
    from risoluto.plugins.egress._proxy import Client, EgressProxy
    from risoluto.settings import build_settings

    allow = [f"{CRED_HOST}:{origin_port}", f"{TUNNEL_HOST}:{origin_port}"]
    settings = build_settings({
        "codex": {"sandbox": {"egressAllowlist": allow}},
        "egress": {"allowPrivateNetworks": ["127.0.0.0/8"], "maxConnections": 512, "upstreamCaFile": f"{tmp}/origin-ca.pem",
                   "credentials": [{"secret": "BENCH_TOKEN", "hosts": [f"{CRED_HOST}:{origin_port}"]}]},
    }, None, {"DATA_DIR": tmp})
    kernel = Kernel(settings)

    class Store:
        async def get(self, name: str) -> str | None:
            return REAL

    # the bench's fake store, put where only the kernel writes (tests/backend_support.py does the same)
    kernel._backends.current = attrs.evolve(kernel.backends, secrets=SecretsBackend.opened(Store(), "bench"))
    proxy = EgressProxy(lambda: kernel.settings.egress, kernel.hooks.egress_decision, metrics_for(kernel))
    proxy.broker = make_broker(kernel)
    proxy.register(Client(username="sbx-bench", secret=SECRET.encode(), sandbox="sbx-bench",
                          allowlist=Allowlist(allow), addresses=frozenset({"127.0.0.1"})))
    state = proxy.broker.prepare("sbx-bench", {"BENCH_TOKEN"}, 3600)
    proxy.broker.register(state)
    Path(tmp, "sandbox-ca.pem").write_bytes(state.ca.pem)
    Path(tmp, "placeholder").write_text(state.placeholders["BENCH_TOKEN"])
    logging.getLogger("risoluto.egress").setLevel(logging.WARNING)  # the decision log is not the benchmark
    anyio.run(proxy.serve, "127.0.0.1", port)


MITM_ADDON = '''
from pathlib import Path
PLACEHOLDER = Path(__file__).with_name("placeholder").read_text()

def request(flow):
    value = flow.request.headers.get("authorization", "")
    if PLACEHOLDER in value:
        flow.request.headers["authorization"] = "Bearer %s"
'''


def start_mitmproxy(binary: str, tmp: Path) -> tuple[subprocess.Popen, int]:
    port = free_port()
    (tmp / "mitm_addon.py").write_text(MITM_ADDON % REAL)
    confdir = tmp / "mitm"
    confdir.mkdir()
    proc = subprocess.Popen(
        [binary, "-q", "--listen-host", "127.0.0.1", "-p", str(port), "--set", f"confdir={confdir}",
         "--set", f"ssl_verify_upstream_trusted_ca={tmp}/origin-ca.pem", "--set", "stream_large_bodies=1m",
         "--set", "http2=false", "-s", str(tmp / "mitm_addon.py")],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_port(port, proc, "mitmdump")
    deadline = time.time() + 15
    while not (confdir / "mitmproxy-ca-cert.pem").exists() and time.time() < deadline:
        time.sleep(0.05)
    return proc, port


# -- client ------------------------------------------------------------------------------------
class Session:
    """CONNECT through a proxy, TLS trusting ``cafile``, HTTP/1.1 keep-alive requests."""

    def __init__(self, proxy_port: int, host: str, origin_port: int, cafile: str, auth: str, proxy_auth: str = AUTH):
        sock = socket.create_connection(("127.0.0.1", proxy_port))
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.sendall(f"CONNECT {host}:{origin_port} HTTP/1.1\r\nHost: {host}:{origin_port}\r\n{proxy_auth}\r\n".encode())
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = sock.recv(4096)
            if not chunk:
                raise RuntimeError("proxy closed the CONNECT")
            head += chunk
        if not head.startswith(b"HTTP/1.1 200") and not head.startswith(b"HTTP/1.0 200"):
            raise RuntimeError(f"CONNECT refused: {head[:200]!r}")
        ctx = ssl.create_default_context(cafile=cafile)
        ctx.set_alpn_protocols(["http/1.1"])
        self.tls = ctx.wrap_socket(sock, server_hostname=host)
        self.host = f"{host}:{origin_port}"
        self.auth = auth
        self.buf = memoryview(bytearray(4 * 1024 * 1024))
        self.extra = b""

    def get(self, path: str) -> int:
        self.tls.sendall(f"GET {path} HTTP/1.1\r\nHost: {self.host}\r\nAuthorization: Bearer {self.auth}\r\n\r\n"
                         .encode())
        data = self.extra
        while b"\r\n\r\n" not in data:
            chunk = self.tls.recv(65536)
            if not chunk:
                raise RuntimeError("connection closed before the head")
            data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        if not head.startswith(b"HTTP/1.1 200"):
            raise RuntimeError(f"unexpected answer: {head[:300]!r}")
        length = int(next(line.split(b":")[1] for line in head.split(b"\r\n") if line.lower().startswith(b"content-length")))
        got = len(body)
        self.extra = body[length:] if got > length else b""
        while got < length:
            n = self.tls.recv_into(self.buf, min(len(self.buf), length - got))
            if not n:
                raise RuntimeError("connection closed in the body")
            got += n
        return min(got, length)

    def close(self) -> None:
        self.tls.close()


def keepalive_latency(makers: dict[str, callable], n: int) -> dict[str, list[float]]:
    """One connection per path, requests round-robin across the paths (load hits each alike)."""
    sessions = {name: make() for name, make in makers.items()}
    times: dict[str, list[float]] = {name: [] for name in makers}
    try:
        for i in range(n + 30):
            for name, s in sessions.items():
                start = time.perf_counter()
                s.get("/small")
                if i >= 30:  # warm-up
                    times[name].append((time.perf_counter() - start) * 1000)
        return times
    finally:
        for s in sessions.values():
            s.close()


def first_request_latency(makers: dict[str, callable], n: int) -> dict[str, list[float]]:
    """A new connection + one request, round-robin across the paths."""
    times: dict[str, list[float]] = {name: [] for name in makers}
    for i in range(n + 10):
        for name, make in makers.items():
            start = time.perf_counter()
            s = make()
            s.get("/small")
            elapsed = (time.perf_counter() - start) * 1000
            s.close()
            if i >= 10:  # warm-up: the leaf certificate is made once, then cached
                times[name].append(elapsed)
    return times


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (from /proc): what a path costs the proxy,
    whatever else the machine is doing."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def throughput(curl: list[str], mib: int, pid: int) -> tuple[float, float]:
    """(MB/s of one download by curl, proxy CPU seconds per GB). curl is C, so the client is not
    what limits the paths compared."""
    url = curl[-1] + f"/big/{mib * 1024 * 1024}"
    before = cpu_seconds(pid)
    out = subprocess.run([*curl[:-1], "-sS", "-o", "/dev/null", "-w", "%{size_download} %{speed_download}", url],
                         capture_output=True, text=True, timeout=600)
    size, speed = out.stdout.split()
    if out.returncode != 0 or int(size) != mib * 1024 * 1024:
        raise RuntimeError(f"curl failed: {out.stderr.strip()} ({size} bytes)")
    return float(speed) / 1e6, (cpu_seconds(pid) - before) / (int(size) / 1e9)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--mib", type=int, default=256, help="size of the large download (MiB)")
    parser.add_argument("--rounds", type=int, default=5, help="large downloads per path (best is kept)")
    parser.add_argument("--requests", type=int, default=300, help="requests timed per path and kind")
    parser.add_argument("--mitmdump", default=shutil.which("mitmdump") or "", help="path of mitmdump (mitmproxy)")
    args = parser.parse_args()
    mpc = mp.get_context("spawn")
    with tempfile.TemporaryDirectory() as tmpdir:
        tmp = Path(tmpdir)
        make_origin_ca(tmp)
        origin_port, proxy_port = free_port(), free_port()
        origin = mpc.Process(target=run_origin, args=(origin_port, tmpdir), daemon=True)
        origin.start()
        wait_port(origin_port, origin, "origin")
        proxy = mpc.Process(target=run_proxy, args=(proxy_port, origin_port, tmpdir), daemon=True)
        proxy.start()
        wait_port(proxy_port, proxy, "risoluto proxy")
        placeholder = (tmp / "placeholder").read_text()
        mitm, mitm_port = None, 0
        paths = {
            "tunnel": lambda: Session(proxy_port, TUNNEL_HOST, origin_port, f"{tmp}/origin-ca.pem", placeholder),
            "broker": lambda: Session(proxy_port, CRED_HOST, origin_port, f"{tmp}/sandbox-ca.pem", placeholder),
        }
        if args.mitmdump:
            mitm, mitm_port = start_mitmproxy(args.mitmdump, tmp)
            paths["mitmproxy"] = lambda: Session(mitm_port, CRED_HOST, origin_port,
                                                 f"{tmp}/mitm/mitmproxy-ca-cert.pem", placeholder, proxy_auth="")
        auth = ["-H", f"Authorization: Bearer {placeholder}"]
        proxy_url = f"http://sbx-bench:{SECRET}@127.0.0.1:{proxy_port}"
        curls = {
            "tunnel": ["curl", "--proxy", proxy_url, "--cacert", f"{tmp}/origin-ca.pem", *auth,
                       f"https://{TUNNEL_HOST}:{origin_port}"],
            "broker": ["curl", "--proxy", proxy_url, "--cacert", f"{tmp}/sandbox-ca.pem", *auth,
                       f"https://{CRED_HOST}:{origin_port}"],
        }
        if mitm is not None:
            curls["mitmproxy"] = ["curl", "--proxy", f"http://127.0.0.1:{mitm_port}", "--cacert",
                                  f"{tmp}/mitm/mitmproxy-ca-cert.pem", *auth, f"https://{CRED_HOST}:{origin_port}"]
        try:
            tput = {name: 0.0 for name in paths}
            cpu = {name: float("inf") for name in paths}
            pids = {"tunnel": proxy.pid, "broker": proxy.pid, "mitmproxy": mitm.pid if mitm else 0}
            for _ in range(args.rounds):  # interleaved, best of each: background load hits every path alike
                for name, curl in curls.items():
                    speed, cost = throughput(curl, args.mib, pids[name])
                    tput[name], cpu[name] = max(tput[name], speed), min(cpu[name], cost)
            keep = keepalive_latency(paths, args.requests)
            first = first_request_latency(paths, max(50, args.requests // 3))
        finally:
            if mitm is not None:
                mitm.terminate()
                mitm.wait()
            for proc in (proxy, origin):
                proc.terminate()
                proc.join()
    p50k = {name: statistics.median(v) for name, v in keep.items()}
    p50f = {name: statistics.median(v) for name, v in first.items()}
    print(f"large download ({args.mib} MiB on one connection, best of {args.rounds}, MB/s):")
    for name, value in tput.items():
        print(f"  {name:<10} {value:10.0f}   (proxy CPU {cpu[name]:.2f} s per GB)")
    print(f"keep-alive GET ({args.requests} requests, p50 ms):  " +
          "  ".join(f"{name} {p50k[name]:.3f}" for name in paths))
    print("first request on a new connection (CONNECT + TLS + GET, p50 ms):  " +
          "  ".join(f"{name} {p50f[name]:.3f}" for name in paths))
    added_k = p50k["broker"] - p50k["tunnel"]
    added_f = p50f["broker"] - p50f["tunnel"]
    ratio = tput["broker"] / tput["tunnel"]
    ok = added_k <= 1.5 and added_f <= 5.0 and ratio >= 0.4
    print("ratios:")
    print(f"  keep-alive added p50      {added_k:.3f} ms  (target <= 1.5)")
    print(f"  first request added p50   {added_f:.3f} ms  (target <= 5.0)")
    print(f"  throughput broker/tunnel  {ratio:.2f}x  (target >= 0.4)")
    if "mitmproxy" in paths:
        mk, mf = p50k["mitmproxy"] - p50k["tunnel"], p50f["mitmproxy"] - p50f["tunnel"]
        vs = tput["broker"] / tput["mitmproxy"]
        print(f"  throughput broker/mitmproxy       {vs:.2f}x  (target >= 2; proxy CPU per byte: mitmproxy/broker "
              f"{cpu['mitmproxy'] / cpu['broker']:.2f}x)")
        print(f"  keep-alive added: broker/mitmproxy {added_k / mk:.2f}  (target <= 0.5; mitmproxy adds {mk:.3f} ms)")
        print(f"  first request added: broker/mitmproxy {added_f / mf:.2f}  (target <= 0.5; mitmproxy adds {mf:.3f} ms)")
        ok = ok and vs >= 2 and added_k <= 0.5 * mk and added_f <= 0.5 * mf
    else:
        print("  mitmproxy: not found (pip install mitmproxy, or --mitmdump PATH): comparison skipped")
        ok = False
    print("targets met" if ok else "TARGETS NOT MET")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
