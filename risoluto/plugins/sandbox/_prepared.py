"""Per-attempt volumes filled ahead of time, so a launch skips its ``put_archive``.

Putting files into a created container costs the engine ~45 ms whatever their size (dockerd
re-executes itself to untar in a chroot): about an eighth of a whole launch of ``true``. The
files bound for an anonymous per-attempt volume (CODEX_HOME's ``config.toml`` and
``auth.json``) are the same for every launch with the same settings and credentials. So once
the same files were wanted by two launches in a row, the runtime fills one volume for the
next attempt in the background, through the same Engine API call (``put_archive``, into a
carrier container that is created, never started, and removed), and the next launch with
identical files mounts that volume instead of an empty anonymous one and puts nothing.

What stays true (each is tested in tests/test_sandbox_prepared.py):

- A volume serves one attempt: it leaves the pool before the create call and is removed
  with its container. It never held anything but the launch's files (no image copy-up).
- Its content is exactly what the direct put would write: the pool is keyed by a keyed
  digest of (image, target, uid, gid, files). Only the files of the latest launch are kept:
  a launch whose files differ drops every other pooled volume, and a fill that finishes
  after its files went out of date is dropped, so a copy of a replaced or deleted
  ``auth.json`` is never served and is removed at the next launch, after ``POOL_TTL_S``
  idle at the latest, or at close.
- A pooled volume that vanished is never replaced by an empty one (which is what the engine
  does with an unknown volume name at create): after create, while the container holds it
  (so it can no longer be removed), its label is checked; on any doubt the files are put
  directly into what is mounted: the empty volume the engine made, unless someone with
  access to the engine (root-equivalent) swapped in a volume of their own.
- Labels carry an HMAC under a per-process random key, not a digest of ``auth.json``.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import secrets
from typing import Any

import anyio
import attrs

from ...hookspecs.sandbox import ContainerSpec, Mount
from . import _engine as engine
from ._naming import LABEL_INSTANCE, LABEL_MANAGED, LABEL_SCOPE, SCOPE_ATTEMPT, attempt_volume

log = logging.getLogger("risoluto.sandbox")
LABEL_PREPARED = "risoluto.prepared"  # on a pooled volume: the keyed digest of its files
# On the never-started container that fills one: the instance, under its own label, so the
# carrier is never listed or counted as one of the instance's sandboxes.
LABEL_CARRIER = "risoluto.carrier"
CARRIER_PATH = "/risoluto-prepare"
POOL_TTL_S = 600.0


@attrs.define(eq=False)
class Slot:
    """An anonymous per-attempt volume mount of one launch and the files bound for it."""

    mount: Mount
    # path relative to the mount target ("/" = the directory itself); may hold auth.json
    files: dict[str, bytes] = attrs.field(repr=False)
    image: str
    uid: int
    gid: int
    digest: str


def _relative(path: str, target: str) -> str | None:
    if path == target + "/" or path.startswith(target + "/"):
        return path[len(target):]
    return None


class PreparedVolumes:
    def __init__(self, runtime: Any):
        self._rt = runtime
        self._key = secrets.token_bytes(32)
        # digest -> (volume name, the scope of its idle timer); at most one volume per digest
        self._ready: dict[str, tuple[str, anyio.CancelScope]] = {}
        self._current: set[str] = set()  # the digests the latest launch wanted
        self._repeated: set[str] = set()  # ... that the launch before it wanted too
        self._filling: set[str] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._closed = False

    def slots(self, spec: ContainerSpec) -> list[Slot]:
        uid, gid = engine.parse_user(spec.user)
        out = []
        for m in spec.mounts:
            if m.type != "volume" or m.source or m.read_only or m.labels.get(LABEL_SCOPE) != SCOPE_ATTEMPT:
                continue
            target = m.target.rstrip("/")
            files = {rel: data for path, data in spec.files.items() if (rel := _relative(path, target)) is not None}
            if files:
                out.append(Slot(m, files, spec.image, uid, gid, self._digest(spec.image, target, uid, gid, files)))
        return out

    def _digest(self, image: str, target: str, uid: int, gid: int, files: dict[str, bytes]) -> str:
        mac = hmac.new(self._key, f"{image}\0{target}\0{uid}:{gid}".encode(), hashlib.sha256)
        for rel in sorted(files):
            mac.update(b"\0" + rel.encode() + b"\0" + hashlib.sha256(files[rel]).digest())
        return mac.hexdigest()[:32]

    def claim(self, slots: list[Slot], taken_names: list[str]) -> dict[int, str]:
        """Take pooled volumes for these slots and mount each in its slot's place: {slot
        index: volume name}. Each is appended to ``taken_names`` as it leaves the pool (the
        launch removes them). Their files stay in the spec until :meth:`confirm`."""
        wanted = {s.digest for s in slots}
        self._repeated, self._current = wanted & self._current, wanted
        for digest, (_, timer) in self._ready.items():
            if digest not in wanted:
                timer.cancel()  # out of date: its keeper removes it
        taken: dict[int, str] = {}
        for i, slot in enumerate(slots):
            if slot.digest not in self._ready:
                continue
            name, timer = self._ready.pop(slot.digest)
            timer.cancel()
            taken_names.append(name)
            slot.mount.source = name
            taken[i] = name
        return taken

    async def confirm(self, spec: ContainerSpec, slots: list[Slot], taken: dict[int, str]) -> None:
        """After create: drop from the spec the files a taken volume already holds.

        Checked now because the container holds the volume (the engine refuses to remove a
        volume in use): had it vanished before create, the engine made an empty one under
        that name, and its files are then put directly like any launch's."""
        for i, name in taken.items():
            slot = slots[i]
            if await self._intact(name, slot.digest):
                for rel in slot.files:
                    spec.files.pop(slot.mount.target.rstrip("/") + rel, None)

    async def _intact(self, name: str, digest: str) -> bool:
        try:
            vol = await self._rt.engine_call(lambda c: c.inspect_volume(name))
        except Exception:
            vol = {}
        if (vol.get("Labels") or {}).get(LABEL_PREPARED) == digest:
            return True
        log.warning("prepared volume %s was removed or replaced; its files are put directly", name)
        return False

    def refill(self, slots: list[Slot]) -> None:
        """Fill one volume per slot for the next launch, when the latest two launches
        wanted these files (from the event loop: a task or a loop callback)."""
        for slot in slots:
            d = slot.digest
            if self._closed or d not in self._repeated or d not in self._current:
                continue
            if d in self._ready or d in self._filling:
                continue
            task = asyncio.get_running_loop().create_task(self._keep(slot))
            self._filling.add(d)
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _keep(self, slot: Slot) -> None:
        """Fill a volume, offer it until it is claimed or ``POOL_TTL_S`` passes, then drop it."""
        name, pooled = "", False
        try:
            try:
                if not self._closed:
                    with anyio.CancelScope(shield=True):  # never abandon a half-made carrier
                        name = await self._fill(slot)
            finally:
                self._filling.discard(slot.digest)
            if not name or self._closed or slot.digest not in self._current:
                return  # closed meanwhile, or its files went out of date: dropped below
            timer = anyio.CancelScope()
            self._ready[slot.digest], pooled = (name, timer), True
            with timer:
                await anyio.sleep(POOL_TTL_S)
        except Exception as exc:  # the next launch puts its files directly
            log.warning("preparing a per-attempt volume failed: %s", type(exc).__name__)
        finally:
            claimed = pooled and self._ready.get(slot.digest, ("",))[0] != name
            if name and not claimed:
                if pooled:
                    del self._ready[slot.digest]
                with anyio.CancelScope(shield=True):
                    await self._discard(name)

    async def _fill(self, slot: Slot) -> str:
        name = attempt_volume(self._rt.instance)
        labels = {LABEL_MANAGED: "true", LABEL_INSTANCE: self._rt.instance, LABEL_SCOPE: SCOPE_ATTEMPT,
                  LABEL_PREPARED: slot.digest}
        # named, as the volume is: a create whose answer was lost (engine gone mid-call) left
        # something the cleanup can still find and remove by that name
        carrier_name = f"risoluto-carrier-{self._rt.instance[:12]}-{secrets.token_hex(6)}"
        carrier = ""
        try:
            await self._rt.engine_call(lambda c: c.create_volume(name, labels=labels))
            mounts = [{"Type": "volume", "Source": name, "Target": CARRIER_PATH, "ReadOnly": False,
                       "VolumeOptions": {"NoCopy": True}}]
            carrier = carrier_name
            carrier = (await self._rt.engine_call(lambda c: c.create_container(
                slot.image, command=["true"], network_disabled=True, name=carrier_name,
                labels={LABEL_MANAGED: "true", LABEL_CARRIER: self._rt.instance},
                host_config={"Mounts": mounts, "NetworkMode": "none"})))["Id"]
            files = {CARRIER_PATH + rel: data for rel, data in slot.files.items()}
            files[CARRIER_PATH + "/"] = b""  # the volume root: 0700, the container user's
            archive = engine.build_archive("/", files, slot.uid, slot.gid)
            await self._rt.engine_call(lambda c: c.put_archive(carrier, "/", archive))
            # a carrier left holding the volume would keep it from being removed after use;
            # v: the anonymous volumes of an image that declares VOLUME go with it
            await self._rt.engine_call(lambda c: c.remove_container(carrier, force=True, v=True))
        except BaseException:
            await self._discard(name, carrier)
            raise
        return name

    async def _discard(self, name: str, carrier: str = "") -> None:
        """Remove the carrier (if any) and the volume; what fails is retried while the kernel runs."""
        items = [("container", carrier)] if carrier else []
        await self._rt.remove_objects(items + [("volume", name)])

    async def settled(self) -> None:
        """Return once no volume is being filled (benchmarks: background work has ended)."""
        while self._filling:
            await anyio.sleep(0.01)

    async def close(self) -> None:
        """Stop filling; remove every pooled volume (fills in flight finish, then are dropped)."""
        self._closed = True
        for _, timer in list(self._ready.values()):
            timer.cancel()
        with anyio.CancelScope(shield=True):
            await asyncio.gather(*list(self._tasks), return_exceptions=True)
