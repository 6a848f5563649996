"""eventfd(2): the counter VFIO signals interrupts through."""

from __future__ import annotations

import os
from errno import EAGAIN, EBADF, EINVAL
from typing import TYPE_CHECKING, Callable

from .errors import KernelError, fail
from .fs import File

if TYPE_CHECKING:
    from .task import Task

EFD_SEMAPHORE = 1
EFD_CLOEXEC = os.O_CLOEXEC
EFD_NONBLOCK = os.O_NONBLOCK
_MAX = (1 << 64) - 2


class EventFd(File):
    """A 64-bit counter: writes add, reads return and reset it."""

    kind = "eventfd"
    positional = False

    def __init__(self, initval: int = 0, flags: int = 0) -> None:
        super().__init__("anon_inode:[eventfd]")
        self.count = initval
        self.semaphore = bool(flags & EFD_SEMAPHORE)
        self.signals = 0                       # times signalled, for introspection
        self.waiters: list[Callable[["EventFd"], None]] = []

    def signal(self, n: int = 1) -> None:
        """eventfd_signal(): what a device interrupt does."""
        self.count = min(self.count + n, _MAX)
        self.signals += 1
        for wake in list(self.waiters):
            wake(self)

    def readable(self) -> bool:
        return self.count > 0

    def read(self, current: "Task", count: int, pos: int) -> bytes:
        if count < 8:
            raise fail(EINVAL, "eventfd reads need an 8-byte buffer")
        if self.count == 0:
            raise fail(EAGAIN, "the eventfd counter is zero (no interrupt yet); a blocking read would wait")
        if self.semaphore:
            value, self.count = 1, self.count - 1
        else:
            value, self.count = self.count, 0
        return value.to_bytes(8, "little")

    def write(self, current: "Task", data: bytes, pos: int) -> int:
        if len(data) < 8:
            raise fail(EINVAL, "eventfd writes need 8 bytes")
        value = int.from_bytes(data[:8], "little")
        if value == (1 << 64) - 1:
            raise fail(EINVAL, "cannot add 0xffffffffffffffff to an eventfd")
        if self.count + value > _MAX:
            raise fail(EAGAIN, "the eventfd counter would overflow")
        self.signal(value) if value else None
        return 8


def eventfd_ctx_fdget(current: "Task", fd: int, what: str) -> EventFd:
    """eventfd_ctx_fdget(): ``fd`` must be open (EBADF) and an eventfd (EINVAL)."""
    try:
        file = current.files.get(fd)
    except KernelError:
        raise fail(EBADF, f"{what}: fd {fd} is not open") from None
    if not isinstance(file, EventFd):
        raise fail(EINVAL, f"{what}: fd {fd} is a {file.kind}, not an eventfd")
    return file
