"""Device mappings in-process, and peer-to-peer DMA through them (issue 14).

Process.mmap(fd=device, offset=BAR) is mmap(2) of a vfio-pci region: a
VM_IO | VM_PFNMAP mapping whose loads and stores reach the device, and whose
pages are the BAR's, never RAM.
"""

from __future__ import annotations

import ctypes
import errno
import os

import pytest

import vfiosim
from vfiosim import PROT_READ, PROT_WRITE, uapi
from vfioutil import dma_map, dma_unmap, edu_dma, enable_bus_master, open_device, setup_v1

BAR0 = uapi.VFIO_PCI_BAR0_REGION_INDEX << 40
PAGE = 4096
KiB = 1024


def expect_errno(err: int, fn, *args, **kwargs) -> OSError:
    with pytest.raises(OSError) as info:
        fn(*args, **kwargs)
    assert info.value.errno == err, f"expected {errno.errorcode[err]}, got {info.value!r}"
    return info.value


@pytest.fixture
def x86():
    m = vfiosim.Machine.preset("x86")
    p = m.spawn()
    c, g = setup_v1(p, 4, iommu=uapi.VFIO_TYPE1v2_IOMMU, enable=False)
    dev = open_device(p, g, "0000:01:00.0")
    return m, p, c, g, dev


def test_loads_and_stores_through_a_bar_mapping_reach_the_device(x86):
    m, p, c, g, dev = x86
    bar = p.mmap(1 << 20, PROT_READ | PROT_WRITE, fd=dev, offset=BAR0)
    assert int.from_bytes(p.read_memory(bar, 4), "little") == 0x010000ED        # edu's identification
    p.write_memory(bar + 4, (0x12345678).to_bytes(4, "little"))                 # liveness: reads back inverted
    assert int.from_bytes(p.read_memory(bar + 4, 4), "little") == ~0x12345678 & 0xFFFFFFFF
    p.write_memory(bar + 0x80, (0xABCDEF0123).to_bytes(8, "little"))            # one 8-byte store
    assert m.device("0000:01:00.0").dma_src == 0xABCDEF0123
    st = p.status()
    assert st["VmSize"] == 1024 and st["VmRSS"] == 0 and m.meminfo()["MemFree"] == 4 << 20     # not RAM
    p.munmap(bar, 1 << 20)
    expect_errno(errno.EFAULT, p.read_memory, bar, 4)


def test_mapping_a_device_region_checks_as_do_mmap_and_vfio_pci_do(x86):
    m, p, c, g, dev = x86
    ro = p.open("/dev/vfio/vfio", os.O_RDONLY)
    expect_errno(errno.EINVAL, p.mmap, PAGE, fd=dev, offset=uapi.VFIO_PCI_CONFIG_REGION_INDEX << 40)
    expect_errno(errno.EINVAL, p.mmap, 2 << 20, fd=dev, offset=BAR0)            # past the 1 MiB BAR
    expect_errno(errno.EACCES, p.mmap, PAGE, fd=ro)                               # shared, writable, O_RDONLY
    expect_errno(errno.ENODEV, p.mmap, PAGE, PROT_READ, fd=ro)                    # the container has no mmap
    expect_errno(errno.EBADF, p.mmap, PAGE, fd=99)
    assert p.mm.map_count == 0


def test_a_mapping_keeps_the_device_open_after_its_fd_is_closed(x86):
    """Each VMA holds a reference to the file (vma->vm_file): closing the fd
    closes nothing while the BAR is mapped, as on Linux, where the group
    cannot leave its container until the mapping goes too."""
    m, p, c, g, dev = x86
    bar = p.mmap(1 << 20, fd=dev, offset=BAR0)
    p.mprotect(bar + PAGE, PAGE, PROT_READ)                            # a split: two VMAs, two references
    p.close(dev)
    assert int.from_bytes(p.read_memory(bar, 4), "little") == 0x010000ED
    expect_errno(errno.EBUSY, p.ioctl, g, uapi.VFIO_GROUP_UNSET_CONTAINER)
    child = p.fork()                                                   # the child's copy holds one more
    p.munmap(bar, 1 << 20)
    expect_errno(errno.EBUSY, p.ioctl, g, uapi.VFIO_GROUP_UNSET_CONTAINER)
    child.exit()
    assert p.ioctl(g, uapi.VFIO_GROUP_UNSET_CONTAINER) == 0


def test_a_bar_mapping_faults_while_memory_decoding_is_off(x86):
    m, p, c, g, dev = x86
    bar = p.mmap(PAGE, fd=dev, offset=BAR0)
    cfg = uapi.VFIO_PCI_CONFIG_REGION_INDEX << 40
    cmd = int.from_bytes(p.pread(dev, 2, cfg + 4), "little")
    p.pwrite(dev, (cmd & ~0x2).to_bytes(2, "little"), cfg + 4)
    expect_errno(errno.EIO, p.read_memory, bar, 4)                               # SIGBUS on Linux
    p.pwrite(dev, (cmd | 0x2).to_bytes(2, "little"), cfg + 4)
    assert int.from_bytes(p.read_memory(bar, 4), "little") == 0x010000ED


# -- VFIO_IOMMU_MAP_DMA of a BAR mapping ------------------------------------------------------------


@pytest.fixture
def two_devices():
    """x86: both edu devices (groups 4 and 5) in one Type1v2 container."""
    m = vfiosim.Machine.preset("x86")
    p = m.spawn()
    c = p.open("/dev/vfio/vfio")
    groups = []
    for gid in (4, 5):
        g = p.open(f"/dev/vfio/{gid}")
        p.ioctl(g, uapi.VFIO_GROUP_SET_CONTAINER, ctypes.c_int32(c))
        groups.append(g)
    p.ioctl(c, uapi.VFIO_SET_IOMMU, uapi.VFIO_TYPE1v2_IOMMU)
    a = open_device(p, groups[0], "0000:01:00.0")
    b = open_device(p, groups[1], "0000:02:00.0")
    enable_bus_master(p, a)
    return m, p, c, a, b


def test_a_device_dmas_into_another_devices_bar_through_type1(two_devices):
    """QEMU maps every BAR for peer-to-peer DMA on x86: Linux 6.12 Type1 maps
    it through vaddr_get_pfns()'s VM_PFNMAP path (follow_fault_pfn), a
    reserved pfn neither pinned nor charged to locked_vm."""
    m, p, c, a, b = two_devices
    bar = p.mmap(1 << 20, fd=b, offset=BAR0)
    buf = p.mmap(PAGE)
    assert dma_map(p, c, bar, 0x1000000, 1 << 20) == 0
    assert dma_map(p, c, buf, 0x2000000, PAGE) == 0
    assert p.status()["VmLck"] == 4 and m.pinned_pages() == 1           # only the RAM page
    # A's DMA engine writes 8 bytes into B's DMA source register, then reads B's identification.
    p.write_memory(buf, (0x1122334455).to_bytes(8, "little"))
    edu_dma(p, a, 0x2000000, 0x40000, 8, to_ram=False)                   # RAM -> A's buffer
    edu_dma(p, a, 0x40000, 0x1000000 + 0x80, 8, to_ram=True)             # A's buffer -> B's BAR
    assert m.device("0000:02:00.0").dma_src == 0x1122334455
    edu_dma(p, a, 0x1000000, 0x40000, 4, to_ram=False)                   # B's BAR -> A's buffer
    edu_dma(p, a, 0x40000, 0x2000000, 4, to_ram=True)                    # -> RAM
    assert int.from_bytes(p.read_memory(buf, 4), "little") == 0x010000ED
    assert dma_unmap(p, c, 0x1000000, 1 << 20) == 0
    assert p.status()["VmLck"] == 4 and m.pinned_pages() == 1 and not m.oopses


def test_bar_map_dma_checks_what_follow_fault_pfn_checks(two_devices):
    m, p, c, a, b = two_devices
    ro = p.mmap(1 << 20, PROT_READ, fd=b, offset=BAR0)
    expect_errno(errno.EFAULT, dma_map, p, c, ro, 0x1000000, 1 << 20)           # a writable PTE is needed
    assert dma_map(p, c, ro, 0x1000000, 1 << 20, flags=uapi.VFIO_DMA_MAP_FLAG_READ) == 0
    rw = p.mmap(1 << 20, fd=b, offset=BAR0)
    cfg = uapi.VFIO_PCI_CONFIG_REGION_INDEX << 40
    cmd = int.from_bytes(p.pread(b, 2, cfg + 4), "little")
    p.pwrite(b, (cmd & ~0x2).to_bytes(2, "little"), cfg + 4)                      # memory decoding off
    e = expect_errno(errno.EFAULT, dma_map, p, c, rw, 0x2000000, 1 << 20)        # the fault handler: SIGBUS
    assert "VM_FAULT_SIGBUS" in str(e)
    assert p.status()["VmLck"] == 0 and m.pinned_pages() == 0


@pytest.mark.parametrize("iommu", [uapi.VFIO_SPAPR_TCE_IOMMU, uapi.VFIO_SPAPR_TCE_v2_IOMMU])
def test_spapr_refuses_a_bar_mapping_as_linux_does(iommu):
    """tce_iommu_use_page(): pin_user_pages_fast() refuses a VM_PFNMAP page
    (EFAULT); mm_iommu_do_alloc()'s pin_user_pages() too (EFAULT, nothing
    pinned); MAP_DMA v2 finds no preregistered region (EINVAL)."""
    m = vfiosim.Machine.preset("powernv")
    p = m.spawn()
    c, g = setup_v1(p, iommu=iommu, enable=iommu == uapi.VFIO_SPAPR_TCE_IOMMU)
    dev = open_device(p, g, m.iommu_groups()[0][0])
    bar = p.mmap(1 << 20, fd=dev, offset=BAR0)
    if iommu == uapi.VFIO_SPAPR_TCE_IOMMU:
        expect_errno(errno.EFAULT, dma_map, p, c, bar, 0, 1 << 20)
    else:
        reg = uapi.vfio_iommu_spapr_register_memory(argsz=24, vaddr=bar, size=1 << 20)
        expect_errno(errno.EFAULT, p.ioctl, c, uapi.VFIO_IOMMU_SPAPR_REGISTER_MEMORY, reg)
        buf = p.mmap(PAGE)
        p.ioctl(c, uapi.VFIO_IOMMU_SPAPR_REGISTER_MEMORY,
                uapi.vfio_iommu_spapr_register_memory(argsz=24, vaddr=buf, size=PAGE))
        expect_errno(errno.EINVAL, dma_map, p, c, bar, 0, 1 << 20)
    assert m.pinned_pages() == (0 if iommu == uapi.VFIO_SPAPR_TCE_IOMMU else 1)          # nothing of the BAR
