"""Errors inside the simulated kernel.

Kernel code signals failure by raising :class:`KernelError` with the errno the
real kernel returns (``-EINVAL`` becomes ``KernelError(EINVAL, ...)``).  The
syscall layer turns it into the ``OSError`` a program sees.  The message says
*why*, naming the check that failed, because users debugging a driver need the
reason more than the number; the errno itself is always the kernel's.
"""

from __future__ import annotations

import errno as _errno
import os


class KernelError(Exception):
    """A syscall failed with ``errno``; ``reason`` names the failed check."""

    def __init__(self, errno: int, reason: str = "") -> None:
        super().__init__(errno, reason)
        self.errno = errno
        self.reason = reason

    def __str__(self) -> str:
        name = _errno.errorcode.get(self.errno, str(self.errno))
        return f"{name}: {self.reason}" if self.reason else name

    def to_oserror(self, call: str = "") -> OSError:
        text = os.strerror(self.errno)
        detail = f"{call}: {self.reason}" if call and self.reason else (self.reason or call)
        return OSError(self.errno, f"{text} ({detail})" if detail else text)


def fail(errno: int, reason: str = "") -> KernelError:
    """Build a KernelError; ``raise fail(EINVAL, "...")`` reads like ``return -EINVAL``."""
    return KernelError(errno, reason)


class KernelBug(Exception):
    """An internal invariant broke: the simulator's equivalent of an oops.

    Raised only for conditions that would be a BUG_ON in the kernel; the
    syscall layer logs it to dmesg and records it on the machine so tests
    notice, instead of letting a traceback reach the simulated program.
    """
