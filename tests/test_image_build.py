"""``risoluto sandbox image build`` and the doctor's image items, against the real engine.

Every image is built FROM the local test image: nothing is pulled (a recipe whose base is not
local is refused before the engine is asked to build)."""

from __future__ import annotations

import contextlib
import json
import os
import pty
import subprocess
import uuid
from pathlib import Path

import docker
import pytest
import yaml
from docker_util import TEST_IMAGE, docker_engine, logs, run, sandbox_world  # noqa: F401
from serve_util import RISOLUTO

pytestmark = [pytest.mark.anyio, pytest.mark.docker]
ROOT = Path(__file__).resolve().parent.parent

GOOD = f"""FROM {TEST_IMAGE}
ARG GREETING=none
RUN echo "$GREETING" > /etc/greeting && find / -xdev -perm /6000 -type f -exec chmod a-s {{}} +
USER 1000:1000
"""
# root by default, and a setuid interpreter on top of the base's setuid tools
BAD = f"""FROM {TEST_IMAGE}
RUN cp /usr/bin/python3 /usr/local/bin/py-suid && chmod 4755 /usr/local/bin/py-suid
"""


@pytest.fixture
def images(docker_engine):
    tags: list[str] = []

    def tag(kind: str) -> str:
        tags.append(f"risoluto-image-test-{kind}:{uuid.uuid4().hex[:8]}")
        return tags[-1]

    yield tag
    for name in tags:
        with contextlib.suppress(docker.errors.NotFound, docker.errors.APIError):
            docker_engine.remove_image(name, force=True)


def build(tmp_path: Path, recipe: str, *args: str, tty: bool = False) -> subprocess.CompletedProcess:
    path = tmp_path / "Dockerfile"
    path.write_text(recipe)
    cmd = [*RISOLUTO, "sandbox", "image", "build", "--file", str(path), *args]
    env = {**os.environ, "DATA_DIR": str(tmp_path / "data")}
    if not tty:
        return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=ROOT)
    leader, follower = pty.openpty()
    proc = subprocess.Popen(cmd, env=env, stdout=follower, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    os.close(follower)
    chunks = []
    while True:
        try:
            data = os.read(leader, 65536)
        except OSError:  # EIO: the child closed the terminal
            break
        if not data:
            break
        chunks.append(data)
    os.close(leader)
    proc.wait(timeout=600)
    return subprocess.CompletedProcess(cmd, proc.returncode, b"".join(chunks).decode("utf-8", "replace"),
                                       proc.stderr.read())


def doctor(tmp_path: Path, image: str, **security) -> dict[str, dict]:
    config = tmp_path / "doctor.yaml"
    config.write_text(yaml.safe_dump({"codex": {"sandbox": {"image": image, "security": security}}}))
    env = {**os.environ, "DATA_DIR": str(tmp_path / "doctor-data"), "RISOLUTO_CONFIG": str(config)}
    result = subprocess.run([*RISOLUTO, "doctor", "--json"], env=env, capture_output=True, text=True, timeout=300,
                            cwd=ROOT)
    return {i["item"]: i for i in json.loads(result.stdout)["items"] if i["item"].startswith("sandbox image")}


async def test_build_then_launch_a_sandbox_with_the_image(sandbox_world, images, tmp_path):
    tag = images("good")
    done = build(tmp_path, GOOD, "--tag", tag, "--build-arg", "GREETING=hello-from-the-build")
    assert done.returncode == 0, done.stderr
    assert "Step 1/" in done.stdout and f"built {tag}" in done.stdout and f"codex.sandbox.image: {tag}" in done.stdout
    info = sandbox_world.docker.inspect_image(tag)
    assert info["Config"]["User"] == "1000:1000" and info["Config"]["Labels"]["org.risoluto.recipe"] == "Dockerfile"
    client, _ = await sandbox_world.app({"codex": {"sandbox": {"image": tag}}})
    record = await run(client, {"issue": "IMG-1", "command": ["cat", "/etc/greeting"]})
    assert record["exit_code"] == 0 and record["image"] == tag
    assert "hello-from-the-build" in await logs(client, record["id"])
    items = doctor(tmp_path, tag)
    assert {k: v["status"] for k, v in items.items()} == {
        "sandbox image": "PASS", "sandbox image user": "PASS", "sandbox image setuid": "PASS",
        "sandbox image layout": "PASS"}


def test_progress_on_a_terminal_is_one_rewritten_line(images, tmp_path):
    done = build(tmp_path, GOOD, "--tag", images("tty"), tty=True)
    assert done.returncode == 0, done.stderr
    assert "\r\x1b[2K[1/" in done.stdout and "layers" in done.stdout and "context" in done.stdout
    assert "Step 1/" not in done.stdout  # the builder's raw lines are for pipes and logs


def test_doctor_flags_a_bad_image(images, tmp_path, docker_engine):
    tag = images("bad")
    assert build(tmp_path, BAD, "--tag", tag).returncode == 0
    items = doctor(tmp_path, tag)
    assert items["sandbox image user"]["status"] == "WARN" and "root" in items["sandbox image user"]["reason"]
    setuid = items["sandbox image setuid"]
    assert setuid["status"] == "WARN" and "no-new-privileges" in setuid["reason"]
    base = doctor(tmp_path, TEST_IMAGE)["sandbox image setuid"]["reason"]
    assert int(setuid["reason"].split()[0]) == int(base.split()[0]) + 1  # py-suid was found
    assert "chmod a-s" in setuid["fix"]
    # without no-new-privileges the setuid files are usable: FAIL
    items = doctor(tmp_path, tag, noNewPrivileges=False)
    assert items["sandbox image setuid"]["status"] == "FAIL"
    # the throwaway scan containers are gone
    assert docker_engine.containers(all=True, filters={"name": "risoluto-image-check-"}) == []


def test_missing_image_is_a_failure_with_the_fix(tmp_path):
    items = doctor(tmp_path, "risoluto-image-absent:1")
    assert items["sandbox image"]["status"] == "FAIL"
    assert "risoluto sandbox image build --tag risoluto-image-absent:1" in items["sandbox image"]["fix"]


def test_refusals(images, tmp_path, docker_engine):
    tag = images("refused")
    failed = build(tmp_path, f"FROM {TEST_IMAGE}\nRUN echo step-output; exit 3\n", "--tag", tag)
    assert failed.returncode == 1 and "the build failed" in failed.stderr
    assert "returned a non-zero code: 3" in failed.stderr
    with pytest.raises(docker.errors.ImageNotFound):
        docker_engine.inspect_image(tag)
    # a base that is not local is never pulled implicitly: refused before the engine builds
    absent = build(tmp_path, "ARG BASE=risoluto-absent-base:1\nFROM ${BASE}\nRUN true\n", "--tag", tag)
    assert absent.returncode == 2 and "risoluto-absent-base:1 is not on the Docker engine" in absent.stderr
    assert "--pull" in absent.stderr
    bad_arg = build(tmp_path, GOOD, "--tag", tag, "--build-arg", "NOEQUALS")
    assert bad_arg.returncode == 2 and "NAME=value" in bad_arg.stderr
    missing = subprocess.run([*RISOLUTO, "sandbox", "image", "build", "--file", str(tmp_path / "nope")],
                             capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert missing.returncode == 2 and "no recipe" in missing.stderr
