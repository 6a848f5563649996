"""Dirty tracking of an HWPT (IOMMU_HWPT_SET_DIRTY_TRACKING,
IOMMU_HWPT_GET_DIRTY_BITMAP) on a VT-d unit that has second-stage A/D bits
(scalable mode with SLADS: ``[iommu] dirty_tracking = true``; QEMU 7.2's
intel-iommu has none, and then the HWPT flag is EOPNOTSUPP)."""

from __future__ import annotations

import ctypes
import errno

import numpy as np
import pytest

from iommufdutil import KiB, MiB, attach, cdev_setup, hwpt_alloc, ioas_map, machine
from vfioutil import edu_dma, enable_bus_master
from vfiosim.uapi import iommufd as iu

DIRTY = iu.IOMMU_HWPT_ALLOC_DIRTY_TRACKING


def err(fn, *args):
    with pytest.raises(OSError) as exc:
        fn(*args)
    return exc.value.errno


def set_tracking(p, fd, hwpt, on):
    cmd = iu.iommu_hwpt_set_dirty_tracking(size=ctypes.sizeof(iu.iommu_hwpt_set_dirty_tracking),
                                           flags=iu.IOMMU_HWPT_DIRTY_TRACKING_ENABLE if on else 0, hwpt_id=hwpt)
    p.ioctl(fd, iu.IOMMU_HWPT_SET_DIRTY_TRACKING, cmd)


def dirty_bits(p, fd, hwpt, iova, length, page=4096, flags=0, bitmap=None):
    nbits = length // page
    data = bitmap if bitmap is not None else p.mmap(max(4096, (nbits + 7) // 8))
    if bitmap is None:
        p.write_memory(data, bytes((nbits + 7) // 8))
    cmd = iu.iommu_hwpt_get_dirty_bitmap(size=ctypes.sizeof(iu.iommu_hwpt_get_dirty_bitmap), hwpt_id=hwpt,
                                         flags=flags, iova=iova, length=length, page_size=page, data=data)
    p.ioctl(fd, iu.IOMMU_HWPT_GET_DIRTY_BITMAP, cmd)
    raw = np.frombuffer(p.read_memory(data, (nbits + 7) // 8), dtype=np.uint8)
    return np.flatnonzero(np.unpackbits(raw, bitorder="little")[:nbits]).tolist()


@pytest.fixture
def setup():
    m = machine(iommu="dirty_tracking = true")
    p = m.spawn(uid=1000, gid=1000, rlimit_memlock=(64 * MiB, 64 * MiB))
    fd, ioas, dfd, devid = cdev_setup(p)
    hwpt = hwpt_alloc(p, fd, devid, ioas, DIRTY)
    attach(p, dfd, hwpt)
    enable_bus_master(p, dfd)
    small = p.mmap(64 * KiB)
    huge = p.mmap(4 * MiB, page_size=2 * MiB)
    ioas_map(p, fd, ioas, small, 64 * KiB, 0x100000)
    ioas_map(p, fd, ioas, huge, 4 * MiB, 0x400000)
    return m, p, fd, hwpt, dfd, ioas, devid


def test_the_capability_is_reported():
    m = machine(iommu="dirty_tracking = true")
    p = m.spawn(uid=1000, gid=1000)
    fd, ioas, dfd, devid = cdev_setup(p)
    cmd = iu.iommu_hw_info(size=ctypes.sizeof(iu.iommu_hw_info), dev_id=devid)
    p.ioctl(fd, iu.IOMMU_GET_HW_INFO, cmd)
    assert cmd.out_capabilities == iu.IOMMU_HW_CAP_DIRTY_TRACKING
    assert m.iommu_units[0].ecap_reg & (1 << 45) and m.iommu_units[0].ecap_reg & (1 << 43)   # SLADS, SMTS


def test_device_writes_are_reported_once_per_pte(setup):
    m, p, fd, hwpt, dfd, ioas, devid = setup
    assert err(dirty_bits, p, fd, hwpt, 0x100000, 64 * KiB) == errno.EINVAL     # tracking is off
    set_tracking(p, fd, hwpt, True)
    assert dirty_bits(p, fd, hwpt, 0x100000, 64 * KiB) == []
    edu_dma(p, dfd, 0x40000, 0x103010, 8, to_ram=True)          # into a 4 KiB PTE
    edu_dma(p, dfd, 0x40000, 0x600000 + 0x1234, 8, to_ram=True)  # into the second 2 MiB super page
    edu_dma(p, dfd, 0x100000, 0x40000, 8, to_ram=False)         # a read dirties nothing
    assert dirty_bits(p, fd, hwpt, 0x100000, 64 * KiB, flags=iu.IOMMU_HWPT_GET_DIRTY_BITMAP_NO_CLEAR) == [3]
    assert dirty_bits(p, fd, hwpt, 0x100000, 64 * KiB) == [3]
    assert dirty_bits(p, fd, hwpt, 0x100000, 64 * KiB) == []     # read and cleared
    # A super page is one PTE: all its 512 pages are dirty, in 2 MiB units one bit.
    assert dirty_bits(p, fd, hwpt, 0x400000, 4 * MiB, page=2 * MiB, flags=iu.IOMMU_HWPT_GET_DIRTY_BITMAP_NO_CLEAR) \
        == [1]
    assert dirty_bits(p, fd, hwpt, 0x400000, 4 * MiB) == list(range(512, 1024))
    set_tracking(p, fd, hwpt, False)
    edu_dma(p, dfd, 0x40000, 0x103010, 8, to_ram=True)
    set_tracking(p, fd, hwpt, True)                              # enabling starts from a clean snapshot
    assert dirty_bits(p, fd, hwpt, 0x100000, 64 * KiB) == []


def test_a_range_starting_inside_a_dirty_super_page_is_eproto(setup):
    m, p, fd, hwpt, dfd, ioas, devid = setup
    set_tracking(p, fd, hwpt, True)
    edu_dma(p, dfd, 0x40000, 0x400000, 8, to_ram=True)
    assert err(dirty_bits, p, fd, hwpt, 0x401000, 64 * KiB) == errno.EPROTO


def test_argument_checks(setup):
    m, p, fd, hwpt, dfd, ioas, devid = setup
    set_tracking(p, fd, hwpt, True)
    assert err(dirty_bits, p, fd, hwpt, 0x100000, 0) == errno.EINVAL
    assert err(dirty_bits, p, fd, hwpt, 0x100800, 4096) == errno.EINVAL          # not IOVA-aligned
    assert err(dirty_bits, p, fd, hwpt, 0x100000, 4096, 8192) == errno.EINVAL    # not page_size-aligned
    assert err(dirty_bits, p, fd, hwpt, 0x100000, 64 * KiB, 4096, 2) == errno.EOPNOTSUPP
    assert err(dirty_bits, p, fd, hwpt, 0x200000, 4096) == errno.EINVAL          # not mapped
    cmd = iu.iommu_hwpt_set_dirty_tracking(size=16, flags=2, hwpt_id=hwpt)
    assert err(p.ioctl, fd, iu.IOMMU_HWPT_SET_DIRTY_TRACKING, cmd) == errno.EOPNOTSUPP
    # An HWPT allocated without the flag has no dirty ops.
    plain = hwpt_alloc(p, fd, devid, ioas)
    assert err(set_tracking, p, fd, plain, True) == errno.EOPNOTSUPP
    assert err(dirty_bits, p, fd, plain, 0x100000, 4096) == errno.EOPNOTSUPP


def test_an_unwritable_bitmap_loses_the_bits_silently(setup):
    """iova_bitmap_set() cannot pin the bitmap, drops the bits and the ioctl
    succeeds (Linux 6.12; docs/deviations.md 11)."""
    m, p, fd, hwpt, dfd, ioas, devid = setup
    set_tracking(p, fd, hwpt, True)
    edu_dma(p, dfd, 0x40000, 0x100000, 8, to_ram=True)
    ro = p.mmap(4096, prot=1)
    assert dirty_bits(p, fd, hwpt, 0x100000, 64 * KiB, bitmap=ro) == []
    assert any("were not recorded" in line for line in m.dmesg())
    assert dirty_bits(p, fd, hwpt, 0x100000, 64 * KiB) == []                      # and they were cleared
