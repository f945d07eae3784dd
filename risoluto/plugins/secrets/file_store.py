"""``file`` secret backend: ``<DATA_DIR>/secrets.enc``, the original envelope (docs/secrets.md).

The whole map is one encrypted JSON object, so every mutation rewrites the file: temp
file, fsync, rename, fsync of the directory (``fsutil.atomic_write``). Mutations hold an
``anyio.Lock`` (this process) and an ``flock`` on ``secrets.lock`` (other processes: the
CLI next to a running server); under the flock the file is re-read if another process
replaced it, so no process overwrites a change it has not seen. Memory is swapped only
after the new file is durable: a failed write leaves memory and disk as they were.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator

import anyio

from risoluto.fsutil import atomic_write, ensure_private_dir
from risoluto.hookspecs import hookimpl
from risoluto.hookspecs.doctor import FAIL, PASS, CheckResult
from risoluto.hookspecs.secrets import SecretStoreError, WrongMasterKey

from risoluto.crypto import DecryptError, FormatError, decode_envelope, derive_key, encode_envelope
from risoluto.keys import key_for_check

if TYPE_CHECKING:
    from risoluto.kernel import Kernel
    from risoluto.settings import Settings

FILE_NAME = "secrets.enc"
LOCK_NAME = "secrets.lock"
_Sig = tuple[int, int, int] | None


class FileStore:
    backend = "file"

    def __init__(self, settings: Settings, master_key: str):
        self.path: Path = settings.data_path / FILE_NAME
        self.location = str(self.path)
        self._lock_path = settings.data_path / LOCK_NAME
        self._key = derive_key(master_key)
        self._data: dict[str, str] = {}
        self._sig: _Sig = None  # identity (inode, size, mtime) of the file memory matches
        self._lock = anyio.Lock()
        self._mem = threading.Lock()  # memory swaps happen in worker threads

    # -- protocol --------------------------------------------------------------------------

    async def open(self) -> None:
        await anyio.to_thread.run_sync(self._open_sync)

    async def list(self) -> list[str]:
        return sorted(await self._fresh())

    async def get(self, name: str) -> str | None:
        return (await self._fresh()).get(name)

    async def set(self, name: str, value: str) -> None:
        await self.set_many({name: value})

    async def set_many(self, items: dict[str, str]) -> None:
        def change(data: dict[str, str]) -> bool:
            data.update(items)
            return True

        await self._mutate(change)

    async def delete(self, name: str) -> bool:
        return bool(await self._mutate(lambda data: data.pop(name, None) is not None))

    async def rotate(self, new_master_key: str) -> None:
        new_key = derive_key(new_master_key)
        async with self._lock:
            await anyio.to_thread.run_sync(self._rotate_sync, new_key)

    async def close(self) -> None:
        return None

    # -- internals -------------------------------------------------------------------------

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """Exclusive across threads and processes for one read-modify-write."""
        ensure_private_dir(self.path.parent)
        fd = os.open(self._lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            with self._mem:
                fcntl.flock(fd, fcntl.LOCK_EX)
                yield
        finally:
            os.close(fd)  # releases the flock

    def _stat(self) -> _Sig:
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return None
        return (st.st_ino, st.st_size, st.st_mtime_ns)

    def _open_sync(self) -> None:
        with self._locked():
            self._remove_stale_temps()
            self._data, self._sig = self.read()

    def _remove_stale_temps(self) -> None:
        # left by a crash between mkstemp and rename; safe: every writer holds the flock
        for tmp in self.path.parent.glob(f".{FILE_NAME}.*.tmp"):
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()

    def read(self) -> tuple[dict[str, str], _Sig]:
        """Read and decrypt the file as it is now; never writes."""
        try:
            fh = open(self.path, "rb")
        except FileNotFoundError:
            return {}, None
        with fh:
            st = os.fstat(fh.fileno())
            raw = fh.read()
        try:
            data = decode_envelope(self._key, raw)
        except FormatError as exc:
            raise SecretStoreError(
                f"{self.path} is not a valid secrets envelope ({exc}); restore it from a backup. "
                "Nothing was changed."
            ) from None
        except DecryptError:
            raise WrongMasterKey(
                f"{self.path} does not decrypt with the configured master key: the key does not match "
                "(or the file was modified). Nothing was changed."
            ) from None
        return data, (st.st_ino, st.st_size, st.st_mtime_ns)

    def _refresh_locked(self) -> dict[str, str]:
        """Memory, re-read first if another process replaced the file (caller holds the lock)."""
        if self._stat() != self._sig:
            try:
                self._data, self._sig = self.read()
            except WrongMasterKey:
                raise SecretStoreError(
                    f"{self.path} was replaced by another process and no longer decrypts with this "
                    "process's master key (was the key rotated?); restart with the new key. Nothing was changed."
                ) from None
        return self._data

    async def _fresh(self) -> dict[str, str]:
        if self._stat() != self._sig:  # one stat(): cheap enough for every read
            async with self._lock:
                await anyio.to_thread.run_sync(self._refresh_under_lock)
        return self._data

    def _refresh_under_lock(self) -> None:
        with self._locked():
            self._refresh_locked()

    async def _mutate(self, change: Callable[[dict[str, str]], Any]) -> Any:
        async with self._lock:
            return await anyio.to_thread.run_sync(self._mutate_sync, change)

    def _mutate_sync(self, change: Callable[[dict[str, str]], Any]) -> Any:
        with self._locked():
            new = dict(self._refresh_locked())
            changed = change(new)
            if changed:
                self._write(self._key, new)
            return changed

    def _rotate_sync(self, new_key: bytes) -> None:
        with self._locked():
            data = self._refresh_locked()
            self._write(new_key, data)
            self._key = new_key

    def _write(self, key: bytes, data: dict[str, str]) -> None:
        atomic_write(self.path, encode_envelope(key, data), 0o600)
        # only now, with the new file durable, does memory change
        self._data, self._sig = data, self._stat()


@hookimpl
def risoluto_secret_store(settings: Settings, master_key: str) -> FileStore | None:
    if settings.secrets.backend == "file":
        return FileStore(settings, master_key)
    return None


@hookimpl
def risoluto_doctor_checks(kernel: Kernel) -> list[CheckResult]:
    """Does secrets.enc decrypt with the configured key? (read-only)"""
    settings = kernel.settings
    if settings.secrets.backend != "file":
        return []

    item = "credential encryption: store"
    key, report = key_for_check(settings, item)
    if key is None:
        return report
    store = FileStore(settings, key)
    try:
        data, sig = store.read()
    except SecretStoreError as exc:
        return [CheckResult(item=item, status=FAIL, reason=str(exc),
                            fix="start with the key that wrote the file, or restore it from a backup")]
    except OSError as exc:
        return [CheckResult(item=item, status=FAIL, reason=f"{store.path}: {exc.strerror}",
                            fix="make the file readable by the kernel's user")]
    if sig is None:
        return [CheckResult(item=item, status=PASS, reason=f"file backend, AES-256-GCM: no {FILE_NAME} yet")]
    return [CheckResult(item=item, status=PASS,
                        reason=f"file backend, AES-256-GCM: {len(data)} secret(s) in {store.path}, key matches")]


@hookimpl
def risoluto_checklist_provides() -> list[str]:
    # any loaded backend; a secrets.backend no plugin provides stops the start (secrets service)
    return ["secret store"]
