"""vfio-pci: PCI devices through VFIO (drivers/vfio/pci/vfio_pci_core.c,
vfio_pci_config.c, vfio_pci_rdwr.c, vfio_pci_intrs.c).

Regions are reached at ``index << 40`` in the device fd: BAR0-5, ROM,
config space, VGA.  Config space is partly virtualized (IDs, BARs, the
capability chain and MSI are kept by vfio-pci; the rest reaches the
device).  Interrupts are delivered by signalling the eventfds a user
registers with VFIO_DEVICE_SET_IRQS; INTx is automasked until unmasked.
"""

from __future__ import annotations

import ctypes
from errno import EBADF, EFAULT, EINVAL, EIO, ENODEV, ENOSPC, ENOTTY, EPERM
from typing import TYPE_CHECKING

from ...uapi import vfio as uapi
from ..errors import KernelError, fail
from ..eventfd import EventFd
from ..pci.config import (PCI_BASE_ADDRESS_0, PCI_CAP_ID_MSI, PCI_CAPABILITY_LIST, PCI_COMMAND,
                          PCI_COMMAND_INTX_DISABLE, PCI_COMMAND_MASTER, PCI_COMMAND_MEMORY, PCI_DEVICE_ID,
                          PCI_INTERRUPT_LINE, PCI_INTERRUPT_PIN, PCI_MSI_FLAGS, PCI_MSI_FLAGS_64BIT,
                          PCI_MSI_FLAGS_ENABLE, PCI_MSI_FLAGS_QMASK, PCI_ROM_ADDRESS, PCI_STATUS,
                          PCI_STATUS_CAP_LIST, PCI_VENDOR_ID)
from ..pci.device import PciDevice
from ..uaccess import copy_from_user, copy_struct_from_user, copy_struct_to_user, copy_to_user
from .device import VfioDeviceOps

if TYPE_CHECKING:
    from ..task import Task

VFIO_PCI_OFFSET_SHIFT = 40
VFIO_PCI_OFFSET_MASK = (1 << VFIO_PCI_OFFSET_SHIFT) - 1

IRQ_NONE = -1


def region_offset(index: int) -> int:
    """VFIO_PCI_INDEX_TO_OFFSET()"""
    return index << VFIO_PCI_OFFSET_SHIFT


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
        self.msi_triggers: list[EventFd | None] = []
        self.req_trigger: EventFd | None = None
        self.enabled = False

    # -- open / close (vfio_pci_core_enable / _disable) -------------------------------------

    def open_device(self, current: "Task") -> None:
        p = self.pdev
        # pci_clear_master(), pci_enable_device(), then a reset when possible.
        cmd = p.config.read(PCI_COMMAND, 2)
        p.config.data[PCI_COMMAND:PCI_COMMAND + 2] = ((cmd & ~PCI_COMMAND_MASTER) | PCI_COMMAND_MEMORY).to_bytes(2, "little")
        if self.reset_works:
            self._reset_device()
        self._config_init()
        self.enabled = True

    def close_device(self, current: "Task") -> None:
        self._disable_irqs()
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
        # pci_restore_state(): config space comes back as it was saved.
        self.pdev.config.data[PCI_COMMAND:PCI_COMMAND + 2] = cmd.to_bytes(2, "little")

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
        b = self.pdev.bars.get(bar)
        if b is None:
            raise fail(EINVAL, f"BAR{bar} is not implemented by {self.pdev.bdf}")
        if pos >= b.size:
            raise fail(EINVAL, f"offset {pos:#x} is beyond BAR{bar} ({b.size:#x} bytes)")
        count = min(count, b.size - pos)
        if not self.vconfig[PCI_COMMAND] & PCI_COMMAND_MEMORY:
            raise fail(EIO, f"memory decoding is disabled in the device's COMMAND register")
        out = bytearray()
        done = 0
        while done < count:
            at = pos + done
            left = count - done
            n = 8 if left >= 8 and at % 8 == 0 else 4 if left >= 4 and at % 4 == 0 else \
                2 if left >= 2 and at % 2 == 0 else 1
            if data is None:
                out += self.pdev.host_mmio_read(bar, at, n).to_bytes(n, "little")
            else:
                self.pdev.host_mmio_write(bar, at, n, int.from_bytes(data[done:done + n], "little"))
            done += n
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
        if index == uapi.VFIO_PCI_CONFIG_REGION_INDEX:
            info.offset, info.size, info.flags = region_offset(index), self.pdev.config.size, R | W
        elif index <= uapi.VFIO_PCI_BAR5_REGION_INDEX:
            info.offset = region_offset(index)
            bar = self.pdev.bars.get(index)
            info.size = bar.size if bar else 0
            info.flags = 0 if not bar else R | W | (M if bar.mmap_ok and bar.size >= current.mm.page_size else 0)
        elif index == uapi.VFIO_PCI_ROM_REGION_INDEX:
            info.offset, info.size, info.flags = region_offset(index), 0, 0
        elif index == uapi.VFIO_PCI_VGA_REGION_INDEX:
            raise fail(EINVAL, f"{self.pdev.bdf} is not a VGA device")
        else:
            raise fail(EINVAL, f"region index {index} does not exist "
                               f"({uapi.VFIO_PCI_NUM_REGIONS + self.num_regions} regions)")
        info.cap_offset = 0
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
        else:
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
        out = bytearray()
        for dev in devices:
            if dev.iommu_group is None:
                raise fail(EPERM, f"{dev.bdf} is in no IOMMU group: it cannot be reset from userspace")
            out += bytes(uapi.vfio_pci_dependent_device(group_id=dev.iommu_group.id, segment=dev.domain,
                                                        bus=dev.bus, devfn=(dev.slot << 3) | dev.function))
        copy_to_user(current, arg + ctypes.sizeof(cls), bytes(out))
        hdr.count = count
        copy_struct_to_user(current, arg, hdr, minsz)
        return 0

    def _pci_hot_reset(self, current: "Task", arg: int) -> int:
        """vfio_pci_ioctl_pci_hot_reset() with a group fd array (the group interface;
        a zero count is for cdev-opened devices, which vfiosim does not have)."""
        from .group import GroupFile
        cls = uapi.vfio_pci_hot_reset
        minsz = uapi.offsetofend(cls, "count")
        hdr = copy_struct_from_user(current, arg, cls, minsz)
        if hdr.argsz < minsz or hdr.flags:
            raise fail(EINVAL, f"VFIO_DEVICE_PCI_HOT_RESET: argsz {hdr.argsz} (need {minsz}) or flags {hdr.flags:#x}")
        if not hdr.count:
            raise fail(EINVAL, "VFIO_DEVICE_PCI_HOT_RESET: a device opened through its group needs a group fd array")
        devices = self._reset_domain()
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
        """eventfd_ctx_fdget()"""
        try:
            file = current.files.get(fd)
        except KernelError:
            raise fail(EBADF, f"VFIO_DEVICE_SET_IRQS: fd {fd} is not open") from None
        if not isinstance(file, EventFd):
            raise fail(EINVAL, f"VFIO_DEVICE_SET_IRQS: fd {fd} is a {file.kind}, not an eventfd")
        return file

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
            raise fail(EINVAL, "masking INTx through an eventfd is not supported")
        return 0

    def _intx_unmask(self, current: "Task", index: int, start: int, count: int, flags: int, data: bytes) -> int:
        if self.irq_type != uapi.VFIO_PCI_INTX_IRQ_INDEX or start != 0 or count != 1:
            raise fail(EINVAL, "VFIO_DEVICE_SET_IRQS: INTx is not enabled, or start/count are not 0/1")
        if flags & uapi.VFIO_IRQ_SET_DATA_NONE or (flags & uapi.VFIO_IRQ_SET_DATA_BOOL and data[:1] != b"\0"):
            self._intx_unmask_now()
        elif flags & uapi.VFIO_IRQ_SET_DATA_EVENTFD:
            fd = self._s32(data)
            if fd >= 0:
                self._eventfd(current, fd).waiters.append(lambda _efd: self._intx_unmask_now())
        return 0

    def _msi_enable(self, nvec: int) -> None:
        if self.irq_type != IRQ_NONE:
            raise fail(EINVAL, "another interrupt type is enabled; disable it first")
        msi = self.pdev.config.find_capability(PCI_CAP_ID_MSI)
        if not msi:
            raise fail(EINVAL, "the device has no MSI capability")
        flags = self.pdev.config.read(msi + PCI_MSI_FLAGS, 2)
        self.pdev.config.data[msi + PCI_MSI_FLAGS:msi + PCI_MSI_FLAGS + 2] = \
            (flags | PCI_MSI_FLAGS_ENABLE).to_bytes(2, "little")
        self.irq_type = uapi.VFIO_PCI_MSI_IRQ_INDEX
        self.msi_triggers = [None] * nvec
        self.pdev.on_msi = self._msi_handler

    def _msi_disable(self) -> None:
        msi = self.pdev.config.find_capability(PCI_CAP_ID_MSI)
        if msi:
            flags = self.pdev.config.read(msi + PCI_MSI_FLAGS, 2) & ~PCI_MSI_FLAGS_ENABLE
            self.pdev.config.data[msi + PCI_MSI_FLAGS:msi + PCI_MSI_FLAGS + 2] = flags.to_bytes(2, "little")
        self.pdev.on_msi = None
        self.msi_triggers = []
        self.irq_type = IRQ_NONE

    def _msi_handler(self, vector: int) -> None:
        if 0 <= vector < len(self.msi_triggers) and self.msi_triggers[vector] is not None:
            self.msi_triggers[vector].signal()

    def _msi_trigger(self, current: "Task", index: int, start: int, count: int, flags: int, data: bytes) -> int:
        if index == uapi.VFIO_PCI_MSIX_IRQ_INDEX:
            raise fail(EINVAL, "the device has no MSI-X")
        is_msi = self.irq_type == index
        if is_msi and not count and flags & uapi.VFIO_IRQ_SET_DATA_NONE:
            self._msi_disable()
            return 0
        if not (is_msi or self.irq_type == IRQ_NONE):
            raise fail(EINVAL, "another interrupt type is enabled; disable it first")
        if flags & uapi.VFIO_IRQ_SET_DATA_EVENTFD:
            fds = [self._s32(data, i) for i in range(count)]
            triggers = [self._eventfd(current, fd) if fd >= 0 else None for fd in fds]
            if not is_msi:
                self._msi_enable(start + count)
            for i, trig in enumerate(triggers):
                if start + i < len(self.msi_triggers):
                    self.msi_triggers[start + i] = trig
            return 0
        if not is_msi:
            raise fail(EINVAL, "MSI is not enabled")
        for i in range(start, start + count):
            trig = self.msi_triggers[i] if i < len(self.msi_triggers) else None
            if trig is None:
                continue
            if flags & uapi.VFIO_IRQ_SET_DATA_NONE or (flags & uapi.VFIO_IRQ_SET_DATA_BOOL and data[i - start:i - start + 1] != b"\0"):
                trig.signal()
        return 0

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
        if self.irq_type == uapi.VFIO_PCI_INTX_IRQ_INDEX:
            self._intx_disable()
        elif self.irq_type == uapi.VFIO_PCI_MSI_IRQ_INDEX:
            self._msi_disable()
