"""``risoluto doctor --probe`` for credential brokering: proven from inside the canary.

Only with ``egress.credentials``. The canary gets a placeholder for every brokered secret (as a
launch naming them would). From inside it shows, for each brokered secret NAME:

- its environment entry is ``risoluto-placeholder-NAME-...``, not the value;
- the real value is nowhere the worker can read: the canary prints its environment, its
  ``/proc/self/environ``, ``CODEX_HOME`` and the CA files, and the judge (in the kernel, which
  holds the values) searches that output; a value is never printed by the judge;
- the placeholder is refused outside its binding: sent in the query of a request to a host of
  its own entry (the proxy must answer 403 ``credential_not_allowed`` and send nothing upstream).
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, AsyncIterator, Callable

from risoluto.hookspecs import hookimpl
from risoluto.hookspecs.doctor import FAIL, PASS, WARN, CheckResult, Probe

from ._credentials import parse

if TYPE_CHECKING:
    from risoluto.kernel import Kernel

ITEM = "egress brokered secrets (probe)"
SCRIPT = r"""
for n in $RISOLUTO_PROBE_BROKERED; do
  v=$(printenv "$n")
  case "$v" in risoluto-placeholder-"$n"-*) echo "env:$n=placeholder";; "") echo "env:$n=missing";; *) echo "env:$n=other";; esac
done
echo '--- what the worker can read'
env; tr '\0' '\n' < /proc/self/environ
cat "$CODEX_HOME"/* /etc/risoluto-ca/*.pem 2>/dev/null | grep -v '^[A-Za-z0-9+/=]*$'
echo '--- refusals'
for t in $RISOLUTO_PROBE_BROKER_TARGETS; do
  n=${t%%@*}; h=${t#*@}; v=$(printenv "$n")
  if ! command -v curl >/dev/null 2>&1; then echo "refuse:$n=nocurl"; continue; fi
  out=$(curl -s -o /dev/null -D - --connect-timeout 5 -m 10 "https://$h/risoluto-probe?k=$v" 2>/dev/null)
  code=$(printf '%s\n' "$out" | sed -n 's/^HTTP\/[0-9.]* \([0-9]*\).*/\1/p' | tail -n 1)  # after the CONNECT's 200
  why=$(printf '%s\n' "$out" | sed -n 's/^[Xx]-[Rr]isoluto-[Ee]gress: *\([a-z_]*\).*/\1/p')
  echo "refuse:$n=${code:-none} ${why:-none}"
done
"""


def _targets(kernel: Kernel) -> dict[str, str]:
    """One bound host:port per brokered secret (an entry's first non-wildcard host)."""
    out: dict[str, str] = {}
    for cred in parse(kernel.settings.egress.credentials):
        for rule in cred.rules:
            if not rule.wildcard and cred.secret not in out:
                host = f"[{rule.host}]" if ":" in str(rule.host) else str(rule.host)
                out[cred.secret] = f"{host}:{rule.port or 443}"
    return out


def _lines(out: str) -> dict[str, str]:
    found: dict[str, str] = {}
    for line in out.splitlines():
        key, sep, value = line.partition("=")
        if sep and key.startswith(("env:", "refuse:")):
            found.setdefault(key, value.strip())
    return found


def judge_for(names: list[str], targets: dict[str, str], values: dict[str, str | None]) -> Callable[[str, int], CheckResult]:
    def judge(out: str, rc: int) -> CheckResult:
        got = _lines(out)
        bad = [f"{n}: environment entry is {got.get(f'env:{n}', 'absent')}, not a placeholder" for n in names
               if got.get(f"env:{n}") != "placeholder"]
        bad += [f"the real value of {n} is readable inside the worker" for n, v in values.items()
                if v and len(v) >= 4 and v in out]
        for name, target in targets.items():
            result = got.get(f"refuse:{name}", "none")
            if result != "403 credential_not_allowed":
                bad.append(f"{name}'s placeholder in a URL to {target} was answered {result}, "
                           "not 403 credential_not_allowed")
        if bad:
            return CheckResult(item=ITEM, status=FAIL, reason="; ".join(bad)[:400],
                               fix="check the egress broker (docs/egress.md, credential brokering)")
        unproven = [n for n in names if n not in targets] + [n for n in names if values.get(n) is None]
        if unproven:
            return CheckResult(item=ITEM, status=WARN,
                               reason=f"placeholders in place, but not proven in full for {', '.join(sorted(set(unproven)))} "
                                      "(secret store locked or missing the secret, or only wildcard hosts to try)",
                               fix="unlock the secret store / store the secret, then re-run the probe")
        return CheckResult(item=ITEM, status=PASS,
                           reason=f"{', '.join(names)}: placeholders only; no real value readable in the worker; "
                                  "each refused (403 credential_not_allowed) in a URL to its own host")

    return judge


@hookimpl
def risoluto_doctor_probes(kernel: Kernel) -> list[Probe]:
    creds = kernel.settings.egress.credentials
    if not creds or not kernel.settings.codex.sandbox.egress_allowlist:
        return []
    try:
        targets = _targets(kernel)
    except Exception:  # an invalid entry: the check FAILs, startup refuses it
        return []
    names = sorted({c.secret for c in creds})
    values: dict[str, str | None] = {}

    @contextlib.asynccontextmanager
    async def context(kernel: Kernel) -> AsyncIterator[dict[str, str]]:
        store = kernel.backends.secrets.store
        for name in names:  # held in the kernel's memory only, to search the canary's output
            values[name] = await store.get(name) if store is not None else None
        yield {"RISOLUTO_PROBE_BROKERED": " ".join(names),
               "RISOLUTO_PROBE_BROKER_TARGETS": " ".join(f"{n}@{t}" for n, t in targets.items())}

    return [Probe(item=ITEM, script=SCRIPT, judge=judge_for(names, targets, values), context=context)]
