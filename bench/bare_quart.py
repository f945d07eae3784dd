"""The baseline of bench/http_overhead.py: one Quart route on the same hypercorn settings.

It answers the same bytes the kernel's ``GET /api/v1/runtime`` answers (read from the file
named by argv[2], encoded once, as the kernel does), so the ratio measures the stack, not the
payload size.
"""

import asyncio
import sys
from pathlib import Path

from hypercorn.asyncio import serve
from hypercorn.config import Config
from quart import Quart, Response

app = Quart("bare")
BODY = Path(sys.argv[2]).read_bytes() if len(sys.argv) > 2 else b'{"version":"0.0.0"}'


@app.get("/api/v1/runtime")
async def runtime():
    return Response(BODY, content_type="application/json")


if __name__ == "__main__":
    config = Config()
    config.bind = [f"127.0.0.1:{sys.argv[1]}"]
    config.accesslog = None
    config.errorlog = "-"
    config.graceful_timeout = 10
    config.h11_max_incomplete_size = 64 * 1024
    asyncio.run(serve(app, config))
