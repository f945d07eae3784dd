"""The OpenAPI document: every route declared, valid OpenAPI 3.1, and the server keeps to it.

- Coverage: every rule of ``app.url_map`` of the default app and of the data-plane app appears in
  the document with a declaration (no ``x-risoluto-undeclared``); a plugin route without ``@api``
  is listed and marked (docs/api.md shows what that looks like).
- Validity: ``openapi-spec-validator`` (OpenAPI 3.1 meta-schema plus reference resolution).
- Behaviour: schemathesis generates requests from the document against a real hypercorn on
  loopback (a MASTER_KEY, webhook secrets in the store, limits raised so 429 does not hide the
  routes) and checks that no response is a 5xx and every response matches its declared status,
  content type and schema. ``POST /api/v1/sandboxes`` is excluded: it launches containers (the
  sandbox tests cover it against the engine). The other sandbox routes run when Docker answers.
"""

from __future__ import annotations

import json
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from http_support import ServerThread
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from openapi_spec_validator import OpenAPIV31SpecValidator, validate
from openapi_spec_validator.validation.exceptions import OpenAPIValidationError
from quart import Blueprint
from schemathesis import GenerationMode
from schemathesis.checks import (
    content_type_conformance,
    negative_data_rejection,
    not_a_server_error,
    response_schema_conformance,
    status_code_conformance,
)

from risoluto import hookimpl
from risoluto.app import create_app
from risoluto.openapi import api, build_document
from risoluto.roles import data_plane_settings
from risoluto.settings import build_settings

MASTER_KEY = "openapi-test-master-key"
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance,
          negative_data_rejection]
CONFIG = {"rateLimit": {"api": {"limit": 100000, "windowSeconds": 60},
                        "webhooks": {"limit": 100000, "windowSeconds": 60}}}


def _operations(app: Any) -> set[tuple[str, str]]:
    """(METHOD, OpenAPI path) for every rule the router serves."""
    from risoluto.openapi import _PARAM

    out = set()
    for rule in app.url_map.iter_rules():
        if rule.endpoint == "static":
            continue
        for method in (rule.methods or set()) - {"HEAD", "OPTIONS"}:
            out.add((method, _PARAM.sub(r"{\1}", rule.rule)))
    return out


def _assert_all_declared(app: Any) -> dict[str, Any]:
    doc = build_document(app)
    listed = {(m.upper(), p) for p, ops in doc["paths"].items() for m in ops}
    assert listed == _operations(app)
    undeclared = sorted(f"{m.upper()} {p}" for p, ops in doc["paths"].items() for m, op in ops.items()
                        if op.get("x-risoluto-undeclared"))
    assert undeclared == [], f"routes without @api(...): {undeclared}"
    for path, ops in doc["paths"].items():
        for method, op in ops.items():
            assert op["summary"] and "default" in op["responses"], (method, path)  # errors: the envelope
    return doc


def test_every_route_of_the_default_app_is_declared(tmp_path):
    app = create_app(build_settings({}, None, {"DATA_DIR": str(tmp_path)}))
    doc = _assert_all_declared(app)
    secrets = doc["paths"]["/api/v1/secrets/{key}"]
    assert secrets["put"]["requestBody"]["content"]["application/json"]["schema"]["required"] == ["value"]
    assert set(secrets["delete"]["responses"]) == {"204", "400", "404", "503", "507", "default"}
    assert "content" not in secrets["delete"]["responses"]["204"]


def test_every_route_of_the_data_plane_app_is_declared(tmp_path):
    env = {"DATA_DIR": str(tmp_path), "RISOLUTO_DATA_PLANE_SECRET": "s" * 40}
    settings = data_plane_settings(build_settings({"server": {"bind": "10.231.0.1"}}, None, env), env)
    app = create_app(settings, environ=env)
    doc = _assert_all_declared(app)
    assert any(p.startswith("/dp/v1/") for p in doc["paths"])


def test_document_is_valid_openapi_3_1(tmp_path):
    doc = build_document(create_app(build_settings({}, None, {"DATA_DIR": str(tmp_path)})))
    assert doc["openapi"].startswith("3.1")
    validate(doc, cls=OpenAPIV31SpecValidator)  # raises with the path of the first error
    # the validator is not a rubber stamp: a broken document is refused
    broken = json.loads(json.dumps(doc))
    broken["paths"]["/api/v1/secrets"]["get"]["responses"]["200"]["content"] = {"application/json": {"schema": 5}}
    with pytest.raises(OpenAPIValidationError):
        validate(broken, cls=OpenAPIV31SpecValidator)


class UndeclaredPlugin:
    @hookimpl
    def risoluto_app_blueprints(self, kernel: Any) -> list[Any]:
        bp = Blueprint("test_undeclared", __name__)

        @bp.get("/api/v1/test/undeclared/<name>")
        async def undeclared(name: str) -> Any:
            return {"name": name}

        @bp.get("/api/v1/test/declared")
        @api("A declared test route", responses={200: {"type": "object"}})
        async def declared() -> Any:
            return {}

        return [bp]


@pytest.mark.anyio
async def test_an_undeclared_plugin_route_is_listed_and_marked(risoluto_client):
    client = await risoluto_client(plugins=(("undeclared", UndeclaredPlugin()),))
    response = await client.get("/api/v1/openapi.json")
    assert response.status_code == 200
    doc = await response.get_json()
    op = doc["paths"]["/api/v1/test/undeclared/{name}"]["get"]
    assert op["x-risoluto-undeclared"] is True and op["summary"] == "GET /api/v1/test/undeclared/<name>"
    assert op["parameters"] == [{"name": "name", "in": "path", "required": True, "schema": {"type": "string"}}]
    assert list(op["responses"]) == ["default"]
    assert "x-risoluto-undeclared" not in doc["paths"]["/api/v1/test/declared"]["get"]
    validate(doc, cls=OpenAPIV31SpecValidator)  # still a valid document


# --- schemathesis against a real hypercorn on loopback ------------------------------------
def _call(url: str, method: str = "GET", body: dict[str, Any] | None = None) -> tuple[int, Any]:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            raw = resp.read()
            return resp.status, json.loads(raw) if raw else None
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"null")


@pytest.fixture(scope="module")
def live_server(tmp_path_factory: pytest.TempPathFactory) -> Any:
    yield from _served(tmp_path_factory)


@pytest.fixture
def fresh_server(tmp_path_factory: pytest.TempPathFactory) -> Any:
    # the fuzzing may save an overlay that tightens the rate limits (allowed, and applied at once):
    # a test that needs the server as configured gets its own
    yield from _served(tmp_path_factory)


def _served(tmp_path_factory: pytest.TempPathFactory) -> Any:
    data = tmp_path_factory.mktemp("openapi") / "data"
    data.mkdir(mode=0o700)
    workspaces = data.parent / "workspaces"
    config = {**CONFIG, "workspace": {"root": str(workspaces)}}
    server = ServerThread(str(data), {"MASTER_KEY": MASTER_KEY}, ["127.0.0.1"], config=config).start()
    try:
        for name in ("LINEAR_WEBHOOK_SECRET", "GITHUB_WEBHOOK_SECRET"):  # so webhooks answer 401, not 503
            assert _call(f"{server.url()}/api/v1/secrets/{name}", "PUT", {"value": "whsec-" + name})[0] == 204
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def api_schema(live_server: Any) -> Any:
    schema = schemathesis.openapi.from_url(f"{live_server.url()}/api/v1/openapi.json")
    schema = schema.exclude(method="POST", path="/api/v1/sandboxes")  # would launch containers
    status, body = _call(f"{live_server.url()}/api/v1/sandboxes")
    if status == 503 and body["error"]["code"] == "sandbox_runtime_unavailable":
        schema = schema.exclude(tag="sandbox")  # no engine here: those routes answer 503 by design
    return schema


# schemathesis' own pytest fixture integration does not run on pytest 9, so the operations are
# driven here: one hypothesis run per operation and generation mode, failures collected.
EXAMPLES = {GenerationMode.POSITIVE: 50, GenerationMode.NEGATIVE: 30}


def test_api_keeps_to_its_openapi_document(api_schema):
    failures: list[str] = []
    ran: set[tuple[str, GenerationMode]] = set()
    operations = [result.ok() for result in api_schema.get_all_operations()]
    assert len(operations) >= 15  # the document really was loaded
    for operation in operations:
        for mode, examples in EXAMPLES.items():
            @given(case=operation.as_strategy(generation_mode=mode))
            @settings(max_examples=examples, deadline=None, database=None, derandomize=True,
                      suppress_health_check=list(HealthCheck))
            def check(case: Any) -> None:
                case.call_and_validate(checks=CHECKS)

            try:
                check()
                ran.add((operation.label, mode))
            except Unsatisfiable:
                pass  # negative mode: nothing to break (no body, only free-form string path parameters)
            except Exception as exc:  # noqa: BLE001 - every operation is run; all failures reported
                failures.append(f"{operation.label} ({mode.value}): {type(exc).__name__}: {exc}")
    assert not failures, "\n\n".join(failures)
    assert {(op.label, GenerationMode.POSITIVE) for op in operations} <= ran
    for label in ("POST /api/v1/secrets/{key}", "PUT /api/v1/secrets/{key}", "PUT /api/v1/config/overlay"):
        assert (label, GenerationMode.NEGATIVE) in ran, label  # invalid bodies were sent and refused


def test_served_document_is_the_generated_one(fresh_server):
    status, served = _call(f"{fresh_server.url()}/api/v1/openapi.json")
    assert status == 200 and served == build_document(fresh_server.app)
    assert Path(fresh_server.settings.data_dir).is_dir()
