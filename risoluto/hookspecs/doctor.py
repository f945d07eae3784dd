"""Hardening checks: configuration checks and live probes."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import attrs

from . import hookspec

if TYPE_CHECKING:
    from ..kernel import Kernel

PASS, WARN, FAIL = "PASS", "WARN", "FAIL"


@attrs.frozen(kw_only=True)
class CheckResult:
    item: str
    status: str  # PASS | WARN | FAIL
    reason: str
    fix: str = ""

    def to_dict(self) -> dict[str, Any]:
        return attrs.asdict(self)


@hookspec
def risoluto_doctor_checks(kernel: Kernel) -> list[CheckResult]:
    """Evaluate your checklist items against the live configuration and host.

    Called by ``risoluto doctor`` and ``GET /api/v1/hardening``; collected. Must be
    quick and must not raise (report FAIL with the reason instead).

    Example::

        @hookimpl
        def risoluto_doctor_checks(kernel):
            ok = kernel.settings.codex.sandbox.security.drop_capabilities
            return [CheckResult(item="capabilities", status=PASS if ok else FAIL,
                                reason="...", fix="set dropCapabilities: true")]
    """


@attrs.frozen(kw_only=True)
class Probe:
    """A proof run inside a live canary sandbox by ``risoluto doctor --probe``.

    ``script`` is a POSIX shell snippet run in the canary (as the sandbox user, under the
    live policy); its output (stdout and stderr) and exit status go to ``judge``, which
    returns the result. Snippets run one after another in one canary; each gets a fresh
    ``sh -c``. The canary image must have a POSIX shell (the test and worker images do).
    """

    item: str
    script: str
    judge: Any  # Callable[[str, int], CheckResult]
    # Optional async context manager factory ``context(kernel)`` entered around the canary run:
    # it starts host-side targets (listeners the canary must NOT reach) and yields a dict of
    # environment entries the script can read (addresses, ports).
    context: Any = None


@hookspec
def risoluto_doctor_probes(kernel: Kernel) -> list[Probe]:
    """Contribute probes that prove your checklist item from inside a canary sandbox.

    Called by ``risoluto doctor --probe``; collected.

    Example::

        @hookimpl
        def risoluto_doctor_probes(kernel):
            return [Probe(item="capabilities", script="grep CapEff /proc/self/status",
                          judge=lambda out, rc: CheckResult(item="capabilities",
                              status=PASS if out.split()[-1] == "0000000000000000" else FAIL,
                              reason=out.strip()))]
    """


@hookspec
def risoluto_checklist_provides(kernel: Kernel) -> list[str]:
    """Declare the checklist items your plugin provides (names as ``risoluto doctor`` shows them
    after ``checklist:``, e.g. ``"write guard"``, ``"cap drop"``).

    Called when the kernel is built and by the doctor; collected per plugin. Every item must have a
    loaded provider: a default plugin may be disabled (``plugins.disable``,
    ``RISOLUTO_DISABLE_PLUGINS``) only when a loaded replacement declares its items, otherwise the
    kernel refuses to start naming the plugin and the item. Declare an item only if your plugin
    enforces it; ``kernel.settings`` may decide (``data_plane.server`` declares the guards only in
    the data-plane role). The list of items is in docs/plugins.md ("Checklist items").

    Example::

        @hookimpl
        def risoluto_checklist_provides(kernel):
            return ["write guard"]
    """
