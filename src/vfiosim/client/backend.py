"""Backends: where the client's system calls go.

A :class:`Backend` is the thin edge of the client: open, close, ioctl,
pread/pwrite, eventfds, memory for DMA, mmap of device regions and the sysfs
view of PCI devices.  Two implementations:

* :class:`SimBackend` -- a process on a simulated :class:`vfiosim.Machine`
  (every call is one system call of :class:`vfiosim.Process`).
* :class:`RealBackend` -- the host kernel: ``os.open``, ``fcntl.ioctl``,
  ``os.pread``/``os.pwrite``, ``mmap``, ``os.eventfd``, ``select`` and
  ``/sys``.  All of those go through one :class:`HostOs` object, which
  tests replace with a fake kernel boundary
  (:class:`vfiosim.client.testing.SimulatedHost`).

:func:`get_backend` picks one: an explicit argument, else the default set
with :func:`use_backend` (the pytest plugin sets it for each test), else the
environment: ``VFIOSIM_BACKEND=sim|real`` (default ``sim``), and for the
simulator ``VFIOSIM_MACHINE`` (a preset name or a machine file; default
``powernv``), ``VFIOSIM_KERNEL`` and ``VFIOSIM_PAGE_SIZE``.
"""

from __future__ import annotations

import asyncio
import ctypes
import errno
import fcntl
import mmap
import os
import resource
import select
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Iterator, Protocol, Union, runtime_checkable

from ..machine import KERNEL_ENV, MACHINE_ENV, PAGE_SIZE_ENV, machine_settings  # noqa: F401  (re-exported)
from .errors import VfioUsageError
from .sysfs import PciDeviceInfo, read_sysfs_devices

if TYPE_CHECKING:
    from ..machine import Machine, Process

__all__ = ["Backend", "SimBackend", "RealBackend", "HostOs", "HostMemory", "get_backend", "use_backend",
           "set_default_backend", "BACKEND_ENV", "MACHINE_ENV"]

BACKEND_ENV = "VFIOSIM_BACKEND"

# Linux's MAP_HUGETLB and MAP_HUGE_SHIFT (<linux/mman.h>); Python's mmap module
# does not export them.
_MAP_HUGETLB = 0x40000
_MAP_HUGE_SHIFT = 26


@dataclass
class HostMemory:
    """Memory a backend handed out: its address in the process and a view."""

    addr: int
    size: int
    view: memoryview
    _release: Callable[[], None] = field(repr=False)
    released: bool = False

    def release(self) -> None:
        if not self.released:
            self.released = True
            self._release()


@runtime_checkable
class Backend(Protocol):
    """The system calls the client makes.  Every method raises ``OSError``
    with the kernel's errno on failure."""

    name: str
    page_size: int
    supports_region_mmap: bool

    def open(self, path: str, flags: int) -> int: ...

    def close(self, fd: int) -> None: ...

    def ioctl(self, fd: int, request: int, arg: int | bytearray) -> int: ...

    def pread(self, fd: int, n: int, offset: int) -> bytes: ...

    def pwrite(self, fd: int, data: bytes, offset: int) -> int: ...

    def read(self, fd: int, n: int) -> bytes: ...

    def write(self, fd: int, data: bytes) -> int: ...

    def eventfd(self) -> int:
        """A non-blocking, close-on-exec eventfd with counter 0."""
        ...

    def wait_readable(self, fd: int, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for ``fd`` to become readable (may
        return early; the caller retries its read)."""
        ...

    async def wait_readable_async(self, fd: int, timeout: float) -> bool: ...

    def alloc(self, size: int, page_size: int | None = None) -> HostMemory:
        """Anonymous read-write memory (zeroed, populated), page aligned."""
        ...

    def map_region(self, fd: int, offset: int, size: int, writable: bool) -> HostMemory | None:
        """mmap ``size`` bytes of a device fd at ``offset`` (MAP_SHARED), or None
        when the backend cannot."""
        ...

    def pci_devices(self) -> list[PciDeviceInfo]: ...

    def memlock_limit(self) -> int | None:
        """RLIMIT_MEMLOCK's soft limit in bytes; None when unlimited."""
        ...

    def locked_bytes(self) -> int:
        """Memory charged to the process's locked_vm (VmLck)."""
        ...

    def privileged(self) -> bool:
        """Whether the process has CAP_IPC_LOCK (locked memory is not limited)."""
        ...

    def pid(self) -> int: ...

    def describe(self) -> str: ...


# -- the simulator -----------------------------------------------------------------------------------


class SimBackend:
    """A process on a simulated machine.

    ``target`` is a :class:`vfiosim.Process` (used as is), a
    :class:`vfiosim.Machine` (a new process is spawned on it) or a preset
    name / machine file path (a new machine; None means ``$VFIOSIM_MACHINE``
    or ``powernv``).  New processes run as ``uid`` (root by default, which
    has CAP_IPC_LOCK as on a real host) with ``rlimit_memlock``.

    Device regions are reached with pread/pwrite only: the simulated kernel
    does not mmap device fds.  Interrupts are delivered synchronously: the
    eventfd counts when the register write that raised it returns.
    """

    name = "sim"
    supports_region_mmap = False

    def __init__(self, target: "Process | Machine | str | None" = None, *, uid: int = 0,
                 rlimit_memlock: tuple[int, int] = (8 << 20, 8 << 20), kernel: str | None = None,
                 page_size: int | None = None) -> None:
        from ..machine import Machine, Process
        if isinstance(target, Process):
            self.process = target
        else:
            if isinstance(target, Machine):
                machine = target
            else:
                name, kernel, page_size = machine_settings(target, kernel, page_size)
                try:
                    machine = Machine.load(name, kernel=kernel, page_size=page_size)
                except ValueError as exc:
                    if target is None and os.environ.get(MACHINE_ENV):     # say where the name came from
                        exc.args = (f"${MACHINE_ENV}: {exc}",)
                    raise
            self.process = machine.spawn(uid=uid, rlimit_memlock=rlimit_memlock, name="vfio-client")
        self.machine: Machine = self.process.machine
        self.page_size = self.machine.page_size

    # -- files and ioctls
    def open(self, path: str, flags: int) -> int:
        return self.process.open(path, flags)

    def close(self, fd: int) -> None:
        self.process.close(fd)

    def ioctl(self, fd: int, request: int, arg: int | bytearray) -> int:
        return self.process.ioctl(fd, request, arg)

    def pread(self, fd: int, n: int, offset: int) -> bytes:
        return self.process.pread(fd, n, offset)

    def pwrite(self, fd: int, data: bytes, offset: int) -> int:
        return self.process.pwrite(fd, data, offset)

    def read(self, fd: int, n: int) -> bytes:
        return self.process.read(fd, n)

    def write(self, fd: int, data: bytes) -> int:
        return self.process.write(fd, data)

    def eventfd(self) -> int:
        return self.process.eventfd(0, os.O_NONBLOCK | os.O_CLOEXEC)

    def wait_readable(self, fd: int, timeout: float) -> bool:
        # Interrupts are delivered synchronously; only another thread can
        # signal while we wait, so poll.
        time.sleep(max(0.0, min(timeout, 0.001)))
        return False

    async def wait_readable_async(self, fd: int, timeout: float) -> bool:
        await asyncio.sleep(max(0.0, min(timeout, 0.001)))
        return False

    # -- memory
    def alloc(self, size: int, page_size: int | None = None) -> HostMemory:
        p = self.process
        unit = max(page_size or 0, self.page_size)
        length = (size + unit - 1) // unit * unit
        addr = p.mmap(length, page_size=page_size)
        try:
            zero = bytes(min(length, 1 << 20))
            for off in range(0, length, len(zero)):      # touch it, as a driver's memset would
                p.write_memory(addr + off, zero[:length - off])
            view = p.memory_view(addr, length)
        except BaseException:
            p.munmap(addr, length)
            raise

        def release() -> None:
            view.release()
            if p.alive:
                p.munmap(addr, length)
        return HostMemory(addr, length, view, release)

    def map_region(self, fd: int, offset: int, size: int, writable: bool) -> HostMemory | None:
        return None

    # -- sysfs, limits
    def pci_devices(self) -> list[PciDeviceInfo]:
        out = []
        for gid, bdfs in self.machine.iommu_groups().items():
            for bdf in bdfs:
                d = self.machine.device(bdf)
                out.append(PciDeviceInfo(bdf=d.bdf, vendor=d.vendor, device=d.device_id, class_code=d.class_code,
                                         iommu_group=gid, driver=d.driver, vfio_dev=self.machine.vfio_dev(bdf)))
        return sorted(out, key=lambda d: d.bdf)

    def memlock_limit(self) -> int | None:
        soft = self.process.getrlimit(resource.RLIMIT_MEMLOCK)[0]
        return None if soft == resource.RLIM_INFINITY or soft < 0 else soft

    def locked_bytes(self) -> int:
        return int(self.process.status()["VmLck"]) * 1024

    def privileged(self) -> bool:
        return self.process.geteuid() == 0

    def pid(self) -> int:
        return self.process.pid

    def describe(self) -> str:
        return f"sim backend: pid {self.process.pid} on {self.machine!r}"

    def __repr__(self) -> str:
        return f"<SimBackend pid {self.process.pid} on {self.machine.name}>"


# -- the host kernel ----------------------------------------------------------------------------------


_Buffer = Union[mmap.mmap, bytearray, memoryview]


class HostOs:
    """Every host function the :class:`RealBackend` calls, in one place.

    The methods are the plain host calls.  A fake kernel boundary subclasses
    this and answers like the kernel would (see
    :class:`vfiosim.client.testing.SimulatedHost`).
    """

    #: whether fds can be handed to select()/asyncio's add_reader
    selectable = True

    def open(self, path: str, flags: int) -> int:
        return os.open(path, flags)

    def close(self, fd: int) -> None:
        os.close(fd)

    def ioctl(self, fd: int, request: int, arg: int | bytearray) -> int:
        if isinstance(arg, int):
            return int(fcntl.ioctl(fd, request, arg))
        # mutate_flag: the kernel updates the buffer in place and the
        # ioctl's return value comes back (GET_DEVICE_FD returns an fd).
        return int(fcntl.ioctl(fd, request, arg, True))

    def pread(self, fd: int, n: int, offset: int) -> bytes:
        return os.pread(fd, n, offset)

    def pwrite(self, fd: int, data: bytes, offset: int) -> int:
        return os.pwrite(fd, data, offset)

    def read(self, fd: int, n: int) -> bytes:
        return os.read(fd, n)

    def write(self, fd: int, data: bytes) -> int:
        return os.write(fd, data)

    def eventfd(self, initval: int, flags: int) -> int:
        return os.eventfd(initval, flags)

    def select(self, fds: list[int], timeout: float) -> list[int]:
        readable, _, _ = select.select(fds, [], [], timeout)
        return list(readable)

    def mmap(self, fd: int, length: int, prot: int, flags: int, offset: int) -> _Buffer:
        return mmap.mmap(fd, length, flags=flags, prot=prot, offset=offset)

    def buffer_address(self, buf: _Buffer) -> int:
        """The address of a writable buffer's first byte."""
        c = ctypes.c_char.from_buffer(buf)
        try:
            return ctypes.addressof(c)
        finally:
            del c

    def munmap(self, buf: _Buffer) -> None:
        if isinstance(buf, mmap.mmap):
            try:
                buf.close()
            except BufferError:
                # A view of it is still alive; the mapping goes when that does.
                pass

    def page_size(self) -> int:
        return mmap.PAGESIZE

    def getrlimit(self, res: int) -> tuple[int, int]:
        return resource.getrlimit(res)

    def geteuid(self) -> int:
        return os.geteuid()

    def getpid(self) -> int:
        return os.getpid()

    def listdir(self, path: str) -> list[str]:
        return os.listdir(path)

    def read_text(self, path: str) -> str:
        with open(path, encoding="ascii", errors="replace") as f:
            return f.read()

    def readlink(self, path: str) -> str:
        return os.readlink(path)


class RealBackend:
    """The host kernel's /dev/vfio, through ``host`` (a :class:`HostOs`)."""

    name = "real"
    supports_region_mmap = True

    def __init__(self, host: HostOs | None = None, *, sysfs_root: str = "/sys") -> None:
        self.host = host if host is not None else HostOs()
        self.sysfs_root = sysfs_root
        self.page_size = self.host.page_size()

    def open(self, path: str, flags: int) -> int:
        return self.host.open(path, flags)

    def close(self, fd: int) -> None:
        self.host.close(fd)

    def ioctl(self, fd: int, request: int, arg: int | bytearray) -> int:
        return self.host.ioctl(fd, request, arg)

    def pread(self, fd: int, n: int, offset: int) -> bytes:
        return self.host.pread(fd, n, offset)

    def pwrite(self, fd: int, data: bytes, offset: int) -> int:
        return self.host.pwrite(fd, data, offset)

    def read(self, fd: int, n: int) -> bytes:
        return self.host.read(fd, n)

    def write(self, fd: int, data: bytes) -> int:
        return self.host.write(fd, data)

    def eventfd(self) -> int:
        return self.host.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)

    def wait_readable(self, fd: int, timeout: float) -> bool:
        return bool(self.host.select([fd], max(0.0, timeout)))

    async def wait_readable_async(self, fd: int, timeout: float) -> bool:
        if not self.host.selectable:
            if self.host.select([fd], 0.0):
                return True
            await asyncio.sleep(max(0.0, min(timeout, 0.001)))
            return False
        loop = asyncio.get_running_loop()
        ready: asyncio.Future[None] = loop.create_future()

        def wake() -> None:
            if not ready.done():
                ready.set_result(None)
        loop.add_reader(fd, wake)
        try:
            await asyncio.wait_for(ready, max(0.0, timeout))
            return True
        except asyncio.TimeoutError:
            return False
        finally:
            loop.remove_reader(fd)

    def alloc(self, size: int, page_size: int | None = None) -> HostMemory:
        unit = max(page_size or 0, self.page_size)
        length = (size + unit - 1) // unit * unit
        flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS
        if page_size is not None and page_size > self.page_size:
            flags |= _MAP_HUGETLB | ((page_size.bit_length() - 1) << _MAP_HUGE_SHIFT)
        buf = self.host.mmap(-1, length, mmap.PROT_READ | mmap.PROT_WRITE, flags, 0)
        view = memoryview(buf).cast("B")
        view[:] = bytes(length)            # touch every page now, not in the middle of a DMA
        addr = self.host.buffer_address(buf)
        host = self.host

        def release() -> None:
            try:
                view.release()
            except BufferError:
                pass
            host.munmap(buf)
        return HostMemory(addr, length, view, release)

    def map_region(self, fd: int, offset: int, size: int, writable: bool) -> HostMemory | None:
        prot = mmap.PROT_READ | (mmap.PROT_WRITE if writable else 0)
        buf = self.host.mmap(fd, size, prot, mmap.MAP_SHARED, offset)
        view = memoryview(buf).cast("B")
        host = self.host

        def release() -> None:
            try:
                view.release()
            except BufferError:
                pass
            host.munmap(buf)
        return HostMemory(0, size, view, release)

    def pci_devices(self) -> list[PciDeviceInfo]:
        h = self.host
        return read_sysfs_devices(self.sysfs_root, h.listdir, h.read_text, h.readlink)

    def memlock_limit(self) -> int | None:
        soft = self.host.getrlimit(resource.RLIMIT_MEMLOCK)[0]
        return None if soft == resource.RLIM_INFINITY or soft < 0 else soft

    def locked_bytes(self) -> int:
        try:
            status = self.host.read_text("/proc/self/status")
        except OSError:
            return 0
        for line in status.splitlines():
            if line.startswith("VmLck:"):
                return int(line.split()[1]) * 1024
        return 0

    def privileged(self) -> bool:
        return self.host.geteuid() == 0

    def pid(self) -> int:
        return self.host.getpid()

    def describe(self) -> str:
        return f"real backend: /dev/vfio of this host (pid {self.pid()})"

    def __repr__(self) -> str:
        return f"<RealBackend {type(self.host).__name__} sysfs {self.sysfs_root}>"


# -- choosing one -------------------------------------------------------------------------------------

_default: Backend | None = None


def set_default_backend(backend: Backend | None) -> Backend | None:
    """Make ``backend`` what ``get_backend()`` returns; returns the previous one."""
    global _default
    previous, _default = _default, backend
    return previous


@contextmanager
def use_backend(backend: Backend) -> Iterator[Backend]:
    """``with use_backend(b):`` -- objects created without a backend use ``b``."""
    previous = set_default_backend(backend)
    try:
        yield backend
    finally:
        set_default_backend(previous)


def get_backend(backend: "Backend | str | Process | Machine | None" = None, *,
                machine: "Machine | str | None" = None) -> Backend:
    """The backend for ``backend``:

    * a Backend object: itself; a :class:`vfiosim.Process` or
      :class:`vfiosim.Machine`: a :class:`SimBackend` on it;
    * ``"sim"`` or ``"real"``: a new backend of that kind (``machine`` picks
      the simulated machine: a Machine, a preset name or a machine file);
    * None: the default set by :func:`use_backend`, else one built from
      ``$VFIOSIM_BACKEND`` (``sim`` when unset) and kept as the default.
    """
    global _default
    from ..machine import Machine, Process
    if isinstance(backend, (Process, Machine)):
        return SimBackend(backend)
    if backend is not None and not isinstance(backend, str):
        if not isinstance(backend, Backend):
            raise VfioUsageError(errno.EINVAL, "get_backend()", "choosing the backend",
                                 detail=f"{backend!r} is not a backend",
                                 fix="pass 'sim', 'real', a SimBackend/RealBackend, a vfiosim.Process or Machine")
        return backend
    if backend is None and machine is None and _default is not None:
        return _default
    name = backend if backend is not None else os.environ.get(BACKEND_ENV, "sim") or "sim"
    chosen: Backend
    if name == "sim":
        chosen = SimBackend(machine)
    elif name == "real":
        if machine is not None:
            raise VfioUsageError(errno.EINVAL, "get_backend()", "choosing the backend",
                                 detail=f"machine={machine!r} was given with the real backend",
                                 fix="a machine is for the simulator: use backend='sim' (or VFIOSIM_BACKEND=sim)")
        chosen = RealBackend()
    else:
        where = f"${BACKEND_ENV}" if backend is None else "backend="
        raise VfioUsageError(errno.EINVAL, "get_backend()", "choosing the backend",
                             detail=f"{where} is {name!r}", fix="use 'sim' (the simulator) or 'real' (/dev/vfio)")
    if backend is None and machine is None:
        _default = chosen
    return chosen
