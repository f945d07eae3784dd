"""``GET/PUT /api/v1/config/overlay``: the runtime config overlay, validated before it is saved.

The overlay may not hold deploy-time keys (400 ``overlay_key_not_allowed``) and may only tighten
the posture (403 ``overlay_loosens_policy``): see :mod:`risoluto.posture`. What it may hold
applies at once; nothing it holds waits for a restart.
"""

from __future__ import annotations

import json
import logging
from typing import TYPE_CHECKING, Any

import anyio
import yaml
from quart import Blueprint, g

from .errors import ApiError, ConfigError
from .fsutil import LineAppend, atomic_write, is_full
from .openapi import api
from .requests import json_object
from .shielded import to_the_end
from .posture import OverlayRefused
from .settings import Settings, load_yaml, with_overlay, without_overrides

log = logging.getLogger("risoluto.overlay")

if TYPE_CHECKING:
    from .kernel import Kernel

OVERLAY_SCHEMA = {"type": "object", "required": ["overlay"], "properties": {"overlay": {"type": "object"}}}
PUT_SCHEMA = OVERLAY_SCHEMA


def validate_overlay(kernel: Kernel, overlay: dict[str, Any]) -> Settings:
    """The settings ``overlay`` gives, checked by the startup code twice: with today's environment,
    and without the variables that override settings, so that a later ``risoluto serve`` started
    without them starts too. Raises OverlayRefused or ConfigError naming the key path."""
    new = with_overlay(overlay, kernel.environ)
    kernel.hooks.settings_validate(new)
    kernel.hooks.settings_validate(with_overlay(overlay, without_overrides(kernel.environ)))
    return new


def overlay_blueprint(kernel: Kernel) -> Blueprint:
    bp = Blueprint("risoluto_overlay", __name__)
    lock = anyio.Lock()

    @bp.get("/api/v1/config/overlay")
    @api("The saved config overlay", tags=("config",), responses={200: OVERLAY_SCHEMA})
    async def get_overlay() -> Any:
        path = kernel.settings.overlay_path
        # parsed in a thread: a large overlay (a long egressAllowlist) takes the YAML parser a second
        data = await anyio.to_thread.run_sync(lambda: load_yaml(path, "overlay") if path.exists() else {})
        return {"overlay": data}

    @bp.put("/api/v1/config/overlay")
    @api("Replace the config overlay, validated by the startup code and applied at once: a deploy-time key is 400 "
         "`overlay_key_not_allowed`, a looser posture 403 `overlay_loosens_policy` (docs/configuration.md)",
         tags=("config",),
         request={"type": "object"},
         responses={200: PUT_SCHEMA})
    async def put_overlay() -> Any:
        body = await json_object()
        overlay = body.get("overlay", body) if set(body) == {"overlay"} else body
        if not isinstance(overlay, dict):
            raise ApiError(400, "invalid_config", "The overlay must be a JSON object.")
        async with lock:
            try:
                new = validate_overlay(kernel, overlay)
            except OverlayRefused as exc:
                raise ApiError(exc.status, exc.code, f"Overlay rejected: {exc}") from None
            except ConfigError as exc:
                raise ApiError(400, "invalid_config", f"Overlay rejected: {exc}") from None
            path = kernel.settings.overlay_path
            info = g.get("info")
            entry = {
                "at": _now(), "operation": "overlay_put", "keys": sorted(overlay),
                "principal": getattr(info, "principal", ""), "remote": getattr(info, "client", ""),
                "request_id": getattr(info, "request_id", ""),
            }

            def audit_and_save() -> None:  # in a thread: dumping a large overlay takes YAML a while
                # the audit line first, taken back if the save fails: never an overlay without its line
                pending = LineAppend(path.parent / "overlay.audit.log", json.dumps(entry))
                try:
                    atomic_write(path, yaml.safe_dump(overlay, sort_keys=True, allow_unicode=True).encode("utf-8"))
                except BaseException:
                    pending.take_back()
                    raise
                pending.keep()

            async def audit_save_apply() -> None:
                try:
                    await anyio.to_thread.run_sync(audit_and_save)
                except OSError as exc:  # nothing saved, nothing applied
                    raise _not_saved(exc) from None
                kernel.apply_settings(new)
                try:
                    await kernel.start_new_services()
                except Exception:  # what it would enforce fails closed (e.g. launches refused, 503)
                    log.exception("a service the new overlay calls for failed to start")

            await to_the_end(audit_save_apply())  # all of it even if the client leaves half-way
        return {"overlay": overlay}

    return bp


def _not_saved(exc: OSError) -> ApiError:
    if is_full(exc):
        return ApiError(507, "insufficient_storage",
                        "The disk holding DATA_DIR is full; the overlay was not saved. Free space there and retry.")
    return ApiError(503, "overlay_unavailable", f"The overlay or its audit line could not be written "
                    f"({exc.strerror or exc}); nothing was changed. Run `risoluto doctor`.")


def _now() -> str:
    from datetime import datetime, timezone

    return datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")
