"""The tutorial plugin, loaded the way a third party's is: through its installed entry point,
configured from the config file (``plugins.settings.example``)."""

import json
import os
import subprocess
import sys

import pytest

from risoluto.errors import ConfigError


def cli(*args, config=None, tmp_path, **env):
    full = {k: v for k, v in os.environ.items() if not k.startswith("RISOLUTO_")}
    full.update(DATA_DIR=str(tmp_path / "data"), **env)
    if config is not None:
        path = tmp_path / "config.yaml"
        path.write_text(json.dumps(config))  # JSON is YAML
        full["RISOLUTO_CONFIG"] = str(path)
    return subprocess.run([sys.executable, "-m", "risoluto.cli", *args], capture_output=True, text=True,
                          env=full, timeout=60)


def example(config):
    return {"plugins": {"settings": {"example": config}}}


def test_found_through_its_entry_point(tmp_path):
    result = cli("plugins", "--json", tmp_path=tmp_path)
    rows = {r["name"]: r for r in json.loads(result.stdout)}
    assert rows["example"]["source"] == "entry point"
    assert rows["example"]["distribution"] == "risoluto-example"
    assert set(rows["example"]["hooks"]) == {"risoluto_sandbox_spec", "risoluto_doctor_checks",
                                             "risoluto_settings_validate"}


def test_label_mount_and_network_come_from_the_config_file(tmp_path, risoluto_spec):
    cache = tmp_path / "cache"
    cache.mkdir(mode=0o755)
    spec = risoluto_spec(config=example({"team": "blue", "cache": str(cache), "network": "team-blue"}))
    assert spec.labels["example.team"] == "blue"
    mount = next(m for m in spec.mounts if m.target == "/opt/cache")
    assert (mount.source, mount.read_only, mount.type) == (str(cache), True, "bind")
    # a third party's network stands over the default plugin's choice (edits: defaults first)
    assert spec.network == "team-blue"


def test_an_environment_variable_overrides_the_file(tmp_path, risoluto_spec):
    spec = risoluto_spec(config=example({"team": "blue"}), env={"RISOLUTO_EXAMPLE_TEAM": "red"})
    assert spec.labels["example.team"] == "red"
    assert spec.network == "risoluto-internal"  # no network setting: the kernel's stays


@pytest.mark.parametrize("bad, where", [
    ({"colour": "blue"}, "plugins.settings.example.colour: unknown key"),
    ({"team": 7}, "plugins.settings.example.team: expected a string"),
    ({"cache": "relative/dir"}, "plugins.settings.example.cache: must be an absolute path"),
])
def test_bad_settings_stop_startup_naming_the_key(tmp_path, risoluto_spec, bad, where):
    with pytest.raises(ConfigError, match=where):
        risoluto_spec(config=example(bad))
    result = cli("config", "check", config=example(bad), tmp_path=tmp_path)
    assert result.returncode != 0 and where in result.stderr


def test_doctor_check_passes_warns_and_fails(tmp_path):
    cache = tmp_path / "cache"
    config = example({"cache": str(cache)})
    missing = cli("doctor", "--json", config=config, tmp_path=tmp_path)
    item = next(i for i in json.loads(missing.stdout)["items"] if i["item"] == "example cache")
    assert item["status"] == "WARN"
    cache.mkdir()
    os.chmod(cache, 0o777)
    bad = cli("doctor", "--json", config=config, tmp_path=tmp_path)
    item = next(i for i in json.loads(bad.stdout)["items"] if i["item"] == "example cache")
    assert item["status"] == "FAIL" and bad.returncode == 1
    os.chmod(cache, 0o755)
    good = cli("doctor", "--json", config=config, tmp_path=tmp_path)
    item = next(i for i in json.loads(good.stdout)["items"] if i["item"] == "example cache")
    assert item["status"] == "PASS"
