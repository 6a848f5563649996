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
from ..progression import as_progression
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
    need = np.uint64(TCE_PCI_WRITE if write else TCE_PCI_READ)
    n = int(tces.size)
    first_off = iova & (psize - 1)
    if n == 1:
        tce = int(tces[0])
        if not tce & int(need):
            return _fault(tces, 0, page_shift, iova, write)
        return _runs(phys, [(tce & ~(psize - 1)) + first_off], [length], iova, length)
    t0 = int(tces[0])
    # The usual case: physically contiguous pages with the same permissions,
    # i.e. the entries form an arithmetic progression: one run.
    if t0 & int(need) and as_progression(tces, psize) is not None:
        return _runs(phys, [(t0 & ~(psize - 1)) + first_off], [length], iova, length)
    ok = tces & need
    if not ok.all():
        return _fault(tces, int(np.argmin(ok != 0)), page_shift, iova, write)
    hpas = tces & ~np.uint64(psize - 1)
    # Break the page list where the next page is not physically adjacent.
    breaks = np.flatnonzero(hpas[1:] != hpas[:-1] + np.uint64(psize)) + 1
    starts = [0] + breaks.tolist()
    ends = breaks.tolist() + [n]
    begins, spans = [], []
    remaining = length
    for s, e in zip(starts, ends):
        head = first_off if s == 0 else 0
        span = min((e - s) * psize - head, remaining)
        begins.append(int(hpas[s]) + head)
        spans.append(span)
        remaining -= span
    return _runs(phys, begins, spans, iova, length)


def _fault(tces: np.ndarray, bad: int, page_shift: int, iova: int, write: bool) -> DmaFault:
    addr = ((iova >> page_shift) + bad) << page_shift
    what = "not mapped" if int(tces[bad]) & (TCE_PCI_READ | TCE_PCI_WRITE) == 0 else \
        f"mapped without {'write' if write else 'read'} permission"
    return DmaFault(max(addr, iova), f"IOMMU page {addr:#x} is {what}")


def _runs(phys: PhysicalMemory, begins: list[int], spans: list[int], iova: int, length: int) -> list[Run] | DmaFault:
    runs: list[Run] = []
    done = 0
    for begin, span in zip(begins, spans):
        found = phys.lookup(begin)
        if found is None or found[1] + span > found[0].length:
            return DmaFault(iova + done, f"TCE points at {begin:#x}, which is not RAM")
        runs.append((found[0], found[1], span))
        done += span
    return runs


def read_runs(runs: list[Run]) -> bytes:
    if len(runs) == 1:
        obj, off, ln = runs[0]
        return obj.read_at(off, ln)
    return b"".join(obj.read_at(off, ln) for obj, off, ln in runs)


def read_runs_into(runs: list[Run], out: np.ndarray) -> None:
    """Copy the runs into ``out`` (a device's buffer, uint8): one copy, no allocation."""
    pos = 0
    for obj, off, ln in runs:
        obj.read_into(off, out[pos:pos + ln])
        pos += ln


def write_runs(runs: list[Run], data: bytes | bytearray | memoryview | np.ndarray) -> None:
    src = data if isinstance(data, np.ndarray) else np.frombuffer(data, dtype=np.uint8)
    if len(runs) == 1:
        obj, off, _ = runs[0]
        obj.write_at(off, src)
        return
    pos = 0
    for obj, off, ln in runs:
        obj.write_at(off, src[pos:pos + ln])
        pos += ln


def read_runs_many(runs_list: list[list[Run]]) -> list[bytes]:
    """The bytes of each transfer.  Memory objects that can read several
    ranges at once (``read_many``: a real process's memory, one
    process_vm_readv) get all their ranges in one call."""
    flat = [(obj, off, ln) for runs in runs_list for obj, off, ln in runs]
    by_obj: dict[int, list[int]] = {}
    for i, (obj, _off, _ln) in enumerate(flat):
        if hasattr(obj, "read_many"):
            by_obj.setdefault(id(obj), []).append(i)
    parts: list[bytes | None] = [None] * len(flat)
    for idxs in by_obj.values():
        obj = flat[idxs[0]][0]
        for i, data in zip(idxs, obj.read_many([(flat[i][1], flat[i][2]) for i in idxs])):
            parts[i] = data
    out = []
    pos = 0
    for runs in runs_list:
        chunk = []
        for obj, off, ln in runs:
            data = parts[pos]
            chunk.append(obj.read_at(off, ln) if data is None else data)
            pos += 1
        out.append(chunk[0] if len(chunk) == 1 else b"".join(chunk))
    return out


def write_runs_many(runs_list: list[list[Run]], datas: list[bytes | bytearray | memoryview]) -> None:
    """Write each transfer's data; objects with ``write_many`` get all their
    ranges in one call."""
    by_obj: dict[int, tuple[MemoryObject, list[tuple[int, memoryview]]]] = {}
    for runs, data in zip(runs_list, datas):
        view = memoryview(data).cast("B")
        pos = 0
        for obj, off, ln in runs:
            part = view[pos:pos + ln]
            pos += ln
            if hasattr(obj, "write_many"):
                by_obj.setdefault(id(obj), (obj, []))[1].append((off, part))
            else:
                obj.write_at(off, np.frombuffer(part, dtype=np.uint8))
    for obj, pieces in by_obj.values():
        obj.write_many(pieces)  # type: ignore[attr-defined]
