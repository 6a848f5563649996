"""The daemon's side of the channel, in C (src/vfiosim/preload/vfiosim_daemon.c).

A CPython extension module: a call into it costs what a Python function
call costs (a ctypes call cost about a microsecond on the machines this
runs on, as much as the rest of a request), and it releases the GIL itself
around every wait and system call, so a thread waiting in
:meth:`Channel.next` for its program's next request leaves the others free.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from typing import Any, Callable, Iterator, NamedTuple, Protocol

from ..preload import daemon_module

_mod: Any = daemon_module()

Channel: Any = _mod.Channel
"""One connection's shared-memory channel (struct vchan), created by the daemon
and handed to the program with the hello reply (``fd``, then ``close_fd()``).

``serve(handler, sess, timeout_ms)`` waits for the program's requests,
copies each out of the channel, hands it to ``handler(sess, op, flags, fd,
fd2, (a0, ..., a4), payload, seen)`` (``seen & VD_MALFORMED``: an impossible
header) and publishes the ``(ret, err, payload)`` it returns; it returns
``seen`` when a wait brings no request: 0 (a timeout), VD_POSTS (only posted
stores wait), VD_STOPPED (after :meth:`wake`).  ``take_posts()`` returns the posted stores
oldest first, ``(handle, offset, size, value, kick)``, or None when the program's
ring head is impossible."""

VD_POSTS: int = _mod.VD_POSTS
VD_STOPPED: int = _mod.VD_STOPPED
VD_MALFORMED: int = _mod.VD_MALFORMED
PROCMAP_READ: int = _mod.PROCMAP_READ
PROCMAP_WRITE: int = _mod.PROCMAP_WRITE
PROCMAP_EXEC: int = _mod.PROCMAP_EXEC
PROCMAP_SHARED: int = _mod.PROCMAP_SHARED

uread = _mod.uread                  # (maps_fd, mem_fd, addr, n) -> bytes; OSError(EFAULT), OSError(ENOTTY)
uwrite = _mod.uwrite                # (maps_fd, mem_fd, addr, data); OSError(EFAULT), OSError(ENOTTY)
dma_read = _mod.dma_read            # (mem_fd, addr, n) -> bytes: a device's read, whatever the CPU's protection
dma_read_into = _mod.dma_read_into  # (mem_fd, addr, writable buffer)
dma_write = _mod.dma_write          # (mem_fd, addr, data)
dma_read_ranges = _mod.dma_read_ranges    # (mem_fd, addrs, lens, writable buffer): the ranges one after the other
dma_write_ranges = _mod.dma_write_ranges  # (mem_fd, addrs, lens, data)
kcmp_file = _mod.kcmp_file          # (pid1, pid2, fd1, fd2) -> 0 if both are the very same open file
pidfd_getfd = _mod.pidfd_getfd      # (pidfd, fd) -> our duplicate of the process's fd
vma_file = _mod.vma_file            # (maps_fd, addr) -> (start, end, flags, inode, offset, major, minor) | None
file_map = _mod.file_map            # (fd, offset, length) -> address of a MAP_SHARED read-write mapping
file_unmap = _mod.file_unmap        # (address, length)
fs_type = _mod.fs_type              # (fd) -> statfs f_type
# (mem_fd, vaddr, page_shift, slots, bases, offs, lens, buffer, write): DMA in one window, page by page
# through the daemon's file mappings (slot s: bases[s] + vaddr + off) or /proc/<pid>/mem (slot 0)
window_ranges = _mod.window_ranges


class Creds(NamedTuple):
    """A process's ids, capabilities and RLIMIT_MEMLOCK, as the daemon checks them."""

    ruid: int = 0
    euid: int = 0
    suid: int = 0
    fsuid: int = 0
    rgid: int = 0
    egid: int = 0
    sgid: int = 0
    fsgid: int = 0
    cap_eff: int = 0
    cap_prm: int = 0
    memlock_cur: int = 0
    memlock_max: int = 0


creds_tuple = _mod.creds
"""creds() as a plain tuple, for comparing with the Creds last taken (the
usual case: equal) without making a Creds."""


class Window(Protocol):
    """What an ArgWindow offers (transport/host.py says how it is used)."""

    addr: int
    end: int
    data: bytes | bytearray
    writable: int
    lo: int
    hi: int

    def open(self, addr: int, data: bytes | bytearray, writable: int) -> "Window": ...
    def close(self) -> tuple[int, bytes] | None: ...
    def close_reply(self) -> bytes | None: ...
    def unpack(self, addr: int, layout: Any) -> tuple[Any, ...] | None: ...
    def read(self, addr: int, n: int) -> bytes | None: ...
    def write(self, addr: int, data: bytes | bytearray | memoryview) -> bool: ...
    def take_written(self) -> tuple[int, bytes] | None: ...


ArgWindow: Callable[[], Window] = _mod.ArgWindow
"""A call's argument window, in C."""

LimitsCheck: Any = _mod.LimitsCheck
"""``LimitsCheck(pid, creds, caps_part, memlock_part)``: limits_same() of one
process against a creds() tuple, as a callable ``check(part)`` that looks at
the capabilities if ``part & caps_part`` and at RLIMIT_MEMLOCK if ``part &
memlock_part``; True if unchanged, False if changed or unreadable (no
OSError: the caller then takes everything again, which reports it).  What a
kernel Task calls as its ``limits_same``."""

limits_same = _mod.limits_same
"""(pid, creds tuple, what=3) -> whether its capabilities (what & LIMITS_CAPS)
and RLIMIT_MEMLOCK (what & LIMITS_MEMLOCK) are still those, one system call
each (the ids are not read; nor is the pidfd asked)."""
LIMITS_CAPS = 1
LIMITS_MEMLOCK = 2


def creds(pidfd: int, pid: int) -> Creds:
    """The process's ids, capabilities and RLIMIT_MEMLOCK, in three system calls.
    OSError(ENOTTY) where the kernel has no PIDFD_GET_INFO (before 6.13)."""
    return Creds._make(_mod.creds(pidfd, pid))


@contextmanager
def acting_as(uid: int, gid: int, groups: tuple[int, ...]) -> Iterator[None]:
    """This thread, and only it, takes the program's uid, gid and groups
    (no capabilities): what the host kernel then lets it open or take is
    what the program itself may.  The daemon must be root; root programs
    need no switch (callers skip it)."""
    own_gid, own_groups = os.getegid(), tuple(os.getgroups())
    try:
        try:
            _mod.as_user(uid, gid, groups)
        except OSError as exc:
            raise OSError(exc.errno, f"cannot act as uid {uid}: {exc.strerror}") from None
        yield
    finally:
        try:
            _mod.as_root(own_gid, own_groups)
        except OSError:                    # never go on with another user's credentials
            os.write(2, b"vfiosim: cannot return to the daemon's credentials; stopping\n")
            os._exit(70)


vma_query = _mod.vma
"""vma() without its Python frame: (maps_fd, addr, or_next); one PROCMAP_QUERY per MAP_DMA."""


def vma(maps_fd: int, addr: int, or_next: bool = False) -> tuple[int, int, int, int] | None:
    """(start, end, PROCMAP_* flags, inode) of the mapping holding ``addr`` (or
    the next one), None if there is none.  OSError(ENOTTY) before Linux 6.11."""
    return _mod.vma(maps_fd, addr, or_next)  # type: ignore[no-any-return]
