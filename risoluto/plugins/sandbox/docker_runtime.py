"""The ``docker`` sandbox runtime: a final ContainerSpec -> Docker Engine API calls.

Lifecycle of a launch: check the runtime and image -> network -> volumes (a per-attempt
volume may come ready-filled from ``_prepared``) -> create -> ``on_created`` callbacks -> check
the prepared volume -> put files -> start; then, in the background: wait (up to the timeout,
then stop with grace) -> record exit code, OOM flag and output -> remove the container and its
per-attempt volumes -> ``on_removed`` callbacks. Blocking SDK calls run in worker threads of
the runtime's own bounded pool, each within ``sandbox.engineTimeoutSeconds``; a removal the
engine does not confirm is retried by ``_reconciler``. Every object carries
``risoluto.instance`` (a digest of DATA_DIR), and per-attempt volumes a name with it, so a
restarted kernel removes what its crashed predecessor left, and nothing of another kernel.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import functools
import logging
import os
import time
from typing import Any, AsyncIterator, Callable, Mapping

import anyio
import docker
import requests

from ...errors import ApiError
from ...hookspecs import hookimpl
from ...hookspecs.doctor import FAIL, PASS, CheckResult
from ...hookspecs.sandbox import ContainerSpec, SandboxEvent
from . import _engine as engine
from . import _owner
from ._engine_pool import EngineBusy, EnginePool, EngineTimeout
from ._guard import exposed, redact
from ._prepared import LABEL_CARRIER, PreparedVolumes, Slot
from ._naming import (
    LABEL_INSTANCE, LABEL_ISSUE, LABEL_MANAGED, LABEL_SCOPE, LABEL_STARTED, SCOPE_ATTEMPT, attempt_volume,
    attempt_volume_prefix, instance_id,
)
from ._reconciler import Items, Reconciler
from ._records import Record, docker_record

log = logging.getLogger("risoluto.sandbox")
INFO_TTL_S = 10.0
KEEP_FINISHED = 200
PREPARE_AFTER_S = 1.0
# Log followers each hold a worker thread for as long as they follow; they get their own
# threads so that they can never take anyio's shared ones (40) from every other engine call.
MAX_LOG_FOLLOWERS = 64
# After the engine comes back, what a crashed predecessor left is swept if the start could not:
# only objects the engine made this long before this runtime began (never a launch of its own).
SWEEP_MARGIN_S = 2.0


def _tail(client: docker.APIClient, cid: str) -> tuple[bytes, bool]:
    return engine.log_tail(client, cid, Record.LOG_TAIL_LINES, Record.LOG_CAP_BYTES)


async def gather(*aws: Any) -> list[Any]:
    """Await concurrently; results in order; the first failure is re-raised as itself."""
    results: list[Any] = [None] * len(aws)
    errors: list[BaseException] = []

    async def one(i: int, aw: Any) -> None:
        try:
            results[i] = await aw
        except Exception as exc:
            errors.append(exc)

    async with anyio.create_task_group() as tg:
        for i, aw in enumerate(aws):
            tg.start_soon(one, i, aw)
    if errors:
        raise errors[0]
    return results


class NotFound(ApiError):
    """The engine has no such object (container, image, network, volume)."""

    def __init__(self, detail: str):
        super().__init__(404, "sandbox_not_found", f"No such object on the Docker engine ({detail}).")


def _engine_down(exc: BaseException) -> bool:
    """The engine is unreachable or not answering (rather than refusing one request)."""
    return isinstance(exc, ApiError) and exc.code == "sandbox_runtime_unavailable"


def _created(vol: Mapping[str, Any]) -> float:
    """A volume's creation time (the engine's RFC 3339 ``CreatedAt``); 0 when it has none."""
    try:
        return datetime.datetime.fromisoformat(str(vol.get("CreatedAt", ""))).timestamp()
    except ValueError:
        return 0.0


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="milliseconds")


class DockerRuntime:
    name = "docker"

    def __init__(self, settings: Any, environ: Mapping[str, str] | None = None):
        self._settings = settings
        self._kernel: Any = None
        self._environ = dict(os.environ if environ is None else environ)
        self.instance = instance_id(settings)
        self._client: docker.APIClient | None = None
        self._records: dict[str, Record] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._active = 0
        self._info: tuple[float, dict[str, Any]] = (0.0, {})
        # Answers that cost an engine round trip per launch, kept briefly: an image seen on the
        # engine (TTL) and networks that exist. Any launch failure forgets both, so a removed
        # image or network is looked up (and the network re-created) again at the next launch.
        self._images_seen: dict[str, float] = {}
        self._networks_ok: set[str] = set()
        self._lock = anyio.Lock()
        self._info_lock = anyio.Lock()
        self._waits: anyio.CapacityLimiter | None = None
        self._follows: anyio.CapacityLimiter | None = None
        self._prepared = PreparedVolumes(self)
        self.observer: Callable[[SandboxEvent], None] | None = None
        self._calls: EnginePool | None = None
        self._connecting: asyncio.Task[None] | None = None
        self._removal = Reconciler(self._remove_one)
        self._born = time.time()
        self._sweep_due = False  # the start's leftover cleanup found no engine: once it is back

    def attach(self, kernel: Any, observer: Callable[[SandboxEvent], None] | None = None) -> None:
        """Follow the kernel's live settings and environment; report events to ``observer``."""
        self._kernel, self._environ, self.observer = kernel, dict(kernel.environ), observer

    @property
    def settings(self) -> Any:
        return self._kernel.settings if self._kernel is not None else self._settings

    # --- engine access ------------------------------------------------------------
    @property
    def deadline(self) -> float:
        """``sandbox.engineTimeoutSeconds``: every engine call answers by then."""
        return float(self.settings.sandbox.engine_timeout_seconds)

    def _pool(self) -> EnginePool:
        if self._calls is None:
            # room for a burst of launches (a few calls each at once) and the queries beside them;
            # a frozen engine can hold no more threads than this, whatever the number of requests
            self._calls = EnginePool("risoluto-engine", self.settings.codex.sandbox.max_concurrent * 3 + 8)
        return self._calls

    async def engine_call(self, call: Callable[..., Any], limiter: Any = None,
                   mask: tuple[str, ...] = (), abandon: bool = True, slack: float = 0.0) -> Any:
        """Run one SDK call in a worker thread. Engine errors become ApiErrors: 404 ->
        :class:`NotFound`, other refusals -> 502 (``mask``ed values never echoed), no engine or
        no answer within :attr:`deadline` (+ ``slack``) -> 503.

        Calls without ``limiter`` run on the runtime's own bounded pool (:mod:`._engine_pool`).
        Calls that last as long as a container (its ``wait``, a log follower) pass their own
        limiter and have no deadline; ``abandon=False``: a cancelled caller waits for the
        thread, which keeps its limiter token."""
        try:
            client = await self._connected()
            if limiter is None:
                result = await self._pool().run(call, client, deadline=self.deadline + slack)
            else:
                result = await anyio.to_thread.run_sync(call, client, limiter=limiter, abandon_on_cancel=abandon)
        except docker.errors.NotFound as exc:
            self._removal.engine_answered()
            raise NotFound(redact(str(exc.explanation or exc), mask)[:300]) from None
        except docker.errors.APIError as exc:
            text = redact(str(exc.explanation or exc), mask)  # never echo an environment value back
            raise ApiError(502, "sandbox_engine_error", f"the Docker engine refused: {text[:400]}") from None
        except EngineBusy:
            raise engine.not_answering(self._environ, f"{self._pool().size} engine calls are waiting for it "
                                       "already") from None
        except (EngineTimeout, requests.exceptions.Timeout):
            raise engine.not_answering(self._environ, f"no answer within {self.deadline + slack:g} s, "
                                       "sandbox.engineTimeoutSeconds") from None
        except (docker.errors.DockerException, requests.exceptions.RequestException, OSError) as exc:
            self._client = None  # reconnect next time
            raise engine.unavailable(self._environ, exc) from None
        self._removal.engine_answered()
        if self._sweep_due:
            self._sweep_later()
        return result

    async def _connected(self) -> docker.APIClient:
        """The client, connecting first if needed: one connect for all callers at once (each
        waits for the same attempt), within the deadline."""
        if self._client is None:
            if self._connecting is None:
                self._connecting = asyncio.get_running_loop().create_task(self._connect())
                self._connecting.add_done_callback(self._connect_done)
            await asyncio.shield(self._connecting)
        assert self._client is not None
        return self._client

    def _connect_done(self, task: asyncio.Task[None]) -> None:
        if self._connecting is task:
            self._connecting = None  # a failure is everyone's who waited; the next call tries again
        if not task.cancelled():
            task.exception()  # retrieved, even when every waiter has left

    async def _connect(self) -> None:
        # one pool for the socket: room for every sandbox's wait (held for its life), a
        # burst of launch calls and every log follower, so connections are kept, not dropped
        size = self.settings.codex.sandbox.max_concurrent * 3 + 12 + MAX_LOG_FOLLOWERS
        connect = functools.partial(engine.connect, self._environ, timeout=self.deadline, pool=size)
        self._client = await self._pool().run(connect, deadline=self.deadline)

    async def settled(self) -> None:
        """Return once no background engine work (filling a per-attempt volume) is in flight."""
        await self._prepared.settled()

    async def check(self) -> None:
        await self.engine_call(lambda c: c.ping())

    async def _engine_info(self) -> dict[str, Any]:
        if time.monotonic() - self._info[0] <= INFO_TTL_S:
            return self._info[1]
        async with self._info_lock:  # one fetch for a burst of launches, not one each
            at, info = self._info
            if time.monotonic() - at > INFO_TTL_S:
                info = await self.engine_call(lambda c: c.info())
                self._info = (time.monotonic(), info)
            return info

    # --- launch ---------------------------------------------------------------------
    async def launch(self, spec: ContainerSpec, timeout_s: float) -> dict[str, Any]:
        limit = self.settings.codex.sandbox.max_concurrent
        if self._active >= limit:
            raise ApiError(503, "sandbox_busy", f"{limit} sandboxes are already running "
                           "(codex.sandbox.maxConcurrent); retry later.", {"Retry-After": "5"})
        self._active += 1
        rec: Record | None = None
        volumes: list[str] = []
        created: list[str] = []
        try:
            await self._preflight(spec)
            # the image first (cached for INFO_TTL_S, so usually free): a launch that can never run
            # creates nothing, not even the issue's HOME volume; then the rest in parallel
            await self._check_image(spec.image)
            await gather(self._ensure_network(spec.network), self._ensure_volumes(spec, volumes))
            # only a launch that got this far may take (or make out of date) a prepared volume
            slots = self._prepared.slots(spec)
            taken = self._prepared.claim(slots, volumes)
            self._name_attempt_volumes(spec, volumes)
            labels = {**spec.labels, LABEL_INSTANCE: self.instance, LABEL_MANAGED: "true", LABEL_STARTED: _now()}
            kwargs = engine.create_kwargs(spec, labels)
            with anyio.CancelScope(shield=True):  # a cancelled request must not orphan the container
                # by name until the engine answers with an id: a create whose answer is lost
                # (engine gone or frozen mid-call) may still have made the container
                created.append(spec.name)
                cid = await self._create(spec, kwargs)
                created[-1] = cid
            rec = Record.from_spec(cid, spec, timeout_s, labels[LABEL_STARTED])
            self._records[cid] = rec
            self._emit("created", rec)
            for callback in spec.on_created:
                await callback(cid)
            await self._prepared.confirm(spec, slots, taken)
            uid, gid = engine.parse_user(spec.user)
            for root, files in engine.put_groups(spec).items():
                archive = engine.build_archive(root, files, uid, gid)
                await self.engine_call(lambda c, r=root, a=archive: c.put_archive(cid, r, a))
            await self._start(cid, spec.network, tuple(spec.env.values()))
        except BaseException as exc:
            self._forget_engine_answers()
            with anyio.CancelScope(shield=True):
                await self._discard(created, volumes, spec, rec, exc)
            self._active -= 1
            raise self._launch_error(exc, spec) from None
        rec.status, rec.started_at, rec.started_mono = "running", _now(), time.monotonic()
        self._emit("started", rec)
        task = asyncio.get_running_loop().create_task(self._watch(rec, spec, volumes, timeout_s, slots))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return rec.public()

    async def _preflight(self, spec: ContainerSpec) -> None:
        runtimes = (await self._engine_info()).get("Runtimes") or {}
        if spec.runtime and spec.runtime not in runtimes:
            raise ApiError(503, "sandbox_runtime_missing",
                           f"runtime {spec.runtime!r} is not registered in the Docker engine (it has: "
                           f"{', '.join(sorted(runtimes)) or 'none'}). Install runsc and register it in "
                           "/etc/docker/daemon.json, or set codex.sandbox.security.gvisor: false. "
                           "The launch is refused; there is no fallback to runc.")
        entry = runtimes.get(spec.runtime or "runc") or {}
        if any(o.startswith("seccomp=") for o in spec.security_opt) and not engine.seccomp_filters_enforced(entry):
            raise ApiError(503, "seccomp_unsupported",
                           f"runtime {spec.runtime!r} is registered without --oci-seccomp and would ignore "
                           "the seccomp profile; add it to runtimeArgs in /etc/docker/daemon.json.")

    async def _create(self, spec: ContainerSpec, kwargs: dict[str, Any]) -> str:
        def create(c: docker.APIClient) -> str:
            return c.create_container(**kwargs)["Id"]

        try:
            return await self.engine_call(create, mask=tuple(spec.env.values()))
        except NotFound:
            # The image or network may have gone since it was last seen: look again (uncached),
            # so a vanished image is a plain image_not_found (never pulled) and a removed
            # network is re-created, as without the cache; then try once more.
            self._forget_engine_answers()
            await gather(self._check_image(spec.image), self._ensure_network(spec.network))
            return await self.engine_call(create, mask=tuple(spec.env.values()))

    def _forget_engine_answers(self) -> None:
        """Look images and networks up again at the next launch (after any failure)."""
        self._images_seen.clear()
        self._networks_ok.clear()

    async def _start(self, cid: str, network: str, mask: tuple[str, ...]) -> None:
        try:
            await self.engine_call(lambda c: c.start(cid), mask=mask)
        except NotFound:
            # The engine resolves the network at start: if the cached one was removed, re-create it once.
            if network not in self._networks_ok:
                raise
            self._networks_ok.discard(network)
            await self._ensure_network(network)
            await self.engine_call(lambda c: c.start(cid), mask=mask)

    async def _check_image(self, image: str) -> None:
        if time.monotonic() - self._images_seen.get(image, -INFO_TTL_S) < INFO_TTL_S:
            return  # create_container never pulls: a vanished image still fails the launch
        try:
            await self.engine_call(lambda c: c.inspect_image(image))
            self._images_seen[image] = time.monotonic()
        except NotFound:
            raise ApiError(400, "image_not_found", f"image {image!r} is not on the Docker engine; build "
                           "or load it first (images are never pulled).") from None

    async def _ensure_network(self, name: str) -> None:
        if name in ("", "none", "bridge", "default") or name in self._networks_ok:
            return
        async with self._lock:  # two first launches must not create two networks
            if name in self._networks_ok:
                return
            try:
                await self.engine_call(lambda c: c.inspect_network(name))
                self._networks_ok.add(name)
                return
            except NotFound:
                pass
            if name != self.settings.codex.sandbox.network:
                raise ApiError(503, "sandbox_network_missing", f"network {name!r} does not exist on the engine.")
            labels = {LABEL_MANAGED: "true", LABEL_INSTANCE: self.instance}
            # A plain bridge with inter-container traffic off: sandboxes cannot reach each other.
            options = {"com.docker.network.bridge.enable_icc": "false"}
            await self.engine_call(lambda c: c.create_network(name, driver="bridge", labels=labels, options=options,
                                                       check_duplicate=True))
            self._networks_ok.add(name)
            log.info("created sandbox network %s", name)

    async def _ensure_volumes(self, spec: ContainerSpec, attempt: list[str]) -> None:
        """Create named volumes; anonymous ones (no source) are created by the engine with the
        container and removed with it. Named per-attempt volumes are appended to ``attempt``
        as they are created (the launch removes them)."""
        for m in spec.mounts:
            if m.type != "volume":
                continue
            labels = {**m.labels, LABEL_MANAGED: "true", LABEL_INSTANCE: self.instance}
            m.labels = labels
            if not m.source:
                continue
            per_attempt = m.labels.get(LABEL_SCOPE) == SCOPE_ATTEMPT
            if not per_attempt:
                try:
                    vol = await self.engine_call(lambda c, name=m.source: c.inspect_volume(name))
                    device = (vol.get("Options") or {}).get("device")
                    if device and exposed(device, self.settings, self._environ):
                        raise ApiError(403, "sandbox_policy_violation",
                                       f"volume {m.source} is a bind of {device}; refused.")
                    continue
                except NotFound:
                    pass
            if per_attempt:
                attempt.append(m.source)
            await self.engine_call(lambda c, name=m.source, lb=labels: c.create_volume(name, labels=lb))

    def _launch_error(self, exc: BaseException, spec: ContainerSpec) -> BaseException:
        if isinstance(exc, NotFound):
            return ApiError(502, "sandbox_launch_failed", f"the Docker engine refused the launch: {exc.message}")
        if isinstance(exc, ApiError) and exc.code == "sandbox_engine_error":
            return ApiError(502, "sandbox_launch_failed", exc.message)
        if isinstance(exc, (ApiError, anyio.get_cancelled_exc_class())):
            return exc
        log.error("sandbox launch failed: %s", type(exc).__name__)
        return ApiError(502, "sandbox_launch_failed", f"the launch failed ({type(exc).__name__}).")

    def _name_attempt_volumes(self, spec: ContainerSpec, volumes: list[str]) -> None:
        """Give every anonymous per-attempt volume (CODEX_HOME) a name of this instance, so that
        one the engine made but could not remove (or made without labels, cut short by its own
        shutdown) is still found by name; it is removed after its container, like any named one."""
        for m in spec.mounts:
            if m.type == "volume" and not m.source and m.labels.get(LABEL_SCOPE) == SCOPE_ATTEMPT:
                m.source = attempt_volume(self.instance)
                volumes.append(m.source)

    async def _discard(self, created: list[str], volumes: list[str], spec: ContainerSpec,
                       rec: Record | None, exc: BaseException) -> None:
        items: Items = [("container", ref) for ref in created] + [("volume", n) for n in volumes]
        if rec is not None:
            rec.status, rec.reason, rec.finished_at = "failed", f"launch failed ({type(exc).__name__})", _now()
            rec.removal = "pending"
        then = functools.partial(self._confirmed, rec) if rec is not None else None
        if _engine_down(exc):
            self._removal.defer(items, then)  # answer now: trying again here would cost another deadline
        else:
            await self._removal.remove(items, then)
        if rec is not None:
            for callback in spec.on_removed:
                await self._quietly_call(callback, rec.id)
            rec.done.set()
        self._emit("failed", rec, spec=spec, reason=type(exc).__name__)

    def _confirmed(self, rec: Record | None, seconds: float | None = None) -> None:
        """The engine confirmed that the sandbox's container and volumes are gone."""
        if rec is None:
            return
        rec.removal, rec.removed = "done", True
        if seconds is not None:
            self._emit("removed", rec, seconds=seconds)

    async def remove_objects(self, items: Items) -> bool:
        """Remove engine objects in order; what fails is retried while the kernel runs."""
        return await self._removal.remove(items)

    async def _remove_one(self, kind: str, ref: str) -> None:
        """Remove one object; returns when the engine removed it or has no such object."""
        if kind == "container":
            call: Callable[..., Any] = lambda c: c.remove_container(ref, force=True, v=True)  # noqa: E731
        else:
            call = lambda c: c.remove_volume(ref, force=True)  # noqa: E731
        try:
            await self.engine_call(call)
        except NotFound:
            pass

    # --- after start -------------------------------------------------------------------
    async def _watch(self, rec: Record, spec: ContainerSpec, volumes: list[str], timeout_s: float,
                     slots: list[Slot]) -> None:
        # Fill the next attempt's volumes once this container has run a while, or once it is
        # gone: never during its own start or exit, where the engine work would slow them.
        refill = asyncio.get_running_loop().call_later(PREPARE_AFTER_S, self._prepared.refill, slots)
        engine_down = False
        try:
            await self._wait_exit(rec, timeout_s)
        except NotFound:
            rec.status, rec.reason = "removed", "the container was removed outside this kernel"
        except Exception as exc:  # engine gone mid-run, or it refused a step
            rec.status = "failed"
            if engine_down := _engine_down(exc):
                rec.reason = "lost contact with the Docker engine"
            else:
                rec.reason = exc.message if isinstance(exc, ApiError) else type(exc).__name__
            log.warning("sandbox %s: %s", rec.name, rec.reason)
        finally:
            with anyio.CancelScope(shield=True):
                await self._finish(rec, spec, volumes, engine_down)
            if not refill.cancelled() and refill.when() > asyncio.get_running_loop().time():
                refill.cancel()
                self._prepared.refill(slots)

    async def _wait_exit(self, rec: Record, timeout_s: float) -> None:
        if self._waits is None:
            self._waits = anyio.CapacityLimiter(1)
        self._waits.total_tokens = self.settings.codex.sandbox.max_concurrent + 4
        if rec.stop_requested:  # DELETE arrived while the launch was still in progress
            await self._stop(rec.id)
        with anyio.move_on_after(timeout_s) as scope:
            await self.engine_call(lambda c: c.wait(rec.id), limiter=self._waits)
        if scope.cancelled_caught:
            rec.timed_out, rec.reason = True, "timeout"
            await self._stop(rec.id)
        info, (output, cut) = await gather(self.engine_call(lambda c: c.inspect_container(rec.id)),
                                           self.engine_call(lambda c: _tail(c, rec.id)))
        rec.exit_code, rec.oom_killed = info["State"].get("ExitCode"), bool(info["State"].get("OOMKilled"))
        rec.set_logs(output, cut)
        rec.status = "timed_out" if rec.timed_out else "stopped" if rec.stop_requested else "exited"

    async def _stop(self, cid: str, grace: int | None = None) -> None:
        grace = grace or max(1, int(self.settings.codex.sandbox.stop_grace_s))
        await self.engine_call(lambda c: c.stop(cid, timeout=grace), slack=grace)  # the engine waits out the grace

    async def _finish(self, rec: Record, spec: ContainerSpec, volumes: list[str], engine_down: bool) -> None:
        rec.finished_at = _now()
        seconds = time.monotonic() - rec.started_mono
        self._emit("exited", rec, seconds=seconds)
        rec.removal = "pending"
        # the container (with its anonymous volumes) first: its named volumes are in use until then
        items: Items = [("container", rec.id)] + [("volume", n) for n in volumes]
        then = functools.partial(self._confirmed, rec, seconds)
        if engine_down:
            self._removal.defer(items, then)  # the reconciler tries once the engine answers again
        elif not await self._removal.remove(items, then):
            log.warning("sandbox %s: its removal is pending until the engine confirms it", rec.name)
        for callback in spec.on_removed:
            await self._quietly_call(callback, rec.id)
        self._active -= 1
        rec.done.set()
        self._trim()

    @staticmethod
    async def _quietly_call(callback: Any, cid: str) -> None:
        try:
            await callback(cid)
        except Exception:
            log.exception("sandbox on_removed callback failed")

    def _emit(self, kind: str, rec: Record | None, spec: ContainerSpec | None = None, seconds: float = 0.0,
              reason: str = "") -> None:
        if self.observer is None:
            return
        issue = rec.issue if rec else (spec.labels.get(LABEL_ISSUE, "") if spec else "")
        event = SandboxEvent(
            kind=kind, id=rec.id if rec else "", issue=issue, exit_code=rec.exit_code if rec else None,
            oom_killed=rec.oom_killed if rec else False, seconds=seconds, reason=reason or (rec.reason if rec else ""),
        )
        try:
            self.observer(event)
        except Exception:
            log.exception("sandbox event observer failed")

    def _trim(self) -> None:
        finished = [r for r in self._records.values() if r.done.is_set()]
        for rec in finished[: max(0, len(finished) - KEEP_FINISHED)]:
            self._records.pop(rec.id, None)

    # --- queries -----------------------------------------------------------------------
    def _find(self, sandbox_id: str) -> Record | None:
        for rec in self._records.values():
            if sandbox_id in (rec.id, rec.name) or (len(sandbox_id) >= 12 and rec.id.startswith(sandbox_id)):
                return rec
        return None

    async def _foreign(self, sandbox_id: str | None = None) -> list[dict[str, Any]]:
        """Containers of this instance this process did not launch (e.g. from the CLI)."""
        filters = {"label": [f"{LABEL_INSTANCE}={self.instance}"]}
        rows = await self.engine_call(lambda c: c.containers(all=True, filters=filters))
        out = [docker_record(row) for row in rows if row["Id"] not in self._records]
        if sandbox_id is not None:
            out = [r for r in out if sandbox_id in (r["id"], r["name"])
                   or (len(sandbox_id) >= 12 and r["id"].startswith(sandbox_id))]
        return out

    async def list(self) -> list[dict[str, Any]]:
        return [r.public() for r in self._records.values()] + await self._foreign()

    async def inspect(self, sandbox_id: str) -> dict[str, Any]:
        rec = self._find(sandbox_id)
        if rec is not None:
            return rec.public()
        found = await self._foreign(sandbox_id)
        if not found:
            raise ApiError(404, "sandbox_not_found", "No sandbox with that id.")
        return found[0]

    async def logs(self, sandbox_id: str) -> str:
        rec = self._find(sandbox_id)
        if rec is not None and rec.done.is_set():
            return rec.logs.decode("utf-8", "replace")
        cid = rec.id if rec is not None else (await self.inspect(sandbox_id))["id"]
        try:
            data = (await self.engine_call(lambda c: _tail(c, cid)))[0]
        except NotFound:
            data = rec.logs if rec is not None else b""
        except ApiError as err:
            if rec is None or _engine_down(err):
                raise
            data = rec.logs  # the engine refuses logs while removal is in progress (409)
        return data.decode("utf-8", "replace")

    async def wait(self, sandbox_id: str) -> dict[str, Any]:
        rec = self._find(sandbox_id)
        if rec is None:
            raise ApiError(404, "sandbox_not_found", "No sandbox with that id (or it was not launched here).")
        await rec.done.wait()
        return rec.public()

    async def stream_logs(self, sandbox_id: str) -> AsyncIterator[bytes]:
        rec = self._find(sandbox_id)
        if rec is None:
            raise ApiError(404, "sandbox_not_found", "No sandbox with that id (or it was not launched here).")
        send, receive = anyio.create_memory_object_stream[bytes](64)
        # The engine stream, once open, so that a departing reader can shut it: the thread is
        # blocked reading it and would otherwise stay until the container prints or exits.
        opened: list[Any] = []
        left = False

        def pump(client: docker.APIClient) -> None:
            try:
                stream = engine.follow_logs(client, rec.id)
                opened.append(stream)
                if left:  # the reader left while the stream was being opened
                    stream.close()
                    return
                for chunk in stream:
                    anyio.from_thread.run(send.send, chunk)
            except (docker.errors.NotFound, anyio.BrokenResourceError, anyio.ClosedResourceError):
                pass
            except Exception:
                if not left:
                    raise
                # reading a stream shut from the other side fails in one of several ways: expected
            finally:
                anyio.from_thread.run_sync(send.close)  # on the event loop: streams are not thread-safe

        if self._follows is None:
            self._follows = anyio.CapacityLimiter(MAX_LOG_FOLLOWERS)
        # not abandoned: the follower's thread keeps its token until the read has really ended
        task = asyncio.get_running_loop().create_task(self.engine_call(pump, limiter=self._follows, abandon=False))
        streamed = 0
        try:
            async with receive:
                async for chunk in receive:
                    streamed += len(chunk)
                    yield chunk
            await rec.done.wait()
            if len(rec.logs) > streamed and not rec.logs_truncated:
                yield rec.logs[streamed:]  # the stream ended early (container removed first)
        finally:
            left = True
            for stream in opened:
                with contextlib.suppress(Exception):
                    stream.close()  # shutdown(): the blocked read returns at once
            task.cancel()

    # --- stop, cleanup ---------------------------------------------------------------------
    async def remove(self, sandbox_id: str) -> dict[str, Any]:
        rec = self._find(sandbox_id)
        if rec is not None:
            if not rec.done.is_set():
                rec.stop_requested = True
                try:
                    await self._stop(rec.id)
                except NotFound:
                    pass
                with anyio.move_on_after(self.deadline):  # the exit is recorded, the removal tried
                    await rec.done.wait()
                if not rec.done.is_set():
                    raise engine.not_answering(self._environ, "the sandbox was stopped; its exit is not "
                                               f"recorded within {self.deadline:g} s")
            return rec.public()
        target = await self.inspect(sandbox_id)
        # named attempt volumes are not removed with the container (anonymous ones are)
        info = await self.engine_call(lambda c: c.inspect_container(target["id"]))
        prefix = attempt_volume_prefix(self.instance)
        volumes = [m["Name"] for m in info.get("Mounts") or []
                   if m.get("Type") == "volume" and str(m.get("Name", "")).startswith(prefix)]
        await self.engine_call(lambda c: c.remove_container(target["id"], force=True, v=True))
        pending = not await self._removal.remove([("volume", n) for n in volumes])
        return {**target, "status": "removed", "removed": True, "removal": "pending" if pending else "done"}

    async def cleanup_orphans(self, before: float | None = None) -> int:
        """Remove what a previous run of this DATA_DIR left: its containers and carriers (by
        label) and its per-attempt volumes (by label, and by name for a volume the engine made
        without labels). ``before``: only objects the engine made before that time (a sweep
        while this runtime may be launching). Failures are retried by the reconciler."""
        try:
            items = await self._leftovers(before)
        except ApiError:
            self._sweep_due = before is None  # no engine at start: sweep once it answers
            raise
        done = await self._removal.remove_each(items)
        if items:
            log.warning("removed %d container(s)/volume(s) left over by a previous run%s", done,
                        f"; {len(items) - done} more are retried" if done < len(items) else "")
        return len(items)

    async def _leftovers(self, before: float | None) -> Items:
        mine = f"{LABEL_INSTANCE}={self.instance}"
        rows = await self.engine_call(lambda c: c.containers(all=True, filters={"label": [mine]}))
        rows += await self.engine_call(lambda c: c.containers(all=True, filters={"label": [f"{LABEL_CARRIER}={self.instance}"]}))
        vols = (await self.engine_call(lambda c: c.volumes()) or {}).get("Volumes") or []
        prefix = attempt_volume_prefix(self.instance)
        items: Items = []
        for row in rows:
            if row["Id"] not in self._records and (before is None or row.get("Created", before) < before):
                items.append(("container", row["Id"]))
        for vol in vols:
            labels = vol.get("Labels") or {}
            ours = labels.get(LABEL_INSTANCE) == self.instance and labels.get(LABEL_SCOPE) == SCOPE_ATTEMPT
            if (ours or vol["Name"].startswith(prefix)) and (before is None or _created(vol) < before):
                items.append(("volume", vol["Name"]))
        return items

    def _sweep_later(self) -> None:
        """The engine answers again after a start without one: sweep the leftovers now."""
        self._sweep_due = False

        async def sweep() -> None:
            try:
                await self.cleanup_orphans(before=self._born - SWEEP_MARGIN_S)
            except ApiError as err:
                self._sweep_due = True
                log.warning("sweeping leftovers failed: %s", err.message)

        task = asyncio.get_running_loop().create_task(sweep())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def close(self) -> None:
        await self._prepared.close()  # first: sandboxes ending below must not start new fills
        running = [r for r in self._records.values() if not r.done.is_set()]

        async def stop(rec: Record) -> None:
            rec.stop_requested = True
            with contextlib.suppress(Exception):  # gone, or no engine: the wait ends either way
                await self._stop(rec.id, grace=2)

        await gather(*(stop(rec) for rec in running))  # at once: a frozen engine costs one deadline
        with anyio.move_on_after(15):
            for rec in running:
                await rec.done.wait()
        for task in list(self._tasks):
            task.cancel()
        await self._removal.close(budget_s=self.deadline)
        if self._client is not None:
            client, self._client = self._client, None
            with anyio.move_on_after(self.deadline):
                await self._pool().run(client.close, deadline=self.deadline)
        if self._calls is not None:
            self._calls.close()


@hookimpl
def risoluto_sandbox_runtime(settings: Any) -> DockerRuntime | None:
    return DockerRuntime(settings) if settings.sandbox.runtime == "docker" else None


@hookimpl
def risoluto_doctor_checks(kernel: Any) -> list[CheckResult]:
    if kernel.settings.sandbox.runtime != "docker":
        return []
    facts = engine.engine_facts(kernel)
    orphans = _owner.doctor_item(kernel, facts)
    if not facts["ok"]:
        return [CheckResult(item="sandbox docker", status=FAIL, reason=f"Docker engine {facts['error']}",
                            fix=engine.START_HINT), orphans]
    return [CheckResult(item="sandbox docker", status=PASS,
                        reason=f"Docker engine {facts.get('version', '')} reachable; runtimes: "
                               f"{', '.join(sorted(facts['runtimes']))}"), orphans]

