"""What every platform provides: PEs that translate device DMA, and EEH."""

from __future__ import annotations

import weakref
from typing import TYPE_CHECKING, Callable, Sequence

import numpy as np

from ..iommu.dma import DmaFault, read_runs, read_runs_into, read_runs_many, translate_tces, write_runs, write_runs_many
from ..iommu.table_group import TableGroup
from ..mm import PhysicalMemory
from ..pci.device import DmaError, PciDevice
from .eeh import EehPe

if TYPE_CHECKING:
    from ..iommu.iommu_group import IommuGroup


class TceCache:
    """A PHB's cache of recent translations.

    Entries are keyed by the transfer and remember the table storage and its
    generation; any TCE change bumps the generation, so a stale translation
    is never served (the model of the hardware cache that tce_kill flushes).
    Transfers inside one IOMMU page (a NIC's descriptors and frames) are
    cached by page, as the hardware caches TCEs: many buffers, one entry each.
    """

    SIZE = 16
    PAGES = 4096

    def __init__(self) -> None:
        self._entries: dict[tuple[int, int, bool], tuple[weakref.ref, int, list]] = {}
        self._pages: dict[tuple[int, bool], tuple[weakref.ref, int, object, int]] = {}

    def clear(self) -> None:
        self._entries.clear()
        self._pages.clear()

    def translate(self, storage, iova: int, length: int, write: bool, slow, page_shift: int | None = None):
        if page_shift is not None and length > 0 and (iova ^ (iova + length - 1)) >> page_shift == 0:
            return self._translate_in_page(storage, iova, length, write, slow, page_shift)
        key = (iova, length, write)
        hit = self._entries.get(key)
        if hit is not None and hit[0]() is storage and hit[1] == storage.generation:
            return hit[2]
        runs = slow(iova, length, write)
        if isinstance(runs, list):
            if len(self._entries) >= self.SIZE:
                self._entries.pop(next(iter(self._entries)))
            # A weak reference: a removed window's table is not kept alive here.
            self._entries[key] = (weakref.ref(storage), storage.generation, runs)
        return runs

    def _translate_in_page(self, storage, iova: int, length: int, write: bool, slow, page_shift: int):
        page = iova >> page_shift
        key = (page, write)
        hit = self._pages.get(key)
        if hit is not None and hit[0]() is storage and hit[1] == storage.generation:
            return [(hit[2], hit[3] + (iova & ((1 << page_shift) - 1)), length)]
        psize = 1 << page_shift
        runs = slow(page << page_shift, psize, write)
        if not isinstance(runs, list) or len(runs) != 1 or runs[0][2] != psize:
            return slow(iova, length, write)         # the fault (or odd layout) of this very transfer
        if len(self._pages) >= self.PAGES:
            self._pages.clear()
        obj, off, _ = runs[0]
        self._pages[key] = (weakref.ref(storage), storage.generation, obj, off)
        return [(obj, off + (iova & (psize - 1)), length)]


class Pe:
    """A Partitionable Endpoint: the unit of DMA translation and isolation.

    Subclasses say how a bus address finds its TCEs (``lookup_tces``) and
    what a refused DMA does to the PE (``dma_fault``).
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

    def add_device(self, dev: PciDevice) -> None:
        self.devices.append(dev)
        dev.bus_master = PeBusMaster(self, dev)
        dev.mmio_enabled_by_platform = self.mmio_enabled
        # MSI-X messages are DMA writes to the PHB's MSI window: a frozen PE drops them too.
        dev.dma_enabled_by_platform = self.dma_enabled

    def mmio_enabled(self) -> bool:
        return self.eeh is None or not self.eeh.mmio_stopped

    def dma_enabled(self) -> bool:
        return self.eeh is None or not self.eeh.dma_stopped

    def lookup_tces(self, iova: int, length: int):
        """Return (tces, page_shift) for the pages of the range, or a DmaFault."""
        raise NotImplementedError

    def dma_fault(self, fault: DmaFault, write: bool) -> None:
        """The IOMMU refused a transfer; platforms decide what that does."""
        self.dma_faults += 1

    def translate(self, iova: int, length: int, write: bool):
        found = self.lookup_tces(iova, length)
        if isinstance(found, DmaFault):
            return found
        tces, page_shift = found
        return translate_tces(tces, page_shift, iova, length, write, self.phys)

    def windows(self) -> list[dict]:
        """The DMA windows currently programmed in hardware, for topology."""
        return []


class PeBusMaster:
    """A device's DMA path: bus master enable, PE state, then the IOMMU."""

    def __init__(self, pe: Pe, dev: PciDevice) -> None:
        self.pe = pe
        self.dev = dev

    def _runs(self, iova: int, length: int, write: bool):
        if length < 0 or iova < 0 or iova + length > 1 << 64:
            raise DmaError(iova, length, write, "bus address range out of bounds")
        if not self.dev.bus_master_enabled():
            raise DmaError(iova, length, write, "bus mastering is disabled (PCI_COMMAND_MASTER is clear)")
        if not self.pe.dma_enabled():
            raise DmaError(iova, length, write, f"{self.pe.name} is frozen (EEH): DMA is stopped")
        if length == 0:
            return []
        runs = self.pe.translate(iova, length, write)
        if isinstance(runs, DmaFault):
            self.pe.dma_fault(runs, write)
            raise DmaError(iova, length, write, runs.reason)
        return runs

    def dma_read(self, iova: int, length: int) -> bytes:
        return read_runs(self._runs(iova, length, False))

    def dma_read_into(self, iova: int, out: bytearray | memoryview | np.ndarray) -> None:
        dest = out if isinstance(out, np.ndarray) else np.frombuffer(out, dtype=np.uint8)
        read_runs_into(self._runs(iova, dest.nbytes, False), dest)

    def dma_write(self, iova: int, data: bytes | bytearray | memoryview) -> None:
        write_runs(self._runs(iova, len(data), True), data)

    def _runs_many(self, segments: Sequence[tuple[int, int]], write: bool) -> list:
        """_runs() for each range, with the device and PE checks done once."""
        if not segments:
            return []
        iova, length = segments[0]
        if not self.dev.bus_master_enabled() or not self.pe.dma_enabled():
            self._runs(iova, length, write)                  # raises the DmaError saying why
        translate = self.pe.translate
        out = []
        for iova, length in segments:
            if length <= 0 or iova < 0 or iova + length > 1 << 64:
                out.append(self._runs(iova, length, write))
                continue
            runs = translate(iova, length, write)
            if isinstance(runs, DmaFault):
                self.pe.dma_fault(runs, write)
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
