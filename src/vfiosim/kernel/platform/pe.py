"""Partitionable Endpoints: POWER's unit of DMA translation and isolation.

A PE translates its devices' DMA through the TCEs of the window the bus
address falls in.  The IOMMU hardware checks every IOMMU page a transfer
touches: the entry must be valid and carry the permission the direction
needs (TCE_PCI_READ for the device reading memory, TCE_PCI_WRITE for it
writing).  Pages that are physically contiguous are merged into runs, and
each run is copied in one NumPy operation, so a transfer costs one step per
run, not per page.  A refused DMA is the platform's to handle (PowerNV:
an EEH freeze).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Any, Callable, Iterator, Sequence

import numpy as np

from ..dma import DmaFault, IommuBusMaster, Pieces, Run, Translation, TranslationCache
from ..iommu.table_group import TableGroup
from ..iommu.tce import TCE_PCI_READ, TCE_PCI_WRITE, TceStorage
from ..mm import PhysicalMemory
from ..pci.device import PciDevice
from ..progression import as_progression
from .base import IommuMapping
from .eeh import EehPe

if TYPE_CHECKING:
    from ..iommu.iommu import IommuGroup

TceLookup = tuple[np.ndarray, int]      # the TCEs of the pages a range covers, and their page shift


def translate_tces(tces: np.ndarray, page_shift: int, iova: int, length: int, write: bool,
                   phys: PhysicalMemory) -> Translation:
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
    begins: list[int] = []
    spans: list[int] = []
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


def _runs(phys: PhysicalMemory, begins: list[int], spans: list[int], iova: int, length: int) -> Translation:
    runs: list[Run] = []
    done = 0
    for begin, span in zip(begins, spans):
        found = phys.lookup(begin)
        if found is None or found[1] + span > found[0].length:
            return DmaFault(iova + done, f"TCE points at {begin:#x}, which is not RAM")
        runs.append((found[0], found[1], span))
        done += span
    return runs


class Pe(ABC):
    """A Partitionable Endpoint: the unit of DMA translation and isolation,
    and its devices' DMA translator (kernel/dma.py).

    Subclasses say how a bus address finds its TCEs (``lookup_tces``), what a
    refused DMA does to the PE (``dma_fault``) and which windows hardware
    has programmed (``windows``).
    """

    def __init__(self, name: str, table_group: TableGroup, phys: PhysicalMemory,
                 log: Callable[[str], None], eeh: EehPe | None) -> None:
        self.name = name
        self.table_group = table_group
        self.phys = phys
        self.log = log
        self.eeh = eeh
        self.devices: list[PciDevice] = []
        self.iommu_group: "IommuGroup | None" = None
        self.dma_faults = 0
        self.tce_cache = TranslationCache()      # the PHB's TCE cache

    def add_device(self, dev: PciDevice) -> None:
        self.devices.append(dev)
        dev.bus_master = IommuBusMaster(self, dev)
        dev.mmio_enabled_by_platform = self.mmio_enabled
        # MSI-X messages are DMA writes to the PHB's MSI window: a frozen PE drops them too.
        dev.dma_enabled_by_platform = self.dma_enabled

    def mmio_enabled(self) -> bool:
        return self.eeh is None or not self.eeh.mmio_stopped

    def dma_enabled(self) -> bool:
        return self.eeh is None or not self.eeh.dma_stopped

    @abstractmethod
    def lookup_tces(self, iova: int, length: int) -> TceLookup | DmaFault:
        """Return (tces, page_shift) for the pages of the range, or a DmaFault."""

    def dma_fault(self, fault: DmaFault, write: bool) -> None:
        """The IOMMU refused a transfer; platforms decide what that does."""
        self.dma_faults += 1

    def translate_in_window(self, storage: TceStorage, bus_start: int, bus_end: int, page_shift: int,
                            iovas: Sequence[int], lens: Sequence[int], write: bool) -> Pieces | None:
        """translate_burst() of ranges of one window, through the TCE cache."""
        def window_page(iova: int, length: int, write: bool) -> Translation:
            if bus_start <= iova and iova + length <= bus_end:
                return Pe.translate(self, iova, length, write)
            return DmaFault(iova, "outside the window")
        return self.tce_cache.translate_burst(storage, iovas, lens, write, window_page, page_shift)

    def translate(self, iova: int, length: int, write: bool) -> Translation:
        found = self.lookup_tces(iova, length)
        if isinstance(found, DmaFault):
            return found
        tces, page_shift = found
        return translate_tces(tces, page_shift, iova, length, write, self.phys)

    @abstractmethod
    def windows(self) -> list[dict[str, Any]]:
        """The DMA windows currently programmed in hardware, for topology."""

    @abstractmethod
    def describe_phb(self) -> dict[str, Any]:
        """The PHB the PE sits behind, for topology."""

    @abstractmethod
    def mappings(self, limit: int | None = None) -> Iterator[IommuMapping]:
        """The TCEs live in the hardware's windows (at most ``limit`` per window)."""

    @abstractmethod
    def state(self) -> Any:
        """Everything of the PE's windows, as comparable plain data."""

    def describe(self) -> dict[str, Any]:
        tg = self.table_group
        return {
            "name": self.name,
            "iommu_group": self.iommu_group.id if self.iommu_group else None,
            "devices": [d.bdf for d in self.devices],
            "dma32_window": {"start": tg.tce32_start, "size": tg.tce32_size},
            "ddw": {"page_sizes": tg.pgsizes, "max_windows": tg.max_dynamic_windows_supported,
                    "max_levels": tg.max_levels},
            "windows": self.windows(),
            "eeh": None if self.eeh is None else {"state": self.eeh.get_state(), "frozen": self.eeh.frozen,
                                                 "freezes": self.eeh.freeze_count},
            "phb": self.describe_phb(),
        }


def tce_mappings(where: str, storage: TceStorage, first_entry: int, size: int, page_shift: int,
                 limit: int | None) -> Iterator[IommuMapping]:
    """The valid TCEs of ``size`` entries of storage (the first ``limit``),
    entry 0 being bus page ``first_entry``."""
    mask = (1 << page_shift) - 1
    for i in storage.used_indices(0, size)[:limit].tolist():
        tce = storage.get(i)
        if tce & (TCE_PCI_READ | TCE_PCI_WRITE):
            yield IommuMapping(where, (first_entry + i) << page_shift, tce & ~mask, 1 << page_shift)
