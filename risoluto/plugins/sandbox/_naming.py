"""Names, labels and the container user shared by the sandbox plugins (not a plugin itself).

Issue identifiers come from outside (trackers, API callers): they are sanitised before they
become part of a path, a container name or a volume name.
"""

from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path

from ...errors import ApiError
from ...settings import Settings
from ...text import is_text

LABEL_ISSUE = "risoluto.issue"
LABEL_WORKSPACE = "risoluto.workspace"
LABEL_STARTED = "risoluto.started-at"
LABEL_POLICY = "risoluto.policy"
LABEL_INSTANCE = "risoluto.instance"  # which kernel (DATA_DIR) manages the object
LABEL_MANAGED = "risoluto.managed"
LABEL_SCOPE = "risoluto.scope"  # volumes: "attempt" (removed with the container) | "issue"
SCOPE_ATTEMPT = "attempt"  # a volume made for one launch (it starts empty, goes with it)

CONTAINER_HOME = "/home/agent"
CODEX_HOME = "/home/agent/.codex-runtime"
WORKSPACE = "/workspace"

MAX_ISSUE_CHARS = 200  # longer identifiers are refused with 400 invalid_issue
_KEY_CHARS = 64  # the readable part of a sanitised key
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")
# C0 and C1 controls (U+0085 NEL and U+009B CSI among them) and the bidirectional controls
# (embeddings, overrides, isolates, and the LRM/RLM/ALM marks): an id that reorders or
# rewrites what a terminal or a log viewer shows never reaches a label, a path or a record.
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069]")
_USER = re.compile(r"^([0-9]{1,10}):([0-9]{1,10})\Z")


def validate_issue(issue: object) -> str:
    """The issue identifier as given, or 400 ``invalid_issue``."""
    if not isinstance(issue, str) or not issue.strip():
        raise ApiError(400, "invalid_issue", "issue must be a non-empty string.")
    if len(issue) > MAX_ISSUE_CHARS:
        raise ApiError(400, "invalid_issue", f"issue is longer than {MAX_ISSUE_CHARS} characters.")
    if _CONTROL.search(issue):
        raise ApiError(400, "invalid_issue", "issue must not contain control characters (C0, C1 or bidirectional).")
    if not is_text(issue):  # a lone surrogate, from JSON or from an argv byte that is not UTF-8
        raise ApiError(400, "invalid_issue", "issue must be valid Unicode text.")
    return issue


def issue_key(issue: str) -> str:
    """``[^A-Za-z0-9._-]`` -> ``_``, no leading dot (so never ``.``/``..``), bounded length.

    When sanitising changed anything, a short digest of the original is appended so two
    different issues (``a/b`` and ``a_b``) never share a workspace or a HOME volume.
    """
    key = _UNSAFE.sub("_", issue)
    stripped = key.lstrip(".")
    key = "_" * (len(key) - len(stripped)) + stripped
    if key != issue or len(key) > _KEY_CHARS:
        digest = hashlib.sha256(issue.encode("utf-8")).hexdigest()[:10]
        key = f"{key[:_KEY_CHARS]}-{digest}"
    return key


# What a sandbox id or name may look like wherever one arrives from outside (API paths, the
# data plane's routes and wire format): a container id or a valid Docker name.
SANDBOX_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}\Z")
# An image reference as a launch request or the data plane's wire format may give it: Docker's
# reference grammar (distribution/reference), so nothing the engine would read as a path
# reaches its API (the SDK puts the name into the URL as it is: "x/../../containers" became
# GET /containers/json). Separators are non-empty here (Docker: [-]*), which matches the
# same names and keeps the pattern free of nested ambiguous repeats (no backtracking blow-up).
_DOMAIN_PART = r"(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])"
_DOMAIN = (rf"(?:localhost(?::[0-9]+)?|{_DOMAIN_PART}(?:\.{_DOMAIN_PART})+(?::[0-9]+)?"
           rf"|{_DOMAIN_PART}:[0-9]+)")
_PATH_PART = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
_TAG = r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}"
_DIGEST = r"[A-Za-z][A-Za-z0-9]*(?:[-_+.][A-Za-z][A-Za-z0-9]*)*:[0-9a-fA-F]{32,}"
IMAGE_REF = re.compile(rf"(?:{_DOMAIN}/)?{_PATH_PART}(?:/{_PATH_PART})*(?::{_TAG})?(?:@{_DIGEST})?\Z")
MAX_IMAGE_REF = 255


def valid_image_ref(text: str) -> bool:
    return len(text) <= MAX_IMAGE_REF and IMAGE_REF.match(text) is not None


def checked_id(sandbox_id: str) -> str:
    """``sandbox_id`` if it could name a sandbox, else 404 ``sandbox_not_found`` (never passed on)."""
    if not SANDBOX_ID.match(sandbox_id):
        raise ApiError(404, "sandbox_not_found", "No sandbox with that id.")
    return sandbox_id


def container_name(key: str) -> str:
    """A valid Docker name (``[a-zA-Z0-9][a-zA-Z0-9_.-]+``), unique per attempt."""
    return f"risoluto-{key}-{os.urandom(4).hex()}"


def home_volume(key: str, settings: Settings) -> str:
    """The per-issue HOME volume of THIS kernel: two kernels on one engine (two DATA_DIRs)
    never share an issue's build caches and shell history."""
    return f"risoluto-home-{instance_id(settings)[:12]}-{key}"


def attempt_volume_prefix(instance: str) -> str:
    """Every per-attempt volume of a kernel is named with this prefix, so the cleanup finds one
    by name even when the engine made it without its labels (a create cut short by an engine
    shutdown leaves a bare volume of that name)."""
    return f"risoluto-attempt-{instance[:12]}-"


def attempt_volume(instance: str) -> str:
    return attempt_volume_prefix(instance) + os.urandom(8).hex()


def instance_id(settings: Settings) -> str:
    """Stable id of this kernel: a digest of its DATA_DIR, so two kernels on one engine
    never clean up each other's containers."""
    return hashlib.sha256(str(settings.data_path).encode("utf-8")).hexdigest()[:16]


def container_user(settings: Settings) -> tuple[int, int]:
    """``codex.sandbox.user`` (``uid:gid``) or the kernel process's own uid:gid."""
    configured = settings.codex.sandbox.user.strip()
    if not configured:
        return os.getuid(), os.getgid()
    match = _USER.match(configured)
    if not match:
        raise ApiError(
            503, "sandbox_misconfigured",
            f"codex.sandbox.user must be numeric uid:gid such as 1000:1000, got {configured!r}.",
        )
    return int(match.group(1)), int(match.group(2))


def workspace_root(settings: Settings) -> Path:
    """Relative to the kernel's working directory, normalised (no ``..`` left)."""
    return Path(os.path.abspath(os.path.expanduser(settings.workspace.root)))


def auth_dir(settings: Settings) -> Path:
    return Path(os.path.abspath(os.path.expanduser(settings.codex.auth_dir)))
