"""Files, file descriptors and device nodes (the parts of the VFS VFIO uses)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from errno import EACCES, EBADF, EINVAL, EISDIR, EMFILE, ENODEV, ENOTTY, EPERM
from typing import TYPE_CHECKING, Callable

from .cred import CAP_CHOWN, CAP_DAC_OVERRIDE, CAP_FOWNER, CAP_FSETID
from .errors import KernelBug, fail

if TYPE_CHECKING:
    from .mm import PhysicalPages
    from .task import Task

O_ACCMODE = os.O_ACCMODE
O_CLOEXEC = os.O_CLOEXEC
NR_OPEN_DEFAULT = 1024          # RLIMIT_NOFILE soft limit of a login shell


class File:
    """An open file description (``struct file``).

    Reference counted like the kernel's: every fd, and every object that
    pins a file (a VFIO device fd pins its group's file), holds a reference;
    ``release()`` runs when the last one is dropped.
    """

    kind = "file"
    # FMODE_PREAD/FMODE_PWRITE: set for files that support positional I/O.
    positional = True

    def __init__(self, name: str, f_flags: int = os.O_RDWR) -> None:
        self.name = name
        self.f_flags = f_flags
        self._refs = 1
        self.released = False

    @property
    def can_read(self) -> bool:
        return (self.f_flags & O_ACCMODE) in (os.O_RDONLY, os.O_RDWR)

    @property
    def can_write(self) -> bool:
        return (self.f_flags & O_ACCMODE) in (os.O_WRONLY, os.O_RDWR)

    def get(self) -> "File":
        if self._refs <= 0:
            raise KernelBug(f"get() on released file {self.name}")
        self._refs += 1
        return self

    def put(self, current: "Task") -> None:
        if self._refs <= 0:
            raise KernelBug(f"put() on released file {self.name}")
        self._refs -= 1
        if self._refs == 0:
            self.released = True
            self.release(current)

    # -- file operations; the defaults are what the VFS answers for a file
    #    whose driver does not implement the operation ----------------------

    def release(self, current: "Task") -> None:
        pass

    def ioctl(self, current: "Task", cmd: int, arg: int) -> int:
        raise fail(ENOTTY, f"{self.name} has no ioctl {cmd:#x}")

    def read(self, current: "Task", count: int, pos: int) -> bytes:
        raise fail(EINVAL, f"{self.name} does not support read")

    def write(self, current: "Task", data: bytes, pos: int) -> int:
        raise fail(EINVAL, f"{self.name} does not support write")

    def mmap_check(self, current: "Task", offset: int, length: int, prot: int, shared: bool) -> None:
        """The driver's checks for mmap(2) of this file (no ->mmap: ENODEV)."""
        raise fail(ENODEV, f"{self.name} ({self.kind}) cannot be mmapped")

    def mmio(self, current: "Task", offset: int, size: int, value: int | None) -> int:
        """A CPU load (value None) or store through an mmap of this file."""
        raise fail(ENODEV, f"{self.name} ({self.kind}) has no mmapped region")

    def mmap_pages(self, offset: int) -> "tuple[PhysicalPages, int]":
        """The memory a mapping at ``offset`` (checked by mmap_check) maps,
        and the byte offset in it: what its page table entries point at."""
        raise fail(ENODEV, f"{self.name} ({self.kind}) cannot be mmapped")

    def mmap_fault(self, current: "Task", offset: int, write: bool) -> None:
        """The mapping's fault handler for the page at ``offset``: raises
        EFAULT where it answers VM_FAULT_SIGBUS."""

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name} refs={self._refs}>"


class NullFile(File):
    """What a spawned process has on fds 0-2: /dev/null."""

    kind = "null"

    def read(self, current: "Task", count: int, pos: int) -> bytes:
        return b""

    def write(self, current: "Task", data: bytes, pos: int) -> int:
        return len(data)


class FdTable:
    """``struct files_struct``: fd numbers to files, lowest free fd first."""

    def __init__(self, max_fds: int = NR_OPEN_DEFAULT) -> None:
        self._fds: dict[int, File] = {}
        self.by_fd = self._fds          # (read only: the syscalls' look-up without get()'s frame)
        self.cloexec: set[int] = set()
        self.max_fds = max_fds          # RLIMIT_NOFILE
        self.slots = 64                 # fdt->max_fds: /proc/<pid>/status FDSize
        # For a task that is a real process (``vfiosim run``): the files the
        # process has open outside the simulated kernel (its eventfds, pipes,
        # sockets), looked up by number when the table has none there, so
        # that fds passed inside ioctl arguments resolve as the kernel's
        # fdget() would.  Such files are borrowed, never installed.
        self.foreign: Callable[[int], File | None] | None = None
        self.owner: "Task | None" = None       # the task whose table this is (set by Task)

    def _lowest_free(self) -> int:
        fd = 0
        while fd in self._fds:
            fd += 1
        if fd >= self.max_fds:
            raise fail(EMFILE, f"no free file descriptor below {self.max_fds}")
        return fd

    def check_free(self) -> None:
        """get_unused_fd_flags() before work that installs a file: EMFILE first."""
        self._lowest_free()

    def install(self, file: File, cloexec: bool = False) -> int:
        fd = self._lowest_free()
        while fd >= self.slots:         # expand_fdtable(): the table grows in powers of two
            self.slots *= 2
        self._fds[fd] = file
        if cloexec:
            self.cloexec.add(fd)
        return fd

    def install_at(self, fd: int, file: File, cloexec: bool = False) -> None:
        """Install at a given number (the transport keeps the simulated fd
        table in step with the real process's).  An occupant is replaced and
        released as close() would release it: a real process's fd number can
        be reused behind the simulator's back (a close the shim never saw),
        and the file it named must not stay open for good."""
        if not 0 <= fd < self.max_fds:
            raise fail(EBADF, f"fd {fd} is out of range")
        while fd >= self.slots:
            self.slots *= 2
        old = self._fds.get(fd)
        self._fds[fd] = file
        if cloexec:
            self.cloexec.add(fd)
        else:
            self.cloexec.discard(fd)
        if old is not None:
            old.put(self.owner)  # type: ignore[arg-type]

    def get(self, fd: int) -> File:
        try:
            return self._fds[fd]
        except (KeyError, TypeError):
            if self.foreign is not None and isinstance(fd, int) and fd >= 0:
                file = self.foreign(fd)
                if file is not None:
                    return file
            raise fail(EBADF, f"fd {fd} is not open") from None

    def lookup(self, fd: int) -> File | None:
        """The file the table itself holds at ``fd`` (never a foreign one)."""
        return self._fds.get(fd) if isinstance(fd, int) else None

    def remove(self, fd: int) -> File:
        try:
            file = self._fds[fd]
        except (KeyError, TypeError):
            raise fail(EBADF, f"fd {fd} is not open") from None
        del self._fds[fd]
        self.cloexec.discard(fd)
        return file

    def fds(self) -> list[int]:
        return sorted(self._fds)

    def items(self) -> list[tuple[int, File]]:
        return sorted(self._fds.items())


class DirectoryFile(File):
    """An O_RDONLY open of a directory such as /dev/vfio: good for nothing
    VFIO cares about, but open(2) succeeds."""

    kind = "directory"

    def read(self, current: "Task", count: int, pos: int) -> bytes:
        raise fail(EISDIR, f"{self.name} is a directory")

    def write(self, current: "Task", data: bytes, pos: int) -> int:
        raise fail(EBADF, f"{self.name} is open read-only")


@dataclass
class DeviceNode:
    """A character device node under /dev with its owner and mode."""

    path: str
    opener: Callable[["Task", int], File]
    mode: int = 0o600
    uid: int = 0
    gid: int = 0

    def check_permission(self, current: "Task", f_flags: int) -> None:
        """generic_permission(): DAC bits, CAP_DAC_OVERRIDE bypassing them."""
        want = {os.O_RDONLY: 4, os.O_WRONLY: 2, os.O_RDWR: 6}.get(f_flags & O_ACCMODE, 6)
        cred = current.cred
        if cred.euid == self.uid:
            bits = (self.mode >> 6) & 7
        elif cred.egid == self.gid or self.gid in cred.groups:
            bits = (self.mode >> 3) & 7
        else:
            bits = self.mode & 7
        if bits & want == want or cred.capable(CAP_DAC_OVERRIDE):
            return
        raise fail(EACCES, f"{self.path} is mode {self.mode:o} owned by {self.uid}:{self.gid}; "
                           f"uid {cred.euid} may not open it {'for writing' if want & 2 else 'for reading'}")

    def chown(self, current: "Task", uid: int, gid: int) -> None:
        """chown(2) (chown_common, setattr_prepare): -1 keeps an id.  A new owner
        needs CAP_CHOWN; the owner may give the node to a group it is in."""
        cred = current.cred
        uid = self.uid if uid in (-1, 0xFFFFFFFF) else uid
        gid = self.gid if gid in (-1, 0xFFFFFFFF) else gid
        if uid != self.uid and not cred.capable(CAP_CHOWN):
            raise fail(EPERM, f"{self.path}: giving it to uid {uid} needs CAP_CHOWN")
        if gid != self.gid and not cred.capable(CAP_CHOWN) and \
                not (cred.euid == self.uid and (gid == cred.egid or gid in cred.groups)):
            raise fail(EPERM, f"{self.path}: uid {cred.euid} may not give it to group {gid}")
        self.uid, self.gid = uid, gid

    def chmod(self, current: "Task", mode: int) -> None:
        """chmod(2): the owner, or CAP_FOWNER; without CAP_FSETID a non-member
        of the node's group loses S_ISGID (setattr_prepare)."""
        cred = current.cred
        if cred.euid != self.uid and not cred.capable(CAP_FOWNER):
            raise fail(EPERM, f"{self.path} is owned by uid {self.uid}: uid {cred.euid} may not chmod it")
        mode &= 0o7777
        if mode & 0o2000 and not (cred.egid == self.gid or self.gid in cred.groups) and not cred.capable(CAP_FSETID):
            mode &= ~0o2000
        self.mode = mode
