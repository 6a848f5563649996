"""QEMU's educational PCI device "edu" (1234:11e8), per docs/specs/edu.rst.

BAR0 (1 MiB MMIO) holds the registers:

====== ==== ======================================================
0x00   RO   identification 0x010000ed (major 1, minor 0)
0x04   RW   liveness check: reads back the inverse of what was written
0x08   RW   factorial: write n, read n! once status bit 0 clears
0x20   RW   status: 0x01 computing (RO), 0x80 raise interrupt after factorial
0x24   RO   interrupt status
0x60   WO   interrupt raise (ORed into interrupt status)
0x64   WO   interrupt acknowledge (bits cleared; INTx drops at zero)
0x80   RW   DMA source address
0x88   RW   DMA destination address
0x90   RW   DMA transfer count
0x98   RW   DMA command: 0x1 start, 0x2 direction (0: RAM to device,
            1: device to RAM), 0x4 raise interrupt 0x100 when done
====== ==== ======================================================

The DMA engine moves data between bus addresses and a 4 KiB buffer that
DMA commands address as 0x40000..0x40fff (it is not visible through BAR0),
through the bus master, so through the IOMMU.
Access sizes, as QEMU's memory core and edu_mmio_read/write treat them
(hw/misc/edu.c: ``valid`` and ``impl`` 4..8 bytes, no unaligned access): a
1- or 2-byte access, or one not aligned to its size, is invalid -- QEMU
answers it as unassigned memory, so a read returns 0 and a write is dropped
(through a mapping and through vfio-pci's pread/pwrite, which split a range
into aligned 1/2/4/8-byte accesses alike).  An 8-byte access below 0x80
reaches edu, which reads it as all-ones and ignores it as a write; the DMA
registers take 4 or 8.  Bus addresses are masked with ``dma_mask`` (28 bits
by default, QEMU's default).

Timing: QEMU computes factorials on a thread and runs a DMA 100 ms of
virtual time after the command; this model is deterministic and completes
both at the register write, so status and command read back as done.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from .device import DmaError, PciDevice, Register

EDU_VENDOR = 0x1234
EDU_DEVICE = 0x11E8
EDU_REVISION = 0x10
# QEMU sets class_id PCI_CLASS_OTHERS (0xff) as the 16-bit class field:
# base class 0x00, subclass 0xff ("Unclassified device [00ff]"), sysfs 0x00ff00.
PCI_CLASS_OTHERS = 0x00FF00
EDU_BAR0_SIZE = 1 << 20

FACT_IRQ = 0x00000001
DMA_IRQ = 0x00000100
DMA_START = 0x40000
DMA_SIZE = 4096

STATUS_COMPUTING = 0x01
STATUS_IRQFACT = 0x80

DMA_RUN = 0x1
DMA_DIR_TO_RAM = 0x2
DMA_IRQ_ENABLE = 0x4

IDENT = 0x010000ED

_M32 = 0xFFFFFFFF
_M64 = (1 << 64) - 1

# Registers below 0x80 a load reads: the attribute holding each ("": the identification).
_FACT_ZERO_FROM = 34          # the least n whose n! is a multiple of 2**32
_READ_REGS = {0x00: "", 0x04: "addr4", 0x08: "fact", 0x20: "status", 0x24: "irq_status"}


_DMA_REGS = {0x80: "dma_src", 0x88: "dma_dst", 0x90: "dma_cnt", 0x98: "dma_cmd"}


def _dma_register(bar: int, offset: int, size: int) -> str | None:
    """The attribute a valid access to a DMA register reaches (4 or 8 bytes,
    aligned, at the register's start), or None."""
    if bar != 0 or (size != 4 and size != 8) or offset % size:
        return None
    return _DMA_REGS.get(offset)


class EduDevice(PciDevice):
    model = "edu"

    def __init__(self, bdf: str, *, dma_mask: int = (1 << 28) - 1) -> None:
        super().__init__(bdf, vendor=EDU_VENDOR, device=EDU_DEVICE, class_code=PCI_CLASS_OTHERS,
                         revision=EDU_REVISION, interrupt_pin=1)
        self.dma_mask = dma_mask
        self.add_msi_capability(vectors=1, is_64bit=True)
        self.add_bar(0, EDU_BAR0_SIZE)
        # Stores that only keep a value (or are ignored) may be posted; the
        # factorial (an interrupt when status asks for one), interrupt raise and
        # acknowledge, and the DMA command act at once.  No load has an effect.
        self.declare_registers(
            0, Register(0x00, 4, write_effect=False), Register(0x04, 4, write_effect=False), Register(0x08, 4),
            Register(0x20, 4, write_effect=False), Register(0x24, 4, write_effect=False), Register(0x60, 4),
            Register(0x64, 4), Register(0x80, 8, write_effect=False), Register(0x88, 8, write_effect=False),
            Register(0x90, 8, write_effect=False), Register(0x98, 8))
        self.finish()
        self.addr4 = 0
        self.fact = 0
        self.status = 0
        self.irq_status = 0
        self.dma_src = 0
        self.dma_dst = 0
        self.dma_cnt = 0
        self.dma_cmd = 0
        self.dma_buf = bytearray(DMA_SIZE)
        self._dma_view = np.frombuffer(self.dma_buf, dtype=np.uint8)    # (no view made per transfer)
        self.dma_count = 0          # completed transfers, for introspection

    # -- interrupts ---------------------------------------------------------------

    def raise_irq(self, val: int) -> None:
        self.irq_status |= val
        if self.irq_status:
            if self.msi_enabled():
                self.msi_notify(0)
            else:
                self.set_intx(1)

    def lower_irq(self, val: int) -> None:
        self.irq_status &= ~val & _M32
        if not self.irq_status and not self.msi_enabled():
            self.set_intx(0)

    # -- registers ------------------------------------------------------------------

    # Access sizes: memory_region_access_valid() for edu_mmio_ops accepts 4 or 8
    # bytes, aligned; edu_mmio_read/write then act on 4 bytes below 0x80, 4 or 8
    # above.  (Checked inline: these run for every BAR access a driver makes.)

    def mmio_read(self, bar: int, offset: int, size: int) -> int:
        if (size != 4 and size != 8) or offset % size:
            return 0                # unassigned_mem_read()
        ones = _M32 if size == 4 else _M64
        if bar != 0 or (offset < 0x80 and size != 4):
            return ones
        if offset >= 0x80:
            if offset == 0x80:
                return self.dma_src & ones
            if offset == 0x88:
                return self.dma_dst & ones
            if offset == 0x90:
                return self.dma_cnt & ones
            if offset == 0x98:
                return self.dma_cmd & ones
            return ones
        name = _READ_REGS.get(offset)
        if name is None:
            return ones
        return getattr(self, name) & ones if name else IDENT

    def mmio_write(self, bar: int, offset: int, size: int, value: int) -> None:
        if bar != 0 or (size != 4 and size != 8) or offset % size or (offset < 0x80 and size != 4):
            return
        value &= _M32 if size == 4 else _M64
        if offset >= 0x80:
            if offset == 0x98:
                if not value & DMA_RUN or self.dma_cmd & DMA_RUN:
                    return
                self.dma_cmd = value
                self._run_dma()
            elif self.dma_cmd & DMA_RUN:
                return          # registers are locked while a transfer runs
            elif offset == 0x80:
                self.dma_src = value
            elif offset == 0x88:
                self.dma_dst = value
            elif offset == 0x90:
                self.dma_cnt = value
        elif offset == 0x04:
            self.addr4 = ~value & _M32
        elif offset == 0x08:
            if not self.status & STATUS_COMPUTING:
                self._compute_factorial(value)
        elif offset == 0x20:
            if value & STATUS_IRQFACT:
                self.status |= STATUS_IRQFACT
            else:
                self.status &= ~STATUS_IRQFACT
        elif offset == 0x60:
            self.raise_irq(value)
        elif offset == 0x64:
            self.lower_irq(value)

    # Shortcuts for the daemon (the registers a driver stores and polls for
    # every transfer): each does what mmio_write()/mmio_read() does for its
    # one register and access size; None for any other access.

    def mmio_store_fn(self, bar: int, offset: int, size: int) -> Callable[[int], None] | None:
        """mmio_write() of a DMA register (address, count, command) as one function."""
        name = _dma_register(bar, offset, size)
        if name is None:
            return None
        mask = _M32 if size == 4 else _M64
        if offset == 0x98:
            def command(value: int) -> None:
                value &= mask
                if value & DMA_RUN and not self.dma_cmd & DMA_RUN:
                    self.dma_cmd = value
                    self._run_dma()
            return command

        # (One function per register: no setattr() on a driver's every store.)
        def src(value: int) -> None:
            if not self.dma_cmd & DMA_RUN:      # registers are locked while a transfer runs
                self.dma_src = value & mask

        def dst(value: int) -> None:
            if not self.dma_cmd & DMA_RUN:
                self.dma_dst = value & mask

        def cnt(value: int) -> None:
            if not self.dma_cmd & DMA_RUN:
                self.dma_cnt = value & mask
        return {0x80: src, 0x88: dst, 0x90: cnt}[offset]

    def mmio_load_fn(self, bar: int, offset: int, size: int) -> Callable[[], int] | None:
        """mmio_read() of a DMA register as one function (a driver polls the command's bit 0)."""
        name = _dma_register(bar, offset, size)
        if name is None:
            return None
        mask = _M32 if size == 4 else _M64
        if offset == 0x98:
            return lambda: self.dma_cmd & mask      # (the one a driver polls: no getattr())
        return lambda: getattr(self, name) & mask

    def _compute_factorial(self, n: int) -> None:
        """n! in 32 bits, as QEMU's loop computes it -- without its up to 2**32
        steps: from 34! on, the product holds 2**32 (34! has 32 factors of 2),
        so it is 0 (a program storing 0xFFFFFFFF would stall the daemon)."""
        result = 0 if n >= _FACT_ZERO_FROM else 1
        while 0 < n < _FACT_ZERO_FROM:
            result = (result * n) & _M32
            n -= 1
        self.fact = result
        if self.status & STATUS_IRQFACT:
            self.raise_irq(FACT_IRQ)

    # -- the DMA engine ---------------------------------------------------------------

    def _run_dma(self) -> None:
        count = self.dma_cnt
        to_ram = bool(self.dma_cmd & DMA_DIR_TO_RAM)
        dev_addr = self.dma_src if to_ram else self.dma_dst
        if not DMA_START <= dev_addr <= dev_addr + count <= DMA_START + DMA_SIZE:       # within the buffer
            # QEMU logs a guest error and goes on to overrun its own buffer;
            # the model logs and moves nothing instead.
            self.log(f"edu {self.bdf}: DMA range {dev_addr:#x}+{count:#x} outside the buffer "
                     f"{DMA_START:#x}+{DMA_SIZE:#x}, transfer dropped")
        else:
            buf_off = dev_addr - DMA_START
            bus_addr = (self.dma_dst if to_ram else self.dma_src)
            masked = bus_addr & self.dma_mask
            if masked != bus_addr:
                self.log(f"edu {self.bdf}: clamping DMA address {bus_addr:#x} to {masked:#x} (dma_mask {self.dma_mask:#x})")
            try:
                if to_ram:
                    self.bus_master.dma_write(masked, self._dma_view[buf_off:buf_off + count])
                else:
                    self.bus_master.dma_read_into(masked, self._dma_view[buf_off:buf_off + count])
                self.dma_count += 1
            except DmaError as exc:
                # edu has no error reporting: the transfer just did not happen.
                self.log(f"edu {self.bdf}: {exc}")
        self.dma_cmd &= ~DMA_RUN
        if self.dma_cmd & DMA_IRQ_ENABLE:
            self.raise_irq(DMA_IRQ)

    def snapshot(self) -> dict[str, int]:
        """Register values, for topology output and tests."""
        return {"liveness": self.addr4, "factorial": self.fact, "status": self.status,
                "irq_status": self.irq_status, "dma_src": self.dma_src, "dma_dst": self.dma_dst,
                "dma_cnt": self.dma_cnt, "dma_cmd": self.dma_cmd, "dma_count": self.dma_count}
