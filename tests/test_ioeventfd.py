"""Eventfds the kernel acts on when userspace writes them (drivers/vfio/virqfd.c):
VFIO_DEVICE_IOEVENTFD (vfio_pci_ioctl_ioeventfd, vfio_pci_ioeventfd in
vfio_pci_rdwr.c) and the INTx unmask eventfd (vfio_pci_set_intx_unmask), in
process and under `vfiosim run`."""

from __future__ import annotations

import ctypes
import errno
import os
import subprocess

import pytest

import vfiosim
from msix_device import TABLE, machine_toml
from runutil import C_DIR, ThreadedDaemon, cc
from vfiosim import uapi
from vfiosim.kernel.eventfd import EFD_SEMAPHORE
from vfioutil import BAR0, CONFIG, open_device, reg_read, reg_write, setup_v1

LIVENESS = 0x04                       # edu: reads back the inverse of what was written
CMD_MEMORY = 0x2


def ioeventfd(p, d, fd, offset=BAR0 + LIVENESS, data=0x12345678, size=4, argsz=None, flags=None):
    s = uapi.vfio_device_ioeventfd(argsz=ctypes.sizeof(uapi.vfio_device_ioeventfd) if argsz is None else argsz,
                                   flags=size if flags is None else flags, offset=offset, data=data, fd=fd)
    return p.ioctl(d, uapi.VFIO_DEVICE_IOEVENTFD, s)


def errno_of(fn, *args, **kw):
    with pytest.raises(OSError) as e:
        fn(*args, **kw)
    return errno.errorcode[e.value.errno]


def kick(p, efd, n=1):
    p.write(efd, n.to_bytes(8, "little"))


@pytest.fixture(params=["powernv", "pseries", "x86"])
def edu(request):
    m = vfiosim.Machine.preset(request.param)
    p = m.spawn()
    gid = 4 if request.param == "x86" else 0
    c, g = setup_v1(p, gid, iommu=uapi.VFIO_TYPE1v2_IOMMU if request.param == "x86" else uapi.VFIO_SPAPR_TCE_IOMMU,
                    enable=request.param != "x86")
    d = open_device(p, g, m.iommu_groups()[gid][0])
    return m, p, d


def test_a_written_ioeventfd_writes_its_value_into_the_bar(edu):
    m, p, d = edu
    efd = p.eventfd()
    assert ioeventfd(p, d, efd, data=0x0F0F0F0F) == 0
    assert reg_read(p, d, LIVENESS) != 0xF0F0F0F0            # nothing before the eventfd is written
    kick(p, efd)
    assert reg_read(p, d, LIVENESS) == 0xF0F0F0F0
    # The kernel consumed the count (virqfd_wakeup: eventfd_ctx_do_read).
    assert errno_of(p.read, efd, 8) == "EAGAIN"
    # Two ioeventfds on one register with different data are different entries.
    efd2 = p.eventfd()
    assert ioeventfd(p, d, efd2, data=0x00FF00FF) == 0
    kick(p, efd2)
    assert reg_read(p, d, LIVENESS) == 0xFF00FF00
    kick(p, efd)
    assert reg_read(p, d, LIVENESS) == 0xF0F0F0F0
    # A 2-byte ioeventfd makes a 2-byte access, which edu (as QEMU's) ignores below 0x80.
    efd3 = p.eventfd()
    ioeventfd(p, d, efd3, data=0xAAAA5555, size=2)
    kick(p, efd3)
    assert reg_read(p, d, LIVENESS) == 0xF0F0F0F0
    assert not m.oopses


def test_the_write_is_dropped_while_memory_decoding_is_off(edu):
    """vfio_pci_ioeventfd_handler(): __vfio_pci_memory_enabled() false -> nothing."""
    m, p, d = edu
    efd = p.eventfd()
    ioeventfd(p, d, efd, data=0x11111111)
    reg_write(p, d, LIVENESS, 0x22222222)
    cmd = int.from_bytes(p.pread(d, 2, CONFIG + 4), "little")
    p.pwrite(d, (cmd & ~CMD_MEMORY).to_bytes(2, "little"), CONFIG + 4)
    kick(p, efd)
    p.pwrite(d, (cmd | CMD_MEMORY).to_bytes(2, "little"), CONFIG + 4)
    assert reg_read(p, d, LIVENESS) == ~0x22222222 & 0xFFFFFFFF
    kick(p, efd)
    assert reg_read(p, d, LIVENESS) == ~0x11111111 & 0xFFFFFFFF


def test_a_count_already_there_writes_once_and_is_not_consumed(edu):
    """vfio_virqfd_enable(): an event pending before registration runs the handler,
    without reading the counter."""
    m, p, d = edu
    efd = p.eventfd(3)
    ioeventfd(p, d, efd, data=0x0000FFFF)
    assert reg_read(p, d, LIVENESS) == 0xFFFF0000
    assert int.from_bytes(p.read(efd, 8), "little") == 3


def test_a_semaphore_eventfd_gives_up_one_per_wakeup(edu):
    m, p, d = edu
    efd = p.eventfd(0, EFD_SEMAPHORE)
    ioeventfd(p, d, efd)
    kick(p, efd, 5)
    assert int.from_bytes(p.read(efd, 8), "little") == 1        # 5 - 1 consumed, semaphore reads 1
    assert reg_read(p, d, LIVENESS) == ~0x12345678 & 0xFFFFFFFF


def test_unregistering_and_its_errors(edu):
    m, p, d = edu
    efd = p.eventfd()
    ioeventfd(p, d, efd)
    assert errno_of(ioeventfd, p, d, p.eventfd()) == "EEXIST"          # same bar, offset, data, size
    assert errno_of(ioeventfd, p, d, -1, data=0x1) == "ENODEV"         # no such entry to remove
    assert ioeventfd(p, d, -1) == 0
    reg_write(p, d, LIVENESS, 0)
    kick(p, efd)
    assert reg_read(p, d, LIVENESS) == 0xFFFFFFFF                      # no longer acts
    assert errno_of(ioeventfd, p, d, -1) == "ENODEV"


def test_the_checks_in_upstream_order(edu):
    """vfio_pci_ioctl_ioeventfd() then vfio_pci_ioeventfd(): each check's errno,
    a later check never answering for an earlier one."""
    m, p, d = edu
    efd = p.eventfd()
    size = ctypes.sizeof(uapi.vfio_device_ioeventfd)
    with pytest.raises(OSError) as e:
        p.ioctl(d, uapi.VFIO_DEVICE_IOEVENTFD, 0)                     # copy_from_user
    assert e.value.errno == errno.EFAULT
    assert errno_of(ioeventfd, p, d, efd, argsz=size - 5) == "EINVAL"
    assert errno_of(ioeventfd, p, d, efd, flags=0x10 | 4) == "EINVAL"  # unknown flag
    assert errno_of(ioeventfd, p, d, efd, flags=0) == "EINVAL"         # no size
    assert errno_of(ioeventfd, p, d, efd, flags=6) == "EINVAL"         # two sizes
    assert errno_of(ioeventfd, p, d, -2) == "EINVAL"                   # fd < -1
    assert errno_of(ioeventfd, p, d, -2, offset=7 << 40) == "EINVAL"
    assert errno_of(ioeventfd, p, d, efd, offset=uapi.VFIO_PCI_CONFIG_REGION_INDEX << 40) == "EINVAL"
    assert errno_of(ioeventfd, p, d, efd, offset=BAR0 + (1 << 20) - 2) == "EINVAL"   # past the 1 MiB BAR
    assert errno_of(ioeventfd, p, d, efd, offset=2 << 40) == "EINVAL"                 # BAR2 does not exist
    assert errno_of(ioeventfd, p, d, 1000) == "EBADF"                  # vfio_virqfd_enable(): not open
    assert errno_of(ioeventfd, p, d, d) == "EINVAL"                    # not an eventfd
    assert errno_of(ioeventfd, p, d, -1) == "ENODEV"


def test_an_8_byte_ioeventfd_writes_all_64_bits(edu):
    """vfio_pci_ioeventfd() refuses count 8 only where iowrite64 is missing
    (#ifndef iowrite64); x86_64 and ppc64 have it.  On a real 6.12 x86 host
    an 8-byte ioeventfd on edu's DMA source register writes all 64 bits."""
    m, p, d = edu
    efd = p.eventfd()
    value = 0x0123456789ABCDEF
    assert ioeventfd(p, d, efd, offset=BAR0 + 0x80, data=value, size=8) == 0
    assert reg_read(p, d, 0x80, 8) != value
    kick(p, efd)
    assert reg_read(p, d, 0x80, 8) == value
    assert errno_of(ioeventfd, p, d, efd, offset=BAR0 + 0x80, data=value, size=8) == "EEXIST"
    assert errno_of(ioeventfd, p, d, efd, offset=BAR0 + (1 << 20) - 4, size=8) == "EINVAL"   # past the BAR
    assert ioeventfd(p, d, -1, offset=BAR0 + 0x80, data=value, size=8) == 0


def test_at_most_1000_per_device_and_closing_the_device_drops_them(edu):
    m, p, d = edu
    efd = p.eventfd()
    for i in range(1000):
        ioeventfd(p, d, efd, data=i)
    assert errno_of(ioeventfd, p, d, efd, data=1000) == "ENOSPC"
    assert ioeventfd(p, d, -1, data=7) == 0
    assert ioeventfd(p, d, efd, data=1000) == 0
    efile = p.task.files.get(efd)
    assert len(efile.waiters) == 1000
    p.close(d)
    assert efile.waiters == []                                         # vfio_pci_core_disable()


@pytest.mark.parametrize("platform", ["x86", "powernv"])
def test_no_ioeventfd_may_reach_the_msix_table(platform):
    """"Disallow ioeventfds working around MSI-X table writes"."""
    m = vfiosim.Machine.from_toml(machine_toml(platform))
    p = m.spawn()
    gid = next(iter(m.iommu_groups()))
    c, g = setup_v1(p, gid, iommu=uapi.VFIO_TYPE1v2_IOMMU if platform == "x86" else uapi.VFIO_SPAPR_TCE_IOMMU,
                    enable=platform != "x86")
    d = open_device(p, g, m.iommu_groups()[gid][0])
    efd = p.eventfd()
    for off in (TABLE - 2, TABLE, TABLE + 6 * 16 - 1):
        assert errno_of(ioeventfd, p, d, efd, offset=BAR0 + off) == "EINVAL", hex(off)
    assert ioeventfd(p, d, efd, offset=BAR0 + TABLE - 4) == 0          # right below it
    assert ioeventfd(p, d, efd, offset=BAR0 + TABLE + 6 * 16) == 0     # right above it


# -- the INTx unmask eventfd -----------------------------------------------------------------------------

def set_irqs(p, d, index, action, flags, data=b"", start=0, count=1):
    hdr = uapi.vfio_irq_set(argsz=ctypes.sizeof(uapi.vfio_irq_set) + len(data), flags=flags | action,
                            index=index, start=start, count=count)
    return p.ioctl(d, uapi.VFIO_DEVICE_SET_IRQS, bytearray(bytes(hdr) + data))


def s32(fd):
    return fd.to_bytes(4, "little", signed=True)


def test_an_unmask_eventfd_unmasks_intx_and_refires_while_asserted(edu):
    m, p, d = edu
    INTX, EVENTFD = uapi.VFIO_PCI_INTX_IRQ_INDEX, uapi.VFIO_IRQ_SET_DATA_EVENTFD
    trigger, unmask = p.eventfd(), p.eventfd()
    set_irqs(p, d, INTX, uapi.VFIO_IRQ_SET_ACTION_TRIGGER, EVENTFD, s32(trigger))
    set_irqs(p, d, INTX, uapi.VFIO_IRQ_SET_ACTION_UNMASK, EVENTFD, s32(unmask))
    assert errno_of(set_irqs, p, d, INTX, uapi.VFIO_IRQ_SET_ACTION_UNMASK, EVENTFD, s32(p.eventfd())) == "EBUSY"
    assert errno_of(set_irqs, p, d, INTX, uapi.VFIO_IRQ_SET_ACTION_MASK, EVENTFD, s32(unmask)) == "ENOTTY"
    reg_write(p, d, 0x60, 1)                                   # edu raises its interrupt
    assert int.from_bytes(p.read(trigger, 8), "little") == 1   # signalled once, then masked
    kick(p, unmask)                                            # still asserted: fires again
    assert int.from_bytes(p.read(trigger, 8), "little") == 1
    assert errno_of(p.read, unmask, 8) == "EAGAIN"             # the kernel read the unmask count
    reg_write(p, d, 0x64, 1)                                   # acknowledge: deasserted
    kick(p, unmask)
    assert errno_of(p.read, trigger, 8) == "EAGAIN"
    set_irqs(p, d, INTX, uapi.VFIO_IRQ_SET_ACTION_UNMASK, EVENTFD, s32(-1))    # unregistered
    reg_write(p, d, 0x60, 1)
    assert int.from_bytes(p.read(trigger, 8), "little") == 1
    kick(p, unmask)
    assert errno_of(p.read, trigger, 8) == "EAGAIN"            # no longer unmasks
    set_irqs(p, d, INTX, uapi.VFIO_IRQ_SET_ACTION_UNMASK, EVENTFD, s32(unmask))
    set_irqs(p, d, INTX, uapi.VFIO_IRQ_SET_ACTION_TRIGGER, uapi.VFIO_IRQ_SET_DATA_NONE, count=0)   # INTx off
    assert p.task.files.get(unmask).waiters == []              # vfio_intx_disable() dropped it


# -- under `vfiosim run` -------------------------------------------------------------------------------

@pytest.mark.parametrize("platform", ["pseries", "x86"])
def test_a_program_under_vfiosim_run_uses_both(platform, tmp_path):
    """The program writes its real eventfds; the daemon reads them as the
    kernel's wake-up would, before the program's next call."""
    prog = cc(C_DIR / "ioeventfd_probe.c", tmp_path)
    m = vfiosim.Machine.preset(platform)
    daemon = ThreadedDaemon(m, tmp_path)
    try:
        gid = next(g for g in m.iommu_groups() if f"/dev/vfio/{g}" in m.kernel.dev_nodes)
        proc = daemon.run([str(prog), str(gid), m.iommu_groups()[gid][0]], timeout=60)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        out = dict(line.split("=", 1) for line in proc.stdout.split())
        assert out["ioeventfd"] == "0" and out["liveness"] == hex(0xF0F0F0F0)
        assert out["intx_first"] == "1" and out["intx_refired"] == "1" and out["intx_quiet"] == "0"
        assert daemon.wait_idle()
        assert not m.oopses and not m.kernel.tasks
    finally:
        daemon.close()
