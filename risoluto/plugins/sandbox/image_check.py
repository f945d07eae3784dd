"""Doctor items on the worker image (``codex.sandbox.image``), where the engine is.

- ``sandbox image``: the image is on the engine (images are never pulled).
- ``sandbox image user``: the image's default user. Sandboxes always run as
  ``codex.sandbox.user``, so a root default is a WARN (anyone who `docker run`s the image
  gets root), not a FAIL.
- ``sandbox image setuid``: setuid/setgid files, found by running ``find`` in a throwaway
  container of the image (no network, read-only root, every capability dropped except
  reading directories, no-new-privileges, removed afterwards). Inert under
  no-new-privileges: WARN; with ``noNewPrivileges: false`` a worker could use them: FAIL.
- ``sandbox image layout``: ``/workspace`` and ``/home/agent`` exist.

The scan runs once per image id per kernel (cached), so ``GET /api/v1/hardening`` stays quick.
With ``sandbox.runtime: remote`` the control plane has no engine: the data plane's doctor
runs these items and the control plane shows them as ``data plane: ...``.
"""

from __future__ import annotations

import os
from typing import Any

from ... import docker_transport
from ...errors import ConfigError
from ...hookspecs import hookimpl
from ...hookspecs.doctor import FAIL, PASS, WARN, CheckResult
from ._engine import engine_facts
from ._naming import LABEL_INSTANCE, LABEL_MANAGED, instance_id, valid_image_ref

_CACHE = "sandbox.image_scan"
SCAN_TIMEOUT_S = 120
_MARK = "::risoluto-image"
SCRIPT = (
    "find / -xdev -type f \\( -perm -4000 -o -perm -2000 \\) 2>/dev/null | head -n 500; "
    f"for d in /workspace /home/agent; do [ -d $d ] && echo '{_MARK} dir' $d; done; echo '{_MARK} done'"
)
_ROOT_USERS = {"", "0", "root"}


@hookimpl
def risoluto_settings_validate(settings: Any) -> None:
    """The default image must be an image reference, as a launch request's image must."""
    image = settings.codex.sandbox.image
    if not valid_image_ref(image):
        raise ConfigError(f"codex.sandbox.image: {image[:100]!r} is not an image reference "
                          "(such as risoluto-codex:latest)")


def scan(client: Any, image_id: str, labels: dict[str, str]) -> dict[str, Any]:
    """setuid/setgid files and directories of an image, from inside a throwaway container."""
    host_config = client.create_host_config(
        network_mode="none", cap_drop=["ALL"], cap_add=["DAC_READ_SEARCH"], security_opt=["no-new-privileges"],
        read_only=True, mem_limit="256m", pids_limit=64)
    container = client.create_container(image_id, entrypoint=["/bin/sh", "-c"], command=[SCRIPT], user="0:0",
                                        network_disabled=True, labels=labels, host_config=host_config,
                                        name=f"risoluto-image-check-{os.urandom(4).hex()}")
    try:
        client.start(container["Id"])
        client.wait(container["Id"], timeout=SCAN_TIMEOUT_S)
        output = client.logs(container["Id"], stderr=False).decode("utf-8", "replace")
    finally:
        client.remove_container(container["Id"], force=True, v=True)
    lines = output.splitlines()
    return {
        "complete": f"{_MARK} done" in lines,
        "setuid": [line for line in lines if line.startswith("/")],
        "dirs": [line.split()[-1] for line in lines if line.startswith(f"{_MARK} dir")],
    }


def _judge(kernel: Any, image: str, info: dict[str, Any], facts: dict[str, Any]) -> list[CheckResult]:
    security = kernel.settings.codex.sandbox.security
    user = str((info.get("Config") or {}).get("User") or "")
    out = [CheckResult(item="sandbox image", status=PASS, reason=f"{image} is on the engine ({info['Id'][7:19]})")]
    if user.split(":")[0] in _ROOT_USERS:
        out.append(CheckResult(
            item="sandbox image user", status=WARN,
            reason=f"{image}'s default user is root ({user or 'unset'}); sandboxes run as codex.sandbox.user, "
                   "but a plain `docker run` of the image gets root",
            fix="add `USER 1000:1000` (an unprivileged user) to the recipe"))
    else:
        out.append(CheckResult(item="sandbox image user", status=PASS, reason=f"default user {user}"))
    if not facts["complete"]:
        out.append(CheckResult(item="sandbox image setuid", status=WARN,
                               reason=f"could not list the setuid files of {image} (no /bin/sh or find in it?)",
                               fix="check the image by hand: find / -xdev -perm /6000 -type f"))
    elif facts["setuid"]:
        nnp = security.no_new_privileges
        found = facts["setuid"]
        out.append(CheckResult(
            item="sandbox image setuid", status=WARN if nnp else FAIL,
            reason=f"{len(found)} setuid/setgid file(s) in {image} ({', '.join(found[:4])}"
                   f"{', ...' if len(found) > 4 else ''}): " + (
                       "inert under no-new-privileges" if nnp else "usable by a worker: noNewPrivileges is off"),
            fix="RUN find / -xdev -perm /6000 -type f -exec chmod a-s {} + in the recipe"))
    else:
        out.append(CheckResult(item="sandbox image setuid", status=PASS, reason=f"no setuid/setgid files in {image}"))
    missing = sorted({"/workspace", "/home/agent"} - set(facts["dirs"]))
    out.append(CheckResult(
        item="sandbox image layout", status=WARN if missing else PASS,
        reason=f"{image} lacks {', '.join(missing)}" if missing else "/workspace and /home/agent exist",
        fix="create /workspace and /home/agent owned by the agent user in the recipe" if missing else ""))
    return out


@hookimpl
def risoluto_doctor_checks(kernel: Any) -> list[CheckResult]:
    if kernel.settings.sandbox.runtime != "docker":
        return []  # the engine is elsewhere (the data plane reports these items)
    import docker

    image = kernel.settings.codex.sandbox.image
    facts = engine_facts(kernel)  # cached: an engine that did not answer is not asked again here
    if not facts["ok"]:
        return [CheckResult(item="sandbox image", status=FAIL, reason=f"cannot inspect {image}: Docker is "
                            f"{facts['error']}", fix="start Docker")]
    try:
        # each call within the engine deadline; the scan's wait passes its own, longer timeout
        client = docker_transport.from_env(kernel.environ, timeout=kernel.settings.sandbox.engine_timeout_seconds).api
    except Exception as exc:
        return [CheckResult(item="sandbox image", status=FAIL, reason=f"cannot inspect {image}: Docker is not "
                            f"reachable ({type(exc).__name__})", fix="start Docker")]
    try:
        try:
            info = client.inspect_image(image)
        except docker.errors.NotFound:
            return [CheckResult(item="sandbox image", status=FAIL,
                                reason=f"{image} is not on the Docker engine (images are never pulled)",
                                fix=f"risoluto sandbox image build --tag {image} (docs/custom-images.md)")]
        cache = kernel.state.setdefault(_CACHE, {})
        if info["Id"] not in cache:
            labels = {LABEL_MANAGED: "true", LABEL_INSTANCE: instance_id(kernel.settings)}
            cache[info["Id"]] = scan(client, info["Id"], labels)
        return _judge(kernel, image, info, cache[info["Id"]])
    except Exception as exc:  # the doctor reports, never raises
        return [CheckResult(item="sandbox image", status=FAIL, reason=f"cannot inspect {image} "
                            f"({type(exc).__name__}: {str(exc)[:200]})", fix="check the Docker engine")]
    finally:
        client.close()
