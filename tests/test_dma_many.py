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
    """readv and device_writev: every range in one foreign call, through the
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
    assert hp.readv([(base_rw, 4), (base_rw + 5000, 3)]) == [b"ABCD", b"xyz"]
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
        hp.device_writev([(base_rw + 100, memoryview(b"12")), (base_rw + 200, memoryview(b"34"))])
        assert rw[100:102] == b"12" and rw[200:202] == b"34"
        pieces = [(base_rw + 300, memoryview(b"56")), (base_ro + 8, memoryview(b"ro!"))]
        if overrides:
            hp.device_writev(pieces)
            assert ro[8:11] == b"ro!"
        else:
            with pytest.raises(KernelError):
                hp.device_writev(pieces)
            assert ro[8:11] == b"\0\0\0"
        assert rw[300:302] == b"56"
    finally:
        libc.mprotect(ctypes.c_void_p(base_ro), 4096, mmap.PROT_READ | mmap.PROT_WRITE)
        hp.close()
