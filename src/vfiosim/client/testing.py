"""A fake kernel boundary for testing code on the :class:`RealBackend` path.

:class:`SimulatedHost` is a :class:`~vfiosim.client.backend.HostOs` whose
``open``, ``ioctl``, ``pread``, ``mmap``, ``eventfd``, ``select`` and sysfs
reads are answered by a process on a simulated machine, so they fail with
the errno the kernel gives.  Every call is recorded in ``calls``.  What the
simulated kernel cannot do is faked at the boundary, as documented:

* ``mmap`` of a device region returns a zeroed ``bytearray`` that stands in
  for the BAR (``region_maps`` holds it, keyed by ``(fd, offset)``); loads
  and stores through it do not reach the device model.  With
  ``region_mmap=False`` such an mmap fails with EINVAL instead, as a kernel
  refusing it would, and the client falls back to pread/pwrite.
* ``sparse_mmap={region_index: [(offset, size), ...]}`` makes
  VFIO_DEVICE_GET_REGION_INFO report a SPARSE_MMAP capability for that
  region, with the kernel's argsz protocol (CAPS flag and a larger argsz
  first, the chain when argsz leaves room).
* sysfs (``/sys/bus/pci/devices``) and ``/proc/self/status`` are generated
  from the machine.

::

    host = SimulatedHost(vfiosim.Machine.default().spawn())
    backend = RealBackend(host)          # the code path of a real host
"""

from __future__ import annotations

import ctypes
import errno
import mmap as _mmap
import os
import time
from typing import TYPE_CHECKING, Any

from ..uapi import iommufd as iu
from ..uapi import vfio as uapi
from .backend import HostOs, _Buffer

if TYPE_CHECKING:
    from ..machine import Process

__all__ = ["SimulatedHost"]

_MAP_HUGETLB = 0x40000
_REGION_SHIFT = 40


class SimulatedHost(HostOs):
    """The host functions of :class:`RealBackend`, answered by a simulated process."""

    selectable = False          # its fds are the simulated process's, not the host's

    def __init__(self, process: "Process", *, region_mmap: bool = True,
                 sparse_mmap: dict[int, list[tuple[int, int]]] | None = None) -> None:
        self.process = process
        self.machine = process.machine
        self.region_mmap = region_mmap
        self.sparse_mmap = dict(sparse_mmap or {})
        self.calls: list[tuple[str, tuple[Any, ...]]] = []
        #: (fd, offset) -> the bytearray standing in for an mmapped region
        self.region_maps: dict[tuple[int, int], bytearray] = {}
        self._anon: dict[int, tuple[int, int]] = {}       # id(buffer) -> (addr, length)
        self._keep: dict[int, _Buffer] = {}

    def _record(self, name: str, *args: Any) -> None:
        self.calls.append((name, args))

    def names(self) -> list[str]:
        """The recorded calls' names, in order."""
        return [name for name, _ in self.calls]

    # -- files
    def open(self, path: str, flags: int) -> int:
        self._record("open", path, flags)
        return self.process.open(path, flags)

    def close(self, fd: int) -> None:
        self._record("close", fd)
        self.process.close(fd)

    def ioctl(self, fd: int, request: int, arg: int | bytearray) -> int:
        self._record("ioctl", fd, uapi.ioctl_name(request & 0xFFFFFFFF) or iu.ioctl_name(request & 0xFFFFFFFF)
                     or hex(request),
                     arg if isinstance(arg, int) else bytes(arg))
        ret = self.process.ioctl(fd, request, arg)
        if request == uapi.VFIO_DEVICE_GET_REGION_INFO and isinstance(arg, bytearray):
            self._add_sparse_cap(arg)
        return ret

    def _add_sparse_cap(self, buf: bytearray) -> None:
        """vfio_info_add_capability() of a SPARSE_MMAP capability."""
        base = ctypes.sizeof(uapi.vfio_region_info)
        if len(buf) < base:
            return
        info = uapi.vfio_region_info.from_buffer(buf)
        areas = self.sparse_mmap.get(int(info.index))
        if areas is None:
            return
        cap = uapi.vfio_region_info_cap_sparse_mmap(nr_areas=len(areas))
        cap.header.id = uapi.VFIO_REGION_INFO_CAP_SPARSE_MMAP
        cap.header.version = 1
        body = bytes(cap) + b"".join(bytes(uapi.vfio_region_sparse_mmap_area(offset=o, size=s)) for o, s in areas)
        need = base + len(body)
        info.flags |= uapi.VFIO_REGION_INFO_FLAG_CAPS
        if info.argsz < need:
            info.argsz = need
            info.cap_offset = 0
        else:
            info.cap_offset = base
            buf[base:need] = body
        del info

    def pread(self, fd: int, n: int, offset: int) -> bytes:
        self._record("pread", fd, n, offset)
        return self.process.pread(fd, n, offset)

    def pwrite(self, fd: int, data: bytes, offset: int) -> int:
        self._record("pwrite", fd, bytes(data), offset)
        return self.process.pwrite(fd, data, offset)

    def read(self, fd: int, n: int) -> bytes:
        self._record("read", fd, n)
        return self.process.read(fd, n)

    def write(self, fd: int, data: bytes) -> int:
        self._record("write", fd, bytes(data))
        return self.process.write(fd, data)

    def eventfd(self, initval: int, flags: int) -> int:
        self._record("eventfd", initval, flags)
        return self.process.eventfd(initval, flags)

    def select(self, fds: list[int], timeout: float) -> list[int]:
        self._record("select", list(fds), timeout)
        ready = [fd for fd in fds if self._readable(fd)]
        if not ready and timeout > 0:
            time.sleep(min(timeout, 0.001))
        return ready

    def _readable(self, fd: int) -> bool:
        file = self.process.task.files.get(fd)
        readable = getattr(file, "readable", None)
        return bool(readable()) if callable(readable) else True

    # -- memory
    def mmap(self, fd: int, length: int, prot: int, flags: int, offset: int) -> _Buffer:
        self._record("mmap", fd, length, prot, flags, offset)
        p = self.process
        if fd == -1:
            page_size = 1 << ((flags >> 26) & 0x3F) if flags & _MAP_HUGETLB else None
            addr = p.mmap(length, prot, page_size=page_size)
            view = p.memory_view(addr, length)
            self._anon[id(view)] = (addr, length)
            self._keep[id(view)] = view
            return view
        # A device region (vfio_pci_core_mmap's checks).
        p.task.files.get(fd)                    # EBADF if not open
        index = offset >> _REGION_SHIFT
        if not self.region_mmap or index > uapi.VFIO_PCI_BAR5_REGION_INDEX or not flags & _mmap.MAP_SHARED \
                or offset & (self.machine.page_size - 1) or length <= 0:
            raise OSError(errno.EINVAL, os.strerror(errno.EINVAL))
        buf = bytearray(length)
        self.region_maps[(fd, offset)] = buf
        return buf

    def buffer_address(self, buf: _Buffer) -> int:
        return self._anon[id(buf)][0]

    def munmap(self, buf: _Buffer) -> None:
        self._record("munmap", id(buf))
        entry = self._anon.pop(id(buf), None)
        self._keep.pop(id(buf), None)
        if entry is not None and self.process.alive:
            self.process.munmap(*entry)

    # -- identity and limits
    def page_size(self) -> int:
        return self.machine.page_size

    def getrlimit(self, res: int) -> tuple[int, int]:
        return self.process.getrlimit(res)

    def geteuid(self) -> int:
        return self.process.geteuid()

    def getpid(self) -> int:
        return self.process.pid

    # -- sysfs and /proc
    def _sysfs(self) -> dict[str, dict[str, str]]:
        out: dict[str, dict[str, str]] = {}
        for gid, bdfs in self.machine.iommu_groups().items():
            for bdf in bdfs:
                d = self.machine.device(bdf)
                entry = {"vendor": f"0x{d.vendor:04x}\n", "device": f"0x{d.device_id:04x}\n",
                         "class": f"0x{d.class_code:06x}\n",
                         "@iommu_group": f"../../../../kernel/iommu_groups/{gid}"}
                if d.driver:
                    entry["@driver"] = f"../../../../bus/pci/drivers/{d.driver}"
                vfio_dev = self.machine.vfio_dev(d.bdf)
                if vfio_dev is not None:
                    entry["/vfio-dev"] = vfio_dev
                out[d.bdf] = entry
        return out

    def listdir(self, path: str) -> list[str]:
        self._record("listdir", path)
        if path.rstrip("/") == "/sys/bus/pci/devices":
            return sorted(self._sysfs())
        prefix = "/sys/bus/pci/devices/"
        if path.startswith(prefix) and path.rstrip("/").endswith("/vfio-dev"):
            entry = self._sysfs().get(path[len(prefix):].split("/")[0], {})
            if "/vfio-dev" in entry:
                return [entry["/vfio-dev"]]
        raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), path)

    def _lookup(self, path: str, link: bool) -> str:
        prefix = "/sys/bus/pci/devices/"
        if path.startswith(prefix):
            bdf, _, attr = path[len(prefix):].partition("/")
            entry = self._sysfs().get(bdf, {})
            value = entry.get(("@" if link else "") + attr)
            if value is not None:
                return value
        raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), path)

    def read_text(self, path: str) -> str:
        self._record("read_text", path)
        if path == "/proc/self/status":
            st = self.process.status()
            return "".join(f"{k}:\t{v}\n" if k not in ("VmLck", "VmPin", "VmSize", "VmRSS") else f"{k}:\t{v} kB\n"
                           for k, v in st.items())
        return self._lookup(path, link=False)

    def readlink(self, path: str) -> str:
        self._record("readlink", path)
        return self._lookup(path, link=True)
