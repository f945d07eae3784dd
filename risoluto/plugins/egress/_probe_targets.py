"""Targets for the egress probes of ``doctor --probe`` (not a plugin itself; see ``egress.probes``).

Everything listens on this host: an "outside" stand-in in a network namespace of its own
(a veth pair, a 198.19.x.y/30 address; needs root and ``ip``), and host-service listeners on
the egress gateway and on another address of this host. Each records every connection and
datagram it sees; datagrams are answered like a DNS server would, so a reachable target is
also visible from inside the canary.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import secrets
import shutil
import socket
import struct
import subprocess
import threading
from typing import TYPE_CHECKING, Any, AsyncIterator, Callable

import anyio
import attrs

from ._firewall import tool_env

if TYPE_CHECKING:
    from risoluto.kernel import Kernel

CLONE_NEWNET = 0x40000000


@attrs.define
class Targets:
    """What the context started; read by the judges after the canary ran."""

    outside: str = ""  # IPv4 of the outside stand-in, "" when it could not be made
    outside_why: str = ""
    hosts: list[str] = attrs.field(factory=list)  # "ip:port" of the host-service listeners
    hits: dict[str, list[str]] = attrs.field(factory=lambda: {"outside-tcp": [], "outside-udp": [], "hosts": []})
    enforcer: str = ""


# --- the targets ---------------------------------------------------------------------------------
def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=20, env=tool_env())


class OutsideNamespace:
    """A network namespace behind a veth pair: routable from the host, not part of any Docker network."""

    def __init__(self) -> None:
        tag = secrets.token_hex(3)
        third, fourth = secrets.randbelow(256), 4 * secrets.randbelow(64)
        self.name, self.host_if, self.ns_if = f"rsl-probe-{tag}", f"rph{tag}", f"rpn{tag}"
        self.host_ip, self.ns_ip = f"198.19.{third}.{fourth + 1}", f"198.19.{third}.{fourth + 2}"

    def create(self) -> list[socket.socket]:
        create_veth_netns(self.name, self.host_if, self.ns_if, self.host_ip, self.ns_ip)
        try:
            return sockets_in_netns(self.name, lambda: _bind(self.ns_ip, 80, 53))
        except BaseException:
            self.remove()
            raise

    def remove(self) -> None:
        remove_veth_netns(self.name, self.host_if)


def create_veth_netns(name: str, host_if: str, ns_if: str, host_ip: str, ns_ip: str) -> None:
    """Network namespace ``name`` joined to the host by a veth pair on a /30: ``host_ip`` on
    this side, ``ns_ip`` inside. All or nothing: a failure removes what was made."""
    _ip("netns", "add", name)
    try:
        _ip("link", "add", host_if, "type", "veth", "peer", "name", ns_if)
        _ip("link", "set", ns_if, "netns", name)
        _ip("addr", "add", f"{host_ip}/30", "dev", host_if)
        _ip("link", "set", host_if, "up")
        for args in (("addr", "add", f"{ns_ip}/30", "dev", ns_if), ("link", "set", ns_if, "up"),
                     ("link", "set", "lo", "up")):
            _ip("netns", "exec", name, "ip", *args)
    except BaseException:
        remove_veth_netns(name, host_if)
        raise


def remove_veth_netns(name: str, host_if: str) -> None:
    for args in (("link", "del", host_if), ("netns", "del", name)):
        with contextlib.suppress(Exception):
            _ip(*args)


def sockets_in_netns(netns: str, make: Callable[[], list[socket.socket]]) -> list[socket.socket]:
    """Run ``make`` (which binds sockets) inside network namespace ``netns``.

    A short-lived thread enters the namespace (setns), binds, and comes back before it ends;
    the sockets stay bound in the namespace while this process uses them from any thread.
    """
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    out: list[Any] = []

    def enter_and_bind() -> None:
        own = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
        target = os.open(f"/run/netns/{netns}", os.O_RDONLY)
        try:
            if libc.setns(target, CLONE_NEWNET) != 0:
                raise OSError(ctypes.get_errno(), "setns")
            try:
                out.extend(make())
            finally:
                libc.setns(own, CLONE_NEWNET)
        except BaseException as exc:  # reported to the caller
            out.append(exc)
        finally:
            os.close(own)
            os.close(target)

    thread = threading.Thread(target=enter_and_bind)
    thread.start()
    thread.join()
    for item in out:
        if isinstance(item, BaseException):
            raise item
    return out


def _bind(host: str, tcp_port: int, udp_port: int) -> list[socket.socket]:
    tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        tcp.bind((host, tcp_port))
        tcp.listen(16)
        udp.bind((host, udp_port or tcp.getsockname()[1]))
    except OSError:
        tcp.close()
        udp.close()
        raise
    for sock in (tcp, udp):
        sock.setblocking(False)
    return [tcp, udp]


def host_service_sockets(host: str) -> list[socket.socket]:
    """A TCP listener and a UDP socket on the same free port of ``host``."""
    for _ in range(10):
        try:
            return _bind(host, 0, 0)
        except OSError:
            continue  # the UDP port was taken: another port
    return _bind(host, 0, 0)


def other_host_address(exclude: set[str], skip_if: set[str]) -> str:
    """A non-loopback IPv4 address of this host outside the egress network (Docker bridges first)."""
    found: list[tuple[str, str]] = []
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        for _, name in socket.if_nameindex():
            try:
                packed = fcntl.ioctl(s.fileno(), 0x8915, struct.pack("256s", name[:15].encode()))  # SIOCGIFADDR
            except OSError:
                continue
            addr = socket.inet_ntoa(packed[20:24])
            if name not in skip_if and addr not in exclude and not addr.startswith("127."):
                found.append((name, addr))
    found.sort(key=lambda f: 0 if f[0].startswith(("docker", "br-")) else 1)
    return found[0][1] if found else ""


async def _serve(sock: socket.socket, hits: list[str], label: str) -> None:
    """Record every connection / datagram; answer datagrams like a DNS server would."""
    while True:
        await anyio.wait_readable(sock)
        try:
            if sock.type == socket.SOCK_STREAM:
                conn, peer = sock.accept()
                conn.close()
                hits.append(f"TCP {label} from {peer[0]}")
            else:
                data, peer = sock.recvfrom(2048)
                hits.append(f"UDP {label} from {peer[0]}")
                if len(data) >= 12:
                    sock.sendto(data[:2] + b"\x81\x80" + data[4:6] + b"\0" * 6 + data[12:], peer)
        except (BlockingIOError, InterruptedError):
            continue


async def _make_outside(targets: Targets) -> tuple[OutsideNamespace | None, list[socket.socket]]:
    """The outside stand-in, trying a few /30s (another run may hold one); failures become "not proven"."""
    error: Exception | None = None
    for _ in range(4):
        outside = OutsideNamespace()
        try:
            made = await anyio.to_thread.run_sync(outside.create)
        except Exception as exc:
            error = exc
            continue
        targets.outside = outside.ns_ip
        return outside, made
    detail = getattr(error, "stderr", b"") or b""
    why = detail.decode(errors="replace").strip() if isinstance(detail, bytes) else str(detail)
    targets.outside_why = f"the outside stand-in could not be made ({why or error})"
    return None, []


def make_context(targets: Targets, extra_env: dict[str, str]) -> Callable[[Kernel], Any]:
    @contextlib.asynccontextmanager
    async def context(kernel: Kernel) -> AsyncIterator[dict[str, str]]:
        enforcer = kernel.backends.egress
        status = enforcer.status() if enforcer is not None else {}
        targets.enforcer = getattr(enforcer, "name", "")
        gateway = str(status.get("bind", "")).rsplit(":", 1)[0].strip("[]")
        socks: list[tuple[socket.socket, str, str]] = []
        outside: OutsideNamespace | None = None
        try:
            if os.geteuid() != 0 or shutil.which("ip") is None:
                targets.outside_why = "making the outside stand-in (a network namespace) needs root and `ip`"
            else:
                outside, made = await _make_outside(targets)
                socks += [(s, f"outside-{'tcp' if s.type == socket.SOCK_STREAM else 'udp'}", targets.outside)
                          for s in made]
            skip = {str(status.get("bridge", "")), outside.host_if if outside else ""}
            for host in [h for h in (gateway, other_host_address({gateway}, skip)) if h]:
                try:
                    made = host_service_sockets(host)
                except OSError:
                    continue  # e.g. an IPv6 gateway: the other host address still counts
                socks += [(s, "hosts", f"{host}:{made[0].getsockname()[1]}") for s in made]
                targets.hosts.append(f"{host}:{made[0].getsockname()[1]}")
            literal = targets.outside or gateway or "127.0.0.1"  # never an address off this host
            env = {**extra_env, "RISOLUTO_PROBE_OUTSIDE": targets.outside,
                   "RISOLUTO_PROBE_HOSTS": " ".join(targets.hosts), "RISOLUTO_PROBE_LITERAL": literal,
                   "RISOLUTO_PROBE_NAME": f"p{secrets.token_hex(6)}.risoluto-probe.invalid"}
            async with anyio.create_task_group() as tg:
                for sock, group, label in socks:
                    tg.start_soon(_serve, sock, targets.hits[group], label)
                try:
                    yield env
                finally:
                    await anyio.sleep(0.2)  # late packets still count
                    tg.cancel_scope.cancel()
        finally:
            for sock, _, _ in socks:
                sock.close()
            if outside is not None:
                await anyio.to_thread.run_sync(outside.remove)

    return context
