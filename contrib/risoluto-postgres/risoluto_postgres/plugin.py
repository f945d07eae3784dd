"""The plugin the kernel loads through the ``risoluto`` entry point ``postgres``.

Selected by ``secrets.backend: postgres``; the server is ``plugins.settings.postgres.dsn`` in the
config file (default ``postgresql://risoluto@127.0.0.1:5432/risoluto``), overridden by
``RISOLUTO_POSTGRES_DSN``. The password should come from ``PGPASSWORD`` or ``~/.pgpass``, as libpq
reads them, rather than from the DSN (``risoluto config show`` redacts it there all the same).
"""

from __future__ import annotations

import ipaddress
from typing import Any

import psycopg
from psycopg.conninfo import conninfo_to_dict

from risoluto.errors import ConfigError
from risoluto.hookspecs import hookimpl
from risoluto.hookspecs.doctor import FAIL, PASS, WARN, CheckResult
from risoluto.hookspecs.secrets import SecretStoreError
from risoluto.crypto import Verified, assess, derive_key, key_check
from risoluto.settings import Settings
from risoluto.keys import key_for_check

from .store import DEFAULT_DSN, HAS_AAD, READ_META, TABLES, PostgresStore, redact_dsn

BACKEND = "postgres"
NAME = "postgres"  # the entry point's name: this plugin's settings are plugins.settings.postgres
SETTINGS = {"dsn"}
ITEM = "credential encryption: store"  # the same item the built-in backends report


def postgres_dsn(kernel: Any) -> str:
    """The environment's override, else the config file's ``dsn``, else the default."""
    override = (kernel.environ.get("RISOLUTO_POSTGRES_DSN") or "").strip()
    return override or str(kernel.plugin_settings(NAME).get("dsn") or "").strip() or DEFAULT_DSN


@hookimpl
def risoluto_settings_validate(settings: Settings) -> None:
    section = settings.plugins.settings.get(NAME, {})
    for key in sorted(set(section) - SETTINGS):
        raise ConfigError(f"plugins.settings.{NAME}.{key}: unknown key (known: dsn)")
    dsn = section.get("dsn")
    if dsn is not None:
        if not isinstance(dsn, str):
            raise ConfigError(f"plugins.settings.{NAME}.dsn: expected a string")
        try:
            conninfo_to_dict(dsn)
        except psycopg.ProgrammingError:
            raise ConfigError(f"plugins.settings.{NAME}.dsn: not a PostgreSQL connection string or URL") from None


@hookimpl
def risoluto_secret_store(kernel: Any, settings: Settings, master_key: str) -> PostgresStore | None:
    if settings.secrets.backend != BACKEND:
        return None
    return PostgresStore(postgres_dsn(kernel), master_key)


def verify_sync(conn: psycopg.Connection, key: bytes, where: str) -> Verified:
    """The store's read-only verification, with the sync driver (doctor hooks are sync)."""
    has_table, has_meta = conn.execute(TABLES).fetchone()  # type: ignore[misc]
    stored = None
    if has_meta:
        row = conn.execute(READ_META).fetchone()
        stored = row[0] if row else None
    rows: list[Any] = []
    if has_table:
        aad = "aad" if conn.execute(HAS_AAD).fetchone()[0] else "0"  # type: ignore[index]
        rows = conn.execute(f"SELECT key, ciphertext, iv, auth_tag, {aad} FROM encrypted_secrets").fetchall()
    return assess(key, key_check(key), rows, stored, where)


def _private_transport(dsn: str) -> bool:
    """Unix socket, loopback, or TLS required: the connection's password is not sent in clear."""
    params = conninfo_to_dict(dsn)
    if params.get("sslmode") in ("require", "verify-ca", "verify-full"):
        return True
    for host in str(params.get("host") or "").split(","):
        if host and not host.startswith("/") and host != "localhost":
            try:
                if not ipaddress.ip_address(host).is_loopback:
                    return False
            except ValueError:
                return False
    return True


@hookimpl
def risoluto_doctor_checks(kernel: Any) -> list[CheckResult]:
    if kernel.settings.secrets.backend != BACKEND:
        return []

    key, report = key_for_check(kernel.settings, ITEM)
    if key is None:
        return report  # a key error, or nothing: the master-key check already reports locked mode
    dsn = postgres_dsn(kernel)
    where = redact_dsn(dsn)
    try:
        with psycopg.connect(dsn, connect_timeout=3, autocommit=True, application_name="risoluto-doctor") as conn:
            found = verify_sync(conn, derive_key(key), where)
            fsync = conn.execute("SHOW fsync").fetchone()[0]  # type: ignore[index]
    except psycopg.Error as exc:
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        return [CheckResult(item=ITEM, status=FAIL, reason=f"PostgreSQL at {where} is unreachable: {reason}",
                            fix="start PostgreSQL, or fix plugins.settings.postgres.dsn (password: PGPASSWORD/~/.pgpass)")]
    except SecretStoreError as exc:
        return [CheckResult(item=ITEM, status=FAIL, reason=str(exc),
                            fix="start with the key that wrote the data, or restore the table from a backup")]
    if found.damaged:
        names = ", ".join(sorted(found.damaged)[:10])
        return [CheckResult(item=ITEM, status=FAIL,
                            reason=f"{len(found.damaged)} secret(s) fail authentication (tampered or moved): {names}",
                            fix="re-set them (`risoluto secrets set NAME`) or delete them; restore from a backup")]
    if fsync != "on":
        return [CheckResult(item=ITEM, status=WARN, reason=f"PostgreSQL at {where} runs with fsync={fsync}",
                            fix="set fsync = on in postgresql.conf: acknowledged secrets may be lost in a crash")]
    if found.legacy:
        return [CheckResult(item=ITEM, status=WARN,
                            reason=f"{found.legacy} row(s) written by the original are not bound to their names",
                            fix="run `risoluto secrets rotate-key` (or re-set them) to upgrade every row")]
    if not _private_transport(dsn):
        return [CheckResult(item=ITEM, status=WARN, reason=f"PostgreSQL at {where} is reached without TLS",
                            fix="add sslmode=verify-full to plugins.settings.postgres.dsn")]
    return [CheckResult(item=ITEM, status=PASS,
                        reason=f"postgres backend at {where}, AES-256-GCM, {found.rows} row(s), key matches")]


@hookimpl
def risoluto_checklist_provides() -> list[str]:
    return ["secret store"]  # a secret backend: may stand in for the built-in ones
