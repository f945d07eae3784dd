"""Prometheus metrics of the egress proxy, created once per kernel registry."""

from __future__ import annotations

from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge

if TYPE_CHECKING:
    from risoluto.kernel import Kernel


class EgressMetrics:
    def __init__(self, registry: CollectorRegistry):
        self.decisions = Counter(
            "risoluto_egress_decisions", "Egress proxy decisions by verdict and reason",
            ["verdict", "reason"], registry=registry,
        )
        relayed = Counter(
            "risoluto_egress_bytes", "Bytes relayed by the egress proxy (upload = sandbox to origin)",
            ["direction"], registry=registry,
        )
        self.upload = relayed.labels(direction="upload")
        self.download = relayed.labels(direction="download")
        self.tunnels = Gauge("risoluto_egress_open_tunnels", "Open CONNECT tunnels", registry=registry)
        self.connections = Gauge(
            "risoluto_egress_open_connections", "Open client connections to the egress proxy", registry=registry,
        )
        self.audit_dropped = Counter(
            "risoluto_egress_audit_dropped", "Egress decision audit lines dropped because the writer fell behind "
            "or could not write", registry=registry,
        )
        self.pending_approvals = Gauge(
            "risoluto_egress_pending_approvals", "Egress requests held while an approval is pending",
            registry=registry,
        )


def metrics_for(kernel: Kernel) -> EgressMetrics:
    """The kernel's egress metrics (one set per kernel registry)."""
    metrics = kernel.state.get("egress.metrics")
    if metrics is None:
        metrics = kernel.state["egress.metrics"] = EgressMetrics(kernel.metrics_registry)
    return metrics
