"""``risoluto sandbox run | ls | stop`` as a user runs them: a subprocess, a real engine."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import yaml
from docker_util import docker_engine, sandbox_world  # noqa: F401
from serve_util import RISOLUTO

pytestmark = [pytest.mark.anyio, pytest.mark.docker]


def cli(world, *args: str, overrides=None, timeout: float = 120) -> subprocess.CompletedProcess:
    path = world.tmp / "config.yaml"
    path.write_text(yaml.safe_dump(world.config(overrides)))
    env = {**os.environ, "DATA_DIR": str(world.data), "RISOLUTO_CONFIG": str(path)}
    env.pop("MASTER_KEY", None)
    return subprocess.run([*RISOLUTO, "sandbox", *args], env=env, capture_output=True, text=True,
                          timeout=timeout, cwd=Path(__file__).parent.parent)


async def test_run_streams_output_and_exits_with_the_container_status(sandbox_world):
    done = cli(sandbox_world, "run", "--issue", "CLI-1", "--",
               "sh", "-c", "echo out-line; echo err-line >&2; exit 3")
    assert done.returncode == 3, done.stderr
    assert "out-line" in done.stdout and "err-line" in done.stdout
    assert (sandbox_world.workspace_of("CLI-1")).is_dir()


async def test_run_timeout_and_refusals(sandbox_world):
    done = cli(sandbox_world, "run", "--issue", "CLI-2", "--timeout", "1", "--", "sleep", "60")
    assert done.returncode == 124 and "timed out" in done.stderr
    done = cli(sandbox_world, "run", "--issue", "CLI-3", "--image", "risoluto-absent:1", "--", "true")
    assert done.returncode == 125 and "image_not_found" in done.stderr
    done = cli(sandbox_world, "run", "--issue", "CLI-4", "--secret", "NOPE", "--", "true")
    assert done.returncode == 125 and "secrets_locked" in done.stderr


async def test_ls_and_stop_find_sandboxes_of_this_data_dir(sandbox_world):
    client, _ = await sandbox_world.app()
    response = await client.post("/api/v1/sandboxes", json={"issue": "CLI-5", "command": ["sleep", "300"]})
    created = await response.get_json()
    listed = cli(sandbox_world, "ls", "--json")
    assert listed.returncode == 0, listed.stderr
    rows = json.loads(listed.stdout)
    assert [r["id"] for r in rows] == [created["id"]] and rows[0]["issue"] == "CLI-5"
    stopped = cli(sandbox_world, "stop", created["id"][:12])
    assert stopped.returncode == 0 and created["name"] in stopped.stdout
    assert sandbox_world.docker.containers(all=True, filters={"id": created["id"]}) == []
    missing = cli(sandbox_world, "stop", "no-such-sandbox")
    assert missing.returncode != 0 and "sandbox_not_found" in missing.stderr
