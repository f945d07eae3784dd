"""``risoluto sandbox image build``: build a worker image through the Docker SDK.

The default recipe is ``contrib/Dockerfile.sandbox``; the default tag is
``codex.sandbox.image``. The build uses the SDK's low-level ``APIClient.build`` with
``pull=False``, and before it starts every ``FROM`` base must already be on the engine:
nothing is pulled unless ``--pull`` says so. Progress: on a terminal one line that is
rewritten in place (step, layers, bytes); otherwise the builder's lines as they come.
"""

from __future__ import annotations

import collections
import os
import re
import sys
from pathlib import Path
from typing import Any, Iterable, TextIO

from ...errors import ApiError

DEFAULT_RECIPE = Path("contrib") / "Dockerfile.sandbox"
EXIT_BUILD_FAILED, EXIT_USAGE = 1, 2
_ARG = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*\Z")
_FROM = re.compile(r"^\s*FROM\s+(?:--platform=\S+\s+)?(\S+)(?:\s+AS\s+(\S+))?", re.IGNORECASE)
_ARG_LINE = re.compile(r"^\s*ARG\s+([A-Za-z_][A-Za-z0-9_]*)(?:=(\S*))?", re.IGNORECASE)
_VAR = re.compile(r"\$\{?([A-Za-z_][A-Za-z0-9_]*)\}?")
_STEP = re.compile(r"^Step (\d+)/(\d+) : (.*)")
_LAYER = re.compile(r"^ ---> ([0-9a-f]{12})\b")


class UsageError(Exception):
    """A mistake on the command line or in the recipe: exit 2 with the message."""


def default_recipe() -> Path:
    """``contrib/Dockerfile.sandbox`` of the working directory, else of this checkout."""
    checkout = Path(__file__).resolve().parents[3]
    for base in (Path.cwd(), checkout):
        if (base / DEFAULT_RECIPE).is_file():
            return base / DEFAULT_RECIPE
    return Path.cwd() / DEFAULT_RECIPE


def parse_build_args(items: Iterable[str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not _ARG.match(key):
            raise UsageError(f"--build-arg {item.split('=')[0][:40]!r}: expected NAME=value")
        out[key] = value
    return out


def base_images(dockerfile: str, build_args: dict[str, str]) -> list[str]:
    """The images the ``FROM`` lines name (earlier stages and ``scratch`` excluded)."""
    values = dict(build_args)
    stages: set[str] = set()
    bases: list[str] = []
    for line in dockerfile.splitlines():
        if (arg := _ARG_LINE.match(line)) and arg.group(1) not in build_args and arg.group(2) is not None:
            values[arg.group(1)] = arg.group(2).strip("\"'")
        if match := _FROM.match(line):
            image = _VAR.sub(lambda m: values.get(m.group(1), ""), match.group(1))
            if image.lower() != "scratch" and image not in stages:
                bases.append(image)
            if match.group(2):
                stages.add(match.group(2))
    return bases


def _size(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return ""


class Progress:
    """What the user sees: one rewritten line on a terminal, the builder's lines elsewhere."""

    def __init__(self, out: TextIO, tty: bool, context_bytes: int):
        self.out, self.tty, self.context = out, tty, context_bytes
        self.step, self.steps, self.what, self.layers, self.pulled = 0, 0, "", 0, 0
        self.image_id = ""
        self._pulls: dict[str, int] = {}
        self.tail: collections.deque[str] = collections.deque(maxlen=20)  # shown when a step fails

    def event(self, chunk: dict[str, Any]) -> None:
        if "error" in chunk:
            if self.tty and self.tail:
                self._print("\n" + "\n".join(self.tail))
            raise BuildFailed(str(chunk.get("error", "")).strip())
        if isinstance(chunk.get("aux"), dict) and chunk["aux"].get("ID"):
            self.image_id = chunk["aux"]["ID"]
        for line in str(chunk.get("stream", "")).splitlines():
            self._line(line)
        if chunk.get("status"):
            detail = chunk.get("progressDetail") or {}
            if detail.get("current"):
                self._pulls[str(chunk.get("id", ""))] = int(detail["current"])
                self.pulled = sum(self._pulls.values())
            if not self.tty and not detail:
                self._print(f"{chunk.get('id', '')} {chunk['status']}".strip())
        self._show()

    def _line(self, line: str) -> None:
        if match := _STEP.match(line):
            self.step, self.steps, self.what = int(match.group(1)), int(match.group(2)), match.group(3)
            self.tail.clear()
            self.tail.append(line)
        elif _LAYER.match(line):
            self.layers += 1
        elif line.startswith("Successfully built "):
            self.image_id = self.image_id or line.split()[-1]
        elif line.strip() and not line.startswith((" ---> ", "Removing intermediate")):
            self.tail.append(line.rstrip())
        if not self.tty and line.strip():
            self._print(line.rstrip())

    def _show(self) -> None:
        if not self.tty or not self.steps:
            return
        what = self.what if len(self.what) <= 48 else self.what[:47] + "…"
        pulled = f" · pulled {_size(self.pulled)}" if self.pulled else ""
        self.out.write(f"\r\x1b[2K[{self.step}/{self.steps}] {what} · layers {self.layers} · context "
                       f"{_size(self.context)}{pulled}")
        self.out.flush()

    def _print(self, text: str) -> None:
        self.out.write(text + "\n")
        self.out.flush()

    def done(self) -> None:
        if self.tty and self.steps:
            self.out.write("\n")
            self.out.flush()


class BuildFailed(Exception):
    pass


def _context(context: Path, dockerfile: Path) -> tuple[Any, str, int]:
    """The build context as a tar file (``.dockerignore`` honoured), the recipe's name in it, its size."""
    import docker
    from docker.api.build import process_dockerfile

    ignore = context / ".dockerignore"
    exclude = None
    if ignore.is_file():
        exclude = [x.strip() for x in ignore.read_text().splitlines() if x.strip() and not x.startswith("#")]
    name, content = process_dockerfile(str(dockerfile), str(context))
    tar = docker.utils.tar(str(context), exclude=exclude, dockerfile=(name, content))
    size = os.fstat(tar.fileno()).st_size
    return tar, name, size


def build(client: Any, dockerfile: Path, tag: str, build_args: dict[str, str], context: Path,
          out: TextIO, tty: bool, pull: bool = False) -> str:
    """Build ``tag``; returns the image id. Raises UsageError, BuildFailed."""
    import docker

    try:
        recipe = dockerfile.read_text(encoding="utf-8")
    except OSError as exc:
        raise UsageError(f"cannot read the recipe {dockerfile}: {exc.strerror}") from None
    if not pull:
        for base in base_images(recipe, build_args):
            try:
                client.inspect_image(base)
            except docker.errors.NotFound:
                raise UsageError(f"base image {base} is not on the Docker engine and images are never pulled "
                                 "implicitly; load or build it first, or pass --pull to let the engine fetch it"
                                 ) from None
    tar, name, size = _context(context, dockerfile)
    progress = Progress(out, tty, size)
    with tar:
        stream = client.build(fileobj=tar, custom_context=True, dockerfile=name, tag=tag, buildargs=build_args,
                              decode=True, pull=pull, rm=True, forcerm=True,
                              labels={"org.risoluto.recipe": dockerfile.name})
        try:
            for chunk in stream:
                progress.event(chunk)
        finally:
            progress.done()
    info = client.inspect_image(tag)
    out.write(f"built {tag} ({info['Id'][7:19]}): {progress.layers} layer step(s), image {_size(info.get('Size', 0))}; "
              f"use it with codex.sandbox.image: {tag}\n")
    return str(info["Id"])


def main(args: Any) -> int:
    """``risoluto sandbox image build``."""
    import docker

    from ._engine import connect

    settings = args.settings
    dockerfile = Path(args.file).expanduser() if args.file else default_recipe()
    context = Path(args.context).expanduser() if args.context else dockerfile.parent
    tag = args.tag or settings.codex.sandbox.image
    try:
        if not dockerfile.is_file():
            raise UsageError(f"no recipe at {dockerfile}; pass --file DOCKERFILE")
        if not context.is_dir():
            raise UsageError(f"the build context {context} is not a directory")
        client = connect(os.environ, timeout=3600)
        try:
            build(client, dockerfile.resolve(), tag, parse_build_args(args.build_arg), context.resolve(),
                  sys.stdout, sys.stdout.isatty(), pull=args.pull)
        finally:
            client.close()
        return 0
    except UsageError as exc:
        print(f"risoluto sandbox image build: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except BuildFailed as exc:
        print(f"risoluto sandbox image build: the build failed: {exc}", file=sys.stderr)
        return EXIT_BUILD_FAILED
    except ApiError as err:
        print(f"risoluto sandbox image build: {err.message}", file=sys.stderr)
        return EXIT_BUILD_FAILED
    except docker.errors.APIError as exc:
        print(f"risoluto sandbox image build: the Docker engine refused: {exc.explanation or exc}", file=sys.stderr)
        return EXIT_BUILD_FAILED
