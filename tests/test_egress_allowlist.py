"""Allowlist grammar and matching (docs/egress.md), and the doctor's egress-mode item."""

from __future__ import annotations

import ipaddress

import pytest

from risoluto.errors import ConfigError
from risoluto.hookspecs.doctor import FAIL, PASS, WARN
from risoluto.kernel import Kernel
from risoluto.plugins.egress._hosts import Allowlist, HostError, normalise_host, parse_entry
from risoluto.settings import build_settings


@pytest.mark.parametrize("entry, host, wildcard, port", [
    ("example.test", "example.test", False, None),
    ("EXAMPLE.Test.", "example.test", False, None),
    ("*.example.test", "example.test", True, None),
    ("*.Example.TEST.:8443", "example.test", True, 8443),
    ("bücher.example", "xn--bcher-kva.example", False, None),
    ("xn--bcher-kva.example", "xn--bcher-kva.example", False, None),
    ("203.0.113.7", ipaddress.ip_address("203.0.113.7"), False, None),
    ("203.0.113.7:22", ipaddress.ip_address("203.0.113.7"), False, 22),
    ("[2001:db8::7]", ipaddress.ip_address("2001:db8::7"), False, None),
    ("[2001:DB8::7]:443", ipaddress.ip_address("2001:db8::7"), False, 443),
])
def test_valid_entries(entry, host, wildcard, port):
    rule = parse_entry(entry)
    assert (rule.host, rule.wildcard, rule.port) == (host, wildcard, port)


@pytest.mark.parametrize("entry, why", [
    ("", "not a host name"),
    ("*", "wildcard"),
    ("*.com", "top-level"),
    ("a.*.example.test", "wildcard"),
    ("*.203.0.113.7", "IP address"),
    ("2001:db8::7", "brackets"),
    ("[2001:db8::zz]", "IPv6"),
    ("example.test:0", "port"),
    ("example.test:65536", "port"),
    ("example.test:http", "port"),
    ("exa mple.com", "label"),
    ("-bad.example.test", "label"),
    ("a..example.test", "IDNA"),
    ("127.1", "IPv4"),
    ("0x7f.0.0.1", "IPv4"),
    ("2130706433", "IPv4"),
    ("user@example.test", "label"),
    ("a" * 64 + ".example.test", "IDNA"),
])
def test_invalid_entries_name_the_entry(entry, why):
    with pytest.raises(ConfigError) as err:
        parse_entry(entry)
    assert repr(entry) in str(err.value) or entry == ""
    assert why.lower() in str(err.value).lower()


def test_matching_rules():
    allow = Allowlist(["example.test", "*.wild.example", "git.example.test:22", "203.0.113.7", "[2001:db8::7]:8443"])
    assert allow.match("example.test", 443).allowed
    assert allow.match("example.test", 80).allowed
    assert allow.match("example.test", 8080).reason == "port_not_allowed"
    assert allow.match("www.example.test", 443).reason == "host_not_allowed"  # exact means exact
    assert allow.match("a.wild.example", 443).allowed
    assert allow.match("a.b.wild.example", 80).allowed
    assert allow.match("wild.example", 443).reason == "host_not_allowed"  # subdomains only
    assert allow.match("evilwild.example", 443).reason == "host_not_allowed"
    assert allow.match("git.example.test", 22).allowed
    assert allow.match("git.example.test", 443).reason == "port_not_allowed"  # explicit port replaces defaults
    assert allow.match(ipaddress.ip_address("203.0.113.7"), 443).allowed
    assert allow.match(ipaddress.ip_address("203.0.113.8"), 443).reason == "ip_literal_not_allowed"
    assert allow.match(ipaddress.ip_address("2001:db8::7"), 8443).allowed
    assert allow.match(ipaddress.ip_address("2001:db8::7"), 443).reason == "port_not_allowed"


def test_requested_hosts_are_normalised_like_entries():
    assert normalise_host("ExAmPle.TEST.") == "example.test"
    assert normalise_host("Bücher.example") == "xn--bcher-kva.example"
    assert normalise_host("[::1]") == ipaddress.ip_address("::1")
    for bad in ("::1", "127.1", "0x7f000001", "exa_mple..com", "a/b.com", ""):
        with pytest.raises(HostError):
            normalise_host(bad)
    # a name is never matched by an IP rule, nor an IP by a name rule
    allow = Allowlist(["127.0.0.1", "localhost"])
    assert not allow.match("127.0.0.1", 80).allowed
    assert allow.match(normalise_host("127.0.0.1"), 80).allowed


def _check(tmp_path, allowlist):
    settings = build_settings({"codex": {"sandbox": {"egressAllowlist": allowlist}}}, None,
                              {"DATA_DIR": str(tmp_path)})
    from risoluto.plugins.egress import allowlist as plugin

    (result,) = plugin.risoluto_doctor_checks(Kernel(settings))
    return result


def test_doctor_reports_egress_mode(tmp_path):
    empty = _check(tmp_path, [])
    assert empty.status == WARN and "unrestricted" in empty.reason
    assert _check(tmp_path, ["example.test"]).status == PASS
    # an invalid entry is a startup error naming it (the kernel is never built with it)
    with pytest.raises(ConfigError, match=r"codex\.sandbox\.egressAllowlist: .*'\*\.com'"):
        _check(tmp_path, ["example.test", "*.com"])
    # and the check itself still fails closed on one (e.g. settings swapped in by a plugin)
    kernel = Kernel(build_settings({}, None, {"DATA_DIR": str(tmp_path)}))
    kernel.settings = build_settings({"codex": {"sandbox": {"egressAllowlist": ["*.com"]}}}, None,
                                     {"DATA_DIR": str(tmp_path)})
    from risoluto.plugins.egress import allowlist as plugin

    (bad,) = plugin.risoluto_doctor_checks(kernel)
    assert bad.status == FAIL and "'*.com'" in bad.reason
