"""/dev/vfio/vfio served by iommufd (CONFIG_IOMMUFD_VFIO_CONTAINER,
drivers/iommu/iommufd/vfio_compat.c): the Type1 ioctls an unmodified VFIO
program makes, and where the answers differ from VFIO's Type1 driver."""

from __future__ import annotations

import ctypes
import errno
import struct

import pytest

from iommufdutil import KiB, MiB, machine
from vfioutil import dma_map, dma_unmap, edu_dma, enable_bus_master, open_device
from vfiosim.uapi import vfio as uapi

COMPAT = '["IOMMUFD", "VFIO_DEVICE_CDEV", "IOMMUFD_VFIO_CONTAINER"]'
MSI = (0xFEE00000, 0xFEEFFFFF)


def err(fn, *args):
    with pytest.raises(OSError) as exc:
        fn(*args)
    return exc.value.errno


@pytest.fixture
def m():
    return machine(config=COMPAT)


@pytest.fixture
def p(m):
    return m.spawn(uid=1000, gid=1000, rlimit_memlock=(8 * MiB, 8 * MiB))


def container(p, groups=(1,), iommu=uapi.VFIO_TYPE1v2_IOMMU):
    c = p.open("/dev/vfio/vfio")
    gs = []
    for g in groups:
        fd = p.open(f"/dev/vfio/{g}")
        p.ioctl(fd, uapi.VFIO_GROUP_SET_CONTAINER, ctypes.c_int32(c))
        gs.append(fd)
    if iommu is not None:
        p.ioctl(c, uapi.VFIO_SET_IOMMU, iommu)
    return c, gs


def test_the_container_is_an_iommufd(m, p):
    assert m.kernel.config.iommufd_vfio_container and not m.kernel.config.vfio_container
    c = p.open("/dev/vfio/vfio")
    assert p.ioctl(c, uapi.VFIO_GET_API_VERSION) == 0
    for ext, want in [(uapi.VFIO_TYPE1_IOMMU, 1), (uapi.VFIO_TYPE1v2_IOMMU, 1), (uapi.VFIO_UNMAP_ALL, 1),
                      (uapi.VFIO_TYPE1_NESTING_IOMMU, 0), (uapi.VFIO_UPDATE_VADDR, 0), (uapi.VFIO_SPAPR_TCE_IOMMU, 0),
                      (uapi.VFIO_NOIOMMU_IOMMU, 0)]:
        assert p.ioctl(c, uapi.VFIO_CHECK_EXTENSION, ext) == want, ext
    # DMA_CC_IOMMU asks the compat IOAS, which only a group creates.
    assert err(p.ioctl, c, uapi.VFIO_CHECK_EXTENSION, uapi.VFIO_DMA_CC_IOMMU) == errno.ENODEV
    assert err(p.ioctl, c, uapi.VFIO_SET_IOMMU, uapi.VFIO_TYPE1v2_IOMMU) == errno.ENODEV
    assert any("IOMMUFD is providing /dev/vfio/vfio, not VFIO." in line for line in m.dmesg())


def test_set_iommu_differences(p):
    c, (g,) = container(p, iommu=None)
    assert err(p.ioctl, c, uapi.VFIO_SET_IOMMU, uapi.VFIO_SPAPR_TCE_IOMMU) == errno.EINVAL
    assert err(p.ioctl, c, uapi.VFIO_SET_IOMMU, uapi.VFIO_TYPE1_NESTING_IOMMU) == errno.EINVAL
    p.ioctl(c, uapi.VFIO_SET_IOMMU, uapi.VFIO_TYPE1v2_IOMMU)
    p.ioctl(c, uapi.VFIO_SET_IOMMU, uapi.VFIO_TYPE1v2_IOMMU)        # again: no "already set"
    assert p.ioctl(c, uapi.VFIO_CHECK_EXTENSION, uapi.VFIO_DMA_CC_IOMMU) == 1   # no HWPT yet: vacuously
    assert err(p.ioctl, c, uapi.VFIO_IOMMU_DIRTY_PAGES, bytearray(8)) == errno.ENOTTY


def test_map_dma_pins_only_once_a_device_is_open(m, p):
    c, (g,) = container(p)
    buf = p.mmap(64 * KiB)
    dma_map(p, c, buf, 0x100000, 64 * KiB)
    assert m.pinned_pages() == 0 and p.status()["VmLck"] == 0
    dev = open_device(p, g, "0000:01:00.0")
    assert m.pinned_pages() == 16
    st = p.status()
    assert st["VmLck"] == 64 and st["VmPin"] == 64           # mm accounting, and pinned_vm too
    enable_bus_master(p, dev)
    p.write_memory(buf, b"compat!!")
    edu_dma(p, dev, 0x100000, 0x40000, 8, to_ram=False)
    edu_dma(p, dev, 0x40000, 0x100008, 8, to_ram=True)
    assert p.read_memory(buf + 8, 8) == b"compat!!"
    p.close(dev)
    assert m.pinned_pages() == 0 and p.status()["VmLck"] == 0


def test_map_unmap_differences(m, p):
    c, (g,) = container(p)
    dev = open_device(p, g, "0000:01:00.0")
    buf = p.mmap(1 * MiB)
    assert err(dma_map, p, c, buf, 0x100000, 4096, uapi.VFIO_DMA_MAP_FLAG_VADDR) == errno.EINVAL
    assert err(dma_map, p, c, buf, 0x100000, 4096, 0) == errno.EINVAL      # no permission: iommu_map refuses
    dma_map(p, c, buf, 0x100000, 64 * KiB)
    assert err(dma_map, p, c, buf, 0x108000, 4096) == errno.EEXIST
    assert err(dma_map, p, c, buf, MSI[0], 4096) == errno.EINVAL
    # Unmapping part of a mapping: ENOENT (Type1v2 says EINVAL), size written back.
    unmap = uapi.vfio_iommu_type1_dma_unmap(argsz=24, iova=0x100000, size=4096)
    assert err(p.ioctl, c, uapi.VFIO_IOMMU_UNMAP_DMA, unmap) == errno.ENOENT
    assert unmap.size == 0
    assert err(dma_unmap, p, c, 0x100000, 4096, uapi.VFIO_DMA_UNMAP_FLAG_GET_DIRTY_BITMAP) == errno.EINVAL
    assert dma_unmap(p, c, 0x200000, 4096) == 0              # nothing there: success, size 0
    unmap = uapi.vfio_iommu_type1_dma_unmap(argsz=24, iova=0x100000, size=64 * KiB)
    p.ioctl(c, uapi.VFIO_IOMMU_UNMAP_DMA, unmap)
    assert unmap.size == 64 * KiB
    dma_map(p, c, buf, 0x100000, 8192)
    unmap = uapi.vfio_iommu_type1_dma_unmap(argsz=24, flags=uapi.VFIO_DMA_UNMAP_FLAG_ALL)
    p.ioctl(c, uapi.VFIO_IOMMU_UNMAP_DMA, unmap)
    assert unmap.size == 8192 and m.pinned_pages() == 0


def test_type1_can_unmap_inside_a_mapping(m, p):
    """Type1 (v1) disables huge pages in the compat IOAS, so an unmap cuts
    the mapping at its edges and takes the middle."""
    c, (g,) = container(p, iommu=uapi.VFIO_TYPE1_IOMMU)
    dev = open_device(p, g, "0000:01:00.0")
    buf = p.mmap(64 * KiB)
    dma_map(p, c, buf, 0x100000, 64 * KiB)
    unmap = uapi.vfio_iommu_type1_dma_unmap(argsz=24, iova=0x104000, size=8192)
    p.ioctl(c, uapi.VFIO_IOMMU_UNMAP_DMA, unmap)
    assert unmap.size == 8192 and m.pinned_pages() == 14
    domain = m.iommu_units[0].domains[0]
    assert domain.iova_to_phys(0x104000) == 0 and domain.iova_to_phys(0x106000) != 0
    # Type1v2 keeps whole mappings: the same unmap is ENOENT there.
    q = m.spawn(uid=1000, gid=1000, rlimit_memlock=(8 * MiB, 8 * MiB))
    c2, (g2,) = container(q, groups=(2,))
    open_device(q, g2, "0000:02:00.0")
    qbuf = q.mmap(64 * KiB)
    dma_map(q, c2, qbuf, 0x100000, 64 * KiB)
    assert err(dma_unmap, q, c2, 0x104000, 8192) == errno.ENOENT


def test_get_info_chain(m, p):
    """iommufd_vfio_iommu_get_info(): DMA_AVAIL (U32_MAX) then the IOVA
    ranges, written while argsz leaves room; argsz comes back as the whole
    size, cap_offset only when everything fitted."""
    c, (g,) = container(p)
    dev = open_device(p, g, "0000:01:00.0")
    small = uapi.vfio_iommu_type1_info(argsz=ctypes.sizeof(uapi.vfio_iommu_type1_info))
    p.ioctl(c, uapi.VFIO_IOMMU_GET_INFO, small)
    total = 24 + 16 + (16 + 2 * 16)
    assert (small.argsz, small.cap_offset) == (total, 0)
    assert small.flags == uapi.VFIO_IOMMU_INFO_PGSIZES | uapi.VFIO_IOMMU_INFO_CAPS
    assert small.iova_pgsizes == (1 << 12) | (1 << 21) | (1 << 30)
    buf = bytearray(total)
    struct.pack_into("<I", buf, 0, total)
    p.ioctl(c, uapi.VFIO_IOMMU_GET_INFO, buf)
    info = uapi.vfio_iommu_type1_info.from_buffer_copy(bytes(buf[:24]))
    assert info.cap_offset == 24
    cid, ver, nxt, avail = struct.unpack_from("<HHII", buf, 24)
    assert (cid, ver, nxt, avail) == (uapi.VFIO_IOMMU_TYPE1_INFO_DMA_AVAIL, 1, 40, 0xFFFFFFFF)
    cid, ver, nxt, nr = struct.unpack_from("<HHII", buf, 40)
    assert (cid, nxt, nr) == (uapi.VFIO_IOMMU_TYPE1_INFO_CAP_IOVA_RANGE, 0, 2)
    assert struct.unpack_from("<QQQQ", buf, 56) == (0, MSI[0] - 1, MSI[1] + 1, (1 << 39) - 1)


def test_groups_share_the_compat_ioas(m, p):
    c, (g1, g2) = container(p, groups=(1, 2))
    d1, d2 = open_device(p, g1, "0000:01:00.0"), open_device(p, g2, "0000:02:00.0")
    buf = p.mmap(16 * KiB)
    dma_map(p, c, buf, 0x100000, 16 * KiB)
    assert m.pinned_pages() == 4 and len(m.iommu_units[0].domains) == 1
    p.close(d1)
    p.close(g1)
    assert m.pinned_pages() == 4
    p.close(d2)
    assert m.pinned_pages() == 0
