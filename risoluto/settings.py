"""Settings: frozen attrs classes built from defaults, YAML file, overlay and environment.

Sources, later wins: embedded defaults, the YAML file named by ``RISOLUTO_CONFIG``,
``<DATA_DIR>/config/overlay.yaml`` (deep-merged), then environment variables.
Keys may be written in camelCase or snake_case. Anything unknown, mistyped or out of
range raises :class:`ConfigError` naming the key path: never a silent default.
"""

from __future__ import annotations

import ipaddress
import math
import os
import re
import typing
from pathlib import Path
from typing import Any, Callable, Literal, Mapping

import attrs
import yaml

from .errors import ConfigError
from .text import is_text

_SIZE = re.compile(r"^[0-9]+(\.[0-9]+)?[bkmg]?\Z", re.IGNORECASE)
_SIZE_UNITS = {"": 1, "b": 1, "k": 1024, "m": 1024**2, "g": 1024**3}


def parse_size(text: str) -> int:
    """Docker-style size (``512m``, ``4g``) to bytes."""
    text = text.strip().lower()
    unit = text[-1] if text and text[-1] in "bkmg" else ""
    number = text[: len(text) - len(unit)]
    return int(float(number) * _SIZE_UNITS[unit])


MAX_SIZE = 2**50  # 1 PiB: above any memory, tmpfs or log size Docker would be asked for
MAX_TIMEOUT_S = 7 * 24 * 3600.0  # a sandbox's timeout, in the config and in a launch request


def _size(_inst: Any, attribute: attrs.Attribute, value: str) -> None:
    try:
        ok = bool(_SIZE.match(value)) and 0 < parse_size(value) <= MAX_SIZE
    except OverflowError:  # "9" * 400 parses as a float infinity
        ok = False
    if not ok:
        raise ValueError(f"{value!r} is not a size such as 512m or 4g (at most 1 PiB)")


_size.allowed = "size, <= 1 PiB"  # type: ignore[attr-defined]  # for the docs


def _positive(limit: float) -> Callable[[Any, attrs.Attribute, float], None]:
    """Greater than 0 and at most ``limit``: also refuses NaN and infinity (YAML's .nan, .inf),
    and values so large that they would be a denial of service rather than a setting."""

    def check(_inst: Any, attribute: attrs.Attribute, value: float) -> None:
        if not 0 < value <= limit:
            raise ValueError(f"must be greater than 0 and at most {limit:g}, got {value}")

    shown = f"{int(limit) if float(limit).is_integer() else limit:,}".replace(",", " ")
    check.allowed = f"> 0, <= {shown}"  # type: ignore[attr-defined]  # for the docs
    return check


def _cidrs(_inst: Any, attribute: attrs.Attribute, value: list[str]) -> None:
    for item in value:
        try:
            ipaddress.ip_network(item, strict=False)
        except ValueError:
            raise ValueError(f"{item!r} is not an IP network (CIDR)") from None


def _port(_inst: Any, attribute: attrs.Attribute, value: int) -> None:
    if not 0 <= value <= 65535:
        raise ValueError(f"{value} is not a TCP port (0-65535)")




@attrs.frozen(kw_only=True)
class SecurityConfig:
    no_new_privileges: bool = True
    drop_capabilities: bool = True
    gvisor: bool = False
    seccomp_profile: str = ""
    read_only_rootfs: bool = False


@attrs.frozen(kw_only=True)
class ResourcesConfig:
    memory: str = attrs.field(default="4g", validator=_size)
    memory_reservation: str = attrs.field(default="1g", validator=_size)
    memory_swap: str = attrs.field(default="4g", validator=_size)
    cpus: float = attrs.field(default=2.0, validator=_positive(1024))
    pids_limit: int = attrs.field(default=512, validator=_positive(4_194_304))
    tmpfs_size: str = attrs.field(default="512m", validator=_size)


@attrs.frozen(kw_only=True)
class LogsConfig:
    driver: str = "json-file"
    max_size: str = attrs.field(default="50m", validator=_size)
    max_file: int = attrs.field(default=3, validator=_positive(100))


@attrs.frozen(kw_only=True)
class SandboxConfig:
    image: str = "risoluto-codex:latest"
    network: str = "risoluto-internal"
    egress_allowlist: list[str] = attrs.field(factory=list)
    security: SecurityConfig = attrs.field(factory=SecurityConfig)
    resources: ResourcesConfig = attrs.field(factory=ResourcesConfig)
    logs: LogsConfig = attrs.field(factory=LogsConfig)
    user: str = ""  # "uid:gid"; empty = the kernel process's own uid:gid
    timeout_s: float = attrs.field(default=3600.0, validator=_positive(MAX_TIMEOUT_S))
    max_concurrent: int = attrs.field(default=8, validator=_positive(1024))
    stop_grace_s: float = attrs.field(default=10.0, validator=_positive(3600))


@attrs.frozen(kw_only=True)
class TurnSandboxPolicy:
    type: Literal["workspaceWrite", "readOnly", "dangerFullAccess"] = "workspaceWrite"
    network_access: bool = False


@attrs.frozen(kw_only=True)
class CodexConfig:
    sandbox: SandboxConfig = attrs.field(factory=SandboxConfig)
    thread_sandbox: Literal["workspace-write", "workspace-read", "danger-full-access"] = "workspace-write"
    turn_sandbox_policy: TurnSandboxPolicy = attrs.field(factory=TurnSandboxPolicy)
    auth_dir: str = "~/.codex"


@attrs.frozen(kw_only=True)
class WorkspaceConfig:
    root: str = "../risoluto-workspaces"


@attrs.frozen(kw_only=True)
class SecretsConfig:
    backend: str = "file"


@attrs.frozen(kw_only=True)
class BucketConfig:
    limit: int = attrs.field(default=300, validator=_positive(1_000_000_000))
    window_seconds: float = attrs.field(default=60.0, validator=_positive(366 * 24 * 3600))


@attrs.frozen(kw_only=True)
class RateLimitConfig:
    api: BucketConfig = attrs.field(factory=BucketConfig)
    webhooks: BucketConfig = attrs.field(factory=lambda: BucketConfig(limit=600))
    backend: str = "memory"
    max_clients: int = attrs.field(default=1_000_000, validator=_positive(100_000_000))
    fail_open: bool = False


@attrs.frozen(kw_only=True)
class ServerConfig:
    bind: str = "127.0.0.1"
    port: int = attrs.field(default=4000, validator=_port)
    trusted_proxies: list[str] = attrs.field(factory=list, validator=_cidrs)
    write_token: str = attrs.field(default="", repr=False)
    read_token: str = attrs.field(default="", repr=False)
    max_body_bytes: int = attrs.field(default=1024 * 1024, validator=_positive(2**30))
    # a request body must have fully arrived this long after its headers (docs/http-security.md)
    body_timeout_seconds: float = attrs.field(default=10.0, validator=_positive(3600))


# ``plugins.settings``: plugin name -> that plugin's own section, plain YAML data with snake_case
# keys. The plugin validates its section (risoluto_settings_validate) and reads it through
# ``kernel.plugin_settings(name)``.
PluginSections = dict[str, dict[str, Any]]


@attrs.frozen(kw_only=True)
class PluginsConfig:
    disable: list[str] = attrs.field(factory=list)
    settings: PluginSections = attrs.field(factory=dict)


@attrs.frozen(kw_only=True)
class EgressAuditConfig:
    max_bytes: int = attrs.field(default=50 * 1024 * 1024, validator=_positive(2**40))
    keep: int = attrs.field(default=5, validator=_positive(1000))


@attrs.frozen(kw_only=True)
class EgressRuleConfig:
    """One ``egress.rules`` entry; its host patterns are checked by the egress plugin (docs/egress.md)."""

    hosts: list[str] = attrs.field(factory=list)
    methods: list[str] = attrs.field(factory=list)
    paths: list[str] = attrs.field(factory=list)
    verdict: Literal["allow", "deny"] = "deny"


def _nonempty(_inst: Any, attribute: attrs.Attribute, value: Any) -> None:
    if not value:
        raise ValueError("must not be empty")


_nonempty.allowed = "required"  # type: ignore[attr-defined]  # for the docs


@attrs.frozen(kw_only=True)
class CredentialConfig:
    """One brokered credential (``egress.credentials[]``, config file only; docs/egress.md)."""

    secret: str = attrs.field(default="", validator=_nonempty)
    hosts: list[str] = attrs.field(factory=list, validator=_nonempty)
    header: str = "Authorization"
    format: str = "Bearer {value}"
    paths: list[str] = attrs.field(factory=lambda: ["/*"], validator=_nonempty)
    methods: list[str] = attrs.field(factory=list)  # empty: every method


@attrs.frozen(kw_only=True)
class EgressConfig:
    resolver: str = ""
    hosts: dict[str, str] = attrs.field(factory=dict)
    allow_private_networks: list[str] = attrs.field(factory=list, validator=_cidrs)
    max_connections: int = attrs.field(default=256, validator=_positive(65_536))
    idle_timeout_s: float = attrs.field(default=60.0, validator=_positive(24 * 3600))
    connect_timeout_s: float = attrs.field(default=10.0, validator=_positive(3600))
    deny: list[str] = attrs.field(factory=list)
    rules: list[EgressRuleConfig] = attrs.field(factory=list)
    on_unlisted: Literal["deny", "ask"] = "deny"
    ask_timeout_seconds: float = attrs.field(default=30.0, validator=_positive(3600))
    audit: EgressAuditConfig = attrs.field(factory=EgressAuditConfig)
    # Credential brokering (docs/egress.md): config file only, never the overlay.
    credentials: list[CredentialConfig] = attrs.field(factory=list)
    upstream_ca_file: str = ""


@attrs.frozen(kw_only=True)
class RuntimeConfig:
    runtime: str = "docker"
    data_plane_url: str = ""
    # "data-plane": serve only the sandbox runtime operations (``risoluto serve --data-plane``,
    # docs/data-plane.md); fixed when the app is created, an overlay cannot switch it.
    role: Literal["control", "data-plane"] = "control"
    data_plane_timeout_s: float = attrs.field(default=30.0, validator=_positive(3600))
    # Every call to the local Docker engine answers by then (503 sandbox_runtime_unavailable
    # otherwise): a frozen engine never holds a request longer (docs/sandbox.md, "Engine faults").
    engine_timeout_seconds: float = attrs.field(default=10.0, validator=_positive(600))


@attrs.frozen(kw_only=True)
class Settings:
    """The effective configuration. ``master_key`` and tokens never appear in repr()."""

    data_dir: str = ".risoluto"
    master_key: str = attrs.field(default="", repr=False)
    server: ServerConfig = attrs.field(factory=ServerConfig)
    codex: CodexConfig = attrs.field(factory=CodexConfig)
    workspace: WorkspaceConfig = attrs.field(factory=WorkspaceConfig)
    secrets: SecretsConfig = attrs.field(factory=SecretsConfig)
    rate_limit: RateLimitConfig = attrs.field(factory=RateLimitConfig)
    plugins: PluginsConfig = attrs.field(factory=PluginsConfig)
    egress: EgressConfig = attrs.field(factory=EgressConfig)
    sandbox: RuntimeConfig = attrs.field(factory=RuntimeConfig)

    @property
    def data_path(self) -> Path:
        return Path(self.data_dir).expanduser().resolve()

    @property
    def overlay_path(self) -> Path:
        return self.data_path / "config" / "overlay.yaml"

    def to_dict(self, redact: bool = True) -> dict[str, Any]:
        """Plain dict in camelCase (the published spelling); secrets redacted."""
        return _to_camel(attrs.asdict(self), redact)  # type: ignore[arg-type]


# Keys that only ever come from the environment (never from a file an attacker might write).
_ENV_ONLY = {"master_key", "data_dir"}
_SECRET_FIELDS = {"master_key", "write_token", "read_token"}
# plugin settings are shown redacted when their key names a secret
_SECRET_WORDS = re.compile(r"password|secret|token|credential|(^|_)key$", re.IGNORECASE)
_URL_PASSWORD = re.compile(r"(\b[a-z][a-z0-9+.-]*://[^/:@\s]*:)[^@\s]*@", re.IGNORECASE)


def snake(name: str) -> str:
    return re.sub(r"(?<=[a-z0-9])([A-Z])", r"_\1", name).lower()


def camel(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(part.title() for part in rest)


def _to_camel(value: Any, redact: bool, field: str = "") -> Any:
    if isinstance(value, list):
        return [_to_camel(v, redact, field) for v in value]
    if isinstance(value, dict):
        # user-supplied maps (egress.hosts) and plugin names (plugins.settings) keep their own keys
        convert = field not in ("hosts", "settings")
        return {
            (camel(k) if convert else k): _to_camel(v, redact, k) for k, v in value.items()
        }
    if redact and value and (field in _SECRET_FIELDS or _SECRET_WORDS.search(field)):
        return "***"
    if redact and isinstance(value, str):
        return _URL_PASSWORD.sub(r"\1***@", value)  # a password inside a plugin's URL or DSN
    return value


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp))


def _convert(cls: type, data: Any, path: str) -> Any:
    """Build attrs class ``cls`` from a mapping, checking every key and type."""
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise ConfigError(f"{path.rstrip('.') or 'config'}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in attrs.fields(cls)}
    kwargs: dict[str, Any] = {}
    seen: dict[str, str] = {}
    for raw_key, raw_value in data.items():
        if not isinstance(raw_key, str):
            raise ConfigError(f"{path}{raw_key!r}: keys must be strings")
        key = snake(raw_key)
        where = f"{path}{raw_key}"
        if key not in fields:
            raise ConfigError(f"{where}: unknown key")
        if key in seen:
            raise ConfigError(f"{where}: given twice (also as {seen[key]})")
        seen[key] = raw_key
        kwargs[key] = _value(hints[key], raw_value, where)
    try:
        return cls(**kwargs)
    except ValueError as exc:
        bad = _failing_field(cls, kwargs)
        raise ConfigError(f"{path}{camel(bad) if bad else ''}: {exc}") from None


def _failing_field(cls: type, kwargs: dict[str, Any]) -> str | None:
    for f in attrs.fields(cls):
        if f.validator is None:
            continue
        if f.name in kwargs:
            value = kwargs[f.name]
        else:  # a required key left out fails on its default
            default: Any = f.default
            value = default.factory() if hasattr(default, "factory") else default
        try:
            f.validator(None, f, value)
        except ValueError:
            return f.name
    return None


def _value(tp: Any, value: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    if tp == PluginSections:
        return _plugin_sections(value, where)
    if attrs.has(tp):
        return _convert(tp, value, where + ".")
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise ConfigError(f"{where}: must be one of {', '.join(map(str, choices))}; got {value!r}")
        return value
    if origin is list:
        (item,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list, got {type(value).__name__}")
        return [_value(item, v, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where}: expected a mapping, got {type(value).__name__}")
        return {_value(str, k, where): _value(str, v, f"{where}.{k}") for k, v in value.items()}
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        try:
            number = float(value)
        except OverflowError:
            number = math.inf
        if not math.isfinite(number):
            raise ConfigError(f"{where}: expected a finite number, got {str(value)[:40]}")
        return number
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {type(value).__name__}")
        if "\x00" in value or not is_text(value):
            raise ConfigError(f"{where}: must be text without NUL characters or lone surrogates")
        return value
    raise ConfigError(f"{where}: unsupported type {_type_name(tp)}")  # pragma: no cover


def _plugin_sections(value: Any, where: str) -> dict[str, dict[str, Any]]:
    if not isinstance(value, Mapping):
        raise ConfigError(f"{where}: expected a mapping of plugin name -> settings, got {type(value).__name__}")
    out: dict[str, dict[str, Any]] = {}
    for name, section in value.items():
        name = _value(str, name, where)
        if not isinstance(section, Mapping):
            raise ConfigError(f"{where}.{name}: expected a mapping, got {type(section).__name__}")
        out[name] = _plain(section, f"{where}.{name}")
    return out


def _plain(value: Any, where: str) -> Any:
    """YAML data as plain Python values, mapping keys in snake_case; anything else is refused."""
    if isinstance(value, Mapping):
        return {snake(_value(str, k, where)): _plain(v, f"{where}.{k}") for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, str):
        return _value(str, value, where)
    if value is None or isinstance(value, (bool, int)):
        return value
    if isinstance(value, float):
        return _value(float, value, where)
    raise ConfigError(f"{where}: unsupported value of type {type(value).__name__}")


def deep_merge(base: Mapping[str, Any], over: Mapping[str, Any], path: str = "") -> dict[str, Any]:
    """Merge ``over`` into ``base``; keys are compared in snake_case so spellings mix.

    The later source's spelling is kept, so errors name the key as the operator wrote it.
    Two spellings of one key in the same mapping are an error, not a silent pick.
    """
    out: dict[Any, Any] = dict(base)
    index = {_norm(k): k for k in out}
    seen: dict[Any, Any] = {}
    for k, v in over.items():
        key = _norm(k)
        if key in seen:
            raise ConfigError(f"{path}{k}: given twice (also as {seen[key]})")
        seen[key] = k
        old = out.pop(index.pop(key), None) if key in index else None
        mergeable = isinstance(v, Mapping) and key != "hosts"
        if mergeable and isinstance(old, Mapping):
            out[k] = deep_merge(old, v, f"{path}{k}.")
        else:
            out[k] = deep_merge({}, v, f"{path}{k}.") if mergeable else v
        index[key] = k
    return out


def _norm(key: Any) -> Any:
    return snake(key) if isinstance(key, str) else key


def load_yaml(path: Path, what: str) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{what} {path}: file not found") from None
    except OSError as exc:
        raise ConfigError(f"{what} {path}: cannot read ({exc.strerror})") from None
    return parse_yaml(text, f"{what} {path}")


def parse_yaml(text: str, what: str) -> dict[str, Any]:
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{what}:{where} malformed YAML ({getattr(exc, 'problem', exc)})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{what}: the top level must be a mapping")
    return data


def _env(environ: Mapping[str, str], name: str) -> str | None:
    value = environ.get(name)
    if value is None:
        return None
    value = value.strip()
    return value or None


def _env_overrides(environ: Mapping[str, str]) -> dict[str, Any]:
    over: dict[str, Any] = {}
    server: dict[str, Any] = {}
    if (bind := _env(environ, "RISOLUTO_BIND")) is not None:
        server["bind"] = bind
    if (port := _env(environ, "RISOLUTO_PORT")) is not None:
        if not port.isdigit():
            raise ConfigError(f"RISOLUTO_PORT: expected a port number, got {port!r}")
        server["port"] = int(port)
    if (token := _env(environ, "RISOLUTO_WRITE_TOKEN")) is not None:
        server["write_token"] = token
    if (token := _env(environ, "RISOLUTO_READ_TOKEN")) is not None:
        server["read_token"] = token
    if (proxies := _env(environ, "RISOLUTO_TRUSTED_PROXIES")) is not None:
        server["trusted_proxies"] = [p.strip() for p in proxies.split(",") if p.strip()]
    if server:
        over["server"] = server
    if (disabled := _env(environ, "RISOLUTO_DISABLE_PLUGINS")) is not None:
        over["plugins"] = {"disable": [p.strip() for p in disabled.split(",") if p.strip()]}
    return over


def _check_env_only(data: Mapping[str, Any], what: str) -> None:
    for key in data:
        if isinstance(key, str) and snake(key) in _ENV_ONLY:
            raise ConfigError(f"{what}: {key}: set only through the environment, never in a file")
        if isinstance(key, str) and snake(key) == "server" and isinstance(data[key], Mapping):
            for sub in data[key]:
                if isinstance(sub, str) and snake(sub) in {"write_token", "read_token"}:
                    raise ConfigError(
                        f"{what}: server.{sub}: tokens come only from RISOLUTO_WRITE_TOKEN / "
                        "RISOLUTO_READ_TOKEN, never from a file"
                    )


def build_settings(
    file_data: Mapping[str, Any] | None = None,
    overlay: Mapping[str, Any] | None = None,
    environ: Mapping[str, str] | None = None,
) -> Settings:
    """Merge the sources in order and validate the result.

    An overlay may not hold deploy-time keys and may only tighten the posture the file and the
    defaults give (risoluto/posture.py): the same rules at startup and at ``PUT /api/v1/config/overlay``.
    """
    from .posture import check_overlay_keys, check_tightens, may_loosen

    environ = os.environ if environ is None else environ
    may_loosen(environ)  # a misspelt switch is an error at startup, not a silent "no"
    if overlay:
        check_overlay_keys(overlay)
    settings = _merged(file_data, overlay, environ)
    if overlay:
        check_tightens(_merged(file_data, None, environ), settings, environ)
    return settings


def _merged(file_data: Mapping[str, Any] | None, overlay: Mapping[str, Any] | None,
            environ: Mapping[str, str]) -> Settings:
    merged: dict[str, Any] = {}
    for data, what in ((file_data, "config file"), (overlay, "overlay")):
        if data:
            _check_env_only(data, what)
            merged = deep_merge(merged, data)
    merged = deep_merge(merged, _env_overrides(environ))
    merged = deep_merge(merged, {
        "data_dir": _env(environ, "DATA_DIR") or ".risoluto",
        "master_key": environ.get("MASTER_KEY", "").strip(),
    })
    return _convert(Settings, merged, "")


def read_config_file(environ: Mapping[str, str]) -> dict[str, Any]:
    if (config := _env(environ, "RISOLUTO_CONFIG")) is not None:
        return load_yaml(Path(config).expanduser(), "config file")
    return {}


def load_settings(environ: Mapping[str, str] | None = None) -> Settings:
    """Settings from the real sources: file, overlay on disk, environment."""
    from .posture import OverlayRefused

    environ = os.environ if environ is None else environ
    file_data = read_config_file(environ)
    base = build_settings(file_data, None, environ)
    overlay: dict[str, Any] = {}
    if base.overlay_path.exists():
        overlay = load_yaml(base.overlay_path, "overlay")
    try:
        return build_settings(file_data, overlay, environ)
    except OverlayRefused as exc:  # saved before these rules, or the file became stricter since
        raise type(exc)(f"overlay {base.overlay_path}: {exc}", exc.key) from None


# Environment variables that override settings; "the file and the overlay alone" is the
# environment without them (a later start may not have them).
SETTING_OVERRIDE_VARS = ("RISOLUTO_BIND", "RISOLUTO_PORT", "RISOLUTO_WRITE_TOKEN", "RISOLUTO_READ_TOKEN",
                         "RISOLUTO_TRUSTED_PROXIES", "RISOLUTO_DISABLE_PLUGINS")


def without_overrides(environ: Mapping[str, str]) -> dict[str, str]:
    return {k: v for k, v in environ.items() if k not in SETTING_OVERRIDE_VARS}


def with_overlay(overlay: Mapping[str, Any], environ: Mapping[str, str] | None = None) -> Settings:
    """The settings a new overlay would produce, validated; raises ConfigError."""
    environ = os.environ if environ is None else environ
    return build_settings(read_config_file(environ), overlay, environ)
