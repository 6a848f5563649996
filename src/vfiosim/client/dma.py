"""DMA memory: buffers in the process, and their mappings into an IOMMU.

A :class:`DmaBuffer` is anonymous memory of the process (``mmap``); its
bytes are reachable as a ``memoryview`` and as NumPy arrays without copies,
on both backends.  A :class:`DmaMapping` is (part of) a buffer mapped at an
IOVA in a :class:`~vfiosim.client.Container`; closing it unmaps it.
"""

from __future__ import annotations

import errno
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from .backend import Backend, HostMemory
from .errors import VfioUsageError

if TYPE_CHECKING:
    from .container import Container

__all__ = ["DmaBuffer", "DmaMapping"]


class DmaBuffer:
    """Page-aligned, zeroed memory of the process, usable for DMA.

    Create it with :meth:`Container.alloc_buffer` (or get one with a mapping
    from :meth:`Container.dma_alloc`).  ``view`` and :meth:`array` see the
    memory itself: what the device writes there shows up in them, and what
    you write there is what the device reads.
    """

    def __init__(self, backend: Backend, mem: HostMemory, owner: "Container | None" = None) -> None:
        self.backend = backend
        self._mem = mem
        self.addr = mem.addr
        self.size = mem.size
        self.owner = owner
        self.mappings: list[DmaMapping] = []
        self.closed = False

    @property
    def name(self) -> str:
        return f"DmaBuffer({self.addr:#x}+{self.size:#x})"

    def _check(self, call: str) -> None:
        if self.closed:
            raise VfioUsageError(errno.EBADF, self.name, call, detail="the buffer was closed (its memory is freed)",
                                 fix="allocate a new buffer")

    def _range(self, call: str, offset: int, n: int) -> None:
        self._check(call)
        if offset < 0 or n < 0 or offset + n > self.size:
            raise VfioUsageError(errno.EINVAL, self.name, call,
                                 detail=f"bytes {offset:#x}+{n:#x} are outside the {self.size:#x}-byte buffer")

    @property
    def view(self) -> memoryview:
        """The buffer's bytes (zero-copy)."""
        self._check("view")
        return self._mem.view

    def array(self, dtype: npt.DTypeLike = np.uint8, shape: int | tuple[int, ...] | None = None,
              offset: int = 0) -> npt.NDArray[Any]:
        """A NumPy array over the buffer (zero-copy); by default all of it as bytes."""
        self._check("array()")
        dt = np.dtype(dtype)
        if shape is None:
            count = (self.size - offset) // dt.itemsize
            self._range("array()", offset, count * dt.itemsize)
            return np.frombuffer(self._mem.view, dtype=dt, count=count, offset=offset)
        dims = (shape,) if isinstance(shape, int) else tuple(shape)
        count = int(np.prod(dims)) if dims else 1
        self._range("array()", offset, count * dt.itemsize)
        return np.frombuffer(self._mem.view, dtype=dt, count=count, offset=offset).reshape(dims)

    def read(self, offset: int = 0, n: int | None = None) -> bytes:
        n = self.size - offset if n is None else n
        self._range("read()", offset, n)
        return bytes(self._mem.view[offset:offset + n])

    def write(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        mv = memoryview(data).cast("B")
        self._range("write()", offset, mv.nbytes)
        self._mem.view[offset:offset + mv.nbytes] = mv

    def fill(self, value: int = 0) -> None:
        self._check("fill()")
        self.array()[:] = value

    def close(self) -> None:
        """Unmap every mapping of the buffer, then free the memory."""
        if self.closed:
            return
        first: BaseException | None = None
        for m in list(self.mappings):
            try:
                m.close()
            except BaseException as exc:        # still free the memory; report the first failure
                first = first or exc
        self.closed = True
        self._mem.release()
        if self.owner is not None:
            self.owner._forget_buffer(self)
        if first is not None:
            raise first

    def __enter__(self) -> "DmaBuffer":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = " closed" if self.closed else f" {len(self.mappings)} mapping(s)"
        return f"<{self.name}{state}>"


class DmaMapping:
    """``size`` bytes of ``buffer`` from ``offset``, mapped at ``iova`` in ``container``."""

    def __init__(self, container: "Container", buffer: DmaBuffer, offset: int, iova: int, size: int,
                 flags: int, owns_buffer: bool = False) -> None:
        self.container = container
        self.buffer = buffer
        self.offset = offset
        self.iova = iova
        self.size = size
        self.flags = flags
        self.owns_buffer = owns_buffer
        self.closed = False

    @property
    def name(self) -> str:
        return f"DmaMapping(iova {self.iova:#x}+{self.size:#x})"

    @property
    def vaddr(self) -> int:
        return self.buffer.addr + self.offset

    @property
    def view(self) -> memoryview:
        """The mapped bytes (zero-copy)."""
        if self.closed:
            raise VfioUsageError(errno.EBADF, self.name, "view", detail="the mapping was closed")
        return self.buffer.view[self.offset:self.offset + self.size]

    def array(self, dtype: npt.DTypeLike = np.uint8, shape: int | tuple[int, ...] | None = None,
              offset: int = 0) -> npt.NDArray[Any]:
        """A NumPy array over the mapped bytes (zero-copy)."""
        if self.closed:
            raise VfioUsageError(errno.EBADF, self.name, "array()", detail="the mapping was closed")
        dt = np.dtype(dtype)
        if shape is None:
            shape = (self.size - offset) // dt.itemsize
        dims = (shape,) if isinstance(shape, int) else tuple(shape)
        if offset < 0 or offset + int(np.prod(dims)) * dt.itemsize > self.size:
            raise VfioUsageError(errno.EINVAL, self.name, "array()", detail=f"{dims} of {dt} from {offset:#x} "
                                 f"do not fit in the {self.size:#x} mapped bytes")
        return self.buffer.array(dt, dims, self.offset + offset)

    def read(self, offset: int = 0, n: int | None = None) -> bytes:
        n = self.size - offset if n is None else n
        if offset < 0 or n < 0 or offset + n > self.size:
            raise VfioUsageError(errno.EINVAL, self.name, "read()",
                                 detail=f"bytes {offset:#x}+{n:#x} are outside the mapping")
        return self.buffer.read(self.offset + offset, n)

    def write(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        n = memoryview(data).nbytes
        if offset < 0 or offset + n > self.size:
            raise VfioUsageError(errno.EINVAL, self.name, "write()",
                                 detail=f"bytes {offset:#x}+{n:#x} are outside the mapping")
        self.buffer.write(self.offset + offset, data)

    def close(self) -> None:
        """VFIO_IOMMU_UNMAP_DMA (and free the buffer if the mapping owns it)."""
        if self.closed:
            return
        self.container._unmap(self)

    unmap = close

    def __enter__(self) -> "DmaMapping":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<{self.name} of {self.buffer.name}{' closed' if self.closed else ''}>"
