"""Just enough TLS to read the server name a client asks for (RFC 8446 / RFC 6066).

The proxy peeks at the first flight of a CONNECT tunnel: one or more handshake records
holding a ClientHello. We read its ``server_name`` extension ourselves and never
terminate TLS. A hello carrying Encrypted Client Hello is refused: its inner, real
server name is hidden from the check.
"""

from __future__ import annotations

import struct

import attrs

HANDSHAKE = 0x16
CLIENT_HELLO = 0x01
EXT_SERVER_NAME = 0x0000
EXT_ECH = 0xFE0D
MAX_HELLO = 64 * 1024


class HelloError(ValueError):
    """Not a well-formed ClientHello (the message is a short reason code)."""


@attrs.frozen
class Hello:
    server_name: str | None  # lower-case, without trailing dot; None when absent
    ech: bool


def handshake_bytes(data: bytes) -> tuple[bytes, bool]:
    """Concatenated handshake payload of the TLS records in ``data``.

    Returns (payload, complete) where complete means every record seen is whole and
    the first handshake message fits in the payload. Raises HelloError on non-TLS data.
    """
    payload = b""
    pos = 0
    while pos + 5 <= len(data):
        ctype, major, _minor, length = struct.unpack_from("!BBBH", data, pos)
        if ctype != HANDSHAKE or major != 3 or length == 0 or length > 18432:
            raise HelloError("not_tls")
        if pos + 5 + length > len(data):
            return payload, False
        payload += data[pos + 5: pos + 5 + length]
        pos += 5 + length
        if len(payload) >= 4:
            needed = 4 + int.from_bytes(payload[1:4], "big")
            if len(payload) >= needed:
                return payload[:needed], True
    if pos == 0 and data and data[0] != HANDSHAKE:
        raise HelloError("not_tls")
    return payload, False


def parse_client_hello(message: bytes) -> Hello:
    """Parse one complete handshake message that must be a ClientHello."""
    try:
        if message[0] != CLIENT_HELLO:
            raise HelloError("not_client_hello")
        body = memoryview(message)[4:]
        pos = 2 + 32  # legacy_version, random
        pos += 1 + body[pos]  # session id
        (suites,) = struct.unpack_from("!H", body, pos)
        pos += 2 + suites
        pos += 1 + body[pos]  # compression methods
        if pos == len(body):
            return Hello(server_name=None, ech=False)  # no extensions at all
        (ext_total,) = struct.unpack_from("!H", body, pos)
        pos += 2
        end = pos + ext_total
        if end > len(body):
            raise HelloError("truncated_hello")
        name: str | None = None
        ech = False
        seen: set[int] = set()
        while pos < end:
            ext_type, ext_len = struct.unpack_from("!HH", body, pos)
            pos += 4
            if ext_type in seen or pos + ext_len > end:
                raise HelloError("malformed_hello")
            seen.add(ext_type)
            if ext_type == EXT_SERVER_NAME:
                name = _server_name(bytes(body[pos: pos + ext_len]))
            elif ext_type == EXT_ECH:
                ech = True
            pos += ext_len
        return Hello(server_name=name, ech=ech)
    except (IndexError, struct.error):
        raise HelloError("malformed_hello") from None


def _server_name(ext: bytes) -> str:
    (list_len,) = struct.unpack_from("!H", ext, 0)
    if list_len + 2 != len(ext):
        raise HelloError("malformed_sni")
    pos = 2
    names: list[str] = []
    while pos < len(ext):
        kind, length = struct.unpack_from("!BH", ext, pos)
        pos += 3
        raw = ext[pos: pos + length]
        if len(raw) != length:
            raise HelloError("malformed_sni")
        pos += length
        if kind == 0:
            names.append(raw.decode("ascii", "replace"))
    if len(names) != 1:
        raise HelloError("malformed_sni")  # RFC 6066: exactly one host_name
    name = names[0].lower()
    return name[:-1] if name.endswith(".") else name
