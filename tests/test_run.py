"""`vfiosim run`: unmodified programs (C and Python) reach the simulated machine
through the LD_PRELOAD shim.

The programs are compiled here with the system gcc against <linux/vfio.h>;
they know nothing of vfiosim.  Tests that inspect the machine while a
program runs serve it from a thread of the test process (runutil.ThreadedDaemon);
the others go through the command line as a user would.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

import vfiosim
from runutil import C_DIR, EXAMPLES, ThreadedDaemon, cc
from vfiosim.transport import protocol as P

CLI = [sys.executable, "-m", "vfiosim.cli"]
POWER = ["pseries", "powernv"]
ALL = POWER + (["x86"] if "x86" in vfiosim.preset_names() else [])


@pytest.fixture(scope="module")
def bins(tmp_path_factory):
    out = tmp_path_factory.mktemp("bin")
    return {"probe": cc(C_DIR / "run_probe.c", out, "-pthread"), "spapr": cc(EXAMPLES / "spapr_edu_dma.c", out),
            "type1": cc(EXAMPLES / "type1_edu_dma.c", out)}


def vfiosim_run(*args: str, timeout: float = 120, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, "run", *args], capture_output=True, text=True, timeout=timeout, **kw)


def fields(text: str) -> dict[str, str]:
    out = {}
    for line in text.splitlines():
        for word in line.split():
            if "=" in word:
                k, v = word.split("=", 1)
                out[k] = v
    return out


@pytest.fixture
def daemon(request, tmp_path):
    machine = vfiosim.Machine.preset(getattr(request, "param", "pseries"))
    d = ThreadedDaemon(machine, tmp_path)
    yield d
    d.close()


# -- the examples, through the command line ------------------------------------------------------------


@pytest.mark.parametrize("machine", POWER)
def test_the_spapr_c_example_runs_unmodified_and_verifies_its_dma(bins, machine):
    proc = vfiosim_run("--machine", machine, "--", str(bins["spapr"]))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "DMA round trip of 4096 bytes: verified" in proc.stdout
    assert "edu identification 0x10000ed" in proc.stdout
    # VmLck seen by the program itself: the whole 32-bit window charged at ENABLE (v1).
    window_kb = {"pseries": 1 << 20, "powernv": 2 << 20}[machine]
    assert f"enabled: VmLck {window_kb} kB" in proc.stdout
    assert "internal error" not in proc.stderr


def test_the_type1_c_example_runs_unmodified_on_the_x86_machine(bins):
    proc = vfiosim_run("--machine", "x86", "--", str(bins["type1"]))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "DMA round trip of 4096 bytes: verified" in proc.stdout
    assert "mapped 1 MiB at iova 0: VmLck 1024 kB" in proc.stdout
    assert "unmapped: VmLck 0 kB" in proc.stdout


@pytest.mark.parametrize("machine", ALL)
def test_the_python_example_runs_unmodified(machine):
    proc = vfiosim_run("--machine", machine, "--", sys.executable, str(EXAMPLES / "vfio_edu.py"))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "DMA round trip of 4096 bytes: verified" in proc.stdout
    assert "edu identification 0x10000ed" in proc.stdout


def test_the_exit_status_is_the_programs():
    assert vfiosim_run("--", sys.executable, "-c", "raise SystemExit(7)").returncode == 7
    assert vfiosim_run("--", "/nonexistent/program").returncode == 127
    refused = vfiosim_run("--page-size", "65536", "--", "true")
    assert refused.returncode == 2 and "host's 4096-byte pages" in refused.stderr
    proc = vfiosim_run("--", sys.executable, "-c", "import os, signal; os.kill(os.getpid(), signal.SIGTERM)")
    assert proc.returncode == 128 + signal.SIGTERM


# -- trace -----------------------------------------------------------------------------------------------------


def test_trace_records_every_vfio_call_decoded_and_trace_show_prints_it(bins, tmp_path):
    trace = tmp_path / "t.jsonl"
    proc = vfiosim_run("--machine", "pseries", "--trace", str(trace), "--", str(bins["spapr"]))
    assert proc.returncode == 0, proc.stderr
    head, *recs = [json.loads(line) for line in trace.read_text().splitlines()]
    assert head["format"] == "vfiosim-trace" and head["source"] == "simulator"
    assert head["system"]["platform"] == "pseries" and {"id": 1, "devices": ["0001:00:00.0"]} in head["groups"]
    calls = [r.get("cmd") or r["call"] for r in recs]
    for name in ("open", "VFIO_GET_API_VERSION", "VFIO_GROUP_SET_CONTAINER", "VFIO_SET_IOMMU",
                 "VFIO_IOMMU_SPAPR_TCE_GET_INFO", "VFIO_IOMMU_ENABLE", "VFIO_IOMMU_MAP_DMA",
                 "VFIO_GROUP_GET_DEVICE_FD", "VFIO_DEVICE_SET_IRQS", "mmap", "mmio", "VFIO_IOMMU_UNMAP_DMA",
                 "close", "exit"):
        assert name in calls, name
    mp = next(r for r in recs if r.get("cmd") == "VFIO_IOMMU_MAP_DMA")
    assert mp["args"]["argsz"] == 32 and mp["args"]["flags"] == 3 and mp["args"]["size"] == 1 << 20
    assert mp["ret"] == 0 and mp["errno"] == 0 and mp["fd_kind"] == "vfio-container"
    info = next(r for r in recs if r.get("cmd") == "VFIO_IOMMU_SPAPR_TCE_GET_INFO")
    assert info["out"]["dma32_window_size"] == 1 << 30
    irqs = next(r for r in recs if r.get("cmd") == "VFIO_DEVICE_SET_IRQS")
    assert irqs["args"]["index"] == 1 and len(irqs["args"]["data"]) == 1
    dev = next(r for r in recs if r.get("cmd") == "VFIO_GROUP_GET_DEVICE_FD")
    assert dev["args"]["name"] == "0001:00:00.0" and dev["ret"] >= 3
    # A DMA started by a store to the command register through the BAR mapping.
    assert any(r["call"] == "mmio" and r.get("write") and r["offset"] == 0x98 for r in recs)

    show = subprocess.run([*CLI, "trace", "show", str(trace)], capture_output=True, text=True, check=True)
    header_line, *lines = show.stdout.splitlines()
    assert header_line.startswith("# vfiosim trace v1: answers from vfiosim")
    assert len(lines) == len(recs)
    assert any("ioctl(3<vfio-container>, VFIO_IOMMU_MAP_DMA, {argsz=32, flags=0x3, vaddr=0x" in line
               and line.endswith("size=0x100000}) = 0") for line in lines)
    assert any('open("/dev/vfio/vfio", O_RDWR) = 3' in line for line in lines)
    assert any("mmio_write(mapping 1, offset=0x98, size=8, value=0x5) = 0" in line for line in lines)


def test_a_failed_call_shows_its_errno_and_reason_in_the_trace(bins, tmp_path):
    trace = tmp_path / "t.jsonl"
    proc = vfiosim_run("--trace", str(trace), "--", str(bins["probe"]), "badinput", "0")
    assert proc.returncode == 0, proc.stderr
    recs = [json.loads(line) for line in trace.read_text().splitlines()][1:]
    bad = next(r for r in recs if r.get("cmd") == "VFIO_IOMMU_MAP_DMA" and r["args"].get("argsz") == 8)
    assert bad["errno"] == 22 and bad["err"] == "EINVAL" and bad["reason"]
    show = subprocess.run([*CLI, "trace", "show", str(trace)], capture_output=True, text=True, check=True)
    assert "= -1 EINVAL (Invalid argument: " in show.stdout


# -- bad input -------------------------------------------------------------------------------------------------


def test_garbage_gets_the_kernels_errno_and_never_a_crash(bins, daemon):
    proc = daemon.run([str(bins["probe"]), "badinput", "0"])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    got = {k: tuple(map(int, v.split(","))) for k, v in fields(proc.stdout).items() if "," in v}
    assert got == {
        "set_container_foreign": (-1, 77),       # EBADFD: not a container
        "set_container_closed": (-1, 9),         # EBADF
        "set_container_group_fd": (-1, 77),
        "set_container_bad_pointer": (-1, 14),   # EFAULT
        "get_info_null": (-1, 14),
        "get_info_wild": (-1, 14),
        "get_info_argsz4": (-1, 22),
        "ioctl_closed_fd": (-1, 9),
        "unknown_ioctl": (-1, 25),               # ENOTTY
        "get_device_fd_null": (-1, 14),
        "get_device_fd_nosuch": (-1, 19),        # ENODEV
        "read_container": (-1, 22),
        "pread_container": (-1, 22),
        "map_unmapped_vaddr": (-1, 14),
        "map_readonly_for_write": (-1, 14),
        "map_argsz8": (-1, 22),
        "close_twice_1": (0, 0),
        "close_twice_2": (-1, 9),
    }
    assert daemon.wait_idle()
    assert daemon.machine.pinned_pages() == 0


@pytest.mark.parametrize("daemon", ["pseries", "x86"], indirect=True)
def test_an_ioctl_struct_sent_along_faults_where_the_kernel_would(bins, daemon):
    """The shim sends a copy of the memory an ioctl's pointer names (the
    window), read as the program can read it: a struct that runs into a
    PROT_NONE page, a read-only one the kernel writes its answer to, one in a
    file mapping past the file's end (SIGBUS for the program, EFAULT for the
    kernel) still give EFAULT; one across two pages is read and written whole;
    the program's own SIGBUS handler still runs."""
    proc = daemon.run([str(bins["probe"]), "argwindow", "4" if daemon.machine.platform == "x86" else "0"])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    got = fields(proc.stdout)
    x86 = daemon.machine.platform == "x86"
    assert got["info_straddles_guard"] == "-1,14"
    assert got["info_readonly"] == "-1,14"
    assert got["info_past_eof"] == "-1,14"
    assert got["info_across_pages"] == "0,0" and got["info_filled"] == "1"
    assert got["map"] == "0,0"
    # Type1 unmaps, then fails to write the size back; sPAPR writes nothing back.
    assert got["unmap_readonly"] == ("-1,14" if x86 else "0,0")
    assert got["unmap_again"] == "0,0"
    assert got["unmap_again_size"] == ("0" if x86 else "4096")
    assert got["own_sigbus"] == "1"
    assert daemon.wait_idle()
    assert daemon.machine.pinned_pages() == 0


@pytest.mark.parametrize("preset,group,kind,second", [
    ("x86", 4, 1, "-1,12"),            # Type1: vaddr_get_pfns() -> ENOMEM
    ("pseries", 0, 2, "-1,14"),        # sPAPR v1: tce_iommu_use_page() -> EFAULT
    ("pseries", 0, 3, "4096,0"),       # sPAPR v2: mm_iommu_do_alloc() -> the pages it pinned (deviations.md 3e)
])
def test_a_real_program_pinning_past_the_machines_ram_fails_as_in_process(bins, tmp_path, preset, group, kind,
                                                                          second):
    """Pins by a real process cost the machine's RAM from their first pin to
    their last (what the simulation can charge: the host gave the pages), so a
    program that pins 2 x 48 MiB on a 64 MiB machine fails at the second as
    the in-process API does (tests/test_ram.py), and gets it once the first
    is given back."""
    import dataclasses
    from importlib import resources

    from vfiosim.machine import PRESETS
    from vfiosim.machine_spec import load_spec_text
    text = resources.files("vfiosim.presets").joinpath(PRESETS[preset]).read_text()
    m = vfiosim.Machine(dataclasses.replace(load_spec_text(text, preset), ram=64 << 20))
    d = ThreadedDaemon(m, tmp_path)
    try:
        proc = d.run([str(bins["probe"]), "rampin", str(group), str(kind), "48"])
        assert proc.returncode == 0, proc.stdout + proc.stderr
        got = fields(proc.stdout)
        assert got["first"] == "0,0"
        assert got["second"] == second
        assert got["release"] == "0,0"
        if kind != 3:                  # (a v2 region that registered short stays as upstream leaves it)
            assert got["again"] == "0,0"
        assert any("deviations.md 12" in line for line in m.dmesg()), m.dmesg()
        assert d.wait_idle()
        assert m.pinned_pages() == 0 and m.kernel.phys.used_pages == 0
        assert m.meminfo()["MemFree"] == 64 << 10
    finally:
        d.close()


@pytest.mark.parametrize("daemon", ["x86"], indirect=True)
def test_a_real_program_maps_a_bar_for_peer_to_peer_dma(bins, daemon):
    """QEMU maps every BAR for peer-to-peer DMA on x86.  Under run the shim's
    placeholder for a BAR mapping is, to the kernel, the device's VM_PFNMAP
    mapping (as in-process: tests/test_peer_to_peer.py): MAP_DMA of it takes
    the follow_fault_pfn() path, nothing pinned or charged, and another
    device's DMA to that IOVA reaches the BAR."""
    proc = daemon.run([str(bins["probe"]), "p2p"])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    got = fields(proc.stdout)
    assert got["map_bar"] == "0,0" and got["map_ram"] == "0,0"
    assert got["bar_charged_kb"] == "0"
    assert got["a_dma_src"] == "0x1122334455"
    assert got["a_ident_via_b"] == "0x10000ed"
    assert got["unmap_bar"] == "0,0"
    assert daemon.wait_idle()
    assert daemon.machine.pinned_pages() == 0


def test_a_malformed_message_drops_only_its_connection(bins, daemon):
    holder = daemon.popen([str(bins["probe"]), "hold", "0"], stdin=subprocess.PIPE)
    try:
        assert holder.stdout.readline().startswith("ready")
        for garbage in (b"", b"\x00" * 10, P.pack_request(99), P.pack_request(P.OP_OPEN)[:-1] + b"x" * 9000,
                        P.pack_request(P.OP_IOCTL, fd=3)):
            s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            s.settimeout(10)
            s.connect(daemon.sock)
            s.send(garbage if garbage else b"\x01")
            assert s.recv(100) == b""            # dropped, no reply
            s.close()
        assert sum("malformed message" in line for line in daemon.logs) == 5
        # The other program and the machine go on.
        assert holder.poll() is None
        other = daemon.run([str(bins["probe"]), "open", "1"])
        assert fields(other.stdout)["open_group"] == "0,0"
    finally:
        holder.kill()
        holder.wait()


# -- processes ------------------------------------------------------------------------------------------------


def test_a_killed_program_releases_its_group_pins_and_locked_memory(bins, daemon):
    m = daemon.machine
    holder = daemon.popen([str(bins["probe"]), "hold", "0"], stdin=subprocess.PIPE)
    line = holder.stdout.readline()
    assert line.startswith("ready"), line + holder.stderr.read()
    vmlck = int(fields(line)["VmLck"])
    assert vmlck >= 1 << 20                          # v1: the 1 GiB window, and the TCE table
    pid = int(fields(line)["pid"])
    with m._lock:
        assert m.pinned_pages() == 256
        assert m.kernel.tasks[pid].mm.locked_vm * 4 == vmlck
    # A second process cannot open the group the first one holds.
    busy = daemon.run([str(bins["probe"]), "open", "0"])
    assert fields(busy.stdout)["open_group"] == "-1,16"
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    assert daemon.wait_idle()
    with m._lock:
        assert m.pinned_pages() == 0
        assert pid not in m.kernel.tasks
    assert pid in daemon.daemon.exited
    # The group is free again and the machine still serves.
    again = daemon.run([str(bins["probe"]), "open", "0"])
    assert fields(again.stdout) == {"open_group": "0,0", "VmLck": "0"}
    assert not m.oopses


def test_fork_shares_files_and_exec_closes_the_close_on_exec_ones(bins, daemon):
    proc = daemon.run([str(bins["probe"]), "fork", "0"])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    f = fields(proc.stdout)
    assert f["parent_api"] == f["child_api"] == "0,0"
    assert f["child_group_status"] == "0,0"          # inherited across fork
    assert f["exec_container_api"] == "0,0"          # kept across exec
    assert f["exec_dup_api"] == "0,0"
    assert f["exec_group_status"] == "-1,9"          # O_CLOEXEC: closed by exec
    assert f["container_is_chr"] == "1" and f["rdev"] == "10:196"
    assert f["child_exit"] == "0"
    assert f["parent_group_status"] == "0,0"         # the parent's group is untouched
    assert daemon.wait_idle()
    assert not daemon.machine.kernel.tasks


@pytest.mark.parametrize("daemon", ["x86"], indirect=True)
def test_memlock_limit_and_cap_ipc_lock_changed_with_raw_syscalls_rule_the_next_map(bins, daemon):
    """Task.limits_same (native.LimitsCheck): Type1's MAP_DMA reads only CAP_IPC_LOCK and
    RLIMIT_MEMLOCK again (not the ids), and still sees every change the shim
    never saw (syscall(2), no libc wrapper)."""
    proc = daemon.run([str(bins["probe"]), "rawlimit", "4"])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    f = fields(proc.stdout)
    assert f["raw_small"] == "0,0"
    assert f["map_root_small"] == "0,0"            # CAP_IPC_LOCK: the limit does not apply
    assert f["raw_setresuid"] == "0,0"
    assert f["map_small"] == "-1,12"               # 8 pages over a 4-page limit, without the capability
    assert f["raw_big"] == "0,0"
    assert f["map_big"] == "0,0"
    assert f["raw_small_again"] == "0,0"
    assert f["map_small_again"] == "-1,12"


@pytest.mark.parametrize("daemon", ["x86"], indirect=True)
def test_a_child_forked_without_libc_makes_its_own_connection(bins, daemon):
    """The shim tells such a child from its parent by a MADV_WIPEONFORK page
    (no getpid() on every call): the child's MAP_DMA of memory it mapped
    after the fork reads its own memory, through a connection of its own."""
    proc = daemon.run([str(bins["probe"]), "rawfork", "4"])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    f = fields(proc.stdout)
    assert f["parent_api"] == "0,0"                  # VFIO_API_VERSION
    assert f["child_map"] == "0,0"
    assert f["child_status"] == "0"
    assert f["parent_api_after"] == "0,0"


def test_credentials_and_memlock_limit_are_the_processs_own_at_each_call(bins, daemon):
    proc = daemon.run([str(bins["probe"]), "rlimit", "0"])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = proc.stdout.splitlines()
    f = fields(proc.stdout)
    assert f["register_as_root"] == "0,0"
    assert f["register_root_small_limit"] == "0,0"   # CAP_IPC_LOCK: no limit
    assert f["setresuid"] == "0,0"
    assert f["register_small_limit"] == "-1,12"      # uid 65534, 512 KiB limit: ENOMEM
    assert f["setrlimit_raise_soft"] == "0,0"
    assert f["register_big_limit"] == "0,0"
    assert [line for line in lines if line.startswith("VmLck=")] == ["VmLck=1024", "VmLck=0", "VmLck=1024"]
    assert f["pid_status_VmLck"] == "1024"           # /proc/<own pid>/status too


def test_a_python_program_forks_and_both_processes_use_the_machine(daemon):
    code = r"""
import os, fcntl
VFIO_GET_API_VERSION = (ord(";") << 8) | 100
c = os.open("/dev/vfio/vfio", os.O_RDWR)
pid = os.fork()
if pid == 0:
    print("child", fcntl.ioctl(c, VFIO_GET_API_VERSION), flush=True)
    os._exit(0)
os.waitpid(pid, 0)
print("parent", fcntl.ioctl(c, VFIO_GET_API_VERSION), flush=True)
os.close(c)
try:
    fcntl.ioctl(c, VFIO_GET_API_VERSION)
except OSError as e:
    print("closed", e.errno)
"""
    proc = daemon.run([sys.executable, "-c", code])
    assert proc.stdout.split("\n")[:3] == ["child 0", "parent 0", "closed 9"], proc.stderr


# -- paths -----------------------------------------------------------------------------------------------------------


def test_sysfs_and_dev_vfio_look_as_linux_has_them(daemon, tmp_path):
    (tmp_path / "plain.txt").write_text("a plain file")
    code = r"""
import os, stat, json, sys
out = {}
out["dev_vfio"] = sorted(os.listdir("/dev/vfio"))
st = os.stat("/dev/vfio/0")
out["group_chr"] = stat.S_ISCHR(st.st_mode)
out["group_rdev_minor"] = os.minor(st.st_rdev)
out["container_rdev"] = [os.major(os.stat("/dev/vfio/vfio").st_rdev), os.minor(os.stat("/dev/vfio/vfio").st_rdev)]
out["groups"] = sorted(os.listdir("/sys/kernel/iommu_groups"))
out["group0_devices"] = os.listdir("/sys/kernel/iommu_groups/0/devices")
bdf = out["group0_devices"][0]
d = f"/sys/bus/pci/devices/{bdf}"
out["in_bus_listing"] = bdf in os.listdir("/sys/bus/pci/devices")
out["ids"] = [open(f"{d}/{n}").read().strip() for n in ("vendor", "device", "class")]
out["iommu_group"] = os.path.basename(os.readlink(f"{d}/iommu_group"))
out["driver"] = os.path.basename(os.readlink(f"{d}/driver"))
out["realpath"] = os.path.realpath(d)
cfg = open(f"{d}/config", "rb").read()
out["config_ids"] = cfg[:4].hex()
out["resource0"] = open(f"{d}/resource").readline().split()
out["exists"] = [os.path.exists(p) for p in ("/dev/vfio/vfio", "/dev/vfio/0", "/dev/vfio/9", d + "/vendor")]
out["passthrough"] = open(sys.argv[1]).read()
out["vfio_pci_bound"] = sorted(x for x in os.listdir("/sys/bus/pci/drivers/vfio-pci") if ":" in x)
print(json.dumps(out))
"""
    proc = daemon.run([sys.executable, "-c", code, str(tmp_path / "plain.txt")])
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["dev_vfio"] == ["0", "1", "vfio"]
    assert out["group_chr"] is True and out["group_rdev_minor"] == 0
    assert out["container_rdev"] == [10, 196]
    assert out["groups"] == ["0", "1"]
    assert out["group0_devices"] == ["0000:00:00.0"]
    assert out["in_bus_listing"] is True
    assert out["ids"] == ["0x1234", "0x11e8", "0x00ff00"]
    assert out["iommu_group"] == "0" and out["driver"] == "vfio-pci"
    assert out["realpath"] == "/sys/devices/pci0000:00/0000:00:00.0"
    assert out["config_ids"] == "3412e811"
    start, end, flags = (int(x, 16) for x in out["resource0"])
    assert end - start + 1 == 1 << 20 and flags & 0x200
    assert out["exists"] == [True, True, False, True]
    assert out["passthrough"] == "a plain file"
    assert out["vfio_pci_bound"] == ["0000:00:00.0", "0001:00:00.0"]


def test_proc_self_status_shows_the_simulated_accounting_and_everything_else_is_real(daemon):
    code = r"""
import os, fcntl, ctypes, mmap
c = os.open("/dev/vfio/vfio", os.O_RDWR)
g = os.open("/dev/vfio/0", os.O_RDWR)
fcntl.ioctl(g, (ord(";") << 8) | 104, ctypes.c_int32(c))
fcntl.ioctl(c, (ord(";") << 8) | 102, 2)
fcntl.ioctl(c, (ord(";") << 8) | 115)
status = open("/proc/self/status").read()
real = open(f"/proc/{os.getpid()}/stat").read()
vmlck = [l for l in status.splitlines() if l.startswith("VmLck:")][0]
print(vmlck.split()[1], "Pid:\t%d" % os.getpid() in status, real.split()[0] == str(os.getpid()))
"""
    proc = daemon.run([sys.executable, "-c", code])
    assert proc.stdout.split() == [str(1 << 20), "True", "True"], proc.stderr


def test_bar0_through_the_python_mmap_module_reaches_the_device(daemon):
    code = r"""
import os, fcntl, ctypes, mmap
IO = lambda n: (ord(";") << 8) | (100 + n)
c = os.open("/dev/vfio/vfio", os.O_RDWR)
g = os.open("/dev/vfio/0", os.O_RDWR)
fcntl.ioctl(g, IO(4), ctypes.c_int32(c))
fcntl.ioctl(c, IO(2), 2)
libc = ctypes.CDLL(None, use_errno=True)
d = libc.ioctl(g, ctypes.c_ulong(IO(6)), ctypes.c_char_p(b"0000:00:00.0"))
bar = mmap.mmap(d, 1 << 20, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE, offset=0)
r32 = memoryview(bar).cast("I")
r32[1] = 0x12345678                      # liveness: reads back inverted
print(hex(r32[0]), hex(r32[1]))
r32[2] = 5                               # factorial
print(r32[2])
try:
    mmap.mmap(d, 1 << 20, mmap.MAP_PRIVATE, mmap.PROT_READ, offset=0)
except OSError as e:
    print("private", e.errno)
try:
    mmap.mmap(d, 4096, mmap.MAP_SHARED, mmap.PROT_READ, offset=7 << 40)
except OSError as e:
    print("config", e.errno)
"""
    proc = daemon.run([sys.executable, "-c", code])
    assert proc.stdout.split("\n")[:4] == ["0x10000ed 0xedcba987", "120", "private 22", "config 22"], proc.stderr


# -- sharing one machine; the daemon going away ------------------------------------------------------------------


def _serve(tmp_path: Path, machine: str = "pseries") -> tuple[subprocess.Popen, str]:
    sock = str(tmp_path / "m.sock")
    server = subprocess.Popen([*CLI, "serve", "--machine", machine, "--socket", sock],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert "serving" in server.stdout.readline()
    return server, sock


def test_several_programs_share_one_served_machine(bins, tmp_path):
    server, sock = _serve(tmp_path)
    try:
        holder = subprocess.Popen([*CLI, "run", "--connect", sock, "--", str(bins["probe"]), "hold", "0"],
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert holder.stdout.readline().startswith("ready")
        busy = vfiosim_run("--connect", sock, "--", str(bins["probe"]), "open", "0")
        assert fields(busy.stdout)["open_group"] == "-1,16"
        other = vfiosim_run("--connect", sock, "--", str(bins["probe"]), "open", "1")
        assert fields(other.stdout)["open_group"] == "0,0"
        holder.kill()
        holder.wait()
        for _ in range(200):
            again = vfiosim_run("--connect", sock, "--", str(bins["probe"]), "open", "0")
            if fields(again.stdout)["open_group"] == "0,0":
                break
            time.sleep(0.05)
        assert fields(again.stdout) == {"open_group": "0,0", "VmLck": "0"}
    finally:
        server.send_signal(signal.SIGTERM)
        assert server.wait(10) == 0
    assert not os.path.exists(sock)


def test_when_the_daemon_dies_the_program_sees_eio_not_a_hang(bins, tmp_path):
    server, sock = _serve(tmp_path)
    prog = subprocess.Popen([*CLI, "run", "--connect", sock, "--", str(bins["probe"]), "eio"],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert prog.stdout.readline() == "api_before=0,0\n"
        assert prog.stdout.readline() == "ready\n"
        server.kill()
        server.wait()
        prog.stdin.write("go\n")
        prog.stdin.flush()
        out, _ = prog.communicate(timeout=30)
        assert fields(out) == {"api_after": "-1,5", "open_after": "-1,5", "close_after": "0,0"}
    finally:
        prog.kill()
        server.kill()


def test_run_connect_without_a_daemon_fails_cleanly(tmp_path):
    proc = vfiosim_run("--connect", str(tmp_path / "nothing.sock"), "--", "true")
    assert proc.returncode == 1 and "no vfiosim daemon" in proc.stderr


def test_a_program_without_vfio_runs_untouched():
    proc = vfiosim_run("--", "sh", "-c", "echo hello; ls /dev/vfio; cat /sys/kernel/iommu_groups/0/type")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["hello", "0", "1", "vfio", "DMA"]


def test_the_fds_handed_out_behave_as_vfio_fds_for_fcntl_poll_and_epoll(daemon):
    code = r"""
import os, fcntl, select, errno
c = os.open("/dev/vfio/vfio", os.O_RDONLY | os.O_NONBLOCK)
fl = fcntl.fcntl(c, fcntl.F_GETFL)
print(fl & os.O_ACCMODE == os.O_RDONLY, bool(fl & os.O_NONBLOCK), bool(fcntl.fcntl(c, fcntl.F_GETFD)))  # os.open: O_CLOEXEC
p = select.poll()
p.register(c)
print(p.poll(0) == [(c, select.POLLIN | select.POLLOUT)])      # no poll method: DEFAULT_POLLMASK
ep = select.epoll()
try:
    ep.register(c, select.EPOLLIN)
except OSError as e:
    print("epoll", errno.errorcode[e.errno])                      # a file that cannot be polled
d = fcntl.fcntl(c, fcntl.F_DUPFD_CLOEXEC, 50)
print(d, fcntl.ioctl(d, (ord(";") << 8) | 100), bool(fcntl.fcntl(d, fcntl.F_GETFD) & fcntl.FD_CLOEXEC))
os.closerange(3, 4096)                                            # close_range: our connection survives
c = os.open("/dev/vfio/vfio", os.O_RDWR)
print(fcntl.ioctl(c, (ord(";") << 8) | 100))
"""
    proc = daemon.run([sys.executable, "-c", code])
    assert proc.stdout.split("\n")[:5] == ["True True True", "True", "epoll EPERM", "50 0 True", "0"], proc.stderr


def test_children_made_by_subprocess_and_posix_spawn_inherit_the_open_files(daemon):
    code = r"""
import os, sys, subprocess, fcntl
child = "import fcntl, sys; print(fcntl.ioctl(int(sys.argv[1]), (ord(';') << 8) | 100), flush=True)"
c = os.open("/dev/vfio/vfio", os.O_RDWR)
os.set_inheritable(c, True)
r = subprocess.run([sys.executable, "-c", child, str(c)], pass_fds=(c,), capture_output=True, text=True)
print("subprocess", r.stdout.strip(), r.returncode, flush=True)
pid = os.posix_spawn(sys.executable, [sys.executable, "-c", child, str(c)], os.environ)
os.waitpid(pid, 0)
nc = os.open("/dev/vfio/vfio", os.O_RDWR)                     # O_CLOEXEC: not in the child
r = subprocess.run([sys.executable, "-c", child, str(nc)], close_fds=False, capture_output=True, text=True)
print("cloexec", r.returncode != 0 and "Bad file descriptor" in r.stderr, flush=True)
"""
    proc = daemon.run([sys.executable, "-c", code])
    assert proc.stdout.split("\n")[:3] == ["subprocess 0 0", "0", "cloexec True"], proc.stdout + proc.stderr
    assert daemon.wait_idle()


def test_random_calls_with_garbage_arguments_never_break_the_daemon(daemon):
    """A Python program throws seeded random ioctls, reads, writes, mmaps and dups at
    every kind of VFIO fd; every call must fail or succeed with an errno, never hang,
    and the machine must end with no pins and no internal errors (conftest checks)."""
    code = r"""
import ctypes, os, random, errno, mmap
libc = ctypes.CDLL(None, use_errno=True)
libc.ioctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p]
libc.mmap.restype = ctypes.c_void_p
libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
rng = random.Random(1234)
IO = lambda n: (ord(";") << 8) | (100 + n)
c = os.open("/dev/vfio/vfio", os.O_RDWR)
g = os.open("/dev/vfio/0", os.O_RDWR)
libc.ioctl(g, IO(4), ctypes.byref(ctypes.c_int32(c)))
libc.ioctl(c, IO(2), 7)
d = libc.ioctl(g, IO(6), b"0000:00:00.0")
efd = os.eventfd(0)
mem = mmap.mmap(-1, 2 << 20)
base = ctypes.addressof(ctypes.c_char.from_buffer(mem))
libc.mprotect(ctypes.c_void_p(base + (1 << 20)), 1 << 20, 0)     # a guard: pointers may straddle into it
fds = [c, g, d, efd, 0, 99, -1]
errs = set()
for i in range(3000):
    buf = ctypes.create_string_buffer(bytes(rng.getrandbits(8) for _ in range(64)) + bytes(8192))
    struct_at = ctypes.addressof(buf)
    ctypes.memmove(struct_at, (ctypes.c_uint32 * 1)(rng.choice([0, 4, 8, 16, 24, 32, 40, 64, 1 << 31])), 4)
    ptr = rng.choice([0, 8, struct_at, struct_at + 60, base, base + (1 << 20) - 4, 1 << 47, (1 << 64) - 8])
    fd = rng.choice(fds)
    what = rng.random()
    if what < 0.7:
        cmd = IO(rng.randrange(0, 26)) if rng.random() < 0.9 else rng.getrandbits(32)
        arg = ptr if rng.random() < 0.7 else rng.getrandbits(rng.choice([3, 16, 32, 64]))
        r = libc.ioctl(fd, cmd, arg)
    elif what < 0.8:
        # (the program's own buffers are big enough, or the pointer is bad: the kernel would
        # overrun a short buffer just the same)
        ptr = rng.choice([0, 8, base, base + (1 << 20) - 4, 1 << 47])
        r = libc.pread(fd, ctypes.c_void_p(ptr), ctypes.c_size_t(rng.choice([0, 1, 2, 4, 8, 4096, 1 << 30])),
                       ctypes.c_long(rng.choice([0, 4, 7 << 40, (7 << 40) + 255, 1 << 40, -1, 9 << 40])))
    elif what < 0.9:
        r = libc.pwrite(fd, ctypes.c_void_p(ptr), ctypes.c_size_t(rng.choice([0, 1, 2, 4, 8, 4096])),
                        ctypes.c_long(rng.choice([0, 4, 0x98, 7 << 40, (7 << 40) + 4, 1 << 40, -5])))
    elif what < 0.95:
        p = libc.mmap(None, rng.choice([4096, 1 << 20, 2 << 20]), 3, rng.choice([1, 2]), fd,
                      rng.choice([0, 4096, 7 << 40, 1 << 40]))
        r = -1 if p in (None, ctypes.c_void_p(-1).value) else 0
    else:
        r = libc.dup(fd)
        if r >= 0:
            os.close(r)
    if r < 0:
        errs.add(ctypes.get_errno())
print("done", sorted(errno.errorcode.get(e, str(e)) for e in errs))
"""
    proc = daemon.run([sys.executable, "-c", code], timeout=240)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.startswith("done ")
    assert not daemon.machine.oopses, daemon.machine.oopses[0]
    assert not any("internal error" in line for line in daemon.logs)
    assert daemon.wait_idle()
    assert daemon.machine.pinned_pages() == 0


def test_threads_make_ioctls_and_bar_accesses_at_once(bins, daemon):
    proc = daemon.run([str(bins["probe"]), "threads", "0", "0000:00:00.0"])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert fields(proc.stdout) == {"thread_errors": "0"}


def test_the_programs_own_sigsegv_handler_still_works_beside_bar_emulation(bins, daemon):
    proc = daemon.run([str(bins["probe"]), "segv", "0", "0000:00:00.0"])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert fields(proc.stdout) == {
        "handled_before": "1", "old_is_ours": "1", "handled_after": "2",
        "liveness": "0xeeeeeeee",                  # edu: the inverse of what was stored
        "pwrite_bar": "4,0", "pread_bar": "4,0", "liveness_pread": "0xf0f0f0f0",
        "signed": "0,0,-252645136",                # 2- and 1-byte loads read 0 (QEMU's edu); 4 bytes sign-extend
        "factorial": "24", "handled_unmapped": "3"}


def test_an_instruction_the_shim_cannot_emulate_stops_the_program_with_a_message(daemon, tmp_path):
    src = tmp_path / "rmw.c"
    src.write_text(r"""
#include <fcntl.h>
#include <linux/vfio.h>
#include <stdint.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
int main(void)
{
    int c = open("/dev/vfio/vfio", O_RDWR), g = open("/dev/vfio/0", O_RDWR);
    ioctl(g, VFIO_GROUP_SET_CONTAINER, &c);
    ioctl(c, VFIO_SET_IOMMU, VFIO_SPAPR_TCE_IOMMU);
    int d = ioctl(g, VFIO_GROUP_GET_DEVICE_FD, "0000:00:00.0");
    volatile uint32_t *bar = mmap(0, 1 << 20, PROT_READ | PROT_WRITE, MAP_SHARED, d, 0);
    __asm__ volatile("addl $1, (%0)" : : "r"(bar + 1) : "memory");   /* a read-modify-write */
    return 0;
}
""")
    exe = cc(src, tmp_path)
    proc = daemon.run([str(exe)])
    assert proc.returncode == -signal.SIGSEGV
    assert "unsupported instruction" in proc.stderr
    assert daemon.wait_idle()


@pytest.mark.parametrize("daemon", ["pseries", "x86"], indirect=True)
def test_exec_gives_a_new_address_space_that_old_mappings_cannot_reach(bins, daemon):
    """execve(): the container (no O_CLOEXEC) stays open, the address space is
    new.  sPAPR: the container keeps the old mm, so the new image's MAP_DMA is
    EPERM (tce_iommu_ioctl: container->mm != current->mm); Type1 maps into the
    new mm.  The old image's pinned pages stay mapped at IOVA 0: a device's DMA
    there must not reach the new image's memory, even at the same address."""
    m = daemon.machine
    gid, bdfs = next((g, b) for g, b in m.iommu_groups().items() if f"/dev/vfio/{g}" in m.kernel.dev_nodes)
    proc = daemon.popen([str(bins["probe"]), "execmap", str(gid)], stdin=subprocess.PIPE)
    seen = {}
    for line in proc.stdout:
        seen.update(fields(line))
        if "ready" in seen:
            break
    assert seen.get("ready") == "1", (seen, proc.stderr.read() if proc.poll() is not None else "")
    spapr = m.platform != "x86"
    assert int(seen["VmLck"]) > 0 and seen["exec_VmLck"] == "0"      # the new image has charged nothing
    assert seen["exec_check_extension"] == ("1,0" if spapr else "0,0")
    assert seen["exec_same_address"] == "1"
    dev = m.device(bdfs[0])
    with m._lock:
        dev.config.data[4] |= 0x4                                      # bus master
        if spapr:
            assert seen["exec_map"] == "-1,1"                          # EPERM
        else:
            assert seen["exec_map"] == "0,0"
            assert int(seen["exec_map_VmLck"]) == 1024                 # 1 MiB charged to the new mm
            assert dev.bus_master.dma_read(1 << 20, 4) == b"\x22" * 4  # the new mapping reaches new memory
        dev.bus_master.dma_write(0, b"\xee" * 4096)                    # through the old image's mapping
        assert dev.bus_master.dma_read(0, 4096) == b"\xee" * 4096      # lands in the orphaned pages
        assert any("exec()ed with 256 of its pages still pinned" in line for line in m.dmesg())
    out, err = proc.communicate("go\n", timeout=30)
    assert proc.returncode == 0, err
    assert fields(out)["exec_buffer_untouched"] == "1"
    assert daemon.wait_idle()
    with m._lock:
        assert m.pinned_pages() == 0
    assert not m.oopses
