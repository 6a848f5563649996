"""virtio-net's native burst path (kernel/pci/virtio_native.py, _vring.c)
against the Python path it stands in for.

The differential test drives two identical machines through the same ring
states, one with the native path off, and compares everything a driver or
the machine can see: guest memory, ring indices, stats, the loopback's
accounting, errors, interrupts and IOMMU faults.  The others check that a
translation the native path holds never outlives the IOMMU entry it came
from (unmap, EEH freeze, bus mastering off, reset).
"""

from __future__ import annotations

import contextlib
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import vfiosim
from vfiosim import client
from vfiosim.kernel.pci import virtio as V
from vfiosim.kernel.pci import virtio_native
from test_virtio_net import NIC, machine_toml, nic
from virtio_driver import BUF_SIZE, TX_HDR, VirtioNetDriver, frame

pytestmark = pytest.mark.skipif(virtio_native._vring is None, reason="the native extension _vring is not built")

PLATFORMS = ["powernv", "x86"]
SIZE = 64


@contextlib.contextmanager
def native(on: bool):
    was = virtio_native.ENABLED
    virtio_native.ENABLED = on
    try:
        yield
    finally:
        virtio_native.ENABLED = was


class Side:
    """One machine and its driver, every step taken with the native path on or off."""

    def __init__(self, platform: str, use_native: bool, rx_buffers: int) -> None:
        self.platform = platform
        self.use_native = use_native
        self.m = vfiosim.Machine.from_toml(machine_toml(platform))
        self.dev = client.open_device("1af4:1041", self.m.spawn(uid=0))
        self.drv = VirtioNetDriver(self.dev)
        with native(use_native):
            self.drv.start(rx_buffers=0, queue_size=SIZE)
        self.next_rx = 0
        self.hole = self.drv.tx_bufs.iova + BUF_SIZE * SIZE + (64 << 20)
        self.post(rx_buffers, BUF_SIZE)

    def post(self, k: int, length: int) -> None:
        rx = self.drv.rx
        with native(self.use_native):
            for _ in range(k):
                if (self.next_rx - nic(self.m).queues[0].used_idx) & 0xFFFF >= SIZE:
                    break
                i = self.next_rx % SIZE
                rx.set_desc(i, self.drv.rx_bufs.iova + BUF_SIZE * i, length, V.VRING_DESC_F_WRITE)
                rx.make_available(i, notify=False)
                self.next_rx += 1

    def send(self, sizes: list[int], odd: str, at: int) -> None:
        drv, tx = self.drv, self.drv.tx
        q = nic(self.m).queues[1]
        with native(self.use_native):
            for j, size in enumerate(sizes):
                if (tx.avail_idx - q.used_idx) & 0xFFFF >= SIZE:
                    break
                i = tx.avail_idx % SIZE
                data = TX_HDR + frame(j, size) if size >= 14 else TX_HDR[:size]
                drv.tx_bufs.write(BUF_SIZE * i, data)
                addr, length, flags = drv.tx_bufs.iova + BUF_SIZE * i, len(data), 0
                if j == at:
                    if odd == "unmapped":
                        addr = self.hole
                    elif odd == "chained":
                        flags = V.VRING_DESC_F_NEXT
                    elif odd == "writable":
                        flags = V.VRING_DESC_F_WRITE
                tx.set_desc(i, addr, length, flags, (i + 1) % SIZE)
                tx.make_available(i, notify=False)
            tx.kick()

    def reap(self) -> None:
        self.drv.rx.reap()
        self.drv.tx.reap()

    def state(self) -> dict:
        n = nic(self.m)
        drv = self.drv
        pe = self.m.pe_of(NIC) if self.platform == "powernv" else None
        return {
            "memory": [bytes(mem.read(0, mem.size)) for mem in (drv.rx.mem, drv.tx.mem, drv.rx_bufs, drv.tx_bufs)],
            "queues": [(q.last_avail, q.used_idx, q.used_flags, q.chains_taken) for q in n.queues],
            "snapshot": n.snapshot(), "errors": list(n.errors), "isr": n.isr, "intx": n.intx_level,
            "loopback": n.backend.stats(), "new_frames": list(n.backend.new_frames),
            "faults": (pe.eeh.freeze_count, pe.eeh.dma_stopped) if pe else self.m.iommu_units[0].faults,
        }

    def close(self) -> None:
        self.drv.close()
        self.dev.close()
        assert not self.m.oopses, self.m.oopses


step = st.one_of(
    st.tuples(st.just("post"), st.integers(0, 40), st.sampled_from([BUF_SIZE, BUF_SIZE, 40])),
    st.tuples(st.just("send"),
              st.one_of(st.lists(st.just(64), min_size=1, max_size=40),
                        st.lists(st.sampled_from([64, 0, 5, 14, 60, 200, 1514]), min_size=1, max_size=40)),
              st.sampled_from(["", "", "", "", "unmapped", "chained", "writable"]), st.integers(0, 39)),
    st.tuples(st.just("flags"), st.integers(0, 1), st.sampled_from([0, V.VRING_AVAIL_F_NO_INTERRUPT])),
    st.tuples(st.just("reap")),
)


@pytest.mark.parametrize("platform", PLATFORMS)
@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(rx_buffers=st.integers(0, SIZE), steps=st.lists(step, min_size=1, max_size=8))
def test_the_native_path_does_what_the_python_path_does(platform, rx_buffers, steps):
    sides = [Side(platform, False, rx_buffers), Side(platform, True, rx_buffers)]
    try:
        for s in sides:
            # The receive ring's flags first: interrupts are what a polling driver turns off.
            s.drv.rx.set_avail_flags(V.VRING_AVAIL_F_NO_INTERRUPT)
            s.drv.tx.set_avail_flags(V.VRING_AVAIL_F_NO_INTERRUPT)
        for op in steps:
            for s in sides:
                if op[0] == "post":
                    s.post(op[1], op[2])
                elif op[0] == "send":
                    s.send(op[1], op[2], op[3])
                elif op[0] == "flags":
                    (s.drv.rx if op[1] == 0 else s.drv.tx).set_avail_flags(op[2])
                else:
                    s.reap()
            assert sides[0].state() == sides[1].state(), op
        assert not nic(sides[0].m).native_stats["bursts"]
    finally:
        for s in sides:
            s.close()


@pytest.mark.parametrize("platform", PLATFORMS)
def test_the_differential_rig_exercises_the_native_path(platform):
    """The rig of the test above, in its common case, runs bursts natively
    (so the comparison is not between two runs of the Python path)."""
    s = Side(platform, True, SIZE)
    try:
        s.drv.rx.set_avail_flags(V.VRING_AVAIL_F_NO_INTERRUPT)
        s.drv.tx.set_avail_flags(V.VRING_AVAIL_F_NO_INTERRUPT)
        for _ in range(3):
            s.send([64] * 32, "", 0)
            s.reap()
            s.post(32, BUF_SIZE)
        n = nic(s.m)
        assert n.native_stats["bursts"] == 3 and n.stats["rx_frames"] == 96
        lb = n.backend.stats()
        assert lb["new"] == 32 and lb["returned"] == 64, "the same 32 frames sent three times"
    finally:
        s.close()


# -- translations never outlive the IOMMU's entries --------------------------------------------------------------


@pytest.fixture(params=PLATFORMS)
def polling(request):
    """A driver as DPDK's PMD runs: no interrupts, the receive ring kept full,
    one burst already through the native path."""
    m = vfiosim.Machine.from_toml(machine_toml(request.param))
    dev = client.open_device("1af4:1041", m.spawn(uid=0))
    drv = VirtioNetDriver(dev)
    drv.start(rx_buffers=SIZE, queue_size=SIZE)
    drv.rx.set_avail_flags(V.VRING_AVAIL_F_NO_INTERRUPT)
    drv.tx.set_avail_flags(V.VRING_AVAIL_F_NO_INTERRUPT)
    extra = dev.container.dma_alloc(BUF_SIZE)
    with native(True):
        burst(drv, extra)
    n = nic(m)
    assert n.native_stats["bursts"] == 1 and n.stats["rx_frames"] == 4, n.native_stats
    yield request.param, m, dev, drv, extra
    drv.close()
    dev.close()
    assert not m.oopses, m.oopses


def burst(drv: VirtioNetDriver, mem, last: int = 3, notify: bool = True) -> None:
    """Four frames, the last one (``frame(last)``) from ``mem``."""
    for j in range(4):
        i = drv.tx.avail_idx % SIZE
        if j == 3:
            mem.write(0, TX_HDR + frame(last))
            drv.tx.set_desc(i, mem.iova, len(TX_HDR) + 64)
        else:
            drv.tx_bufs.write(BUF_SIZE * i, TX_HDR + frame(j))
            drv.tx.set_desc(i, drv.tx_bufs.iova + BUF_SIZE * i, len(TX_HDR) + 64)
        drv.tx.make_available(i, notify=False)
    if notify:
        with native(True):
            drv.tx.kick()


def faulted(platform: str, m: vfiosim.Machine) -> bool:
    if platform == "powernv":
        return m.pe_of(NIC).eeh.dma_stopped
    return m.iommu_units[0].faults > 0


def test_an_unmapped_buffer_faults_after_the_native_path_used_it(polling):
    """UNMAP_DMA (Type1) or the TCE clear (sPAPR) of a buffer the native path
    translated before: the next burst that names it faults at it, as the
    Python path does, and nothing of the burst moves."""
    platform, m, dev, drv, extra = polling
    iova = extra.iova
    n = nic(m)
    rx_before = n.stats["rx_frames"]
    extra.close()                                # the IOMMU entry goes; the device is not told
    for j in range(4):
        i = drv.tx.avail_idx % SIZE
        drv.tx.set_desc(i, iova if j == 3 else drv.tx_bufs.iova + BUF_SIZE * i, len(TX_HDR) + 64)
        drv.tx.make_available(i, notify=False)
    with native(True):
        drv.tx.kick()
    assert n.broken and faulted(platform, m) and f"{iova:#x}" in n.errors[0]
    assert n.stats["rx_frames"] == rx_before and n.stats["tx_frames"] == rx_before
    assert n.native_stats["bursts"] == 1, "the burst went the Python path"


def test_a_remapped_iova_is_translated_anew(polling):
    """The same bus address mapped again onto other memory: the native path
    reads the new memory, not the page it knew."""
    platform, m, dev, drv, extra = polling
    iova = extra.iova
    extra.close()
    again = dev.container.dma_alloc(BUF_SIZE, iova=iova)
    drv.rx.reap()
    for i in range(4):
        drv.post_rx(i)
    burst(drv, again, last=99)
    got = drv.received()
    n = nic(m)
    assert not n.broken and got[-1] == frame(99)
    assert n.backend.stats()["new"] == 5 and n.native_stats["bursts"] == 2
    again.close()


def test_an_eeh_freeze_stops_the_native_path(polling):
    platform, m, dev, drv, extra = polling
    n = nic(m)
    if platform == "powernv":
        m.pe_of(NIC).eeh.freeze("test: frozen by hand")
    else:
        dev.config.write16(0x04, dev.config.read16(0x04) & ~0x4)      # bus mastering off
    before = n.stats["tx_frames"]
    burst(drv, extra)
    assert n.stats["tx_frames"] == before and n.native_stats["bursts"] == 1
    if platform == "x86":
        assert n.broken and "bus mastering is disabled" in n.errors[0]


def test_a_device_reset_drops_the_native_translations(polling):
    platform, m, dev, drv, extra = polling
    n = nic(m)
    assert n.native_pages.count
    drv.reset()
    assert not n.native_pages.count and not n.native_pages.sources
