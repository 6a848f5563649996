"""Device discovery: the PCI devices of sysfs, as the client sees them.

On a real host the :class:`~vfiosim.client.backend.RealBackend` reads
``/sys/bus/pci/devices/*/{vendor,device,class,iommu_group,driver,vfio-dev}``; the
:class:`~vfiosim.client.backend.SimBackend` builds the same records from its
simulated machine.  Either way the user gets :class:`PciDeviceInfo` values
and filters them with :func:`select_devices`.
"""

from __future__ import annotations

import errno
import os
import re
from dataclasses import dataclass
from typing import Callable, Iterable

from .errors import VfioError

__all__ = ["PciDeviceInfo", "select_devices", "parse_ids", "normalize_bdf", "read_sysfs_devices"]

_BDF = re.compile(r"^(?:([0-9a-fA-F]{1,4}):)?([0-9a-fA-F]{1,2}):([0-9a-fA-F]{1,2})\.([0-7])$")


@dataclass(frozen=True)
class PciDeviceInfo:
    """One PCI function as sysfs shows it."""

    bdf: str                    #: ``DDDD:BB:SS.F``, lower case
    vendor: int                 #: ``vendor`` (0x1234)
    device: int                 #: ``device`` (0x11e8)
    class_code: int             #: ``class``: base, sub-class and prog-if (0x00ff00)
    iommu_group: int | None     #: the ``iommu_group`` link's number, None without an IOMMU
    driver: str | None          #: the bound driver (``vfio-pci``), None when unbound
    #: the VFIO device's name (``vfio-dev/vfioN``: its cdev is /dev/vfio/devices/vfioN
    #: when the kernel has CONFIG_VFIO_DEVICE_CDEV), None when VFIO has not got it
    vfio_dev: str | None = None

    @property
    def ids(self) -> str:
        """``vendor:device`` as lspci -n prints it (``1234:11e8``)."""
        return f"{self.vendor:04x}:{self.device:04x}"

    @property
    def vfio_ready(self) -> bool:
        """Bound to vfio-pci and in an IOMMU group: a Container can open it."""
        return self.driver == "vfio-pci" and self.iommu_group is not None

    def __str__(self) -> str:
        group = "no IOMMU group" if self.iommu_group is None else f"group {self.iommu_group}"
        return f"{self.bdf} [{self.ids}] class {self.class_code:06x} {group} driver {self.driver or '(none)'}"


def normalize_bdf(bdf: str) -> str:
    """``1:0.0`` or ``0000:01:00.0`` -> ``0000:01:00.0``; ValueError otherwise."""
    m = _BDF.match(bdf.strip())
    if m is None:
        raise ValueError(f"{bdf!r} is not a PCI address (DDDD:BB:SS.F)")
    dom, bus, slot, fn = m.groups()
    return f"{int(dom or '0', 16):04x}:{int(bus, 16):02x}:{int(slot, 16):02x}.{int(fn)}"


def parse_ids(ids: str) -> tuple[int | None, int | None]:
    """``"1234:11e8"`` -> (0x1234, 0x11e8); either side may be ``*`` or empty."""
    vendor, sep, device = ids.partition(":")
    if not sep:
        raise ValueError(f"{ids!r} is not vendor:device (e.g. 1234:11e8)")

    def one(text: str) -> int | None:
        text = text.strip()
        return None if text in ("", "*") else int(text, 16)
    return one(vendor), one(device)


def select_devices(devices: Iterable[PciDeviceInfo], *, bdf: str | None = None, ids: str | None = None,
                   vendor: int | None = None, device: int | None = None, group: int | None = None,
                   driver: str | None = None) -> list[PciDeviceInfo]:
    """The devices matching every given criterion, sorted by address."""
    want_bdf = normalize_bdf(bdf) if bdf is not None else None
    if ids is not None:
        v, d = parse_ids(ids)
        vendor = v if v is not None else vendor
        device = d if d is not None else device
    out = [d for d in devices
           if (want_bdf is None or d.bdf == want_bdf)
           and (vendor is None or d.vendor == vendor)
           and (device is None or d.device == device)
           and (group is None or d.iommu_group == group)
           and (driver is None or d.driver == driver)]
    return sorted(out, key=lambda d: d.bdf)


def read_sysfs_devices(root: str, listdir: Callable[[str], list[str]], read_text: Callable[[str], str],
                       readlink: Callable[[str], str]) -> list[PciDeviceInfo]:
    """Read ``<root>/bus/pci/devices`` through the given file functions.

    A listing that cannot be read, or a device whose files this process may
    not read, raises :class:`VfioError` with the cause and the fix (a bare
    PermissionError said neither); a device that went away is skipped."""
    base = f"{root.rstrip('/')}/bus/pci/devices"
    try:
        names = listdir(base)
    except OSError as exc:
        raise _unreadable(exc, base) from None
    out = []
    for name in sorted(names):
        path = f"{base}/{name}"
        try:
            vendor = int(read_text(f"{path}/vendor").strip(), 16)
            device = int(read_text(f"{path}/device").strip(), 16)
            class_code = int(read_text(f"{path}/class").strip(), 16)
        except OSError as exc:
            if exc.errno in (errno.EACCES, errno.EPERM):
                raise _unreadable(exc, exc.filename or f"{path}/vendor") from None
            continue            # a function that went away, or not a PCI function directory
        except ValueError:
            continue
        out.append(PciDeviceInfo(bdf=normalize_bdf(name), vendor=vendor, device=device, class_code=class_code,
                                 iommu_group=_link_number(readlink, f"{path}/iommu_group"),
                                 driver=_link_name(readlink, f"{path}/driver"),
                                 vfio_dev=_vfio_dev(listdir, path)))
    return out


def _vfio_dev(listdir: Callable[[str], list[str]], path: str) -> str | None:
    """``vfio-dev/vfioN`` (Linux 6.1+: vfio_device_add() registers every VFIO
    device in the vfio-dev class, cdev or not)."""
    try:
        names = [n for n in listdir(f"{path}/vfio-dev") if n.startswith("vfio")]
    except OSError:
        return None
    return sorted(names)[0] if names else None


def _link_name(readlink: Callable[[str], str], path: str) -> str | None:
    try:
        return readlink(path).rstrip("/").rsplit("/", 1)[-1]
    except OSError:
        return None


def _link_number(readlink: Callable[[str], str], path: str) -> int | None:
    name = _link_name(readlink, path)
    try:
        return int(name) if name is not None else None
    except ValueError:
        return None


def _unreadable(exc: OSError, path: str) -> VfioError:
    number = exc.errno or errno.EIO
    if number in (errno.EACCES, errno.EPERM):
        cause = (f"{path} is not readable by this process (uid {os.geteuid()}): sysfs is restricted here (a "
                 f"container or a hardened mount), or, under `vfiosim run`, the program changed its uid and the "
                 f"fake sysfs tree is not its own")
        fix = ("list the devices before dropping privileges, or run as a user who may read /sys/bus/pci (under "
               "`vfiosim run`, start it as the program's final user)")
    elif number == errno.ENOENT:
        cause = f"{path} does not exist: sysfs is not mounted at {path.rsplit('/bus/', 1)[0]}, or there is no PCI bus"
        fix = "mount sysfs (`mount -t sysfs sysfs /sys`), or pass the right sysfs_root to RealBackend"
    else:
        cause, fix = f"{path} cannot be read", None
    return VfioError(number, "sysfs", "pci_devices()", cause=cause, fix=fix)
