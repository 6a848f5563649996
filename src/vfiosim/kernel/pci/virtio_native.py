"""virtio-net's native burst path: the common transmit notification in C.

A NIC under a polling driver (DPDK's virtio PMD) spends its notifications on
one thing: a burst of single-descriptor chains on the transmit queue, sent
through the loopback and received at once into as many single-descriptor
receive buffers.  :func:`loopback_burst` does exactly that in one call into
``_vring.c``: it reads the two available rings and their descriptors, checks
everything the Python path checks, copies the frames and publishes both used
rings -- or, before it changes anything, says "fall back", and the exact
Python path (virtio_net.py) runs the notification, with every fault, error
and interrupt it has.

The C side reaches memory through :class:`NativePages`, a table of 4 KiB bus
pages to addresses in this process (the in-process machine's NumPy arrays;
under ``vfiosim run`` the daemon's mappings of the program's memory files).
Its entries come from the IOMMU's own translation of the page
(``translate_burst``: the PHB's TCE cache, the VT-d IOTLB), and they are
used only while every table they came from is unchanged (its ``generation``,
bumped by every TCE update, UNMAP_DMA and window removal) and still the one
the device's DMA goes through (the translator's ``native_tables()``), and
while the memory's pointer is good (``direct_ready()``: not while a call's
argument window is open, nor once the program's image is gone).  Bus
mastering off, an EEH freeze, DMA tracing by another bus master, a
backend other than the loopback: the Python path.

``VFIOSIM_NATIVE_NET=0`` in the environment turns the native path off (for
comparisons).
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any, Callable

import numpy as np

from ..dma import IommuBusMaster
from .net_backends import Loopback

_vring: Any
try:
    from . import _vring
except ImportError:          # not built: the Python path does everything
    _vring = None

if TYPE_CHECKING:
    from .virtio import SplitQueue
    from .virtio_net import VirtioNet

PAGE_SHIFT = 12
PAGE_SIZE = 1 << PAGE_SHIFT
VRING_USED_F_NO_NOTIFY = 1
VIRTIO_MSI_NO_VECTOR = 0xFFFF
FALLBACK_REASONS = {1: "index", 2: "burst", 3: "head", 4: "chain", 5: "length", 6: "rx_room", 7: "interrupt",
                    8: "overlap", 9: "range"}
MAX_ROUNDS = 8               # calls that may each bring new pages before the Python path takes over


ENABLED = _vring is not None and os.environ.get("VFIOSIM_NATIVE_NET", "1") != "0"


class NativePages:
    """Bus page -> this process's address of it, for device reads and writes
    apart (0: not known), as an open-addressed table the C side probes."""

    BITS = 14                # 16384 slots: 32 MiB of buffers at half load

    def __init__(self) -> None:
        size = 1 << self.BITS
        self.keys = np.zeros(size, dtype=np.uint64)
        self.rd = np.zeros(size, dtype=np.uint64)
        self.wr = np.zeros(size, dtype=np.uint64)
        self.count = 0
        # The tables the entries came from, and their generation then.
        self.sources: dict[int, tuple[Any, int]] = {}
        # The memory the entries point into (kept alive) and how to tell its pointers still hold.
        self.memory: dict[int, Any] = {}
        self.ready: list[Callable[[], bool]] = []

    def clear(self) -> None:
        if self.count:
            self.keys[:] = 0
            self.rd[:] = 0
            self.wr[:] = 0
            self.count = 0
        self.sources.clear()
        self.memory.clear()
        self.ready.clear()

    def valid(self, translator: Any) -> bool:
        """Whether the entries still hold; if not, they are dropped.  False
        when the device's DMA may not use them now at all."""
        if self.sources:
            tables = translator.native_tables()
            for table, generation in self.sources.values():
                if table.generation != generation or not any(table is t for t in tables):
                    self.clear()
                    break
        for ok in self.ready:
            if not ok():
                return False
        return True

    def _slot(self, page: int) -> int:
        mask = (1 << self.BITS) - 1
        h = ((page * 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF) >> (64 - self.BITS)
        keys = self.keys
        while keys[h] and int(keys[h]) != page + 1:
            h = (h + 1) & mask
        return h

    def fill(self, translator: Any, iova: int, write: bool) -> bool:
        """Translate the page at ``iova`` as the IOMMU does and note where it
        is; False if it does not translate (the Python path will find the
        fault) or its memory has no address here."""
        tables = translator.native_tables()
        table = next((t for t in tables if t is translator.native_table(iova)), None)
        if table is None:
            return False
        generation = table.generation
        pieces = translator.translate_burst([iova], [PAGE_SIZE], write)
        if pieces is None or len(pieces.objs) != 1:
            return False
        obj, off = pieces.objs[0], pieces.offs[0]
        pointer = getattr(obj, "host_pointer", None)
        addr = pointer(off, PAGE_SIZE) if pointer is not None else None
        if not addr:
            return False
        if self.count >= 1 << (self.BITS - 1):
            self.clear()
        self.sources.setdefault(id(table), (table, generation))
        if id(obj) not in self.memory:
            self.memory[id(obj)] = obj
            ready = getattr(obj, "direct_ready", None)
            if ready is not None:
                self.ready.append(ready)
        page = iova >> PAGE_SHIFT
        h = self._slot(page)
        if not self.keys[h]:
            self.keys[h] = page + 1
            self.count += 1
        (self.wr if write else self.rd)[h] = addr
        return True


def _queue(q: "SplitQueue", check_irq: bool) -> tuple[int, int, int, int, int, int, bool]:
    return (q.desc, q.avail, q.used, q.num, q.last_avail, q.used_idx, check_irq)



def loopback_burst(dev: "VirtioNet", rxq: "SplitQueue", txq: "SplitQueue", rx_header: bytes) -> bool:
    """The transmit notification of ``dev`` through its loopback, natively
    (``rx_header``: what every received frame's virtio_net_hdr is); False
    (nothing changed) when the Python path must run it."""
    backend = dev.backend
    bm = dev.bus_master
    if not isinstance(backend, Loopback) or backend.waiting or not dev.promisc or \
            not rxq.used_flags & VRING_USED_F_NO_NOTIFY or not rxq.ready or not txq.ready or \
            type(bm) is not IommuBusMaster or not dev.bus_master_enabled():
        return False
    translator = bm.translator
    if not translator.dma_enabled() or not hasattr(translator, "native_tables"):
        return False
    pages = dev.native_pages
    if not pages.valid(translator):
        return False
    limit = min(backend.capacity, 255)
    # Whether publishing on a queue may interrupt (virtio.py notify_queue then reads the flags).
    msix = dev.msix_enabled()
    tx = _queue(txq, not msix or txq.msix_vector != VIRTIO_MSI_NO_VECTOR)
    rx = _queue(rxq, not msix or rxq.msix_vector != VIRTIO_MSI_NO_VECTOR)
    for _ in range(MAX_ROUNDS):
        got = _vring.loopback_burst(tx, rx, pages.keys, pages.rd, pages.wr, limit, rx_header)
        if isinstance(got, tuple):
            break
        if isinstance(got, int):
            dev.native_stats[FALLBACK_REASONS.get(got, "other")] += 1
            return False
        for iova, write in got:
            if not pages.fill(translator, iova, write):
                dev.native_stats["translation"] += 1
                return False
    else:
        return False
    n, frames, lens = got
    dev.native_stats["bursts"] += 1
    if not n or frames is None or lens is None:
        return True
    for q in (txq, rxq):
        q.last_avail = (q.last_avail + n) & 0xFFFF
        q.used_idx = (q.used_idx + n) & 0xFFFF
        q.chains_taken += n
    nbytes = sum(lens)
    stats = dev.stats
    stats["tx_frames"] += n
    stats["tx_bytes"] += nbytes
    stats["rx_frames"] += n
    stats["rx_bytes"] += nbytes
    backend.loop_through(frames, lens, rx_header)
    return True
