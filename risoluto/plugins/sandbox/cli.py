"""``risoluto sandbox run | ls | stop | image build``: the sandbox runtime from the command line.

``run`` works in-process (no server needed): it starts the app's services (secret store,
egress, the runtime) without the crash cleanup, so it never removes the sandboxes of a
server running on the same DATA_DIR, launches under the live policy, streams the output and
exits with the container's status (124 on timeout, 125 when the launch is refused).
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

import anyio

from ...errors import ApiError
from ...hookspecs import hookimpl
from ...hookspecs.cli import CliCommand
from ._launcher import launch, parse_launch

EXIT_REFUSED = 125
EXIT_TIMEOUT = 124


def _configure(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="sandbox_action", metavar="ACTION", required=True)
    run = sub.add_parser("run", help="launch a sandbox, stream its output, exit with its status")
    run.add_argument("--issue", required=True, help="issue identifier (workspace and HOME volume key)")
    run.add_argument("--image", default="", help="image (default codex.sandbox.image); never pulled")
    run.add_argument("--secret", action="append", default=[], metavar="NAME",
                     help="put secret NAME into the environment (repeatable)")
    run.add_argument("--timeout", type=float, default=None, metavar="SECONDS", help="stop after SECONDS")
    run.add_argument("cmd", nargs=argparse.REMAINDER, metavar="-- CMD...", help="command (argv) to run")
    ls = sub.add_parser("ls", help="list this DATA_DIR's sandboxes")
    ls.add_argument("--json", action="store_true", help="machine-readable output")
    stop = sub.add_parser("stop", help="stop and remove a sandbox")
    stop.add_argument("id", help="sandbox id or name")
    image = sub.add_parser("image", help="build worker images").add_subparsers(dest="image_action", required=True)
    build = image.add_parser("build", help="build a worker image through the Docker SDK (docs/custom-images.md)")
    build.add_argument("--file", "-f", default="", metavar="DOCKERFILE",
                       help="recipe (default contrib/Dockerfile.sandbox)")
    build.add_argument("--tag", "-t", default="", help="image tag (default codex.sandbox.image)")
    build.add_argument("--build-arg", action="append", default=[], metavar="K=V", help="build argument (repeatable)")
    build.add_argument("--context", default="", metavar="DIR", help="build context (default the recipe's directory)")
    build.add_argument("--pull", action="store_true", help="let the engine pull missing or newer base images")


def _fail(err: ApiError) -> int:
    print(f"risoluto sandbox: {err.code}: {err.message}", file=sys.stderr)
    return EXIT_REFUSED


async def _run(args: Any) -> int:
    from ...app import create_app, kernel_of
    from ._runtime_service import SKIP_CLEANUP

    cmd = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
    body: dict[str, Any] = {"issue": args.issue, "command": cmd, "secrets": args.secret}
    if args.image:
        body["image"] = args.image
    if args.timeout is not None:
        body["timeout_s"] = args.timeout
    request, _ = parse_launch(body)
    app = create_app(args.settings)
    kernel = kernel_of(app)
    kernel.state[SKIP_CLEANUP] = True
    await app.startup()
    try:
        record = await launch(kernel, request)  # raises 503 when no runtime is loaded
        runtime = kernel.backends.runtime
        assert runtime is not None
        out = sys.stdout.buffer
        try:
            async for chunk in runtime.stream_logs(record["id"]):
                out.write(chunk)
                out.flush()
            final = await runtime.wait(record["id"])
        except BaseException:
            with anyio.CancelScope(shield=True):
                await runtime.remove(record["id"])
            raise
    finally:
        with anyio.CancelScope(shield=True):
            await app.shutdown()
    if final["timed_out"]:
        print(f"risoluto sandbox: timed out after {final['timeout_s']:g} s", file=sys.stderr)
        return EXIT_TIMEOUT
    if final["oom_killed"]:
        print("risoluto sandbox: killed: out of memory", file=sys.stderr)
    if final["exit_code"] is None:
        print(f"risoluto sandbox: failed: {final['reason']}", file=sys.stderr)
        return EXIT_REFUSED
    return int(final["exit_code"])


async def _direct(args: Any) -> int:
    """``ls`` and ``stop`` talk to the engine directly, by this DATA_DIR's instance label."""
    kernel = args.kernel
    runtime = kernel.hooks.sandbox_runtime(args.settings)
    if runtime is None:
        raise ApiError(503, "sandbox_runtime_unavailable", "no sandbox runtime is configured")
    try:
        if args.sandbox_action == "ls":
            rows = await runtime.list()
            if args.json:
                print(json.dumps(rows, indent=2))
            for row in [] if args.json else rows:
                print(f"{row['id'][:12]}  {row['status']:<10} {row['issue'][:30]:<30} {row['name']}")
            return 0
        record = await runtime.remove(args.id)
        print(f"removed {record['name']}")
        return 0
    finally:
        await runtime.close()


def _main(args: Any) -> int:
    if args.sandbox_action == "image":
        from ._image_build import main

        return main(args)
    try:
        action = _run if args.sandbox_action == "run" else _direct
        return anyio.run(action, args)
    except ApiError as err:
        return _fail(err) if args.sandbox_action == "run" else (_fail(err) and 1)


@hookimpl
def risoluto_cli_commands() -> list[CliCommand]:
    return [CliCommand(name="sandbox", help="run, list and stop sandboxes; build images", configure=_configure,
                       run=_main)]
