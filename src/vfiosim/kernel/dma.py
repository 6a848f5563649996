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
(``dma_read_burst``/``dma_write_burst``, and ``dma_read_many``/
``dma_write_many`` on top of them: a NIC's burst of descriptors and frames)
check every range first, then move the data in one call per memory object
(one foreign call under ``vfiosim run``).  A translator with a page cache
translates a whole burst through it (``translate_burst``: one check that
the table is unchanged, then a dictionary lookup per buffer); when it
cannot vouch for every range it says so, and each range is translated on
its own, so a refused range faults exactly as a single transfer would.

:class:`TranslationCache` is the translator's cache of recent translations
(a PHB's TCE cache, a VT-d unit's IOTLB): exact, because it serves an entry
only while the table it came from is unchanged.
"""

from __future__ import annotations

import itertools
import weakref
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Protocol, Sequence, cast

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


class BurstTranslator(Protocol):
    """A translator that can translate a whole burst cheaply (its cache)."""

    def translate_burst(self, iovas: Sequence[int], lens: Sequence[int], write: bool) -> "Pieces | None":
        """Where each range [iovas[i], iovas[i]+lens[i]) lands, each in one
        physically contiguous piece; None when it cannot vouch for every
        range (the caller then translates range by range, which finds any
        fault).  Every length is positive and DMA is enabled."""
        ...


class Pieces:
    """Where a burst of DMA lands in memory: piece ``i`` is ``lens[i]`` bytes
    at ``offs[i]`` of ``objs[i]``.  The burst's data is the pieces' bytes
    one after the other."""

    __slots__ = ("objs", "offs", "lens")

    def __init__(self, objs: list["PhysicalPages"], offs: list[int], lens: list[int]) -> None:
        self.objs = objs
        self.offs = offs
        self.lens = lens

    def _groups(self) -> list[tuple["PhysicalPages", list[int]]]:
        """Each memory object and the indices of its pieces (usually one object)."""
        first = self.objs[0]
        if self.objs.count(first) == len(self.objs):
            return [(first, list(range(len(self.objs))))]
        groups: dict[int, tuple["PhysicalPages", list[int]]] = {}
        for i, obj in enumerate(self.objs):
            groups.setdefault(id(obj), (obj, []))[1].append(i)
        return list(groups.values())

    def read(self, out: memoryview) -> None:
        """Copy the pieces into ``out`` (bytes, their total length), one call per object."""
        if not self.objs:
            return
        groups = self._groups()
        if len(groups) == 1:
            groups[0][0].read_ranges(self.offs, self.lens, out)
            return
        pos = list(itertools.accumulate(self.lens, initial=0))
        for obj, idx in groups:
            lens = [self.lens[i] for i in idx]
            part = bytearray(sum(lens))
            obj.read_ranges([self.offs[i] for i in idx], lens, memoryview(part))
            at = 0
            for i, n in zip(idx, lens):
                out[pos[i]:pos[i] + n] = part[at:at + n]
                at += n

    def write(self, data: memoryview) -> None:
        """Copy ``data`` (the pieces' bytes one after the other) into them, in order."""
        if not self.objs:
            return
        groups = self._groups()
        if len(groups) == 1:
            groups[0][0].write_ranges(self.offs, self.lens, data)
            return
        # Objects never overlap: each one's pieces in order is all the order there is.
        pos = list(itertools.accumulate(self.lens, initial=0))
        for obj, idx in groups:
            part = b"".join(data[pos[i]:pos[i + 1]] for i in idx)
            obj.write_ranges([self.offs[i] for i in idx], [self.lens[i] for i in idx], memoryview(part))

    @classmethod
    def of_runs(cls, runs_list: list[list[Run]]) -> "Pieces":
        return cls([r[0] for runs in runs_list for r in runs], [r[1] for runs in runs_list for r in runs],
                   [r[2] for runs in runs_list for r in runs])


class IommuBusMaster:
    """A device's DMA path: bus master enable, the platform's state, then the IOMMU."""

    __slots__ = ("translator", "dev", "_burst")

    def __init__(self, translator: DmaTranslator, dev: "PciDevice") -> None:
        self.translator = translator
        self.dev = dev
        self._burst: Callable[[Sequence[int], Sequence[int], bool], Pieces | None] | None = \
            getattr(translator, "translate_burst", None)

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

    # (One run, a transfer within a page or contiguous memory, is copied here
    # without read_runs_into()/write_runs(): a device's every transfer.)

    def dma_read_into(self, iova: int, out: "bytearray | memoryview | np.ndarray") -> None:
        dest = out if isinstance(out, np.ndarray) else np.frombuffer(out, dtype=np.uint8)
        runs = self._runs(iova, dest.nbytes, False)
        if len(runs) == 1:
            runs[0][0].read_into(runs[0][1], dest)
        else:
            read_runs_into(runs, dest)

    def dma_write(self, iova: int, data: bytes | bytearray | memoryview | np.ndarray) -> None:
        runs = self._runs(iova, len(data), True)
        if len(runs) == 1 and isinstance(data, np.ndarray):
            runs[0][0].write_at(runs[0][1], data)
        else:
            write_runs(runs, data)

    def _runs_many(self, segments: Sequence[tuple[int, int]], write: bool) -> list[list[Run]]:
        """_runs() of each range, in order; bus mastering and the platform's
        state already checked (by _pieces())."""
        t = self.translator
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

    def _pieces(self, iovas: Sequence[int], lens: Sequence[int], write: bool) -> Pieces:
        """Every range checked and translated, or the DmaError of the first refused one."""
        t = self.translator
        if not self.dev.bus_master_enabled() or not t.dma_enabled():
            self._runs(iovas[0], lens[0], write)          # raises the DmaError saying why
        if self._burst is not None and min(lens) > 0 and min(iovas) >= 0 and max(iovas) + max(lens) <= 1 << 64:
            found = self._burst(iovas, lens, write)
            if found is not None:
                return found
        return Pieces.of_runs(self._runs_many(list(zip(iovas, lens)), write))

    def dma_read_burst(self, iovas: Sequence[int], lens: Sequence[int]) -> bytearray:
        """Read the ranges (iovas[i], lens[i]) into one new buffer, one after
        the other: every range is checked first (a refusal moves nothing),
        then each memory object is read in one call."""
        out = bytearray(sum(lens))
        if iovas:
            self._pieces(iovas, lens, False).read(memoryview(out))
        return out

    def dma_prefetch(self, iovas: Sequence[int], lens: Sequence[int]) -> bytearray | None:
        """dma_read_burst() if the IOMMU lets every byte through, else None,
        and no fault: a device reading ahead (a descriptor ring in bulk),
        which must not fault where the reads it needs would not."""
        t = self.translator
        if self._burst is None or not self.dev.bus_master_enabled() or not t.dma_enabled() or min(lens) <= 0 \
                or min(iovas) < 0 or max(iovas) + max(lens) > 1 << 64:
            return None
        found = self._burst(iovas, lens, False)
        if found is None:
            return None
        out = bytearray(sum(lens))
        found.read(memoryview(out))
        return out

    def dma_write_burst(self, iovas: Sequence[int], lens: Sequence[int],
                        data: bytes | bytearray | memoryview) -> None:
        """Write ``data`` (the ranges' bytes one after the other) to the
        ranges: every range is checked first (a refusal moves nothing)."""
        if iovas:
            self._pieces(iovas, lens, True).write(memoryview(data).cast("B"))

    def dma_read_many(self, segments: Sequence[tuple[int, int]]) -> list[bytes]:
        """Read several (iova, length) ranges: every one is checked first, then
        the data moves in as few host operations as the memory allows."""
        if not segments:
            return []
        iovas, lens = zip(*segments)
        raw = bytes(self.dma_read_burst(iovas, lens))
        out, pos = [], 0
        for n in lens:
            out.append(raw[pos:pos + n])
            pos += n
        return out

    def dma_write_many(self, segments: Sequence[tuple[int, bytes | bytearray | memoryview]]) -> None:
        """Write several (iova, data) ranges: every one is checked first (a
        refusal moves nothing), then the data moves."""
        if segments:
            views = [memoryview(d).cast("B") for _, d in segments]
            self.dma_write_burst([a for a, _ in segments], [v.nbytes for v in views], bytearray().join(views))


class Versioned(Protocol):
    """What a translation comes from (a TCE table's storage, a VT-d paging
    domain): any change of its entries bumps ``generation``."""

    generation: int


class TranslationCache:
    """A translator's cache of recent translations: a PHB's TCE cache, a VT-d
    unit's IOTLB.

    Entries remember the table they came from and its generation; any change
    of the table bumps the generation, so a stale translation is never served
    (the model of the hardware cache that tce_kill or an IOTLB invalidation
    flushes).  Given the IOMMU page size, transfers inside one page (a NIC's
    descriptors and frames) are cached by page, as the hardware caches TCEs
    and PTEs: many buffers, one entry each, and a whole burst of buffers
    translated with one check of the table's generation.
    """

    SIZE = 16
    PAGES = 4096
    FILL = 16                  # pages a miss walks at once (a power of 2)

    def __init__(self) -> None:
        self._entries: dict[tuple[int, int, bool], tuple[weakref.ref[Versioned], int, list[Run]]] = {}
        # Per direction: the table, its generation, and page -> (memory, offset of the page).
        self._pages: dict[bool, tuple[weakref.ref[Versioned], int, dict[int, tuple["PhysicalPages", int]]]] = {}

    def clear(self) -> None:
        self._entries.clear()
        self._pages.clear()

    def translate(self, table: Versioned, iova: int, length: int, write: bool,
                  slow: Callable[[int, int, bool], Translation], page_shift: int | None = None) -> Translation:
        """The cached translation of the transfer, or ``slow``'s (cached if it succeeds)."""
        if page_shift is not None and length > 0 and (iova ^ (iova + length - 1)) >> page_shift == 0:
            pages = self._page_map(table, write)
            hit = pages.get(iova >> page_shift) or self._fill(pages, iova >> page_shift, write, slow, page_shift)
            if hit is None:
                return slow(iova, length, write)         # the fault (or odd layout) of this very transfer
            return [(hit[0], hit[1] + (iova & ((1 << page_shift) - 1)), length)]
        key = (iova, length, write)
        found = self._entries.get(key)
        if found is not None and found[0]() is table and found[1] == table.generation:
            return found[2]
        runs = slow(iova, length, write)
        if isinstance(runs, list):
            if len(self._entries) >= self.SIZE:
                self._entries.pop(next(iter(self._entries)))
            # A weak reference: a removed window's table is not kept alive here.
            self._entries[key] = (weakref.ref(table), table.generation, runs)
        return runs

    def translate_burst(self, table: Versioned, iovas: Sequence[int], lens: Sequence[int], write: bool,
                        slow: Callable[[int, int, bool], Translation], page_shift: int) -> Pieces | None:
        """Each range through the page cache, in at most two pages that are
        physically consecutive; None otherwise, or if a page does not
        translate (the caller then translates range by range and finds the
        fault).  ``slow`` translates pages of ``table`` only."""
        pages = self._page_map(table, write)
        firsts = [iova >> page_shift for iova in iovas]
        found = list(map(pages.get, firsts))
        if None in found:
            for i, page in enumerate(firsts):
                if found[i] is None:
                    found[i] = pages.get(page) or self._fill(pages, page, write, slow, page_shift)
                    if found[i] is None:
                        return None
        hits = cast(list[tuple["PhysicalPages", int]], found)
        # Ranges that run into the next page: it must follow in the same memory.
        lasts = [(iova + ln - 1) >> page_shift for iova, ln in zip(iovas, lens)]
        if lasts != firsts:
            psize = 1 << page_shift
            for page, last, hit in zip(firsts, lasts, hits):
                if last != page:
                    nxt = pages.get(last) or self._fill(pages, last, write, slow, page_shift)
                    if last != page + 1 or nxt is None or nxt[0] is not hit[0] or nxt[1] != hit[1] + psize:
                        return None
        mask = (1 << page_shift) - 1
        return Pieces([hit[0] for hit in hits], [hit[1] + (iova & mask) for hit, iova in zip(hits, iovas)], list(lens))

    def _page_map(self, table: Versioned, write: bool) -> dict[int, tuple["PhysicalPages", int]]:
        """The cached pages of ``table`` as it is now (emptied when it changed)."""
        found = self._pages.get(write)
        if found is not None and found[0]() is table and found[1] == table.generation:
            return found[2]
        # A weak reference: a removed window's table is not kept alive here.
        pages: dict[int, tuple["PhysicalPages", int]] = {}
        self._pages[write] = (weakref.ref(table), table.generation, pages)
        return pages

    def _fill(self, pages: dict[int, tuple["PhysicalPages", int]], page: int, write: bool,
              slow: Callable[[int, int, bool], Translation], page_shift: int) -> tuple["PhysicalPages", int] | None:
        """Translate ``page`` and cache it.  A miss walks the aligned block of
        FILL pages around it, and caches every page of it that lies wholly in
        one run of memory, when the whole block translates (``slow`` then
        vouches that it lies in ``table``: a translator's walk of a range never
        crosses into another table): a device streaming through a buffer, one
        transfer per page, walks once a block instead of once a page.
        Otherwise the page alone, as a single walk gives it."""
        if len(pages) + self.FILL > self.PAGES:
            pages.clear()
        first = page & -self.FILL
        runs = slow(first << page_shift, self.FILL << page_shift, write)
        if isinstance(runs, list):
            pos = first << page_shift
            for obj, off, ln in runs:
                for pg in range((pos + (1 << page_shift) - 1) >> page_shift, (pos + ln) >> page_shift):
                    pages[pg] = (obj, off + (pg << page_shift) - pos)
                pos += ln
            hit = pages.get(page)
            if hit is not None:
                return hit
        runs = slow(page << page_shift, 1 << page_shift, write)
        if not isinstance(runs, list) or len(runs) != 1:
            return None
        hit = pages[page] = (runs[0][0], runs[0][1])
        return hit


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
