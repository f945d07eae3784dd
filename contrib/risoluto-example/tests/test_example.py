"""The tutorial plugin, loaded the way a third party's is: through its installed entry point."""

import json
import os
import subprocess
import sys

from risoluto.hookspecs.sandbox import ContainerSpec, LaunchRequest
from risoluto.kernel import Kernel
from risoluto.settings import build_settings


def cli(*args, **env):
    return subprocess.run([sys.executable, "-m", "risoluto.cli", *args], capture_output=True, text=True,
                          env={**os.environ, **env}, timeout=60)


def test_found_through_its_entry_point(tmp_path):
    result = cli("plugins", "--json", DATA_DIR=str(tmp_path))
    rows = {r["name"]: r for r in json.loads(result.stdout)}
    assert rows["example"]["source"] == "entry point"
    assert rows["example"]["distribution"] == "risoluto-example"
    assert set(rows["example"]["hooks"]) == {"risoluto_sandbox_spec", "risoluto_doctor_checks"}


def test_adds_label_and_read_only_cache_mount(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    cache.mkdir(mode=0o755)
    monkeypatch.setenv("RISOLUTO_EXAMPLE_CACHE", str(cache))
    monkeypatch.setenv("RISOLUTO_EXAMPLE_TEAM", "blue")
    settings = build_settings({}, None, {"DATA_DIR": str(tmp_path / "d")})
    kernel = Kernel(settings)
    spec = ContainerSpec(name="t", image="img")
    kernel.hooks.sandbox_spec(spec, LaunchRequest(issue="X-1"), settings)
    assert spec.labels["example.team"] == "blue"
    mount = next(m for m in spec.mounts if m.target == "/opt/cache")
    assert (mount.source, mount.read_only, mount.type) == (str(cache), True, "bind")


def test_doctor_check_passes_warns_and_fails(tmp_path):
    cache = tmp_path / "cache"
    missing = cli("doctor", "--json", DATA_DIR=str(tmp_path), RISOLUTO_EXAMPLE_CACHE=str(cache))
    item = next(i for i in json.loads(missing.stdout)["items"] if i["item"] == "example cache")
    assert item["status"] == "WARN"
    cache.mkdir()
    os.chmod(cache, 0o777)
    bad = cli("doctor", "--json", DATA_DIR=str(tmp_path), RISOLUTO_EXAMPLE_CACHE=str(cache))
    item = next(i for i in json.loads(bad.stdout)["items"] if i["item"] == "example cache")
    assert item["status"] == "FAIL" and bad.returncode == 1
    os.chmod(cache, 0o755)
    good = cli("doctor", "--json", DATA_DIR=str(tmp_path), RISOLUTO_EXAMPLE_CACHE=str(cache))
    item = next(i for i in json.loads(good.stdout)["items"] if i["item"] == "example cache")
    assert item["status"] == "PASS"
