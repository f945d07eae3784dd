"""Where the master key comes from (a kernel library: the default stores, the secrets CLI and
third-party stores such as contrib/risoluto-postgres share it; docs/secrets.md).

``MASTER_KEY`` (environment) wins; else ``<DATA_DIR>/master.key``. The file must be a
regular file with no group/other permission bits (like ssh with a private key): a key
file others can read protects nothing, so such a file is a startup error, not a warning.
Surrounding whitespace (the newline ``echo`` adds) is stripped, as it is for the variable.
A key is one line of printable text: one holding a line break or another control character is
refused (``key_problem``), because a key the operator cannot type back is a locked store.

Rotation of a key that lives in ``master.key`` is crash-safe in three steps: the new key
is written to ``master.key.new`` (durably) BEFORE any data is re-encrypted; the data is
re-encrypted in one atomic step; then ``master.key.new`` is renamed over ``master.key``.
At every instant the key that opens the data is on disk; a startup that finds the data
under ``master.key.new`` finishes the rename (see ``open_store`` in the secrets plugins).
"""

from __future__ import annotations

import os
import stat
import unicodedata
from pathlib import Path
from typing import TYPE_CHECKING

import attrs

from .errors import StartupError
from .fsutil import atomic_write, fsync_dir
from .hookspecs.doctor import FAIL, CheckResult

if TYPE_CHECKING:
    from .settings import Settings

KEY_FILE = "master.key"
PENDING_FILE = "master.key.new"
BUILTIN_BACKENDS = ("file", "sqlite")


@attrs.frozen
class MasterKey:
    value: str = attrs.field(repr=False)
    source: str  # "MASTER_KEY" or the path of master.key
    path: Path | None = None  # the key file, when the key came from one


def key_path(settings: Settings) -> Path:
    return settings.data_path / KEY_FILE


def pending_path(settings: Settings) -> Path:
    return settings.data_path / PENDING_FILE


def key_problem(value: str) -> str | None:
    """Why ``value`` cannot be a master key (a sentence fragment), or None. Never shows the value."""
    for char in value:
        # Cc: C0/C1 controls (tab, CR, LF, NUL, ESC, DEL, NEL...); Zl/Zp: U+2028, U+2029
        if unicodedata.category(char) in ("Cc", "Zl", "Zp"):
            kind = "a line break" if char in "\n\r\x0b\x0c\x85\u2028\u2029" else "a control character"
            return f"contains {kind} (U+{ord(char):04X}); a master key is one line of printable text"
    return None


def resolve_master_key(settings: Settings, *, allow_unprintable: bool = False) -> MasterKey | None:
    """The configured key, None when there is none (locked mode); StartupError if unusable.

    ``allow_unprintable`` is for ``rotate-key`` only: data encrypted under a key with a control
    character (accepted before this rule) must still be movable to a clean key.
    """
    if settings.master_key:
        mk = MasterKey(settings.master_key, "MASTER_KEY")
    else:
        path = key_path(settings)
        value = read_key_file(path)
        if value is None:
            return None
        mk = MasterKey(value, str(path), path)
    problem = key_problem(mk.value)
    if problem and not allow_unprintable:
        raise StartupError(f"the master key from {mk.source} {problem}. If data was encrypted under it, "
                           "move it to a new key with: risoluto secrets rotate-key")
    return mk


def read_key_file(path: Path) -> str | None:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise StartupError(f"cannot read the master key file {path}: {exc.strerror}") from None
    if not stat.S_ISREG(st.st_mode):
        raise StartupError(f"the master key file {path} is not a regular file")
    if st.st_mode & 0o077:
        raise StartupError(
            f"the master key file {path} is accessible to group/others (mode {stat.S_IMODE(st.st_mode):04o}); "
            f"run: chmod 600 {path}"
        )
    try:
        value = path.read_bytes().decode("utf-8").strip()
    except UnicodeDecodeError:
        raise StartupError(f"the master key file {path} is not UTF-8 text") from None
    except OSError as exc:
        raise StartupError(f"cannot read the master key file {path}: {exc.strerror}") from None
    if not value:
        raise StartupError(f"the master key file {path} is empty; write the key into it or remove it")
    return value


def stage_new_key(settings: Settings, new_key: str) -> Path:
    """Step 1 of a file-key rotation: the new key durable in master.key.new (0600)."""
    path = pending_path(settings)
    atomic_write(path, (new_key + "\n").encode("utf-8"), 0o600)
    return path


def commit_new_key(settings: Settings) -> None:
    """Step 3: master.key.new becomes master.key in one rename."""
    os.replace(pending_path(settings), key_path(settings))
    fsync_dir(settings.data_path)


# -- doctor --------------------------------------------------------------------------------


def key_for_check(settings: Settings, item: str) -> tuple[str | None, list[CheckResult]]:
    """For a store's doctor check: (the master key, []) or (None, what to report instead).

    A locked store reports nothing here: the master-key check already says so.
    """
    try:
        mk = resolve_master_key(settings)
    except Exception as exc:
        return None, [CheckResult(item=item, status=FAIL, reason=str(exc), fix="fix the master key first")]
    return (mk.value, []) if mk is not None else (None, [])
