"""The control/data-plane split without a Docker engine: the data plane's guard, audit, rate
limit and spec checks (a received spec is refused before any engine call), the control plane's
502/503 answers when its data plane is down, slow, refusing or not a data plane, the bind
refusals of ``risoluto serve --data-plane``, and the control plane's doctor items."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import threading
import time
from pathlib import Path

import anyio
import pytest
from http_support import ServerThread, free_port
from serve_util import RISOLUTO

from risoluto.hookspecs import hookimpl
from risoluto.hookspecs.sandbox import ContainerSpec, Mount
from risoluto.manager import default_plugin_names
from risoluto.plugins.sandbox._wire import spec_from_wire, spec_to_wire
from risoluto.roles import KEEP

pytestmark = pytest.mark.anyio
SECRET = "s3cret-" + "7" * 40
ROOT = Path(__file__).resolve().parent.parent


def dp_config(tmp_path: Path, **extra) -> dict:
    """What ``risoluto serve --data-plane`` makes of a config: role + plugin set."""
    return {"sandbox": {"role": "data-plane"}, "plugins": {"disable": sorted(set(default_plugin_names()) - KEEP)},
            "workspace": {"root": str(tmp_path / "ws")},
            "codex": {"authDir": str(tmp_path / "auth"), "sandbox": {"user": "1000:1000", "network": "rsl-dp-x"}},
            **extra}


def cp_config(tmp_path: Path, url: str, **sandbox) -> dict:
    return {"sandbox": {"runtime": "remote", "dataPlaneUrl": url, **sandbox},
            "workspace": {"root": str(tmp_path / "ws")},
            "codex": {"authDir": str(tmp_path / "auth"), "sandbox": {"user": "1000:1000", "network": "rsl-dp-x"}}}


NO_DOCKER = {"DOCKER_HOST": "unix:///nonexistent/docker.sock"}
AUTH = {"Authorization": f"Bearer {SECRET}"}


def good_spec(tmp_path: Path, **changes) -> dict:
    spec = ContainerSpec(name="risoluto-X-1-abcd0123", image="risoluto-test:latest", command=["true"],
                         user="1000:1000", cap_drop=["ALL"], security_opt=["no-new-privileges"], network="rsl-dp-x",
                         env={"TOKEN": "value-that-is-secret"}, files={"/home/agent/.codex-runtime/config.toml": b"x"},
                         mounts=[Mount(target="/workspace", source=str(tmp_path / "ws" / "X-1"))])
    wire = spec_to_wire(spec)
    wire.update(changes)
    return wire


@pytest.fixture
async def data_plane(risoluto_client, tmp_path):
    return await risoluto_client(dp_config(tmp_path), env={**NO_DOCKER, "RISOLUTO_DATA_PLANE_SECRET": SECRET})


# --- the data plane's guard ------------------------------------------------------------------
@pytest.mark.parametrize("headers", [
    {}, {"Authorization": "Bearer wrong-" + "x" * 40}, {"Authorization": f"Basic {SECRET}"},
    {"Authorization": "Bearer"}, {"Authorization": f"Bearer {SECRET[:-1]}"}, {"Authorization": f"Bearer {SECRET}x"},
    {"Authorization": "Bearer \u00ff\u00fe" + "x" * 40},
])
@pytest.mark.parametrize("method, path", [
    ("GET", "/dp/v1/ping"), ("POST", "/dp/v1/sandboxes"), ("DELETE", "/dp/v1/sandboxes/abc"),
    ("GET", "/api/v1/runtime"), ("GET", "/api/v1/secrets"), ("GET", "/metrics"), ("GET", "/nope"),
    ("PUT", "/api/v1/config/overlay"), ("POST", "/webhooks/github"),
])
async def test_every_request_without_the_secret_is_401(data_plane, headers, method, path):
    response = await data_plane.open(path, method=method, headers=headers, json={})
    assert response.status_code == 401, (method, path)
    assert (await response.get_json())["error"]["code"] == "data_plane_unauthorized"


@pytest.mark.parametrize("value", [f"bearer {SECRET}", f"BEARER   {SECRET} ", f" Bearer {SECRET}"])
async def test_the_secret_is_read_as_every_guard_reads_a_bearer_token(data_plane, value):
    # one parser (http_checks.bearer_token): scheme case-insensitive, surrounding blanks ignored
    response = await data_plane.get("/dp/v1/ping", headers={"Authorization": value})
    assert response.status_code == 200, await response.get_data()


async def test_two_authorization_headers_are_refused(data_plane):
    from werkzeug.datastructures import Headers

    headers = Headers([("Authorization", f"Bearer {SECRET}"), ("Authorization", f"Bearer {SECRET}")])
    response = await data_plane.get("/dp/v1/events", headers=headers)
    assert response.status_code == 401


@pytest.mark.parametrize("method, path", [
    ("GET", "/api/v1/secrets"), ("POST", "/api/v1/secrets/X"), ("GET", "/api/v1/config/overlay"),
    ("PUT", "/api/v1/config/overlay"), ("POST", "/webhooks/github"), ("POST", "/webhooks/linear"),
    ("GET", "/api/v1/runtime"), ("GET", "/api/v1/openapi.json"), ("GET", "/api/v1/hardening"),
    ("POST", "/api/v1/sandboxes"), ("GET", "/api/v1/sandbox/policy"),
])
async def test_with_the_secret_only_the_data_plane_routes_exist(data_plane, tmp_path, method, path):
    response = await data_plane.open(path, method=method, headers=AUTH, json={"value": "x"})
    assert response.status_code == 404, (method, path)
    assert not (tmp_path / "data" / "config").exists()  # no overlay written
    assert not list((tmp_path / "data").glob("secrets*"))


async def test_plugin_set_of_the_role(risoluto_settings, tmp_path):
    from risoluto.app import create_app, kernel_of

    app = create_app(risoluto_settings(dp_config(tmp_path), {"RISOLUTO_DATA_PLANE_SECRET": SECRET}))
    names = {p.name for p in kernel_of(app).plugins if p.source == "default"}
    assert names == KEEP & set(default_plugin_names())
    assert not {"secrets.api", "webhooks.github", "http.write_guard", "sandbox.api"} & names


async def test_a_data_plane_app_loading_forbidden_plugins_does_not_start(risoluto_client, tmp_path):
    config = dp_config(tmp_path)
    config["plugins"] = {"disable": []}  # the role set without the plugin set
    with pytest.raises(Exception, match="must not load"):
        await risoluto_client(config, env={**NO_DOCKER, "RISOLUTO_DATA_PLANE_SECRET": SECRET})


async def test_writes_are_audited_and_metrics_served(data_plane, tmp_path):
    await data_plane.post("/dp/v1/sandboxes", headers={"Authorization": "Bearer nope"}, json={})
    response = await data_plane.post("/dp/v1/sandboxes", headers=AUTH, json={"spec": {}, "timeout_s": 5})
    assert response.status_code == 400
    lines = (tmp_path / "data" / "write-audit.log").read_text().splitlines()
    assert len(lines) == 1  # the refused one is not audited
    entry = json.loads(lines[0])
    assert entry["principal"] == "data-plane" and entry["path"] == "/dp/v1/sandboxes" and entry["status"] == 400
    assert (await data_plane.get("/metrics", headers=AUTH)).status_code == 200


async def test_the_rate_limit_applies_before_the_secret(risoluto_client, tmp_path):
    config = dp_config(tmp_path, rateLimit={"api": {"limit": 3, "windowSeconds": 60}})
    client = await risoluto_client(config, env={**NO_DOCKER, "RISOLUTO_DATA_PLANE_SECRET": SECRET})
    codes = [(await client.get("/dp/v1/events", headers={"Authorization": "Bearer bad"})).status_code
             for _ in range(3)]
    assert codes == [401, 401, 401]
    response = await client.get("/dp/v1/events", headers=AUTH)
    assert response.status_code == 429 and response.headers["Retry-After"]


# --- specs sent to the data plane --------------------------------------------------------------
async def test_wire_round_trip(tmp_path):
    wire = json.loads(json.dumps(good_spec(tmp_path)))
    spec = spec_from_wire(wire)
    assert spec_to_wire(spec) == wire and spec.files["/home/agent/.codex-runtime/config.toml"] == b"x"


@pytest.mark.parametrize("change", [
    {"name": "../x"}, {"image": "UPPER CASE"}, {"env": {"A": 1}}, {"env": ["A=1"]}, {"command": "sh -c x"},
    {"mounts": [{"target": "/w", "driver": "x"}]}, {"mounts": [{"source": "/tmp"}]},
    {"files": {"relative/path": "eA=="}}, {"files": {"/a/../etc/passwd": "eA=="}}, {"files": {"/x": "not base64!"}},
    {"privileged": True}, {"host_config": []}, {"read_only_rootfs": "yes"},
])
async def test_malformed_specs_are_400_without_echoing_values(data_plane, tmp_path, change):
    response = await data_plane.post("/dp/v1/sandboxes", headers=AUTH, json={"spec": good_spec(tmp_path, **change),
                                                                               "timeout_s": 5})
    body = await response.get_json()
    assert response.status_code == 400 and body["error"]["code"] == "invalid_spec", body
    assert "value-that-is-secret" not in json.dumps(body)


@pytest.mark.parametrize("timeout", [0, -1, "5", True, 1e12, None])
async def test_bad_timeouts_are_400(data_plane, tmp_path, timeout):
    response = await data_plane.post("/dp/v1/sandboxes", headers=AUTH, json={"spec": good_spec(tmp_path),
                                                                               "timeout_s": timeout})
    assert response.status_code == 400


@pytest.mark.parametrize("what, change", [
    ("DATA_DIR of the data plane", lambda t: {"mounts": [{"target": "/loot", "source": str(t / "data")}]}),
    ("the Docker socket", lambda t: {"mounts": [{"target": "/s", "source": "/var/run/docker.sock"}]}),
    ("a host path outside workspace.root", lambda t: {"mounts": [{"target": "/etc-host", "source": "/etc"}]}),
    ("a sibling of workspace.root", lambda t: {"mounts": [{"target": "/w", "source": str(t / "ws-evil")}]}),
    ("a symlink out of workspace.root", lambda t: {"mounts": [{"target": "/w", "source": str(t / "ws" / "link")}]}),
    ("privileged", lambda t: {"host_config": {"Privileged": True}}),
    ("host network", lambda t: {"network": "host"}),
    ("another network", lambda t: {"network": "bridge"}),
    ("capabilities kept", lambda t: {"cap_drop": []}),
    ("no-new-privileges dropped", lambda t: {"security_opt": []}),
    ("seccomp unconfined", lambda t: {"security_opt": ["no-new-privileges", "seccomp=unconfined"]}),
    ("no user", lambda t: {"user": ""}),
])
async def test_the_data_plane_enforces_its_own_policy(data_plane, tmp_path, what, change):
    (tmp_path / "ws").mkdir(exist_ok=True)
    (tmp_path / "ws" / "link").symlink_to("/etc")
    response = await data_plane.post("/dp/v1/sandboxes", headers=AUTH,
                                     json={"spec": good_spec(tmp_path, **change(tmp_path)), "timeout_s": 5})
    body = await response.get_json()
    assert response.status_code == 403 and body["error"]["code"] == "sandbox_policy_violation", (what, body)


async def test_a_good_spec_reaches_the_runtime(data_plane, tmp_path):
    response = await data_plane.post("/dp/v1/sandboxes", headers=AUTH, json={"spec": good_spec(tmp_path),
                                                                               "timeout_s": 5})
    assert response.status_code == 503  # past every check: only the (absent) engine is missing
    assert (await response.get_json())["error"]["code"] == "sandbox_runtime_unavailable"


# --- the control plane when the data plane misbehaves ----------------------------------------
class Silent:
    """A TCP listener that accepts and never answers (a hung data plane)."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        self.conns: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                self.conns.append(self.sock.accept()[0])
            except OSError:
                return

    def close(self) -> None:
        for c in self.conns:
            c.close()
        self.sock.close()


async def launch(client, **extra):
    response = await client.post("/api/v1/sandboxes", json={"issue": "L-1", "command": ["true"], **extra})
    return response.status_code, (await response.get_json())["error"]


async def test_unreachable_data_plane_is_503_quickly(risoluto_client, tmp_path):
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    client = await risoluto_client(cp_config(tmp_path, url), env={**NO_DOCKER, "RISOLUTO_DATA_PLANE_SECRET": SECRET})
    started = time.monotonic()
    status, error = await launch(client)
    assert status == 503 and error["code"] == "data_plane_unavailable" and url in error["message"]
    for path in ("/api/v1/sandboxes", "/api/v1/sandboxes/abc", "/api/v1/sandboxes/abc/logs"):
        response = await client.get(path)
        assert response.status_code == 503, path
    assert (await client.delete("/api/v1/sandboxes/abc")).status_code == 503
    assert time.monotonic() - started < 5


async def test_a_hung_data_plane_is_503_after_the_timeout_not_a_hang(risoluto_client, tmp_path):
    silent = Silent()
    try:
        config = cp_config(tmp_path, f"http://127.0.0.1:{silent.port}", dataPlaneTimeoutS=1)
        client = await risoluto_client(config, env={**NO_DOCKER, "RISOLUTO_DATA_PLANE_SECRET": SECRET})
        started = time.monotonic()
        with anyio.fail_after(15):
            status, error = await launch(client)
            listed = await client.get("/api/v1/sandboxes")
        assert status == 503 and error["code"] == "data_plane_unavailable" and "did not answer" in error["message"]
        assert listed.status_code == 503
        assert time.monotonic() - started < 10
    finally:
        silent.close()


@pytest.fixture
def real_data_plane(tmp_path):
    """A data plane app on a real socket (hypercorn) on loopback: the bind rules are the CLI's."""
    servers = []

    def start(**extra):
        server = ServerThread(str(tmp_path / "dp-data"), {**NO_DOCKER, "RISOLUTO_DATA_PLANE_SECRET": SECRET},
                              ["127.0.0.1"], config=dp_config(tmp_path, **extra)).start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()


async def test_wrong_secret_is_502_on_the_control_plane(risoluto_client, real_data_plane, tmp_path):
    server = real_data_plane()
    client = await risoluto_client(cp_config(tmp_path, server.url()),
                                   env={**NO_DOCKER, "RISOLUTO_DATA_PLANE_SECRET": "wrong-" + "w" * 40})
    status, error = await launch(client)
    assert status == 502 and error["code"] == "data_plane_unauthorized"
    assert "RISOLUTO_DATA_PLANE_SECRET" in error["message"] and "w" * 40 not in error["message"]


async def test_refusals_of_the_data_plane_are_relayed(risoluto_client, real_data_plane, tmp_path):
    server = real_data_plane()
    client = await risoluto_client(cp_config(tmp_path, server.url()),
                                   env={**NO_DOCKER, "RISOLUTO_DATA_PLANE_SECRET": SECRET})
    status, error = await launch(client)  # the data plane has no engine
    assert status == 503 and error["code"] == "sandbox_runtime_unavailable"
    response = await client.get("/api/v1/sandboxes/abc")
    assert response.status_code == 503


async def test_a_rate_limited_data_plane_is_503_busy(risoluto_client, real_data_plane, tmp_path):
    server = real_data_plane(rateLimit={"api": {"limit": 1, "windowSeconds": 600}})
    client = await risoluto_client(cp_config(tmp_path, server.url()),
                                   env={**NO_DOCKER, "RISOLUTO_DATA_PLANE_SECRET": SECRET})
    for _ in range(3):  # the first poll of the event follower may take the only slot
        response = await client.get("/api/v1/sandboxes")
    body = await response.get_json()
    assert response.status_code == 503 and body["error"]["code"] == "data_plane_busy"
    assert response.headers["Retry-After"]


async def test_something_that_is_not_a_data_plane_is_502(risoluto_client, tmp_path):
    other = ServerThread(str(tmp_path / "other"), NO_DOCKER, ["127.0.0.1"]).start()  # a plain kernel
    try:
        client = await risoluto_client(cp_config(tmp_path, other.url()),
                                       env={**NO_DOCKER, "RISOLUTO_DATA_PLANE_SECRET": SECRET})
        status, error = await launch(client)
        assert status == 502 and error["code"] == "data_plane_bad_response"
    finally:
        other.stop()


@pytest.mark.parametrize("url, env", [
    ("", {"RISOLUTO_DATA_PLANE_SECRET": SECRET}), ("ftp://127.0.0.1/", {"RISOLUTO_DATA_PLANE_SECRET": SECRET}),
    ("http://127.0.0.1:9", {}), ("http://127.0.0.1:9", {"RISOLUTO_DATA_PLANE_SECRET": "\u00e9" * 40}),
])
async def test_unconfigured_link_is_503(risoluto_client, tmp_path, url, env):
    client = await risoluto_client(cp_config(tmp_path, url), env={**NO_DOCKER, **env})
    status, error = await launch(client)
    assert status == 503 and error["code"] == "data_plane_unconfigured"


class NeedsHostStep:
    """A spec contribution with a host-side callback (what the egress allowlist does)."""

    @hookimpl
    def risoluto_sandbox_spec(self, spec, request, settings):
        async def created(cid):
            pass
        spec.on_created.append(created)


async def test_host_side_callbacks_fail_closed(risoluto_client, tmp_path):
    silent = Silent()  # must not even be contacted
    try:
        client = await risoluto_client(cp_config(tmp_path, f"http://127.0.0.1:{silent.port}"),
                                       env={**NO_DOCKER, "RISOLUTO_DATA_PLANE_SECRET": SECRET},
                                       plugins=(("host-step", NeedsHostStep()),))
        status, error = await launch(client)
        assert status == 503 and error["code"] == "sandbox_remote_unsupported"
    finally:
        silent.close()


# --- risoluto serve --data-plane: where it may listen ---------------------------------------------
def serve_data_plane(tmp_path: Path, **env: str) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if not k.startswith("RISOLUTO_")}
    base.update({"DATA_DIR": str(tmp_path / "data"), "RISOLUTO_DATA_PLANE_SECRET": SECRET, **NO_DOCKER, **env})
    return subprocess.run([*RISOLUTO, "serve", "--data-plane"], env=base, capture_output=True, text=True,
                          timeout=60, cwd=tmp_path)


@pytest.mark.parametrize("bind, why", [
    ("127.0.0.1", "loopback"), ("::1", "loopback"), ("0.0.0.0", "every interface"), ("::", "every interface"),
    ("192.0.2.10", "outside the private ranges"), ("169.254.10.1", "outside the private ranges"),
    ("100.64.0.1", "outside the private ranges"), ("localhost", "not an IP address"),
    ("::ffff:127.0.0.1", "loopback"),
])
def test_data_plane_refuses_to_bind_publicly(tmp_path, bind, why):
    port = free_port()
    result = serve_data_plane(tmp_path, RISOLUTO_BIND=bind, RISOLUTO_PORT=str(port))
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and why in lines[0] and "RISOLUTO_BIND" in lines[0]
    assert not (tmp_path / "data").exists()


def test_default_bind_is_refused_too(tmp_path):
    result = serve_data_plane(tmp_path)
    assert result.returncode == 2 and "loopback" in result.stderr and "RISOLUTO_BIND" in result.stderr


@pytest.mark.parametrize("secret", ["", "short", "\u00e9" * 40, "a b" * 20])
def test_data_plane_needs_a_long_printable_secret(tmp_path, secret):
    result = serve_data_plane(tmp_path, RISOLUTO_BIND="10.255.0.1", RISOLUTO_DATA_PLANE_SECRET=secret)
    assert result.returncode == 2 and "RISOLUTO_DATA_PLANE_SECRET" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_data_plane_cannot_forward_to_another(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("sandbox: {runtime: remote, dataPlaneUrl: 'http://10.0.0.2:4000'}\n")
    result = serve_data_plane(tmp_path, RISOLUTO_BIND="10.255.0.1", RISOLUTO_CONFIG=str(config))
    assert result.returncode == 2 and "sandbox.runtime must be docker" in result.stderr


# --- the control plane's doctor ---------------------------------------------------------------------
def doctor(tmp_path: Path, url: str, hide_socket: bool = False, **env: str) -> dict:
    config = tmp_path / "cp.yaml"
    config.write_text(json.dumps(cp_config(tmp_path, url)))
    base = {k: v for k, v in os.environ.items() if not k.startswith(("RISOLUTO_", "DOCKER_"))}
    base.update({"DATA_DIR": str(tmp_path / "cp-data"), "RISOLUTO_CONFIG": str(config),
                 "RISOLUTO_DATA_PLANE_SECRET": SECRET, **env})
    cmd = [*RISOLUTO, "doctor", "--json"]
    if hide_socket:  # the control plane's container, where the socket is not mounted
        script = ("for s in /var/run/docker.sock /run/docker.sock /run/containerd/containerd.sock; do "
                  "[ -e $s ] && mount --bind /dev/null $s; done; exec \"$@\"")
        cmd = ["unshare", "--mount", "--propagation", "private", "sh", "-c", script, "sh", *cmd]
    result = subprocess.run(cmd, env=base, capture_output=True, text=True, timeout=120, cwd=ROOT)
    return {item["item"]: item for item in json.loads(result.stdout)["items"]}


def test_doctor_fails_when_the_control_plane_can_reach_docker(tmp_path):
    # a path that does not exist: the doctor's engine probes must not send a packet anywhere
    items = doctor(tmp_path, f"http://127.0.0.1:{free_port()}", DOCKER_HOST="unix:///nonexistent/docker.sock")
    access = items["control plane docker access"]
    assert access["status"] == "FAIL" and "DOCKER_HOST is set" in access["reason"]
    link = items["sandbox data plane"]
    assert link["status"] == "FAIL" and "not reachable" in link["reason"]


@pytest.mark.skipif(os.geteuid() != 0 and not os.environ.get("CI"), reason="needs root for a mount namespace")
def test_doctor_passes_without_any_docker_access(tmp_path):
    if os.path.exists("/var/run/docker.sock") and os.access("/var/run/docker.sock", os.W_OK):
        seen = doctor(tmp_path, f"http://127.0.0.1:{free_port()}")["control plane docker access"]
        assert seen["status"] == "FAIL" and "docker.sock" in seen["reason"]  # control case: the socket is there
    items = doctor(tmp_path, f"http://127.0.0.1:{free_port()}", hide_socket=True)
    assert items["control plane docker access"]["status"] == "PASS"


# --- the compose recipe (it cannot run here: no registry to pull its base from) ------------------
def test_compose_recipe_keeps_the_planes_apart():
    import ipaddress

    import yaml

    from risoluto.roles import resolve_bind
    from risoluto.settings import build_settings

    folder = ROOT / "contrib" / "compose"
    compose = yaml.safe_load((folder / "docker-compose.yml").read_text())
    dp, cp = compose["services"]["data-plane"], compose["services"]["control-plane"]
    assert "ports" not in dp and dp["command"] == ["serve", "--data-plane"]
    bind = dp["environment"]["RISOLUTO_BIND"]
    assert resolve_bind(bind, {}) == bind  # a private address the data plane accepts
    subnet = compose["networks"]["risoluto-internal"]["ipam"]["config"][0]["subnet"]
    assert compose["networks"]["risoluto-internal"]["internal"] is True
    assert ipaddress.ip_address(bind) in ipaddress.ip_network(subnet)
    assert dp["networks"]["risoluto-internal"]["ipv4_address"] == bind
    assert any("docker.sock" in v for v in dp["volumes"])
    assert not any("docker.sock" in v for v in cp["volumes"]) and "DOCKER_HOST" not in cp["environment"]
    assert "risoluto-internal" in cp["networks"]
    dp_settings = build_settings(yaml.safe_load((folder / "data-plane.yaml").read_text()), None, {})
    cp_settings = build_settings(yaml.safe_load((folder / "control-plane.yaml").read_text()), None, {})
    assert cp_settings.sandbox.runtime == "remote" and bind in cp_settings.sandbox.data_plane_url
    assert cp_settings.sandbox.data_plane_url.endswith(":" + dp["environment"]["RISOLUTO_PORT"])
    # the workers' network is neither plane's, and both planes name the same one and the same root
    assert dp_settings.codex.sandbox.network == cp_settings.codex.sandbox.network != "risoluto-internal"
    assert dp_settings.workspace.root == cp_settings.workspace.root


async def test_the_secret_can_come_from_the_secret_store(risoluto_client, real_data_plane, tmp_path):
    server = real_data_plane()
    client = await risoluto_client(cp_config(tmp_path, server.url()), env={**NO_DOCKER, "MASTER_KEY": "m" * 40})
    status, error = await launch(client)
    assert status == 503 and error["code"] == "data_plane_unconfigured"
    stored = await client.post("/api/v1/secrets/RISOLUTO_DATA_PLANE_SECRET", json={"value": SECRET})
    assert stored.status_code == 204
    status, error = await launch(client)  # accepted by the data plane, which has no engine
    assert status == 503 and error["code"] == "sandbox_runtime_unavailable"
