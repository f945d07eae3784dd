"""The one error type of the HTTP surface and its JSON envelope.

Every error the kernel or a plugin answers is ``{"error": {"code", "message"}}``;
raising :class:`ApiError` anywhere in a request is how a plugin refuses one.
"""

from __future__ import annotations

from typing import Any


class ApiError(Exception):
    """An HTTP error with a stable snake_case code and a human sentence."""

    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None):
        super().__init__(f"{status} {code}: {message}")
        self.status = status
        self.code = code
        self.message = message
        self.headers = dict(headers or {})

    def body(self) -> dict[str, Any]:
        return error_body(self.code, self.message)


def error_body(code: str, message: str) -> dict[str, Any]:
    return {"error": {"code": code, "message": message}}


class ConfigError(Exception):
    """Invalid configuration: the message names the key path and the reason."""


class StartupError(Exception):
    """The kernel cannot start safely; the message says what to fix."""
