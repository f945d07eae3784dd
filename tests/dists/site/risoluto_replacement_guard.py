"""A replacement write guard, as a third party would ship it: every write must come from this
machine (a loopback client not behind a proxy); webhook routes keep their own HMAC check.

It declares the checklist item ``write guard``, so an operator may disable the default
``http.write_guard`` and run this one instead.
"""

from __future__ import annotations

import ipaddress

from risoluto import hookimpl
from risoluto.errors import ApiError


@hookimpl
def risoluto_checklist_provides():
    return ["write guard"]


@hookimpl
def risoluto_request_authorize(info):
    if not info.mutating or (info.route or "").startswith("/webhooks/"):
        return None
    try:
        local = ipaddress.ip_address(info.client).is_loopback and not info.via_proxy
    except ValueError:
        local = False
    if local:
        info.principal = "loopback"
        return None
    return ApiError(403, "writes_local_only", "This server accepts writes only from its own machine.")
