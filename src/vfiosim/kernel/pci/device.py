"""PCI devices: config space, BARs, interrupts, and DMA through a bus master.

A device model subclasses :class:`PciDevice` and implements ``mmio_read`` /
``mmio_write`` for its BARs and ``reset``.  It reaches memory only through
``self.bus_master`` (:class:`BusMaster`): the platform behind it translates
every bus address through the device's IOMMU (kernel/dma.py), so a device model
cannot touch memory the IOMMU does not allow.  This is the public interface
for writing your own device models.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Protocol, Sequence

import numpy as np

from ..mm import unpin_run_of
from .config import (PCI_BASE_ADDRESS_0, PCI_BASE_ADDRESS_MEM_PREFETCH, PCI_BASE_ADDRESS_MEM_TYPE_64,
                     PCI_CAP_ID_MSI, PCI_CAP_ID_MSIX, PCI_CAP_MSIX_SIZEOF, PCI_CLASS_DEVICE, PCI_CLASS_PROG,
                     PCI_COMMAND, PCI_COMMAND_INTX_DISABLE, PCI_COMMAND_MASTER, PCI_COMMAND_MEMORY, PCI_DEVICE_ID,
                     PCI_HEADER_TYPE, PCI_INTERRUPT_LINE, PCI_INTERRUPT_PIN, PCI_MSI_FLAGS, PCI_MSI_FLAGS_64BIT,
                     PCI_MSI_FLAGS_ENABLE, PCI_MSIX_ENTRY_CTRL_MASKBIT, PCI_MSIX_ENTRY_DATA,
                     PCI_MSIX_ENTRY_LOWER_ADDR, PCI_MSIX_ENTRY_SIZE, PCI_MSIX_ENTRY_UPPER_ADDR,
                     PCI_MSIX_ENTRY_VECTOR_CTRL, PCI_MSIX_FLAGS, PCI_MSIX_FLAGS_ENABLE, PCI_MSIX_FLAGS_MASKALL,
                     PCI_MSIX_MAX_VECTORS, PCI_MSIX_PBA, PCI_MSIX_TABLE, PCI_REVISION_ID, PCI_STATUS,
                     PCI_STATUS_INTERRUPT, PCI_SUBSYSTEM_ID, PCI_SUBSYSTEM_VENDOR_ID, PCI_VENDOR_ID, ConfigSpace,
                     PCI_CFG_SPACE_SIZE, PCI_CFG_SPACE_EXP_SIZE)

if TYPE_CHECKING:
    from ..iommu.iommu import IommuGroup, IommuOps


@dataclass(frozen=True)
class Register:
    """A register of a BAR, as its device model declares it.

    ``write_effect``: a store does more than keep a value that later loads
    read back -- it starts work (a DMA), raises, acknowledges or unmasks an
    interrupt.  A store without one may be *posted*, as a PCIe write is: a
    transport may perform it later, provided that per device a later load or
    side-effecting store observes every earlier store, in order.
    ``read_effect``: a load changes the device (read-to-clear, a FIFO pop), so
    it must happen exactly once.  Undeclared bytes count as both."""

    offset: int
    size: int
    write_effect: bool = True
    read_effect: bool = False


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

    def dma_write(self, iova: int, data: "bytes | bytearray | memoryview | np.ndarray") -> None: ...

    def dma_read_many(self, segments: Sequence[tuple[int, int]]) -> list[bytes]:
        """Scatter-gather read of several (iova, length) ranges: every range is
        checked first (a refusal moves nothing), then the data moves."""
        ...

    def dma_write_many(self, segments: Sequence[tuple[int, bytes | bytearray | memoryview]]) -> None:
        """Scatter-gather write of several (iova, data) ranges: every range is
        checked first (a refusal moves nothing), then the data moves."""
        ...

    def dma_read_burst(self, iovas: Sequence[int], lens: Sequence[int]) -> bytearray:
        """dma_read_many() into one buffer: the ranges' bytes one after the
        other, without a Python object per range (a NIC's burst of frames)."""
        ...

    def dma_write_burst(self, iovas: Sequence[int], lens: Sequence[int], data: bytes | bytearray | memoryview) -> None:
        """dma_write_many() from one buffer holding the ranges' bytes one after the other."""
        ...

    def dma_prefetch(self, iovas: Sequence[int], lens: Sequence[int]) -> bytearray | None:
        """dma_read_burst() if the IOMMU lets every byte through, else None
        and no fault (nor any other effect): reading ahead."""
        ...


class NoBusMaster:
    """Before a device sits on a platform bus it cannot DMA at all."""

    def dma_read(self, iova: int, length: int) -> bytes:
        raise DmaError(iova, length, False, "device is not attached to a bus")

    def dma_read_into(self, iova: int, out: "bytearray | memoryview | np.ndarray") -> None:
        raise DmaError(iova, len(out), False, "device is not attached to a bus")

    def dma_write(self, iova: int, data: "bytes | bytearray | memoryview | np.ndarray") -> None:
        raise DmaError(iova, len(data), True, "device is not attached to a bus")

    def dma_read_many(self, segments: Sequence[tuple[int, int]]) -> list[bytes]:
        if not segments:
            return []
        raise DmaError(*segments[0], False, "device is not attached to a bus")

    def dma_write_many(self, segments: Sequence[tuple[int, bytes | bytearray | memoryview]]) -> None:
        if segments:
            raise DmaError(segments[0][0], len(segments[0][1]), True, "device is not attached to a bus")

    def dma_read_burst(self, iovas: Sequence[int], lens: Sequence[int]) -> bytearray:
        if not iovas:
            return bytearray()
        raise DmaError(iovas[0], lens[0], False, "device is not attached to a bus")

    def dma_write_burst(self, iovas: Sequence[int], lens: Sequence[int], data: bytes | bytearray | memoryview) -> None:
        if iovas:
            raise DmaError(iovas[0], lens[0], True, "device is not attached to a bus")

    def dma_prefetch(self, iovas: Sequence[int], lens: Sequence[int]) -> bytearray | None:
        return None


@dataclass
class Bar:
    index: int
    size: int
    is_64bit: bool = False
    prefetchable: bool = False
    mmap_ok: bool = True


class BarMemory:
    """A memory BAR seen as physical memory (a ``PhysicalPages``): what a
    VM_PFNMAP mapping of it points at, and what a peer device's DMA reaches
    where the platform's bus and host physical addresses are one (x86).
    It is never RAM: nothing pins it or charges it.  Reads and writes are
    the device's MMIO, in naturally aligned accesses of at most 8 bytes, as
    they reach it from the PCIe fabric (all-ones and dropped while memory
    decoding is off)."""

    __slots__ = ("dev", "index", "phys_base", "length", "page_shift", "compound_shift", "populated",
                 "pincount", "pins", "users", "pinnable")

    def __init__(self, dev: "PciDevice", index: int, phys_base: int, page_shift: int) -> None:
        self.dev = dev
        self.index = index
        self.phys_base = phys_base
        self.length = dev.bars[index].size
        self.page_shift = page_shift
        self.compound_shift = page_shift
        npages = max(1, (self.length + (1 << page_shift) - 1) >> page_shift)
        self.populated = np.ones(npages, dtype=np.bool_)
        self.pincount = np.zeros(npages, dtype=np.int32)
        self.pins = 0
        self.users = 1           # the device's own: it stays in the physical address space
        self.pinnable = False    # VM_PFNMAP: GUP refuses it

    unmapped: "np.ndarray | None" = None    # never pinned, never RAM
    unpin_run = staticmethod(unpin_run_of)

    def unpinned(self, p0: int, n: int) -> None:
        pass

    def read_at(self, off: int, n: int) -> bytes:
        from ..mm import mmio_accesses
        dev, bar = self.dev, self.index
        return b"".join(dev.host_mmio_read(bar, o, size).to_bytes(size, "little") for o, size in mmio_accesses(off, n))

    def read_into(self, off: int, out: np.ndarray) -> None:
        out[:] = np.frombuffer(self.read_at(off, int(out.size)), dtype=np.uint8)

    def write_at(self, off: int, data: "bytes | bytearray | memoryview | np.ndarray") -> None:
        from ..mm import mmio_accesses
        raw = data.tobytes() if isinstance(data, np.ndarray) else bytes(data)
        for o, size in mmio_accesses(off, len(raw)):
            self.dev.host_mmio_write(self.index, o, size, int.from_bytes(raw[o - off:o - off + size], "little"))

    def read_ranges(self, offs: list[int], lens: list[int], out: memoryview) -> None:
        pos = 0
        for off, n in zip(offs, lens):
            out[pos:pos + n] = self.read_at(off, n)
            pos += n

    def write_ranges(self, offs: list[int], lens: list[int], data: memoryview) -> None:
        pos = 0
        for off, n in zip(offs, lens):
            self.write_at(off, data[pos:pos + n])
            pos += n

    def __repr__(self) -> str:
        return f"<BarMemory {self.dev.bdf} BAR{self.index} phys={self.phys_base:#x} len={self.length:#x}>"


@dataclass
class Msix:
    """An MSI-X capability and the structures it points at.

    The table (16 bytes per vector: message address low/high, data, vector
    control) and the Pending Bit Array live in memory BARs of the device; the
    device itself implements them, as hardware does, so they are not part of
    the model's ``mmio_read``/``mmio_write``."""

    cap: int                 # offset of the capability in config space
    vectors: int             # Table Size
    table_bar: int
    table_offset: int
    pba_bar: int
    pba_offset: int
    table: bytearray = field(default_factory=bytearray)
    pba: bytearray = field(default_factory=bytearray)

    @property
    def table_size(self) -> int:
        return self.vectors * PCI_MSIX_ENTRY_SIZE

    @property
    def pba_size(self) -> int:
        """One bit per vector, in QWORDs."""
        return (self.vectors + 63) // 64 * 8

    def ctrl(self, vector: int) -> int:
        at = vector * PCI_MSIX_ENTRY_SIZE + PCI_MSIX_ENTRY_VECTOR_CTRL
        return int.from_bytes(self.table[at:at + 4], "little")

    def message(self, vector: int) -> tuple[int, int]:
        """(address, data) of a table entry."""
        at = vector * PCI_MSIX_ENTRY_SIZE
        lo = int.from_bytes(self.table[at + PCI_MSIX_ENTRY_LOWER_ADDR:at + PCI_MSIX_ENTRY_LOWER_ADDR + 4], "little")
        hi = int.from_bytes(self.table[at + PCI_MSIX_ENTRY_UPPER_ADDR:at + PCI_MSIX_ENTRY_UPPER_ADDR + 4], "little")
        data = int.from_bytes(self.table[at + PCI_MSIX_ENTRY_DATA:at + PCI_MSIX_ENTRY_DATA + 4], "little")
        return (hi << 32) | lo, data

    def pending(self, vector: int) -> bool:
        return bool(self.pba[vector // 8] >> (vector % 8) & 1)

    def set_pending(self, vector: int, on: bool) -> None:
        if on:
            self.pba[vector // 8] |= 1 << (vector % 8)
        else:
            self.pba[vector // 8] &= ~(1 << (vector % 8)) & 0xFF

    def reset(self) -> None:
        """Power-on state: every entry masked (the Mask bit resets to 1),
        addresses and data zero, nothing pending."""
        self.table[:] = bytes(self.table_size)
        for v in range(self.vectors):
            at = v * PCI_MSIX_ENTRY_SIZE + PCI_MSIX_ENTRY_VECTOR_CTRL
            self.table[at] = PCI_MSIX_ENTRY_CTRL_MASKBIT
        self.pba[:] = bytes(self.pba_size)


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
                 subsystem_vendor: int = 0x1AF4, subsystem: int = 0x1100, interrupt_pin: int = 1,
                 config_size: int = PCI_CFG_SPACE_SIZE) -> None:
        self.domain, self.bus, self.slot, self.function = parse_bdf(bdf)
        self.bdf = f"{self.domain:04x}:{self.bus:02x}:{self.slot:02x}.{self.function}"
        self.vendor = vendor
        self.device_id = device
        self.class_code = class_code
        if config_size not in (PCI_CFG_SPACE_SIZE, PCI_CFG_SPACE_EXP_SIZE):
            raise ValueError(f"config space size {config_size} must be {PCI_CFG_SPACE_SIZE} (PCI) or "
                             f"{PCI_CFG_SPACE_EXP_SIZE} (PCI Express)")
        self.config = ConfigSpace(config_size)
        self.bars: dict[int, Bar] = {}
        self.iommu_group: "IommuGroup | None" = None
        # The IOMMU driver that probed the device (dev->iommu), None behind no IOMMU.
        self.iommu_ops: "IommuOps | None" = None
        self.driver: str | None = "vfio-pci"
        self.bus_master: BusMaster = NoBusMaster()
        # Set by the platform: whether MMIO currently reaches the device
        # (False while an EEH freeze stops MMIO to its PE).
        self.mmio_enabled_by_platform: Callable[[], bool] = lambda: True
        # Set by vfio-pci while it has interrupt handlers installed.
        self.on_intx: Callable[[int], None] | None = None
        self.on_msi: Callable[[int], None] | None = None
        # An MSI-X message the device sends, as (address, data): vfio-pci
        # finds the host interrupt the message belongs to.
        self.on_msix: Callable[[int, int], None] | None = None
        self.msix: Msix | None = None
        # Set by the platform: whether the device's DMA writes, MSI-X messages
        # included, reach the host (False while an EEH freeze stops DMA).
        self.dma_enabled_by_platform: Callable[[], bool] = lambda: True
        # Set by the platform: whether the host's MSI irq domain can add MSI-X
        # vectors after MSI-X is enabled (pci_msix_can_alloc_dyn()).
        self.msix_can_alloc_dyn = False
        self.intx_level = 0
        self.reset_method: str | None = None     # "flr", "pm", "bus" or None
        self.bar_addresses: dict[int, int] = {}
        self._bar_memory: dict[int, BarMemory] = {}
        self.log: Callable[[str], None] = lambda text: None
        self.registers: dict[int, list[Register]] = {}     # per BAR, what declare_registers() said
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
        self._reset_config: bytes | None = None

    # -- construction helpers for models ---------------------------------------

    def add_bar(self, index: int, size: int, *, is_64bit: bool = False, prefetchable: bool = False) -> None:
        if size & (size - 1) or size < 16:
            raise ValueError(f"BAR size {size:#x} must be a power of two >= 16")
        if self.msix is not None and index in (self.msix.table_bar, self.msix.pba_bar):
            raise ValueError(f"BAR{index} holds the MSI-X table or PBA: declare BARs before add_msix_capability()")
        self.bars[index] = Bar(index, size, is_64bit, prefetchable)
        flags = (PCI_BASE_ADDRESS_MEM_TYPE_64 if is_64bit else 0) | (PCI_BASE_ADDRESS_MEM_PREFETCH if prefetchable else 0)
        self.config.set(PCI_BASE_ADDRESS_0 + 4 * index, 4, flags, wmask=~(size - 1) & 0xFFFFFFF0)
        if is_64bit:
            self.config.set(PCI_BASE_ADDRESS_0 + 4 * (index + 1), 4, 0, wmask=0xFFFFFFFF)

    def declare_registers(self, bar: int, *registers: Register) -> None:
        """Say which registers of ``bar`` have side effects on a load or a store
        (:class:`Register`).  A model that declares nothing has every access go
        to it at once, in order: always right, and the slowest."""
        if bar not in self.bars:
            raise ValueError(f"{self.bdf} has no BAR{bar}: add_bar() first")
        for r in registers:
            if r.offset < 0 or r.size <= 0 or r.offset + r.size > self.bars[bar].size:
                raise ValueError(f"register {r.offset:#x}+{r.size} is outside BAR{bar}")
        self.registers.setdefault(bar, []).extend(registers)

    def posted_write_ranges(self, bar: int) -> list[tuple[int, int]]:
        """(offset, length) of the parts of ``bar`` whose stores have no side
        effect: the declared registers, and in the MSI-X table the message
        address and data of each vector (a store to its control word may
        unmask it and send what is pending)."""
        out = [(r.offset, r.size) for r in self.registers.get(bar, ()) if not r.write_effect]
        m = self.msix
        if m is not None and bar == m.table_bar:
            out += [(m.table_offset + v * PCI_MSIX_ENTRY_SIZE, PCI_MSIX_ENTRY_VECTOR_CTRL) for v in range(m.vectors)]
        if m is not None and bar == m.pba_bar:
            out.append((m.pba_offset, m.pba_size))          # read-only: a store is dropped
        return sorted(out)

    def doorbell_ranges(self, bar: int) -> list[tuple[int, int]]:
        """(offset, length) of the declared registers of ``bar`` whose stores
        have side effects (a doorbell, a command, an interrupt acknowledge),
        and the MSI-X vectors' control words: PCIe posts those writes too --
        the CPU does not wait for the device -- so a transport may as well,
        performing them at once and in order with the others (a later load or
        side-effecting store observes every earlier store; an interrupt the
        work raises comes after its data).  Undeclared bytes are neither."""
        out = [(r.offset, r.size) for r in self.registers.get(bar, ()) if r.write_effect]
        m = self.msix
        if m is not None and bar == m.table_bar:
            out += [(m.table_offset + v * PCI_MSIX_ENTRY_SIZE + PCI_MSIX_ENTRY_VECTOR_CTRL, 4)
                    for v in range(m.vectors)]
        return sorted(out)

    def assign_bar_address(self, index: int, addr: int) -> None:
        """Firmware/host BAR assignment (a bus address in the PHB's window)."""
        bar = self.bars[index]
        self.bar_addresses[index] = addr
        reg = PCI_BASE_ADDRESS_0 + 4 * index
        low = self.config.read(reg, 4) & 0xF
        self.config.data[reg:reg + 4] = ((addr & 0xFFFFFFF0) | low).to_bytes(4, "little")
        if bar.is_64bit:
            self.config.data[reg + 4:reg + 8] = (addr >> 32).to_bytes(4, "little")

    def bar_memory(self, index: int, page_shift: int = 12) -> BarMemory:
        """The BAR as physical memory, at its assigned address (the platform
        makes it at boot, with the kernel's page size)."""
        mem = self._bar_memory.get(index)
        if mem is None:
            mem = self._bar_memory[index] = BarMemory(self, index, self.bar_addresses[index], page_shift)
        return mem

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

    def add_msix_capability(self, vectors: int, *, table_bar: int, table_offset: int, pba_offset: int,
                            pba_bar: int | None = None, at: int | None = None) -> int:
        """An MSI-X capability with ``vectors`` table entries (1..2048).

        The table (16 bytes per vector) is at ``table_offset`` in memory BAR
        ``table_bar``; the Pending Bit Array (one bit per vector, whole QWORDs)
        at ``pba_offset`` in ``pba_bar`` (default: the table's BAR).  Both BARs
        must already be declared with :meth:`add_bar`, both offsets must be
        QWORD (8-byte) aligned, as the low three bits of the Table/PBA Offset
        registers hold the BIR, each structure must lie inside its BAR, and
        the two must not overlap.  ``at`` places the capability in config
        space (default: after the last capability).  Returns its offset.

        The device answers loads and stores to the table and PBA itself, as
        hardware does: they never reach ``mmio_read``/``mmio_write``.  Raise a
        vector with :meth:`msix_notify`."""
        if self.msix is not None:
            raise ValueError(f"{self.bdf} already has an MSI-X capability (at {self.msix.cap:#x})")
        if not isinstance(vectors, int) or isinstance(vectors, bool) or not 1 <= vectors <= PCI_MSIX_MAX_VECTORS:
            raise ValueError(f"MSI-X table size {vectors!r} must be an integer from 1 to {PCI_MSIX_MAX_VECTORS}")
        pba_bar = table_bar if pba_bar is None else pba_bar
        table_size = vectors * PCI_MSIX_ENTRY_SIZE
        pba_size = (vectors + 63) // 64 * 8
        for what, bar, offset, size in (("table", table_bar, table_offset, table_size),
                                        ("PBA", pba_bar, pba_offset, pba_size)):
            if not isinstance(bar, int) or isinstance(bar, bool) or bar not in self.bars:
                declared = ", ".join(f"BAR{i}" for i in sorted(self.bars)) or "none"
                raise ValueError(f"MSI-X {what} BIR {bar!r} is not a memory BAR of the device "
                                 f"(declared: {declared}); call add_bar() first")
            if not isinstance(offset, int) or isinstance(offset, bool) or offset < 0 or offset % 8:
                raise ValueError(f"MSI-X {what} offset {offset!r} must be a non-negative multiple of 8 "
                                 f"(the register's low 3 bits are the BIR)")
            if offset >= 1 << 32 or offset + size > self.bars[bar].size:
                raise ValueError(f"MSI-X {what} at {offset:#x}+{size:#x} does not fit in BAR{bar} "
                                 f"({self.bars[bar].size:#x} bytes)")
        if table_bar == pba_bar and table_offset < pba_offset + pba_size and pba_offset < table_offset + table_size:
            raise ValueError(f"MSI-X table ({table_offset:#x}+{table_size:#x}) and PBA ({pba_offset:#x}+"
                             f"{pba_size:#x}) overlap in BAR{table_bar}")
        cap = self.config.add_capability(PCI_CAP_ID_MSIX, PCI_CAP_MSIX_SIZEOF, at=at)
        # Message Control: Table Size read-only, Function Mask and Enable
        # read-write; Table and PBA Offset/BIR read-only.
        self.config.set(cap + PCI_MSIX_FLAGS, 2, vectors - 1, wmask=PCI_MSIX_FLAGS_ENABLE | PCI_MSIX_FLAGS_MASKALL)
        self.config.set(cap + PCI_MSIX_TABLE, 4, table_offset | table_bar)
        self.config.set(cap + PCI_MSIX_PBA, 4, pba_offset | pba_bar)
        self.msix = Msix(cap, vectors, table_bar, table_offset, pba_bar, pba_offset,
                         bytearray(table_size), bytearray(pba_size))
        self.msix.reset()
        return cap

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
        m = self.msix
        if m is not None:
            if bar == m.table_bar and m.table_offset <= offset < m.table_offset + m.table_size:
                return self._msix_read(m.table, offset - m.table_offset, size)
            if bar == m.pba_bar and m.pba_offset <= offset < m.pba_offset + m.pba_size:
                return self._msix_read(m.pba, offset - m.pba_offset, size)
        return self.mmio_read(bar, offset, size)

    def host_mmio_write(self, bar: int, offset: int, size: int, value: int) -> None:
        if not self.mmio_enabled_by_platform() or not self.memory_decode_enabled():
            return
        m = self.msix
        if m is not None:
            if bar == m.table_bar and m.table_offset <= offset < m.table_offset + m.table_size:
                self.msix_table_write(offset - m.table_offset, size, value)
                return
            if bar == m.pba_bar and m.pba_offset <= offset < m.pba_offset + m.pba_size:
                return                      # the PBA is read-only
        self.mmio_write(bar, offset, size, value)

    def _in_msix(self, bar: int, offset: int) -> bool:
        """Whether ``offset`` of ``bar`` is in the MSI-X table or PBA (no shortcuts there)."""
        m = self.msix
        return m is not None and (bar == m.table_bar and m.table_offset <= offset < m.table_offset + m.table_size or
                                  bar == m.pba_bar and m.pba_offset <= offset < m.pba_offset + m.pba_size)

    def host_store_fn(self, bar: int, offset: int, size: int) -> Callable[[int], None] | None:
        """host_mmio_write() of a store at ``offset`` as one function, where
        the model offers one (:meth:`mmio_store_fn`) and the store is not the
        MSI-X table's or PBA's; None otherwise."""
        if self._in_msix(bar, offset):
            return None
        store = self.mmio_store_fn(bar, offset, size)
        if store is None:
            return None

        def host_store(value: int) -> None:
            # (memory_decode_enabled() inline: this runs for every posted store)
            if self.mmio_enabled_by_platform() and self.config.data[PCI_COMMAND] & PCI_COMMAND_MEMORY:
                store(value)
        return host_store

    def host_load_fn(self, bar: int, offset: int, size: int) -> Callable[[], int] | None:
        """host_mmio_read() of a load at ``offset`` as one function, where the
        model offers one (:meth:`mmio_load_fn`) and the load is not the
        MSI-X table's or PBA's; None otherwise."""
        if self._in_msix(bar, offset):
            return None
        load = self.mmio_load_fn(bar, offset, size)
        if load is None:
            return None
        ones = (1 << (8 * size)) - 1

        def host_load() -> int:
            if self.mmio_enabled_by_platform() and self.config.data[PCI_COMMAND] & PCI_COMMAND_MEMORY:
                return load()
            return ones
        return host_load

    def mmio_store_fn(self, bar: int, offset: int, size: int) -> Callable[[int], None] | None:
        """A function doing what mmio_write(bar, offset, size, value) does,
        for a store the model wants quick (a doorbell); None by default."""
        return None

    def mmio_load_fn(self, bar: int, offset: int, size: int) -> Callable[[], int] | None:
        """A function returning what mmio_read(bar, offset, size) does, for a
        load the model wants quick (a status register polled); None by default."""
        return None

    # (Both bits are in the command register's low byte; read on every BAR
    # access and every DMA.)
    def memory_decode_enabled(self) -> bool:
        return bool(self.config.data[PCI_COMMAND] & PCI_COMMAND_MEMORY)

    def bus_master_enabled(self) -> bool:
        return bool(self.config.data[PCI_COMMAND] & PCI_COMMAND_MASTER)

    def config_read(self, offset: int, size: int) -> int:
        if not self.mmio_enabled_by_platform():
            return (1 << (8 * size)) - 1
        return self.config.read(offset, size)

    def config_write(self, offset: int, size: int, value: int) -> None:
        if not self.mmio_enabled_by_platform():
            return
        self.config.write(offset, size, value)
        m = self.msix
        if m is not None and offset < m.cap + PCI_MSIX_FLAGS + 2 and m.cap + PCI_MSIX_FLAGS < offset + size:
            self._msix_unmasked()

    def host_config_write(self, offset: int, size: int, value: int) -> None:
        """pci_write_config_*() by the host kernel's PCI core: the value lands
        in the register as written (Command, MSI Enable), with no user access
        control in between."""
        self.config.data[offset:offset + size] = value.to_bytes(size, "little")

    def reset(self) -> None:
        """Function-level reset: config space and device state to power-on."""
        if self._reset_config is not None:
            self.config.data[:] = self._reset_config
            for index, addr in self.bar_addresses.items():
                self.assign_bar_address(index, addr)
        self.intx_level = 0
        if self.msix is not None:
            self.msix.reset()

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
        """msi_notify(): send an MSI message if MSI is enabled.  The message is
        a memory write, so it needs bus mastering and a PE not frozen by EEH
        (as MSI-X below; QEMU drops it into a disabled bus-master space)."""
        if not self.bus_master_enabled() or not self.dma_enabled_by_platform():
            return
        if self.msi_enabled() and self.on_msi is not None:
            self.on_msi(vector)

    # -- MSI-X (PCI Local Bus 3.0 6.8.2; QEMU hw/pci/msix.c) -----------------------------------

    def msix_enabled(self) -> bool:
        """MSI-X Enable is set in Message Control."""
        m = self.msix
        return m is not None and bool(self.config.read(m.cap + PCI_MSIX_FLAGS, 2) & PCI_MSIX_FLAGS_ENABLE)

    def msix_masked(self, vector: int) -> bool:
        """The vector cannot be sent now: the Function Mask or its own Mask bit is set."""
        m = self._msix_vector(vector)
        return bool(self.config.read(m.cap + PCI_MSIX_FLAGS, 2) & PCI_MSIX_FLAGS_MASKALL
                    or m.ctrl(vector) & PCI_MSIX_ENTRY_CTRL_MASKBIT)

    def msix_pending(self, vector: int) -> bool:
        """The vector's Pending bit: it was raised while masked."""
        return self._msix_vector(vector).pending(vector)

    def msix_notify(self, vector: int) -> None:
        """Raise MSI-X ``vector``.

        While MSI-X is disabled nothing is sent.  While the vector is masked
        (its Mask bit or the Function Mask) its Pending bit is set instead, and
        the message goes out when it is unmasked.  Otherwise the device writes
        the entry's message (address, data), which needs bus mastering: with
        PCI_COMMAND_MASTER clear, or the PE's DMA stopped by an EEH freeze,
        the message is lost (as in QEMU, where it goes to a disabled bus-master
        address space)."""
        m = self._msix_vector(vector)
        if not self.config.read(m.cap + PCI_MSIX_FLAGS, 2) & PCI_MSIX_FLAGS_ENABLE:
            return
        if self.msix_masked(vector):
            m.set_pending(vector, True)
            return
        self._msix_send(vector)

    def msix_table_write(self, offset: int, size: int, value: int) -> None:
        """A store to the MSI-X table at ``offset`` from its start: from a
        BAR access, or from the host's PCI core (which reaches the table even
        while the user has memory decoding off: vfio_pci_memory_lock_and_enable()).
        Aligned DWORD or QWORD stores only; others are dropped (the PCI spec
        leaves them undefined)."""
        m = self.msix
        assert m is not None
        if size not in (4, 8) or offset % size or offset + size > m.table_size:
            return
        value &= (1 << (8 * size)) - 1
        for at in range(offset, offset + size, 4):
            dword = (value >> (8 * (at - offset))) & 0xFFFFFFFF
            vector, field_off = divmod(at, PCI_MSIX_ENTRY_SIZE)
            if field_off == PCI_MSIX_ENTRY_VECTOR_CTRL:
                was_masked = m.ctrl(vector) & PCI_MSIX_ENTRY_CTRL_MASKBIT
                dword &= PCI_MSIX_ENTRY_CTRL_MASKBIT        # bits 31:1 reserved
                m.table[at:at + 4] = dword.to_bytes(4, "little")
                if was_masked and not dword & PCI_MSIX_ENTRY_CTRL_MASKBIT:
                    self._msix_unmasked(vector)
            else:
                m.table[at:at + 4] = dword.to_bytes(4, "little")

    def msix_host_set_control(self, set_bits: int, clear_bits: int = 0) -> None:
        """pci_msix_clear_and_set_ctrl(): the host's PCI core writes Message
        Control (a config write, below any user access control)."""
        m = self.msix
        assert m is not None
        at = m.cap + PCI_MSIX_FLAGS
        ctrl = (self.config.read(at, 2) & ~clear_bits) | set_bits
        self.config.write(at, 2, ctrl)
        self._msix_unmasked()

    def _msix_vector(self, vector: int) -> Msix:
        m = self.msix
        if m is None:
            raise ValueError(f"{self.bdf} has no MSI-X capability (add_msix_capability())")
        if not isinstance(vector, int) or not 0 <= vector < m.vectors:
            raise ValueError(f"MSI-X vector {vector!r} out of range: {self.bdf} has {m.vectors}")
        return m

    @staticmethod
    def _msix_read(array: bytearray, offset: int, size: int) -> int:
        """A load from the table or PBA: aligned DWORD or QWORD only, else all-ones."""
        if size not in (4, 8) or offset % size or offset + size > len(array):
            return (1 << (8 * size)) - 1
        return int.from_bytes(array[offset:offset + size], "little")

    def _msix_unmasked(self, vector: int | None = None) -> None:
        """A vector (or, with None, the whole function) may have become
        unmasked: send what is pending and now deliverable (msix_handle_mask_update())."""
        m = self.msix
        if m is None or not self.msix_enabled():
            return
        if self.config.read(m.cap + PCI_MSIX_FLAGS, 2) & PCI_MSIX_FLAGS_MASKALL:
            return
        vectors = [vector] if vector is not None else [v for v in range(m.vectors) if m.pba[v // 8]]
        for v in vectors:
            if m.pending(v) and not m.ctrl(v) & PCI_MSIX_ENTRY_CTRL_MASKBIT:
                m.set_pending(v, False)
                self._msix_send(v)

    def _msix_send(self, vector: int) -> None:
        """The memory write of the entry's message, if the device may master the bus."""
        if not self.bus_master_enabled() or not self.dma_enabled_by_platform():
            return
        assert self.msix is not None
        address, data = self.msix.message(vector)
        if self.on_msix is not None:
            self.on_msix(address, data)

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.bdf} {self.vendor:04x}:{self.device_id:04x}>"
