"""``risoluto serve`` as a real process, for the tests that need the whole server: start it in
an operator's environment, wait until it answers, stop it the way an init system does."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

RISOLUTO = [sys.executable, "-m", "risoluto.cli"]
ROOT = Path(__file__).resolve().parent.parent


def operator_env(**extra: str) -> dict[str, str]:
    """This environment without RISOLUTO_* and MASTER_KEY (a test's own settings never leak in)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RISOLUTO_") and k != "MASTER_KEY"}
    return {**env, **extra}


def spawn(argv: list[str], env: dict[str, str], cwd: Path = ROOT,
          stdout: int = subprocess.DEVNULL) -> subprocess.Popen:
    """Start ``argv``; its stderr is kept (text) for the assertions."""
    return subprocess.Popen(argv, env=env, cwd=cwd, stdout=stdout, stderr=subprocess.PIPE, text=True)


def wait_answering(proc: subprocess.Popen, url: str, timeout: float = 30.0) -> httpx.Response | None:
    """The first answer of ``url``, whatever its status; None if ``proc`` exited first."""
    deadline = time.monotonic() + timeout
    while proc.poll() is None:
        try:
            return httpx.get(url, timeout=1.0)
        except httpx.TransportError:
            if time.monotonic() > deadline:
                proc.kill()
                raise AssertionError(f"{url} did not answer within {timeout:.0f} s") from None
            time.sleep(0.1)
    return None


def stop(proc: subprocess.Popen, timeout: float = 20.0) -> int:
    """SIGTERM, then SIGKILL if it has not exited within ``timeout``; its exit status."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.wait()
