"""IOVA ranges and the allocator that places DMA mappings in them."""

from __future__ import annotations

import bisect
from dataclasses import dataclass

__all__ = ["IovaRange", "IovaAllocator"]


@dataclass(frozen=True, order=True)
class IovaRange:
    """Bus addresses ``start`` .. ``last`` (inclusive, as ``struct vfio_iova_range``)
    that the IOMMU translates, with the IOMMU page size there."""

    start: int
    last: int
    page_size: int = 4096

    @property
    def size(self) -> int:
        return self.last - self.start + 1

    @property
    def end(self) -> int:
        """One past ``last``."""
        return self.last + 1

    def contains(self, iova: int, size: int = 1) -> bool:
        return self.start <= iova and iova + size - 1 <= self.last

    def __str__(self) -> str:
        return f"{self.start:#x}..{self.last:#x} ({self.page_size // 1024} KiB pages)"


class IovaAllocator:
    """First fit over a set of ranges; remembers what is in use.

    Pure bookkeeping: it never talks to the kernel.  ``reserve`` takes an
    address the user chose, ``allocate`` finds one; both refuse overlaps.
    """

    def __init__(self, ranges: list[IovaRange] | None = None) -> None:
        self.ranges: list[IovaRange] = sorted(ranges or [])
        self._starts: list[int] = []
        self._ends: list[int] = []          # exclusive

    def set_ranges(self, ranges: list[IovaRange]) -> None:
        self.ranges = sorted(ranges)

    def used(self) -> list[tuple[int, int]]:
        """(iova, size) of every reservation, in address order."""
        return [(s, e - s) for s, e in zip(self._starts, self._ends)]

    def overlap(self, iova: int, size: int) -> tuple[int, int] | None:
        """The first reservation overlapping [iova, iova+size), if any."""
        i = bisect.bisect_right(self._starts, iova) - 1
        for j in (i, i + 1):
            if 0 <= j < len(self._starts) and self._starts[j] < iova + size and iova < self._ends[j]:
                return self._starts[j], self._ends[j] - self._starts[j]
        return None

    def range_of(self, iova: int, size: int) -> IovaRange | None:
        return next((r for r in self.ranges if r.contains(iova, size)), None)

    def reserve(self, iova: int, size: int) -> None:
        if size <= 0:
            raise ValueError(f"size {size} must be positive")
        hit = self.overlap(iova, size)
        if hit is not None:
            raise KeyError(hit)
        i = bisect.bisect(self._starts, iova)
        self._starts.insert(i, iova)
        self._ends.insert(i, iova + size)

    def release(self, iova: int) -> None:
        i = bisect.bisect_left(self._starts, iova)
        if i < len(self._starts) and self._starts[i] == iova:
            del self._starts[i]
            del self._ends[i]

    def allocate(self, size: int, *, max_iova: int | None = None, min_page: int = 1) -> int | None:
        """Lowest free address for ``size`` bytes, aligned to the range's IOMMU
        page (and ``min_page``), with its last byte at most ``max_iova``."""
        if size <= 0:
            raise ValueError(f"size {size} must be positive")
        for r in self.ranges:
            align = max(r.page_size, min_page)
            cand = (r.start + align - 1) // align * align
            limit = r.last if max_iova is None else min(r.last, max_iova)
            i = bisect.bisect_right(self._ends, cand)
            while cand + size - 1 <= limit:
                if i < len(self._starts) and self._starts[i] < cand + size:
                    cand = max(cand, (self._ends[i] + align - 1) // align * align)
                    i += 1
                    continue
                self.reserve(cand, size)
                return cand
        return None
