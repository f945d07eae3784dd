"""Host protection: workers on the egress network reach the proxy port on the host, nothing else.

An ``internal`` Docker bridge has no route out, but its gateway address lives on the host's
bridge interface, so every host service listening on a wildcard address is reachable from
a worker through it. When the kernel runs as root it adds, in a dedicated chain::

    INPUT           -i <bridge> -j RISOLUTO-EGRESS                    (first rule)
    RISOLUTO-EGRESS -i <bridge> -d <gateway> -p tcp --dport <proxy port> -j ACCEPT
    RISOLUTO-EGRESS -i <bridge> -m conntrack --ctstate ESTABLISHED,RELATED -j ACCEPT
    RISOLUTO-EGRESS -i <bridge> -j DROP

and the same for IPv6 (ip6tables) without the ACCEPT of the proxy (it listens on IPv4).
Adding is idempotent (each rule is checked first); ``remove`` deletes this proxy's
ACCEPT rule, and the shared rules once no proxy on that bridge is left. Commands run as
argv lists (no shell); ``iptables -w`` waits for the xtables lock.

A private library: the ``egress.network`` enforcer installs it, and the ``egress.host_firewall``
plugin reports it to the doctor.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import subprocess
import threading
from typing import Iterator

import anyio

from risoluto.errors import StartupError

CHAIN = "RISOLUTO-EGRESS"
LOCK_FILE = "/run/risoluto-egress.lock"
# The firewall is host-wide state shared by every kernel on the host: one editor at a time,
# across threads (this lock) and processes (an flock on LOCK_FILE).
_THREADS = threading.Lock()


@contextlib.contextmanager
def _locked() -> Iterator[None]:
    with _THREADS:
        fd = os.open(LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # releases the flock


class FirewallError(Exception):
    pass


def tool_env() -> dict[str, str]:
    """The environment for iptables, nft and ip: a PATH and nothing else.

    The server's own environment holds MASTER_KEY, the write token and the data-plane secret;
    a tool that needs none of them should not get them (they would sit in its /proc/PID/environ).
    """
    return {"PATH": os.environ.get("PATH") or "/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL": "C"}


def _run(tool: str, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    done = subprocess.run([tool, "-w", "5", *args], capture_output=True, text=True, timeout=30, env=tool_env())
    if check and done.returncode != 0:
        raise FirewallError(f"{tool} {' '.join(args)}: {done.stderr.strip() or done.returncode}")
    return done


def _ensure(tool: str, chain: str, rule: list[str], insert: bool = False) -> None:
    if _run(tool, "-C", chain, *rule, check=False).returncode != 0:
        _run(tool, "-I" if insert else "-A", chain, *([("1")] if insert else []), *rule)


def _delete(tool: str, chain: str, rule: list[str]) -> None:
    while _run(tool, "-C", chain, *rule, check=False).returncode == 0:
        _run(tool, "-D", chain, *rule)


def can_manage() -> str:
    """"" when this process can edit the host firewall, else why not (one line)."""
    if os.geteuid() != 0:
        return "the kernel does not run as root, so it cannot add host firewall rules"
    missing = [t for t in ("iptables", "ip6tables") if shutil.which(t) is None]
    if missing:
        return f"{' and '.join(missing)} not found"
    return ""


class HostFirewall:
    """The rules protecting the host from workers on ``bridge``, for one proxy ``gateway:port``."""

    def __init__(self, bridge: str, gateway: str, port: int):
        self.bridge, self.gateway, self.port = bridge, gateway, port
        self.installed = False

    def _shared(self) -> list[list[str]]:
        return [
            ["-i", self.bridge, "-m", "conntrack", "--ctstate", "ESTABLISHED,RELATED", "-j", "ACCEPT"],
            ["-i", self.bridge, "-j", "DROP"],
        ]

    def _accept(self) -> list[str]:
        return ["-i", self.bridge, "-d", self.gateway, "-p", "tcp", "--dport", str(self.port), "-j", "ACCEPT"]

    def _install(self) -> None:
        with _locked():
            for tool in ("iptables", "ip6tables"):
                _run(tool, "-N", CHAIN, check=False)  # exists already: fine
                for rule in self._shared():
                    _ensure(tool, CHAIN, rule)
                if tool == "iptables":
                    _ensure(tool, CHAIN, self._accept(), insert=True)  # before the DROP
                _ensure(tool, "INPUT", ["-i", self.bridge, "-j", CHAIN], insert=True)
        self.installed = True

    def _remove(self) -> None:
        with _locked():
            _delete("iptables", CHAIN, self._accept())
            listing = _run("iptables", "-S", CHAIN, check=False).stdout
            if any(f"-i {self.bridge} " in line and "--dport" in line for line in listing.splitlines()):
                return  # another proxy still serves this bridge: keep the shared rules
            for tool in ("iptables", "ip6tables"):
                _delete(tool, "INPUT", ["-i", self.bridge, "-j", CHAIN])
                for rule in self._shared():
                    _delete(tool, CHAIN, rule)
                if not _run(tool, "-S", CHAIN, check=False).stdout.strip().replace(f"-N {CHAIN}", ""):
                    _run(tool, "-X", CHAIN, check=False)
        self.installed = False

    def present(self) -> bool:
        """Whether the rules are in the live firewall right now."""
        with _locked():
            if _run("iptables", "-C", CHAIN, *self._accept(), check=False).returncode != 0:
                return False
            return all(
                _run(tool, "-C", "INPUT", "-i", self.bridge, "-j", CHAIN, check=False).returncode == 0
                and all(_run(tool, "-C", CHAIN, *r, check=False).returncode == 0 for r in self._shared())
                for tool in ("iptables", "ip6tables")
            )

    async def install(self) -> None:
        try:
            await anyio.to_thread.run_sync(self._install)
        except (FirewallError, OSError, subprocess.TimeoutExpired) as exc:
            raise StartupError(f"egress: cannot add the host firewall rules for {self.bridge}: {exc}") from exc

    async def remove(self) -> None:
        if self.installed:
            await anyio.to_thread.run_sync(self._remove)
