"""Seccomp profiles and the gVisor runtime, against the real engine."""

from __future__ import annotations

import json

import pytest
from docker_util import docker_engine, logs, probe, run, sandbox_world, wait_for_log  # noqa: F401

from risoluto.hookspecs import hookimpl

pytestmark = [pytest.mark.anyio, pytest.mark.docker]

DENY_MKDIR = {
    "defaultAction": "SCMP_ACT_ALLOW",
    "syscalls": [{"names": ["mkdir", "mkdirat"], "action": "SCMP_ACT_ERRNO", "errnoRet": 1}],
}
# Each call is tried; only mkdir may fail, and with EPERM.
CALLS = r"""
import errno, os
def res(fn):
    try:
        fn()
        return "ok"
    except OSError as e:
        return errno.errorcode[e.errno]
print({
  "mkdir": res(lambda: os.mkdir("/tmp/d")),
  "write": res(lambda: open("/tmp/f", "w").write("x")),
  "rename": res(lambda: os.rename("/tmp/f", "/tmp/g")),
  "uname": res(lambda: os.uname()),
  "symlink": res(lambda: os.symlink("/tmp/g", "/tmp/l")),
})
"""


async def test_custom_profile_denies_exactly_the_listed_syscall(sandbox_world):
    profile = sandbox_world.tmp / "deny-mkdir.json"
    profile.write_text(json.dumps(DENY_MKDIR))
    client, _ = await sandbox_world.app({"codex": {"sandbox": {"security": {"seccompProfile": str(profile)}}}})
    record = await run(client, {"issue": "SEC-1", "command": ["python3", "-c", CALLS]})
    out = await logs(client, record["id"])
    assert "'mkdir': 'EPERM'" in out
    assert "'write': 'ok', 'rename': 'ok', 'uname': 'ok', 'symlink': 'ok'" in out
    assert record["policy"]["seccompProfile"] == str(profile) and record["policy"]["seccompProfileSha256"]


async def test_without_the_profile_mkdir_works(sandbox_world):
    client, _ = await sandbox_world.app()
    record = await run(client, {"issue": "SEC-2", "command": ["python3", "-c", CALLS]})
    assert "'mkdir': 'ok'" in await logs(client, record["id"])


@pytest.mark.parametrize("content, reason", [
    ("not json", "not valid JSON"),
    ('{"syscalls": []}', "defaultAction"),
    ('{"defaultAction": "SCMP_ACT_ALLOW", "syscalls": [{"names": ["mkdir"], "action": "DENY"}]}', "action"),
    ('{"defaultAction": "SCMP_ACT_ALLOW", "syscalls": [{"action": "SCMP_ACT_ERRNO"}]}', "names"),
    ('{"defaultAction": "SCMP_ACT_ALLOW", "sycalls": []}', "unknown key"),
    ("[1, 2]", "JSON object"),
    (None, "cannot read"),
])
async def test_invalid_or_unreadable_profile_refuses_the_launch(sandbox_world, content, reason):
    profile = sandbox_world.tmp / "profile.json"
    if content is not None:
        profile.write_text(content)
    client, _ = await sandbox_world.app({"codex": {"sandbox": {"security": {"seccompProfile": str(profile)}}}})
    response = await client.post("/api/v1/sandboxes", json={"issue": "BAD-1", "command": ["true"]})
    body = await response.get_json()
    assert response.status_code == 503 and body["error"]["code"] == "seccomp_profile_invalid"
    assert reason in body["error"]["message"] and str(profile) in body["error"]["message"]
    assert sandbox_world.docker.containers(all=True, filters={"label": [f"risoluto.instance={sandbox_world.instance}"]}) == []
    policy = await (await client.get("/api/v1/sandbox/policy")).get_json()
    assert policy["launchable"] is False and policy["error"]["code"] == "seccomp_profile_invalid"


async def test_gvisor_kernel_answers_inside(sandbox_world):
    client, kernel = await sandbox_world.app({"codex": {"sandbox": {"security": {"gvisor": True}}}})
    # gVisor's /proc/self/status has no NoNewPrivs line: ask prctl(PR_GET_NO_NEW_PRIVS) instead.
    script = ("dmesg | head -3; uname -r; grep CapEff /proc/self/status; "
              "python3 -c 'import ctypes; print(\"nnp=%d\" % ctypes.CDLL(None).prctl(39, 0, 0, 0, 0))'; sleep 30")
    response = await client.post("/api/v1/sandboxes", json={"issue": "GV-1", "command": ["sh", "-c", script]})
    created = await response.get_json()
    assert response.status_code == 201, created
    assert sandbox_world.docker.inspect_container(created["id"])["HostConfig"]["Runtime"] == "runsc"
    out = await wait_for_log(client, created["id"], "nnp=")
    await client.delete(f"/api/v1/sandboxes/{created['id']}")
    assert "Starting gVisor" in out, out  # the Sentry's boot messages, not the host kernel's
    assert "CapEff:\t0000000000000000" in out and "nnp=1" in out
    assert created["runtime"] == "runsc" and created["policy"]["gvisor"] is True


async def test_gvisor_probe_user_workspace_and_mounts(sandbox_world):
    client, _ = await sandbox_world.app({"codex": {"sandbox": {"security": {"gvisor": True}}}})
    _, facts = await probe(client, issue="GV-2")
    assert (facts["uid"], facts["gid"]) == (1000, 1000) and facts["workspace_write"] == "ok"
    assert facts["docker_sock"] == [] and facts["codex_files"] == ["config.toml"]


async def test_gvisor_with_a_seccomp_profile_fails_closed_when_runsc_would_ignore_it(sandbox_world):
    runsc = sandbox_world.docker.info()["Runtimes"].get("runsc", {})
    if "--oci-seccomp" in (runsc.get("runtimeArgs") or []):
        pytest.skip("this engine's runsc enforces OCI seccomp profiles")
    profile = sandbox_world.tmp / "deny-mkdir.json"
    profile.write_text(json.dumps(DENY_MKDIR))
    client, _ = await sandbox_world.app({"codex": {"sandbox": {"security": {
        "gvisor": True, "seccompProfile": str(profile)}}}})
    response = await client.post("/api/v1/sandboxes", json={"issue": "GV-3", "command": ["true"]})
    body = await response.get_json()
    assert response.status_code == 503 and body["error"]["code"] == "seccomp_unsupported"


class UnregisteredRuntime:
    """Stands in for "runsc is not installed": the spec names a runtime the engine lacks."""

    @hookimpl(trylast=True)  # after the gvisor plugin, which would set runsc
    def risoluto_sandbox_spec(self, spec, request, settings):
        spec.runtime = "runsc-not-registered"


async def test_unregistered_runtime_fails_closed_never_falls_back_to_runc(sandbox_world):
    client, _ = await sandbox_world.app(plugins=(("test.runtime", UnregisteredRuntime()),))
    response = await client.post("/api/v1/sandboxes", json={"issue": "GV-4", "command": ["true"]})
    body = await response.get_json()
    assert response.status_code == 503 and body["error"]["code"] == "sandbox_runtime_missing"
    assert "runsc-not-registered" in body["error"]["message"] and "no fallback to runc" in body["error"]["message"]
    assert sandbox_world.docker.containers(all=True, filters={"label": [f"risoluto.instance={sandbox_world.instance}"]}) == []


async def test_gvisor_on_but_runtime_swapped_by_a_plugin_is_refused(sandbox_world):
    client, _ = await sandbox_world.app({"codex": {"sandbox": {"security": {"gvisor": True}}}},
                                        plugins=(("test.runtime", UnregisteredRuntime()),))
    response = await client.post("/api/v1/sandboxes", json={"issue": "GV-5", "command": ["true"]})
    body = await response.get_json()
    assert response.status_code == 403 and body["error"]["code"] == "sandbox_policy_violation"
    assert "runsc" in body["error"]["message"]
