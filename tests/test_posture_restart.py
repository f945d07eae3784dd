"""The posture lock across restarts, with a real ``risoluto serve`` and a real client on another
machine (a network namespace joined to the host by a veth pair; traffic stays on this machine).

- An attacker with the write token tries the overlays that used to weaken the next start (plugin
  block list, trusted proxies); they are refused, and after a restart the server is still guarded.
- A saved overlay file holding a deploy-time key, or loosening the posture, stops startup with a
  message saying what to do; ``RISOLUTO_OVERLAY_MAY_LOOSEN=1`` lets it start, the doctor WARNs.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any, Iterator

import httpx
import pytest
import yaml

from http_support import NetNS, free_port, netns_available
from serve_util import RISOLUTO, operator_env, spawn, stop, wait_answering

WRITE = "w-" + "o" * 40
READ = "r-" + "o" * 40
# our own veth pair (not the one of test_http_real_clients.py, which may run at the same time)
HOST_IP, NS_IP = "10.231.78.1", "10.231.78.2"


@pytest.fixture(scope="module")
def netns() -> Iterator[NetNS]:
    netns_available()
    ns = NetNS("ovl", HOST_IP, NS_IP).create()
    try:
        yield ns
    finally:
        ns.remove()


def serve_env(data: Path, port: int, **extra: str) -> dict[str, str]:
    return operator_env(DATA_DIR=str(data), RISOLUTO_BIND=HOST_IP, RISOLUTO_PORT=str(port),
                        RISOLUTO_WRITE_TOKEN=WRITE, RISOLUTO_READ_TOKEN=READ, **extra)


def start(env: dict[str, str], cwd: Path) -> subprocess.Popen:
    proc = spawn([*RISOLUTO, "serve"], env, cwd=cwd)
    answer = wait_answering(proc, f"http://{HOST_IP}:{env['RISOLUTO_PORT']}/api/v1/runtime", timeout=60)
    assert answer is not None, proc.stderr.read() if proc.stderr else ""
    return proc


def put_overlay(port: int, overlay: dict[str, Any]) -> httpx.Response:
    """From this host's veth address (not loopback), with the write token: the attacker's request."""
    return httpx.put(f"http://{HOST_IP}:{port}/api/v1/config/overlay", json=overlay,
                     headers={"Authorization": f"Bearer {WRITE}"}, timeout=20)


def code(body: Any) -> str | None:
    return body.get("error", {}).get("code") if isinstance(body, dict) else None


@pytest.mark.netns
def test_refused_overlays_leave_the_restarted_server_guarded(netns, tmp_path):
    data = tmp_path / "data"
    data.mkdir(mode=0o700)
    port = free_port()
    env = serve_env(data, port)
    proc = start(env, tmp_path)
    try:
        overlay_file = data / "config" / "overlay.yaml"
        for attack, key in (
            ({"plugins": {"disable": ["http.write_guard", "http.read_guard", "http.rate_limit"]}}, "plugins.disable"),
            ({"server": {"trustedProxies": ["0.0.0.0/0"]}}, "server.trustedProxies"),
            ({"rateLimit": {"backend": "nope"}}, "rateLimit.backend"),
            ({"sandbox": {"role": "data-plane"}}, "sandbox.role"),
        ):
            response = put_overlay(port, attack)
            assert response.status_code == 400, response.text
            assert code(response.json()) == "overlay_key_not_allowed" and key in response.json()["error"]["message"]
            assert not overlay_file.exists()
        response = put_overlay(port, {"codex": {"sandbox": {"security": {"dropCapabilities": False}}}})
        assert response.status_code == 403 and code(response.json()) == "overlay_loosens_policy"
        assert not overlay_file.exists()
    finally:
        assert stop(proc) == 0
    proc = start(env, tmp_path)  # the restart
    try:
        base = f"http://{HOST_IP}:{port}"
        status, body = netns.curl("POST", base + "/api/v1/secrets/STOLEN", ["Content-Type: application/json"],
                                  b'{"value": "x"}')
        assert (status, code(body)) == (401, "write_unauthorized")
        status, body = netns.curl("GET", base + "/api/v1/secrets")
        assert (status, code(body)) == (401, "read_unauthorized")
        status, body = netns.curl("GET", base + "/api/v1/hardening", [f"Authorization: Bearer {READ}"])
        assert status == 200
        items = {i["item"]: i for i in body["items"]}
        for item, provider in (("write guard", "http.write_guard"), ("read guard", "http.read_guard"),
                               ("rate limiting", "http.rate_limit"), ("client address", "http.client_address")):
            line = items[f"checklist: {item}"]
            assert line["status"] == "PASS" and provider in line["reason"]
    finally:
        assert stop(proc) == 0


def test_a_saved_overlay_with_a_deploy_time_key_stops_startup(tmp_path):
    data = tmp_path / "data"
    (data / "config").mkdir(parents=True, mode=0o700)
    overlay_file = data / "config" / "overlay.yaml"
    overlay_file.write_text(yaml.safe_dump({"plugins": {"disable": ["http.write_guard"]}}))
    env = operator_env(DATA_DIR=str(data), RISOLUTO_PORT=str(free_port()))
    done = subprocess.run([*RISOLUTO, "serve"], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert "plugins.disable" in done.stderr and "config file" in done.stderr and str(overlay_file) in done.stderr


def test_a_saved_loosening_overlay_stops_startup_unless_allowed(tmp_path):
    data = tmp_path / "data"
    (data / "config").mkdir(parents=True, mode=0o700)
    (data / "config" / "overlay.yaml").write_text(yaml.safe_dump({"codex": {"threadSandbox": "danger-full-access"}}))
    env = operator_env(DATA_DIR=str(data), RISOLUTO_PORT=str(free_port()))
    done = subprocess.run([*RISOLUTO, "serve"], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert "codex.threadSandbox" in done.stderr and "RISOLUTO_OVERLAY_MAY_LOOSEN=1" in done.stderr
    env["RISOLUTO_OVERLAY_MAY_LOOSEN"] = "1"
    proc = spawn([*RISOLUTO, "serve"], env, cwd=tmp_path)
    try:
        answer = wait_answering(proc, f"http://127.0.0.1:{env['RISOLUTO_PORT']}/api/v1/hardening", timeout=60)
        assert answer is not None and answer.status_code == 200, proc.stderr.read() if proc.stderr else ""
        items = {i["item"]: i for i in answer.json()["items"]}
        line = items["overlay: codex.threadSandbox"]
        assert line["status"] == "WARN" and "set by the overlay" in line["reason"]
    finally:
        assert stop(proc) == 0
    report = subprocess.run([*RISOLUTO, "doctor", "--json"], env=env, cwd=tmp_path, capture_output=True, text=True,
                            timeout=120)
    items = {i["item"]: i for i in json.loads(report.stdout)["items"]}
    assert items["overlay: codex.threadSandbox"]["status"] == "WARN"


DISTS = Path(__file__).resolve().parent / "dists" / "site"


def test_disabling_the_write_guard_without_a_replacement_refuses_to_start(tmp_path):
    data = tmp_path / "data"
    data.mkdir(mode=0o700)
    env = operator_env(DATA_DIR=str(data), RISOLUTO_PORT=str(free_port()), RISOLUTO_DISABLE_PLUGINS="http.write_guard")
    done = subprocess.run([*RISOLUTO, "serve"], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert "'write guard'" in done.stderr and "http.write_guard" in done.stderr
    # the same through the config file's plugins.disable
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({"plugins": {"disable": ["http.read_guard"]}}))
    env = operator_env(DATA_DIR=str(data), RISOLUTO_PORT=str(free_port()), RISOLUTO_CONFIG=str(config))
    done = subprocess.run([*RISOLUTO, "serve"], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert "'read guard'" in done.stderr and "http.read_guard" in done.stderr


@pytest.mark.netns
def test_a_replacement_distribution_stands_in_for_the_write_guard(netns, tmp_path):
    """A third-party distribution (found through its entry point) declares "write guard": the default
    plugin may then be disabled, and the replacement is what guards writes from another machine."""
    data = tmp_path / "data"
    data.mkdir(mode=0o700)
    port = free_port()
    pythonpath = os.pathsep.join(p for p in (str(DISTS), os.environ.get("PYTHONPATH", "")) if p)
    env = serve_env(data, port, RISOLUTO_DISABLE_PLUGINS="http.write_guard", PYTHONPATH=pythonpath)
    proc = start(env, tmp_path)
    try:
        base = f"http://{HOST_IP}:{port}"
        runtime = httpx.get(base + "/api/v1/runtime", timeout=10).json()
        names = {p["name"]: p for p in runtime["plugins"]}
        assert "http.write_guard" not in names
        assert names["replacement_guard"]["distribution"] == "risoluto-replacement-guard"
        # even the write token does not help from afar: the replacement's own rule
        status, body = netns.curl("POST", base + "/api/v1/secrets/STOLEN",
                                  ["Content-Type: application/json", f"Authorization: Bearer {WRITE}"], b'{"value": "x"}')
        assert (status, code(body)) == (403, "writes_local_only")
        status, body = netns.curl("GET", base + "/api/v1/hardening", [f"Authorization: Bearer {READ}"])
        line = {i["item"]: i for i in body["items"]}["checklist: write guard"]
        assert line["status"] == "PASS" and line["reason"] == "provided by replacement_guard"
    finally:
        assert stop(proc) == 0
