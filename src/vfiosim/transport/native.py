"""The daemon's helper library (src/vfiosim/preload/vfiosim_daemon.c), through ctypes.

ctypes releases the GIL around each foreign call, so a thread waiting in
:meth:`Channel.serve` for its program's next request leaves the others free.
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
from contextlib import contextmanager
from typing import Iterator

from . import protocol as P

_lib: ctypes.CDLL | None = None


def lib() -> ctypes.CDLL:
    global _lib
    if _lib is None:
        from ..preload import daemon_library_path
        dll = ctypes.CDLL(daemon_library_path(), use_errno=True)
        vp, u32, u64, i32 = ctypes.c_void_p, ctypes.c_uint32, ctypes.c_uint64, ctypes.c_int
        dll.vd_wait.argtypes = [vp, u32, vp, vp, i32]
        dll.vd_wait.restype = i32
        dll.vd_take_request.argtypes = [vp, vp]
        dll.vd_take_request.restype = u32
        dll.vd_reply.argtypes = [vp, u32, vp, u32]
        dll.vd_reply.restype = None
        dll.vd_next.argtypes = [vp, ctypes.c_char_p, u32, i32]
        dll.vd_next.restype = i32
        dll.vd_wake.argtypes = [vp]
        dll.vd_wake.restype = None
        dll.vd_take_posts.argtypes = [vp, vp, i32]
        dll.vd_take_posts.restype = i32
        dll.vd_creds.argtypes = [i32, i32, vp]
        dll.vd_creds.restype = i32
        dll.vd_as_user.argtypes = [u32, u32, i32, vp]
        dll.vd_as_user.restype = i32
        dll.vd_as_root.argtypes = [u32, i32, vp]
        dll.vd_as_root.restype = i32
        dll.vd_kcmp_file.argtypes = [i32, i32, i32, i32]
        dll.vd_kcmp_file.restype = i32
        dll.vd_pidfd_getfd.argtypes = [i32, i32]
        dll.vd_pidfd_getfd.restype = i32
        dll.vd_vma.argtypes = [i32, u64, i32, vp]
        dll.vd_vma.restype = i32
        dll.vd_uread.argtypes = [i32, i32, u64, u64, vp]
        dll.vd_uread.restype = i32
        dll.vd_uwrite.argtypes = [i32, i32, u64, u64, vp]
        dll.vd_uwrite.restype = i32
        dll.vd_dma.argtypes = [i32, u64, u64, vp, i32]
        dll.vd_dma.restype = i32
        dll.vd_dma_many.argtypes = [i32, i32, vp, vp, vp, i32]
        dll.vd_dma_many.restype = i32
        _lib = dll
    return _lib


class Creds(ctypes.Structure):
    _fields_ = [("ruid", ctypes.c_uint32), ("euid", ctypes.c_uint32), ("suid", ctypes.c_uint32),
                ("fsuid", ctypes.c_uint32), ("rgid", ctypes.c_uint32), ("egid", ctypes.c_uint32),
                ("sgid", ctypes.c_uint32), ("fsgid", ctypes.c_uint32), ("cap_eff", ctypes.c_uint64),
                ("cap_prm", ctypes.c_uint64), ("memlock_cur", ctypes.c_uint64), ("memlock_max", ctypes.c_uint64)]

    def key(self) -> bytes:
        return bytes(self)


VD_CREDS_CHANGED, VD_CREDS_ERROR, VD_POSTS = 1, 2, 4


class VdSession(ctypes.Structure):
    """struct vd_session: one connection's serving state, for vd_next()."""
    _fields_ = [("ch", ctypes.c_void_p), ("stop", ctypes.c_uint32), ("budget", ctypes.c_uint32),
                ("seq", ctypes.c_uint32), ("pidfd", ctypes.c_int32), ("pid", ctypes.c_int32),
                ("flags", ctypes.c_uint32), ("creds_errno", ctypes.c_int32), ("pad", ctypes.c_uint32),
                ("creds", Creds), ("req", ctypes.c_uint8 * (P.REQ.size + P.MAX_PAYLOAD))]


class Channel:
    """One connection's shared-memory channel (struct vchan), created by the
    daemon and handed to the program with the hello reply.  The memfd is
    sealed at its size: a program cannot shrink it under the daemon (whose
    accesses would then fault)."""

    def __init__(self) -> None:
        fd = os.memfd_create("vfiosim:channel", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            os.ftruncate(fd, P.VCHAN_SIZE)
            import fcntl
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL)
            self.map = mmap.mmap(fd, P.VCHAN_SIZE)
        except BaseException:
            os.close(fd)
            raise
        self.fd = fd                       # closed once handed over
        self.view = P.vchan.from_buffer(self.map)
        self.view.magic = P.MAGIC_VERSION
        self.view.size = P.VCHAN_SIZE
        self.addr = ctypes.addressof(self.view)
        self.state = VdSession()
        self.state.ch = self.addr
        self.state.budget = 20_000                # ns to spin before sleeping; vd_wait learns it
        self.state.pidfd = -1
        self._state_ref = ctypes.byref(self.state)
        self.request = memoryview(self.state.req).cast("B")
        self._posts = (P.vpost * P.VRING)()
        self._lib = lib()
        self._next = self._lib.vd_next

    def close_fd(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def watch_creds(self, pidfd: int, pid: int, current: Creds) -> None:
        """Check this process's credentials before each request (vd_next sets VD_CREDS_CHANGED)."""
        self.state.pid = pid
        self.state.creds = current
        self.state.pidfd = pidfd

    def next(self, reply: bytes, timeout_ms: int) -> int:
        """Publish ``reply`` (if any) to the last request and wait for the next:
        1 (a request, in :attr:`request`, with :attr:`flags`), 2 (posted
        stores only), 0 (timeout), -1 (stopped)."""
        return int(self._next(self._state_ref, reply, len(reply), timeout_ms))

    @property
    def flags(self) -> int:
        return int(self.state.flags)

    def has_posts(self) -> bool:
        return bool(self.view.prog.ring_head != self.view.daemon.ring_tail)

    def take_posts(self) -> list[tuple[int, int, int, int]]:
        """The posted stores, oldest first: (handle, offset, size, value)."""
        n = self._lib.vd_take_posts(self.addr, self._posts, P.VRING)
        if n < 0:
            raise P.ProtocolError("the posted-store ring's head is out of range")
        return [(p.handle, p.offset, p.size, p.value) for p in self._posts[:n]]

    def set_live(self, slot: int, live: bool) -> None:
        self.view.live[slot] = 1 if live else 0

    def wake(self) -> None:
        """Stop the thread serving this channel (from another thread)."""
        self.state.stop = 1
        self._lib.vd_wake(self.addr)

    def close(self) -> None:
        self.close_fd()
        del self.view
        try:
            self.map.close()
        except BufferError:
            pass                           # a view is still alive somewhere: the GC unmaps it


def creds(pidfd: int, pid: int) -> Creds:
    """The process's ids, capabilities and RLIMIT_MEMLOCK, in three system calls.
    OSError(ENOTTY) where the kernel has no PIDFD_GET_INFO (before 6.13)."""
    out = Creds()
    r = lib().vd_creds(pidfd, pid, ctypes.byref(out))
    if r < 0:
        raise OSError(-r, os.strerror(-r))
    return out


def _gid_array(groups: tuple[int, ...]) -> "ctypes.Array[ctypes.c_uint32]":
    return (ctypes.c_uint32 * max(len(groups), 1))(*groups)


@contextmanager
def acting_as(uid: int, gid: int, groups: tuple[int, ...]) -> Iterator[None]:
    """This thread, and only it, takes the program's uid, gid and groups
    (no capabilities): what the host kernel then lets it open or take is
    what the program itself may.  The daemon must be root; root programs
    need no switch (callers skip it)."""
    own_gid, own_groups = os.getegid(), tuple(os.getgroups())
    arr = _gid_array(groups)
    r = lib().vd_as_user(uid, gid, len(groups), arr)
    try:
        if r < 0:
            raise OSError(-r, f"cannot act as uid {uid}: {os.strerror(-r)}")
        yield
    finally:
        back = lib().vd_as_root(own_gid, len(own_groups), _gid_array(own_groups))
        if back < 0:                       # never go on with another user's credentials
            os.write(2, b"vfiosim: cannot return to the daemon's credentials; stopping\n")
            os._exit(70)


def kcmp_file(pid1: int, pid2: int, fd1: int, fd2: int) -> int:
    """kcmp(KCMP_FILE): 0 if both fds are the very same open file."""
    r = int(lib().vd_kcmp_file(pid1, pid2, fd1, fd2))
    if r < 0:
        raise OSError(-r, os.strerror(-r))
    return r


def pidfd_getfd(pidfd: int, fd: int) -> int:
    r = int(lib().vd_pidfd_getfd(pidfd, fd))
    if r < 0:
        raise OSError(-r, os.strerror(-r))
    return r


PROCMAP_READ, PROCMAP_WRITE, PROCMAP_EXEC, PROCMAP_SHARED = 1, 2, 4, 8


def vma(maps_fd: int, addr: int, or_next: bool = False) -> tuple[int, int, int] | None:
    """(start, end, PROCMAP_* flags) of the mapping holding ``addr`` (or the
    next one), None if there is none.  OSError(ENOTTY) before Linux 6.11."""
    out = (ctypes.c_uint64 * 3)()
    r = lib().vd_vma(maps_fd, addr, 1 if or_next else 0, out)
    if r == -errno.ENOENT:
        return None
    if r < 0:
        raise OSError(-r, os.strerror(-r))
    return out[0], out[1], out[2]
