"""A Docker engine of the test's own, to break on purpose: restart it, freeze it, kill it.

The machine's engine (``/var/run/docker.sock``) is shared with every other test and must never
be stopped, frozen or restarted; a fault test starts a second ``dockerd`` instead, with its own
data root, exec root (and so its own managed containerd), pid file and socket, and stops it by
its pid. Nothing of it touches the host's network setup:

- its own bridge interface, made here and removed afterwards (``--bridge=none`` is NOT used: a
  dockerd started with it deletes the host's ``docker0``, which the shared engine needs);
- ``iptables``, ``ip-masq`` and ``ip-forward`` off; its config file is its own (the host's
  ``/etc/docker/daemon.json`` is not read).

The test image is copied in from the shared engine (``docker save | docker load``): nothing is
pulled. Used by tests/test_engine_faults.py and bench/engine_freeze.py.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import docker

TEST_IMAGE = os.environ.get("RISOLUTO_TEST_IMAGE", "risoluto-test:latest")
DOCKERD = shutil.which("dockerd") or "/usr/sbin/dockerd"
DOCKER_CLI = shutil.which("docker") or "/usr/bin/docker"
RUNSC = shutil.which("runsc")


def missing() -> str:
    """Why an engine of our own cannot run here ('' when it can)."""
    if os.geteuid() != 0:
        return "an engine of the test's own needs root"
    if not os.path.exists(DOCKERD) or not os.path.exists(DOCKER_CLI):
        return "dockerd or the docker CLI is not installed (scripts/provision-docker)"
    if not shutil.which("ip"):
        return "iproute2 (ip) is not installed"
    try:
        shared = docker.from_env(timeout=30).api
        shared.inspect_image(TEST_IMAGE)
    except Exception as exc:
        return f"the test image {TEST_IMAGE} is not on the shared engine ({type(exc).__name__}); " \
               "run scripts/build-test-images"
    return ""


class OwnEngine:
    def __init__(self) -> None:
        # short: unix socket paths (containerd's included) must stay under 108 bytes
        self.root = Path(tempfile.mkdtemp(prefix="rsl-eng-", dir="/tmp"))
        self.sock = self.root / "docker.sock"
        self.host = f"unix://{self.sock}"
        self.bridge = f"rsle{os.getpid() % 100000}"
        self.subnet_ip = f"10.213.{os.getpid() % 250}.1/24"
        self.proc: subprocess.Popen[bytes] | None = None
        self.frozen = False
        self.log = self.root / "dockerd.log"

    # --- lifecycle ----------------------------------------------------------------
    def start(self, timeout: float = 60.0) -> None:
        if not (Path("/sys/class/net") / self.bridge).exists():
            _ip("link", "add", self.bridge, "type", "bridge")
            _ip("addr", "add", self.subnet_ip, "dev", self.bridge)
            _ip("link", "set", self.bridge, "up")
        config = {
            "bridge": self.bridge, "iptables": False, "ip-masq": False, "ip-forward": False, "ip6tables": False,
            "storage-driver": "overlay2", "log-level": "warn",
            "runtimes": {"runsc": {"path": RUNSC, "runtimeArgs": ["--platform=ptrace", "--network=host"]}}
            if RUNSC else {},
        }
        cfg = self.root / "daemon.json"
        cfg.write_text(json.dumps(config))
        argv = [DOCKERD, "--config-file", str(cfg), "--data-root", str(self.root / "data"),
                "--exec-root", str(self.root / "exec"), "--pidfile", str(self.root / "docker.pid"),
                "-H", self.host]
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(argv, stdout=out, stderr=out, start_new_session=True)
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"dockerd exited at start: {self.log.read_text()[-2000:]}")
            try:
                self.client(5).ping()
                return
            except Exception:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"dockerd did not answer: {self.log.read_text()[-2000:]}") from None
                time.sleep(0.2)

    def stop(self, timeout: float = 60.0) -> None:
        """SIGTERM (dockerd stops its containers and its containerd), SIGKILL if it hangs."""
        proc = self.proc
        if proc is None:
            return
        self.thaw()
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self._kill_containerd()
        self.proc = None

    def restart(self) -> None:
        self.stop()
        self.start()

    def freeze(self) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGSTOP)
        self.frozen = True

    def thaw(self) -> None:
        if self.frozen and self.proc is not None:
            os.kill(self.proc.pid, signal.SIGCONT)
        self.frozen = False

    def close(self) -> None:
        """Stop it and remove everything it made (its bridge, its directories)."""
        try:
            self.stop()
        finally:
            if (Path("/sys/class/net") / self.bridge).exists():
                _ip("link", "del", self.bridge)
            shutil.rmtree(self.root, ignore_errors=True)

    def _kill_containerd(self) -> None:
        """The managed containerd outlives a dockerd that was killed: ours goes by its pid file."""
        pidfile = self.root / "exec" / "containerd" / "containerd.pid"
        with contextlib.suppress(FileNotFoundError, ValueError, ProcessLookupError):
            pid = int(pidfile.read_text().strip())
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            if str(self.root).encode() in cmdline:  # never another engine's containerd
                os.kill(pid, signal.SIGTERM)

    # --- use ----------------------------------------------------------------------
    def client(self, timeout: float = 60.0) -> Any:
        return docker.APIClient(base_url=self.host, timeout=timeout, version="auto")

    def load_test_image(self) -> None:
        env = {**os.environ, "DOCKER_HOST": self.host}
        save = subprocess.Popen([DOCKER_CLI, "save", TEST_IMAGE],  # from the shared engine (read only)
                                stdout=subprocess.PIPE)
        try:
            subprocess.run([DOCKER_CLI, "load", "-q"], stdin=save.stdout, env=env, check=True,
                           stdout=subprocess.DEVNULL, timeout=300)
        finally:
            assert save.stdout is not None
            save.stdout.close()
            save.wait()
        assert save.returncode == 0, "docker save of the test image failed"


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True)
