import pytest


@pytest.fixture
def anyio_backend():
    # Quart runs on asyncio; pure anyio components are also tested under trio (pytest-trio).
    return "asyncio"
