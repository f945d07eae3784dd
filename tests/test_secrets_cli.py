"""``risoluto secrets ...`` as an operator runs it: stdin values, rotation, migration, recovery."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from risoluto.hookspecs.secrets import WrongMasterKey
from secrets_util import stored_values
from risoluto.plugins.secrets.file_store import FileStore
from risoluto.plugins.secrets.sqlite_store import SqliteStore

pytestmark = pytest.mark.anyio

RISOLUTO = str(Path(sys.executable).parent / "risoluto")
OLD, NEW = "old master key", "new master key ✓"
MARKER = "CLI-SECRET-MARKER-51c0"
BACKENDS = ["file", "sqlite"]


def cli(data_dir: Path, *args: str, stdin: str = "", backend: str = "file", key: str | None = OLD):
    config = data_dir.parent / "config.yaml"
    config.write_text(f"secrets:\n  backend: {backend}\n")
    env = {k: v for k, v in os.environ.items() if k != "MASTER_KEY"}
    env.update(DATA_DIR=str(data_dir), RISOLUTO_CONFIG=str(config))
    if key is not None:
        env["MASTER_KEY"] = key
    return subprocess.run([RISOLUTO, "secrets", *args], input=stdin, capture_output=True, text=True, env=env,
                          timeout=60)


@pytest.mark.parametrize("backend", BACKENDS)
async def test_set_list_delete_from_stdin(backend, risoluto_data_dir, risoluto_settings):
    done = cli(risoluto_data_dir, "set", "API_TOKEN", stdin=MARKER + "\n", backend=backend)
    assert done.returncode == 0, done.stderr
    assert MARKER not in done.stdout + done.stderr
    assert cli(risoluto_data_dir, "set", "OTHER", stdin="line1\nline2", backend=backend).returncode == 0
    listed = cli(risoluto_data_dir, "list", backend=backend)
    assert listed.stdout.split() == ["API_TOKEN", "OTHER"] and MARKER not in listed.stdout
    settings = risoluto_settings({"secrets": {"backend": backend}})
    assert await stored_values(settings, backend, OLD) == {"API_TOKEN": MARKER, "OTHER": "line1\nline2"}
    assert cli(risoluto_data_dir, "delete", "OTHER", backend=backend).returncode == 0
    gone = cli(risoluto_data_dir, "delete", "OTHER", backend=backend)
    assert gone.returncode == 1 and "no secret named OTHER" in gone.stderr
    audit = [json.loads(line) for line in (risoluto_data_dir / "secrets.audit.log").read_text().splitlines()]
    assert [(e["operation"], e["key"]) for e in audit] == [("set", "API_TOKEN"), ("set", "OTHER"), ("delete", "OTHER")]
    assert all(e["principal"].startswith("cli:") and e["remote"] == "local" for e in audit)
    assert MARKER not in (risoluto_data_dir / "secrets.audit.log").read_text()


@pytest.mark.parametrize("args,stdin", [(("set", "a/b"), "v"), (("set", "A"), ""), (("set", "A"), "\n"),
                                        (("set", "A"), "x" * (64 * 1024 + 1))])
def test_bad_input_changes_nothing(args, stdin, risoluto_data_dir):
    done = cli(risoluto_data_dir, *args, stdin=stdin)
    assert done.returncode == 1 and "invalid" in done.stderr and "xxxx" not in done.stderr
    assert not (risoluto_data_dir / "secrets.enc").exists()


def test_locked_cli_says_how_to_unlock(risoluto_data_dir):
    done = cli(risoluto_data_dir, "list", key=None)
    assert done.returncode == 1 and "MASTER_KEY" in done.stderr


@pytest.mark.parametrize("backend", BACKENDS)
async def test_rotate_key_from_environment(backend, risoluto_data_dir, risoluto_settings):
    secrets = {f"S{i}": f"value {i} ✓" for i in range(25)}
    for name, value in secrets.items():
        assert cli(risoluto_data_dir, "set", name, stdin=value, backend=backend).returncode == 0
    mismatch = cli(risoluto_data_dir, "rotate-key", stdin=OLD + "\n", backend=backend)
    assert mismatch.returncode == 1 and "equals the current one" in mismatch.stderr
    done = cli(risoluto_data_dir, "rotate-key", stdin=NEW + "\n", backend=backend)
    assert done.returncode == 0, done.stderr
    assert "MASTER_KEY" in done.stderr and NEW not in done.stdout + done.stderr
    settings = risoluto_settings({"secrets": {"backend": backend}})
    assert await stored_values(settings, backend, NEW) == secrets
    with pytest.raises(WrongMasterKey):
        await stored_values(settings, backend, OLD)
    refused = cli(risoluto_data_dir, "list", backend=backend)  # the old key no longer opens the store
    assert refused.returncode == 2 and "does not match" in refused.stderr
    assert cli(risoluto_data_dir, "list", backend=backend, key=NEW).stdout.split() == sorted(secrets)
    if backend == "sqlite":  # every row is bound to its name now
        conn = sqlite3.connect(risoluto_data_dir / "risoluto.db")
        assert {r[0] for r in conn.execute("SELECT aad FROM encrypted_secrets")} == {1}
        conn.close()


@pytest.mark.parametrize("backend", BACKENDS)
async def test_rotate_key_kept_in_master_key_file(backend, risoluto_data_dir, risoluto_settings):
    key_file = risoluto_data_dir / "master.key"
    key_file.write_text(OLD + "\n")
    key_file.chmod(0o600)
    assert cli(risoluto_data_dir, "set", "A", stdin="a", backend=backend, key=None).returncode == 0
    done = cli(risoluto_data_dir, "rotate-key", stdin=NEW, backend=backend, key=None)
    assert done.returncode == 0, done.stderr
    assert key_file.read_text().strip() == NEW and key_file.stat().st_mode & 0o777 == 0o600
    assert not (risoluto_data_dir / "master.key.new").exists()
    assert cli(risoluto_data_dir, "list", backend=backend, key=None).stdout.split() == ["A"]
    settings = risoluto_settings({"secrets": {"backend": backend}})
    assert await stored_values(settings, backend, NEW) == {"A": "a"}


@pytest.mark.parametrize("backend", BACKENDS)
async def test_startup_finishes_a_rotation_interrupted_before_the_rename(backend, risoluto_data_dir,
                                                                        risoluto_settings):
    """The state a crash leaves between step 2 (data re-encrypted) and step 3 (rename)."""
    settings = risoluto_settings({"secrets": {"backend": backend}})
    store = (FileStore if backend == "file" else SqliteStore)(settings, OLD)
    await store.open()
    await store.set("A", "a")
    await store.rotate(NEW)
    await store.close()
    (risoluto_data_dir / "master.key").write_text(OLD + "\n")
    (risoluto_data_dir / "master.key.new").write_text(NEW + "\n")
    for name in ("master.key", "master.key.new"):
        (risoluto_data_dir / name).chmod(0o600)
    listed = cli(risoluto_data_dir, "list", backend=backend, key=None)
    assert listed.returncode == 0, listed.stderr
    assert listed.stdout.split() == ["A"]
    assert (risoluto_data_dir / "master.key").read_text().strip() == NEW
    assert not (risoluto_data_dir / "master.key.new").exists()


async def test_rotation_with_a_tampered_row_is_aborted(risoluto_data_dir, risoluto_settings):
    for name in ("A", "B"):
        assert cli(risoluto_data_dir, "set", name, stdin=name.lower(), backend="sqlite").returncode == 0
    conn = sqlite3.connect(risoluto_data_dir / "risoluto.db")
    conn.execute("UPDATE encrypted_secrets SET key = 'C' WHERE key = 'A'")
    conn.commit()
    conn.close()
    done = cli(risoluto_data_dir, "rotate-key", stdin=NEW, backend="sqlite")
    assert done.returncode == 1 and "rotation aborted" in done.stderr and "C" in done.stderr
    settings = risoluto_settings({"secrets": {"backend": "sqlite"}})
    store = SqliteStore(settings, OLD)
    await store.open()
    assert await store.get("B") == "b"  # still under the old key
    await store.close()


async def test_migrate_both_ways(risoluto_data_dir, risoluto_settings):
    secrets = {"A": "a", "B.c:d-e_f": "välue", "LONG": "x" * 65536}
    for name, value in secrets.items():
        assert cli(risoluto_data_dir, "set", name, stdin=value).returncode == 0
    same = cli(risoluto_data_dir, "migrate", "--to", "file")
    assert same.returncode == 1 and "already" in same.stderr
    done = cli(risoluto_data_dir, "migrate", "--to", "sqlite")
    assert done.returncode == 0, done.stderr
    assert await stored_values(risoluto_settings({"secrets": {"backend": "sqlite"}}), "sqlite", OLD) == secrets
    again = cli(risoluto_data_dir, "migrate", "--to", "sqlite")
    assert again.returncode == 1 and "refusing to merge" in again.stderr
    (risoluto_data_dir / "secrets.enc").rename(risoluto_data_dir / "secrets.enc.bak")
    back = cli(risoluto_data_dir, "migrate", "--to", "file", backend="sqlite")
    assert back.returncode == 0, back.stderr
    assert await stored_values(risoluto_settings(), "file", OLD) == secrets


@pytest.mark.parametrize("backend", BACKENDS)
async def test_the_cli_refuses_a_change_whose_audit_line_cannot_be_written(backend, risoluto_data_dir,
                                                                        risoluto_settings):
    assert cli(risoluto_data_dir, "set", "KEEP", stdin="kept\n", backend=backend).returncode == 0
    log_path = risoluto_data_dir / "secrets.audit.log"
    log_path.unlink()
    log_path.mkdir()
    for args, stdin in ((("set", "NEW"), MARKER + "\n"), (("delete", "KEEP"), "")):
        done = cli(risoluto_data_dir, *args, stdin=stdin, backend=backend)
        assert done.returncode != 0 and "nothing was changed" in done.stderr, done.stderr
        assert MARKER not in done.stderr and "Traceback" not in done.stderr
    settings = risoluto_settings({"secrets": {"backend": backend}})
    assert await stored_values(settings, backend, OLD) == {"KEEP": "kept"}


# -- rotate-key input: one line of printable text; a second line confirms -------------------------


def store_snapshot(data_dir: Path, backend: str) -> object:
    """The encrypted data as a new process would find it (bytes of secrets.enc, rows of the table)."""
    if backend == "file":
        return (data_dir / "secrets.enc").read_bytes()
    conn = sqlite3.connect(data_dir / "risoluto.db")
    try:
        return sorted(conn.execute("SELECT * FROM encrypted_secrets").fetchall())
    finally:
        conn.close()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("key_in", ["env", "file"])
async def test_rotate_key_reads_the_key_and_its_confirmation_from_two_lines(backend, key_in, risoluto_data_dir,
                                                                           risoluto_settings):
    """``new\\nnew\\n`` (the key and its confirmation, as the prompt asks) rotates to ``new``."""
    key_file = risoluto_data_dir / "master.key"
    if key_in == "file":
        key_file.write_text(OLD + "\n")
        key_file.chmod(0o600)
    key = OLD if key_in == "env" else None
    assert cli(risoluto_data_dir, "set", "A", stdin="a", backend=backend, key=key).returncode == 0
    done = cli(risoluto_data_dir, "rotate-key", stdin="new\nnew\n", backend=backend, key=key)
    assert done.returncode == 0, done.stderr
    settings = risoluto_settings({"secrets": {"backend": backend}})
    assert await stored_values(settings, backend, "new") == {"A": "a"}  # the operator's key opens it
    if key_in == "file":
        assert key_file.read_text() == "new\n"
        assert cli(risoluto_data_dir, "list", backend=backend, key=None).stdout.split() == ["A"]
    else:
        assert cli(risoluto_data_dir, "list", backend=backend, key="new").stdout.split() == ["A"]


@pytest.mark.parametrize("backend,stdin,says", [
    ("file", "new\nother\n", "does not repeat"),
    ("sqlite", "new\nother\n", "does not repeat"),
    ("file", "new\n\n", "does not repeat"),
    ("file", "new\nnew\nnew\n", "3 lines"),
    ("sqlite", "one\ntwo\nthree", "3 lines"),
    ("file", "ne\x01w\n", "control character (U+0001)"),
    ("sqlite", "ne\x01w\nne\x01w\n", "control character (U+0001)"),
    ("file", "new\tkey\n", "control character (U+0009)"),
    ("file", "new\rnew\n", "line break (U+000D)"),
    ("file", "new\u2028new\n", "line break (U+2028)"),
    ("file", "new\x1b[2Jkey\n", "control character (U+001B)"),
])
async def test_rotate_key_refuses_unprintable_or_unconfirmed_keys(backend, stdin, says, risoluto_data_dir,
                                                                  risoluto_settings):
    key_file = risoluto_data_dir / "master.key"
    key_file.write_text(OLD + "\n")
    key_file.chmod(0o600)
    assert cli(risoluto_data_dir, "set", "A", stdin="a", backend=backend, key=None).returncode == 0
    before = store_snapshot(risoluto_data_dir, backend)
    done = cli(risoluto_data_dir, "rotate-key", stdin=stdin, backend=backend, key=None)
    assert done.returncode == 1 and says in done.stderr and "nothing was changed" in done.stderr.lower()
    assert "new" not in done.stderr.replace("new master key", "")  # the key is never echoed
    assert store_snapshot(risoluto_data_dir, backend) == before
    assert key_file.read_text() == OLD + "\n" and not (risoluto_data_dir / "master.key.new").exists()
    settings = risoluto_settings({"secrets": {"backend": backend}})
    assert await stored_values(settings, backend, OLD) == {"A": "a"}
    audit = (risoluto_data_dir / "secrets.audit.log").read_text()
    assert '"rotate"' not in audit


@pytest.mark.parametrize("source", ["MASTER_KEY", "master.key"])
def test_a_master_key_with_a_control_character_is_refused(source, risoluto_data_dir):
    bad = "line one\nline two"
    if source == "master.key":
        (risoluto_data_dir / "master.key").write_text(bad + "\n")
        (risoluto_data_dir / "master.key").chmod(0o600)
    done = cli(risoluto_data_dir, "set", "A", stdin="a", key=bad if source == "MASTER_KEY" else None)
    assert done.returncode == 2 and "line break" in done.stderr and source in done.stderr
    assert "line one" not in done.stderr and "line two" not in done.stderr
    assert not (risoluto_data_dir / "secrets.enc").exists()


async def test_data_under_an_old_unprintable_key_can_be_rotated_to_a_clean_one(risoluto_data_dir, risoluto_settings):
    """Before this rule, rotate-key could leave data under ``new\\nnew``: that data can be moved."""
    legacy = "new\nnew"
    settings = risoluto_settings()
    store = FileStore(settings, legacy)
    await store.open()
    await store.set("A", "a")
    await store.close()
    assert cli(risoluto_data_dir, "list", key=legacy).returncode == 2  # refused for normal use
    done = cli(risoluto_data_dir, "rotate-key", stdin="clean key\nclean key\n", key=legacy)
    assert done.returncode == 0, done.stderr
    assert cli(risoluto_data_dir, "list", key="clean key").stdout.split() == ["A"]
