"""What a secret's name and value may be (the API and the CLI apply the same rules;
docs/secrets.md). A private library of the secrets plugins."""

from __future__ import annotations

import re
from typing import Any

NAME = re.compile(r"[A-Za-z0-9_.:-]{1,256}")
MAX_VALUE_BYTES = 64 * 1024


def check_name(name: Any) -> str:
    """The name, or ValueError with a sentence that does not repeat it."""
    if not isinstance(name, str) or not NAME.fullmatch(name):
        raise ValueError("Secret names are 1-256 characters from A-Z a-z 0-9 _ . : -")
    return name


def check_value(value: Any) -> str:
    """The value, or ValueError with a sentence that never contains it."""
    if not isinstance(value, str) or not value:
        raise ValueError('The body must be {"value": "<non-empty string>"}.')
    try:
        size = len(value.encode("utf-8"))
    except UnicodeEncodeError:  # lone surrogates from "\ud800" escapes
        raise ValueError("The value must be valid Unicode text.") from None
    if size > MAX_VALUE_BYTES:
        raise ValueError("The value is larger than 64 KiB.")
    return value
