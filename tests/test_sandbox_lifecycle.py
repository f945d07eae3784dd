"""Lifecycle against the real engine: timeout, stop, OOM, pids, limits, crash cleanup, bad input."""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import time
from pathlib import Path

import anyio
import docker
import pytest
from docker_util import docker_engine, logs, run, sandbox_world, wait_for_log  # noqa: F401

from risoluto.hookspecs import hookimpl

pytestmark = [pytest.mark.anyio, pytest.mark.docker]


def mine(world, **filters):
    label = [f"risoluto.instance={world.instance}"]
    return world.docker.containers(all=True, filters={"label": label, **filters})


async def test_timeout_stops_reports_and_removes(sandbox_world):
    client, _ = await sandbox_world.app()
    started = time.monotonic()
    record = await run(client, {"issue": "T-1", "command": ["sleep", "100"], "timeout_s": 2})
    assert time.monotonic() - started < 15
    assert record["status"] == "timed_out" and record["timed_out"] is True and record["reason"] == "timeout"
    assert record["exit_code"] is not None and record["removed"] is True
    assert mine(sandbox_world) == []
    shown = await (await client.get(f"/api/v1/sandboxes/{record['id']}")).get_json()
    assert shown["status"] == "timed_out"


async def test_background_launch_logs_and_delete(sandbox_world):
    client, _ = await sandbox_world.app()
    response = await client.post("/api/v1/sandboxes", json={
        "issue": "BG-1", "command": ["sh", "-c", "echo started; exec sleep 300"]})
    created = await response.get_json()
    assert response.status_code == 201 and created["status"] == "running"
    assert set(created) >= {"id", "name", "status", "policy"}
    await wait_for_log(client, created["id"], "started")
    listed = await (await client.get("/api/v1/sandboxes")).get_json()
    assert [s["id"] for s in listed["sandboxes"]] == [created["id"]]
    response = await client.delete(f"/api/v1/sandboxes/{created['id']}")
    final = await response.get_json()
    assert response.status_code == 200 and final["status"] == "stopped" and final["removed"] is True
    assert mine(sandbox_world) == []
    assert "started" in await logs(client, created["id"])  # kept after removal
    response = await client.delete(f"/api/v1/sandboxes/{'f' * 64}")
    assert response.status_code == 404 and (await response.get_json())["error"]["code"] == "sandbox_not_found"


async def test_exit_code_and_oom_are_reported(sandbox_world):
    client, _ = await sandbox_world.app({"codex": {"sandbox": {"resources": {
        "memory": "64m", "memorySwap": "64m", "memoryReservation": "32m"}}}})
    record = await run(client, {"issue": "X-1", "command": ["sh", "-c", "exit 7"]})
    assert record["exit_code"] == 7 and record["oom_killed"] is False and record["status"] == "exited"
    hog = "b = []\nwhile True: b.append(bytearray(8 * 1024 * 1024))"
    record = await run(client, {"issue": "OOM-1", "command": ["python3", "-c", hog]})
    assert record["oom_killed"] is True and record["exit_code"] == 137
    assert mine(sandbox_world) == []


async def test_pids_exhaustion_is_contained(sandbox_world):
    client, _ = await sandbox_world.app({"codex": {"sandbox": {"resources": {"pidsLimit": 40}}}})
    script = """
import subprocess
procs = []
try:
    for _ in range(200):
        procs.append(subprocess.Popen(["sleep", "30"]))
except OSError as e:
    print("refused after", len(procs), e.strerror)
for p in procs:
    p.kill()
"""
    record = await run(client, {"issue": "PID-1", "command": ["python3", "-c", script]})
    out = await logs(client, record["id"])
    assert "refused after" in out, out
    assert int(out.split("refused after")[1].split()[0]) < 40
    assert record["status"] == "exited" and mine(sandbox_world) == []


async def test_concurrency_limit_answers_busy(sandbox_world):
    client, _ = await sandbox_world.app({"codex": {"sandbox": {"maxConcurrent": 2}}})
    ids = []
    for n in range(2):
        response = await client.post("/api/v1/sandboxes", json={"issue": f"C-{n}", "command": ["sleep", "300"]})
        assert response.status_code == 201
        ids.append((await response.get_json())["id"])
    response = await client.post("/api/v1/sandboxes", json={"issue": "C-3", "command": ["true"]})
    assert response.status_code == 503 and (await response.get_json())["error"]["code"] == "sandbox_busy"
    assert response.headers["Retry-After"]
    assert len(mine(sandbox_world)) == 2
    for sandbox_id in ids:
        assert (await client.delete(f"/api/v1/sandboxes/{sandbox_id}")).status_code == 200
    record = await run(client, {"issue": "C-3", "command": ["true"]})  # the slots are free again
    assert record["exit_code"] == 0


async def test_unknown_image_is_a_400_and_never_pulled(sandbox_world):
    client, _ = await sandbox_world.app()
    response = await client.post("/api/v1/sandboxes", json={"issue": "I-1", "image": "risoluto-no-such-image:1"})
    body = await response.get_json()
    assert response.status_code == 400 and body["error"]["code"] == "image_not_found"
    with pytest.raises(docker.errors.NotFound):
        sandbox_world.docker.inspect_image("risoluto-no-such-image:1")
    assert mine(sandbox_world) == []
    # and no HOME volume was made for the issue of a launch that could never run
    volumes = sandbox_world.docker.volumes(filters={"label": f"risoluto.instance={sandbox_world.instance}"})
    assert [v["Name"] for v in volumes.get("Volumes") or [] if v["Name"].endswith("-I-1")] == []


@pytest.mark.parametrize("issue", ["../../etc", "a/b", "with space", "ünïcødé-✓", ".", "..", "-lead", "x" * 200])
async def test_hostile_issue_ids_stay_inside_the_workspace_root(sandbox_world, issue):
    client, _ = await sandbox_world.app()
    record = await run(client, {"issue": issue, "command": ["sh", "-c", "touch /workspace/mark"]})
    assert record["exit_code"] == 0 and record["issue"] == issue
    root = sandbox_world.ws_root.resolve()
    marks = list(root.glob("*/mark"))
    assert len(marks) == 1 and marks[0].parent.parent == root
    name = marks[0].parent.name
    assert not name.startswith(".") and len(name) <= 80 and all(c.isalnum() or c in "._-" for c in name)
    assert record["name"].startswith("risoluto-") and len(record["name"]) < 128


async def test_overlong_or_control_issue_ids_are_refused(sandbox_world):
    client, _ = await sandbox_world.app()
    for issue in ["x" * 300, "a\nb", "", 5, None]:
        response = await client.post("/api/v1/sandboxes", json={"issue": issue})
        assert response.status_code == 400 and (await response.get_json())["error"]["code"] == "invalid_issue"
    assert not sandbox_world.ws_root.exists() or list(sandbox_world.ws_root.iterdir()) == []


async def test_similar_ids_never_share_a_workspace(sandbox_world):
    client, _ = await sandbox_world.app()
    for issue in ("a/b", "a_b"):
        await run(client, {"issue": issue, "command": ["sh", "-c", f"echo {issue} > /workspace/who"]})
    names = sorted(p.parent.name for p in sandbox_world.ws_root.glob("*/who"))
    assert len(names) == 2 and names[0] != names[1]


async def test_missing_workspace_root_is_created_and_a_file_root_is_a_clear_error(sandbox_world):
    deep = sandbox_world.tmp / "not" / "yet" / "there"
    client, _ = await sandbox_world.app({"workspace": {"root": str(deep)}})
    await run(client, {"issue": "W-1", "command": ["true"]})
    assert (deep / "W-1").is_dir()
    blocker = sandbox_world.tmp / "a-file"
    blocker.write_text("")
    client, _ = await sandbox_world.app({"workspace": {"root": str(blocker)}})
    response = await client.post("/api/v1/sandboxes", json={"issue": "W-2"})
    body = await response.get_json()
    assert response.status_code == 503 and body["error"]["code"] == "workspace_unavailable"
    assert str(blocker) in body["error"]["message"]


async def test_workspace_symlink_is_refused(sandbox_world):
    sandbox_world.ws_root.mkdir()
    (sandbox_world.ws_root / "LINK-1").symlink_to(sandbox_world.data)
    client, _ = await sandbox_world.app()
    response = await client.post("/api/v1/sandboxes", json={"issue": "LINK-1"})
    assert response.status_code == 409 and (await response.get_json())["error"]["code"] == "workspace_invalid"


async def test_crash_leftovers_are_cleaned_at_startup_and_only_ours(sandbox_world):
    api = sandbox_world.docker
    ours = api.create_container("risoluto-test:latest", ["sleep", "300"], labels={
        "risoluto.instance": sandbox_world.instance, "risoluto.managed": "true", "risoluto.issue": "CRASH-1"})
    api.start(ours["Id"])
    attempt_volume = api.create_volume(f"rsl-test-{sandbox_world.instance}-codex", labels={
        "risoluto.instance": sandbox_world.instance, "risoluto.scope": "attempt"})
    other_instance = {"risoluto.instance": "0123456789abcdef-other", "risoluto.managed": "true"}
    theirs = api.create_container("risoluto-test:latest", ["sleep", "300"], labels=other_instance)
    try:
        await sandbox_world.app()
        with pytest.raises(docker.errors.NotFound):
            api.inspect_container(ours["Id"])
        with pytest.raises(docker.errors.NotFound):
            api.inspect_volume(attempt_volume["Name"])
        assert api.inspect_container(theirs["Id"])["Id"] == theirs["Id"]  # another kernel's: untouched
    finally:
        api.remove_container(theirs["Id"], force=True)


class Recorder:
    def __init__(self):
        self.events = []

    @hookimpl
    def risoluto_sandbox_event(self, event):
        self.events.append(event)


async def test_events_and_metrics(sandbox_world):
    recorder = Recorder()
    client, _ = await sandbox_world.app(plugins=(("test.recorder", recorder),))
    record = await run(client, {"issue": "M-1", "command": ["sh", "-c", "exit 3"]})
    kinds = [e.kind for e in recorder.events if e.id == record["id"]]
    assert kinds == ["created", "started", "exited", "removed"]
    assert recorder.events[2].exit_code == 3 and recorder.events[2].issue == "M-1"
    text = await (await client.get("/metrics")).get_data(as_text=True)
    assert 'risoluto_sandbox_launches_total{result="started"} 1.0' in text
    assert 'risoluto_sandbox_exits_total{code="3",oom_killed="false",timed_out="false"} 1.0' in text
    assert "risoluto_sandbox_duration_seconds_count 1.0" in text


async def test_policy_endpoint_matches_the_launch_digest(sandbox_world):
    client, _ = await sandbox_world.app()
    policy = await (await client.get("/api/v1/sandbox/policy")).get_json()
    record = await run(client, {"issue": "P-1", "command": ["true"]})
    assert policy["launchable"] is True and policy["policy_digest"] == record["policy_digest"]
    assert policy["policy"] == record["policy"]


async def test_docker_absent_does_not_stop_startup(sandbox_world, tmp_path: Path):
    env = {"DOCKER_HOST": f"unix://{tmp_path}/no-docker.sock"}
    client, _ = await sandbox_world.app(env=env)
    response = await client.post("/api/v1/sandboxes", json={"issue": "D-1", "command": ["true"]})
    body = await response.get_json()
    assert response.status_code == 503 and body["error"]["code"] == "sandbox_runtime_unavailable"
    assert "Start Docker" in body["error"]["message"]
    assert (await client.get("/api/v1/sandboxes")).status_code == 503
    assert (await client.get("/api/v1/sandbox/policy")).status_code == 200


class SocketRelay:
    """A unix socket in front of the engine that the test can cut mid-run.

    Plain sockets on threads, not anyio streams: cancelling an anyio unix stream while the
    engine is sending can settle its cancelled read future (InvalidStateError, raised in the
    event loop), which failed this test now and then."""

    def __init__(self, path: Path):
        self.path = path
        self._cut = threading.Event()
        self._lock = threading.Lock()
        self._sockets: list[socket.socket] = []
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)

    def start(self) -> None:
        self._listener.bind(str(self.path))
        self._listener.listen(16)
        self._listener.settimeout(0.1)  # checks for the cut between waits
        threading.Thread(target=self._accept, name="engine-relay", daemon=True).start()

    def cut(self) -> None:
        """The engine "goes away": the listener closes (a connection waiting in its backlog is
        reset, a new one refused) and every relayed connection is shut down."""
        self._cut.set()
        with self._lock:
            self._listener.close()
            for sock in self._sockets:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)

    def _accept(self) -> None:
        while not self._cut.is_set():
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:  # closed by cut()
                return
            client.settimeout(None)
            upstream = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            upstream.connect("/var/run/docker.sock")
            with self._lock:
                if self._cut.is_set():  # cut while this one was connecting
                    client.close()
                    upstream.close()
                    return
                self._sockets += [client, upstream]
            for src, dst in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(src, dst), daemon=True).start()

    @staticmethod
    def _pipe(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        for sock in (src, dst):  # one side ended: end the whole connection
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)


async def test_engine_going_away_mid_run_is_a_reported_failure(sandbox_world, tmp_path: Path):
    relay = SocketRelay(tmp_path / "engine.sock")
    relay.start()
    client, _ = await sandbox_world.app(env={"DOCKER_HOST": f"unix://{relay.path}"})
    response = await client.post("/api/v1/sandboxes", json={"issue": "GONE-1", "command": ["sleep", "300"]})
    created = await response.get_json()
    assert response.status_code == 201
    relay.cut()  # the engine "goes away"
    os.unlink(relay.path)
    with anyio.fail_after(20):
        while True:
            shown = await (await client.get(f"/api/v1/sandboxes/{created['id']}")).get_json()
            if shown["status"] != "running":
                break
            await anyio.sleep(0.2)
    assert shown["status"] == "failed" and "Docker engine" in shown["reason"]
    # the next start of this DATA_DIR (engine back) removes what was left
    await sandbox_world.app()
    assert mine(sandbox_world) == []


async def test_cached_image_and_network_answers_do_not_outlive_the_objects(sandbox_world):
    """The runtime remembers that an image and the network exist; when either goes between
    launches, the next launch still says image_not_found (nothing pulled) / re-creates the network."""
    from docker_util import TEST_IMAGE

    client, _ = await sandbox_world.app()
    tag = f"risoluto-test:vanish-{os.getpid()}"
    sandbox_world.docker.tag(TEST_IMAGE, *tag.split(":"))
    try:
        assert (await run(client, {"issue": "V-1", "image": tag, "command": ["true"]}))["exit_code"] == 0
        sandbox_world.docker.remove_network(sandbox_world.network)
        assert (await run(client, {"issue": "V-1", "image": tag, "command": ["true"]}))["exit_code"] == 0
        assert sandbox_world.docker.networks(names=[sandbox_world.network])
    finally:
        sandbox_world.docker.remove_image(tag)
    response = await client.post("/api/v1/sandboxes", json={"issue": "V-1", "image": tag, "command": ["true"]})
    body = await response.get_json()
    assert response.status_code == 400 and body["error"]["code"] == "image_not_found"
    with pytest.raises(docker.errors.NotFound):
        sandbox_world.docker.inspect_image(tag)
    assert mine(sandbox_world) == []


async def test_many_log_followers_do_not_starve_other_engine_calls(sandbox_world, caplog):
    # each follower holds a worker thread for the sandbox's life; on anyio's shared default
    # limiter (40 threads) enough of them would leave every other engine call waiting
    client, kernel = await sandbox_world.app()
    response = await client.post("/api/v1/sandboxes", json={
        "issue": "FOLLOW-1", "command": ["sh", "-c", "echo started; exec sleep 300"]})
    created = await response.get_json()
    await wait_for_log(client, created["id"], "started")
    followers = anyio.to_thread.current_default_thread_limiter().total_tokens + 5
    seen: list[bytes] = []

    async def follow() -> None:
        async for chunk in kernel.backends.runtime.stream_logs(created["id"]):
            seen.append(chunk)

    async with anyio.create_task_group() as tg:
        for _ in range(followers):
            tg.start_soon(follow)
        with anyio.fail_after(20):
            while len(seen) < followers:  # every follower has its stream open
                await anyio.sleep(0.05)
        with anyio.fail_after(10):
            assert "started" in await logs(client, created["id"])  # an engine call through the runtime
            final = await (await client.delete(f"/api/v1/sandboxes/{created['id']}")).get_json()
        assert final["status"] == "stopped"
    assert mine(sandbox_world) == []
    # and their connections went back to the pool instead of being dropped one by one
    assert "Connection pool is full" not in caplog.text


def _threads_in(function: str) -> int:
    """Threads whose stack is inside ``function`` right now."""
    import sys

    count = 0
    for frame in sys._current_frames().values():
        while frame is not None:
            if frame.f_code.co_name == function and "docker_runtime" in frame.f_code.co_filename:
                count += 1
                break
            frame = frame.f_back
    return count


async def test_a_follower_that_goes_away_frees_its_thread_while_the_sandbox_stays_quiet(sandbox_world):
    # a follower blocks in the engine's log read until the container prints again; when its
    # reader leaves, that read must end too, or each departed follower keeps a thread for days
    client, kernel = await sandbox_world.app()
    created = await (await client.post("/api/v1/sandboxes", json={
        "issue": "QUIET-1", "command": ["sh", "-c", "echo started; exec sleep 300"]})).get_json()
    await wait_for_log(client, created["id"], "started")

    async def follow_once() -> None:
        stream = kernel.backends.runtime.stream_logs(created["id"])
        assert b"started" in await stream.__anext__()
        await stream.aclose()  # the reader leaves; the container stays quiet

    async with anyio.create_task_group() as tg:
        for _ in range(10):
            tg.start_soon(follow_once)
    with anyio.fail_after(5):
        while _threads_in("pump"):
            await anyio.sleep(0.05)
    assert kernel.backends.runtime._follows.borrowed_tokens == 0
    await client.delete(f"/api/v1/sandboxes/{created['id']}")


async def test_logs_are_capped_in_bytes_while_running_and_after_exit(sandbox_world):
    # 3000 lines of 4000 bytes fit in the 10 000-line tail, but are 12 MB: the answer must stay
    # within the 1 MiB cap (the engine's 16 KiB entries could make that tail 160 MB)
    client, _ = await sandbox_world.app()
    script = 'yes "$(head -c 4000 /dev/zero | tr "\\0" x)" | head -n 3000; echo LAST-LINE; exec sleep 300'
    created = await (await client.post("/api/v1/sandboxes", json={
        "issue": "LOUD-1", "command": ["sh", "-c", script]})).get_json()
    running = await wait_for_log(client, created["id"], "LAST-LINE")
    assert len(running.encode()) <= 1024 * 1024 and running.endswith("LAST-LINE\n")
    final = await (await client.delete(f"/api/v1/sandboxes/{created['id']}")).get_json()
    assert final["status"] == "stopped"
    kept = await logs(client, created["id"])
    assert len(kept.encode()) <= 1024 * 1024 and kept.endswith("LAST-LINE\n")
