"""The runtime's Docker client: one pooled connection set per unix socket (real engine)."""

from __future__ import annotations

import docker
import pytest
import requests
from docker.transport.unixconn import UnixHTTPConnection
from docker_util import docker_engine  # noqa: F401

from risoluto.plugins.sandbox import _engine as engine


@pytest.mark.docker
def test_calls_on_many_container_paths_reuse_one_connection(docker_engine, monkeypatch):
    # docker-py keys its pools by the full URL: every container path used to open a connection
    opened: list[str] = []
    real_connect = UnixHTTPConnection.connect

    def counting(self):
        opened.append(self.unix_socket)
        return real_connect(self)

    monkeypatch.setattr(UnixHTTPConnection, "connect", counting)
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


def test_a_unix_socket_client_gets_one_pool_and_ignores_the_environment(monkeypatch, tmp_path):
    # no engine needed: the client is only built, never used
    netrc = tmp_path / "netrc"
    netrc.write_text("machine localhost login someone password hunter2\n")
    monkeypatch.setenv("NETRC", str(netrc))
    client = engine._tuned(docker.APIClient(base_url=f"unix://{tmp_path}/docker.sock", version="1.41"))
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

    monkeypatch.setattr(engine, "_SocketAdapter", changed_sdk)
    adapter = client._custom_adapter
    assert engine._tuned(client)._custom_adapter is adapter
    assert "using it unchanged" in caplog.text


def test_tcp_engines_keep_the_sdk_transport():
    # a TCP engine may need the environment's proxy settings: left as the SDK sets it up
    for url in ("tcp://127.0.0.1:9", "https://127.0.0.1:9"):
        client = docker.APIClient(base_url=url, version="1.41")
        adapter = client.get_adapter(url.replace("tcp", "http") + "/v1.41/info")
        tuned = engine._tuned(client)
        assert tuned.trust_env is True
        assert tuned.get_adapter(url.replace("tcp", "http") + "/v1.41/info") is adapter
