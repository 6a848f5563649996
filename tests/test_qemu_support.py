"""What QEMU needed from `vfiosim run` (the shim's _FORTIFY_SOURCE entry points), QEMU
realizing the edu under `vfiosim run` without booting a guest (about a second each;
skipped with the reason when qemu-system-ppc64 is missing), and the pieces behind
`vfiosim qemu-demo` that need no QEMU at all."""

from __future__ import annotations

import errno
import gzip
import io
import json
import lzma
import shutil
import stat
import subprocess
import textwrap
from pathlib import Path

import pytest

import vfiosim
from vfiosim.cli import main as cli_main
from vfiosim.qemu import demo as D
from vfiosim.qemu import image as I

from runutil import ThreadedDaemon


# -- the shim: fortified libc calls (QEMU is built with _FORTIFY_SOURCE) ------------------------------------

FORTIFIED = r"""
#include <fcntl.h>
#include <limits.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <unistd.h>
#include <linux/vfio.h>

int main(int argc, char **argv)
{
    /* Sizes the compiler cannot prove safe, as in QEMU (len is a parameter there):
       only then does it call the checked _chk entry points. */
    size_t four = (size_t)argc * 4, one = (size_t)argc;
    char real[PATH_MAX], link[64];
    /* __realpath_chk: the device's sysfs directory is in the fake tree */
    if (!realpath("/sys/bus/pci/devices/0000:01:00.0", real)) { perror("realpath"); return 1; }
    /* __readlink_chk: its IOMMU group */
    ssize_t n = readlink("/sys/bus/pci/devices/0000:01:00.0/iommu_group", link, sizeof link - one);
    if (n < 0) { perror("readlink"); return 1; }
    link[n] = 0;
    int container = open("/dev/vfio/vfio", O_RDWR);
    int group = open("/dev/vfio/0", O_RDWR);
    if (container < 0 || group < 0 || ioctl(group, VFIO_GROUP_SET_CONTAINER, &container) ||
        ioctl(container, VFIO_SET_IOMMU, VFIO_SPAPR_TCE_IOMMU)) { perror("setup"); return 1; }
    int device = ioctl(group, VFIO_GROUP_GET_DEVICE_FD, "0000:01:00.0");
    if (device < 0) { perror("device"); return 1; }
    /* __pread64_chk: a config register into a variable of known size, as QEMU's
       vfio_pci_read_config() does */
    uint32_t id = 0;
    off_t cfg = (off_t)VFIO_PCI_CONFIG_REGION_INDEX << 40;
    if (pread(device, &id, four, cfg) != sizeof id) { perror("pread"); return 1; }
    uint8_t pin = 0;
    if (pread(device, &pin, one, cfg + 0x3d) != 1) { perror("pread pin"); return 1; }
    /* __read_chk: read() on the device fd is BAR0 at offset 0 (the id register) */
    uint32_t ident = 0;
    if (read(device, &ident, four) != sizeof ident) { perror("read"); return 1; }
    (void)argv;
    printf("%s %s %08x %u %08x\n", real, strrchr(link, '/') + 1, id, pin, ident);
    return 0;
}
"""


@pytest.fixture
def fortified(tmp_path) -> Path:
    compiler = shutil.which("cc") or shutil.which("gcc")
    assert compiler
    src = tmp_path / "fortified.c"
    src.write_text(FORTIFIED)
    exe = tmp_path / "fortified"
    subprocess.run([compiler, "-O2", "-D_FORTIFY_SOURCE=2", "-D_FILE_OFFSET_BITS=64", "-Wall", "-o", str(exe), str(src)], check=True)
    syms = subprocess.run(["nm", "-D", "--undefined-only", str(exe)], capture_output=True, text=True).stdout
    # The test is only a test if the compiler did fortify these calls.
    for name in ("__pread64_chk", "__read_chk", "__realpath_chk", "__readlink_chk"):
        assert name in syms, f"{name} not used by the fortified build:\n{syms}"
    return exe


def test_fortified_reads_realpath_and_readlink_reach_the_simulated_machine(fortified, tmp_path):
    m = vfiosim.Machine.default()
    d = ThreadedDaemon(m, tmp_path, trace=str(tmp_path / "t.jsonl"))
    try:
        r = d.run([str(fortified)])
    finally:
        d.wait_idle()
        d.close()
    assert r.returncode == 0, r.stderr
    real, group, cfg_id, pin, ident = r.stdout.split()
    assert real == "/sys/devices/pci0000:01/0000:01:00.0"
    assert group == "0"
    assert cfg_id == "11e81234"                       # vendor 1234, device 11e8
    assert int(pin) == 1                              # INTA, what QEMU reads before enabling INTx
    assert ident == "010000ed"                        # edu's identification register
    calls = [json.loads(line) for line in open(tmp_path / "t.jsonl")][1:]
    reads = [c for c in calls if c["call"] == "read"]
    assert [(c["count"], c.get("offset", 0) & 0xFF) for c in reads] == [(4, 0), (1, 0x3D), (4, 0)]


# -- the image builder --------------------------------------------------------------------------------------

def _read_cpio(data: bytes) -> dict[str, tuple[int, bytes]]:
    out, at = {}, 0
    while True:
        assert data[at:at + 6] == b"070701"
        f = [int(data[at + 6 + 8 * i:at + 14 + 8 * i], 16) for i in range(13)]
        mode, size, namesize = f[1], f[6], f[11]
        name = data[at + 110:at + 110 + namesize - 1].decode()
        at += 110 + namesize
        at += -at % 4
        body = data[at:at + size]
        at += size
        at += -at % 4
        if name == "TRAILER!!!":
            return out
        out[name] = (mode, body)


def test_the_initramfs_is_a_newc_archive_the_kernel_can_unpack():
    c = I.Cpio()
    c.dir("bin")
    c.file("bin/busybox", b"\x7fELF" + bytes(5), 0o755)
    c.symlink("bin/sh", "busybox")
    c.chardev("dev/console", 5, 1)
    c.file("init", b"#!/bin/sh\n", 0o755)
    data = c.finish()
    assert len(data) % 512 == 0
    entries = _read_cpio(data)
    assert stat.S_ISDIR(entries["bin"][0])
    assert entries["bin/busybox"] == (stat.S_IFREG | 0o755, b"\x7fELF" + bytes(5))
    assert stat.S_ISLNK(entries["bin/sh"][0]) and entries["bin/sh"][1] == b"busybox"
    assert stat.S_ISCHR(entries["dev/console"][0])
    assert entries["init"][1] == b"#!/bin/sh\n"


def _module(path: Path, depends: str, compress: str = "") -> Path:
    body = b"\x7fELF..." + b"\0license=GPL\0depends=" + depends.encode() + b"\0name=x\0"
    if compress == "xz":
        path = path.with_name(path.name + ".xz")
        path.write_bytes(lzma.compress(body, format=lzma.FORMAT_XZ))
    elif compress == "gz":
        path = path.with_name(path.name + ".gz")
        path.write_bytes(gzip.compress(body))
    else:
        path.write_bytes(body)
    return path


def test_modules_load_dependencies_first_compressed_or_not(tmp_path):
    mods = {
        "vfio": _module(tmp_path / "vfio.ko", "", "xz"),
        "vfio_spapr_eeh": _module(tmp_path / "vfio_spapr_eeh.ko", ""),
        "vfio_iommu_spapr_tce": _module(tmp_path / "vfio_iommu_spapr_tce.ko", "vfio,vfio_spapr_eeh"),
        "vfio_pci_core": _module(tmp_path / "vfio-pci-core.ko", "vfio,vfio_virqfd", "gz"),
        "vfio_pci": _module(tmp_path / "vfio-pci.ko", "vfio-pci-core,vfio", "xz"),
    }
    index = {I.module_name(p): p for p in mods.values()}
    assert set(index) == set(mods)
    assert I.modinfo_depends(I.module_bytes(mods["vfio_pci"])) == ["vfio-pci-core", "vfio"]
    order = [I.module_name(p) for p in I.module_load_order(index, {"vfio_virqfd"}, I.MODULE_TARGETS)]
    assert order == ["vfio", "vfio_spapr_eeh", "vfio_iommu_spapr_tce", "vfio_pci_core", "vfio_pci"]
    with pytest.raises(I.QemuDemoUnavailable, match="vfio_virqfd"):
        I.module_load_order(index, set(), I.MODULE_TARGETS)


def test_the_guest_packages_come_from_the_hosts_own_debian_archive(tmp_path):
    (tmp_path / "sources.list.d").mkdir()
    (tmp_path / "sources.list.d" / "debian.sources").write_text(textwrap.dedent("""\
        Types: deb
        URIs: http://archive.example/debian
        Suites: bookworm bookworm-updates
        Components: main
        Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

        Types: deb
        URIs: http://archive.example/debian-security
        Suites: bookworm-security
        Components: main

        Types: deb-src
        URIs: http://src.example/debian
        Suites: bookworm
        Components: main
        """))
    (tmp_path / "sources.list").write_text(
        "# a comment\n"
        "deb [arch=amd64 signed-by=/k.gpg] http://other.example/debian bookworm main contrib\n"
        "deb http://third.example/debian trixie main\n")
    assert I.system_archives("bookworm", str(tmp_path)) == [
        ("http://archive.example/debian", "/usr/share/keyrings/debian-archive-keyring.gpg"),
        ("http://other.example/debian", "/k.gpg"),
    ]
    assert I.system_archives("sid", str(tmp_path)) == []


# -- reading the run's records ------------------------------------------------------------------------------

def test_qemus_trace_of_tce_hypercalls_is_counted_per_call_and_per_tce(tmp_path):
    log = tmp_path / "qemu.log"
    log.write_text(textwrap.dedent("""\
        spapr_iommu_pci_stuff liobn=0x80000000 ioba=0x0 tcevalue=0x0 npages=512 ret=0
        1234@1700000000.000001:spapr_iommu_pci_stuff liobn=0x80000000 ioba=0x200000 tcevalue=0x0 npages=100 ret=0
        spapr_iommu_pci_get liobn=0x80000000 ioba=0x100000 ret=0 tce=0x0
        spapr_iommu_pci_put liobn=0x80000000 ioba=0x100000 tce=0x1f496003 ret=0
        spapr_iommu_pci_indirect liobn=0x80000000 ioba=0x0 tcelist=0x1000 iobaN=0x1f tceN=0x3 ret=0
        spapr_iommu_pci_indirect liobn=0x80000000 ioba=0x0 tcelist=0x1000 iobaN=0x0 tceN=0x3 ret=-4
        spapr_iommu_ddw_reset buid=0x800000020000000 addr=0x0
        vfio_spapr_create_window pageshift=0xc levels=1 winsize=0x10000000 offset=0x0
        """))
    h = D.parse_qemu_trace(str(log))
    assert (h.put, h.get) == (1, 1)
    assert (h.stuff_calls, h.stuff_tces) == (2, 612)
    assert (h.indirect_calls, h.indirect_tces) == (2, 32)
    assert (h.calls, h.tces) == (5, 645)
    assert h.ddw == {"reset": 1}


def _rec(**kw):
    base = {"time": 0.0, "pid": 1, "ret": 0, "errno": 0, "err": ""}
    base.update(kw)
    return json.dumps(base)


def test_the_host_trace_is_condensed_into_runs_and_counted(tmp_path):
    page = {"argsz": 24, "flags": 0, "size": 4096}
    lines = [
        _rec(call="open", path="/dev/vfio/vfio", ret=3),
        _rec(call="ioctl", cmd="VFIO_IOMMU_SPAPR_REGISTER_MEMORY",
             args={"argsz": 24, "flags": 0, "vaddr": 0x7F0000000000, "size": 0x20000000}),
        _rec(call="ioctl", cmd="VFIO_IOMMU_SPAPR_TCE_CREATE",
             args={"argsz": 40, "flags": 0, "page_shift": 12, "window_size": 0x10000000, "levels": 1,
                   "start_addr": 0}),
        *[_rec(call="ioctl", cmd="VFIO_IOMMU_UNMAP_DMA", args={**page, "iova": i * 4096}) for i in range(3)],
        *[_rec(call="ioctl", cmd="VFIO_IOMMU_MAP_DMA",
               args={"argsz": 32, "flags": 3, "vaddr": 0x7F0000001000 + i * 4096, "iova": 0x100000 + i * 4096,
                     "size": 4096}) for i in range(2)],
        _rec(call="read", fd=5, count=4, offset=7 << 40),
        _rec(call="write", fd=5, count=4, offset=(7 << 40) + 4),
        _rec(call="mmio", mapping=1, offset=0, size=4, write=False, value=0x10000ED),
        _rec(call="ioctl", cmd="VFIO_IOMMU_UNMAP_DMA", args={"argsz": 24, "flags": 0, "iova": 0, "size": 0x10000000}),
        _rec(call="ioctl", cmd="VFIO_DEVICE_GET_IRQ_INFO", args={"argsz": 16, "flags": 0, "index": 3, "count": 0},
             ret=-1, errno=22, err="EINVAL"),
    ]
    path = tmp_path / "t.jsonl"
    path.write_text("\n".join(lines) + "\n")
    h = D.summarize_trace(str(path))
    assert h.ioctls["VFIO_IOMMU_UNMAP_DMA"] == 4 and h.ioctls["VFIO_IOMMU_MAP_DMA"] == 2
    assert (h.page_maps, h.page_unmaps, h.window_unmaps) == (2, 3, 1)
    assert (h.config_rw, h.mmio) == (2, 1)
    assert h.windows == ["0x0+0x10000000 (4096-byte pages, 1 levels)"]
    assert h.registered == ["0x7f0000000000+0x20000000"]
    assert h.steps[3] == "3 x VFIO_IOMMU_UNMAP_DMA of one 4 KiB page each, iova 0x0..0x3000"
    assert h.steps[4] == "2 x VFIO_IOMMU_MAP_DMA of one 4 KiB page each, iova 0x100000..0x102000"
    assert h.steps[5] == "2 x config space read/write (pread/pwrite)"
    assert len(h.failures) == 1 and "index=3" in h.failures[0] and "EINVAL" in h.failures[0]


def test_trace_summary_prints_the_condensed_conversation(tmp_path, capsys):
    path = tmp_path / "t.jsonl"
    path.write_text("\n".join([
        _rec(call="open", path="/dev/vfio/vfio", ret=3),
        *[_rec(call="ioctl", cmd="VFIO_IOMMU_UNMAP_DMA", args={"argsz": 24, "flags": 0, "iova": i * 4096,
                                                               "size": 4096}) for i in range(5)],
    ]) + "\n")
    assert cli_main(["trace", "summary", str(path)]) == 0
    out = capsys.readouterr().out
    assert "open /dev/vfio/vfio" in out
    assert "5 x VFIO_IOMMU_UNMAP_DMA of one 4 KiB page each, iova 0x0..0x5000" in out
    assert "        5  VFIO_IOMMU_UNMAP_DMA" in out
    assert cli_main(["trace", "summary", str(tmp_path / "missing.jsonl")]) == 1


def test_the_qemu_command_line_passes_the_host_edu_through_to_a_pseries_guest(tmp_path):
    img = I.GuestImage(tmp_path / "vmlinux", tmp_path / "initrd", "k.deb", "b.deb", ["vfio.ko"], "6.12")
    argv = D.qemu_argv("/usr/bin/qemu-system-ppc64", img, "/c.log", "/q.log")
    joined = " ".join(argv)
    assert argv[argv.index("-device") + 1] == "vfio-pci,host=0000:01:00.0"
    assert argv[argv.index("-M") + 1].startswith("pseries")
    assert "dma_win_size" not in joined          # the PHB keeps QEMU's default DMA window (issue 13)
    assert "-trace spapr_iommu_pci_*" in joined and argv[argv.index("-D") + 1] == "/q.log"
    assert argv[argv.index("-kernel") + 1] == str(img.kernel)


def test_qemu_demo_says_why_it_cannot_run_and_exits_3(monkeypatch, capsys):
    def unavailable(**_kw):
        raise I.QemuDemoUnavailable("missing qemu-system-ppc64 (Debian packages: qemu-system-ppc)")
    monkeypatch.setattr(D, "check_prerequisites", unavailable)
    assert cli_main(["qemu-demo", "--no-install"]) == 3
    assert "cannot run here: missing qemu-system-ppc64" in capsys.readouterr().err


def test_for_a_user_other_than_root_the_group_is_theirs_and_memlock_is_checked(monkeypatch):
    import resource
    monkeypatch.setattr(D.os, "geteuid", lambda: 4242)
    monkeypatch.setattr(D.os, "getegid", lambda: 4343)
    m = D.demo_machine()
    node = m.kernel.dev_nodes["/dev/vfio/0"]
    assert (node.uid, node.gid, node.mode & 0o777) == (4242, 4343, 0o600)
    assert m.kernel.dev_nodes["/dev/vfio/1"].uid == 0          # only the demo's group
    # QEMU locks all guest RAM (REGISTER_MEMORY): a hard limit below that is refused
    # up front with the reason, as the simulated kernel would refuse it with ENOMEM.
    monkeypatch.setattr(resource, "getrlimit", lambda _r: (8 << 20, 8 << 20))
    with pytest.raises(I.QemuDemoUnavailable, match="RLIMIT_MEMLOCK allows 8192 KiB"):
        D.check_memlock("512M")
    monkeypatch.setattr(resource, "getrlimit", lambda _r: (8 << 20, resource.RLIM_INFINITY))
    D.check_memlock("512M")


def test_a_guest_kernel_without_the_power_iommu_capability_is_refused_up_front(tmp_path):
    old = tmp_path / "vmlinux-6.1"
    old.write_bytes(b"\x7fELF" + b"\0pnv_tce_iommu_bus_notifier\0" * 100)
    new = tmp_path / "vmlinux-6.12"
    new.write_bytes(b"\x7fELF" + b"\0spapr_tce_iommu_capable\0" + bytes(4096))
    assert not I.kernel_can_run_guest_vfio(old)
    assert I.kernel_can_run_guest_vfio(new)


# -- `vfiosim run -- qemu-system-ppc64`: the device realized and reset, no guest -----------------------------

def _qemu_realize(tmp_path: Path, machine: str = "powernv") -> tuple[subprocess.CompletedProcess[str], list]:
    """`vfiosim run --trace -- qemu-system-ppc64 ... -S` with the edu, quit at once."""
    import os
    import sys
    qemu = shutil.which("qemu-system-ppc64")
    if qemu is None:
        pytest.skip("qemu-system-ppc64 is not installed (Debian package qemu-system-ppc; .ci/run installs it as root)")
    trace = tmp_path / "t.jsonl"
    src = str(Path(vfiosim.__file__).resolve().parent.parent)
    env = dict(os.environ, PYTHONPATH=src + os.pathsep + os.environ.get("PYTHONPATH", ""))
    r = subprocess.run([sys.executable, "-c", "from vfiosim.cli import main; raise SystemExit(main())",
                        "run", "--machine", machine, "--trace", str(trace), "--", qemu, "-M", "pseries",
                        "-accel", "tcg", "-m", "256M", "-display", "none", "-nodefaults", "-monitor", "stdio", "-S",
                        "-device", "vfio-pci,host=0000:01:00.0"],
                       input="quit\n", capture_output=True, text=True, timeout=120, env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    return r, [json.loads(line) for line in open(trace)][1:]          # the records, after the header


def test_qemu_realizes_the_passed_through_edu_under_vfiosim_run(tmp_path):
    """QEMU as a PowerNV host's VFIO user, stopped before the guest runs (-S) and told to
    quit: the whole host-side setup of docs/qemu.md steps 1 and 2, in about a second."""
    _r, calls = _qemu_realize(tmp_path)
    ioctls = [(c["cmd"], c.get("args") or {}, c) for c in calls if c["call"] == "ioctl"]
    names = [n for n, _a, _c in ioctls]
    # The order QEMU's vfio_connect_container() and vfio_realize() follow on an sPAPR host.
    order = ["VFIO_GROUP_GET_STATUS", "VFIO_GROUP_SET_CONTAINER", "VFIO_SET_IOMMU",
             "VFIO_IOMMU_SPAPR_REGISTER_MEMORY", "VFIO_IOMMU_SPAPR_TCE_GET_INFO", "VFIO_IOMMU_SPAPR_TCE_REMOVE",
             "VFIO_GROUP_GET_DEVICE_FD", "VFIO_DEVICE_GET_INFO", "VFIO_DEVICE_RESET",
             "VFIO_IOMMU_SPAPR_TCE_CREATE", "VFIO_EEH_PE_OP"]
    assert [n for n in names if n in order] == order
    args = {n: a for n, a, _c in ioctls}
    assert args["VFIO_SET_IOMMU"]["type"] == 7                                   # VFIO_SPAPR_TCE_v2_IOMMU
    assert args["VFIO_IOMMU_SPAPR_REGISTER_MEMORY"]["size"] == 256 << 20         # all guest RAM
    create = args["VFIO_IOMMU_SPAPR_TCE_CREATE"]
    assert (create["window_size"], create["page_shift"], create["levels"]) == (1 << 30, 12, 2)
    failed = [(n, a.get("index")) for n, a, c in ioctls if c["errno"]]
    assert failed == [("VFIO_DEVICE_GET_IRQ_INFO", 3)]                          # AER: not PCI Express
    # QEMU reads the interrupt pin with a fortified pread (__pread64_chk) before each INTx
    # enable: those reads reached the device (without the shim's wrapper they did not,
    # and QEMU aborted on the pin it computed from the error).
    pin_reads = [c for c in calls if c["call"] == "read" and c.get("offset") == (7 << 40) + 0x3D]
    assert len(pin_reads) >= 2 and all(c["ret"] == 1 for c in pin_reads)


def test_qemu_without_a_reset_method_asks_for_a_hot_reset_and_hears_enodev(tmp_path):
    """A device not alone below a bridge has no reset (DEVICE_GET_INFO without RESET):
    QEMU tries a hot reset instead and, told ENODEV as Linux answers, says so and goes on."""
    text = (Path(vfiosim.__file__).parent / "presets" / "powernv.toml").read_text()
    machine = tmp_path / "no-bus-reset.toml"
    machine.write_text(text.replace("behind_bridge = true", "behind_bridge = false"))
    r, calls = _qemu_realize(tmp_path, str(machine))
    ioctls = [c for c in calls if c["call"] == "ioctl"]
    info = [c for c in ioctls if c["cmd"] == "VFIO_DEVICE_GET_PCI_HOT_RESET_INFO"]
    assert info and all(c["errno"] == errno.ENODEV for c in info)
    assert not [c for c in ioctls if c["cmd"] == "VFIO_DEVICE_RESET"]
    assert "no available reset mechanism" in r.stdout + r.stderr


def test_qemu_demo_refuses_pseries_options_for_the_x86_guest(capsys):
    for opt in (["--dma-api"], ["--no-mmap"], ["--guest-iommu", "v1"]):
        assert cli_main(["qemu-demo", "--platform", "x86", "--no-install", *opt]) == 2
        assert f"{opt[0]}: only with --platform pseries" in capsys.readouterr().err
