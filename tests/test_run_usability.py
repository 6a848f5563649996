"""`vfiosim run` and `serve` for a newcomer: a daemon started in the same line
as its first client, the simulated kernel's reasons on stderr (-v), and
programs the preload shim cannot reach said so before they run."""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from vfiosim import Machine
from runutil import C_DIR, cc
from vfiosim.transport.elfcheck import preload_obstacle
from vfiosim.transport.verbose import FailureReporter

CLI = [sys.executable, "-m", "vfiosim"]
PROBE_PY = r"""
import os, fcntl, ctypes, struct
IO = lambda n: (ord(";") << 8) | (100 + n)
c = os.open("/dev/vfio/vfio", os.O_RDWR)
try:
    fcntl.ioctl(c, IO(2), 2)                    # VFIO_SET_IOMMU before any group: EINVAL
except OSError as e:
    print("set_iommu", e.errno)
g = os.open("/dev/vfio/0", os.O_RDWR)
fcntl.ioctl(g, IO(4), ctypes.c_int32(c))
fcntl.ioctl(c, IO(2), 2)
libc = ctypes.CDLL(None, use_errno=True)
d = libc.ioctl(g, ctypes.c_ulong(IO(6)), ctypes.c_char_p(b"0000:00:00.0"))
os.pwrite(d, struct.pack("<Q", 0), 0x88)        # DMA destination 0: outside edu's buffer
os.pwrite(d, struct.pack("<Q", 1), 0x98)        # start: edu logs the bad range and drops the transfer
print("done")
"""


def vfiosim(*args: str, timeout: float = 120, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=timeout, **kw)


@pytest.fixture(scope="module")
def probe(tmp_path_factory):
    return cc(C_DIR / "run_probe.c", tmp_path_factory.mktemp("bin"), "-pthread")


# -- serve, then run at once ----------------------------------------------------------------------------


def test_run_connect_started_with_serve_in_one_line_waits_for_it(probe, tmp_path):
    """`vfiosim serve --socket S & vfiosim run --connect S -- prog`: the daemon
    takes a moment to start; the program must not fail for it.  Here the
    client is even started first, and the daemon half a second later."""
    sock = str(tmp_path / "m.sock")
    client = subprocess.Popen([*CLI, "run", "--connect", sock, "--", str(probe), "open", "0"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(0.5)
    assert not os.path.exists(sock) and client.poll() is None
    server = subprocess.Popen([*CLI, "serve", "--machine", "pseries", "--socket", sock],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        out, err = client.communicate(timeout=60)
        assert client.returncode == 0, err
        assert "open_group=0,0" in out
    finally:
        client.kill()
        server.terminate()
        server.wait(10)


def test_run_connect_to_no_daemon_gives_up_after_the_wait_and_says_how_to_start_one(tmp_path):
    sock = tmp_path / "nobody.sock"
    start = time.monotonic()
    proc = vfiosim("run", "--connect", str(sock), "--wait", "0.3", "--", "true")
    assert proc.returncode == 1
    assert time.monotonic() - start >= 0.3
    assert proc.stderr == (f"vfiosim: no vfiosim daemon answers on {sock} after waiting 0.3 s: No such file or "
                           f"directory; start one with: vfiosim serve --socket {sock}\n")


def test_serve_writes_the_socket_path_to_the_ready_fd_once_programs_can_connect(probe, tmp_path):
    sock = str(tmp_path / "m.sock")
    r, w = os.pipe()
    server = subprocess.Popen([*CLI, "serve", "--machine", "pseries", "--socket", sock, "--ready-fd", str(w)],
                              pass_fds=(w,), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    os.close(w)
    try:
        with os.fdopen(r) as ready:
            assert ready.readline() == sock + "\n"
            assert ready.read() == ""                     # and closed
        client = vfiosim("run", "--connect", sock, "--", str(probe), "open", "0")
        assert "open_group=0,0" in client.stdout, client.stderr
    finally:
        server.terminate()
        server.wait(10)


def test_serve_with_a_bad_ready_fd_says_so(tmp_path):
    proc = vfiosim("serve", "--socket", str(tmp_path / "s.sock"), "--ready-fd", "97")
    assert proc.returncode == 2 and proc.stderr == "vfiosim serve: --ready-fd 97: Bad file descriptor\n"
    assert not (tmp_path / "s.sock").exists()


# -- the simulated kernel's reasons ---------------------------------------------------------------------------


def test_verbose_prints_failing_calls_with_the_kernels_reason_and_its_log():
    proc = vfiosim("run", "-v", "--machine", "pseries", "--", sys.executable, "-c", PROBE_PY)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split("\n")[:2] == ["set_iommu 22", "done"]
    lines = proc.stderr.splitlines()
    failing = [line for line in lines if "VFIO_SET_IOMMU" in line]
    assert len(failing) == 1                               # the failing call only, not the one that worked
    assert failing[0].startswith("vfiosim: [pid ")
    assert failing[0].endswith("= -1 EINVAL (Invalid argument: VFIO_SET_IOMMU: the container has no group yet "
                               "(VFIO_GROUP_SET_CONTAINER first))")
    assert ("vfiosim: dmesg: edu 0000:00:00.0: DMA range 0x0+0x0 outside the buffer 0x40000+0x1000, "
            "transfer dropped") in lines


def test_without_verbose_the_program_alone_speaks():
    proc = vfiosim("run", "--machine", "pseries", "--", sys.executable, "-c", PROBE_PY)
    assert proc.returncode == 0 and proc.stderr == ""


def test_verbose_and_trace_together_keep_the_trace_whole(tmp_path):
    trace = tmp_path / "t.jsonl"
    proc = vfiosim("run", "-v", "--trace", str(trace), "--machine", "pseries", "--", sys.executable, "-c", PROBE_PY)
    assert proc.returncode == 0, proc.stderr
    assert "EINVAL" in proc.stderr
    shown = vfiosim("trace", "show", str(trace)).stdout
    assert "VFIO_SET_IOMMU, {type=2}) = -1 EINVAL" in shown and "VFIO_SET_IOMMU, {type=2}) = 0" in shown


def test_a_stderr_that_fails_never_fails_the_programs_calls():
    """The report is observed inside the daemon's call: a closed or broken
    stderr must not turn the program's call into an error."""
    class Broken(io.StringIO):
        def write(self, text):
            raise BrokenPipeError(32, "Broken pipe")
    m = Machine.preset("pseries")
    for err in (Broken(), None):
        reporter = FailureReporter(m, err)
        m.kernel.log.err("something happened")
        reporter({"pid": 1, "call": "open", "path": "/dev/vfio/9", "flags": 2, "ret": -1, "errno": 2,
                  "err": "ENOENT", "reason": "no such group"})
        assert reporter.seen == m.kernel.log.seq


def test_verbose_belongs_to_the_daemon_with_connect(tmp_path):
    proc = vfiosim("run", "-v", "--connect", str(tmp_path / "s.sock"), "--", "true")
    assert proc.returncode == 2 and proc.stderr == "vfiosim run: -v belongs to the daemon: vfiosim serve -v\n"


# -- programs the shim cannot reach ---------------------------------------------------------------------------


def _static_libc() -> bool:
    gcc = shutil.which("gcc")
    if gcc is None:
        return False
    libc = subprocess.run([gcc, "-print-file-name=libc.a"], capture_output=True, text=True).stdout.strip()
    return os.path.isabs(libc) and os.path.exists(libc)


needs_static = pytest.mark.skipif(not _static_libc(), reason="no static libc (libc.a) to link a static program with")


@pytest.fixture(scope="module")
def programs(tmp_path_factory):
    out = tmp_path_factory.mktemp("progs")
    src = out / "exit3.c"
    src.write_text("int main(void) { return 3; }\n")
    made = {"dynamic": out / "dynamic"}
    subprocess.run(["gcc", "-o", str(made["dynamic"]), str(src)], check=True)
    if _static_libc():
        for kind, flag in (("static", "-static"), ("static-pie", "-static-pie")):
            made[kind] = out / kind
            subprocess.run(["gcc", flag, "-o", str(made[kind]), str(src)], check=True)
    return made


@needs_static
@pytest.mark.parametrize("kind", ["static", "static-pie"])
def test_a_static_program_is_named_before_it_runs(programs, kind):
    proc = vfiosim("run", "--", str(programs[kind]))
    assert proc.returncode == 3                            # it still runs: its children may be dynamic
    assert proc.stderr.startswith(f"vfiosim run: warning: {programs[kind]} is statically linked: LD_PRELOAD "
                                  f"cannot load the vfiosim shim into it")


@needs_static
def test_a_static_program_found_on_path_is_named_with_its_file(programs):
    env = {**os.environ, "PATH": f"{programs['static'].parent}:{os.environ.get('PATH', '')}"}
    proc = vfiosim("run", "--", "static", env=env)
    assert proc.returncode == 3
    assert f"warning: static ({programs['static']}) is statically linked" in proc.stderr


def test_dynamic_programs_and_scripts_run_without_a_warning(programs, tmp_path):
    script = tmp_path / "script.sh"
    script.write_text("#!/bin/sh\nexit 4\n")
    script.chmod(0o755)
    assert vfiosim("run", "--", str(programs["dynamic"])).stderr == ""
    proc = vfiosim("run", "--", str(script))
    assert proc.returncode == 4 and proc.stderr == ""
    assert preload_obstacle(sys.executable) is None and preload_obstacle("sh") is None
    assert preload_obstacle("no-such-program-here") is None           # exec reports that one


@pytest.mark.skipif(os.geteuid() != 0, reason="making a set-uid program of another user needs root")
def test_a_set_uid_program_of_another_user_is_named(programs, tmp_path):
    setuid = tmp_path / "setuid"
    shutil.copy(programs["dynamic"], setuid)
    os.chown(setuid, 65534, 65534)
    setuid.chmod(0o4755)
    assert "is set-uid: it runs in secure-execution mode" in preload_obstacle(str(setuid))


def _elf32(path: Path, *segment_types: int) -> str:
    """A 32-bit i386 ELF header with these program headers (only the headers matter: it is not run)."""
    head = bytearray(52)
    head[:7] = b"\x7fELF\x01\x01\x01"
    head[16:20] = (2).to_bytes(2, "little") + (3).to_bytes(2, "little")          # ET_EXEC, EM_386
    head[28:32] = (52).to_bytes(4, "little")                                     # e_phoff
    head[42:46] = (32).to_bytes(2, "little") + len(segment_types).to_bytes(2, "little")
    path.write_bytes(bytes(head) + b"".join(t.to_bytes(4, "little") + bytes(28) for t in segment_types))
    return str(path)


def test_a_32_bit_program_is_named(tmp_path):
    PT_LOAD, PT_INTERP = 1, 3
    dynamic = _elf32(tmp_path / "dynamic32", PT_LOAD, PT_INTERP)
    assert "is a 32-bit i386 program and the vfiosim shim is 64-bit x86-64" in preload_obstacle(dynamic)
    assert "is statically linked" in preload_obstacle(_elf32(tmp_path / "static32", PT_LOAD))


@pytest.mark.skipif(os.geteuid() != 0, reason="dropping to another uid needs root")
def test_a_child_that_cannot_reach_the_daemon_says_why_at_its_first_call(tmp_path):
    """A program that drops privileges after connecting keeps its connection; a child
    it forks afterwards cannot reach the private daemon's socket: its VFIO calls fail
    with EIO, and it says why once, naming the uid, instead of failing silently."""
    exe = cc(C_DIR / "drop_then_fork.c", tmp_path)
    proc = subprocess.run([*CLI, "run", "--machine", "x86", "--", str(exe)], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.splitlines() == ["parent as root: ok", "parent as 1000: ok", "child: Input/output error"]
    said = [line for line in proc.stderr.splitlines() if "cannot reach the daemon" in line]
    assert len(said) == 1 and "(uid 1000)" in said[0] and "Permission denied" in said[0], proc.stderr
