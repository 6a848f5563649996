"""The edu device: registers, interrupts, DMA through the IOMMU, and EEH freezes.

Register semantics follow QEMU's hw/misc/edu.c; EEH follows
arch/powerpc/kernel/eeh.c as reached through VFIO_EEH_PE_OP.
"""

from __future__ import annotations

import ctypes
import errno
import math
import time

import pytest

import vfiosim
from vfiosim import uapi
from vfioutil import (CONFIG, dma_map, dma_unmap, edu_dma, enable_bus_master, open_device, reg_read, reg_write,
                      setup_v1)

DMA_BUF = 0x40000


def err(excinfo) -> str:
    return errno.errorcode[excinfo.value.errno]


def first_device(m):
    gid, bdfs = next(iter(m.iommu_groups().items()))
    return gid, bdfs[0]


@pytest.fixture(params=[("powernv", 4096), ("pseries", 4096), ("powernv", 65536), ("pseries", 65536)],
                ids=["powernv", "pseries", "powernv-64k", "pseries-64k"])
def rig(request):
    name, page_size = request.param
    m = vfiosim.Machine.preset(name, page_size=page_size)
    p = m.spawn()
    gid, bdf = first_device(m)
    c, g = setup_v1(p, gid)
    d = open_device(p, g, bdf)
    return m, p, c, d


def set_irq(p, d, index, efd, action=uapi.VFIO_IRQ_SET_ACTION_TRIGGER, count=1):
    hdr = uapi.vfio_irq_set(argsz=ctypes.sizeof(uapi.vfio_irq_set) + 4 * count, index=index, start=0, count=count,
                            flags=uapi.VFIO_IRQ_SET_DATA_EVENTFD | action)
    return p.ioctl(d, uapi.VFIO_DEVICE_SET_IRQS, bytearray(bytes(hdr) + efd.to_bytes(4, "little", signed=True)))


def efd_count(p, efd) -> int:
    try:
        return int.from_bytes(p.read(efd, 8), "little")
    except OSError as exc:
        assert exc.errno == errno.EAGAIN
        return 0


# -- registers ------------------------------------------------------------------------------------

def test_identification_liveness_factorial(rig):
    m, p, c, d = rig
    assert reg_read(p, d, 0x00) == 0x010000ED
    reg_write(p, d, 0x04, 0x0F0F0F0F)
    assert reg_read(p, d, 0x04) == 0xF0F0F0F0
    reg_write(p, d, 0x08, 10)
    assert reg_read(p, d, 0x20) & 1 == 0                 # done computing
    assert reg_read(p, d, 0x08) == 3628800
    reg_write(p, d, 0x08, 13)                            # 13! wraps at 32 bits, as in QEMU
    assert reg_read(p, d, 0x08) == 6227020800 & 0xFFFFFFFF
    for n in (33, 34, 35):                               # 34! is the first multiple of 2**32
        reg_write(p, d, 0x08, n)
        assert reg_read(p, d, 0x08) == math.factorial(n) % 2 ** 32
    t0 = time.monotonic()
    reg_write(p, d, 0x08, 0xFFFFFFFF)                    # QEMU's 2**32 steps would stall the machine
    assert reg_read(p, d, 0x08) == 0 and time.monotonic() - t0 < 5
    # Registers below 0x80 take 4-byte accesses only: 8 bytes read all-ones (edu_mmio_read);
    # 1 and 2 bytes are no valid edu access at all and read 0 (see test_edu_access_sizes.py).
    assert int.from_bytes(p.pread(d, 2, 0), "little") == 0
    assert int.from_bytes(p.pread(d, 8, 0), "little") == (1 << 64) - 1


def test_config_space_identity(rig):
    m, p, c, d = rig
    hdr = p.pread(d, 64, CONFIG)
    assert hdr[0:4] == bytes.fromhex("3412e811")
    # Revision 0x10; QEMU's PCI_CLASS_OTHERS (0xff) lands in the 16-bit class
    # field, so lspci shows "Unclassified device [00ff]" (sysfs class 0x00ff00).
    assert hdr[0x08] == 0x10 and hdr[0x09:0x0C] == bytes([0, 0xFF, 0])
    assert hdr[0x2C:0x30] == bytes.fromhex("f41a0011")                    # subsystem 1af4:1100
    assert hdr[0x34] == 0x40 and hdr[0x3D] == 1                           # MSI capability, INTx pin A
    msi = p.pread(d, 4, CONFIG + 0x40)
    assert msi[0] == 0x05 and msi[2] & 0x80                               # 64-bit MSI


def test_irq_info(rig):
    m, p, c, d = rig
    expect = {0: (7, 1), 1: (9, 1), 2: (9, 0), 4: (9, 1)}
    for index, (flags, count) in expect.items():
        info = uapi.vfio_irq_info(argsz=16, index=index)
        p.ioctl(d, uapi.VFIO_DEVICE_GET_IRQ_INFO, info)
        assert (info.flags, info.count) == (flags, count)
    for index in (3, 5):
        with pytest.raises(OSError) as e:
            p.ioctl(d, uapi.VFIO_DEVICE_GET_IRQ_INFO, uapi.vfio_irq_info(argsz=16, index=index))
        assert err(e) == "EINVAL"


def test_intx_is_automasked_until_unmasked(rig):
    m, p, c, d = rig
    efd = p.eventfd()
    assert set_irq(p, d, uapi.VFIO_PCI_INTX_IRQ_INDEX, efd) == 0
    reg_write(p, d, 0x60, 0x1000)                        # raise
    assert efd_count(p, efd) == 1
    assert reg_read(p, d, 0x24) == 0x1000
    reg_write(p, d, 0x60, 0x2000)                        # still masked: no new signal
    assert efd_count(p, efd) == 0
    unmask = uapi.vfio_irq_set(argsz=20, index=0, start=0, count=1,
                               flags=uapi.VFIO_IRQ_SET_DATA_NONE | uapi.VFIO_IRQ_SET_ACTION_UNMASK)
    p.ioctl(d, uapi.VFIO_DEVICE_SET_IRQS, unmask)
    assert efd_count(p, efd) == 1                        # the line is still asserted: it fires again
    reg_write(p, d, 0x64, 0x3000)                        # acknowledge everything
    p.ioctl(d, uapi.VFIO_DEVICE_SET_IRQS, unmask)
    assert efd_count(p, efd) == 0


def test_msi_and_the_factorial_interrupt(rig):
    m, p, c, d = rig
    efd = p.eventfd()
    set_irq(p, d, uapi.VFIO_PCI_MSI_IRQ_INDEX, efd)
    with pytest.raises(OSError) as e:                    # MSI is on: INTx cannot be enabled too
        set_irq(p, d, uapi.VFIO_PCI_INTX_IRQ_INDEX, p.eventfd())
    assert err(e) == "EINVAL"
    reg_write(p, d, 0x20, 0x80)                          # interrupt when the factorial is done
    reg_write(p, d, 0x08, 5)
    # An MSI is a memory write: without bus mastering the device cannot send it.
    assert efd_count(p, efd) == 0 and reg_read(p, d, 0x24) == 0x1 and reg_read(p, d, 0x08) == 120
    enable_bus_master(p, d)
    reg_write(p, d, 0x64, 0x1)                           # acknowledge, then compute again
    reg_write(p, d, 0x08, 5)
    assert efd_count(p, efd) == 1 and reg_read(p, d, 0x24) == 0x1 and reg_read(p, d, 0x08) == 120
    off = uapi.vfio_irq_set(argsz=20, index=1, start=0, count=0,
                            flags=uapi.VFIO_IRQ_SET_DATA_NONE | uapi.VFIO_IRQ_SET_ACTION_TRIGGER)
    p.ioctl(d, uapi.VFIO_DEVICE_SET_IRQS, off)
    reg_write(p, d, 0x60, 0x4)                           # MSI disabled: INTx would be used, no eventfd
    assert efd_count(p, efd) == 0


def test_set_irqs_validation(rig):
    m, p, c, d = rig
    efd = p.eventfd()
    for kw, expected in [(dict(index=9), "EINVAL"), (dict(count=2), "EINVAL"), (dict(flags=1 << 10), "EINVAL"),
                         (dict(argsz=20), "EINVAL")]:
        hdr = dict(argsz=24, index=0, start=0, count=1,
                   flags=uapi.VFIO_IRQ_SET_DATA_EVENTFD | uapi.VFIO_IRQ_SET_ACTION_TRIGGER) | kw
        s = uapi.vfio_irq_set(**hdr)
        with pytest.raises(OSError) as e:
            p.ioctl(d, uapi.VFIO_DEVICE_SET_IRQS, bytearray(bytes(s) + efd.to_bytes(4, "little")))
        assert err(e) == expected, kw
    with pytest.raises(OSError) as e:
        set_irq(p, d, 0, 99)
    assert err(e) == "EBADF"
    with pytest.raises(OSError) as e:
        set_irq(p, d, 0, c)                              # not an eventfd
    assert err(e) == "EINVAL"
    with pytest.raises(OSError) as e:                    # MSI has no mask action
        set_irq(p, d, 1, efd, action=uapi.VFIO_IRQ_SET_ACTION_MASK)
    assert err(e) == "ENOTTY"


# -- DMA ----------------------------------------------------------------------------------------------

def test_dma_round_trip_through_the_iommu(rig):
    m, p, c, d = rig
    enable_bus_master(p, d)
    src, dst = p.mmap(0x10000), p.mmap(0x10000)
    data = bytes((i * 13 + 1) & 0xFF for i in range(4096))
    p.write_memory(src + 0x3000, data)
    dma_map(p, c, src, 0x100000, 0x10000, flags=uapi.VFIO_DMA_MAP_FLAG_READ)
    dma_map(p, c, dst, 0x200000, 0x10000, flags=uapi.VFIO_DMA_MAP_FLAG_WRITE)
    edu_dma(p, d, 0x103000, DMA_BUF, 4096, to_ram=False)
    edu_dma(p, d, DMA_BUF, 0x200800, 4096, to_ram=True)      # unaligned, crossing an IOMMU page
    assert p.read_memory(dst + 0x800, 4096) == data
    assert p.read_memory(dst, 0x800) == bytes(0x800)
    assert reg_read(p, d, 0x98) & 1 == 0


def test_dma_without_bus_mastering_moves_nothing(rig):
    m, p, c, d = rig
    dst = p.mmap(0x10000)
    dma_map(p, c, dst, 0x200000, 0x10000)
    edu_dma(p, d, DMA_BUF, 0x200000, 64, to_ram=True)
    assert p.read_memory(dst, 64) == bytes(64)
    assert any("bus mastering is disabled" in line for line in m.dmesg())
    assert reg_read(p, d, 0x00) == 0x010000ED            # nothing froze


def test_dma_after_unmap_does_not_reach_memory(rig):
    m, p, c, d = rig
    enable_bus_master(p, d)
    dst = p.mmap(0x10000)
    dma_map(p, c, dst, 0x200000, 0x10000)
    dma_unmap(p, c, 0x200000, 0x10000)
    edu_dma(p, d, DMA_BUF, 0x200000, 64, to_ram=True)
    p.write_memory(dst, b"\x11" * 64)
    assert p.read_memory(dst, 64) == b"\x11" * 64


def test_dma_is_all_or_nothing_when_a_page_is_missing(pseries):
    p = pseries.spawn()
    c, g = setup_v1(p)
    d = open_device(p, g, "0000:00:00.0")
    enable_bus_master(p, d)
    dst = p.mmap(0x2000)
    p.write_memory(dst, b"\x77" * 0x2000)
    dma_map(p, c, dst, 0x200000, 0x1000)                 # only the first page is mapped
    edu_dma(p, d, DMA_BUF, 0x200800, 0x1000, to_ram=True)
    assert p.read_memory(dst, 0x2000) == b"\x77" * 0x2000
    assert any("blocked by the hypervisor IOMMU" in line and "no EEH" in line for line in pseries.dmesg())
    edu_dma(p, d, DMA_BUF, 0x200000, 0x800, to_ram=True)  # the device still works: no freeze on pseries
    assert p.read_memory(dst, 0x800) == bytes(0x800)


def test_bus_addresses_are_clamped_to_the_28_bit_dma_mask(powernv):
    p = powernv.spawn()
    c, g = setup_v1(p)
    d = open_device(p, g, "0000:01:00.0")
    enable_bus_master(p, d)
    dst = p.mmap(0x1000)
    dma_map(p, c, dst, 0x100000, 0x1000)
    edu_dma(p, d, DMA_BUF, 0x40100000, 16, to_ram=True)   # bit 30 is dropped by the mask
    assert any("clamping DMA address 0x40100000 to 0x100000" in line for line in powernv.dmesg())
    assert p.read_memory(dst, 16) == bytes(16)


def test_transfer_outside_the_device_buffer_is_dropped(powernv):
    p = powernv.spawn()
    c, g = setup_v1(p)
    d = open_device(p, g, "0000:01:00.0")
    enable_bus_master(p, d)
    dst = p.mmap(0x2000)
    p.write_memory(dst, b"\x33" * 0x2000)
    dma_map(p, c, dst, 0x100000, 0x2000)
    edu_dma(p, d, DMA_BUF, 0x100000, 0x2000, to_ram=True)  # 8 KiB from a 4 KiB buffer
    assert p.read_memory(dst, 0x2000) == b"\x33" * 0x2000
    assert any("outside the buffer" in line for line in powernv.dmesg())


# -- EEH on PowerNV ----------------------------------------------------------------------------------------

def eeh(p, c, op, argsz=ctypes.sizeof(uapi.vfio_eeh_pe_op), **err_fields):
    s = uapi.vfio_eeh_pe_op(argsz=argsz, op=op)
    for k, v in err_fields.items():
        setattr(s.err, k, v)
    return p.ioctl(c, uapi.VFIO_EEH_PE_OP, s)


@pytest.fixture
def frozen(powernv):
    """A PE frozen by a device write through a READ-only TCE."""
    p = powernv.spawn()
    c, g = setup_v1(p)
    d = open_device(p, g, "0000:01:00.0")
    enable_bus_master(p, d)
    ro = p.mmap(0x1000)
    p.write_memory(ro, b"\x42" * 0x1000)
    dma_map(p, c, ro, 0x100000, 0x1000, flags=uapi.VFIO_DMA_MAP_FLAG_READ)
    assert eeh(p, c, uapi.VFIO_EEH_PE_GET_STATE) == uapi.VFIO_EEH_PE_STATE_NORMAL
    edu_dma(p, d, DMA_BUF, 0x100000, 16, to_ram=True)
    return powernv, p, c, d, ro


def test_dma_against_the_tce_permission_freezes_the_pe(frozen):
    m, p, c, d, ro = frozen
    assert p.read_memory(ro, 16) == b"\x42" * 16          # the transfer touched no memory
    assert any("EEH: Frozen PHB#0-PE#1 detected" in line and "without write permission" in line
               for line in m.dmesg())
    assert eeh(p, c, uapi.VFIO_EEH_PE_GET_STATE) == uapi.VFIO_EEH_PE_STATE_STOPPED
    assert reg_read(p, d, 0x00) == 0xFFFFFFFF              # MMIO reads all-ones
    reg_write(p, d, 0x04, 1)                              # stores are dropped
    assert p.pread(d, 4, CONFIG) == bytes.fromhex("3412e811")   # IDs are virtualized by vfio-pci
    assert m.topology()["pes"][0]["eeh"]["frozen"] is True


def test_unmapped_dma_freezes_too_and_dma_stops(powernv):
    p = powernv.spawn()
    c, g = setup_v1(p)
    d = open_device(p, g, "0000:01:00.0")
    enable_bus_master(p, d)
    dst = p.mmap(0x1000)
    edu_dma(p, d, DMA_BUF, 0x300000, 16, to_ram=True)    # nothing mapped there
    assert eeh(p, c, uapi.VFIO_EEH_PE_GET_STATE) == uapi.VFIO_EEH_PE_STATE_STOPPED
    dma_map(p, c, dst, 0x300000, 0x1000)
    reg_write(p, d, 0x98, 0x3, 8)                        # dropped: MMIO is frozen
    assert p.read_memory(dst, 16) == bytes(16)


def test_recovery_by_reset_and_the_device_works_again(frozen):
    m, p, c, d, ro = frozen
    assert eeh(p, c, uapi.VFIO_EEH_PE_RESET_HOT) == 0
    assert eeh(p, c, uapi.VFIO_EEH_PE_GET_STATE) == uapi.VFIO_EEH_PE_STATE_RESET
    assert eeh(p, c, uapi.VFIO_EEH_PE_RESET_DEACTIVATE) == 0
    assert eeh(p, c, uapi.VFIO_EEH_PE_CONFIGURE) == 0
    assert eeh(p, c, uapi.VFIO_EEH_PE_GET_STATE) == uapi.VFIO_EEH_PE_STATE_NORMAL
    assert reg_read(p, d, 0x00) == 0x010000ED
    dst = p.mmap(0x1000)
    dma_map(p, c, dst, 0x200000, 0x1000)
    edu_dma(p, d, 0x100000, DMA_BUF, 16, to_ram=False)
    edu_dma(p, d, DMA_BUF, 0x200000, 16, to_ram=True)
    assert p.read_memory(dst, 16) == b"\x42" * 16


def test_thawing_mmio_then_dma(frozen):
    m, p, c, d, ro = frozen
    assert eeh(p, c, uapi.VFIO_EEH_PE_UNFREEZE_IO) == 0
    assert eeh(p, c, uapi.VFIO_EEH_PE_GET_STATE) == uapi.VFIO_EEH_PE_STATE_STOPPED_DMA
    assert reg_read(p, d, 0x00) == 0x010000ED
    assert eeh(p, c, uapi.VFIO_EEH_PE_UNFREEZE_DMA) == 0
    assert eeh(p, c, uapi.VFIO_EEH_PE_GET_STATE) == uapi.VFIO_EEH_PE_STATE_NORMAL


def test_eeh_op_validation_and_error_injection(powernv):
    p = powernv.spawn()
    c, g = setup_v1(p)
    for kw, expected in [(dict(argsz=11), "EINVAL"), (dict(op=99), "EINVAL")]:
        with pytest.raises(OSError) as e:
            eeh(p, c, kw.get("op", uapi.VFIO_EEH_PE_GET_STATE), argsz=kw.get("argsz", 40))
        assert err(e) == expected
    with pytest.raises(OSError) as e:                    # INJECT_ERR needs the whole err struct
        eeh(p, c, uapi.VFIO_EEH_PE_INJECT_ERR, argsz=39)
    assert err(e) == "EINVAL"
    with pytest.raises(OSError) as e:
        eeh(p, c, uapi.VFIO_EEH_PE_INJECT_ERR, type=7)
    assert err(e) == "EINVAL"
    assert eeh(p, c, uapi.VFIO_EEH_PE_INJECT_ERR, type=0, func=3) == 0
    assert eeh(p, c, uapi.VFIO_EEH_PE_GET_STATE) == uapi.VFIO_EEH_PE_STATE_STOPPED


def test_pseries_has_no_eeh(pseries):
    p = pseries.spawn()
    c, g = setup_v1(p)
    # Even a malformed request fails on the missing PE first (trace eeh_argsz_small).
    with pytest.raises(OSError) as e:
        eeh(p, c, uapi.VFIO_EEH_PE_GET_STATE, argsz=8)
    assert err(e) == "ENODEV"
