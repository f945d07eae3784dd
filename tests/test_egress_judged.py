"""Kept judgements of repeated CONNECT heads (risoluto/plugins/egress/_judged.py), tried from the
client's side: a byte-identical head is reused only while the settings, the sandbox's registration
and its issue's grants are unchanged, never from another address, and the decision hook is
still asked every time.

The origin is a raw TCP server of this test on 127.0.0.1 (it answers ``ok`` to the first bytes);
the sandbox's allowlist names its port explicitly, so the tunnel carries raw bytes.
"""

from __future__ import annotations

import base64
import contextlib
from typing import Any, AsyncIterator

import anyio
import attrs
import pytest

from risoluto.hookspecs import hookimpl
from risoluto.hookspecs.egress import EgressVerdict
from risoluto.kernel import Kernel
from risoluto.plugins.egress import _proxy
from risoluto.plugins.egress._approvals import IssueHosts
from risoluto.plugins.egress._audit import audit_for
from risoluto.plugins.egress._hosts import Allowlist
from risoluto.plugins.egress._metrics import metrics_for
from risoluto.plugins.egress._proxy import Client, EgressProxy
from risoluto.settings import build_settings

pytestmark = pytest.mark.anyio

SECRET = "judged-" + "j" * 24


def auth(user: str = "sbx-j", secret: str = SECRET) -> str:
    return "Proxy-Authorization: Basic " + base64.b64encode(f"{user}:{secret}".encode()).decode() + "\r\n"


class Decider:
    """A decision plugin that counts what it is asked and can be told to refuse."""

    def __init__(self) -> None:
        self.asked = 0
        self.refuse = False

    @hookimpl
    def risoluto_egress_decision(self, request, allowlist):
        self.asked += 1
        return EgressVerdict(False, "told to refuse") if self.refuse else None


@attrs.define
class Env:
    proxy: EgressProxy
    kernel: Kernel
    port: int
    origin_port: int
    decider: Decider
    grants: IssueHosts
    egress: dict[str, Any]  # the settings' egress section now in force (see reconfigure)
    parsed: list[int]
    tmp_path: Any

    def reconfigure(self, **egress: Any) -> None:
        self.egress.update(egress)
        self.kernel.settings = build_settings({"egress": self.egress}, None, {"DATA_DIR": str(self.tmp_path)})

    def client(self, secret: str = SECRET, allowlist: tuple[str, ...] | None = None) -> Client:
        return Client(username="sbx-j", secret=secret.encode(), sandbox="sbx-j", issue="ISSUE-7",
                      addresses=frozenset({"127.0.0.1"}),
                      allowlist=Allowlist(allowlist if allowlist is not None else [f"127.0.0.1:{self.origin_port}"]))

    def head(self, extra: str = "", creds: str | None = None) -> bytes:
        return f"CONNECT 127.0.0.1:{self.origin_port} HTTP/1.1\r\n{creds or auth()}{extra}\r\n".encode()

    def lines(self) -> list[Any]:
        return audit_for(self.kernel).recent(lambda d: True, 1000)

    async def line(self, number: int) -> Any:
        """The ``number``-th audit line (from 1), once written: a tunnel is audited as it ends."""
        with anyio.fail_after(5):
            while len(self.lines()) < number:
                await anyio.sleep(0.01)
        return sorted(self.lines(), key=lambda d: d.ts)[number - 1]


@contextlib.asynccontextmanager
async def judged_env(tmp_path, monkeypatch) -> AsyncIterator[Env]:
    async def serve(stream: Any) -> None:
        async with stream:
            await stream.receive()
            await stream.send(b"ok")

    parsed: list[int] = []
    real_parse = _proxy.parse_head

    def counted(raw: bytes) -> Any:
        parsed.append(1)
        return real_parse(raw)

    monkeypatch.setattr(_proxy, "parse_head", counted)
    listener = await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=0)
    origin_port = listener.extra(anyio.abc.SocketAttribute.local_port)
    egress: dict[str, Any] = {"allowPrivateNetworks": ["127.0.0.0/8"]}
    decider = Decider()
    kernel = Kernel(build_settings({"egress": egress}, None, {"DATA_DIR": str(tmp_path)}), (("decider", decider),))
    grants = IssueHosts(tmp_path / "egress-issue-hosts.json")
    proxy = EgressProxy(lambda: kernel.settings.egress, kernel.hooks.egress_decision, metrics_for(kernel),
                        audit=audit_for(kernel), issue_hosts=grants)
    env = Env(proxy, kernel, 0, origin_port, decider, grants, egress, parsed, tmp_path)
    proxy.register(env.client())
    async with anyio.create_task_group() as tg:
        async def serve_origin() -> None:
            async with listener:
                await listener.serve(serve)

        tg.start_soon(serve_origin)
        _, env.port = await tg.start(proxy.serve, "127.0.0.1")
        yield env
        tg.cancel_scope.cancel()


async def tunnel(env: Env, head: bytes, source: str = "127.0.0.1") -> tuple[int, str, bytes]:
    """(status, X-Risoluto-Egress reason, what the origin answered through the tunnel)."""
    stream = await anyio.connect_tcp("127.0.0.1", env.port, local_host=source)
    async with stream:
        await stream.send(head)
        answer = b""
        with anyio.fail_after(10):
            while b"\r\n\r\n" not in answer:
                answer += await stream.receive()
            answer_head, _, body = answer.partition(b"\r\n\r\n")
            lines = answer_head.decode("latin-1").split("\r\n")
            status = int(lines[0].split(" ", 2)[1])
            reason = next((line.split(": ", 1)[1] for line in lines if line.startswith("X-Risoluto-Egress")), "")
            if status == 200:
                await stream.send(b"go")
                with contextlib.suppress(anyio.EndOfStream):
                    while True:
                        body += await stream.receive()
    return status, reason, body


async def test_a_repeated_head_reuses_its_judgement_and_is_audited_alike(tmp_path, monkeypatch):
    async with judged_env(tmp_path, monkeypatch) as env:
        first = await tunnel(env, env.head())
        line1 = await env.line(1)
        second = await tunnel(env, env.head())
        line2 = await env.line(2)
    assert first == second == (200, "", b"ok")
    assert len(env.parsed) == 1  # the second head was neither parsed nor authenticated again
    same = ("verdict", "reason", "sandbox", "issue", "host", "port", "rule", "bytes_up", "bytes_down")
    assert [getattr(line2, k) for k in same] == [getattr(line1, k) for k in same]
    assert (line2.reason, line2.rule, line2.bytes_up) == ("allowlist", f"127.0.0.1:{env.origin_port}", 2)
    assert line2.ts > line1.ts


async def test_unregistering_the_sandbox_refuses_the_same_bytes(tmp_path, monkeypatch):
    async with judged_env(tmp_path, monkeypatch) as env:
        assert (await tunnel(env, env.head()))[0] == 200
        env.proxy.unregister("sbx-j")
        assert len(env.proxy._judged) == 0  # its credential does not linger in the kept heads
        assert (await tunnel(env, env.head()))[:2] == (407, "credential_invalid")


async def test_a_new_secret_refuses_the_old_head(tmp_path, monkeypatch):
    async with judged_env(tmp_path, monkeypatch) as env:
        assert (await tunnel(env, env.head()))[0] == 200
        env.proxy.register(env.client(secret="rotated-" + "r" * 24))
        assert (await tunnel(env, env.head()))[:2] == (407, "credential_invalid")
        assert (await tunnel(env, env.head(creds=auth(secret="rotated-" + "r" * 24))))[0] == 200


async def test_a_deny_list_change_refuses_the_same_bytes(tmp_path, monkeypatch):
    async with judged_env(tmp_path, monkeypatch) as env:
        assert (await tunnel(env, env.head()))[0] == 200
        env.reconfigure(deny=["127.0.0.1"])
        assert (await tunnel(env, env.head()))[:2] == (403, "deny_listed")
        env.reconfigure(deny=[])
        assert (await tunnel(env, env.head()))[0] == 200


async def test_removing_an_issue_grant_refuses_the_same_bytes(tmp_path, monkeypatch):
    async with judged_env(tmp_path, monkeypatch) as env:
        env.proxy.register(env.client(allowlist=()))  # the host is only the issue's grant
        entry = f"127.0.0.1:{env.origin_port}"
        assert (await tunnel(env, env.head()))[:2] == (403, "ip_literal_not_allowed")
        env.grants.add("ISSUE-7", entry)
        assert (await tunnel(env, env.head()))[0] == 200
        assert (await env.line(2)).reason == "issue_allowlist"
        assert (await tunnel(env, env.head()))[0] == 200  # kept
        env.grants.remove("ISSUE-7", entry)
        assert (await tunnel(env, env.head()))[:2] == (403, "ip_literal_not_allowed")


async def test_the_decision_hook_is_asked_every_time_and_wins(tmp_path, monkeypatch):
    async with judged_env(tmp_path, monkeypatch) as env:
        for _ in range(3):
            assert (await tunnel(env, env.head()))[0] == 200
        assert env.decider.asked == 3 and len(env.parsed) == 1
        env.decider.refuse = True
        status, reason, _ = await tunnel(env, env.head())
    assert (status, reason) == (403, "plugin") and env.decider.asked == 4


async def test_the_same_bytes_from_another_address_are_judged_afresh(tmp_path, monkeypatch):
    async with judged_env(tmp_path, monkeypatch) as env:
        assert (await tunnel(env, env.head()))[0] == 200
        assert (await tunnel(env, env.head(), source="127.0.0.2"))[:2] == (407, "credential_foreign")
        assert len(env.parsed) == 2


async def test_refusals_are_never_kept(tmp_path, monkeypatch):
    async with judged_env(tmp_path, monkeypatch) as env:
        env.proxy.register(env.client(allowlist=("127.0.0.1:1",)))  # another port only
        for _ in range(2):
            assert (await tunnel(env, env.head()))[:2] == (403, "port_not_allowed")
        assert len(env.parsed) == 2 and len(env.proxy._judged) == 0


async def test_the_kept_heads_are_bounded(tmp_path, monkeypatch):
    from risoluto.plugins.egress._judged import SIZE

    async with judged_env(tmp_path, monkeypatch) as env:
        for i in range(SIZE + 40):
            assert (await tunnel(env, env.head(extra=f"X-Request: {i}\r\n")))[0] == 200
        assert len(env.proxy._judged) == SIZE
        # the oldest went first: the newest is kept, the first is judged afresh
        parsed = len(env.parsed)
        await tunnel(env, env.head(extra=f"X-Request: {SIZE + 39}\r\n"))
        assert len(env.parsed) == parsed
        await tunnel(env, env.head(extra="X-Request: 0\r\n"))
        assert len(env.parsed) == parsed + 1


async def plain_get(env: Env, path: str = "/x") -> tuple[int, str]:
    stream = await anyio.connect_tcp("127.0.0.1", env.port)
    answer = b""
    async with stream:
        await stream.send(f"GET http://127.0.0.1:{env.origin_port}{path} HTTP/1.1\r\n{auth()}\r\n".encode())
        with anyio.fail_after(10), contextlib.suppress(anyio.EndOfStream):
            while True:
                answer += await stream.receive()
    if answer == b"ok":  # the origin answers raw bytes: the request went through
        return 200, ""
    lines = answer.split(b"\r\n\r\n", 1)[0].decode("latin-1").split("\r\n")
    reason = next((line.split(": ", 1)[1] for line in lines if line.startswith("X-Risoluto-Egress")), "")
    return int(lines[0].split(" ", 2)[1]), reason


async def test_a_plain_request_is_kept_too_and_a_new_rule_refuses_the_same_bytes(tmp_path, monkeypatch):
    async with judged_env(tmp_path, monkeypatch) as env:
        assert await plain_get(env) == (200, "")
        assert await plain_get(env) == (200, "")
        assert len(env.parsed) == 1
        env.reconfigure(rules=[{"hosts": [f"127.0.0.1:{env.origin_port}"], "methods": ["GET"], "paths": ["/x"],
                                "verdict": "deny"}])
        assert await plain_get(env) == (403, "rule_deny")
        assert await plain_get(env, "/y") == (200, "")  # the rule names /x only


async def test_a_replaced_allowlist_refuses_the_same_bytes(tmp_path, monkeypatch):
    async with judged_env(tmp_path, monkeypatch) as env:
        assert (await tunnel(env, env.head()))[0] == 200
        env.proxy._clients["sbx-j"].allowlist = Allowlist(["127.0.0.1:1"])  # the same client, narrowed in place
        assert (await tunnel(env, env.head()))[:2] == (403, "port_not_allowed")
