"""contrib/seccomp/risoluto-agent.json: the shipped agent profile, through the HTTP API on the real engine.

Each dangerous syscall is called from inside a sandbox with ctypes ``syscall()`` and arguments
that are harmless whatever happens (NULL pointers, pid 0, bad flags). Under the profile each
fails with EPERM. That the profile, not the kernel, refused it is shown two ways:
- calls denied by an explicit rule: a second launch uses the same profile with those rules'
  EPERM replaced by a marker errno (ENOTRECOVERABLE, never a natural answer of these calls);
- calls denied because no allow rule matches (clone with CLONE_NEWUSER, personality flags,
  socket families): the engine here ignores ``defaultErrnoRet`` (measured: always EPERM), so
  they cannot be marked; a launch under an allow-everything profile shows they do not fail
  with EPERM by themselves.
A control launch under Docker's default profile shows what this profile adds. A normal
workload (sh pipeline, python3, threads, subprocess, fork, sockets, curl, files in /workspace)
must still run, with and without no-new-privileges (runc installs the filter at a different
point in each case).
"""

# ruff: noqa: F811  (pytest fixtures imported from docker_util are test parameters)
from __future__ import annotations

import errno
import json
import platform
from pathlib import Path
from typing import Any

import pytest
from docker_util import docker_engine, logs, run, sandbox_world  # noqa: F401 (fixtures)

from risoluto.plugins.sandbox.seccomp import denied_call, load_profile

pytestmark = [pytest.mark.anyio, pytest.mark.docker]

PROFILE = Path(__file__).resolve().parent.parent / "contrib" / "seccomp" / "risoluto-agent.json"
MARKER = errno.ENOTRECOVERABLE

# The checklist of the brief: each of these must fail with EPERM.
MUST_BE_EPERM = ("ptrace", "mount", "bpf", "keyctl", "userfaultfd", "perf_event_open", "unshare_newuser")
# Further explicit denials of the profile (README), also EPERM...
ALSO_EPERM = ("umount2", "add_key", "request_key", "setns", "kexec_load", "init_module", "finit_module",
              "delete_module", "open_by_handle_at", "pivot_root", "swapon", "swapoff", "reboot", "acct",
              "process_vm_readv")
# ...denied because no allow rule matches their arguments (EPERM too)...
UNMATCHED = ("clone_newuser", "personality_no_aslr", "socket_af_alg", "socket_vsock_high_bits",
             "socket_netlink_audit")
# ...and the two that answer ENOSYS so libraries fall back instead of failing.
ENOSYS = ("clone3", "io_uring_setup")
# Allowed forms of filtered calls (a filter too tight would break ordinary programs).
ALLOWED = ("personality_query", "socket_inet", "socket_unix", "socket_netlink_route", "socketpair_unix",
           "clone_thread_flags")

CALLS = r"""
import ctypes, errno, json, os, platform
libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long
NR = {
  "x86_64": dict(ptrace=101, mount=165, umount2=166, bpf=321, keyctl=250, add_key=248, request_key=249,
                 userfaultfd=323, perf_event_open=298, unshare=272, clone=56, clone3=435, setns=308,
                 kexec_load=246, init_module=175, finit_module=313, delete_module=176, open_by_handle_at=304,
                 pivot_root=155, swapon=167, swapoff=168, reboot=169, acct=163, personality=135,
                 io_uring_setup=425, socket=41, socketpair=53, process_vm_readv=310),
  "aarch64": dict(ptrace=117, mount=40, umount2=39, bpf=280, keyctl=219, add_key=217, request_key=218,
                  userfaultfd=282, perf_event_open=241, unshare=97, clone=220, clone3=435, setns=268,
                  kexec_load=104, init_module=105, finit_module=273, delete_module=106, open_by_handle_at=265,
                  pivot_root=41, swapon=224, swapoff=225, reboot=142, acct=89, personality=92,
                  io_uring_setup=425, socket=198, socketpair=199, process_vm_readv=270),
}[platform.machine()]
def call(name, *args):
    argv = [ctypes.c_long(a) for a in args] + [ctypes.c_long(0)] * (6 - len(args))
    rc = libc.syscall(ctypes.c_long(NR[name]), *argv)
    err = ctypes.get_errno()
    if name == "clone" and rc == 0:
        os._exit(0)  # a child made by a clone that should not have happened: leave at once
    if name == "clone" and rc > 0:
        os.waitpid(rc, 0)
    if rc >= 0:
        return "ok"
    return errno.errorcode.get(err, str(err))
CLONE_NEWUSER, SIGCHLD = 0x10000000, 17
out = {
  "ptrace": call("ptrace", 16, 0),                 # PTRACE_ATTACH to pid 0 (ESRCH unfiltered)
  "mount": call("mount", 0, 0, 0, 0, 0),           # NULL target (EFAULT unfiltered)
  "bpf": call("bpf", 9999, 0, 0),                  # unknown command
  "keyctl": call("keyctl", 0, 0),
  "userfaultfd": call("userfaultfd", 1),           # UFFD_USER_MODE_ONLY
  "perf_event_open": call("perf_event_open", 0, 0, -1, -1, 0),
  "clone_newuser": call("clone", CLONE_NEWUSER | SIGCHLD, 0, 0, 0, 0),
  "unshare_newuser": call("unshare", CLONE_NEWUSER),
  "umount2": call("umount2", 0, 0xffff),
  "add_key": call("add_key", 0, 0, 0, 0, 0),
  "request_key": call("request_key", 0, 0, 0, 0),
  "setns": call("setns", -1, 0),
  "kexec_load": call("kexec_load", 0, 0, 0, 0),
  "init_module": call("init_module", 0, 0, 0),
  "finit_module": call("finit_module", -1, 0, 0),
  "delete_module": call("delete_module", 0, 0),
  "open_by_handle_at": call("open_by_handle_at", -1, 0, 0),
  "pivot_root": call("pivot_root", 0, 0),
  "swapon": call("swapon", 0, 0),
  "swapoff": call("swapoff", 0),
  "reboot": call("reboot", 0, 0, 0, 0),
  "acct": call("acct", 0),
  "process_vm_readv": call("process_vm_readv", 0, 0, 0, 0, 0, 0),
  "personality_no_aslr": call("personality", 0x0040000),
  "personality_query": call("personality", 0xffffffff),
  "socket_af_alg": call("socket", 38, 5, 0),
  "socket_vsock_high_bits": call("socket", (1 << 32) | 40, 1, 0),  # the kernel would drop the high bits
  "socket_netlink_audit": call("socket", 16, 3, 9),
  "socket_inet": call("socket", 2, 1, 0),
  "socket_unix": call("socket", 1, 1, 0),
  "socket_netlink_route": call("socket", 16, 3, 0),
  "socketpair_unix": "ok" if libc.socketpair(1, 1, 0, (ctypes.c_int * 2)()) == 0 else "fail",
  "clone_thread_flags": call("clone", SIGCHLD, 0, 0, 0, 0),        # a plain fork through clone()
  "clone3": call("clone3", 0, 0),
  "io_uring_setup": call("io_uring_setup", 0, 0),
}
print("CALLS " + json.dumps(out))
"""

WORKLOAD = r"""
set -eu
printf 'alpha\nbeta\ngamma\n' | grep -v beta | tr a-z A-Z | sort -r | paste -sd, > /workspace/pipeline.txt
python3 - <<'PY'
import concurrent.futures, hashlib, json, os, socket, subprocess, tempfile, threading
with concurrent.futures.ThreadPoolExecutor(8) as pool:
    digests = list(pool.map(lambda i: hashlib.sha256(str(i).encode()).hexdigest()[:8], range(32)))
child = subprocess.run(["sh", "-c", "echo from-child; exit 3"], capture_output=True, text=True)
pid = os.fork()
if pid == 0:
    os._exit(7)
_, status = os.waitpid(pid, 0)
with tempfile.NamedTemporaryFile("w", dir="/tmp", delete=False) as fh:
    fh.write("tmp")
os.rename(fh.name, "/tmp/renamed")
os.makedirs("/workspace/src/pkg", exist_ok=True)
with open("/workspace/src/pkg/mod.py", "w") as fh:
    fh.write("VALUE = 42\n")
os.symlink("/workspace/src/pkg/mod.py", "/workspace/src/link.py")
server = socket.socket()
server.bind(("127.0.0.1", 0)); server.listen()
client = socket.create_connection(server.getsockname()); conn, _ = server.accept()
client.sendall(b"ping"); echoed = conn.recv(4)
print("WORKLOAD " + json.dumps({
    "threads": len(set(digests)), "active": threading.active_count(),
    "child": [child.stdout.strip(), child.returncode], "fork": os.waitstatus_to_exitcode(status),
    "tmp": open("/tmp/renamed").read(), "echo": echoed.decode(),
    "addr": socket.getaddrinfo("localhost", 80, type=socket.SOCK_STREAM)[0][4][0],
}))
PY
python3 -c 'import sys; sys.path.insert(0, "/workspace/src"); import pkg.mod; print("IMPORT", pkg.mod.VALUE)'
curl --version | head -n 1
echo "DONE $(cat /workspace/pipeline.txt)"
"""


def _line(out: str, tag: str) -> Any:
    for line in out.splitlines():
        if line.startswith(tag + " "):
            return json.loads(line[len(tag) + 1:])
    raise AssertionError(f"no {tag} line in the sandbox output:\n{out}")


def _with_errno(profile: dict[str, Any], old: int, new: int) -> dict[str, Any]:
    """The same profile with every denial that answers ``old`` answering ``new`` instead."""
    copy = json.loads(json.dumps(profile))
    if copy.get("defaultErrnoRet", errno.EPERM) == old:
        copy["defaultErrnoRet"] = new
    for rule in copy["syscalls"]:
        if rule["action"] == "SCMP_ACT_ERRNO" and rule.get("errnoRet", errno.EPERM) == old:
            rule["errnoRet"] = new
    return copy


def _config(path: Path, **security: Any) -> dict[str, Any]:
    return {"codex": {"sandbox": {"security": {"seccompProfile": str(path), **security}}}}


def test_profile_is_valid_default_deny_and_never_allows_a_denied_call():
    text, _ = load_profile(str(PROFILE))  # the kernel's own validator (also used at every launch)
    data = json.loads(text)
    assert data["defaultAction"] == "SCMP_ACT_ERRNO" and data["defaultErrnoRet"] == errno.EPERM
    allowed = {n for r in data["syscalls"] if r["action"] == "SCMP_ACT_ALLOW" for n in r["names"]}
    denied = {n for r in data["syscalls"] if r["action"] == "SCMP_ACT_ERRNO" for n in r["names"]}
    dangerous = {"ptrace", "mount", "umount2", "bpf", "keyctl", "add_key", "request_key", "userfaultfd",
                 "perf_event_open", "unshare", "setns", "kexec_load", "kexec_file_load", "init_module",
                 "finit_module", "delete_module", "open_by_handle_at", "pivot_root", "swapon", "swapoff",
                 "reboot", "acct", "clone3", "io_uring_setup", "process_vm_readv", "process_vm_writev"}
    assert dangerous <= denied and not dangerous & allowed
    # Every conditional allow is an equal-to (or masked-equal) test: a not-equal rule on a 32-bit
    # argument is sidestepped by setting the high bits, which the kernel then drops.
    for rule in data["syscalls"]:
        for arg in rule.get("args") or []:
            assert arg["op"] in ("SCMP_CMP_EQ", "SCMP_CMP_MASKED_EQ"), rule
    # doctor --probe can prove this profile from inside a worker (it calls keyctl)
    assert denied_call(data) == ("keyctl", errno.EPERM)


@pytest.mark.skipif(platform.machine() not in ("x86_64", "aarch64"), reason="syscall numbers for x86_64/aarch64")
async def test_dangerous_calls_fail_with_eperm_and_the_denial_is_the_profiles(sandbox_world):
    world = sandbox_world
    marked = world.tmp / "agent-marked.json"
    marked.write_text(json.dumps(_with_errno(json.loads(PROFILE.read_text()), errno.EPERM, MARKER)))
    client, _ = await world.app(_config(PROFILE))
    record = await run(client, {"issue": "SECCOMP-1", "command": ["python3", "-c", CALLS]})
    out = await logs(client, record["id"])
    assert record["exit_code"] == 0, out
    assert record["policy"]["seccompProfile"] == str(PROFILE) and record["policy"]["seccompProfileSha256"]
    got = _line(out, "CALLS")
    for name in MUST_BE_EPERM + ALSO_EPERM + UNMATCHED:
        assert got[name] == "EPERM", (name, got)
    for name in ENOSYS:
        assert got[name] == "ENOSYS", (name, got)
    for name in ALLOWED:
        assert got[name] == "ok", (name, got)

    # The same calls under the marked copy: each denial now carries the marker, so it is the
    # profile that refused it (ENOTRECOVERABLE is never a natural answer of these calls).
    client2, _ = await world.app(_config(marked))
    record = await run(client2, {"issue": "SECCOMP-2", "command": ["python3", "-c", CALLS]})
    out = await logs(client2, record["id"])
    marked_got = _line(out, "CALLS")
    marker = errno.errorcode[MARKER]
    for name in MUST_BE_EPERM + ALSO_EPERM:
        assert marked_got[name] == marker, (name, marked_got)
    for name in ENOSYS + ALLOWED + UNMATCHED:
        assert marked_got[name] == got[name], (name, marked_got)

    # Without any filter, the unmatched forms are not refused with EPERM: the profile refused them.
    allow_all = world.tmp / "allow-all.json"
    allow_all.write_text(json.dumps({"defaultAction": "SCMP_ACT_ALLOW"}))
    client3, _ = await world.app(_config(allow_all))
    record = await run(client3, {"issue": "SECCOMP-3", "command": ["python3", "-c", CALLS]})
    natural = _line(await logs(client3, record["id"]), "CALLS")
    for name in UNMATCHED + MUST_BE_EPERM:
        assert natural[name] != "EPERM", (name, natural)


async def test_without_the_profile_ptrace_and_high_bit_sockets_are_not_refused(sandbox_world):
    # Control: Docker's default profile (empty seccompProfile) lets these through, so the
    # agent profile is what refuses them above; the same script, the same launch path.
    client, _ = await sandbox_world.app()
    record = await run(client, {"issue": "SECCOMP-4", "command": ["python3", "-c", CALLS]})
    got = _line(await logs(client, record["id"]), "CALLS")
    assert got["ptrace"] == "ESRCH"  # pid 0 does not exist: the call reached the kernel
    assert got["io_uring_setup"] != "ENOSYS" and got["socket_vsock_high_bits"] != "EPERM"
    assert got["personality_query"] == "ok" and got["keyctl"] == "EPERM"  # same launch path, filter on


@pytest.mark.parametrize("nnp", [True, False])
async def test_normal_workload_runs_under_the_profile(sandbox_world, nnp):
    world = sandbox_world
    client, _ = await world.app(_config(PROFILE, noNewPrivileges=nnp))
    record = await run(client, {"issue": "WORK-1", "command": ["sh", "-c", WORKLOAD]})
    out = await logs(client, record["id"])
    assert record["exit_code"] == 0, out
    facts = _line(out, "WORKLOAD")
    assert facts["threads"] == 32 and facts["child"] == ["from-child", 3] and facts["fork"] == 7
    assert facts["tmp"] == "tmp" and facts["echo"] == "ping" and facts["addr"] in ("127.0.0.1", "::1")
    assert "IMPORT 42" in out and "curl " in out and "DONE GAMMA,ALPHA" in out
    ws = world.workspace_of("WORK-1")
    assert (ws / "pipeline.txt").read_text().strip() == "GAMMA,ALPHA"
    assert (ws / "src" / "pkg" / "mod.py").read_text() == "VALUE = 42\n"
    assert (ws / "src" / "link.py").is_symlink()
