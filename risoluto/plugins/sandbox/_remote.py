"""The ``remote`` sandbox runtime: the control plane's side of the split (docs/data-plane.md).
A private library: the ``sandbox.remote_runtime`` plugin selects it and reports on it.


``sandbox.runtime: remote`` + ``sandbox.dataPlaneUrl``: every SandboxRuntime call becomes an
HTTP call to the data plane (``risoluto serve --data-plane``), carrying the same final
ContainerSpec every hardening plugin built (``_wire``). The control plane needs no Docker.

- Secret: ``RISOLUTO_DATA_PLANE_SECRET`` from the environment, else the secret-store entry of
  that name; sent as ``Authorization: Bearer``. Secret env values of a spec travel only in the
  request body (never in a URL or header).
- Failures never hang: every call has a timeout (``sandbox.dataPlaneTimeoutS``); down, slow or
  unreachable -> 503 ``data_plane_unavailable``, secret refused -> 502 ``data_plane_unauthorized``,
  a data plane over its rate limit -> 503 ``data_plane_busy``, anything that is not a data plane's
  answer -> 502 ``data_plane_bad_response``. The data plane's own refusals (400/403/404/409,
  502/503 of the engine) are relayed with their code.
- Restarts: sandboxes live on the data plane (records and container labels there), so a
  restarted control plane lists, inspects, waits for and removes what it launched before;
  ``cleanup_orphans`` and ``close`` therefore leave the data plane's sandboxes alone.
- Events: one long-poll follower relays the data plane's sandbox events to this kernel's
  observer (metrics, ``risoluto_sandbox_event``).
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
from typing import Any, AsyncIterator, Callable, Mapping
from urllib.parse import urlsplit

import anyio
import httpx

from ...errors import ApiError
from ...hookspecs.sandbox import ContainerSpec, SandboxEvent
from ._guard import redact
from ._naming import checked_id
from ...roles import SECRET_ENV, header_safe
from ._wire import PREFIX, spec_to_wire

log = logging.getLogger("risoluto.sandbox.remote")
POLL_S = 20.0  # long-poll length of wait and events; the read timeout adds the call timeout to it
_RELAYED = {400, 403, 404, 409, 502, 503}
_EVENT_FIELDS = ("kind", "id", "issue", "exit_code", "oom_killed", "seconds", "reason")


def _unavailable(url: str, why: str, kind: type[ApiError] = ApiError) -> ApiError:
    return kind(503, "data_plane_unavailable", f"The sandbox data plane at {url} {why}; check that "
                    "`risoluto serve --data-plane` is running there and sandbox.dataPlaneUrl.", {"Retry-After": "5"})


class _Unsure(ApiError):
    """The request may have reached the data plane (it timed out or broke after sending)."""


class RemoteRuntime:
    name = "remote"

    def __init__(self, settings: Any, environ: Mapping[str, str] | None = None):
        import os

        self._settings, self._kernel = settings, None
        self._environ = dict(os.environ if environ is None else environ)
        self._client: httpx.AsyncClient | None = None
        self._follower: asyncio.Task[None] | None = None
        self.observer: Callable[[SandboxEvent], None] | None = None

    def attach(self, kernel: Any, observer: Callable[[SandboxEvent], None] | None = None) -> None:
        self._kernel, self._environ, self.observer = kernel, dict(kernel.environ), observer
        if observer is not None:
            self._follower = asyncio.get_running_loop().create_task(self._follow())

    @property
    def settings(self) -> Any:
        return self._kernel.settings if self._kernel is not None else self._settings

    # --- transport ------------------------------------------------------------------------
    def base_url(self) -> str:
        url = self.settings.sandbox.data_plane_url.strip().rstrip("/")
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname or parts.query or parts.fragment:
            raise ApiError(503, "data_plane_unconfigured", "sandbox.runtime is remote but sandbox.dataPlaneUrl is "
                           f"not an http(s) URL of the data plane (got {url[:100]!r}).")
        return url

    async def _secret(self) -> str:
        secret = (self._environ.get(SECRET_ENV) or "").strip()
        store = self._kernel.backends.secrets.store if self._kernel is not None else None
        if not secret and store is not None:
            secret = ((await store.get(SECRET_ENV)) or "").strip()
        if not secret or not header_safe(secret):
            raise ApiError(503, "data_plane_unconfigured", f"set {SECRET_ENV} (environment or secret store) "
                           "to the data plane's secret (printable ASCII).")
        return secret

    async def _call(self, method: str, path: str, *, body: Any = None, params: Any = None,
                    extra_s: float = 0.0, mask: tuple[str, ...] = ()) -> Any:
        base, secret = self.base_url(), await self._secret()
        limit = self.settings.sandbox.data_plane_timeout_s
        timeout = httpx.Timeout(limit + extra_s, connect=min(limit, 5.0))
        if self._client is None:
            pool = self.settings.codex.sandbox.max_concurrent * 2 + 8
            # trust_env=False: an HTTP(S)_PROXY of the environment must never see the secret
            self._client = httpx.AsyncClient(trust_env=False, limits=httpx.Limits(max_connections=pool))
        try:
            response = await self._client.request(method, base + PREFIX + path, json=body, params=params,
                                                   timeout=timeout, headers={"Authorization": f"Bearer {secret}"})
        except (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout) as exc:
            raise _unavailable(base, f"is not reachable ({type(exc).__name__})") from None
        except httpx.TimeoutException:
            raise _unavailable(base, f"did not answer within {limit + extra_s:g} s", _Unsure) from None
        except httpx.HTTPError as exc:
            raise _unavailable(base, f"broke the connection ({type(exc).__name__})", _Unsure) from None
        return self.parse_answer(response, base, mask)

    @staticmethod
    def parse_answer(response: httpx.Response, base: str, mask: tuple[str, ...]) -> Any:
        try:
            data = response.json()
        except ValueError:
            data = None
        status = response.status_code
        if status < 300 and isinstance(data, dict):
            return data
        error = data.get("error") if isinstance(data, dict) else None
        code, message = (error.get("code"), error.get("message")) if isinstance(error, dict) else (None, None)
        retry = {"Retry-After": response.headers["Retry-After"]} if "Retry-After" in response.headers else {}
        if status == 401:
            return _raise(502, "data_plane_unauthorized", f"The data plane at {base} refused the shared secret; set "
                          f"the same {SECRET_ENV} on both planes.")
        if status == 429:
            return _raise(503, "data_plane_busy", f"The data plane at {base} is over its rate limit "
                          "(rateLimit.api there); retry later.", retry or {"Retry-After": "5"})
        if status in _RELAYED and isinstance(code, str) and isinstance(message, str) and code != "not_found":
            message = redact(message, mask)  # never echo an environment value, whatever the data plane said
            return _raise(status, code, message[:600], retry)
        return _raise(502, "data_plane_bad_response", f"{base} answered HTTP {status} without a data plane's "
                      "answer; is sandbox.dataPlaneUrl a `risoluto serve --data-plane`?")

    # --- the runtime protocol ---------------------------------------------------------------
    async def check(self) -> None:
        await self._call("GET", "/check")

    async def launch(self, spec: ContainerSpec, timeout_s: float) -> dict[str, Any]:
        if spec.on_created or spec.on_removed:
            raise ApiError(503, "sandbox_remote_unsupported", "This launch needs steps on the Docker host "
                           "(spec.on_created/on_removed, e.g. the egress allowlist's per-sandbox proxy credential) "
                           "that cannot cross to a data plane; it is refused rather than run without them. Empty "
                           "codex.sandbox.egressAllowlist or use sandbox.runtime: docker.")
        body = {"spec": spec_to_wire(spec), "timeout_s": timeout_s}
        try:
            return await self._call("POST", "/sandboxes", body=body, mask=tuple(spec.env.values()))
        except _Unsure:
            with anyio.CancelScope(shield=True):  # it may exist there: never leave it running unseen
                try:
                    await self._call("DELETE", f"/sandboxes/{spec.name}")
                except ApiError:
                    log.warning("could not remove %s after an unanswered launch", spec.name)
            raise

    def _path(self, sandbox_id: str, tail: str = "") -> str:
        return f"/sandboxes/{checked_id(sandbox_id)}{tail}"

    async def wait(self, sandbox_id: str) -> dict[str, Any]:
        while True:
            body = await self._call("GET", self._path(sandbox_id, "/wait"), params={"timeout_s": POLL_S},
                                    extra_s=POLL_S)
            if body.get("done") is True and isinstance(body.get("record"), dict):
                return body["record"]

    async def stream_logs(self, sandbox_id: str) -> AsyncIterator[bytes]:
        path, base = self._path(sandbox_id, "/stream"), self.base_url()
        await self.inspect(sandbox_id)  # errors as JSON errors before streaming; opens the client
        assert self._client is not None
        headers = {"Authorization": f"Bearer {await self._secret()}"}
        limit = self.settings.sandbox.data_plane_timeout_s
        try:
            async with self._client.stream("GET", base + PREFIX + path, headers=headers,
                                           timeout=httpx.Timeout(limit + 30.0, connect=min(limit, 5.0))) as response:
                if response.status_code != 200:
                    await response.aread()
                    self.parse_answer(response, base, ())
                async for line in response.aiter_lines():
                    frame = json.loads(line) if line.strip() else {}
                    if frame.get("end"):
                        return
                    if "b" in frame:
                        yield base64.b64decode(frame["b"])
        except (httpx.HTTPError, ValueError) as exc:
            raise _unavailable(base, f"broke the log stream ({type(exc).__name__})") from None
        raise _unavailable(base, "ended the log stream early")

    async def list(self) -> list[dict[str, Any]]:
        return list((await self._call("GET", "/sandboxes")).get("sandboxes") or [])

    async def inspect(self, sandbox_id: str) -> dict[str, Any]:
        return await self._call("GET", self._path(sandbox_id))

    async def logs(self, sandbox_id: str) -> str:
        return str((await self._call("GET", self._path(sandbox_id, "/logs"))).get("logs", ""))

    async def remove(self, sandbox_id: str) -> dict[str, Any]:
        grace = float(self.settings.codex.sandbox.stop_grace_s)
        return await self._call("DELETE", self._path(sandbox_id), extra_s=grace + 10.0)

    async def cleanup_orphans(self) -> int:
        return 0  # the data plane cleans up after its own crashes; ours must not touch its sandboxes

    async def close(self) -> None:
        if self._follower is not None:
            self._follower.cancel()
            with anyio.CancelScope(shield=True), anyio.move_on_after(2):
                await asyncio.gather(self._follower, return_exceptions=True)
            self._follower = None
        if self._client is not None:
            client, self._client = self._client, None
            await client.aclose()

    # --- events -------------------------------------------------------------------------------
    async def _follow(self) -> None:
        after, boot, delay, failing = -1, "", 1.0, False
        while True:
            try:
                body = await self._call("GET", "/events", params={"after": after, "boot": boot, "timeout_s": POLL_S},
                                        extra_s=POLL_S)
                for item in body.get("events") or []:
                    self._relay(item)
                after, boot, delay = int(body.get("last", 0)), str(body.get("boot", "")), 1.0
                if failing:
                    log.info("data plane events: reconnected")
                failing = False
            except (ApiError, ValueError, TypeError) as exc:
                if not failing:
                    log.warning("data plane events unavailable: %s", getattr(exc, "message", type(exc).__name__))
                failing = True
                await anyio.sleep(delay)
                delay = min(delay * 2, 30.0)

    def _relay(self, item: Any) -> None:
        if self.observer is None or not isinstance(item, dict):
            return
        try:
            self.observer(SandboxEvent(**{k: item[k] for k in _EVENT_FIELDS if k in item}))
        except Exception:
            log.exception("sandbox event observer failed")


def _raise(status: int, code: str, message: str, headers: dict[str, str] | None = None) -> Any:
    raise ApiError(status, code, message, headers)
