"""AES-256-GCM for every secret backend (compatible with the original Risoluto; docs/secrets.md).

key = SHA-256(UTF-8 MASTER_KEY); a fresh 12-byte IV per encryption; 16-byte tag kept
apart from the ciphertext; every binary field base64 with padding. ``secrets.enc`` is a
JSON envelope around the JSON object ``{name: value}``; a database row holds its own
IV/tag/ciphertext and binds its key name as associated data.

A kernel library, not a plugin: the default stores, the doctor and third-party stores
(contrib/risoluto-postgres) share the one envelope format through it.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import os
from typing import Any

import attrs
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

IV_BYTES = 12
TAG_BYTES = 16
ALGORITHM = "aes-256-gcm"
ENVELOPE_VERSION = 1
_KEY_CHECK_LABEL = b"risoluto encrypted_secrets key check v1"


class DecryptError(Exception):
    """Authentication failed: wrong key, tampered data or wrong associated data."""


class FormatError(Exception):
    """The stored bytes are not a well-formed envelope / row (truncated, edited)."""


def derive_key(master_key: str) -> bytes:
    """The AES-256 key: SHA-256 of the UTF-8 master key (the original's derivation)."""
    if not master_key:
        raise ValueError("the master key is empty")
    return hashlib.sha256(master_key.encode("utf-8")).digest()


def key_check(key: bytes) -> str:
    """A value that tells whether two processes use the same key, without revealing it.

    HMAC under the derived key: it gives an attacker nothing a GCM tag does not already give.
    """
    return base64.b64encode(hmac.new(key, _KEY_CHECK_LABEL, hashlib.sha256).digest()).decode("ascii")


def b64e(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def b64d(text: Any, what: str, length: int | None = None) -> bytes:
    if not isinstance(text, str):
        raise FormatError(f"{what} is not a base64 string")
    try:
        raw = base64.b64decode(text.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError, ValueError):
        raise FormatError(f"{what} is not valid base64") from None
    if length is not None and len(raw) != length:
        raise FormatError(f"{what} has {len(raw)} bytes, expected {length}")
    return raw


@attrs.frozen
class Sealed:
    """One encryption: what a row stores (all base64)."""

    iv: str
    auth_tag: str
    ciphertext: str


def seal(key: bytes | AESGCM, plaintext: bytes, aad: bytes | None = None) -> Sealed:
    """``key`` may be the ``AESGCM`` made from it, which a store that writes often keeps."""
    iv = os.urandom(IV_BYTES)
    out = (key if isinstance(key, AESGCM) else AESGCM(key)).encrypt(iv, plaintext, aad)
    # cryptography appends the tag; the original stores it in its own field
    return Sealed(iv=b64e(iv), auth_tag=b64e(out[-TAG_BYTES:]), ciphertext=b64e(out[:-TAG_BYTES]))


def open_sealed(key: bytes, sealed: Sealed, aad: bytes | None = None) -> bytes:
    iv = b64d(sealed.iv, "iv", IV_BYTES)
    tag = b64d(sealed.auth_tag, "authTag", TAG_BYTES)
    ciphertext = b64d(sealed.ciphertext, "ciphertext")
    try:
        return AESGCM(key).decrypt(iv, ciphertext + tag, aad)
    except InvalidTag:
        raise DecryptError("authentication failed") from None


# -- secrets.enc ---------------------------------------------------------------------------


def encode_envelope(key: bytes, secrets: dict[str, str]) -> bytes:
    """The bytes of ``secrets.enc``, laid out as the original writes it (2-space JSON)."""
    plaintext = json.dumps(secrets, indent=2, ensure_ascii=False).encode("utf-8")
    sealed = seal(key, plaintext)
    envelope = {
        "version": ENVELOPE_VERSION,
        "algorithm": ALGORITHM,
        "iv": sealed.iv,
        "authTag": sealed.auth_tag,
        "ciphertext": sealed.ciphertext,
    }
    return json.dumps(envelope, indent=2).encode("utf-8")


def parse_envelope(data: bytes) -> Sealed:
    """Check the envelope's shape; FormatError says what is wrong (never any content)."""
    try:
        env = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise FormatError("not valid JSON (truncated or corrupted)") from None
    if not isinstance(env, dict):
        raise FormatError("not a JSON object")
    if env.get("version") != ENVELOPE_VERSION:
        raise FormatError(f"unsupported envelope version {env.get('version')!r} (expected 1)")
    if env.get("algorithm") != ALGORITHM:
        raise FormatError(f"unsupported algorithm {env.get('algorithm')!r} (expected {ALGORITHM})")
    for field in ("iv", "authTag", "ciphertext"):
        if not isinstance(env.get(field), str):
            raise FormatError(f"field {field!r} is missing")
    sealed = Sealed(iv=env["iv"], auth_tag=env["authTag"], ciphertext=env["ciphertext"])
    b64d(sealed.iv, "iv", IV_BYTES)
    b64d(sealed.auth_tag, "authTag", TAG_BYTES)
    b64d(sealed.ciphertext, "ciphertext")
    return sealed


def decode_envelope(key: bytes, data: bytes) -> dict[str, str]:
    """secrets.enc bytes -> {name: value}. FormatError / DecryptError on bad input."""
    plaintext = open_sealed(key, parse_envelope(data))
    try:
        secrets = json.loads(plaintext.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise FormatError("the decrypted content is not JSON") from None
    if not isinstance(secrets, dict) or not all(isinstance(v, str) for v in secrets.values()):
        raise FormatError("the decrypted content is not a JSON object of strings")
    return secrets


# -- encrypted_secrets rows ------------------------------------------------------------------


def row_aad(name: str) -> bytes:
    """Associated data of a row: the UTF-8 key name, so a row moved under another name fails."""
    return name.encode("utf-8")


def seal_value(key: bytes | AESGCM, name: str, value: str) -> Sealed:
    return seal(key, value.encode("utf-8"), row_aad(name))


def open_value(key: bytes, name: str, sealed: Sealed, bound: bool) -> tuple[str, bool]:
    """Decrypt a row -> (value, bound_to_name).

    Tries the name-bound form first when ``bound`` says so, then the legacy form (the
    original's rows, no associated data). Only a legacy ciphertext can ever pass without
    the name, and an attacker cannot make one without the key.
    """
    attempts = (True, False) if bound else (False, True)
    for with_aad in attempts:
        try:
            raw = open_sealed(key, sealed, row_aad(name) if with_aad else None)
        except DecryptError:
            continue
        try:
            return raw.decode("utf-8"), with_aad
        except UnicodeDecodeError:
            raise FormatError("the decrypted value is not UTF-8") from None
    raise DecryptError("authentication failed")


def open_row(key: bytes, name: str, row: Any, where: Any) -> str:
    """The value of an ``encrypted_secrets`` row ``(ciphertext, iv, auth_tag, aad)``, as the
    sqlite and PostgreSQL stores both read it; a row that fails is a SecretIntegrityError."""
    from risoluto.hookspecs.secrets import SecretIntegrityError

    try:
        return open_value(key, name, Sealed(iv=row[1], auth_tag=row[2], ciphertext=row[0]), bool(row[3]))[0]
    except (DecryptError, FormatError):
        raise SecretIntegrityError(
            f"secret {name!r} in {where} fails authentication: it was modified, moved from another "
            "name, or written under another master key"
        ) from None


@attrs.define
class Verified:
    """What a read-only pass over an ``encrypted_secrets`` table found."""

    rows: int = 0
    legacy: int = 0
    damaged: dict[str, str] = attrs.Factory(dict)
    stored_check: str | None = None


def assess(key: bytes, check: str, rows: Any, stored_check: str | None, where: Any) -> Verified:
    """Decrypt every row ``(key, ciphertext, iv, auth_tag, aad)``, as the sqlite and PostgreSQL
    stores both verify their table; WrongMasterKey if rows exist (or a key check other than
    ``check`` is stored) and none decrypts."""
    from risoluto.hookspecs.secrets import WrongMasterKey

    found = Verified(stored_check=stored_check)
    for name, ct, iv, tag, bound in rows:
        found.rows += 1
        try:
            _, was_bound = open_value(key, name, Sealed(iv=iv, auth_tag=tag, ciphertext=ct), bool(bound))
            found.legacy += not was_bound
        except (DecryptError, FormatError) as exc:
            found.damaged[str(name)] = str(exc)
    readable = found.rows - len(found.damaged)
    if readable == 0 and (found.rows or stored_check not in (None, check)):
        raise WrongMasterKey(
            f"{where} (table encrypted_secrets) does not decrypt with the configured master key: "
            "the key does not match (or the data was modified). Nothing was changed."
        )
    return found
