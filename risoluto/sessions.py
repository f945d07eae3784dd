"""Console sessions: a browser that signed in once with the read or write token carries a
random cookie instead of the token (docs/console.md, docs/http-security.md).

Not a plugin (leading underscore): the read and write guards and the console's sign-in
route share this one store, kept per app in ``kernel.state``.

- The cookie value is 32 random bytes (256 bits), URL-safe base64. The store keeps only its
  SHA-256, so a memory dump or a log of the store never holds a usable cookie.
- A session is bound to the SHA-256 of the token it was made with: when the configured
  token changes (or is removed) the session stops working at once, without a sweep.
- A session lives at most ``MAX_AGE_SECONDS`` (12 h) from sign-in, never extended.
- Sessions are in memory only: a restart signs every browser out (fail closed).
- At most ``MAX_SESSIONS`` are kept; signing in beyond that drops the oldest.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import threading
import time
from typing import Any

import attrs
from werkzeug.http import parse_cookie

from .http_checks import single_header, tokens_equal
from .settings import Settings

COOKIE = "risoluto_session"
MAX_AGE_SECONDS = 12 * 3600
MAX_SESSIONS = 1000
READ, WRITE = "read", "write"
_STATE = "http.console_sessions"


def _digest(text: str) -> bytes:
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).digest()


@attrs.define
class Session:
    kind: str  # READ or WRITE: which token signed it in
    token_digest: bytes  # SHA-256 of that token, compared with the configured one on every use
    expires: float  # time.monotonic() deadline

    def valid(self, settings: Settings, now: float) -> bool:
        if now >= self.expires:
            return False
        token = settings.server.write_token if self.kind == WRITE else settings.server.read_token
        return bool(token) and hmac.compare_digest(_digest(token), self.token_digest)


class SessionStore:
    def __init__(self) -> None:
        self._by_hash: dict[bytes, Session] = {}  # insertion order = sign-in order
        self._lock = threading.Lock()  # sign-in may run in any thread of the server

    def create(self, kind: str, token: str) -> str:
        """A new session for ``token``; the cookie value (never stored as such)."""
        cookie = base64.urlsafe_b64encode(os.urandom(32)).decode().rstrip("=")
        with self._lock:
            while len(self._by_hash) >= MAX_SESSIONS:
                self._by_hash.pop(next(iter(self._by_hash)))
            self._by_hash[_digest(cookie)] = Session(kind, _digest(token), time.monotonic() + MAX_AGE_SECONDS)
        return cookie

    def lookup(self, cookie: str, settings: Settings) -> Session | None:
        key = _digest(cookie)
        with self._lock:
            session = self._by_hash.get(key)
            if session is None:
                return None
            if not session.valid(settings, time.monotonic()):
                del self._by_hash[key]  # expired or its token changed: gone for good
                return None
            return session

    def end(self, cookie: str) -> None:
        with self._lock:
            self._by_hash.pop(_digest(cookie), None)

    def __len__(self) -> int:
        return len(self._by_hash)


def store_of(kernel: Any) -> SessionStore:
    store = kernel.state.get(_STATE)
    if store is None:
        store = kernel.state[_STATE] = SessionStore()
    return store


def cookie_value(headers: Any) -> str | None:
    """The session cookie the request carries, or None (several Cookie headers are joined,
    as HTTP/2 clients send them; a cookie name given twice is ambiguous and refused)."""
    values = headers.getlist("Cookie")
    if not values:
        return None
    cookies = parse_cookie("; ".join(values))
    found = cookies.getlist(COOKIE)
    if len(found) != 1 or not found[0] or len(found[0]) > 128:
        return None
    return found[0]


def session_of(info: Any, kernel: Any) -> Session | None:
    """The valid session the request carries, if any (``kernel``: the current app's)."""
    cookie = cookie_value(info.headers)
    if cookie is None:
        return None
    return store_of(kernel).lookup(cookie, kernel.settings)


def token_kind(token: str, settings: Settings) -> str | None:
    """WRITE or READ when ``token`` is the configured write or read token, else None.
    Both comparisons always run (constant time whichever matched)."""
    s = settings.server
    is_write = tokens_equal(token, s.write_token)
    is_read = tokens_equal(token, s.read_token)
    return WRITE if is_write else READ if is_read else None


def request_scheme() -> str:
    """The scheme the ASGI server saw ("https" when hypercorn itself terminates TLS)."""
    from quart import has_request_context, request

    return request.scheme if has_request_context() else "http"


def served_over_tls(info: Any, scheme: str) -> bool:
    """The browser reached us over https: directly, or through a trusted proxy that says so."""
    if scheme == "https":
        return True
    if info.via_proxy:
        count, proto = single_header(info.headers, "X-Forwarded-Proto")
        return count == 1 and proto.strip().lower() == "https"
    return False


def own_origin(info: Any, scheme: str) -> str | None:
    """``scheme://host`` of the page the browser loaded from us (from the single Host header)."""
    count, host = single_header(info.headers, "Host")
    if count != 1 or not host:
        return None
    return f"{'https' if served_over_tls(info, scheme) else 'http'}://{host.strip().lower()}"


def same_origin(info: Any, scheme: str) -> bool:
    """The request carries exactly one Origin and it is ours. A cookie-authenticated write
    without Origin is refused: every current browser sends it on POST, PUT, PATCH, DELETE."""
    count, origin = single_header(info.headers, "Origin")
    mine = own_origin(info, scheme)
    return count == 1 and mine is not None and origin.strip().lower() == mine
