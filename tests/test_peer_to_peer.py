"""Device mappings in-process, and peer-to-peer DMA through them (issue 14).

Process.mmap(fd=device, offset=BAR) is mmap(2) of a vfio-pci region: a
VM_IO | VM_PFNMAP mapping whose loads and stores reach the device, and whose
pages are the BAR's, never RAM.
"""

from __future__ import annotations

import errno
import os

import pytest

import vfiosim
from vfiosim import PROT_READ, PROT_WRITE, uapi
from vfioutil import open_device, setup_v1

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


def test_a_bar_mapping_faults_while_memory_decoding_is_off(x86):
    m, p, c, g, dev = x86
    bar = p.mmap(PAGE, fd=dev, offset=BAR0)
    cfg = uapi.VFIO_PCI_CONFIG_REGION_INDEX << 40
    cmd = int.from_bytes(p.pread(dev, 2, cfg + 4), "little")
    p.pwrite(dev, (cmd & ~0x2).to_bytes(2, "little"), cfg + 4)
    expect_errno(errno.EIO, p.read_memory, bar, 4)                               # SIGBUS on Linux
    p.pwrite(dev, (cmd | 0x2).to_bytes(2, "little"), cfg + 4)
    assert int.from_bytes(p.read_memory(bar, 4), "little") == 0x010000ED
