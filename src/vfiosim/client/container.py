"""Containers and groups: the IOMMU context and the devices' way into it.

A :class:`Container` is an open ``/dev/vfio/vfio``; :class:`Group` objects
join it (``/dev/vfio/<N>``), the container picks an IOMMU type and sets it
up, and DMA is mapped through it.  With ``auto=True`` (the default) the
client does the IOMMU-specific set-up as needed:

* Type1 (x86, arm): VFIO_TYPE1v2_IOMMU, VFIO_IOMMU_GET_INFO with its
  capability chain for the usable IOVA ranges; pages are pinned (and charged
  to RLIMIT_MEMLOCK) at each MAP_DMA.
* sPAPR v2 (POWER): each buffer is preregistered (VFIO_IOMMU_SPAPR_REGISTER_MEMORY)
  before its first mapping and unregistered after its last; the default
  32-bit window is created by the kernel at the first MAP_DMA.
* sPAPR v1 (POWER, and the only type of Linux 3.10): VFIO_IOMMU_ENABLE
  before the first mapping, which charges the whole 32-bit window to
  RLIMIT_MEMLOCK.

* iommufd (Linux 6.2+ built with CONFIG_IOMMUFD): the container is an open
  ``/dev/iommu`` with one IOAS (IOMMU_IOAS_ALLOC); a device is opened through
  its cdev ``/dev/vfio/devices/vfioN`` (VFIO_DEVICE_BIND_IOMMUFD, then
  VFIO_DEVICE_ATTACH_IOMMUFD_PT to the IOAS), or, without the cdev, through
  its group, which takes the iommufd as its container (the IOAS is made the
  context's compat IOAS with IOMMU_VFIO_IOAS first).  Mappings are
  IOMMU_IOAS_MAP at the IOVA the client chose; the usable ranges come from
  IOMMU_IOAS_IOVA_RANGES and narrow as devices attach.  Pinned pages are
  charged to the *user* (every process of the uid together), not the process.

The automatic choice is iommufd when ``/dev/iommu`` can be opened (the
first device still falls back to ``/dev/vfio/vfio`` when iommufd refuses it
with EPERM, EOPNOTSUPP or EINVAL -- POWER, or an IOMMU without interrupt
remapping -- as long as nothing is mapped yet); otherwise, from
VFIO_CHECK_EXTENSION, Type1v2, Type1, sPAPR v2, sPAPR v1, in that order,
falling back to the next when VFIO_SET_IOMMU refuses.  ``iommu=`` (or
:func:`use_iommu`, or ``$VFIOSIM_IOMMU``) names one instead: ``"iommufd"``,
``"type1v2"``, ``"type1"``, ``"spapr-v2"``, ``"spapr"``; the VFIO types use
``/dev/vfio/vfio`` whether VFIO or iommufd's emulation
(CONFIG_IOMMUFD_VFIO_CONTAINER) serves it.  sPAPR v2 comes before v1 because it locks only the
memory that is mapped, not the whole window (2 GiB on a PowerNV host), so
it works without raising RLIMIT_MEMLOCK for ordinary buffers.  ``iommu=``
overrides the choice; ``auto=False`` leaves the set-up to the caller (the
low-level methods :meth:`Container.enable`, :meth:`register_memory`,
:meth:`create_window` and :meth:`ioctl`).

Closing releases in the kernel's order: devices (interrupts off, regions
unmapped), DMA mappings, preregistered memory, the v1 enable, groups
(VFIO_GROUP_UNSET_CONTAINER), the container, and last the buffers.
"""

from __future__ import annotations

import ctypes
import errno
import os
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterator, Mapping

from ..uapi import iommufd as iu
from ..uapi import vfio as uapi
from ._util import as_buffer, from_buffer, hexrange, syscall, wrap
from .backend import Backend, get_backend
from .caps import Capability, DmaAvailCap, IovaRangeCap, query_with_caps, parse_caps
from .dma import DmaBuffer, DmaMapping
from .errors import VfioError, VfioUsageError, format_size
from .iova import IovaAllocator, IovaRange
from .sysfs import PciDeviceInfo, normalize_bdf, select_devices

if TYPE_CHECKING:
    from ..machine import Machine, Process
    from .device import Device

__all__ = ["Container", "Group", "IommuInfo", "DdwInfo", "IOMMU_TYPES", "AUTO_ORDER", "IOMMUFD", "IOMMU_ENV",
           "iommu_name", "use_iommu", "set_default_iommu", "default_iommu"]

#: the client's code for iommufd (not a VFIO IOMMU type: /dev/iommu and an IOAS)
IOMMUFD = -1
#: the environment variable naming the IOMMU interface of ``iommu=None``
IOMMU_ENV = "VFIOSIM_IOMMU"

#: names accepted by ``iommu=``
IOMMU_TYPES: dict[str, int] = {
    "iommufd": IOMMUFD,
    "type1v2": uapi.VFIO_TYPE1v2_IOMMU,
    "type1": uapi.VFIO_TYPE1_IOMMU,
    "spapr-v2": uapi.VFIO_SPAPR_TCE_v2_IOMMU,
    "spapr": uapi.VFIO_SPAPR_TCE_IOMMU,
    "spapr-v1": uapi.VFIO_SPAPR_TCE_IOMMU,
}
#: the order ``iommu=None`` tries the types the kernel offers
AUTO_ORDER = (uapi.VFIO_TYPE1v2_IOMMU, uapi.VFIO_TYPE1_IOMMU, uapi.VFIO_SPAPR_TCE_v2_IOMMU,
              uapi.VFIO_SPAPR_TCE_IOMMU)
_NAMES = {uapi.VFIO_TYPE1v2_IOMMU: "type1v2", uapi.VFIO_TYPE1_IOMMU: "type1",
          uapi.VFIO_SPAPR_TCE_v2_IOMMU: "spapr-v2", uapi.VFIO_SPAPR_TCE_IOMMU: "spapr", IOMMUFD: "iommufd"}
_TYPE1 = (uapi.VFIO_TYPE1v2_IOMMU, uapi.VFIO_TYPE1_IOMMU)
_SPAPR = (uapi.VFIO_SPAPR_TCE_v2_IOMMU, uapi.VFIO_SPAPR_TCE_IOMMU)
_SEED_PAGE = 4096       # the 3.10 sPAPR driver maps one 4 KiB IOMMU page per MAP_DMA


def iommu_name(iommu_type: int) -> str:
    return _NAMES.get(iommu_type, f"type {iommu_type}")


def _iommu_code(iommu: str | int | None, where: str = "Container(iommu=...)") -> int | None:
    if iommu is None or isinstance(iommu, int):
        return iommu
    key = iommu.strip().lower().replace("_", "-")
    if key in ("", "auto"):
        return None
    if key not in IOMMU_TYPES:
        raise VfioUsageError(errno.EINVAL, "Container", where, detail=f"unknown IOMMU type {iommu!r}",
                             fix=f"use one of {', '.join(IOMMU_TYPES)} or None / 'auto' (automatic)")
    return IOMMU_TYPES[key]


_default_iommu: str | int | None = None


def set_default_iommu(iommu: str | int | None) -> str | int | None:
    """What ``iommu=None`` means from now on (None: ``$VFIOSIM_IOMMU``, else
    automatic); returns the previous setting."""
    global _default_iommu
    _iommu_code(iommu, "set_default_iommu()")
    previous, _default_iommu = _default_iommu, iommu
    return previous


@contextmanager
def use_iommu(iommu: str | int | None) -> Iterator[None]:
    """``with use_iommu("iommufd"):`` -- containers made without ``iommu=`` use it."""
    previous = set_default_iommu(iommu)
    try:
        yield
    finally:
        set_default_iommu(previous)


def default_iommu() -> str | int | None:
    """The IOMMU interface ``iommu=None`` asks for (None: automatic)."""
    if _default_iommu is not None:
        return _default_iommu
    return os.environ.get(IOMMU_ENV) or None


@dataclass(frozen=True)
class DdwInfo:
    """sPAPR dynamic DMA windows the PE supports (VFIO_IOMMU_SPAPR_INFO_DDW)."""

    page_sizes: int             #: bitmap of IOMMU page sizes
    max_windows: int
    levels: int


@dataclass(frozen=True)
class IommuInfo:
    """What the container's IOMMU offers."""

    type: int
    name: str
    page_sizes: int                     #: bitmap of IOMMU page sizes (Type1 iova_pgsizes; sPAPR: the windows')
    ranges: tuple[IovaRange, ...]       #: where mappings may go (Type1 IOVA ranges, sPAPR windows)
    ddw: DdwInfo | None = None
    dma_avail: int | None = None        #: Type1: mappings still allowed (VFIO_IOMMU_TYPE1_INFO_DMA_AVAIL)
    caps: tuple[Capability, ...] = ()

    @property
    def min_page_size(self) -> int:
        return self.page_sizes & -self.page_sizes if self.page_sizes else 4096


class Container:
    """An open ``/dev/vfio/vfio``, or ``/dev/iommu`` with one IOAS (iommufd).

    ``backend`` is a Backend, ``"sim"``/``"real"``, a vfiosim Process or
    Machine, or None (``$VFIOSIM_BACKEND``, see :func:`get_backend`).
    """

    def __init__(self, backend: "Backend | str | Process | Machine | None" = None, *,
                 iommu: str | int | None = None, auto: bool = True, machine: "Machine | str | None" = None) -> None:
        self.closed = True
        self._iommu_request = _iommu_code(iommu if iommu is not None else default_iommu(),
                                          "Container(iommu=...)" if iommu is not None else f"${IOMMU_ENV}")
        self.backend: Backend = get_backend(backend, machine=machine)
        self.auto = auto
        self.iommu_type: int | None = None
        self.info: IommuInfo | None = None
        self.enabled = False
        self.groups: dict[int, Group] = {}
        self.mappings: list[DmaMapping] = []
        self.buffers: list[DmaBuffer] = []
        self.windows_created: list[IovaRange] = []
        self._prereg: dict[int, list[Any]] = {}         # id(buffer) -> [buffer, mapping count]
        self._iova = IovaAllocator()
        #: iommufd: the IOAS every device attaches to, devices opened through their cdev
        self.iommufd = False
        self.ioas_id = 0
        self.devices: dict[str, "Device"] = {}
        #: why the automatic choice left iommufd for /dev/vfio/vfio (None: it did not)
        self.fallback: VfioError | None = None
        self._auto_iommufd = False
        want = self._iommu_request
        if want is None or want == IOMMUFD:
            try:
                fd = self.backend.open("/dev/iommu", os.O_RDWR | os.O_CLOEXEC)
            except OSError as exc:
                if want == IOMMUFD:
                    raise wrap(exc, "Container(/dev/iommu)", 'open("/dev/iommu")', key="open iommufd") from None
            else:
                self._auto_iommufd = want is None
                self._init_iommufd(fd)
                return
        self._open_container()

    def _open_container(self) -> None:
        self.fd = syscall("Container(/dev/vfio/vfio)", 'open("/dev/vfio/vfio")',
                          lambda: self.backend.open("/dev/vfio/vfio", os.O_RDWR | os.O_CLOEXEC), key="open container")
        self.closed = False
        try:
            version = self.ioctl(uapi.VFIO_GET_API_VERSION, 0)
            if version != uapi.VFIO_API_VERSION:
                raise VfioError(errno.EINVAL, self.name, "VFIO_GET_API_VERSION",
                                detail=f"the kernel speaks VFIO API {version}, this client {uapi.VFIO_API_VERSION}")
        except BaseException:
            self.close()
            raise

    def _init_iommufd(self, fd: int) -> None:
        """/dev/iommu is open: IOMMU_IOAS_ALLOC, and the IOAS becomes the one a
        group given this iommufd attaches its devices to (IOMMU_VFIO_IOAS)."""
        self.fd = fd
        self.iommufd = True
        self.closed = False
        try:
            alloc = iu.iommu_ioas_alloc(size=ctypes.sizeof(iu.iommu_ioas_alloc))
            self.ioctl(iu.IOMMU_IOAS_ALLOC, alloc)
            self.ioas_id = int(alloc.out_ioas_id)
            compat = iu.iommu_vfio_ioas(size=ctypes.sizeof(iu.iommu_vfio_ioas), ioas_id=self.ioas_id,
                                        op=iu.IOMMU_VFIO_IOAS_SET)
            self.ioctl(iu.IOMMU_VFIO_IOAS, compat)
            self.iommu_type = IOMMUFD
            self._read_info()
        except BaseException:
            self.close()
            raise

    def _fall_back(self, reason: VfioError) -> bool:
        """The automatic choice took iommufd and the first device was refused:
        use /dev/vfio/vfio instead, if nothing depends on the IOAS yet."""
        if not (self._auto_iommufd and self.iommufd) or self.mappings or self.devices or self.groups \
                or reason.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.EINVAL):
            return False
        try:
            fd = self.backend.open("/dev/vfio/vfio", os.O_RDWR | os.O_CLOEXEC)
        except OSError:
            return False
        self.backend.close(fd)
        self.backend.close(self.fd)
        self.iommufd = False
        self._auto_iommufd = False
        self.ioas_id = 0
        self._iommu_released()
        self.fallback = reason
        self._open_container()
        return True

    # -- naming, raw access ------------------------------------------------------------------------

    @property
    def name(self) -> str:
        path = "/dev/iommu" if self.iommufd else "/dev/vfio/vfio"
        return f"Container({path} fd {self.fd})" if hasattr(self, "fd") else f"Container({path})"

    def _check_open(self, call: str) -> None:
        if self.closed:
            raise VfioUsageError(errno.EBADF, self.name, call, detail="the container is closed",
                                 fix="open a new Container")

    def ioctl(self, request: int, arg: int | bytearray | ctypes.Structure = 0, *,
              ctx: Mapping[str, Any] | None = None) -> int:
        """A raw ioctl on the container fd (the low-level path).  A ctypes
        struct is passed by copy and updated from what the kernel wrote."""
        label = (iu.ioctl_name(request) if self.iommufd else None) or uapi.ioctl_name(request) or hex(request)
        self._check_open(label)
        call = label.split("/")[-1] if request != uapi.VFIO_IOMMU_GET_INFO \
            else ("VFIO_IOMMU_GET_INFO" if self.iommu_type in _TYPE1 or self.iommufd else
                  "VFIO_IOMMU_SPAPR_TCE_GET_INFO")
        if isinstance(arg, ctypes.Structure):
            buf = as_buffer(arg)
            ret = syscall(self.name, call, lambda: self.backend.ioctl(self.fd, request, buf), ctx)
            ctypes.memmove(ctypes.addressof(arg), bytes(buf), ctypes.sizeof(arg))
            return ret
        return syscall(self.name, call, lambda: self.backend.ioctl(self.fd, request, arg), ctx)

    def check_extension(self, extension: int) -> int:
        """VFIO_CHECK_EXTENSION: > 0 when the kernel (or the set IOMMU) supports it."""
        return self.ioctl(uapi.VFIO_CHECK_EXTENSION, extension)

    def _memlock_ctx(self, need: int, hint: str | None = None) -> dict[str, Any]:
        b = self.backend
        return {"lock_bytes": need, "memlock_limit": b.memlock_limit(), "locked_bytes": b.locked_bytes(),
                "pid": b.pid(), "memlock_hint": hint}

    # -- groups and devices --------------------------------------------------------------------------

    def group(self, group_id: int) -> "Group":
        """Open ``/dev/vfio/<group_id>`` and add it to this container (once)."""
        self._check_open(f"group({group_id})")
        if group_id in self.groups:
            return self.groups[group_id]
        g = Group(self, group_id)
        self.groups[group_id] = g
        return g

    def pci_devices(self) -> list[PciDeviceInfo]:
        """Every PCI device the backend's sysfs shows."""
        return self.backend.pci_devices()

    def open_device(self, name: str) -> "Device":
        """Open a device by PCI address (``0000:01:00.0``) or ``vendor:device``
        (``1234:11e8``: the first such device bound to vfio-pci): its group joins
        the container, the IOMMU is set up, the device fd is opened."""
        self._check_open(f"open_device({name!r})")
        info = resolve_device(self.backend, name, self.name, f"open_device({name!r})")
        if info.iommu_group is None:
            raise VfioError(errno.ENODEV, self.name, f"open_device({name!r})",
                            detail=f"{info.bdf} is in no IOMMU group",
                            cause="the IOMMU is off or absent for this device",
                            fix="enable the IOMMU (intel_iommu=on / amd_iommu=on on the kernel command line)")
        if info.driver != "vfio-pci":
            raise VfioError(errno.ENODEV, self.name, f"open_device({name!r})",
                            detail=f"{info.bdf} is bound to {info.driver or 'no driver'}, not vfio-pci",
                            cause="VFIO reaches only devices bound to vfio-pci",
                            fix=f"echo vfio-pci > /sys/bus/pci/devices/{info.bdf}/driver_override; echo {info.bdf} > "
                                f"/sys/bus/pci/devices/{info.bdf}/driver/unbind; echo {info.bdf} > "
                                f"/sys/bus/pci/drivers_probe")
        try:
            if self.iommufd and info.iommu_group not in self.groups:
                dev = self._open_cdev(info)
                if dev is not None:
                    return dev
            fresh = info.iommu_group not in self.groups
            g = self.group(info.iommu_group)
            try:
                return g.device(info.bdf)
            except BaseException:
                if fresh and not g.devices:
                    g.close()
                raise
        except VfioError as exc:
            if self._fall_back(exc):
                return self.open_device(name)
            raise

    def _open_cdev(self, info: PciDeviceInfo) -> "Device | None":
        """iommufd: open the device's cdev, VFIO_DEVICE_BIND_IOMMUFD, then
        VFIO_DEVICE_ATTACH_IOMMUFD_PT to the IOAS.  None when the device has
        no cdev this process can open (the group path is tried next)."""
        from .device import Device
        if info.vfio_dev is None:
            return None
        path = f"/dev/vfio/devices/{info.vfio_dev}"
        backend = self.backend
        try:
            fd = backend.open(path, os.O_RDWR | os.O_CLOEXEC)
        except OSError as exc:
            if exc.errno in (errno.ENOENT, errno.EACCES, errno.EPERM, errno.ENXIO, errno.ENODEV):
                return None
            raise wrap(exc, f"Device({info.bdf})", f'open("{path}")') from None
        obj = f"Device({info.bdf})"
        try:
            bind = uapi.vfio_device_bind_iommufd(argsz=ctypes.sizeof(uapi.vfio_device_bind_iommufd), iommufd=self.fd)
            buf = as_buffer(bind)
            syscall(obj, "VFIO_DEVICE_BIND_IOMMUFD", lambda: backend.ioctl(fd, uapi.VFIO_DEVICE_BIND_IOMMUFD, buf),
                    {"bdf": info.bdf, "group": info.iommu_group})
            devid = int(from_buffer(uapi.vfio_device_bind_iommufd, buf).out_devid)
            attach = uapi.vfio_device_attach_iommufd_pt(argsz=ctypes.sizeof(uapi.vfio_device_attach_iommufd_pt),
                                                        pt_id=self.ioas_id)
            abuf = as_buffer(attach)
            syscall(obj, "VFIO_DEVICE_ATTACH_IOMMUFD_PT",
                    lambda: backend.ioctl(fd, uapi.VFIO_DEVICE_ATTACH_IOMMUFD_PT, abuf),
                    {"bdf": info.bdf, "ioas": self.ioas_id})
            dev = Device(None, info.bdf, fd, container=self, devid=devid, cdev=path)
        except BaseException:
            backend.close(fd)
            raise
        self.devices[info.bdf] = dev
        self._read_info()                   # the device's IOMMU narrowed the IOAS's ranges
        return dev

    def _forget_device(self, dev: "Device") -> None:
        if self.devices.get(dev.name_in_group) is dev:
            del self.devices[dev.name_in_group]

    # -- the IOMMU -------------------------------------------------------------------------------------

    def set_iommu(self, iommu: str | int | None = None) -> int:
        """VFIO_SET_IOMMU (automatic choice unless ``iommu`` or the
        constructor's ``iommu=`` names one); returns the type."""
        self._check_open("set_iommu()")
        want = _iommu_code(iommu) if iommu is not None else self._iommu_request
        if want == IOMMUFD and not self.iommufd:
            raise VfioUsageError(errno.EINVAL, self.name, "set_iommu()",
                                 detail="this container is /dev/vfio/vfio; iommufd is /dev/iommu",
                                 fix="make the container with Container(iommu='iommufd')")
        if self.iommu_type is not None:
            if want is not None and want != self.iommu_type:
                raise VfioUsageError(errno.EBUSY, self.name, "set_iommu()",
                                     detail=f"the container already uses {iommu_name(self.iommu_type)}")
            return self.iommu_type
        if not self.groups:
            raise VfioUsageError(errno.EINVAL, self.name, "set_iommu()", detail="the container has no group yet",
                                 fix="add one first: container.group(N) or container.open_device(BDF)")
        if want is not None:
            candidates = [want]
        else:
            candidates = [t for t in AUTO_ORDER if self.check_extension(t) > 0]
            if not candidates:
                raise VfioError(errno.ENODEV, self.name, "VFIO_SET_IOMMU",
                                detail="VFIO_CHECK_EXTENSION reports none of Type1v2, Type1, sPAPR v2, sPAPR v1",
                                cause="no IOMMU backend module is loaded",
                                fix="`modprobe vfio_iommu_type1` (x86, arm) or `modprobe vfio_iommu_spapr_tce` (POWER)")
        last: VfioError | None = None
        for t in candidates:
            try:
                self.ioctl(uapi.VFIO_SET_IOMMU, t, ctx={"iommu": iommu_name(t)})
            except VfioError as exc:
                last = exc
                continue
            self.iommu_type = t
            self._read_info()
            return t
        assert last is not None
        raise last

    def _ensure_iommu(self) -> int:
        if self.iommu_type is None:
            return self.set_iommu()
        return self.iommu_type

    def _read_info(self) -> None:
        t = self.iommu_type
        assert t is not None
        if t == IOMMUFD:
            ioas_ranges, alignment = self.iova_ranges()
            self.info = IommuInfo(t, iommu_name(t), alignment, tuple(ioas_ranges))
        elif t in _TYPE1:
            buf = query_with_caps(lambda b: self.ioctl(uapi.VFIO_IOMMU_GET_INFO, b), uapi.vfio_iommu_type1_info)
            s = from_buffer(uapi.vfio_iommu_type1_info, buf)
            pgsizes = int(s.iova_pgsizes) if s.flags & uapi.VFIO_IOMMU_INFO_PGSIZES else self.backend.page_size
            page = pgsizes & -pgsizes
            caps = parse_caps(bytes(buf), int(s.cap_offset), "iommu", page_size=page) \
                if s.flags & uapi.VFIO_IOMMU_INFO_CAPS else ()
            ranges = next((c.ranges for c in caps if isinstance(c, IovaRangeCap)), (IovaRange(0, (1 << 64) - 1, page),))
            avail = next((c.avail for c in caps if isinstance(c, DmaAvailCap)), None)
            self.info = IommuInfo(t, iommu_name(t), pgsizes, tuple(ranges), None, avail, caps)
        else:
            info = uapi.vfio_iommu_spapr_tce_info(argsz=ctypes.sizeof(uapi.vfio_iommu_spapr_tce_info))
            self.ioctl(uapi.VFIO_IOMMU_SPAPR_TCE_GET_INFO, info)
            ddw = None
            if info.flags & uapi.VFIO_IOMMU_SPAPR_INFO_DDW:
                ddw = DdwInfo(int(info.ddw.pgsizes), int(info.ddw.max_dynamic_windows_supported), int(info.ddw.levels))
            window = IovaRange(int(info.dma32_window_start),
                               int(info.dma32_window_start) + int(info.dma32_window_size) - 1, 4096)
            self.info = IommuInfo(t, iommu_name(t), 4096, (window,), ddw)
        self._iova.set_ranges(list(self.info.ranges))

    def iova_ranges(self) -> tuple[list[IovaRange], int]:
        """iommufd: IOMMU_IOAS_IOVA_RANGES of the IOAS, and the IOVA alignment
        (the largest IOMMU page size of the attached devices, at least the
        CPU page) -- what every attached device's IOMMU can map."""
        self._check_open("iova_ranges()")
        if not self.iommufd:
            raise VfioUsageError(errno.ENOTTY, self.name, "iova_ranges()", detail="not an iommufd container",
                                 fix="use iommu_info().ranges")
        cmd = iu.iommu_ioas_iova_ranges(size=ctypes.sizeof(iu.iommu_ioas_iova_ranges), ioas_id=self.ioas_id)
        # First with no room: EMSGSIZE, with the number of ranges written back.
        buf = as_buffer(cmd)
        try:
            self.backend.ioctl(self.fd, iu.IOMMU_IOAS_IOVA_RANGES, buf)
        except OSError as exc:
            if exc.errno != errno.EMSGSIZE:
                raise wrap(exc, self.name, "IOMMU_IOAS_IOVA_RANGES") from None
        cmd = from_buffer(iu.iommu_ioas_iova_ranges, buf)
        n = int(cmd.num_iovas)
        ranges: list[tuple[int, int]] = []
        if n:
            width = ctypes.sizeof(iu.iommu_iova_range)
            mem = self.backend.alloc(n * width)
            try:
                cmd.allowed_iovas = mem.addr
                self.ioctl(iu.IOMMU_IOAS_IOVA_RANGES, cmd)
                raw = bytes(mem.view[:int(cmd.num_iovas) * width])
            finally:
                mem.release()
            for i in range(int(cmd.num_iovas)):
                r = iu.iommu_iova_range.from_buffer_copy(raw, i * width)
                ranges.append((int(r.start), int(r.last)))
        align = int(cmd.out_iova_alignment) or self.backend.page_size
        return [IovaRange(lo, hi, align) for lo, hi in ranges], align

    def iommu_info(self) -> IommuInfo:
        """The IOMMU's page sizes and IOVA ranges (sets the IOMMU up if needed)."""
        self._check_open("iommu_info()")
        self._ensure_iommu()
        assert self.info is not None
        return self.info

    @property
    def is_spapr(self) -> bool:
        return self.iommu_type in _SPAPR

    def enable(self) -> None:
        """sPAPR v1: VFIO_IOMMU_ENABLE, which charges the whole DMA window to
        locked memory.  A no-op for the other types."""
        self._check_open("enable()")
        self._ensure_iommu()
        if self.enabled or self.iommu_type != uapi.VFIO_SPAPR_TCE_IOMMU:
            return
        assert self.info is not None
        window = self.info.ranges[0].size if self.info.ranges else 0
        v2 = "or use the sPAPR v2 IOMMU (Container(iommu='spapr-v2')), which locks only the memory you map"
        self.ioctl(uapi.VFIO_IOMMU_ENABLE, 0, ctx=self._memlock_ctx(window, v2))
        self.enabled = True

    def disable(self) -> None:
        """sPAPR v1: VFIO_IOMMU_DISABLE (refunds the window's charge)."""
        self._check_open("disable()")
        if self.enabled:
            self.ioctl(uapi.VFIO_IOMMU_DISABLE, 0)
            self.enabled = False

    def register_memory(self, vaddr: int, size: int) -> None:
        """sPAPR v2: VFIO_IOMMU_SPAPR_REGISTER_MEMORY (pins and charges the range)."""
        self._check_open("register_memory()")
        s = uapi.vfio_iommu_spapr_register_memory(argsz=ctypes.sizeof(uapi.vfio_iommu_spapr_register_memory),
                                                  vaddr=vaddr, size=size)
        self.ioctl(uapi.VFIO_IOMMU_SPAPR_REGISTER_MEMORY, s, ctx=self._memlock_ctx(size))

    def unregister_memory(self, vaddr: int, size: int) -> None:
        """sPAPR v2: VFIO_IOMMU_SPAPR_UNREGISTER_MEMORY."""
        self._check_open("unregister_memory()")
        s = uapi.vfio_iommu_spapr_register_memory(argsz=ctypes.sizeof(uapi.vfio_iommu_spapr_register_memory),
                                                  vaddr=vaddr, size=size)
        self.ioctl(uapi.VFIO_IOMMU_SPAPR_UNREGISTER_MEMORY, s)

    def create_window(self, page_shift: int, window_size: int, levels: int = 1) -> IovaRange:
        """sPAPR v2: VFIO_IOMMU_SPAPR_TCE_CREATE, a dynamic DMA window; the
        allocator places later mappings in it too."""
        self._check_open("create_window()")
        self._ensure_iommu()
        if self.iommu_type != uapi.VFIO_SPAPR_TCE_v2_IOMMU:
            raise VfioUsageError(errno.ENOTTY, self.name, "create_window()",
                                 detail=f"the container uses {iommu_name(self.iommu_type or 0)}; dynamic windows "
                                        f"need sPAPR v2", fix="Container(iommu='spapr-v2')")
        s = uapi.vfio_iommu_spapr_tce_create(argsz=ctypes.sizeof(uapi.vfio_iommu_spapr_tce_create),
                                             page_shift=page_shift, window_size=window_size, levels=levels)
        self.ioctl(uapi.VFIO_IOMMU_SPAPR_TCE_CREATE, s, ctx=self._memlock_ctx(window_size >> page_shift << 3))
        window = IovaRange(int(s.start_addr), int(s.start_addr) + window_size - 1, 1 << page_shift)
        self.windows_created.append(window)
        self._iova.set_ranges(self._iova.ranges + [window])
        return window

    def remove_window(self, start: int) -> None:
        """sPAPR v2: VFIO_IOMMU_SPAPR_TCE_REMOVE (also the default window, start 0)."""
        self._check_open("remove_window()")
        self._ensure_iommu()
        window = next((r for r in self._iova.ranges if r.contains(start)), None)
        inside = [m for m in self.mappings if window is not None and window.contains(m.iova)]
        if inside:
            raise VfioUsageError(errno.EBUSY, self.name, "remove_window()",
                                 detail=f"{len(inside)} mapping(s) are in the window, e.g. {inside[0].name}",
                                 fix="close those mappings first")
        s = uapi.vfio_iommu_spapr_tce_remove(argsz=ctypes.sizeof(uapi.vfio_iommu_spapr_tce_remove), start_addr=start)
        self.ioctl(uapi.VFIO_IOMMU_SPAPR_TCE_REMOVE, s)
        if window is not None:
            self._iova.set_ranges([r for r in self._iova.ranges if r != window])
            if window in self.windows_created:
                self.windows_created.remove(window)

    @property
    def windows(self) -> list[IovaRange]:
        """Where the client places mappings (sPAPR windows or Type1 ranges)."""
        return list(self._iova.ranges)

    # -- DMA ----------------------------------------------------------------------------------------------

    def alloc_buffer(self, size: int, *, page_size: int | None = None) -> DmaBuffer:
        """Zeroed, page-aligned memory for DMA (``page_size`` asks for huge
        pages).  The container frees it when it closes, after unmapping."""
        self._check_open("alloc_buffer()")
        if size <= 0:
            raise VfioUsageError(errno.EINVAL, self.name, "alloc_buffer()", detail=f"size {size} must be positive")
        mem = syscall(self.name, f"alloc_buffer({size:#x})", lambda: self.backend.alloc(size, page_size))
        buf = DmaBuffer(self.backend, mem, owner=self)
        self.buffers.append(buf)
        return buf

    def _forget_buffer(self, buf: DmaBuffer) -> None:
        if buf in self.buffers:
            self.buffers.remove(buf)

    def dma_alloc(self, size: int, *, iova: int | None = None, max_iova: int | None = None, read: bool = True,
                  write: bool = True, page_size: int | None = None) -> DmaMapping:
        """Allocate a buffer and map its first ``size`` bytes (rounded up to the
        IOMMU page); closing the mapping frees the buffer."""
        self._check_open("dma_alloc()")
        if size <= 0:
            raise VfioUsageError(errno.EINVAL, self.name, "dma_alloc()", detail=f"size {size} must be positive")
        self._ensure_iommu()
        assert self.info is not None
        unit = max(self.info.min_page_size, page_size or 0)
        mapped = (size + unit - 1) // unit * unit       # the buffer itself is whole pages of the process
        buf = self.alloc_buffer(size, page_size=page_size)
        try:
            m = self.map(buf, iova=iova, max_iova=max_iova, size=mapped, read=read, write=write)
        except BaseException:
            buf.close()
            raise
        m.owns_buffer = True
        return m

    def map(self, buffer: DmaBuffer, *, iova: int | None = None, max_iova: int | None = None, offset: int = 0,
            size: int | None = None, read: bool = True, write: bool = True) -> DmaMapping:
        """VFIO_IOMMU_MAP_DMA of ``buffer[offset:offset+size]`` at ``iova``
        (allocated inside the IOMMU's ranges, ending at or below ``max_iova``,
        when None).  ``read``/``write`` are the device's rights."""
        call = "map()"
        self._check_open(call)
        if not isinstance(buffer, DmaBuffer):
            raise VfioUsageError(errno.EINVAL, self.name, call, detail=f"{buffer!r} is not a DmaBuffer",
                                 fix="allocate it with Container.alloc_buffer()")
        buffer._check(call)
        if buffer.backend is not self.backend:
            raise VfioUsageError(errno.EINVAL, self.name, call,
                                 detail=f"{buffer.name} belongs to another backend ({buffer.backend!r}, this container "
                                        f"is on {self.backend!r})",
                                 fix="allocate the buffer from this container (or a container on the same backend)")
        size = buffer.size - offset if size is None else size
        if offset < 0 or size <= 0 or offset + size > buffer.size:
            raise VfioUsageError(errno.EINVAL, self.name, call,
                                 detail=f"bytes {offset:#x}+{size:#x} are not inside {buffer.name}")
        if not (read or write):
            raise VfioUsageError(errno.EINVAL, self.name, call, detail="a mapping needs read and/or write")
        self._ensure_iommu()
        assert self.info is not None
        vaddr = buffer.addr + offset
        # Where it goes.
        if iova is None:
            if max_iova is not None and max_iova < 0:
                raise VfioUsageError(errno.EINVAL, self.name, call, detail=f"max_iova {max_iova:#x} is negative")
            got = self._iova.allocate(size, max_iova=max_iova)
            if got is None:
                limit = f" below {max_iova:#x}" if max_iova is not None else ""
                raise VfioUsageError(errno.ENOSPC, self.name, call,
                                     detail=f"no free IOVA range of {format_size(size)}{limit} in "
                                            f"{', '.join(str(r) for r in self._iova.ranges) or 'no window'}",
                                     fix="unmap something, map less, or (sPAPR v2) create_window() a bigger window")
            iova = got
        else:
            hit = self._iova.overlap(iova, size)
            if hit is not None:
                other = next((m.name for m in self.mappings if m.iova == hit[0]), hexrange(*hit))
                raise VfioUsageError(errno.EEXIST, self.name, call,
                                     detail=f"IOVA {hexrange(iova, size)} overlaps {other}",
                                     fix="close that mapping first, or leave iova=None to get a free range")
            if self.auto and self._iova.range_of(iova, size) is None:
                raise VfioUsageError(errno.ENXIO, self.name, call,
                                     detail=f"IOVA {hexrange(iova, size)} is not inside one IOMMU range: "
                                            f"{', '.join(str(r) for r in self._iova.ranges) or 'none'}",
                                     fix="map inside a range (or leave iova=None)")
            if max_iova is not None and iova + size - 1 > max_iova:
                raise VfioUsageError(errno.EINVAL, self.name, call,
                                     detail=f"IOVA {hexrange(iova, size)} ends above max_iova {max_iova:#x}")
            self._iova.reserve(iova, size)
        window = self._iova.range_of(iova, size)
        page = window.page_size if window is not None else self.info.min_page_size
        try:
            if vaddr % page or size % page or iova % page:
                raise VfioUsageError(errno.EINVAL, self.name, call,
                                     detail=f"vaddr {vaddr:#x}, size {size:#x} and iova {iova:#x} must be multiples of "
                                            f"the IOMMU page size {page:#x}")
            flags = (uapi.VFIO_DMA_MAP_FLAG_READ if read else 0) | (uapi.VFIO_DMA_MAP_FLAG_WRITE if write else 0)
            self._map_dma(buffer, vaddr, iova, size, flags)
        except BaseException:
            self._iova.release(iova)
            raise
        m = DmaMapping(self, buffer, offset, iova, size, flags)
        self.mappings.append(m)
        buffer.mappings.append(m)
        return m

    def _map_dma(self, buffer: DmaBuffer, vaddr: int, iova: int, size: int, flags: int) -> None:
        t = self.iommu_type
        registered = False
        if self.auto and t == uapi.VFIO_SPAPR_TCE_IOMMU and not self.enabled:
            self.enable()
        if self.auto and t == uapi.VFIO_SPAPR_TCE_v2_IOMMU:
            registered = self._prereg_get(buffer)
        try:
            self._map_ioctl(vaddr, iova, size, flags)
        except BaseException:
            if registered:
                self._prereg_put(buffer)
            raise

    def _map_ioctl(self, vaddr: int, iova: int, size: int, flags: int) -> None:
        if self.iommufd:
            self._ioas_map(vaddr, iova, size, flags)
            return

        def one(va: int, io: int, n: int) -> None:
            s = uapi.vfio_iommu_type1_dma_map(argsz=ctypes.sizeof(uapi.vfio_iommu_type1_dma_map), flags=flags,
                                              vaddr=va, iova=io, size=n)
            ctx: dict[str, Any] = {"iova": f"{io:#x}", "size": f"{n:#x}",
                                   "windows": ", ".join(str(r) for r in self._iova.ranges)}
            if self.iommu_type in _TYPE1:
                ctx.update(self._memlock_ctx(n))
            elif self.iommu_type == uapi.VFIO_SPAPR_TCE_v2_IOMMU:
                ctx.update(self._memlock_ctx(0))
                ctx["lock_bytes"] = None
                ctx["memlock_note"] = ("the first mapping creates the default DMA window, and its TCE table is "
                                       "charged to locked memory too")
            ret = self.ioctl(uapi.VFIO_IOMMU_MAP_DMA, s, ctx=ctx)
            if ret != 0:
                # sPAPR returns 1, not -EINVAL, for an IOVA off the IOMMU page
                # (iommu_tce_put_param_check ORs two errors into a boolean).
                raise VfioError(errno.EINVAL, self.name, "VFIO_IOMMU_MAP_DMA",
                                detail=f"the kernel returned {ret} and mapped nothing",
                                cause=f"IOVA {io:#x} or vaddr {va:#x} is not aligned to the window's IOMMU page",
                                fix="align both to the IOMMU page size")
        try:
            one(vaddr, iova, size)
        except VfioError as exc:
            if not (self.iommu_type == uapi.VFIO_SPAPR_TCE_IOMMU and exc.errno == errno.EINVAL and size > _SEED_PAGE):
                raise
            # The 3.10 sPAPR driver maps exactly one 4 KiB page per call.
            done = 0
            try:
                while done < size:
                    one(vaddr + done, iova + done, _SEED_PAGE)
                    done += _SEED_PAGE
            except BaseException:
                if done:
                    self._unmap_ioctl(iova, done)
                raise exc from None

    def _ioas_map(self, vaddr: int, iova: int, size: int, flags: int) -> None:
        """IOMMU_IOAS_MAP at the IOVA the client chose (FIXED_IOVA)."""
        iflags = iu.IOMMU_IOAS_MAP_FIXED_IOVA
        if flags & uapi.VFIO_DMA_MAP_FLAG_READ:
            iflags |= iu.IOMMU_IOAS_MAP_READABLE
        if flags & uapi.VFIO_DMA_MAP_FLAG_WRITE:
            iflags |= iu.IOMMU_IOAS_MAP_WRITEABLE
        cmd = iu.iommu_ioas_map(size=ctypes.sizeof(iu.iommu_ioas_map), flags=iflags, ioas_id=self.ioas_id,
                                user_va=vaddr, length=size, iova=iova)
        ctx: dict[str, Any] = {"iova": f"{iova:#x}", "size": f"{size:#x}",
                               "windows": ", ".join(str(r) for r in self._iova.ranges)}
        ctx.update(self._memlock_ctx(size))
        ctx["locked_bytes"] = None
        ctx["memlock_note"] = ("iommufd charges the pages it pins to the user, every process of the uid together "
                               "(user->locked_vm), which /proc does not show")
        self.ioctl(iu.IOMMU_IOAS_MAP, cmd, ctx=ctx)

    def _unmap_ioctl(self, iova: int, size: int) -> None:
        if self.iommufd:
            cmd = iu.iommu_ioas_unmap(size=ctypes.sizeof(iu.iommu_ioas_unmap), ioas_id=self.ioas_id, iova=iova,
                                      length=size)
            self.ioctl(iu.IOMMU_IOAS_UNMAP, cmd)
            if cmd.length != size:
                raise VfioError(errno.EINVAL, self.name, "IOMMU_IOAS_UNMAP",
                                detail=f"unmapping {hexrange(iova, size)} unmapped {int(cmd.length):#x} bytes")
            return
        s = uapi.vfio_iommu_type1_dma_unmap(argsz=ctypes.sizeof(uapi.vfio_iommu_type1_dma_unmap), iova=iova, size=size)
        ret = self.ioctl(uapi.VFIO_IOMMU_UNMAP_DMA, s)
        if ret != 0 or (self.iommu_type in _TYPE1 and s.size != size):
            raise VfioError(errno.EINVAL, self.name, "VFIO_IOMMU_UNMAP_DMA",
                            detail=f"unmapping {hexrange(iova, size)} returned {ret} and unmapped {int(s.size):#x} bytes")

    def _prereg_get(self, buffer: DmaBuffer) -> bool:
        entry = self._prereg.get(id(buffer))
        if entry is not None:
            entry[1] += 1
            return True
        self.register_memory(buffer.addr, buffer.size)
        self._prereg[id(buffer)] = [buffer, 1]
        return True

    def _prereg_put(self, buffer: DmaBuffer) -> None:
        entry = self._prereg.get(id(buffer))
        if entry is None:
            return
        entry[1] -= 1
        if entry[1] <= 0:
            del self._prereg[id(buffer)]
            self.unregister_memory(buffer.addr, buffer.size)

    def _unmap(self, m: DmaMapping) -> None:
        """VFIO_IOMMU_UNMAP_DMA of a mapping; its bookkeeping goes even if
        the kernel refuses (the container is then in an unknown state)."""
        if m.closed:
            return
        error: BaseException | None = None
        if not self.closed:
            try:
                self._unmap_ioctl(m.iova, m.size)
            except BaseException as exc:
                error = exc
        m.closed = True
        self._iova.release(m.iova)
        if m in self.mappings:
            self.mappings.remove(m)
        if m in m.buffer.mappings:
            m.buffer.mappings.remove(m)
        if not self.closed and self.auto and self.iommu_type == uapi.VFIO_SPAPR_TCE_v2_IOMMU:
            try:
                self._prereg_put(m.buffer)
            except BaseException as exc:
                error = error or exc
        if m.owns_buffer:
            try:
                m.buffer.close()
            except BaseException as exc:
                error = error or exc
        if error is not None:
            raise error

    # -- closing ------------------------------------------------------------------------------------------

    def _release_dma(self) -> list[BaseException]:
        """Unmap every mapping, unregister preregistered memory, disable (v1);
        buffers stay allocated (they go last).  Returns the failures."""
        errors: list[BaseException] = []
        for m in list(self.mappings):
            m.owns_buffer = False           # every owned buffer is in self.buffers too
            try:
                self._unmap(m)
            except BaseException as exc:
                errors.append(exc)
        for buf, _ in list(self._prereg.values()):
            try:
                self.unregister_memory(buf.addr, buf.size)
            except BaseException as exc:
                errors.append(exc)
        self._prereg.clear()
        if self.enabled:
            try:
                self.disable()
            except BaseException as exc:
                errors.append(exc)
        return errors

    def _iommu_released(self) -> None:
        """The last group left: the kernel released the IOMMU backend (an
        iommufd's IOAS stays, with its mappings)."""
        if self.iommufd:
            return
        self.iommu_type = None
        self.info = None
        self.enabled = False
        self.windows_created.clear()
        self._iova = IovaAllocator()

    def close(self) -> None:
        """Release everything, in the kernel's order (see the module doc)."""
        if self.closed:
            return
        errors: list[BaseException] = []

        def attempt(fn: Any, *args: Any) -> None:
            try:
                fn(*args)
            except BaseException as exc:
                errors.append(exc)

        for d in list(self.devices.values()):
            attempt(d.close)
        for g in list(self.groups.values()):
            for d in list(g.devices.values()):
                attempt(d.close)
        errors.extend(self._release_dma())
        for g in list(self.groups.values()):
            attempt(g.close)
        if hasattr(self, "fd"):
            attempt(self.backend.close, self.fd)
        self.closed = True
        for buf in list(self.buffers):
            attempt(buf.close)
        self.buffers.clear()
        if errors:
            first = errors[0]
            if isinstance(first, OSError) and not isinstance(first, VfioError):
                raise wrap(first, self.name, "close()")
            raise first

    def __enter__(self) -> "Container":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        iommu = iommu_name(self.iommu_type) if self.iommu_type is not None else "no IOMMU yet"
        if self.iommufd:
            iommu += f" IOAS {self.ioas_id}"
        state = "closed" if self.closed else f"groups {sorted(self.groups)}, {len(self.mappings)} mapping(s)"
        if self.devices and not self.closed:
            state += f", cdevs {sorted(self.devices)}"
        return f"<{self.name} {iommu}, {state}>"


def resolve_device(backend: Backend, name: str, obj: str, call: str) -> PciDeviceInfo:
    """The one device ``name`` (a PCI address or vendor:device) means."""
    devices = backend.pci_devices()
    listing = "; ".join(str(d) for d in devices) or "none"
    try:
        if name.count(":") == 1 and "." not in name:
            found = select_devices(devices, ids=name)
        else:
            found = select_devices(devices, bdf=normalize_bdf(name))
    except ValueError as exc:
        raise VfioUsageError(errno.EINVAL, obj, call, detail=str(exc),
                             fix="name a device by PCI address (0000:01:00.0) or vendor:device (1234:11e8)") from None
    if not found:
        raise VfioUsageError(errno.ENODEV, obj, call, detail=f"no PCI device matches {name!r}",
                             cause=f"the {backend.name} backend's devices are: {listing}",
                             fix="use one of those addresses")
    # vendor:device may match several: the first (by address) bound to vfio-pci.
    return next((d for d in found if d.vfio_ready), found[0])


class Group:
    """An open ``/dev/vfio/<N>`` in a container (``Container.group(N)``)."""

    def __init__(self, container: Container, group_id: int) -> None:
        self.container = container
        self.id = group_id
        self.devices: dict[str, Device] = {}
        self.closed = True
        backend = container.backend
        path = f"/dev/vfio/{group_id}"
        self.fd = syscall(self.name, f'open("{path}")', lambda: backend.open(path, os.O_RDWR | os.O_CLOEXEC),
                          {"group": group_id}, key="open group")
        self.closed = False
        try:
            flags = self.status()
            if not flags & uapi.VFIO_GROUP_FLAGS_VIABLE:
                members = [d for d in backend.pci_devices() if d.iommu_group == group_id]
                raise VfioError(errno.EPERM, self.name, "VFIO_GROUP_GET_STATUS", detail=f"group {group_id} is not viable",
                                cause=f"a device in it is bound to a host driver: "
                                      f"{', '.join(f'{d.bdf} ({d.driver})' for d in members) or 'unknown'}",
                                fix="bind every device of the group to vfio-pci")
            fd = ctypes.c_int32(container.fd)
            buf = bytearray(bytes(fd))
            syscall(self.name, "VFIO_GROUP_SET_CONTAINER",
                    lambda: backend.ioctl(self.fd, uapi.VFIO_GROUP_SET_CONTAINER, buf),
                    lambda: {"group": group_id, "devices": ", ".join(
                        f"{d.bdf} ({d.driver})" for d in backend.pci_devices() if d.iommu_group == group_id)})
        except BaseException:
            backend.close(self.fd)
            self.closed = True
            raise

    @property
    def name(self) -> str:
        return f"Group({self.id})"

    def _check_open(self, call: str) -> None:
        if self.closed:
            raise VfioUsageError(errno.EBADF, self.name, call, detail="the group is closed")

    def status(self) -> int:
        """VFIO_GROUP_GET_STATUS flags (VIABLE, CONTAINER_SET)."""
        self._check_open("status()")
        s = uapi.vfio_group_status(argsz=ctypes.sizeof(uapi.vfio_group_status))
        buf = as_buffer(s)
        syscall(self.name, "VFIO_GROUP_GET_STATUS",
                lambda: self.container.backend.ioctl(self.fd, uapi.VFIO_GROUP_GET_STATUS, buf))
        return int(from_buffer(uapi.vfio_group_status, buf).flags)

    @property
    def viable(self) -> bool:
        return bool(self.status() & uapi.VFIO_GROUP_FLAGS_VIABLE)

    def pci_devices(self) -> list[PciDeviceInfo]:
        """The group's devices, from sysfs."""
        return [d for d in self.container.backend.pci_devices() if d.iommu_group == self.id]

    def device(self, name: str) -> "Device":
        """VFIO_GROUP_GET_DEVICE_FD (the container's IOMMU is set up first)."""
        from .device import Device
        call = f"device({name!r})"
        self._check_open(call)
        self.container._check_open(call)
        if name in self.devices:
            return self.devices[name]
        self.container._ensure_iommu()
        buf = bytearray(name.encode() + b"\0")
        backend = self.container.backend
        try:
            fd = backend.ioctl(self.fd, uapi.VFIO_GROUP_GET_DEVICE_FD, buf)
        except OSError as exc:
            members = ", ".join(d.bdf for d in self.pci_devices()) or "none"
            raise wrap(exc, self.name, "VFIO_GROUP_GET_DEVICE_FD", {"group": self.id, "name": name, "devices": members},
                       usage=exc.errno == errno.ENODEV) from None
        try:
            dev = Device(self, name, fd)
        except BaseException:
            backend.close(fd)
            raise
        self.devices[name] = dev
        if self.container.iommufd:
            self.container._read_info()     # the device attached to the IOAS, narrowing its ranges
        return dev

    def _forget_device(self, dev: "Device") -> None:
        if self.devices.get(dev.name_in_group) is dev:
            del self.devices[dev.name_in_group]

    def close(self) -> None:
        """Close its devices, leave the container, close the group fd."""
        if self.closed:
            return
        errors: list[BaseException] = []
        for d in list(self.devices.values()):
            try:
                d.close()
            except BaseException as exc:
                errors.append(exc)
        c = self.container
        last = list(c.groups.values()) == [self]
        if last and not c.closed and not c.iommufd:
            errors.extend(c._release_dma())     # the kernel would drop them with the IOMMU anyway
        backend = c.backend
        try:
            syscall(self.name, "VFIO_GROUP_UNSET_CONTAINER",
                    lambda: backend.ioctl(self.fd, uapi.VFIO_GROUP_UNSET_CONTAINER, 0))
        except BaseException as exc:
            errors.append(exc)
        try:
            syscall(self.name, "close()", lambda: backend.close(self.fd))
        except BaseException as exc:
            errors.append(exc)
        self.closed = True
        if c.groups.get(self.id) is self:
            del c.groups[self.id]
        if last:
            c._iommu_released()
        if errors:
            raise errors[0]

    def __enter__(self) -> "Group":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<{self.name} fd {self.fd}{' closed' if self.closed else ''} devices {sorted(self.devices)}>"
