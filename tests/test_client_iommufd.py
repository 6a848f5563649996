"""The client on kernels with iommufd: /dev/iommu, the device cdev, the
group given an iommufd, the automatic choice and its fallback, errors."""

from __future__ import annotations

import errno

import numpy as np
import pytest

import vfiosim
from vfiosim import client
from vfiosim.client.testing import SimulatedHost

import iommufdutil

EDU = "0000:01:00.0"
MiB = 1 << 20


def edu_copy(dev: client.Device) -> None:
    """edu's DMA engine: a buffer to its internal memory and back to another."""
    c = dev.container
    dev.enable_bus_master()
    bar = dev.bar(0)
    src = c.dma_alloc(4096, max_iova=(1 << 28) - 1)
    dst = c.dma_alloc(4096, max_iova=(1 << 28) - 1)
    src.array()[:] = np.arange(4096) % 251
    for reg, value in ((0x80, src.iova), (0x88, 0x40000), (0x90, 4096), (0x98, 1),
                       (0x80, 0x40000), (0x88, dst.iova), (0x90, 4096), (0x98, 3)):
        bar.write64(reg, value)
    assert np.array_equal(dst.array(), src.array())


def test_auto_uses_iommufd_and_the_cdev_where_the_kernel_has_them():
    m = vfiosim.Machine.preset("x86", kernel_config="iommufd")
    host = SimulatedHost(m.spawn(), region_mmap=False)       # BAR accesses reach the device
    backend = client.RealBackend(host)
    info = client.find_device(backend, bdf=EDU)
    assert info.vfio_dev == "vfio0"                                    # sysfs vfio-dev/vfio0
    with client.open_device(EDU, backend) as dev:
        c = dev.container
        assert c.iommufd and c.iommu_type == client.IOMMUFD and c.ioas_id == 1
        assert dev.group is None and dev.cdev == "/dev/vfio/devices/vfio0" and dev.devid == 2
        # VT-d's aperture (39 bits: QEMU's default aw-bits) less the MSI window, 4 KiB aligned
        assert [(r.start, r.last) for r in c.iommu_info().ranges] == [(0, 0xfedfffff), (0xfef00000, (1 << 39) - 1)]
        edu_copy(dev)
        assert m.pinned_pages() == 2
    assert m.pinned_pages() == 0 and host.process.status()["VmPin"] == 0
    # (VFIO numbers are shared between fd kinds: the first name is the device's)
    ioctls = [args[1].split("/")[0] for name, args in host.calls if name == "ioctl"]
    assert ioctls[:4] == ["IOMMU_IOAS_ALLOC", "IOMMU_VFIO_IOAS", "IOMMU_IOAS_IOVA_RANGES", "IOMMU_IOAS_IOVA_RANGES"]
    assert ioctls[4:6] == ["VFIO_DEVICE_BIND_IOMMUFD", "VFIO_DEVICE_ATTACH_IOMMUFD_PT"]
    assert ioctls.count("IOMMU_IOAS_MAP") == 2 and ioctls.count("IOMMU_IOAS_UNMAP") == 2
    opened = [args[0] for name, args in host.calls if name == "open"]
    assert opened == ["/dev/iommu", "/dev/vfio/devices/vfio0"]
    assert not any("GROUP" in i or "VFIO_SET_IOMMU" in i for i in ioctls)


def test_without_the_cdev_the_group_takes_the_iommufd():
    """CONFIG_IOMMUFD without VFIO_DEVICE_CDEV: /dev/vfio/<group> with
    VFIO_GROUP_SET_CONTAINER(iommufd); the device joins the client's IOAS
    (made the compat IOAS with IOMMU_VFIO_IOAS) when it is opened."""
    m = vfiosim.Machine.preset("x86", kernel_config=["IOMMUFD"])
    assert client.find_device(m, bdf=EDU).vfio_dev == "vfio0"        # sysfs has it; /dev has no cdev
    with client.open_device(EDU, m) as dev:
        c = dev.container
        assert c.iommufd and dev.group is not None and dev.cdev is None
        assert m.kernel.vfio.groups[4].iommufd is not None
        edu_copy(dev)
        assert [(r.start, r.last) for r in c.iommu_info().ranges][0] == (0, 0xfedfffff)
    assert m.pinned_pages() == 0


def test_debian_kernel_has_no_iommufd_to_ask_for():
    m = vfiosim.Machine.preset("x86")
    assert client.find_device(m, bdf=EDU).vfio_dev == "vfio0"        # the sysfs dir is there all the same
    with pytest.raises(client.VfioError) as exc:
        client.Container(m, iommu="iommufd")
    assert exc.value.errno == errno.ENOENT and "CONFIG_IOMMUFD" in str(exc.value)
    with client.open_device(EDU, m) as dev:                          # automatic: the VFIO container
        assert not dev.container.iommufd and dev.container.iommu_type == client.uapi.VFIO_TYPE1v2_IOMMU


def test_a_vfio_type_asks_for_dev_vfio_vfio_whoever_serves_it():
    m = vfiosim.Machine.preset("x86", kernel_config="iommufd-compat")
    with client.open_device(EDU, m, iommu="type1") as dev:
        c = dev.container
        assert not c.iommufd and c.iommu_type == client.uapi.VFIO_TYPE1_IOMMU and dev.group is not None
        assert m.kernel.vfio.groups[4].iommufd is not None                # iommufd's emulation took the group
        edu_copy(dev)
    with client.use_iommu("type1v2"):
        with client.open_device(EDU, m) as dev:
            assert dev.container.iommu_type == client.uapi.VFIO_TYPE1v2_IOMMU
    assert m.pinned_pages() == 0


def test_environment_names_the_interface(monkeypatch):
    m = vfiosim.Machine.preset("x86", kernel_config="iommufd")
    monkeypatch.setenv(client.IOMMU_ENV, "type1v2")
    with client.Container(m) as c:
        assert not c.iommufd
    monkeypatch.setenv(client.IOMMU_ENV, "auto")
    with client.Container(m) as c:
        assert c.iommufd
    monkeypatch.setenv(client.IOMMU_ENV, "type9")
    with pytest.raises(client.VfioUsageError, match=r"\$VFIOSIM_IOMMU.*unknown IOMMU type 'type9'"):
        client.Container(m)


def test_power_with_iommufd_falls_back_to_the_spapr_container():
    """Linux 6.12 on POWER with CONFIG_IOMMUFD: /dev/iommu opens, but binding
    a device fails (no MSI isolation; with allow_unsafe_interrupts, no paging
    domain): the automatic choice goes back to /dev/vfio/vfio."""
    m = vfiosim.Machine.preset("powernv", kernel_config=["IOMMUFD"])
    with client.open_device(EDU, m) as dev:
        c = dev.container
        assert not c.iommufd and c.is_spapr
        assert c.fallback is not None and c.fallback.errno == errno.EPERM
        assert "allow_unsafe_interrupts" in str(c.fallback)
        c.dma_alloc(4096)
    m.kernel.iommufd_allow_unsafe_interrupts = True
    with client.open_device(EDU, m) as dev:
        assert dev.container.is_spapr and dev.container.fallback.errno == errno.EOPNOTSUPP
    with pytest.raises(client.VfioError) as exc:                        # asked for: no fallback
        client.open_device(EDU, m, iommu="iommufd")
    assert exc.value.errno == errno.EOPNOTSUPP and "no paging domain" in str(exc.value)
    assert m.pinned_pages() == 0


def test_nothing_falls_back_once_the_ioas_is_in_use():
    m = vfiosim.Machine.preset("powernv", kernel_config=["IOMMUFD"])
    with client.Container(m) as c:
        c.dma_alloc(4096)                                   # an IOAS mapping, nothing pinned yet
        with pytest.raises(client.VfioError) as exc:
            c.open_device(EDU)
        assert exc.value.errno == errno.EPERM and c.iommufd and c.fallback is None


def test_iommufd_charges_the_user_and_says_so():
    m = iommufdutil.machine()
    a = m.spawn(uid=1000, gid=1000, rlimit_memlock=(MiB, MiB))
    b = m.spawn(uid=1000, gid=1000, rlimit_memlock=(MiB, MiB))
    with client.open_device(EDU, a) as dev:
        dev.container.dma_alloc(768 << 10)
        assert m.user_locked_vm(1000) == 768 << 10 and a.status()["VmLck"] == 0
        with client.open_device("0000:02:00.0", b) as other:            # another process, the same user
            with pytest.raises(client.VfioError) as exc:
                other.container.dma_alloc(512 << 10)
            text = str(exc.value)
            assert exc.value.errno == errno.ENOMEM and "IOMMU_IOAS_MAP" in text
            assert "every process of the uid together" in text and "RLIMIT_MEMLOCK is 1 MiB" in text
    assert m.user_locked_vm(1000) == 0


def test_a_mapping_in_a_reserved_region_blocks_the_attach():
    m = vfiosim.Machine.preset("x86", kernel_config="iommufd")
    with client.Container(m) as c:
        buf = c.alloc_buffer(4096)
        c.map(buf, iova=0xfee00000)                          # no device yet: the whole space is usable
        with pytest.raises(client.VfioError) as exc:
            c.open_device(EDU)
        assert exc.value.errno == errno.EADDRINUSE and "MSI window" in str(exc.value)
        assert not c.devices
        c.mappings[0].close()
        dev = c.open_device(EDU)
        assert dev.devid is not None
