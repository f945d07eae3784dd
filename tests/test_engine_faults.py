"""Engine faults, tried on an engine of the test's own (tests/own_engine.py): restarted while a
sandbox runs, frozen (SIGSTOP) for longer than the deadline, and the kernel killed with -9 while
its sandboxes run. The shared engine is never stopped, frozen or restarted.

Needs root (a second dockerd); without it the tests skip, and fail under CI=true.
"""

from __future__ import annotations

import json
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Iterator

import anyio
import httpx
import pytest
import yaml
from docker_util import World, remove_persistent
from http_support import free_port
from own_engine import RUNSC, OwnEngine, missing
from serve_util import RISOLUTO, operator_env, spawn, stop, wait_answering

from risoluto.plugins.sandbox._naming import attempt_volume_prefix
from risoluto.settings import deep_merge

pytestmark = [pytest.mark.anyio, pytest.mark.docker]

DEADLINE_S = 2.0
# The frozen engine's test: long enough for a burst of 45 requests to be in and waiting on the
# engine (on a busy shared 2-core machine that takes a second or two) before the other routes are
# timed; SLACK_S is scheduling delay. Both far below the minute a frozen engine once cost.
FROZEN_DEADLINE_S = 5.0
SLACK_S = 3.0
GRACE_S = 1
# exits at once on SIGTERM (a plain `sleep` as PID 1 ignores it and waits out dockerd's 10 s)
QUICK_TERM = ["sh", "-c", "trap 'exit 0' TERM; sleep 300 & wait"]
OVERRIDES: dict[str, Any] = {
    "codex": {"sandbox": {"network": "none", "stopGraceS": GRACE_S}},
    "sandbox": {"engineTimeoutSeconds": DEADLINE_S},
}


def _unavailable(reason: str) -> None:
    import os

    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"the engine fault tests need their own engine under CI=true: {reason}")
    pytest.skip(reason)


@pytest.fixture(scope="module")
def own_engine() -> Iterator[OwnEngine]:
    why = missing()
    if why:
        _unavailable(why)
    engine = OwnEngine()
    try:
        engine.start()
        engine.load_test_image()
        yield engine
    finally:
        engine.close()


@pytest.fixture
def engine(own_engine: OwnEngine) -> Iterator[OwnEngine]:
    """The module's engine, running and thawed, whatever the previous test did to it."""
    own_engine.thaw()
    if own_engine.proc is None or own_engine.proc.poll() is not None:
        own_engine.proc = None
        own_engine.start()
    yield own_engine
    own_engine.thaw()


@pytest.fixture
async def world(tmp_path: Path, engine: OwnEngine) -> Any:
    """A DATA_DIR of its own on the test's engine; afterwards nothing of it is left there."""
    w = World(tmp_path, engine.client())
    (w.auth / "auth.json").write_text('{"token": "engine-faults"}')  # CODEX_HOME then holds a copy
    try:
        yield w
    finally:
        await w.stack.aclose()
        if engine.proc is None:
            engine.start()
        engine.thaw()
        remove_persistent(w.docker, w.instance, "")
        for vol in w.docker.volumes().get("Volumes") or []:
            if vol["Name"].startswith(attempt_volume_prefix(w.instance)):
                w.docker.remove_volume(vol["Name"], force=True)


def mine(w: World) -> dict[str, list[str]]:
    """Containers (any state) and per-attempt volumes of this DATA_DIR on the test's engine."""
    containers = w.docker.containers(all=True, filters={"label": [f"risoluto.instance={w.instance}"]})
    carriers = w.docker.containers(all=True, filters={"label": [f"risoluto.carrier={w.instance}"]})
    prefix = attempt_volume_prefix(w.instance)
    return {
        "containers": sorted(c["Names"][0].lstrip("/") for c in containers + carriers),
        "volumes": sorted(v["Name"] for v in w.docker.volumes().get("Volumes") or [] if v["Name"].startswith(prefix)),
    }


# --- engine restart mid-sandbox ----------------------------------------------------------
@pytest.mark.parametrize("runtime", ["runc", "runsc"])
async def test_an_engine_restart_mid_sandbox_leaks_nothing_and_the_record_tells_the_truth(world, engine, runtime):
    if runtime == "runsc" and RUNSC is None:
        _unavailable("runsc is not installed (scripts/provision-docker)")
    overrides = deep_merge(OVERRIDES, {"codex": {"sandbox": {"security": {"gvisor": runtime == "runsc"}}}})
    client, _ = await world.app(overrides, env={"DOCKER_HOST": engine.host})
    response = await client.post("/api/v1/sandboxes", json={"issue": "RESTART-1", "command": QUICK_TERM})
    started = await response.get_json()
    assert response.status_code == 201, started
    assert started["runtime"] == runtime
    # CODEX_HOME is a volume named for this instance (it holds a copy of auth.json)
    [codex_home] = mine(world)["volumes"]
    assert world.docker.inspect_volume(codex_home)["Labels"]["risoluto.instance"] == world.instance

    await anyio.to_thread.run_sync(engine.stop)  # `systemctl restart docker`, first half
    with anyio.fail_after(30):
        while (shown := await (await client.get(f"/api/v1/sandboxes/{started['id']}")).get_json())["status"] \
                == "running":
            await anyio.sleep(0.2)
    # the engine is down: nothing can have been removed, and the record does not say otherwise
    assert shown["removed"] is False and shown["removal"] == "pending", shown
    listing = await client.get("/api/v1/sandboxes")
    assert listing.status_code == 503
    assert (await listing.get_json())["error"]["code"] == "sandbox_runtime_unavailable"

    await anyio.to_thread.run_sync(engine.start)  # second half: the engine is back, the kernel still runs
    assert mine(world)["volumes"] == [codex_home]  # what the restart left: the kernel has not seen it yet
    with anyio.fail_after(30):
        while True:
            # an engine call that succeeds tells the reconciler the engine is back
            await client.get("/api/v1/sandboxes")
            shown = await (await client.get(f"/api/v1/sandboxes/{started['id']}")).get_json()
            if shown["removed"]:
                break
            await anyio.sleep(0.3)
    assert shown["removal"] == "done"
    assert mine(world) == {"containers": [], "volumes": []}


async def test_an_attempt_volume_without_labels_is_found_by_name_at_start(world, engine):
    """A volume the engine made without its labels (a create cut short by the engine's own
    shutdown) is removed at the next start by its name; another kernel's is left alone."""
    bare = world.docker.create_volume(attempt_volume_prefix(world.instance) + "0123456789abcdef")["Name"]
    other = world.docker.create_volume("risoluto-attempt-0123456789ab-0123456789abcdef",
                                       labels={"risoluto.scope": "attempt"})["Name"]
    try:
        await world.app(OVERRIDES, env={"DOCKER_HOST": engine.host})
        names = {v["Name"] for v in world.docker.volumes().get("Volumes") or []}
        assert bare not in names and other in names
    finally:
        world.docker.remove_volume(other, force=True)


async def test_leftovers_a_start_without_engine_could_not_remove_go_once_the_engine_is_back(world, engine):
    left = world.docker.create_container("risoluto-test:latest", ["sleep", "300"], name=f"rsl-left-{world.instance}",
                                         labels={"risoluto.instance": world.instance, "risoluto.managed": "true"})
    await anyio.sleep(2.5)  # made well before the kernel starts (the sweep's margin)
    await anyio.to_thread.run_sync(engine.stop)
    client, _ = await world.app(OVERRIDES, env={"DOCKER_HOST": engine.host})  # starts without an engine
    assert (await client.get("/api/v1/sandboxes")).status_code == 503
    await anyio.to_thread.run_sync(engine.start)
    with anyio.fail_after(30):
        while True:
            await client.get("/api/v1/sandboxes")  # the first answer triggers the sweep
            if not world.docker.containers(all=True, filters={"id": left["Id"]}):
                break
            await anyio.sleep(0.3)
    assert mine(world) == {"containers": [], "volumes": []}


# --- engine frozen --------------------------------------------------------------------------
class Served:
    """``risoluto serve`` on this world's DATA_DIR, on the test's engine."""

    def __init__(self, w: World, engine: OwnEngine, tmp: Path, deadline: float = DEADLINE_S):
        config = tmp / "serve.yaml"
        config.write_text(yaml.safe_dump(w.config({**OVERRIDES, "sandbox": {"engineTimeoutSeconds": deadline}})))
        self.port = free_port()
        self.env = operator_env(DATA_DIR=str(w.data), RISOLUTO_CONFIG=str(config), RISOLUTO_PORT=str(self.port),
                                DOCKER_HOST=engine.host, MASTER_KEY="engine-faults-master-key")
        self.base = f"http://127.0.0.1:{self.port}/api/v1"
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        self.proc = spawn([*RISOLUTO, "serve"], self.env)
        assert wait_answering(self.proc, self.base + "/runtime") is not None, self.proc.stderr.read()

    def stop(self) -> None:
        if self.proc is not None:
            stop(self.proc)

    def doctor(self) -> dict[str, Any]:
        out = subprocess.run([*RISOLUTO, "doctor", "--json"], env=self.env, capture_output=True, text=True,
                             timeout=120)
        return {i["item"]: i for i in json.loads(out.stdout)["items"]}


def timed(method: str, url: str, **kw: Any) -> tuple[int, dict[str, Any], float]:
    t0 = time.monotonic()
    response = httpx.request(method, url, timeout=120, **kw)
    seconds = time.monotonic() - t0
    try:
        body = response.json()
    except ValueError:
        body = {}
    body["_request"] = f"{method} {url.split('/api/v1')[-1]}"  # named in a failure's message
    return response.status_code, body, seconds


async def test_a_frozen_engine_holds_no_route_past_the_deadline(world, engine, tmp_path):
    served = Served(world, engine, tmp_path, deadline=FROZEN_DEADLINE_S)
    served.start()
    try:
        base = served.base
        status, running, _ = timed("POST", base + "/sandboxes", json={"issue": "FROZEN-1", "command": QUICK_TERM})
        assert status == 201, running
        assert timed("POST", base + "/secrets/FROZEN_KEY", json={"value": "v"})[0] == 204  # the store is open
        await anyio.to_thread.run_sync(_frozen_checks, engine, served, running["id"])
        # thawed: the engine routes work again, the sandbox is stopped and removed for real
        status, body, _ = timed("GET", base + "/sandboxes")
        assert status == 200, body
        status, body, _ = timed("DELETE", f"{base}/sandboxes/{running['id']}")
        assert status == 200 and body["removed"] is True, body
    finally:
        engine.thaw()
        served.stop()
    assert mine(world) == {"containers": [], "volumes": []}


def _timed_doctor(served: Served) -> tuple[dict[str, Any], float]:
    t0 = time.monotonic()
    items = served.doctor()
    return items, time.monotonic() - t0


def _frozen_checks(engine: OwnEngine, served: Served, sandbox_id: str) -> None:
    base = served.base
    engine.freeze()
    try:
        with ThreadPoolExecutor(64) as pool:
            # 45 engine-bound requests at once: more than the runtime's pool (32 threads by default)
            burst = [pool.submit(timed, "GET", base + "/sandboxes") for _ in range(35)]
            burst += [pool.submit(timed, "POST", base + "/sandboxes", json={"issue": f"FROZEN-{n}", "command": ["true"]})
                      for n in range(10)]
            time.sleep(2.0)  # they are all in, and waiting on the engine now
            # routes that do not need the engine answer at once, secrets (file backend) included
            for method, path, kw, want in [("POST", "/secrets/FROZEN_KEY", {"json": {"value": "v"}}, 204),
                                           ("GET", "/runtime", {}, 200), ("GET", "/secrets", {}, 200),
                                           ("GET", f"/sandboxes/{sandbox_id}", {}, 200)]:
                status, body, seconds = timed(method, base + path, **kw)
                assert status == want and seconds < 1.0, (path, status, body, seconds)
            # every engine-backed route: 503 sandbox_runtime_unavailable by the deadline
            checks = [pool.submit(timed, "GET", f"{base}/sandboxes/{sandbox_id}/logs"),
                      pool.submit(timed, "DELETE", f"{base}/sandboxes/{sandbox_id}")]
            hardening = pool.submit(timed, "GET", base + "/hardening")
            doctor = pool.submit(_timed_doctor, served)  # `risoluto doctor`, its own process
            results = [f.result() for f in burst + checks]
            h_status, h_body, h_seconds = hardening.result()
            d_items, d_seconds = doctor.result()
    finally:
        engine.thaw()
    timings = sorted((round(seconds, 2), body["_request"]) for _, body, seconds in results)
    for status, body, seconds in results:
        assert status == 503, body
        assert body["error"]["code"] in ("sandbox_runtime_unavailable", "sandbox_busy"), body
        limit = FROZEN_DEADLINE_S + GRACE_S + SLACK_S  # DELETE waits out the stop grace too
        assert seconds < limit, (body, seconds, timings)
    unavailable = [b for _, b, _ in results if b["error"]["code"] == "sandbox_runtime_unavailable"]
    assert len(unavailable) >= 35  # every GET, whether it waited the deadline or found the pool full
    # the doctor's engine items FAIL within the deadline instead of hanging the page
    assert h_status == 200 and h_seconds < FROZEN_DEADLINE_S + SLACK_S, (h_body, h_seconds)
    items = {i["item"]: i for i in h_body["items"]}
    assert items["sandbox docker"]["status"] == "FAIL"
    # the CLI too (its process start and plugin loading on top: a few seconds on a busy machine)
    assert d_items["sandbox docker"]["status"] == "FAIL" and d_seconds < FROZEN_DEADLINE_S + 2 * SLACK_S, d_seconds
    assert d_items["sandbox orphans"]["status"] == "PASS"  # the live server owns its sandbox


# --- kernel killed with -9 -------------------------------------------------------------------
async def test_a_killed_kernel_s_sandboxes_are_named_by_the_doctor_and_removed_at_the_next_start(
        world, engine, tmp_path):
    served = Served(world, engine, tmp_path)
    served.start()
    try:
        await anyio.to_thread.run_sync(_kill_mid_burst, served)
        left = mine(world)
        assert len(left["containers"]) >= 3, left  # the kernel died with its sandboxes running

        doctor = await anyio.to_thread.run_sync(served.doctor)  # no server runs on this DATA_DIR
        orphans = doctor["sandbox orphans"]
        assert orphans["status"] == "WARN", orphans
        for name in left["containers"]:
            assert name in orphans["fix"], (name, orphans)
        assert "risoluto serve" in orphans["fix"] and "docker rm -f" in orphans["fix"]

        served.start()  # the next start removes them
        assert mine(world) == {"containers": [], "volumes": []}
        doctor = await anyio.to_thread.run_sync(served.doctor)  # a live server owns this DATA_DIR
        assert doctor["sandbox orphans"]["status"] == "PASS", doctor["sandbox orphans"]
    finally:
        served.stop()
    doctor = await anyio.to_thread.run_sync(served.doctor)  # stopped cleanly: nothing left, no warning
    assert doctor["sandbox orphans"]["status"] == "PASS", doctor["sandbox orphans"]


def _kill_mid_burst(served: Served) -> None:
    with ThreadPoolExecutor(8) as pool:
        first = [pool.submit(timed, "POST", served.base + "/sandboxes",
                             json={"issue": f"KILLED-{n}", "command": QUICK_TERM}) for n in range(3)]
        assert all(f.result()[0] == 201 for f in first), [f.result() for f in first]
        more = [pool.submit(_quietly_post, served.base, n) for n in range(3, 6)]
        time.sleep(0.3)  # some of these are mid-launch now
        assert served.proc is not None
        served.proc.kill()
        served.proc.wait()
        for f in more:
            f.result()


def _quietly_post(base: str, n: int) -> None:
    try:
        httpx.post(base + "/sandboxes", json={"issue": f"KILLED-{n}", "command": QUICK_TERM}, timeout=30)
    except httpx.TransportError:
        pass  # the server died under it
