"""Requests/s of GET /api/v1/runtime through the full default stack vs a bare Quart route.

Same hypercorn settings, same machine, same run; load from wrk in another process.
Target: ratio >= 0.9. Also: a 429 (rate-limited) must cost no more than a 200.

Rounds are interleaved (bare, full, limited, bare, ...) so drifting load from other processes
hits every server alike. Reported: each server's best round and the median with its spread; the
ratios as best/best and as the median [min, max] of the per-round ratios (each round's servers
ran seconds apart). The servers' CPU time per request (from /proc) is printed as well: on a
machine shared with other work it moves far less than throughput, which needs a free core. The
load average before and after says how quiet the machine was.

    .venv/bin/python bench/http_overhead.py [seconds] [rounds]
"""

from __future__ import annotations

import contextlib
import os
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _servers import PY, cpu_seconds, free_port, server, wrk  # noqa: E402

import httpx  # noqa: E402

SECONDS = int(sys.argv[1]) if len(sys.argv) > 1 else 5
ROUNDS = int(sys.argv[2]) if len(sys.argv) > 2 else 5
ROOT = Path(__file__).resolve().parent.parent
TARGET = 0.9


def risoluto(port: int, data: Path, limit: int) -> tuple[list[str], dict[str, str]]:
    config = data / "bench.yaml"
    config.write_text(f"rateLimit:\n  api:\n    limit: {limit}\n    windowSeconds: 60\n")
    env = {"RISOLUTO_PORT": str(port), "DATA_DIR": str(data / "data"), "RISOLUTO_CONFIG": str(config)}
    env = {k: v for k, v in {**os.environ, **env}.items() if k not in ("RISOLUTO_WRITE_TOKEN", "MASTER_KEY")}
    return [PY, "-m", "risoluto.cli", "serve"], env


def measure(port: int, pid: int) -> tuple[float, float]:
    """(requests/s, server CPU microseconds per request) of one round."""
    url = f"http://127.0.0.1:{port}/api/v1/runtime"
    wrk(url, seconds=1)  # warm-up
    before = cpu_seconds(pid)
    rate, count = wrk(url, seconds=SECONDS)
    return rate, (cpu_seconds(pid) - before) / max(count, 1) * 1e6


def spread(values: list[float], fmt: str) -> str:
    return f"median {statistics.median(values):{fmt}} [{min(values):{fmt}}, {max(values):{fmt}}]"


def main() -> None:
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as stack:
        base = Path(tmp)
        servers: dict[str, tuple[int, int]] = {}
        for name, limit in (("full", 10**9), ("limited", 1)):
            (base / name).mkdir()
            argv, env = risoluto(port := free_port(), base / name, limit)
            proc = stack.enter_context(server(argv, port, env, "/api/v1/runtime"))
            servers[name] = (port, proc.pid)
        # The baseline serves the very bytes the kernel serves (fetched before the limited
        # server's single allowed request is spent on anything else).
        body = base / "runtime.json"
        body.write_bytes(httpx.get(f"http://127.0.0.1:{servers['full'][0]}/api/v1/runtime").content)
        port = free_port()
        proc = stack.enter_context(server([PY, str(ROOT / "bench" / "bare_quart.py"), str(port), str(body)], port,
                                          None, "/api/v1/runtime"))
        servers = {"bare": (port, proc.pid), **servers}
        rates: dict[str, list[float]] = {name: [] for name in servers}
        cpu: dict[str, list[float]] = {name: [] for name in servers}
        for _ in range(ROUNDS):
            for name, (port, pid) in servers.items():
                rate, micros = measure(port, pid)
                rates[name].append(rate)
                cpu[name].append(micros)
    load_after = os.getloadavg()

    def ratios(a: str, b: str) -> list[float]:
        return [x / y for x, y in zip(rates[a], rates[b], strict=True)]

    labels = {"bare": "bare Quart route", "full": "risoluto full stack (200)", "limited": "risoluto rate-limited 429"}
    print(f"{ROUNDS} interleaved rounds of {SECONDS} s (wrk -t1 -c32); load average "
          f"{load_before[0]:.2f} before, {load_after[0]:.2f} after")
    for name, label in labels.items():
        print(f"{label:26s} best {max(rates[name]):7.0f} req/s, {spread(rates[name], '7.0f')};"
              f"  CPU/request {spread(cpu[name], '5.0f')} us")
    full = ratios("full", "bare")
    print(f"ratio full/bare           {max(rates['full']) / max(rates['bare']):6.2f} best/best, per round "
          f"{spread(full, '.2f')}   (target >= {TARGET})")
    print(f"CPU/request bare/full     {statistics.median(cpu['bare']) / statistics.median(cpu['full']):6.2f} "
          "(medians; the same ratio measured as CPU)")
    limited = ratios("limited", "full")
    print(f"ratio 429/200 throughput  {max(rates['limited']) / max(rates['full']):6.2f} best/best, per round "
          f"{spread(limited, '.2f')}   (target >= 1.0: a 429 costs no more than a 200)")


if __name__ == "__main__":
    main()
