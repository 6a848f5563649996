"""Devices, their regions (BARs, config space) and their interrupts."""

from __future__ import annotations

import asyncio
import ctypes
import errno
import sys
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, Self

from ..uapi import vfio as uapi
from ._util import from_buffer, syscall, wrap
from .backend import HostMemory
from .caps import Capability, SparseMmapCap, parse_caps, query_with_caps
from .errors import VfioError, VfioUsageError
from .sysfs import PciDeviceInfo, normalize_bdf, select_devices

if TYPE_CHECKING:
    from .container import Container, Group

__all__ = ["Device", "Region", "Irq", "IrqInfo", "IRQ_KINDS", "PCI_COMMAND", "PCI_COMMAND_MEMORY",
           "PCI_COMMAND_MASTER"]

PCI_COMMAND = 0x04
PCI_COMMAND_MEMORY = 0x2
PCI_COMMAND_MASTER = 0x4

#: interrupt kinds of vfio-pci, by name
IRQ_KINDS: dict[str, int] = {
    "intx": uapi.VFIO_PCI_INTX_IRQ_INDEX,
    "msi": uapi.VFIO_PCI_MSI_IRQ_INDEX,
    "msix": uapi.VFIO_PCI_MSIX_IRQ_INDEX,
    "err": uapi.VFIO_PCI_ERR_IRQ_INDEX,
    "req": uapi.VFIO_PCI_REQ_IRQ_INDEX,
}
_IRQ_NAMES = {v: k for k, v in IRQ_KINDS.items()}
_REGION_NAMES = {uapi.VFIO_PCI_CONFIG_REGION_INDEX: "config", uapi.VFIO_PCI_ROM_REGION_INDEX: "ROM",
                 uapi.VFIO_PCI_VGA_REGION_INDEX: "VGA"}
_FMT: dict[int, Literal["B", "H", "I", "Q"]] = {1: "B", 2: "H", 4: "I", 8: "Q"}


class Device:
    """An open VFIO device fd (``Group.device()`` or ``Container.open_device()``).

    A device opened through its group has ``group``; one opened through its
    cdev (iommufd) has ``group`` None, ``cdev`` (``/dev/vfio/devices/vfioN``)
    and ``devid``, its id in the container's iommufd.
    """

    def __init__(self, group: "Group | None", name: str, fd: int, *, mmap: bool = True,
                 container: "Container | None" = None, devid: int | None = None, cdev: str | None = None) -> None:
        self.group = group
        if group is not None:
            container = group.container
        if container is None:
            raise VfioUsageError(errno.EINVAL, f"Device({name})", "Device()", detail="a device needs a group or a "
                                 "container", fix="open it with Container.open_device() or Group.device()")
        self.container: "Container" = container
        self.name_in_group = name
        self.devid = devid
        self.cdev = cdev
        self.fd = fd
        self.closed = False
        #: whether regions may use mmap where the kernel allows it
        self.mmap = mmap
        self._regions: dict[int, Region] = {}
        self._irqs: dict[int, list[Irq]] = {}
        self._ioeventfds: list[IoEventFd] = []
        self._owned_container: "Container | None" = None
        buf = query_with_caps(lambda b: self._ioctl("VFIO_DEVICE_GET_INFO", uapi.VFIO_DEVICE_GET_INFO, b),
                              uapi.vfio_device_info)
        info = from_buffer(uapi.vfio_device_info, buf)
        self.flags = int(info.flags)
        self.num_regions = int(info.num_regions)
        self.num_irqs = int(info.num_irqs)
        cap_offset = int(info.cap_offset) if len(buf) >= ctypes.sizeof(uapi.vfio_device_info) else 0
        self.caps: tuple[Capability, ...] = (parse_caps(bytes(buf), cap_offset, "device")
                                             if self.flags & uapi.VFIO_DEVICE_FLAGS_CAPS else ())
        self.pci: PciDeviceInfo | None = None
        try:
            found = select_devices(self.container.backend.pci_devices(), bdf=normalize_bdf(name))
            self.pci = found[0] if found else None
        except ValueError:
            pass

    @property
    def name(self) -> str:
        return f"Device({self.name_in_group})"

    @property
    def is_pci(self) -> bool:
        return bool(self.flags & uapi.VFIO_DEVICE_FLAGS_PCI)

    @property
    def can_reset(self) -> bool:
        return bool(self.flags & uapi.VFIO_DEVICE_FLAGS_RESET)

    def _check_open(self, call: str) -> None:
        if self.closed:
            raise VfioUsageError(errno.EBADF, self.name, call, detail="the device is closed")

    def _ioctl(self, call: str, request: int, arg: int | bytearray, ctx: dict[str, object] | None = None) -> int:
        return syscall(self.name, call, lambda: self.container.backend.ioctl(self.fd, request, arg), ctx)

    def ioctl(self, request: int, arg: int | bytearray = 0) -> int:
        """A raw ioctl on the device fd (the low-level path)."""
        self._check_open("ioctl()")
        name = (uapi.ioctl_name(request) or hex(request)).split("/")[0]
        return self._ioctl(name, request, arg)

    # -- regions --------------------------------------------------------------------------------------

    def region(self, index: int) -> "Region":
        """VFIO_DEVICE_GET_REGION_INFO, as a :class:`Region` (cached)."""
        self._check_open(f"region({index})")
        if index in self._regions:
            return self._regions[index]
        if not 0 <= index < self.num_regions:
            raise VfioUsageError(errno.EINVAL, self.name, f"region({index})",
                                 detail=f"the device has regions 0..{self.num_regions - 1}")

        def init(s: ctypes.Structure) -> None:
            s.index = index
        buf = query_with_caps(lambda b: self._ioctl("VFIO_DEVICE_GET_REGION_INFO", uapi.VFIO_DEVICE_GET_REGION_INFO, b),
                              uapi.vfio_region_info, init)
        r = Region(self, index, buf)
        self._regions[index] = r
        return r

    def bar(self, n: int) -> "Region":
        """BAR ``n`` (0-5) of a PCI device."""
        if not 0 <= n <= uapi.VFIO_PCI_BAR5_REGION_INDEX:
            raise VfioUsageError(errno.EINVAL, self.name, f"bar({n})", detail="PCI BARs are 0..5")
        return self.region(uapi.VFIO_PCI_BAR0_REGION_INDEX + n)

    @property
    def config(self) -> "Region":
        """PCI config space (vfio-pci virtualizes parts of it)."""
        return self.region(uapi.VFIO_PCI_CONFIG_REGION_INDEX)

    def enable_bus_master(self) -> None:
        """Set MEMORY and BUS_MASTER in the COMMAND register: the device may
        decode its BARs and start DMA."""
        cmd = self.config.read16(PCI_COMMAND)
        self.config.write16(PCI_COMMAND, cmd | PCI_COMMAND_MEMORY | PCI_COMMAND_MASTER)

    def reset(self) -> None:
        """VFIO_DEVICE_RESET."""
        self._check_open("reset()")
        self._ioctl("VFIO_DEVICE_RESET", uapi.VFIO_DEVICE_RESET, 0)

    # -- interrupts -----------------------------------------------------------------------------------

    def irq_info(self, kind: str | int) -> "IrqInfo":
        """VFIO_DEVICE_GET_IRQ_INFO for ``kind`` ("intx", "msi", "msix", "err", "req" or an index)."""
        self._check_open("irq_info()")
        index = _irq_index(kind, self.name)
        s = uapi.vfio_irq_info(argsz=ctypes.sizeof(uapi.vfio_irq_info), index=index)
        buf = bytearray(bytes(s))
        self._ioctl("VFIO_DEVICE_GET_IRQ_INFO", uapi.VFIO_DEVICE_GET_IRQ_INFO, buf)
        out = from_buffer(uapi.vfio_irq_info, buf)
        return IrqInfo(index, int(out.flags), int(out.count))

    def enable_irqs(self, kind: str | int = "msi", count: int = 1) -> list["Irq"]:
        """VFIO_DEVICE_SET_IRQS: ``count`` vectors of ``kind``, each signalling
        its own eventfd.  Closing every returned Irq disables the kind."""
        call = f"enable_irqs({kind!r}, {count})"
        self._check_open(call)
        index = _irq_index(kind, self.name)
        if self._irqs.get(index):
            raise VfioUsageError(errno.EBUSY, self.name, call, detail=f"{_irq_label(index)} is already enabled",
                                 fix="use the Irq objects you have, or close them first")
        info = self.irq_info(index)
        if not info.flags & uapi.VFIO_IRQ_INFO_EVENTFD or count < 1 or count > info.count:
            raise VfioUsageError(errno.EINVAL, self.name, call,
                                 detail=f"the device has {info.count} {_irq_label(index)} vector(s)"
                                        f"{'' if info.flags & uapi.VFIO_IRQ_INFO_EVENTFD else ' without eventfd'}",
                                 fix=f"ask for 1..{info.count}" if info.count else "use another interrupt kind")
        backend = self.container.backend
        fds: list[int] = []
        try:
            for _ in range(count):
                fds.append(syscall(self.name, "eventfd()", backend.eventfd))
            self._set_irqs(index, 0, uapi.VFIO_IRQ_SET_DATA_EVENTFD | uapi.VFIO_IRQ_SET_ACTION_TRIGGER, fds,
                           ctx={"count": info.count})
        except BaseException:
            for fd in fds:
                backend.close(fd)
            raise
        irqs = [Irq(self, index, i, fd, info) for i, fd in enumerate(fds)]
        self._irqs[index] = list(irqs)
        return irqs

    def irq(self, kind: str | int = "msi") -> "Irq":
        """One interrupt vector of ``kind`` (default MSI), enabled."""
        return self.enable_irqs(kind, 1)[0]

    def ioeventfd(self, bar: int, offset: int, data: int, size: int = 4) -> "IoEventFd":
        """VFIO_DEVICE_IOEVENTFD: an eventfd whose every :meth:`IoEventFd.kick`
        makes the kernel write ``data`` (``size`` bytes: 1, 2, 4 or 8) at
        ``offset`` of BAR ``bar`` -- a doorbell without an ioctl per write."""
        call = f"ioeventfd(bar={bar}, offset={offset:#x}, data={data:#x}, size={size})"
        self._check_open(call)
        if size not in (1, 2, 4, 8):
            raise VfioUsageError(errno.EINVAL, self.name, call, detail=f"size {size} is not a write width",
                                 fix="use 1, 2, 4 or 8 (Linux refuses 8 only on a 32-bit host without iowrite64)")
        backend = self.container.backend
        fd = syscall(self.name, "eventfd()", backend.eventfd)
        e = IoEventFd(self, (bar << 40) + offset, data, size, fd)
        try:
            e._register(fd)
        except BaseException:
            backend.close(fd)
            raise
        self._ioeventfds.append(e)
        return e

    def _set_irqs(self, index: int, start: int, flags: int, fds: list[int] | None = None, count: int | None = None,
                  ctx: dict[str, object] | None = None) -> None:
        data = b"".join(bytes(ctypes.c_int32(fd)) for fd in fds) if fds is not None else b""
        n = len(fds) if fds is not None else (count or 0)
        s = uapi.vfio_irq_set(argsz=ctypes.sizeof(uapi.vfio_irq_set) + len(data), flags=flags, index=index,
                              start=start, count=n)
        buf = bytearray(bytes(s) + data)
        self._ioctl("VFIO_DEVICE_SET_IRQS", uapi.VFIO_DEVICE_SET_IRQS, buf, ctx)

    def _irq_closed(self, irq: "Irq") -> None:
        """An Irq is closing: detach its eventfd; the last one disables the kind."""
        irqs = self._irqs.get(irq.index, [])
        if irq in irqs:
            irqs.remove(irq)
        if self.closed:
            return
        if not irqs:
            self._irqs.pop(irq.index, None)
            self._set_irqs(irq.index, 0, uapi.VFIO_IRQ_SET_DATA_NONE | uapi.VFIO_IRQ_SET_ACTION_TRIGGER, count=0)
        else:
            self._set_irqs(irq.index, irq.vector, uapi.VFIO_IRQ_SET_DATA_EVENTFD | uapi.VFIO_IRQ_SET_ACTION_TRIGGER,
                           [-1])

    # -- closing -------------------------------------------------------------------------------------

    def close(self) -> None:
        """Interrupts off, region mappings gone, device fd closed (and the
        container, if :func:`open_device` made it for this device)."""
        if self.closed:
            return
        errors: list[BaseException] = []
        for irqs in list(self._irqs.values()):
            for irq in list(irqs):
                try:
                    irq.close()
                except BaseException as exc:
                    errors.append(exc)
        for e in list(self._ioeventfds):
            try:
                e.close()
            except BaseException as exc:
                errors.append(exc)
        for r in self._regions.values():
            r.close()
        backend = self.container.backend
        try:
            syscall(self.name, "close()", lambda: backend.close(self.fd))
        except BaseException as exc:
            errors.append(exc)
        self.closed = True
        if self.group is not None:
            self.group._forget_device(self)
        else:
            self.container._forget_device(self)
        if self._owned_container is not None:
            try:
                self._owned_container.close()
            except BaseException as exc:
                errors.append(exc)
        if errors:
            raise errors[0]

    def __enter__(self) -> "Device":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<{self.name} fd {self.fd} {self.num_regions} regions {self.num_irqs} irqs" \
               f"{' closed' if self.closed else ''}>"


def _irq_index(kind: str | int, obj: str) -> int:
    if isinstance(kind, int):
        return kind
    if kind.lower() not in IRQ_KINDS:
        raise VfioUsageError(errno.EINVAL, obj, f"irq({kind!r})", detail=f"unknown interrupt kind {kind!r}",
                             fix=f"use one of {', '.join(IRQ_KINDS)}")
    return IRQ_KINDS[kind.lower()]


def _irq_label(index: int) -> str:
    return _IRQ_NAMES.get(index, f"IRQ index {index}").upper().replace("INTX", "INTx").replace("MSIX", "MSI-X")


# -- regions -------------------------------------------------------------------------------------------


class Region:
    """A device region: typed loads and stores by pread/pwrite, or through an
    mmap when the backend and the region's flags (and sparse-mmap areas)
    allow it.  Offsets are from the start of the region."""

    def __init__(self, device: Device, index: int, buf: bytearray) -> None:
        info = from_buffer(uapi.vfio_region_info, buf)
        self.device = device
        self.index = index
        self.flags = int(info.flags)
        self.size = int(info.size)
        self.offset = int(info.offset)          # of the region in the device fd
        self.caps: tuple[Capability, ...] = (parse_caps(bytes(buf), int(info.cap_offset), "region")
                                             if self.flags & uapi.VFIO_REGION_INFO_FLAG_CAPS else ())
        self._maps: list[tuple[int, int, HostMemory]] | None = None     # (offset, size, memory); None: not tried
        self.closed = False

    @property
    def name(self) -> str:
        label = _REGION_NAMES.get(self.index, f"BAR{self.index}" if self.index <= 5 else f"region {self.index}")
        return f"{self.device.name}.{label}"

    @property
    def readable(self) -> bool:
        return bool(self.flags & uapi.VFIO_REGION_INFO_FLAG_READ)

    @property
    def writable(self) -> bool:
        return bool(self.flags & uapi.VFIO_REGION_INFO_FLAG_WRITE)

    @property
    def mmappable(self) -> bool:
        return bool(self.flags & uapi.VFIO_REGION_INFO_FLAG_MMAP)

    @property
    def sparse_areas(self) -> tuple[tuple[int, int], ...] | None:
        """(offset, size) of the mmappable parts, when the kernel restricts them."""
        cap = next((c for c in self.caps if isinstance(c, SparseMmapCap)), None)
        return cap.areas if cap is not None else None

    @property
    def uses_mmap(self) -> bool:
        """Whether accesses go through an mmap (decided at the first access)."""
        return bool(self._mappings())

    def _mappings(self) -> list[tuple[int, int, HostMemory]]:
        if self._maps is not None:
            return self._maps
        self._maps = []
        backend = self.device.container.backend
        if not (self.device.mmap and backend.supports_region_mmap and self.mmappable and self.size):
            return self._maps
        areas = self.sparse_areas if self.sparse_areas is not None else ((0, self.size),)
        try:
            for off, size in areas:
                if size <= 0:
                    continue
                mem = backend.map_region(self.device.fd, self.offset + off, size, self.writable)
                if mem is None:
                    break
                self._maps.append((off, size, mem))
        except OSError:
            # mmap refused (e.g. a BAR smaller than a page): pread/pwrite still work.
            for _, _, mem in self._maps:
                mem.release()
            self._maps = []
        return self._maps

    def _check(self, call: str, off: int, n: int, write: bool) -> None:
        if self.closed or self.device.closed:
            raise VfioUsageError(errno.EBADF, self.name, call, detail="the device is closed")
        if not (self.writable if write else self.readable):
            raise VfioUsageError(errno.EINVAL, self.name, call,
                                 detail=f"the region is not {'writable' if write else 'readable'}"
                                        f"{' (size 0: not implemented)' if not self.size else ''}")
        if off < 0 or n <= 0 or off + n > self.size:
            raise VfioUsageError(errno.EINVAL, self.name, call,
                                 detail=f"bytes {off:#x}+{n:#x} are outside the {self.size:#x}-byte region")

    def _window(self, off: int, n: int) -> memoryview | None:
        for start, size, mem in self._mappings():
            if start <= off and off + n <= start + size:
                return mem.view[off - start:off - start + n]
        return None

    def _load(self, off: int, width: int) -> int:
        call = f"read{width * 8}({off:#x})"
        self._check(call, off, width, False)
        mv = self._window(off, width)
        if mv is not None:
            value = int(mv.cast(_FMT[width])[0])
            return int.from_bytes(value.to_bytes(width, sys.byteorder), "little")
        data = self._pread(call, off, width)
        return int.from_bytes(data, "little")

    def _store(self, off: int, width: int, value: int) -> None:
        call = f"write{width * 8}({off:#x})"
        self._check(call, off, width, True)
        if not 0 <= value < 1 << (8 * width):
            raise VfioUsageError(errno.EINVAL, self.name, call, detail=f"{value:#x} does not fit in {width} bytes")
        raw = value.to_bytes(width, "little")
        mv = self._window(off, width)
        if mv is not None:
            mv.cast(_FMT[width])[0] = int.from_bytes(raw, sys.byteorder)
            return
        self._pwrite(call, off, raw)

    def _pread(self, call: str, off: int, n: int) -> bytes:
        backend = self.device.container.backend
        data = syscall(self.name, call, lambda: backend.pread(self.device.fd, n, self.offset + off), key="pread")
        if len(data) != n:
            raise VfioError(errno.EIO, self.name, call, detail=f"short read: {len(data)} of {n} bytes")
        return data

    def _pwrite(self, call: str, off: int, data: bytes) -> None:
        backend = self.device.container.backend
        done = syscall(self.name, call, lambda: backend.pwrite(self.device.fd, data, self.offset + off), key="pwrite")
        if done != len(data):
            raise VfioError(errno.EIO, self.name, call, detail=f"short write: {done} of {len(data)} bytes")

    def read8(self, off: int) -> int:
        return self._load(off, 1)

    def read16(self, off: int) -> int:
        return self._load(off, 2)

    def read32(self, off: int) -> int:
        return self._load(off, 4)

    def read64(self, off: int) -> int:
        return self._load(off, 8)

    def write8(self, off: int, value: int) -> None:
        self._store(off, 1, value)

    def write16(self, off: int, value: int) -> None:
        self._store(off, 2, value)

    def write32(self, off: int, value: int) -> None:
        self._store(off, 4, value)

    def write64(self, off: int, value: int) -> None:
        self._store(off, 8, value)

    def read(self, off: int, n: int) -> bytes:
        """``n`` bytes (the kernel splits the access as it does for pread)."""
        call = f"read({off:#x}, {n})"
        self._check(call, off, n, False)
        mv = self._window(off, n)
        return bytes(mv) if mv is not None else self._pread(call, off, n)

    def write(self, off: int, data: bytes | bytearray | memoryview) -> None:
        raw = bytes(data)
        call = f"write({off:#x}, {len(raw)} bytes)"
        self._check(call, off, len(raw), True)
        mv = self._window(off, len(raw))
        if mv is not None:
            mv[:] = raw
        else:
            self._pwrite(call, off, raw)

    def close(self) -> None:
        """munmap the region (pread/pwrite need nothing released)."""
        for _, _, mem in self._maps or []:
            mem.release()
        self._maps = [] if self._maps is not None else None
        self.closed = True

    def __repr__(self) -> str:
        rights = ("r" if self.readable else "-") + ("w" if self.writable else "-") + ("m" if self.mmappable else "-")
        return f"<{self.name} {self.size:#x} bytes at fd offset {self.offset:#x} {rights}>"


# -- interrupts ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class IrqInfo:
    """VFIO_DEVICE_GET_IRQ_INFO: flags (EVENTFD, MASKABLE, AUTOMASKED, NORESIZE) and vector count."""

    index: int
    flags: int
    count: int

    @property
    def automasked(self) -> bool:
        return bool(self.flags & uapi.VFIO_IRQ_INFO_AUTOMASKED)


class _DeviceEventFd:
    """An eventfd of the client's tied to a device (an interrupt vector, an
    ioeventfd): closing it detaches it from the device, then closes it."""

    device: Device
    fd: int
    closed: bool

    @property
    def name(self) -> str:
        raise NotImplementedError

    def _detach(self) -> None:
        raise NotImplementedError

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        backend = self.device.container.backend
        try:
            self._detach()
        finally:
            syscall(self.name, "close(eventfd)", lambda: backend.close(self.fd))

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<{self.name} eventfd {self.fd}{' closed' if self.closed else ''}>"


class IoEventFd(_DeviceEventFd):
    """A write the kernel makes into a BAR whenever this eventfd is written
    (VFIO_DEVICE_IOEVENTFD).  :meth:`close` unregisters it and closes the eventfd;
    closing the device does both."""

    def __init__(self, device: Device, offset: int, data: int, size: int, fd: int) -> None:
        self.device = device
        self.offset = offset                 # device fd offset: region index << 40 | offset
        self.data = data
        self.size = size
        self.fd = fd
        self.closed = False

    @property
    def name(self) -> str:
        return f"{self.device.name}.ioeventfd[BAR{self.offset >> 40}+{self.offset & ((1 << 40) - 1):#x}]"

    def _register(self, fd: int) -> None:
        s = uapi.vfio_device_ioeventfd(argsz=ctypes.sizeof(uapi.vfio_device_ioeventfd), flags=self.size,
                                       offset=self.offset, data=self.data, fd=fd)
        self.device._ioctl("VFIO_DEVICE_IOEVENTFD", uapi.VFIO_DEVICE_IOEVENTFD, bytearray(bytes(s)),
                           {"offset": self.offset, "size": self.size})

    def kick(self, n: int = 1) -> None:
        """Write the eventfd: the kernel makes the BAR write."""
        if self.closed or self.device.closed:
            raise VfioUsageError(errno.EBADF, self.name, "kick()", detail="the ioeventfd was closed")
        backend = self.device.container.backend
        syscall(self.name, "write(eventfd)", lambda: backend.write(self.fd, n.to_bytes(8, sys.byteorder)))

    def _detach(self) -> None:
        """Unregister (VFIO_DEVICE_IOEVENTFD with fd -1) unless the device is closed."""
        if self in self.device._ioeventfds:
            self.device._ioeventfds.remove(self)
        if not self.device.closed:
            self._register(-1)


class Irq(_DeviceEventFd):
    """One interrupt vector signalling an eventfd.

    ``wait(timeout)`` returns how many interrupts arrived since the last
    wait (0 after ``timeout`` seconds without one); ``await wait_async()``
    does the same without blocking the event loop.  Level-triggered INTx is
    masked by the kernel when it fires: :meth:`unmask` after handling it.
    """

    def __init__(self, device: Device, index: int, vector: int, fd: int, info: IrqInfo) -> None:
        self.device = device
        self.index = index
        self.vector = vector
        self.fd = fd
        self.info = info
        self.closed = False

    @property
    def name(self) -> str:
        return f"{self.device.name}.{_irq_label(self.index)}[{self.vector}]"

    def _check(self, call: str) -> None:
        if self.closed or self.device.closed:
            raise VfioUsageError(errno.EBADF, self.name, call, detail="the interrupt was closed")

    def _try_read(self) -> int:
        backend = self.device.container.backend
        try:
            data = backend.read(self.fd, 8)
        except OSError as exc:
            if exc.errno in (errno.EAGAIN, errno.EWOULDBLOCK):
                return 0
            raise wrap(exc, self.name, "read(eventfd)") from None
        return int.from_bytes(data[:8], sys.byteorder)

    def pending(self) -> int:
        """Interrupts counted so far (the counter is reset), without waiting."""
        self._check("pending()")
        return self._try_read()

    def wait(self, timeout: float | None = None) -> int:
        """Wait for the interrupt; the count, or 0 when ``timeout`` passed."""
        self._check("wait()")
        backend = self.device.container.backend
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            n = self._try_read()
            if n:
                return n
            left = 3600.0 if deadline is None else deadline - time.monotonic()
            if left <= 0:
                return 0
            backend.wait_readable(self.fd, left)

    async def wait_async(self, timeout: float | None = None) -> int:
        """:meth:`wait` for asyncio."""
        self._check("wait_async()")
        backend = self.device.container.backend
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        while True:
            n = self._try_read()
            if n:
                return n
            left = 3600.0 if deadline is None else deadline - loop.time()
            if left <= 0:
                return 0
            await backend.wait_readable_async(self.fd, left)

    def unmask(self) -> None:
        """VFIO_IRQ_SET_ACTION_UNMASK (INTx is masked each time it fires)."""
        self._check("unmask()")
        self.device._set_irqs(self.index, self.vector, uapi.VFIO_IRQ_SET_DATA_NONE | uapi.VFIO_IRQ_SET_ACTION_UNMASK,
                              count=1)

    def trigger(self) -> None:
        """Signal the eventfd through the kernel (a loopback test of the wiring)."""
        self._check("trigger()")
        self.device._set_irqs(self.index, self.vector, uapi.VFIO_IRQ_SET_DATA_NONE | uapi.VFIO_IRQ_SET_ACTION_TRIGGER,
                              count=1)

    def _detach(self) -> None:
        """Detach the eventfd from the vector (the last one disables the kind)."""
        self.device._irq_closed(self)
