"""What the config overlay may hold: deploy-time keys it may not, posture keys only tightened.

The overlay (``PUT /api/v1/config/overlay``, ``<DATA_DIR>/config/overlay.yaml``) is a runtime
knob anyone holding the write token (or a loopback caller on a token-less server) can turn.
So it may tighten the posture the config file and the defaults give, never loosen it, and it
may not hold keys that decide how the server is deployed (bind, tokens, plugin set, backends,
host paths). docs/configuration.md ("The overlay") is the operator's description of both tables.

Both tables are data: a new deploy-time key or posture rule is one line. A rule whose setting
does not exist in this build (e.g. ``egress.deny`` before it is added) is skipped.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Iterable, Mapping

import attrs

from .errors import ConfigError

if TYPE_CHECKING:
    from .settings import Settings

MAY_LOOSEN_ENV = "RISOLUTO_OVERLAY_MAY_LOOSEN"

# Key paths (snake_case, dotted) an overlay may not hold, the key itself or anything below it.
DEPLOY_TIME_KEYS: tuple[str, ...] = (
    "server",
    "plugins",
    "secrets",
    "sandbox",
    "rate_limit.backend",
    "rate_limit.max_clients",  # sizes the limiter when it starts
    "workspace.root",
    "egress.resolver",
    "egress.hosts",
    "egress.allow_private_networks",
    "egress.credentials",
    "egress.upstream_ca_file",  # a host path: the roots the proxy trusts upstream
    "egress.audit",  # where and how long decisions are kept: the audit trail is not the overlay's to shrink
    "codex.auth_dir",  # a host path read into every worker
    "codex.sandbox.user",
    "codex.sandbox.network",  # which Docker network workers join: fixed when the runtime starts
    "codex.sandbox.max_concurrent",  # sizes the engine connection pool when the runtime starts
    "codex.sandbox.stop_grace_s",  # read by the runtime when it starts
    "codex.sandbox.seccomp_profile",
    "codex.sandbox.security.seccomp_profile",  # a host path
    # environment-only values (a file holding them is refused anyway; the overlay says why)
    "master_key",
    "data_dir",
)
ENV_ONLY_PATHS = frozenset({"master_key", "data_dir", "server.write_token", "server.read_token"})


class OverlayRefused(ConfigError):
    """An overlay refused by the posture rules; ``status`` and ``code`` are the HTTP answer."""

    status = 400
    code = "invalid_config"

    def __init__(self, message: str, key: str):
        super().__init__(message)
        self.key = key


class OverlayKeyNotAllowed(OverlayRefused):
    status = 400
    code = "overlay_key_not_allowed"


class OverlayLoosensPolicy(OverlayRefused):
    status = 403
    code = "overlay_loosens_policy"


def check_overlay_keys(overlay: Mapping[str, Any]) -> None:
    """Refuse an overlay holding a deploy-time key (any spelling); names the key as written."""
    for path in DEPLOY_TIME_KEYS:
        written = _find(overlay, path.split("."))
        if written is not None:
            where = ("the environment (never a file)" if _snake_path(written) in ENV_ONLY_PATHS else
                     "the config file (RISOLUTO_CONFIG) or the environment")
            raise OverlayKeyNotAllowed(
                f"{written}: a deploy-time key; the overlay may not hold it. Set it in {where} instead, "
                "and remove it from the overlay.", written)


def _snake_path(written: str) -> str:
    from .settings import snake

    return ".".join(snake(part) for part in written.split("."))


def _find(data: Any, parts: list[str], prefix: str = "") -> str | None:
    from .settings import snake

    if not isinstance(data, Mapping):
        return None
    for key, value in data.items():
        if isinstance(key, str) and snake(key) == parts[0]:
            where = f"{prefix}{key}"
            if len(parts) == 1:
                # a whole section (server, plugins, ...): name the first key set under it
                while not prefix and isinstance(value, Mapping) and value:
                    key, value = next(iter(value.items()))
                    where, prefix = f"{where}.{key}", where
                return where
            found = _find(value, parts[1:], where + ".")
            if found is not None:
                return found
    return None


# --- posture rules ----------------------------------------------------------------------------
@attrs.frozen
class PostureRule:
    """``path`` (snake_case, dotted) may move only towards ``direction``: ``holds(base, new)`` says
    whether ``new`` (file + overlay) is at least as strict as ``base`` (file + defaults)."""

    path: str
    direction: str  # shown in the refusal: "only to true", "only lower", ...
    holds: Callable[[Any, Any], bool]


def _only_true(base: bool, new: bool) -> bool:
    return new or not base


def _only_false(base: bool, new: bool) -> bool:
    return not new or base


def _not_higher(base: float, new: float) -> bool:
    return new <= base


def _size_not_higher(base: str, new: str) -> bool:
    from .settings import parse_size

    return parse_size(new) <= parse_size(base)


def _ordered(*weakest_first: str) -> Callable[[str, str], bool]:
    rank = {name: i for i, name in enumerate(weakest_first)}
    return lambda base, new: rank[new] >= rank[base]


THREAD_SANDBOX_ORDER = ("danger-full-access", "workspace-write", "workspace-read")
TURN_POLICY_ORDER = ("dangerFullAccess", "workspaceWrite", "readOnly")
_turn_type = _ordered(*TURN_POLICY_ORDER)


def _turn_policy(base: Any, new: Any) -> bool:
    """Stricter: a type no weaker (readOnly > workspaceWrite > dangerFullAccess), and network
    access only from on to off."""
    return _turn_type(base.type, new.type) and _only_false(base.network_access, new.network_access)


def _bucket(base: Any, new: Any) -> bool:
    """A lower (or equal) limit over a longer (or equal) window: never more requests per second,
    never a bigger burst."""
    return new.limit <= base.limit and new.window_seconds >= base.window_seconds


def _entry(text: str) -> tuple[str, str]:
    """An allowlist entry -> (host, port) in a comparable form: lower case, no trailing dot."""
    text = text.strip().lower()
    if text.startswith("["):
        host, _, rest = text.partition("]")
        return host + "]", rest.removeprefix(":")
    host, _, port = text.partition(":")
    return host.rstrip("."), port


def _covers(base: str, new: str) -> bool:
    (bhost, bport), (nhost, nport) = _entry(base), _entry(new)
    if bport != nport and not (bport == "" and nport in ("80", "443")):
        return False
    if bhost == nhost:
        return True
    # "*.example.com" covers "a.example.com" and "*.a.example.com", never "example.com"
    return bhost.startswith("*.") and nhost.removeprefix("*.").endswith(bhost[1:])


def _allowlist(base: list[str], new: list[str]) -> bool:
    """A non-empty list whose every entry an entry of the base covers; over an empty base (no
    restriction at all) any non-empty list."""
    if not new:
        return not base
    return not base or all(any(_covers(b, n) for b in base) for n in new)


def _only_adds(base: Iterable[Any], new: Iterable[Any]) -> bool:
    return set(base) <= set(new)


def _deny_rules_first(base: list[Any], new: list[Any]) -> bool:
    """The file's rules kept, in order, at the end; only ``deny`` rules added before them (first
    match wins, so a rule put in front can only refuse what the file's rules would decide)."""
    added = len(new) - len(base)
    return added >= 0 and new[added:] == base and all(rule.verdict == "deny" for rule in new[:added])


_SECURITY = "codex.sandbox.security."
_RESOURCES = "codex.sandbox.resources."
POSTURE_RULES: tuple[PostureRule, ...] = (
    PostureRule(_SECURITY + "drop_capabilities", "only to true", _only_true),
    PostureRule(_SECURITY + "no_new_privileges", "only to true", _only_true),
    PostureRule(_SECURITY + "gvisor", "only to true", _only_true),
    PostureRule(_SECURITY + "read_only_rootfs", "only to true", _only_true),
    PostureRule("codex.thread_sandbox", "only stricter: danger-full-access < workspace-write < workspace-read",
                _ordered(*THREAD_SANDBOX_ORDER)),
    PostureRule("codex.turn_sandbox_policy", "only stricter: type dangerFullAccess < workspaceWrite < readOnly, "
                "networkAccess only to false", _turn_policy),
    PostureRule("codex.sandbox.egress_allowlist", "only to a non-empty subset", _allowlist),
    PostureRule("egress.deny", "only by adding entries", _only_adds),
    PostureRule("egress.rules", "only by adding deny rules before the config file's rules", _deny_rules_first),
    PostureRule("egress.on_unlisted", "only to deny (ask lets a person or a plugin allow unlisted hosts)",
                _ordered("ask", "deny")),
    PostureRule("rate_limit.api", "only a lower limit or a longer window", _bucket),
    PostureRule("rate_limit.webhooks", "only a lower limit or a longer window", _bucket),
    PostureRule("rate_limit.fail_open", "only to false", _only_false),
    PostureRule(_RESOURCES + "memory", "only lower", _size_not_higher),
    PostureRule(_RESOURCES + "memory_reservation", "only lower", _size_not_higher),
    PostureRule(_RESOURCES + "memory_swap", "only lower", _size_not_higher),
    PostureRule(_RESOURCES + "tmpfs_size", "only lower", _size_not_higher),
    PostureRule(_RESOURCES + "cpus", "only lower", _not_higher),
    PostureRule(_RESOURCES + "pids_limit", "only lower", _not_higher),
)

_MISSING = object()


def _at(settings: Any, path: str) -> Any:
    value = settings
    for part in path.split("."):
        value = getattr(value, part, _MISSING)
        if value is _MISSING:
            return _MISSING
    return value


@attrs.frozen
class Loosened:
    key: str  # camelCase dotted path, as the published docs spell it
    direction: str
    base: Any
    new: Any

    def describe(self) -> str:
        return (f"{self.key}: the overlay may change this setting {self.direction}; the config file and "
                f"defaults give {_shown(self.base)}, the overlay {_shown(self.new)}")


def _shown(value: Any) -> str:
    if attrs.has(type(value)):
        value = attrs.asdict(value)
    return repr(value)


def loosened(base: Settings, new: Settings) -> list[Loosened]:
    """Each posture setting ``new`` holds on the looser side of ``base``."""
    from .settings import camel

    out = []
    for rule in POSTURE_RULES:
        was, now = _at(base, rule.path), _at(new, rule.path)
        if was is _MISSING or now is _MISSING or rule.holds(was, now):
            continue
        key = ".".join(camel(p) for p in rule.path.split("."))
        out.append(Loosened(key, rule.direction, was, now))
    return out


def may_loosen(environ: Mapping[str, str]) -> bool:
    value = (environ.get(MAY_LOOSEN_ENV) or "").strip()
    if value not in ("", "0", "1"):
        raise ConfigError(f"{MAY_LOOSEN_ENV}: expected 1 (the overlay may loosen) or 0/unset, got {value[:20]!r}")
    return value == "1"


def check_tightens(base: Settings, new: Settings, environ: Mapping[str, str]) -> None:
    """Refuse (403) an overlay that loosens a posture setting, unless the environment allows it."""
    found = loosened(base, new)
    if found and not may_loosen(environ):
        first = found[0]
        raise OverlayLoosensPolicy(
            f"{first.describe()}. Set it in the config file instead, or start the server with "
            f"{MAY_LOOSEN_ENV}=1 to let the overlay loosen the posture.", first.key)


def overlay_checks(kernel: Any) -> list[Any]:
    """The doctor's WARN per posture setting the saved overlay loosens (possible only with
    RISOLUTO_OVERLAY_MAY_LOOSEN=1: without it such an overlay is refused, at PUT and at startup)."""
    from .hookspecs.doctor import FAIL, WARN, CheckResult
    from .settings import _merged, load_yaml, read_config_file

    path = kernel.settings.overlay_path
    try:
        overlay = load_yaml(path, "overlay") if path.exists() else {}
        if not overlay:
            return []
        file_data = read_config_file(kernel.environ)
        found = loosened(_merged(file_data, None, kernel.environ), _merged(file_data, overlay, kernel.environ))
    except ConfigError as exc:
        return [CheckResult(item="config overlay", status=FAIL, reason=f"cannot read the overlay: {exc}",
                            fix="fix or remove the overlay (PUT /api/v1/config/overlay)")]
    return [CheckResult(item=f"overlay: {item.key}", status=WARN,
                        reason=f"{item.describe()}: set by the overlay ({MAY_LOOSEN_ENV}=1)",
                        fix=f"remove {item.key} from the overlay, or set it in the config file if it is meant")
            for item in found]
