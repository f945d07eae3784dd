"""Hostile request bodies and settings: each is refused with a 4xx (never a 500) and changes nothing.

Found by fuzzing a running server; each case here answered 500, or was saved and broke the
server later, before the fix.
"""

from __future__ import annotations

import json
import math
import time

import pytest
import yaml
from http_support import MemorySecrets, SecretStorePlugin, linear_signature

from risoluto.errors import ConfigError
from risoluto.hookspecs.sandbox import ContainerSpec, Mount
from risoluto.plugins.sandbox._guard import check_spec
from risoluto.settings import build_settings

pytestmark = pytest.mark.anyio

KEY = "hostile input key"
DEEP = b"[" * 5000 + b"]" * 5000
HUGE_INT = "9" * 400


@pytest.mark.parametrize("method, path", [
    ("put", "/api/v1/secrets/A"), ("post", "/api/v1/secrets/A"), ("put", "/api/v1/config/overlay"),
    ("post", "/api/v1/sandboxes"),
])
@pytest.mark.parametrize("body", [DEEP, b'{"value": NaN}', b'{"value": -Infinity}',
                                  ('{"timeout_s": %s}' % HUGE_INT).encode()])
async def test_json_the_parser_must_not_choke_on_is_a_400(risoluto_client, method, path, body):
    client = await risoluto_client(env={"MASTER_KEY": KEY})
    response = await getattr(client, method)(path, data=body, headers={"Content-Type": "application/json"})
    assert response.status_code == 400, await response.get_data()
    assert (await response.get_json())["error"]["code"] == "invalid_json"


@pytest.mark.parametrize("launch, code", [
    ({"issue": "\ud800x", "command": ["true"]}, "invalid_issue"),
    ({"issue": "ENV-1", "env": {"FOO\n": "bar"}}, "invalid_request"),  # `$` used to match before a final \n
    ({"issue": "ENV-2", "env": {"FOO": "\udcff"}}, "invalid_request"),
    ({"issue": "CMD-1", "command": ["echo", "\ud800"]}, "invalid_request"),
    ({"issue": "SEC-1", "secrets": ["TOKEN\n"]}, "invalid_request"),
    ({"issue": "IMG-1", "image": "img:1\n"}, "invalid_image"),
    # the SDK puts the name into the engine's URL as it is: this one was GET /containers/json
    ({"issue": "IMG-2", "image": "x/../../containers"}, "invalid_image"),
    ({"issue": "IMG-3", "image": "a//b"}, "invalid_image"),
    ({"issue": "T-1", "timeout_s": 2**63 - 1}, "invalid_request"),
])
async def test_launch_fields_that_cannot_reach_the_engine_are_a_400(risoluto_client, launch, code):
    client = await risoluto_client()
    response = await client.post("/api/v1/sandboxes", data=json.dumps(launch),
                                 headers={"Content-Type": "application/json"})
    assert response.status_code == 400, await response.get_data()
    assert (await response.get_json())["error"]["code"] == code


KEY_NOT_ALLOWED = "overlay_key_not_allowed"  # a deploy-time key: refused before its value is read


@pytest.mark.parametrize("overlay, code", [
    ({"rateLimit": {"api": {"windowSeconds": 1e300}}}, "invalid_config"),  # a NaN here once made every /api request 503
    ({"codex": {"sandbox": {"timeoutS": 10**18}}}, "invalid_config"),
    ({"codex": {"sandbox": {"maxConcurrent": 5_000_000}}}, KEY_NOT_ALLOWED),  # sized the engine connection pool
    ({"codex": {"sandbox": {"stopGraceS": 1e300}}}, KEY_NOT_ALLOWED),
    ({"codex": {"sandbox": {"resources": {"cpus": 1e300}}}}, "invalid_config"),
    ({"codex": {"sandbox": {"resources": {"pidsLimit": 2**62}}}}, "invalid_config"),
    ({"codex": {"sandbox": {"resources": {"memory": "9" * 400}}}}, "invalid_config"),
    ({"workspace": {"root": "/tmp/a\u0000b"}}, KEY_NOT_ALLOWED),
    ({"workspace": {"root": "/tmp/\ud800"}}, KEY_NOT_ALLOWED),
    ({"egress": {"resolver": "garbage:::"}}, KEY_NOT_ALLOWED),
    ({"codex": {"sandbox": {"image": "x/../../containers"}}}, "invalid_config"),
    ({"egress": {"hosts": {"api.example.test": "not-an-ip"}}}, KEY_NOT_ALLOWED),
])
async def test_overlay_values_that_would_break_the_server_are_refused(risoluto_client, risoluto_data_dir, overlay,
                                                                      code):
    client = await risoluto_client()
    assert (await client.put("/api/v1/config/overlay", json={"codex": {"sandbox": {"image": "img:v1"}}})).status_code == 200
    path = risoluto_data_dir / "config" / "overlay.yaml"
    before = path.read_bytes()
    response = await client.put("/api/v1/config/overlay", data=json.dumps(overlay),
                                headers={"Content-Type": "application/json"})
    assert response.status_code == 400, await response.get_data()
    assert (await response.get_json())["error"]["code"] == code
    assert path.read_bytes() == before
    assert (await client.get("/api/v1/sandbox/policy")).status_code == 200  # still serving
    assert (await client.put("/api/v1/config/overlay", json={})).status_code == 200  # and still changeable


@pytest.mark.parametrize("config", [
    "rateLimit: {api: {windowSeconds: .nan}}",
    "codex: {sandbox: {stopGraceS: .inf}}",
    "codex: {sandbox: {resources: {cpus: -.inf}}}",
    f"codex: {{sandbox: {{timeoutS: {HUGE_INT}}}}}",
])
def test_a_config_file_with_non_finite_numbers_is_a_config_error(config):
    with pytest.raises(ConfigError):
        build_settings(yaml.safe_load(config), None, {})


def test_the_limits_leave_ordinary_settings_alone():
    settings = build_settings({"codex": {"sandbox": {"maxConcurrent": 1024, "timeoutS": 7 * 24 * 3600,
                                                      "resources": {"memory": "64g", "cpus": 64}}}}, None, {})
    assert settings.codex.sandbox.max_concurrent == 1024 and math.isclose(settings.codex.sandbox.resources.cpus, 64)


@pytest.mark.parametrize("source", ["/tmp/a\x00b", "/tmp/\ud800"])
def test_a_bind_source_the_os_cannot_take_is_refused_not_a_crash(source, tmp_path):
    from risoluto.errors import ApiError

    settings = build_settings({}, None, {"DATA_DIR": str(tmp_path / "data")})
    spec = ContainerSpec(name="x", image="img:1", command=[], user="1000:1000", network="risoluto-internal",
                         mounts=[Mount(type="bind", source=source, target="/data")])
    with pytest.raises(ApiError) as info:
        check_spec(spec, settings, {})
    assert info.value.status == 403


@pytest.mark.parametrize("extra", [{"type": "\ud800"}, {"webhookTimestamp": int(HUGE_INT)}])
async def test_a_signed_webhook_with_unstorable_fields_is_a_400(risoluto_client, extra):
    memory = MemorySecrets({"LINEAR_WEBHOOK_SECRET": "lin_wh_current"})
    client = await risoluto_client(plugins=(("test_store", SecretStorePlugin(memory)),))
    payload = {"action": "create", "type": "Issue", "data": {"id": "x1"},
               "webhookTimestamp": int(time.time() * 1000), **extra}
    body = json.dumps(payload).encode()
    headers = {"Linear-Signature": linear_signature(body, "lin_wh_current"), "Linear-Delivery": "d-hostile",
               "Content-Type": "application/json"}
    response = await client.post("/webhooks/linear", data=body, headers=headers,
                                 scope_base={"client": ("198.51.100.60", 443)})
    assert response.status_code == 400, await response.get_data()
    assert (await response.get_json())["error"]["code"] == "invalid_payload"


def test_image_references_follow_dockers_grammar_and_cannot_blow_up():
    import time

    from risoluto.plugins.sandbox._naming import valid_image_ref

    good = ["risoluto-test:latest", "debian", "library/debian:12", "localhost:5000/a/b:tag", "my_img__x.y-z:V1.2_rc",
            "registry.example.com/team/img@sha256:" + "a" * 64, "sha256:" + "b" * 64, "x--y", "a/b/c/d", "a" * 200]
    bad = ["x/../../containers", "../x", "a/./b", "x/..", "a..b", "a.-b", "a//b", "a/", "/a", "-a", "a:", "a:-t",
           "MyRepo/foo", "a@sha256:short", "x:t:t", "a b", "\u00e9", "a" * 256]
    assert [r for r in good if not valid_image_ref(r)] == []
    assert [r for r in bad if valid_image_ref(r)] == []
    for evil in ("a" * 254 + "!", "a-" * 127 + "!", "a." * 127 + "!", ("a" * 20 + "/") * 12 + "!", "a_" * 127 + "!",
                 "a" + "-" * 250 + "!", "a.b" * 80 + "/!"):
        t0 = time.perf_counter()
        assert not valid_image_ref(evil)
        assert time.perf_counter() - t0 < 0.05, evil[:20]
