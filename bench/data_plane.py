"""Launch-to-exit latency through the control/data-plane split vs the in-process runtime.

Three real ``risoluto serve`` processes in the same run: a kernel with the in-process ``docker``
runtime (the baseline), and a control plane (``sandbox.runtime: remote``, no Docker access)
in front of a data plane bound to the gateway of a private Docker network made for the run.
Each round sends ``POST /api/v1/sandboxes`` with ``wait: true`` for ``true`` to the baseline
and to the control plane, alternately, and times request -> exit (container removed).
Target: split / in-process <= 1.15 (medians).

Run: ``.venv/bin/python bench/data_plane.py [--rounds N]`` (needs Docker and the test image).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import docker
import httpx
import yaml
from _servers import free_port  # bench/ is on sys.path when run as a script

ROOT = Path(__file__).resolve().parent.parent
IMAGE = os.environ.get("RISOLUTO_TEST_IMAGE", "risoluto-test:latest")
SECRET = uuid.uuid4().hex + uuid.uuid4().hex


def config(tmp: Path, network: str, **extra: Any) -> dict[str, Any]:
    return {
        "workspace": {"root": str(tmp / "ws")},
        "codex": {"authDir": str(tmp / "auth"), "sandbox": {
            "image": IMAGE, "network": network, "user": "1000:1000",
            "resources": {"memory": "256m", "memoryReservation": "64m", "memorySwap": "256m", "cpus": 1.0,
                          "pidsLimit": 256, "tmpfsSize": "64m"}}},
        "rateLimit": {"api": {"limit": 100000, "windowSeconds": 60}},
        **extra,
    }


class Stack:
    def __init__(self, tmp: Path):
        self.tmp, self.procs, self.client = tmp, [], docker.from_env().api
        self.network = f"rsl-bench-dp-{uuid.uuid4().hex[:6]}"
        self.link = f"rsl-bench-link-{uuid.uuid4().hex[:6]}"
        net = self.client.create_network(self.link, driver="bridge")
        self.gateway = self.client.inspect_network(net["Id"])["IPAM"]["Config"][0]["Gateway"]
        self.data_dirs: list[Path] = []

    def serve(self, name: str, cfg: dict[str, Any], port: int, url: str, *args: str, **env: str) -> None:
        data = self.tmp / f"data-{name}"
        data.mkdir()
        self.data_dirs.append(data)
        path = self.tmp / f"{name}.yaml"
        path.write_text(yaml.safe_dump(cfg))
        base = {k: v for k, v in os.environ.items() if not k.startswith(("RISOLUTO_", "DOCKER_"))}
        base.update({"DATA_DIR": str(data), "RISOLUTO_CONFIG": str(path), "RISOLUTO_PORT": str(port),
                     "RISOLUTO_DATA_PLANE_SECRET": SECRET, **env})
        proc = subprocess.Popen([sys.executable, "-m", "risoluto.cli", "serve", *args], env=base, cwd=ROOT,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        self.procs.append(proc)
        deadline = time.monotonic() + 30
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"{name} exited: {proc.stderr.read() if proc.stderr else ''}")
            try:
                httpx.get(url, timeout=1)
                return
            except httpx.TransportError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{name} did not answer") from None
                time.sleep(0.1)

    def close(self) -> None:
        for proc in self.procs:
            proc.send_signal(signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
        for data in self.data_dirs:
            instance = hashlib.sha256(str(data.resolve()).encode()).hexdigest()[:16]
            for vol in self.client.volumes(filters={"label": [f"risoluto.instance={instance}"]}).get("Volumes") or []:
                self.client.remove_volume(vol["Name"], force=True)
        for name in (self.network, self.link):
            try:
                self.client.remove_network(name)
            except docker.errors.NotFound:
                pass


def launch(url: str, issue: str) -> float:
    start = time.perf_counter()
    response = httpx.post(url + "/api/v1/sandboxes", json={"issue": issue, "command": ["true"], "wait": True},
                          timeout=120)
    elapsed = time.perf_counter() - start
    if response.status_code != 201 or response.json()["exit_code"] != 0:
        raise RuntimeError(f"launch failed: {response.status_code} {response.text[:300]}")
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=20)
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="risoluto-bench-dp-"))
    stack = Stack(tmp)
    try:
        local_port, dp_port, cp_port = free_port(), free_port(), free_port()
        local = f"http://127.0.0.1:{local_port}"
        dp, cp = f"http://{stack.gateway}:{dp_port}", f"http://127.0.0.1:{cp_port}"
        stack.serve("local", config(tmp, stack.network), local_port, local + "/api/v1/runtime")
        stack.serve("data-plane", config(tmp, stack.network), dp_port, dp + "/dp/v1/ping", "--data-plane",
                    RISOLUTO_BIND=f"docker:{stack.link}")
        stack.serve("control-plane", config(tmp, stack.network, sandbox={"runtime": "remote", "dataPlaneUrl": dp}),
                    cp_port, cp + "/api/v1/runtime", DOCKER_HOST="unix:///nonexistent/docker.sock")
        launch(local, "BENCH-L")  # warm-up: network, HOME volumes, connection pools
        launch(cp, "BENCH-S")
        ours: list[float] = []
        base: list[float] = []
        for _ in range(args.rounds):
            base.append(launch(local, "BENCH-L"))
            ours.append(launch(cp, "BENCH-S"))
        b, o = statistics.median(base), statistics.median(ours)
        print(f"image {IMAGE}; {args.rounds} alternating rounds; POST /api/v1/sandboxes wait=true `true`, "
              "request -> exit (container removed)")
        for name, values in (("in-process docker runtime", base), ("control plane -> data plane", ours)):
            p90 = sorted(values)[int(0.9 * (len(values) - 1))]
            print(f"{name:30} median {statistics.median(values) * 1000:7.1f} ms   p90 {p90 * 1000:7.1f} ms")
        print(f"ratio split / in-process {o / b:.3f} (target <= 1.15); overhead {(o - b) * 1000:+.1f} ms per launch")
    finally:
        stack.close()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
