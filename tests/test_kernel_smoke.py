import pytest

pytestmark = pytest.mark.anyio


async def test_runtime_is_public_and_carries_request_id(risoluto_client):
    client = await risoluto_client()
    response = await client.get("/api/v1/runtime", headers={"X-Request-ID": "abc-123"})
    assert response.status_code == 200
    assert response.headers["X-Request-ID"] == "abc-123"
    body = await response.get_json()
    assert body["version"]
    assert body["bind"] == {"host": "127.0.0.1", "port": 4000}
