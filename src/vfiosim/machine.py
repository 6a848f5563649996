"""Simulated machines and the processes that run on them.

>>> m = Machine.default()                      # PowerNV POWER9, two edu devices
>>> p = m.spawn(uid=0, rlimit_memlock=(8 << 20, 8 << 20))
>>> fd = p.open("/dev/vfio/vfio", os.O_RDWR)
>>> p.ioctl(fd, uapi.VFIO_GET_API_VERSION)
0

A :class:`Process` is the in-process transport to the simulated kernel: each
method is one system call, failing with ``OSError`` and the kernel's errno.
"""

from __future__ import annotations

import ctypes
import errno
import os
from importlib import resources
from pathlib import Path
from typing import Any, Callable, Sequence, TypeVar, cast

from .kernel.config import KernelConfig
from .kernel.errors import KernelError
from .kernel.faults import FaultInjector
from .kernel.iommu.iommu import IommuOps
from .kernel.kernel import KERNEL_PROFILES, Kernel, KernelProfile
from .kernel.mm import ARG_BASE, MM, PROT_READ, PROT_WRITE, MemoryObject
from .kernel.pci.device import PciDevice
from .kernel.platform.pe import Pe
from .kernel.task import Task
from .machine_spec import MachineSpec, load_spec_file, load_spec_text
from .platforms import BUILDERS

T = TypeVar("T")

PRESETS = {"powernv": "powernv.toml", "pseries": "pseries.toml", "x86": "x86.toml",
           "powernv-virtio": "powernv-virtio.toml", "x86-virtio": "x86-virtio.toml",
           "x86-ioat": "x86-ioat.toml"}
PRESET_ALIASES = {"default": "powernv", "powernv9": "powernv", "q35": "x86"}

# The environment that chooses the simulated machine where the caller does not:
# read by the client library's SimBackend, its pytest plugin and the command line.
MACHINE_ENV = "VFIOSIM_MACHINE"
KERNEL_ENV = "VFIOSIM_KERNEL"
PAGE_SIZE_ENV = "VFIOSIM_PAGE_SIZE"
# "0" turns the kernel's fast paths for small maps off (to compare, or to rule them out).
FAST_PATHS_ENV = "VFIOSIM_FAST_PATHS"
PAGE_SIZES = (4096, 65536)


def preset_names() -> list[str]:
    return sorted(PRESETS)


def machine_settings(name: str | None = None, kernel: str | None = None,
                     page_size: int | None = None) -> tuple[str, str, int]:
    """The machine (a preset or a file), kernel profile and page size to
    simulate: each argument given, else ``$VFIOSIM_MACHINE``,
    ``$VFIOSIM_KERNEL``, ``$VFIOSIM_PAGE_SIZE``, else powernv, 6.12, 4096.
    A bad value in the environment raises ValueError naming the variable."""
    env = os.environ
    if kernel is None and env.get(KERNEL_ENV):
        kernel = env[KERNEL_ENV]
        if kernel not in KERNEL_PROFILES:
            raise ValueError(f"${KERNEL_ENV} is {kernel!r}: not a kernel profile ({', '.join(KERNEL_PROFILES)})")
    if page_size is None and env.get(PAGE_SIZE_ENV):
        text = env[PAGE_SIZE_ENV]
        if not text.isdigit() or int(text) not in PAGE_SIZES:
            raise ValueError(f"${PAGE_SIZE_ENV} is {text!r}: not a page size ({', '.join(map(str, PAGE_SIZES))})")
        page_size = int(text)
    return name or env.get(MACHINE_ENV) or "powernv", kernel or "6.12", page_size or 4096


#: shorthands for kernel_config: what a distribution kernel with iommufd builds
#: (IOMMUFD with the VFIO device cdev; groups and containers kept).
KERNEL_CONFIG_ALIASES = {"iommufd": ("IOMMUFD", "VFIO_DEVICE_CDEV"),
                         "iommufd-compat": ("IOMMUFD", "VFIO_DEVICE_CDEV", "IOMMUFD_VFIO_CONTAINER")}

def _config_items(kernel_config: "list[str] | tuple[str, ...] | str | None") -> list[str]:
    """kernel_config as a list: a list of options, a comma-separated string
    of them, or one of KERNEL_CONFIG_ALIASES ("iommufd")."""
    if kernel_config is None:
        return []
    if isinstance(kernel_config, str):
        if kernel_config in KERNEL_CONFIG_ALIASES:
            return list(KERNEL_CONFIG_ALIASES[kernel_config])
        return [i.strip() for i in kernel_config.split(",") if i.strip()]
    return list(kernel_config)


class Machine:
    """A simulated machine (POWER or x86): platform, PCI devices, and a kernel."""

    def __init__(self, spec: MachineSpec, *, page_size: int = 4096, kernel: str = "6.12",
                 kernel_config: "list[str] | tuple[str, ...] | str | None" = None) -> None:
        profile = KernelProfile.get(kernel)
        builder = BUILDERS[spec.platform]
        builder.check(profile, page_size)
        self.spec = spec
        self.name = spec.name
        config = KernelConfig.parse([*spec.kernel_config, *_config_items(kernel_config)], platform=spec.platform,
                                    legacy=not profile.iommufd)
        self.kernel = Kernel(page_size, profile, config)
        self.kernel.iommufd_allow_unsafe_interrupts = spec.iommufd_allow_unsafe_interrupts
        self.kernel.fast_paths = os.environ.get(FAST_PATHS_ENV, "1") != "0"
        # The big kernel lock and the internal errors recorded, both the syscall gate's.
        self._lock = self.kernel.gate.lock
        self.oopses: list[str] = self.kernel.gate.oopses
        builder(spec, self.kernel).build()

    # -- constructors ------------------------------------------------------------------------

    @classmethod
    def default(cls, *, page_size: int = 4096, kernel: str = "6.12",
                kernel_config: "list[str] | tuple[str, ...] | str | None" = None) -> "Machine":
        """The PowerNV POWER9 host of the seed patch's platform."""
        return cls.preset("powernv", page_size=page_size, kernel=kernel, kernel_config=kernel_config)

    @classmethod
    def preset(cls, name: str, *, page_size: int = 4096, kernel: str = "6.12",
               kernel_config: "list[str] | tuple[str, ...] | str | None" = None) -> "Machine":
        """A preset machine.  ``kernel_config`` lists kernel options that differ
        from Debian's build, e.g. ``["IOMMUFD", "VFIO_DEVICE_CDEV"]``
        (kernel/config.py, docs/iommufd.md); ``"iommufd"`` is short for that
        pair."""
        key = PRESET_ALIASES.get(name, name)
        if key not in PRESETS:
            raise ValueError(f"unknown machine preset {name!r}; presets: {', '.join(preset_names())}")
        text = resources.files("vfiosim.presets").joinpath(PRESETS[key]).read_text()
        return cls(load_spec_text(text, f"preset {key} ({PRESETS[key]})"), page_size=page_size, kernel=kernel,
                   kernel_config=kernel_config)

    @classmethod
    def from_file(cls, path: str | os.PathLike[str], *, page_size: int = 4096, kernel: str = "6.12",
                  kernel_config: "list[str] | tuple[str, ...] | str | None" = None) -> "Machine":
        return cls(load_spec_file(str(path)), page_size=page_size, kernel=kernel, kernel_config=kernel_config)

    @classmethod
    def from_toml(cls, text: str, *, source: str = "<string>", page_size: int = 4096,
                  kernel: str = "6.12", kernel_config: "list[str] | tuple[str, ...] | str | None" = None) -> "Machine":
        return cls(load_spec_text(text, source), page_size=page_size, kernel=kernel, kernel_config=kernel_config)

    @classmethod
    def load(cls, name_or_path: str, **kwargs: Any) -> "Machine":
        """A preset name, or the path of a machine file."""
        path = Path(name_or_path)
        if PRESET_ALIASES.get(name_or_path, name_or_path) in PRESETS and not path.exists():
            return cls.preset(name_or_path, **kwargs)
        if not path.exists() and path.suffix != ".toml" and os.sep not in name_or_path:
            # A bare word that is neither: most likely a mistyped preset.
            raise ValueError(f"unknown machine {name_or_path!r}: no preset and no machine file of that name; "
                             f"presets: {', '.join(preset_names())}")
        return cls.from_file(name_or_path, **kwargs)

    # -- introspection -------------------------------------------------------------------------------

    @property
    def page_size(self) -> int:
        return self.kernel.page_size

    @property
    def fast_paths(self) -> bool:
        """Whether the IOMMU drivers take their fast paths for small maps
        (MAP_DMA/UNMAP_DMA of a page or a few), which behave exactly as the
        general path does; on unless ``$VFIOSIM_FAST_PATHS`` is 0."""
        return self.kernel.fast_paths

    @fast_paths.setter
    def fast_paths(self, on: bool) -> None:
        self.kernel.fast_paths = on

    @property
    def kernel_version(self) -> str:
        return self.kernel.profile.version

    @property
    def platform(self) -> str:
        return self.spec.platform

    def iommu_groups(self) -> dict[int, list[str]]:
        with self._lock:
            return {gid: [d.bdf for d in g.devices] for gid, g in sorted(self.kernel.iommu_groups.items())}

    def vfio_dev(self, bdf: str) -> str | None:
        """The VFIO device name of ``bdf`` (``vfio0``): sysfs's
        /sys/bus/pci/devices/BDF/vfio-dev/vfioN, which Linux 6.1+ creates for
        every VFIO device whatever its configuration, and the name of its cdev
        /dev/vfio/devices/vfioN where CONFIG_VFIO_DEVICE_CDEV made one.  None
        when VFIO does not have the device, or on the 3.10 kernel."""
        vfio = self.kernel.vfio
        if not self.kernel.profile.iommufd:
            return None
        with self._lock:
            return next((d.cdev_name for d in vfio.devices if d.name == bdf.lower()), None)

    def device(self, bdf: str) -> PciDevice:
        try:
            return self.kernel.devices[bdf.lower()]
        except KeyError:
            raise KeyError(f"no device {bdf} on {self.name}; devices: {', '.join(self.kernel.devices)}") from None

    @property
    def iommu_units(self) -> Sequence[IommuOps]:
        """The IOMMU units that implement the IOMMU API (x86: the VT-d units)."""
        return self.kernel.platform.iommu_units

    def pe_of(self, bdf: str) -> Pe:
        """The POWER PE a device sits in."""
        dev = self.device(bdf)
        pe = next((pe for pe in self.kernel.pes if dev in pe.devices), None)
        if pe is None:
            raise ValueError(f"{self.name} is an {self.platform} machine: it has no PEs (its IOMMU units are "
                             f"machine.iommu_units)")
        return pe

    # Like every entry point, these take the machine's lock: another thread's
    # system call may be changing what they read (the log ring, pin counts).

    def dmesg(self, include_debug: bool = False) -> list[str]:
        with self._lock:
            return self.kernel.log.lines(include_debug)

    def sysctl(self, name: str, value: int | None = None) -> int:
        """Read, or set, a sysctl of the simulated kernel (as /proc/sys does):
        ``vm.max_map_count`` (65530), ``vm.overcommit_memory`` (0: heuristic,
        1: always; 2, strict accounting, is not modelled)."""
        with self._lock:
            vm = self.kernel.phys.vm
            if name == "vm.max_map_count":
                if value is not None:
                    if value < 0:
                        raise ValueError(f"vm.max_map_count must be >= 0, not {value}")
                    vm.max_map_count = value
                return vm.max_map_count
            if name == "vm.overcommit_memory":
                if value is not None:
                    if value not in (0, 1):
                        raise ValueError(f"vm.overcommit_memory {value}: 0 (heuristic) and 1 (always) are "
                                         f"modelled, 2 (strict commit accounting) is not")
                    vm.overcommit_memory = value
                return vm.overcommit_memory
            raise ValueError(f"unknown sysctl {name!r}: vm.max_map_count and vm.overcommit_memory are modelled")

    def meminfo(self) -> dict[str, int]:
        """/proc/meminfo's MemTotal and MemFree (kB): the machine's RAM and what
        no process's present pages nor pins use."""
        with self._lock:
            phys = self.kernel.phys
            kb = phys.page_size // 1024
            total = phys.ram_pages or 0
            return {"MemTotal": total * kb, "MemFree": max(total - phys.used_pages, 0) * kb}

    def pinned_pages(self) -> int:
        """Page pins held anywhere on the machine (0 when nothing is mapped)."""
        with self._lock:
            return self.kernel.phys.pinned_pages()

    def user_locked_vm(self, uid: int) -> int:
        """Bytes charged to user ``uid``'s locked memory (``user->locked_vm``):
        iommufd's default accounting adds every process of the uid there, and
        nothing in /proc shows it."""
        with self._lock:
            return self.kernel.users.locked_vm(uid) * self.page_size

    def processes(self) -> list[int]:
        with self._lock:
            return sorted(self.kernel.tasks)

    # -- fault injection (kernel/faults.py) -----------------------------------------------------------

    @property
    def faults(self) -> FaultInjector:
        """The kernel's fault injector: ``fired``, ``counts``, ``fail_nth()``, ``disarm()``."""
        return self.kernel.faults

    def inject_fault(self, nth: int = 1, sites: str | list[str] | tuple[str, ...] | None = None) -> FaultInjector:
        """Make the ``nth`` allocation, pin or charge from now on (at a site
        matching ``sites``: kinds such as ``"pin_user_pages"`` or sites such as
        ``"kmalloc:mm_iommu_do_alloc"``, see ``vfiosim.kernel.faults.SITES``)
        fail once, as Linux's /proc/<pid>/fail-nth does.  Returns the injector."""
        with self._lock:
            self.kernel.faults.fail_nth(nth, sites)
            return self.kernel.faults

    # -- processes -----------------------------------------------------------------------------------------

    def spawn(self, uid: int = 0, gid: int = 0, rlimit_memlock: tuple[int, int] = (8 << 20, 8 << 20),
              name: str = "sim") -> "Process":
        """A new process (uid 0 holds every capability, as root does)."""
        with self._lock:
            return Process(self, self.kernel.spawn(uid, gid, rlimit_memlock, name))

    def topology(self) -> dict[str, Any]:
        """PHBs, PEs, groups, devices and DMA windows, as plain data."""
        from .topology import describe
        with self._lock:
            return describe(self)

    def __repr__(self) -> str:
        return f"<Machine {self.name} ({self.platform}) kernel {self.kernel_version} page {self.page_size}>"


class Process:
    """A simulated process: each method is one system call into the machine."""

    def __init__(self, machine: Machine, task: Task) -> None:
        self.machine = machine
        self.task = task

    @property
    def pid(self) -> int:
        return self.task.pid

    @property
    def mm(self) -> MM:
        """The address space (for tests and introspection)."""
        return _own_mm(self.task)

    @property
    def alive(self) -> bool:
        return self.task.alive

    def _call(self, call: str | Callable[[], str], fn: Callable[..., T], *args: Any) -> T:
        """Run a syscall; ``call`` names it in errors (a callable is asked
        only then, keeping the hot path free of formatting)."""
        try:
            return self.machine.kernel.gate.call(self.task, call, fn, *args)
        except KernelError as exc:
            raise exc.to_oserror(call if isinstance(call, str) else call()) from None

    def _in_task(self, call: str, fn: Callable[[Task], T]) -> T:
        """A syscall written as a function of the task."""
        return self._call(call, fn)

    # -- files ------------------------------------------------------------------------------------

    def open(self, path: str, flags: int = os.O_RDWR, mode: int = 0) -> int:
        return self._call(f"open({path})", self.machine.kernel.sys_open, path, flags, mode)

    def close(self, fd: int) -> None:
        self._call(f"close({fd})", self.machine.kernel.sys_close, fd)

    def dup(self, fd: int) -> int:
        return self._call(f"dup({fd})", self.machine.kernel.sys_dup, fd)

    def ioctl(self, fd: int, request: int, arg: Any = 0) -> int:
        """ioctl(2).  ``arg`` is an int (a value, or a pointer into this
        process's memory) or a writable buffer (bytearray, ctypes structure,
        memoryview) that the kernel reads and updates in place; bytes are
        accepted read-only.  The buffer is all the memory the kernel sees:
        reading past its end is EFAULT.  Returns the ioctl's result."""
        k = self.machine.kernel

        def name() -> str:
            return _ioctl_label(request, self.task, fd)
        if isinstance(arg, int):
            return self._call(name, k.sys_ioctl, fd, request, arg)
        if isinstance(arg, ctypes.Structure | ctypes.Union | ctypes.Array):
            arg = memoryview(arg).cast("B")
        m = self.machine
        with m._lock:                       # _call(), with the buffer mapped around it
            task = self.task
            if not task.alive:
                raise ProcessLookupError(errno.ESRCH, f"process {self.pid} has exited")
            mm = _own_mm(task)
            vma = mm.borrow(arg)
            try:
                return k.sys_ioctl(task, fd, request, ARG_BASE)
            except KernelError as exc:
                raise exc.to_oserror(name()) from None
            except Exception as exc:          # a bug in the simulator: never a traceback to the program
                raise k.gate.oops(name(), exc) from None
            finally:
                mm.unborrow(vma)

    def pread(self, fd: int, n: int, offset: int) -> bytes:
        return self._call(f"pread({fd})", self.machine.kernel.sys_pread, fd, n, offset)

    def pwrite(self, fd: int, data: bytes | bytearray | memoryview, offset: int) -> int:
        return self._call(f"pwrite({fd})", self.machine.kernel.sys_pwrite, fd, bytes(data), offset)

    def read(self, fd: int, n: int) -> bytes:
        return self._call(f"read({fd})", self.machine.kernel.sys_read, fd, n)

    def write(self, fd: int, data: bytes | bytearray | memoryview) -> int:
        return self._call(f"write({fd})", self.machine.kernel.sys_write, fd, bytes(data))

    def eventfd(self, initval: int = 0, flags: int = 0) -> int:
        return self._call("eventfd", self.machine.kernel.sys_eventfd, initval, flags)

    # -- memory ------------------------------------------------------------------------------------------

    def mmap(self, length: int, prot: int = PROT_READ | PROT_WRITE, *, page_size: int | None = None,
             noreserve: bool = False, fd: int | None = None, offset: int = 0) -> int:
        """mmap(2).  Without ``fd``: anonymous private memory, which uses RAM
        only where it is touched.  ``page_size`` asks for huge pages (e.g.
        2 MiB, 16 MiB), which IOMMU pages larger than the base page need;
        ``noreserve`` is MAP_NORESERVE (no overcommit check: with the default
        vm.overcommit_memory=0 a single writable mapping larger than the
        machine's RAM needs it).  With ``fd``: a shared mapping of a device
        region at ``offset`` (a BAR: ``index << 40``); loads and stores
        through it (read_memory, write_memory) reach the device, and
        VFIO_IOMMU_MAP_DMA of it maps the BAR for peer-to-peer DMA."""
        shift = None
        if page_size is not None:
            if page_size & (page_size - 1) or page_size < self.machine.page_size:
                raise ValueError(f"page_size {page_size} must be a power of two >= {self.machine.page_size}")
            shift = page_size.bit_length() - 1
        k = self.machine.kernel
        if fd is not None:
            return self._call(f"mmap(fd {fd})", lambda t: k.sys_mmap(t, length, prot, fd=fd, offset=offset,
                                                                      shared=True))
        return self._in_task("mmap", lambda t: k.sys_mmap(t, length, prot, compound_shift=shift,
                                                          noreserve=noreserve))

    def munmap(self, addr: int, length: int) -> None:
        self._in_task("munmap", lambda t: _own_mm(t).munmap(addr, length))

    def mprotect(self, addr: int, length: int, prot: int) -> None:
        self._in_task("mprotect", lambda t: _own_mm(t).mprotect(addr, length, prot, t))

    def mlock(self, addr: int, length: int) -> None:
        """mlock(2): lock the pages of [addr, addr+length) (VM_LOCKED), charged
        to VmLck against RLIMIT_MEMLOCK unless the process has CAP_IPC_LOCK."""
        self._in_task("mlock", lambda t: _own_mm(t).mlock(addr, length, t))

    def munlock(self, addr: int, length: int) -> None:
        """munlock(2): unlock them; VmLck goes down by the pages that were locked."""
        self._in_task("munlock", lambda t: _own_mm(t).munlock(addr, length))

    def write_memory(self, addr: int, data: bytes | bytearray | memoryview) -> None:
        """The process's own stores.  A page touched for the first time takes a
        page of the machine's RAM; when none is free the OOM killer ends the
        process with the most memory (ProcessLookupError if that is this one)."""
        self._in_task("write_memory", lambda t: _own_mm(t).store(addr, data, t))

    def read_memory(self, addr: int, n: int) -> bytes:
        return self._in_task("read_memory", lambda t: t.mm.read(addr, n))

    def memory_view(self, addr: int, length: int) -> memoryview:
        """Zero-copy access to ``[addr, addr + length)`` of this process's
        memory, as its own loads and stores see it (what a pointer is to a
        real program; vfiosim.client's DMA buffers are built on it).  The
        range must lie inside one anonymous mapping (EFAULT otherwise); the
        view is read-only unless that mapping is writable.  Changes nothing:
        stores through the view do not count pages as touched (VmRSS), so
        write the memory once with write_memory() to populate it."""
        from errno import EFAULT

        from .kernel.errors import fail
        from .kernel.mm import PROT_WRITE as _W

        def view(t: Task) -> memoryview:
            vma = t.mm.find_vma(addr)
            if vma is None or vma.kind != "anon" or length < 0 or addr + length > vma.end or not vma.readable():
                raise fail(EFAULT, f"{addr:#x}+{length:#x} is not inside one readable anonymous mapping")
            off = vma.pgoff + (addr - vma.start)
            data: Any = cast(MemoryObject, vma.obj).data       # (numpy arrays are buffers)
            mv = memoryview(data).cast("B")[off:off + length]
            return mv if vma.prot & _W else mv.toreadonly()
        return self._call("memory_view", view)

    # -- credentials and limits ---------------------------------------------------------------------

    def setrlimit(self, resource_id: int, limits: tuple[int, int]) -> None:
        self._in_task("setrlimit", lambda t: t.setrlimit(resource_id, limits))

    def getrlimit(self, resource_id: int) -> tuple[int, int]:
        return self._in_task("getrlimit", lambda t: t.rlimit(resource_id))

    def chown(self, path: str, uid: int, gid: int = -1) -> None:
        """chown(2) of a device node (-1 keeps an id)."""
        self._in_task("chown", lambda t: self.machine.kernel.sys_chown(t, path, uid, gid))

    def setuid(self, uid: int) -> None:
        self._in_task("setuid", lambda t: t.setuid(uid))

    def getuid(self) -> int:
        return self._in_task("getuid", lambda t: t.cred.uid)

    def geteuid(self) -> int:
        return self._in_task("geteuid", lambda t: t.cred.euid)

    # -- /proc/<pid>/status and exit -----------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        """The fields of /proc/<pid>/status that matter here: sizes in kB,
        ``Uid``/``Gid`` as (real, effective, saved, filesystem), ``Cap*``
        as Linux prints them (16 hex digits: ``CapEff`` is ``000001ffffffffff``
        for root on 6.12)."""
        def read(t: Task) -> dict[str, Any]:
            mm = t.mm
            kb = mm.page_size // 1024
            return {"Name": t.comm, "Pid": t.pid, **t.cred.proc_status(), "VmSize": mm.mapped_bytes() // 1024,
                    "VmLck": mm.locked_vm * kb, "VmPin": mm.pinned_vm * kb, "VmRSS": mm.resident_bytes() // 1024,
                    "FDSize": t.files.slots}
        return self._call("status", read)

    def fork(self, name: str | None = None) -> "Process":
        """fork(2): a child process sharing every open file (VFIO containers,
        groups and devices included) with a copy of this address space (no
        mlock'ed ranges, nothing charged to its locked memory)."""
        def do(t: Task) -> Process:
            k = self.machine.kernel
            pid = k._next_pid
            k._next_pid += 1
            child = k.fork(t, pid, _own_mm(t).fork())
            if name is not None:
                child.comm = name
            return Process(self.machine, child)
        return self._call("fork", do)

    def exec(self, name: str | None = None) -> None:
        """execve(2) of a new program in this process: a new, empty address
        space; close-on-exec files are closed, the others stay open.  Memory
        of the old image that a mapping still pins stays pinned; a sPAPR
        container the old image used answers EPERM from now on."""
        def do(t: Task) -> None:
            self.machine.kernel.exec(t, MM(self.machine.kernel.phys))
            if name is not None:
                t.comm = name
        self._call("exec", do)

    def exit(self) -> None:
        """do_exit(): unmap everything, close every fd in order; the release
        paths unpin pages and refund locked memory."""
        try:
            self.machine.kernel.gate.run("exit", self.machine.kernel.exit, self.task)
        except KernelError as exc:
            raise exc.to_oserror() from None

    def __repr__(self) -> str:
        return f"<Process {self.pid} on {self.machine.name}{'' if self.alive else ' (exited)'}>"


def _own_mm(task: Task) -> MM:
    """The address space of a task this API spawned: always simulated memory."""
    return cast(MM, task.mm)


def _ioctl_label(request: int, task: Task, fd: int) -> str:
    """The ioctl's name as the fd it is made on knows it."""
    from .uapi import iommufd, vfio as uapi
    file = task.files._fds.get(fd) if isinstance(fd, int) else None
    cmd = request & 0xFFFFFFFF
    if file is not None and file.kind == "iommufd":
        name = iommufd.ioctl_name(cmd) or uapi.ioctl_name_for(cmd, "vfio-container")
    else:
        name = uapi.ioctl_name_for(cmd, file.kind) if file is not None else uapi.ioctl_name(cmd) or \
            iommufd.ioctl_name(cmd)
    return name or f"ioctl({request:#x})"


__all__ = ["Machine", "Process", "KERNEL_PROFILES", "preset_names"]
