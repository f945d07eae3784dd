"""``risoluto serve`` as an operator runs it: a real process on a real socket."""

import signal
import socket
import subprocess
import sys

import pytest
from http_support import free_port
from serve_util import RISOLUTO, operator_env, spawn, wait_answering



def env_for(tmp_path, **extra):
    return operator_env(DATA_DIR=str(tmp_path / "data"), **extra)


@pytest.mark.parametrize("bind", ["0.0.0.0", "::", "192.0.2.10"])
def test_serve_refuses_non_loopback_bind_without_token(tmp_path, bind):
    result = subprocess.run([sys.executable, "-m", "risoluto.cli", "serve"], cwd=tmp_path, capture_output=True,
                            text=True, timeout=60, env=env_for(tmp_path, RISOLUTO_BIND=bind))
    assert result.returncode != 0
    assert "RISOLUTO_WRITE_TOKEN" in result.stderr and "RISOLUTO_READ_TOKEN" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "data").exists()


def test_serve_answers_and_shuts_down_gracefully_on_sigterm(tmp_path):
    port = free_port()
    proc = spawn([*RISOLUTO, "serve"], env_for(tmp_path, RISOLUTO_PORT=str(port)), cwd=tmp_path)
    try:
        response = wait_answering(proc, f"http://127.0.0.1:{port}/api/v1/runtime")
        assert response is not None, proc.stderr.read()
        assert response.status_code == 200
        assert response.json()["bind"] == {"host": "127.0.0.1", "port": port}
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()


def test_serve_reports_a_port_in_use(tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = subprocess.run([sys.executable, "-m", "risoluto.cli", "serve"], cwd=tmp_path, capture_output=True,
                                text=True, timeout=60, env=env_for(tmp_path, RISOLUTO_PORT=str(port)))
    assert result.returncode != 0
    assert f"127.0.0.1:{port}" in result.stderr and "RISOLUTO_PORT" in result.stderr


def test_help_and_version():
    out = subprocess.run([sys.executable, "-m", "risoluto.cli", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "serve" in out.stdout and "doctor" in out.stdout
    out = subprocess.run([sys.executable, "-m", "risoluto.cli", "--version"], capture_output=True, text=True)
    assert out.stdout.startswith("risoluto ")
    for command in ("serve", "plugins", "config", "doctor"):
        out = subprocess.run([sys.executable, "-m", "risoluto.cli", command, "--help"], capture_output=True,
                             text=True)
        assert out.returncode == 0 and "usage:" in out.stdout
