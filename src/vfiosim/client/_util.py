"""Helpers shared by the client objects: system calls with teaching errors,
and ctypes structs as ioctl buffers."""

from __future__ import annotations

import ctypes
import os
import re
from typing import Any, Callable, Mapping, TypeVar

from .errors import VfioError, VfioUsageError, explain

T = TypeVar("T")
S = TypeVar("S", bound=ctypes.Structure)

Context = Mapping[str, Any] | Callable[[], Mapping[str, Any]] | None


def kernel_detail(exc: OSError) -> str | None:
    """The part of an OSError's message that says more than strerror does
    (the simulator puts the failed check there)."""
    text = exc.strerror or ""
    generic = os.strerror(exc.errno) if exc.errno else ""
    if text.startswith(generic + " (") and text.endswith(")"):
        text = text[len(generic) + 2:-1]
        # The simulator prefixes the call ("VFIO_IOMMU_MAP_DMA: ", "open(/dev/vfio/0): "),
        # which the VfioError names already.
        for _ in range(2):
            text = _CALL_PREFIX.sub("", text, count=1)
        return text or None
    return None if text == generic or not text else text


_CALL_PREFIX = re.compile(r"^(?:[A-Z][A-Z0-9_/]+|[a-z_]+\([^)]*\)): ")


def syscall(obj: str, call: str, fn: Callable[[], T], ctx: Context = None, *, key: str | None = None,
            usage: bool = False) -> T:
    """Run ``fn``; turn an OSError into a VfioError naming ``obj`` and ``call``.

    ``key`` is the name the explanation table knows the step by (default
    ``call``); ``ctx`` (or a function computing it, called only on failure)
    fills in the numbers of the explanation.
    """
    try:
        return fn()
    except VfioError:
        raise
    except OSError as exc:
        raise wrap(exc, obj, call, ctx, key=key, usage=usage) from None


def wrap(exc: OSError, obj: str, call: str, ctx: Context = None, *, key: str | None = None,
         usage: bool = False) -> VfioError:
    number = exc.errno or 0
    try:
        values = ctx() if callable(ctx) else (ctx or {})
    except Exception:           # explaining must never hide the real error
        values = {}
    cause, fix = explain(key or call, number, values)
    cls = VfioUsageError if usage else VfioError
    return cls(number, obj, call, detail=kernel_detail(exc), cause=cause, fix=fix)


def as_buffer(s: ctypes.Structure, extra: bytes = b"") -> bytearray:
    """A struct (plus trailing data) as the mutable buffer an ioctl takes."""
    return bytearray(bytes(s) + extra)


def from_buffer(cls: type[S], buf: bytearray) -> S:
    """A copy of the struct at the start of ``buf``."""
    return cls.from_buffer_copy(bytes(buf[:ctypes.sizeof(cls)]))


def hexrange(start: int, size: int) -> str:
    return f"{start:#x}..{start + size - 1:#x}"
