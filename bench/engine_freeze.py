"""Routes that do not need the Docker engine, while it is frozen: p99 of ``GET /api/v1/runtime``
and ``GET /api/v1/secrets`` (file backend) against ``risoluto serve`` on loopback.

1. Baseline: the engine healthy, nothing else in flight.
2. The engine frozen (``SIGSTOP`` on dockerd) with 50 ``GET /api/v1/sandboxes`` waiting on it
   (each answers 503 at ``sandbox.engineTimeoutSeconds``, 10 s; the measurement ends before).

The phases alternate (``--rounds``, default 3), so that load from other work on the machine
falls on both alike. In the last round the 50 requests are left to their deadline (their
answers and times are printed); in the others the engine is thawed and they complete.

Target: p99 under 50 ms for both routes in phase 2; the ratio to phase 1, measured in the same
run, is printed too. Before the runtime had its own bounded pool, 45 waiting engine calls took
anyio's shared threads and a secret write waited 57 s.

The frozen engine is one of the benchmark's own (tests/own_engine.py: a second dockerd with its
own data root, socket and bridge, stopped by its pid); the machine's shared engine is never
frozen. Needs root and the local test image on the shared engine (it is copied, never pulled).

Run: ``.venv/bin/python bench/engine_freeze.py [--seconds S]``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import yaml

ROOT = Path(__file__).resolve().parent.parent
# keep bench/ itself off sys.path: scripts here must never shadow a library module
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != ROOT / "bench"]
sys.path.insert(0, str(ROOT))
sys.path.insert(1, str(ROOT / "tests"))

from bench._servers import free_port, server  # noqa: E402
from own_engine import TEST_IMAGE, OwnEngine, missing  # noqa: E402

WAITING = 50
TARGET_MS = 50.0
DEADLINE_S = 10.0  # the default sandbox.engineTimeoutSeconds


def p(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(len(ordered) * q))] * 1000


def measure(base: str, seconds: float) -> dict[str, list[float]]:
    """Alternate the two routes on one keep-alive connection for ``seconds``."""
    out: dict[str, list[float]] = {"/runtime": [], "/secrets": []}
    with httpx.Client(timeout=30) as client:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            for path, samples in out.items():
                t0 = time.perf_counter()
                response = client.get(base + path)
                samples.append(time.perf_counter() - t0)
                assert response.status_code == 200, (path, response.status_code, response.text[:200])
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=2.5, help="measurement per phase (< 8)")
    parser.add_argument("--rounds", type=int, default=3, help="healthy/frozen phase pairs")
    args = parser.parse_args()
    seconds = min(args.seconds, DEADLINE_S - 2.5)  # the waiting requests must outlast it
    why = missing()
    if why:
        print(f"cannot run: {why}", file=sys.stderr)
        return 2
    tmp = Path(tempfile.mkdtemp(prefix="rsl-bench-freeze-"))
    engine = OwnEngine()
    try:
        engine.start()
        engine.load_test_image()
        (tmp / "data").mkdir(mode=0o700)
        config = {
            "codex": {"authDir": str(tmp / "auth"),
                      # a runtime pool (maxConcurrent * 3 + 8 = 56 threads) that holds all 50 waiting calls
                      "sandbox": {"image": TEST_IMAGE, "network": "none", "user": "1000:1000", "maxConcurrent": 16}},
            "workspace": {"root": str(tmp / "ws")},
            "sandbox": {"engineTimeoutSeconds": DEADLINE_S},
            "rateLimit": {"api": {"limit": 100_000_000}},  # the benchmark is the only client
        }
        (tmp / "config.yaml").write_text(yaml.safe_dump(config))
        port = free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith("RISOLUTO_")}
        env.update(DATA_DIR=str(tmp / "data"), RISOLUTO_CONFIG=str(tmp / "config.yaml"), RISOLUTO_PORT=str(port),
                   DOCKER_HOST=engine.host, MASTER_KEY="bench-engine-freeze-master-key")
        base = f"http://127.0.0.1:{port}/api/v1"
        with server([sys.executable, "-m", "risoluto.cli", "serve"], port, env, path="/api/v1/runtime"):
            with httpx.Client(timeout=30) as client:
                for n in range(5):  # a few names to list; the store and the engine connection are warm
                    assert client.post(f"{base}/secrets/BENCH_{n}", json={"value": "v"}).status_code == 204
                assert client.get(base + "/sandboxes").status_code == 200
            healthy: dict[str, list[float]] = {"/runtime": [], "/secrets": []}
            frozen: dict[str, list[float]] = {"/runtime": [], "/secrets": []}
            for n in range(args.rounds):
                for route, samples in measure(base, seconds).items():
                    healthy[route] += samples
                last = n == args.rounds - 1
                got, answers = frozen_phase(engine, base, seconds, to_deadline=last)
                for route, samples in got.items():
                    frozen[route] += samples
    finally:
        engine.close()
        shutil.rmtree(tmp, ignore_errors=True)
    report(healthy, frozen, answers)
    return 0 if all(p(frozen[r], 0.99) < TARGET_MS for r in frozen) else 1


def frozen_phase(engine: OwnEngine, base: str, seconds: float,
                 to_deadline: bool) -> tuple[dict[str, list[float]], list[str]]:
    answers: list[str] = []
    lock = threading.Lock()

    def waiting(client: httpx.Client) -> None:
        t0 = time.monotonic()
        with client:
            response = client.get(base + "/sandboxes")
        code = response.json().get("error", {}).get("code", "") if response.status_code != 200 else ""
        with lock:
            answers.append(f"{response.status_code} {code} after {time.monotonic() - t0:.1f} s")

    clients = [httpx.Client(timeout=60) for _ in range(WAITING)]  # made beforehand: each costs a TLS context
    engine.freeze()
    try:
        with ThreadPoolExecutor(WAITING) as pool:
            for client in clients:
                pool.submit(waiting, client)
            time.sleep(1.5)  # all of them are in, and waiting on the engine
            frozen = measure(base, seconds)
            with lock:
                early = len(answers)
            assert early == 0, f"{early} of the {WAITING} engine requests answered before the measurement ended"
            if not to_deadline:
                engine.thaw()  # they complete now
    finally:
        engine.thaw()
    return frozen, answers


def report(healthy: dict[str, list[float]], frozen: dict[str, list[float]], answers: list[str]) -> None:
    print(f"{'route':<16}{'healthy p50':>12}{'healthy p99':>12}{'frozen p50':>12}{'frozen p99':>12}"
          f"{'p99 ratio':>10}  samples")
    for route in healthy:
        h99, f99 = p(healthy[route], 0.99), p(frozen[route], 0.99)
        print(f"GET {route:<12}{p(healthy[route], 0.5):>10.1f}ms{h99:>10.1f}ms{p(frozen[route], 0.5):>10.1f}ms"
              f"{f99:>10.1f}ms{f99 / h99:>9.2f}x  {len(healthy[route])}/{len(frozen[route])}"
              f"  {'OK' if f99 < TARGET_MS else 'OVER'} (target p99 < {TARGET_MS:.0f} ms frozen)")
    summary: dict[str, int] = {}
    for a in answers:
        key = a.split(" after ")[0]
        summary[key] = summary.get(key, 0) + 1
    worst = max((float(a.split(" after ")[1].split()[0]) for a in answers), default=0.0)
    print(f"the {WAITING} engine requests: {summary}, slowest after {worst:.1f} s "
          f"(deadline {DEADLINE_S:g} s); machine shared with other work: compare ratios, not absolutes")


if __name__ == "__main__":
    sys.exit(main())
