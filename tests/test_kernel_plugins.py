"""Plugin discovery through real entry points, blocking, and loud failures."""

import json
import os
import subprocess
import sys
import textwrap

import pytest

from risoluto.errors import StartupError
from risoluto.manager import build_plugin_manager, default_plugin_names


def make_dist(root, dist, module, source, ep_name=None):
    """A real installed distribution: a dist-info with an entry_points.txt, on PYTHONPATH."""
    info = root / f"{dist.replace('-', '_')}-1.2.3.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 1.2.3\n")
    (info / "entry_points.txt").write_text(f"[risoluto]\n{ep_name or module} = {module}\n")
    (root / f"{module}.py").write_text(textwrap.dedent(source))


def run_cli(args, pythonpath, **env):
    full = {"PATH": os.environ.get("PATH", ""), "PYTHONPATH": str(pythonpath), "DATA_DIR": str(pythonpath / "d"),
            **env}
    return subprocess.run([sys.executable, "-m", "risoluto.cli", *args], env=full, capture_output=True,
                          text=True, timeout=60)


GOOD = """
from risoluto.hookspecs import hookimpl
from risoluto.hookspecs.doctor import CheckResult, PASS

@hookimpl
def risoluto_doctor_checks(kernel):
    return [CheckResult(item="good plugin", status=PASS, reason="loaded through its entry point")]
"""


def test_entry_point_plugin_is_discovered_with_its_distribution(tmp_path):
    make_dist(tmp_path, "acme-good", "acme_good", GOOD)
    result = run_cli(["plugins", "--json"], tmp_path)
    assert result.returncode == 0, result.stderr
    rows = {row["name"]: row for row in json.loads(result.stdout)}
    assert rows["acme_good"]["source"] == "entry point"
    assert rows["acme_good"]["distribution"] == "acme-good"
    assert rows["acme_good"]["version"] == "1.2.3"
    assert rows["acme_good"]["hooks"] == ["risoluto_doctor_checks"]
    doctor = run_cli(["doctor", "--json"], tmp_path)
    assert "loaded through its entry point" in doctor.stdout


def test_plugin_that_raises_on_import_stops_startup_naming_it(tmp_path):
    make_dist(tmp_path, "acme-broken", "acme_broken", "raise RuntimeError('boom at import')\n")
    result = run_cli(["plugins"], tmp_path)
    assert result.returncode != 0
    assert "acme_broken" in result.stderr and "acme-broken" in result.stderr
    assert "boom at import" in result.stderr
    assert "Traceback" not in result.stderr


def test_misspelled_hook_fails_check_pending(tmp_path):
    make_dist(tmp_path, "acme-typo", "acme_typo", """
        from risoluto.hookspecs import hookimpl

        @hookimpl
        def risoluto_sandbox_specs(spec, request, settings):
            pass
    """)
    result = run_cli(["plugins"], tmp_path)
    assert result.returncode != 0
    assert "acme_typo" in result.stderr and "acme-typo" in result.stderr
    assert "risoluto_sandbox_specs" in result.stderr


def test_wrong_hook_arguments_are_refused(tmp_path):
    make_dist(tmp_path, "acme-args", "acme_args", """
        from risoluto.hookspecs import hookimpl

        @hookimpl
        def risoluto_doctor_checks(kernel, colour):
            return []
    """)
    result = run_cli(["plugins"], tmp_path)
    assert result.returncode != 0 and "acme_args" in result.stderr and "colour" in result.stderr


def test_blocked_entry_point_is_never_imported(tmp_path):
    make_dist(tmp_path, "acme-broken", "acme_broken", "raise RuntimeError('must not import')\n")
    result = run_cli(["plugins", "--json"], tmp_path, RISOLUTO_DISABLE_PLUGINS="acme_broken")
    assert result.returncode == 0, result.stderr
    assert "acme_broken" not in {row["name"] for row in json.loads(result.stdout)}


def test_blocking_a_default_plugin_removes_it():
    names = default_plugin_names()
    assert names, "the kernel ships default plugins"
    victim = names[0]
    pm, infos = build_plugin_manager([victim])
    assert victim not in {i.name for i in infos}
    assert pm.is_blocked(victim)
    _, all_infos = build_plugin_manager([])
    assert victim in {i.name for i in all_infos}


def test_unknown_blocked_name_is_an_error():
    with pytest.raises(StartupError, match="no_such_plugin"):
        build_plugin_manager(["no_such_plugin"])


def test_each_app_has_its_own_plugin_manager(risoluto_settings):
    from risoluto import create_app

    class Marker:
        from risoluto.hookspecs import hookimpl

        @hookimpl
        def risoluto_doctor_checks(self, kernel):
            return []

    a = create_app(risoluto_settings(), plugins=(("marker", Marker()),))
    b = create_app(risoluto_settings())
    assert a.extensions["risoluto"].pm is not b.extensions["risoluto"].pm
    assert a.extensions["risoluto"].pm.has_plugin("marker")
    assert not b.extensions["risoluto"].pm.has_plugin("marker")


def test_a_doctor_check_that_raises_is_a_fail_naming_its_plugin(risoluto_settings):
    from risoluto.doctor import run_checks
    from risoluto.hookspecs import hookimpl
    from risoluto.kernel import Kernel

    class Broken:
        @hookimpl
        def risoluto_doctor_checks(self, kernel):
            raise RuntimeError("cannot look")

    kernel = Kernel(risoluto_settings(), (("broken", Broken()),))
    results = run_checks(kernel)
    bad = [r for r in results if r.item == "doctor check of broken"]
    assert len(bad) == 1 and bad[0].status == "FAIL" and "cannot look" in bad[0].reason
    assert len(results) > 1  # the other plugins' checks still ran


def test_engine_items_defer_to_the_data_plane_under_the_remote_runtime(risoluto_settings):
    from risoluto.doctor import run_checks
    from risoluto.kernel import Kernel

    settings = risoluto_settings({
        "sandbox": {"runtime": "remote", "dataPlaneUrl": "http://127.0.0.1:9"},  # nothing listens: loopback only
        "codex": {"sandbox": {"security": {"gvisor": True}}},
    }, {"DOCKER_HOST": "unix:///nonexistent/docker.sock"})
    items = {r.item: r for r in run_checks(Kernel(settings))}
    for item in ("sandbox network", "sandbox gVisor"):
        assert items[item].status == "PASS" and "remote runtime" in items[item].reason, items[item]
