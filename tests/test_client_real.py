"""The RealBackend (the host's /dev/vfio) driven against a fake kernel boundary.

There is no /dev/vfio here, so RealBackend's host functions (HostOs) are
replaced by vfiosim.client.testing.SimulatedHost, which answers every open,
ioctl, pread, mmap, eventfd and sysfs read from a simulated process, with the
kernel's errno.  The parts of HostOs that need no VFIO (anonymous mmap and
its address, eventfd and select, fcntl.ioctl's buffer handling, sysfs files
and links) are tested on this host for real.
"""

from __future__ import annotations

import asyncio
import ctypes
import errno
import fcntl
import os
import struct
import termios

import numpy as np
import pytest

import vfiosim
from vfiosim import client, uapi
from vfiosim.client import VfioError, VfioUsageError
from vfiosim.client.testing import SimulatedHost

MACHINES = ["powernv", "pseries"] + (["x86"] if "x86" in vfiosim.preset_names() else [])
machines = pytest.mark.parametrize("vfio_machine", MACHINES, indirect=True)
EDU = "1234:11e8"


def fake(machine: vfiosim.Machine, **kwargs: object) -> tuple[SimulatedHost, client.RealBackend]:
    host = SimulatedHost(machine.spawn(), **kwargs)  # type: ignore[arg-type]
    return host, client.RealBackend(host)


@machines
def test_real_backend_drives_the_edu_device(vfio_machine):
    host, backend = fake(vfio_machine, region_mmap=False)
    assert backend.pci_devices() == client.SimBackend(vfio_machine.spawn()).pci_devices()
    with client.open_device(EDU, backend) as dev:
        bar = dev.bar(0)
        bar.write32(0x04, 0x0F0F0F0F)
        assert bar.read32(0x04) == 0xF0F0F0F0 and not bar.uses_mmap          # the mmap was refused: pread
        dev.enable_bus_master()                                               # MSI and DMA need it
        irq = dev.irq()
        bar.write32(0x20, 0x80)
        bar.write32(0x08, 6)
        assert irq.wait(1.0) == 1 and bar.read32(0x08) == 720
        bar.write32(0x60, 1)
        assert asyncio.run(irq.wait_async(1.0)) == 1
        with dev.ioeventfd(0, 0x04, 0x0F0F0F0F) as door:            # write(2) on the eventfd
            door.kick()
            assert bar.read32(0x04) == 0xF0F0F0F0
        src = dev.container.dma_alloc(4096, max_iova=(1 << 28) - 1)
        dst = dev.container.dma_alloc(4096, max_iova=(1 << 28) - 1)
        src.array()[:] = np.arange(4096) % 251
        for reg, value in ((0x80, src.iova), (0x88, 0x40000), (0x90, 4096), (0x98, 1),
                           (0x80, 0x40000), (0x88, dst.iova), (0x90, 4096), (0x98, 3)):
            bar.write64(reg, value)
        assert np.array_equal(dst.array(), src.array())
    p = host.process
    assert vfio_machine.pinned_pages() == 0 and p.status()["VmLck"] == 0 and len(p.task.files.fds()) == 3
    names = host.names()
    assert names[0] == "listdir" and ("open", ("/dev/vfio/vfio", os.O_RDWR | os.O_CLOEXEC)) in host.calls
    ioctls = [args[1] for name, args in host.calls if name == "ioctl"]
    assert ioctls[0] == "VFIO_GET_API_VERSION" and "VFIO_GROUP_SET_CONTAINER" in ioctls
    assert any("MAP_DMA" in i for i in ioctls) and any("UNMAP_DMA" in i for i in ioctls)
    assert ("eventfd", (0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)) in host.calls
    maps = [args for name, args in host.calls if name == "mmap"]
    assert any(a[0] == -1 for a in maps) and any(a[0] != -1 for a in maps)   # buffers, and the BAR attempt
    assert names.count("munmap") == 2


def test_region_mmap_path_and_sparse_areas(powernv):
    host, backend = fake(powernv, sparse_mmap={0: [(0, 0x1000), (0x2000, 0x1000)]})
    with client.open_device("0000:01:00.0", backend) as dev:
        bar = dev.bar(0)
        assert bar.sparse_areas == ((0, 0x1000), (0x2000, 0x1000))
        assert isinstance(bar.caps[0], client.SparseMmapCap) and bar.caps[0].offset == ctypes.sizeof(
            uapi.vfio_region_info)
        before = host.names().count("pwrite")
        bar.write32(0x10, 0xDEADBEEF)
        bar.write64(0x2008, 0x0102030405060708)
        bar.write16(0x2000, 0xABCD)
        assert bar.uses_mmap and host.names().count("pwrite") == before         # stores went to the mappings
        area0 = host.region_maps[(dev.fd, 0)]
        area1 = host.region_maps[(dev.fd, 0x2000)]
        assert bytes(area0[0x10:0x14]) == struct.pack("<I", 0xDEADBEEF)        # little endian, as PCI
        assert bytes(area1[8:16]) == struct.pack("<Q", 0x0102030405060708)
        area1[0x20:0x24] = struct.pack("<I", 0x11223344)
        assert bar.read32(0x2020) == 0x11223344 and bar.read16(0x2000) == 0xABCD
        assert bar.read(0x10, 4) == struct.pack("<I", 0xDEADBEEF)
        bar.write(0x2100, b"\x01\x02")
        assert bytes(area1[0x100:0x102]) == b"\x01\x02"
        bar.write32(0x1004, 0x12345678)                                          # outside the areas: pwrite
        assert host.names().count("pwrite") == before + 1
        assert bar.read32(0x1000) == 0xFFFFFFFF                                  # not an edu register
        assert not dev.config.uses_mmap                                          # config space: no MMAP flag
        maps = [args for name, args in host.calls if name == "mmap" and args[0] == dev.fd]
        assert [(a[1], a[4]) for a in maps] == [(0x1000, 0), (0x1000, 0x2000)]
        import mmap as m
        assert all(a[2] == m.PROT_READ | m.PROT_WRITE and a[3] == m.MAP_SHARED for a in maps)


def test_the_whole_bar_is_mapped_without_sparse_areas(powernv):
    host, backend = fake(powernv)
    dev = client.open_device("0000:01:00.0", backend)
    bar = dev.bar(0)
    bar.write32(0xFFFFC, 0x55AA55AA)
    assert host.region_maps[(dev.fd, 0)][0xFFFFC:] == struct.pack("<I", 0x55AA55AA)
    n = host.names().count("munmap")
    dev.close()
    assert host.names().count("munmap") == n + 1                                 # the BAR was unmapped
    with pytest.raises(VfioUsageError):
        bar.read32(0)
    host2, backend2 = fake(powernv)
    with client.open_device("0000:01:00.0", backend2, mmap=False) as dev2:      # the user's choice
        dev2.bar(0).write32(4, 1)
        assert not dev2.bar(0).uses_mmap and host2.region_maps == {}


def test_real_backend_errors_carry_the_kernels_errno():
    m = vfiosim.Machine.default()
    host = SimulatedHost(m.spawn(uid=1000))
    backend = client.RealBackend(host)
    with pytest.raises(VfioError) as e:
        client.open_device("0000:01:00.0", backend)
    assert e.value.errno == errno.EACCES and "chown" in str(e.value)
    assert host.calls[-1][0] == "close"                                          # the container fd went
    assert backend.memlock_limit() == 8 << 20 and not backend.privileged() and backend.pid() == host.process.pid
    assert backend.locked_bytes() == 0


@pytest.mark.skipif(os.path.exists("/dev/vfio/vfio"),
                    reason="this host has VFIO (/dev/vfio/vfio): the real backend opens a container here; the test is "
                           "for hosts without it")
def test_wrong_backend_on_this_host_says_so():
    """This host has no /dev/vfio: the real backend's first open fails and says what to do."""
    with pytest.raises(VfioError) as e:
        client.Container("real")
    assert e.value.errno == errno.ENOENT and "VFIOSIM_BACKEND=sim" in str(e.value)


# -- HostOs on this host ---------------------------------------------------------------------------------

def test_host_memory_is_real_anonymous_memory():
    backend = client.RealBackend()
    mem = backend.alloc(5000)
    assert mem.size == 2 * backend.page_size and mem.addr % backend.page_size == 0
    mem.view[:4] = b"real"
    assert ctypes.string_at(mem.addr, 4) == b"real"                              # the address is the memory's
    ctypes.memmove(mem.addr + 8, b"back", 4)
    assert bytes(mem.view[8:12]) == b"back"
    arr = np.frombuffer(mem.view, dtype=np.uint8)
    mem.release()                                                                # a live view: unmapped later
    assert arr[0] == ord("r")
    del arr


def test_host_eventfd_select_and_asyncio():
    backend = client.RealBackend()
    fd = backend.eventfd()
    try:
        assert not backend.wait_readable(fd, 0.01)
        with pytest.raises(BlockingIOError):
            backend.read(fd, 8)                                                  # non-blocking
        os.write(fd, (3).to_bytes(8, "little"))
        assert backend.wait_readable(fd, 1.0)

        async def later() -> bool:
            loop = asyncio.get_running_loop()
            loop.call_later(0.01, os.write, fd, (1).to_bytes(8, "little"))
            return await backend.wait_readable_async(fd, 1.0)
        assert int.from_bytes(backend.read(fd, 8), "little") == 3
        assert asyncio.run(later())
        assert not asyncio.run(backend.wait_readable_async(fd, 0.0)) or backend.read(fd, 8)
    finally:
        backend.close(fd)


def test_host_ioctl_updates_the_buffer_and_returns_the_result():
    r, w = os.pipe()
    try:
        os.write(w, b"12345")
        buf = bytearray(4)
        assert client.HostOs().ioctl(r, termios.FIONREAD, buf) == 0
        assert int.from_bytes(buf, "little" if os.sys.byteorder == "little" else "big") == 5
        assert client.HostOs().ioctl(r, termios.FIOCLEX, 0) == 0
        assert fcntl.fcntl(r, fcntl.F_GETFD) & fcntl.FD_CLOEXEC
    finally:
        os.close(r)
        os.close(w)


def test_sysfs_is_read_from_files_and_links(tmp_path):
    devices = tmp_path / "bus/pci/devices"
    devices.mkdir(parents=True)
    (tmp_path / "kernel/iommu_groups/7").mkdir(parents=True)
    (tmp_path / "bus/pci/drivers/vfio-pci").mkdir(parents=True)
    for bdf, vendor, device, cls, group, driver in (("0000:01:00.0", 0x1234, 0x11E8, 0x00FF00, 7, "vfio-pci"),
                                                   ("0000:00:1f.2", 0x8086, 0x2922, 0x010601, None, None)):
        d = devices / bdf
        d.mkdir()
        (d / "vendor").write_text(f"0x{vendor:04x}\n")
        (d / "device").write_text(f"0x{device:04x}\n")
        (d / "class").write_text(f"0x{cls:06x}\n")
        if group is not None:
            (d / "iommu_group").symlink_to(f"../../../../kernel/iommu_groups/{group}")
        if driver is not None:
            (d / "driver").symlink_to(f"../../../../bus/pci/drivers/{driver}")
    (devices / "garbage").mkdir()
    found = client.RealBackend(sysfs_root=str(tmp_path)).pci_devices()
    assert found == [client.PciDeviceInfo("0000:00:1f.2", 0x8086, 0x2922, 0x010601, None, None),
                     client.PciDeviceInfo("0000:01:00.0", 0x1234, 0x11E8, 0x00FF00, 7, "vfio-pci")]
    assert client.select_devices(found, ids="8086:*") == found[:1] and not found[0].vfio_ready


class _UnreadableSysfs(client.HostOs):
    """sysfs as a process sees it after dropping privileges where it is restricted."""

    def __init__(self, where: str) -> None:
        self.where = where

    def listdir(self, path: str) -> list[str]:
        if self.where == "listing":
            raise PermissionError(errno.EACCES, "Permission denied", path)
        return ["0000:01:00.0"]

    def read_text(self, path: str) -> str:
        raise PermissionError(errno.EACCES, "Permission denied", path)


@pytest.mark.parametrize("where", ["listing", "device files"])
def test_unreadable_sysfs_is_a_vfio_error_with_cause_and_fix(where):
    with pytest.raises(client.VfioError) as e:
        client.pci_devices(client.RealBackend(_UnreadableSysfs(where)))
    assert isinstance(e.value, OSError) and e.value.errno == errno.EACCES
    text = str(e.value)
    assert text.startswith("sysfs: pci_devices() failed with EACCES (Permission denied)")
    assert "/sys/bus/pci/devices" in text and "is not readable by this process" in text
    assert "fix: list the devices before dropping privileges" in text


def test_a_missing_sysfs_is_a_vfio_error_that_says_so(tmp_path):
    with pytest.raises(client.VfioError) as e:
        client.RealBackend(sysfs_root=str(tmp_path)).pci_devices()
    assert e.value.errno == errno.ENOENT and f"sysfs is not mounted at {tmp_path}" in str(e.value)


def test_caps_chain_decoding_and_guards():
    hdr = uapi.vfio_info_cap_header
    rng = uapi.vfio_iommu_type1_info_cap_iova_range(nr_iovas=2)
    rng.header = hdr(id=uapi.VFIO_IOMMU_TYPE1_INFO_CAP_IOVA_RANGE, version=1, next=24 + 48)
    body = bytes(rng) + bytes(uapi.vfio_iova_range(0, 0xFEDFFFFF)) + bytes(uapi.vfio_iova_range(0xFEF00000, 2**39 - 1))
    avail = uapi.vfio_iommu_type1_info_dma_avail(header=hdr(id=uapi.VFIO_IOMMU_TYPE1_INFO_DMA_AVAIL, version=1, next=0),
                                                  avail=65535)
    buf = bytes(24) + body + bytes(avail)
    caps = client.parse_caps(buf, 24, "iommu")
    assert isinstance(caps[0], client.IovaRangeCap) and caps[0].ranges[1].last == 2**39 - 1
    assert isinstance(caps[1], client.DmaAvailCap) and caps[1].avail == 65535
    assert type(client.parse_caps(buf, 24, "device")[0]) is client.Capability     # ids are per chain
    loop = bytes(8) + bytes(hdr(id=1, version=1, next=8))
    with pytest.raises(ValueError):
        client.parse_caps(loop, 8, "region")
    with pytest.raises(ValueError):
        client.parse_caps(bytes(8), 100, "region")


def test_iova_allocator():
    a = client.IovaAllocator([client.IovaRange(0x1000, 0xFFFF, 0x1000), client.IovaRange(0x100000, 0x1FFFFF, 0x10000)])
    assert a.allocate(0x2000) == 0x1000
    a.reserve(0x4000, 0x1000)
    assert a.allocate(0x2000) == 0x5000                                          # skips the reservation
    assert a.allocate(0x20000) == 0x100000                                       # the next range, 64K aligned
    assert a.allocate(0x8000, max_iova=0xFFFF) == 0x7000
    assert a.allocate(0x10000, max_iova=0xFFFF) is None
    with pytest.raises(KeyError):
        a.reserve(0x1800, 0x10)
    a.release(0x1000)
    assert a.allocate(0x1000) == 0x1000 and a.overlap(0x1000, 1) == (0x1000, 0x1000)
