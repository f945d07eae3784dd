"""The control/data-plane split end to end: two real ``risoluto serve`` processes, the data plane
bound to the gateway of a Docker network this test creates (a private address of its own,
not reachable on loopback), the control plane without any Docker access, real containers."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
import uuid
from typing import Any

import httpx
import pytest
import yaml
from docker_util import INSTANCE, docker_engine, sandbox_world  # noqa: F401
from http_support import free_port
from serve_util import RISOLUTO, ROOT, spawn, stop, wait_answering

pytestmark = [pytest.mark.anyio, pytest.mark.docker]
SECRET = "dp-secret-" + uuid.uuid4().hex + uuid.uuid4().hex


class Planes:
    def __init__(self, world: Any):
        self.world = world
        self.procs: list[subprocess.Popen] = []
        self.link = f"risoluto-dp-test-{uuid.uuid4().hex[:8]}"
        net = world.docker.create_network(self.link, driver="bridge", labels={INSTANCE: world.instance})
        ipam = world.docker.inspect_network(net["Id"])["IPAM"]["Config"][0]
        self.gateway = ipam["Gateway"]
        self.dp_port, self.cp_port = free_port(), free_port()
        self.cp_data = world.tmp / "cp-data"

    def _env(self, **extra: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("RISOLUTO_", "DOCKER_"))}
        env.pop("MASTER_KEY", None)
        return {**env, "RISOLUTO_DATA_PLANE_SECRET": SECRET, **extra}

    def _spawn(self, args: list[str], env: dict[str, str], url: str) -> subprocess.Popen:
        proc = spawn([*RISOLUTO, *args], env)
        self.procs.append(proc)
        assert wait_answering(proc, url) is not None, proc.stderr.read()
        return proc

    def start_data_plane(self, overrides: dict | None = None) -> subprocess.Popen:
        path = self.world.tmp / "dp.yaml"
        path.write_text(yaml.safe_dump(self.world.config(overrides)))
        # The data plane's DATA_DIR is the world's: its containers carry the world's instance
        # label, so the world's leak check covers them.
        env = self._env(DATA_DIR=str(self.world.data), RISOLUTO_CONFIG=str(path), RISOLUTO_PORT=str(self.dp_port),
                        RISOLUTO_BIND=f"docker:{self.link}")
        return self._spawn(["serve", "--data-plane"], env, self.dp_url + "/dp/v1/ping")

    def cp_env(self, secret: str = SECRET, **extra: str) -> dict[str, str]:
        path = self.world.tmp / "cp.yaml"
        path.write_text(yaml.safe_dump(self.world.config({"sandbox": {"runtime": "remote",
                                                                      "dataPlaneUrl": self.dp_url}})))
        # No Docker for the control plane: DOCKER_HOST points nowhere.
        return self._env(DATA_DIR=str(self.cp_data), RISOLUTO_CONFIG=str(path), RISOLUTO_PORT=str(self.cp_port),
                         RISOLUTO_DATA_PLANE_SECRET=secret, DOCKER_HOST="unix:///nonexistent/docker.sock", **extra)

    def start_control_plane(self) -> subprocess.Popen:
        return self._spawn(["serve"], self.cp_env(), self.cp_url + "/api/v1/runtime")

    @property
    def dp_url(self) -> str:
        return f"http://{self.gateway}:{self.dp_port}"

    @property
    def cp_url(self) -> str:
        return f"http://127.0.0.1:{self.cp_port}"

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)  # all at once: the planes stop in parallel
        for proc in self.procs:
            stop(proc, timeout=30)


@pytest.fixture
async def planes(sandbox_world):
    p = Planes(sandbox_world)
    try:
        yield p
    finally:
        p.stop()  # before the world's leak check


def wait_status(cp_url: str, sandbox_id: str, done: tuple[str, ...], timeout: float = 60) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        record = httpx.get(f"{cp_url}/api/v1/sandboxes/{sandbox_id}", timeout=10).json()
        # removed: the output is then read from the record (during the removal the engine may
        # refuse to read a dying container's logs: a race of the docker runtime, not of the split)
        if record.get("status") in done and record.get("removed"):
            return record
        time.sleep(0.2)
    raise AssertionError(f"sandbox did not reach {done}: {record}")


async def test_sandboxes_run_end_to_end_through_both_planes(planes):
    dp = planes.start_data_plane()
    planes.start_control_plane()
    body = {"issue": "DP-1", "command": ["sh", "-c", "echo hello-from-the-data-plane; echo $GREETING; exit 3"],
            "env": {"GREETING": "private-value-1234"}, "wait": True}
    response = httpx.post(planes.cp_url + "/api/v1/sandboxes", json=body, timeout=120)
    record = response.json()
    assert response.status_code == 201, record
    assert record["status"] == "exited" and record["exit_code"] == 3 and record["removed"] is True
    assert record["network"] == planes.world.network and record["policy"]["dropCapabilities"] is True
    logs = httpx.get(f"{planes.cp_url}/api/v1/sandboxes/{record['id']}/logs", timeout=30).json()["logs"]
    assert "hello-from-the-data-plane" in logs and "private-value-1234" in logs
    listed = httpx.get(planes.cp_url + "/api/v1/sandboxes", timeout=30).json()["sandboxes"]
    assert record["id"] in [r["id"] for r in listed]
    assert planes.world.workspace_of("DP-1").is_dir()
    # the data plane answers only on the private network, and only with the secret
    with pytest.raises(httpx.TransportError):
        httpx.get(f"http://127.0.0.1:{planes.dp_port}/dp/v1/ping", timeout=3)
    assert httpx.get(planes.dp_url + "/dp/v1/ping", timeout=5).status_code == 401
    # audits on both sides; the environment value is in neither
    dp_audit = (planes.world.data / "write-audit.log").read_text()
    assert '"principal": "data-plane"' in dp_audit and "/dp/v1/sandboxes" in dp_audit
    assert "/api/v1/sandboxes" in (planes.cp_data / "write-audit.log").read_text()
    assert "private-value-1234" not in dp_audit
    # events came back to the control plane's metrics
    deadline = time.monotonic() + 30
    while 'code="3"' not in httpx.get(planes.cp_url + "/metrics", timeout=10).text:
        assert time.monotonic() < deadline, "exit event not relayed"
        time.sleep(0.2)
    dp.send_signal(signal.SIGTERM)
    dp.wait(timeout=30)
    assert "private-value-1234" not in dp.stderr.read()


async def test_a_launch_survives_a_control_plane_crash(planes):
    planes.start_data_plane()
    cp = planes.start_control_plane()
    response = httpx.post(planes.cp_url + "/api/v1/sandboxes", timeout=60, json={
        "issue": "DP-2", "command": ["sh", "-c", "sleep 10; echo survived; exit 7"]})
    assert response.status_code == 201, response.text
    sandbox_id = response.json()["id"]
    cp.send_signal(signal.SIGKILL)  # a crash, not a clean stop
    cp.wait(timeout=10)
    planes.start_control_plane()
    shown = httpx.get(f"{planes.cp_url}/api/v1/sandboxes/{sandbox_id}", timeout=30).json()
    assert shown["status"] == "running", shown
    record = wait_status(planes.cp_url, sandbox_id, ("exited",))
    assert record["exit_code"] == 7
    answer = httpx.get(f"{planes.cp_url}/api/v1/sandboxes/{sandbox_id}/logs", timeout=30)
    assert answer.status_code == 200, answer.text
    logs = answer.json()["logs"]
    assert "survived" in logs


async def test_stop_through_the_control_plane_and_cli_run(planes):
    planes.start_data_plane()
    planes.start_control_plane()
    response = httpx.post(planes.cp_url + "/api/v1/sandboxes", timeout=60,
                          json={"issue": "DP-3", "command": ["sleep", "300"]})
    sandbox_id = response.json()["id"]
    started = time.monotonic()
    removed = httpx.delete(f"{planes.cp_url}/api/v1/sandboxes/{sandbox_id}", timeout=60)
    assert removed.status_code == 200 and removed.json()["status"] == "stopped"
    assert time.monotonic() - started < 30
    # `risoluto sandbox run` on the control plane's host: streamed through the data plane
    done = subprocess.run([*RISOLUTO, "sandbox", "run", "--issue", "DP-4", "--",
                           "sh", "-c", "echo streamed-1; sleep 1; echo streamed-2; exit 4"],
                          env=planes.cp_env(), capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert done.returncode == 4, done.stderr
    assert "streamed-1\nstreamed-2" in done.stdout
    listed = subprocess.run([*RISOLUTO, "sandbox", "ls", "--json"], env=planes.cp_env(),
                            capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert listed.returncode == 0 and sandbox_id in [r["id"] for r in json.loads(listed.stdout)]


async def test_wrong_secret_unknown_image_and_policy_of_the_data_plane(planes):
    planes.start_data_plane()
    # a control plane with the wrong secret: 502, and the data plane answered 401
    env = planes.cp_env(secret="wrong-" + "w" * 40)
    proc = planes._spawn(["serve"], env, planes.cp_url + "/api/v1/runtime")
    response = httpx.post(planes.cp_url + "/api/v1/sandboxes", json={"issue": "DP-5", "command": ["true"]}, timeout=30)
    assert response.status_code == 502 and response.json()["error"]["code"] == "data_plane_unauthorized"
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=30)
    planes.start_control_plane()
    response = httpx.post(planes.cp_url + "/api/v1/sandboxes", timeout=30,
                          json={"issue": "DP-6", "command": ["true"], "image": "risoluto-absent:1"})
    assert response.status_code == 400 and response.json()["error"]["code"] == "image_not_found"
    # the data plane refuses a spec that would hand the host to a worker, whoever sends it
    spec = {"name": "risoluto-evil-1", "image": "risoluto-test:latest", "command": ["true"], "user": "0:0",
            "cap_drop": ["ALL"], "security_opt": ["no-new-privileges"], "network": planes.world.network,
            "mounts": [{"target": "/host", "source": "/", "type": "bind"}]}
    forged = httpx.post(planes.dp_url + "/dp/v1/sandboxes", json={"spec": spec, "timeout_s": 5}, timeout=30,
                        headers={"Authorization": f"Bearer {SECRET}"})
    assert forged.status_code == 403 and forged.json()["error"]["code"] == "sandbox_policy_violation"
    assert planes.world.docker.containers(all=True, filters={"name": "risoluto-evil-1"}) == []


async def test_doctor_of_the_control_plane_reads_the_data_plane(planes):
    planes.start_data_plane()
    env = planes.cp_env()
    env.pop("DOCKER_HOST")
    result = subprocess.run([*RISOLUTO, "doctor", "--json"], env=env,
                            capture_output=True, text=True, timeout=120, cwd=ROOT)
    items = {i["item"]: i for i in json.loads(result.stdout)["items"]}
    assert items["sandbox data plane"]["status"] == "PASS"
    assert items["data plane: data plane bind"]["status"] == "PASS"
    assert planes.gateway in items["data plane: data plane bind"]["reason"]
    assert items["data plane: sandbox docker"]["status"] == "PASS"
    assert items["data plane: data plane plugins"]["status"] == "PASS"
