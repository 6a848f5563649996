"""kernel="3.10": the sPAPR driver as the seed patch posted it, on the 3.10 VFIO core."""

from __future__ import annotations

import ctypes
import errno

import pytest

import vfiosim
from vfiosim import uapi
from vfioutil import dma_map, dma_unmap, edu_dma, enable_bus_master, open_device, setup_v1

BDF = "0000:01:00.0"
GiB = 1 << 30


def err(excinfo) -> str:
    return errno.errorcode[excinfo.value.errno]


@pytest.fixture
def seed():
    return vfiosim.Machine.default(kernel="3.10")


def test_only_the_v1_type_exists(seed):
    p = seed.spawn()
    c = p.open("/dev/vfio/vfio")
    assert [p.ioctl(c, uapi.VFIO_CHECK_EXTENSION, i) for i in range(12)] == [0, 0, 1] + [0] * 9
    g = p.open("/dev/vfio/0")
    p.ioctl(g, uapi.VFIO_GROUP_SET_CONTAINER, ctypes.c_int32(c))
    with pytest.raises(OSError) as e:
        p.ioctl(c, uapi.VFIO_SET_IOMMU, uapi.VFIO_SPAPR_TCE_v2_IOMMU)
    assert err(e) == "ENODEV"


def test_get_info_is_16_bytes(seed):
    p = seed.spawn()
    c, _ = setup_v1(p, enable=False)
    s = uapi.vfio_iommu_spapr_tce_info()
    ctypes.memset(ctypes.addressof(s), 0xA5, ctypes.sizeof(s))
    s.argsz, s.flags = 32, 0
    p.ioctl(c, uapi.VFIO_IOMMU_SPAPR_TCE_GET_INFO, s)
    assert (s.dma32_window_start, s.dma32_window_size, s.flags) == (0, 2 * GiB, 0)
    assert s.ddw.levels == 0xA5A5A5A5                     # the seed never writes the DDW part


def test_one_4k_page_per_map_and_busy_entries(seed):
    p = seed.spawn()
    c, _ = setup_v1(p, enable=False)
    buf = p.mmap(1 << 20)
    assert dma_map(p, c, buf, 0, 4096) == 0             # no ENABLE needed in the seed
    with pytest.raises(OSError) as e:
        dma_map(p, c, buf, 0x1000, 8192)
    assert err(e) == "EINVAL"
    assert "VFIO map on POWER supports only 4096 page size" in seed.dmesg()
    with pytest.raises(OSError) as e:
        dma_map(p, c, buf + 4096, 0, 4096)               # already mapped
    assert err(e) == "EBUSY"
    assert seed.pinned_pages() == 1
    for iova, flags in [(0x1001, 3), (2 * GiB, 3), (0x1000, 0)]:
        with pytest.raises(OSError) as e:
            dma_map(p, c, buf, iova, 4096, flags)
        assert err(e) == "EINVAL"                        # not 1, not ENXIO: the 3.10 checks


def test_unmap_checks_the_whole_range(seed):
    p = seed.spawn()
    c, _ = setup_v1(p)
    with pytest.raises(OSError) as e:
        dma_unmap(p, c, 2 * GiB - 4096, 8192)
    assert err(e) == "EINVAL"
    with pytest.raises(OSError) as e:
        dma_unmap(p, c, 0x1001, 4096)
    assert err(e) == "EINVAL"
    assert dma_unmap(p, c, 0, 0x10000) == 0


def test_enable_charges_only_the_window(seed):
    p = seed.spawn()
    c, _ = setup_v1(p)
    assert p.status()["VmLck"] == 2 * GiB // 1024
    dma_map(p, c, p.mmap(4096), 0, 4096)
    assert p.status()["VmLck"] == 2 * GiB // 1024        # no table accounting in 3.10
    with pytest.raises(OSError) as e:
        p.ioctl(c, uapi.VFIO_EEH_PE_OP, uapi.vfio_eeh_pe_op(argsz=40, op=4))
    assert err(e) == "ENOTTY"


def test_enable_needs_the_rlimit(seed):
    p = seed.spawn(uid=0, rlimit_memlock=(1 << 20, 1 << 20))
    c, _ = setup_v1(p, enable=False)
    p.setuid(1000)
    with pytest.raises(OSError) as e:
        p.ioctl(c, uapi.VFIO_IOMMU_ENABLE)
    assert err(e) == "ENOMEM"
    assert f"RLIMIT_MEMLOCK ({1 << 20}) exceeded" in seed.dmesg()


def test_detach_from_an_enabled_container_only_complains(seed):
    """The seed's detach_group left an enabled container attached (the review
    asked for a forced disable); releasing the last group still cleans up."""
    p = seed.spawn()
    c, g = setup_v1(p)
    dma_map(p, c, p.mmap(4096), 0, 4096)
    p.ioctl(g, uapi.VFIO_GROUP_UNSET_CONTAINER)
    assert "tce_vfio: detaching group #0 from enabled container" in seed.dmesg()
    assert p.status()["VmLck"] == 0 and seed.pinned_pages() == 0


def test_310_core_order_and_errnos(seed):
    p = seed.spawn()
    g = p.open("/dev/vfio/0")
    with pytest.raises(OSError) as e:
        open_device(p, g, "0000:99:00.0")                # 3.10 checks the container first
    assert err(e) == "EINVAL"
    efd = p.eventfd()
    for fd in (efd, -1):
        with pytest.raises(OSError) as e:
            p.ioctl(g, uapi.VFIO_GROUP_SET_CONTAINER, ctypes.c_int32(fd))
        assert err(e) == "EINVAL"


def test_310_device_fds_count_as_container_users(seed):
    p = seed.spawn()
    c, g = setup_v1(p)
    d = open_device(p, g, BDF)
    p.close(g)
    with pytest.raises(OSError) as e:                     # the device still uses the container
        p.open("/dev/vfio/0")
    assert err(e) == "EBUSY"
    p.close(d)                                           # last user: the group leaves the container
    assert p.status()["VmLck"] == 0
    p.open("/dev/vfio/0")


def test_edu_dma_through_the_seed_table(seed):
    p = seed.spawn()
    c, g = setup_v1(p)
    src, dst = p.mmap(4096), p.mmap(4096)
    p.write_memory(src, bytes(range(256)) * 16)
    dma_map(p, c, src, 0x1000, 4096, flags=1)
    dma_map(p, c, dst, 0x2000, 4096, flags=2)
    d = open_device(p, g, BDF)
    enable_bus_master(p, d)
    edu_dma(p, d, 0x1000, 0x40000, 4096, to_ram=False)
    edu_dma(p, d, 0x40000, 0x2000, 4096, to_ram=True)
    assert p.read_memory(dst, 4096) == bytes(range(256)) * 16
