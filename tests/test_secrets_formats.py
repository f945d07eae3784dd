"""secrets.enc (compat): the interop vector, Node interop both ways, tamper and truncation."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from risoluto.errors import StartupError
from risoluto.kernel import Kernel
from risoluto.plugins.secrets.file_store import FileStore

pytestmark = pytest.mark.anyio

# interop vectors made with Node.js the way the original Risoluto writes and signs them
# (tests/vectors/README.md gives the key, plaintext and signature)
VECTORS = Path(__file__).resolve().parent / "vectors"
VECTOR_KEY = "vector-master-key-do-not-use"
VECTOR_PLAINTEXT = {"OPENAI_API_KEY": "sk-vector-0000", "LINEAR_WEBHOOK_SECRET": "lin_wh_vector",
                    "unicode.key:1": "välue ✓"}
NODE_SCRIPT = Path(__file__).parent / "interop" / "secrets_envelope.js"


def node(*args: str, key: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    return subprocess.run(["node", str(NODE_SCRIPT), *args], input=stdin, capture_output=True, text=True,
                          env={**os.environ, "MASTER_KEY": key}, timeout=60)


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


async def start(settings) -> Kernel:
    """The kernel's startup, as ``risoluto serve`` runs it (before serving)."""
    kernel = Kernel(settings)
    await kernel.start()
    await kernel.stop()
    return kernel


async def read_all(settings, key: str) -> dict[str, str]:
    store = FileStore(settings, key)
    await store.open()
    return {name: await store.get(name) for name in await store.list()}


async def test_vector_file_loads(risoluto_settings, risoluto_data_dir, risoluto_client):
    shutil.copy(VECTORS / "secrets.enc", risoluto_data_dir / "secrets.enc")
    assert await read_all(risoluto_settings(), VECTOR_KEY) == VECTOR_PLAINTEXT
    client = await risoluto_client(env={"MASTER_KEY": VECTOR_KEY})
    response = await client.get("/api/v1/secrets")
    assert response.status_code == 200
    assert await response.get_json() == {"keys": sorted(VECTOR_PLAINTEXT)}


async def test_vector_file_with_wrong_key_refuses_to_start_and_changes_nothing(risoluto_settings, risoluto_data_dir):
    path = risoluto_data_dir / "secrets.enc"
    shutil.copy(VECTORS / "secrets.enc", path)
    before = digest(path)
    env = {"DATA_DIR": str(risoluto_data_dir), "MASTER_KEY": "not-the-key"}
    with pytest.raises(StartupError) as info:
        await start(risoluto_settings(env=env))
    message = str(info.value)
    assert str(path) in message and "does not match" in message
    assert digest(path) == before
    assert not [n for n in os.listdir(risoluto_data_dir) if n.endswith(".tmp")]


async def test_file_written_by_node_loads_and_ours_loads_in_node(risoluto_settings, risoluto_data_dir, risoluto_client):
    key = "interop key ✓"
    original = {"A": "1", "multi.line:x": "l1\nl2", "quote_\"": "va\"l\\ue", "uni": "日本語 ✓", "nul": "a\x00b"}
    path = risoluto_data_dir / "secrets.enc"
    made = node("write-file", str(path), key=key, stdin=json.dumps(original))
    assert made.returncode == 0, made.stderr
    assert await read_all(risoluto_settings(), key) == original
    # and back: a write here is read by the independent implementation, with every old value
    client = await risoluto_client(env={"MASTER_KEY": key})
    response = await client.put("/api/v1/secrets/NEW_ONE", json={"value": "fresh välue"})
    assert response.status_code == 204
    read = node("read-file", str(path), key=key)
    assert read.returncode == 0, read.stderr
    assert json.loads(read.stdout) == {**original, "NEW_ONE": "fresh välue"}
    envelope = json.loads(path.read_text())
    assert list(envelope) == ["version", "algorithm", "iv", "authTag", "ciphertext"]
    assert envelope["version"] == 1 and envelope["algorithm"] == "aes-256-gcm"
    assert len(base64.b64decode(envelope["iv"])) == 12 and len(base64.b64decode(envelope["authTag"])) == 16


async def test_node_with_the_wrong_key_cannot_read_ours(risoluto_data_dir, risoluto_client):
    client = await risoluto_client(env={"MASTER_KEY": "right"})
    assert (await client.put("/api/v1/secrets/X", json={"value": "v"})).status_code == 204
    assert node("read-file", str(risoluto_data_dir / "secrets.enc"), key="wrong").returncode != 0


def _flip(path: Path, field: str) -> None:
    envelope = json.loads(path.read_text())
    raw = bytearray(base64.b64decode(envelope[field]))
    raw[len(raw) // 2] ^= 0x01
    envelope[field] = base64.b64encode(bytes(raw)).decode()
    path.write_text(json.dumps(envelope, indent=2))


@pytest.mark.parametrize("field", ["ciphertext", "authTag", "iv"])
async def test_tampered_file_is_refused_and_kept(field, risoluto_settings, risoluto_data_dir):
    path = risoluto_data_dir / "secrets.enc"
    shutil.copy(VECTORS / "secrets.enc", path)
    _flip(path, field)
    before = digest(path)
    env = {"DATA_DIR": str(risoluto_data_dir), "MASTER_KEY": VECTOR_KEY}
    with pytest.raises(StartupError, match="does not decrypt"):
        await start(risoluto_settings(env=env))
    assert digest(path) == before
    _flip(path, field)  # undo the attacker's bit: every value is still there
    assert await read_all(risoluto_settings(), VECTOR_KEY) == VECTOR_PLAINTEXT


@pytest.mark.parametrize("cut", [0, 1, 100, -10])
async def test_truncated_file_is_a_clear_startup_error(cut, risoluto_settings, risoluto_data_dir):
    path = risoluto_data_dir / "secrets.enc"
    data = (VECTORS / "secrets.enc").read_bytes()
    path.write_bytes(data[:cut])
    before = digest(path)
    env = {"DATA_DIR": str(risoluto_data_dir), "MASTER_KEY": VECTOR_KEY}
    with pytest.raises(StartupError, match="not a valid secrets envelope") as info:
        await start(risoluto_settings(env=env))
    assert str(path) in str(info.value)
    assert digest(path) == before


@pytest.mark.parametrize("edit", [{"version": 2}, {"algorithm": "aes-128-gcm"}, {"iv": "AAAA"}, {"authTag": "!!"}])
async def test_malformed_envelope_fields_are_refused(edit, risoluto_settings, risoluto_data_dir):
    path = risoluto_data_dir / "secrets.enc"
    envelope = json.loads((VECTORS / "secrets.enc").read_text())
    path.write_text(json.dumps({**envelope, **edit}))
    store = FileStore(risoluto_settings(), VECTOR_KEY)
    with pytest.raises(Exception, match="not a valid secrets envelope"):
        await store.open()


async def test_files_are_private(risoluto_data_dir, risoluto_client, tmp_path):
    data_dir = tmp_path / "fresh" / "data"  # created by the store itself
    env = {"DATA_DIR": str(data_dir), "MASTER_KEY": "k"}
    client = await risoluto_client(env=env)
    assert (await client.put("/api/v1/secrets/A", json={"value": "v"})).status_code == 204
    assert data_dir.stat().st_mode & 0o777 == 0o700
    for name in ("secrets.enc", "secrets.lock", "secrets.audit.log"):
        assert (data_dir / name).stat().st_mode & 0o777 == 0o600, name
