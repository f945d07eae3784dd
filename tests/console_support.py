"""Helpers for the console's browser tests and benchmark: Debian's chromium driven by Playwright,
a real ``risoluto serve`` process, a recorder of every response body the page receives, and a
small page server standing in for another web site.

Chromium is /usr/bin/chromium (``scripts/test`` installs Debian's package); Playwright's own
browser download is never used. A browser "from afar" is the same chromium started inside a
network namespace: Playwright launches a two-line wrapper that enters the namespace first.
"""

from __future__ import annotations

import asyncio
import contextlib
import http.server
import os
import subprocess
import threading
import time
from pathlib import Path
from typing import Any, AsyncIterator

import httpx
import pytest
import yaml

from http_support import free_port
from serve_util import RISOLUTO, ROOT, operator_env, stop

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--no-first-run"]


def require_chromium() -> None:
    if not os.path.exists(CHROMIUM):
        message = f"{CHROMIUM} is missing: scripts/test installs Debian's chromium (apt-get install chromium)"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(message)
        pytest.skip(message)


@contextlib.asynccontextmanager
async def chromium(executable: str = CHROMIUM, args: tuple[str, ...] = ()) -> AsyncIterator[Any]:
    """A headless Debian chromium under Playwright (its browser download is never used)."""
    from playwright.async_api import async_playwright

    require_chromium()
    async with async_playwright() as pw:
        browser = await pw.chromium.launch(executable_path=executable, headless=True, args=[*CHROMIUM_ARGS, *args])
        try:
            yield browser
        finally:
            await browser.close()


def chromium_in_netns(tmp: Path, netns_name: str) -> str:
    """An executable that starts Debian's chromium inside ``netns_name`` (fds pass through)."""
    wrapper = tmp / "chromium-in-netns"
    wrapper.write_text(f'#!/bin/sh\nexec ip netns exec {netns_name} {CHROMIUM} "$@"\n')
    wrapper.chmod(0o755)
    return str(wrapper)


class Served:
    """``risoluto serve`` as an operator runs it; its stderr goes to a file (never a full pipe)."""

    def __init__(self, tmp: Path, data: Path, env: dict[str, str] | None = None, bind: str = "127.0.0.1",
                 config: dict[str, Any] | None = None):
        self.tmp, self.data, self.bind = tmp, data, bind
        self.data.mkdir(mode=0o700, exist_ok=True)
        self.port = free_port(bind)
        self.env = operator_env(DATA_DIR=str(data), RISOLUTO_BIND=bind, RISOLUTO_PORT=str(self.port), **(env or {}))
        if config is not None:
            path = tmp / f"serve-{self.port}.yaml"
            path.write_text(yaml.safe_dump(config))
            self.env["RISOLUTO_CONFIG"] = str(path)
        self.log = tmp / f"serve-{self.port}.log"
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://{self.bind}:{self.port}"

    def start(self) -> Served:
        with open(self.log, "w") as err:
            self.proc = subprocess.Popen([*RISOLUTO, "serve"], env=self.env, cwd=ROOT, stdout=subprocess.DEVNULL,
                                         stderr=err)
        deadline = time.monotonic() + 60
        while True:
            assert self.proc.poll() is None, f"risoluto serve exited: {self.log.read_text()}"
            try:
                httpx.get(self.url + "/api/v1/runtime", timeout=2)
                return self
            except httpx.TransportError:
                assert time.monotonic() < deadline, f"risoluto serve did not answer: {self.log.read_text()}"
                time.sleep(0.1)

    def stop(self) -> str:
        if self.proc is not None:
            stop(self.proc, timeout=60)
        return self.log.read_text()


class Bodies:
    """Every response the page receives, with its body (event streams excepted: they never end)."""

    def __init__(self, page: Any):
        self.items: list[tuple[str, int, bytes]] = []
        self.requests: list[tuple[str, str, bytes]] = []
        self._pending: list[asyncio.Task] = []
        page.on("response", self._on_response)
        page.on("request", self._on_request)

    def _on_request(self, request: Any) -> None:
        body = request.post_data_buffer or b""
        self.requests.append((request.method, request.url, body))

    def _on_response(self, response: Any) -> None:
        if "text/event-stream" in (response.headers.get("content-type") or ""):
            return
        self._pending.append(asyncio.ensure_future(self._read(response)))

    async def _read(self, response: Any) -> None:
        try:
            body = await response.body()
        except Exception:  # a redirect has no body to read
            body = b""
        self.items.append((response.url, response.status, body))

    async def settle(self) -> list[tuple[str, int, bytes]]:
        await asyncio.gather(*self._pending)
        return self.items


class PageServer:
    """One HTML page on ``host:port``: "another web site" for the cross-origin tests."""

    def __init__(self, host: str, html: str):
        body = html.encode()

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (http.server's name)
                self.send_response(200)
                self.send_header("Content-Type", "text/html; charset=utf-8")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer((host, 0), Handler)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> PageServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.server.shutdown()
        self.server.server_close()


def csrf_form(target: str) -> str:
    """A page that posts JSON to ``target`` as soon as it loads: a text/plain form whose one field
    ``name=value`` reads as a JSON object (the classic way to send JSON without CORS)."""
    return ('<!doctype html><form id="f" method="post" enctype="text/plain" action="' + target + '">'
            '<input name=\'{"value":"csrf-planted","pad":"\' value=\'"}\'></form>'
            '<script>document.getElementById("f").submit()</script>')
