"""Prometheus metrics for sandboxes, created once per kernel in its registry."""

from __future__ import annotations

from typing import Any

from prometheus_client import Counter, Histogram

from ...hookspecs.sandbox import SandboxEvent

_KEY = "sandbox.metrics"


class SandboxMetrics:
    def __init__(self, registry: Any):
        self.launches = Counter(
            "risoluto_sandbox_launches_total", "Sandbox launches by result (started | failed).",
            ["result"], registry=registry,
        )
        self.durations = Histogram(
            "risoluto_sandbox_duration_seconds", "Sandbox run time, start to exit.",
            buckets=(0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 1800, 3600, 7200), registry=registry,
        )
        self.exits = Counter(
            "risoluto_sandbox_exits_total", "Sandbox exits by exit code, OOM kill and timeout.",
            ["code", "oom_killed", "timed_out"], registry=registry,
        )

    def observe(self, event: SandboxEvent) -> None:
        if event.kind == "started":
            self.launches.labels(result="started").inc()
        elif event.kind == "failed":
            self.launches.labels(result="failed").inc()
        elif event.kind == "exited":
            self.durations.observe(event.seconds)
            code = "none" if event.exit_code is None else str(event.exit_code)
            self.exits.labels(code=code, oom_killed=str(event.oom_killed).lower(),
                              timed_out=str(event.reason == "timeout").lower()).inc()


def metrics_for(kernel: Any) -> SandboxMetrics:
    if _KEY not in kernel.state:
        kernel.state[_KEY] = SandboxMetrics(kernel.metrics_registry)
    return kernel.state[_KEY]
