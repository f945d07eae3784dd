"""Checklist item "master key": the doctor checks of the credential-encryption item (where the
key comes from is the kernel's ``risoluto.keys``)."""

from __future__ import annotations

import os
import stat
from typing import TYPE_CHECKING

from risoluto.hookspecs import hookimpl
from risoluto.hookspecs.doctor import FAIL, PASS, WARN, CheckResult
from risoluto.errors import StartupError
from risoluto.keys import BUILTIN_BACKENDS, key_path, pending_path, resolve_master_key

if TYPE_CHECKING:
    from risoluto.kernel import Kernel
    from risoluto.settings import Settings


@hookimpl
def risoluto_doctor_checks(kernel: Kernel) -> list[CheckResult]:
    return [_key_check(kernel), _modes_check(kernel.settings), _backend_check(kernel)]


def _key_check(kernel: Kernel) -> CheckResult:
    item = "credential encryption: master key"
    settings = kernel.settings
    try:
        mk = resolve_master_key(settings)
    except StartupError as exc:
        return CheckResult(item=item, status=FAIL, reason=str(exc),
                           fix="fix the key: one line of printable text, in MASTER_KEY or a non-empty 0600 key file")
    if mk is None:
        return CheckResult(
            item=item, status=WARN, reason="no master key: secrets are locked and secret routes answer 503",
            fix=f"set MASTER_KEY, or create {key_path(settings)} with mode 0600",
        )
    if pending_path(settings).exists():
        return CheckResult(
            item=item, status=WARN, reason=f"{pending_path(settings)} is left over from an interrupted rotation",
            fix="if the store opens with the current key, delete it; else start once to finish the rotation",
        )
    return CheckResult(item=item, status=PASS, reason=f"master key from {mk.source}")


def _modes_check(settings: Settings) -> CheckResult:
    item = "credential encryption: file modes"
    root = settings.data_path
    try:
        st = os.stat(root)
    except FileNotFoundError:
        return CheckResult(item=item, status=PASS, reason=f"{root} does not exist yet (created 0700)")
    bad = [f"{root} ({stat.S_IMODE(st.st_mode):04o})"] if st.st_mode & 0o077 else []
    for entry in sorted(os.scandir(root), key=lambda e: e.name):
        try:
            mode = entry.stat(follow_symlinks=False).st_mode
        except OSError:
            continue
        if (stat.S_ISREG(mode) or stat.S_ISDIR(mode)) and mode & 0o077:
            bad.append(f"{entry.name} ({stat.S_IMODE(mode):04o})")
    if bad:
        return CheckResult(item=item, status=FAIL, reason=f"readable by group/others: {', '.join(bad[:8])}",
                           fix=f"chmod 700 {root} and chmod 600 the files in it (umask 077)")
    return CheckResult(item=item, status=PASS, reason=f"{root} is 0700 and its files are private")


def _backend_check(kernel: Kernel) -> CheckResult:
    item = "credential encryption: backend"
    backend = kernel.settings.secrets.backend
    if backend in BUILTIN_BACKENDS:
        where = "secrets.enc" if backend == "file" else "risoluto.db table encrypted_secrets"
        return CheckResult(item=item, status=PASS, reason=f"{backend} backend ({where})")
    if kernel.backends.secrets.store is not None:
        return CheckResult(item=item, status=PASS, reason=f"{backend} backend (provided by a plugin)")
    try:
        mk = resolve_master_key(kernel.settings)
    except StartupError:
        mk = None
    if mk is None:
        return CheckResult(item=item, status=WARN, reason=f"backend {backend!r} cannot be checked without a key",
                           fix="configure a master key")
    if kernel.hooks.secret_store(kernel.settings, mk.value) is None:  # building a store does no I/O
        return CheckResult(item=item, status=FAIL, reason=f"unknown secrets.backend {backend!r}",
                           fix="use file or sqlite, or install the plugin that provides it")
    return CheckResult(item=item, status=PASS, reason=f"{backend} backend (provided by a plugin)")


@hookimpl
def risoluto_checklist_provides() -> list[str]:
    return ["master key"]
