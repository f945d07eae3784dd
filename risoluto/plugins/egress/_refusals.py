"""What a refused worker reads: one short plain-text paragraph per 403, written for an agent.

An agent that gets a bare "403" tends to retry around the proxy (another port, an IP
address, a different tool). The body says what was refused, that another route will meet
the same check, and how to ask for access; it never names internal detail (addresses the
name resolved to, rule positions, settings paths).
"""

from __future__ import annotations

WHY = {
    "host_not_allowed": "it is not on this sandbox's list of allowed destinations",
    "port_not_allowed": "that port is not on this sandbox's list of allowed destinations",
    "ip_literal_not_allowed": "connections to bare IP addresses are allowed only when the address itself is listed",
    "deny_listed": "the operator has put it on the deny list",
    "rule_deny": "an HTTP rule of the operator forbids this method and path there",
    "path_not_plain": ("its path has dot segments, a backslash or a NUL, so the operator's HTTP rules for that "
                       "host cannot be checked against it"),
    "private_address": "it points to an address the sandbox may not reach",
    "decision_error": "the policy check failed, and a failed check refuses",
    "approval_denied": "the operator declined it",
    "approval_timeout": "nobody approved it in time",
    "approval_cancelled": "the proxy stopped while it waited for approval",
    "approval_queue_full": "too many requests from this sandbox are already waiting for approval",
    "decider_error": "the approval check failed, and a failed check refuses",
    "client_gone": "the request was withdrawn while it waited for approval",
}
HOW = ("To get access, ask the operator (the person running this sandbox) to allow it; "
       "they can add it to the egress allowlist or approve it when asked.")


def refusal_text(reason: str, host: str, port: int, method: str = "", path: str = "", detail: str = "") -> str:
    """The 403 body for ``reason`` (a known code; a plugin's refusal passes its own ``detail``)."""
    # a request-level refusal names the method and path; anything else refused the destination
    by_request = reason in ("rule_deny", "path_not_plain", "plugin") and method and path
    what = f"{method} {path} on {host}" if by_request else (host if port in (80, 443) else f"{host}:{port}")
    why = f"a policy rule refused it ({detail})" if reason == "plugin" else WHY.get(reason, "the policy refused it")
    return (f"Network access to {what} was refused: {why}. Retrying through another address, port, "
            f"protocol, proxy or tool will not help: every connection out of this sandbox is checked the same "
            f"way. {HOW}")


__all__ = ["refusal_text"]
