import pytest


@pytest.fixture
def anyio_backend():
    # Quart runs on asyncio; pure anyio components are also tested under trio (pytest-trio).
    return "asyncio"


def pytest_configure(config):
    # tests that create their own network namespaces (tests/test_http_real_clients.py)
    config.addinivalue_line("markers", "netns: creates network namespaces; needs root (fails, never skips, with CI=true)")
