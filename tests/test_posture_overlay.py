"""The config overlay tightens, never loosens (docs/configuration.md, "The overlay").

Tried as an attacker holding the write token (from another machine) and as a token-less loopback
caller would: deploy-time keys are refused with 400 ``overlay_key_not_allowed``, loosening posture
changes with 403 ``overlay_loosens_policy``; nothing is saved (the overlay file's bytes and the
effective sandbox policy stay as they were). What the overlay may hold applies at once.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from docker_util import docker_engine, sandbox_world  # noqa: F401
from risoluto import hookimpl
from risoluto.errors import ConfigError

pytestmark = pytest.mark.anyio

WRITE = "w" * 32
REMOTE = {"client": ("203.0.113.9", 5000)}
BEARER = {"Authorization": f"Bearer {WRITE}"}
OVERLAY = "/api/v1/config/overlay"

# The file the operator wrote: stricter than the defaults here and there, so that "looser than the
# file" and "looser than the defaults" are both tried.
FILE_CONFIG = {
    "codex": {
        "threadSandbox": "workspace-write",
        "sandbox": {
            "egressAllowlist": ["api.example.test", "*.pkg.example.test"],
            "security": {"gvisor": True, "readOnlyRootfs": True},
            "resources": {"memory": "2g", "memorySwap": "2g"},
        },
    },
    "rateLimit": {"api": {"limit": 100, "windowSeconds": 60}},
    "egress": {"deny": ["bad.example.test"], "onUnlisted": "deny",
               "rules": [{"hosts": ["api.example.test"], "methods": ["DELETE"], "verdict": "deny"}]},
}

# Deploy-time keys an overlay may not hold, as an attacker would send them (both spellings).
DEPLOY_TIME = [
    ({"plugins": {"disable": ["http.write_guard", "http.read_guard", "http.rate_limit"]}}, "plugins.disable"),
    ({"server": {"trustedProxies": ["0.0.0.0/0"]}}, "server.trustedProxies"),
    ({"server": {"trusted_proxies": ["127.0.0.0/8"]}}, "server.trusted_proxies"),
    ({"server": {"port": 70000}}, "server.port"),
    ({"server": {"bind": "0.0.0.0"}}, "server.bind"),
    ({"server": {"writeToken": "x" * 32}}, "server.writeToken"),
    ({"workspace": {"root": "/etc"}}, "workspace.root"),
    ({"rateLimit": {"backend": "nope"}}, "rateLimit.backend"),
    ({"rate_limit": {"backend": "nope"}}, "rate_limit.backend"),
    ({"sandbox": {"role": "data-plane"}}, "sandbox.role"),
    ({"sandbox": {"runtime": "remote"}}, "sandbox.runtime"),
    ({"secrets": {"backend": "sqlite"}}, "secrets.backend"),
    ({"egress": {"resolver": "127.0.0.1:53"}}, "egress.resolver"),
    ({"egress": {"hosts": {"api.example.test": "127.0.0.1"}}}, "egress.hosts"),
    ({"egress": {"allowPrivateNetworks": ["10.0.0.0/8"]}}, "egress.allowPrivateNetworks"),
    ({"egress": {"allow_private_networks": ["10.0.0.0/8"]}}, "egress.allow_private_networks"),
    ({"egress": {"credentials": {"x": "y"}}}, "egress.credentials"),
    ({"codex": {"sandbox": {"user": "0:0"}}}, "codex.sandbox.user"),
    ({"codex": {"sandbox": {"security": {"seccompProfile": "/tmp/unconfined.json"}}}},
     "codex.sandbox.security.seccompProfile"),
    ({"codex": {"sandbox": {"security": {"seccomp_profile": ""}}}}, "codex.sandbox.security.seccomp_profile"),
    ({"codex": {"sandbox": {"seccompProfile": ""}}}, "codex.sandbox.seccompProfile"),
    ({"codex": {"sandbox": {"network": "bridge"}}}, "codex.sandbox.network"),
    ({"codex": {"authDir": "/etc"}}, "codex.authDir"),
    ({"masterKey": "x"}, "masterKey"),
    ({"data_dir": "/tmp"}, "data_dir"),
    ({"egress": {"audit": {"keep": 1}}}, "egress.audit"),
]

# Posture changes towards the looser side of FILE_CONFIG (+ defaults).
LOOSENING = [
    ({"codex": {"sandbox": {"security": {"dropCapabilities": False}}}}, "codex.sandbox.security.dropCapabilities"),
    ({"codex": {"sandbox": {"security": {"no_new_privileges": False}}}}, "codex.sandbox.security.noNewPrivileges"),
    ({"codex": {"sandbox": {"security": {"gvisor": False}}}}, "codex.sandbox.security.gvisor"),
    ({"codex": {"sandbox": {"security": {"readOnlyRootfs": False}}}}, "codex.sandbox.security.readOnlyRootfs"),
    ({"codex": {"threadSandbox": "danger-full-access"}}, "codex.threadSandbox"),
    ({"codex": {"thread_sandbox": "danger-full-access"}}, "codex.threadSandbox"),
    ({"codex": {"turnSandboxPolicy": {"networkAccess": True}}}, "codex.turnSandboxPolicy"),
    ({"codex": {"turnSandboxPolicy": {"type": "dangerFullAccess"}}}, "codex.turnSandboxPolicy"),
    ({"codex": {"sandbox": {"egressAllowlist": []}}}, "codex.sandbox.egressAllowlist"),
    ({"codex": {"sandbox": {"egressAllowlist": ["api.example.test", "evil.test"]}}}, "codex.sandbox.egressAllowlist"),
    ({"codex": {"sandbox": {"egressAllowlist": ["pkg.example.test"]}}}, "codex.sandbox.egressAllowlist"),
    ({"codex": {"sandbox": {"egressAllowlist": ["api.example.test:8443"]}}}, "codex.sandbox.egressAllowlist"),
    ({"rateLimit": {"api": {"limit": 101}}}, "rateLimit.api"),
    ({"rateLimit": {"api": {"windowSeconds": 30}}}, "rateLimit.api"),
    ({"rateLimit": {"webhooks": {"limit": 100000}}}, "rateLimit.webhooks"),
    ({"rateLimit": {"failOpen": True}}, "rateLimit.failOpen"),
    ({"codex": {"sandbox": {"resources": {"memory": "3g"}}}}, "codex.sandbox.resources.memory"),
    ({"codex": {"sandbox": {"resources": {"memorySwap": "4g"}}}}, "codex.sandbox.resources.memorySwap"),
    ({"codex": {"sandbox": {"resources": {"memoryReservation": "2g"}}}}, "codex.sandbox.resources.memoryReservation"),
    ({"codex": {"sandbox": {"resources": {"cpus": 2.5}}}}, "codex.sandbox.resources.cpus"),
    ({"codex": {"sandbox": {"resources": {"pidsLimit": 513}}}}, "codex.sandbox.resources.pidsLimit"),
    ({"codex": {"sandbox": {"resources": {"tmpfsSize": "1g"}}}}, "codex.sandbox.resources.tmpfsSize"),
    ({"egress": {"deny": []}}, "egress.deny"),
    ({"egress": {"rules": []}}, "egress.rules"),
    ({"egress": {"rules": [{"hosts": ["evil.test"], "verdict": "allow"},
                           {"hosts": ["api.example.test"], "methods": ["DELETE"], "verdict": "deny"}]}}, "egress.rules"),
    ({"egress": {"onUnlisted": "ask"}}, "egress.onUnlisted"),
]

# Tightening changes: accepted.
TIGHTENING = [
    {"codex": {"sandbox": {"security": {"dropCapabilities": True, "noNewPrivileges": True}}}},
    {"codex": {"threadSandbox": "workspace-read"}},
    {"codex": {"turnSandboxPolicy": {"type": "readOnly", "networkAccess": False}}},
    {"codex": {"sandbox": {"egressAllowlist": ["api.example.test"]}}},
    {"codex": {"sandbox": {"egressAllowlist": ["a.pkg.example.test", "*.b.pkg.example.test"]}}},
    {"rateLimit": {"api": {"limit": 50, "windowSeconds": 120}, "webhooks": {"limit": 10}, "failOpen": False}},
    {"codex": {"sandbox": {"resources": {"memory": "1g", "memorySwap": "1g", "memoryReservation": "512m",
                                         "cpus": 0.5, "pidsLimit": 64, "tmpfsSize": "64m"}}}},
    {"codex": {"sandbox": {"image": "risoluto-codex:v2"}}},  # neither deploy-time nor posture
    {"egress": {"deny": ["bad.example.test", "worse.example.test"]}},
    {"egress": {"rules": [{"hosts": ["*.pkg.example.test"], "methods": ["POST"], "verdict": "deny"},
                          {"hosts": ["api.example.test"], "methods": ["DELETE"], "verdict": "deny"}]}},
]


async def make_client(risoluto_client: Any, tmp_path: Path, env: dict[str, str] | None = None,
                      plugins: tuple = (), token: bool = True) -> Any:
    """A started app whose config file (RISOLUTO_CONFIG) holds FILE_CONFIG, with a write token
    (callers come from another machine) or without one (callers on loopback, no token)."""
    config_file = tmp_path / "config.yaml"
    config_file.write_text(yaml.safe_dump(FILE_CONFIG))
    env = {"RISOLUTO_CONFIG": str(config_file), **({"RISOLUTO_WRITE_TOKEN": WRITE} if token else {}), **(env or {})}
    return await risoluto_client(FILE_CONFIG, env=env, plugins=plugins)


async def put(client: Any, overlay: dict, as_remote: bool) -> Any:
    if as_remote:  # another machine, holding the write token
        return await client.put(OVERLAY, data=json.dumps(overlay), headers={**BEARER, "Content-Type": "application/json"},
                                scope_base=REMOTE)
    return await client.put(OVERLAY, data=json.dumps(overlay), headers={"Content-Type": "application/json"})


async def policy(client: Any) -> Any:
    response = await client.get("/api/v1/sandbox/policy")
    assert response.status_code == 200
    return await response.get_json()


async def assert_refused(client: Any, data_dir: Path, overlay: dict, status: int, code: str, key: str,
                         as_remote: bool) -> None:
    path = data_dir / "config" / "overlay.yaml"
    before_file, before_policy = path.read_bytes(), await policy(client)
    before_settings = client.app.extensions["risoluto"].settings
    response = await put(client, overlay, as_remote)
    body = await response.get_json()
    assert response.status_code == status, body
    assert body["error"]["code"] == code
    assert key in body["error"]["message"]
    assert path.read_bytes() == before_file
    assert await policy(client) == before_policy
    assert client.app.extensions["risoluto"].settings is before_settings


@pytest.mark.parametrize("as_remote", [True, False], ids=["remote-with-token", "loopback"])
@pytest.mark.parametrize("overlay, key", DEPLOY_TIME, ids=[k for _, k in DEPLOY_TIME])
async def test_deploy_time_keys_are_refused_and_nothing_changes(risoluto_client, risoluto_data_dir, tmp_path,
                                                                overlay, key, as_remote):
    client = await make_client(risoluto_client, tmp_path, token=as_remote)
    assert (await put(client, {"codex": {"sandbox": {"image": "img:v1"}}}, as_remote)).status_code == 200
    await assert_refused(client, risoluto_data_dir, overlay, 400, "overlay_key_not_allowed", key, as_remote)


@pytest.mark.parametrize("as_remote", [True, False], ids=["remote-with-token", "loopback"])
@pytest.mark.parametrize("overlay, key", LOOSENING, ids=[f"{k}-{i}" for i, (_, k) in enumerate(LOOSENING)])
async def test_loosening_is_refused_and_nothing_changes(risoluto_client, risoluto_data_dir, tmp_path, overlay, key,
                                                        as_remote):
    client = await make_client(risoluto_client, tmp_path, token=as_remote)
    assert (await put(client, {"codex": {"sandbox": {"image": "img:v1"}}}, as_remote)).status_code == 200
    await assert_refused(client, risoluto_data_dir, overlay, 403, "overlay_loosens_policy", key, as_remote)


async def test_a_tokenless_loopback_server_stays_reachable(risoluto_client, risoluto_data_dir, tmp_path):
    client = await make_client(risoluto_client, tmp_path, token=False)
    assert (await put(client, {}, as_remote=False)).status_code == 200
    await assert_refused(client, risoluto_data_dir, {"server": {"trustedProxies": ["127.0.0.0/8"]}}, 400,
                         "overlay_key_not_allowed", "server.trustedProxies", as_remote=False)
    await assert_refused(client, risoluto_data_dir, {"codex": {"threadSandbox": "danger-full-access"}}, 403,
                         "overlay_loosens_policy", "codex.threadSandbox", as_remote=False)
    # and the server stays reachable and changeable from loopback
    assert (await put(client, {"codex": {"threadSandbox": "workspace-read"}}, as_remote=False)).status_code == 200


@pytest.mark.parametrize("overlay", TIGHTENING)
async def test_tightening_is_saved_and_applied_at_once(risoluto_client, risoluto_data_dir, tmp_path, overlay):
    client = await make_client(risoluto_client, tmp_path)
    response = await put(client, overlay, as_remote=True)
    assert response.status_code == 200, await response.get_json()
    assert await response.get_json() == {"overlay": overlay}  # no "restart required" list: nothing waits
    assert yaml.safe_load((risoluto_data_dir / "config" / "overlay.yaml").read_text()) == overlay


async def test_a_tightened_posture_shows_in_the_policy_at_once(risoluto_client, tmp_path):
    client = await make_client(risoluto_client, tmp_path)
    assert (await policy(client))["policy"]["threadSandbox"] == "workspace-write"
    assert (await put(client, {"codex": {"threadSandbox": "workspace-read",
                                         "sandbox": {"resources": {"pidsLimit": 64}}}}, True)).status_code == 200
    now = (await policy(client))["policy"]
    assert now["threadSandbox"] == "workspace-read"
    assert now["resources"]["pidsLimit"] == 64


async def test_a_lower_rate_limit_applies_at_once(risoluto_client, tmp_path):
    client = await make_client(risoluto_client, tmp_path)
    first = await client.get("/api/v1/runtime")
    assert first.headers["RateLimit-Limit"] == "100"
    assert (await put(client, {"rateLimit": {"api": {"limit": 3, "windowSeconds": 600}}}, True)).status_code == 200
    statuses = [(await client.get("/api/v1/runtime")).status_code for _ in range(4)]
    # at once, and with the use already made carried over (an overlay never hands out a fresh budget):
    # the GET before the change counts, so at most 2 of the 3 are left, then 429s
    assert statuses == sorted(statuses) and 1 <= statuses.count(200) <= 2 and statuses[-1] == 429


async def test_may_loosen_lifts_the_rule_and_the_doctor_warns(risoluto_client, risoluto_data_dir, tmp_path):
    client = await make_client(risoluto_client, tmp_path, env={"RISOLUTO_OVERLAY_MAY_LOOSEN": "1"})
    loosen = {"codex": {"threadSandbox": "danger-full-access",
                        "sandbox": {"security": {"dropCapabilities": False}}}}
    response = await put(client, loosen, as_remote=True)
    assert response.status_code == 200, await response.get_json()
    assert (await policy(client))["policy"]["threadSandbox"] == "danger-full-access"
    report = await (await client.get("/api/v1/hardening")).get_json()
    warned = {i["item"]: i for i in report["items"] if i["item"].startswith("overlay: ")}
    assert set(warned) == {"overlay: codex.threadSandbox", "overlay: codex.sandbox.security.dropCapabilities"}
    for item in warned.values():
        assert item["status"] == "WARN" and "set by the overlay" in item["reason"]
    # deploy-time keys stay refused: the switch only lifts the loosening rule
    await assert_refused(client, risoluto_data_dir, {"plugins": {"disable": ["http.write_guard"]}}, 400,
                         "overlay_key_not_allowed", "plugins.disable", as_remote=True)
    # without loosening, no overlay line
    assert (await put(client, {"codex": {"threadSandbox": "workspace-read"}}, True)).status_code == 200
    report = await (await client.get("/api/v1/hardening")).get_json()
    assert not [i for i in report["items"] if i["item"].startswith("overlay: ")]


async def test_may_loosen_takes_only_1_or_0(risoluto_client, tmp_path):
    with pytest.raises(ConfigError, match="RISOLUTO_OVERLAY_MAY_LOOSEN: expected 1"):
        await make_client(risoluto_client, tmp_path, env={"RISOLUTO_OVERLAY_MAY_LOOSEN": "yes"})


class NeedsProxies:
    """A plugin whose validation depends on a setting an environment variable gives today."""

    @hookimpl
    def risoluto_settings_validate(self, settings):
        if settings.codex.sandbox.image == "needs-proxies:1" and not settings.server.trusted_proxies:
            raise ConfigError("codex.sandbox.image: needs-proxies:1 needs server.trustedProxies")


async def test_an_overlay_that_only_starts_with_todays_variables_is_refused(risoluto_client, risoluto_data_dir,
                                                                            tmp_path):
    client = await make_client(risoluto_client, tmp_path, env={"RISOLUTO_TRUSTED_PROXIES": "10.0.0.0/8"},
                               plugins=(("needs.proxies", NeedsProxies()),))
    assert (await put(client, {}, True)).status_code == 200
    await assert_refused(client, risoluto_data_dir, {"codex": {"sandbox": {"image": "needs-proxies:1"}}}, 400,
                         "invalid_config", "codex.sandbox.image", as_remote=True)


@pytest.mark.docker
async def test_an_allowlist_over_an_empty_one_is_enforced_at_once(sandbox_world):  # noqa: F811
    """The file allows everything (no allowlist); an overlay narrowing egress to one name starts
    the egress enforcer at once: no restart, and no launch ever runs unenforced."""
    config_file = sandbox_world.tmp / "config.yaml"
    config_file.write_text(json.dumps(sandbox_world.config()))
    client, kernel = await sandbox_world.app(env={"RISOLUTO_CONFIG": str(config_file)})
    assert "egress proxy" not in {i["item"] for i in (await (await client.get("/api/v1/hardening")).get_json())["items"]}
    response = await client.put(OVERLAY, json={"codex": {"sandbox": {"egressAllowlist": ["allowed.test"]}}})
    assert response.status_code == 200, await response.get_json()
    items = {i["item"]: i for i in (await (await client.get("/api/v1/hardening")).get_json())["items"]}
    assert items["egress proxy"]["status"] == "PASS", items["egress proxy"]
    body = await policy(client)
    assert body["launchable"] is True and body["policy"]["egressAllowlist"] == ["allowed.test"]
