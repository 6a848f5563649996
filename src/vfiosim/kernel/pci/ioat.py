"""An Intel I/OAT DMA engine (Crystal Beach DMA, CBDMA): one Skylake-SP channel, 8086:2021.

What the Linux kernel's VFIO selftests drive (tools/testing/selftests/vfio/lib/
drivers/ioat/ioat.c, with drivers/dma/ioat/registers.h and hw.h), with the
hardware semantics the upstream dmaengine driver relies on (drivers/dma/ioat/
dma.c, init.c) where the selftest relies on them too:

* BAR0 (16 KiB, 64-bit): the device registers at 0x00 (CHANCNT 1, XFERCAP,
  INTRCTRL, ATTNSTATUS, CBVER 3.3, DMACAPABILITY), channel 0's registers at
  0x80 (IOAT_CHANNEL_MMIO_SIZE), the MSI-X table (one vector) at 0x2000 and
  its PBA at 0x3000.
* PCIe config space (4 KiB): CHANERR_INT (0x180, write 1 to clear, a copy of
  the channel's errors), CHANERRMASK_INT (0x184), DMAUNCERRSTS (0x148).
* Channel registers (offsets from 0x80): CHANCTRL (0x00, 16-bit; INT_REARM
  arms the channel interrupt, ERR_INT_EN/ERR_COMPLETION_EN report errors),
  DMA_COMP (0x02), CHANCMD (0x04: RESET, SUSPEND, ABORT), DMACOUNT (0x06),
  CHANSTS (0x08, 64-bit: the last completed descriptor's address | state),
  CHAINADDR (0x10), CHANCMP (0x18: where a completion is written), CDAR
  (0x20), CHANERR (0x28, write 1 to clear), CHANERR_MASK (0x2c), DCACTRL (0x30).
* Descriptors (struct ioat_dma_descriptor, 64 bytes, 64-byte aligned): size,
  ctl (int_en bit 0, compl_write bit 3, fence bit 4, null bit 5, op bits
  31:24, only IOAT_OP_COPY), src_addr, dst_addr, next.  A DMACOUNT store N
  runs descriptors from CHAINADDR, following ``next``, until the channel has
  completed N of them since CHAINADDR was written (the count is 16 bits and
  wraps: __ioat_issue_pending() adds to it, __ioat_restart_chan() zeroes it
  and rewrites CHAINADDR).
* Completion: CHANSTS takes the descriptor's address and the state (ACTIVE
  while more are due, DONE after the last); a descriptor with compl_write
  writes that 64-bit status to CHANCMP (what ioat_cleanup() reads); one with
  int_en raises MSI-X vector 0 if CHANCTRL armed it, which disarms it until the
  next INT_REARM (ioat_cleanup_event() rearms with IOAT_CHANCTRL_RUN).
* Errors: a descriptor whose DMA the IOMMU refuses (or a bad size, op or
  alignment) halts the channel (CHANSTS HALTED; CHANERR and CHANERR_INT get the
  cause) without completing it; with ERR_COMPLETION_EN the halted status is
  written to CHANCMP, with ERR_INT_EN the vector is raised.  A halted channel
  takes no work until its errors are cleared or it is reset (ioat_reset_hw()
  clears CHANERR, then resets).  CHANCMD RESET returns the channel to HALTED
  with nothing pending (the selftest checks that state) and finishes at once.

Every descriptor fetch, copy and completion write is a DMA through
``self.bus_master``, so through the IOMMU.  As edu, the model is synchronous:
the work a DMACOUNT store starts is done when the store returns.  One shortcut
keeps it fast without changing what memory or the registers show: a descriptor
whose ``next`` is itself, run again and again (the selftest's memcpy_storm runs
one such descriptor 65535 times), writes the same bytes each time when what it
writes (dst, the completion) overlaps nothing it reads (src, itself), so the
middle runs are counted without being redone; the last one is redone.
"""

from __future__ import annotations

import struct

from .config import PCI_CAP_ID_EXP, PCI_CFG_SPACE_EXP_SIZE
from .device import DmaError, PciDevice, Register

INTEL_VENDOR = 0x8086
IOAT_SKX_DEVICE = 0x2021              # PCI_DEVICE_ID_INTEL_IOAT_SKX (drivers/dma/ioat/hw.h)
IOAT_SKX_REVISION = 0x04
PCI_CLASS_SYSTEM_DMA = 0x088000       # base 08 (system peripheral), subclass 80 (other)
BAR0_SIZE = 0x4000
MSIX_TABLE = 0x2000
MSIX_PBA = 0x3000

# Device registers (registers.h)
CHANCNT = 0x00
XFERCAP = 0x01
GENCTRL = 0x02
INTRCTRL = 0x03
ATTNSTATUS = 0x04
CBVER = 0x08
INTRDELAY = 0x0C
DMACAPABILITY = 0x10
IOAT_VER_3_3 = 0x33
INTRCTRL_MASTER_INT_EN = 0x01
INTRCTRL_INT_STATUS = 0x02
INTRCTRL_INT = 0x04
INTRCTRL_MSIX_VECTOR_CONTROL = 0x08

CHANNEL_BASE = 0x80                   # IOAT_CHANNEL_MMIO_SIZE: channel 0 follows the device registers
# Channel registers, from CHANNEL_BASE
CHANCTRL = 0x00
DMA_COMP = 0x02
CHANCMD = 0x04
DMACOUNT = 0x06
CHANSTS = 0x08
CHAINADDR = 0x10
CHANCMP = 0x18
CDAR = 0x20
CHANERR = 0x28
CHANERR_MASK = 0x2C
DCACTRL = 0x30
CHANNEL_REGS = 0x34

CHANCTRL_INT_REARM = 0x0001
CHANCTRL_ERR_COMPLETION_EN = 0x0004
CHANCTRL_ANY_ERR_ABORT_EN = 0x0008
CHANCTRL_ERR_INT_EN = 0x0010
CHANCMD_RESET = 0x20
CHANCMD_ABORT = 0x08
CHANCMD_SUSPEND = 0x04
DMA_COMP_V2 = 0x0002

CHANSTS_ACTIVE = 0x0
CHANSTS_DONE = 0x1
CHANSTS_SUSPENDED = 0x2
CHANSTS_HALTED = 0x3
CHANSTS_ADDR = ~0x3F & ((1 << 64) - 1)

CHANERR_NEXT_ADDR_ERR = 0x0004
CHANERR_NEXT_DESC_ALIGN_ERR = 0x0008
CHANERR_CHAIN_ADDR_VALUE_ERR = 0x0010
CHANERR_READ_DATA_ERR = 0x0100
CHANERR_WRITE_DATA_ERR = 0x0200
CHANERR_CONTROL_ERR = 0x0400
CHANERR_LENGTH_ERR = 0x0800
CHANERR_COMPLETION_ADDR_ERR = 0x1000

# PCI config space registers of the device (registers.h)
PCI_DMAUNCERRSTS = 0x148
PCI_CHANERR_INT = 0x180
PCI_CHANERRMASK_INT = 0x184

DESC_SIZE = 64                        # IOAT_DESC_SZ
DESC = struct.Struct("<IIQQQ")        # size, ctl, src_addr, dst_addr, next (then 32 bytes unused)
CTL_INT_EN = 1 << 0
CTL_COMPL_WRITE = 1 << 3
CTL_NULL = 1 << 5
IOAT_OP_COPY = 0x00

_M64 = (1 << 64) - 1


class _Halt(Exception):
    def __init__(self, chanerr: int, why: str) -> None:
        super().__init__(why)
        self.chanerr = chanerr


def _overlap(a: int, alen: int, b: int, blen: int) -> bool:
    return a < b + blen and b < a + alen


class IoatDevice(PciDevice):
    model = "ioat"

    def __init__(self, bdf: str, *, dma_mask: int = _M64, xfercap_log: int = 20) -> None:
        super().__init__(bdf, vendor=INTEL_VENDOR, device=IOAT_SKX_DEVICE, class_code=PCI_CLASS_SYSTEM_DMA,
                         revision=IOAT_SKX_REVISION, subsystem_vendor=INTEL_VENDOR, subsystem=0x0000,
                         interrupt_pin=1, config_size=PCI_CFG_SPACE_EXP_SIZE)
        if not 12 <= xfercap_log <= 31:
            raise ValueError(f"xfercap_log {xfercap_log} must be 12 (4 KiB, the least the spec allows) to 31")
        self.dma_mask = dma_mask
        self.xfercap_log = xfercap_log
        # A root-complex integrated endpoint (as CBDMA is, on bus 0): a PCI Express capability, hence
        # the 4 KiB config space pci_cfg_space_size() gives it, where its error registers are.
        exp = self.config.add_capability(PCI_CAP_ID_EXP, 0x3C)
        self.config.set(exp + 2, 2, 0x0092)            # PCI_EXP_FLAGS: version 2, type 9 (RC_END)
        self.config.set(PCI_CHANERRMASK_INT, 4, 0, wmask=0xFFFFFFFF)
        self.add_bar(0, BAR0_SIZE, is_64bit=True)
        self.add_msix_capability(1, table_bar=0, table_offset=MSIX_TABLE, pba_offset=MSIX_PBA)
        base = CHANNEL_BASE
        # Stores that only keep a value may be posted; commands, the DMA count (it runs the channel),
        # CHANCTRL (it arms the interrupt) and the write-1-to-clear registers act at once.  Reading
        # has no effect anywhere.
        self.declare_registers(
            0, Register(CHANCNT, 1, write_effect=False), Register(XFERCAP, 1, write_effect=False),
            Register(GENCTRL, 1, write_effect=False), Register(INTRCTRL, 1),
            Register(ATTNSTATUS, 4, write_effect=False), Register(CBVER, 1, write_effect=False),
            Register(INTRDELAY, 2, write_effect=False), Register(DMACAPABILITY, 4, write_effect=False),
            Register(base + CHANCTRL, 2), Register(base + DMA_COMP, 2, write_effect=False),
            Register(base + CHANCMD, 1), Register(base + DMACOUNT, 2),
            Register(base + CHANSTS, 8, write_effect=False), Register(base + CHAINADDR, 8, write_effect=False),
            Register(base + CHANCMP, 8, write_effect=False), Register(base + CDAR, 8, write_effect=False),
            Register(base + CHANERR, 4), Register(base + CHANERR_MASK, 4, write_effect=False),
            Register(base + DCACTRL, 4, write_effect=False))
        self.finish()
        self.intrctrl = 0
        self._reset_channel()
        self.descriptors_completed = 0      # for introspection and tests: descriptors run since power-on

    # -- state -------------------------------------------------------------------------------------

    def _reset_channel(self) -> None:
        """CHANCMD RESET: the channel halted, nothing pending, errors and addresses cleared."""
        self.chanctrl = 0
        self.armed = False
        self.dmacount = 0          # the last DMACOUNT written
        self.done_count = 0        # descriptors completed since CHAINADDR was written (16 bits)
        self.chainaddr = 0
        self.next_desc = 0         # where the channel fetches its next descriptor
        self.chancmp = 0
        self.cdar = 0
        self.chansts = CHANSTS_HALTED
        self.chanerr = 0
        self.chanerr_mask = 0
        self.dcactrl = 0
        self.attnstatus = 0

    def reset(self) -> None:
        super().reset()
        self.intrctrl = 0
        self._reset_channel()

    # -- registers --------------------------------------------------------------------------------

    def _device_regs(self) -> bytes:
        status = INTRCTRL_INT_STATUS if self.attnstatus else 0
        intrctrl = self.intrctrl | status | (INTRCTRL_INT if status and self.intrctrl & INTRCTRL_MASTER_INT_EN else 0)
        return struct.pack("<BBBBIBBHHHI", 1, self.xfercap_log, 0, intrctrl, self.attnstatus, IOAT_VER_3_3, 0,
                           0, 0, 0, 0)

    def _channel_regs(self) -> bytes:
        cmd = 0                    # a reset or suspend has finished by the time anyone reads
        return struct.pack("<HHBxHQQQQIII", self.chanctrl, DMA_COMP_V2, cmd, self.dmacount, self.chansts,
                           self.chainaddr, self.chancmp, self.cdar, self.chanerr, self.chanerr_mask,
                           self.dcactrl)

    def mmio_read(self, bar: int, offset: int, size: int) -> int:
        ones = (1 << (8 * size)) - 1
        if bar != 0 or offset % size:
            return ones
        if offset + size <= 0x14:
            regs = self._device_regs()
        elif CHANNEL_BASE <= offset and offset + size <= CHANNEL_BASE + CHANNEL_REGS:
            regs, offset = self._channel_regs(), offset - CHANNEL_BASE
        else:
            return 0               # reserved: reads as zero
        return int.from_bytes(regs[offset:offset + size], "little")

    def mmio_write(self, bar: int, offset: int, size: int, value: int) -> None:
        if bar != 0 or offset % size:
            return
        value &= (1 << (8 * size)) - 1
        if offset == INTRCTRL and size == 1:
            self.intrctrl = value & (INTRCTRL_MASTER_INT_EN | INTRCTRL_MSIX_VECTOR_CONTROL)
            return
        if not CHANNEL_BASE <= offset < CHANNEL_BASE + CHANNEL_REGS:
            return                 # read-only or reserved
        reg = offset - CHANNEL_BASE
        # A 64-bit register may be written whole or as two 32-bit halves (ioat_set_chainaddr(),
        # the completion address).
        for name, at in (("chainaddr", CHAINADDR), ("chancmp", CHANCMP)):
            if at <= reg < at + 8 and reg + size <= at + 8:
                shift = 8 * (reg - at)
                old = getattr(self, name)
                new = (old & ~(((1 << (8 * size)) - 1) << shift)) | (value << shift)
                setattr(self, name, new & _M64)
                if name == "chainaddr":
                    # __ioat_restart_chan(): a new chain starts the count of completed descriptors over.
                    self.next_desc = self.chainaddr
                    self.done_count = 0
                return
        if reg == CHANCTRL and size == 2:
            if value & CHANCTRL_INT_REARM:
                self.armed = True
                self.attnstatus = 0
            self.chanctrl = value & ~CHANCTRL_INT_REARM
        elif reg == CHANCMD and size == 1:
            self._command(value)
        elif reg == DMACOUNT and size == 2:
            self.dmacount = value
            self._run()
        elif reg == CHANERR and size == 4:
            self.chanerr &= ~value
            self._set_chanerr_int(self._chanerr_int() & ~value)
        elif reg == CHANERR_MASK and size == 4:
            self.chanerr_mask = value
        elif reg == DCACTRL and size == 4:
            self.dcactrl = value

    def _command(self, cmd: int) -> None:
        if cmd & CHANCMD_RESET:
            self._reset_channel()
            return
        if cmd & CHANCMD_ABORT:
            self.chansts = (self.chansts & CHANSTS_ADDR) | CHANSTS_HALTED
        elif cmd & CHANCMD_SUSPEND and self.chansts & 0x7 != CHANSTS_HALTED:
            self.chansts = (self.chansts & CHANSTS_ADDR) | CHANSTS_SUSPENDED

    # -- config space: the channel error registers ---------------------------------------------------

    def _chanerr_int(self) -> int:
        return self.config.read(PCI_CHANERR_INT, 4)

    def _set_chanerr_int(self, value: int) -> None:
        self.config.data[PCI_CHANERR_INT:PCI_CHANERR_INT + 4] = value.to_bytes(4, "little")

    def config_write(self, offset: int, size: int, value: int) -> None:
        for reg in (PCI_CHANERR_INT, PCI_DMAUNCERRSTS):         # write 1 to clear
            if offset <= reg and reg + 4 <= offset + size and self.mmio_enabled_by_platform():
                old = self.config.read(reg, 4)
                cleared = old & ~(value >> (8 * (reg - offset))) & 0xFFFFFFFF
                self.config.data[reg:reg + 4] = cleared.to_bytes(4, "little")
        super().config_write(offset, size, value)

    # -- the channel at work --------------------------------------------------------------------------

    def _interrupt(self) -> None:
        """The channel's interrupt, once per INT_REARM: MSI-X vector 0 when INTRCTRL routes
        channel interrupts to their vectors (or has the master enable on)."""
        if not self.armed:
            return
        self.armed = False
        self.attnstatus |= 1
        if self.intrctrl & (INTRCTRL_MSIX_VECTOR_CONTROL | INTRCTRL_MASTER_INT_EN):
            self.msix_notify(0)

    def _write_completion(self) -> None:
        try:
            self.bus_master.dma_write(self.chancmp & self.dma_mask, self.chansts.to_bytes(8, "little"))
        except DmaError as exc:
            raise _Halt(CHANERR_COMPLETION_ADDR_ERR, f"completion write: {exc}") from None

    def _run(self) -> None:
        """Run descriptors until DMACOUNT of them are done since CHAINADDR was written."""
        if self.chansts & 0x7 == CHANSTS_HALTED and self.chanerr:
            self.log(f"ioat {self.bdf}: DMACOUNT written while halted by errors {self.chanerr:#x}: ignored")
            return
        xfercap = 1 << self.xfercap_log
        while self.done_count != self.dmacount:
            addr = self.next_desc
            first = self.done_count == 0 and addr == self.chainaddr
            try:
                if addr % DESC_SIZE:
                    raise _Halt(CHANERR_NEXT_DESC_ALIGN_ERR, f"descriptor address {addr:#x} is not 64-byte aligned")
                try:
                    raw = self.bus_master.dma_read(addr & self.dma_mask, DESC_SIZE)
                except DmaError as exc:
                    raise _Halt(CHANERR_CHAIN_ADDR_VALUE_ERR if first else CHANERR_NEXT_ADDR_ERR,
                                f"descriptor fetch: {exc}") from None
                size, ctl, src, dst, nxt = DESC.unpack_from(raw)
                self.cdar = addr
                if ctl >> 24 != IOAT_OP_COPY:
                    raise _Halt(CHANERR_CONTROL_ERR, f"descriptor {addr:#x}: operation {ctl >> 24:#x} is not a copy")
                if size > xfercap:
                    raise _Halt(CHANERR_LENGTH_ERR, f"descriptor {addr:#x}: size {size:#x} exceeds XFERCAP {xfercap:#x}")
                if not ctl & CTL_NULL and size:
                    self._copy(src, dst, size)
                remaining = (self.dmacount - self.done_count) & 0xFFFF
                if nxt == addr and remaining > 2 and self._repeats_alike(addr, ctl, src, dst, size):
                    # Runs 2..remaining-1 would write what run 1 wrote (and raise no interrupt: the
                    # first disarmed it); count them, then run the last for real.
                    self.done_count = (self.done_count + remaining - 2) & 0xFFFF
                    self.descriptors_completed += remaining - 2
                self.done_count = (self.done_count + 1) & 0xFFFF
                self.descriptors_completed += 1
                self.next_desc = nxt
                state = CHANSTS_DONE if self.done_count == self.dmacount else CHANSTS_ACTIVE
                self.chansts = (addr & CHANSTS_ADDR) | state
                if ctl & CTL_COMPL_WRITE:
                    self._write_completion()
                if ctl & CTL_INT_EN:
                    self._interrupt()
            except _Halt as halt:
                self._halt(halt)
                return

    def _repeats_alike(self, addr: int, ctl: int, src: int, dst: int, size: int) -> bool:
        """Whether running this self-linked descriptor again changes nothing it reads."""
        if ctl & CTL_NULL or not size:
            writes = []
        else:
            writes = [(dst, size)]
        if ctl & CTL_COMPL_WRITE:
            writes.append((self.chancmp, 8))
        reads = [(addr, DESC_SIZE)] + ([] if ctl & CTL_NULL or not size else [(src, size)])
        return not any(_overlap(w, wl, r, rl) for w, wl in writes for r, rl in reads)

    def _copy(self, src: int, dst: int, size: int) -> None:
        try:
            data = self.bus_master.dma_read(src & self.dma_mask, size)
        except DmaError as exc:
            raise _Halt(CHANERR_READ_DATA_ERR, f"source read: {exc}") from None
        try:
            self.bus_master.dma_write(dst & self.dma_mask, data)
        except DmaError as exc:
            raise _Halt(CHANERR_WRITE_DATA_ERR, f"destination write: {exc}") from None

    def _halt(self, halt: _Halt) -> None:
        """An error: the channel halts on the descriptor it could not complete (ANY_ERR_ABORT)."""
        self.log(f"ioat {self.bdf}: channel halted (CHANERR {halt.chanerr:#x}): {halt}")
        self.chanerr |= halt.chanerr
        self._set_chanerr_int(self._chanerr_int() | halt.chanerr)
        self.chansts = (self.chansts & CHANSTS_ADDR) | CHANSTS_HALTED
        if self.chanctrl & CHANCTRL_ERR_COMPLETION_EN and halt.chanerr != CHANERR_COMPLETION_ADDR_ERR:
            try:
                self._write_completion()
            except _Halt as again:
                self.chanerr |= again.chanerr
        if self.chanctrl & CHANCTRL_ERR_INT_EN:
            self.armed = True      # an error interrupt is not held back by a spent INT_REARM
            self._interrupt()

    def snapshot(self) -> dict[str, int]:
        """Register values, for topology output and tests."""
        return {"chanctrl": self.chanctrl, "dmacount": self.dmacount, "chansts": self.chansts,
                "chainaddr": self.chainaddr, "chancmp": self.chancmp, "chanerr": self.chanerr,
                "descriptors_completed": self.descriptors_completed}
