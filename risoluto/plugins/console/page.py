"""``GET /``: the operator console, its assets, and the sign-in that gives a browser a session.

The page is guarded like ``/api/*``: the loaded guards (``risoluto_request_authorize``, so a
replacement read guard guards the page too) are asked about a read of ``/api/v1/hardening`` by
the same client: free on loopback, else a console session or a bearer token. A browser without either gets
the sign-in form (401), nothing else. Sign-in takes the read or the write token in a POST
form field (never the URL), sets an HttpOnly, SameSite=Strict cookie (Secure over TLS) and
redirects to ``/``; the token itself is never written into a page, a URL or storage.

The page and the script are static files shipped in this package: everything the page shows
it fetches from the public ``/api/v1`` routes with the browser's own credentials.
"""

from __future__ import annotations

import html
import importlib.resources
from typing import Any

import attrs
from quart import Blueprint, Response, g, request

from risoluto.errors import ApiError
from risoluto.hookspecs import hookimpl
from risoluto.hookspecs.ratelimit import RateRule
from risoluto.openapi import api
from risoluto.sessions import (
    COOKIE, MAX_AGE_SECONDS, WRITE, cookie_value, request_scheme, same_origin, served_over_tls, session_of,
    store_of, token_kind,
)
from risoluto.http_checks import is_local_client, single_header

SIGN_IN = "/console/session"
SIGN_OUT = "/console/session/end"
ASSETS = {"console.js": "text/javascript; charset=utf-8", "console.css": "text/css; charset=utf-8"}
MAX_FORM_BYTES = 8 * 1024
# The page runs only its own script and talks only to this server; nothing may frame it.
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
                               "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",  # "no-referrer" would make Chromium send "Origin: null"
    "Cache-Control": "no-store",
}
_HTML = {"type": "string", "description": "text/html"}


def _asset(name: str) -> str:
    return importlib.resources.files(__package__).joinpath("assets", name).read_text("utf-8")


def _page(body: str, status: int, extra: dict[str, str] | None = None) -> Response:
    response = Response(body, status=status, content_type="text/html; charset=utf-8")
    response.headers.update(SECURITY_HEADERS)
    if extra:
        response.headers.update(extra)
    return response


class Pages:
    """The two HTML documents, read once; only escaped words are filled in per request."""

    def __init__(self) -> None:
        self.console = _asset("index.html")
        self.sign_in = _asset("sign-in.html")

    def sign_in_page(self, message: str, status: int) -> Response:
        note = f'<p class="error" role="alert">{html.escape(message)}</p>' if message else ""
        return _page(self.sign_in.replace("<!--MESSAGE-->", note), status)

    def console_page(self, principal: str, can_write: str) -> Response:
        # data-* attributes only say what the browser may do; never a token or a session id
        body = self.console.replace('data-principal=""', f'data-principal="{html.escape(principal)}"')
        body = body.replace('data-writes=""', f'data-writes="{html.escape(can_write)}"')
        return _page(body, 200)


def _writes(info: Any, kernel: Any, principal: str) -> str:
    """What the page may do: ``yes``; ``sign-in`` (a write token exists: sign in with it);
    ``no`` (this deployment is read-only for this browser)."""
    s = kernel.settings.server
    session = session_of(info, kernel)  # also on loopback: a write token binds loopback writes too
    if session is not None and session.kind == WRITE:
        return "yes"
    if s.write_token:
        return "sign-in"
    return "yes" if principal == "loopback" and is_local_client(info) else "no"


# The page shows what the read API shows: it is guarded as a read of this route.
GUARDED_AS = "/api/v1/hardening"


def reader(kernel: Any, info: Any) -> str | None:
    """Who may read (the principal the guards give a read of GUARDED_AS), or None."""
    probe = attrs.evolve(info, method="GET", path=GUARDED_AS, route=GUARDED_AS, norm_path=GUARDED_AS,
                         principal="", refused="", admitted=False)
    if kernel.hooks.request_authorize(probe, kernel.settings) is not None:
        return None
    return probe.principal or "loopback"


def blueprint(kernel: Any) -> Blueprint:
    bp = Blueprint("risoluto_console", __name__)
    pages = Pages()
    assets = {name: _asset(name).encode() for name in ASSETS}

    @bp.get("/")
    @api("The operator console (HTML); without access, the sign-in form (401)", tags=("console",),
         responses={200: None, 401: None})
    async def console() -> Any:
        who = reader(kernel, g.info)
        if who is None:
            return pages.sign_in_page("", 401)
        return pages.console_page(who, _writes(g.info, kernel, who))

    @bp.get("/console/assets/<name>")
    @api("A static asset of the console (script or style sheet; public, holds nothing secret)",
         tags=("console",), responses={200: None, 404: {"$ref": "#/components/schemas/Error"}})
    async def asset(name: str) -> Any:
        if name not in assets:
            raise ApiError(404, "not_found", "No such asset.")
        response = Response(assets[name], content_type=ASSETS[name])
        response.headers["X-Content-Type-Options"] = "nosniff"
        response.headers["Cache-Control"] = "no-cache"
        return response

    @bp.post(SIGN_IN)
    @api("Sign a browser in: form field `token` (read or write token); sets the session cookie",
         tags=("console",), responses={303: None, 400: None, 401: None, 403: None})
    async def sign_in() -> Any:
        info = g.info
        scheme = request_scheme()
        if single_header(info.headers, "Origin")[0] and not same_origin(info, scheme):
            return pages.sign_in_page("Sign-in is accepted only from this server's own page.", 403)
        token = await _form_token()
        kind = token_kind(token, kernel.settings) if token else None
        if kind is None:
            return pages.sign_in_page("That token is not valid here.", 401)
        cookie = store_of(kernel).create(kind, token)
        response = Response("", status=303, headers={"Location": "/", "Cache-Control": "no-store"})
        response.set_cookie(COOKIE, cookie, max_age=MAX_AGE_SECONDS, path="/", httponly=True,
                            samesite="Strict", secure=served_over_tls(info, scheme))
        return response

    @bp.post(SIGN_OUT)
    @api("Sign this browser out: its session ends on the server and the cookie is cleared",
         tags=("console",), responses={303: None, 403: None})
    async def sign_out() -> Any:
        info = g.info
        scheme = request_scheme()
        if single_header(info.headers, "Origin")[0] and not same_origin(info, scheme):
            return pages.sign_in_page("Sign-out is accepted only from this server's own page.", 403)
        cookie = cookie_value(info.headers)
        if cookie is not None:
            store_of(kernel).end(cookie)
        response = Response("", status=303, headers={"Location": "/", "Cache-Control": "no-store"})
        response.delete_cookie(COOKIE, path="/", httponly=True, samesite="Strict",
                               secure=served_over_tls(info, scheme))
        return response

    return bp


async def _form_token() -> str:
    """The ``token`` field of a urlencoded form body ("" when absent or not a form)."""
    if (request.content_length or 0) > MAX_FORM_BYTES:
        return ""
    if request.mimetype != "application/x-www-form-urlencoded":
        return ""
    form = await request.form
    values = form.getlist("token")
    return values[0].strip() if len(values) == 1 else ""


@hookimpl
def risoluto_app_blueprints(kernel: Any) -> list[Any]:
    return [blueprint(kernel)]


@hookimpl
def risoluto_ratelimit_rules(settings: Any) -> list[RateRule]:
    # The page and the sign-in share the api bucket's limits (a token cannot be guessed faster
    # through the form than through Authorization headers).
    rl = settings.rate_limit.api
    return [RateRule(bucket="console", limit=rl.limit, window_seconds=rl.window_seconds,
                     prefixes=("/console/",), paths=("/",))]
