"""The wire format between a control plane and its data plane (not a plugin itself).

A ``ContainerSpec`` travels as JSON: its attrs fields as they are, ``files`` as base64.
``on_created`` / ``on_removed`` callbacks cannot travel (they are code on the control plane);
the remote runtime refuses a spec that has any. The data plane parses the JSON strictly
(every field typed, unknown fields refused) and never echoes a value back: the body may
hold secret environment values.
"""

from __future__ import annotations

import base64
import binascii
import math
import posixpath
from typing import Any

from ...errors import ApiError
from ...hookspecs.sandbox import ContainerSpec, Mount
from ...settings import MAX_TIMEOUT_S
from ._naming import SANDBOX_ID, valid_image_ref

PREFIX = "/dp/v1"
_MOUNT_FIELDS = {"target": str, "source": str, "type": str, "read_only": bool, "tmpfs_size": int, "labels": dict}
_LISTS = ("command", "cap_drop", "cap_add", "security_opt")
_STRINGS = ("name", "image", "user", "runtime", "network", "working_dir")
_MAPS = ("env", "labels")
_FIELDS = {*_LISTS, *_STRINGS, *_MAPS, "mounts", "files", "read_only_rootfs", "host_config", "policy"}


def spec_to_wire(spec: ContainerSpec) -> dict[str, Any]:
    """JSON-ready form of a final spec (callbacks excluded: the caller refuses them first)."""
    out: dict[str, Any] = {name: getattr(spec, name) for name in (*_STRINGS, *_LISTS, *_MAPS)}
    out["mounts"] = [{name: getattr(m, name) for name in _MOUNT_FIELDS} for m in spec.mounts]
    out["files"] = {path: base64.b64encode(data).decode("ascii") for path, data in spec.files.items()}
    out["read_only_rootfs"] = spec.read_only_rootfs
    out["host_config"] = spec.host_config
    out["policy"] = spec.policy
    return out


def invalid(message: str) -> ApiError:
    return ApiError(400, "invalid_spec", message)


def _strings(value: Any, field: str) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) and "\x00" not in v for v in value):
        raise invalid(f"spec.{field} must be a list of strings without NUL.")
    return value


def _string_map(value: Any, field: str) -> dict[str, str]:
    # Only the field name is reported, never a value: env may hold secrets.
    if not isinstance(value, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
        raise invalid(f"spec.{field} must be an object of string values.")
    return value


def _mount(raw: Any, index: int) -> Mount:
    if not isinstance(raw, dict) or set(raw) - set(_MOUNT_FIELDS):
        raise invalid(f"spec.mounts[{index}] must be an object with fields {', '.join(sorted(_MOUNT_FIELDS))}.")
    for name, kind in _MOUNT_FIELDS.items():
        if name in raw and (not isinstance(raw[name], kind) or (kind is int and isinstance(raw[name], bool))):
            raise invalid(f"spec.mounts[{index}].{name} must be of type {kind.__name__}.")
    if "target" not in raw:
        raise invalid(f"spec.mounts[{index}] has no target.")
    _string_map(raw.get("labels", {}), f"mounts[{index}].labels")
    return Mount(**raw)


def _files(raw: Any) -> dict[str, bytes]:
    if not isinstance(raw, dict):
        raise invalid("spec.files must be an object path -> base64.")
    out: dict[str, bytes] = {}
    for path, data in raw.items():
        bare = path.rstrip("/") if isinstance(path, str) else ""
        if not bare.startswith("/") or "\x00" in bare or posixpath.normpath(bare) != bare:
            raise invalid("spec.files paths must be normalised absolute paths.")
        try:
            if not isinstance(data, str):
                raise ValueError
            out[path] = base64.b64decode(data, validate=True)
        except (binascii.Error, ValueError):
            raise invalid(f"spec.files[{path[:80]!r}] is not base64.") from None
    return out


def spec_from_wire(raw: Any) -> ContainerSpec:
    """A ContainerSpec from its JSON form; 400 ``invalid_spec`` on anything odd."""
    if not isinstance(raw, dict):
        raise invalid("spec must be an object.")
    unknown = sorted(set(raw) - _FIELDS)
    if unknown:
        raise invalid(f"unknown spec field(s): {', '.join(unknown)[:200]}.")
    for field in _STRINGS:
        if not isinstance(raw.get(field, ""), str) or "\x00" in raw.get(field, ""):
            raise invalid(f"spec.{field} must be a string.")
    if not SANDBOX_ID.match(raw.get("name", "")):
        raise invalid("spec.name must be a valid container name.")
    if not valid_image_ref(raw.get("image", "")):
        raise invalid("spec.image must be an image reference.")
    for field in ("host_config", "policy"):
        if not isinstance(raw.get(field, {}), dict):
            raise invalid(f"spec.{field} must be an object.")
    if not isinstance(raw.get("read_only_rootfs", False), bool):
        raise invalid("spec.read_only_rootfs must be true or false.")
    mounts = raw.get("mounts", [])
    if not isinstance(mounts, list):
        raise invalid("spec.mounts must be a list.")
    return ContainerSpec(
        name=raw["name"], image=raw["image"], user=raw.get("user", ""), runtime=raw.get("runtime", ""),
        network=raw.get("network", ""), working_dir=raw.get("working_dir", "/workspace"),
        command=_strings(raw.get("command", []), "command"),
        cap_drop=_strings(raw.get("cap_drop", []), "cap_drop"),
        cap_add=_strings(raw.get("cap_add", []), "cap_add"),
        security_opt=_strings(raw.get("security_opt", []), "security_opt"),
        env=_string_map(raw.get("env", {}), "env"), labels=_string_map(raw.get("labels", {}), "labels"),
        mounts=[_mount(m, i) for i, m in enumerate(mounts)], files=_files(raw.get("files", {})),
        read_only_rootfs=raw.get("read_only_rootfs", False), host_config=raw.get("host_config", {}),
        policy=raw.get("policy", {}),
    )


def timeout_from_wire(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or not 0 < value <= MAX_TIMEOUT_S:
        raise invalid(f"timeout_s must be a number of seconds in (0, {MAX_TIMEOUT_S:g}].")
    return float(value)
