"""A small tmpfs to run a kernel's DATA_DIR on, and ways to fill it (tests of full disks).

Mounting needs root: without it the test is skipped, but with ``CI=true`` it FAILS (a full
disk is part of what the suite must prove). The mount is always undone in teardown.
"""

from __future__ import annotations

import contextlib
import errno
import os
import subprocess
from pathlib import Path
from typing import Iterator

import pytest


def _unavailable(reason: str) -> None:
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"full-disk tests need to mount a tmpfs under CI=true: {reason}")
    pytest.skip(reason)


@contextlib.contextmanager
def small_tmpfs(path: Path, size: str = "2m") -> Iterator[Path]:
    """``path`` as a fresh tmpfs of ``size`` (mode 0700), unmounted on exit."""
    if os.geteuid() != 0:
        _unavailable("mounting a tmpfs needs root")
    path.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(path)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        _unavailable(f"mount -t tmpfs failed: {done.stderr.strip()}")
    try:
        yield path
    finally:
        if subprocess.run(["umount", str(path)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(path)], capture_output=True)  # a process still holds a file


def fill(path: Path, leave: int = 0) -> Path:
    """Write ``path`` until its file system is full, then give back ``leave`` bytes; the filler's path."""
    filler = path / "filler.bin"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        for chunk in (1 << 20, 1 << 16, 4096, 512, 1):
            block = b"\xff" * chunk
            while True:
                try:
                    os.write(fd, block)
                except OSError as exc:
                    if exc.errno != errno.ENOSPC:
                        raise
                    break
        if leave:
            os.ftruncate(fd, max(os.fstat(fd).st_size - leave, 0))
    finally:
        os.close(fd)
    return filler


def free_bytes(path: Path) -> int:
    vfs = os.statvfs(path)
    return vfs.f_bfree * vfs.f_frsize
