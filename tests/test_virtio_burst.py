"""The virtio-net NIC's burst path: a whole burst of chains taken, moved and
published at once, with the faults and the virtio rules of the one-by-one
path (tests/test_virtio_net.py).

Rings here are placed by hand next to unmapped IOMMU pages, to check that
reading ahead (the whole available ring and descriptor table in one DMA)
never faults where the reads the device needs would not, and that a refused
DMA in the middle of a burst faults once, at that address, and moves
nothing.
"""

from __future__ import annotations

import struct

import pytest

import vfiosim
from vfiosim import client
from vfiosim.kernel.pci import virtio as V
from test_virtio_net import NIC, PLATFORMS, machine_toml, nic
from virtio_driver import BUF_SIZE, TX_HDR, VirtioNetDriver, frame

PAGE = 4096


@pytest.fixture(params=PLATFORMS)
def bare(request):
    """A driver that has negotiated, and a DMA area with a hole: pages
    [0, 2) mapped at ``base``, page 2 not mapped, pages [3, 6) mapped."""
    m = vfiosim.Machine.from_toml(machine_toml(request.param))
    dev = client.open_device("1af4:1041", m.spawn(uid=0))
    drv = VirtioNetDriver(dev)
    dev.enable_bus_master()
    assert drv.negotiate()
    probe = dev.container.dma_alloc(PAGE)
    base = probe.iova + (32 << 20)
    low = dev.container.dma_alloc(2 * PAGE, iova=base)
    high = dev.container.dma_alloc(3 * PAGE, iova=base + 3 * PAGE)
    yield request.param, m, drv, base, low, high
    dev.close()
    assert not m.oopses, m.oopses


def program_queue(drv: VirtioNetDriver, index: int, size: int, desc: int, avail: int, used: int) -> None:
    drv.w16(V.COMMON_Q_SELECT, index)
    drv.w16(V.COMMON_Q_SIZE, size)
    for off, addr in ((V.COMMON_Q_DESCLO, desc), (V.COMMON_Q_AVAILLO, avail), (V.COMMON_Q_USEDLO, used)):
        drv.w32(off, addr & 0xFFFFFFFF)
        drv.w32(off + 4, addr >> 32)
    drv.w16(V.COMMON_Q_ENABLE, 1)


def kick(drv: VirtioNetDriver, index: int) -> None:
    drv.bar.write16(drv.caps.notify + index * drv.caps.notify_mult, index)


def faulted(platform: str, m: vfiosim.Machine) -> bool:
    if platform == "powernv":
        return m.pe_of(NIC).eeh.dma_stopped
    if platform == "x86":
        return m.iommu_units[0].faults > 0
    return m.pe_of(NIC).dma_faults > 0


def test_a_notification_with_nothing_available_reads_no_descriptor(bare):
    """The descriptor table is read only once a chain is available: a queue
    whose table is not mapped faults at the first chain, not before."""
    platform, m, drv, base, low, high = bare
    hole = base + 2 * PAGE
    program_queue(drv, 1, 16, hole, low.iova, high.iova)
    drv.w8(V.COMMON_STATUS, drv.status() | V.STATUS_DRIVER_OK)
    kick(drv, 1)
    assert not nic(m).broken and not faulted(platform, m)
    low.write(4, struct.pack("<H", 0))           # entry 0: descriptor 0
    low.write(2, struct.pack("<H", 1))           # idx 1
    kick(drv, 1)
    assert nic(m).broken and faulted(platform, m)
    assert f"{hole:#x}" in nic(m).errors[0]


def test_only_the_available_entries_the_device_takes_are_read(bare):
    """An available ring that runs into an unmapped page: its first entries
    work (the device reads ahead only where the IOMMU lets it, and otherwise
    reads the entries it takes); the first entry in the hole faults."""
    platform, m, drv, base, low, high = bare
    avail = base + 2 * PAGE - 8                  # flags, idx and entries 0 and 1 mapped; the rest in the hole
    bufs = high.iova + PAGE
    program_queue(drv, 0, 256, high.iova + 2 * PAGE, high.iova + 2 * PAGE + 16 * 16, high.iova + 2 * PAGE + 1024)
    program_queue(drv, 1, 256, high.iova, avail, low.iova)
    drv.w8(V.COMMON_STATUS, drv.status() | V.STATUS_DRIVER_OK)
    for i in range(2):
        high.write(PAGE + 128 * i, TX_HDR + frame(i))
        high.write(16 * i, struct.pack("<QIHH", bufs + 128 * i, len(TX_HDR) + 64, 0, 0))
        low.write(2 * PAGE - 4 + 2 * i, struct.pack("<H", i))
    low.write(2 * PAGE - 6, struct.pack("<H", 2))
    kick(drv, 1)
    n = nic(m)
    assert not n.broken and not faulted(platform, m)
    assert n.stats["tx_frames"] == 2
    assert struct.unpack_from("<H", low.read(2, 2))[0] == 2, "both published in the used ring"
    low.write(2 * PAGE - 6, struct.pack("<H", 3))    # entry 2 is in the hole
    kick(drv, 1)
    assert n.broken and faulted(platform, m)
    assert f"{base + 2 * PAGE:#x}" in n.errors[0]


def test_used_entries_land_before_a_refused_index_write(bare):
    """A used ring whose index is in an unmapped page and its entries in the
    next, mapped, page: the entries are written, then the index write is
    refused (separate DMAs in the spec's order, as a device makes them)."""
    platform, m, drv, base, low, high = bare
    used = high.iova - 4                         # flags and idx in the hole, the ring in ``high``
    program_queue(drv, 1, 16, low.iova, low.iova + 256, used)
    drv.w8(V.COMMON_STATUS, drv.status() | V.STATUS_DRIVER_OK)
    low.write(PAGE, TX_HDR + frame(7))
    low.write(16 * 5, struct.pack("<QIHH", low.iova + PAGE, len(TX_HDR) + 64, 0, 0))
    low.write(256 + 4, struct.pack("<H", 5))
    low.write(256 + 2, struct.pack("<H", 1))
    kick(drv, 1)
    n = nic(m)
    assert n.broken and faulted(platform, m)
    assert struct.unpack("<II", high.read(0, 8)) == (5, 0) and f"{used + 2:#x}" in n.errors[0]


def test_a_refused_buffer_in_a_burst_faults_once_and_moves_nothing(bare):
    """32 frames in one notification, the 20th buffer not mapped: one fault
    at that buffer, no frame sent, no receive buffer written, nothing
    published."""
    platform, m, drv, base, low, high = bare
    rx = drv.setup_queue(0, 64)
    tx = drv.setup_queue(1, 64)
    rxb = drv.dev.container.dma_alloc(BUF_SIZE * 64)
    txb = drv.dev.container.dma_alloc(BUF_SIZE * 64)
    for i in range(64):
        rx.set_desc(i, rxb.iova + BUF_SIZE * i, BUF_SIZE, V.VRING_DESC_F_WRITE)
        rx.make_available(i, notify=False)
    drv.w8(V.COMMON_STATUS, drv.status() | V.STATUS_DRIVER_OK)
    hole = base + 2 * PAGE
    for i in range(32):
        txb.write(BUF_SIZE * i, TX_HDR + frame(i))
        tx.set_desc(i, hole + 100 if i == 19 else txb.iova + BUF_SIZE * i, len(TX_HDR) + 64)
        tx.make_available(i, notify=False)
    tx.kick()
    n = nic(m)
    assert n.broken and faulted(platform, m) and f"{hole + 100:#x}" in n.errors[0]
    if platform == "powernv":
        assert m.pe_of(NIC).eeh.freeze_count == 1
    elif platform == "x86":
        assert m.iommu_units[0].faults == 1
    assert n.stats["tx_frames"] == 0 and n.stats["rx_frames"] == 0
    assert tx.used_idx() == 0 and rx.used_idx() == 0
    assert rxb.read(0, BUF_SIZE * 64) == bytes(BUF_SIZE * 64)
    for mem in (rxb, txb):
        mem.close()
