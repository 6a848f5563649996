"""BAR access and ioeventfds of vfio-pci (drivers/vfio/pci/vfio_pci_rdwr.c, Linux 6.12)."""

from __future__ import annotations

from dataclasses import dataclass
from errno import EEXIST, EINVAL, EIO, ENODEV, ENOSPC
from typing import TYPE_CHECKING

from ....uapi import vfio as uapi
from ...errors import fail
from ..virqfd import Virqfd, virqfd_enable
from .vfio_pci_config import vfio_pci_memory_enabled
from .vfio_pci_priv import VFIO_PCI_IOEVENTFD_MAX, VFIO_PCI_OFFSET_MASK, VFIO_PCI_OFFSET_SHIFT

if TYPE_CHECKING:
    from ...task import Task
    from .vfio_pci_core import VfioPciDevice

@dataclass
class IoEventFd:
    """struct vfio_pci_ioeventfd: when its eventfd is signalled, write
    ``data`` (``count`` bytes) at ``pos`` of BAR ``bar``."""
    bar: int
    pos: int
    data: int
    count: int
    virqfd: Virqfd | None = None


def vfio_pci_bar_rw(vdev: "VfioPciDevice", bar: int, pos: int, count: int, data: bytes | None) -> bytes | int:
    """vfio_pci_bar_rw(): the MSI-X table (not the PBA) of the BAR holding it
    is excluded: reads there fill with 0xff, writes are dropped."""
    b = vdev.pdev.bars.get(bar)
    if b is None:
        raise fail(EINVAL, f"BAR{bar} is not implemented by {vdev.pdev.bdf}")
    if pos >= b.size:
        raise fail(EINVAL, f"offset {pos:#x} is beyond BAR{bar} ({b.size:#x} bytes)")
    count = min(count, b.size - pos)
    x_start = x_end = 0
    if bar == vdev.msix_bar:
        x_start, x_end = vdev.msix_offset, vdev.msix_offset + vdev.msix_size
    return vfio_pci_core_do_io_rw(vdev, bar, pos, count, x_start, x_end, data)


def vfio_pci_core_do_io_rw(vdev: "VfioPciDevice", bar: int, off: int, count: int, x_start: int, x_end: int,
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
            if not vfio_pci_memory_enabled(vdev):
                raise fail(EIO, "memory decoding is disabled in the device's COMMAND register")
            if data is None:
                out += vdev.pdev.host_mmio_read(bar, off, n).to_bytes(n, "little")
            else:
                vdev.pdev.host_mmio_write(bar, off, n, int.from_bytes(data[done:done + n], "little"))
        else:
            n = min(left, x_end - off)           # the MSI-X table: fill reads with -1, drop writes
            if data is None:
                out += b"\xff" * n
        done += n
        off += n
    return bytes(out) if data is None else count


def vfio_pci_ioeventfd_handler(vdev: "VfioPciDevice", e: IoEventFd) -> None:
    """vfio_pci_ioeventfd_handler(): the write, dropped while memory decoding is off."""
    if not vfio_pci_memory_enabled(vdev):
        return
    vdev.pdev.host_mmio_write(e.bar, e.pos, e.count, e.data & ((1 << 8 * e.count) - 1))


def vfio_pci_ioeventfd(vdev: "VfioPciDevice", current: "Task", offset: int, data: int, count: int, fd: int) -> int:
    """vfio_pci_ioeventfd(): register (or with fd -1 unregister) the write of
    ``count`` (1, 2, 4 or 8) bytes of ``data`` at ``offset`` of a BAR."""
    bar, pos = offset >> VFIO_PCI_OFFSET_SHIFT, offset & VFIO_PCI_OFFSET_MASK
    if bar > uapi.VFIO_PCI_BAR5_REGION_INDEX:
        raise fail(EINVAL, f"VFIO_DEVICE_IOEVENTFD: region {bar} is not a BAR")
    b = vdev.pdev.bars.get(bar)
    if pos + count > (b.size if b is not None else 0):            # pci_resource_len()
        raise fail(EINVAL, f"VFIO_DEVICE_IOEVENTFD: {count} bytes at {pos:#x} do not fit in BAR{bar}")
    if bar == vdev.msix_bar and not (pos + count <= vdev.msix_offset
                                     or pos >= vdev.msix_offset + vdev.msix_size):
        raise fail(EINVAL, "VFIO_DEVICE_IOEVENTFD: the write would reach the MSI-X table")
    # Upstream refuses count 8 only "#ifndef iowrite64": every platform here
    # (x86_64, ppc64) has it, so an 8-byte ioeventfd writes all 64 bits.
    for i, e in enumerate(vdev.ioeventfds):
        if (e.pos, e.bar, e.data, e.count) == (pos, bar, data, count):
            if fd == -1:
                assert e.virqfd is not None
                e.virqfd.disable()
                del vdev.ioeventfds[i]
                return 0
            raise fail(EEXIST, f"VFIO_DEVICE_IOEVENTFD: this write (BAR{bar} {pos:#x}, {count} bytes, "
                               f"data {data:#x}) already has an eventfd")
    if fd < 0:
        raise fail(ENODEV, "VFIO_DEVICE_IOEVENTFD: fd -1 unregisters, but no such ioeventfd is registered")
    if len(vdev.ioeventfds) >= VFIO_PCI_IOEVENTFD_MAX:
        raise fail(ENOSPC, f"VFIO_DEVICE_IOEVENTFD: {VFIO_PCI_IOEVENTFD_MAX} ioeventfds at most per device")
    e = IoEventFd(bar, pos, data, count)
    e.virqfd = virqfd_enable(current, fd, lambda: vfio_pci_ioeventfd_handler(vdev, e), None, "VFIO_DEVICE_IOEVENTFD")
    vdev.ioeventfds.append(e)
    return 0
