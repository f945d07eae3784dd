"""A real PostgreSQL for the tests (``RISOLUTO_POSTGRES_DSN``, provisioned by
``scripts/provision-services``). Each test gets a schema of its own, selected through the
DSN's ``search_path``: the same way an operator puts the table in a schema.

Without a server: under CI (``CI=true``) the tests FAIL; locally as root the provisioning
script is run once; otherwise they skip, saying why.
"""

from __future__ import annotations

import os
import socket
import subprocess
import uuid
from pathlib import Path

import psycopg
import pytest
from psycopg.conninfo import make_conninfo

ROOT = Path(__file__).resolve().parents[3]
# the role and test-only password scripts/provision-services creates
TEST_DSN = "postgresql://risoluto:risoluto@127.0.0.1:5432/risoluto"


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def reachable(dsn: str) -> bool:
    try:
        with psycopg.connect(dsn, connect_timeout=3) as conn:
            conn.execute("SELECT 1")
        return True
    except psycopg.Error:
        return False


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def pg_dsn() -> str:
    dsn = os.environ.get("RISOLUTO_POSTGRES_DSN") or TEST_DSN
    script = ROOT / "scripts" / "provision-services"
    if not reachable(dsn) and os.geteuid() == 0 and script.exists():
        subprocess.run(["bash", str(script)], check=False, timeout=600)
    if not reachable(dsn):
        reason = ("no PostgreSQL answers at RISOLUTO_POSTGRES_DSN or the test DSN "
                  "(run scripts/provision-services as root)")
        if in_ci():
            pytest.fail(f"{reason}; CI=true: the PostgreSQL tests must run, not skip")
        pytest.skip(reason)
    return dsn


@pytest.fixture
def admin(pg_dsn: str):
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        yield conn


@pytest.fixture
def schema_dsn(pg_dsn: str, admin):
    """A DSN whose search_path is a fresh schema; the schema is dropped afterwards."""
    name = f"rt_{uuid.uuid4().hex[:12]}"
    admin.execute(f"CREATE SCHEMA {name}")
    yield make_conninfo(pg_dsn, options=f"-c search_path={name}")
    admin.execute(f"DROP SCHEMA {name} CASCADE")


@pytest.fixture
def db(schema_dsn: str):
    """A sync connection into the test's schema, to look at (and tamper with) the rows."""
    with psycopg.connect(schema_dsn, autocommit=True) as conn:
        yield conn


@pytest.fixture
def pg_env(monkeypatch, schema_dsn: str) -> str:
    monkeypatch.setenv("RISOLUTO_POSTGRES_DSN", schema_dsn)
    return schema_dsn


@pytest.fixture
def anyio_backend():
    return "asyncio"  # Quart and psycopg's async API run on asyncio
