"""The checklist, read back from inside launched containers (real engine, runc)."""

from __future__ import annotations

import json
import shutil
import stat

import pytest
from docker_util import docker_engine, logs, probe, run, sandbox_world  # noqa: F401

pytestmark = [pytest.mark.anyio, pytest.mark.docker]


async def test_default_policy_is_true_inside_the_container(sandbox_world):
    world = sandbox_world
    (world.auth / "auth.json").write_text('{"tokens": "host-auth-token"}')
    client, _ = await world.app()
    record, facts = await probe(client, issue="ABC-123")
    assert record["status"] == "exited" and record["removed"] is True
    # capabilities, no-new-privileges, seccomp, user
    assert int(facts["CapEff"], 16) == 0 and int(facts["CapPrm"], 16) == 0
    assert facts["NoNewPrivs"] == "1"
    assert facts["Seccomp"] == "2"
    assert (facts["uid"], facts["gid"]) == (1000, 1000)
    # cgroup limits from the resources config
    assert int(facts["memory_limit"]) == 256 * 1024**2
    assert facts["pids_limit"] == "256"
    assert facts["tmp_fs"] == ["tmpfs"]
    # workspace: writable, and it is the host's <root>/<issue>
    assert facts["workspace_write"] == "ok" and facts["cwd"] == "/workspace"
    host_ws = world.workspace_of("ABC-123")
    assert (host_ws / "probe.txt").read_text() == "x"
    assert stat.S_IMODE(host_ws.stat().st_mode) == 0o700 and host_ws.stat().st_uid == 1000
    assert facts["root_ro"] is False and facts["home_write"] == "ok"
    # never mounted: DATA_DIR, the Docker socket, ~/.codex
    assert facts["docker_sock"] == []
    for root in facts["mount_roots"]:
        assert not root.startswith(str(world.data)) and not root.startswith(str(world.auth))
    assert "/var/run/docker.sock" not in facts["mount_points"]
    # HOME / CODEX_HOME, config.toml derived from the policy, auth.json copied (0600, agent's)
    assert facts["home"] == "/home/agent" and facts["codex_home"] == "/home/agent/.codex-runtime"
    assert facts["codex_files"] == ["auth.json", "config.toml"]
    assert 'sandbox_mode = "workspace-write"' in facts["config_toml"]
    assert "network_access = false" in facts["config_toml"]
    assert facts["auth_json"] == '{"tokens": "host-auth-token"}'
    assert facts["auth_stat"] == ["0o600", 1000, 1000]
    assert facts["raw_socket"] == "EPERM"
    # the policy the API reported is the one the digest covers
    assert record["policy"]["dropCapabilities"] is True and record["policy"]["network"] == world.network
    assert record["policy_digest"].startswith("sha256:")


async def test_codex_home_is_fresh_per_attempt_home_persists(sandbox_world):
    client, _ = await sandbox_world.app()
    script = ("import os; open(os.environ['CODEX_HOME'] + '/stale', 'w').write('1'); "
              "open('/home/agent/cache', 'a').write('x'); print(sorted(os.listdir(os.environ['CODEX_HOME'])), "
              "open('/home/agent/cache').read())")
    first = await run(client, {"issue": "HOME-1", "command": ["python3", "-c", script]})
    second = await run(client, {"issue": "HOME-1", "command": ["python3", "-c", script]})
    assert "['config.toml', 'stale'] x" in await logs(client, first["id"])
    # the stale file of attempt 1 is gone; the HOME build cache is still there
    assert "['config.toml', 'stale'] xx" in await logs(client, second["id"])


async def test_root_in_the_container_has_no_capabilities_and_read_only_root(sandbox_world):
    client, _ = await sandbox_world.app({"codex": {"sandbox": {
        "user": "0:0", "security": {"readOnlyRootfs": True}}}})
    _, facts = await probe(client, issue="ROOT-1")
    assert facts["uid"] == 0 and int(facts["CapEff"], 16) == 0 and int(facts["CapPrm"], 16) == 0
    assert facts["root_ro"] is True and facts["etc_write"] == "EROFS"
    assert facts["workspace_write"] == "ok"  # the workspace and volumes stay writable
    assert facts["raw_socket"] == "EPERM"


async def test_privilege_escalation_attempts_fail_as_root(sandbox_world):
    client, _ = await sandbox_world.app({"codex": {"sandbox": {"user": "0:0"}}})
    script = r"""
import ctypes, errno, os
libc = ctypes.CDLL(None, use_errno=True)
def res(rc):
    return "ok" if rc == 0 else errno.errorcode[ctypes.get_errno()]
open("/tmp/f", "w").close()
out = {
  "chown_root_file": res(libc.chown(b"/etc/hostname", 1000, 1000)),
  "chown_own_file": res(libc.chown(b"/tmp/f", 1000, 1000)),
  "mount": res(libc.mount(b"none", b"/mnt", b"tmpfs", 0, None)),
  "setuid_back": res(libc.setuid(0)),
  "mknod": res(libc.mknod(b"/tmp/dev", 0o20600, os.makedev(1, 3))),
  "chroot": res(libc.chroot(b"/tmp")),
}
print(out)
"""
    record = await run(client, {"issue": "ESC-1", "command": ["python3", "-c", script]})
    out = await logs(client, record["id"])
    assert "'chown_root_file': 'EPERM'" in out and "'chown_own_file': 'EPERM'" in out
    assert "'mount': 'EPERM'" in out and "'mknod': 'EPERM'" in out and "'chroot': 'EPERM'" in out


@pytest.mark.parametrize("nnp", [True, False])
async def test_setuid_binary_grants_nothing_under_no_new_privileges(sandbox_world, nnp):
    world = sandbox_world
    host_ws = world.workspace_of("SUID-1")
    host_ws.mkdir(parents=True)
    shutil.copy("/usr/bin/id", host_ws / "id")  # root-owned, setuid: the classic escalation
    (host_ws / "id").chmod(0o4755)
    client, _ = await world.app({"codex": {"sandbox": {"security": {"noNewPrivileges": nnp}}}})
    record = await run(client, {"issue": "SUID-1", "command": ["/workspace/id"]})
    out = await logs(client, record["id"])
    assert "uid=1000" in out
    # the control run proves the test can fail: without NNP the setuid bit works
    assert ("euid=0" in out) is (not nnp)


async def test_workspace_read_mounts_the_workspace_read_only(sandbox_world):
    client, _ = await sandbox_world.app({"codex": {"threadSandbox": "workspace-read"}})
    _, facts = await probe(client, issue="RO-1")
    assert facts["workspace_ro"] is True and facts["workspace_write"] == "EROFS"
    assert 'sandbox_mode = "read-only"' in facts["config_toml"]
    assert "[sandbox_workspace_write]" not in facts["config_toml"]


async def test_turn_policy_with_network_access_reaches_config_toml(sandbox_world):
    client, _ = await sandbox_world.app({"codex": {"turnSandboxPolicy": {"networkAccess": True}}})
    _, facts = await probe(client, issue="NET-1")
    assert "network_access = true" in facts["config_toml"]


async def test_secrets_reach_only_the_environment(sandbox_world, caplog):
    world = sandbox_world
    value = "s3cr3t-value-9f8e7d"
    client, _ = await world.app(env={"MASTER_KEY": "sandbox-test-master-key"})
    response = await client.post("/api/v1/secrets/API_TOKEN", json={"value": value})
    assert response.status_code == 204
    response = await client.post("/api/v1/sandboxes", json={
        "issue": "SEC-1", "secrets": ["API_TOKEN"], "command": ["sh", "-c", 'echo "got=$API_TOKEN"; sleep 30'],
        "env": {"PLAIN": "1"},
    })
    created = await response.get_json()
    assert response.status_code == 201
    inspect = world.docker.inspect_container(created["id"])
    assert f"API_TOKEN={value}" in inspect["Config"]["Env"]  # environment of the create call
    assert value not in json.dumps(inspect["Config"]["Labels"]) and value not in json.dumps(inspect["Config"]["Cmd"])
    assert value not in inspect["Name"]
    labels = inspect["Config"]["Labels"]
    assert labels["risoluto.issue"] == "SEC-1" and labels["risoluto.workspace"] == str(world.workspace_of("SEC-1"))
    assert labels["risoluto.policy"] == created["policy_digest"] and labels["risoluto.started-at"]
    bodies = [json.dumps(created)]
    for path in ("/api/v1/sandboxes", f"/api/v1/sandboxes/{created['id']}"):
        bodies.append(json.dumps(await (await client.get(path)).get_json()))
    removed = await client.delete(f"/api/v1/sandboxes/{created['id']}")
    bodies.append(json.dumps(await removed.get_json()))
    assert all(value not in body for body in bodies)
    assert "API_TOKEN" in created["env_keys"] and "PLAIN" in created["env_keys"]
    assert value not in caplog.text
    assert f"got={value}" in await logs(client, created["id"])  # the container did get it


async def test_secret_errors(sandbox_world):
    client, _ = await sandbox_world.app()  # no master key: the store is locked
    response = await client.post("/api/v1/sandboxes", json={"issue": "S-1", "secrets": ["X"]})
    assert response.status_code == 503 and (await response.get_json())["error"]["code"] == "secrets_locked"
    client, _ = await sandbox_world.app(env={"MASTER_KEY": "another-master-key"})
    response = await client.post("/api/v1/sandboxes", json={"issue": "S-1", "secrets": ["NOPE"]})
    assert response.status_code == 400 and (await response.get_json())["error"]["code"] == "secret_not_found"
