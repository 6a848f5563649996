"""A small virtio-net driver written with vfiosim.client, for tests/test_virtio_net.py.

It does what a userspace driver (DPDK's virtio PMD) does, in Python: finds
the virtio capabilities in config space, negotiates features (§3.1.1),
sets up split virtqueues in DMA memory it maps through the container, posts
receive buffers, sends frames and reaps what comes back.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from vfiosim import client
from vfiosim.kernel.pci import virtio as V
from vfiosim.kernel.pci.virtio_net import VIRTIO_NET_F_MAC, VIRTIO_NET_F_STATUS, VIRTIO_NET_HDR_LEN

DEFAULT_FEATURES = (1 << V.VIRTIO_F_VERSION_1 | 1 << V.VIRTIO_F_ACCESS_PLATFORM | 1 << VIRTIO_NET_F_MAC
                    | 1 << VIRTIO_NET_F_STATUS)
BUF_SIZE = 2048
TX_HDR = bytes(VIRTIO_NET_HDR_LEN)


def frame(n: int, size: int = 64) -> bytes:
    """A recognisable Ethernet frame: broadcast, EtherType 0x88b5 (local experimental), payload from n."""
    payload = bytes((n + i) & 0xFF for i in range(size - 14))
    return b"\xff" * 6 + b"\x52\x54\x00\xaa\xbb\xcc" + b"\x88\xb5" + payload


@dataclass
class Caps:
    common: int = -1
    isr: int = -1
    device: int = -1
    notify: int = -1
    notify_mult: int = 0
    pci_cfg: int = -1


class Ring:
    """A split virtqueue the driver owns: one DMA mapping for the three areas."""

    def __init__(self, drv: "VirtioNetDriver", index: int, size: int) -> None:
        self.drv = drv
        self.index = index
        self.size = size
        self.desc_off = 0
        self.avail_off = 16 * size
        self.used_off = (self.avail_off + 6 + 2 * size + 3) & ~3
        total = self.used_off + 6 + 8 * size
        self.mem = drv.dev.container.dma_alloc(total)
        self.mem.array()[:] = 0
        self.avail_idx = 0
        self.last_used = 0
        self.notify_off = 0

    @property
    def desc(self) -> int:
        return self.mem.iova + self.desc_off

    @property
    def avail(self) -> int:
        return self.mem.iova + self.avail_off

    @property
    def used(self) -> int:
        return self.mem.iova + self.used_off

    def set_desc(self, i: int, addr: int, length: int, flags: int = 0, nxt: int = 0) -> None:
        self.mem.write(self.desc_off + 16 * i, struct.pack("<QIHH", addr, length, flags, nxt))

    def make_available(self, head: int, notify: bool = True) -> None:
        self.mem.write(self.avail_off + 4 + 2 * (self.avail_idx % self.size), struct.pack("<H", head))
        self.avail_idx = (self.avail_idx + 1) & 0xFFFF
        self.mem.write(self.avail_off + 2, struct.pack("<H", self.avail_idx))
        if notify:
            self.kick()

    def set_avail_flags(self, flags: int) -> None:
        self.mem.write(self.avail_off, struct.pack("<H", flags))

    def kick(self) -> None:
        self.drv.bar.write16(self.drv.caps.notify + self.notify_off * self.drv.caps.notify_mult, self.index)

    def used_flags(self) -> int:
        return struct.unpack("<H", self.mem.read(self.used_off, 2))[0]

    def used_idx(self) -> int:
        return struct.unpack("<H", self.mem.read(self.used_off + 2, 2))[0]

    def reap(self) -> list[tuple[int, int]]:
        """(id, len) of the used entries since the last call."""
        out = []
        idx = self.used_idx()
        while self.last_used != idx:
            at = self.used_off + 4 + 8 * (self.last_used % self.size)
            out.append(struct.unpack("<II", self.mem.read(at, 8)))
            self.last_used = (self.last_used + 1) & 0xFFFF
        return out

    def close(self) -> None:
        self.mem.close()


class VirtioNetDriver:
    def __init__(self, dev: client.Device) -> None:
        self.dev = dev
        self.cfg = dev.config
        self.caps = self._find_caps()
        self.bar = dev.bar(V.MODERN_BAR)
        self.rings: dict[int, Ring] = {}
        self.rx_bufs = None
        self.tx_bufs = None

    def _find_caps(self) -> Caps:
        caps = Caps()
        pos = self.cfg.read8(0x34)
        while pos:
            cap_id, nxt = self.cfg.read8(pos), self.cfg.read8(pos + 1)
            if cap_id == 0x09:
                cfg_type, bar = self.cfg.read8(pos + 3), self.cfg.read8(pos + 4)
                offset = self.cfg.read32(pos + 8)
                if cfg_type == V.VIRTIO_PCI_CAP_COMMON_CFG:
                    caps.common = offset
                elif cfg_type == V.VIRTIO_PCI_CAP_ISR_CFG:
                    caps.isr = offset
                elif cfg_type == V.VIRTIO_PCI_CAP_DEVICE_CFG:
                    caps.device = offset
                elif cfg_type == V.VIRTIO_PCI_CAP_NOTIFY_CFG:
                    caps.notify = offset
                    caps.notify_mult = self.cfg.read32(pos + 16)
                elif cfg_type == V.VIRTIO_PCI_CAP_PCI_CFG:
                    caps.pci_cfg = pos
                assert cfg_type == V.VIRTIO_PCI_CAP_PCI_CFG or bar == V.MODERN_BAR
            pos = nxt
        return caps

    # -- common configuration ---------------------------------------------------------------------------

    def r8(self, off: int) -> int:
        return self.bar.read8(self.caps.common + off)

    def r16(self, off: int) -> int:
        return self.bar.read16(self.caps.common + off)

    def r32(self, off: int) -> int:
        return self.bar.read32(self.caps.common + off)

    def w8(self, off: int, v: int) -> None:
        self.bar.write8(self.caps.common + off, v)

    def w16(self, off: int, v: int) -> None:
        self.bar.write16(self.caps.common + off, v)

    def w32(self, off: int, v: int) -> None:
        self.bar.write32(self.caps.common + off, v)

    def status(self) -> int:
        return self.r8(V.COMMON_STATUS)

    def device_features(self) -> int:
        self.w32(V.COMMON_DFSELECT, 0)
        lo = self.r32(V.COMMON_DF)
        self.w32(V.COMMON_DFSELECT, 1)
        return self.r32(V.COMMON_DF) << 32 | lo

    def reset(self) -> None:
        self.w8(V.COMMON_STATUS, 0)
        assert self.status() == 0

    def negotiate(self, features: int = DEFAULT_FEATURES) -> bool:
        """§3.1.1 steps 1-6; True if the device accepted ``features``."""
        self.reset()
        self.w8(V.COMMON_STATUS, V.STATUS_ACKNOWLEDGE)
        self.w8(V.COMMON_STATUS, V.STATUS_ACKNOWLEDGE | V.STATUS_DRIVER)
        for sel in (0, 1):
            self.w32(V.COMMON_GFSELECT, sel)
            self.w32(V.COMMON_GF, features >> (32 * sel) & 0xFFFFFFFF)
        self.w8(V.COMMON_STATUS, V.STATUS_ACKNOWLEDGE | V.STATUS_DRIVER | V.STATUS_FEATURES_OK)
        return bool(self.status() & V.STATUS_FEATURES_OK)

    def setup_queue(self, index: int, size: int | None = None, vector: int = V.VIRTIO_MSI_NO_VECTOR) -> Ring:
        self.w16(V.COMMON_Q_SELECT, index)
        max_size = self.r16(V.COMMON_Q_SIZE)
        assert max_size, f"queue {index} is not there"
        if size is not None:
            self.w16(V.COMMON_Q_SIZE, size)
        size = self.r16(V.COMMON_Q_SIZE)
        ring = Ring(self, index, size)
        for off, addr in ((V.COMMON_Q_DESCLO, ring.desc), (V.COMMON_Q_AVAILLO, ring.avail),
                          (V.COMMON_Q_USEDLO, ring.used)):
            self.w32(off, addr & 0xFFFFFFFF)
            self.w32(off + 4, addr >> 32)
        self.w16(V.COMMON_Q_MSIX, vector)
        ring.notify_off = self.r16(V.COMMON_Q_NOFF)
        self.w16(V.COMMON_Q_ENABLE, 1)
        self.rings[index] = ring
        return ring

    def start(self, *, rx_buffers: int = 16, queue_size: int | None = None, features: int = DEFAULT_FEATURES,
              vectors: tuple[int, int] = (V.VIRTIO_MSI_NO_VECTOR, V.VIRTIO_MSI_NO_VECTOR)) -> None:
        """Negotiate, set up receiveq1 and transmitq1, post ``rx_buffers``, DRIVER_OK."""
        self.dev.enable_bus_master()
        assert self.negotiate(features), "FEATURES_OK refused"
        self.rx = self.setup_queue(0, queue_size, vectors[0])
        self.tx = self.setup_queue(1, queue_size, vectors[1])
        self.rx_bufs = self.dev.container.dma_alloc(BUF_SIZE * self.rx.size)
        self.tx_bufs = self.dev.container.dma_alloc(BUF_SIZE * self.tx.size)
        for i in range(rx_buffers):
            self.post_rx(i)
        self.w8(V.COMMON_STATUS, self.status() | V.STATUS_DRIVER_OK)

    def post_rx(self, i: int, notify: bool = False) -> None:
        assert self.rx_bufs is not None
        self.rx.set_desc(i, self.rx_bufs.iova + BUF_SIZE * i, BUF_SIZE, V.VRING_DESC_F_WRITE)
        self.rx.make_available(i, notify=notify)

    def send(self, data: bytes, slot: int | None = None, notify: bool = True) -> int:
        """One descriptor holding the header and the frame; returns its index."""
        assert self.tx_bufs is not None
        i = self.tx.avail_idx % self.tx.size if slot is None else slot
        self.tx_bufs.write(BUF_SIZE * i, TX_HDR + data)
        self.tx.set_desc(i, self.tx_bufs.iova + BUF_SIZE * i, len(TX_HDR) + len(data))
        self.tx.make_available(i, notify=notify)
        return i

    def received(self) -> list[bytes]:
        """Frames in the used receive entries (the header checked and stripped)."""
        assert self.rx_bufs is not None
        out = []
        for head, length in self.rx.reap():
            raw = self.rx_bufs.read(BUF_SIZE * head, length)
            hdr = struct.unpack("<BBHHHHH", raw[:VIRTIO_NET_HDR_LEN])
            assert hdr == (0, 0, 0, 0, 0, 0, 1), hdr
            out.append(raw[VIRTIO_NET_HDR_LEN:])
        return out

    def device_config(self, off: int, n: int) -> bytes:
        return bytes(self.bar.read8(self.caps.device + off + i) for i in range(n))

    def read_isr(self) -> int:
        return self.bar.read8(self.caps.isr)

    def close(self) -> None:
        for ring in self.rings.values():
            ring.close()
        for m in (self.rx_bufs, self.tx_bufs):
            if m is not None:
                m.close()
