"""The kernel owns the backends (risoluto/backends.py, docs/plugins.md "Backends"): one rule for a
missing backend, a plugin's replacement is the one held, the held value is frozen, and no plugin
writes a backend into the kernel."""

from __future__ import annotations

import ast
import re
from pathlib import Path
from typing import Any

import attrs
import pytest

from risoluto.backends import Backends, SecretsBackend
from risoluto.errors import StartupError
from risoluto.hookspecs import hookimpl
from risoluto.hookspecs.ratelimit import RateDecision
from risoluto.kernel import Kernel
from risoluto.settings import build_settings

pytestmark = pytest.mark.anyio
ROOT = Path(__file__).resolve().parent.parent
KEY = "k" * 32


def kernel_for(tmp_path: Path, config: dict[str, Any] | None = None, plugins: tuple[Any, ...] = (),
               env: dict[str, str] | None = None) -> Kernel:
    environ = {"DATA_DIR": str(tmp_path), **(env or {})}
    return Kernel(build_settings(config or {}, None, environ), extra_plugins=plugins, environ=environ)


class Declares:
    """Declares checklist items (so their default provider may be disabled) and answers nothing else."""

    def __init__(self, *items: str):
        self.items = list(items)

    @hookimpl
    def risoluto_checklist_provides(self) -> list[str]:
        return self.items


# (what makes the hook unanswered, the words the error must hold: the setting and the plugin)
MISSING = {
    "secret store": ({"plugins": {"disable": ["secrets.file_store", "secrets.sqlite_store"]}},
                     ("secret store",), {"MASTER_KEY": KEY}, ("secrets.backend", "'file'", "secrets.file_store")),
    "rate limit": ({"plugins": {"disable": ["http.rate_limit"]}}, ("rate limiting",), {},
                   ("rateLimit.backend", "'memory'", "http.rate_limit")),
    "sandbox runtime": ({"plugins": {"disable": ["sandbox.docker_runtime"]}}, (), {},
                        ("sandbox.runtime", "'docker'", "sandbox.docker_runtime")),
    "egress enforcer": ({"codex": {"sandbox": {"egressAllowlist": ["allowed.test"]}},
                         "plugins": {"disable": ["egress.network"]}}, (), {},
                        ("codex.sandbox.egressAllowlist", "egress.network")),
}


@pytest.mark.parametrize("kind", sorted(MISSING))
async def test_a_backend_no_plugin_answers_for_stops_startup_naming_the_setting(tmp_path, kind):
    config, declared, env, words = MISSING[kind]
    kernel = kernel_for(tmp_path, config, (("declares", Declares(*declared)),), env)  # builds: it is not started
    with pytest.raises(StartupError) as err:
        await kernel.start()
    for word in words:
        assert word in str(err.value), (word, str(err.value))
    # what had started is stopped again: nothing runs behind a kernel that refused to start
    assert kernel.backends == Backends()


async def test_the_backends_started_before_a_missing_one_are_closed(tmp_path):
    closed: list[str] = []

    class Store(FakeStore):
        async def close(self) -> None:
            closed.append("store")

    kernel = kernel_for(tmp_path, {"plugins": {"disable": ["sandbox.docker_runtime"]}},
                        (("store", StorePlugin(Store())),), {"MASTER_KEY": KEY})
    with pytest.raises(StartupError, match="sandbox.runtime"):
        await kernel.start()
    assert closed == ["store"]


class FakeStore:
    backend, location = "fake", "memory"

    def __init__(self) -> None:
        self.values = {"A": "a"}

    async def open(self) -> None:
        pass

    async def get(self, name: str) -> str | None:
        return self.values.get(name)

    async def list(self) -> list[str]:
        return sorted(self.values)

    async def close(self) -> None:
        pass


class StorePlugin:
    def __init__(self, store: Any):
        self.store = store

    @hookimpl(tryfirst=True)
    def risoluto_secret_store(self, master_key: str) -> Any:
        return self.store


class Log:
    def __init__(self) -> None:
        self.events: list[str] = []


class FakeLimiter:
    def __init__(self, log: Log):
        self.log = log

    async def hit(self, bucket: str, client: str, limit: int, window_seconds: float) -> RateDecision:
        return RateDecision(True, limit, limit - 1, window_seconds)

    async def close(self) -> None:
        self.log.events.append("limiter closed")


class FakeRuntime:
    name = "fake"

    def __init__(self, log: Log):
        self.log = log

    async def cleanup_orphans(self) -> int:
        self.log.events.append("runtime cleaned")
        return 0

    async def close(self) -> None:
        self.log.events.append("runtime closed")


class FakeEnforcer:
    name = "fake-enforcer"

    def __init__(self, log: Log):
        self.log = log

    async def start(self, kernel: Any) -> None:
        # started after the others: it may read them
        assert kernel.backends.runtime is not None and kernel.backends.limiter is not None
        self.log.events.append("egress started")

    async def stop(self) -> None:
        self.log.events.append("egress stopped")

    def attach(self, spec: Any, request: Any, settings: Any) -> None:
        pass

    def status(self) -> dict[str, Any]:
        return {"bind": "10.0.0.1:3128", "host_protection": "test"}


class Replacements(StorePlugin):
    """A third party's backends for every kind, chosen before the defaults (tryfirst)."""

    def __init__(self, log: Log):
        super().__init__(FakeStore())
        self.limiter, self.runtime, self.enforcer = FakeLimiter(log), FakeRuntime(log), FakeEnforcer(log)

    @hookimpl(tryfirst=True)
    def risoluto_ratelimit_backend(self) -> Any:
        return self.limiter

    @hookimpl(tryfirst=True)
    def risoluto_sandbox_runtime(self) -> Any:
        return self.runtime

    @hookimpl(tryfirst=True)
    def risoluto_egress_enforcer(self) -> Any:
        return self.enforcer


async def test_a_plugins_replacement_is_the_backend_held_and_started_and_stopped_in_order(tmp_path):
    log = Log()
    plugin = Replacements(log)
    kernel = kernel_for(tmp_path, {"codex": {"sandbox": {"egressAllowlist": ["allowed.test"]}}},
                        (("acme.backends", plugin),), {"MASTER_KEY": KEY})
    assert kernel.backends == Backends()  # nothing before start
    async with kernel.running():
        b = kernel.backends
        assert b.limiter is plugin.limiter and b.runtime is plugin.runtime and b.egress is plugin.enforcer
        assert b.secrets.store is not None and b.secrets.locked_reason == ""
        assert b.secrets.store.backend == "fake" and await b.secrets.store.get("A") == "a"  # counted, same store
        assert b.secrets.key_source == "MASTER_KEY"
        assert {"api", "webhooks"} <= {r.bucket for r in b.rate_rules}
        assert log.events == ["egress started", "runtime cleaned"]  # backends, then the services
    assert log.events[2:] == ["egress stopped", "runtime closed", "limiter closed"]  # reverse order
    assert kernel.backends == Backends()


async def test_without_a_key_the_store_is_locked_with_the_reason(tmp_path):
    kernel = kernel_for(tmp_path, plugins=(("acme.backends", Replacements(Log())),))
    async with kernel.running():
        secrets = kernel.backends.secrets
        assert secrets.store is None and "MASTER_KEY" in secrets.locked_reason
    with pytest.raises(ValueError):
        SecretsBackend(store=None, locked_reason="")  # neither open nor locked
    with pytest.raises(ValueError):
        SecretsBackend(store=FakeStore(), locked_reason="locked")  # both


async def test_a_data_plane_with_a_key_and_an_allowlist_wants_neither_store_nor_enforcer(risoluto_client, tmp_path):
    # its secret store and egress plugins are not loaded: not wanted there, so not missing either
    from risoluto.manager import default_plugin_names
    from risoluto.roles import KEEP, SECRET_ENV

    config = {"sandbox": {"role": "data-plane"}, "plugins": {"disable": sorted(set(default_plugin_names()) - KEEP)},
              "codex": {"sandbox": {"egressAllowlist": ["allowed.test"]}}}
    client = await risoluto_client(config, env={"MASTER_KEY": KEY, SECRET_ENV: "s" * 40,
                                                "DOCKER_HOST": f"unix://{tmp_path}/no-such-docker.sock"})
    backends = client.app.extensions["risoluto"].backends
    assert backends.secrets.store is None and "data plane" in backends.secrets.locked_reason
    assert backends.egress is None and backends.runtime is not None and backends.limiter is not None


async def test_an_engine_that_is_down_is_not_a_missing_backend(tmp_path):
    # the docker runtime answers; its engine does not exist: the app starts, sandbox routes answer 503
    kernel = kernel_for(tmp_path, env={"DOCKER_HOST": f"unix://{tmp_path}/no-such-docker.sock"})
    async with kernel.running():
        assert kernel.backends.runtime is not None


async def test_the_rate_rules_follow_the_live_settings(tmp_path):
    kernel = kernel_for(tmp_path)
    async with kernel.running():
        before = kernel.backends
        kernel.apply_settings(build_settings({"rateLimit": {"api": {"limit": 7}}}, None, {"DATA_DIR": str(tmp_path)}))
        after = kernel.backends
        assert after is not before and before.rate_rules[0].limit != 7 and after.rate_rules[0].limit == 7
        assert after.limiter is before.limiter  # replaced whole, the rest carried over


class Writer:
    """A plugin that tries to put its own runtime in the kernel while the app runs."""

    def __init__(self, how: str):
        self.how = how

    @hookimpl
    def risoluto_app_services(self, kernel: Any) -> list[Any]:
        how = self.how

        class Service:
            name = "acme.writer"

            async def start(self) -> None:
                if how == "field":
                    kernel.backends.runtime = object()
                else:
                    kernel.backends = Backends()

            async def stop(self) -> None:
                pass

        return [Service()]


@pytest.mark.parametrize("how", ["field", "whole"])
async def test_a_plugin_cannot_write_the_backends(tmp_path, how):
    kernel = kernel_for(tmp_path, plugins=(("acme.writer", Writer(how)),))
    with pytest.raises(StartupError, match="acme.writer"):
        await kernel.start()
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        kernel.backends.limiter = None  # type: ignore[misc]
    with pytest.raises(AttributeError):
        kernel.backends = Backends()  # type: ignore[misc]


# --- static: no plugin module writes a backend into the kernel -------------------------------

SLOTS = frozenset({"backends", "_backends", "current", "secret_store", "secrets_locked_reason", "limiter",
                   "rate_rules", "runtime", "launch_sandbox", "egress_enforcer"})
KERNELISH = re.compile(r"((^|\.)(kernel|k|_kernel)|kernel_of\(.*\))(\.backends|\._backends)?$")


def kernel_writes(source: str) -> list[str]:
    """``<kernel>.<slot> = ...`` (also augmented, annotated, tuple targets), ``setattr(<kernel>,
    ...)``, and ``getattr(<kernel>, "<old slot>", default)``, where <kernel> is a name or attribute
    ending in ``kernel`` (or ``k``)."""
    found = []
    for node in ast.walk(ast.parse(source)):
        targets: list[ast.expr] = []
        if isinstance(node, ast.Assign):
            targets = list(node.targets)
        elif isinstance(node, (ast.AugAssign, ast.AnnAssign)):
            targets = [node.target]
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in ("setattr", "delattr"):
            if node.args and KERNELISH.search(ast.unparse(node.args[0])):
                found.append(f"line {node.lineno}: {ast.unparse(node)}")
            continue
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "getattr":
            # a read of a slot the kernel no longer has, hidden by a default (always the default)
            if (len(node.args) >= 2 and KERNELISH.search(ast.unparse(node.args[0]))
                    and isinstance(node.args[1], ast.Constant) and node.args[1].value in SLOTS - {"backends"}):
                found.append(f"line {node.lineno}: {ast.unparse(node)}")
            continue
        flat = [e for t in targets for e in (t.elts if isinstance(t, (ast.Tuple, ast.List)) else [t])]
        for target in flat:
            if isinstance(target, ast.Attribute) and target.attr in SLOTS and KERNELISH.search(ast.unparse(target.value)):
                found.append(f"line {node.lineno}: {ast.unparse(target)}")
    return found


def test_the_scanner_finds_kernel_writes():
    assert kernel_writes("kernel.runtime = r") and kernel_writes("self.kernel.secret_store = None")
    assert kernel_writes("a, self.kernel.limiter = 1, None") and kernel_writes("k.rate_rules += []")
    assert kernel_writes("setattr(kernel, 'egress_enforcer', e)") and kernel_writes("kernel._backends.current = b")
    assert kernel_writes("kernel.backends.runtime = r") and kernel_writes("kernel_of(app).limiter = None")
    assert kernel_writes("store = getattr(self._kernel, 'secret_store', None)")
    assert not kernel_writes("self.runtime = runtime") and not kernel_writes("x = kernel.backends.runtime")


def test_no_plugin_module_writes_a_backend_into_the_kernel():
    modules = [*sorted((ROOT / "risoluto" / "plugins").rglob("*.py")),
               *sorted(p for p in (ROOT / "contrib").glob("risoluto-*/risoluto_*/**/*.py"))]
    assert len(modules) > 50
    writes = {str(p.relative_to(ROOT)): w for p in modules if (w := kernel_writes(p.read_text()))}
    assert writes == {}
