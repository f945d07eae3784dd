"""The default plugin list is explicit: a module is a plugin because the list names it."""

import importlib
import pkgutil
import subprocess
import sys

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
        "build_plugin_manager(['http.metrics'])\n"
        "print('risoluto.plugins.http.metrics' in sys.modules, 'risoluto.plugins.http.write_guard' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.split() == ["False", "True"], out.stderr
