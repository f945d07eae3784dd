"""Helpers for the sandbox plugins' ``doctor --probe`` contributions (not a plugin itself).

A probe snippet prints facts as ``key=value`` lines (or copies ``Key:\tvalue`` lines of
``/proc/self/status``); its judge parses them and decides. Judges are strict: a fact that is
missing or unexpected is a FAIL that quotes what was seen; a fact the canary cannot produce
(no python3 in the image, no cgroup files) is a WARN "not proven", never a PASS.
"""

from __future__ import annotations

from typing import Any, Callable

from ...doctor import seen
from ...hookspecs.doctor import FAIL, PASS, WARN, CheckResult, Probe

__all__ = ["HAS_PY", "facts", "values", "seen", "item_of", "passed", "failed", "not_proven", "probe"]

HAS_PY = "command -v python3 >/dev/null 2>&1"


def facts(out: str) -> dict[str, str]:
    """``key=value`` and ``Key:<tab>value`` lines; the first occurrence of a key wins."""
    found: dict[str, str] = {}
    for line in out.splitlines():
        key, sep, value = line.partition("=")
        if not sep or " " in key.strip():
            key, sep, value = line.partition(":")
        key = key.strip()
        if sep and key and " " not in key:
            found.setdefault(key, value.strip())
    return found


def values(out: str, key: str) -> list[str]:
    """Every ``key=value`` line's value, in order (for facts that repeat)."""
    prefix = key + "="
    return [line[len(prefix):] for line in out.splitlines() if line.startswith(prefix)]


def item_of(name: str) -> str:
    return f"{name} (probe)"


def passed(name: str, reason: str) -> CheckResult:
    return CheckResult(item=item_of(name), status=PASS, reason=reason)


def failed(name: str, reason: str, fix: str) -> CheckResult:
    return CheckResult(item=item_of(name), status=FAIL, reason=reason, fix=fix)


def not_proven(name: str, reason: str, fix: str) -> CheckResult:
    return CheckResult(item=item_of(name), status=WARN, reason=f"not proven: {reason}", fix=fix)


def probe(name: str, script: str, judge: Callable[[str, int], CheckResult], context: Any = None) -> Probe:
    return Probe(item=item_of(name), script=script, judge=judge, context=context)
