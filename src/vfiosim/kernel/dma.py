"""Device DMA through an IOMMU, whatever the platform.

A device's transfer of ``length`` bytes at bus address ``iova`` goes through
its :class:`DmaTranslator`: on POWER the PE (a TCE walk, EEH behind it), on
x86 the device's VT-d context entry (its group's IOMMU domain).  The
translator answers with the *runs* of host memory the transfer covers, each
physically contiguous, or with a :class:`DmaFault` (nothing moves).  Data
is copied run by run, one NumPy operation each, never page by page.

:class:`IommuBusMaster` is the device's side of that path (``dev.bus_master``,
the :class:`~vfiosim.kernel.pci.device.BusMaster` device models call): bus
mastering, then the translator, then the copy.  Its scatter-gather forms
(``dma_read_many``/``dma_write_many``: a NIC's burst of descriptors and
frames) check every range first, then move the data in as few host
operations as the memory allows (one process_vm_readv under ``vfiosim run``).

:class:`TranslationCache` is the translator's cache of recent translations
(a PHB's TCE cache, a VT-d unit's IOTLB): exact, because it serves an entry
only while the table it came from is unchanged.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Protocol, Sequence

import numpy as np

from .pci.device import DmaError

if TYPE_CHECKING:
    from .mm import PhysicalPages
    from .pci.device import PciDevice


@dataclass
class DmaFault:
    """Why a transfer was refused, and the first bus address that failed."""

    iova: int
    reason: str


Run = tuple["PhysicalPages", int, int]     # (memory, byte offset, length)
Translation = list[Run] | DmaFault


class DmaTranslator(Protocol):
    """What stands between a device and memory: a PE, or a VT-d context entry."""

    name: str

    def dma_enabled(self) -> bool:
        """False while the platform stops the device's DMA (an EEH freeze)."""
        ...

    def translate(self, iova: int, length: int, write: bool) -> list[Run] | DmaFault:
        """The runs [iova, iova+length) reaches, or why the IOMMU refuses it."""
        ...

    def dma_fault(self, fault: DmaFault, write: bool) -> None:
        """The IOMMU refused a transfer: what the platform does about it
        (freeze the PE, record a DMAR fault)."""
        ...


class IommuBusMaster:
    """A device's DMA path: bus master enable, the platform's state, then the IOMMU."""

    __slots__ = ("translator", "dev")

    def __init__(self, translator: DmaTranslator, dev: "PciDevice") -> None:
        self.translator = translator
        self.dev = dev

    def _runs(self, iova: int, length: int, write: bool) -> list[Run]:
        if length < 0 or iova < 0 or iova + length > 1 << 64:
            raise DmaError(iova, length, write, "bus address range out of bounds")
        if not self.dev.bus_master_enabled():
            raise DmaError(iova, length, write, "bus mastering is disabled (PCI_COMMAND_MASTER is clear)")
        t = self.translator
        if not t.dma_enabled():
            raise DmaError(iova, length, write, f"{t.name} is frozen (EEH): DMA is stopped")
        if length == 0:
            return []
        runs = t.translate(iova, length, write)
        if isinstance(runs, DmaFault):
            t.dma_fault(runs, write)
            raise DmaError(iova, length, write, runs.reason)
        return runs

    def dma_read(self, iova: int, length: int) -> bytes:
        return read_runs(self._runs(iova, length, False))

    def dma_read_into(self, iova: int, out: "bytearray | memoryview | np.ndarray") -> None:
        dest = out if isinstance(out, np.ndarray) else np.frombuffer(out, dtype=np.uint8)
        read_runs_into(self._runs(iova, dest.nbytes, False), dest)

    def dma_write(self, iova: int, data: bytes | bytearray | memoryview | np.ndarray) -> None:
        write_runs(self._runs(iova, len(data), True), data)

    def _runs_many(self, segments: Sequence[tuple[int, int]], write: bool) -> list[list[Run]]:
        """_runs() of each range, the device's and the platform's checks done once."""
        if not segments:
            return []
        t = self.translator
        if not self.dev.bus_master_enabled() or not t.dma_enabled():
            self._runs(*segments[0], write)                 # raises the DmaError saying why
        out: list[list[Run]] = []
        for iova, length in segments:
            if length <= 0 or iova < 0 or iova + length > 1 << 64:
                out.append(self._runs(iova, length, write))
                continue
            runs = t.translate(iova, length, write)
            if isinstance(runs, DmaFault):
                t.dma_fault(runs, write)
                raise DmaError(iova, length, write, runs.reason)
            out.append(runs)
        return out

    def dma_read_many(self, segments: Sequence[tuple[int, int]]) -> list[bytes]:
        """Read several (iova, length) ranges: every one is checked first, then
        the data moves in as few host operations as the memory allows."""
        return read_runs_many(self._runs_many(segments, False))

    def dma_write_many(self, segments: Sequence[tuple[int, bytes | bytearray | memoryview]]) -> None:
        """Write several (iova, data) ranges: every one is checked first (a
        refusal moves nothing), then the data moves."""
        write_runs_many(self._runs_many([(iova, len(data)) for iova, data in segments], True),
                        [d for _, d in segments])


class Versioned(Protocol):
    """What a translation comes from (a TCE table's storage, a VT-d paging
    domain): any change of its entries bumps ``generation``."""

    generation: int


class TranslationCache:
    """A translator's cache of recent translations: a PHB's TCE cache, a VT-d
    unit's IOTLB.

    Entries are keyed by the transfer and remember the table they came from
    and its generation; any change of the table bumps the generation, so a
    stale translation is never served (the model of the hardware cache that
    tce_kill or an IOTLB invalidation flushes).  Given the IOMMU page size,
    transfers inside one page (a NIC's descriptors and frames) are cached by
    page, as the hardware caches TCEs and PTEs: many buffers, one entry each.
    """

    SIZE = 16
    PAGES = 4096

    def __init__(self) -> None:
        self._entries: dict[tuple[int, int, bool], tuple[weakref.ref[Versioned], int, list[Run]]] = {}
        self._pages: dict[tuple[int, bool], tuple[weakref.ref[Versioned], int, "PhysicalPages", int]] = {}

    def clear(self) -> None:
        self._entries.clear()
        self._pages.clear()

    def translate(self, table: Versioned, iova: int, length: int, write: bool,
                  slow: Callable[[int, int, bool], Translation], page_shift: int | None = None) -> Translation:
        """The cached translation of the transfer, or ``slow``'s (cached if it succeeds)."""
        if page_shift is not None and length > 0 and (iova ^ (iova + length - 1)) >> page_shift == 0:
            return self._translate_in_page(table, iova, length, write, slow, page_shift)
        key = (iova, length, write)
        hit = self._entries.get(key)
        if hit is not None and hit[0]() is table and hit[1] == table.generation:
            return hit[2]
        runs = slow(iova, length, write)
        if isinstance(runs, list):
            if len(self._entries) >= self.SIZE:
                self._entries.pop(next(iter(self._entries)))
            # A weak reference: a removed window's table is not kept alive here.
            self._entries[key] = (weakref.ref(table), table.generation, runs)
        return runs

    def _translate_in_page(self, table: Versioned, iova: int, length: int, write: bool,
                           slow: Callable[[int, int, bool], Translation], page_shift: int) -> Translation:
        page = iova >> page_shift
        key = (page, write)
        psize = 1 << page_shift
        hit = self._pages.get(key)
        if hit is not None and hit[0]() is table and hit[1] == table.generation:
            return [(hit[2], hit[3] + (iova & (psize - 1)), length)]
        runs = slow(page << page_shift, psize, write)
        if not isinstance(runs, list) or len(runs) != 1 or runs[0][2] != psize:
            return slow(iova, length, write)         # the fault (or odd layout) of this very transfer
        if len(self._pages) >= self.PAGES:
            self._pages.clear()
        obj, off, _ = runs[0]
        self._pages[key] = (weakref.ref(table), table.generation, obj, off)
        return [(obj, off + (iova & (psize - 1)), length)]


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
    """The bytes of each transfer; each memory object reads all its ranges in
    one call (a real process's memory: one process_vm_readv)."""
    flat = [run for runs in runs_list for run in runs]
    by_obj: dict[int, tuple["PhysicalPages", list[int]]] = {}
    for i, (obj, _off, _ln) in enumerate(flat):
        by_obj.setdefault(id(obj), (obj, []))[1].append(i)
    parts: list[bytes] = [b""] * len(flat)
    for obj, idxs in by_obj.values():
        for i, data in zip(idxs, obj.read_many([(flat[i][1], flat[i][2]) for i in idxs])):
            parts[i] = data
    out: list[bytes] = []
    pos = 0
    for runs in runs_list:
        n = len(runs)
        out.append(parts[pos] if n == 1 else b"".join(parts[pos:pos + n]))
        pos += n
    return out


def write_runs_many(runs_list: list[list[Run]], datas: Sequence[bytes | bytearray | memoryview]) -> None:
    """Write each transfer's data; each memory object writes all its ranges in one call."""
    by_obj: dict[int, tuple["PhysicalPages", list[tuple[int, memoryview]]]] = {}
    for runs, data in zip(runs_list, datas):
        view = memoryview(data).cast("B")
        pos = 0
        for obj, off, ln in runs:
            by_obj.setdefault(id(obj), (obj, []))[1].append((off, view[pos:pos + ln]))
            pos += ln
    for obj, pieces in by_obj.values():
        obj.write_many(pieces)
