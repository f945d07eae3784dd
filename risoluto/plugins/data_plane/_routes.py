"""The routes and the runtime service of a data plane (not a plugin itself; see ``server``).

``/dp/v1/`` mirrors the SandboxRuntime protocol. The data plane does not trust its control
plane: a received spec goes through the same policy guard as on the control plane, judged
with THIS host's paths and policy, and may bind-mount only directories below this data
plane's ``workspace.root`` and join only its ``codex.sandbox.network``.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import json
import os
from pathlib import Path
from typing import Any, AsyncIterator

import anyio
import attrs
from quart import Blueprint, Response, request

from ...errors import ApiError, StartupError
from ...openapi import api
from ...requests import json_object
# The sandbox package's private helpers, never its plugin modules: the data plane runs the same
# policy guard, runtime life cycle and names as an in-process runtime (tests/test_plugin_list.py).
from ..sandbox._guard import check_spec, refuse
from ..sandbox._naming import LABEL_ISSUE, checked_id, validate_issue, workspace_root
from ..sandbox._runtime_service import install_runtime, release_runtime, remove_leftovers
from ..sandbox._wire import PREFIX, spec_from_wire, timeout_from_wire

STATE = "data_plane"
MAX_POLL_S = 25.0
HEARTBEAT_S = 10.0
_TAGS = ("data plane",)


class EventLog:
    """The last sandbox events, numbered; ``after`` long-polls for newer ones. ``boot`` changes
    when the data plane restarts (numbers start again)."""

    def __init__(self, size: int = 1000):
        self.items: collections.deque[tuple[int, dict[str, Any]]] = collections.deque(maxlen=size)
        self.seq = 0
        self.boot = os.urandom(8).hex()
        self._changed = anyio.Event()

    def push(self, event: Any) -> None:
        self.seq += 1
        self.items.append((self.seq, attrs.asdict(event)))
        self._changed.set()
        self._changed = anyio.Event()

    async def after(self, seq: int, boot: str, timeout: float) -> list[dict[str, Any]]:
        """Events numbered above ``seq``; all that are kept when ``boot`` is an earlier boot's."""
        if seq < 0:
            return []
        if boot != self.boot:
            seq = 0
        if seq >= self.seq:
            with anyio.move_on_after(timeout):
                await self._changed.wait()
        return [{**e, "seq": s} for s, e in self.items if s > seq]


@attrs.define
class DataPlaneState:
    digest: bytes | None
    events: EventLog | None = None


class DataPlaneService:
    """Relays the events of the runtime the kernel chose (docker) to the event log."""

    name = "data_plane"

    def __init__(self, kernel: Any, keep: frozenset[str]):
        self.kernel, self.keep = kernel, keep

    async def start(self) -> None:
        kernel, state = self.kernel, self.kernel.state[STATE]
        if state.digest is None:
            raise StartupError("the data plane needs RISOLUTO_DATA_PLANE_SECRET (32+ characters)")
        extra = sorted({p.name for p in kernel.plugins if p.source == "default"} - self.keep)
        if extra:
            raise StartupError(f"a data plane must not load {', '.join(extra)}; start it with "
                               "`risoluto serve --data-plane`")
        runtime = kernel.backends.runtime  # the kernel chose it (risoluto.backends)
        if runtime is None or kernel.settings.sandbox.runtime != "docker":
            raise StartupError("a data plane needs sandbox.runtime: docker")
        state.events = EventLog()
        install_runtime(kernel, runtime, relay=state.events.push)
        await remove_leftovers(runtime)  # without Docker: routes answer 503 until it is back

    async def stop(self) -> None:
        release_runtime(self.kernel)


def enforce(spec: Any, kernel: Any) -> None:
    """This host's policy over a spec sent by the control plane (403 on a violation)."""
    settings = kernel.settings
    if LABEL_ISSUE in spec.labels:  # the control plane checked it too; this host trusts no one's labels
        validate_issue(spec.labels[LABEL_ISSUE])
    check_spec(spec, settings, kernel.environ)
    root = Path(os.path.realpath(workspace_root(settings)))
    for m in spec.mounts:
        if m.type == "bind" and not Path(os.path.realpath(m.source)).is_relative_to(root):
            raise refuse(f"the data plane bind-mounts only directories below its workspace.root ({root}); "
                         f"refused: {m.source}")
    if spec.network != settings.codex.sandbox.network:
        raise refuse(f"the data plane runs sandboxes only on {settings.codex.sandbox.network!r}, "
                     f"not {spec.network!r} (codex.sandbox.network must match on both planes)")


def _number(name: str, default: float, high: float) -> float:
    raw = request.args.get(name)
    try:
        value = float(raw) if raw is not None else default
    except ValueError:
        value = -1.0
    if not 0 <= value <= high:
        raise ApiError(400, "invalid_request", f"{name} must be a number in [0, {high:g}].")
    return value


def blueprint(kernel: Any) -> Blueprint:
    bp = Blueprint("risoluto_data_plane", __name__)

    def runtime() -> Any:
        if kernel.backends.runtime is None:
            raise ApiError(503, "sandbox_runtime_unavailable", "The data plane has no sandbox runtime yet.")
        return kernel.backends.runtime

    @bp.get(PREFIX + "/ping")
    @api("Data plane identity (needs the data-plane secret)", tags=_TAGS)
    async def ping() -> Any:
        rt = runtime()
        return {"ok": True, "role": "data-plane", "runtime": rt.name, "instance": getattr(rt, "instance", "")}

    @bp.get(PREFIX + "/check")
    @api("The runtime can run the current policy (engine reachable)", tags=_TAGS)
    async def check() -> Any:
        await runtime().check()
        return {"ok": True}

    @bp.post(PREFIX + "/sandboxes")
    @api("Launch a final ContainerSpec", tags=_TAGS)
    async def launch() -> Any:
        body = await json_object()
        if set(body) - {"spec", "timeout_s"}:
            raise ApiError(400, "invalid_request", "the body has exactly the fields spec and timeout_s.")
        spec = spec_from_wire(body.get("spec"))
        timeout = timeout_from_wire(body.get("timeout_s"))
        enforce(spec, kernel)
        return await runtime().launch(spec, timeout), 201

    @bp.get(PREFIX + "/sandboxes")
    @api("Sandboxes of this data plane", tags=_TAGS)
    async def index() -> Any:
        return {"sandboxes": await runtime().list()}

    @bp.get(PREFIX + "/sandboxes/<sandbox_id>")
    @api("One sandbox", tags=_TAGS)
    async def show(sandbox_id: str) -> Any:
        return await runtime().inspect(checked_id(sandbox_id))

    @bp.get(PREFIX + "/sandboxes/<sandbox_id>/logs")
    @api("Output of a sandbox", tags=_TAGS)
    async def logs(sandbox_id: str) -> Any:
        return {"id": sandbox_id, "logs": await runtime().logs(checked_id(sandbox_id))}

    @bp.get(PREFIX + "/sandboxes/<sandbox_id>/wait")
    @api("Long-poll (timeout_s <= 25) for the exit and cleanup of a sandbox", tags=_TAGS)
    async def wait(sandbox_id: str) -> Any:
        rt, sid, timeout = runtime(), checked_id(sandbox_id), _number("timeout_s", 20.0, MAX_POLL_S)
        with anyio.move_on_after(timeout):
            return {"done": True, "record": await rt.wait(sid)}
        return {"done": False, "record": await rt.inspect(sid)}

    @bp.get(PREFIX + "/sandboxes/<sandbox_id>/stream")
    @api("Output as produced: NDJSON frames {b: base64} / {} heartbeat / {end: true}", tags=_TAGS)
    async def stream(sandbox_id: str) -> Any:
        rt, sid = runtime(), checked_id(sandbox_id)
        await rt.inspect(sid)  # 404 before the stream starts
        response = Response(_frames(rt, sid), content_type="application/x-ndjson")
        response.timeout = None  # a sandbox may run for hours; heartbeats keep the line alive
        return response

    @bp.delete(PREFIX + "/sandboxes/<sandbox_id>")
    @api("Stop (with grace) and remove", tags=_TAGS)
    async def remove(sandbox_id: str) -> Any:
        return await runtime().remove(checked_id(sandbox_id))

    @bp.get(PREFIX + "/events")
    @api("Sandbox events after ?after=N&boot=B (long-poll, timeout_s <= 25); after=-1: only the position",
         tags=_TAGS)
    async def events() -> Any:
        log_ = kernel.state[STATE].events
        if log_ is None:
            raise ApiError(503, "sandbox_runtime_unavailable", "The data plane is starting.")
        try:
            after = int(request.args.get("after", "-1"))
        except ValueError:
            raise ApiError(400, "invalid_request", "after must be an integer.") from None
        boot = request.args.get("boot", log_.boot)
        items = await log_.after(after, boot, _number("timeout_s", 20.0, MAX_POLL_S))
        return {"boot": log_.boot, "last": log_.seq, "events": items}

    @bp.get(PREFIX + "/hardening")
    @api("This data plane's doctor items", tags=_TAGS)
    async def hardening() -> Any:
        from ...doctor import run_checks, summary

        return summary(await anyio.to_thread.run_sync(run_checks, kernel))

    return bp


async def _frames(rt: Any, sid: str) -> AsyncIterator[bytes]:
    """The runtime's log stream as NDJSON, with a heartbeat when it is quiet."""
    send, receive = anyio.create_memory_object_stream[bytes](16)

    async def pump() -> None:
        async with send:
            async for chunk in rt.stream_logs(sid):
                await send.send(chunk)

    # A plain task, not a task group: a generator must not yield inside a cancel scope.
    task = asyncio.get_running_loop().create_task(pump())
    try:
        async with receive:
            while True:
                chunk = b""
                with anyio.move_on_after(HEARTBEAT_S):
                    try:
                        chunk = await receive.receive()
                    except anyio.EndOfStream:
                        break
                yield json.dumps({"b": base64.b64encode(chunk).decode("ascii")}).encode() + b"\n" if chunk else b"{}\n"
        yield b'{"end": true}\n'
    finally:
        task.cancel()
