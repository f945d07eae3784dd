"""The console's egress panel in a real browser, against a real ``risoluto serve`` and real workers.

A worker's curl to a host that is not on the allowlist, with ``egress.onUnlisted: ask``, is held
by the egress proxy while an approval waits. The approval appears in the console with the time
left; a click on "Allow once" lets that curl finish with 200; a click on "Deny" ends another one
at once, and its refusal appears (marked) in the live list of decisions, pushed by the decision
stream. Targets are the egress tests' own servers (HTTP/TLS/DNS in a network namespace of the
test, a throwaway CA): nothing leaves this machine.

These tests need the egress decision routes (``/api/v1/egress/decisions``, its ``/stream`` and
``/api/v1/egress/approvals``); without them the panel says so, which test_console.py shows.
"""

from __future__ import annotations

import re
import time
from typing import Any

import anyio
import httpx
import pytest

from console_support import Served, chromium
from docker_util import docker_engine, sandbox_world  # noqa: F401
from test_egress_docker import ALLOW, targets

pytestmark = [pytest.mark.anyio, pytest.mark.docker]

MASTER_KEY = "console-egress-test-master-key"


def worker_script(ca_pem: str, tag: str) -> str:
    """One held CONNECT: curl through the sandbox's proxy to an unlisted name, then its result."""
    return "\n".join([
        f"cat > /tmp/ca.pem <<'EOF'\n{ca_pem}EOF",
        f"echo start-{tag}",
        "out=$(curl -sS -o /dev/null --cacert /tmp/ca.pem -m 90 -w '%{http_code}/%{http_connect}' "
        "https://unlisted.test/ 2>/dev/null); rc=$?",
        f"echo result-{tag}=$out rc$rc",
    ])


async def logs_until(base: str, sandbox_id: str, pattern: str, timeout: float) -> str:
    with anyio.fail_after(timeout):
        while True:
            text = httpx.get(f"{base}/api/v1/sandboxes/{sandbox_id}/logs", timeout=10).json()["logs"]
            if re.search(pattern, text):
                return text
            await anyio.sleep(0.3)


def expect(locator: Any) -> Any:
    from playwright.async_api import expect as pw_expect

    return pw_expect(locator)


async def test_a_held_request_is_approved_or_denied_with_a_click(sandbox_world, tmp_path):  # noqa: F811
    async with targets(sandbox_world.tmp) as t:
        config = sandbox_world.config({
            "codex": {"sandbox": {"egressAllowlist": ALLOW}},
            "egress": {"resolver": f"{t.ns.ns_ip}:53", "allowPrivateNetworks": [t.ns.cidr],
                       "onUnlisted": "ask", "askTimeoutSeconds": 30},
        })
        served = Served(tmp_path, sandbox_world.data, {"MASTER_KEY": MASTER_KEY}, config=config).start()
        base = served.url
        ca_pem = t.ca.ca_path.read_text()
        try:
            async with chromium() as browser:
                page = await browser.new_page(viewport={"width": 1280, "height": 1000})
                await page.goto(base + "/")
                await expect(page.locator("#egress-live")).to_be_visible(timeout=15000)
                await expect(page.locator("#egress-unavailable")).to_be_hidden()

                # 1. allow once: the held curl finishes with 200
                first = httpx.post(base + "/api/v1/sandboxes", timeout=120, json={
                    "issue": "CONSOLE-ASK-1", "command": ["sh", "-c", worker_script(ca_pem, "one")]}).json()
                held = page.locator("#approvals-rows tr", has_text="unlisted.test")
                await expect(held).to_have_count(1, timeout=60000)
                await expect(held).to_contain_text("CONSOLE-ASK-1")
                left = await held.locator("td.left").inner_text()
                assert re.fullmatch(r"\d+ s", left) and 0 < int(left.split()[0]) <= 30, left
                await page.locator("#egress").screenshot(path=str(tmp_path / "egress-pending.png"))
                asked = time.monotonic()
                await held.locator("button[data-decision=allow-once]").click()
                text = await logs_until(base, first["id"], r"result-one=", 60)
                assert "result-one=200/200 rc0" in text, text
                assert time.monotonic() - asked < 30  # answered by the click, not by the timeout
                await expect(held).to_have_count(0, timeout=15000)
                allowed = page.locator("#decisions-rows tr.v-allow", has_text="unlisted.test")
                await expect(allowed.first).to_be_visible(timeout=10000)

                # 2. deny: the next held curl ends at once, refused, and the refusal is marked
                second = httpx.post(base + "/api/v1/sandboxes", timeout=120, json={
                    "issue": "CONSOLE-ASK-2", "command": ["sh", "-c", worker_script(ca_pem, "two")]}).json()
                held = page.locator("#approvals-rows tr", has_text="CONSOLE-ASK-2")
                await expect(held).to_have_count(1, timeout=60000)
                await held.locator("button[data-decision=deny]").click()
                text = await logs_until(base, second["id"], r"result-two=", 60)
                line = next(x for x in text.splitlines() if x.startswith("result-two="))
                assert "/403" in line and not line.endswith(" rc0"), line
                refused = page.locator("#decisions-rows tr.v-deny", has_text="CONSOLE-ASK-2")
                await expect(refused.first).to_be_visible(timeout=10000)
                await expect(refused.first.locator(".badge")).to_have_text("REFUSED")
                await page.locator("#egress").screenshot(path=str(tmp_path / "egress-decisions.png"))

            audit = httpx.get(base + "/api/v1/audit?log=write&limit=50").json()["items"]
            answered = [e for e in audit if e["path"].startswith("/api/v1/egress/approvals/")]
            assert len(answered) == 2 and {e["principal"] for e in answered} == {"loopback"}
        finally:
            log = served.stop()
        assert "Traceback" not in log, log


async def test_decisions_appear_as_they_happen(sandbox_world, tmp_path):  # noqa: F811
    """A decision made while the page is open shows up within a second, pushed by the stream
    (not by a reload or a slow poll)."""
    async with targets(sandbox_world.tmp) as t:
        config = sandbox_world.config({
            "codex": {"sandbox": {"egressAllowlist": ALLOW}},
            "egress": {"resolver": f"{t.ns.ns_ip}:53", "allowPrivateNetworks": [t.ns.cidr]},
        })
        served = Served(tmp_path, sandbox_world.data, {"MASTER_KEY": MASTER_KEY}, config=config).start()
        base = served.url
        try:
            async with chromium() as browser:
                page = await browser.new_page()
                await page.goto(base + "/")
                await expect(page.locator("#egress-live")).to_be_visible(timeout=15000)
                script = ("sleep 3; curl -s -o /dev/null -m 10 -w 'refused=%{http_code}\\n' http://other.test/; "
                          "echo finished")
                box = httpx.post(base + "/api/v1/sandboxes", timeout=120, json={
                    "issue": "CONSOLE-LIVE-1", "command": ["sh", "-c", script]}).json()
                await logs_until(base, box["id"], r"finished", 60)
                seen = time.monotonic()
                refused = page.locator("#decisions-rows tr.v-deny", has_text="other.test")
                await expect(refused.first).to_be_visible(timeout=5000)
                assert time.monotonic() - seen < 2.0
                await expect(refused.first.locator(".badge")).to_have_text("REFUSED")
        finally:
            log = served.stop()
        assert "Traceback" not in log, log
