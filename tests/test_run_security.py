"""`vfiosim serve`/`run` as a privileged service: the attacks of issue 14 fail.

A root daemon whose socket others may reach (world-writable, as a shared
set-up makes it) reads and writes other processes' memory for them.  Each
test reproduces one attack a security review made work, and checks that it
fails now.  The attackers are unprivileged (uid 65534) unless the attack is a
root process dropping its rights; tests/attacker.py speaks the wire protocol
itself, without the shim, so it can do what the shim never would.
docs/reliability.md ("Threat model") says what the daemon promises.
"""

from __future__ import annotations

import ctypes
import errno
import os
import re
import resource
import shutil
import signal
import socket
import stat
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

import vfiosim
from runutil import ThreadedDaemon
from vfiosim.kernel.syscall import MAX_OOPSES
from vfiosim.transport import daemon as D
from vfiosim.transport import protocol as P

pytestmark = pytest.mark.skipif(os.geteuid() != 0 or not os.path.exists("/usr/bin/python3"),
                                reason="needs root, to run attackers as another uid")

ATTACKER = str(Path(__file__).parent / "attacker.py")
SYSPY = "/usr/bin/python3"          # the attackers' interpreter: the test's own is not theirs to read
NOBODY = 65534
CLI = [sys.executable, "-m", "vfiosim.cli"]


@pytest.fixture
def world_dir():
    """A directory every user may reach (pytest's own tmp_path is root's only)."""
    d = tempfile.mkdtemp(prefix="vfiosim-sec-", dir="/tmp")
    os.chmod(d, 0o755)
    yield Path(d)
    shutil.rmtree(d, ignore_errors=True)


def shared(machine: vfiosim.Machine, where: Path) -> ThreadedDaemon:
    """A root daemon whose socket anybody may connect to."""
    d = ThreadedDaemon(machine, where)
    os.chmod(d.sock, 0o666)
    return d


def attacker(d: ThreadedDaemon, *args: str, uid: int | None = NOBODY, **kw) -> subprocess.Popen:
    who = {"user": uid, "group": uid, "extra_groups": []} if uid is not None else {}
    return subprocess.Popen([SYSPY, ATTACKER, d.sock, *args], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={"PATH": "/usr/bin:/bin"}, **who, **kw)


def fields(text: str) -> dict[str, str]:
    return dict(w.split("=", 1) for line in text.splitlines() for w in line.split() if "=" in w)


def finish(proc: subprocess.Popen, timeout: float = 60) -> dict[str, str]:
    out, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out + err
    return fields(out)


def group_free(m: vfiosim.Machine, gid: int) -> bool:
    with m._lock:
        return m.kernel.vfio.groups[gid].opened_file is None


def daemon_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


# -- 1. borrowed identity ---------------------------------------------------------------------------------------


def test_attack1_a_socket_borrowed_from_a_setuid_process_cannot_say_hello(world_dir):
    """The child connects (SO_PEERCRED names it) and execs passwd, a set-uid root
    program that stays alive; the parent says hello on the same socket.  The
    daemon refuses: the hello is not from the process that connected."""
    m = vfiosim.Machine.preset("pseries")
    d = shared(m, world_dir)
    try:
        f = finish(attacker(d, "borrowed-hello"))
        assert f["hello_with_own_creds"] == f"-1,{errno.EPERM}" and f["channel"] == "0"
        assert f["hello_without_creds"].startswith("-1,") and f["channel2"] == "0" and "open_root_group" not in f
        assert int(f["child"]) not in d.daemon.states
        assert group_free(m, 0)
        assert any("the hello came from pid" in line for line in d.logs), d.logs
    finally:
        d.close()


def _writable_data(pid: int) -> int:
    """An address in the data of process ``pid`` (passwd) that a GROUP_GET_STATUS could overwrite."""
    with open(f"/proc/{pid}/maps") as f:
        for line in f:
            rng, perms, *_rest = line.split()
            if perms.startswith("rw") and line.rstrip().endswith("passwd"):
                return int(rng.split("-")[0], 16)
    raise AssertionError("passwd has no data mapping")


def test_attack1_a_process_that_becomes_a_setuid_program_loses_its_connection(world_dir):
    """The child says hello itself, hands its channel to its parent and execs
    passwd.  From then on every call on that channel is refused: no 0600 root
    group opened, and GROUP_GET_STATUS aimed at passwd's data writes nothing."""
    m = vfiosim.Machine.preset("pseries")
    d = shared(m, world_dir)
    try:
        proc = attacker(d, "hello-then-setuid")
        first = proc.stdout.readline()
        assert first.startswith("child_hello=0,0"), first + proc.stderr.read()
        child = int(fields(first)["child"])
        assert proc.stdout.readline() == "passwd_running\n"
        addr = _writable_data(child)
        with open(f"/proc/{child}/mem", "rb") as mem:
            mem.seek(addr)
            before = mem.read(16)
            proc.stdin.write(f"{addr}\n")
            proc.stdin.flush()
            out, err = proc.communicate(timeout=60)
            mem.seek(addr)
            after = mem.read(16)
        f = fields(out)
        assert f["open_root_group"].startswith("-1,"), out + err
        assert f["get_status"].startswith("-1,"), out + err
        assert after == before
        assert group_free(m, 0)
        assert any("no longer the process that connected" in line for line in d.logs), d.logs
    finally:
        d.close()


# -- 2. forged inheritance ----------------------------------------------------------------------------------------


FORGER_PARENT = r"""
import os, subprocess, sys, fcntl, ctypes
c = os.open("/dev/vfio/vfio", os.O_RDWR)            # O_CLOEXEC (os.open): the child gets none of these
g = os.open("/dev/vfio/4", os.O_RDWR)
fcntl.ioctl(g, (ord(";") << 8) | 104, ctypes.c_int32(c))
fcntl.ioctl(c, (ord(";") << 8) | 102, 3)
env = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}
r = subprocess.run(["/usr/bin/python3", sys.argv[1], sys.argv[2], "forged-fork", "4", sys.argv[3]],
                   env=env, capture_output=True, text=True)
print(r.stdout, r.stderr, flush=True)
print("parent_status", fcntl.ioctl(g, (ord(";") << 8) | 103, b"\x08\0\0\0\0\0\0\0")[4], flush=True)
"""


def test_attack2_a_child_cannot_claim_files_by_naming_memfds(world_dir):
    """A child given no VFIO fds names memfds vfiosim:container and
    vfiosim:group:4, puts them at fds 3 and 4 and says it is a fork.  It gets
    nothing of its parent's: inheritance is proven with kcmp(), not names."""
    m = vfiosim.Machine.preset("x86")
    bdf = m.iommu_groups()[4][0]
    d = shared(m, world_dir)
    try:
        proc = d.run([sys.executable, "-c", FORGER_PARENT, ATTACKER, d.sock, bdf], timeout=120)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        f = fields(proc.stdout)
        assert f["hello"] == "0,0"
        assert f["get_status"] == f"-1,{errno.ENOTTY}"          # a memfd, as the real kernel would say
        assert f["api_version"] == f"-1,{errno.ENOTTY}"
        assert f["get_device_fd"] == f"-1,{errno.ENOTTY}"
        assert "parent_status 3" in proc.stdout                  # VIABLE | CONTAINER_SET: still the parent's
        assert d.wait_idle()
    finally:
        d.close()


# -- 3. clients that never read --------------------------------------------------------------------------------


def test_attack3_clients_that_never_read_a_reply_stall_nobody_else(world_dir):
    m = vfiosim.Machine.preset("pseries")
    d = shared(m, world_dir)
    stallers = []
    try:
        for _ in range(10):
            p = attacker(d, "stall")
            assert p.stdout.readline() == "stalling\n"
            stallers.append(p)
        stallers += [attacker(d, "idle", "3") for _ in range(10)]
        # A victim of another user makes 2,000 calls meanwhile (the old daemon
        # spent 5 s per stalled reply: 34 calls in 15 s).
        f = finish(attacker(d, "victim", "2000", uid=None), timeout=120)
        assert f["ok"] == "2000"
    finally:
        for p in stallers:
            p.kill()
            p.wait()
        d.close()


# -- 4. descriptors, connections, logs ---------------------------------------------------------------------


def test_attack4_eventfd_churn_keeps_the_daemons_descriptors_bounded(world_dir):
    """eventfd(), dup2() to one number, then calls naming it: SETFD (the daemon
    takes nothing for it) and SET_IRQS (one handle, replaced with the eventfd)."""
    m = vfiosim.Machine.preset("x86")
    bdf = m.iommu_groups()[4][0]
    m.kernel.dev_nodes["/dev/vfio/4"].uid = NOBODY
    d = shared(m, world_dir)
    before = daemon_fds()
    try:
        proc = attacker(d, "eventfd-churn", "2000", "4", bdf)
        out = proc.stdout.readline()
        assert "setfd_errnos" in out, out + proc.stderr.read()
        f = fields(out)
        assert f["setfd_errnos"] == f"{errno.EBADF}:2000"
        assert f["set_irqs_errnos"] == "0:2000"
        assert proc.stdout.readline() == "done\n"
        assert daemon_fds() < before + 24, daemon_fds() - before
        proc.stdin.write("\n")
        proc.stdin.flush()
        proc.wait(60)
        assert d.wait_idle()
    finally:
        d.close()


def test_attack4_idle_connections_are_limited_per_uid_and_others_still_connect(world_dir):
    m = vfiosim.Machine.preset("pseries")
    d = shared(m, world_dir)
    before = daemon_fds()
    try:
        idle = attacker(d, "idle", "200")
        assert "connected=" in idle.stdout.readline()
        time.sleep(1)
        assert len(d.daemon.sessions) <= D.MAX_CONNECTIONS_PER_UID
        assert daemon_fds() < before + 3 * D.MAX_CONNECTIONS_PER_UID
        assert any("refusing a connection of uid 65534" in line for line in d.logs)
        f = finish(attacker(d, "victim", "100", uid=None), timeout=60)
        assert f["ok"] == "100"
        idle.kill()
        idle.wait()
    finally:
        d.close()


def test_attack4_out_of_descriptors_the_daemon_backs_off_instead_of_spinning(world_dir):
    """accept() failing with EMFILE: the daemon stops listening for a while and
    says so at most a few times a second, instead of spinning and logging
    50,000 lines a second."""
    sock = str(world_dir / "s.sock")
    server = subprocess.Popen(["prlimit", "--nofile=48:48", "--", *CLI, "serve", "--socket", sock],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert "serving" in server.stdout.readline()
        os.chmod(sock, 0o666)
        socks = []
        for _ in range(150):
            s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            try:
                s.connect(sock)
            except OSError:
                s.close()
                break
            socks.append(s)
        t0 = _cpu_seconds(server.pid)
        time.sleep(2)
        busy = _cpu_seconds(server.pid) - t0
        assert busy < 1.0, f"the daemon used {busy:.2f} s of CPU in 2 s: it spins"
        for s in socks:
            s.close()
    finally:
        server.send_signal(signal.SIGTERM)
        _out, err = server.communicate(timeout=30)
    lines = err.splitlines()
    assert any("cannot accept connections" in line for line in lines), err[-2000:]
    assert len(lines) < 200, len(lines)


def _cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields_ = f.read().rsplit(")", 1)[1].split()
    return (int(fields_[11]) + int(fields_[12])) / os.sysconf("SC_CLK_TCK")


def test_attack4_internal_error_records_are_bounded():
    m = vfiosim.Machine.default()
    for i in range(MAX_OOPSES + 50):
        m.kernel.gate.oops(f"call {i}", RuntimeError("boom"))
    assert len(m.oopses) == MAX_OOPSES and m.kernel.gate.oopses_dropped == 50
    assert len(m.dmesg()) <= 65536
    m.oopses.clear()                       # (conftest: this machine's oopses were made on purpose)


# -- 5. memory follows what is pinned --------------------------------------------------------------------------


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def test_attack5_daemon_memory_follows_what_is_pinned_not_what_is_reserved(world_dir):
    """A client reserves 4 TiB PROT_NONE and maps 4 KiB of it for DMA: the
    daemon pays for a page, not for the reservation (it paid about 1 GiB)."""
    m = vfiosim.Machine.preset("x86")
    m.kernel.dev_nodes["/dev/vfio/4"].uid = NOBODY
    d = shared(m, world_dir)
    before = _rss()
    try:
        proc = attacker(d, "reserve-and-map", "4")
        line = proc.stdout.readline()
        assert fields(line).get("map") == "0,0", line + proc.stderr.read()
        assert proc.stdout.readline() == "mapped\n"
        grown = _rss() - before
        assert grown < 32 << 20, f"the daemon grew by {grown >> 20} MiB"
        with m._lock:
            assert m.pinned_pages() == 1
            (st,) = d.daemon.states.values()
            assert st.task.mm.pinned_pages() == 1
            assert len(st.task.mm._windows) == 1
        proc.stdin.write("\n")
        proc.stdin.flush()
        proc.wait(60)
        assert d.wait_idle()
        assert m.pinned_pages() == 0
    finally:
        d.close()


# -- 6. whatever answers on the socket -----------------------------------------------------------------------


def _fake_daemon(path: str, tree: str) -> int:
    """A 'daemon' of uid 65534 that answers OP_INFO with a tree of its making."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:                                         # the impostor
        try:
            os.close(r)
            os.setgroups([])
            os.setresgid(NOBODY, NOBODY, NOBODY)
            os.setresuid(NOBODY, NOBODY, NOBODY)
            s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            s.bind(path)
            os.chmod(path, 0o666)
            s.listen(8)
            os.write(w, b"x")
            while True:
                c, _ = s.accept()
                try:
                    c.recv(4096)
                    c.send(P.pack_reply(0, 0, tree.encode()))
                except OSError:
                    pass                                 # the client hung up on it
                c.close()
        finally:
            os._exit(0)
    os.close(w)
    os.read(r, 1)
    os.close(r)
    return pid


def test_attack6_run_connect_and_the_shim_refuse_a_daemon_of_another_user(world_dir):
    tree = world_dir / "tree"
    (tree / "dev").mkdir(parents=True)
    (tree / "dev" / "urandom").write_text("not random at all\n")
    (tree / "prefixes").write_text("/dev/urandom\n/dev/vfio\n")
    for p in (tree, tree / "prefixes", tree / "dev", tree / "dev" / "urandom"):
        os.chown(p, NOBODY, NOBODY)
    public = world_dir / "public"                      # a sticky world-writable place, as /tmp is
    public.mkdir()
    os.chmod(public, 0o1777)
    sock = str(public / "evil.sock")
    impostor = _fake_daemon(sock, str(tree))
    try:
        proc = subprocess.run([*CLI, "run", "--connect", sock, "--", "head", "-c", "17", "/dev/urandom"],
                              capture_output=True, text=True, timeout=60)
        assert proc.returncode == 1
        assert "runs as uid 65534" in proc.stderr and "not random" not in proc.stdout
        # A program handed the impostor's socket and tree directly: the shim checks too.
        env = dict(os.environ, LD_PRELOAD=vfiosim.preload.library_path(), VFIOSIM_SOCKET=sock,
                   VFIOSIM_ROOT=str(tree))
        code = ("import os, errno\nprint(open('/dev/urandom', 'rb').read(17) != b'not random at all')\n"
                "try:\n    os.open('/dev/vfio/vfio', os.O_RDWR)\nexcept OSError as e:\n"
                "    print(errno.errorcode[e.errno])\n")
        shim = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
        assert shim.stdout.split() == ["True", "EACCES"], shim.stdout + shim.stderr
        assert "runs as another user" in shim.stderr
    finally:
        os.kill(impostor, signal.SIGKILL)
        os.waitpid(impostor, 0)


# -- 7. credentials changed behind the shim's back ---------------------------------------------------------


@pytest.mark.parametrize("how", ["raw-setresuid", "raw-capset"])
def test_attack7_rights_dropped_with_a_raw_syscall_are_gone_at_the_next_call(world_dir, how):
    """A root client drops its rights with syscall(2) -- no libc wrapper, so the
    shim never flags it -- and opens a group it may no longer open."""
    m = vfiosim.Machine.preset("pseries")
    if how == "raw-capset":
        m.kernel.dev_nodes["/dev/vfio/1"].uid = 1000      # root may open it only with CAP_DAC_OVERRIDE
    d = shared(m, world_dir)
    try:
        f = finish(attacker(d, how, "1", uid=None))
        assert f["open_before"] == "40,0"
        assert f["raw"] == "0"
        assert f["open_after"] == f"-1,{errno.EACCES}"
    finally:
        d.close()


# -- 8. careless paths ------------------------------------------------------------------------------------


def test_attack8_serve_replaces_nothing_but_a_stale_socket_of_its_own(world_dir):
    regular = world_dir / "file"
    regular.write_text("precious\n")
    directory = world_dir / "dir"
    directory.mkdir()
    for target, why in ((regular, "is a regular file"), (directory, "is a directory")):
        proc = subprocess.run([*CLI, "serve", "--socket", str(target)], capture_output=True, text=True, timeout=60)
        assert proc.returncode == 1 and why in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    assert regular.read_text() == "precious\n" and directory.is_dir()
    # A live daemon's socket is not taken over; a stale one is replaced.
    live = str(world_dir / "live.sock")
    server = subprocess.Popen([*CLI, "serve", "--socket", live], stdout=subprocess.PIPE, text=True)
    try:
        assert "serving" in server.stdout.readline()
        proc = subprocess.run([*CLI, "serve", "--socket", live], capture_output=True, text=True, timeout=60)
        assert proc.returncode == 1 and "already serves" in proc.stderr
    finally:
        server.kill()
        server.wait()
    assert os.path.exists(live)                               # SIGKILL: stale now (the reaper may race us)
    stale = str(world_dir / "stale.sock")
    s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    s.bind(stale)
    s.close()
    server = subprocess.Popen([*CLI, "serve", "--socket", stale], stdout=subprocess.PIPE, text=True)
    try:
        assert "serving" in server.stdout.readline()
    finally:
        server.send_signal(signal.SIGTERM)
        assert server.wait(30) == 0


def test_attack8_trace_never_follows_a_planted_symlink(world_dir):
    sticky = world_dir / "tmp"
    sticky.mkdir()
    os.chmod(sticky, 0o1777)
    victim = world_dir / "victim"
    victim.write_text("root's data\n")
    planted = sticky / "trace.jsonl"
    os.symlink(victim, planted)
    os.lchown(planted, NOBODY, NOBODY)
    proc = subprocess.run([*CLI, "run", "--trace", str(planted), "--", "true"], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 1 and "refusing to overwrite" in proc.stderr and "symlink" in proc.stderr
    assert victim.read_text() == "root's data\n"
    # A hard link to a file of ours is refused as well; our own old trace is replaced.
    os.unlink(planted)
    os.link(victim, planted)
    proc = subprocess.run([*CLI, "run", "--trace", str(planted), "--", "true"], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 1 and "several names" in proc.stderr
    assert victim.read_text() == "root's data\n"
    os.unlink(planted)
    planted.write_text("an old trace\n")
    proc = subprocess.run([*CLI, "run", "--trace", str(planted), "--", "true"], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "an old trace" not in planted.read_text()


# -- 9. device mappings ----------------------------------------------------------------------------------------


def test_attack9_device_mappings_stop_at_vm_max_map_count(world_dir):
    """mmap() answers ENOMEM past vm.max_map_count (do_mmap: "Too many mappings?"),
    here lowered as sysctl vm.max_map_count=100 would."""
    m = vfiosim.Machine.preset("x86")
    bdf = m.iommu_groups()[4][0]
    m.kernel.dev_nodes["/dev/vfio/4"].uid = NOBODY
    d = shared(m, world_dir)
    d.daemon.max_map_count = 100
    try:
        f = finish(attacker(d, "many-mmaps", "300", "4", bdf), timeout=120)
        assert f["mmaps"] == "100" and f["errno"] == str(errno.ENOMEM)
        assert d.wait_idle()
    finally:
        d.close()
