"""``risoluto doctor --probe`` for the egress allowlist: every bypass class tried from the canary.

Only with a non-empty ``codex.sandbox.egressAllowlist``. The probe's context starts the
targets the canary must NOT reach, all on this host (nothing is ever sent elsewhere):

- an "outside" stand-in: a network namespace joined to the host by a veth pair, with a TCP
  listener (80) and a DNS responder (UDP 53) on a 198.19.x.y/30 address; the host routes
  there, a worker on a plain bridge would reach it, a worker on the internal network must not
  (needs root and ``ip``; otherwise those parts are WARN "not proven");
- host services: a TCP listener and a UDP responder on the egress gateway (another port
  than the proxy) and on another address of this host.

The canary then asks the proxy for an unlisted name and an IP literal (403 with the proxy's
reason expected), connects directly to the outside stand-in, sends DNS to it and to its own
resolver, and connects to the host services. Any answer, and any packet a target sees, is a FAIL.
"""

from __future__ import annotations

import secrets
from typing import TYPE_CHECKING, Callable

from risoluto.doctor import seen
from risoluto.hookspecs import hookimpl
from risoluto.hookspecs.doctor import FAIL, PASS, WARN, CheckResult, Probe

from ._probe_targets import Targets, make_context
from ._hosts import Allowlist, normalise_host

if TYPE_CHECKING:
    from risoluto.kernel import Kernel

DEFAULT_ENFORCER = "docker-proxy"
UNLISTED_CANDIDATES = ("localhost", "risoluto-probe-unlisted.invalid")  # resolve locally if ever let through

# Run in the canary as ``python3 -c "$RISOLUTO_PROBE_NET" kind:host:port ...``: every attempt in
# parallel (3 s each), one ``kind:host:port=result`` line per target.
NET_PY = r"""
import errno, os, socket, struct, sys, threading
name = os.environ.get("RISOLUTO_PROBE_NAME", "probe.invalid")
question = b"".join(bytes([len(p)]) + p.encode() for p in name.split(".")) + b"\0\0\1\0\1"
out = {}
def attempt(target):
    kind, rest = target.split(":", 1)
    host, port = rest.rsplit(":", 1)
    s = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET,
                      socket.SOCK_STREAM if kind == "tcp" else socket.SOCK_DGRAM)
    s.settimeout(3)
    try:
        if kind == "tcp":
            s.connect((host, int(port)))
            return "connected"
        s.sendto(os.urandom(2) + bytes.fromhex("01000001000000000000") + question, (host, int(port)))
        data = s.recv(512)
        return "answered rcode=%d answers=%d" % (data[3] & 15, struct.unpack("!H", data[6:8])[0])
    except socket.timeout:
        return "timeout"
    except OSError as e:
        return "error " + errno.errorcode.get(e.errno or 0, str(e.errno))
    finally:
        s.close()
def run(t):
    out[t] = attempt(t)
threads = [threading.Thread(target=run, args=(t,)) for t in sys.argv[1:]]
[t.start() for t in threads]
[t.join() for t in threads]
for t in sys.argv[1:]:
    print("%s=%s" % (t, out[t]))
"""
# Shell side: python3 if the image has it, else curl for TCP; otherwise "untested".
NET_SH = (
    "net() { if command -v python3 >/dev/null 2>&1; then python3 -c \"$RISOLUTO_PROBE_NET\" \"$@\"; "
    "else for t in \"$@\"; do case $t in tcp:*) if command -v curl >/dev/null 2>&1; then "
    "curl -s -o /dev/null --noproxy '*' --connect-timeout 3 -m 4 \"http://${t#tcp:}/\"; r=$?; "
    "if [ $r = 7 ] || [ $r = 28 ]; then echo \"$t=blocked curl $r\"; else echo \"$t=connected curl $r\"; fi; "
    "else echo \"$t=untested\"; fi;; *) echo \"$t=untested\";; esac; done; fi; }; "
)
PROXY_SH = (
    "if ! command -v curl >/dev/null 2>&1; then echo curl=missing; exit 0; fi; "
    "if [ -z \"$HTTPS_PROXY\" ]; then echo proxy=none; exit 0; fi; "
    "out=$(NO_PROXY= no_proxy= curl -sv -o /dev/null --connect-timeout 3 -m 6 --proxy \"$HTTPS_PROXY\" "
    "\"https://$TARGET/\" 2>&1); echo \"curl=$?\"; printf '%s\\n' \"$out\" | sed -n "
    "'s/^< HTTP\\/[0-9.]* \\([0-9]*\\).*/status=\\1/p; s/^< [Xx]-[Rr]isoluto-[Ee]gress: *\\([a-z_]*\\).*/reason=\\1/p'"
)


# --- judges ----------------------------------------------------------------------------------------
def _lines(out: str) -> dict[str, str]:
    found: dict[str, str] = {}
    for line in out.splitlines():
        key, sep, value = line.partition("=")
        if sep:
            found.setdefault(key.strip(), value.strip())
    return found


def _result(item: str, status: str, reason: str, fix: str = "") -> CheckResult:
    return CheckResult(item=f"{item} (probe)", status=status, reason=reason, fix=fix if status != PASS else "")


def proxy_judge(item: str, expected: str, targets: Targets, what: str) -> Callable[[str, int], CheckResult]:
    fix = "check the egress enforcer and risoluto_egress_decision plugins: the proxy must refuse it"

    def judge(out: str, rc: int) -> CheckResult:
        got = _lines(out)
        if got.get("curl") == "missing":
            return _result(item, WARN, "not proven: the canary image has no curl", "use a worker image with curl")
        if got.get("proxy") == "none":
            if targets.enforcer and targets.enforcer != DEFAULT_ENFORCER:
                return _result(item, WARN, f"not proven: enforcer {targets.enforcer} gives workers no HTTPS_PROXY",
                               "that enforcer's plugin should ship its own probe")
            return _result(item, FAIL, "the canary has no HTTPS_PROXY: no egress enforcer attached to it", fix)
        status, reason = got.get("status", "none"), got.get("reason", "none")
        if status == "403" and reason == expected:
            return _result(item, PASS, f"the proxy refused {what} with 403 {reason}")
        return _result(item, FAIL, f"the proxy did not refuse {what} as expected (403 {expected}): it answered "
                       f"{status} {reason} (curl exit {got.get('curl', '?')})", fix)

    return judge


def _net_verdicts(out: str, keys: list[str], resolvers: bool = False) -> tuple[list[str], list[str]]:
    """(reached, untested) among ``keys``; a resolver's SERVFAIL/REFUSED without answers counts as blocked."""
    got = _lines(out)
    reached, untested = [], []
    for key in keys:
        value = got.get(key)
        if value is None or value == "untested":
            untested.append(key)
        elif value.startswith("connected") or value.startswith("answered"):
            parts = dict(p.split("=") for p in value.split()[1:] if "=" in p)
            if resolvers and parts.get("rcode") in ("2", "5") and parts.get("answers") == "0":
                continue  # the worker's resolver has nowhere to forward to
            reached.append(f"{key} {value}")
    return reached, untested


def network_judge(item: str, targets: Targets, plan: Callable[[str], tuple[list[str], list[str]]],
                  group: str, fix: str) -> Callable[[str, int], CheckResult]:
    """``plan(out)`` -> (target keys, resolver keys) the snippet tried; ``group`` names the hits to count."""
    needs_outside = group.startswith("outside")

    def judge(out: str, rc: int) -> CheckResult:
        keys, resolvers = plan(out)
        reached, untested = _net_verdicts(out, keys)
        more, untested_r = _net_verdicts(out, resolvers, resolvers=True)
        hits = list(targets.hits[group])
        if reached or more or hits:
            return _result(item, FAIL, "reached from the canary: " + "; ".join(reached + more + hits)[:300], fix)
        if not keys and not resolvers:
            why = targets.outside_why if needs_outside else "no host address to listen on"
            return _result(item, WARN, f"not proven: {why or seen(out)}",
                           "run `risoluto doctor --probe` as root with iproute2")
        if untested or untested_r or rc != 0:
            return _result(item, WARN, f"not proven: the canary could not try {', '.join(untested + untested_r)} "
                           f"(exit {rc}; {seen(out)})", "use a worker image with python3 or curl")
        tried = ", ".join(keys + resolvers)
        if needs_outside and not targets.outside:
            return _result(item, WARN, f"not proven in full: no answer from {tried}, but {targets.outside_why}",
                           "run `risoluto doctor --probe` as root with iproute2")
        return _result(item, PASS, f"no answer from {tried}, and the targets saw nothing")

    return judge


# --- the probes ------------------------------------------------------------------------------------
def _tried(out: str) -> tuple[list[str], list[str]]:
    return [k for k in _lines(out) if k.startswith(("tcp:", "udp:"))], []


def unlisted_name(allowlist: Allowlist) -> str:
    for name in UNLISTED_CANDIDATES:
        if not allowlist.match(normalise_host(name), 443).allowed:
            return name
    return f"risoluto-probe-{secrets.token_hex(4)}.invalid"


@hookimpl
def risoluto_doctor_probes(kernel: Kernel) -> list[Probe]:
    entries = kernel.settings.codex.sandbox.egress_allowlist
    if not entries:
        return []  # unrestricted egress is the published default; the check WARNs
    try:
        allowlist = Allowlist(entries)
    except Exception:
        return []  # an invalid allowlist refuses launches; the check FAILs
    targets = Targets()
    name = unlisted_name(allowlist)
    fix_net = "keep workers on the internal egress network only (egress.network) and the host firewall in place"
    outside = "o=$RISOLUTO_PROBE_OUTSIDE; "
    return [
        Probe(item="egress unlisted name (probe)", context=make_context(targets, {"RISOLUTO_PROBE_NET": NET_PY}),
              script=f"TARGET={name}; {PROXY_SH}",
              judge=proxy_judge("egress unlisted name", "host_not_allowed", targets, f"the unlisted name {name}")),
        Probe(item="egress IP literal (probe)", script=f"TARGET=$RISOLUTO_PROBE_LITERAL; {PROXY_SH}",
              judge=proxy_judge("egress IP literal", "ip_literal_not_allowed", targets, "an unlisted IP literal")),
        Probe(item="egress direct TCP (probe)",
              script=NET_SH + outside + 'if [ -n "$o" ]; then net "tcp:$o:80"; else echo outside=none; fi',
              judge=network_judge("egress direct TCP", targets, _tried, "outside-tcp", fix_net)),
        Probe(item="egress DNS (probe)",
              script=NET_SH + outside + "ns=$(awk '/^nameserver/ {print \"udp:\" $2 \":53\"}' /etc/resolv.conf); "
                     'if [ -n "$o" ]; then net "udp:$o:53" $ns; else net $ns; fi',
              judge=network_judge("egress DNS", targets, _tried_dns(targets), "outside-udp", fix_net)),
        Probe(item="egress host services (probe)",
              script=NET_SH + 'set --; for h in $RISOLUTO_PROBE_HOSTS; do set -- "$@" "tcp:$h" "udp:$h"; done; '
                     'if [ $# -gt 0 ]; then net "$@"; else echo hosts=none; fi',
              judge=network_judge("egress host services", targets, _tried, "hosts",
                                  "run the kernel as root so it installs the host firewall (docs/egress.md)")),
    ]


def _tried_dns(targets: Targets) -> Callable[[str], tuple[list[str], list[str]]]:
    """The outside stand-in's DNS is a target; every other :53 is the worker's own resolver."""

    def plan(out: str) -> tuple[list[str], list[str]]:
        keys = [k for k in _lines(out) if k.startswith("udp:")]
        mine = [k for k in keys if targets.outside and k == f"udp:{targets.outside}:53"]
        return mine, [k for k in keys if k not in mine]

    return plan
