"""PCI devices: config space, BARs, interrupts, and DMA through a bus master.

A device model subclasses :class:`PciDevice` and implements ``mmio_read`` /
``mmio_write`` for its BARs and ``reset``.  It reaches memory only through
``self.bus_master`` (:class:`BusMaster`): the platform behind it translates
every bus address through the IOMMU of the device's PE, so a device model
cannot touch memory the IOMMU does not allow.  This is the public interface
for writing your own device models.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Protocol

from .config import (PCI_BASE_ADDRESS_0, PCI_BASE_ADDRESS_MEM_PREFETCH, PCI_BASE_ADDRESS_MEM_TYPE_64,
                     PCI_CAP_ID_MSI, PCI_CLASS_DEVICE, PCI_CLASS_PROG, PCI_COMMAND, PCI_COMMAND_INTX_DISABLE,
                     PCI_COMMAND_MASTER, PCI_COMMAND_MEMORY, PCI_DEVICE_ID, PCI_HEADER_TYPE, PCI_INTERRUPT_LINE,
                     PCI_INTERRUPT_PIN, PCI_MSI_FLAGS, PCI_MSI_FLAGS_64BIT, PCI_MSI_FLAGS_ENABLE,
                     PCI_REVISION_ID, PCI_STATUS, PCI_STATUS_INTERRUPT, PCI_SUBSYSTEM_ID, PCI_SUBSYSTEM_VENDOR_ID,
                     PCI_VENDOR_ID, ConfigSpace)

if TYPE_CHECKING:
    import numpy as np

    from ..iommu.iommu_group import IommuGroup


class DmaError(Exception):
    """A DMA the IOMMU refused; nothing was transferred."""

    def __init__(self, iova: int, length: int, write: bool, reason: str) -> None:
        super().__init__(f"DMA {'write' if write else 'read'} {iova:#x}+{length:#x}: {reason}")
        self.iova = iova
        self.length = length
        self.write = write
        self.reason = reason


class BusMaster(Protocol):
    """A device's path to memory: bus addresses in, bytes out or in.

    Implementations translate [iova, iova+length) through the IOMMU and move
    the data run by run; if any page is not mapped with the needed
    permission they raise :class:`DmaError` and move nothing.
    """

    def dma_read(self, iova: int, length: int) -> bytes: ...

    def dma_read_into(self, iova: int, out: "bytearray | memoryview | np.ndarray") -> None:
        """Read len(out) bytes from ``iova`` straight into ``out`` (bytes-like,
        or a uint8 NumPy array): the bulk path, no allocation."""
        ...

    def dma_write(self, iova: int, data: bytes | bytearray | memoryview) -> None: ...


class NoBusMaster:
    """Before a device sits on a platform bus it cannot DMA at all."""

    def dma_read(self, iova: int, length: int) -> bytes:
        raise DmaError(iova, length, False, "device is not attached to a bus")

    def dma_read_into(self, iova: int, out: "bytearray | memoryview | np.ndarray") -> None:
        raise DmaError(iova, len(out), False, "device is not attached to a bus")

    def dma_write(self, iova: int, data: bytes | bytearray | memoryview) -> None:
        raise DmaError(iova, len(data), True, "device is not attached to a bus")


@dataclass
class Bar:
    index: int
    size: int
    is_64bit: bool = False
    prefetchable: bool = False
    mmap_ok: bool = True


def parse_bdf(bdf: str) -> tuple[int, int, int, int]:
    """"DDDD:BB:SS.F" -> (domain, bus, slot, function)."""
    try:
        dom, bus, rest = bdf.split(":")
        slot, fn = rest.split(".")
        parts = (int(dom, 16), int(bus, 16), int(slot, 16), int(fn, 16))
    except ValueError:
        raise ValueError(f"{bdf!r} is not a PCI address of the form DDDD:BB:SS.F") from None
    if not (0 <= parts[0] <= 0xFFFF and 0 <= parts[1] <= 0xFF and 0 <= parts[2] < 32 and 0 <= parts[3] < 8):
        raise ValueError(f"{bdf!r} is out of range for a PCI address")
    return parts


class PciDevice:
    """A PCI function: identity, config space, BARs, INTx/MSI, DMA."""

    model = "generic"

    def __init__(self, bdf: str, *, vendor: int, device: int, class_code: int, revision: int = 0,
                 subsystem_vendor: int = 0x1AF4, subsystem: int = 0x1100, interrupt_pin: int = 1) -> None:
        self.domain, self.bus, self.slot, self.function = parse_bdf(bdf)
        self.bdf = f"{self.domain:04x}:{self.bus:02x}:{self.slot:02x}.{self.function}"
        self.vendor = vendor
        self.device_id = device
        self.class_code = class_code
        self.config = ConfigSpace()
        self.bars: dict[int, Bar] = {}
        self.iommu_group: "IommuGroup | None" = None
        self.driver: str | None = "vfio-pci"
        self.bus_master: BusMaster = NoBusMaster()
        # Set by the platform: whether MMIO currently reaches the device
        # (False while an EEH freeze stops MMIO to its PE).
        self.mmio_enabled_by_platform: Callable[[], bool] = lambda: True
        # Set by vfio-pci while it has interrupt handlers installed.
        self.on_intx: Callable[[int], None] | None = None
        self.on_msi: Callable[[int], None] | None = None
        self.intx_level = 0
        self.reset_method: str | None = None     # "flr", "pm", "bus" or None
        self.bar_addresses: dict[int, int] = {}
        self.log: Callable[[str], None] = lambda text: None
        c = self.config
        c.set(PCI_VENDOR_ID, 2, vendor)
        c.set(PCI_DEVICE_ID, 2, device)
        c.set(PCI_COMMAND, 2, 0, wmask=PCI_COMMAND_MEMORY | PCI_COMMAND_MASTER | PCI_COMMAND_INTX_DISABLE | 0x1)
        c.set(PCI_REVISION_ID, 1, revision)
        c.set(PCI_CLASS_PROG, 1, class_code & 0xFF)
        c.set(PCI_CLASS_DEVICE, 2, class_code >> 8)
        c.set(PCI_HEADER_TYPE, 1, 0)
        c.set(PCI_SUBSYSTEM_VENDOR_ID, 2, subsystem_vendor)
        c.set(PCI_SUBSYSTEM_ID, 2, subsystem)
        c.set(PCI_INTERRUPT_LINE, 1, 0, wmask=0xFF)
        c.set(PCI_INTERRUPT_PIN, 1, interrupt_pin)
        self._reset_config = None

    # -- construction helpers for models ---------------------------------------

    def add_bar(self, index: int, size: int, *, is_64bit: bool = False, prefetchable: bool = False) -> None:
        if size & (size - 1) or size < 16:
            raise ValueError(f"BAR size {size:#x} must be a power of two >= 16")
        self.bars[index] = Bar(index, size, is_64bit, prefetchable)
        flags = (PCI_BASE_ADDRESS_MEM_TYPE_64 if is_64bit else 0) | (PCI_BASE_ADDRESS_MEM_PREFETCH if prefetchable else 0)
        self.config.set(PCI_BASE_ADDRESS_0 + 4 * index, 4, flags, wmask=~(size - 1) & 0xFFFFFFF0)
        if is_64bit:
            self.config.set(PCI_BASE_ADDRESS_0 + 4 * (index + 1), 4, 0, wmask=0xFFFFFFFF)

    def assign_bar_address(self, index: int, addr: int) -> None:
        """Firmware/host BAR assignment (a bus address in the PHB's window)."""
        bar = self.bars[index]
        self.bar_addresses[index] = addr
        reg = PCI_BASE_ADDRESS_0 + 4 * index
        low = self.config.read(reg, 4) & 0xF
        self.config.data[reg:reg + 4] = ((addr & 0xFFFFFFF0) | low).to_bytes(4, "little")
        if bar.is_64bit:
            self.config.data[reg + 4:reg + 8] = (addr >> 32).to_bytes(4, "little")

    def add_msi_capability(self, vectors: int = 1, is_64bit: bool = True) -> int:
        """An MSI capability (no per-vector masking), as QEMU's msi_init()."""
        length = 14 if is_64bit else 10
        at = self.config.add_capability(PCI_CAP_ID_MSI, length)
        mmc = (vectors.bit_length() - 1) << 1
        flags = mmc | (PCI_MSI_FLAGS_64BIT if is_64bit else 0)
        # Enable and Multiple Message Enable are writable; so are address and data.
        self.config.set(at + PCI_MSI_FLAGS, 2, flags, wmask=PCI_MSI_FLAGS_ENABLE | 0x70)
        self.config.set(at + 4, 4, 0, wmask=0xFFFFFFFC)
        if is_64bit:
            self.config.set(at + 8, 4, 0, wmask=0xFFFFFFFF)
            self.config.set(at + 12, 2, 0, wmask=0xFFFF)
        else:
            self.config.set(at + 8, 2, 0, wmask=0xFFFF)
        return at

    def finish(self) -> None:
        """Snapshot config space as reset leaves it."""
        self._reset_config = bytes(self.config.data)

    # -- what the host (through vfio-pci) does to the device -------------------

    def mmio_read(self, bar: int, offset: int, size: int) -> int:
        """A load of ``size`` bytes from a BAR; models override."""
        return (1 << (8 * size)) - 1

    def mmio_write(self, bar: int, offset: int, size: int, value: int) -> None:
        """A store to a BAR; models override."""

    def host_mmio_read(self, bar: int, offset: int, size: int) -> int:
        """A load as it reaches the device from the PHB: all-ones if stopped."""
        if not self.mmio_enabled_by_platform() or not self.memory_decode_enabled():
            return (1 << (8 * size)) - 1
        return self.mmio_read(bar, offset, size)

    def host_mmio_write(self, bar: int, offset: int, size: int, value: int) -> None:
        if not self.mmio_enabled_by_platform() or not self.memory_decode_enabled():
            return
        self.mmio_write(bar, offset, size, value)

    def memory_decode_enabled(self) -> bool:
        return bool(self.config.read(PCI_COMMAND, 2) & PCI_COMMAND_MEMORY)

    def bus_master_enabled(self) -> bool:
        return bool(self.config.read(PCI_COMMAND, 2) & PCI_COMMAND_MASTER)

    def config_read(self, offset: int, size: int) -> int:
        if not self.mmio_enabled_by_platform():
            return (1 << (8 * size)) - 1
        return self.config.read(offset, size)

    def config_write(self, offset: int, size: int, value: int) -> None:
        if not self.mmio_enabled_by_platform():
            return
        self.config.write(offset, size, value)

    def reset(self) -> None:
        """Function-level reset: config space and device state to power-on."""
        if self._reset_config is not None:
            self.config.data[:] = self._reset_config
            for index, addr in self.bar_addresses.items():
                self.assign_bar_address(index, addr)
        self.intx_level = 0

    # -- interrupts --------------------------------------------------------------

    def msi_enabled(self) -> bool:
        at = self.config.find_capability(PCI_CAP_ID_MSI)
        return bool(at and self.config.read(at + PCI_MSI_FLAGS, 2) & PCI_MSI_FLAGS_ENABLE)

    def set_intx(self, level: int) -> None:
        """pci_set_irq(): assert or deassert INTx (level triggered)."""
        level = 1 if level else 0
        status = self.config.read(PCI_STATUS, 2)
        status = status | PCI_STATUS_INTERRUPT if level else status & ~PCI_STATUS_INTERRUPT
        self.config.data[PCI_STATUS:PCI_STATUS + 2] = status.to_bytes(2, "little")
        changed = level != self.intx_level
        self.intx_level = level
        disabled = self.config.read(PCI_COMMAND, 2) & PCI_COMMAND_INTX_DISABLE
        if changed and level and not disabled and self.on_intx is not None:
            self.on_intx(level)

    def msi_notify(self, vector: int = 0) -> None:
        """msi_notify(): send an MSI message if MSI is enabled."""
        if self.msi_enabled() and self.on_msi is not None:
            self.on_msi(vector)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.bdf} {self.vendor:04x}:{self.device_id:04x}>"
