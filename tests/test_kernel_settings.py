"""Settings: sources, precedence, spellings and every validation error."""

import subprocess
import sys

import pytest

from risoluto.errors import ConfigError
from risoluto.settings import build_settings, load_settings


def test_defaults_match_the_published_table():
    s = build_settings({}, None, {})
    assert s.server.bind == "127.0.0.1" and s.server.port == 4000
    sec = s.codex.sandbox.security
    assert (sec.no_new_privileges, sec.drop_capabilities, sec.gvisor, sec.seccomp_profile) == (True, True, False, "")
    assert s.codex.sandbox.network == "risoluto-internal"
    assert s.codex.sandbox.egress_allowlist == []
    assert s.codex.sandbox.resources.pids_limit == 512
    assert s.rate_limit.api.limit == 300 and s.rate_limit.webhooks.limit == 600
    assert s.secrets.backend == "file" and s.data_dir == ".risoluto"


def test_camel_and_snake_case_mean_the_same_key():
    camel = build_settings({"codex": {"sandbox": {"egressAllowlist": ["a.test"]}}}, None, {})
    snake = build_settings({"codex": {"sandbox": {"egress_allowlist": ["a.test"]}}}, None, {})
    assert camel == snake
    assert camel.codex.sandbox.egress_allowlist == ["a.test"]


def test_both_spellings_of_one_key_is_an_error():
    with pytest.raises(ConfigError, match="given twice"):
        build_settings({"rateLimit": {}, "rate_limit": {}}, None, {})


def test_precedence_defaults_file_overlay_env():
    file_data = {"server": {"port": 5000, "bind": "127.0.0.2"},
                 "codex": {"sandbox": {"image": "from-file", "timeoutS": 60}}}
    overlay = {"codex": {"sandbox": {"image": "from-overlay"}}}  # server.* is deploy-time: file or env only
    s = build_settings(file_data, overlay, {"RISOLUTO_BIND": "127.0.0.3"})
    assert s.codex.sandbox.image == "from-overlay"  # overlay over file
    assert s.server.port == 5000
    assert s.server.bind == "127.0.0.3"  # env over everything
    assert s.codex.sandbox.timeout_s == 60  # deep merge keeps siblings
    assert s.codex.sandbox.network == "risoluto-internal"


@pytest.mark.parametrize(
    "data, path, reason",
    [
        ({"nope": 1}, "nope", "unknown key"),
        ({"codex": {"sandbox": {"securty": {}}}}, "codex.sandbox.securty", "unknown key"),
        ({"server": {"port": "80"}}, "server.port", "expected an integer"),
        ({"server": {"port": 70000}}, "server.port", "not a TCP port"),
        ({"server": {"port": True}}, "server.port", "expected an integer"),
        ({"codex": {"sandbox": {"security": {"gvisor": "yes"}}}}, "codex.sandbox.security.gvisor", "true or false"),
        ({"codex": {"sandbox": {"resources": {"memory": "lots"}}}}, "codex.sandbox.resources.memory", "size"),
        ({"codex": {"sandbox": {"resources": {"cpus": 0}}}}, "codex.sandbox.resources.cpus", "greater than 0"),
        ({"codex": {"threadSandbox": "yolo"}}, "codex.threadSandbox", "must be one of"),
        ({"server": {"trustedProxies": ["not-a-net"]}}, "server.trustedProxies", "CIDR"),
        ({"codex": {"sandbox": {"egressAllowlist": "a.test"}}}, "codex.sandbox.egressAllowlist", "expected a list"),
        ({"codex": {"sandbox": {"egressAllowlist": [5]}}}, "codex.sandbox.egressAllowlist[0]", "expected a string"),
        ({"codex": "x"}, "codex", "expected a mapping"),
    ],
)
def test_each_invalid_value_names_its_key_path(data, path, reason):
    with pytest.raises(ConfigError) as info:
        build_settings(data, None, {})
    message = str(info.value)
    assert message.startswith(path + ":"), message
    assert reason in message


def test_secrets_cannot_come_from_a_config_file():
    with pytest.raises(ConfigError, match="environment"):
        build_settings({"masterKey": "x"}, None, {})
    with pytest.raises(ConfigError, match="RISOLUTO_WRITE_TOKEN"):
        build_settings({"server": {"writeToken": "x"}}, None, {})


def test_tokens_are_trimmed_and_empty_means_unset():
    s = build_settings({}, None, {"RISOLUTO_WRITE_TOKEN": "  tok  ", "RISOLUTO_READ_TOKEN": "   "})
    assert s.server.write_token == "tok"
    assert s.server.read_token == ""
    assert "tok" not in repr(s)


def test_env_lists_and_bad_port():
    s = build_settings({}, None, {"RISOLUTO_TRUSTED_PROXIES": "10.0.0.0/8, ::1/128",
                                  "RISOLUTO_DISABLE_PLUGINS": "a,b"})
    assert s.server.trusted_proxies == ["10.0.0.0/8", "::1/128"]
    assert s.plugins.disable == ["a", "b"]
    with pytest.raises(ConfigError, match="RISOLUTO_PORT"):
        build_settings({}, None, {"RISOLUTO_PORT": "http"})


def test_file_and_overlay_are_read_from_disk(tmp_path):
    config = tmp_path / "risoluto.yaml"
    config.write_text("codex:\n  sandbox:\n    image: img-a\n    network: net-a\n")
    data = tmp_path / "data"
    (data / "config").mkdir(parents=True)
    (data / "config" / "overlay.yaml").write_text("codex:\n  sandbox:\n    image: img-b\n")
    s = load_settings({"RISOLUTO_CONFIG": str(config), "DATA_DIR": str(data)})
    assert (s.codex.sandbox.image, s.codex.sandbox.network) == ("img-b", "net-a")


def _cli(args, env, cwd):
    return subprocess.run([sys.executable, "-m", "risoluto.cli", *args], env=env, cwd=cwd,
                          capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize(
    "text, expected",
    [
        ("server: [unclosed\n", "malformed YAML"),
        ("server:\n  prot: 1\n", "server.prot: unknown key"),
        ("- a list\n", "top level must be a mapping"),
    ],
)
def test_cli_reports_bad_config_in_one_line(tmp_path, text, expected):
    config = tmp_path / "bad.yaml"
    config.write_text(text)
    env = {"PATH": "/usr/bin:/bin", "RISOLUTO_CONFIG": str(config), "DATA_DIR": str(tmp_path / "d")}
    result = _cli(["config", "check"], env, tmp_path)
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and expected in lines[0], result.stderr
    assert not (tmp_path / "d").exists()  # nothing written


def test_config_show_redacts_secrets(tmp_path):
    env = {"PATH": "/usr/bin:/bin", "DATA_DIR": str(tmp_path / "d"), "RISOLUTO_WRITE_TOKEN": "w-secret-1",
           "MASTER_KEY": "m-secret-2"}
    result = _cli(["config", "show"], env, tmp_path)
    assert result.returncode == 0, result.stderr
    assert "w-secret-1" not in result.stdout and "m-secret-2" not in result.stdout
    assert '"writeToken": "***"' in result.stdout
