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

import collections
import random
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import vfiosim
from vfiosim import client
from vfiosim.kernel.pci import virtio as V
from vfiosim.kernel.pci.net_backends import Frames, Loopback
from vfiosim.kernel.pci.virtio_net import RX_HEADER, VIRTIO_NET_HDR_LEN
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


# -- frames in bursts: the device and the wire ---------------------------------------------------------------------


@pytest.fixture(params=PLATFORMS)
def rig(request):
    m = vfiosim.Machine.from_toml(machine_toml(request.param))
    dev = client.open_device("1af4:1041", m.spawn(uid=0))
    drv = VirtioNetDriver(dev)
    yield m, drv
    drv.close()
    dev.close()
    assert not m.oopses, m.oopses


def send_burst(drv: VirtioNetDriver, frames: list[bytes]) -> None:
    """Frames made available in one go, one notification (as rte_eth_tx_burst)."""
    for f in frames:
        drv.send(f, notify=False)
    drv.tx.kick()


def test_a_burst_of_frames_of_every_size_comes_back_byte_for_byte(rig):
    """One notification, 32 frames of 60 to 1514 bytes: all delivered in one
    pass, each after a virtio_net_hdr of num_buffers 1, in order; sent back,
    the loopback counts every one as a round trip."""
    m, drv = rig
    drv.start(rx_buffers=64, queue_size=64)
    sent = [frame(i, 60 + (i * 47) % 1455) for i in range(32)]
    notifications = nic(m).notifications
    send_burst(drv, sent)
    assert nic(m).notifications == notifications + 1
    assert drv.received() == sent
    assert [h for h, _ in drv.tx.reap()] == list(range(32))
    lo = nic(m).backend
    assert (lo.sent, lo.new, lo.returned, lo.received) == (32, 32, 0, 32)
    send_burst(drv, sent)
    assert drv.received() == sent
    assert (lo.sent, lo.new, lo.returned, lo.received) == (64, 32, 32, 64)
    assert nic(m).stats["tx_bytes"] == nic(m).stats["rx_bytes"] == 2 * sum(map(len, sent))


def test_a_frame_too_large_for_its_buffer_in_a_burst_goes_one_by_one(rig):
    """A receive buffer in the middle of the ring is too small: the frames
    before it are delivered; each frame that does not fit it is dropped and
    the buffer kept for the next (as one frame at a time always did); a
    larger frame later fits it."""
    m, drv = rig
    drv.start(rx_buffers=0, queue_size=64)
    for i in range(16):
        drv.rx.set_desc(i, drv.rx_bufs.iova + BUF_SIZE * i, 100 if i == 5 else BUF_SIZE, V.VRING_DESC_F_WRITE)
        drv.rx.make_available(i, notify=False)
    sent = [frame(i, 64 if i < 5 else 200) for i in range(8)] + [frame(8, 60)]
    send_burst(drv, sent)
    assert drv.received() == sent[:5] + sent[8:]
    assert nic(m).stats["rx_dropped"] == 3
    assert [h for h, _ in drv.rx.reap()] == [] and drv.rx.last_used == 6


class Wire:
    """A backend with the per-frame interface only (a user's own)."""

    name = "wire"

    def __init__(self) -> None:
        self.frames: list[bytes] = []
        self.sent: list[bytes] = []

    def transmit(self, frame: bytes) -> bool:
        return self.transmit_many([frame]) == 1

    def transmit_many(self, frames: list[bytes]) -> int:
        self.sent += frames
        self.frames += frames
        return len(frames)

    def pending(self) -> int:
        return len(self.frames)

    def pop(self) -> bytes:
        return self.frames.pop(0)

    def reset(self) -> None:
        self.frames.clear()

    def stats(self) -> dict[str, int]:
        return {"sent": len(self.sent)}


def test_a_backend_with_only_the_per_frame_interface_still_works(rig):
    m, drv = rig
    wire = Wire()
    nic(m).set_backend(wire)
    drv.start(rx_buffers=32, queue_size=64)
    sent = [frame(i, 64 + i) for i in range(20)]
    send_burst(drv, sent)
    assert wire.sent == sent
    assert drv.received() == sent


@settings(max_examples=150, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["same", "changed", "shorter", "room", "receive", "transmit"]),
                          st.integers(1, 5), st.integers(0, 2**16)), max_size=20))
def test_the_loopbacks_whole_burst_shortcut_equals_its_general_accounting(ops):
    """Loopback.loop_through() takes a shortcut when the burst is the one
    batch handed out, sent back whole and unchanged (testpmd's steady state);
    against _loop_through() (the general accounting) on the same bursts --
    that burst, one with a byte or a frame changed, a shorter one, another
    header, with other batches handed out or waiting -- every count and what
    stays handed out agree."""
    fast, general = Loopback(capacity=8), Loopback(capacity=8)
    last: tuple[bytearray, list[int]] | None = None
    for op, k, seed in ops:
        rnd = random.Random(seed)
        if op in ("receive", "transmit"):
            for lo in (fast, general):
                if op == "receive":
                    lo.receive_frames(k, VIRTIO_NET_HDR_LEN)
                else:
                    lo.transmit_many([bytes([seed & 0xFF]) * (i + 1) for i in range(k)])
            last = None
            continue
        room = RX_HEADER if op != "room" else bytes(VIRTIO_NET_HDR_LEN)
        if op == "same" and last is not None:
            data, lens = bytearray(last[0]), list(last[1])
        else:
            lens = [rnd.randrange(1, 6) for _ in range(k)]
            data = bytearray(b"".join(room + bytes([rnd.randrange(2)]) * n for n in lens))
            if op == "changed" and last is not None:
                data, lens = bytearray(last[0]), list(last[1])
                data[-1] ^= 1
            elif op == "shorter" and last is not None and len(last[1]) > 1:
                lens = list(last[1][:-1])
                data = bytearray(last[0][:len(last[0]) - len(room) - last[1][-1]])
        fast.loop_through(bytearray(data), list(lens), room)
        general._loop_through(bytearray(data), list(lens), room)
        last = (data, lens)
        assert fast.stats() == general.stats()
        assert [b.tolist() for b in fast.handed] == [b.tolist() for b in general.handed]
        assert [(b.headroom, b.room) for b in fast.handed] == [(b.headroom, b.room) for b in general.handed]
        assert fast.in_flight == general.in_flight and fast.new_frames == general.new_frames

@settings(max_examples=150, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["send", "receive"]), st.integers(0, 6), st.integers(0, 3),
                          st.booleans(), st.integers(0, 2**16)), max_size=25))
def test_the_loopback_counts_round_trips_as_a_multiset_whatever_the_order(ops):
    """Loopback.sent/new/returned/received/in_flight against a plain model: a
    frame sent is a round trip if a frame byte for byte the same was handed
    out and not sent back yet.  Bursts sent back in the order handed out take
    the one-comparison path; any other order, duplicates, frames with another
    headroom or the per-frame interface take the other; the counts agree."""
    lo = Loopback(capacity=8)
    model = collections.Counter()
    waiting: collections.deque[bytes] = collections.deque()
    outstanding: list[bytes] = []             # handed out and not sent back, in the order handed out
    counts = collections.Counter()
    for op, k, new, in_order, seed in ops:
        rnd = random.Random(seed)
        if op == "receive":
            got = lo.receive_frames(k, VIRTIO_NET_HDR_LEN if in_order else 0).tolist()
            expect = [waiting.popleft() for _ in range(min(k, len(waiting)))]
            assert got == expect
            model.update(got)
            outstanding += got
            counts["received"] += len(got)
            continue
        batch = outstanding[:k] if in_order else rnd.sample(outstanding, min(k, len(outstanding)))
        batch += [bytes([rnd.randrange(3)] * rnd.randrange(1, 4)) for _ in range(new)]
        if seed % 3 == 0:
            taken = lo.transmit_many(batch)
        else:
            frames = Frames.pack(batch, VIRTIO_NET_HDR_LEN)
            if seed % 3 == 1:
                frames.fill_room(RX_HEADER)
            taken = lo.transmit_frames(frames)
        assert taken == min(len(batch), 8 - len(waiting))
        for f in batch[:taken]:
            counts["sent"] += 1
            if model[f]:
                model[f] -= 1
                outstanding.remove(f)
                counts["returned"] += 1
            else:
                counts["new"] += 1
        waiting.extend(batch[:taken])
        s = lo.stats()
        assert (s["sent"], s["new"], s["returned"], s["received"], s["waiting"], s["in_flight"]) == \
            (counts["sent"], counts["new"], counts["returned"], counts["received"], len(waiting),
             sum(model.values()))
