"""Posted stores: a store to a declared register does not wait for the device.

Device models declare their registers (``PciDevice.declare_registers``);
under `vfiosim run` a store to one goes into the connection's ring and the
program goes on; the daemon performs it before anything the program asks
for next, and one with side effects (a doorbell, a DMA command) at once:
the store wakes it.  What PCIe promises of posted writes holds: a load after
stores sees them, a side-effecting store runs after the stores before it
(commands in order), an interrupt from a DMA arrives after the data is in
memory.
"""

from __future__ import annotations

import json
import subprocess

import pytest

import vfiosim
from runutil import C_DIR, ThreadedDaemon, cc
from vfiosim.kernel.pci.device import PciDevice, Register
from vfiosim.kernel.pci.edu import EduDevice


@pytest.fixture(scope="module")
def probe(tmp_path_factory):
    return cc(C_DIR / "posted_probe.c", tmp_path_factory.mktemp("posted"), "-pthread")


def fields(text: str) -> dict[str, str]:
    return dict(w.split("=", 1) for line in text.splitlines() for w in line.split() if "=" in w)


def test_posted_stores_keep_pcie_ordering_and_really_are_posted(probe, tmp_path, monkeypatch):
    from vfiosim.transport import daemon as D
    # The daemon's idle wake-up, which performs what is left in a ring, comes
    # later than the probe waits for its interrupt: a side-effecting store must
    # wake the daemon itself.
    monkeypatch.setattr(D, "WAIT_MS", 20_000)
    m = vfiosim.Machine.preset("x86")
    bdf = m.iommu_groups()[4][0]
    trace = tmp_path / "t.jsonl"
    d = ThreadedDaemon(m, tmp_path, trace=str(trace))
    try:
        proc = d.run([str(probe), "4", bdf])
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert d.wait_idle()
    finally:
        d.close()
    f = fields(proc.stdout)
    assert f["liveness"] == hex(~0x12345678 & 0xFFFFFFFF)            # a load sees the store before it
    assert f["dma_regs"] == "0x4444,0x2222,0x3333"                    # ... every one, the last one winning
    assert f["command_done_at_next_load"] == "1"                      # a load sees the command's work
    assert f["back_to_back"] == "1"                                   # each command saw its registers, in order
    assert f["irq_saw_data"] == "1"                                   # the interrupt came, after the data
    assert f["round_trip"] == "1"
    recs = [json.loads(line) for line in trace.read_text().splitlines()]
    stores = [r for r in recs if r.get("call") == "mmio" and r.get("write")]      # (the first line is a header)
    posted = {r["offset"] for r in stores if r.get("posted")}
    waited = {r["offset"] for r in stores if not r.get("posted")}
    assert posted == {0x04, 0x80, 0x88, 0x90, 0x98}, (posted, waited)
    assert waited == set()
    # In the order the program made them: each command after the three stores before it.
    order = [r["offset"] for r in stores]
    assert order[-12:] == [0x80, 0x88, 0x90, 0x98] * 3
    assert all(r["errno"] == 0 for r in stores)


# The start of a C program given edu's BDF on the x86 preset: its device fd `d`
# in a Type1v2 container (group 4).
_X86_EDU_OPEN = r"""#include <fcntl.h>
#include <linux/vfio.h>
#include <stdint.h>
#include <stdio.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <unistd.h>
int main(int argc, char **argv)
{
    int c = open("/dev/vfio/vfio", O_RDWR), g = open("/dev/vfio/4", O_RDWR);
    ioctl(g, VFIO_GROUP_SET_CONTAINER, &c);
    ioctl(c, VFIO_SET_IOMMU, VFIO_TYPE1v2_IOMMU);
    int d = ioctl(g, VFIO_GROUP_GET_DEVICE_FD, argv[1]);
"""


def test_stores_are_not_posted_while_memory_decoding_is_off(tmp_path):
    """With decoding off a store through the mapping faults (SIGBUS), as
    vfio-pci's zapped mapping would: the daemon tells the program not to post."""
    src = tmp_path / "off.c"
    src.write_text(_X86_EDU_OPEN + r"""    volatile uint32_t *bar = mmap(0, 1 << 20, PROT_READ | PROT_WRITE, MAP_SHARED, d, 0);
    bar[1] = 1;                                   /* decoding on (vfio-pci's open enabled it) */
    printf("on=%#x\n", bar[1]);
    fflush(stdout);
    uint16_t cmd = 0;
    pwrite(d, &cmd, 2, ((off_t)VFIO_PCI_CONFIG_REGION_INDEX << 40) + 4);
    bar[1] = 2;                                   /* posted it would be silently lost */
    printf("not reached\n");
    return 0;
}
""")
    exe = cc(src, tmp_path)
    m = vfiosim.Machine.preset("x86")
    d = ThreadedDaemon(m, tmp_path)
    try:
        proc = d.run([str(exe), m.iommu_groups()[4][0]])
        assert d.wait_idle()
    finally:
        d.close()
    assert proc.stdout.splitlines() == [f"on={~1 & 0xFFFFFFFF:#x}"], proc.stdout + proc.stderr
    assert proc.returncode == -7, proc.returncode                           # SIGBUS


def test_a_polled_register_is_loaded_through_its_shortcut_and_faults_while_decoding_is_off(tmp_path):
    """The daemon answers a load of a DMA register through the shortcut edu
    offers (Kernel.mmap_load_fn, kept per mapping); with decoding off the
    shortcut declines and the load faults (SIGBUS), as vfio-pci's zapped
    mapping would, exactly as through mmap_access."""
    src = tmp_path / "load_off.c"
    src.write_text(_X86_EDU_OPEN + r"""    volatile uint8_t *bar = mmap(0, 1 << 20, PROT_READ | PROT_WRITE, MAP_SHARED, d, 0);
    *(volatile uint64_t *)(bar + 0x88) = 0x123456789;
    unsigned long dst = *(volatile uint64_t *)(bar + 0x88);
    unsigned long gap = *(volatile uint32_t *)(bar + 0x84);
    printf("dst=%#lx gap=%#lx\n", dst, gap);
    fflush(stdout);
    uint16_t cmd = 0;
    pwrite(d, &cmd, 2, ((off_t)VFIO_PCI_CONFIG_REGION_INDEX << 40) + 4);
    printf("off=%#lx\n", (unsigned long)*(volatile uint64_t *)(bar + 0x88));
    return 0;
}
""")
    exe = cc(src, tmp_path)
    m = vfiosim.Machine.preset("x86")
    bdf = m.iommu_groups()[4][0]
    k = m.kernel
    offered, general = [], []
    make, access = k.mmap_load_fn, k.mmap_access

    def mmap_load_fn(file, offset, size):
        fn = make(file, offset, size)
        offered.append((offset & 0xFFFFF, size, fn is not None))
        return fn

    def mmap_access(task, file, offset, size, value):
        if value is None:
            general.append((offset & 0xFFFFF, size))
        return access(task, file, offset, size, value)
    k.mmap_load_fn, k.mmap_access = mmap_load_fn, mmap_access
    d = ThreadedDaemon(m, tmp_path)
    try:
        proc = d.run([str(exe), bdf])
        assert d.wait_idle()
    finally:
        d.close()
    assert proc.stdout.splitlines() == ["dst=0x123456789 gap=0xffffffff"], proc.stdout + proc.stderr
    assert proc.returncode == -7, proc.returncode                           # SIGBUS
    assert m.device(bdf).snapshot()["dma_dst"] == 0x123456789
    # Asked once per register and size; none between registers (0x84: all-ones through mmap_access).
    assert offered == [(0x88, 8, True), (0x84, 4, False)]
    assert general == [(0x84, 4), (0x88, 8)]                    # the declined load says how it fails


def test_device_models_declare_which_stores_may_be_posted():
    edu = EduDevice("0000:01:00.0")
    ranges = edu.posted_write_ranges(0)
    assert (0x04, 4) in ranges and (0x80, 8) in ranges and (0x90, 8) in ranges
    assert not any(off <= 0x98 < off + n for off, n in ranges)           # the DMA command acts
    assert not any(off <= 0x60 < off + n or off <= 0x64 < off + n for off, n in ranges)
    assert not any(off <= 0x08 < off + n for off, n in ranges)           # factorial may interrupt
    assert edu.posted_write_ranges(1) == []
    # ... and those are posted too, performed at once (doorbells).
    assert edu.doorbell_ranges(0) == [(0x08, 4), (0x60, 4), (0x64, 4), (0x98, 8)]
    # A model that declares nothing posts nothing; the MSI-X table's address and
    # data words may be posted, never a vector's control word (an unmask sends
    # what is pending).
    dev = PciDevice("0000:02:00.0", vendor=0x1B36, device=0xF3, class_code=0)
    dev.add_bar(0, 0x4000)
    dev.add_msix_capability(4, table_bar=0, table_offset=0x2000, pba_offset=0x3000)
    dev.finish()
    ranges = dev.posted_write_ranges(0)
    assert (0x2000, 12) in ranges and (0x2030, 12) in ranges and (0x3000, 8) in ranges
    assert not any(off <= 0x200C < off + n for off, n in ranges)
    assert not any(off < 0x2000 for off, n in ranges)
    assert dev.doorbell_ranges(0) == [(0x200C, 4), (0x201C, 4), (0x202C, 4), (0x203C, 4)]
    with pytest.raises(ValueError):
        dev.declare_registers(0, Register(0x3FFE, 4))
    with pytest.raises(ValueError):
        dev.declare_registers(3, Register(0, 4))


def test_vfio_pci_gives_the_posted_ranges_of_a_mapping_and_whether_it_decodes():
    m = vfiosim.Machine.preset("x86")
    p = m.spawn()
    from vfioutil import open_device
    c = p.open("/dev/vfio/vfio")
    g = p.open("/dev/vfio/4")
    import ctypes

    from vfiosim import uapi
    p.ioctl(g, uapi.VFIO_GROUP_SET_CONTAINER, ctypes.c_int32(c))
    p.ioctl(c, uapi.VFIO_SET_IOMMU, uapi.VFIO_TYPE1v2_IOMMU)
    dev = open_device(p, g, m.iommu_groups()[4][0])
    k = m.kernel
    file = p.task.files.get(dev)
    assert (0x80, 8, False) in k.mmap_posted_writes(file, 0, 1 << 20)
    assert (0x98, 8, True) in k.mmap_posted_writes(file, 0, 1 << 20)         # a side effect: performed at once
    # A mapping of the BAR's second page has nothing of edu's registers in it.
    assert k.mmap_posted_writes(file, 4096, 4096) == []
    # A mapping starting at 0x1000 is clipped and shifted; one at 0 of 0x84 bytes clips 0x80.
    assert (0x80, 4, False) in k.mmap_posted_writes(file, 0, 0x84)
    assert k.mmap_live(file)
    check = k.mmap_live_check(file)             # what the daemon keeps for a mapping: the same answer
    assert check() is True
    cfg = uapi.VFIO_PCI_CONFIG_REGION_INDEX << 40
    command = p.pread(dev, 2, cfg + 4)
    p.pwrite(dev, b"\0\0", cfg + 4)
    assert not k.mmap_live(file) and check() is False
    p.pwrite(dev, command, cfg + 4)             # decoding on again: the check kept sees it
    assert k.mmap_live(file) and check() is True
    assert not k.mmap_live(p.task.files.get(c))                          # not a device: never
    assert k.mmap_live_check(p.task.files.get(c))() is False
    p.exit()


def test_a_kept_decoding_check_follows_an_eeh_freeze():
    """On POWER a frozen PE stops MMIO: the daemon's kept check says so, as mmap_live() does."""
    m = vfiosim.Machine.preset("powernv")
    p = m.spawn()
    from vfioutil import open_device, setup_v1

    from vfiosim import uapi
    c, g = setup_v1(p)
    dev = open_device(p, g, m.iommu_groups()[0][0])
    k = m.kernel
    file = p.task.files.get(dev)
    cfg = p.pread(dev, 2, (uapi.VFIO_PCI_CONFIG_REGION_INDEX << 40) + 4)
    p.pwrite(dev, bytes([cfg[0] | 2, cfg[1]]), (uapi.VFIO_PCI_CONFIG_REGION_INDEX << 40) + 4)
    check = k.mmap_live_check(file)
    assert k.mmap_live(file) and check()
    pe = file.device.ops.pdev.mmio_enabled_by_platform.__self__       # the device's PE (platform/pe.py)
    pe.eeh.freeze("test")
    assert not k.mmap_live(file) and not check()
    p.exit()


def test_stores_to_the_same_bytes_coalesce_only_between_side_effecting_stores():
    """A register written twice between two commands reaches the device once;
    the value a command saw is never replaced by a later one."""
    from vfiosim.transport.daemon import _coalesce
    src1, dst, cmd1, src2, cmd2, src3 = ((1, 0x80, 8, 0x10, 0), (1, 0x88, 8, 0x20, 0), (1, 0x98, 8, 1, 1),
                                        (1, 0x80, 8, 0x30, 0), (1, 0x98, 8, 3, 1), (1, 0x80, 8, 0x40, 0))
    assert _coalesce([src1, src1, dst, cmd1, src2, cmd2, src3]) == [src1, dst, cmd1, src2, cmd2, src3]
    assert _coalesce([src1, dst, src2, cmd1]) == [dst, src2, cmd1]
    assert _coalesce([cmd1, cmd1]) == [cmd1, cmd1]                      # a command is never dropped


def test_stores_posted_right_before_exit_reach_the_device(tmp_path):
    """A program that posts stores and exits makes no call after them: the
    daemon performs them when it sees the program go, whether the end of its
    socket or its exit comes first (the socket's end used to detach the task
    first, dropping them)."""
    src = tmp_path / "last.c"
    src.write_text(r"""
#include <fcntl.h>
#include <linux/vfio.h>
#include <stdint.h>
#include <stdlib.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
int main(int argc, char **argv)
{
    int c = open("/dev/vfio/vfio", O_RDWR), g = open("/dev/vfio/4", O_RDWR);
    ioctl(g, VFIO_GROUP_SET_CONTAINER, &c);
    ioctl(c, VFIO_SET_IOMMU, VFIO_TYPE1v2_IOMMU);
    int d = ioctl(g, VFIO_GROUP_GET_DEVICE_FD, argv[1]);
    volatile uint64_t *bar = mmap(0, 1 << 20, PROT_READ | PROT_WRITE, MAP_SHARED, d, 0);
    bar[0x80 / 8] = strtoull(argv[2], 0, 0);      /* posted: no side effect */
    bar[0x90 / 8] = 0x123;
    return 0;
}
""")
    exe = cc(src, tmp_path)
    m = vfiosim.Machine.preset("x86")
    bdf = m.iommu_groups()[4][0]
    d = ThreadedDaemon(m, tmp_path)
    try:
        for i in range(5):
            proc = d.run([str(exe), bdf, str(0x1000 + i)])
            assert proc.returncode == 0, proc.stdout + proc.stderr
            assert d.wait_idle()
            regs = m.device(bdf).snapshot()
            assert (regs["dma_src"], regs["dma_cnt"]) == (0x1000 + i, 0x123), i
    finally:
        d.close()
