"""``risoluto secrets list | set NAME | delete NAME | rotate-key | migrate --to file|sqlite``.

Values and keys are read from stdin when it is not a terminal (one trailing newline is
dropped: ``echo`` adds it), else from a hidden prompt (asked twice for a new master key);
never from argv, where ``ps`` and shell history would show them. A new master key from stdin
is its first line; a second line, if any, must repeat it (the prompt's confirmation, piped). The store is opened
exactly as the server opens it (``risoluto.secret_store.open_store``), and every change is announced
through ``risoluto_secret_changed`` (audit) with principal ``cli:<user>``.
"""

from __future__ import annotations

import getpass
import os
import pwd
import sys
from typing import Any

import anyio
import attrs

from risoluto.hookspecs import hookimpl
from risoluto.hookspecs.cli import CliCommand
from risoluto.hookspecs.secrets import AuditUnavailable, SecretEvent, SecretStoreError, StorageFull, WrongMasterKey

from risoluto.backends import NO_KEY
from risoluto.keys import commit_new_key, key_path, key_problem, stage_new_key
from risoluto.secret_store import OpenedStore, build_store, open_store

from ._access import announce, audited
from ._names import MAX_VALUE_BYTES, check_name, check_value


class CliError(Exception):
    """A refusal with a message for the operator (exit status 1)."""


def _configure(parser: Any) -> None:
    sub = parser.add_subparsers(dest="secrets_action", metavar="ACTION", required=True)
    sub.add_parser("list", help="print the secret names (never the values)")
    p = sub.add_parser("set", help="set NAME; the value comes from stdin or a hidden prompt")
    p.add_argument("name")
    p = sub.add_parser("delete", help="delete NAME")
    p.add_argument("name")
    sub.add_parser("rotate-key", help="re-encrypt everything under a new master key (stdin or prompt)")
    p = sub.add_parser("migrate", help="copy every secret to the other backend in one atomic step")
    p.add_argument("--to", required=True, choices=["file", "sqlite"], help="target backend")


def _run(args: Any) -> int:
    try:
        return anyio.run(_main, args)
    except CliError as exc:
        print(f"risoluto secrets: {exc}", file=sys.stderr)
        return 1
    except (SecretStoreError, OSError) as exc:
        print(f"risoluto secrets: error: {exc}", file=sys.stderr)
        return 1


async def _main(args: Any) -> int:
    action = args.secrets_action
    # rotate-key may start from a key with a control character (the way out of one); nothing else may
    opened = await open_store(args.settings, args.kernel.hooks,  # StartupError -> exit 2 in risoluto.cli
                              allow_unprintable_key=action == "rotate-key")
    if opened is None:
        raise CliError(f"secrets are locked: {NO_KEY}")
    try:
        handler = {"list": _list, "set": _set, "delete": _delete, "rotate-key": _rotate, "migrate": _migrate}[action]
        return await handler(args, opened)
    finally:
        await opened.store.close()


def read_input(prompt: str, confirm: bool = False) -> str:
    """A value from stdin (not a terminal) or a hidden prompt; never from argv."""
    if sys.stdin.isatty():
        value = getpass.getpass(prompt)
        if confirm and getpass.getpass("Repeat: ") != value:
            raise CliError("the two entries differ; nothing was changed")
        return value
    raw = sys.stdin.buffer.read(MAX_VALUE_BYTES + 3)
    try:
        value = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise CliError("the input is not UTF-8 text; nothing was changed") from None
    if value.endswith("\r\n"):
        return value[:-2]
    return value[:-1] if value.endswith("\n") else value


def read_new_master_key() -> str:
    """The new master key: a prompt asked twice, or stdin's first line, whose optional second
    line must repeat it. More lines, a mismatch or a control character: refused (CliError)."""
    if sys.stdin.isatty():
        line = read_input("New master key: ", confirm=True)
    else:
        lines = read_input("").replace("\r\n", "\n").split("\n")
        if len(lines) > 2:
            raise CliError(f"stdin holds {len(lines)} lines; give the new master key on the first line and, "
                           "optionally, the same key again on the second. Nothing was changed.")
        if len(lines) == 2 and lines[1].strip() != lines[0].strip():
            raise CliError("the second line of stdin does not repeat the new master key on the first; "
                           "nothing was changed")
        line = lines[0]
    problem = key_problem(line)
    if problem:
        raise CliError(f"the new master key {problem}; nothing was changed")
    return line.strip()


def _principal() -> str:
    try:
        return f"cli:{pwd.getpwuid(os.geteuid()).pw_name}"
    except KeyError:
        return f"cli:uid{os.geteuid()}"


async def _announce(args: Any, operation: str, key: str, backend: str) -> None:
    event = SecretEvent(operation=operation, key=key, backend=backend, principal=_principal(), remote="local")
    await announce(args.kernel.hooks, args.settings, event)


async def _audited(args: Any, operation: str, key: str, store: Any, change: Any) -> bool:
    """The change with its audit line written first (see ``audit_log``); refused if it cannot be."""
    event = SecretEvent(operation=operation, key=key, backend=store.backend, principal=_principal(), remote="local")
    try:
        return await audited(args.kernel.hooks, args.settings, event, store, change)
    except (StorageFull, AuditUnavailable) as exc:
        raise CliError(f"{exc}; nothing was changed") from None


def _name(args: Any) -> str:
    try:
        return check_name(args.name)
    except ValueError as exc:
        raise CliError(f"invalid name: {exc}") from None


async def _list(args: Any, opened: OpenedStore) -> int:
    for name in sorted(await opened.store.list()):
        print(name)
    return 0


async def _set(args: Any, opened: OpenedStore) -> int:
    name = _name(args)
    try:
        value = check_value(read_input(f"Value for {name}: "))
    except ValueError as exc:
        raise CliError(f"invalid value: {exc} Nothing was changed.") from None
    store = opened.store

    async def change() -> bool:
        await store.set(name, value)
        return True

    await _audited(args, "set", name, store, change)
    print(f"secret {name} set ({opened.store.backend} backend)", file=sys.stderr)
    return 0


async def _delete(args: Any, opened: OpenedStore) -> int:
    name = _name(args)
    store = opened.store
    if not await _audited(args, "delete", name, store, lambda: store.delete(name)):
        raise CliError(f"no secret named {name}")
    print(f"secret {name} deleted", file=sys.stderr)
    return 0


async def _rotate(args: Any, opened: OpenedStore) -> int:
    settings, mk, store = args.settings, opened.master_key, opened.store
    new_key = read_new_master_key()
    if not new_key:
        raise CliError("the new master key is empty; nothing was changed")
    if new_key == mk.value:
        raise CliError("the new master key equals the current one; nothing was changed")
    if mk.path is not None:
        # 1. new key durable on disk  2. data re-encrypted atomically  3. rename over master.key:
        # whatever the crash point, the key that opens the data is in a file (see master_key.py)
        staged = await anyio.to_thread.run_sync(stage_new_key, settings, new_key)
        try:
            await store.rotate(new_key)
        except BaseException:
            print(f"risoluto secrets: rotation failed; the data is unchanged. {staged} holds the unused new "
                  "key; delete it.", file=sys.stderr)
            raise
        await anyio.to_thread.run_sync(commit_new_key, settings)
        done = f"{mk.path} now holds the new key"
    else:
        await store.rotate(new_key)
        done = "set MASTER_KEY to the new key before the next start (the old key no longer opens the store)"
        if key_path(settings).exists():
            done += f"; {key_path(settings)} still holds an old key: update or delete it"
    await _announce(args, "rotate", "*", store.backend)
    print(f"master key rotated ({store.backend} backend): {done}. Restart running servers; keep the old key "
          "only with backups made before now.", file=sys.stderr)
    return 0


async def _migrate(args: Any, opened: OpenedStore) -> int:
    settings, source = args.settings, opened.store
    if args.to == settings.secrets.backend:
        raise CliError(f"secrets.backend is already {args.to}; nothing to do")
    target_settings = attrs.evolve(settings, secrets=attrs.evolve(settings.secrets, backend=args.to))
    target = build_store(target_settings, args.kernel.hooks, opened.master_key.value)
    try:
        await target.open()
    except WrongMasterKey as exc:
        raise CliError(f"the target does not open with this master key: {exc}") from None
    try:
        existing = await target.list()
        if existing:
            raise CliError(f"the {args.to} backend already holds {len(existing)} secret(s) ({target.location}); "
                           "refusing to merge. Nothing was changed.")
        items = {}
        for name in await source.list():
            value = await source.get(name)
            if value is not None:
                items[name] = value
        await target.set_many(items)  # all or nothing
        for name, value in items.items():
            if await target.get(name) != value:
                raise CliError(f"verification failed for {name} in {target.location}")
    finally:
        await target.close()
    await _announce(args, "migrate", "*", args.to)
    print(f"copied {len(items)} secret(s) from {source.location} to {target.location}. Set "
          f"secrets.backend: {args.to} and restart; the old data was left in place.", file=sys.stderr)
    return 0


@hookimpl
def risoluto_cli_commands() -> list[CliCommand]:
    return [CliCommand(name="secrets", help="manage encrypted secrets (list, set, delete, rotate-key, migrate)",
                       configure=_configure, run=_run)]
