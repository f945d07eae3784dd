"""Plugin: ``egress.credentials`` checked at startup and at overlay PUT, and reported by the doctor.

The doctor lists the brokered secrets, and WARNs once per secret that would still reach a
worker raw: every secret in the store that no entry brokers (any launch may name it in
``secrets``), and an ``OPENAI_API_KEY`` in ``codex.authDir/auth.json`` that is not brokered.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

from risoluto.errors import ConfigError
from risoluto.hookspecs import hookimpl
from risoluto.hookspecs.doctor import FAIL, PASS, WARN, CheckResult

from . import _credentials

if TYPE_CHECKING:
    from risoluto.kernel import Kernel
    from risoluto.settings import Settings

ITEM = "egress credentials"


@hookimpl
def risoluto_settings_validate(settings: Settings) -> None:
    _credentials.validate(settings)


def _store_names(kernel: Kernel) -> list[str] | None:
    store = kernel.backends.secrets.store
    if store is None:
        return None
    import anyio

    try:  # the doctor runs in a worker thread of the server's event loop, or on its own in the CLI
        return list(anyio.from_thread.run(store.list))
    except RuntimeError:
        try:
            return list(anyio.run(store.list))
        except Exception:  # noqa: BLE001 - the doctor reports, never raises
            return None
    except Exception:  # noqa: BLE001
        return None


def _auth_key(kernel: Kernel) -> bool:
    from risoluto.plugins.sandbox._naming import auth_dir

    try:
        data = json.loads((auth_dir(kernel.settings) / "auth.json").read_bytes())
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and isinstance(data.get("OPENAI_API_KEY"), str) and bool(data["OPENAI_API_KEY"])


@hookimpl
def risoluto_doctor_checks(kernel: Kernel) -> list[CheckResult]:
    settings = kernel.settings
    try:
        creds = _credentials.validate(settings)
    except ConfigError as exc:
        return [CheckResult(item=ITEM, status=FAIL, reason=str(exc), fix="correct egress.credentials (docs/egress.md)")]
    brokered = {c.secret for c in creds}
    out: list[CheckResult] = []
    if creds:
        listed = "; ".join(f"{c.secret} -> {', '.join(r.entry for r in c.rules)} ({c.header})" for c in creds)
        out.append(CheckResult(item=ITEM, status=PASS, reason=f"brokered (workers get placeholders): {listed}"))
    raw: list[tuple[str, str]] = []
    names = _store_names(kernel)
    for name in sorted(set(names or ()) - brokered):
        raw.append((name, "a launch naming it in `secrets` puts its real value into the worker's environment"))
    if _auth_key(kernel) and "OPENAI_API_KEY" not in brokered:
        raw.append(("OPENAI_API_KEY", "codex.authDir/auth.json carries it into every worker's CODEX_HOME"))
    for name, why in raw:
        out.append(CheckResult(item=f"raw secret {name}", status=WARN, reason=f"{name} is not brokered: {why}",
                               fix=f"broker it with an egress.credentials entry for {name} (docs/egress.md)"))
    return out


