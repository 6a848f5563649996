"""The simulated kernel: system calls over tasks, files, memory and devices.

Pure and deterministic: no real I/O happens here.  Transports (the
in-process :class:`vfiosim.Process` API, the preload daemon) call the
``sys_*`` methods with a task and plain values, and get plain values back
or a :class:`KernelError` carrying the errno.
"""

from __future__ import annotations

import os
import resource
import termios
from dataclasses import dataclass
from errno import EACCES, EBADF, EINVAL, EIO, EISDIR, ENODEV, ENOENT, ENOTDIR, ESPIPE
from typing import TYPE_CHECKING, Callable

from ..uapi import vfio as uapi
from .config import DEBIAN, KernelConfig
from .cred import Cred
from .errors import KernelError, fail
from .eventfd import EFD_CLOEXEC, EFD_NONBLOCK, EFD_SEMAPHORE, EventFd
from .faults import FaultInjector
from .fs import DeviceNode, DirectoryFile, File, NullFile
from .log import KernelLog
from .mm import MM, PROT_WRITE, AddressSpace, PhysicalMemory, Vma
from .syscall import SyscallGate
from .platform.base import Platform
from .task import Task
from .uaccess import get_user_s32
from .user import UserTable
from .iommu.spapr_tce import SpaprTceIommuDriver
from .iommu.spapr_tce_310 import SpaprTce310IommuDriver
from .vfio.iommu_driver import VfioIommuDriver
from .vfio.vfio import VFIO_CORE_3_10, VFIO_CORE_6_12, Vfio, VfioCoreRules

if TYPE_CHECKING:
    from .iommu.iommu import IommuGroup
    from .platform.pe import Pe
    from .pci.device import PciDevice

O_ACCMODE = os.O_ACCMODE
# The ioctls ksys_ioctl() answers for every fd (do_vfs_ioctl).
_GENERIC_IOCTLS = frozenset((termios.FIOCLEX, termios.FIONCLEX, termios.FIONBIO))
_GROUP_GET_DEVICE_FD = uapi.VFIO_GROUP_GET_DEVICE_FD
# What sys_ioctl() does not hand straight to the file: the generic fd ioctls,
# and the one that makes a file.
_NOT_STRAIGHT = _GENERIC_IOCTLS | {_GROUP_GET_DEVICE_FD}


@dataclass(frozen=True)
class KernelProfile:
    """Which kernel's behaviour to simulate: the facts where kernels differ,
    each asked for by name (no version tests scattered through the code)."""

    version: str
    vfio: VfioCoreRules                                   # the VFIO core's groups and device fds
    spapr_driver: Callable[["Kernel"], VfioIommuDriver]   # the sPAPR TCE IOMMU driver
    # Platforms whose kernel has VFIO: 3.10's VFIO_IOMMU_SPAPR_TCE depends on
    # PPC_POWERNV (drivers/vfio/Kconfig), and the profile is about POWER.
    platforms: tuple[str, ...]
    # POWER PEs take part in the IOMMU API (spapr_tce_iommu_ops, Linux 6.x):
    # claiming a group hands the PE to the user through its blocking domain.
    power_iommu_api: bool
    # The PowerNV host's DMA setup is pnv_pci_ioda2_setup_default_config()
    # (a multi-level window and the 64-bit bypass); 3.10's was one 32-bit
    # table of 4 KiB pages, which its sPAPR driver took over.
    pnv_ioda2_default_window: bool
    # VFIO_EEH and VFIO_EEH_PE_OP exist.
    vfio_eeh: bool
    # CONFIG_IOMMUFD and CONFIG_VFIO_DEVICE_CDEV exist (Linux 6.2 and 6.6), and
    # so do sysfs's vfio-dev/vfioN (6.1): the kernel configuration may ask for them.
    iommufd: bool

    @staticmethod
    def get(version: str) -> "KernelProfile":
        if version not in KERNEL_PROFILES:
            raise ValueError(f"unknown kernel {version!r}: choose one of {', '.join(KERNEL_PROFILES)}")
        return _PROFILES[version]


# "6.12": upstream as of Linux 6.12 (the default).  "3.10": the VFIO core of
# 3.10 with the sPAPR driver as the 2013 patch that introduced it posted it
# ("vfio powerpc: implement IOMMU driver for VFIO").
_PROFILES = {
    "6.12": KernelProfile("6.12", VFIO_CORE_6_12, SpaprTceIommuDriver, platforms=("powernv", "pseries", "x86"),
                          power_iommu_api=True, pnv_ioda2_default_window=True, vfio_eeh=True, iommufd=True),
    "3.10": KernelProfile("3.10", VFIO_CORE_3_10, SpaprTce310IommuDriver, platforms=("powernv",),
                          power_iommu_api=False, pnv_ioda2_default_window=False, vfio_eeh=False, iommufd=False),
}
KERNEL_PROFILES = tuple(_PROFILES)


class _FileMapping:
    """The vm_ops of a mapping of a device file: the file's own mmio() and
    mmap_fault() at the offset of the mapped region; each VMA of it holds a
    reference to the file, so the device stays open while it is mapped."""

    __slots__ = ("file", "task", "region")

    def __init__(self, file: File, task: Task, region: int) -> None:
        self.file, self.task, self.region = file, task, region

    def open(self) -> None:
        self.file.get()

    def close(self) -> None:
        self.file.put(self.task)

    def access(self, off: int, size: int, value: int | None) -> int:
        return self.file.mmio(self.task, self.region + off, size, value)

    def fault(self, off: int, write: bool) -> None:
        self.file.mmap_fault(self.task, self.region + off, write)


def _never_live() -> bool:
    """The mmap_live_check() of a file no store through a mapping reaches."""
    return False


class Kernel:
    """One simulated machine's kernel."""

    def __init__(self, page_size: int, profile: KernelProfile, config: KernelConfig = DEBIAN) -> None:
        if page_size not in (4096, 65536):
            raise ValueError(f"page_size must be 4096 or 65536, not {page_size}")
        self.page_size = page_size
        self.page_shift = page_size.bit_length() - 1
        self.profile = profile
        self.log = KernelLog()
        self.gate = SyscallGate(self.log)              # the machine's lock; transports enter through it
        self.faults = FaultInjector(self.log.warn)     # fail_nth (kernel/faults.py)
        self.phys = PhysicalMemory(page_size)
        self.phys.faults = self.faults
        self.phys.log = self.log.warn
        self.config = config
        self.users = UserTable()
        # iommufd's module parameter allow_unsafe_interrupts; pr_info_once state.
        self.iommufd_allow_unsafe_interrupts = False
        self.iommufd_compat_announced = False
        # Whether the IOMMU drivers may take their fast paths for small maps:
        # straight-line code for the common case, observably identical to the
        # general path (tests/test_fast_path_equality.py).  Off, every call
        # takes the general path (VFIOSIM_FAST_PATHS=0, Machine.fast_paths).
        self.fast_paths = True
        self.phys.oom_killer = self._oom_kill
        self.vfio = Vfio(self, profile.vfio)
        self.dev_nodes: dict[str, DeviceNode] = {}
        if config.vfio_container:
            self.dev_nodes["/dev/vfio/vfio"] = self.vfio.container_node()
        if config.iommufd:
            from .iommufd import iommu_node, vfio_container_node
            self.dev_nodes["/dev/iommu"] = iommu_node(self)
            if config.iommufd_vfio_container:
                self.dev_nodes["/dev/vfio/vfio"] = vfio_container_node(self)
        self.devices: dict[str, "PciDevice"] = {}
        self.iommu_groups: dict[int, "IommuGroup"] = {}
        # The machine's IOMMU hardware; the platform builder (vfiosim/platforms.py) sets it.
        self.platform = Platform()
        self.tasks: dict[int, Task] = {}
        self._next_pid = 1000

    @property
    def pes(self) -> list["Pe"]:
        """POWER's Partitionable Endpoints (none on other platforms)."""
        return self.platform.pes

    def eeh_enabled(self) -> bool:
        return self.platform.eeh_enabled

    # -- processes ----------------------------------------------------------------------

    def spawn(self, uid: int, gid: int, rlimit_memlock: tuple[int, int], comm: str = "sim") -> Task:
        pid = self._next_pid
        self._next_pid += 1
        task = Task(pid, comm, Cred.for_user(uid, gid), MM(self.phys), rlimit_memlock)
        for _ in range(3):
            task.files.install(NullFile("/dev/null"))
        self.tasks[pid] = task
        return task

    def exit(self, task: Task) -> None:
        """do_exit(): the address space goes first (exit_mm), then the files
        (exit_files), so driver release paths see pinned pages, not VMAs."""
        if not task.alive:
            return
        task.alive = False
        task.mm.teardown()
        for fd in task.files.fds():
            task.files.remove(fd).put(task)
        self._drop_mm(task, task.mm, "exited")
        del self.tasks[task.pid]

    def _drop_mm(self, task: Task, mm: AddressSpace, why: str) -> None:
        """The task's own reference to ``mm`` is gone (exit, exec).  The mm goes
        when nothing else holds it: a container that set it (mmgrab) may."""
        mm.mmdrop()
        if mm.locked_vm:
            # Nothing can reach the mm any more: it is freed with whatever is
            # still charged to it (a leak upstream too, invisible from here on).
            self.log.info(f"vfiosim: pid {task.pid} {why} with {mm.locked_vm} pages still charged to "
                          f"locked_vm; they go with its mm")
            mm.locked_vm = 0

    def exec(self, task: Task, mm: AddressSpace) -> None:
        """execve(2): a new address space (exec_mmap), then the close-on-exec
        files are closed.  The old mm is torn down as at exit; a container
        that set it keeps it, so its ioctls from the new image fail with
        EPERM (tce_iommu_ioctl: container->mm != current->mm), as on Linux."""
        old, task.mm = task.mm, mm
        old.teardown()
        for fd in sorted(task.files.cloexec):
            task.files.remove(fd).put(task)
        self._drop_mm(task, old, "exec()ed")

    def _oom_kill(self, current: Task) -> bool:
        """out_of_memory() for a page a process's store needs: kill the task
        with the most memory (oom_badness(): its resident pages; the later
        task wins a tie), whatever it is doing, so that its pages go back.
        Only simulated processes hold simulated RAM; the victim may be
        ``current``.  Returns whether a task was killed."""
        victims = [t for t in self.tasks.values() if t.alive and isinstance(t.mm, MM)]
        if not victims:
            return False
        rss = {t.pid: t.mm.resident_bytes() >> 10 for t in victims}
        victim = max(victims, key=lambda t: (rss[t.pid], t.pid))
        kb = rss[victim.pid]
        self.log.warn(f"{current.comm} invoked oom-killer: gfp_mask=0x140cca(GFP_HIGHUSER_MOVABLE|__GFP_COMP), "
                      f"order=0, oom_score_adj=0")
        self.log.err(f"Out of memory: Killed process {victim.pid} ({victim.comm}) "
                     f"total-vm:{victim.mm.mapped_bytes() >> 10}kB, anon-rss:{kb}kB, file-rss:0kB, shmem-rss:0kB, "
                     f"UID:{victim.cred.uid} pgtables:{(kb + 2047) // 2048 * 4}kB oom_score_adj:0")
        self.exit(victim)
        return True

    def attach(self, pid: int, comm: str, cred: Cred, mm: AddressSpace, rlimit_memlock: tuple[int, int]) -> Task:
        """A task for an outside process (``vfiosim run``): its fd numbers are
        the real process's, so it starts with an empty table."""
        task = Task(pid, comm, cred, mm, rlimit_memlock)
        self.tasks[pid] = task
        return task

    def fork(self, parent: Task, child_pid: int, mm: AddressSpace, inherit: dict[int, int] | None = None) -> Task:
        """fork(2): the child shares every open file (one more reference each).
        ``inherit`` (child fd -> parent fd) limits it to those files, at those
        numbers, none close-on-exec: what a transport proved a child created
        outside its view (posix_spawn, clone) really holds."""
        child = Task(child_pid, parent.comm, Cred(**vars(parent.cred)), mm, parent.rlimit(resource.RLIMIT_MEMLOCK))
        if inherit is None:
            for fd, file in parent.files.items():
                child.files.install_at(fd, file.get(), cloexec=fd in parent.files.cloexec)
        else:
            for cfd, pfd in sorted(inherit.items()):
                child.files.install_at(cfd, parent.files.get(pfd).get())
        self.tasks[child_pid] = child
        return child

    # -- files ----------------------------------------------------------------------------------

    def sys_open(self, task: Task, path: str, flags: int, mode: int = 0, at_fd: int | None = None) -> int:
        norm = os.path.normpath(path) if path else path
        node = self.dev_nodes.get(norm)
        if node is None:
            if norm in ("/", "/dev", "/dev/vfio") or (norm == "/dev/vfio/devices" and self.config.vfio_device_cdev):
                if flags & O_ACCMODE != os.O_RDONLY:
                    raise fail(EISDIR, f"{path} is a directory")
                task.files.check_free()
                return task.files.install(DirectoryFile(norm, flags), cloexec=bool(flags & os.O_CLOEXEC))
            raise fail(ENOENT, f"{path} does not exist on this machine "
                               f"(VFIO nodes: {', '.join(sorted(self.dev_nodes))})")
        if flags & os.O_DIRECTORY:
            raise fail(ENOTDIR, f"{path} is a character device, not a directory")
        # do_sys_open(): the fd is allocated before the file is opened, so a
        # file that cannot be installed is never opened (and never left open).
        if at_fd is None:
            task.files.check_free()
        elif not 0 <= at_fd < task.files.max_fds:
            raise fail(EBADF, f"fd {at_fd} is out of range")
        node.check_permission(task, flags)
        file = node.opener(task, flags)
        try:
            if at_fd is not None:
                task.files.install_at(at_fd, file, cloexec=bool(flags & os.O_CLOEXEC))
                return at_fd
            return task.files.install(file, cloexec=bool(flags & os.O_CLOEXEC))
        except KernelError:
            file.put(task)
            raise

    def sys_chown(self, task: Task, path: str, uid: int, gid: int) -> None:
        self._node(path).chown(task, uid, gid)

    def sys_chmod(self, task: Task, path: str, mode: int) -> None:
        self._node(path).chmod(task, mode)

    def _node(self, path: str) -> DeviceNode:
        node = self.dev_nodes.get(os.path.normpath(path) if path else path)
        if node is None:
            raise fail(ENOENT, f"{path} does not exist on this machine")
        return node

    def sys_close(self, task: Task, fd: int) -> None:
        task.files.remove(fd).put(task)

    def sys_dup(self, task: Task, fd: int) -> int:
        file = task.files.get(fd)
        task.files.check_free()
        return task.files.install(file.get())

    def sys_dup2(self, task: Task, oldfd: int, newfd: int, cloexec: bool = False) -> int:
        """dup2(2)/dup3(2): ``newfd`` now names the same open file.  As
        ksys_dup3(), a ``newfd`` past RLIMIT_NOFILE is EBADF before the file
        is looked up (and referenced)."""
        if oldfd == newfd:
            task.files.get(oldfd)
            return newfd
        if not 0 <= newfd < task.files.max_fds:
            raise fail(EBADF, f"fd {newfd} is out of range (RLIMIT_NOFILE {task.files.max_fds})")
        file = task.files.get(oldfd)
        try:
            old = task.files.remove(newfd)
        except KernelError:
            old = None
        task.files.install_at(newfd, file.get(), cloexec=cloexec)
        if old is not None:
            old.put(task)
        return newfd

    def sys_mmap_check(self, task: Task, fd: int, offset: int, length: int, prot: int, shared: bool) -> None:
        """mmap(2) of a device fd: the driver's checks (vfio_pci_core_mmap)."""
        task.files.get(fd).mmap_check(task, offset, length, prot, shared)

    def sys_mmap(self, task: Task, length: int, prot: int, *, fd: int | None = None, offset: int = 0,
                 shared: bool = False, compound_shift: int | None = None, noreserve: bool = False) -> int:
        """mmap(2) in a simulated process: anonymous private memory, or (with
        ``fd``) a shared mapping of a device region.  As do_mmap(): the
        mapping count first, then the file's access mode (EACCES: a shared
        writable mapping needs the file open for writing, any mapping needs
        it open for reading), then the driver's mmap."""
        mm = task.mm
        if not isinstance(mm, MM):
            raise fail(ENODEV, "this task's memory is a real process's: mmap(2) is the host's")
        if fd is None:
            return mm.mmap(length, prot, compound_shift, noreserve=noreserve, current=task)
        file = task.files.get(fd)
        if length <= 0:
            raise fail(EINVAL, f"mmap length {length} must be positive")
        mm.check_map_count()
        if shared and prot & PROT_WRITE and not file.can_write:
            raise fail(EACCES, f"a shared writable mapping of fd {fd} needs it open for writing")
        if not file.can_read:
            raise fail(EACCES, f"mapping fd {fd} needs it open for reading")
        file.mmap_check(task, offset, length, prot, shared)
        obj, pgoff = file.mmap_pages(offset)
        ops = _FileMapping(file, task, offset - pgoff)
        addr = mm.mmap_pfn(length, prot, obj, pgoff, ops)
        ops.open()                            # vma->vm_file = get_file(file)
        return addr

    def sys_mmio(self, task: Task, fd: int, offset: int, size: int, value: int | None = None) -> int:
        """A load (value None) or store through an mmap of a device region."""
        return task.files.get(fd).mmio(task, offset, size, value)

    def sys_ioctl(self, task: Task, fd: int, cmd: int, arg: int, newfd: int | None = None) -> int:
        """ksys_ioctl(): generic fd ioctls, then the file's own.  A transport
        serving a real process passes ``newfd``: the number the process
        already holds for the file VFIO_GROUP_GET_DEVICE_FD makes (the only
        ioctl that makes one), -1 if none (:meth:`_ioctl_at`)."""
        try:
            file = task.files.by_fd[fd]     # FdTable.get() without its frame (every call)
        except (KeyError, TypeError):
            file = task.files.get(fd)       # EBADF, or a real process's file outside the kernel
        cmd &= 0xFFFFFFFF
        if cmd not in _NOT_STRAIGHT:
            return file.ioctl(task, cmd, arg)
        if cmd == _GROUP_GET_DEVICE_FD:
            if newfd is None:
                return file.ioctl(task, cmd, arg)
            return self._ioctl_at(task, file, cmd, arg, newfd)
        if cmd == termios.FIOCLEX:
            task.files.cloexec.add(fd)
            return 0
        if cmd == termios.FIONCLEX:
            task.files.cloexec.discard(fd)
            return 0
        if cmd == termios.FIONBIO:
            on = get_user_s32(task, arg)
            file.f_flags = file.f_flags | os.O_NONBLOCK if on else file.f_flags & ~os.O_NONBLOCK
            return 0
        return file.ioctl(task, cmd, arg)

    def sys_pread(self, task: Task, fd: int, count: int, offset: int) -> bytes:
        if offset < 0:
            raise fail(EINVAL, f"negative offset {offset}")
        file = task.files.get(fd)
        if not file.positional:
            raise fail(ESPIPE, f"fd {fd} ({file.kind}) is not seekable")
        return self._read(file, task, fd, count, offset)

    def sys_pwrite(self, task: Task, fd: int, data: bytes, offset: int) -> int:
        if offset < 0:
            raise fail(EINVAL, f"negative offset {offset}")
        file = task.files.get(fd)
        if not file.positional:
            raise fail(ESPIPE, f"fd {fd} ({file.kind}) is not seekable")
        return self._write(file, task, fd, data, offset)

    def sys_read(self, task: Task, fd: int, count: int) -> bytes:
        return self._read(task.files.get(fd), task, fd, count, 0)

    def sys_write(self, task: Task, fd: int, data: bytes) -> int:
        return self._write(task.files.get(fd), task, fd, data, 0)

    @staticmethod
    def _read(file: File, task: Task, fd: int, count: int, offset: int) -> bytes:
        if not file.can_read:
            raise fail(EBADF, f"fd {fd} was not opened for reading")
        if count < 0:
            raise fail(EINVAL, f"negative count {count}")
        return file.read(task, count, offset)

    @staticmethod
    def _write(file: File, task: Task, fd: int, data: bytes, offset: int) -> int:
        if not file.can_write:
            raise fail(EBADF, f"fd {fd} was not opened for writing")
        return file.write(task, data, offset)

    def sys_eventfd(self, task: Task, initval: int, flags: int) -> int:
        if flags & ~(EFD_SEMAPHORE | EFD_CLOEXEC | EFD_NONBLOCK) or not 0 <= initval <= 0xFFFFFFFF:
            raise fail(EINVAL, f"eventfd flags {flags:#x} or initial value {initval} invalid")
        task.files.check_free()
        efd = EventFd(initval, flags)
        if flags & EFD_NONBLOCK:
            efd.f_flags |= os.O_NONBLOCK
        return task.files.install(efd, cloexec=bool(flags & EFD_CLOEXEC))

    # -- for transports that serve real processes (vfiosim run) -----------------------------------
    # The program's fd numbers are the real process's: the transport tells the
    # kernel which number a new file gets, and a program's own files (pipes,
    # eventfds) are the host's, never the simulated table's.

    def sys_fcntl_setfd(self, task: Task, fd: int, cloexec: bool) -> None:
        """fcntl(F_SETFD) of a simulated file (the host already did the real one)."""
        if task.files.lookup(fd) is None:
            raise fail(EBADF, f"fd {fd} is not a VFIO file")
        if cloexec:
            task.files.cloexec.add(fd)
        else:
            task.files.cloexec.discard(fd)

    def _ioctl_at(self, task: Task, file: File, cmd: int, arg: int, newfd: int) -> int:
        """The file's ioctl, whose new file goes to ``newfd`` (none: -1, EIO)."""
        before = set(task.files.fds())
        try:
            ret = file.ioctl(task, cmd, arg)
        finally:
            new = [n for n in task.files.fds() if n not in before]
        if not new:
            return ret
        # The kernel installed it at the lowest free number of the simulated table.
        moved = None
        for n in new:
            cloexec = n in task.files.cloexec
            file = task.files.remove(n)
            if n == ret and newfd >= 0 and moved is None:
                task.files.install_at(newfd, file, cloexec=cloexec)
                moved = newfd
            else:
                file.put(task)
        if moved is None:
            raise fail(EIO, "the ioctl returned a new fd but the program has no fd for it")
        return moved

    def sys_read_user(self, task: Task, fd: int, buf: int, count: int, offset: int | None) -> int:
        """read(2)/pread(2) into the task's memory at ``buf``."""
        data = self.sys_read(task, fd, count) if offset is None else self.sys_pread(task, fd, count, offset)
        if data:
            task.mm.write(buf, data)
        return len(data)

    def sys_write_user(self, task: Task, fd: int, buf: int, count: int, offset: int | None) -> int:
        """write(2)/pwrite(2) from the task's memory at ``buf``: EBADF before EFAULT, as vfs_write()."""
        file = task.files.get(fd)
        if not file.can_write:
            raise fail(EBADF, f"fd {fd} was not opened for writing")
        data = task.mm.read(buf, count)
        return self.sys_write(task, fd, data) if offset is None else self.sys_pwrite(task, fd, data, offset)

    def sys_mmap_host(self, task: Task, fd: int, offset: int, length: int, prot: int, shared: bool) -> File:
        """mmap(2) of a device fd by a real process, whose memory is the host's
        (the transport maps the range itself): the driver's checks; returns the
        mapping's reference on the file (vm_file), dropped by :meth:`munmap_file`."""
        self.sys_mmap_check(task, fd, offset, length, prot, shared)
        return task.files.get(fd).get()

    def host_device_vma(self, task: Task, file: File, offset: int, start: int, length: int, prot: int) -> Vma:
        """The VMA a real process's mapping of a device file (sys_mmap_host) is,
        at ``start``: a VM_PFNMAP mapping of the device's pages, as
        :meth:`sys_mmap` makes in-process; what its address space's find_vma()
        gives for it (the transport holds the vm_file reference)."""
        obj, pgoff = file.mmap_pages(offset)
        return Vma(start, start + length, prot, obj, pgoff, kind="pfnmap", ops=_FileMapping(file, task, offset - pgoff))

    def mmap_access(self, task: Task, file: File, offset: int, size: int, value: int | None) -> int:
        """A load (``value`` None) or store of ``size`` bytes at ``offset`` of a
        mapping of ``file`` (offset in the file's mmap space)."""
        if size not in (1, 2, 4, 8):
            raise fail(EINVAL, f"MMIO access of {size} bytes")
        mmio = getattr(file, "mmio", None)
        if mmio is None:
            raise fail(ENODEV, f"{file.kind} has no mapped region")
        return int(mmio(task, offset, size, value))

    def mmap_store_fn(self, file: File, offset: int, size: int) -> Callable[[int], bool] | None:
        """A shortcut the device offers for stores of ``size`` bytes at
        ``offset`` of a mapping of ``file`` (a doorbell it declared): called
        with the value, it performs the store as :meth:`mmap_access` would
        and returns True, or does nothing and returns False where that would
        fail (mmap_access then says how).  None: no shortcut here.  Every
        check that can change is made on each call; a caller may keep it for
        the mapping's life."""
        if size not in (1, 2, 4, 8):
            return None
        store_fn = getattr(file, "mmio_store_fn", None)
        return store_fn(offset, size) if store_fn is not None else None

    def mmap_load_fn(self, file: File, offset: int, size: int) -> Callable[[], int | None] | None:
        """mmap_store_fn() for loads (a status register a driver polls):
        called, it returns what :meth:`mmap_access` would, or None where that
        would fail (mmap_access then says how).  None: no shortcut here."""
        if size not in (1, 2, 4, 8):
            return None
        load_fn = getattr(file, "mmio_load_fn", None)
        return load_fn(offset, size) if load_fn is not None else None

    def munmap_file(self, task: Task, file: File) -> None:
        file.put(task)

    def mmap_posted_writes(self, file: File, offset: int, length: int) -> list[tuple[int, int, bool]]:
        """Where a store through a mapping of ``file`` may be posted (from the
        mapping's start), and whether it has side effects (to be performed at
        once), as the device model declares its registers."""
        ranges = getattr(file, "mmap_posted_writes", None)
        return ranges(offset, length) if ranges is not None else []

    def mmap_live(self, file: File) -> bool:
        """Whether a posted store through a mapping of ``file`` reaches the device now."""
        live = getattr(file, "mmap_live", None)
        return bool(live()) if live is not None else False

    def mmap_live_check(self, file: File) -> Callable[[], bool]:
        """mmap_live(file) as a callable a transport keeps for a mapping and
        calls after each call of its program (the file's own, fewer frames)."""
        check = getattr(file, "mmap_live_check", None)
        return check() if check is not None else _never_live

    def eventfd_in_use(self, efd: EventFd) -> bool:
        """A device signals ``efd`` (an interrupt trigger) or waits on it (a virqfd)."""
        if efd.waiters:
            return True
        return any(e is efd for group in self.vfio.groups.values() for vdev in group.devices
                   for e in vdev.ops.eventfds())
