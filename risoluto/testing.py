"""pytest fixtures for plugin authors (registered through the ``pytest11`` entry point).

Use them in your plugin's tests::

    async def test_my_route(risoluto_client):
        client = await risoluto_client(plugins=[("mine", my_plugin)])
        response = await client.get("/api/v1/mine")
        assert response.status_code == 200

``risoluto_client`` starts the app (services started, as under ``risoluto serve``) and
stops it at the end of the test. Peers default to loopback; pass ``scope_base`` to a
request to act as a remote client: ``scope_base={"client": ("203.0.113.9", 5000)}``.

``risoluto_spec`` builds the ContainerSpec a launch would get, through every plugin's
``risoluto_sandbox_spec`` edits and ``risoluto_sandbox_spec_check`` checks, without Docker::

    def test_my_mount(risoluto_spec):
        spec = risoluto_spec(plugins=[("mine", my_plugin)])
        assert any(m.target == "/cache" for m in spec.mounts)
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, AsyncIterator, Awaitable, Callable, Mapping

import pytest

from .settings import Settings, build_settings


@pytest.fixture
def risoluto_data_dir(tmp_path: Path) -> Path:
    """A private, empty DATA_DIR for one test."""
    path = tmp_path / "data"
    path.mkdir(mode=0o700)
    return path


@pytest.fixture
def risoluto_settings(risoluto_data_dir: Path) -> Callable[..., Settings]:
    """``make(config=None, env=None)`` -> Settings with DATA_DIR set to the test's data dir."""

    def make(config: Mapping[str, Any] | None = None, env: Mapping[str, str] | None = None) -> Settings:
        environ = {"DATA_DIR": str(risoluto_data_dir), **(env or {})}
        return build_settings(config or {}, None, environ)

    return make


def _loopback_client_class() -> type:
    from quart.testing import QuartClient

    def with_loopback_peer(scope_base: dict | None) -> dict:
        return {"client": ("127.0.0.1", 50000), **(scope_base or {})}

    class LoopbackClient(QuartClient):
        """Quart's test client with a loopback peer unless ``scope_base`` names another
        (Quart's own client sends no peer at all, which the guards treat as remote).

        Only Quart's public ``open``/``request`` signatures are overridden: every verb helper
        (``get``, ``post``, ...) goes through ``open``, and streaming goes through ``request``."""

        async def open(self, path: str, *, scope_base: dict | None = None, **kwargs: Any) -> Any:
            return await super().open(path, scope_base=with_loopback_peer(scope_base), **kwargs)

        def request(self, path: str, *, scope_base: dict | None = None, **kwargs: Any) -> Any:
            return super().request(path, scope_base=with_loopback_peer(scope_base), **kwargs)

    return LoopbackClient


@contextlib.asynccontextmanager
async def running_app(settings: Settings, **kwargs: Any) -> AsyncIterator[Any]:
    """An app with its services started (``before_serving``) for the duration of the block."""
    from .app import create_app

    app = create_app(settings, **kwargs)
    app.test_client_class = _loopback_client_class()
    async with app.test_app() as test_app:
        yield test_app


@pytest.fixture
async def risoluto_client(
    risoluto_settings: Callable[..., Settings],
) -> AsyncIterator[Callable[..., Awaitable[Any]]]:
    """``await make(config=None, env=None, plugins=())`` -> a started app's test client."""
    stack = contextlib.AsyncExitStack()

    async def make(
        config: Mapping[str, Any] | None = None,
        env: Mapping[str, str] | None = None,
        plugins: tuple[tuple[str, Any], ...] = (),
    ) -> Any:
        settings = risoluto_settings(config, env)
        environ = {"DATA_DIR": settings.data_dir, **(env or {})}
        test_app = await stack.enter_async_context(running_app(settings, plugins=plugins, environ=environ))
        return test_app.test_client()

    async with stack:
        yield make


@pytest.fixture
def risoluto_spec(risoluto_settings: Callable[..., Settings], tmp_path: Path) -> Callable[..., Any]:
    """``make(request=None, config=None, env=None, plugins=())`` -> the checked ContainerSpec.

    The workspace root defaults to a directory under the test's ``tmp_path``. A refused spec
    raises the check's ``ApiError``. With an egress allowlist configured the check phase refuses
    the spec unless an enforcer runs: test that with ``risoluto_client`` and a real launch.
    """
    from .hookspecs.sandbox import ContainerSpec, LaunchRequest
    from .kernel import Kernel
    from .settings import deep_merge

    def make(request: Any = None, config: Mapping[str, Any] | None = None,
             env: Mapping[str, str] | None = None, plugins: Any = ()) -> Any:
        base = {"workspace": {"root": str(tmp_path / "workspaces")}}
        settings = risoluto_settings(deep_merge(base, config or {}), env)
        kernel = Kernel(settings, tuple(plugins), environ={"DATA_DIR": settings.data_dir, **(env or {})})
        request = request or LaunchRequest(issue="TEST-1")
        spec = ContainerSpec(name="risoluto-test-spec", image=request.image or settings.codex.sandbox.image,
                             command=list(request.command), env=dict(request.env))
        kernel.hooks.sandbox_spec(spec, request, settings)
        kernel.hooks.sandbox_spec_check(spec, request, settings)
        return spec

    return make
