"""The default plugin list is explicit: a module is a plugin because the list names it."""

import importlib
import pkgutil
import subprocess
import sys

import pytest

import risoluto.plugins as plugins_root
from risoluto.manager import DEFAULT_PLUGINS, build_plugin_manager


def public_plugin_modules() -> set[str]:
    names = set()
    for group in pkgutil.iter_modules(plugins_root.__path__):
        package = importlib.import_module(f"risoluto.plugins.{group.name}")
        names |= {f"{group.name}.{m.name}" for m in pkgutil.iter_modules(package.__path__) if not m.name.startswith("_")}
    return names


def test_every_public_plugin_module_is_listed_and_every_listed_one_exists():
    # a public module that the list forgets would silently never load; a helper must be private
    assert public_plugin_modules() == set(DEFAULT_PLUGINS)


def test_every_default_plugin_implements_a_hook():
    pm, infos = build_plugin_manager([])
    for name in DEFAULT_PLUGINS:
        plugin = pm.get_plugin(name)
        assert pm.get_hookcallers(plugin), f"{name} implements no hook: make it a private helper module"


def test_a_disabled_default_plugin_is_never_imported(tmp_path):
    code = (
        "import sys\n"
        "from risoluto.manager import build_plugin_manager\n"
        "build_plugin_manager(['http.metrics', 'data_plane.server'])\n"
        "print('risoluto.plugins.http.metrics' in sys.modules, 'risoluto.plugins.http.write_guard' in sys.modules,\n"
        "      [m for m in sys.modules if m.startswith('risoluto.plugins.data_plane.')])\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    # the data plane is a package of its own: disabled, not even its private helpers load
    assert out.stdout.split() == ["False", "True", "[]"], out.stderr


def test_a_check_that_edits_the_spec_refuses_the_launch(risoluto_spec):
    from risoluto.errors import ApiError
    from risoluto.hookspecs import hookimpl

    class Hides:  # tries to hide a mount from the checks after it
        @hookimpl(tryfirst=True)
        def risoluto_sandbox_spec_check(self, spec):
            spec.mounts.clear()

    spec = risoluto_spec()
    assert spec.mounts, "the default plugins mount the workspace, HOME and CODEX_HOME"
    with pytest.raises(ApiError) as err:
        risoluto_spec(plugins=[("hides", Hides())])
    assert err.value.status == 403 and err.value.code == "sandbox_policy_violation"


def test_a_subset_check_implementation_is_called(risoluto_spec):
    from risoluto.errors import ApiError
    from risoluto.hookspecs import hookimpl

    class NoUntrusted:
        @hookimpl
        def risoluto_sandbox_spec_check(self, spec):
            if spec.image.startswith("untrusted/"):
                raise ApiError(403, "sandbox_policy_violation", "no untrusted images")

    from risoluto.hookspecs.sandbox import LaunchRequest

    assert risoluto_spec(plugins=[("nu", NoUntrusted())]).image
    with pytest.raises(ApiError, match="no untrusted images"):
        risoluto_spec(LaunchRequest(issue="X", image="untrusted/tool:1"), plugins=[("nu", NoUntrusted())])


@pytest.mark.anyio
async def test_runtime_lists_what_runs_and_no_private_module(risoluto_client):
    client = await risoluto_client()
    names = [p["name"] for p in (await (await client.get("/api/v1/runtime")).get_json())["plugins"]]
    assert set(DEFAULT_PLUGINS) <= set(names)
    assert not [n for n in names if n.startswith("_") or "._" in n]


def test_no_plugin_module_imports_another_plugin_module():
    """Shared code lives in private helpers or kernel libraries, so disabling a plugin never
    leaves it half-loaded through another plugin's import (what `plugins.disable` promises)."""
    import ast
    from pathlib import Path

    public = {f"risoluto.plugins.{name}" for name in DEFAULT_PLUGINS}
    found = []
    root = Path(plugins_root.__path__[0])
    for path in sorted(root.rglob("*.py")):
        module = "risoluto.plugins." + ".".join(path.relative_to(root).with_suffix("").parts)
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                base = module.split(".")[: -node.level] if node.level else []
                name = ".".join(base + ([node.module] if node.module else []))
                targets = {name, *(f"{name}.{alias.name}" for alias in node.names)}
            elif isinstance(node, ast.Import):
                targets = {alias.name for alias in node.names}
            else:
                continue
            found += [f"{module} imports {t}" for t in sorted(targets & public) if t != module]
    assert found == []
