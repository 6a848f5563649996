"""Copying between the kernel and user memory (``copy_from_user`` and friends).

Every pointer a program passes is an address in its simulated address space;
these helpers fault (EFAULT) exactly where the kernel's would: on any byte
that is not mapped with the needed access.
"""

from __future__ import annotations

import ctypes
import struct
from errno import E2BIG, EFAULT, EINVAL
from typing import TYPE_CHECKING, TypeVar

from .errors import fail

if TYPE_CHECKING:
    from .task import Task

S = TypeVar("S", bound=ctypes.Structure)


def copy_from_user(current: "Task", addr: int, n: int) -> bytes:
    return current.mm.read(addr, n)


def copy_to_user(current: "Task", addr: int, data: bytes) -> None:
    current.mm.write(addr, data)


def clear_user(current: "Task", addr: int, n: int) -> None:
    current.mm.write(addr, bytes(n))


def copy_struct_from_user(current: "Task", addr: int, cls: type[S], minsz: int) -> S:
    """``copy_from_user(&s, arg, minsz)``: only the first ``minsz`` bytes are read.

    The rest of the structure is zero here, where the kernel would have
    stack garbage; handlers never read past ``minsz``, as the kernel's don't.
    """
    raw = current.mm.read(addr, minsz)
    return cls.from_buffer_copy(raw.ljust(ctypes.sizeof(cls), b"\0"))


_INT_CODES = {(1, False): "B", (2, False): "H", (4, False): "I", (8, False): "Q",
              (1, True): "b", (2, True): "h", (4, True): "i", (8, True): "q"}


def struct_layout(cls: type[ctypes.Structure], end: str) -> struct.Struct:
    """The leading integer fields of ``cls``, up to and including field
    ``end``, as a precompiled little-endian struct.Struct: what a hot ioctl
    unpacks without building a ctypes object.  Derived from the ctypes
    declaration (the one source of the ABI), padding included."""
    fmt, pos = "<", 0
    for name, ctype, *_ in cls._fields_:
        field = getattr(cls, name)
        size = ctypes.sizeof(ctype)
        code = None
        if issubclass(ctype, ctypes._SimpleCData) and getattr(ctype, "_type_", "") in tuple("bBhHiIlLqQ"):
            code = _INT_CODES.get((size, ctype(-1).value == -1))
        if code is None:
            raise TypeError(f"{cls.__name__}.{name} is not an integer field")
        fmt += "x" * (field.offset - pos) + code
        pos = field.offset + size
        if name == end:
            layout = struct.Struct(fmt)
            assert layout.size == pos
            return layout
    raise AttributeError(f"{cls.__name__} has no field {end!r}")


def copy_from_user_unpack(current: "Task", addr: int, layout: struct.Struct) -> tuple[int, ...]:
    """``copy_from_user(&s, arg, minsz)`` of a struct_layout(): its fields as a tuple."""
    return current.mm.read_unpack(addr, layout)


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


def get_user_u32(current: "Task", addr: int) -> int:
    return int.from_bytes(current.mm.read(addr, 4), "little")


# x86-64 with 4-level paging: access_ok() accepts [ptr, ptr+size) when it ends
# in user space without wrapping (USER_PTR_MAX = TASK_SIZE_MAX - 1).
USER_PTR_MAX = (1 << 47) - 4096 - 1


def user_access_ok(addr: int, size: int) -> bool:
    return addr + size <= USER_PTR_MAX


def check_zeroed_user(current: "Task", addr: int, size: int) -> bool:
    """check_zeroed_user() (lib/usercopy.c): True when all ``size`` bytes are
    zero.  It reads word by word from the start and stops at the first
    non-zero word, so a fault past a non-zero byte is never reached: that
    is "not zeroed", and a fault before any non-zero byte is EFAULT."""
    if size == 0:
        return True
    if not user_access_ok(addr, size):
        raise fail(EFAULT, f"{addr:#x}+{size:#x} is not user memory")
    mm = current.mm
    pos, end = addr, addr + size
    chunk = 1 << 20
    while pos < end:
        vma = mm.find_vma(pos)
        if vma is None or not vma.readable():
            raise fail(EFAULT, f"address {pos:#x} is not mapped")
        stop = min(end, vma.end, pos + chunk)
        if any(mm.read(pos, stop - pos)):
            return False
        pos = stop
    return True


def copy_struct_from_user_sized(current: "Task", addr: int, cls: type[S], usize: int, call: str = "") -> S:
    """copy_struct_from_user(dst, ksize, src, usize) (include/linux/uaccess.h):
    the extensible-struct rule.  A shorter user struct is zero-extended; a
    longer one is accepted only if the bytes past the kernel's struct are
    zero (E2BIG otherwise, EFAULT if they cannot be read first)."""
    ksize = ctypes.sizeof(cls)
    size = min(ksize, usize)
    if usize > ksize and not check_zeroed_user(current, addr + ksize, usize - ksize):
        raise fail(E2BIG, f"{call}: size {usize} is larger than this kernel's struct ({ksize} bytes) and the extra "
                          f"bytes are not zero")
    raw = current.mm.read(addr, size)
    return cls.from_buffer_copy(raw.ljust(ksize, b"\0"))
