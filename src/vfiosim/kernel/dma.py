"""Device DMA through an IOMMU, whatever the platform.

A device's transfer of ``length`` bytes at bus address ``iova`` goes through
its :class:`DmaTranslator`: on POWER the PE (a TCE walk, EEH behind it), on
x86 the device's VT-d context entry (its group's IOMMU domain).  The
translator answers with the *runs* of host memory the transfer covers, each
physically contiguous, or with a :class:`DmaFault` (nothing moves).  Data
is copied run by run, one NumPy operation each, never page by page.

:class:`IommuBusMaster` is the device's side of that path (``dev.bus_master``,
the :class:`~vfiosim.kernel.pci.device.BusMaster` device models call): bus
mastering, then the translator, then the copy.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

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
