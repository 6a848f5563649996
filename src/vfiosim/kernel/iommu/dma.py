"""Device DMA through TCEs: from a bus address range to runs of host memory.

The IOMMU hardware checks every IOMMU page a transfer touches: the entry
must be valid and carry the permission the direction needs (TCE_PCI_READ
for the device reading memory, TCE_PCI_WRITE for it writing).  Pages that
are physically contiguous are merged into runs, and each run is copied in
one NumPy operation, so a transfer costs one step per run, not per page.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..mm import MemoryObject, PhysicalMemory
from .tce import TCE_PCI_READ, TCE_PCI_WRITE


@dataclass
class DmaFault:
    """Why a transfer was refused, and the first bus address that failed."""

    iova: int
    reason: str


Run = tuple[MemoryObject, int, int]     # (object, byte offset, length)


def translate_tces(tces: np.ndarray, page_shift: int, iova: int, length: int, write: bool,
                   phys: PhysicalMemory) -> list[Run] | DmaFault:
    """Translate [iova, iova+length) given the TCEs of the pages it covers.

    ``tces[0]`` is the entry of the page holding ``iova``.
    """
    psize = 1 << page_shift
    need = TCE_PCI_WRITE if write else TCE_PCI_READ
    ok = (tces & np.uint64(need)) != 0
    if not ok.all():
        bad = int(np.argmin(ok))
        addr = ((iova >> page_shift) + bad) << page_shift
        what = "not mapped" if int(tces[bad]) & (TCE_PCI_READ | TCE_PCI_WRITE) == 0 else \
            f"mapped without {'write' if write else 'read'} permission"
        return DmaFault(max(addr, iova), f"IOMMU page {addr:#x} is {what}")
    hpas = tces & ~np.uint64(psize - 1)
    first_off = iova & (psize - 1)
    # Break the page list where the next page is not physically adjacent.
    breaks = np.flatnonzero(hpas[1:] != hpas[:-1] + np.uint64(psize)) + 1
    starts = np.concatenate(([0], breaks))
    ends = np.concatenate((breaks, [len(hpas)]))
    runs: list[Run] = []
    remaining = length
    for s, e in zip(starts.tolist(), ends.tolist()):
        begin = int(hpas[s]) + (first_off if s == 0 else 0)
        span = (e - s) * psize - (first_off if s == 0 else 0)
        span = min(span, remaining)
        found = phys.lookup(begin)
        if found is None or found[1] + span > found[0].length:
            return DmaFault(iova + (length - remaining), f"TCE points at {begin:#x}, which is not RAM")
        runs.append((found[0], found[1], span))
        remaining -= span
    return runs


def read_runs(runs: list[Run]) -> bytes:
    if len(runs) == 1:
        obj, off, ln = runs[0]
        return obj.read_at(off, ln)
    return b"".join(obj.read_at(off, ln) for obj, off, ln in runs)


def write_runs(runs: list[Run], data: bytes | bytearray | memoryview) -> None:
    view = memoryview(data).cast("B")
    pos = 0
    for obj, off, ln in runs:
        obj.write_at(off, view[pos:pos + ln])
        pos += ln
