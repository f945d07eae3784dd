"""The operator console in a real browser (Debian's headless chromium under Playwright) against a
real ``risoluto serve``: on loopback, and from a non-loopback address inside a network namespace.

- the checklist shows a FAIL this test caused (the secret audit log replaced by a directory) with
  its fix, live, and goes back to PASS when the cause is gone;
- a sandbox this test launched on the real engine appears and a click on Stop removes it;
- a secret set from the page never comes back in any response body the page receives;
- a page on another origin that posts to the API (JSON in a text/plain form) is refused, on
  loopback and riding a remote browser's session cookie;
- from afar: no token, only the sign-in form; a wrong token stays there; the read token reads
  and cannot write; the write token writes; sign-out kills the cookie on the server;
- a screenshot of each panel is saved in the test's temporary directory.

The egress panel's live tests (a held request approved by a click) are in test_console_egress.py.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

import docker
import httpx
import pytest

from console_support import Bodies, PageServer, Served, chromium, chromium_in_netns, csrf_form
from docker_util import TEST_IMAGE, docker_engine, sandbox_world  # noqa: F401
from http_support import HOST_IP, netns  # noqa: F401 (a fixture)

pytestmark = pytest.mark.anyio

MASTER_KEY = "console-browser-test-master-key"
WRITE = "w-" + "b" * 40
READ = "r-" + "a" * 40
PANELS = ("checklist", "sandboxes", "egress", "secrets", "audit", "traffic")
AUDIT_ITEM = "credential encryption: audit log"


def expect(locator: Any) -> Any:
    from playwright.async_api import expect as pw_expect

    return pw_expect(locator)


def row(page: Any, tbody: str, text: str) -> Any:
    return page.locator(f"#{tbody} tr", has_text=text)


async def screenshots(page: Any, where: Path) -> list[Path]:
    where.mkdir(exist_ok=True)
    saved = []
    for panel in PANELS:
        path = where / f"{panel}.png"
        await page.locator(f"#{panel}").screenshot(path=str(path))
        saved.append(path)
    await page.screenshot(path=str(where / "whole-page.png"), full_page=True)
    return saved


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", path
    return struct.unpack(">II", data[16:24])


@pytest.fixture
def loopback_console(tmp_path):
    served = Served(tmp_path, tmp_path / "data", {"MASTER_KEY": MASTER_KEY}).start()
    try:
        yield served
    finally:
        log = served.stop()
        assert "Traceback" not in log, log


# --- loopback ----------------------------------------------------------------------------------

async def test_checklist_shows_a_fail_the_test_caused_with_its_fix_live(loopback_console, tmp_path):
    audit_log = loopback_console.data / "secrets.audit.log"
    async with chromium() as browser:
        page = await browser.new_page()
        await page.goto(loopback_console.url + "/")
        item = row(page, "checklist-rows", AUDIT_ITEM)
        await expect(item.locator(".badge")).to_have_text("PASS", timeout=15000)
        await expect(page.locator("#checklist-summary")).to_contain_text("0 fail")
        audit_log.mkdir()  # the cause: the audit trail can no longer be appended to
        await expect(item.locator(".badge")).to_have_text("FAIL", timeout=15000)  # no reload: polled
        await expect(item).to_contain_text(f"{audit_log} is not a regular file")
        await expect(item).to_contain_text("make " + str(audit_log) + " a regular file")
        await expect(page.locator("#checklist-summary")).not_to_contain_text("0 fail")
        # FAIL rows come first
        await expect(page.locator("#checklist-rows tr").first).to_contain_text(AUDIT_ITEM)
        await page.locator("#checklist").screenshot(path=str(tmp_path / "checklist-fail.png"))
        audit_log.rmdir()
        await expect(item.locator(".badge")).to_have_text("PASS", timeout=15000)
        await expect(page.locator("#checklist-summary")).to_contain_text("0 fail")
    assert png_size(tmp_path / "checklist-fail.png")[0] > 300


@pytest.mark.docker
async def test_a_launched_sandbox_appears_and_a_click_stops_it(sandbox_world, tmp_path):  # noqa: F811
    served = Served(tmp_path, sandbox_world.data, {"MASTER_KEY": MASTER_KEY}, config=sandbox_world.config()).start()
    try:
        launched = httpx.post(served.url + "/api/v1/sandboxes", timeout=120,
                              json={"issue": "CONSOLE-STOP-1", "command": ["sleep", "300"]})
        assert launched.status_code == 201, launched.text
        sandbox = launched.json()
        assert sandbox_world.docker.inspect_container(sandbox["id"])["State"]["Running"]
        async with chromium() as browser:
            page = await browser.new_page(viewport={"width": 1280, "height": 900})
            await page.goto(served.url + "/")
            line = page.locator(f'#sandboxes-rows tr[data-id="{sandbox["id"]}"]')
            await expect(line).to_contain_text("CONSOLE-STOP-1", timeout=15000)
            await expect(line).to_contain_text("running")
            await expect(line).to_contain_text(sandbox["policy_digest"][:19])
            # fill the other panels before the screenshots: a secret and its audit line
            await page.fill("#secret-name", "SCREENSHOT_KEY")
            await page.fill("#secret-value", "screenshot-value")
            await page.click("#secret-form button[type=submit]")
            await expect(row(page, "audit-secrets-rows", "SCREENSHOT_KEY")).to_be_visible(timeout=15000)
            # the egress panel says whether this server has the decision routes
            if httpx.get(served.url + "/api/v1/egress/decisions").status_code == 404:
                await expect(page.locator("#egress-unavailable")).to_be_visible(timeout=15000)
                await expect(page.locator("#egress-unavailable")).to_have_text(
                    "egress decisions are not available on this server")
            else:
                await expect(page.locator("#egress-live")).to_be_visible(timeout=15000)
            await expect(page.locator("#chart svg polyline").first).to_be_attached(timeout=20000)
            saved = await screenshots(page, tmp_path / "screenshots")
            await line.locator("button.stop").click()
            await expect(line.locator("button.stop")).to_have_count(0, timeout=60000)
            await expect(line).not_to_contain_text("running")
        try:
            state = sandbox_world.docker.inspect_container(sandbox["id"])["State"]
            assert not state["Running"], state
        except docker.errors.NotFound:
            pass  # stopped and removed
        audit = [json.loads(x) for x in (sandbox_world.data / "write-audit.log").read_text().splitlines()]
        assert any(e["method"] == "DELETE" and e["path"] == f"/api/v1/sandboxes/{sandbox['id']}" and e["status"] == 200
                   for e in audit), audit
    finally:
        log = served.stop()
    assert "Traceback" not in log, log
    for path in saved:
        width, height = png_size(path)
        assert width > 300 and height > 40, (path, width, height)


async def test_a_secret_set_from_the_page_never_comes_back(loopback_console):
    value = "console-never-echo-" + "7f3a9c" * 4
    async with chromium() as browser:
        page = await browser.new_page()
        bodies = Bodies(page)
        await page.goto(loopback_console.url + "/")
        await expect(page.locator("#secrets-summary")).to_contain_text("stored", timeout=15000)
        await page.fill("#secret-name", "CONSOLE_SECRET")
        await page.fill("#secret-value", value)
        await page.click("#secret-form button[type=submit]")
        await expect(page.locator("#secret-status")).to_have_text("CONSOLE_SECRET set", timeout=15000)
        await expect(row(page, "secrets-rows", "CONSOLE_SECRET")).to_be_visible()
        await expect(row(page, "audit-secrets-rows", "CONSOLE_SECRET")).to_be_visible(timeout=15000)
        await expect(page.locator("#secret-value")).to_have_value("")
        await page.wait_for_timeout(5500)  # a round of the frequent polls after the set
        await page.reload()
        await expect(row(page, "secrets-rows", "CONSOLE_SECRET")).to_be_visible(timeout=15000)
        await expect(row(page, "audit-write-rows", "/api/v1/secrets/CONSOLE_SECRET")).to_be_visible(timeout=15000)
        assert value not in await page.content()
        items = await bodies.settle()
    # the recorder works: the value did leave in the one PUT, and many bodies came back
    sent = [r for r in bodies.requests if value.encode() in r[2]]
    assert [(m, u.rsplit("/", 1)[-1]) for m, u, _ in sent] == [("PUT", "CONSOLE_SECRET")]
    assert len(items) > 10 and any(b"CONSOLE_SECRET" in body for _, _, body in items)
    leaked = [(url, status) for url, status, body in items if value.encode() in body]
    assert leaked == []
    stored = httpx.get(loopback_console.url + "/api/v1/secrets").json()
    assert stored == {"keys": ["CONSOLE_SECRET"]}


async def test_a_cross_origin_form_post_to_the_loopback_console_is_refused(loopback_console):
    with PageServer("127.0.0.1", csrf_form(loopback_console.url + "/api/v1/secrets/CSRF_PLANTED")) as site:
        # evil.test resolves to this machine, but its origin is not a loopback origin
        async with chromium(args=("--host-resolver-rules=MAP evil.test 127.0.0.1",)) as browser:
            page = await browser.new_page()
            async with page.expect_response(lambda r: "CSRF_PLANTED" in r.url, timeout=15000) as answer:
                await page.goto(f"http://evil.test:{site.port}/")
            response = await answer.value
            assert response.status == 403, await response.text()
            assert (await response.json())["error"]["code"] == "write_forbidden"
            assert response.request.headers.get("origin") == f"http://evil.test:{site.port}"
    assert httpx.get(loopback_console.url + "/api/v1/secrets").json() == {"keys": []}
    # the same body from the console's own origin would have been accepted: the form is no dud
    status = httpx.post(loopback_console.url + "/api/v1/secrets/CSRF_PLANTED", content=b'{"value":"x","pad":"="}')
    assert status.status_code == 204


# --- from afar: a browser inside a network namespace ------------------------------------------

@pytest.fixture(scope="module")
def remote_console(netns, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("remote-console")
    env = {"MASTER_KEY": MASTER_KEY, "RISOLUTO_WRITE_TOKEN": WRITE, "RISOLUTO_READ_TOKEN": READ}
    served = Served(tmp, tmp / "data", env, bind=HOST_IP).start()
    served.browser = chromium_in_netns(tmp, netns.name)
    try:
        yield served
    finally:
        log = served.stop()
        assert "Traceback" not in log, log


def from_host(served: Served, method: str, path: str, **kw: Any) -> httpx.Response:
    """The operator's own script on the host (not loopback for this bind: it sends the write token)."""
    return httpx.request(method, served.url + path, headers={"Authorization": f"Bearer {WRITE}"}, timeout=10, **kw)


async def sign_in(page: Any, served: Served, token: str) -> Any:
    await page.goto(served.url + "/")
    await page.fill("#token", token)
    async with page.expect_navigation():
        await page.click("#sign-in button[type=submit]")
    return page


@pytest.mark.netns
async def test_from_afar_without_the_token_only_the_sign_in_form(remote_console, tmp_path):
    async with chromium(remote_console.browser) as browser:
        context = await browser.new_context()
        page = await context.new_page()
        bodies = Bodies(page)
        response = await page.goto(remote_console.url + "/")
        assert response.status == 401
        await expect(page.locator("#sign-in")).to_be_visible()
        assert await page.locator("#checklist").count() == 0
        await page.screenshot(path=str(tmp_path / "sign-in.png"))
        # a wrong token: the form again, no cookie, and the token is nowhere in the URL
        await page.fill("#token", WRITE[:-1] + "X")
        async with page.expect_navigation() as nav:
            await page.click("#sign-in button[type=submit]")
        assert (await nav.value).status == 401
        await expect(page.locator("#sign-in")).to_be_visible()
        await expect(page.locator("p.error")).to_contain_text("not valid")
        assert await page.locator("#checklist").count() == 0
        assert await context.cookies() == []
        assert "token" not in page.url and WRITE[:10] not in page.url
        await page.screenshot(path=str(tmp_path / "sign-in-wrong-token.png"))
        items = await bodies.settle()
        # nothing but the form (and its style sheet) reached the browser: no API answer at all
        assert {u.split(str(remote_console.port), 1)[1] for u, _, _ in items} <= {
            "/", "/console/session", "/console/assets/console.css"}
        # the page's own API calls without a session are refused
        assert await page.evaluate("fetch('/api/v1/hardening').then(r => r.status)") == 401
        await context.close()


@pytest.mark.netns
async def test_from_afar_the_read_token_reads_and_the_write_token_writes(remote_console, tmp_path):
    async with chromium(remote_console.browser) as browser:
        context = await browser.new_context()
        page = await context.new_page()
        bodies = Bodies(page)
        await sign_in(page, remote_console, READ)
        assert page.url == remote_console.url + "/"
        [cookie] = await context.cookies()
        assert (cookie["name"], cookie["httpOnly"], cookie["sameSite"], cookie["secure"]) == (
            "risoluto_session", True, "Strict", False)
        assert len(cookie["value"]) >= 43 and cookie["value"] not in (READ, WRITE)
        await expect(page.locator("#checklist-rows tr").nth(5)).to_be_visible(timeout=15000)
        await expect(page.locator("#secret-form button[type=submit]")).to_be_disabled()
        # the page's script cannot read the cookie, and keeps nothing in storage
        assert await page.evaluate("document.cookie") == ""
        assert await page.evaluate("localStorage.length + sessionStorage.length") == 0
        # a read session cannot write, even from the console's own origin
        status = await page.evaluate("fetch('/api/v1/secrets/FROM_READ', {method: 'PUT', "
                                     "headers: {'Content-Type': 'application/json'}, body: '{\"value\":\"x\"}'})"
                                     ".then(r => r.status)")
        assert status == 403
        # sign in again, now with the write token, from the form in the header
        await page.fill("#access input[name=token]", WRITE)
        async with page.expect_navigation():
            await page.click("#access button[type=submit]")
        await expect(page.locator("#secret-form button[type=submit]")).to_be_enabled()
        await page.fill("#secret-name", "REMOTE_SECRET")
        await page.fill("#secret-value", "remote-value-never-back")
        await page.click("#secret-form button[type=submit]")
        await expect(page.locator("#secret-status")).to_have_text("REMOTE_SECRET set", timeout=15000)
        await expect(row(page, "audit-write-rows", "/api/v1/secrets/REMOTE_SECRET")).to_contain_text("session")
        await screenshots(page, tmp_path / "remote-screenshots")
        html = await page.content()
        assert READ not in html and WRITE not in html
        old = {c["name"]: c["value"] for c in await context.cookies()}["risoluto_session"]
        # sign out: the cookie goes, and its old value is dead on the server too
        async with page.expect_navigation():
            await page.click("#access form[action='/console/session/end'] button")
        await expect(page.locator("#sign-in")).to_be_visible()
        assert await context.cookies() == []
        items = await bodies.settle()
    assert not [u for u, _, b in items if b"remote-value-never-back" in b]
    assert not [u for u, _, b in items if READ.encode() in b or WRITE.encode() in b]
    assert from_host(remote_console, "GET", "/api/v1/secrets").json()["keys"] == ["REMOTE_SECRET"]
    replay = httpx.get(remote_console.url + "/api/v1/hardening", headers={"Cookie": f"risoluto_session={old}"})
    assert replay.status_code == 401
    lines = [json.loads(x) for x in (remote_console.data / "write-audit.log").read_text().splitlines()]
    assert [e["principal"] for e in lines if e["path"] == "/api/v1/secrets/REMOTE_SECRET"] == ["session"]


@pytest.mark.netns
async def test_from_afar_another_page_riding_the_session_cookie_is_refused(remote_console):
    target = remote_console.url + "/api/v1/secrets/CSRF_REMOTE"
    # same site (same address, another port): SameSite lets the cookie ride, the Origin check stops it
    with PageServer(HOST_IP, csrf_form(target)) as site:
        async with chromium(remote_console.browser) as browser:
            context = await browser.new_context()
            page = await context.new_page()
            await sign_in(page, remote_console, WRITE)
            await expect(page.locator("#secret-form button[type=submit]")).to_be_enabled(timeout=15000)
            async with page.expect_response(lambda r: "CSRF_REMOTE" in r.url, timeout=15000) as answer:
                await page.goto(f"http://{HOST_IP}:{site.port}/")
            response = await answer.value
            assert "risoluto_session=" in (await response.request.all_headers()).get("cookie", "")
            assert response.status == 403
            assert (await response.json())["error"]["code"] == "write_forbidden"
            await context.close()
    assert "CSRF_REMOTE" not in from_host(remote_console, "GET", "/api/v1/secrets").json()["keys"]
