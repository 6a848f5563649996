"""virqfd (drivers/vfio/virqfd.c): run a handler when userspace signals an eventfd.

vfio-pci uses it twice: the eventfd that unmasks INTx
(VFIO_IRQ_SET_ACTION_UNMASK with DATA_EVENTFD) and VFIO_DEVICE_IOEVENTFD's
eventfds, each of which writes a fixed value to a BAR.  Upstream hooks the
eventfd's wait queue: every wake-up with data reads the counter
(eventfd_ctx_do_read: all of it, or 1 for an EFD_SEMAPHORE eventfd) and runs
the handler.  A count already there when the virqfd is set up runs the
handler once without being read.
"""

from __future__ import annotations

from errno import EBUSY
from typing import TYPE_CHECKING, Callable

from ..errors import fail
from ..eventfd import EventFd, eventfd_ctx_fdget

if TYPE_CHECKING:
    from ..task import Task


class Virqfd:
    """One eventfd and its handler, while enabled."""

    def __init__(self, eventfd: EventFd, handler: Callable[[], None]) -> None:
        self.eventfd = eventfd
        self.handler = handler

    def _wake(self, efd: EventFd) -> None:
        """virqfd_wakeup() with EPOLLIN: consume the count, run the handler.
        (A transport's eventfd of a real process was read by the transport.)"""
        if efd.count:
            efd.count -= 1 if efd.semaphore else efd.count
        self.handler()

    def disable(self) -> None:
        """vfio_virqfd_disable(): the handler runs no more; the eventfd stays the program's."""
        try:
            self.eventfd.waiters.remove(self._wake)
        except ValueError:
            pass


def virqfd_enable(current: "Task", fd: int, handler: Callable[[], None], slot: Virqfd | None,
                  what: str) -> Virqfd:
    """vfio_virqfd_enable(): ``fd`` must be an open eventfd (EBADF, EINVAL),
    ``slot`` (the pointer upstream fills in) must be empty (EBUSY)."""
    file = eventfd_ctx_fdget(current, fd, what)
    if slot is not None:
        raise fail(EBUSY, f"{what}: an eventfd is already registered; unregister it (fd -1) first")
    v = Virqfd(file, handler)
    if file.readable():                  # an event from before: trigger it as if not missed
        handler()
    file.waiters.append(v._wake)
    return v
