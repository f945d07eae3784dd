"""``risoluto doctor`` and ``GET /api/v1/hardening``: every checklist item, PASS / WARN / FAIL.

The kernel knows no item itself: checks and probes come from each plugin's doctor hooks.
"""

from __future__ import annotations

import json
import sys
from typing import TYPE_CHECKING, Any

from quart import Blueprint

from .hookspecs.doctor import FAIL, PASS, WARN, CheckResult
from .openapi import api

if TYPE_CHECKING:
    from .kernel import Kernel

_ORDER = {FAIL: 0, WARN: 1, PASS: 2}
SEEN_LIMIT = 160
CHECK_THREADS = 4  # concurrent GET /api/v1/hardening evaluations; more wait for one of these


def seen(out: str, limit: int = SEEN_LIMIT) -> str:
    """A probe's output on one short line, to quote in a CheckResult's reason."""
    text = " | ".join(line.strip() for line in out.strip().splitlines() if line.strip())
    return (text[:limit] + "...") if len(text) > limit else (text or "no output")
_COLOURS = {PASS: "\033[32m", WARN: "\033[33m", FAIL: "\033[31m"}


def run_checks(kernel: Kernel) -> list[CheckResult]:
    """Every plugin's checks (see :meth:`risoluto.hooks.Hooks.doctor_checks`), one line per checklist
    item naming its provider, and a WARN per posture setting the overlay loosened."""
    from .checklist import provider_checks
    from .posture import overlay_checks

    return kernel.hooks.doctor_checks(kernel) + provider_checks(kernel) + overlay_checks(kernel)


def summary(results: list[CheckResult]) -> dict[str, Any]:
    counts = {s: sum(1 for r in results if r.status == s) for s in (PASS, WARN, FAIL)}
    overall = FAIL if counts[FAIL] else WARN if counts[WARN] else PASS
    return {"status": overall, "counts": counts, "items": [r.to_dict() for r in results]}


def format_table(results: list[CheckResult], colour: bool) -> str:
    width = max([len(r.item) for r in results] + [4])
    lines = [f"{'STATUS':<6}  {'ITEM':<{width}}  REASON / FIX"]
    for r in sorted(results, key=lambda r: (_ORDER.get(r.status, 0), r.item)):
        status = f"{_COLOURS[r.status]}{r.status:<6}\033[0m" if colour else f"{r.status:<6}"
        lines.append(f"{status}  {r.item:<{width}}  {r.reason}")
        if r.fix and r.status != PASS:
            lines.append(f"{'':<6}  {'':<{width}}  fix: {r.fix}")
    s = summary(results)["counts"]
    lines.append(f"\n{s[PASS]} pass, {s[WARN]} warn, {s[FAIL]} fail")
    return "\n".join(lines)


def config_refused(message: str, as_json: bool) -> int:
    """The doctor's answer when the kernel refuses the configuration itself: one FAIL, exit 1."""
    result = CheckResult(item="configuration", status=FAIL, reason=message,
                         fix="fix the key the message names, then run `risoluto config check`")
    return report([result], as_json)


def report(results: list[CheckResult], as_json: bool) -> int:
    if as_json:
        print(json.dumps(summary(results), indent=2))
    else:
        print(format_table(results, colour=sys.stdout.isatty()))
    return 1 if any(r.status == FAIL for r in results) else 0


_STATUS = {"type": "string", "enum": [PASS, WARN, FAIL]}
HARDENING_SCHEMA = {
    "type": "object",
    "required": ["status", "counts", "items"],
    "properties": {
        "status": _STATUS,
        "counts": {"type": "object"},
        "items": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["item", "status", "reason", "fix"],
                "properties": {"item": {"type": "string"}, "status": _STATUS, "reason": {"type": "string"},
                               "fix": {"type": "string"}},
            },
        },
    },
}


def doctor_blueprint(kernel: Kernel) -> Blueprint:
    bp = Blueprint("risoluto_doctor", __name__)

    checks_limiter: list[Any] = []

    @bp.get("/api/v1/hardening")
    @api("Every checklist item evaluated: PASS / WARN / FAIL", tags=("doctor",), responses={200: HARDENING_SCHEMA})
    async def hardening() -> Any:
        import anyio

        # threads of its own: checks that wait on a slow Docker engine (each bounded by
        # sandbox.engineTimeoutSeconds) never take anyio's shared threads from other routes
        if not checks_limiter:
            checks_limiter.append(anyio.CapacityLimiter(CHECK_THREADS))
        results = await anyio.to_thread.run_sync(run_checks, kernel, limiter=checks_limiter[0])
        return summary(results)

    return bp


PROBE_ISSUE = "risoluto-doctor-probe"
_MARK = "::risoluto-probe"


def _canary_script(count: int) -> str:
    """Run each probe's snippet (passed as env RISOLUTO_PROBE_<i>) and fence its output."""
    return (
        f'i=0; while [ "$i" -lt {count} ]; do '
        f'eval "snippet=\\$RISOLUTO_PROBE_$i"; echo "{_MARK}-begin $i"; sh -c "$snippet" 2>&1; '
        f'echo "{_MARK}-end $i $?"; i=$((i+1)); done'
    )


def _split_output(text: str, count: int) -> list[tuple[str, int] | None]:
    found: list[tuple[str, int] | None] = [None] * count
    current, lines = -1, list[str]()
    for line in text.splitlines():
        if line.startswith(f"{_MARK}-begin "):
            current, lines = int(line.split()[1]), []
        elif line.startswith(f"{_MARK}-end ") and current >= 0:
            _, index, rc = line.split()
            if int(index) == current < count:
                found[current] = ("\n".join(lines), int(rc))
            current = -1
        elif current >= 0:
            lines.append(line)
    return found


async def run_probes(kernel: Kernel, timeout_s: float = 180.0) -> list[CheckResult]:
    """Launch one canary sandbox under the live policy and judge every probe from inside it."""
    import contextlib

    from .errors import ApiError
    from .hookspecs.sandbox import LaunchRequest

    probes = kernel.hooks.doctor_probes(kernel)
    if not probes:
        return [CheckResult(item="probe", status=FAIL, reason="no plugin contributes a probe",
                            fix="enable the default sandbox plugins")]
    launch, runtime = kernel.hooks.sandbox_launcher(), kernel.backends.runtime
    if launch is None or runtime is None:
        return [CheckResult(item="probe", status=FAIL, reason="no sandbox runtime or launcher: the canary "
                            "cannot launch", fix="start Docker (see the Docker item), check sandbox.runtime "
                            "and that the sandbox.api plugin is enabled")]
    env: dict[str, str] = {f"RISOLUTO_PROBE_{i}": p.script for i, p in enumerate(probes)}
    broken: dict[int, str] = {}
    async with contextlib.AsyncExitStack() as stack:
        for i, probe in enumerate(probes):
            if probe.context is not None:
                try:
                    env.update(await stack.enter_async_context(probe.context(kernel)))
                except Exception as exc:  # its targets are missing: that probe FAILs, the others still run
                    broken[i] = f"its context failed ({type(exc).__name__}: {exc})"
        request = LaunchRequest(issue=PROBE_ISSUE, command=("sh", "-c", _canary_script(len(probes))),
                                env=env, timeout_s=timeout_s)
        try:
            record = await launch(request, True)
        except ApiError as err:
            return [CheckResult(item="probe", status=FAIL, reason=f"the canary did not run: {err.message}",
                                fix="fix the launch error above, then re-run the probe")]
        try:
            output = await runtime.logs(record["id"])
        finally:
            with contextlib.suppress(Exception):
                await runtime.remove(record["id"])
    results = _judge_all(probes, _split_output(output, len(probes)))
    for i, why in broken.items():
        results[i] = CheckResult(item=probes[i].item, status=FAIL, reason=why[:300],
                                 fix="report this as a bug in the plugin")
    return results


def _judge_all(probes: list[Any], outputs: list[tuple[str, int] | None]) -> list[CheckResult]:
    results = []
    for probe, out in zip(probes, outputs, strict=True):
        if out is None:
            results.append(CheckResult(item=probe.item, status=FAIL, reason="the probe produced no result "
                                       "(the canary stopped early)", fix="re-run; check the canary's logs"))
            continue
        try:
            results.append(probe.judge(*out))
        except Exception as exc:  # a broken judge is a FAIL, never a silent PASS
            results.append(CheckResult(item=probe.item, status=FAIL, reason=f"judge raised {exc!r}",
                                       fix="report this as a bug in the plugin"))
    return results
