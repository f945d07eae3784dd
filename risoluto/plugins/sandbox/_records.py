"""What the API reports about a sandbox: never an environment value."""

from __future__ import annotations

from typing import Any

import anyio
import attrs

from ...hookspecs.sandbox import ContainerSpec
from ._naming import LABEL_ISSUE, LABEL_POLICY, LABEL_STARTED


@attrs.define(eq=False, kw_only=True)
class Record:
    LOG_TAIL_LINES = 10_000
    LOG_CAP_BYTES = 1024 * 1024

    id: str
    name: str
    issue: str
    image: str
    runtime: str
    network: str
    policy_digest: str
    env_keys: list[str]
    timeout_s: float
    created_at: str
    status: str = "created"
    started_at: str = ""
    finished_at: str = ""
    exit_code: int | None = None
    oom_killed: bool = False
    timed_out: bool = False
    stop_requested: bool = False
    removed: bool = False  # only once the engine confirmed it
    removal: str = ""  # "" while it lives, "pending" until the engine confirms, then "done"
    reason: str = ""
    logs: bytes = attrs.field(default=b"", repr=False)
    logs_truncated: bool = False
    started_mono: float = 0.0
    done: anyio.Event = attrs.field(factory=anyio.Event, repr=False)

    @classmethod
    def from_spec(cls, cid: str, spec: ContainerSpec, timeout_s: float, created_at: str) -> Record:
        return cls(
            id=cid, name=spec.name, issue=spec.labels.get(LABEL_ISSUE, ""), image=spec.image,
            runtime=spec.runtime or "runc", network=spec.network, policy_digest=spec.labels.get(LABEL_POLICY, ""),
            env_keys=sorted(spec.env), timeout_s=timeout_s, created_at=created_at,
        )

    def set_logs(self, data: bytes, cut: bool = False) -> None:
        self.logs_truncated = cut or len(data) > self.LOG_CAP_BYTES or data.count(b"\n") >= self.LOG_TAIL_LINES
        self.logs = data[-self.LOG_CAP_BYTES:]

    def public(self) -> dict[str, Any]:
        return {
            "id": self.id, "name": self.name, "issue": self.issue, "status": self.status,
            "image": self.image, "runtime": self.runtime, "network": self.network,
            "policy_digest": self.policy_digest, "env_keys": self.env_keys, "timeout_s": self.timeout_s,
            "created_at": self.created_at, "started_at": self.started_at, "finished_at": self.finished_at,
            "exit_code": self.exit_code, "oom_killed": self.oom_killed, "timed_out": self.timed_out,
            "removed": self.removed, "removal": self.removal, "reason": self.reason,
        }


def docker_record(row: dict[str, Any]) -> dict[str, Any]:
    """A container of this instance that another process launched (the CLI, a crashed run)."""
    labels = row.get("Labels") or {}
    names = row.get("Names") or ["/"]
    return {
        "id": row["Id"], "name": names[0].lstrip("/"), "issue": labels.get(LABEL_ISSUE, ""),
        "status": row.get("State", "unknown"), "image": row.get("Image", ""),
        "policy_digest": labels.get(LABEL_POLICY, ""), "created_at": labels.get(LABEL_STARTED, ""),
        "launched_here": False,
    }
