"""Copying between the kernel and user memory (``copy_from_user`` and friends).

Every pointer a program passes is an address in its simulated address space;
these helpers fault (EFAULT) exactly where the kernel's would: on any byte
that is not mapped with the needed access.
"""

from __future__ import annotations

import ctypes
from errno import EFAULT, EINVAL
from typing import TYPE_CHECKING, TypeVar

from .errors import fail

if TYPE_CHECKING:
    from .task import Task

S = TypeVar("S", bound=ctypes.Structure)


def copy_from_user(current: "Task", addr: int, n: int) -> bytes:
    return current.mm.read(addr, n)


def copy_to_user(current: "Task", addr: int, data: bytes) -> None:
    current.mm.write(addr, data)


def copy_struct_from_user(current: "Task", addr: int, cls: type[S], minsz: int) -> S:
    """``copy_from_user(&s, arg, minsz)``: only the first ``minsz`` bytes are read.

    The rest of the structure is zero here, where the kernel would have
    stack garbage; handlers never read past ``minsz``, as the kernel's don't.
    """
    raw = current.mm.read(addr, minsz)
    return cls.from_buffer_copy(raw.ljust(ctypes.sizeof(cls), b"\0"))


def copy_struct_to_user(current: "Task", addr: int, obj: ctypes.Structure, n: int) -> None:
    """``copy_to_user(arg, &s, n)``: write the first ``n`` bytes of ``obj``."""
    current.mm.write(addr, bytes(obj)[:n])


def get_user_s32(current: "Task", addr: int) -> int:
    return int.from_bytes(current.mm.read(addr, 4), "little", signed=True)


def strndup_user(current: "Task", addr: int, n: int) -> str:
    """``strndup_user()``: a NUL-terminated string of at most ``n`` bytes.

    EFAULT if the string runs into unmapped memory, EINVAL if no NUL is found
    within ``n`` bytes.
    """
    out = bytearray()
    pos = addr
    mm = current.mm
    while len(out) < n:
        vma = mm.find_vma(pos)
        if vma is None or not vma.readable():
            raise fail(EFAULT, f"string at {addr:#x} runs into unmapped memory at {pos:#x}")
        chunk = min(n - len(out), vma.end - pos)
        data = mm.read(pos, chunk)
        nul = data.find(b"\0")
        if nul >= 0:
            out += data[:nul]
            return out.decode("utf-8", errors="surrogateescape")
        out += data
        pos += chunk
    raise fail(EINVAL, f"string at {addr:#x} is longer than {n} bytes")
