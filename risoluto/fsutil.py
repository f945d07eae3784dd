"""Durable file writes: temp file, fsync, rename, fsync of the directory; whole-line appends."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import secrets
import stat
import tempfile
from pathlib import Path

log = logging.getLogger("risoluto.fsutil")


def ensure_private_dir(path: Path) -> Path:
    """Create ``path`` (and parents) with mode 0700 if missing."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    return path


def ensure_private_file(path: Path) -> Path:
    """Create ``path`` empty with mode 0600 if missing, for a file another library then opens
    (SQLite, for one, would create it 0644). An existing file is never opened.

    Why never: closing *any* descriptor of a file drops every POSIX lock this process holds on
    it, SQLite's included. One ``open``/``close`` of ``risoluto.db`` while the secret store had
    it open made other processes (the CLI) take the database for unused: they checkpointed and
    deleted the WAL under the server, and acknowledged writes were lost. So the file is made
    under a temporary name, closed, and only then linked into place (EEXIST: someone else made
    it first, which is as good).
    """
    if os.path.lexists(path):
        return path
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.new")
    os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600))
    try:
        os.link(tmp, path)
    except FileExistsError:
        pass
    except OSError:  # a file system without hard links: create in place (closed at once)
        with contextlib.suppress(FileExistsError):
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600))
    finally:
        os.unlink(tmp)
    return path


def atomic_write(path: Path, data: bytes, mode: int = 0o600) -> None:
    """Replace ``path`` with ``data`` so a crash leaves the old or the new file, never half."""
    ensure_private_dir(path.parent)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    fsync_dir(path.parent)


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})
# What the doctor wants free next to an audit log: far more than one line (~300 bytes), so a
# log that passes can also take the store's write that goes with it (a secrets.enc rewrite,
# a few WAL pages).
MIN_FREE_BYTES = 1 << 20
_TAIL = 65536


def is_full(exc: BaseException) -> bool:
    """True for "no space left on device" and "disk quota exceeded"."""
    return isinstance(exc, OSError) and exc.errno in FULL_ERRNOS


class LineAppend:
    """One line appended to an NDJSON log, whole or not at all, then kept or taken back.

    The file is held under an exclusive ``flock`` from before the append until ``keep()`` or
    ``take_back()``, so every appender of that log (threads, the CLI next to a server) waits
    its turn and the length taken back to is still the end of the file. The write loops on
    short writes; when it fails (a full disk) the file is truncated back to its length before,
    which needs no space: the next entry never starts glued to half of this one. A tail left
    without its line break (a crash of a writer that did not use this class) is cut first.
    """

    def __init__(self, path: Path, line: str, *, sync: bool = True):
        self.path = path
        data = (line.rstrip("\n") + "\n").encode("utf-8")
        ensure_private_dir(path.parent)
        # read-write: the tail is checked through the same descriptor (pread ignores O_APPEND)
        self._fd: int | None = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC,
                                       0o600)
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX)
            self.start = _cut_torn_tail(path, self._fd)
            _write_all(self._fd, data)
            if sync:
                os.fsync(self._fd)
        except BaseException:
            self.take_back()
            raise

    def keep(self) -> None:
        """The line stays; the lock is released."""
        self._release()

    def take_back(self) -> None:
        """Truncate to the length before the line (never needs space), then release."""
        if self._fd is None:
            return
        try:
            if getattr(self, "start", None) is not None:
                os.ftruncate(self._fd, self.start)
                with contextlib.suppress(OSError):
                    os.fsync(self._fd)
        finally:
            self._release()

    def _release(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)  # drops the flock


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        if written <= 0:  # never for a regular file, but a zero would loop forever
            raise OSError(errno.EIO, "short write made no progress")
        view = view[written:]


def _cut_torn_tail(path: Path, fd: int) -> int:
    """The file's length after cutting a last line that has no line break; caller holds the lock."""
    size = os.fstat(fd).st_size
    if size == 0 or os.pread(fd, 1, size - 1) == b"\n":
        return size  # the usual case: one byte read
    keep, end = 0, size
    while end > 0:  # back, block by block, to the last line break
        start = max(end - _TAIL, 0)
        cut = os.pread(fd, end - start, start).rfind(b"\n")
        if cut >= 0:
            keep = start + cut + 1
            break
        end = start
    os.ftruncate(fd, keep)
    log.warning("%s ended with %d bytes of an unfinished line; cut them", path, size - keep)
    return keep


def append_line(path: Path, line: str, *, sync: bool = False) -> None:
    """Append one line (NDJSON logs), whole or nothing; file 0600. See :class:`LineAppend`."""
    LineAppend(path, line, sync=sync).keep()


def append_problem(path: Path, min_free: int = MIN_FREE_BYTES) -> str | None:
    """Why a line could not be appended to ``path`` now, or None (for the doctor).

    Checked for real, without writing a byte: the file (or, when it does not exist yet, its
    directory) opens for writing as the kernel's user (a read-only mount, a mode, an owner or a
    symlink fail here), and the file system has ``min_free`` bytes and an inode free for that
    user. Nothing is written, so a concurrent appender is never disturbed.
    """
    target = path
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        target = path.parent
        while not target.exists() and target != target.parent:
            target = target.parent
        if not os.access(target, os.W_OK | os.X_OK):
            return f"{target} is not writable, so {path.name} cannot be created"
    except OSError as exc:
        return f"{path}: {exc.strerror or exc}"
    else:
        if not stat.S_ISREG(st.st_mode):
            return f"{path} is not a regular file"
    try:
        if target == path:
            fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_NOFOLLOW | os.O_CLOEXEC)  # as LineAppend opens it
        else:
            fd = os.open(target, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as exc:
        return f"{target} cannot be opened for writing: {exc.strerror or exc}"
    try:
        vfs = os.fstatvfs(fd)
    finally:
        os.close(fd)
    if vfs.f_flag & os.ST_RDONLY:
        return f"{target} is on a read-only file system"
    blocks = vfs.f_bfree if os.geteuid() == 0 else vfs.f_bavail
    free = blocks * vfs.f_frsize
    if free < min_free:
        return f"the file system holding {path} has {free} bytes free (less than {min_free})"
    if target != path and vfs.f_files and not (vfs.f_ffree if os.geteuid() == 0 else vfs.f_favail):
        return f"the file system holding {path} has no inode free"
    return None
