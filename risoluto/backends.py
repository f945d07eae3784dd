"""The kernel's backends: the secret store, the rate limiter, the sandbox runtime and the egress
enforcer (docs/plugins.md, "Backends").

Each is chosen by a ``firstresult`` hook through :func:`select`, the one place that applies the
missing-backend rule: no plugin answering for a wanted backend is a plugin-configuration error,
so startup fails with a message naming the setting to fix (never a silent "off"). What was
chosen lives in one frozen :class:`Backends` value, ``kernel.backends``, replaced whole by the
kernel as backends start and stop; plugins read it and never write it. A backend that is
chosen but whose service is down (no Docker engine, an unreachable Redis) is not missing: it
answers errors on use (503), as each backend documents.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any, Awaitable, Callable

import attrs

from .errors import StartupError
from .hookspecs.egress import EgressEnforcer
from .hookspecs.ratelimit import RateLimiter, RateRule
from .hookspecs.sandbox import SandboxRuntime
from .hookspecs.secrets import SecretStore
from .roles import ROLE as DATA_PLANE
from .secret_store import CountingStore, open_store, operations_counter

if TYPE_CHECKING:
    from .hooks import Hooks
    from .kernel import Kernel
    from .settings import Settings

log = logging.getLogger("risoluto")

NO_KEY = "no master key: set MASTER_KEY or create <DATA_DIR>/master.key"
NO_SECRETS_ON_A_DATA_PLANE = "a data plane holds no secrets (docs/data-plane.md)"
STOPPED = "the server is not running"


@attrs.frozen
class SecretsBackend:
    """Open (``store`` is the opened store) or locked (``store`` is None, ``locked_reason`` says
    why: no master key, a data plane, or not started). Secret routes answer 503 while locked."""

    store: SecretStore | None = None
    locked_reason: str = attrs.field(default=STOPPED)
    key_source: str = ""  # where the master key came from (MASTER_KEY or the key file), when open

    @locked_reason.validator
    def _one_state(self, _: Any, reason: str) -> None:
        if (self.store is None) == (not reason):
            raise ValueError("a secrets backend is either open (a store) or locked (a reason), not both")

    @classmethod
    def opened(cls, store: SecretStore, key_source: str) -> SecretsBackend:
        return cls(store=store, locked_reason="", key_source=key_source)

    @classmethod
    def locked(cls, reason: str) -> SecretsBackend:
        return cls(store=None, locked_reason=reason)


@attrs.frozen
class Backends:
    """What runs behind the plugins, as of now. Never changed field by field (frozen): the
    kernel replaces the whole value, so a reader sees one consistent set.

    - ``secrets``: open or locked (:class:`SecretsBackend`);
    - ``limiter`` and ``rate_rules``: the rate-limit backend and the collected rules (the rules
      follow the live settings);
    - ``runtime``: the sandbox runtime (None only while the kernel is not running);
    - ``egress``: the running egress enforcer. None when no allowlist was set when the kernel
      started (nothing to enforce), or when an overlay set one and its enforcer failed to start:
      a launch under an allowlist without an enforcer is refused (``egress.allowlist``).
    """

    secrets: SecretsBackend = SecretsBackend()
    limiter: RateLimiter | None = None
    rate_rules: tuple[RateRule, ...] = ()
    runtime: SandboxRuntime | None = None
    egress: EgressEnforcer | None = None


@attrs.frozen
class Kind:
    """One kind of backend: the hook that chooses it and what to say when nothing answers."""

    name: str
    ask: Callable[..., Any]  # (hooks, settings, *extra) -> backend | None
    missing: Callable[[Settings], str]  # names the setting (and the plugin) to fix


def _egress_missing(settings: Settings) -> str:
    if settings.sandbox.runtime != "docker":
        return (f"codex.sandbox.egressAllowlist needs sandbox.runtime: docker (the egress proxy runs beside "
                f"the engine); with sandbox.runtime: {settings.sandbox.runtime} use an empty allowlist "
                "(docs/data-plane.md)")
    return ("codex.sandbox.egressAllowlist is set but no egress enforcer is available (built in: plugin "
            "egress.network; is it disabled?)")


SECRETS = Kind(
    "secret store", lambda hooks, settings, master_key: hooks.secret_store(settings, master_key),
    lambda s: (f"secrets.backend: unknown backend {s.secrets.backend!r}: no loaded plugin provides it (built in: "
               "file, plugin secrets.file_store; sqlite, plugin secrets.sqlite_store; others come from an "
               "installed plugin such as risoluto-postgres)"))
RATE_LIMIT = Kind(
    "rate-limit backend", lambda hooks, settings: hooks.ratelimit_backend(settings),
    lambda s: (f"rateLimit.backend {s.rate_limit.backend!r}: no loaded plugin provides this backend (built in: "
               "memory, plugin http.rate_limit; install the plugin that provides another, e.g. risoluto-redis)"))
SANDBOX_RUNTIME = Kind(
    "sandbox runtime", lambda hooks, settings: hooks.sandbox_runtime(settings),
    lambda s: (f"sandbox.runtime {s.sandbox.runtime!r}: no loaded plugin provides this runtime (built in: "
               "docker, plugin sandbox.docker_runtime; remote, plugin sandbox.remote_runtime)"))
EGRESS = Kind("egress enforcer", lambda hooks, settings: hooks.egress_enforcer(settings), _egress_missing)


def select(hooks: Hooks, kind: Kind, settings: Settings, *extra: Any) -> Any:
    """The backend the plugins choose for ``kind`` (its ``firstresult`` hook); StartupError
    naming the setting when no plugin answers: a missing backend never means "off"."""
    backend = kind.ask(hooks, settings, *extra)
    if backend is None:
        raise StartupError(f"{kind.missing(settings)}; `risoluto plugins` lists the loaded plugins and their "
                           "hooks (docs/plugins.md, \"Backends\")")
    return backend


# --- the life of each kind -----------------------------------------------------------------
# A start returns the fields it fills, or None when the settings call for no backend of that
# kind yet (an empty egress allowlist): the kind is tried again at the next ``BackendRunner.start``
# (``Kernel.start_new_services``, after an overlay).


async def _start_secrets(kernel: Kernel) -> dict[str, Any] | None:
    if kernel.settings.sandbox.role == DATA_PLANE:
        return {"secrets": SecretsBackend.locked(NO_SECRETS_ON_A_DATA_PLANE)}
    opened = await open_store(kernel.settings, kernel.hooks)
    if opened is None:
        return {"secrets": SecretsBackend.locked(NO_KEY)}
    counter = kernel.state.get("kernel.secret_operations")
    if counter is None:
        counter = kernel.state["kernel.secret_operations"] = operations_counter(kernel.metrics_registry)
    store = CountingStore(opened.store, counter)
    return {"secrets": SecretsBackend.opened(store, opened.master_key.source)}


async def _stop_secrets(backends: Backends) -> None:
    if backends.secrets.store is not None:
        await backends.secrets.store.close()


async def _start_rate_limit(kernel: Kernel) -> dict[str, Any] | None:
    limiter = select(kernel.hooks, RATE_LIMIT, kernel.settings)
    return {"limiter": limiter, "rate_rules": tuple(kernel.hooks.ratelimit_rules(kernel.settings))}


async def _stop_rate_limit(backends: Backends) -> None:
    if backends.limiter is not None:
        await backends.limiter.close()


async def _start_runtime(kernel: Kernel) -> dict[str, Any] | None:
    # built without connecting: an engine that is down is not a missing backend (routes answer
    # 503 until it is back; the sandbox services say so at startup)
    return {"runtime": select(kernel.hooks, SANDBOX_RUNTIME, kernel.settings)}


async def _stop_runtime(backends: Backends) -> None:
    if backends.runtime is not None:
        await backends.runtime.close()


async def _start_egress(kernel: Kernel) -> dict[str, Any] | None:
    settings = kernel.settings
    # only under an allowlist; a data plane runs what its control plane attached (which refuses
    # an allowlist with sandbox.runtime: remote), and loads no egress plugin
    if not settings.codex.sandbox.egress_allowlist or settings.sandbox.role == DATA_PLANE:
        return None
    enforcer = select(kernel.hooks, EGRESS, settings)
    await enforcer.start(kernel)
    return {"egress": enforcer}


async def _stop_egress(backends: Backends) -> None:
    if backends.egress is not None:
        await backends.egress.stop()


@attrs.frozen
class _Step:
    name: str
    fields: tuple[str, ...]  # what the step fills; emptied again when it stops
    start: Callable[[Kernel], Awaitable[dict[str, Any] | None]]
    stop: Callable[[Backends], Awaitable[None]]


# In this order: the egress enforcer's start may read the others (the broker reads the store).
STEPS: tuple[_Step, ...] = (
    _Step("secrets", ("secrets",), _start_secrets, _stop_secrets),
    _Step("rate limit", ("limiter", "rate_rules"), _start_rate_limit, _stop_rate_limit),
    _Step("sandbox runtime", ("runtime",), _start_runtime, _stop_runtime),
    _Step("egress", ("egress",), _start_egress, _stop_egress),
)
_EMPTY = Backends()


class BackendRunner:
    """Starts the kernel's backends in order, stops them in reverse, and holds the current
    :class:`Backends` value (``kernel.backends``); the kernel is its only user."""

    def __init__(self, kernel: Kernel):
        self._kernel = kernel
        self.current = _EMPTY
        self._started: list[_Step] = []

    async def start(self) -> None:
        """Start every backend the settings call for that is not running yet (a failure raises;
        the kernel then stops what started)."""
        for step in STEPS:
            if step in self._started:
                continue
            try:
                changes = await step.start(self._kernel)
            except StartupError:
                raise
            except Exception as exc:
                raise StartupError(f"backend {step.name!r} failed to start: {exc}") from exc
            if changes is None:
                continue
            self._started.append(step)
            self.current = attrs.evolve(self.current, **changes)

    async def stop(self) -> None:
        """Stop in reverse order; one failing stop does not skip the rest."""
        while self._started:
            step = self._started.pop()
            backends = self.current
            self.current = attrs.evolve(backends, **{f: getattr(_EMPTY, f) for f in step.fields})
            try:
                await step.stop(backends)
            except Exception:
                log.exception("backend %r failed to stop", step.name)

    def settings_changed(self, settings: Settings) -> None:
        """The rate rules follow the live settings (the config overlay)."""
        if self.current.limiter is not None:
            rules = tuple(self._kernel.hooks.ratelimit_rules(settings))
            self.current = attrs.evolve(self.current, rate_rules=rules)
