"""Requests/s of GET /api/v1/runtime through the full default stack vs a bare Quart route.

Same hypercorn settings, same machine, same run; load from wrk in another process.
Target: ratio >= 0.85. Also: a 429 (rate-limited) must cost no more than a 200.

    .venv/bin/python bench/http_overhead.py [seconds]
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _servers import PY, free_port, server, wrk  # noqa: E402

SECONDS = int(sys.argv[1]) if len(sys.argv) > 1 else 5
ROOT = Path(__file__).resolve().parent.parent


def risoluto(port: int, data: Path, limit: int) -> tuple[list[str], dict[str, str]]:
    config = data / "bench.yaml"
    config.write_text(f"rateLimit:\n  api:\n    limit: {limit}\n    windowSeconds: 60\n")
    env = {"RISOLUTO_PORT": str(port), "DATA_DIR": str(data / "data"), "RISOLUTO_CONFIG": str(config)}
    env = {k: v for k, v in {**os.environ, **env}.items() if k not in ("RISOLUTO_WRITE_TOKEN", "MASTER_KEY")}
    return [PY, "-m", "risoluto.cli", "serve"], env


def measure(argv: list[str], env: dict[str, str] | None, port: int) -> float:
    with server(argv, port, env, "/api/v1/runtime"):
        wrk(f"http://127.0.0.1:{port}/api/v1/runtime", seconds=1)  # warm-up
        return wrk(f"http://127.0.0.1:{port}/api/v1/runtime", seconds=SECONDS)


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp)
        port = free_port()
        bare = measure([PY, str(ROOT / "bench" / "bare_quart.py"), str(port)], None, port)
        (base / "a").mkdir()
        argv, env = risoluto(port := free_port(), base / "a", 10**9)
        full = measure(argv, env, port)
        (base / "b").mkdir()
        argv, env = risoluto(port := free_port(), base / "b", 1)
        limited = measure(argv, env, port)
    print(f"bare Quart route          {bare:10.0f} req/s")
    print(f"risoluto full stack (200) {full:10.0f} req/s")
    print(f"risoluto rate-limited 429 {limited:10.0f} req/s")
    print(f"ratio full/bare           {full / bare:10.2f}   (target >= 0.85)")
    print(f"ratio 429/200 throughput  {limited / full:10.2f}   (target >= 1.0: a 429 costs no more than a 200)")


if __name__ == "__main__":
    main()
