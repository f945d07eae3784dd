"""Shared helpers for tests that need a real Docker engine.

- ``docker_engine`` (session): a low-level SDK client. No engine -> skip, but with
  ``CI=true`` a FAILURE (the checklist is not tested without one). At the end of the session
  it asserts that no container, volume or network of any test kernel is left.
- ``sandbox_world`` (function): private DATA_DIR / workspace root / auth dir, a network
  name of its own, and ``await world.app(config)`` to start a kernel against the engine.
  After the test (apps stopped first) it asserts nothing of that kernel leaked, then
  removes what persists by design (HOME volumes, the network).

Everything created here carries ``risoluto.instance`` = the digest of a test DATA_DIR, so
cleaning up never touches another helper's or the operator's containers.
"""

from __future__ import annotations

import contextlib
import json
import os
import uuid
from pathlib import Path
from typing import Any, AsyncIterator

import docker
import pytest

from risoluto.app import kernel_of
from risoluto.settings import Settings, build_settings, deep_merge
from risoluto.testing import running_app

TEST_IMAGE = os.environ.get("RISOLUTO_TEST_IMAGE", "risoluto-test:latest")
INSTANCE = "risoluto.instance"
_SEEN_INSTANCES: set[str] = set()


def instance_of(data_dir: Path) -> str:
    import hashlib

    return hashlib.sha256(str(data_dir.resolve()).encode()).hexdigest()[:16]


def _unavailable(reason: str) -> None:
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"Docker tests need an engine under CI=true: {reason}")
    pytest.skip(reason)


@pytest.fixture(scope="session")
def docker_engine(request: pytest.FixtureRequest) -> Any:
    try:
        client = docker.from_env(timeout=120).api
        client.ping()
    except Exception as exc:
        _unavailable(f"no Docker engine ({type(exc).__name__}); run scripts/provision-docker")
    try:
        client.inspect_image(TEST_IMAGE)
    except docker.errors.NotFound:
        _unavailable(f"test image {TEST_IMAGE} missing; run scripts/build-test-images")
    yield client
    leaks = leftovers(client, _SEEN_INSTANCES, include_persistent=True)
    for instance in _SEEN_INSTANCES:  # leave the engine clean whatever happened
        remove_persistent(client, instance, "")
    # After a failed test leftovers are expected (and already reported); otherwise they are a bug.
    if leaks and not request.session.testsfailed:
        pytest.fail(f"Docker objects leaked by the Docker tests: {leaks}")


def leftovers(client: Any, instances: set[str], include_persistent: bool) -> list[str]:
    """Containers and attempt volumes (plus, if asked, HOME volumes and networks) of ``instances``."""
    out: list[str] = []
    for inst in instances:
        label = {"label": [f"{INSTANCE}={inst}"]}
        carriers = {"label": [f"risoluto.carrier={inst}"]}  # fill prepared volumes; never left behind
        out += [f"container {c['Names'][0]}" for c in client.containers(all=True, filters=label)]
        out += [f"carrier {c['Names'][0]}" for c in client.containers(all=True, filters=carriers)]
        for vol in client.volumes(filters=label).get("Volumes") or []:
            if include_persistent or (vol.get("Labels") or {}).get("risoluto.scope") == "attempt":
                out.append(f"volume {vol['Name']}")
        if include_persistent:
            out += [f"network {n['Name']}" for n in client.networks(filters=label)]
    return out


def remove_persistent(client: Any, instance: str, network: str) -> None:
    """Remove every container, volume and network of ``instance`` (and ``network`` by name)."""
    label = {"label": [f"{INSTANCE}={instance}"]}
    carriers = {"label": [f"risoluto.carrier={instance}"]}
    for c in client.containers(all=True, filters=label) + client.containers(all=True, filters=carriers):
        with contextlib.suppress(docker.errors.NotFound):
            client.remove_container(c["Id"], force=True, v=True)
    for vol in client.volumes(filters=label).get("Volumes") or []:
        with contextlib.suppress(docker.errors.NotFound):
            client.remove_volume(vol["Name"], force=True)
    nets = client.networks(filters=label) + (client.networks(names=[network]) if network else [])
    for net in nets:
        with contextlib.suppress(docker.errors.NotFound, docker.errors.APIError):
            client.remove_network(net["Id"])


class World:
    def __init__(self, tmp: Path, client: Any):
        self.tmp = tmp
        self.docker = client
        self.data = tmp / "data"
        self.data.mkdir(mode=0o700)
        self.ws_root = tmp / "workspaces"
        self.auth = tmp / "codex-auth"
        self.auth.mkdir()
        self.network = f"rsl-sbx-{uuid.uuid4().hex[:8]}"
        self.instance = instance_of(self.data)
        _SEEN_INSTANCES.add(self.instance)
        self.stack = contextlib.AsyncExitStack()

    def config(self, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
        base = {
            "codex": {
                "authDir": str(self.auth),
                "sandbox": {
                    "image": TEST_IMAGE, "network": self.network, "user": "1000:1000",
                    "timeoutS": 120, "stopGraceS": 1, "maxConcurrent": 8,
                    "resources": {"memory": "256m", "memoryReservation": "64m", "memorySwap": "256m",
                                  "cpus": 1.0, "pidsLimit": 256, "tmpfsSize": "64m"},
                },
            },
            "workspace": {"root": str(self.ws_root)},
            # the tests poll the API in tight loops (logs, approvals): rate limiting is tested elsewhere,
            # and the window-exact limiter would otherwise refuse a long test's polls
            "rateLimit": {"api": {"limit": 100000, "windowSeconds": 60}},
        }
        return deep_merge(base, overrides or {})

    def settings(self, overrides: dict[str, Any] | None = None, env: dict[str, str] | None = None) -> Settings:
        return build_settings(self.config(overrides), None, {"DATA_DIR": str(self.data), **(env or {})})

    async def app(self, overrides: dict[str, Any] | None = None, env: dict[str, str] | None = None,
                  plugins: tuple[tuple[str, Any], ...] = ()) -> tuple[Any, Any]:
        """(test client, kernel) of a started app; stopped at the end of the test."""
        settings = self.settings(overrides, env)
        environ = {**os.environ, "DATA_DIR": str(self.data), **(env or {})}
        test_app = await self.stack.enter_async_context(running_app(settings, plugins=plugins, environ=environ))
        return test_app.test_client(), kernel_of(test_app.app)

    def workspace_of(self, key: str) -> Path:
        return self.ws_root / key


@pytest.fixture
async def sandbox_world(tmp_path: Path, docker_engine: Any) -> AsyncIterator[World]:
    world = World(tmp_path, docker_engine)
    try:
        yield world
    finally:
        try:
            await world.stack.aclose()  # stops the apps: their sandboxes must be gone after this
        finally:
            leaks = leftovers(docker_engine, {world.instance}, include_persistent=False)
            remove_persistent(docker_engine, world.instance, world.network)
    assert not leaks, f"sandbox leaked: {leaks}"


async def run(client: Any, body: dict[str, Any], status: int = 201) -> dict[str, Any]:
    """POST a launch with wait=true (unless given) and return the JSON body."""
    response = await client.post("/api/v1/sandboxes", json={"wait": True, **body})
    data = await response.get_json()
    assert response.status_code == status, data
    return data


async def logs(client: Any, sandbox_id: str) -> str:
    response = await client.get(f"/api/v1/sandboxes/{sandbox_id}/logs")
    assert response.status_code == 200
    return (await response.get_json())["logs"]


async def wait_for_log(client: Any, sandbox_id: str, text: str, timeout: float = 30.0) -> str:
    """Poll the logs of a running sandbox until ``text`` shows up."""
    import anyio

    with anyio.fail_after(timeout):
        while True:
            out = await logs(client, sandbox_id)
            if text in out:
                return out
            await anyio.sleep(0.2)


async def probe(client: Any, issue: str = "PROBE-1", **extra: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """Run PROBE in a sandbox: (launch record, facts the container's kernel reported)."""
    record = await run(client, {"issue": issue, "command": ["python3", "-c", PROBE], **extra})
    assert record["exit_code"] == 0, await logs(client, record["id"])
    text = await logs(client, record["id"])
    return record, json.loads(text.strip().splitlines()[-1])


# Reads the truth from the kernel the container runs on; prints one JSON line.
PROBE = r"""
import errno, json, os, socket
def status():
    out = {}
    for line in open("/proc/self/status"):
        key, _, value = line.partition(":")
        out[key] = value.strip()
    return out
def first(*paths):
    for p in paths:
        try:
            return open(p).read().strip()
        except OSError:
            pass
    return None
def attempt(fn):
    try:
        fn()
        return "ok"
    except OSError as e:
        return errno.errorcode.get(e.errno, str(e.errno))
def write(path):
    def go():
        with open(path, "w") as fh:
            fh.write("x")
    return go
st = status()
mounts = [line.split() for line in open("/proc/self/mountinfo")]
facts = {
    "CapEff": st.get("CapEff"), "CapPrm": st.get("CapPrm"), "NoNewPrivs": st.get("NoNewPrivs"),
    "Seccomp": st.get("Seccomp"), "uid": os.getuid(), "gid": os.getgid(), "groups": os.getgroups(),
    "memory_limit": first("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"),
    "pids_limit": first("/sys/fs/cgroup/pids.max", "/sys/fs/cgroup/pids/pids.max"),
    "root_ro": bool(os.statvfs("/").f_flag & os.ST_RDONLY),
    "workspace_ro": bool(os.statvfs("/workspace").f_flag & os.ST_RDONLY),
    "workspace_write": attempt(write("/workspace/probe.txt")),
    "etc_write": attempt(write("/etc/probe")),
    "home_write": attempt(write("/home/agent/probe")),
    "tmp_fs": [m[m.index("-") + 1] for m in mounts if m[4] == "/tmp"],
    "mount_points": [m[4] for m in mounts],
    "mount_roots": [m[3] for m in mounts],
    "docker_sock": [p for p in ("/var/run/docker.sock", "/run/docker.sock") if os.path.exists(p)],
    "env_keys": sorted(os.environ),
    "home": os.environ.get("HOME"), "codex_home": os.environ.get("CODEX_HOME"),
    "cwd": os.getcwd(),
}
ch = os.environ.get("CODEX_HOME", "/nonexistent")
facts["codex_files"] = sorted(os.listdir(ch)) if os.path.isdir(ch) else None
facts["config_toml"] = first(ch + "/config.toml")
facts["auth_json"] = first(ch + "/auth.json")
if os.path.exists(ch + "/auth.json"):
    s = os.stat(ch + "/auth.json")
    facts["auth_stat"] = [oct(s.st_mode & 0o777), s.st_uid, s.st_gid]
facts["raw_socket"] = attempt(lambda: socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP))
print(json.dumps(facts))
"""
