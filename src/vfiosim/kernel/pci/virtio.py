"""Virtio over PCI, modern interface (virtio 1.x), as a device sees it.

:class:`VirtioPciDevice` is the transport half of a virtio device model: the
PCI capabilities that point into its BARs, the common configuration
structure, notifications, the ISR, MSI-X vector routing, the device status
state machine and feature negotiation.  :class:`SplitQueue` is a split
virtqueue walked by the device.  A device type (virtio_net.py) subclasses
:class:`VirtioPciDevice` and says what its queues do.

Register semantics follow the OASIS virtio specification v1.2 (section
numbers below are "§" of virtio-v1.2-cs01) and, where the spec leaves a
choice, QEMU's hw/virtio/virtio-pci.c and hw/virtio/virtio.c.

BAR layout, as QEMU's virtio-pci with ``disable-legacy=on``:

* BAR1 (4 KiB, 32-bit): the MSI-X table at 0 and the PBA at 0x800
  (``msix_init_exclusive_bar``);
* BAR4 (16 KiB, 64-bit prefetchable): the common configuration at 0x0000,
  the ISR at 0x1000, the device configuration at 0x2000 and the notification
  area at 0x3000 (``notify_off_multiplier`` 4, queue N at 4*N).

Every access the device makes to the rings and buffers is a DMA through
``self.bus_master``, so it is translated by the IOMMU like any device's
(VIRTIO_F_ACCESS_PLATFORM, §6.1).  A refused DMA is a device error: the
device sets DEVICE_NEEDS_RESET, stops using its queues until it is reset,
and signals a configuration change (QEMU's ``virtio_error()``); the platform
has already done its part (an EEH freeze on PowerNV, a DMAR fault on x86).
"""

from __future__ import annotations

import array
import functools
import struct
import sys
from typing import Callable, Sequence

import numpy as np

from .config import PCI_CAP_ID_VNDR
from .device import DmaError, PciDevice, Register

VIRTIO_PCI_VENDOR_ID = 0x1AF4
VIRTIO_PCI_DEVICE_ID_BASE = 0x1040          # §4.1.2.1: 0x1040 + virtio device ID
VIRTIO_PCI_MODERN_REVISION = 1              # QEMU: pci_config_set_revision(config, 1)

# Feature bits (§6 Reserved Feature Bits).
VIRTIO_F_INDIRECT_DESC = 28
VIRTIO_F_EVENT_IDX = 29
VIRTIO_F_VERSION_1 = 32
VIRTIO_F_ACCESS_PLATFORM = 33
VIRTIO_F_RING_PACKED = 34
VIRTIO_F_IN_ORDER = 35
VIRTIO_F_ORDER_PLATFORM = 36
VIRTIO_F_NOTIFICATION_DATA = 38

# Device status (§2.1).
STATUS_ACKNOWLEDGE = 1
STATUS_DRIVER = 2
STATUS_DRIVER_OK = 4
STATUS_FEATURES_OK = 8
STATUS_DEVICE_NEEDS_RESET = 0x40
STATUS_FAILED = 0x80

VIRTIO_MSI_NO_VECTOR = 0xFFFF
VIRTIO_QUEUE_MAX = 1024                    # QEMU's VIRTIO_QUEUE_MAX: queue_select accepts less than this

# Capability cfg_type (§4.1.4).
VIRTIO_PCI_CAP_COMMON_CFG = 1
VIRTIO_PCI_CAP_NOTIFY_CFG = 2
VIRTIO_PCI_CAP_ISR_CFG = 3
VIRTIO_PCI_CAP_DEVICE_CFG = 4
VIRTIO_PCI_CAP_PCI_CFG = 5

# struct virtio_pci_common_cfg (§4.1.4.3).
COMMON_DFSELECT = 0x00
COMMON_DF = 0x04
COMMON_GFSELECT = 0x08
COMMON_GF = 0x0C
COMMON_MSIX = 0x10
COMMON_NUMQ = 0x12
COMMON_STATUS = 0x14
COMMON_CFGGENERATION = 0x15
COMMON_Q_SELECT = 0x16
COMMON_Q_SIZE = 0x18
COMMON_Q_MSIX = 0x1A
COMMON_Q_ENABLE = 0x1C
COMMON_Q_NOFF = 0x1E
COMMON_Q_DESCLO = 0x20
COMMON_Q_DESCHI = 0x24
COMMON_Q_AVAILLO = 0x28
COMMON_Q_AVAILHI = 0x2C
COMMON_Q_USEDLO = 0x30
COMMON_Q_USEDHI = 0x34

# The BARs (QEMU's virtio-pci layout).
MSIX_BAR = 1
MSIX_BAR_SIZE = 0x1000
MSIX_PBA_OFFSET = 0x800
MODERN_BAR = 4
MODERN_BAR_SIZE = 0x4000
COMMON_OFFSET, ISR_OFFSET, DEVICE_OFFSET, NOTIFY_OFFSET = 0x0000, 0x1000, 0x2000, 0x3000
REGION_SIZE = 0x1000
NOTIFY_OFF_MULTIPLIER = 4                  # QEMU without page-per-vq

# Split virtqueue layout (§2.7).
VRING_DESC_F_NEXT = 1
VRING_DESC_F_WRITE = 2
VRING_DESC_F_INDIRECT = 4
VRING_AVAIL_F_NO_INTERRUPT = 1
VRING_USED_F_NO_NOTIFY = 1
DESC_SIZE = 16
USED_ELEM_SIZE = 8
DESC_DTYPE = np.dtype([("addr", "<u8"), ("len", "<u4"), ("flags", "<u2"), ("next", "<u2")])
_LITTLE = sys.byteorder == "little"            # the rings are little-endian (VERSION_1)
_DESC = struct.Struct("<QIHH")


@functools.lru_cache(maxsize=None)
def _descs(n: int) -> struct.Struct:
    """``n`` consecutive descriptors."""
    return struct.Struct("<" + "QIHH" * n)


@functools.lru_cache(maxsize=None)
def _u16s(n: int) -> struct.Struct:
    return struct.Struct(f"<{n}H")


class VirtioError(Exception):
    """The driver broke a rule of the virtqueue, or a DMA of the device was
    refused: the device needs a reset (QEMU's virtio_error())."""


class Chain:
    """A descriptor chain the device took from the available ring: its head
    index and its buffers as (bus address, length, device-writable)."""

    __slots__ = ("head", "readable", "writable")

    def __init__(self, head: int, readable: list[tuple[int, int]], writable: list[tuple[int, int]]) -> None:
        self.head = head
        self.readable = readable          # driver -> device buffers, in order
        self.writable = writable          # device -> driver buffers, in order

    def readable_len(self) -> int:
        return sum(n for _, n in self.readable)

    def writable_len(self) -> int:
        return sum(n for _, n in self.writable)


class Burst:
    """The chains the device took from the available ring in one pass.

    When every chain is one descriptor (a NIC's usual case) ``addr``,
    ``lens`` and ``flags`` are those descriptors' fields, and ``writable``
    how many are device-writable: the device can move the whole burst in
    one scatter-gather DMA.  Otherwise ``addr`` is None and :meth:`chains`
    are the chains walked."""

    __slots__ = ("heads", "addr", "lens", "flags", "writable", "_chains")

    def __init__(self, heads: list[int], addr: list[int] | None = None, lens: list[int] | None = None,
                 flags: list[int] | None = None, writable: int = 0, chains: list[Chain] | None = None) -> None:
        self.heads = heads
        self.addr = addr
        self.lens = lens if lens is not None else []
        self.flags = flags if flags is not None else []
        self.writable = writable
        self._chains = chains

    def __len__(self) -> int:
        return len(self.heads)

    def chains(self) -> list[Chain]:
        if self._chains is None:
            assert self.addr is not None
            self._chains = [Chain(h, [], [(a, n)]) if f & VRING_DESC_F_WRITE else Chain(h, [(a, n)], [])
                            for h, a, n, f in zip(self.heads, self.addr, self.lens, self.flags)]
        return self._chains


def _one_block(ranges: list[tuple[int, int]]) -> bool:
    """All the ranges are in one naturally aligned 4 KiB block, so inside one
    IOMMU page (the smallest is 4 KiB): the IOMMU accepts or refuses them
    all alike, and one scatter-gather DMA is the same as one DMA each."""
    block = ranges[0][0] >> 12
    return all(a >> 12 == block and (a + n - 1) >> 12 == block for a, n in ranges)


class SplitQueue:
    """One split virtqueue, walked by the device (§2.7).

    The driver programs its size and the bus addresses of the three areas in
    the common configuration; they take effect when it writes 1 to
    ``queue_enable`` (QEMU's ``virtio_queue_set_rings()`` at Q_ENABLE).  The
    device keeps ``last_avail`` (the next available entry it will take) and
    ``used_idx`` (what it last published in the used ring)."""

    def __init__(self, dev: "VirtioPciDevice", index: int, max_size: int) -> None:
        self.dev = dev
        self.index = index
        self.max_size = max_size
        self.reset()

    def reset(self) -> None:
        # What the driver sees in the common configuration.
        self.size = self.max_size
        self.msix_vector = VIRTIO_MSI_NO_VECTOR
        self.enabled = False
        self.desc_reg = [0, 0]            # lo, hi
        self.avail_reg = [0, 0]
        self.used_reg = [0, 0]
        # What the device uses once enabled.
        self.num = 0
        self.desc = self.avail = self.used = 0
        self.last_avail = 0
        self.used_idx = 0
        self.used_flags = 0
        self.chains_taken = 0

    @staticmethod
    def _addr(reg: list[int]) -> int:
        return reg[1] << 32 | reg[0]

    def enable(self) -> None:
        self.num = self.size
        self.desc = self._addr(self.desc_reg)
        self.avail = self._addr(self.avail_reg)
        self.used = self._addr(self.used_reg)
        self.last_avail = 0
        self.used_idx = 0
        self.used_flags = 0
        self.enabled = True

    @property
    def ready(self) -> bool:
        return self.enabled and self.num > 0

    # -- DMA helpers: every access goes through the IOMMU ------------------------------------------------

    def _read(self, addr: int, n: int) -> bytes:
        try:
            return self.dev.bus_master.dma_read(addr, n)
        except DmaError as exc:
            raise VirtioError(f"queue {self.index}: {exc}") from None

    def _write(self, addr: int, data: bytes | bytearray | memoryview) -> None:
        try:
            self.dev.bus_master.dma_write(addr, data)
        except DmaError as exc:
            raise VirtioError(f"queue {self.index}: {exc}") from None

    # -- the available ring (driver area) ---------------------------------------------------------------

    def avail_flags_idx(self) -> tuple[int, int]:
        """``flags`` and ``idx`` of the available ring (one 4-byte read)."""
        flags, idx = struct.unpack("<HH", self._read(self.avail, 4))
        return flags, idx

    def pending(self) -> int:
        """How many entries the driver has made available that the device has not taken."""
        return self._new_entries(self.avail_flags_idx()[1])

    def _new_entries(self, idx: int) -> int:
        """The entries before the available ring's index ``idx`` not taken yet."""
        n = (idx - self.last_avail) & 0xFFFF
        if n > self.num:
            # QEMU virtqueue_num_heads(): "Guest moved used index from %u to %u".
            raise VirtioError(f"queue {self.index}: the driver moved the available index from "
                              f"{self.last_avail} to {idx}, more than the queue size {self.num} ahead")
        return n

    def take(self, limit: int) -> list[Chain]:
        """Take up to ``limit`` available descriptor chains (§2.7.13.2 in
        reverse: what the device does with what the driver made available)."""
        burst = self.take_burst(limit)
        return [] if burst is None else burst.chains()

    def take_burst(self, limit: int) -> Burst | None:
        """take(), as a :class:`Burst`; None when nothing is available.

        The available ring's index, then its new entries and the whole
        descriptor table (the driver made it available to the device:
        queue_desc, 16 * queue_size bytes), in that order (§2.7.13.3).
        Where the IOMMU lets all of the ring and the table through, one
        scatter-gather DMA reads them ahead; otherwise each read happens
        as needed, so a bad address faults exactly when that read is made."""
        num = self.num
        ring_len = 4 + 2 * num
        bm = self.dev.bus_master
        raw = bm.dma_prefetch([self.avail, self.desc], [ring_len, DESC_SIZE * num])
        n = min(self._new_entries(raw[2] | raw[3] << 8) if raw is not None else self.pending(), limit)
        if n == 0:
            return None
        start = self.last_avail % num
        first = min(n, num - start)
        if raw is None:
            iovas = [self.avail + 4 + 2 * start, self.desc]
            lens = [2 * first, DESC_SIZE * num]
            if first < n:
                iovas.insert(1, self.avail + 4)
                lens.insert(1, 2 * (n - first))
            try:
                got = bm.dma_read_burst(iovas, lens)
            except DmaError as exc:
                raise VirtioError(f"queue {self.index}: {exc}") from None
            # Laid out as the prefetch is: the ring (only the new entries filled in), then the table.
            raw = bytearray(ring_len) + got[2 * n:]
            raw[4 + 2 * start:4 + 2 * (start + first)] = got[:2 * first]
            raw[4:4 + 2 * (n - first)] = got[2 * first:2 * n]
        heads = list(_u16s(first).unpack_from(raw, 4 + 2 * start))
        if first < n:
            heads += _u16s(n - first).unpack_from(raw, 4)
        burst = self._single_descriptors(raw, ring_len, heads)
        if burst is None:
            table = np.frombuffer(raw, dtype=DESC_DTYPE, count=num, offset=ring_len)
            addrs = table["addr"].tolist()
            lens = table["len"].tolist()
            flags = table["flags"].tolist()
            nexts = table["next"].tolist()
            burst = Burst(heads, chains=[self._walk(h, addrs, lens, flags, nexts) for h in heads])
        self.last_avail = (self.last_avail + n) & 0xFFFF
        self.chains_taken += n
        return burst

    def _single_descriptors(self, raw: bytearray, at: int, heads: list[int]) -> Burst | None:
        """The burst when every chain is one descriptor (a NIC's usual case, no
        walk), from the descriptor table at ``raw[at:]``; else None."""
        n = len(heads)
        h0 = heads[0]
        if h0 + n <= self.num and heads[-1] == h0 + n - 1 and heads == list(range(h0, h0 + n)):
            # Consecutive descriptors (a driver that uses its ring in order): one unpack.
            fields = _descs(n).unpack_from(raw, at + DESC_SIZE * h0)
            addr, lens, flags = list(fields[0::4]), list(fields[1::4]), list(fields[2::4])
        else:
            if max(heads) >= self.num:
                return None
            found = [_DESC.unpack_from(raw, at + DESC_SIZE * h) for h in heads]
            addr, lens, flags = [d[0] for d in found], [d[1] for d in found], [d[2] for d in found]
        kinds = set(flags)
        if any(f & (VRING_DESC_F_NEXT | VRING_DESC_F_INDIRECT) for f in kinds):
            return None
        writable = 0
        if any(f & VRING_DESC_F_WRITE for f in kinds):
            writable = n if all(f & VRING_DESC_F_WRITE for f in kinds) else \
                sum(1 for f in flags if f & VRING_DESC_F_WRITE)
        return Burst(heads, addr, lens, flags, writable)

    def _walk(self, head: int, addrs: list[int], lens: list[int], flags: list[int], nexts: list[int]) -> Chain:
        """Follow one chain, as QEMU's virtqueue_split_pop(): indices in range,
        no loops, device-readable buffers before device-writable ones, an
        indirect table only if negotiated, alone and not nested."""
        num = self.num
        if head >= num:
            raise VirtioError(f"queue {self.index}: the driver made descriptor {head} available; "
                              f"the queue has {num}")
        readable: list[tuple[int, int]] = []
        writable: list[tuple[int, int]] = []
        i = head
        seen = 0
        limit = num
        indirect = False
        while True:
            f = flags[i]
            if f & VRING_DESC_F_INDIRECT:
                if indirect:
                    raise VirtioError(f"queue {self.index}: an indirect table inside an indirect table")
                if not self.dev.negotiated(VIRTIO_F_INDIRECT_DESC):
                    raise VirtioError(f"queue {self.index}: indirect descriptor without VIRTIO_F_INDIRECT_DESC")
                if f & VRING_DESC_F_NEXT or readable or writable:
                    raise VirtioError(f"queue {self.index}: an indirect descriptor must be alone in its chain")
                length = lens[i]
                if length == 0 or length % DESC_SIZE:
                    raise VirtioError(f"queue {self.index}: invalid size {length} of an indirect table")
                table = np.frombuffer(self._read(addrs[i], length), dtype=DESC_DTYPE)
                addrs, lens, flags, nexts = (table["addr"].tolist(), table["len"].tolist(),
                                             table["flags"].tolist(), table["next"].tolist())
                num = limit = len(addrs)
                indirect = True
                i = seen = 0
                continue
            seen += 1
            if seen > limit:
                raise VirtioError(f"queue {self.index}: looped descriptor chain from head {head}")
            if f & VRING_DESC_F_WRITE:
                writable.append((addrs[i], lens[i]))
            else:
                if writable:
                    raise VirtioError(f"queue {self.index}: a device-readable descriptor after a "
                                      f"device-writable one (chain {head})")
                readable.append((addrs[i], lens[i]))
            if not f & VRING_DESC_F_NEXT:
                break
            i = nexts[i]
            if i >= num:
                raise VirtioError(f"queue {self.index}: descriptor next index {i} out of range ({num})")
        return Chain(head, readable, writable)

    def unget(self, n: int) -> None:
        """Give back the last ``n`` chains taken (the device could not use them
        yet: QEMU's virtqueue_unpop())."""
        self.last_avail = (self.last_avail - n) & 0xFFFF
        self.chains_taken -= n

    # -- buffers ------------------------------------------------------------------------------------------

    def gather(self, chain: Chain) -> bytes:
        """The device-readable bytes of a chain."""
        return self.gather_many([chain])[0]

    def gather_many(self, chains: list[Chain]) -> list[bytes]:
        """The device-readable bytes of each chain, read in one scatter-gather
        DMA (every range is checked first)."""
        segs = [seg for c in chains for seg in c.readable]
        bm = self.dev.bus_master
        try:
            parts = bm.dma_read_many(segs)
        except DmaError as exc:
            raise VirtioError(f"queue {self.index}: {exc}") from None
        out = []
        pos = 0
        for c in chains:
            k = len(c.readable)
            out.append(parts[pos] if k == 1 else b"".join(parts[pos:pos + k]))
            pos += k
        return out

    def scatter(self, chain: Chain, data: bytes | bytearray | memoryview) -> int:
        """Write ``data`` into the chain's device-writable buffers; returns the
        bytes written (less than ``len(data)`` if the buffers are too small)."""
        return self.scatter_many([(chain, data)])[0]

    def scatter_many(self, items: Sequence[tuple[Chain, bytes | bytearray | memoryview]]) -> list[int]:
        """Scatter each data into its chain's writable buffers, in one
        scatter-gather DMA."""
        segs: list[tuple[int, memoryview]] = []
        written = []
        for chain, data in items:
            view = memoryview(data)
            done = 0
            for addr, n in chain.writable:
                if done >= len(view):
                    break
                part = view[done:done + n]
                segs.append((addr, part))
                done += len(part)
            written.append(done)
        bm = self.dev.bus_master
        try:
            bm.dma_write_many(segs)
        except DmaError as exc:
            raise VirtioError(f"queue {self.index}: {exc}") from None
        return written

    # -- the used ring (device area) ---------------------------------------------------------------------

    def publish(self, elems: list[tuple[int, int]]) -> None:
        """Put (descriptor head, bytes written) entries in the used ring, then
        advance its ``idx`` (§2.7.8: the entries before the index)."""
        if elems:
            heads, lens = zip(*elems)
            self.publish_burst(list(heads), list(lens))

    def publish_burst(self, heads: list[int], lens: list[int]) -> None:
        """publish() of a burst: the entries, then the index, in one DMA when
        they share an IOMMU page, else one DMA each, in that order."""
        n = len(heads)
        if not n:
            return
        num = self.num
        start = self.used_idx % num
        first = min(n, num - start)
        elems = array.array("I", bytes(USED_ELEM_SIZE * n))
        elems[0::2] = array.array("I", heads)
        elems[1::2] = array.array("I", lens)
        if not _LITTLE:
            elems.byteswap()
        used_idx = (self.used_idx + n) & 0xFFFF
        data = elems.tobytes() + used_idx.to_bytes(2, "little")
        ranges = [(self.used + 4 + USED_ELEM_SIZE * start, USED_ELEM_SIZE * first)]
        if first < n:
            ranges.append((self.used + 4, USED_ELEM_SIZE * (n - first)))
        ranges.append((self.used + 2, 2))
        self.used_idx = used_idx
        if _one_block(ranges):
            try:
                self.dev.bus_master.dma_write_burst([a for a, _ in ranges], [ln for _, ln in ranges], data)
            except DmaError as exc:
                raise VirtioError(f"queue {self.index}: {exc}") from None
            return
        pos = 0
        for addr, ln in ranges:
            self._write(addr, data[pos:pos + ln])
            pos += ln

    def set_notify(self, enabled: bool) -> None:
        """VRING_USED_F_NO_NOTIFY (§2.7.10): whether the driver should notify
        the device when it makes buffers available."""
        flags = self.used_flags & ~VRING_USED_F_NO_NOTIFY if enabled else self.used_flags | VRING_USED_F_NO_NOTIFY
        if flags != self.used_flags:
            self.used_flags = flags
            self._write(self.used, struct.pack("<H", flags))

    def interrupt_wanted(self) -> bool:
        """After publishing: the driver did not suppress used buffer
        notifications (VRING_AVAIL_F_NO_INTERRUPT, §2.7.7; no EVENT_IDX)."""
        flags, _idx = self.avail_flags_idx()
        return not flags & VRING_AVAIL_F_NO_INTERRUPT


QueueHandler = Callable[[SplitQueue], None]


class VirtioPciDevice(PciDevice):
    """A modern (virtio 1.x, non-transitional) virtio PCI device.

    Subclasses pass their virtio device ID, the feature bits they offer
    (VERSION_1 and ACCESS_PLATFORM are always offered and required) and the
    maximum size of each queue, and implement :meth:`queue_notify` (the
    driver made buffers available), :meth:`device_config` (the bytes of the
    device-specific configuration) and optionally :meth:`device_reset`,
    :meth:`device_start` and :meth:`device_config_write`."""

    def __init__(self, bdf: str, *, virtio_id: int, class_code: int, features: int, queue_sizes: list[int],
                 msix_vectors: int, dma_mask: int = (1 << 64) - 1) -> None:
        super().__init__(bdf, vendor=VIRTIO_PCI_VENDOR_ID, device=VIRTIO_PCI_DEVICE_ID_BASE + virtio_id,
                         class_code=class_code, revision=VIRTIO_PCI_MODERN_REVISION,
                         subsystem_vendor=0x1AF4, subsystem=0x1100, interrupt_pin=1)
        self.dma_mask = dma_mask
        self.host_features = features | 1 << VIRTIO_F_VERSION_1 | 1 << VIRTIO_F_ACCESS_PLATFORM
        self.add_bar(MSIX_BAR, MSIX_BAR_SIZE)
        self.add_bar(MODERN_BAR, MODERN_BAR_SIZE, is_64bit=True, prefetchable=True)
        # The capabilities in QEMU's order: common, ISR, device, notify, PCI cfg access; then MSI-X.
        self._vendor_cap(VIRTIO_PCI_CAP_COMMON_CFG, COMMON_OFFSET, REGION_SIZE)
        self._vendor_cap(VIRTIO_PCI_CAP_ISR_CFG, ISR_OFFSET, REGION_SIZE)
        self._vendor_cap(VIRTIO_PCI_CAP_DEVICE_CFG, DEVICE_OFFSET, REGION_SIZE)
        self._vendor_cap(VIRTIO_PCI_CAP_NOTIFY_CFG, NOTIFY_OFFSET, REGION_SIZE, extra=NOTIFY_OFF_MULTIPLIER)
        self.pci_cfg_cap = self._vendor_cap(VIRTIO_PCI_CAP_PCI_CFG, 0, 0, extra=0)
        # bar, offset, length and pci_cfg_data are driver-writable (QEMU's cfg_mask).
        c = self.pci_cfg_cap
        self.config.wmask[c + 4] = 0xFF
        self.config.wmask[c + 8:c + 20] = b"\xff" * 12
        self.add_msix_capability(msix_vectors, table_bar=MSIX_BAR, table_offset=0, pba_offset=MSIX_PBA_OFFSET)
        # The notification area is a doorbell: a store starts work, and the CPU
        # does not wait for it (a posted PCIe write), so a transport may post it
        # and let the program run on while the device takes the buffers, as
        # real hardware does.  Everything else in the BAR stays undeclared:
        # reached at once, in order.
        self.declare_registers(MODERN_BAR, Register(NOTIFY_OFFSET, REGION_SIZE))
        self.finish()
        self.queues = [SplitQueue(self, i, size) for i, size in enumerate(queue_sizes)]
        self.notifications = 0            # queue notifications the driver wrote
        self.interrupts = 0               # used buffer and configuration notifications sent
        self.errors: list[str] = []       # device errors (DEVICE_NEEDS_RESET), for introspection
        self.generation = 0               # config_generation (not changed by a reset, as in QEMU)
        self._virtio_reset()

    def _vendor_cap(self, cfg_type: int, offset: int, length: int, extra: int | None = None) -> int:
        """struct virtio_pci_cap (§4.1.4), plus notify_off_multiplier or
        pci_cfg_data when ``extra`` is given."""
        cap_len = 16 if extra is None else 20
        at = self.config.add_capability(PCI_CAP_ID_VNDR, cap_len)
        bar = MODERN_BAR if cfg_type != VIRTIO_PCI_CAP_PCI_CFG else 0
        body = struct.pack("<BBBxxxII", cap_len, cfg_type, bar, offset, length)
        self.config.data[at + 2:at + 16] = body
        if extra is not None:
            self.config.data[at + 16:at + 20] = struct.pack("<I", extra)
        return at

    # -- state ------------------------------------------------------------------------------------------------

    def _virtio_reset(self) -> None:
        """virtio_reset(): status, features, selectors, vectors and queues to their reset values."""
        self.status = 0
        self.guest_features = 0
        self.guest_features_reg = [0, 0]
        self.dfselect = 0
        self.gfselect = 0
        self.queue_sel = 0
        self.config_vector = VIRTIO_MSI_NO_VECTOR
        self.isr = 0
        self.broken = False
        for q in self.queues:
            q.reset()
        if self.intx_level:
            self.set_intx(0)
        self.device_reset()

    def reset(self) -> None:
        """Function-level reset: config space, MSI-X and the virtio state."""
        super().reset()
        self._virtio_reset()

    def negotiated(self, bit: int) -> bool:
        return bool(self.guest_features >> bit & 1)

    @property
    def driver_ok(self) -> bool:
        return bool(self.status & STATUS_DRIVER_OK) and not self.broken

    # -- for subclasses -------------------------------------------------------------------------------------

    def device_config(self) -> bytes:
        """The device-specific configuration structure (§5.x), little-endian."""
        return b""

    def device_config_write(self, offset: int, size: int, value: int) -> None:
        """A driver write to the device-specific configuration (ignored by default)."""

    def queue_notify(self, queue: SplitQueue) -> None:
        """The driver notified ``queue`` (it made buffers available)."""

    def device_reset(self) -> None:
        """The device was reset (status 0 written, or a function-level reset)."""

    def device_start(self) -> None:
        """The driver set DRIVER_OK."""

    # -- errors and notifications ------------------------------------------------------------------------------

    def virtio_error(self, why: str) -> None:
        """QEMU's virtio_error(): the device stops using its queues until it is
        reset, sets DEVICE_NEEDS_RESET (VERSION_1 negotiated) and signals a
        configuration change (§2.1.2)."""
        self.errors.append(why)
        self.log(f"{self.model} {self.bdf}: {why}: device needs reset")
        self.broken = True
        if self.negotiated(VIRTIO_F_VERSION_1):
            self.status |= STATUS_DEVICE_NEEDS_RESET
            self.notify_config()

    def _send(self, vector: int) -> None:
        """virtio_pci_notify(): an MSI-X message, or INTx from the ISR's state."""
        if self.msix_enabled():
            if vector != VIRTIO_MSI_NO_VECTOR:
                self.interrupts += 1
                self.msix_notify(vector)
        else:
            self.interrupts += 1
            self.set_intx(self.isr & 1)

    def notify_queue(self, queue: SplitQueue) -> None:
        """A used buffer notification for ``queue`` (QEMU's virtio_notify()):
        the ISR's queue bit, then the queue's vector, unless the driver
        suppressed it."""
        if self.msix_enabled() and queue.msix_vector == VIRTIO_MSI_NO_VECTOR:
            return                            # nothing could be delivered: skip reading the flags
        if not queue.interrupt_wanted():
            return
        self.isr |= 1
        self._send(queue.msix_vector)

    def notify_config(self) -> None:
        """A configuration change notification (§4.1.5.3): ISR bit 1 (and bit 0,
        as QEMU's virtio_notify_config() sets 0x3), a new generation, the
        configuration vector."""
        if not self.status & STATUS_DRIVER_OK:
            return
        self.isr |= 3
        self.generation = (self.generation + 1) & 0xFF
        self._send(self.config_vector)

    # -- BAR access ----------------------------------------------------------------------------------------------

    def mmio_read(self, bar: int, offset: int, size: int) -> int:
        ones = (1 << (8 * size)) - 1
        if bar != MODERN_BAR:
            return ones
        region, off = offset & ~(REGION_SIZE - 1), offset & (REGION_SIZE - 1)
        if size == 8:
            # QEMU's regions take accesses of 1 to 4 bytes; the memory core splits wider ones.
            return self.mmio_read(bar, offset, 4) | self.mmio_read(bar, offset + 4, 4) << 32
        if region == COMMON_OFFSET:
            return self._common_read(off) & ones
        if region == ISR_OFFSET:
            # §4.1.4.5: reading the ISR resets it to 0 and deasserts INTx.
            value, self.isr = self.isr, 0
            if self.intx_level:
                self.set_intx(0)
            return value & ones
        if region == DEVICE_OFFSET:
            cfg = self.device_config()
            if off + size > len(cfg):
                return ones                   # QEMU virtio_config_modern_read*: past the end
            return int.from_bytes(cfg[off:off + size], "little")
        return 0                              # the notification area reads 0 (virtio_pci_notify_read)

    def mmio_write(self, bar: int, offset: int, size: int, value: int) -> None:
        if bar != MODERN_BAR:
            return
        if size == 8:
            self.mmio_write(bar, offset, 4, value & 0xFFFFFFFF)
            self.mmio_write(bar, offset + 4, 4, value >> 32)
            return
        region, off = offset & ~(REGION_SIZE - 1), offset & (REGION_SIZE - 1)
        value &= (1 << (8 * size)) - 1
        if region == COMMON_OFFSET:
            self._common_write(off, value)
        elif region == DEVICE_OFFSET:
            self.device_config_write(off, size, value)
        elif region == NOTIFY_OFFSET:
            self._notify(off // NOTIFY_OFF_MULTIPLIER)
        # The ISR is read-only (virtio_pci_isr_write ignores writes).

    def mmio_store_fn(self, bar: int, offset: int, size: int) -> Callable[[int], None] | None:
        """A store to the notification area: mmio_write()'s _notify(), the
        value unused (no VIRTIO_F_NOTIFICATION_DATA)."""
        if bar != MODERN_BAR or size == 8 or offset & ~(REGION_SIZE - 1) != NOTIFY_OFFSET:
            return None
        index = (offset & (REGION_SIZE - 1)) // NOTIFY_OFF_MULTIPLIER
        return lambda value: self._notify(index)

    def _queue(self) -> SplitQueue | None:
        return self.queues[self.queue_sel] if self.queue_sel < len(self.queues) else None

    def _common_read(self, off: int) -> int:
        """virtio_pci_common_read(): a field at its exact offset, else 0."""
        q = self._queue()
        if off == COMMON_DFSELECT:
            return self.dfselect
        if off == COMMON_DF:
            # §4.1.4.3.1: 0 for any select other than 0 or 1.
            return self.host_features >> (32 * self.dfselect) & 0xFFFFFFFF if self.dfselect <= 1 else 0
        if off == COMMON_GFSELECT:
            return self.gfselect
        if off == COMMON_GF:
            return self.guest_features_reg[self.gfselect] if self.gfselect <= 1 else 0
        if off == COMMON_MSIX:
            return self.config_vector
        if off == COMMON_NUMQ:
            return len(self.queues)
        if off == COMMON_STATUS:
            return self.status
        if off == COMMON_CFGGENERATION:
            return self.generation
        if off == COMMON_Q_SELECT:
            return self.queue_sel
        if q is None:
            return 0                          # §4.1.4.3.1: queue_size 0 for a queue that is not there
        if off == COMMON_Q_SIZE:
            return q.size
        if off == COMMON_Q_MSIX:
            return q.msix_vector
        if off == COMMON_Q_ENABLE:
            return int(q.enabled)
        if off == COMMON_Q_NOFF:
            return q.index                    # "Simply map queues in order"
        regs = {COMMON_Q_DESCLO: (q.desc_reg, 0), COMMON_Q_DESCHI: (q.desc_reg, 1),
                COMMON_Q_AVAILLO: (q.avail_reg, 0), COMMON_Q_AVAILHI: (q.avail_reg, 1),
                COMMON_Q_USEDLO: (q.used_reg, 0), COMMON_Q_USEDHI: (q.used_reg, 1)}
        if off in regs:
            reg, half = regs[off]
            return reg[half]
        return 0

    def _vector_ok(self, vector: int) -> int:
        """msix_vector_use(): a vector the table does not have reads back as
        NO_VECTOR (§4.1.5.1.2: the driver reads back to verify)."""
        assert self.msix is not None
        return vector if vector < self.msix.vectors else VIRTIO_MSI_NO_VECTOR

    def _common_write(self, off: int, value: int) -> None:
        """virtio_pci_common_write(): read-only fields and unknown offsets ignore writes."""
        q = self._queue()
        if off == COMMON_DFSELECT:
            self.dfselect = value
        elif off == COMMON_GFSELECT:
            self.gfselect = value
        elif off == COMMON_GF:
            if self.gfselect <= 1 and not self.status & STATUS_FEATURES_OK:
                # §4.1.4.3.1: the device presents the valid bits (a subset of its own);
                # virtio_set_features() refuses changes once FEATURES_OK is set.
                self.guest_features_reg[self.gfselect] = value
                self.guest_features = (self.guest_features_reg[1] << 32 | self.guest_features_reg[0]) \
                    & self.host_features
        elif off == COMMON_MSIX:
            self.config_vector = self._vector_ok(value)
        elif off == COMMON_STATUS:
            self._set_status(value & 0xFF)
        elif off == COMMON_Q_SELECT:
            if value < VIRTIO_QUEUE_MAX:
                self.queue_sel = value
        elif q is None:
            return
        elif off == COMMON_Q_SIZE:
            # virtio_queue_set_num(): not 0, at most the maximum; a split ring's size
            # is a power of 2 (§4.1.4.3.2).  Anything else is ignored.
            if 0 < value <= q.max_size and not value & (value - 1):
                q.size = value
            else:
                self.log(f"{self.model} {self.bdf}: queue {q.index}: size {value} refused "
                         f"(a power of 2 from 1 to {q.max_size})")
        elif off == COMMON_Q_MSIX:
            q.msix_vector = self._vector_ok(value)
        elif off == COMMON_Q_ENABLE:
            if value == 1:
                q.enable()
            else:
                # §4.1.4.3.2: "The driver MUST NOT write a 0 to queue_enable";
                # QEMU answers with virtio_error("wrong value for queue_enable").
                self.virtio_error(f"queue {q.index}: wrong value {value:#x} for queue_enable")
        else:
            regs = {COMMON_Q_DESCLO: (q.desc_reg, 0), COMMON_Q_DESCHI: (q.desc_reg, 1),
                    COMMON_Q_AVAILLO: (q.avail_reg, 0), COMMON_Q_AVAILHI: (q.avail_reg, 1),
                    COMMON_Q_USEDLO: (q.used_reg, 0), COMMON_Q_USEDHI: (q.used_reg, 1)}
            if off in regs:
                reg, half = regs[off]
                reg[half] = value

    def _set_status(self, value: int) -> None:
        """virtio_set_status() (§2.1, §3.1.1)."""
        if value == 0:
            self._virtio_reset()              # §4.1.4.3.1: reset, and read back 0
            return
        if value & STATUS_FEATURES_OK and not self.status & STATUS_FEATURES_OK:
            why = self._features_unacceptable()
            if why:
                # §3.1.1 step 6: the driver re-reads the status and finds FEATURES_OK clear.
                self.log(f"{self.model} {self.bdf}: features {self.guest_features:#x} not accepted: {why}")
                value &= ~STATUS_FEATURES_OK
        was_ok = self.status & STATUS_DRIVER_OK
        self.status = value | (self.status & STATUS_DEVICE_NEEDS_RESET)
        if value & STATUS_DRIVER_OK and not was_ok and not self.broken:
            self.device_start()

    def _features_unacceptable(self) -> str:
        """virtio_validate_features(): what makes FEATURES_OK fail, or ''."""
        if (self.guest_features_reg[1] << 32 | self.guest_features_reg[0]) & ~self.host_features:
            return "the driver accepted features the device does not offer"
        if not self.negotiated(VIRTIO_F_VERSION_1):
            return "VIRTIO_F_VERSION_1 is required: this is a modern-only device"
        if not self.negotiated(VIRTIO_F_ACCESS_PLATFORM):
            # §6.1: a device behind an IOMMU may fail to operate without it; QEMU refuses
            # FEATURES_OK when iommu_platform=on and the driver did not accept it.
            return "VIRTIO_F_ACCESS_PLATFORM is required: the device reaches memory through the IOMMU only"
        return ""

    def _notify(self, index: int) -> None:
        """An available buffer notification (§4.1.5.2)."""
        self.notifications += 1
        if index >= len(self.queues) or self.broken:
            return
        q = self.queues[index]
        if not q.ready or not self.status & STATUS_DRIVER_OK:
            return
        try:
            self.queue_notify(q)
        except VirtioError as exc:
            self.virtio_error(str(exc))

    # -- the PCI configuration access capability (§4.1.4.9) -------------------------------------------------

    def _cfg_window(self) -> tuple[int, int, int]:
        c = self.pci_cfg_cap
        bar = self.config.data[c + 4]
        offset, length = struct.unpack_from("<II", self.config.data, c + 8)
        return bar, offset, length

    def config_read(self, offset: int, size: int) -> int:
        c = self.pci_cfg_cap + 16
        if offset < c + 4 and c < offset + size and self.mmio_enabled_by_platform():
            # virtio_read_config(): a read covering pci_cfg_data performs the BAR read first.
            bar, boff, length = self._cfg_window()
            if bar == MODERN_BAR and length in (1, 2, 4) and boff + length <= MODERN_BAR_SIZE:
                value = self.mmio_read(bar, boff, length)
                self.config.data[c:c + 4] = value.to_bytes(4, "little")
        return super().config_read(offset, size)

    def config_write(self, offset: int, size: int, value: int) -> None:
        super().config_write(offset, size, value)
        c = self.pci_cfg_cap + 16
        if offset < c + 4 and c < offset + size and self.mmio_enabled_by_platform():
            bar, boff, length = self._cfg_window()
            if bar == MODERN_BAR and length in (1, 2, 4) and boff + length <= MODERN_BAR_SIZE:
                data = int.from_bytes(self.config.data[c:c + length], "little")
                self.mmio_write(bar, boff, length, data)

    def snapshot(self) -> dict[str, int]:
        """Transport state, for topology output and tests."""
        return {"status": self.status, "features": self.guest_features, "notifications": self.notifications,
                "interrupts": self.interrupts, "broken": int(self.broken)}

