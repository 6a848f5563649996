"""Scatter-gather DMA (BusMaster.dma_read_many / dma_write_many) and the
page-granular translation caches behind it (the PHB's TCE cache, the VT-d
IOTLB), and the host-memory side of it under `vfiosim run` (one
process_vm_readv/writev for many ranges).
"""

from __future__ import annotations

import ctypes
import mmap
import os

import numpy as np
import pytest

import vfiosim
from vfiosim import client, devices
from vfiosim.transport.host import HostProcess
from test_virtio_net import NIC, machine_toml


@pytest.fixture(params=["powernv", "pseries", "x86"])
def rig(request):
    m = vfiosim.Machine.from_toml(machine_toml(request.param))
    dev = client.open_device("1af4:1041", m.spawn(uid=0))
    dev.enable_bus_master()
    yield request.param, m, dev
    dev.close()


def test_read_many_and_write_many_move_every_range(rig):
    _platform, m, dev = rig
    a = dev.container.dma_alloc(3 * 4096)
    b = dev.container.dma_alloc(4096)
    a.array()[:] = np.arange(3 * 4096, dtype=np.uint32).view(np.uint8)[:3 * 4096]
    bm = m.device(NIC).bus_master
    segs = [(a.iova + 10, 100), (b.iova, 16), (a.iova + 4090, 4200)]       # the last crosses two pages
    got = bm.dma_read_many(segs)
    assert got == [a.read(10, 100), b.read(0, 16), a.read(4090, 4200)]
    bm.dma_write_many([(b.iova + 8, b"abc"), (a.iova + 4094, bytes(range(6)))])
    assert b.read(8, 3) == b"abc" and a.read(4094, 6) == bytes(range(6))
    # Reading the same pages again is served by the page cache: same answer.
    assert bm.dma_read_many(segs)[1] == b.read(0, 16)


def test_a_refused_range_moves_nothing_and_faults(rig):
    platform, m, dev = rig
    a = dev.container.dma_alloc(4096)
    a.array()[:] = 7
    bm = m.device(NIC).bus_master
    with pytest.raises(devices.DmaError) as exc:
        bm.dma_write_many([(a.iova, b"\x01" * 8), (a.iova + (256 << 20), b"\x02" * 8)])
    assert exc.value.write and exc.value.iova == a.iova + (256 << 20)
    assert (a.array() == 7).all(), "nothing moved"
    if platform == "powernv":
        assert m.pe_of(NIC).eeh.dma_stopped


def test_page_cache_never_serves_a_stale_translation(rig):
    """Once a page is unmapped, the cached translation of it is gone (any
    change bumps the table's or the domain's generation)."""
    _platform, m, dev = rig
    a = dev.container.dma_alloc(2 * 4096)
    bm = m.device(NIC).bus_master
    a.write(4096, b"hello")
    assert bm.dma_read(a.iova + 4096, 5) == b"hello"
    assert bm.dma_read_many([(a.iova + 4096, 5)]) == [b"hello"]
    iova = a.iova
    a.close()
    with pytest.raises(devices.DmaError):
        bm.dma_read(iova + 4096, 5)


def test_host_process_reads_and_writes_many_ranges_of_a_real_process():
    """device_read_ranges and device_write_ranges: every range in one foreign call, through the
    process's /proc/<pid>/mem (bound to its address space, as the daemon opens
    it), so a page the CPU may not write is written (a device ignores the CPU's
    protection) where the host kernel lets /proc/<pid>/mem override it
    (proc_mem.force_override); where it does not, the write fails with EFAULT
    as device_write() does."""
    from vfiosim.kernel.errors import KernelError
    hp = HostProcess.open(os.getpid())
    rw = mmap.mmap(-1, 8192)
    ro = mmap.mmap(-1, 4096)
    ro.write(b"\x00" * 4096)
    base_rw = ctypes.addressof(ctypes.c_char.from_buffer(rw))
    buf = (ctypes.c_char * 4096).from_buffer(ro)
    base_ro = ctypes.addressof(buf)
    del buf
    rw[0:4] = b"ABCD"
    rw[5000:5003] = b"xyz"
    out = bytearray(7)
    hp.device_read_ranges([base_rw, base_rw + 5000], [4, 3], memoryview(out))
    assert out == b"ABCDxyz"
    libc = ctypes.CDLL(None, use_errno=True)
    assert libc.mprotect(ctypes.c_void_p(base_ro), 4096, mmap.PROT_READ) == 0
    try:
        fd = os.open("/proc/self/mem", os.O_WRONLY)
        try:
            os.pwrite(fd, b"\0", base_ro)
            overrides = True
        except OSError:
            overrides = False
        finally:
            os.close(fd)
        hp.device_write_ranges([base_rw + 100, base_rw + 200], [2, 2], memoryview(b"1234"))
        assert rw[100:102] == b"12" and rw[200:202] == b"34"
        addrs, lens, data = [base_rw + 300, base_ro + 8], [2, 3], memoryview(b"56ro!")
        if overrides:
            hp.device_write_ranges(addrs, lens, data)
            assert ro[8:11] == b"ro!"
        else:
            with pytest.raises(KernelError):
                hp.device_write_ranges(addrs, lens, data)
            assert ro[8:11] == b"\0\0\0"
        assert rw[300:302] == b"56"
    finally:
        libc.mprotect(ctypes.c_void_p(base_ro), 4096, mmap.PROT_READ | mmap.PROT_WRITE)
        hp.close()


# -- bursts: one buffer for many ranges, translated through the page cache ------------------------------------------


def test_burst_reads_and_writes_move_every_range_in_order(rig):
    """dma_read_burst()/dma_write_burst(): the ranges' bytes one after the
    other, across pages and memory objects; a range written twice ends with
    the later bytes, as separate writes would."""
    _platform, m, dev = rig
    a = dev.container.dma_alloc(3 * 4096)
    b = dev.container.dma_alloc(4096)
    a.array()[:] = np.arange(3 * 4096, dtype=np.uint32).view(np.uint8)[:3 * 4096]
    bm = m.device(NIC).bus_master
    iovas, lens = [a.iova + 10, b.iova, a.iova + 4090, a.iova + 8000], [100, 16, 4200, 5]
    got = bm.dma_read_burst(iovas, lens)
    assert bytes(got) == a.read(10, 100) + b.read(0, 16) + a.read(4090, 4200) + a.read(8000, 5)
    assert bytes(bm.dma_read_burst(iovas, lens)) == bytes(got), "served by the page cache: same answer"
    bm.dma_write_burst([b.iova + 8, a.iova + 4094, b.iova + 9], [3, 6, 1], b"abc" + bytes(range(6)) + b"Z")
    assert b.read(8, 3) == b"aZc" and a.read(4094, 6) == bytes(range(6))
    assert bm.dma_read_burst([], []) == bytearray()


def test_a_refused_range_in_a_burst_faults_once_where_it_would_alone(rig):
    """The first refused range, in order, is the fault: the PE freezes once
    (PowerNV), VT-d records one fault (x86); nothing moves, not even the
    ranges before it."""
    platform, m, dev = rig
    a = dev.container.dma_alloc(2 * 4096)
    a.array()[:] = 7
    bm = m.device(NIC).bus_master
    bad = a.iova + (256 << 20)
    with pytest.raises(devices.DmaError) as exc:
        bm.dma_write_burst([a.iova, a.iova + 4096 - 4, bad, bad + 4096], [8, 8, 8, 8], bytes(range(32)))
    assert exc.value.write and exc.value.iova == bad
    assert (a.array() == 7).all(), "nothing moved"
    if platform == "powernv":
        pe = m.pe_of(NIC)
        assert pe.eeh.dma_stopped and pe.eeh.freeze_count == 1 and pe.dma_faults == 1
    elif platform == "x86":
        assert m.iommu_units[0].faults == 1


def test_a_burst_needs_the_permission_of_its_direction(rig):
    """A read-only mapping reads in a burst and refuses a burst write."""
    platform, m, dev = rig
    ro = dev.container.dma_alloc(4096, write=False)
    ro.array()[:] = 3
    bm = m.device(NIC).bus_master
    assert bytes(bm.dma_read_burst([ro.iova, ro.iova + 100], [4, 4])) == b"\x03" * 8
    with pytest.raises(devices.DmaError) as exc:
        bm.dma_write_burst([ro.iova + 100], [4], b"four")
    assert exc.value.iova == ro.iova + 100 and (ro.array() == 3).all()


def test_prefetch_reads_ahead_only_where_the_iommu_lets_it_and_never_faults(rig):
    """dma_prefetch(): the bytes where every range is mapped; None where one
    is not, with no fault at all (the PE keeps working, VT-d records nothing)."""
    platform, m, dev = rig
    a = dev.container.dma_alloc(2 * 4096)
    a.write(4000, b"prefetched")
    bm = m.device(NIC).bus_master
    assert bytes(bm.dma_prefetch([a.iova + 4000, a.iova], [10, 2])) == b"prefetched" + a.read(0, 2)
    assert bm.dma_prefetch([a.iova, a.iova + (256 << 20)], [4, 4]) is None
    assert bm.dma_prefetch([a.iova + 2 * 4096 - 2], [4]) is None, "runs past the mapping"
    if platform == "powernv":
        assert not m.pe_of(NIC).eeh.dma_stopped and m.pe_of(NIC).dma_faults == 0
    elif platform == "x86":
        assert m.iommu_units[0].faults == 0


def test_a_burst_after_an_unmap_faults(rig):
    """The page cache a burst is translated through never serves an unmapped page."""
    _platform, m, dev = rig
    a = dev.container.dma_alloc(2 * 4096)
    bm = m.device(NIC).bus_master
    a.write(4096, b"hello")
    assert bytes(bm.dma_read_burst([a.iova + 4096, a.iova], [5, 1])) == b"hello\0"
    iova = a.iova
    a.close()
    assert bm.dma_prefetch([iova + 4096], [5]) is None
    with pytest.raises(devices.DmaError):
        bm.dma_read_burst([iova + 4096], [5])


def test_a_burst_write_under_dirty_tracking_marks_the_pages_dirty():
    """VT-d with second-stage dirty tracking on: a burst write sets the dirty
    bit of every page it writes, as single writes do."""
    from vfiosim.kernel.iommu.iommu import (IOMMU_READ, IOMMU_WRITE, DirtyRange, iommu_attach_group,
                                            iommu_detach_group, iommu_domain_free, iommu_map,
                                            iommu_read_and_clear_dirty, iommu_set_dirty_tracking, iommu_unmap)
    m = vfiosim.Machine.preset("x86")
    g = m.kernel.iommu_groups[4]
    dev = m.device("0000:01:00.0")            # the preset's first edu, alone in group 4
    m.iommu_units[0].dirty_tracking = True
    g.claim_dma_owner("me")
    d = m.iommu_units[0].domain_alloc_user(dev, nest_parent=False, dirty_tracking=True)
    iommu_attach_group(d, g)
    obj = m.kernel.phys.allocate(1 << 20)
    iommu_map(d, 0x100000, obj.phys_base, 1 << 20, IOMMU_READ | IOMMU_WRITE)
    dev.config.data[4] |= 0x4
    iommu_set_dirty_tracking(d, True)
    dev.bus_master.dma_write_burst([0x100000 + 0x3800, 0x100000 + 0x9000], [0x1000, 8], bytes(0x1008))
    assert iommu_read_and_clear_dirty(d, 0x100000, 1 << 20) == [DirtyRange(0x103000, 0x1000),
                                                                DirtyRange(0x104000, 0x1000),
                                                                DirtyRange(0x109000, 0x1000)]
    iommu_detach_group(d, g)
    iommu_unmap(d, 0x100000, 1 << 20)
    iommu_domain_free(d)
    g.release_dma_owner()


def test_host_memory_reads_and_writes_ranges_and_never_reaches_a_gone_image():
    """HostMemoryObject.read_ranges()/write_ranges(): the ranges of the
    process's memory in order; once the image is gone (exit, exec) the pages
    a pin still holds read as zeros and take writes without reaching the pid."""
    from vfiosim.transport.host import HostMemoryObject
    hp = HostProcess.open(os.getpid())
    buf = mmap.mmap(-1, 8192)
    base = ctypes.addressof(ctypes.c_char.from_buffer(buf))
    try:
        buf[0:8192] = bytes(range(256)) * 32
        obj = HostMemoryObject(hp, base, 8192, 12)
        out = bytearray(7)
        obj.read_ranges([10, 5000], [3, 4], memoryview(out))
        assert out == buf[10:13] + buf[5000:5004]
        obj.write_ranges([100, 4095, 101], [2, 2, 1], memoryview(b"abcdZ"))
        assert buf[100:102] == b"aZ" and buf[4095:4097] == b"cd"
        hp.gone = True
        obj.read_ranges([100, 4095], [2, 2], memoryview(out)[:4])
        assert out[:4] == b"\0\0\0\0"
        obj.write_ranges([0], [4], memoryview(b"gone"))
        obj.read_ranges([0], [4], memoryview(out)[:4])
        assert out[:4] == b"gone" and buf[0:4] == bytes(range(4)), "the process's memory is untouched"
    finally:
        hp.close()
        del base
        buf.close()
