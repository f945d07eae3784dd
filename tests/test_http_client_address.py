"""Client address (docs/http-security.md): socket peer; X-Forwarded-For only from trusted proxies."""

import pytest
from werkzeug.datastructures import Headers

from http_support import EchoPlugin
from risoluto.http_checks import digest_matches, host_is_loopback, origin_is_loopback, token_digest, tokens_equal
from risoluto.plugins.http.client_address import decide

pytestmark = pytest.mark.anyio

PROXIES = ("10.0.0.0/24", "fd00::/64", "127.0.0.1/32")


def xff(*values):
    return Headers([("X-Forwarded-For", v) for v in values])


@pytest.mark.parametrize("peer,headers,expected", [
    # untrusted peers: the header is ignored whatever it says
    ("203.0.113.9", xff("127.0.0.1"), ("203.0.113.9", False)),
    ("203.0.113.9", xff("10.0.0.1, 1.2.3.4"), ("203.0.113.9", False)),
    ("::ffff:203.0.113.9", xff("192.0.2.111"), ("203.0.113.9", False)),
    # every loopback address is one client, named 127.0.0.1
    ("127.0.0.2", xff("198.51.100.1"), ("127.0.0.1", False)),
    ("127.200.3.4", Headers(), ("127.0.0.1", False)),
    ("::1", Headers(), ("127.0.0.1", False)),
    ("::ffff:127.0.0.9", Headers(), ("127.0.0.1", False)),
    ("10.0.0.5", xff("::1"), ("127.0.0.1", True)),  # relayed: one client, still never local
    # trusted proxy: right-most entry that is not a trusted proxy
    ("10.0.0.5", xff("198.51.100.1"), ("198.51.100.1", True)),
    ("10.0.0.5", xff("6.6.6.6, 198.51.100.1"), ("198.51.100.1", True)),
    ("10.0.0.5", xff("6.6.6.6, 198.51.100.1, 10.0.0.7"), ("198.51.100.1", True)),
    ("10.0.0.5", xff("6.6.6.6", "198.51.100.1, 10.0.0.7"), ("198.51.100.1", True)),
    ("10.0.0.5", xff("127.0.0.1"), ("127.0.0.1", True)),  # a relayed "loopback" stays via_proxy
    ("10.0.0.5", xff("10.0.0.8, 10.0.0.9"), ("10.0.0.8", True)),  # all trusted: left-most
    ("10.0.0.5", Headers(), ("10.0.0.5", True)),  # relayed without a header: still via a proxy
    ("127.0.0.1", Headers(), ("127.0.0.1", True)),
    ("fd00::1", xff("[2001:db8::7]:443"), ("2001:db8::7", True)),
    ("10.0.0.5", xff("198.51.100.1:5555"), ("198.51.100.1", True)),
    ("10.0.0.5", xff('"[2001:db8::9]"'), ("2001:db8::9", True)),
    ("10.0.0.5", xff("::ffff:198.51.100.3"), ("198.51.100.3", True)),
    # malformed entries stop the walk at the last address we can vouch for
    ("10.0.0.5", xff("unknown"), ("10.0.0.5", True)),
    ("10.0.0.5", xff("1.2.3.4, garbage, 10.0.0.9"), ("10.0.0.9", True)),
    ("10.0.0.5", xff("1.2.3.4, "), ("10.0.0.5", True)),
    ("10.0.0.5", xff("\u00e9\u00e9"), ("10.0.0.5", True)),
    ("10.0.0.5", xff("1.2.3.4, 999.1.1.1"), ("10.0.0.5", True)),
    # unparsable peers are kept as they are, never loopback
    ("", xff("127.0.0.1"), ("", False)),
])
def test_decide(peer, headers, expected):
    assert decide(peer, headers, PROXIES) == expected


def test_no_trusted_proxies_means_peer():
    assert decide("10.0.0.5", xff("1.2.3.4"), ()) == ("10.0.0.5", False)


def test_huge_chain_is_bounded():
    chain = ", ".join(["10.0.0.9"] * 10000)
    client, via = decide("10.0.0.5", xff("6.6.6.6, " + chain), PROXIES)
    assert via and client == "10.0.0.9"  # walked at most 64 entries, never reached the spoofable left


async def test_forwarded_client_is_what_the_guards_see(risoluto_client):
    client = await risoluto_client(env={"RISOLUTO_TRUSTED_PROXIES": "10.0.0.0/24", "RISOLUTO_WRITE_TOKEN": "t" * 30},
                                   plugins=(("echo", EchoPlugin()),))
    response = await client.post("/api/v1/test/echo", headers={"X-Forwarded-For": "192.0.2.111, 198.51.100.4",
                                                                "Authorization": "Bearer " + "t" * 30},
                                 scope_base={"client": ("10.0.0.5", 1)})
    body = await response.get_json()
    assert (body["client"], body["via_proxy"]) == ("198.51.100.4", True)


@pytest.mark.parametrize("host,ok", [
    ("localhost", True), ("localhost:4000", True), ("LocalHost.", True), ("127.0.0.1", True),
    ("127.255.0.1:80", True), ("[::1]", True), ("[::1]:4000", True), ("[::ffff:127.0.0.1]:1", True),
    ("", False), ("::1", False), ("[::1", False), ("[::1]x", False), ("[::1]:", False), ("localhost:", False),
    ("localhost:abc", False), ("localhost:123456", False), ("evil.localhost", False), ("127.0.0.1.evil", False),
    ("10.0.0.1", False), ("[2001:db8::1]", False), ("0.0.0.0", False), ("127.1", False), ("lоcalhost", False),
])
def test_host_is_loopback(host, ok):
    assert host_is_loopback(host) is ok


@pytest.mark.parametrize("origin,ok", [
    ("http://localhost:3000", True), ("https://127.0.0.1", True), ("http://[::1]:9", True),
    ("null", False), ("", False), ("http://localhost/", False), ("ftp://localhost", False),
    ("http://a@localhost", False), ("http://[::1", False), ("http://evil.example", False),
    ("http://localhost:3000?x", False), ("//localhost", False),
])
def test_origin_is_loopback(origin, ok):
    assert origin_is_loopback(origin) is ok


@pytest.mark.parametrize("given", ["", "x", "\u00e9" * 10, "\udcff", "a" * 1_000_000, "\x00", None])
def test_tokens_equal_never_raises(given):
    assert tokens_equal(given, "secret-token") is False


def test_tokens_equal_matches_and_empty_config_never_matches():
    assert tokens_equal("secret-token", "secret-token")
    assert not tokens_equal("", "")
    assert not tokens_equal("anything", "")


@pytest.mark.parametrize("given", ["", "x", "\u00e9" * 10, "\udcff", "a" * 1_000_000, "\x00", None])
def test_digest_matches_never_raises(given):
    assert digest_matches(given, token_digest("secret-token")) is False


def test_digest_matches_the_sent_bytes_and_no_digest_never_matches():
    assert digest_matches("secret-token", token_digest("secret-token"))
    # ASGI gives header bytes latin-1 decoded: the data plane compares the bytes that were sent
    assert digest_matches("\u00c3\u00a9", token_digest("\u00c3\u00a9")) and token_digest("\u00c3\u00a9") != token_digest("\u00e9")
    assert not digest_matches("secret-token", None) and not digest_matches("secret-token", b"")


@pytest.mark.parametrize("proxies,status", [
    ([], "PASS"), (["10.0.0.0/24"], "PASS"), (["127.0.0.1/32"], "PASS"),
    (["0.0.0.0/0"], "FAIL"), (["::/0"], "FAIL"), (["10.0.0.0/24", "0.0.0.0/0"], "FAIL"),
    (["10.0.0.0/8"], "WARN"), (["8.8.8.0/24"], "WARN"),
])
def test_doctor_trusted_proxies(risoluto_settings, proxies, status):
    from risoluto.kernel import Kernel
    from risoluto.plugins.http import client_address

    kernel = Kernel(risoluto_settings(env={"RISOLUTO_TRUSTED_PROXIES": ",".join(proxies)}))
    (result,) = client_address.risoluto_doctor_checks(kernel)
    assert result.status == status, result
