"""The runtime's Docker client: one pooled connection set per unix socket (real engine)."""

from __future__ import annotations

import http.server
import json
import socketserver
import threading

import docker
import pytest
import requests
from docker.transport.unixconn import UnixHTTPConnection
from docker_util import docker_engine  # noqa: F401

from risoluto import docker_transport
from risoluto.errors import StartupError
from risoluto.plugins.sandbox import _engine as engine


@pytest.fixture
def connects(monkeypatch) -> list[str]:
    """Every new connection to an engine socket, from now on, by socket path."""
    opened: list[str] = []
    real_connect = UnixHTTPConnection.connect

    def counting(self):
        opened.append(self.unix_socket)
        return real_connect(self)

    monkeypatch.setattr(UnixHTTPConnection, "connect", counting)
    return opened


@pytest.mark.docker
def test_calls_on_many_container_paths_reuse_one_connection(docker_engine, connects):
    # docker-py keys its pools by the full URL: every container path used to open a connection
    opened = connects
    client = engine.connect({})
    opened.clear()  # the SDK's version probe and our ping: the pooled connection is open now
    try:
        for n in range(30):
            with pytest.raises(docker.errors.NotFound):
                client.inspect_container(f"risoluto-no-such-container-{n}")
        client.ping()
    finally:
        client.close()
    assert opened == []


@pytest.mark.docker
def test_log_tails_read_through_the_pool_too(docker_engine, connects):
    # the block reader must read each answer to its end, or requests closes the connection
    client = engine.connect({})
    cid = client.create_container("risoluto-test:latest", ["sh", "-c", "echo out; echo err >&2"])["Id"]
    try:
        client.start(cid)
        client.wait(cid)
        connects.clear()
        for _ in range(10):
            data, cut = engine.log_tail(client, cid, 100, 1024)
            assert sorted(data.splitlines()) == [b"err", b"out"] and not cut  # two pipes: either order
        assert connects == []
    finally:
        client.remove_container(cid, force=True)
        client.close()


def test_a_unix_socket_client_gets_one_pool_and_ignores_the_environment(monkeypatch, tmp_path):
    # no engine needed: the client is only built, never used
    netrc = tmp_path / "netrc"
    netrc.write_text("machine localhost login someone password hunter2\n")
    monkeypatch.setenv("NETRC", str(netrc))
    client = docker_transport.tuned(docker.APIClient(base_url=f"unix://{tmp_path}/docker.sock", version="1.41"))
    adapter = client.get_adapter("http+docker://localhost/v1.41/containers/a/json")
    assert adapter.get_connection("http+docker://localhost/v1.41/containers/a/json") is \
        adapter.get_connection("http+docker://localhost/v1.41/containers/b/wait")
    # requests would otherwise send the netrc entry as Basic auth on every engine call
    prepared = client.prepare_request(requests.Request("GET", "http+docker://localhost/v1.41/info"))
    assert "Authorization" not in prepared.headers


def test_an_unexpected_sdk_transport_is_left_as_it_is(monkeypatch, caplog):
    client = docker.APIClient(base_url="unix:///nonexistent/docker.sock", version="1.41")
    def changed_sdk(*args, **kwargs):
        raise TypeError("the adapter's constructor changed")

    monkeypatch.setattr(docker_transport, "SocketAdapter", changed_sdk)
    adapter = client._custom_adapter
    assert docker_transport.tuned(client)._custom_adapter is adapter
    assert "using it unchanged" in caplog.text


def test_tcp_engines_keep_the_sdk_transport():
    # a TCP engine may need the environment's proxy settings: left as the SDK sets it up
    for url in ("tcp://127.0.0.1:9", "https://127.0.0.1:9"):
        client = docker.APIClient(base_url=url, version="1.41")
        adapter = client.get_adapter(url.replace("tcp", "http") + "/v1.41/info")
        tuned = docker_transport.tuned(client)
        assert tuned.trust_env is True
        assert tuned.get_adapter(url.replace("tcp", "http") + "/v1.41/info") is adapter


class _FakeEngine(http.server.BaseHTTPRequestHandler):
    """Answers like a Docker engine and keeps every request's headers."""

    seen: list[dict[str, str]] = []

    def do_GET(self):  # noqa: N802 - http.server's name
        _FakeEngine.seen.append({**dict(self.headers), "path": self.path})
        body = json.dumps({"ApiVersion": "1.41", "Version": "99.0.0"} if "version" in self.path else {}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def address_string(self):  # a unix socket has no peer address
        return "unix"

    def log_message(self, *args):
        pass


class _UnixHTTPServer(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True


def _engine_calls(make: str, host: str) -> None:
    """One engine call through each place that builds a Docker client."""
    from types import SimpleNamespace

    from risoluto.plugins.egress import network
    from risoluto import roles
    from risoluto.plugins.sandbox import image_check

    if make == "sandbox runtime":
        client = engine.connect({"DOCKER_HOST": host})
        client.info()
        client.close()
    elif make == "egress network":
        client = network.docker_client()
        client.info()
        client.close()
    elif make == "doctor engine facts":
        settings = SimpleNamespace(sandbox=SimpleNamespace(engine_timeout_seconds=10.0))
        facts = engine.engine_facts(SimpleNamespace(settings=settings, state={}, environ={"DOCKER_HOST": host}))
        assert facts["ok"], facts
    elif make == "doctor image check":
        settings = SimpleNamespace(sandbox=SimpleNamespace(runtime="docker", engine_timeout_seconds=10.0),
                                   codex=SimpleNamespace(sandbox=SimpleNamespace(image="risoluto-none:1")))
        [result] = image_check.risoluto_doctor_checks(
            SimpleNamespace(settings=settings, state={}, environ={"DOCKER_HOST": host}))
        assert "not reachable" not in result.reason, result  # the engine was reached
    else:
        with pytest.raises(StartupError, match="no gateway address"):  # the engine was reached
            roles.network_gateway("risoluto-dp", {"DOCKER_HOST": host})


@pytest.mark.parametrize("make", ["sandbox runtime", "egress network", "doctor engine facts", "doctor image check",
                                  "data plane bind"])
def test_no_engine_client_sends_netrc_credentials(make, monkeypatch, tmp_path):
    # an operator's ~/.netrc entry for localhost must not reach the engine: requests would add it
    # as Basic auth to every call, since a unix-socket URL is http+docker://localhost/...
    netrc = tmp_path / "netrc"
    netrc.write_text("machine localhost login someone password hunter2\n")
    monkeypatch.setenv("NETRC", str(netrc))
    sock = tmp_path / "engine.sock"
    monkeypatch.setenv("DOCKER_HOST", f"unix://{sock}")
    _FakeEngine.seen = []
    server = _UnixHTTPServer(str(sock), _FakeEngine)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        _engine_calls(make, f"unix://{sock}")
    finally:
        server.shutdown()
        server.server_close()
    assert [h["path"] for h in _FakeEngine.seen][0] == "/version"  # the probe, then the calls
    assert len(_FakeEngine.seen) >= 2
    assert not [h["path"] for h in _FakeEngine.seen if "Authorization" in h]


@pytest.mark.anyio
@pytest.mark.parametrize("refusal", [docker.errors.NotFound, docker.errors.APIError])
async def test_engine_refusals_never_echo_a_masked_value(refusal, risoluto_settings):
    # whatever the engine says back (a 404 included) goes through the mask of the call
    from risoluto.errors import ApiError
    from risoluto.plugins.sandbox.docker_runtime import DockerRuntime

    value = "s3cret-env-value-for-the-agent"
    runtime = DockerRuntime(risoluto_settings(), environ={})
    runtime._client = object()  # never used: the call below raises before touching it

    def call(_client):
        raise refusal(f"failed to create task: env GH_TOKEN={value} rejected")

    with pytest.raises(ApiError) as info:
        await runtime.engine_call(call, mask=(value,))
    assert value not in info.value.message and "***" in info.value.message
