"""Checks on text that arrives from outside (JSON bodies, config, argv)."""

from __future__ import annotations


def is_text(value: str) -> bool:
    """Whether ``value`` encodes to UTF-8. False for a lone surrogate (``"\\ud800"`` in JSON,
    or an argv byte that is not UTF-8), which SQLite, Docker's JSON and file names all refuse."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True
