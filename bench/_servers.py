"""Helpers for benchmarks: free ports, server subprocesses, wrk runs, latency summaries."""

from __future__ import annotations

import contextlib
import os
import re
import socket
import statistics
import subprocess
import sys
import time
from typing import Any, Iterator

import httpx


def stats(samples: list[float]) -> dict[str, float]:
    """p50, mean and p90 of durations in seconds, in microseconds."""
    samples = sorted(samples)
    return {"p50": statistics.median(samples) * 1e6, "mean": statistics.fmean(samples) * 1e6,
            "p90": samples[int(len(samples) * 0.9)] * 1e6}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def server(argv: list[str], port: int, env: dict[str, str] | None = None,
           path: str = "/") -> Iterator[subprocess.Popen[str]]:
    """Run a server process until the block ends; wait until ``path`` answers. Yields the process."""
    proc = subprocess.Popen(argv, env={**os.environ, **(env or {})}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 30
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"server {argv} exited: {proc.stderr.read() if proc.stderr else ''}")
            try:
                httpx.get(f"http://127.0.0.1:{port}{path}", timeout=1)
                break
            except httpx.TransportError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"server {argv} did not answer") from None
                time.sleep(0.1)
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()


PY = sys.executable


def cpu_seconds(pid: int) -> float:
    """User + system CPU time a process has used so far (Linux /proc)."""
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def wrk(url: str, seconds: int = 5, connections: int = 32, threads: int = 1) -> tuple[float, int]:
    """(requests per second, requests completed) measured by wrk in its own process."""
    out = subprocess.run(["wrk", f"-t{threads}", f"-c{connections}", f"-d{seconds}s", url],
                         capture_output=True, text=True, check=True).stdout
    rate = re.search(r"Requests/sec:\s+([0-9.]+)", out)
    count = re.search(r"([0-9]+) requests in", out)
    if not rate or not count:
        raise RuntimeError(f"cannot parse wrk output:\n{out}")
    return float(rate.group(1)), int(count.group(1))


def wait_port(port: int, proc: Any, what: str, timeout: float = 30.0) -> None:
    """Until ``port`` on loopback accepts a connection; SystemExit if ``proc`` (a Popen or a
    multiprocessing Process) exits first or ``timeout`` passes."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            alive = proc.poll() is None if isinstance(proc, subprocess.Popen) else proc.is_alive()
            if not alive:
                raise SystemExit(f"{what} exited before listening") from None
            time.sleep(0.05)
    raise SystemExit(f"{what} did not listen on {port}")
