"""Judged request heads: a repeated request skips parsing, authentication and the allowlists.

An agent opens many connections to the same few hosts with the same credential. Each used to
parse its head, check its credential and walk the deny list, the HTTP rules and the allowlists
again: 60-80 us of Python on the critical path of every connection (measured on the 2-core test
machine), where a proxy written in C spends a few. A head that the allowlists allowed (the
sandbox's own, or its issue's grants; not a rule, a plugin or an approval) is kept here, keyed by
its exact bytes (the request line, the credential and every header) and the address it came from,
and reused only while nothing it depended on has changed (the proxy checks, see
``EgressProxy._judge``):

- the egress settings (deny list, allowlist rules, ``onUnlisted``...): the same policy object;
- the sandbox's registration: the same client object with the same allowlist object
  (unregistering, re-registering or replacing its allowlist misses);
- the per-issue grants: the same generation (an ``allow-issue`` or a ``DELETE`` misses).

Never skipped: the decision hook is asked on every request, a name is resolved and its addresses
checked on every request (an IP literal's check depends only on the settings, so it is kept).
Never kept: refusals, asks, approvals, plugin verdicts. Bounded: at most ``SIZE`` heads of at most
``MAX_HEAD`` bytes each, the oldest dropped first.
"""

from __future__ import annotations

import threading
from typing import Any

import attrs

from risoluto.hookspecs.egress import EgressRequest

from ._hosts import IPAddress, Match
from ._http import RequestHead, Target

SIZE = 256
MAX_HEAD = 2048
KEPT = frozenset({"allowlist", "issue_allowlist"})  # Match reasons that only the allowlists decided


@attrs.frozen
class Judged:
    """What one request head was judged to be, and what that judgement depended on."""

    head: RequestHead
    client: Any  # the proxy's Client
    target: Target
    host: str | IPAddress
    match: Match
    request: EgressRequest  # asked of the decision hook again on every reuse; its fields are the audit's
    addresses: tuple[IPAddress, ...] | None  # an IP literal's checked address; None: a name, resolved each time
    policy: Any  # the proxy's _Policy
    allowlist: Any  # the client's Allowlist it was judged against (replacing it misses)
    grants: int  # the per-issue grants' generation


class JudgedHeads:
    def __init__(self, size: int = SIZE):
        self._size = size
        self._entries: dict[tuple[bytes, str], Judged] = {}
        self._lock = threading.Lock()  # connection threads add and drop concurrently

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, raw: bytes, peer: str) -> Judged | None:
        return self._entries.get((raw, peer))

    def keep(self, raw: bytes, peer: str, judged: Judged) -> None:
        if len(raw) > MAX_HEAD or judged.match.reason not in KEPT:
            return
        with self._lock:
            if (raw, peer) not in self._entries and len(self._entries) >= self._size:
                del self._entries[next(iter(self._entries))]  # the oldest
            self._entries[(raw, peer)] = judged

    def drop(self, raw: bytes, peer: str) -> None:
        with self._lock:
            self._entries.pop((raw, peer), None)

    def drop_client(self, username: str) -> None:
        """Forget a sandbox's heads (it was unregistered): its credential leaves memory with them."""
        with self._lock:
            for key in [k for k, v in self._entries.items() if v.client.username == username]:
                del self._entries[key]
