"""The egress service and the default enforcer on a real engine: network, bind, firewall, doctor.

Launch paths that must fail closed are tried through the spec hooks every launch goes
through; the worker-side behaviour is in test_egress_docker.py.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import anyio
import pytest
from docker_util import docker_engine  # noqa: F401

from risoluto.errors import ApiError, ConfigError, StartupError
from risoluto.hookspecs.doctor import FAIL, PASS, WARN
from risoluto.hookspecs.sandbox import ContainerSpec, LaunchRequest
from risoluto.kernel import Kernel
from risoluto.plugins.egress._firewall import CHAIN
from risoluto.plugins.egress.network import NETWORK, DockerEgressEnforcer
from risoluto.plugins.sandbox._launcher import attach_egress
from risoluto.settings import build_settings

pytestmark = [pytest.mark.anyio, pytest.mark.docker]


def launch_spec(kernel, spec):
    """What a launch does to a spec: the edits, the egress attach, the checks."""
    request = LaunchRequest(issue="i")
    kernel.hooks.sandbox_spec(spec, request, kernel.settings)
    attach_egress(kernel, spec, request)
    kernel.hooks.sandbox_spec_check(spec, request, kernel.settings)
    return spec


def kernel_with(tmp_path: Path, allowlist: list[str], gvisor: bool = False, **extra) -> Kernel:
    config = {"codex": {"sandbox": {"egressAllowlist": allowlist, "security": {"gvisor": gvisor}}}, **extra}
    return Kernel(build_settings(config, None, {"DATA_DIR": str(tmp_path / "data")}))


def iptables_rules() -> str:
    out = ""
    for tool in ("iptables", "ip6tables"):
        out += subprocess.run([tool, "-w", "5", "-S"], capture_output=True, text=True).stdout
    return out


def checks(kernel: Kernel) -> dict[str, tuple[str, str]]:
    from risoluto.doctor import run_checks

    return {r.item: (r.status, r.reason) for r in run_checks(kernel) if "egress" in r.item}


async def test_service_builds_network_binds_gateway_and_guards_host(tmp_path, docker_engine):  # noqa: F811
    kernel = kernel_with(tmp_path, ["allowed.test"])
    async with kernel.running():
        status = kernel.backends.egress.status()
        gateway, port = status["bind"].rsplit(":", 1)
        (network,) = [docker_engine.inspect_network(n["Id"]) for n in docker_engine.networks(names=[NETWORK])
                      if n["Name"] == NETWORK]
        assert network["Internal"] is True
        assert network["Labels"]["risoluto.managed"] == "true"
        assert network["Options"]["com.docker.network.bridge.enable_icc"] == "false"
        assert gateway == network["IPAM"]["Config"][0]["Gateway"]
        # the proxy listens on the gateway only: not on loopback, not on a wildcard address
        listening = subprocess.run(["ss", "-Hltn", f"sport = :{port}"], capture_output=True, text=True).stdout
        assert [line.split()[3] for line in listening.splitlines()] == [f"{gateway}:{port}"]
        with pytest.raises(OSError):
            socket.create_connection(("127.0.0.1", int(port)), timeout=1).close()
        rules = iptables_rules()
        bridge = status["bridge"]
        assert f"-A INPUT -i {bridge} -j {CHAIN}" in rules
        assert f"-A {CHAIN} -d {gateway}/32 -i {bridge} -p tcp -m tcp --dport {port} -j ACCEPT" in rules
        assert f"-A {CHAIN} -i {bridge} -j DROP" in rules
        assert rules.count(f"-A INPUT -i {bridge} -j {CHAIN}") == 2  # IPv4 and IPv6
        found = checks(kernel)
        assert found["egress proxy"][0] == PASS and status["bind"] in found["egress proxy"][1]
        assert found["egress host protection"][0] == PASS
        # every launch gets the internal network, the proxy and its own credential; nothing added back
        specs = []
        for _ in range(2):
            spec = ContainerSpec(name="x", image="img")
            launch_spec(kernel, spec)
            specs.append(spec)
        assert all(s.network == NETWORK and s.labels["risoluto.egress"] == "docker-proxy" for s in specs)
        assert specs[0].env["HTTPS_PROXY"] != specs[1].env["HTTPS_PROXY"]
        assert specs[0].env["HTTPS_PROXY"].endswith(f"@{gateway}:{port}")
        assert specs[0].env["https_proxy"] == specs[0].env["HTTP_PROXY"] == specs[0].env["http_proxy"]
        assert "NO_PROXY" in specs[0].env and specs[0].cap_add == []
    # stopped: this proxy's rule is gone and the port is closed
    assert f"--dport {port} -j ACCEPT" not in iptables_rules()
    assert kernel.backends.egress is None


async def test_launch_fails_closed_without_a_running_enforcer(tmp_path):
    kernel = kernel_with(tmp_path, ["allowed.test"])  # never started (e.g. allowlist set by overlay later)
    spec = ContainerSpec(name="x", image="img")
    with pytest.raises(ApiError) as err:
        launch_spec(kernel, spec)
    assert err.value.status == 503 and err.value.code == "egress_unavailable"
    assert "HTTPS_PROXY" not in spec.env
    # no allowlist: nothing to enforce, the spec passes untouched
    free = kernel_with(tmp_path, [])
    spec = ContainerSpec(name="x", image="img")
    launch_spec(free, spec)
    assert "HTTPS_PROXY" not in spec.env


async def test_enforcer_disabled_refuses_to_start_and_doctor_fails(tmp_path):
    kernel = kernel_with(tmp_path, ["allowed.test"], plugins={"disable": ["egress.network"]})
    assert checks(kernel)["egress proxy"][0] == FAIL
    with pytest.raises(StartupError, match="no egress enforcer"):
        await kernel.start()


async def test_invalid_entry_stops_startup_naming_it(tmp_path):
    # refused when the kernel is built (risoluto_settings_validate), before anything starts
    with pytest.raises(ConfigError, match=r"codex\.sandbox\.egressAllowlist: .*'\*\.com'"):
        kernel_with(tmp_path, ["allowed.test", "*.com"])


async def test_network_capabilities_are_refused(tmp_path, docker_engine):  # noqa: F811
    from risoluto.hookspecs import hookimpl

    class AddsNetAdmin:
        @hookimpl
        def risoluto_sandbox_spec(self, spec, request, settings):
            spec.cap_add.append("NET_ADMIN")

    settings = build_settings({"codex": {"sandbox": {"egressAllowlist": ["allowed.test"]}}}, None,
                              {"DATA_DIR": str(tmp_path / "data")})
    kernel = Kernel(settings, (("adds", AddsNetAdmin()),))
    async with kernel.running():
        with pytest.raises(ApiError) as err:
            launch_spec(kernel, ContainerSpec(name="x", image="i"))
        # refused by the egress check or, first, by the sandbox policy guard: never launched
        assert err.value.code in ("egress_capability", "sandbox_policy_violation")


async def test_an_existing_non_internal_network_is_refused(tmp_path, docker_engine):  # noqa: F811
    name = f"rsl-egress-test-{os.urandom(3).hex()}"
    created = docker_engine.create_network(name, driver="bridge", labels={"risoluto.test": "1"})
    try:
        kernel = kernel_with(tmp_path, ["allowed.test"])
        enforcer = DockerEgressEnforcer(kernel.settings, network=name)
        with pytest.raises(StartupError, match="not internal"):
            await enforcer.start(kernel)
        assert enforcer.proxy is None
    finally:
        docker_engine.remove_network(created["Id"])


async def test_doctor_without_root_reports_exposed_host_services(tmp_path, docker_engine):  # noqa: F811
    """``risoluto doctor`` run as an unprivileged user cannot add firewall rules: FAIL, and says why."""
    import shutil
    import tempfile

    tmp = Path(tempfile.mkdtemp(prefix="rsl-egress-doctor-"))  # pytest's own tmp is private to root
    tmp.chmod(0o755)
    try:
        await _doctor_as_nobody(tmp)
    finally:
        shutil.rmtree(tmp)


async def _doctor_as_nobody(tmp_path: Path) -> None:
    config = tmp_path / "config.yaml"
    config.write_text(json.dumps({"codex": {"sandbox": {"egressAllowlist": ["allowed.test"]}}}))
    config.chmod(0o644)
    data = tmp_path / "nobody-data"
    data.mkdir(mode=0o700)
    os.chown(data, 65534, 65534)
    env = {"PATH": os.environ["PATH"], "RISOLUTO_CONFIG": str(config), "DATA_DIR": str(data), "HOME": str(data)}
    # third-party plugins are not what this test is about (and may not import for another user)
    from importlib.metadata import entry_points

    others = ",".join(ep.name for ep in entry_points(group="risoluto"))
    if others:
        env["RISOLUTO_DISABLE_PLUGINS"] = others
    cli = str(Path(sys.executable).parent / "risoluto")
    done = await anyio.run_process(
        ["setpriv", "--reuid", "65534", "--regid", "65534", "--clear-groups", cli, "doctor", "--json"],
        env=env, check=False)
    report = json.loads(done.stdout)
    items = {i["item"]: i for i in report["items"]}
    assert items["egress host protection"]["status"] == FAIL
    assert "exposed" in items["egress host protection"]["reason"]
    assert items["egress allowlist"]["status"] == PASS
    assert done.returncode != 0


async def test_doctor_warns_on_empty_allowlist_and_on_gvisor_hostinet(tmp_path, docker_engine):  # noqa: F811
    assert checks(kernel_with(tmp_path, []))["egress allowlist"][0] == WARN
    gvisor = kernel_with(tmp_path, ["allowed.test"], gvisor=True)
    runtimes = docker_engine.info().get("Runtimes", {})
    hostnet = "--network=host" in (runtimes.get("runsc", {}).get("runtimeArgs") or [])
    assert checks(gvisor)["egress under gVisor"][0] == (WARN if hostnet else PASS)


def test_embedded_dns_leak_check(tmp_path, docker_engine):  # noqa: F811
    """CVE-2024-29018: an old engine with a loopback resolver answers workers from the host namespace."""
    from risoluto.plugins.egress.network import _engine_fixed, _loopback_resolvers

    conf = tmp_path / "resolv.conf"
    conf.write_text("# x\nnameserver 127.0.0.53\nnameserver 10.0.0.2\noptions edns0\n")
    assert _loopback_resolvers(str(conf)) == ["127.0.0.53"]
    conf.write_text("nameserver 10.0.0.2\n")
    assert _loopback_resolvers(str(conf)) == []
    assert not _engine_fixed("20.10.24+dfsg1") and not _engine_fixed("25.0.4")
    assert _engine_fixed("26.0.0") and _engine_fixed("25.0.5") and _engine_fixed("23.0.11")
    kernel = kernel_with(tmp_path, ["allowed.test"])
    expected = FAIL if _loopback_resolvers() and not _engine_fixed(docker_engine.version()["Version"]) else PASS
    assert checks(kernel)["egress DNS"][0] == expected


def test_firewall_and_namespace_tools_get_no_server_secrets(tmp_path, monkeypatch):
    # iptables, nft and ip need a PATH, not MASTER_KEY or the tokens the server runs with
    from risoluto.plugins.egress import _firewall, _probe_targets

    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    for tool in ("iptables", "ip"):
        script = fake_bin / tool
        script.write_text(f"#!/bin/sh\nenv > {tmp_path}/{tool}.env\n")
        script.chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake_bin}:{os.environ['PATH']}")
    monkeypatch.setenv("MASTER_KEY", "master-key-value-1234")
    monkeypatch.setenv("RISOLUTO_WRITE_TOKEN", "write-token-value-1234")
    _firewall._run("iptables", "-S", check=False)
    _probe_targets._ip("link", "show")
    for tool in ("iptables", "ip"):
        seen = (tmp_path / f"{tool}.env").read_text()
        assert f"PATH={fake_bin}:" in seen  # it ran, with the PATH it needs
        assert "master-key-value-1234" not in seen and "write-token-value-1234" not in seen
