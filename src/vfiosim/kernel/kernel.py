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
from errno import EBADF, EINVAL, EISDIR, ENODEV, ENOENT, ENOTDIR, ESPIPE
from typing import TYPE_CHECKING

from ..uapi import vfio as uapi
from .config import DEBIAN, KernelConfig
from .cred import Cred
from .errors import KernelError, fail
from .eventfd import EFD_CLOEXEC, EFD_NONBLOCK, EFD_SEMAPHORE, EventFd
from .faults import FaultInjector
from .fs import DeviceNode, DirectoryFile, File, NullFile
from .log import KernelLog
from .mm import MM, PhysicalMemory
from .task import Task
from .uaccess import copy_struct_from_user, get_user_s32
from .user import UserTable
from .vfio.vfio import Vfio

if TYPE_CHECKING:
    from typing import Any as MMLike

    from .iommu.iommu import IommuGroup
    from .platform.pe import Pe
    from .pci.device import PciDevice

O_ACCMODE = os.O_ACCMODE


@dataclass(frozen=True)
class KernelProfile:
    """Which kernel's behaviour to simulate."""

    version: str

    @property
    def legacy(self) -> bool:
        return self.version == "3.10"

    @staticmethod
    def get(version: str) -> "KernelProfile":
        if version not in KERNEL_PROFILES:
            raise ValueError(f"unknown kernel {version!r}: choose one of {', '.join(KERNEL_PROFILES)}")
        return KernelProfile(version)


# "6.12": upstream as of Linux 6.12 (the default).  "3.10": the VFIO core of
# 3.10 with the sPAPR driver as the seed patch posted it.
KERNEL_PROFILES = ("6.12", "3.10")


class Kernel:
    """One simulated machine's kernel."""

    def __init__(self, page_size: int, profile: KernelProfile, config: KernelConfig = DEBIAN) -> None:
        if page_size not in (4096, 65536):
            raise ValueError(f"page_size must be 4096 or 65536, not {page_size}")
        self.page_size = page_size
        self.page_shift = page_size.bit_length() - 1
        self.profile = profile
        self.log = KernelLog()
        self.faults = FaultInjector(self.log.warn)     # fail_nth (kernel/faults.py)
        self.phys = PhysicalMemory(page_size)
        self.phys.faults = self.faults
        self.phys.log = self.log.warn
        self.config = config
        self.users = UserTable()
        # iommufd's module parameter allow_unsafe_interrupts; pr_info_once state.
        self.iommufd_allow_unsafe_interrupts = False
        self.iommufd_compat_announced = False
        self.vfio = Vfio(self, legacy=profile.legacy)
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
        self.pes: list["Pe"] = []
        self.eeh_available = False
        self.tasks: dict[int, Task] = {}
        self._next_pid = 1000

    def eeh_enabled(self) -> bool:
        return self.eeh_available

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

    def _drop_mm(self, task: Task, mm: "MMLike", why: str) -> None:
        """The task's own reference to ``mm`` is gone (exit, exec).  The mm goes
        when nothing else holds it: a container that set it (mmgrab) may."""
        from .iommu import prereg
        prereg.mmdrop(mm, user=True)  # type: ignore[arg-type]
        if mm.locked_vm:
            # Nothing can reach the mm any more: it is freed with whatever is
            # still charged to it (a leak upstream too, invisible from here on).
            self.log.info(f"vfiosim: pid {task.pid} {why} with {mm.locked_vm} pages still charged to "
                          f"locked_vm; they go with its mm")
            mm.locked_vm = 0

    def exec(self, task: Task, mm: "MMLike") -> None:
        """execve(2): a new address space (exec_mmap), then the close-on-exec
        files are closed.  The old mm is torn down as at exit; a container
        that set it keeps it, so its ioctls from the new image fail with
        EPERM (tce_iommu_ioctl: container->mm != current->mm), as on Linux."""
        old, task.mm = task.mm, mm
        old.teardown()
        for fd in sorted(task.files.cloexec):
            task.files.remove(fd).put(task)
        self._drop_mm(task, old, "exec()ed")

    def attach(self, pid: int, comm: str, cred: Cred, mm: "MMLike", rlimit_memlock: tuple[int, int]) -> Task:
        """A task for an outside process (``vfiosim run``): its fd numbers are
        the real process's, so it starts with an empty table."""
        task = Task(pid, comm, cred, mm, rlimit_memlock)  # type: ignore[arg-type]
        self.tasks[pid] = task
        return task

    def fork(self, parent: Task, child_pid: int, mm: "MMLike") -> Task:
        """fork(2): the child shares every open file (one more reference each)."""
        child = Task(child_pid, parent.comm, Cred(**vars(parent.cred)), mm,  # type: ignore[arg-type]
                     parent.rlimit(resource.RLIMIT_MEMLOCK))
        for fd, file in parent.files.items():
            child.files.install_at(fd, file.get(), cloexec=fd in parent.files.cloexec)
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
        file = task.files.get(fd)
        mmap_check = getattr(file, "mmap_check", None)
        if mmap_check is None:
            raise fail(ENODEV, f"fd {fd} ({file.kind}) cannot be mmapped")
        mmap_check(task, offset, length, prot, shared)

    def sys_mmio(self, task: Task, fd: int, offset: int, size: int, value: int | None = None) -> int:
        """A load (value None) or store through an mmap of a device region."""
        file = task.files.get(fd)
        mmio = getattr(file, "mmio", None)
        if mmio is None:
            raise fail(ENODEV, f"fd {fd} ({file.kind}) has no mmapped region")
        return mmio(task, offset, size, value)

    def sys_ioctl(self, task: Task, fd: int, cmd: int, arg: int) -> int:
        """ksys_ioctl(): generic fd ioctls, then the file's own."""
        file = task.files.get(fd)
        cmd &= 0xFFFFFFFF
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

    # -- EEH (arch/powerpc/kernel/eeh.c, vfio_spapr_ioctl_eeh_pe_op) ---------------------------------

    def eeh_pe_op(self, group: "IommuGroup", arg: int, current: Task) -> int:
        pe = next((p for p in self.pes if p.iommu_group is group), None)
        eeh = pe.eeh if pe is not None else None
        if eeh is None or not self.eeh_enabled():
            raise fail(ENODEV, f"IOMMU group {group.id} has no EEH PE (EEH is not available on this machine)")
        cls = uapi.vfio_eeh_pe_op
        minsz = uapi.offsetofend(cls, "op")
        op = copy_struct_from_user(current, arg, cls, minsz)
        if op.argsz < minsz or op.flags:
            raise fail(EINVAL, f"VFIO_EEH_PE_OP: argsz {op.argsz} < {minsz} or flags {op.flags:#x} != 0")
        from .platform import eeh as E
        which = op.op
        if which == uapi.VFIO_EEH_PE_DISABLE:
            return eeh.set_option(E.EEH_OPT_DISABLE)
        if which == uapi.VFIO_EEH_PE_ENABLE:
            return eeh.set_option(E.EEH_OPT_ENABLE)
        if which == uapi.VFIO_EEH_PE_UNFREEZE_IO:
            return eeh.set_option(E.EEH_OPT_THAW_MMIO)
        if which == uapi.VFIO_EEH_PE_UNFREEZE_DMA:
            return eeh.set_option(E.EEH_OPT_THAW_DMA)
        if which == uapi.VFIO_EEH_PE_GET_STATE:
            return eeh.get_state()
        if which == uapi.VFIO_EEH_PE_RESET_DEACTIVATE:
            return eeh.reset(E.EEH_RESET_DEACTIVATE)
        if which == uapi.VFIO_EEH_PE_RESET_HOT:
            return eeh.reset(E.EEH_RESET_HOT)
        if which == uapi.VFIO_EEH_PE_RESET_FUNDAMENTAL:
            return eeh.reset(E.EEH_RESET_FUNDAMENTAL)
        if which == uapi.VFIO_EEH_PE_CONFIGURE:
            return eeh.configure()
        if which == uapi.VFIO_EEH_PE_INJECT_ERR:
            full = uapi.offsetofend(cls, "err.mask")
            if op.argsz < full:
                raise fail(EINVAL, f"VFIO_EEH_PE_INJECT_ERR: argsz {op.argsz} < {full}")
            op = copy_struct_from_user(current, arg, cls, full)
            return eeh.inject_err(op.err.type, op.err.func, op.err.addr, op.err.mask)
        raise fail(EINVAL, f"VFIO_EEH_PE_OP: unknown op {which}")



