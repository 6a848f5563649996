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

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Any, Iterator, cast

import numpy as np

from ..progression import Progression, U64Values

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


_EMPTY_POS = np.zeros(0, dtype=np.int64)
_EMPTY_U64 = np.zeros(0, dtype=np.uint64)
_EMPTY_POS.flags.writeable = False
_EMPTY_U64.flags.writeable = False


_DIRECTION_PERMS = {DMA_BIDIRECTIONAL: TCE_PCI_READ | TCE_PCI_WRITE, DMA_TO_DEVICE: TCE_PCI_READ,
                    DMA_FROM_DEVICE: TCE_PCI_WRITE}


def direction_to_perm(direction: int) -> int:
    """iommu_direction_to_tce_perm()"""
    return _DIRECTION_PERMS.get(direction, 0)


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


_CHUNK_SHIFT = 14          # TceStorage.CHUNK_SHIFT, for the scalar operations
_CHUNK_MASK = (1 << _CHUNK_SHIFT) - 1
_POOL_MAX = 64             # TceStorage.POOL_MAX


class _ScalarOps:
    """TceStorage's state and its one-entry operations, in Python: the base
    TceStorage has where _tce.c (SparseU64, the same in C, what the usual
    small MAP_DMA and UNMAP_DMA use) was not built, and what
    tests/test_tce_native.py compares that with."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._chunks: dict[int, np.ndarray] = {}
        self._used: dict[int, int] = {}         # chunk number -> its non-zero entries
        # Bumped by every change: translation caches (the PHB's TCE cache)
        # keyed on it can never serve a stale entry.
        self.generation = 0

    # TceStorage's (_RangeOps'), as _tce.c has its own.
    def _new_chunk(self) -> np.ndarray:
        raise NotImplementedError

    def _free_chunk(self, c: int, zeroed: bool) -> None:
        raise NotImplementedError

    def get(self, index: int) -> int:
        chunk = self._chunks.get(index >> _CHUNK_SHIFT)
        return 0 if chunk is None else int(chunk[index & _CHUNK_MASK])

    def xchg_one(self, index: int, new: int) -> int:
        """xchg_range() of one entry, in scalar operations: its old value."""
        if index < 0:
            raise IndexError("negative TCE storage index")
        self.generation += 1
        c, off = index >> _CHUNK_SHIFT, index & _CHUNK_MASK
        chunk = self._chunks.get(c)
        if chunk is None:
            if new:
                chunk = self._chunks[c] = self._new_chunk()
                chunk[off] = new
                self._used[c] = 1
            return 0
        old: int = chunk.item(off)
        chunk[off] = new
        if not old:
            if new:
                self._used[c] += 1
        elif not new:
            if self._used[c] == 1:
                self._free_chunk(c, zeroed=True)
            else:
                self._used[c] -= 1
        return old

    def clear_one(self, index: int) -> int:
        """clear_range() of one entry, in scalar operations: its old value (0
        when it held nothing)."""
        if index < 0:
            raise IndexError("negative TCE storage index")
        if not self._chunks:
            return 0
        c, off = index >> _CHUNK_SHIFT, index & _CHUNK_MASK
        chunk = self._chunks.get(c)
        self.generation += 1
        if chunk is None:
            return 0
        old: int = chunk.item(off)
        if not old:
            return 0
        chunk[off] = 0
        if self._used[c] == 1:
            self._free_chunk(c, zeroed=True)
        else:
            self._used[c] -= 1
        return old


_tce: Any
try:
    from . import _tce
except ImportError:                 # built without it (an optional extension): the Python above
    _tce = None
_NATIVE = _tce is not None and (_tce.CHUNK_SHIFT, _tce.POOL_MAX) == (_CHUNK_SHIFT, _POOL_MAX)
_shared_pool: list[np.ndarray] = _tce.POOL if _NATIVE else []
if TYPE_CHECKING:
    _Base = _ScalarOps
else:
    _Base = _tce.SparseU64 if _NATIVE else _ScalarOps


class _RangeOps:
    """TceStorage's range operations (NumPy), on either base's state.

    A sparse array of ``size`` 64-bit entries, zero where never written.
    Each chunk knows how many of its entries are non-zero, so an emptied
    chunk is freed without a scan, and one entry is read or written without
    NumPy range operations (the usual small map and unmap: get(),
    xchg_one(), clear_one(), in the base)."""

    CHUNK_SHIFT = _CHUNK_SHIFT    # 16384 entries (128 KiB) per chunk
    CHUNK = 1 << CHUNK_SHIFT
    # Emptied chunks, zeroed, kept for reuse (shared by all tables): a fresh
    # chunk costs page faults on first write, a reused one does not.
    POOL_MAX = _POOL_MAX          # 8 MiB
    _pool: list[np.ndarray] = _shared_pool

    size: int
    generation: int
    _chunks: dict[int, np.ndarray]
    _used: dict[int, int]

    if TYPE_CHECKING:               # the base's (defined here, they would hide SparseU64's)
        def get(self, index: int) -> int: ...
        def xchg_one(self, index: int, new: int) -> int: ...
        def clear_one(self, index: int) -> int: ...

    def _new_chunk(self) -> np.ndarray:
        try:
            return self._pool.pop()
        except IndexError:
            return np.zeros(self.CHUNK, dtype=np.uint64)

    def _free_chunk(self, c: int, zeroed: bool) -> None:
        chunk = self._chunks.pop(c)
        del self._used[c]
        if len(self._pool) < self.POOL_MAX:
            if not zeroed:
                chunk.fill(0)
            self._pool.append(chunk)

    def _spans(self, start: int, n: int) -> Iterator[tuple[int, int, int, int]]:
        """Yield (chunk number, offset in chunk, offset in range, length)."""
        pos = 0
        while pos < n:
            idx = start + pos
            c, off = idx >> self.CHUNK_SHIFT, idx & (self.CHUNK - 1)
            ln = min(self.CHUNK - off, n - pos)
            yield c, off, pos, ln
            pos += ln

    def get_range(self, start: int, n: int) -> np.ndarray:
        """Entries [start, start+n); read-only use (may be a view of storage)."""
        c, off = start >> self.CHUNK_SHIFT, start & (self.CHUNK - 1)
        if off + n <= self.CHUNK:
            chunk = self._chunks.get(c)
            return chunk[off:off + n] if chunk is not None else np.zeros(n, dtype=np.uint64)
        out = np.zeros(n, dtype=np.uint64)
        for c, off, pos, ln in self._spans(start, n):
            chunk = self._chunks.get(c)
            if chunk is not None:
                out[pos:pos + ln] = chunk[off:off + ln]
        return out

    def xchg_range(self, start: int, values: U64Values) -> tuple[np.ndarray, np.ndarray]:
        """Store ``values`` at [start, start+len); return the entries that held
        something before: (their offsets from ``start``, their old values)."""
        n = len(values)
        prog = values if isinstance(values, Progression) else None
        if n == 1:
            old = self.xchg_one(start, prog.first if prog is not None else int(cast(np.ndarray, values)[0]))
            if not old:
                return _EMPTY_POS, _EMPTY_U64
            return np.zeros(1, dtype=np.int64), np.array([old], dtype=np.uint64)
        self.generation += 1
        positions: list[np.ndarray] = []
        olds: list[np.ndarray] = []
        chunks, size, shift = self._chunks, self.CHUNK, self.CHUNK_SHIFT
        pos = 0
        while pos < n:
            idx = start + pos
            c, off = idx >> shift, idx & (size - 1)
            ln = min(size - off, n - pos)
            if prog is not None:
                new = None
                new_used = prog.count_nonzero_in(pos, ln)
            else:
                new = values[pos:pos + ln]
                new_used = int(np.count_nonzero(new))
            chunk = chunks.get(c)
            old_used = 0
            if chunk is None:
                if not new_used:
                    pos += ln
                    continue
                chunk = chunks[c] = self._new_chunk()
                self._used[c] = 0
                seg = chunk[off:off + ln]
            else:
                seg = chunk[off:off + ln]
                nz = np.flatnonzero(seg)
                if nz.size:
                    old_used = int(nz.size)
                    positions.append(nz + pos)
                    olds.append(seg[nz])          # fancy indexing copies
            if prog is not None:
                prog.write_to(seg, pos)
            else:
                seg[:] = new
            used = self._used[c] + new_used - old_used
            if used:
                self._used[c] = used
            else:
                self._free_chunk(c, zeroed=True)
            pos += ln
        if not positions:
            return _EMPTY_POS, _EMPTY_U64
        if len(positions) == 1:
            return positions[0], olds[0]
        return np.concatenate(positions), np.concatenate(olds)

    def clear_range(self, start: int, n: int) -> list[np.ndarray]:
        """Zero [start, start+n); return the non-zero old entries, in order,
        as one array per storage chunk that held any."""
        if n <= 0 or not self._chunks:
            return []
        if n == 1:
            old = self.clear_one(start)
            return [np.array([old], dtype=np.uint64)] if old else []
        end = start + n
        first, last = start >> self.CHUNK_SHIFT, (end - 1) >> self.CHUNK_SHIFT
        if last - first + 1 <= len(self._chunks):
            keys = [c for c in range(first, last + 1) if c in self._chunks]
        else:
            keys = sorted(c for c in self._chunks if first <= c <= last)
        self.generation += 1
        parts = []
        for c in keys:
            chunk = self._chunks[c]
            base = c << self.CHUNK_SHIFT
            lo, hi = max(start, base) - base, min(end, base + self.CHUNK) - base
            seg = chunk[lo:hi]
            used = int(np.count_nonzero(seg))
            if used:
                parts.append(seg.copy() if used == seg.size else seg[seg != 0])
                seg.fill(0)
                self._used[c] -= used
            if (lo == 0 and hi == self.CHUNK) or not self._used[c]:
                self._free_chunk(c, zeroed=True)
        return parts

    def clear_indices(self, indices: np.ndarray) -> np.ndarray:
        """Zero the given entries; return their old values."""
        old = np.zeros(indices.size, dtype=np.uint64)
        if indices.size == 0:
            return old
        self.generation += 1
        chunk_ids = indices >> self.CHUNK_SHIFT
        for c in np.unique(chunk_ids):
            sel = chunk_ids == c
            chunk = self._chunks.get(int(c))
            if chunk is None:
                continue
            offs = np.unique(indices[sel] & (self.CHUNK - 1))
            vals = chunk[offs]
            old[sel] = chunk[indices[sel] & (self.CHUNK - 1)]
            chunk[offs] = 0
            used = self._used[int(c)] - int(np.count_nonzero(vals))
            if used:
                self._used[int(c)] = used
            else:
                self._free_chunk(int(c), zeroed=True)
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
        return sum(self._used.values())

    def items(self, size: int) -> tuple[tuple[int, int], ...]:
        """(index, value) of every non-zero entry below ``size``, in order."""
        idx = self.used_indices(0, size)
        if not idx.size:
            return ()
        vals = self.get_range(0, size)[idx] if size <= 1 << 22 else np.array([self.get(int(i)) for i in idx])
        return tuple(zip(idx.tolist(), np.asarray(vals, dtype=np.uint64).tolist()))

    def nbytes(self) -> int:
        return sum(c.nbytes for c in self._chunks.values())


class TceStorage(_RangeOps, _Base):
    """A TCE table's entries (or its userspace view): _RangeOps on _tce.c's
    SparseU64, or on _ScalarOps where that was not built."""

    __slots__ = ()


class PyTceStorage(_RangeOps, _ScalarOps):
    """TceStorage all in Python (tests compare it with the native one)."""


class XchgResult:
    """What a range exchange did: how many entries changed, and which of them
    held a TCE before (sparse: a map into an empty range reports nothing)."""

    __slots__ = ("done", "rc", "old_pos", "old")

    def __init__(self, done: int, rc: int, old_pos: np.ndarray = _EMPTY_POS, old: np.ndarray = _EMPTY_U64) -> None:
        self.done = done        # entries exchanged, in order from the first
        self.rc = rc            # 0, or the platform's error for entry ``done``
        self.old_pos = old_pos  # offsets (from the first entry) of entries that were non-zero
        self.old = old          # their old TCE values


class TableOps(ABC):
    """``struct iommu_table_ops``: how a platform reads and writes entries.

    Entry numbers are absolute (bus address >> page shift), as the kernel's.
    """

    # Whether writing past the end of the table would corrupt memory (a
    # table the kernel owns) rather than fail (a table behind a hypervisor).
    overrun_corrupts: bool

    @abstractmethod
    def xchg_range(self, tbl: "IommuTable", entry: int, tces: U64Values) -> XchgResult:
        """Exchange entries entry.. with ``tces`` in order, stopping at the first failure."""

    @abstractmethod
    def used(self, tbl: "IommuTable", entry: int, n: int) -> np.ndarray:
        """Entries in [entry, entry+n) that exist and hold a mapping."""

    @abstractmethod
    def xchg_one(self, tbl: "IommuTable", entry: int, tce: int) -> int | None:
        """xchg_range() of one entry of the table, in scalar operations (the
        small map's fast path): its old TCE; None, with nothing changed,
        where xchg_range() would not simply succeed (an hcall refused, fault
        injection armed), and the caller takes xchg_range()."""

    @abstractmethod
    def clear_range(self, tbl: "IommuTable", entry: int, n: int) -> list[np.ndarray]:
        """Empty the entries of [entry, entry+n) the table has (those past its
        end are skipped); return the old non-zero TCEs in order, in pieces."""

    @abstractmethod
    def clear_one(self, tbl: "IommuTable", entry: int) -> int:
        """clear_range() of one entry, in scalar operations: its old TCE (0
        when it held nothing or the table does not have it)."""

    @abstractmethod
    def perm(self, direction: int) -> int:
        """The TCE permission bits the platform writes for a DMA direction."""

    @abstractmethod
    def clear(self, tbl: "IommuTable", entries: np.ndarray) -> np.ndarray:
        """Empty the given (existing) entries; return their old TCEs."""

    @abstractmethod
    def count_used(self, tbl: "IommuTable") -> int: ...

    @abstractmethod
    def get(self, tbl: "IommuTable", entry: int) -> int: ...

    @abstractmethod
    def missing_levels(self, tbl: "IommuTable", user: bool, entry: int, n: int) -> list[tuple[int, int, int]]:
        """The indirect levels of the TCE table (``user``: of its userspace
        copy) that writing entries [entry, entry+n) in order would allocate
        first: (offset of the entry that needs it, level, block)."""

    @abstractmethod
    def mark_levels(self, tbl: "IommuTable", user: bool, levels: list[tuple[int, int, int]]) -> None:
        """Those levels now exist."""


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
        # Indirect levels allocated so far, as (level, block), of the TCE
        # table and of its userspace copy (multi-level PowerNV tables fill
        # them on first use: pnv_tce(..., alloc=true)); None until then, so
        # a table costs nothing for them.
        self.levels_present: set[tuple[int, int]] | None = None
        self.userspace_levels_present: set[tuple[int, int]] | None = None
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

    def state(self) -> tuple[Any, ...]:
        """Geometry, accounting, entries and userspace addresses, comparable."""
        uas = self.it_userspace.items(self.it_size) if self.it_userspace is not None else None
        return (self.bus_start, self.it_size, self.it_page_shift, self.it_indirect_levels, self.it_allocated_size,
                self.entries.items(self.it_size), uas)

    def __repr__(self) -> str:
        return (f"<IommuTable bus={self.bus_start:#x}+{self.bus_size:#x} page={self.page_size:#x} "
                f"levels={self.it_indirect_levels + 1} mapped={self.mapped_count()}>")
