"""The baseline of bench/http_overhead.py: one Quart route on the same hypercorn settings."""

import asyncio
import sys

from hypercorn.asyncio import serve
from hypercorn.config import Config
from quart import Quart

app = Quart("bare")


@app.get("/api/v1/runtime")
async def runtime():
    return {"version": "0.0.0", "plugins": [], "bind": {"host": "127.0.0.1", "port": 0}}


if __name__ == "__main__":
    config = Config()
    config.bind = [f"127.0.0.1:{sys.argv[1]}"]
    config.accesslog = None
    config.h11_max_incomplete_size = 64 * 1024
    asyncio.run(serve(app, config))
