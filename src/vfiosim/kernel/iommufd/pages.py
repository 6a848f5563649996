"""Pinned user pages shared by IOAS areas (drivers/iommu/iommufd/pages.c).

An :class:`IoptPages` is one IOMMU_IOAS_MAP's linear range of user memory.
Every area that maps part of it -- the original, the copies IOMMU_IOAS_COPY
made into other IOASes, the pieces of a split -- refers to the same object,
so a page is pinned once and charged once however many IOASes and domains
map it.  That is iommufd's answer to Type1 charging a page again for each
mapping.

Pages are pinned lazily: an area of an IOAS with no domain pins nothing (its
pages are only "a lazy reference"); they are pinned, with FOLL_LONGTERM (and
FOLL_WRITE for a writable mapping), when the first domain needs them, and
unpinned when no area in any domain (and no in-kernel access) covers them.

Charging follows ``pages->account_mode``, fixed when the pages are created:

* IOPT_PAGES_ACCOUNT_NONE: the mapping process had CAP_IPC_LOCK;
* IOPT_PAGES_ACCOUNT_USER (iommufd's default): ``user->locked_vm`` of the
  mapping process's user, checked against its RLIMIT_MEMLOCK (the accounting
  io_uring uses): one budget for all processes of a user;
* IOPT_PAGES_ACCOUNT_MM (IOMMU_OPTION_RLIMIT_MODE 1, and always through
  /dev/vfio/vfio served by iommufd): ``mm->locked_vm``, as VFIO does.

and in every mode ``mm->pinned_vm`` (VmPin) counts the pages.  The charge is
made after the pages of an area are pinned and mapped; when it fails
(ENOMEM) everything just pinned is unmapped and unpinned again.
"""

from __future__ import annotations

import bisect
from errno import EFAULT, EINVAL, ENOMEM, EOVERFLOW
from typing import TYPE_CHECKING, Iterable

import numpy as np

from ..cred import CAP_IPC_LOCK
from ..errors import KernelBug, KernelError, fail
from ..mm import PinResult, account_locked_vm_task
from ..iommu.iommu import iommu_map, iommu_unmap
from .spans import holes, merge

if TYPE_CHECKING:
    from ..iommu.iommu import IommuDomain
    from ..kernel import Kernel
    from ..task import Task
    from ..user import UserStruct
    from .io_pagetable import IoptArea

U64 = (1 << 64) - 1

# pfn_reader_user_pin(): the upages array temp_kmalloc() gives it is at most
# TEMP_MEMORY_LIMIT (64 KiB) of struct page pointers, the most one
# pin_user_pages_fast() call pins.
UPAGES_MAX = 65536 // 8

IOPT_PAGES_ACCOUNT_NONE = 0
IOPT_PAGES_ACCOUNT_USER = 1
IOPT_PAGES_ACCOUNT_MM = 2
ACCOUNT_MODE_NAMES = {IOPT_PAGES_ACCOUNT_NONE: "none (CAP_IPC_LOCK)", IOPT_PAGES_ACCOUNT_USER: "user",
                      IOPT_PAGES_ACCOUNT_MM: "mm"}


class IoptPages:
    """``struct iopt_pages``"""

    def __init__(self, kernel: "Kernel", current: "Task", uptr: int, length: int, writable: bool) -> None:
        psz = kernel.page_size
        self.kernel = kernel
        self.page_size = psz
        self.uptr = uptr & ~(psz - 1)
        self.npages = (length + (uptr - self.uptr) + psz - 1) // psz
        self.writable = writable
        self.source_mm = current.mm
        self.source_task = current
        self.source_user: "UserStruct" = kernel.users.get(current.cred.uid)
        self.account_mode = IOPT_PAGES_ACCOUNT_NONE if current.capable(CAP_IPC_LOCK) else IOPT_PAGES_ACCOUNT_USER
        self.npinned = 0
        self.last_npinned = 0
        self.refs = 1
        # pages->domains_itree: the areas whose pages a domain holds.
        self.domain_areas: list["IoptArea"] = []
        # Pinned pages as physically contiguous runs [first index, pages, hpa],
        # sorted; what the kernel keeps in its domains' page tables.
        self._runs: list[list[int]] = []

    def __repr__(self) -> str:
        return f"<IoptPages uptr={self.uptr:#x} npages={self.npages} npinned={self.npinned}>"

    # -- kref -------------------------------------------------------------------------------------------

    def get(self) -> "IoptPages":
        self.refs += 1
        return self

    def put(self) -> None:
        """iopt_put_pages(); iopt_release_pages() at the last reference."""
        self.refs -= 1
        if self.refs == 0 and (self.npinned or self._runs or self.domain_areas):
            raise KernelBug(f"{self!r} released with pages still pinned")

    # -- which pages are pinned ---------------------------------------------------------------------------

    def pinned_pages(self) -> int:
        return sum(r[1] for r in self._runs)

    def _pinned_spans(self) -> list[tuple[int, int]]:
        return [(r[0], r[0] + r[1] - 1) for r in self._runs]

    def runs(self, first: int, last: int) -> list[tuple[int, int, int]]:
        """(index, pages, hpa) of the pinned pages of [first, last], in order;
        every page of the range must be pinned."""
        out = []
        i = max(bisect.bisect_right(self._runs, [first, U64, U64]) - 1, 0)
        expect = first
        for index, n, hpa in self._runs[i:]:
            end = index + n - 1
            if end < first:
                continue
            if index > last:
                break
            lo, hi = max(index, first), min(end, last)
            if lo != expect:
                raise KernelBug(f"{self!r}: page {expect} is not pinned")
            out.append((lo, hi - lo + 1, hpa + (lo - index) * self.page_size))
            expect = hi + 1
        if expect != last + 1:
            raise KernelBug(f"{self!r}: page {expect} is not pinned")
        return out

    def covered(self) -> list[tuple[int, int]]:
        """The index spans some domain (or access) holds pinned."""
        return merge((a.pages_first, a.pages_last) for a in self.domain_areas)

    # -- pinning (pfn_reader_user_pin) ----------------------------------------------------------------------

    def pin(self, first: int, last: int, current: "Task") -> list[tuple[int, int, int]]:
        """Pin the pages of [first, last] that are not pinned yet; returns the
        new runs (for the caller's unwind).  A page that cannot be pinned
        fails the whole call (EFAULT, or ENOMEM when it cannot be faulted
        in), nothing new left pinned."""
        mm = self.source_mm
        if mm is not current.mm and getattr(mm, "dead", False):
            raise fail(EFAULT, "the process that mapped these pages has exited (mmget_not_zero failed)")
        new: list[tuple[int, int, int]] = []
        psz = self.page_size
        faults = self.kernel.faults
        try:
            for lo, hi in holes(merge(self._pinned_spans()), first, last):
                # One pin_user_pages_fast() call per upages array (temp_kmalloc()
                # caps it at TEMP_MEMORY_LIMIT): a short pin is no error, the next
                # call starts at the first page not pinned; a call that pins
                # nothing fails the reader with its errno.
                while lo <= hi:
                    want = min(hi - lo + 1, UPAGES_MAX)
                    res = _pin(mm, self.uptr + lo * psz, want, self.writable)
                    passed = faults.take("pin_user_pages:pfn_reader_user_pin", res.count)
                    if passed < res.count:
                        self.kernel.phys.unpin(res.hpas[passed:res.count])
                        res = PinResult(res.hpas[:passed], res.compound_shifts[:passed], passed, ENOMEM)
                    for run in _runs(lo, res.hpas[:res.count], psz):
                        # batch_from_pages() merges contiguous pfns across calls
                        if new and new[-1][0] + new[-1][1] == run[0] and new[-1][2] + new[-1][1] * psz == run[2]:
                            new[-1] = (new[-1][0], new[-1][1] + run[1], new[-1][2])
                        else:
                            new.append(run)
                    if res.count == 0:
                        what = "cannot be faulted in" if res.errno == ENOMEM else \
                            "is not mapped, or is PROT_NONE" + (" or read-only (the mapping is writable)"
                                                                if self.writable else "")
                        addr = self.uptr + lo * psz
                        raise fail(res.errno or EFAULT, f"user page {addr:#x} {what}: pin_user_pages(FOLL_LONGTERM) "
                                                        f"failed")
                    lo += res.count
        except KernelError:
            self._release(new)
            raise
        for run in new:
            i = bisect.bisect_left(self._runs, list(run))
            self._runs.insert(i, list(run))
        self.npinned += sum(n for _, n, _ in new)
        return new

    def _release(self, runs: Iterable[tuple[int, int, int]]) -> None:
        for _index, n, hpa in runs:
            self.kernel.phys.unpin(np.uint64(hpa) + np.arange(n, dtype=np.uint64) * np.uint64(self.page_size))

    def unpin(self, runs: list[tuple[int, int, int]]) -> None:
        """Undo pin() of these runs (they must not be covered by any area)."""
        for index, n, _ in runs:
            self._forget(index, index + n - 1)
        self._release(runs)
        self.npinned -= sum(n for _, n, _ in runs)

    def unpin_uncovered(self, first: int, last: int) -> None:
        """Unpin the pages of [first, last] no domain area holds any more
        (pfn_reader_unpin / iopt_area_unpin_domain's batch_unpin)."""
        gone: list[tuple[int, int, int]] = []
        for lo, hi in holes(self.covered(), first, last):
            for run in self._runs_in(lo, hi):
                gone.append(run)
        if gone:
            self.unpin(gone)

    def _runs_in(self, lo: int, hi: int) -> list[tuple[int, int, int]]:
        out = []
        for index, n, hpa in self._runs:
            end = index + n - 1
            if end < lo or index > hi:
                continue
            a, b = max(index, lo), min(end, hi)
            out.append((a, b - a + 1, hpa + (a - index) * self.page_size))
        return out

    def _forget(self, lo: int, hi: int) -> None:
        out: list[list[int]] = []
        psz = self.page_size
        for index, n, hpa in self._runs:
            end = index + n - 1
            if end < lo or index > hi:
                out.append([index, n, hpa])
                continue
            if index < lo:
                out.append([index, lo - index, hpa])
            if end > hi:
                out.append([hi + 1, end - hi, hpa + (hi + 1 - index) * psz])
        self._runs = out

    # -- accounting (do_update_pinned) --------------------------------------------------------------------------

    def update_pinned(self) -> None:
        """pfn_reader_user_update_pinned(): charge (or refund) the change of
        npinned since the last update.  ENOMEM changes nothing."""
        if self.npinned == self.last_npinned:
            return
        if self.npinned < self.last_npinned:
            self._do_update(self.last_npinned - self.npinned, False)
        else:
            self._do_update(self.npinned - self.last_npinned, True)

    def update_unpinned(self) -> None:
        """update_unpinned(): refund what unpinning released."""
        if self.npinned > self.last_npinned:
            raise KernelBug(f"{self!r}: more pinned than charged after an unpin")
        if self.npinned != self.last_npinned:
            self._do_update(self.last_npinned - self.npinned, False)

    def _do_update(self, npages: int, inc: bool) -> None:
        mode = self.account_mode
        if mode == IOPT_PAGES_ACCOUNT_USER:
            if inc:
                self._incr_user_locked_vm(npages)
            else:
                self._decr_user_locked_vm(npages)
        elif mode == IOPT_PAGES_ACCOUNT_MM:
            if inc and self.kernel.faults.should_fail("account_locked_vm:update_mm_locked_vm"):
                raise fail(ENOMEM, "charging mm->locked_vm failed (fault injection)")
            # __account_locked_vm(mm, npages, inc, source_task, false): the
            # capability was decided when the pages were created (NONE mode).
            account_locked_vm_task(self.source_mm, npages, inc, self.source_task, False)
        self.last_npinned = self.npinned
        mm = self.source_mm
        mm.pinned_vm += npages if inc else -npages

    def _incr_user_locked_vm(self, npages: int) -> None:
        """incr_user_locked_vm(): the modern accounting (as io_uring's)."""
        if self.kernel.faults.should_fail("account_locked_vm:incr_user_locked_vm"):
            raise fail(ENOMEM, "charging user->locked_vm failed (fault injection)")
        limit = self.source_task.rlimit_memlock_soft() >> self.kernel.page_shift
        new = self.source_user.locked_vm + npages
        if new > limit:
            raise fail(ENOMEM, f"pinning {npages} more pages would make uid {self.source_user.uid}'s locked memory "
                               f"{new << self.kernel.page_shift} bytes, over RLIMIT_MEMLOCK "
                               f"{self.source_task.rlimit_memlock_soft()} bytes (iommufd charges per user, all "
                               f"the user's processes together; IOMMU_OPTION_RLIMIT_MODE=1 charges the mm as VFIO "
                               f"does)")
        self.source_user.locked_vm = new

    def _decr_user_locked_vm(self, npages: int) -> None:
        if self.source_user.locked_vm < npages:
            self.kernel.log.warn(f"WARNING: decr_user_locked_vm: uid {self.source_user.uid} locked_vm "
                                 f"{self.source_user.locked_vm} < {npages}")
            return
        self.source_user.locked_vm -= npages


def alloc_pages(kernel: "Kernel", current: "Task", uptr: int, length: int, writable: bool) -> IoptPages:
    """iopt_alloc_pages()"""
    psz = kernel.page_size
    if length > U64 - psz or length == 0:
        raise fail(EINVAL, f"length {length:#x} is 0 or too large")
    if uptr + length > U64:
        raise fail(EOVERFLOW, f"user address {uptr:#x} + length {length:#x} wraps")
    if kernel.faults.should_fail("kmalloc:iopt_alloc_pages"):
        raise fail(ENOMEM, "kzalloc(struct iopt_pages) failed (fault injection)")
    return IoptPages(kernel, current, uptr, length, writable)


def _pin(mm, vaddr: int, npages: int, write: bool) -> PinResult:  # type: ignore[no-untyped-def]
    pin = getattr(mm, "pin_pages_longterm", None)
    if pin is not None:
        return pin(vaddr, npages, write)  # type: ignore[no-any-return]
    shift = mm.page_shift
    addrs = np.uint64(vaddr) + (np.arange(npages, dtype=np.uint64) << np.uint64(shift))
    return mm.pin_pages(addrs, write)  # type: ignore[no-any-return]


def _runs(first: int, hpas: np.ndarray, psz: int) -> list[tuple[int, int, int]]:
    """Physically contiguous runs of consecutive pages from index ``first``."""
    if hpas.size == 0:
        return []
    breaks = np.flatnonzero(hpas[1:] != hpas[:-1] + np.uint64(psz)) + 1
    starts = [0] + breaks.tolist()
    ends = breaks.tolist() + [int(hpas.size)]
    return [(first + s, e - s, int(hpas[s])) for s, e in zip(starts, ends)]


# -- areas and domains (iopt_area_fill_domain(s), iopt_area_unfill_domain(s)) -----------------------------------


def _map_area(area: "IoptArea", runs: list[tuple[int, int, int]], domain: "IommuDomain") -> None:
    """batch_to_domain(): each contiguous run with one iommu_map(), or one
    PAGE_SIZE at a time (batch_iommu_map_small()) while large pages are
    disabled, so that every IOPTE can be unmapped on its own."""
    iopt = area.iopt
    assert iopt is not None
    psz = iopt.page_size
    faults = iopt.kernel.faults
    done = []
    try:
        for index, n, hpa in runs:
            offset = area.page_offset if index == area.pages_first else 0
            iova = area.index_to_iova(index)
            end = min(area.last + 1, iova + n * psz - offset)
            if faults.should_fail("iommu_map:batch_to_domain"):
                raise fail(ENOMEM, f"iommu_map() of IOVA {iova:#x}+{end - iova:#x} could not allocate an IO page "
                                   f"table page (fault injection)")
            if iopt.disable_large_pages:
                for page in range(iova, end, psz):
                    iommu_map(domain, page, hpa + offset + (page - iova), min(psz, end - page), area.iommu_prot)
            else:
                iommu_map(domain, iova, hpa + offset, end - iova, area.iommu_prot)
            done.append((iova, end - iova))
    except KernelError:
        for iova, size in done:
            iommu_unmap(domain, iova, size)
        raise


def area_fill_domains(area: "IoptArea", pages: IoptPages, current: "Task") -> None:
    """iopt_area_fill_domains(): a new area into every domain of its IOAS; all
    or nothing."""
    iopt = area.iopt
    assert iopt is not None
    if not iopt.domains:
        return
    new = pages.pin(area.pages_first, area.pages_last, current)
    runs = pages.runs(area.pages_first, area.pages_last)
    mapped = []
    try:
        for domain in iopt.domains:
            _map_area(area, runs, domain)
            mapped.append(domain)
        pages.update_pinned()
    except KernelError:
        for domain in mapped:
            iommu_unmap(domain, area.start, area.length)
        pages.unpin(new)
        raise
    area.storage_domain = iopt.domains[0]
    pages.domain_areas.append(area)


def area_fill_domain(area: "IoptArea", domain: "IommuDomain", current: "Task") -> None:
    """iopt_area_fill_domain(): an existing area into a new domain."""
    pages = area.pages
    assert pages is not None
    new = pages.pin(area.pages_first, area.pages_last, current)
    try:
        _map_area(area, pages.runs(area.pages_first, area.pages_last), domain)
        try:
            pages.update_pinned()
        except KernelError:
            iommu_unmap(domain, area.start, area.length)
            raise
    except KernelError:
        pages.unpin(new)
        raise


def area_unfill_domain(area: "IoptArea", pages: IoptPages, domain: "IommuDomain") -> None:
    """iopt_area_unfill_domain(): unmap the area from ``domain`` and unpin
    what nothing else holds (the area is already out of domains_itree)."""
    iommu_unmap(domain, area.start, area.length)
    pages.unpin_uncovered(area.pages_first, area.pages_last)
    pages.update_unpinned()


def area_unfill_domains(area: "IoptArea", pages: IoptPages) -> None:
    """iopt_area_unfill_domains(): the area goes away."""
    iopt = area.iopt
    assert iopt is not None
    if area.storage_domain is None:
        return
    for domain in iopt.domains:
        if domain is not area.storage_domain:
            iommu_unmap(domain, area.start, area.length)
    pages.domain_areas.remove(area)
    storage, area.storage_domain = area.storage_domain, None
    area_unfill_domain(area, pages, storage)
