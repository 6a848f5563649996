"""TCE tables: ``struct iommu_table`` and the storage of its entries.

A Translation Control Entry maps one IOMMU page of a DMA window: the host
physical address of the page with two permission bits (TCE_PCI_READ: the
device may read memory; TCE_PCI_WRITE: the device may write it).

Entries live in :class:`TceStorage`, a sparse array of 64-bit words in
fixed-size NumPy chunks allocated on first write, so a window costs memory
in proportion to what is mapped, and ranges are read and written a chunk at
a time rather than an entry at a time.  The kernel's own table geometry
(levels, level size, the bytes it accounts) is kept as attributes of
:class:`IommuTable`; it decides accounting and errors, not our storage.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

import numpy as np

if TYPE_CHECKING:
    from .table_group import TableGroup

TCE_PCI_READ = 0x1
TCE_PCI_WRITE = 0x2
TCE_PERM_MASK = TCE_PCI_READ | TCE_PCI_WRITE

# enum dma_data_direction (include/linux/dma-direction.h)
DMA_BIDIRECTIONAL = 0
DMA_TO_DEVICE = 1
DMA_FROM_DEVICE = 2
DMA_NONE = 3

IOMMU_PAGE_SHIFT_4K = 12
IOMMU_TABLE_GROUP_MAX_TABLES = 2


def direction_to_perm(direction: int) -> int:
    """iommu_direction_to_tce_perm()"""
    return {DMA_BIDIRECTIONAL: TCE_PCI_READ | TCE_PCI_WRITE, DMA_TO_DEVICE: TCE_PCI_READ,
            DMA_FROM_DEVICE: TCE_PCI_WRITE}.get(direction, 0)


def perm_to_direction(tce: int) -> int:
    """iommu_tce_direction()"""
    perm = tce & TCE_PERM_MASK
    if perm == TCE_PCI_READ | TCE_PCI_WRITE:
        return DMA_BIDIRECTIONAL
    if perm == TCE_PCI_READ:
        return DMA_TO_DEVICE
    if perm == TCE_PCI_WRITE:
        return DMA_FROM_DEVICE
    return DMA_NONE


class TceStorage:
    """A sparse array of ``size`` 64-bit entries, zero where never written."""

    CHUNK_SHIFT = 12
    CHUNK = 1 << CHUNK_SHIFT

    def __init__(self, size: int) -> None:
        self.size = size
        self._chunks: dict[int, np.ndarray] = {}

    def _spans(self, start: int, n: int):
        """Yield (chunk number, offset in chunk, offset in range, length)."""
        pos = 0
        while pos < n:
            idx = start + pos
            c, off = idx >> self.CHUNK_SHIFT, idx & (self.CHUNK - 1)
            ln = min(self.CHUNK - off, n - pos)
            yield c, off, pos, ln
            pos += ln

    def get(self, index: int) -> int:
        chunk = self._chunks.get(index >> self.CHUNK_SHIFT)
        return 0 if chunk is None else int(chunk[index & (self.CHUNK - 1)])

    def get_range(self, start: int, n: int) -> np.ndarray:
        out = np.zeros(n, dtype=np.uint64)
        for c, off, pos, ln in self._spans(start, n):
            chunk = self._chunks.get(c)
            if chunk is not None:
                out[pos:pos + ln] = chunk[off:off + ln]
        return out

    def xchg_range(self, start: int, values: np.ndarray) -> np.ndarray:
        """Store ``values`` at [start, start+len) and return the old entries."""
        n = int(values.size)
        old = np.zeros(n, dtype=np.uint64)
        for c, off, pos, ln in self._spans(start, n):
            chunk = self._chunks.get(c)
            new = values[pos:pos + ln]
            if chunk is None:
                if not new.any():
                    continue
                chunk = self._chunks[c] = np.zeros(self.CHUNK, dtype=np.uint64)
            old[pos:pos + ln] = chunk[off:off + ln]
            chunk[off:off + ln] = new
            if not new.any() and not chunk.any():
                del self._chunks[c]
        return old

    def clear_indices(self, indices: np.ndarray) -> np.ndarray:
        """Zero the given entries; return their old values."""
        old = np.zeros(indices.size, dtype=np.uint64)
        if indices.size == 0:
            return old
        chunk_ids = indices >> self.CHUNK_SHIFT
        for c in np.unique(chunk_ids):
            sel = chunk_ids == c
            chunk = self._chunks.get(int(c))
            if chunk is None:
                continue
            offs = indices[sel] & (self.CHUNK - 1)
            old[sel] = chunk[offs]
            chunk[offs] = 0
            if not chunk.any():
                del self._chunks[int(c)]
        return old

    def used_indices(self, start: int, n: int) -> np.ndarray:
        """Indices in [start, start+n) holding a non-zero entry."""
        end = start + n
        parts = []
        for c in sorted(self._chunks):
            base = c << self.CHUNK_SHIFT
            if base + self.CHUNK <= start or base >= end:
                continue
            nz = np.flatnonzero(self._chunks[c]) + base
            parts.append(nz[(nz >= start) & (nz < end)])
        return np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, dtype=np.int64)

    def count_used(self) -> int:
        return int(sum(np.count_nonzero(c) for c in self._chunks.values()))

    def nbytes(self) -> int:
        return sum(c.nbytes for c in self._chunks.values())


class XchgResult:
    """What a range exchange did: how many entries changed and their old values."""

    __slots__ = ("done", "rc", "old")

    def __init__(self, done: int, rc: int, old: np.ndarray) -> None:
        self.done = done      # entries exchanged, in order from the first
        self.rc = rc          # 0, or the platform's error for entry ``done``
        self.old = old        # old TCE values of the ``done`` entries


class TableOps(Protocol):
    """``struct iommu_table_ops``: how a platform reads and writes entries.

    Entry numbers are absolute (bus address >> page shift), as the kernel's.
    """

    # Whether writing past the end of the table would corrupt memory (a
    # table the kernel owns) rather than fail (a table behind a hypervisor).
    overrun_corrupts: bool

    def xchg_range(self, tbl: "IommuTable", entry: int, tces: np.ndarray) -> XchgResult:
        """Exchange entries entry.. with ``tces`` in order, stopping at the first failure."""
        ...

    def used(self, tbl: "IommuTable", entry: int, n: int) -> np.ndarray:
        """Entries in [entry, entry+n) that exist and hold a mapping."""
        ...

    def clear(self, tbl: "IommuTable", entries: np.ndarray) -> np.ndarray:
        """Empty the given (existing) entries; return their old TCEs."""
        ...

    def count_used(self, tbl: "IommuTable") -> int:
        ...

    def get(self, tbl: "IommuTable", entry: int) -> int:
        ...


class IommuTable:
    """``struct iommu_table``: one DMA window and its TCEs.

    ``it_offset`` and ``it_size`` are in IOMMU pages: the window covers bus
    addresses [it_offset << it_page_shift, (it_offset + it_size) << it_page_shift).
    """

    def __init__(self, *, it_offset: int, it_size: int, it_page_shift: int, ops: TableOps,
                 levels: int = 1, level_size: int = 0, allocated_size: int = 0,
                 userspace: bool = False, index: int = 0, storage: TceStorage | None = None) -> None:
        self.it_offset = it_offset
        self.it_size = it_size
        self.it_page_shift = it_page_shift
        self.it_indirect_levels = levels - 1
        self.it_level_size = level_size or it_size
        self.it_allocated_size = allocated_size
        self.it_index = index                  # LIOBN on pseries
        self.it_ops = ops
        self.entries = storage if storage is not None else TceStorage(it_size)
        # it_userspace: the userspace address each entry was mapped from (v2).
        self.it_userspace: TceStorage | None = TceStorage(it_size) if userspace else None
        self.groups: list["TableGroup"] = []    # it_group_list
        self._refs = 1

    @property
    def page_size(self) -> int:
        return 1 << self.it_page_shift

    @property
    def bus_start(self) -> int:
        return self.it_offset << self.it_page_shift

    @property
    def bus_size(self) -> int:
        return self.it_size << self.it_page_shift

    @property
    def bus_end(self) -> int:
        return self.bus_start + self.bus_size

    def contains_entry(self, entry: int) -> bool:
        return self.it_offset <= entry < self.it_offset + self.it_size

    def get(self) -> "IommuTable":
        """iommu_tce_table_get()"""
        self._refs += 1
        return self

    def put(self) -> None:
        """iommu_tce_table_put(): the table is gone with its last reference."""
        self._refs -= 1

    def mapped_count(self) -> int:
        return self.it_ops.count_used(self)

    def __repr__(self) -> str:
        return (f"<IommuTable bus={self.bus_start:#x}+{self.bus_size:#x} page={self.page_size:#x} "
                f"levels={self.it_indirect_levels + 1} mapped={self.mapped_count()}>")
