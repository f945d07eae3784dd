"""``risoluto doctor --probe``: one canary sandbox under the live policy proves each item from inside.

Docker tests run the real CLI (subprocess) or ``run_probes`` against a started app on the real
engine; each weakens the policy the way an intruding plugin or a careless operator would and
shows the matching probe FAILs. The judges are also fed hand-written canary output, so each
verdict is shown to fail on the observation it exists for.
"""

from __future__ import annotations

import json
import os
import secrets
from pathlib import Path
from typing import Any

import anyio
import docker
import pytest

from docker_util import docker_engine, sandbox_world  # noqa: F401
from serve_util import RISOLUTO

from risoluto.doctor import report, run_probes
from risoluto.hookspecs import hookimpl
from risoluto.hookspecs.doctor import FAIL, PASS, WARN
from risoluto.hookspecs.egress import EgressVerdict
from risoluto.plugins.egress import network as egress_network
from risoluto.plugins.egress._probe_targets import Targets
from risoluto.plugins.egress.probes import _tried, network_judge, proxy_judge
from risoluto.plugins.sandbox import cap_drop, gvisor, no_new_privileges, seccomp, workspace

SANDBOX_PROBES = {f"sandbox {n} (probe)" for n in (
    "capabilities", "no-new-privileges", "seccomp", "hidden paths", "workspace", "resources")}
EGRESS_PROBES = {f"egress {n} (probe)" for n in (
    "unlisted name", "IP literal", "direct TCP", "DNS", "host services")}
DENY_MKDIR = {"defaultAction": "SCMP_ACT_ALLOW",
              "syscalls": [{"names": ["mkdir", "mkdirat"], "action": "SCMP_ACT_ERRNO", "errnoRet": 1}]}


def by_item(results: list[Any]) -> dict[str, Any]:
    return {r.item: r for r in results}


def no_markers_left(world: Any) -> None:
    for directory in (world.data, world.auth):
        assert not [p for p in os.listdir(directory) if p.startswith(".risoluto-probe-")]


def probe_containers(world: Any) -> list[Any]:
    return world.docker.containers(all=True, filters={"label": [f"risoluto.instance={world.instance}"]})


async def cli_probe(world: Any, overrides: dict[str, Any] | None = None) -> tuple[int, dict[str, Any], str]:
    """The real ``risoluto doctor --probe --json`` with the world's DATA_DIR and a config file."""
    config = world.tmp / f"config-{secrets.token_hex(3)}.yaml"
    config.write_text(json.dumps(world.config(overrides)))
    env = {**os.environ, "DATA_DIR": str(world.data), "RISOLUTO_CONFIG": str(config)}
    env.pop("MASTER_KEY", None)
    done = await anyio.run_process([*RISOLUTO, "doctor", "--probe", "--json"],
                                   env=env, check=False)
    return done.returncode, json.loads(done.stdout), done.stderr.decode(errors="replace")


# --- the default policy passes ------------------------------------------------------------------
@pytest.mark.docker
@pytest.mark.anyio
async def test_cli_probe_passes_on_the_default_policy(sandbox_world: Any) -> None:  # noqa: F811
    rc, body, err = await cli_probe(sandbox_world)
    items = {i["item"]: i for i in body["items"]}
    probes = {k: v for k, v in items.items() if k.endswith("(probe)")}
    assert set(probes) == SANDBOX_PROBES, (probes, err)
    assert all(p["status"] == PASS for p in probes.values()), probes
    assert "CapBnd" in probes["sandbox capabilities (probe)"]["reason"]
    assert "keyctl() fails with EPERM" in probes["sandbox seccomp (probe)"]["reason"]
    assert "NoNewPrivs=1" in probes["sandbox no-new-privileges (probe)"]["reason"]
    # exit status follows the results: 0 unless some item (a check of another plugin) FAILs
    assert rc == (1 if any(i["status"] == FAIL for i in items.values()) else 0), (rc, body)
    assert probe_containers(sandbox_world) == []  # the canary is gone
    no_markers_left(sandbox_world)


@pytest.mark.docker
@pytest.mark.anyio
async def test_in_process_probe_passes_on_the_default_policy(sandbox_world: Any) -> None:  # noqa: F811
    _, kernel = await sandbox_world.app()
    results = await run_probes(kernel)
    found = by_item(results)
    assert set(found) == SANDBOX_PROBES and all(r.status == PASS for r in results), results
    assert report(results, as_json=True) == 0
    assert probe_containers(sandbox_world) == []
    no_markers_left(sandbox_world)


# --- weakened policies are caught ----------------------------------------------------------------
class AddCapabilityBack:
    @hookimpl
    def risoluto_sandbox_spec(self, spec: Any, request: Any, settings: Any) -> None:
        spec.cap_add.append("NET_ADMIN")


@pytest.mark.docker
@pytest.mark.anyio
async def test_a_plugin_adding_a_capability_back_is_refused_so_the_probe_fails(sandbox_world: Any) -> None:  # noqa: F811
    _, kernel = await sandbox_world.app(plugins=(("test.cap-add", AddCapabilityBack()),))
    results = await run_probes(kernel)
    assert len(results) == 1 and results[0].status == FAIL, results
    assert "the canary did not run" in results[0].reason and "adds some back" in results[0].reason
    assert report(results, as_json=True) == 1
    assert probe_containers(sandbox_world) == []


@pytest.mark.docker
@pytest.mark.anyio
async def test_capabilities_and_no_new_privileges_switched_off_fail_with_exit_1(sandbox_world: Any) -> None:  # noqa: F811
    weak = {"codex": {"sandbox": {"security": {"dropCapabilities": False, "noNewPrivileges": False}}}}
    rc, body, _ = await cli_probe(sandbox_world, weak)
    items = {i["item"]: i for i in body["items"]}
    caps, nnp = items["sandbox capabilities (probe)"], items["sandbox no-new-privileges (probe)"]
    assert caps["status"] == FAIL and "CapBnd=" in caps["reason"], caps
    assert nnp["status"] == FAIL and "NoNewPrivs=0" in nnp["reason"] and "prctl=0" in nnp["reason"], nnp
    assert items["sandbox seccomp (probe)"]["status"] == PASS  # the other items still hold
    assert rc == 1


class SwapSeccompProfile:
    """Keeps a ``seccomp=`` option (so the policy guard is satisfied) but with an allow-all profile."""

    @hookimpl(trylast=True)
    def risoluto_sandbox_spec(self, spec: Any, request: Any, settings: Any) -> None:
        spec.security_opt = ['seccomp={"defaultAction":"SCMP_ACT_ALLOW"}' if o.startswith("seccomp=") else o
                             for o in spec.security_opt]


@pytest.mark.docker
@pytest.mark.anyio
async def test_custom_profile_read_only_root_and_workspace_then_a_swapped_profile(sandbox_world: Any) -> None:  # noqa: F811
    profile = sandbox_world.tmp / "deny-mkdir.json"
    profile.write_text(json.dumps(DENY_MKDIR))
    _, kernel = await sandbox_world.app({"codex": {"threadSandbox": "workspace-read", "sandbox": {"security": {
        "seccompProfile": str(profile), "readOnlyRootfs": True}}}})
    found = by_item(await run_probes(kernel))
    assert {r.status for r in found.values()} == {PASS}, found
    assert "mkdir() fails with EPERM" in found["sandbox seccomp (probe)"].reason
    assert "read-only" in found["sandbox workspace (probe)"].reason
    assert "sandbox read-only root (probe)" in found
    # an intruding plugin swaps the profile for an allow-all one: only the probe can see it
    kernel.pm.register(SwapSeccompProfile(), name="test.swap-seccomp")
    weak = by_item(await run_probes(kernel))
    assert weak["sandbox seccomp (probe)"].status == FAIL, weak["sandbox seccomp (probe)"]
    assert "mkdir() is not denied" in weak["sandbox seccomp (probe)"].reason
    assert "EFAULT" in weak["sandbox seccomp (probe)"].reason
    assert report(list(weak.values()), as_json=True) == 1


@pytest.mark.docker
@pytest.mark.anyio
async def test_gvisor_probe_passes_under_runsc(sandbox_world: Any) -> None:  # noqa: F811
    _, kernel = await sandbox_world.app({"codex": {"sandbox": {"security": {"gvisor": True}}}})
    found = by_item(await run_probes(kernel))
    assert found["sandbox gVisor (probe)"].status == PASS and "Starting gVisor" in found["sandbox gVisor (probe)"].reason
    for item in ("capabilities", "no-new-privileges", "hidden paths", "workspace"):
        assert found[f"sandbox {item} (probe)"].status == PASS, found[f"sandbox {item} (probe)"]
    assert "prctl=1" in found["sandbox no-new-privileges (probe)"].reason  # gVisor has no NoNewPrivs line
    runsc = sandbox_world.docker.info()["Runtimes"]["runsc"]
    if "--oci-seccomp" in (runsc.get("runtimeArgs") or []):
        assert found["sandbox seccomp (probe)"].status == PASS
    else:  # runsc applies no OCI profile: said so, never passed off as proven
        assert found["sandbox seccomp (probe)"].status == WARN and "--oci-seccomp" in found["sandbox seccomp (probe)"].reason


class AllowEverything:
    @hookimpl(tryfirst=True)
    def risoluto_egress_decision(self, request: Any, allowlist: Any) -> EgressVerdict:
        return EgressVerdict(True, "test: allow everything")


@pytest.mark.docker
@pytest.mark.anyio
async def test_egress_probes_pass_then_catch_an_enforcer_that_allows_everything(sandbox_world: Any) -> None:  # noqa: F811
    _, kernel = await sandbox_world.app({"codex": {"sandbox": {"egressAllowlist": ["allowed.test"]}}})
    found = by_item(await run_probes(kernel))
    assert EGRESS_PROBES <= set(found) and all(r.status == PASS for r in found.values()), found
    assert "host_not_allowed" in found["egress unlisted name (probe)"].reason
    assert "127.0.0.11:53" in found["egress DNS (probe)"].reason  # the worker's own resolver was tried too
    assert len(found["egress host services (probe)"].reason.split("tcp:")) == 3  # gateway + another host address
    assert not [n for n in os.listdir("/run/netns") if n.startswith("rsl-probe-")]  # the outside stand-in is gone
    kernel.pm.register(AllowEverything(), name="test.allow-everything")
    weak = by_item(await run_probes(kernel))
    for item in ("egress unlisted name (probe)", "egress IP literal (probe)"):
        assert weak[item].status == FAIL and "private_address" in weak[item].reason, weak[item]
    for item in ("egress direct TCP (probe)", "egress DNS (probe)", "egress host services (probe)"):
        assert weak[item].status == PASS, weak[item]  # the network still holds: each probe sees its own layer
    assert report(list(weak.values()), as_json=True) == 1


class PrivateEgressNetwork:
    """The default enforcer on an egress network of this test's own (never shared with other runs)."""

    def __init__(self, name: str):
        self.name = name

    @hookimpl(tryfirst=True)
    def risoluto_egress_enforcer(self, settings: Any) -> Any:
        return egress_network.DockerEgressEnforcer(settings, network=self.name)


@pytest.mark.docker
@pytest.mark.anyio
async def test_host_services_probe_fails_without_the_host_firewall(sandbox_world: Any, monkeypatch: Any) -> None:  # noqa: F811
    name = f"rsl-egr-probe-{secrets.token_hex(4)}"
    monkeypatch.setattr(egress_network, "can_manage", lambda: "test: as if the kernel were not root")
    try:
        _, kernel = await sandbox_world.app({"codex": {"sandbox": {"egressAllowlist": ["allowed.test"]}}},
                                            plugins=(("test.private-egress", PrivateEgressNetwork(name)),))
        found = by_item(await run_probes(kernel))
        hosts = found["egress host services (probe)"]
        assert hosts.status == FAIL and "connected" in hosts.reason and "TCP" in hosts.reason, hosts
        assert found["egress direct TCP (probe)"].status == PASS  # the internal network still has no route out
        assert found["egress unlisted name (probe)"].status == PASS
        await sandbox_world.stack.aclose()  # stop the app before its network goes
    finally:
        try:
            sandbox_world.docker.remove_network(name)
        except docker.errors.NotFound:
            pass


# --- the judges, on hand-written canary output (no engine) --------------------------------------
def test_capabilities_judge() -> None:
    zero = "0000000000000000"
    clean = "\n".join(f"{k}:\t{zero}" for k in cap_drop.CAP_SETS)
    assert cap_drop.judge_caps(clean, 0).status == PASS
    held = clean.replace(f"CapBnd:\t{zero}", "CapBnd:\t00000000a80425fb")
    assert cap_drop.judge_caps(held, 0).status == FAIL and "CapBnd=00000000a80425fb" in cap_drop.judge_caps(held, 0).reason
    assert cap_drop.judge_caps("CapEff:\t" + zero, 0).status == FAIL  # a missing set is not a pass


def test_no_new_privileges_judge() -> None:
    judge = no_new_privileges.judge_nnp
    assert judge("NoNewPrivs:\t1\nprctl=1", 0).status == PASS
    assert judge("NoNewPrivs: absent\nprctl=1", 0).status == PASS  # gVisor
    assert judge("NoNewPrivs: absent\nprctl=no-python3", 0).status == WARN
    assert judge("NoNewPrivs:\t1\nprctl=0", 0).status == FAIL
    assert judge("NoNewPrivs:\t0\nprctl=no-python3", 0).status == FAIL
    assert judge("", 0).status == FAIL


def test_seccomp_picks_a_syscall_the_profile_denies() -> None:
    assert seccomp.denied_call(DENY_MKDIR) == ("mkdir", 1)
    conditional = {"defaultAction": "SCMP_ACT_ALLOW", "syscalls": [
        {"names": ["keyctl"], "action": "SCMP_ACT_ERRNO", "args": [{"index": 0, "value": 1, "op": "SCMP_CMP_EQ"}]},
        {"names": ["chdir"], "action": "SCMP_ACT_ERRNO", "errnoRet": 14},  # EFAULT: what chdir(NULL) gives anyway
        {"names": ["unshare"], "action": "SCMP_ACT_ERRNO", "errnoRet": 38}]}
    assert seccomp.denied_call(conditional) == ("unshare", 38)
    deny_by_default = {"defaultAction": "SCMP_ACT_ERRNO", "syscalls": [
        {"names": ["keyctl", "add_key", "read", "write"], "action": "SCMP_ACT_ALLOW"}]}
    assert seccomp.denied_call(deny_by_default) == ("request_key", 1)
    assert seccomp.denied_call({"defaultAction": "SCMP_ACT_ALLOW", "syscalls": []}) is None


def test_seccomp_judge() -> None:
    judge = seccomp.make_judge("2", ("mkdir", 1), "", "/p.json")
    assert judge("Seccomp:\t2\ncall=mkdir\ncall_rc=-1\ncall_errno=1", 0).status == PASS
    assert judge("Seccomp:\t0\ncall=mkdir\ncall_rc=-1\ncall_errno=1", 0).status == FAIL
    not_denied = judge("Seccomp:\t2\ncall=mkdir\ncall_rc=-1\ncall_errno=14", 0)
    assert not_denied.status == FAIL and "EFAULT" in not_denied.reason
    assert judge("Seccomp:\t2\ncall=no-python3", 0).status == WARN
    assert seccomp.make_judge("2", None, "nothing to call", "/p.json")("Seccomp:\t2", 0).status == WARN


def test_gvisor_judge_wants_the_sentry_boot_log() -> None:
    assert gvisor.judge_gvisor("kernel=Linux 4.4.0\n[    0.000000] Starting gVisor...", 0).status == PASS
    host = "kernel=Linux 6.1.0\n[    0.000000] Linux version 6.1.0 (gVisor mentioned later)"
    assert gvisor.judge_gvisor(host, 0).status == FAIL
    assert gvisor.judge_gvisor("kernel=Linux 6.1.0\ndmesg: read kernel buffer failed", 0).status == FAIL


def test_hidden_paths_judge(tmp_path: Path) -> None:
    paths = {"DATA_DIR": "/srv/risoluto", "the Docker socket /run/docker.sock": "/run/docker.sock"}
    host = {"DATA_DIR": ("254:0", "/srv/risoluto")}
    judge = workspace.make_hidden_judge(paths, host, {"DATA_DIR": ".risoluto-probe-ab"}, compare_devices=True)
    clean = "mount=254:0 /ws/ISSUE /workspace ext4\nmount=0:48 / /tmp tmpfs\nscan=done"
    assert judge(clean, 0).status == PASS
    assert judge("visible=/run/docker.sock\n" + clean, 0).status == FAIL
    assert "DATA_DIR reachable" in judge("found=/workspace/x/.risoluto-probe-ab\n" + clean, 0).reason
    parent = clean.replace("/ws/ISSUE /workspace", "/srv /workspace")  # a bind of DATA_DIR's parent
    assert judge(parent, 0).status == FAIL and "holds DATA_DIR" in judge(parent, 0).reason
    assert judge("mount=254:0 / / ext4", 0).status == FAIL  # the scan never finished


def test_egress_judges() -> None:
    targets = Targets(outside="198.19.1.2", hosts=["172.18.0.1:4000"], enforcer="docker-proxy")
    unlisted = proxy_judge("egress unlisted name", "host_not_allowed", targets, "localhost")
    assert unlisted("curl=56\nstatus=403\nreason=host_not_allowed", 0).status == PASS
    assert unlisted("curl=56\nstatus=403\nreason=private_address", 0).status == FAIL
    assert unlisted("curl=0\nstatus=200", 0).status == FAIL
    assert unlisted("proxy=none", 0).status == FAIL
    assert unlisted("curl=missing", 0).status == WARN
    tcp = network_judge("egress direct TCP", targets, _tried, "outside-tcp", "fix")
    assert tcp("tcp:198.19.1.2:80=timeout", 0).status == PASS
    assert tcp("tcp:198.19.1.2:80=connected", 0).status == FAIL
    assert tcp("tcp:198.19.1.2:80=untested", 0).status == WARN
    targets.hits["outside-tcp"].append("TCP 198.19.1.2 from 172.18.0.5")
    assert tcp("tcp:198.19.1.2:80=timeout", 0).status == FAIL  # the target saw it, whatever the canary says
    from risoluto.plugins.egress.probes import _tried_dns

    dns = network_judge("egress DNS", targets, _tried_dns(targets), "outside-udp", "fix")
    assert dns("udp:198.19.1.2:53=timeout\nudp:127.0.0.11:53=answered rcode=2 answers=0", 0).status == PASS
    assert dns("udp:198.19.1.2:53=timeout\nudp:127.0.0.11:53=answered rcode=3 answers=0", 0).status == FAIL
    assert dns("udp:198.19.1.2:53=answered rcode=0 answers=0\nudp:127.0.0.11:53=timeout", 0).status == FAIL
    assert network_judge("egress DNS", Targets(outside_why="needs root"), _tried_dns(Targets()), "outside-udp",
                         "fix")("udp:127.0.0.11:53=timeout", 0).status == WARN
