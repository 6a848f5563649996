"""vfio-pci: PCI devices through VFIO (drivers/vfio/pci/vfio_pci_core.c,
vfio_pci_config.c, vfio_pci_rdwr.c, vfio_pci_intrs.c).

Regions are reached at ``index << 40`` in the device fd: BAR0-5, ROM,
config space, VGA.  Config space is partly virtualized (IDs, BARs, the
capability chain and MSI are kept by vfio-pci; the rest reaches the
device; the MSI-X capability reads from the device and ignores writes).
Interrupts are delivered by signalling the eventfds a user registers with
VFIO_DEVICE_SET_IRQS; INTx is automasked until unmasked.  MSI and MSI-X
follow vfio_pci_intrs.c as of Linux 6.12 (read from the upstream tree after
the 6.5 dynamic MSI-X series; the MSI/MSI-X functions are unchanged from 6.6
to 6.12), with the host's PCI core (drivers/pci/msi/) programming the
device's MSI-X table as Linux does.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass
from errno import EBADF, EEXIST, EFAULT, EINVAL, EIO, ENODEV, ENOENT, ENOSPC, ENOTTY, EPERM, ERANGE
from typing import TYPE_CHECKING

from ...uapi import vfio as uapi
from ..errors import KernelError, fail
from ..eventfd import EventFd, eventfd_ctx_fdget
from ..pci.config import (PCI_BASE_ADDRESS_0, PCI_CAP_ID_MSI, PCI_CAP_ID_MSIX, PCI_CAPABILITY_LIST, PCI_COMMAND,
                          PCI_COMMAND_INTX_DISABLE, PCI_COMMAND_MASTER, PCI_COMMAND_MEMORY, PCI_DEVICE_ID,
                          PCI_INTERRUPT_LINE, PCI_INTERRUPT_PIN, PCI_MSI_FLAGS, PCI_MSI_FLAGS_64BIT,
                          PCI_MSI_FLAGS_ENABLE, PCI_MSI_FLAGS_QMASK, PCI_MSIX_ENTRY_CTRL_MASKBIT,
                          PCI_MSIX_ENTRY_DATA, PCI_MSIX_ENTRY_LOWER_ADDR, PCI_MSIX_ENTRY_SIZE,
                          PCI_MSIX_ENTRY_UPPER_ADDR, PCI_MSIX_ENTRY_VECTOR_CTRL, PCI_MSIX_FLAGS,
                          PCI_MSIX_FLAGS_ENABLE, PCI_MSIX_FLAGS_MASKALL, PCI_MSIX_FLAGS_QSIZE, PCI_MSIX_TABLE,
                          PCI_MSIX_TABLE_BIR, PCI_MSIX_TABLE_OFFSET, PCI_ROM_ADDRESS, PCI_STATUS,
                          PCI_STATUS_CAP_LIST, PCI_VENDOR_ID)
from ..pci.device import PciDevice
from ..uaccess import copy_from_user, copy_struct_from_user, copy_struct_to_user, copy_to_user
from .device import VfioDeviceOps
from .info_cap import info_cap_add, info_cap_shift
from .virqfd import Virqfd, virqfd_enable

if TYPE_CHECKING:
    from ..task import Task

VFIO_PCI_OFFSET_SHIFT = 40
VFIO_PCI_OFFSET_MASK = (1 << VFIO_PCI_OFFSET_SHIFT) - 1

IRQ_NONE = -1
VFIO_PCI_IOEVENTFD_MAX = 1000           # vfio_pci_priv.h


@dataclass
class IoEventFd:
    """struct vfio_pci_ioeventfd: when its eventfd is signalled, write
    ``data`` (``count`` bytes) at ``pos`` of BAR ``bar``."""
    bar: int
    pos: int
    data: int
    count: int
    virqfd: Virqfd | None = None

# The MSI message the simulated host composes for the interrupt of MSI-X vector
# ``v``: the x86 interrupt address window and a per-vector data value.  Real
# hosts compose platform-specific messages (an IRTE handle with interrupt
# remapping, the PHB's MSI window on POWER); userspace can only see them by
# reading the table through an mmap of its BAR, and nothing depends on them.
MSIX_HOST_MSG_ADDRESS = 0xFEE00000
MSIX_HOST_MSG_DATA_BASE = 0x4000


def region_offset(index: int) -> int:
    """VFIO_PCI_INDEX_TO_OFFSET()"""
    return index << VFIO_PCI_OFFSET_SHIFT


@dataclass
class MsiDesc:
    """The host's struct msi_desc of an allocated MSI-X vector: the message it
    composed and the vector control word it caches (pci.msix_ctrl)."""

    address: int
    data: int
    ctrl: int


class VfioPciDevice(VfioDeviceOps):
    """vfio_pci_core_device for one PCI function."""

    name = "vfio-pci"

    def __init__(self, pdev: PciDevice, log) -> None:
        self.pdev = pdev
        self.log = log
        self.reset_works = pdev.reset_method is not None
        self.num_regions = 0                  # device-specific regions beyond VGA
        self.vconfig = bytearray(pdev.config.size)
        self.virt = bytearray(pdev.config.size)     # per-byte: virtualized bits
        self.vwrite = bytearray(pdev.config.size)   # per-byte: writable bits
        self.irq_type = IRQ_NONE
        self.intx_trigger: EventFd | None = None
        self.intx_masked = False
        self.intx_unmask: Virqfd | None = None      # ctx->unmask: an eventfd that unmasks INTx
        self.ioeventfds: list[IoEventFd] = []
        # vdev->ctx (an xarray in 6.12): MSI/MSI-X vector -> its trigger.
        self.msi_ctx: dict[int, EventFd] = {}
        # The host's allocated MSI/MSI-X vectors (pci_irq_vector() > 0) and, for
        # MSI-X, their msi_desc.
        self.msi_irqs: dict[int, MsiDesc | None] = {}
        self.req_trigger: EventFd | None = None
        self.enabled = False
        # Set by vfio_pci_core_enable() from the MSI-X capability.
        self.msix_bar = 0xFF
        self.msix_offset = 0
        self.msix_size = 0
        self.has_dyn_msix = False

    @property
    def msi_triggers(self) -> list[EventFd]:
        """The eventfds MSI or MSI-X vectors signal (the transport keeps them open)."""
        return list(self.msi_ctx.values())

    # -- open / close (vfio_pci_core_enable / _disable) -------------------------------------

    def open_device(self, current: "Task") -> None:
        p = self.pdev
        # pci_clear_master(), pci_enable_device(), then a reset when possible.
        cmd = p.config.read(PCI_COMMAND, 2)
        p.config.data[PCI_COMMAND:PCI_COMMAND + 2] = ((cmd & ~PCI_COMMAND_MASTER) | PCI_COMMAND_MEMORY).to_bytes(2, "little")
        if self.reset_works:
            self._reset_device()
        self._config_init()
        # vfio_pci_core_enable(): where the MSI-X table is, and whether vectors can
        # be added after MSI-X is enabled.
        msix = p.config.find_capability(PCI_CAP_ID_MSIX)
        if msix:
            flags = p.config.read(msix + PCI_MSIX_FLAGS, 2)
            table = p.config.read(msix + PCI_MSIX_TABLE, 4)
            self.msix_bar = table & PCI_MSIX_TABLE_BIR
            self.msix_offset = table & PCI_MSIX_TABLE_OFFSET
            self.msix_size = ((flags & PCI_MSIX_FLAGS_QSIZE) + 1) * 16
            self.has_dyn_msix = p.msix_can_alloc_dyn        # pci_msix_can_alloc_dyn()
        else:
            self.msix_bar = 0xFF
            self.has_dyn_msix = False
        self.enabled = True

    def close_device(self, current: "Task") -> None:
        self._disable_irqs()
        # vfio_pci_core_disable(): the ioeventfds go with the device.
        for ioeventfd in self.ioeventfds:
            assert ioeventfd.virqfd is not None
            ioeventfd.virqfd.disable()
        self.ioeventfds = []
        self.req_trigger = None
        p = self.pdev
        cmd = p.config.read(PCI_COMMAND, 2) & ~PCI_COMMAND_MASTER
        p.config.data[PCI_COMMAND:PCI_COMMAND + 2] = cmd.to_bytes(2, "little")
        if self.reset_works:
            self._reset_device()
        self.enabled = False

    def _reset_device(self) -> None:
        cmd = self.pdev.config.read(PCI_COMMAND, 2)
        self.pdev.reset()
        # pci_restore_state(): config space comes back as it was saved, and
        # pci_restore_msi_state() re-enables the MSI or MSI-X the host set up.
        self.pdev.config.data[PCI_COMMAND:PCI_COMMAND + 2] = cmd.to_bytes(2, "little")
        self._restore_msi_state()

    # -- config space virtualization (vfio_config_init and the perm tables) --------------------

    def _config_init(self) -> None:
        p = self.pdev
        self.vconfig[:] = p.config.data
        self.virt[:] = bytes(len(self.virt))
        self.vwrite[:] = bytes(len(self.vwrite))

        def perm(off: int, size: int, virt: int, write: int) -> None:
            self.virt[off:off + size] = (virt & ((1 << 8 * size) - 1)).to_bytes(size, "little")
            self.vwrite[off:off + size] = (write & ((1 << 8 * size) - 1)).to_bytes(size, "little")

        ALL = 0xFFFFFFFF
        # init_pci_cap_basic_perm(): the standard header.  Unlisted fields of
        # the header read from the device and ignore writes.
        for off in range(0, 0x40):
            self.vwrite[off] = 0
        perm(PCI_VENDOR_ID, 2, ALL, 0)
        perm(PCI_DEVICE_ID, 2, ALL, 0)
        perm(PCI_COMMAND, 2, PCI_COMMAND_INTX_DISABLE, ALL)
        perm(PCI_STATUS, 2, PCI_STATUS_CAP_LIST, 0)
        perm(0x0C, 1, 0, ALL)        # cache line size
        perm(0x0D, 1, 0, ALL)        # latency timer
        perm(0x0F, 1, 0, ALL)        # BIST
        for bar in range(6):
            perm(PCI_BASE_ADDRESS_0 + 4 * bar, 4, ALL, ALL)
        perm(PCI_ROM_ADDRESS, 4, ALL, ALL)
        perm(PCI_CAPABILITY_LIST, 1, ALL, 0)
        perm(PCI_INTERRUPT_LINE, 1, ALL, ALL)
        perm(PCI_INTERRUPT_PIN, 1, ALL, 0)
        # The header's COMMAND is tracked in vconfig too, so memory decode can
        # be tested against the user's view (__vfio_pci_memory_enabled()).
        msi = p.config.find_capability(PCI_CAP_ID_MSI)
        if msi:
            flags = p.config.read(msi + PCI_MSI_FLAGS, 2)
            length = 14 if flags & PCI_MSI_FLAGS_64BIT else 10
            perm(msi, 2, ALL, 0)                      # id and next pointer
            perm(msi + PCI_MSI_FLAGS, 1, ALL, ALL)
            perm(msi + 3, 1, ALL, 0)
            for off in range(msi + 4, msi + length):
                self.virt[off] = 0xFF
                self.vwrite[off] = 0xFF
            # MSI is enabled by SET_IRQS, never by writing config space.
            self.vconfig[msi + PCI_MSI_FLAGS] &= ~PCI_MSI_FLAGS_ENABLE & 0xFF
        msix = p.config.find_capability(PCI_CAP_ID_MSIX)
        if msix:
            # No perm_bits for MSI-X (cap_perms[] defaults to vfio_direct_config_read
            # with no writefn): the capability reads from the device, its ID and next
            # pointer from vconfig, and every write is dropped.  So userspace sees the
            # Enable and Function Mask bits the host's PCI core programmed.
            perm(msix, 2, ALL, 0)
        # BARs: sizes come from the device; unimplemented BARs read 0.
        for bar in range(6):
            reg = PCI_BASE_ADDRESS_0 + 4 * bar
            if bar not in p.bars and not (bar > 0 and (bar - 1) in p.bars and p.bars[bar - 1].is_64bit):
                self.vconfig[reg:reg + 4] = bytes(4)
        self.vconfig[PCI_ROM_ADDRESS:PCI_ROM_ADDRESS + 4] = bytes(4)

    def _bar_fixup(self, reg: int) -> None:
        """vfio_bar_fixup(): keep only the address bits the BAR's size allows."""
        bar = (reg - PCI_BASE_ADDRESS_0) // 4
        b = self.pdev.bars.get(bar)
        raw = int.from_bytes(self.vconfig[reg:reg + 4], "little")
        if b is not None:
            flags = self.pdev.config.read(reg, 4) & 0xF
            raw = (raw & ~(b.size - 1) & 0xFFFFFFF0) | flags
        elif bar > 0 and (bar - 1) in self.pdev.bars and self.pdev.bars[bar - 1].is_64bit:
            size = self.pdev.bars[bar - 1].size
            raw &= ~((size - 1) >> 32) & 0xFFFFFFFF
        else:
            raw = 0
        if reg == PCI_ROM_ADDRESS:
            raw = 0
        self.vconfig[reg:reg + 4] = raw.to_bytes(4, "little")

    def _config_read(self, off: int, size: int) -> int:
        hw = self.pdev.config_read(off, size)
        value = 0
        for i in range(size):
            v = self.virt[off + i]
            byte = (self.vconfig[off + i] & v) | ((hw >> (8 * i)) & ~v & 0xFF)
            value |= byte << (8 * i)
        if off <= PCI_COMMAND < off + size or off <= PCI_COMMAND + 1 < off + size:
            # COMMAND reads back what the user last wrote, INTx-disable included.
            for i in range(size):
                if off + i in (PCI_COMMAND, PCI_COMMAND + 1):
                    value = (value & ~(0xFF << (8 * i))) | (self.vconfig[off + i] << (8 * i))
        return value

    def _config_write(self, off: int, size: int, value: int) -> None:
        hw_mask = 0
        for i in range(size):
            b = (value >> (8 * i)) & 0xFF
            w, v = self.vwrite[off + i], self.virt[off + i]
            self.vconfig[off + i] = (self.vconfig[off + i] & ~(w & v) & 0xFF) | (b & w & v)
            hw_mask |= (w & ~v & 0xFF) << (8 * i)
        if off <= PCI_COMMAND + 1 and off + size > PCI_COMMAND:
            # Track every COMMAND bit in vconfig (vfio_basic_config_write).
            for i in range(size):
                if off + i in (PCI_COMMAND, PCI_COMMAND + 1):
                    self.vconfig[off + i] = (value >> (8 * i)) & 0xFF
        for reg in range(PCI_BASE_ADDRESS_0, PCI_ROM_ADDRESS + 4, 4):
            if off < reg + 4 and reg < off + size and (reg < PCI_BASE_ADDRESS_0 + 24 or reg == PCI_ROM_ADDRESS):
                self._bar_fixup(reg)
        if hw_mask:
            cur = self.pdev.config.read(off, size)
            self.pdev.config_write(off, size, (cur & ~hw_mask) | (value & hw_mask))

    def config_rw(self, pos: int, count: int, data: bytes | None) -> bytes | int:
        """vfio_pci_config_rw(): aligned 4/2/1-byte accesses; EFAULT past the end."""
        size = self.pdev.config.size
        if pos < 0 or pos >= size or pos + count > size:
            raise fail(EFAULT, f"config space access {pos:#x}+{count:#x} beyond its {size} bytes")
        out = bytearray()
        done = 0
        while done < count:
            at = pos + done
            left = count - done
            n = 4 if left >= 4 and at % 4 == 0 else 2 if left >= 2 and at % 2 == 0 else 1
            if data is None:
                out += self._config_read(at, n).to_bytes(n, "little")
            else:
                self._config_write(at, n, int.from_bytes(data[done:done + n], "little"))
            done += n
        return bytes(out) if data is None else count

    # -- BAR access (vfio_pci_bar_rw, vfio_pci_core_do_io_rw) ---------------------------------------

    def bar_rw(self, bar: int, pos: int, count: int, data: bytes | None) -> bytes | int:
        """vfio_pci_bar_rw(): the MSI-X table (not the PBA) of the BAR holding it
        is excluded: reads there fill with 0xff, writes are dropped."""
        b = self.pdev.bars.get(bar)
        if b is None:
            raise fail(EINVAL, f"BAR{bar} is not implemented by {self.pdev.bdf}")
        if pos >= b.size:
            raise fail(EINVAL, f"offset {pos:#x} is beyond BAR{bar} ({b.size:#x} bytes)")
        count = min(count, b.size - pos)
        x_start = x_end = 0
        if bar == self.msix_bar:
            x_start, x_end = self.msix_offset, self.msix_offset + self.msix_size
        return self._do_io_rw(bar, pos, count, x_start, x_end, data)

    def _do_io_rw(self, bar: int, off: int, count: int, x_start: int, x_end: int,
                  data: bytes | None) -> bytes | int:
        """vfio_pci_core_do_io_rw() (6.12, with 8-byte accesses): naturally aligned
        accesses of up to 8 bytes outside [x_start, x_end); inside it reads fill
        with 0xff and writes are dropped.  Memory decoding is tested per access
        (vfio_pci_core_ioread/iowrite with test_mem), so an access that touches
        only the excluded range succeeds even with decoding off."""
        out = bytearray()
        done = 0
        while done < count:
            left = count - done
            if off < x_start:
                fillable = min(left, x_start - off)
            elif off >= x_end:
                fillable = left
            else:
                fillable = 0
            if fillable:
                n = 8 if fillable >= 8 and off % 8 == 0 else 4 if fillable >= 4 and off % 4 == 0 else \
                    2 if fillable >= 2 and off % 2 == 0 else 1
                if not self.vconfig[PCI_COMMAND] & PCI_COMMAND_MEMORY:      # __vfio_pci_memory_enabled()
                    raise fail(EIO, "memory decoding is disabled in the device's COMMAND register")
                if data is None:
                    out += self.pdev.host_mmio_read(bar, off, n).to_bytes(n, "little")
                else:
                    self.pdev.host_mmio_write(bar, off, n, int.from_bytes(data[done:done + n], "little"))
            else:
                n = min(left, x_end - off)           # the MSI-X table: fill reads with -1, drop writes
                if data is None:
                    out += b"\xff" * n
            done += n
            off += n
        return bytes(out) if data is None else count

    # -- mmap of BARs (vfio_pci_core_mmap) -----------------------------------------------------

    def mmap_check(self, current: "Task", offset: int, length: int, prot: int, shared: bool) -> None:
        index = offset >> VFIO_PCI_OFFSET_SHIFT
        page = current.mm.page_size
        if length <= 0:
            raise fail(EINVAL, "mmap length must be positive")
        if index >= uapi.VFIO_PCI_NUM_REGIONS + self.num_regions:
            raise fail(EINVAL, f"region index {index} does not exist")
        if index >= uapi.VFIO_PCI_ROM_REGION_INDEX:
            raise fail(EINVAL, f"region {index} (ROM, config or VGA) cannot be mmapped")
        bar = self.pdev.bars.get(index)
        if bar is None or not bar.mmap_ok or bar.size < page:
            raise fail(EINVAL, f"BAR{index} does not support mmap")
        if not shared:
            raise fail(EINVAL, "device regions must be mapped MAP_SHARED")
        phys_len = (bar.size + page - 1) & ~(page - 1)
        req_start = offset & VFIO_PCI_OFFSET_MASK
        if req_start + length > phys_len:
            raise fail(EINVAL, f"{req_start:#x}+{length:#x} runs past BAR{index} ({phys_len:#x} bytes)")

    def mmio(self, current: "Task", offset: int, size: int, value: int | None) -> int:
        """A CPU load or store through a BAR mapping: straight to the device."""
        index = offset >> VFIO_PCI_OFFSET_SHIFT
        off = offset & VFIO_PCI_OFFSET_MASK
        bar = self.pdev.bars.get(index)
        if bar is None or off + size > bar.size:
            raise fail(EFAULT, f"access {off:#x}+{size} outside BAR{index}")
        if not self.vconfig[PCI_COMMAND] & PCI_COMMAND_MEMORY:
            # vfio-pci zaps BAR mappings while memory decode is off: SIGBUS.
            raise fail(EIO, "memory decoding is disabled: the mapping faults")
        if value is None:
            return self.pdev.host_mmio_read(index, off, size)
        self.pdev.host_mmio_write(index, off, size, value)
        return 0

    def read(self, current: "Task", count: int, pos: int) -> bytes:
        return self._rw(pos, count, None)  # type: ignore[return-value]

    def write(self, current: "Task", data: bytes, pos: int) -> int:
        return self._rw(pos, len(data), data)  # type: ignore[return-value]

    def _rw(self, pos: int, count: int, data: bytes | None) -> bytes | int:
        """vfio_pci_rw()"""
        index = pos >> VFIO_PCI_OFFSET_SHIFT
        off = pos & VFIO_PCI_OFFSET_MASK
        if index >= uapi.VFIO_PCI_NUM_REGIONS + self.num_regions:
            raise fail(EINVAL, f"region index {index} does not exist")
        if index == uapi.VFIO_PCI_CONFIG_REGION_INDEX:
            return self.config_rw(off, count, data)
        if index == uapi.VFIO_PCI_ROM_REGION_INDEX:
            if data is not None:
                raise fail(EINVAL, "the ROM region is read-only")
            raise fail(EINVAL, f"{self.pdev.bdf} has no ROM")
        if index <= uapi.VFIO_PCI_BAR5_REGION_INDEX:
            return self.bar_rw(index, off, count, data)
        if index == uapi.VFIO_PCI_VGA_REGION_INDEX:
            raise fail(EINVAL, f"{self.pdev.bdf} is not a VGA device")
        raise fail(EINVAL, f"region index {index} does not exist")

    # -- ioctls ---------------------------------------------------------------------------------------

    def ioctl(self, current: "Task", cmd: int, arg: int) -> int:
        """vfio_pci_core_ioctl()"""
        handler = {
            uapi.VFIO_DEVICE_GET_INFO: self._get_info,
            uapi.VFIO_DEVICE_GET_REGION_INFO: self._get_region_info,
            uapi.VFIO_DEVICE_GET_IRQ_INFO: self._get_irq_info,
            uapi.VFIO_DEVICE_SET_IRQS: self._set_irqs,
            uapi.VFIO_DEVICE_RESET: self._reset_ioctl,
            uapi.VFIO_DEVICE_GET_PCI_HOT_RESET_INFO: self._get_pci_hot_reset_info,
            uapi.VFIO_DEVICE_PCI_HOT_RESET: self._pci_hot_reset,
            uapi.VFIO_DEVICE_IOEVENTFD: self._ioeventfd,
        }.get(cmd)
        if handler is None:
            raise fail(ENOTTY, f"{uapi.ioctl_name_for(cmd, 'vfio-device') or hex(cmd)} is not a vfio-pci device ioctl")
        return handler(current, arg)

    def _get_info(self, current: "Task", arg: int) -> int:
        """vfio_pci_ioctl_get_info(): copies back min(argsz, sizeof) bytes."""
        cls = uapi.vfio_device_info
        minsz = uapi.offsetofend(cls, "num_irqs")
        info = copy_struct_from_user(current, arg, cls, minsz)
        if info.argsz < minsz:
            raise fail(EINVAL, f"VFIO_DEVICE_GET_INFO: argsz {info.argsz} < {minsz}")
        out = cls(argsz=info.argsz,
                  flags=uapi.VFIO_DEVICE_FLAGS_PCI | (uapi.VFIO_DEVICE_FLAGS_RESET if self.reset_works else 0),
                  num_regions=uapi.VFIO_PCI_NUM_REGIONS + self.num_regions, num_irqs=uapi.VFIO_PCI_NUM_IRQS)
        copy_struct_to_user(current, arg, out, min(info.argsz, ctypes.sizeof(cls)))
        return 0

    def _get_region_info(self, current: "Task", arg: int) -> int:
        cls = uapi.vfio_region_info
        minsz = uapi.offsetofend(cls, "offset")
        info = copy_struct_from_user(current, arg, cls, minsz)
        if info.argsz < minsz:
            raise fail(EINVAL, f"VFIO_DEVICE_GET_REGION_INFO: argsz {info.argsz} < {minsz}")
        index = info.index
        R, W, M = uapi.VFIO_REGION_INFO_FLAG_READ, uapi.VFIO_REGION_INFO_FLAG_WRITE, uapi.VFIO_REGION_INFO_FLAG_MMAP
        chain = bytearray()                       # capabilities of this region
        if index == uapi.VFIO_PCI_CONFIG_REGION_INDEX:
            info.offset, info.size, info.flags = region_offset(index), self.pdev.config.size, R | W
        elif index <= uapi.VFIO_PCI_BAR5_REGION_INDEX:
            info.offset = region_offset(index)
            bar = self.pdev.bars.get(index)
            info.size = bar.size if bar else 0
            info.flags = 0 if not bar else R | W | (M if bar.mmap_ok and bar.size >= current.mm.page_size else 0)
            if info.flags & M and index == self.msix_bar:
                # msix_mappable_cap(): the whole BAR, MSI-X table included, may be mmapped.
                info_cap_add(chain, bytes(uapi.vfio_info_cap_header()),
                             uapi.VFIO_REGION_INFO_CAP_MSIX_MAPPABLE, 1)
        elif index == uapi.VFIO_PCI_ROM_REGION_INDEX:
            info.offset, info.size, info.flags = region_offset(index), 0, 0
        elif index == uapi.VFIO_PCI_VGA_REGION_INDEX:
            raise fail(EINVAL, f"{self.pdev.bdf} is not a VGA device")
        else:
            raise fail(EINVAL, f"region index {index} does not exist "
                               f"({uapi.VFIO_PCI_NUM_REGIONS + self.num_regions} regions)")
        if chain:
            info.flags |= uapi.VFIO_REGION_INFO_FLAG_CAPS
            if info.argsz < ctypes.sizeof(cls) + len(chain):
                # Too small for the capabilities: say how much is needed.
                info.argsz = ctypes.sizeof(cls) + len(chain)
                info.cap_offset = 0
            else:
                info_cap_shift(chain, ctypes.sizeof(cls))
                copy_to_user(current, arg + ctypes.sizeof(cls), bytes(chain))
                info.cap_offset = ctypes.sizeof(cls)
        # Without capabilities cap_offset goes back as the caller passed it
        # (minsz covers the whole struct).
        copy_struct_to_user(current, arg, info, minsz)
        return 0

    def irq_count(self, index: int) -> int:
        """vfio_pci_get_irq_count()"""
        p = self.pdev
        if index == uapi.VFIO_PCI_INTX_IRQ_INDEX:
            return 1 if p.config.read(PCI_INTERRUPT_PIN, 1) else 0
        if index == uapi.VFIO_PCI_MSI_IRQ_INDEX:
            msi = p.config.find_capability(PCI_CAP_ID_MSI)
            if msi:
                flags = p.config.read(msi + PCI_MSI_FLAGS, 2)
                return 1 << ((flags & PCI_MSI_FLAGS_QMASK) >> 1)
            return 0
        if index == uapi.VFIO_PCI_MSIX_IRQ_INDEX:
            msix = p.config.find_capability(PCI_CAP_ID_MSIX)
            if msix:
                return (p.config.read(msix + PCI_MSIX_FLAGS, 2) & PCI_MSIX_FLAGS_QSIZE) + 1
            return 0
        if index == uapi.VFIO_PCI_ERR_IRQ_INDEX:
            return 0        # conventional PCI: no AER
        if index == uapi.VFIO_PCI_REQ_IRQ_INDEX:
            return 1
        return 0

    def _get_irq_info(self, current: "Task", arg: int) -> int:
        cls = uapi.vfio_irq_info
        minsz = uapi.offsetofend(cls, "count")
        info = copy_struct_from_user(current, arg, cls, minsz)
        if info.argsz < minsz or info.index >= uapi.VFIO_PCI_NUM_IRQS:
            raise fail(EINVAL, f"VFIO_DEVICE_GET_IRQ_INFO: argsz {info.argsz} (need {minsz}) or index {info.index} "
                               f"(of {uapi.VFIO_PCI_NUM_IRQS}) invalid")
        if info.index == uapi.VFIO_PCI_ERR_IRQ_INDEX:
            raise fail(EINVAL, f"{self.pdev.bdf} is not PCI Express: no error (AER) interrupt")
        info.flags = uapi.VFIO_IRQ_INFO_EVENTFD
        info.count = self.irq_count(info.index)
        if info.index == uapi.VFIO_PCI_INTX_IRQ_INDEX:
            info.flags |= uapi.VFIO_IRQ_INFO_MASKABLE | uapi.VFIO_IRQ_INFO_AUTOMASKED
        elif info.index != uapi.VFIO_PCI_MSIX_IRQ_INDEX or not self.has_dyn_msix:
            # Without NORESIZE (x86) MSI-X vectors can be added and removed one by
            # one while MSI-X is enabled (vfio_msi_alloc_irq()).
            info.flags |= uapi.VFIO_IRQ_INFO_NORESIZE
        copy_struct_to_user(current, arg, info, minsz)
        return 0

    def _reset_ioctl(self, current: "Task", arg: int) -> int:
        """vfio_pci_ioctl_reset()"""
        if not self.reset_works:
            raise fail(EINVAL, f"{self.pdev.bdf} has no reset method (no FLR or PM reset, and not alone "
                               f"behind a bridge for a bus reset)")
        self._reset_device()
        self._config_init()
        return 0

    # -- bus reset (vfio_pci_ioctl_get_pci_hot_reset_info, vfio_pci_ioctl_pci_hot_reset) ----------------

    def _reset_domain(self) -> list[PciDevice]:
        """The devices a slot or bus reset of this device would reset, or ENODEV
        (``pci_probe_reset_slot()`` fails, then ``pci_probe_reset_bus()``).

        The machines have no hotplug slots, so a slot reset is never possible; a
        bus reset is possible exactly when the machine put the device alone on the
        bus below a bridge (``behind_bridge``, reset method "bus"), so the device
        is the only one it resets."""
        if self.pdev.reset_method != "bus":
            raise fail(ENODEV, f"{self.pdev.bdf} has neither a slot reset nor a bus reset (it is not alone on "
                               f"a bus below a bridge)")
        return [self.pdev]

    def _get_pci_hot_reset_info(self, current: "Task", arg: int) -> int:
        """vfio_pci_ioctl_get_pci_hot_reset_info(): the devices a hot reset affects, as
        (group, segment, bus, devfn); ENOSPC with the count when they do not fit."""
        cls = uapi.vfio_pci_hot_reset_info
        minsz = uapi.offsetofend(cls, "count")
        hdr = copy_struct_from_user(current, arg, cls, minsz)
        if hdr.argsz < minsz:
            raise fail(EINVAL, f"VFIO_DEVICE_GET_PCI_HOT_RESET_INFO: argsz {hdr.argsz} < {minsz}")
        hdr.flags = 0
        devices = self._reset_domain()
        entry = ctypes.sizeof(uapi.vfio_pci_dependent_device)
        count = len(devices)
        if count > (hdr.argsz - ctypes.sizeof(cls)) // entry:
            hdr.count = count
            copy_struct_to_user(current, arg, hdr, minsz)
            raise fail(ENOSPC, f"VFIO_DEVICE_GET_PCI_HOT_RESET_INFO: {count} device(s) do not fit in argsz "
                               f"{hdr.argsz}; count set to {count}")
        # A cdev-opened device reports devids (vfio_pci_fill_devs()).
        flags = 0
        if self.vdev is not None and self.vdev.cdev_opened:
            flags = uapi.VFIO_PCI_HOT_RESET_FLAG_DEV_ID | uapi.VFIO_PCI_HOT_RESET_FLAG_DEV_ID_OWNED
        out = bytearray()
        for dev in devices:
            info = uapi.vfio_pci_dependent_device(segment=dev.domain, bus=dev.bus,
                                                  devfn=(dev.slot << 3) | dev.function)
            if flags:
                info.devid = self._devid_of(dev)
                if info.devid == uapi.VFIO_PCI_DEVID_NOT_OWNED & 0xFFFFFFFF:
                    flags &= ~uapi.VFIO_PCI_HOT_RESET_FLAG_DEV_ID_OWNED
            else:
                if dev.iommu_group is None:
                    raise fail(EPERM, f"{dev.bdf} is in no IOMMU group: it cannot be reset from userspace")
                info.group_id = dev.iommu_group.id
            out += bytes(info)
        copy_to_user(current, arg + ctypes.sizeof(cls), bytes(out))
        hdr.count = count
        hdr.flags = flags
        copy_struct_to_user(current, arg, hdr, minsz)
        return 0

    def _devid_of(self, dev: PciDevice) -> int:
        """vfio_pci_fill_devs() with VFIO_PCI_HOT_RESET_FLAG_DEV_ID: the devid in
        this device's iommufd, VFIO_PCI_DEVID_OWNED for a device bound to it
        without an id of its own, VFIO_PCI_DEVID_NOT_OWNED otherwise (also for
        a device the dev_set does not hold: one VFIO does not drive)."""
        from .iommufd import vfio_iommufd_device_ictx, vfio_iommufd_get_dev_id
        assert self.vdev is not None
        ictx = vfio_iommufd_device_ictx(self.vdev)
        other = next((d for d in self.vdev.group.vfio.devices if d.ops.pdev is dev), None)
        if other is None or ictx is None:
            return uapi.VFIO_PCI_DEVID_NOT_OWNED & 0xFFFFFFFF
        devid = vfio_iommufd_get_dev_id(other, ictx)
        if devid > 0:
            return devid
        if devid == -ENOENT:
            return uapi.VFIO_PCI_DEVID_OWNED
        return uapi.VFIO_PCI_DEVID_NOT_OWNED & 0xFFFFFFFF

    def _pci_hot_reset(self, current: "Task", arg: int) -> int:
        """vfio_pci_ioctl_pci_hot_reset(): a group fd array for a device opened
        through its group, an empty one for a cdev-opened device (ownership
        is then its iommufd's)."""
        from .group import GroupFile
        cls = uapi.vfio_pci_hot_reset
        minsz = uapi.offsetofend(cls, "count")
        hdr = copy_struct_from_user(current, arg, cls, minsz)
        if hdr.argsz < minsz or hdr.flags:
            raise fail(EINVAL, f"VFIO_DEVICE_PCI_HOT_RESET: argsz {hdr.argsz} (need {minsz}) or flags {hdr.flags:#x}")
        cdev = self.vdev is not None and self.vdev.cdev_opened
        if bool(hdr.count) == cdev:
            raise fail(EINVAL, "VFIO_DEVICE_PCI_HOT_RESET: a device opened through its group needs a group fd array"
                       if not cdev else "VFIO_DEVICE_PCI_HOT_RESET: a cdev-opened device takes no group fds (count 0)")
        devices = self._reset_domain()
        if cdev:
            # vfio_pci_dev_set_hot_reset() with the device's iommufd_ctx.
            for dev in devices:
                devid = self._devid_of(dev)
                if devid == uapi.VFIO_PCI_DEVID_NOT_OWNED & 0xFFFFFFFF:
                    raise fail(EINVAL, f"VFIO_DEVICE_PCI_HOT_RESET: {dev.bdf} is not owned by this iommufd")
            self._reset_device()
            self._config_init()
            return 0
        # vfio_pci_ioctl_pci_hot_reset_groups(): one group per affected device at most.
        if hdr.count > len(devices):
            raise fail(EINVAL, f"VFIO_DEVICE_PCI_HOT_RESET: {hdr.count} group fds for {len(devices)} device(s)")
        raw = copy_from_user(current, arg + ctypes.sizeof(cls), 4 * hdr.count)
        groups = []
        for i in range(hdr.count):
            fd = int.from_bytes(raw[4 * i:4 * i + 4], "little", signed=True)
            try:
                file = current.files.get(fd)
            except KernelError:
                raise fail(EBADF, f"VFIO_DEVICE_PCI_HOT_RESET: group fd {fd} is not open") from None
            if not isinstance(file, GroupFile):
                raise fail(EINVAL, f"VFIO_DEVICE_PCI_HOT_RESET: fd {fd} is a {file.kind}, not a VFIO group")
            groups.append(file.group.iommu_group)
        # vfio_pci_dev_set_hot_reset(): every opened device of the set must be in one
        # of the groups given (this device is: its fd is what the ioctl came through).
        for dev in devices:
            if dev.iommu_group not in groups:
                raise fail(EINVAL, f"VFIO_DEVICE_PCI_HOT_RESET: {dev.bdf} (group "
                                   f"{dev.iommu_group.id if dev.iommu_group else '-'}) is not in the groups given")
        # pci_reset_bus(): the bus is reset, each device's config space saved and restored.
        self._reset_device()
        self._config_init()
        return 0

    # -- interrupts (vfio_pci_intrs.c) ------------------------------------------------------------------

    def _set_irqs(self, current: "Task", arg: int) -> int:
        cls = uapi.vfio_irq_set
        minsz = uapi.offsetofend(cls, "count")
        hdr = copy_struct_from_user(current, arg, cls, minsz)
        max_irqs = self.irq_count(hdr.index)
        dt_mask = uapi.VFIO_IRQ_SET_DATA_TYPE_MASK
        at_mask = uapi.VFIO_IRQ_SET_ACTION_TYPE_MASK
        # vfio_set_irqs_validate_and_prepare()
        if (hdr.argsz < minsz or hdr.index >= uapi.VFIO_PCI_NUM_IRQS or hdr.count >= 0xFFFFFFFF - hdr.start
                or hdr.flags & ~(dt_mask | at_mask)):
            raise fail(EINVAL, "VFIO_DEVICE_SET_IRQS: bad argsz, index, count or flags")
        if hdr.start >= max_irqs or hdr.start + hdr.count > max_irqs:
            raise fail(EINVAL, f"VFIO_DEVICE_SET_IRQS: vectors {hdr.start}+{hdr.count} exceed the {max_irqs} "
                               f"of index {hdr.index}")
        dtype = hdr.flags & dt_mask
        size = {uapi.VFIO_IRQ_SET_DATA_NONE: 0, uapi.VFIO_IRQ_SET_DATA_BOOL: 1,
                uapi.VFIO_IRQ_SET_DATA_EVENTFD: 4}.get(dtype)
        if size is None:
            raise fail(EINVAL, f"VFIO_DEVICE_SET_IRQS: data type flags {dtype:#x} must be exactly one of NONE/BOOL/EVENTFD")
        data = b""
        if size:
            if hdr.argsz - minsz < hdr.count * size:
                raise fail(EINVAL, "VFIO_DEVICE_SET_IRQS: argsz too small for the data")
            data = copy_from_user(current, arg + minsz, hdr.count * size)
        return self._set_irqs_ioctl(current, hdr.flags, hdr.index, hdr.start, hdr.count, data)

    def _set_irqs_ioctl(self, current: "Task", flags: int, index: int, start: int, count: int, data: bytes) -> int:
        action = flags & uapi.VFIO_IRQ_SET_ACTION_TYPE_MASK
        func = None
        if index == uapi.VFIO_PCI_INTX_IRQ_INDEX:
            func = {uapi.VFIO_IRQ_SET_ACTION_MASK: self._intx_mask, uapi.VFIO_IRQ_SET_ACTION_UNMASK: self._intx_unmask,
                    uapi.VFIO_IRQ_SET_ACTION_TRIGGER: self._intx_trigger}.get(action)
        elif index in (uapi.VFIO_PCI_MSI_IRQ_INDEX, uapi.VFIO_PCI_MSIX_IRQ_INDEX):
            if action == uapi.VFIO_IRQ_SET_ACTION_TRIGGER:
                func = self._msi_trigger
        elif index == uapi.VFIO_PCI_REQ_IRQ_INDEX:
            if action == uapi.VFIO_IRQ_SET_ACTION_TRIGGER:
                func = self._req_trigger
        if func is None:
            raise fail(ENOTTY, f"VFIO_DEVICE_SET_IRQS: action {action:#x} is not supported for index {index}")
        return func(current, index, start, count, flags, data)

    @staticmethod
    def _eventfd(current: "Task", fd: int) -> EventFd:
        return eventfd_ctx_fdget(current, fd, "VFIO_DEVICE_SET_IRQS")

    # -- VFIO_DEVICE_IOEVENTFD (vfio_pci_ioctl_ioeventfd, vfio_pci_ioeventfd in vfio_pci_rdwr.c) ---

    def _ioeventfd(self, current: "Task", arg: int) -> int:
        cls = uapi.vfio_device_ioeventfd
        minsz = uapi.offsetofend(cls, "fd")
        req = copy_struct_from_user(current, arg, cls, minsz)
        if req.argsz < minsz:
            raise fail(EINVAL, f"VFIO_DEVICE_IOEVENTFD: argsz {req.argsz} < {minsz}")
        if req.flags & ~uapi.VFIO_DEVICE_IOEVENTFD_SIZE_MASK:
            raise fail(EINVAL, f"VFIO_DEVICE_IOEVENTFD: unknown flags {req.flags:#x}")
        count = req.flags & uapi.VFIO_DEVICE_IOEVENTFD_SIZE_MASK
        if bin(count).count("1") != 1 or req.fd < -1:
            raise fail(EINVAL, f"VFIO_DEVICE_IOEVENTFD: flags must name one write size (got {count:#x}), "
                               f"fd an eventfd or -1 (got {req.fd})")
        bar, pos = req.offset >> VFIO_PCI_OFFSET_SHIFT, req.offset & VFIO_PCI_OFFSET_MASK
        if bar > uapi.VFIO_PCI_BAR5_REGION_INDEX:
            raise fail(EINVAL, f"VFIO_DEVICE_IOEVENTFD: region {bar} is not a BAR")
        b = self.pdev.bars.get(bar)
        if pos + count > (b.size if b is not None else 0):            # pci_resource_len()
            raise fail(EINVAL, f"VFIO_DEVICE_IOEVENTFD: {count} bytes at {pos:#x} do not fit in BAR{bar}")
        if bar == self.msix_bar and not (pos + count <= self.msix_offset
                                         or pos >= self.msix_offset + self.msix_size):
            raise fail(EINVAL, "VFIO_DEVICE_IOEVENTFD: the write would reach the MSI-X table")
        if count == 8:
            raise fail(EINVAL, "VFIO_DEVICE_IOEVENTFD: 8-byte writes are refused (Linux 6.12)")
        for i, e in enumerate(self.ioeventfds):
            if (e.pos, e.bar, e.data, e.count) == (pos, bar, req.data, count):
                if req.fd == -1:
                    assert e.virqfd is not None
                    e.virqfd.disable()
                    del self.ioeventfds[i]
                    return 0
                raise fail(EEXIST, f"VFIO_DEVICE_IOEVENTFD: this write (BAR{bar} {pos:#x}, {count} bytes, "
                                   f"data {req.data:#x}) already has an eventfd")
        if req.fd < 0:
            raise fail(ENODEV, "VFIO_DEVICE_IOEVENTFD: fd -1 unregisters, but no such ioeventfd is registered")
        if len(self.ioeventfds) >= VFIO_PCI_IOEVENTFD_MAX:
            raise fail(ENOSPC, f"VFIO_DEVICE_IOEVENTFD: {VFIO_PCI_IOEVENTFD_MAX} ioeventfds at most per device")
        e = IoEventFd(bar, pos, req.data, count)
        e.virqfd = virqfd_enable(current, req.fd, lambda: self._ioeventfd_write(e), None, "VFIO_DEVICE_IOEVENTFD")
        self.ioeventfds.append(e)
        return 0

    def _ioeventfd_write(self, e: IoEventFd) -> None:
        """vfio_pci_ioeventfd_handler(): the write, dropped while memory decoding is off."""
        if not self.vconfig[PCI_COMMAND] & PCI_COMMAND_MEMORY:          # __vfio_pci_memory_enabled()
            return
        self.pdev.host_mmio_write(e.bar, e.pos, e.count, e.data & ((1 << 8 * e.count) - 1))

    @staticmethod
    def _s32(data: bytes, i: int = 0) -> int:
        return int.from_bytes(data[4 * i:4 * i + 4], "little", signed=True)

    def _intx_enable(self, trigger: EventFd | None) -> None:
        if self.irq_type != IRQ_NONE:
            raise fail(EINVAL, "another interrupt type is enabled; disable it first")
        self.irq_type = uapi.VFIO_PCI_INTX_IRQ_INDEX
        self.intx_trigger = trigger
        self.intx_masked = False
        self.pdev.on_intx = self._intx_handler
        if self.pdev.intx_level:
            self._intx_handler(1)

    def _intx_disable(self) -> None:
        if self.intx_unmask is not None:           # vfio_intx_disable(): vfio_virqfd_disable(&ctx->unmask)
            self.intx_unmask.disable()
            self.intx_unmask = None
        self.pdev.on_intx = None
        self.intx_trigger = None
        self.intx_masked = False
        self._set_hw_intx_disable(False)
        self.irq_type = IRQ_NONE

    def _set_hw_intx_disable(self, disable: bool) -> None:
        cfg = self.pdev.config
        cmd = cfg.read(PCI_COMMAND, 2)
        cmd = cmd | PCI_COMMAND_INTX_DISABLE if disable else cmd & ~PCI_COMMAND_INTX_DISABLE
        cfg.data[PCI_COMMAND:PCI_COMMAND + 2] = cmd.to_bytes(2, "little")

    def _intx_handler(self, level: int) -> None:
        """vfio_intx_handler(): mask at the device (DisINTx), then signal."""
        if self.intx_masked:
            return
        self.intx_masked = True
        self._set_hw_intx_disable(True)
        if self.intx_trigger is not None:
            self.intx_trigger.signal()

    def _intx_unmask_now(self) -> None:
        if self.irq_type != uapi.VFIO_PCI_INTX_IRQ_INDEX or not self.intx_masked:
            return
        self.intx_masked = False
        self._set_hw_intx_disable(False)
        if self.pdev.intx_level:                # still asserted: fires again
            self._intx_handler(1)

    def _intx_trigger(self, current: "Task", index: int, start: int, count: int, flags: int, data: bytes) -> int:
        is_intx = self.irq_type == uapi.VFIO_PCI_INTX_IRQ_INDEX
        if is_intx and not count and flags & uapi.VFIO_IRQ_SET_DATA_NONE:
            self._intx_disable()
            return 0
        if not (is_intx or self.irq_type == IRQ_NONE) or start != 0 or count != 1:
            raise fail(EINVAL, "VFIO_DEVICE_SET_IRQS: INTx takes start 0, count 1, with no other interrupt enabled")
        if flags & uapi.VFIO_IRQ_SET_DATA_EVENTFD:
            fd = self._s32(data)
            trigger = self._eventfd(current, fd) if fd >= 0 else None
            if is_intx:
                self.intx_trigger = trigger
            else:
                if not self.pdev.config.read(PCI_INTERRUPT_PIN, 1):
                    raise fail(ENODEV, "the device has no INTx pin")
                self._intx_enable(trigger)
            return 0
        if not is_intx:
            raise fail(EINVAL, "INTx is not enabled")
        if flags & uapi.VFIO_IRQ_SET_DATA_NONE or (flags & uapi.VFIO_IRQ_SET_DATA_BOOL and data[:1] != b"\0"):
            if self.intx_trigger is not None:
                self.intx_trigger.signal()      # loopback test
        return 0

    def _intx_mask(self, current: "Task", index: int, start: int, count: int, flags: int, data: bytes) -> int:
        if self.irq_type != uapi.VFIO_PCI_INTX_IRQ_INDEX or start != 0 or count != 1:
            raise fail(EINVAL, "VFIO_DEVICE_SET_IRQS: INTx is not enabled, or start/count are not 0/1")
        if flags & uapi.VFIO_IRQ_SET_DATA_NONE or (flags & uapi.VFIO_IRQ_SET_DATA_BOOL and data[:1] != b"\0"):
            if not self.intx_masked:
                self.intx_masked = True
                self._set_hw_intx_disable(True)
        elif flags & uapi.VFIO_IRQ_SET_DATA_EVENTFD:
            # vfio_pci_set_intx_mask(): "return -ENOTTY; /* XXX implement me */"
            raise fail(ENOTTY, "VFIO_DEVICE_SET_IRQS: masking INTx through an eventfd is not implemented (Linux neither)")
        return 0

    def _intx_unmask(self, current: "Task", index: int, start: int, count: int, flags: int, data: bytes) -> int:
        if self.irq_type != uapi.VFIO_PCI_INTX_IRQ_INDEX or start != 0 or count != 1:
            raise fail(EINVAL, "VFIO_DEVICE_SET_IRQS: INTx is not enabled, or start/count are not 0/1")
        if flags & uapi.VFIO_IRQ_SET_DATA_NONE or (flags & uapi.VFIO_IRQ_SET_DATA_BOOL and data[:1] != b"\0"):
            self._intx_unmask_now()
        elif flags & uapi.VFIO_IRQ_SET_DATA_EVENTFD:
            # vfio_pci_set_intx_unmask(): an eventfd that unmasks when signalled; a
            # negative fd unregisters it.
            fd = self._s32(data)
            if fd >= 0:
                self.intx_unmask = virqfd_enable(current, fd, self._intx_unmask_now, self.intx_unmask,
                                                 "VFIO_DEVICE_SET_IRQS (INTx unmask)")
            elif self.intx_unmask is not None:
                self.intx_unmask.disable()
                self.intx_unmask = None
        return 0

    # MSI and MSI-X share vfio_pci_set_msi_trigger() and what it calls.  Below them,
    # the host's PCI core (drivers/pci/msi/) programs the device: pci_alloc_irq_vectors(),
    # request_irq()/free_irq() (which unmask/mask an MSI-X vector), pci_free_irq_vectors().

    def _msi_trigger(self, current: "Task", index: int, start: int, count: int, flags: int, data: bytes) -> int:
        """vfio_pci_set_msi_trigger()"""
        msix = index == uapi.VFIO_PCI_MSIX_IRQ_INDEX
        if self.irq_type == index and not count and flags & uapi.VFIO_IRQ_SET_DATA_NONE:
            self._msi_disable(msix)
            return 0
        if not (self.irq_type == index or self.irq_type == IRQ_NONE):
            raise fail(EINVAL, f"VFIO_DEVICE_SET_IRQS: {self._irq_name(self.irq_type)} is enabled; disable it "
                               f"before using {self._irq_name(index)}")
        if flags & uapi.VFIO_IRQ_SET_DATA_EVENTFD:
            fds = [self._s32(data, i) for i in range(count)]
            if self.irq_type == index:
                return self._msi_set_block(current, start, count, fds, msix)
            ret = self._msi_enable(start + count, msix)
            if ret:
                return ret                 # fewer vectors than asked: their number (not an error)
            try:
                self._msi_set_block(current, start, count, fds, msix)
            except KernelError:
                self._msi_disable(msix)
                raise
            return 0
        if self.irq_type != index:
            raise fail(EINVAL, f"VFIO_DEVICE_SET_IRQS: {self._irq_name(index)} is not enabled")
        # DATA_NONE / DATA_BOOL: loopback, to the vectors that have a trigger.
        for i in range(start, start + count):
            trigger = self.msi_ctx.get(i)
            if trigger is None:
                continue
            if flags & uapi.VFIO_IRQ_SET_DATA_NONE or (flags & uapi.VFIO_IRQ_SET_DATA_BOOL
                                                       and data[i - start:i - start + 1] != b"\0"):
                trigger.signal()
        return 0

    @staticmethod
    def _irq_name(index: int) -> str:
        return {uapi.VFIO_PCI_INTX_IRQ_INDEX: "INTx", uapi.VFIO_PCI_MSI_IRQ_INDEX: "MSI",
                uapi.VFIO_PCI_MSIX_IRQ_INDEX: "MSI-X"}.get(index, f"IRQ index {index}")

    def _msi_enable(self, nvec: int, msix: bool) -> int:
        """vfio_msi_enable(): allocate ``nvec`` vectors; 0, or how many the host
        could allocate when fewer (a positive ioctl return, as upstream)."""
        if self.irq_type != IRQ_NONE:
            raise fail(EINVAL, "another interrupt type is enabled; disable it first")
        ret = self._pci_alloc_irq_vectors(1, nvec, msix)
        if ret < nvec:
            if ret > 0:
                self._pci_free_irq_vectors(msix)
            return ret
        self.irq_type = uapi.VFIO_PCI_MSIX_IRQ_INDEX if msix else uapi.VFIO_PCI_MSI_IRQ_INDEX
        return 0

    def _msi_set_block(self, current: "Task", start: int, count: int, fds: list[int] | None, msix: bool) -> int:
        """vfio_msi_set_block(): on a failure, vectors start..the failed one are
        released (even ones that had a trigger before), and the error returned."""
        j = start
        for i in range(count):
            j = start + i
            try:
                self._msi_set_vector_signal(current, j, fds[i] if fds else -1, msix)
            except KernelError:
                for v in range(start, j + 1):
                    self._msi_set_vector_signal(current, v, -1, msix)
                raise
        return 0

    def _msi_set_vector_signal(self, current: "Task", vector: int, fd: int, msix: bool) -> None:
        """vfio_msi_set_vector_signal()"""
        irq = False
        ctx = self.msi_ctx.pop(vector, None)
        if ctx is not None:
            irq = True
            self._free_irq(vector, msix)     # the interrupt stays allocated until MSI/MSI-X is disabled
        if fd < 0:
            return
        if not irq:
            self._msi_alloc_irq(vector, msix)
        trigger = self._eventfd(current, fd)
        if msix:
            # Refresh the on-device message (get_cached_msi_msg(), pci_write_msi_msg()):
            # it may have been cleared or overwritten since the host wrote it.
            self._pci_write_msi_msg(vector)
        # request_irq(): the handler is in place before the vector is unmasked, so
        # a message pending in the device's PBA is delivered to this trigger now.
        self.msi_ctx[vector] = trigger
        self._request_irq(vector, msix)

    def _msi_alloc_irq(self, vector: int, msix: bool) -> None:
        """vfio_msi_alloc_irq(): the vector's host interrupt, allocated now if
        MSI-X can grow while enabled (pci_msix_alloc_irq_at())."""
        if vector in self.msi_irqs:
            return
        if not msix or not self.has_dyn_msix:
            # pci_irq_vector(): -EINVAL for a vector that was not allocated at enable
            raise fail(EINVAL, f"VFIO_DEVICE_SET_IRQS: vector {vector} was not allocated when "
                               f"{self._irq_name(self.irq_type)} was enabled, and this host cannot add "
                               f"vectors later (NORESIZE)")
        self._msix_setup_desc(vector)

    def _msi_disable(self, msix: bool) -> None:
        """vfio_msi_disable()"""
        for vector in sorted(self.msi_ctx):
            self._msi_set_vector_signal(None, vector, -1, msix)  # type: ignore[arg-type]
        self._pci_free_irq_vectors(msix)
        self.irq_type = IRQ_NONE

    # -- the host's PCI MSI core, as far as the device sees it -----------------------------------------

    def _pci_alloc_irq_vectors(self, min_vecs: int, max_vecs: int, msix: bool) -> int:
        """pci_alloc_irq_vectors(pdev, min, max, PCI_IRQ_MSIX or PCI_IRQ_MSI):
        the number of vectors allocated, or KernelError."""
        p = self.pdev
        if msix:
            # __pci_enable_msix_range()
            if max_vecs < min_vecs:
                raise fail(ERANGE, f"pci_alloc_irq_vectors({min_vecs}, {max_vecs}): no vectors asked for")
            if p.msi_enabled():
                raise fail(EINVAL, f"{p.bdf}: can't enable MSI-X (MSI already enabled)")
            nvec = min(max_vecs, self.irq_count(uapi.VFIO_PCI_MSIX_IRQ_INDEX))
            self._msix_capability_init(nvec)
            return nvec
        # __pci_enable_msi_range()
        if p.msix_enabled():
            raise fail(EINVAL, f"{p.bdf}: can't enable MSI (MSI-X already enabled)")
        if max_vecs < min_vecs:
            raise fail(ERANGE, f"pci_alloc_irq_vectors({min_vecs}, {max_vecs}): no vectors asked for")
        msi = p.config.find_capability(PCI_CAP_ID_MSI)
        if not msi:
            raise fail(EINVAL, "the device has no MSI capability")
        nvec = min(max_vecs, self.irq_count(uapi.VFIO_PCI_MSI_IRQ_INDEX))
        flags = p.config.read(msi + PCI_MSI_FLAGS, 2)
        p.config.data[msi + PCI_MSI_FLAGS:msi + PCI_MSI_FLAGS + 2] = \
            (flags | PCI_MSI_FLAGS_ENABLE).to_bytes(2, "little")
        self._set_hw_intx_disable(True)          # pci_intx_for_msi(dev, 0)
        self.msi_irqs = {v: None for v in range(nvec)}
        p.on_msi = self._msi_handler
        return nvec

    def _msix_capability_init(self, nvec: int) -> None:
        """msix_capability_init(): enable with the function masked, set up the
        vectors' messages, mask every table entry, then unmask the function."""
        p = self.pdev
        p.msix_host_set_control(0, PCI_MSIX_FLAGS_ENABLE)
        p.msix_host_set_control(PCI_MSIX_FLAGS_MASKALL | PCI_MSIX_FLAGS_ENABLE)
        p.on_msix = self._msix_handler
        for vector in range(nvec):
            self._msix_setup_desc(vector)
        self._set_hw_intx_disable(True)          # pci_intx_for_msi(dev, 0)
        assert p.msix is not None
        for vector in range(p.msix.vectors):     # msix_mask_all()
            p.msix_table_write(vector * PCI_MSIX_ENTRY_SIZE + PCI_MSIX_ENTRY_VECTOR_CTRL, 4,
                               PCI_MSIX_ENTRY_CTRL_MASKBIT)
        p.msix_host_set_control(0, PCI_MSIX_FLAGS_MASKALL)

    def _msix_setup_desc(self, vector: int) -> None:
        """msix_prepare_msi_desc() (the cached control word is read from the
        device) and the message write of the interrupt's activation."""
        p = self.pdev
        assert p.msix is not None
        self.msi_irqs[vector] = MsiDesc(MSIX_HOST_MSG_ADDRESS, MSIX_HOST_MSG_DATA_BASE + vector,
                                        p.msix.ctrl(vector))
        self._pci_write_msi_msg(vector)

    def _msix_write_ctrl(self, vector: int, ctrl: int) -> None:
        """pci_msix_write_vector_ctrl()"""
        self.pdev.msix_table_write(vector * PCI_MSIX_ENTRY_SIZE + PCI_MSIX_ENTRY_VECTOR_CTRL, 4, ctrl)

    def _pci_write_msi_msg(self, vector: int) -> None:
        """__pci_write_msi_msg() for MSI-X: the entry is masked while its message changes."""
        desc = self.msi_irqs[vector]
        assert desc is not None
        unmasked = not desc.ctrl & PCI_MSIX_ENTRY_CTRL_MASKBIT
        if unmasked:
            self._msix_write_ctrl(vector, desc.ctrl | PCI_MSIX_ENTRY_CTRL_MASKBIT)
        base = vector * PCI_MSIX_ENTRY_SIZE
        self.pdev.msix_table_write(base + PCI_MSIX_ENTRY_LOWER_ADDR, 4, desc.address & 0xFFFFFFFF)
        self.pdev.msix_table_write(base + PCI_MSIX_ENTRY_UPPER_ADDR, 4, desc.address >> 32)
        self.pdev.msix_table_write(base + PCI_MSIX_ENTRY_DATA, 4, desc.data)
        if unmasked:
            self._msix_write_ctrl(vector, desc.ctrl)

    def _request_irq(self, vector: int, msix: bool) -> None:
        """request_irq(): starting the interrupt unmasks an MSI-X vector (pci_msix_unmask())."""
        desc = self.msi_irqs[vector]
        if msix and desc is not None:
            desc.ctrl &= ~PCI_MSIX_ENTRY_CTRL_MASKBIT
            self._msix_write_ctrl(vector, desc.ctrl)

    def _free_irq(self, vector: int, msix: bool) -> None:
        """free_irq(): shutting the interrupt down masks an MSI-X vector (pci_msix_mask())."""
        desc = self.msi_irqs.get(vector)
        if msix and desc is not None:
            desc.ctrl |= PCI_MSIX_ENTRY_CTRL_MASKBIT
            self._msix_write_ctrl(vector, desc.ctrl)

    def _pci_free_irq_vectors(self, msix: bool) -> None:
        """pci_free_irq_vectors(): pci_msix_shutdown() masks every allocated vector
        and clears MSI-X Enable (pci_msi_shutdown() clears MSI Enable); INTx is
        allowed again (pci_intx_for_msi(dev, 1)).  The table keeps its messages."""
        p = self.pdev
        if msix:
            for vector, desc in self.msi_irqs.items():
                assert desc is not None
                desc.ctrl |= PCI_MSIX_ENTRY_CTRL_MASKBIT
                self._msix_write_ctrl(vector, desc.ctrl)
            p.msix_host_set_control(0, PCI_MSIX_FLAGS_ENABLE)
            p.on_msix = None
        else:
            msi = p.config.find_capability(PCI_CAP_ID_MSI)
            if msi:
                flags = p.config.read(msi + PCI_MSI_FLAGS, 2) & ~PCI_MSI_FLAGS_ENABLE
                p.config.data[msi + PCI_MSI_FLAGS:msi + PCI_MSI_FLAGS + 2] = flags.to_bytes(2, "little")
            p.on_msi = None
        self._set_hw_intx_disable(False)
        self.msi_irqs = {}

    def _restore_msi_state(self) -> None:
        """pci_restore_msi_state() after a reset: __pci_restore_msi_state() turns
        MSI back on; __pci_restore_msix_state() enables MSI-X with the function
        masked, rewrites every allocated vector's message and control word, then
        unmasks the function.  What the device had pending is lost with the reset."""
        p = self.pdev
        if self.irq_type == uapi.VFIO_PCI_MSI_IRQ_INDEX:
            msi = p.config.find_capability(PCI_CAP_ID_MSI)
            flags = p.config.read(msi + PCI_MSI_FLAGS, 2) | PCI_MSI_FLAGS_ENABLE
            p.config.data[msi + PCI_MSI_FLAGS:msi + PCI_MSI_FLAGS + 2] = flags.to_bytes(2, "little")
            self._set_hw_intx_disable(True)
        elif self.irq_type == uapi.VFIO_PCI_MSIX_IRQ_INDEX:
            self._set_hw_intx_disable(True)
            p.msix_host_set_control(PCI_MSIX_FLAGS_ENABLE | PCI_MSIX_FLAGS_MASKALL)
            for vector, desc in self.msi_irqs.items():
                assert desc is not None
                self._pci_write_msi_msg(vector)
                self._msix_write_ctrl(vector, desc.ctrl)
            p.msix_host_set_control(0, PCI_MSIX_FLAGS_MASKALL)

    # -- interrupt handlers --------------------------------------------------------------------------------

    def _msi_handler(self, vector: int) -> None:
        """vfio_msihandler() for an MSI vector."""
        if vector in self.msi_irqs:
            trigger = self.msi_ctx.get(vector)
            if trigger is not None:
                trigger.signal()

    def _msix_handler(self, address: int, data: int) -> None:
        """An MSI-X message from the device: the host interrupt it names, then
        vfio_msihandler() signals that vector's trigger."""
        vector = data - MSIX_HOST_MSG_DATA_BASE
        desc = self.msi_irqs.get(vector)
        if address != MSIX_HOST_MSG_ADDRESS or desc is None or desc.data != data:
            self.log.warn(f"vfio-pci {self.pdev.bdf}: MSI-X message {data:#x} to {address:#x} is no "
                          f"interrupt of the host: dropped")
            return
        trigger = self.msi_ctx.get(vector)
        if trigger is None:
            # An interrupt with no handler (the user unmasked the entry through an
            # mmap of the table): the flow handler masks it again.
            desc.ctrl |= PCI_MSIX_ENTRY_CTRL_MASKBIT
            self._msix_write_ctrl(vector, desc.ctrl)
            return
        trigger.signal()

    def _req_trigger(self, current: "Task", index: int, start: int, count: int, flags: int, data: bytes) -> int:
        """vfio_pci_set_ctx_trigger_single()"""
        if flags & uapi.VFIO_IRQ_SET_DATA_NONE:
            if self.req_trigger is not None:
                if count:
                    self.req_trigger.signal()
                else:
                    self.req_trigger = None
            return 0
        if flags & uapi.VFIO_IRQ_SET_DATA_BOOL:
            if not count:
                raise fail(EINVAL, "count must be 1")
            if data[:1] != b"\0" and self.req_trigger is not None:
                self.req_trigger.signal()
            return 0
        if not count:
            raise fail(EINVAL, "count must be 1")
        fd = self._s32(data)
        if fd == -1:
            self.req_trigger = None
        elif fd >= 0:
            self.req_trigger = self._eventfd(current, fd)
        return 0

    def _disable_irqs(self) -> None:
        """vfio_pci_core_disable(): vfio_pci_set_irqs_ioctl(DATA_NONE | ACTION_TRIGGER,
        irq_type, 0, 0) turns off whatever is enabled."""
        if self.irq_type == uapi.VFIO_PCI_INTX_IRQ_INDEX:
            self._intx_disable()
        elif self.irq_type == uapi.VFIO_PCI_MSI_IRQ_INDEX:
            self._msi_disable(False)
        elif self.irq_type == uapi.VFIO_PCI_MSIX_IRQ_INDEX:
            self._msi_disable(True)
