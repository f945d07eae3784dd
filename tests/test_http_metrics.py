"""GET /metrics (docs/http-security.md): requests by route and status, guard denials by code, rate-limit
rejections by bucket, in the Prometheus text format."""

import pytest
from prometheus_client.parser import text_string_to_metric_families

pytestmark = pytest.mark.anyio

REMOTE = {"client": ("198.51.100.30", 1)}


def samples(text):
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


async def scrape(client):
    response = await client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["Content-Type"].startswith("text/plain")
    return samples((await response.get_data()).decode())


async def test_series(risoluto_client):
    client = await risoluto_client(env={"RISOLUTO_WRITE_TOKEN": "t" * 32},
                                   config={"rateLimit": {"api": {"limit": 50, "windowSeconds": 60}}})
    await client.get("/api/v1/runtime")
    await client.get("/api/v1/runtime")
    await client.put("/api/v1/config/overlay", json={}, scope_base=REMOTE)  # 401
    await client.get("/api/v1/test/read", scope_base=REMOTE)  # unmatched, read guard 401
    await client.get("/no/such/path/123")
    for _ in range(60):
        await client.get("/api/v1/runtime", scope_base={"client": ("198.51.100.31", 1)})
    m = await scrape(client)
    def requests(route, status):
        return m[("risoluto_http_requests_total", (("method", "GET"), ("route", route), ("status", status)))]

    assert requests("/api/v1/runtime", "200") == 52
    assert requests("/api/v1/runtime", "429") == 10
    assert m[("risoluto_http_requests_total", (("method", "GET"), ("route", "<unmatched>"), ("status", "404")))] == 1
    assert m[("risoluto_guard_denials_total", (("code", "write_unauthorized"),))] == 1
    assert m[("risoluto_guard_denials_total", (("code", "read_unauthorized"),))] == 1
    assert m[("risoluto_ratelimit_rejections_total", (("bucket", "api"),))] == 10
    assert m[("risoluto_ratelimit_tracked_clients", ())] >= 3
    # raw paths never become label values
    assert not any("/no/such/path" in str(labels) for _, labels in m)


async def test_other_plugins_series_share_the_registry(risoluto_client):
    client = await risoluto_client()
    m = await scrape(client)
    names = {name for name, _ in m}
    assert "risoluto_ratelimit_tracked_clients" in names


async def test_metrics_of_two_apps_are_separate(risoluto_client):
    one = await risoluto_client()
    two = await risoluto_client()
    for _ in range(3):
        await one.get("/api/v1/runtime")
    key = ("risoluto_http_requests_total", (("method", "GET"), ("route", "/api/v1/runtime"), ("status", "200")))
    assert (await scrape(one))[key] == 3
    assert key not in await scrape(two)


def test_doctor(risoluto_settings):
    from risoluto.kernel import Kernel
    from risoluto.plugins.http import metrics

    (result,) = metrics.risoluto_doctor_checks(Kernel(risoluto_settings()))
    assert result.status == "PASS"
    from risoluto.hookspecs import hookimpl

    class ReadGuardReplacement:  # the read guard may be disabled only with a declared replacement
        @hookimpl
        def risoluto_checklist_provides(self):
            return ["read guard"]

    settings = risoluto_settings(env={"RISOLUTO_DISABLE_PLUGINS": "http.read_guard"})
    (result,) = metrics.risoluto_doctor_checks(Kernel(settings, (("my.read_guard", ReadGuardReplacement()),)))
    assert result.status == "WARN"
