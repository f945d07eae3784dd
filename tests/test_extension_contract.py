"""The sandbox spec contract as a third party meets it, on a real engine: plugins from separate
distributions, found through their entry points, configured from the config file.

- the tutorial plugin (contrib/risoluto-example, installed) moves sandboxes to its own network
  and mounts a cache: both stand in the running container (edits: defaults first, then others);
- a third party that adds a capability, mounts DATA_DIR or asks for the host network is refused
  403 ``sandbox_policy_violation`` by the check phase, and no container is left.
"""

from __future__ import annotations

import textwrap
import uuid

import pytest
from docker_util import docker_engine, leftovers, sandbox_world, wait_for_log  # noqa: F401

pytestmark = [pytest.mark.anyio, pytest.mark.docker]

UNSAFE = """
from risoluto.hookspecs import hookimpl
from risoluto.hookspecs.sandbox import Mount

@hookimpl
def risoluto_sandbox_spec(kernel, spec):
    mode = kernel.plugin_settings("acme_unsafe").get("mode")
    if mode == "cap":
        spec.cap_add.append("SYS_ADMIN")
    elif mode == "mount":
        spec.mounts.append(Mount(source=str(kernel.settings.data_path), target="/loot", type="bind"))
    elif mode == "hostnet":
        spec.network = "host"
"""


def install_dist(root, dist, module, source):
    """A separately installed distribution: a dist-info with its entry point, on sys.path."""
    info = root / f"{dist.replace('-', '_')}-1.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text(f"[risoluto]\n{module} = {module}\n")
    (root / f"{module}.py").write_text(textwrap.dedent(source))


async def test_a_third_partys_network_and_mount_stand_in_the_container(sandbox_world, docker_engine):  # noqa: F811
    world = sandbox_world
    cache = world.tmp / "cache"
    cache.mkdir(mode=0o755)
    (cache / "marker").write_text("from the example plugin\n")
    network = f"rsl-ext-{uuid.uuid4().hex[:8]}"
    docker_engine.create_network(network, driver="bridge", labels={"risoluto.test": "1"})
    try:
        client, _ = await world.app({"plugins": {"settings": {"example": {"cache": str(cache), "network": network}}}})
        response = await client.post("/api/v1/sandboxes", json={
            "issue": "EXT-1", "command": ["sh", "-c", "cat /opt/cache/marker; sleep 30"]})
        record = await response.get_json()
        assert response.status_code == 201, record
        assert record["policy"]["network"] == network
        await wait_for_log(client, record["id"], "from the example plugin")
        container = docker_engine.inspect_container(record["id"])
        assert list(container["NetworkSettings"]["Networks"]) == [network]
        mounts = {m["Destination"]: m for m in container["Mounts"]}
        assert mounts["/opt/cache"]["Source"] == str(cache) and mounts["/opt/cache"]["RW"] is False
        assert (await client.delete(f"/api/v1/sandboxes/{record['id']}")).status_code == 200
    finally:
        docker_engine.remove_network(network)


@pytest.mark.parametrize("mode", ["cap", "mount", "hostnet"])
async def test_an_unsafe_third_party_edit_is_refused_and_leaves_no_container(
        sandbox_world, docker_engine, monkeypatch, mode):  # noqa: F811
    world = sandbox_world
    dists = world.tmp / "dists"
    install_dist(dists, "acme-unsafe", "acme_unsafe", UNSAFE)
    monkeypatch.syspath_prepend(str(dists))
    client, kernel = await world.app({"plugins": {"settings": {"acme_unsafe": {"mode": mode}}}})
    assert next(p for p in kernel.plugins if p.name == "acme_unsafe").distribution == "acme-unsafe"
    response = await client.post("/api/v1/sandboxes", json={"issue": f"EVIL-{mode}", "command": ["true"]})
    body = await response.get_json()
    assert response.status_code == 403 and body["error"]["code"] == "sandbox_policy_violation", body
    assert leftovers(docker_engine, {world.instance}, include_persistent=False) == []
