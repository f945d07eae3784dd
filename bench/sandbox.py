"""Sandbox launch speed: the runtime vs ``docker run --rm``, and 20 concurrent API launches.

1. Wall time from request to exit (container removed) of a trivial command (``true``):
   through the runtime (spec hooks + Docker SDK) vs ``docker run --rm`` with the same image,
   user, capabilities, security options, resources, log options, network and mounts, measured
   alternately in the same run, under runc and under runsc. Target: ratio <= 1.0. Before each
   measurement (ours and the baseline alike) the runtime's background engine work (filling
   the next attempt's CODEX_HOME volume) is waited for, so it never overlaps a measurement;
   ``BENCH_GAP_S`` adds an idle pause on top (default 0). A third series, interleaved too, is
   the floor: the same container (the runtime's own create arguments) through the bare SDK
   sequence create, start, wait, inspect + logs (in parallel), remove, with no files put.
2. 20 concurrent ``POST /api/v1/sandboxes`` (``wait: true``) against ``risoluto serve`` on
   loopback: all must succeed, none may be left behind; p50/p95 reported.

Run: ``.venv/bin/python bench/sandbox.py [--rounds N]``. Needs a Docker engine with runsc and
the local test image (scripts/provision-docker, scripts/build-test-images). The docker CLI
is used here only as the baseline.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import anyio
import docker
import httpx
import yaml

ROOT = Path(__file__).resolve().parent.parent
# keep bench/ itself off sys.path: scripts here must never shadow a library module
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != ROOT / "bench"]
sys.path.insert(0, str(ROOT))

from bench._servers import free_port  # noqa: E402
from risoluto.app import kernel_of  # noqa: E402
from risoluto.hookspecs.sandbox import LaunchRequest  # noqa: E402
from risoluto.plugins.sandbox import _engine as engine  # noqa: E402
from risoluto.plugins.sandbox._launcher import build_spec, launch  # noqa: E402
from risoluto.plugins.sandbox._naming import LABEL_INSTANCE, instance_id  # noqa: E402
from risoluto.plugins.sandbox._records import Record  # noqa: E402
from risoluto.settings import build_settings  # noqa: E402
from risoluto.testing import running_app  # noqa: E402

IMAGE = os.environ.get("RISOLUTO_TEST_IMAGE", "risoluto-test:latest")
GAP_S = float(os.environ.get("BENCH_GAP_S", "0"))


def config(tmp: Path, network: str, gvisor: bool, max_concurrent: int = 8) -> dict[str, Any]:
    return {
        "workspace": {"root": str(tmp / "ws")},
        "codex": {"authDir": str(tmp / "auth"), "sandbox": {
            "image": IMAGE, "network": network, "user": "1000:1000", "maxConcurrent": max_concurrent,
            "security": {"gvisor": gvisor},
            "resources": {"memory": "256m", "memoryReservation": "64m", "memorySwap": "256m", "cpus": 1.0,
                          "pidsLimit": 256, "tmpfsSize": "64m"},
        }},
    }


def docker_run_argv(tmp: Path, network: str, gvisor: bool) -> list[str]:
    ws = tmp / "ws" / "BENCH-1"
    argv = [
        "docker", "run", "--rm", "--user", "1000:1000", "--cap-drop", "ALL",
        "--security-opt", "no-new-privileges", "--network", network,
        "--memory", "256m", "--memory-reservation", "64m", "--memory-swap", "256m", "--cpus", "1",
        "--pids-limit", "256", "--mount", "type=tmpfs,destination=/tmp,tmpfs-size=67108864",
        "--log-driver", "json-file", "--log-opt", "max-size=50m", "--log-opt", "max-file=3",
        "--mount", f"type=bind,source={ws},destination=/workspace",
        "--mount", "type=volume,source=risoluto-home-BENCH-1,destination=/home/agent",
        "--mount", "type=volume,destination=/home/agent/.codex-runtime",
        "-e", "HOME=/home/agent", "-e", "CODEX_HOME=/home/agent/.codex-runtime", "-w", "/workspace",
    ]
    if gvisor:
        argv += ["--runtime", "runsc"]
    return argv + [IMAGE, "true"]


async def settle(kernel: Any) -> None:
    """Let background work of the previous run end, so it never overlaps the next measurement."""
    await kernel.backends.runtime.settled()
    await anyio.sleep(GAP_S)


def floor_kwargs(kernel: Any, request: LaunchRequest) -> dict[str, Any]:
    """The runtime's own create arguments for this launch (CODEX_HOME stays an anonymous
    volume: only a launch claims a prepared one)."""
    spec = build_spec(kernel, request, {})
    return engine.create_kwargs(spec, {**spec.labels, LABEL_INSTANCE: kernel.backends.runtime.instance})


def sdk_floor(client: Any, kwargs: dict[str, Any], pool: ThreadPoolExecutor) -> float:
    """The same container through the bare SDK sequence, inspect and logs in parallel as the
    runtime does them, no files put: what any runtime on this engine must pay."""
    start = time.perf_counter()
    cid = client.create_container(**kwargs)["Id"]
    try:
        client.start(cid)
        status = client.wait(cid)["StatusCode"]
        inspected = pool.submit(client.inspect_container, cid)
        client.logs(cid, tail=Record.LOG_TAIL_LINES)
        inspected.result()
    finally:
        client.remove_container(cid, force=True, v=True)
    assert status == 0, status
    return time.perf_counter() - start


async def compare(tmp: Path, gvisor: bool, rounds: int) -> tuple[float, float, float]:
    network = f"rsl-bench-{uuid.uuid4().hex[:6]}"
    data = tmp / f"data-{gvisor}"
    data.mkdir()
    settings = build_settings(config(tmp, network, gvisor), None, {"DATA_DIR": str(data)})
    ours: list[float] = []
    theirs: list[float] = []
    floor: list[float] = []
    async with running_app(settings) as app:
        kernel = kernel_of(app.app)
        request = LaunchRequest(issue="BENCH-1", command=("true",))
        record = await launch(kernel, request, wait=True)  # warm-up: network, HOME volume, caches
        assert record["exit_code"] == 0, record
        argv = docker_run_argv(tmp, network, gvisor)
        subprocess.run(argv, check=True, capture_output=True)
        sdk, kwargs = engine.connect(os.environ), floor_kwargs(kernel, request)
        pool = ThreadPoolExecutor(1)
        for _ in range(rounds):
            await settle(kernel)
            start = time.perf_counter()
            record = await launch(kernel, request, wait=True)
            ours.append(time.perf_counter() - start)
            assert record["exit_code"] == 0, record
            await settle(kernel)
            start = time.perf_counter()
            subprocess.run(argv, check=True, capture_output=True)
            theirs.append(time.perf_counter() - start)
            await settle(kernel)
            floor.append(sdk_floor(sdk, kwargs, pool))
        pool.shutdown()
        sdk.close()
        instance = kernel.backends.runtime.instance
    client = docker.from_env().api
    client.remove_volume("risoluto-home-BENCH-1", force=True)  # the baseline's HOME volume
    for vol in client.volumes(filters={"label": [f"risoluto.instance={instance}"]}).get("Volumes") or []:
        client.remove_volume(vol["Name"], force=True)  # the runtime's HOME volume
    remove_network(client, network)
    return statistics.median(ours), statistics.median(theirs), statistics.median(floor)


async def concurrent(tmp: Path, count: int) -> tuple[list[float], int, int]:
    network = f"rsl-bench-{uuid.uuid4().hex[:6]}"
    data = tmp / "data-http"
    data.mkdir()
    cfg = tmp / "serve.yaml"
    cfg.write_text(yaml.safe_dump(config(tmp, network, False, max_concurrent=count)))
    port = free_port()
    env = {**os.environ, "DATA_DIR": str(data), "RISOLUTO_CONFIG": str(cfg), "RISOLUTO_PORT": str(port)}
    server = subprocess.Popen([sys.executable, "-m", "risoluto.cli", "serve"], env=env, cwd=ROOT,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    times: list[float] = []
    failures = 0
    base = f"http://127.0.0.1:{port}"
    try:
        async with httpx.AsyncClient(base_url=base, timeout=120) as http:
            with anyio.fail_after(30):
                while True:
                    try:
                        if (await http.get("/api/v1/runtime")).status_code == 200:
                            break
                    except httpx.TransportError:
                        await anyio.sleep(0.1)

            async def one(n: int) -> None:
                nonlocal failures
                start = time.perf_counter()
                r = await http.post("/api/v1/sandboxes",
                                    json={"issue": f"CONC-{n}", "command": ["true"], "wait": True})
                times.append(time.perf_counter() - start)
                if r.status_code != 201 or r.json()["exit_code"] != 0:
                    failures += 1

            async with anyio.create_task_group() as tg:
                for n in range(count):
                    tg.start_soon(one, n)
    finally:
        server.terminate()
        server.wait(30)
    client = docker.from_env().api
    instance = instance_id(build_settings({}, None, {"DATA_DIR": str(data)}))
    label = {"label": [f"risoluto.instance={instance}"]}
    leaked = len(client.containers(all=True, filters=label))
    leaked += len(client.containers(all=True, filters={"label": [f"risoluto.carrier={instance}"]}))
    leaked += sum(1 for v in client.volumes(filters=label).get("Volumes") or []
                  if (v.get("Labels") or {}).get("risoluto.scope") == "attempt")
    for vol in client.volumes(filters=label).get("Volumes") or []:
        client.remove_volume(vol["Name"], force=True)
    remove_network(client, network)
    return times, failures, leaked


async def concurrent_docker_run(tmp: Path, count: int) -> list[float]:
    """Baseline for the concurrent case: ``count`` simultaneous ``docker run --rm``."""
    network = f"rsl-bench-{uuid.uuid4().hex[:6]}"
    client = docker.from_env().api
    client.create_network(network, driver="bridge")
    times: list[float] = []

    async def one(n: int) -> None:
        ws = tmp / "ws" / f"RUN-{n}"
        ws.mkdir(parents=True, exist_ok=True)
        argv = [a.replace("BENCH-1", f"RUN-{n}") for a in docker_run_argv(tmp, network, False)]
        start = time.perf_counter()
        await anyio.run_process(argv, check=True)
        times.append(time.perf_counter() - start)

    try:
        async with anyio.create_task_group() as tg:
            for n in range(count):
                tg.start_soon(one, n)
    finally:
        for n in range(count):
            client.remove_volume(f"risoluto-home-RUN-{n}", force=True)
        remove_network(client, network)
    return times


def remove_network(client: Any, network: str) -> None:
    """The engine may still be detaching the last `docker run --rm` endpoints: retry briefly."""
    for _ in range(50):
        try:
            client.remove_network(network)
            return
        except docker.errors.APIError as exc:
            if "active endpoints" not in str(exc):
                raise
            time.sleep(0.1)
    client.remove_network(network)


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--concurrent", type=int, default=20)
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="risoluto-bench-"))
    try:
        print(f"image {IMAGE}; {args.rounds} rounds each, medians; request -> exit (container removed)")
        for gvisor in (False, True):
            ours, theirs, floor = await compare(tmp, gvisor, args.rounds)
            name = "runsc" if gvisor else "runc"
            print(f"{name:5}  runtime {ours * 1000:7.1f} ms   docker run --rm {theirs * 1000:7.1f} ms   "
                  f"ratio {ours / theirs:.2f} (target <= 1.0)")
            print(f"{'':5}  SDK floor {floor * 1000:5.1f} ms (create, start, wait, inspect+logs, remove; "
                  f"no files): {floor / theirs:.2f}x docker run --rm; runtime {ours / floor:.2f}x the floor")
        times, failures, leaked = await concurrent(tmp, args.concurrent)
        base = await concurrent_docker_run(tmp, args.concurrent)
        print(f"{args.concurrent} concurrent API launches (runc, HTTP, wait=true): ok {len(times) - failures}/"
              f"{len(times)}, p50 {pct(times, 0.5) * 1000:.0f} ms, p95 {pct(times, 0.95) * 1000:.0f} ms, "
              f"leaked {leaked}")
        print(f"{args.concurrent} concurrent docker run --rm (baseline): p50 {pct(base, 0.5) * 1000:.0f} ms, "
              f"p95 {pct(base, 0.95) * 1000:.0f} ms; ratio p50 {pct(times, 0.5) / pct(base, 0.5):.2f}, "
              f"p95 {pct(times, 0.95) / pct(base, 0.95):.2f}")
        if failures or leaked:
            raise SystemExit(1)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    anyio.run(main)
