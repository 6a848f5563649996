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
import resource
import threading
import traceback
from importlib import resources
from pathlib import Path
from typing import Any, Callable, TypeVar

from .kernel.config import KernelConfig
from .kernel.errors import KernelError
from .kernel.iommu.iommu import IommuGroup, iommu_probe_device
from .kernel.iommu.spapr_tce import SpaprTceIommuDriver
from .kernel.iommu.spapr_tce_seed import SeedSpaprTceIommuDriver
from .kernel.kernel import KERNEL_PROFILES, Kernel, KernelProfile
from .kernel.mm import MM, PROT_READ, PROT_WRITE
from .kernel.pci.device import PciDevice
from .kernel.pci.models import create_device, is_endpoint_model
from .kernel.iommu.table_group import SpaprTceIommuOps
from .kernel.platform.pe import Pe
from .kernel.platform.powernv import PnvPe, PnvPhb
from .kernel.platform.pseries import PseriesPe, SpaprPhb
from .kernel.task import Task
from .kernel.vfio.pci import VfioPciDevice
from .machine_spec import MachineSpec, load_spec_file, load_spec_text

T = TypeVar("T")

PRESETS = {"powernv": "powernv.toml", "pseries": "pseries.toml", "x86": "x86.toml"}
PRESET_ALIASES = {"default": "powernv", "powernv9": "powernv", "q35": "x86"}

# MAX_PAGE_ORDER of ppc64 (arch/powerpc/Kconfig ARCH_FORCE_MAX_ORDER): the
# largest contiguous allocation is 16 MiB with either page size.
_MAX_ORDER = {4096: 12, 65536: 8}


def preset_names() -> list[str]:
    return sorted(PRESETS)


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
        if profile.legacy and spec.platform == "pseries":
            raise ValueError("kernel 3.10 has no VFIO on pseries guests: its VFIO_IOMMU_SPAPR_TCE depends on "
                             "PPC_POWERNV (drivers/vfio/Kconfig); use the powernv machine")
        if spec.platform == "x86":
            if profile.legacy:
                raise ValueError("the 3.10 profile is the sPAPR seed patch on PowerNV; x86 machines run the Linux "
                                 "6.12 Type1 IOMMU driver (kernel=\"6.12\")")
            if page_size != 4096:
                raise ValueError(f"x86 has 4 KiB pages only, not page_size={page_size}")
        self.spec = spec
        self.name = spec.name
        config = KernelConfig.parse([*spec.kernel_config, *_config_items(kernel_config)], platform=spec.platform,
                                    legacy=profile.legacy)
        self.kernel = Kernel(page_size, profile, config)
        self.kernel.iommufd_allow_unsafe_interrupts = spec.iommufd_allow_unsafe_interrupts
        self._lock = threading.RLock()
        self.oopses: list[str] = []
        self.iommu_units: list[Any] = []     # x86: the VT-d units (kernel/platform/x86.py)
        self._build()

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
        if PRESET_ALIASES.get(name_or_path, name_or_path) in PRESETS and not Path(name_or_path).exists():
            return cls.preset(name_or_path, **kwargs)
        return cls.from_file(name_or_path, **kwargs)

    # -- building the platform ---------------------------------------------------------------------

    def _build(self) -> None:
        if self.spec.platform == "x86":
            self._build_x86()
            return
        k = self.kernel
        spec = self.spec
        log = k.log.info
        pes: dict[tuple[int, int], Pe] = {}
        pes_seen: set[Pe] = set(k.pes)
        if spec.platform == "powernv":
            phbs = {}
            for ps in spec.phbs:
                phbs[ps.index] = PnvPhb(ps.index, model=ps.model, m32_pci_base=ps.m32_pci_base,
                                        pgsizes=ps.tce_page_sizes, page_shift=k.page_shift,
                                        max_order=ps.max_order if ps.max_order is not None else _MAX_ORDER[k.page_size],
                                        eeh=ps.eeh)
            k.eeh_available = any(p.eeh for p in phbs.values()) and not k.profile.legacy
            for ds in spec.devices:
                if (ds.phb, ds.pe) not in pes:
                    pe = PnvPe(phbs[ds.phb], ds.pe, k.phys, log, spec.ram)
                    if k.profile.legacy:
                        # 3.10: the PE's 32-bit table of 4 KiB pages, which VFIO reuses.
                        tbl = pe.table_group.create_host_table(0, 12, pe.table_group.tce32_size, 1)
                        pe.table_group.set_window(0, tbl)
                    else:
                        pe.setup_default_config()
                    pes[(ds.phb, ds.pe)] = pe
            driver = SeedSpaprTceIommuDriver(k) if k.profile.legacy else SpaprTceIommuDriver(k)
        else:
            hvs = {}
            for ps in spec.phbs:
                hvs[ps.index] = SpaprPhb(ps.index, dma32_start=ps.dma32_start, dma32_size=ps.dma32_size,
                                         pgsizes=ps.ddw_page_sizes, windows_supported=ps.ddw_windows,
                                         dma64_addr=ps.dma64_address, largest_block=ps.ddw_largest_block, log=log)
            for ds in spec.devices:
                if (ds.phb, ds.pe) not in pes:
                    pes[(ds.phb, ds.pe)] = PseriesPe(hvs[ds.phb], k.phys, log)
            driver = SpaprTceIommuDriver(k)
        if k.config.vfio_container:             # VFIO_IOMMU_SPAPR_TCE depends on VFIO_CONTAINER
            k.vfio.iommu_drivers.register(driver)
        # 3.10 had no IOMMU API on POWER: its PEs are probed by no IOMMU driver.
        spapr_ops = None if k.profile.legacy else SpaprTceIommuOps()
        bar_base: dict[int, int] = {}
        for ds in spec.devices:
            dev = create_device(ds.model, ds.bdf, dma_mask=ds.dma_mask)
            dev.driver = ds.driver
            dev.reset_method = "bus" if ds.behind_bridge else None
            dev.log = k.log.warn
            # Firmware places BARs from the bottom of the PHB's 32-bit MMIO window.
            pe = pes[(ds.phb, ds.pe)]
            base = bar_base.get(ds.phb, 0x80000000)
            for index, bar in dev.bars.items():
                base = (base + bar.size - 1) & ~(bar.size - 1)
                dev.assign_bar_address(index, base)
                base += bar.size
            bar_base[ds.phb] = base
            pe.add_device(dev)
            if spapr_ops is not None:
                iommu_probe_device(dev, spapr_ops)
            group = k.iommu_groups.get(ds.iommu_group)
            if group is None:
                group = k.iommu_groups[ds.iommu_group] = IommuGroup(ds.iommu_group)
                group.iommu_data = pe.table_group
                pe.iommu_group = group
            group.add_device(dev)
            k.devices[dev.bdf] = dev
            if pe not in pes_seen:
                pes_seen.add(pe)
                k.pes.append(pe)
            if dev.driver == "vfio-pci":
                k.vfio.register_device(dev.bdf, group, VfioPciDevice(dev, k.log), mode=ds.group_mode,
                                       uid=ds.group_uid, gid=ds.group_gid)
        k.log.info(f"vfiosim: {spec.name} ({spec.platform}), Linux {k.profile.version} profile, "
                   f"{k.page_size // 1024} KiB pages, {len(spec.devices)} device(s)")

    def _build_x86(self) -> None:
        """An x86 host with one VT-d unit: every device is behind it; only the
        Type1 IOMMU driver is registered (no sPAPR, no EEH, no no-IOMMU)."""
        from .kernel.iommu.type1 import Type1IommuDriver
        from .kernel.iommu.iommu import RESV_TYPE_NAMES, ResvRegion
        from .kernel.platform.x86 import IntelIommu
        from .machine_spec import HOST_DEVICE_MODELS

        k = self.kernel
        spec = self.spec
        assert spec.iommu is not None
        io = spec.iommu
        unit = IntelIommu(name="dmar0", model=io.model, aw_bits=io.address_width, pgsize_bitmap=io.page_sizes,
                          resv_regions=[ResvRegion(r.start, r.size, RESV_TYPE_NAMES[r.type])
                                        for r in io.reserved_regions],
                          snoop_control=io.snoop_control, interrupt_remapping=io.interrupt_remapping,
                          caching_mode=io.caching_mode, phys=k.phys, log_err=k.log.err,
                          dirty_tracking=io.dirty_tracking)
        self.iommu_units = [unit]
        if k.config.vfio_container:             # VFIO_IOMMU_TYPE1 is selected by VFIO_CONTAINER
            k.vfio.iommu_drivers.register(Type1IommuDriver(
                k, dma_entry_limit=spec.type1.dma_entry_limit,
                allow_unsafe_interrupts=spec.type1.allow_unsafe_interrupts))
        k.log.info(f"DMAR: Intel(R) Virtualization Technology for Directed I/O ({io.model}, "
                   f"{io.address_width}-bit, caching mode {'on' if io.caching_mode else 'off'})")
        bar_base = 0xFE000000          # SeaBIOS places BARs below the IOAPIC
        for ds in spec.devices:
            if is_endpoint_model(ds.model):
                dev: PciDevice = create_device(ds.model, ds.bdf, dma_mask=ds.dma_mask)
            else:
                vendor, device, class_code, header_type, _ = HOST_DEVICE_MODELS[ds.model]
                dev = PciDevice(ds.bdf, vendor=vendor, device=device, class_code=class_code,
                                subsystem_vendor=0x1AF4, subsystem=0x1100, interrupt_pin=0)
                dev.model = ds.model
                dev.config.set(0x0E, 1, header_type)
                dev.finish()
            dev.driver = ds.driver or None
            dev.reset_method = "bus" if ds.behind_bridge else None
            dev.log = k.log.warn
            # pci_msix_can_alloc_dyn(): x86's MSI parent domains (the vector domain,
            # x86_vector_msi_parent_ops, and the VT-d remapping domain, dmar_msi_parent_ops)
            # support X86_VECTOR_MSI_FLAGS_SUPPORTED, which includes MSI_FLAG_PCI_MSIX_ALLOC_DYN
            # (arch/x86/include/asm/msi.h, since 6.2), with interrupt remapping or without.
            # POWER's PowerNV and pseries PCI/MSI domains do not set it: those devices keep
            # the default (False), so vfio-pci reports MSI-X as NORESIZE there.
            dev.msix_can_alloc_dyn = True
            for index, bar in dev.bars.items():
                bar_base = (bar_base + bar.size - 1) & ~(bar.size - 1)
                dev.assign_bar_address(index, bar_base)
                bar_base += bar.size
            iommu_probe_device(dev, unit)
            group = k.iommu_groups.get(ds.iommu_group)
            if group is None:
                group = k.iommu_groups[ds.iommu_group] = IommuGroup(ds.iommu_group)
            group.add_device(dev)
            k.devices[dev.bdf] = dev
            if dev.driver == "vfio-pci":
                k.vfio.register_device(dev.bdf, group, VfioPciDevice(dev, k.log), mode=ds.group_mode,
                                       uid=ds.group_uid, gid=ds.group_gid)
        k.log.info(f"vfiosim: {spec.name} ({spec.platform}), Linux {k.profile.version} profile, "
                   f"{k.page_size // 1024} KiB pages, {len(spec.devices)} device(s)")

    # -- introspection -------------------------------------------------------------------------------

    @property
    def page_size(self) -> int:
        return self.kernel.page_size

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
        if vfio.legacy:
            return None
        with self._lock:
            return next((d.cdev_name for d in vfio.devices if d.name == bdf.lower()), None)

    def device(self, bdf: str) -> PciDevice:
        try:
            return self.kernel.devices[bdf.lower()]
        except KeyError:
            raise KeyError(f"no device {bdf} on {self.name}; devices: {', '.join(self.kernel.devices)}") from None

    def pe_of(self, bdf: str) -> Pe:
        dev = self.device(bdf)
        if self.platform == "x86":
            raise ValueError(f"{self.name} is an x86 machine: it has no PEs (its VT-d units are machine.iommu_units)")
        return next(pe for pe in self.kernel.pes if dev in pe.devices)

    # Like every entry point, these take the machine's lock: another thread's
    # system call may be changing what they read (the log ring, pin counts).

    def dmesg(self, include_debug: bool = False) -> list[str]:
        with self._lock:
            return self.kernel.log.lines(include_debug)

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
    def faults(self):
        """The kernel's fault injector: ``fired``, ``counts``, ``fail_nth()``, ``disarm()``."""
        return self.kernel.faults

    def inject_fault(self, nth: int = 1, sites: str | list[str] | tuple[str, ...] | None = None):
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

    def _oops(self, call: str, exc: BaseException) -> OSError:
        text = "".join(traceback.format_exception(exc))
        self.oopses.append(f"{call}: {text}")
        self.kernel.log.err(f"vfiosim: internal error during {call}: {exc!r} (this is a vfiosim bug; "
                            f"machine.oopses has the traceback)")
        return OSError(errno.EIO, f"vfiosim internal error during {call}: {exc!r}")

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
    def mm(self):
        """The address space (for tests and introspection)."""
        return self.task.mm

    @property
    def alive(self) -> bool:
        return self.task.alive

    def _call(self, call: str | Callable[[], str], fn: Callable[..., T], *args: Any) -> T:
        """Run a syscall; ``call`` names it in errors (a callable is asked
        only then, keeping the hot path free of formatting)."""
        m = self.machine
        with m._lock:
            if not self.task.alive:
                raise ProcessLookupError(errno.ESRCH, f"process {self.pid} has exited")
            try:
                return fn(self.task, *args)
            except KernelError as exc:
                raise exc.to_oserror(call if isinstance(call, str) else call()) from None
            except Exception as exc:          # a bug in the simulator: never a traceback to the program
                raise m._oops(call if isinstance(call, str) else call(), exc) from None

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

        def with_buffer(task: Task) -> int:
            with task.mm.borrowed(arg) as addr:
                return k.sys_ioctl(task, fd, request, addr)
        return self._call(name, with_buffer)

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

    def mmap(self, length: int, prot: int = PROT_READ | PROT_WRITE, *, page_size: int | None = None) -> int:
        """Anonymous private memory.  ``page_size`` asks for huge pages (e.g.
        2 MiB, 16 MiB), which IOMMU pages larger than the base page need."""
        shift = None
        if page_size is not None:
            if page_size & (page_size - 1) or page_size < self.machine.page_size:
                raise ValueError(f"page_size {page_size} must be a power of two >= {self.machine.page_size}")
            shift = page_size.bit_length() - 1
        return self._call("mmap", lambda t: t.mm.mmap(length, prot, shift))

    def munmap(self, addr: int, length: int) -> None:
        self._call("munmap", lambda t: t.mm.munmap(addr, length))

    def mprotect(self, addr: int, length: int, prot: int) -> None:
        self._call("mprotect", lambda t: t.mm.mprotect(addr, length, prot))

    def mlock(self, addr: int, length: int) -> None:
        """mlock(2): lock the pages of [addr, addr+length) (VM_LOCKED), charged
        to VmLck against RLIMIT_MEMLOCK unless the process has CAP_IPC_LOCK."""
        self._call("mlock", lambda t: t.mm.mlock(addr, length, t))

    def munlock(self, addr: int, length: int) -> None:
        """munlock(2): unlock them; VmLck goes down by the pages that were locked."""
        self._call("munlock", lambda t: t.mm.munlock(addr, length))

    def write_memory(self, addr: int, data: bytes | bytearray | memoryview) -> None:
        self._call("write_memory", lambda t: t.mm.write(addr, data))

    def read_memory(self, addr: int, n: int) -> bytes:
        return self._call("read_memory", lambda t: t.mm.read(addr, n))

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
            mv = memoryview(vma.obj.data).cast("B")[off:off + length]
            return mv if vma.prot & _W else mv.toreadonly()
        return self._call("memory_view", view)

    # -- credentials and limits ---------------------------------------------------------------------

    def setrlimit(self, resource_id: int, limits: tuple[int, int]) -> None:
        self._call("setrlimit", lambda t: t.setrlimit(resource_id, limits))

    def getrlimit(self, resource_id: int) -> tuple[int, int]:
        return self._call("getrlimit", lambda t: t.rlimit(resource_id))

    def setuid(self, uid: int) -> None:
        self._call("setuid", lambda t: t.setuid(uid))

    def getuid(self) -> int:
        return self._call("getuid", lambda t: t.cred.uid)

    def geteuid(self) -> int:
        return self._call("geteuid", lambda t: t.cred.euid)

    # -- /proc/<pid>/status and exit -----------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        """The fields of /proc/<pid>/status that matter here (sizes in kB)."""
        def read(t: Task) -> dict[str, Any]:
            mm = t.mm
            kb = mm.page_size // 1024
            c = t.cred
            return {"Name": t.comm, "Pid": t.pid, "Uid": (c.uid, c.euid, c.suid, c.euid),
                    "Gid": (c.gid, c.egid, c.gid, c.egid), "VmSize": mm.mapped_bytes() // 1024,
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
            child = k.fork(t, pid, t.mm.fork())
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
        m = self.machine
        with m._lock:
            try:
                m.kernel.exit(self.task)
            except Exception as exc:
                raise m._oops("exit", exc) from None

    def __repr__(self) -> str:
        return f"<Process {self.pid} on {self.machine.name}{'' if self.alive else ' (exited)'}>"


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
