"""vfio-pci's core (drivers/vfio/pci/vfio_pci_core.c, Linux 6.12): the device
an open VFIO device fd drives, its enable and disable, its regions and
ioctls.  Config space, BAR access and interrupts are in the files upstream
keeps them in: vfio_pci_config.py, vfio_pci_rdwr.py, vfio_pci_intrs.py.

Regions are reached at ``index << 40`` in the device fd: BAR0-5, ROM,
config space, VGA.
"""

from __future__ import annotations

import ctypes
from errno import EBADF, EFAULT, EINVAL, EIO, ENODEV, ENOENT, ENOSPC, ENOTTY, EPERM
from typing import TYPE_CHECKING, Callable

from ....uapi import vfio as uapi
from ...deviations import deviation
from ...errors import KernelError, fail
from ...eventfd import EventFd, eventfd_ctx_fdget
from ...log import KernelLog
from ...pci.config import (PCI_CAP_ID_MSI, PCI_CAP_ID_MSIX, PCI_COMMAND, PCI_COMMAND_MASTER, PCI_COMMAND_MEMORY,
                           PCI_INTERRUPT_PIN, PCI_MSI_FLAGS, PCI_MSI_FLAGS_QMASK, PCI_MSIX_FLAGS,
                           PCI_MSIX_FLAGS_QSIZE, PCI_MSIX_TABLE, PCI_MSIX_TABLE_BIR, PCI_MSIX_TABLE_OFFSET)
from ...pci.device import PciDevice
from ...pci.msi import PciMsi
from ...uaccess import copy_from_user, copy_struct_from_user, copy_struct_to_user, copy_to_user
from ..device import VfioDeviceOps
from ..info_cap import info_cap_add, info_cap_shift
from ..virqfd import Virqfd
from .vfio_pci_config import vfio_config_init, vfio_pci_config_rw, vfio_pci_memory_enabled
from .vfio_pci_intrs import IRQ_NONE, vfio_pci_disable_irqs, vfio_pci_set_irqs_ioctl
from .vfio_pci_priv import VFIO_PCI_OFFSET_MASK, VFIO_PCI_OFFSET_SHIFT, region_offset
from .vfio_pci_rdwr import IoEventFd, vfio_pci_bar_rw, vfio_pci_ioeventfd

if TYPE_CHECKING:
    from ...mm import PhysicalPages
    from ...task import Task


def _check_feature(flags: int, argsz: int, supported_ops: int, minsz: int) -> int:
    """vfio_check_feature() (include/linux/vfio.h): 1 to do it, 0 for a probe."""
    if flags & (uapi.VFIO_DEVICE_FEATURE_GET | uapi.VFIO_DEVICE_FEATURE_SET) & ~supported_ops:
        get_refused = flags & uapi.VFIO_DEVICE_FEATURE_GET and not supported_ops & uapi.VFIO_DEVICE_FEATURE_GET
        raise fail(EINVAL, f"VFIO_DEVICE_FEATURE: this feature does not support {'GET' if get_refused else 'SET'}")
    if flags & uapi.VFIO_DEVICE_FEATURE_PROBE:
        return 0
    if not flags & (uapi.VFIO_DEVICE_FEATURE_GET | uapi.VFIO_DEVICE_FEATURE_SET):
        raise fail(EINVAL, "VFIO_DEVICE_FEATURE: neither GET nor SET without PROBE")
    if argsz < minsz:
        raise fail(EINVAL, f"VFIO_DEVICE_FEATURE: argsz {argsz} too small for the feature's {minsz} bytes")
    return 1


class VfioPciDevice(VfioDeviceOps):
    """``struct vfio_pci_core_device`` for one PCI function."""

    name = "vfio-pci"

    def __init__(self, pdev: PciDevice, log: KernelLog) -> None:
        self.pdev = pdev
        self.log = log
        self.reset_works = pdev.reset_method is not None
        self.num_regions = 0                  # device-specific regions beyond VGA
        self.vconfig = bytearray(pdev.config.size)
        self.virt = bytearray(pdev.config.size)     # per-byte: virtualized bits
        self.vwrite = bytearray(pdev.config.size)   # per-byte: writable bits
        # Interrupts (vfio_pci_intrs.py): the index enabled, INTx state, and
        # vdev->ctx (an xarray in 6.12): MSI/MSI-X vector -> its trigger.
        self.irq_type = IRQ_NONE
        self.intx_trigger: EventFd | None = None
        self.intx_masked = False
        self.intx_unmask: Virqfd | None = None      # ctx->unmask: an eventfd that unmasks INTx
        self.ioeventfds: list[IoEventFd] = []
        self.msi_ctx: dict[int, EventFd] = {}
        # The host PCI core's MSI/MSI-X vectors of the device (drivers/pci/msi/).
        self.msi = PciMsi(pdev, log.warn)
        self.req_trigger: EventFd | None = None
        self.enabled = False
        # VFIO_DEVICE_FEATURE_LOW_POWER_ENTRY(_WITH_WAKEUP) taken and not yet left
        # (vdev->pm_runtime_engaged, vdev->pm_wake_eventfd_ctx).
        self.pm_runtime_engaged = False
        self.pm_wake_eventfd: EventFd | None = None
        # Set by vfio_pci_core_enable() from the MSI-X capability.
        self.msix_bar = 0xFF
        self.msix_offset = 0
        self.msix_size = 0
        self.has_dyn_msix = False

    @property
    def msi_triggers(self) -> list[EventFd]:
        """The eventfds MSI or MSI-X vectors signal (the transport keeps them open)."""
        return list(self.msi_ctx.values())

    def eventfds(self) -> list[EventFd]:
        return [e for e in (self.intx_trigger, self.req_trigger, *self.msi_ctx.values()) if e is not None]

    def physical_device(self) -> PciDevice:
        return self.pdev

    def open_device(self, current: "Task") -> None:
        p = self.pdev
        # pci_clear_master(), pci_enable_device(), then a reset when possible.
        cmd = p.config.read(PCI_COMMAND, 2)
        p.host_config_write(PCI_COMMAND, 2, (cmd & ~PCI_COMMAND_MASTER) | PCI_COMMAND_MEMORY)
        if self.reset_works:
            self._reset_device()
        vfio_config_init(self)
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
        self._pm_exit()                      # vfio_pci_core_disable() leaves low power first
        vfio_pci_disable_irqs(self)
        # vfio_pci_core_disable(): the ioeventfds go with the device.
        for ioeventfd in self.ioeventfds:
            assert ioeventfd.virqfd is not None
            ioeventfd.virqfd.disable()
        self.ioeventfds = []
        self.req_trigger = None
        p = self.pdev
        cmd = p.config.read(PCI_COMMAND, 2) & ~PCI_COMMAND_MASTER
        p.host_config_write(PCI_COMMAND, 2, cmd)
        if self.reset_works:
            self._reset_device()
        self.enabled = False

    def _reset_device(self) -> None:
        cmd = self.pdev.config.read(PCI_COMMAND, 2)
        self.pdev.reset()
        # pci_restore_state(): config space comes back as it was saved, and
        # pci_restore_msi_state() re-enables the MSI or MSI-X the host set up.
        self.pdev.host_config_write(PCI_COMMAND, 2, cmd)
        self.msi.restore_state()

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

    def mmap_pages(self, offset: int) -> "tuple[PhysicalPages, int]":
        """What vfio_pci_core_mmap()'s mapping points at: the BAR's own pages
        (vma->vm_pgoff becomes the BAR's pfn plus the offset; the fault
        handler inserts those pfns: VM_IO | VM_PFNMAP)."""
        return self.pdev.bar_memory(offset >> VFIO_PCI_OFFSET_SHIFT), offset & VFIO_PCI_OFFSET_MASK

    def mmap_fault(self, current: "Task", offset: int, write: bool) -> None:
        """vfio_pci_mmap_huge_fault(): VM_FAULT_SIGBUS while the device is in
        low power or its memory decoding is off (the BAR mappings were zapped)."""
        if self.pm_runtime_engaged or not vfio_pci_memory_enabled(self):
            raise fail(EFAULT, f"{self.pdev.bdf}: the BAR mapping faults (memory decoding is off or the device "
                               f"is in low power): vfio_pci_mmap_huge_fault() answers VM_FAULT_SIGBUS")

    def mmio(self, current: "Task", offset: int, size: int, value: int | None) -> int:
        """A CPU load or store through a BAR mapping: straight to the device."""
        index = offset >> VFIO_PCI_OFFSET_SHIFT
        off = offset & VFIO_PCI_OFFSET_MASK
        bar = self.pdev.bars.get(index)
        if bar is None or off + size > bar.size:
            raise fail(EFAULT, f"access {off:#x}+{size} outside BAR{index}")
        if not vfio_pci_memory_enabled(self):
            # vfio-pci zaps BAR mappings while memory decode is off: SIGBUS.
            raise fail(EIO, "memory decoding is disabled: the mapping faults")
        if value is None:
            return self.pdev.host_mmio_read(index, off, size)
        self.pdev.host_mmio_write(index, off, size, value)
        return 0

    def _in_bar(self, offset: int, size: int) -> tuple[int, int] | None:
        """(BAR index, offset in it) of an access of ``size`` at region offset
        ``offset`` that lies inside a BAR; None otherwise (the shortcuts' bounds)."""
        index = offset >> VFIO_PCI_OFFSET_SHIFT
        off = offset & VFIO_PCI_OFFSET_MASK
        bar = self.pdev.bars.get(index)
        return None if bar is None or off + size > bar.size else (index, off)

    def mmio_store_fn(self, offset: int, size: int) -> Callable[[int], bool] | None:
        """mmio()'s store where the device offers a shortcut: the BAR's bounds
        are fixed, memory decoding is checked on each store (off: False, and
        mmio() faults)."""
        where = self._in_bar(offset, size)
        store = None if where is None else self.pdev.host_store_fn(*where, size)
        if store is None:
            return None

        def mmio_store(value: int) -> bool:
            if not self.vconfig[PCI_COMMAND] & PCI_COMMAND_MEMORY:     # vfio_pci_memory_enabled(), inline
                return False
            store(value)
            return True
        return mmio_store

    def mmio_load_fn(self, offset: int, size: int) -> Callable[[], int | None] | None:
        """mmio()'s load where the device offers a shortcut: the value, or
        None while memory decoding is off (mmio() faults)."""
        where = self._in_bar(offset, size)
        load = None if where is None else self.pdev.host_load_fn(*where, size)
        if load is None:
            return None

        def mmio_load() -> int | None:
            if not self.vconfig[PCI_COMMAND] & PCI_COMMAND_MEMORY:
                return None
            return load()
        return mmio_load

    def mmap_posted_writes(self, offset: int, length: int) -> list[tuple[int, int, bool]]:
        index = offset >> VFIO_PCI_OFFSET_SHIFT
        base = offset & VFIO_PCI_OFFSET_MASK
        out = []
        for ranges, effect in ((self.pdev.posted_write_ranges(index), False),
                               (self.pdev.doorbell_ranges(index), True)):
            for off, n in ranges:
                lo, hi = max(off, base), min(off + n, base + length)
                if lo < hi:
                    out.append((lo - base, hi - lo, effect))
        return sorted(out)

    def mmap_live(self) -> bool:
        return vfio_pci_memory_enabled(self) and self.pdev.mmio_enabled_by_platform()

    def mmap_live_check(self) -> Callable[[], bool]:
        vconfig, pdev = self.vconfig, self.pdev       # (vconfig is only ever changed in place)

        def live() -> bool:                           # mmap_live(), two frames fewer
            return bool(vconfig[PCI_COMMAND] & PCI_COMMAND_MEMORY) and pdev.mmio_enabled_by_platform()
        return live

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
            return vfio_pci_config_rw(self, off, count, data)
        if index == uapi.VFIO_PCI_ROM_REGION_INDEX:
            if data is not None:
                raise fail(EINVAL, "the ROM region is read-only")
            raise fail(EINVAL, f"{self.pdev.bdf} has no ROM")
        if index <= uapi.VFIO_PCI_BAR5_REGION_INDEX:
            return vfio_pci_bar_rw(self, index, off, count, data)
        if index == uapi.VFIO_PCI_VGA_REGION_INDEX:
            raise fail(EINVAL, f"{self.pdev.bdf} is not a VGA device")
        raise fail(EINVAL, f"region index {index} does not exist")

    # -- VFIO_DEVICE_FEATURE (vfio_pci_core_ioctl_feature) ------------------------------------------

    def device_feature(self, current: "Task", flags: int, arg: int, argsz: int) -> int:
        """vfio_pci_core_ioctl_feature(): the low-power features; the VF token only for
        an SR-IOV PF (none is modelled: ENOTTY, as for any other feature)."""
        which = flags & uapi.VFIO_DEVICE_FEATURE_MASK
        if which == uapi.VFIO_DEVICE_FEATURE_LOW_POWER_ENTRY:
            if _check_feature(flags, argsz, uapi.VFIO_DEVICE_FEATURE_SET, 0) != 1:
                return 0
            return self._pm_entry(None)
        if which == uapi.VFIO_DEVICE_FEATURE_LOW_POWER_ENTRY_WITH_WAKEUP:
            cls = uapi.vfio_device_low_power_entry_with_wakeup
            if _check_feature(flags, argsz, uapi.VFIO_DEVICE_FEATURE_SET, ctypes.sizeof(cls)) != 1:
                return 0
            entry = cls.from_buffer_copy(copy_from_user(current, arg, ctypes.sizeof(cls)))
            if entry.wakeup_eventfd < 0:
                raise fail(EINVAL, f"LOW_POWER_ENTRY_WITH_WAKEUP: wakeup_eventfd {entry.wakeup_eventfd}")
            return self._pm_entry(eventfd_ctx_fdget(current, entry.wakeup_eventfd, "LOW_POWER_ENTRY_WITH_WAKEUP"))
        if which == uapi.VFIO_DEVICE_FEATURE_LOW_POWER_EXIT:
            if _check_feature(flags, argsz, uapi.VFIO_DEVICE_FEATURE_SET, 0) != 1:
                return 0
            self._pm_exit()
            return 0
        raise fail(ENOTTY, f"device feature {which} is not supported by vfio-pci for {self.pdev.bdf}")

    def _pm_entry(self, wake: EventFd | None) -> int:
        """vfio_pci_runtime_pm_entry(): once; the device may then suspend (vfiosim keeps
        it in D0)."""
        if self.pm_runtime_engaged:
            raise fail(EINVAL, "the device is already in the low power state")
        self.pm_runtime_engaged = True
        self.pm_wake_eventfd = wake
        self.log.info(deviation("10", bdf=self.pdev.bdf))
        return 0

    def _pm_exit(self) -> None:
        """__vfio_pci_runtime_pm_exit()"""
        self.pm_runtime_engaged = False
        self.pm_wake_eventfd = None

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
        vfio_config_init(self)
        return 0

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
        from ..iommufd import vfio_iommufd_device_ictx, vfio_iommufd_get_dev_id
        assert self.vdev is not None
        ictx = vfio_iommufd_device_ictx(self.vdev)
        other = next((d for d in self.vdev.group.vfio.devices if d.ops.physical_device() is dev), None)
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
        from ..group import GroupFile
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
            vfio_config_init(self)
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
        vfio_config_init(self)
        return 0

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
        return vfio_pci_set_irqs_ioctl(self, current, hdr.flags, hdr.index, hdr.start, hdr.count, data)

    def _ioeventfd(self, current: "Task", arg: int) -> int:
        """vfio_pci_ioctl_ioeventfd()"""
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
        return vfio_pci_ioeventfd(self, current, req.offset, req.data, count, req.fd)
