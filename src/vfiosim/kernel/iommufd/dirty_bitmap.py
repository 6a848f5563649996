"""The user's dirty bitmap of IOMMU_HWPT_GET_DIRTY_BITMAP (drivers/iommu/iommufd/iova_bitmap.c).

Bit ``k`` stands for ``[iova + k * page_size, iova + (k + 1) * page_size)``;
the bitmap is an array of little-endian 64-bit words in user memory, and the
kernel only sets bits (userspace clears the bitmap before asking).

iova_bitmap_set() reaches the bitmap through pinned pages
(pin_user_pages_fast(FOLL_WRITE)), a window at a time.  When a window cannot
be pinned it returns without recording and without an error: the ioctl
succeeds and the bits are lost (Linux 6.12; reproduced and logged here,
docs/deviations.md 11).  A dirty PTE that reaches past the range asked for (a
super page the range starts or ends inside) fails the ioctl with EPROTO.
"""

from __future__ import annotations

from errno import EPROTO
from typing import TYPE_CHECKING

from ..deviations import deviation
from ..errors import fail

if TYPE_CHECKING:
    from ..task import Task


class IovaBitmap:
    """``struct iova_bitmap``"""

    def __init__(self, current: "Task", iova: int, length: int, page_size: int, data: int) -> None:
        self.current = current
        self.iova = iova
        self.length = length
        self.pgshift = (page_size & -page_size).bit_length() - 1
        self.data = data
        self.err: int | None = None
        self.lost = 0

    def set(self, iova: int, length: int) -> None:
        """iova_bitmap_set()"""
        if not length or length > self.length or iova < self.iova or iova - self.iova > self.length - length:
            if self.err is None:
                self.err = EPROTO
            return
        first = (iova - self.iova) >> self.pgshift
        last = (iova + length - 1 - self.iova) >> self.pgshift
        mm = self.current.mm
        bit = first
        while bit <= last:
            addr = self.data + (bit >> 3)
            vma = mm.find_vma(addr)
            if vma is None or not vma.writable() or not vma.obj.pinnable:
                # iova_bitmap_advance_to() failed to pin the window: dropped.
                self.lost += last - bit + 1
                return
            page_end = (addr | (mm.page_size - 1)) + 1
            stop = min(last, ((min(page_end, vma.end) - self.data) << 3) - 1)
            lo_byte, hi_byte = bit >> 3, stop >> 3
            raw = bytearray(mm.read(self.data + lo_byte, hi_byte - lo_byte + 1))
            _bitmap_set(raw, bit - (lo_byte << 3), stop - bit + 1)
            mm.write(self.data + lo_byte, bytes(raw))
            bit = stop + 1

    def finish(self) -> None:
        """iova_bitmap_for_each()'s return: the first recording error."""
        if self.lost:
            self.current_log(deviation("11", lost=self.lost, data=self.data))
        if self.err is not None:
            raise fail(self.err, "a dirty IOPTE reaches outside the range asked for (the range starts or ends inside "
                                 "a super page): ask for whole IOPTEs")

    def current_log(self, text: str) -> None:
        log = getattr(self.current.mm.phys, "log", None)
        if log is not None:
            log(text)


def _bitmap_set(buf: bytearray, start: int, n: int) -> None:
    """bitmap_set() on little-endian bytes: whole bytes at once."""
    end = start + n
    while start < end and start & 7:
        buf[start >> 3] |= 1 << (start & 7)
        start += 1
    full = (end - start) >> 3
    if full:
        buf[start >> 3:(start >> 3) + full] = b"\xff" * full
        start += full << 3
    while start < end:
        buf[start >> 3] |= 1 << (start & 7)
        start += 1
