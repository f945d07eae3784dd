"""Per-attempt volumes filled ahead of time (risoluto/plugins/sandbox/_prepared.py), real engine.

A launch that takes a prepared CODEX_HOME must see exactly what a direct put gives; a changed
auth.json, a vanished or forged pooled volume must never reach a container; nothing is left.
"""

from __future__ import annotations

import hashlib
import json
import signal
import time

import anyio
import docker
import httpx
import pytest
import yaml
from docker_util import TEST_IMAGE, docker_engine, logs, run, sandbox_world  # noqa: F401
from http_support import free_port
from serve_util import RISOLUTO, operator_env, spawn, wait_answering

from risoluto.hookspecs.sandbox import ContainerSpec, Mount
from risoluto.plugins.sandbox import _prepared as prepared_module
from risoluto.plugins.sandbox._prepared import LABEL_CARRIER, LABEL_PREPARED, PreparedVolumes

pytestmark = [pytest.mark.anyio, pytest.mark.docker]

CODEX_HOME = "/home/agent/.codex-runtime"
# What the agent finds in CODEX_HOME: names, modes, owners and contents.
FACTS = r"""
import json, os
ch = os.environ["CODEX_HOME"]
def meta(p):
    s = os.stat(p)
    return [oct(s.st_mode & 0o7777), s.st_uid, s.st_gid]
out = {"dir": meta(ch), "files": {}}
for name in sorted(os.listdir(ch)):
    out["files"][name] = meta(os.path.join(ch, name)) + [open(os.path.join(ch, name)).read()]
print(json.dumps(out))
"""


def pooled(world) -> list[str]:
    label = {"label": [f"risoluto.instance={world.instance}", LABEL_PREPARED]}
    return [v["Name"] for v in world.docker.volumes(filters=label).get("Volumes") or []]


def volume_exists(world, name: str) -> bool:
    try:
        world.docker.inspect_volume(name)
        return True
    except docker.errors.NotFound:
        return False


def codex_home_volume(world, cid: str) -> str | None:
    mounts = world.docker.inspect_container(cid)["Mounts"]
    return next((m["Name"] for m in mounts if m["Destination"] == CODEX_HOME), None)


async def facts(client, issue: str) -> dict:
    record = await run(client, {"issue": issue, "command": ["python3", "-c", FACTS]})
    assert record["exit_code"] == 0, await logs(client, record["id"])
    return json.loads((await logs(client, record["id"])).strip().splitlines()[-1])


async def filled_pool(world, client, kernel) -> tuple[dict, str]:
    """Two launches with the same files, then one volume is prepared for the third."""
    first = await facts(client, "PREP-1")
    assert pooled(world) == []  # files seen once: nothing prepared yet
    assert await facts(client, "PREP-2") == first
    await kernel.backends.runtime.settled()
    names = pooled(world)
    assert len(names) == 1, names
    return first, names[0]


async def test_prepared_codex_home_is_what_a_direct_put_gives(sandbox_world):
    (sandbox_world.auth / "auth.json").write_text('{"tokens": "pool-token"}')
    client, kernel = await sandbox_world.app()
    direct, name = await filled_pool(sandbox_world, client, kernel)
    assert direct["dir"] == ["0o700", 1000, 1000]
    assert direct["files"]["auth.json"] == ["0o600", 1000, 1000, '{"tokens": "pool-token"}']
    assert set(direct["files"]) == {"auth.json", "config.toml"}

    # the third launch mounts the prepared volume as its CODEX_HOME ...
    response = await client.post("/api/v1/sandboxes", json={
        "issue": "PREP-3", "command": ["sh", "-c", f"python3 -c '{FACTS}'; exec sleep 60"]})
    record = await response.get_json()
    assert response.status_code == 201, record
    assert codex_home_volume(sandbox_world, record["id"]) == name
    # it left the pool: an attempt launched meanwhile gets a volume of its own
    response = await client.post("/api/v1/sandboxes", json={"issue": "PREP-4", "command": ["sleep", "60"]})
    other = await response.get_json()
    assert codex_home_volume(sandbox_world, other["id"]) not in (name, None)
    await client.delete(f"/api/v1/sandboxes/{other['id']}")
    await client.delete(f"/api/v1/sandboxes/{record['id']}")
    # ... and finds exactly what the direct put gave; the volume goes with its container
    assert json.loads((await logs(client, record["id"])).strip().splitlines()[0]) == direct
    assert not volume_exists(sandbox_world, name)
    # the label is a keyed digest: it does not reveal (or let anyone confirm) auth.json
    await kernel.backends.runtime.settled()
    labels = [sandbox_world.docker.inspect_volume(n)["Labels"][LABEL_PREPARED] for n in pooled(sandbox_world)]
    assert labels and all(hashlib.sha256(b'{"tokens": "pool-token"}').hexdigest()[:32] != v for v in labels)


async def test_a_changed_auth_json_is_never_served_from_the_pool(sandbox_world):
    auth = sandbox_world.auth / "auth.json"
    auth.write_text('{"tokens": "old-token"}')
    client, kernel = await sandbox_world.app()
    _, stale = await filled_pool(sandbox_world, client, kernel)
    auth.write_text('{"tokens": "rotated-token"}')
    got = await facts(client, "PREP-3")
    assert got["files"]["auth.json"][3] == '{"tokens": "rotated-token"}'
    assert not volume_exists(sandbox_world, stale)  # the old credentials' copy was dropped
    auth.unlink()  # revoked: the next launch has no auth.json at all
    got = await facts(client, "PREP-4")
    assert set(got["files"]) == {"config.toml"}


async def test_a_vanished_or_forged_pool_volume_never_yields_an_empty_codex_home(sandbox_world):
    client, kernel = await sandbox_world.app()
    direct, name = await filled_pool(sandbox_world, client, kernel)
    # Someone removes the pooled volume: the engine would silently create an empty one by that
    # name at create; the launch must notice and put the files itself.
    sandbox_world.docker.remove_volume(name, force=True)
    assert await facts(client, "PREP-3") == direct
    await kernel.backends.runtime.settled()
    [name] = pooled(sandbox_world)
    # Someone swaps it for an empty volume of the same name with the instance's labels but no
    # (or a wrong) digest: refused the same way, and removed.
    sandbox_world.docker.remove_volume(name, force=True)
    sandbox_world.docker.create_volume(name, labels={
        "risoluto.instance": sandbox_world.instance, "risoluto.scope": "attempt", LABEL_PREPARED: "0" * 32})
    assert await facts(client, "PREP-4") == direct
    assert not volume_exists(sandbox_world, name)


async def test_an_idle_pooled_volume_expires(sandbox_world, monkeypatch):
    monkeypatch.setattr(prepared_module, "POOL_TTL_S", 0.5)
    (sandbox_world.auth / "auth.json").write_text('{"tokens": "idle-token"}')
    client, kernel = await sandbox_world.app()
    _, name = await filled_pool(sandbox_world, client, kernel)
    for _ in range(100):  # a copy of auth.json does not wait on the engine for the next launch
        if not volume_exists(sandbox_world, name):
            break
        await anyio.sleep(0.05)
    assert not volume_exists(sandbox_world, name)
    assert (await facts(client, "PREP-3"))["files"]["auth.json"][3] == '{"tokens": "idle-token"}'


async def test_an_image_that_declares_volumes_leaves_no_volume_behind(sandbox_world):
    # carriers are created from the launch's image: its VOLUMEs become anonymous volumes
    engine = sandbox_world.docker
    base = engine.create_container(TEST_IMAGE, ["true"])["Id"]
    image = engine.commit(base, repository="risoluto-test-volume", tag=sandbox_world.instance,
                          changes="VOLUME /data")["Id"]
    engine.remove_container(base)

    def unlabelled() -> set[str]:
        return {v["Name"] for v in engine.volumes().get("Volumes") or [] if not v.get("Labels")}

    before = unlabelled()
    try:
        client, kernel = await sandbox_world.app({"codex": {"sandbox": {"image": image}}})
        await filled_pool(sandbox_world, client, kernel)
        await facts(client, "PREP-3")  # takes the prepared volume
        await kernel.backends.runtime.settled()
        await sandbox_world.stack.aclose()
        assert unlabelled() - before == set()
    finally:
        engine.remove_image(image, force=True)


async def test_close_and_crash_cleanup_leave_no_pool_and_no_carrier(sandbox_world):
    client, kernel = await sandbox_world.app()
    await filled_pool(sandbox_world, client, kernel)
    await sandbox_world.stack.aclose()  # stop: the pooled volume goes with the kernel
    assert pooled(sandbox_world) == []
    # A crash in the middle of a fill leaves a carrier and a half-filled volume behind: the next
    # start of the same instance removes both.
    engine = sandbox_world.docker
    engine.create_volume("risoluto-attempt-crashed", labels={
        "risoluto.instance": sandbox_world.instance, "risoluto.scope": "attempt", LABEL_PREPARED: "x"})
    carrier = engine.create_container(TEST_IMAGE, ["true"], labels={LABEL_CARRIER: sandbox_world.instance},
                                      host_config=engine.create_host_config(
                                          mounts=[docker.types.Mount("/p", "risoluto-attempt-crashed")]))["Id"]
    await sandbox_world.app()
    with pytest.raises(docker.errors.NotFound):
        engine.inspect_container(carrier)
    assert not volume_exists(sandbox_world, "risoluto-attempt-crashed")


def test_the_pool_key_follows_every_input():
    prepared = PreparedVolumes(runtime=None)

    def digest(files: dict[str, bytes], user: str = "1000:1000", image: str = "img") -> str:
        spec = ContainerSpec(name="n", image=image, user=user)
        spec.mounts = [Mount(target=CODEX_HOME, type="volume", labels={"risoluto.scope": "attempt"}),
                       Mount(target="/home/agent", source="home", type="volume", labels={"risoluto.scope": "issue"})]
        spec.files = {CODEX_HOME + "/" + k: v for k, v in files.items()}
        spec.files["/home/agent/other"] = b"not in the attempt volume"
        [slot] = prepared.slots(spec)
        assert set(slot.files) == {"/" + k for k in files}  # only the attempt volume's files
        return slot.digest

    base = digest({"config.toml": b"a", "auth.json": b"t"})
    assert base == digest({"auth.json": b"t", "config.toml": b"a"})
    others = [digest({"config.toml": b"a", "auth.json": b"u"}), digest({"config.toml": b"a"}),
              digest({"config.toml": b"a", "auth.json": b"t"}, user="1001:1001"),
              digest({"config.toml": b"a", "auth.json": b"t"}, image="other"),
              digest({"config.toml": b"b", "auth.json": b"t"})]
    assert base not in others and len(set(others)) == len(others)
    # a fresh key per process: a digest means nothing to another process or an observer
    assert PreparedVolumes(runtime=None)._digest("img", CODEX_HOME, 1000, 1000, {"/": b""}) != \
        prepared._digest("img", CODEX_HOME, 1000, 1000, {"/": b""})



async def test_under_risoluto_serve_a_long_run_prepares_the_next_attempt(sandbox_world, tmp_path):
    """The fill that starts while a container still runs (after 1 s) under the server's own
    event loop (plain asyncio.run, not the test runner's), then serves the next attempt."""
    config = tmp_path / "serve.yaml"
    config.write_text(yaml.safe_dump(sandbox_world.config()))
    port = free_port()
    env = operator_env(DATA_DIR=str(sandbox_world.data), RISOLUTO_CONFIG=str(config), RISOLUTO_PORT=str(port))
    server = spawn([*RISOLUTO, "serve"], env)
    base = f"http://127.0.0.1:{port}/api/v1"
    try:
        assert wait_answering(server, base + "/runtime") is not None, server.stderr.read()
        for n in (1, 2):
            done = httpx.post(base + "/sandboxes", timeout=60, json={
                "issue": f"LONG-{n}", "command": ["sleep", "1.5"], "wait": True})
            assert done.status_code == 201 and done.json()["exit_code"] == 0, done.text
        deadline = time.monotonic() + 20
        while not pooled(sandbox_world):
            assert time.monotonic() < deadline, "no volume was prepared"
            time.sleep(0.1)
        [name] = pooled(sandbox_world)
        started = httpx.post(base + "/sandboxes", timeout=60, json={"issue": "LONG-3", "command": ["sleep", "60"]})
        assert started.status_code == 201, started.text
        assert codex_home_volume(sandbox_world, started.json()["id"]) == name
    finally:
        server.send_signal(signal.SIGTERM)  # a clean stop removes the sandbox and the pool
        _, err = server.communicate(timeout=60)
    assert "Traceback" not in err and "Exception in callback" not in err, err
    assert pooled(sandbox_world) == []


class FakeEngine:
    """Just enough of the runtime for PreparedVolumes: volumes and carriers in dicts, a slow put."""

    instance = "f" * 16

    def __init__(self) -> None:
        self.volumes: dict[str, dict] = {}
        self.containers: set[str] = set()

    async def engine_call(self, call):
        return call(self)

    async def remove_objects(self, items):
        for kind, ref in items:
            try:
                (self.remove_container if kind == "container" else self.remove_volume)(ref, force=True)
            except KeyError:
                pass
        return True

    def create_volume(self, name, labels):
        self.volumes[name] = {"Name": name, "Labels": labels}

    def remove_volume(self, name, force):
        del self.volumes[name]

    def inspect_volume(self, name):
        return self.volumes[name]

    def create_container(self, image, **kwargs):
        cid = f"c{len(self.containers)}"
        self.containers.add(cid)
        return {"Id": cid}

    def put_archive(self, cid, path, data):
        return True

    def remove_container(self, cid, force, v=False):
        self.containers.remove(cid)


def codex_spec(auth: bytes) -> ContainerSpec:
    spec = ContainerSpec(name="n", image="img", user="1000:1000")
    spec.mounts = [Mount(target=CODEX_HOME, type="volume", labels={"risoluto.scope": "attempt"})]
    spec.files = {CODEX_HOME + "/": b"", CODEX_HOME + "/config.toml": b"c", CODEX_HOME + "/auth.json": auth}
    return spec


async def test_a_fill_that_ends_after_its_files_changed_is_dropped(monkeypatch):
    engine = FakeEngine()
    prepared = PreparedVolumes(engine)
    release = anyio.Event()

    async def slow_fill(slot):  # the real fill, held until the files have changed
        await release.wait()
        return await original_fill(slot)

    original_fill = prepared._fill
    monkeypatch.setattr(prepared, "_fill", slow_fill)
    old = prepared.slots(codex_spec(b"old-token"))
    prepared.claim(old, [])
    prepared.claim(old, [])  # the same files twice in a row: worth preparing
    prepared.refill(old)
    new = prepared.slots(codex_spec(b"rotated-token"))
    assert prepared.claim(new, []) == {}  # a launch with the rotated auth.json meanwhile
    release.set()
    await prepared.settled()
    for _ in range(100):
        if not prepared._tasks:
            break
        await anyio.sleep(0.01)
    assert engine.volumes == {} and engine.containers == set()  # the old credential's copy is gone
    prepared.refill(old)  # a late refill for out-of-date files (a long run's timer) does nothing
    assert not prepared._tasks and engine.volumes == {}
    await prepared.close()


async def test_close_drops_pooled_volumes_and_fills_in_flight():
    engine = FakeEngine()
    prepared = PreparedVolumes(engine)
    slots = prepared.slots(codex_spec(b"t"))
    prepared.claim(slots, [])
    prepared.claim(slots, [])
    prepared.refill(slots)
    await prepared.settled()
    assert len(engine.volumes) == 1  # pooled
    prepared.refill(slots)  # already pooled: no second fill
    await prepared.settled()
    assert len(engine.volumes) == 1
    await prepared.close()
    assert engine.volumes == {} and engine.containers == set()
    prepared.refill(slots)  # closed: nothing more is filled
    assert not prepared._tasks


async def test_a_launch_refused_for_its_image_leaves_the_pool_alone(sandbox_world):
    client, kernel = await sandbox_world.app()
    _, name = await filled_pool(sandbox_world, client, kernel)
    refused = await run(client, {"issue": "PREP-X", "image": "risoluto-no-such-image:1", "command": ["true"]}, 400)
    assert refused["error"]["code"] == "image_not_found"  # it reached the runtime
    assert pooled(sandbox_world) == [name]
    response = await client.post("/api/v1/sandboxes", json={"issue": "PREP-3", "command": ["sleep", "60"]})
    record = await response.get_json()
    assert codex_home_volume(sandbox_world, record["id"]) == name
    await client.delete(f"/api/v1/sandboxes/{record['id']}")
