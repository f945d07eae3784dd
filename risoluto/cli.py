"""``risoluto`` command line: serve, plugins, config, plus commands contributed by plugins."""

from __future__ import annotations

import argparse
import gc
import json
import os
import signal
import socket
import sys
from typing import Any, Sequence

from . import __version__
from .addresses import is_loopback_bind
from .errors import ConfigError, StartupError
from .settings import Settings, load_settings


def check_bind_safe(settings: Settings) -> None:
    """Never listen beyond loopback without a token (docs/http-security.md, "Write guard")."""
    s = settings.server
    if not is_loopback_bind(s.bind) and not (s.write_token or s.read_token):
        raise StartupError(
            f"refusing to bind {s.bind}: a non-loopback bind needs RISOLUTO_WRITE_TOKEN "
            "(or at least RISOLUTO_READ_TOKEN for a read-only deployment); set one, or bind 127.0.0.1"
        )


def _serve(args: argparse.Namespace) -> int:
    import asyncio

    from hypercorn.asyncio import serve
    from hypercorn.config import Config

    from .app import create_app, kernel_of

    settings: Settings = args.settings
    if getattr(args, "data_plane", False) or settings.sandbox.role == "data-plane":
        from .roles import data_plane_settings

        # role, plugin set and bind: a private address only, and RISOLUTO_DATA_PLANE_SECRET
        settings = data_plane_settings(settings, os.environ)
    else:
        check_bind_safe(settings)
    _check_port_free(settings.server.bind, settings.server.port)
    app = create_app(settings, plugins=getattr(args, "extra_plugins", ()))
    config = Config()
    host = settings.server.bind
    config.bind = [f"[{host}]:{settings.server.port}" if ":" in host else f"{host}:{settings.server.port}"]
    config.accesslog = None
    config.errorlog = "-"
    config.graceful_timeout = 10
    config.h11_max_incomplete_size = 64 * 1024  # huge headers are refused with 431/400

    kernel = kernel_of(app)

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await kernel.start()  # a StartupError here is one clean line, not a lifespan traceback
        # Everything loaded so far lives as long as the process: keep the cyclic GC from
        # rescanning it on every full collection (measured in bench/http_overhead.py).
        gc.collect()
        gc.freeze()
        gc.set_threshold(10_000, 20, 20)  # fewer young-generation passes per request burst
        try:
            print(f"risoluto {__version__} listening on http://{config.bind[0]}", file=sys.stderr, flush=True)
            await serve(app, config, shutdown_trigger=stop.wait)  # type: ignore[arg-type]
        finally:
            await kernel.stop()

    asyncio.run(main())
    return 0


def _check_port_free(host: str, port: int) -> None:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            raise StartupError(
                f"cannot listen on {host}:{port}: {exc.strerror}; set RISOLUTO_PORT to a free port "
                "or stop the process using it"
            ) from None


def _plugins(args: argparse.Namespace) -> int:
    from .kernel import Kernel

    kernel = Kernel(args.settings)
    hooks = kernel.plugin_hooks()
    rows = [
        {
            "name": p.name, "source": p.source, "distribution": p.distribution, "version": p.version,
            "hooks": hooks.get(p.name, []),
        }
        for p in kernel.plugins
    ]
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    for row in rows:
        origin = "default" if row["source"] == "default" else f"{row['source']}: {row['distribution']} {row['version']}"
        print(f"{row['name']:<28} {origin}")
        print(f"{'':<28} hooks: {', '.join(row['hooks']) or '-'}")
    return 0


def _config(args: argparse.Namespace) -> int:
    if args.action == "show":
        print(json.dumps(args.settings.to_dict(redact=True), indent=2, sort_keys=True))
        return 0
    if args.action == "check":
        from .kernel import Kernel

        Kernel(args.settings)  # plugins validate their own keys (risoluto_settings_validate)
        print("configuration is valid")
        return 0
    return 2


def _doctor(args: argparse.Namespace) -> int:
    from .doctor import report, run_checks
    from .kernel import Kernel

    kernel = Kernel(args.settings)
    if not args.probe:
        return report(run_checks(kernel), args.json)
    import anyio

    from .doctor import run_probes

    # A short-lived process beside a possibly running server on the same DATA_DIR: it must
    # not remove that server's sandboxes as crash leftovers.
    kernel.state["sandbox.skip_orphan_cleanup"] = True

    async def probe() -> list[Any]:
        async with kernel.running():  # checks too, with the services (egress proxy) up
            checks = await anyio.to_thread.run_sync(run_checks, kernel)
            return checks + await run_probes(kernel)

    return report(anyio.run(probe), args.json)


def _core_commands(sub: Any) -> dict[str, Any]:
    doctor = sub.add_parser("doctor", help="evaluate every hardening checklist item (exit 1 on FAIL)")
    doctor.add_argument("--json", action="store_true", help="machine-readable output")
    doctor.add_argument("--probe", action="store_true",
                        help="also launch a canary sandbox under the live policy and prove each item from inside")
    doctor.set_defaults(func=_doctor)
    serve = sub.add_parser("serve", help="run the HTTP API (hypercorn)")
    serve.add_argument("--data-plane", action="store_true",
                       help="serve only the sandbox runtime operations to a control plane (docs/data-plane.md)")
    serve.set_defaults(func=_serve)
    plugins = sub.add_parser("plugins", help="list loaded plugins, their source and hooks")
    plugins.add_argument("--json", action="store_true", help="machine-readable output")
    plugins.set_defaults(func=_plugins)
    config = sub.add_parser("config", help="show or check the effective configuration")
    config.add_argument("action", choices=["show", "check"], help="show: print it with secrets redacted")
    config.set_defaults(func=_config)
    return {"serve": serve, "plugins": plugins, "config": config, "doctor": doctor}


def _plugin_commands(sub: Any, settings: Settings) -> None:
    from .kernel import Kernel

    kernel = Kernel(settings)
    for command in kernel.hooks.cli_commands():
        parser = sub.add_parser(command.name, help=command.help, description=command.help)
        command.configure(parser)
        parser.set_defaults(func=command.run, kernel=kernel)


def build_parser(settings: Settings | None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="risoluto", description="Risoluto hardening kernel: hardened sandboxes for AI coding agents."
    )
    parser.add_argument("--version", action="version", version=f"risoluto {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    _core_commands(sub)
    if settings is not None:
        _plugin_commands(sub, settings)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        settings = load_settings(os.environ)
        parser = build_parser(settings)
        args = parser.parse_args(argv)
        if not getattr(args, "func", None):
            parser.print_help()
            return 2
        args.settings = settings
        return int(args.func(args) or 0)
    except (ConfigError, StartupError) as exc:
        if isinstance(exc, ConfigError) and argv[:1] == ["doctor"]:
            from .doctor import config_refused  # the doctor still answers: one FAIL line

            return config_refused(str(exc), "--json" in argv)
        print(f"risoluto: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
