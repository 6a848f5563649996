"""The IOAS's page table of IOVA -> user pages (drivers/iommu/iommufd/io_pagetable.c).

An :class:`IoPagetable` holds

* *areas*: non-overlapping IOVA ranges, each a slice of an
  :class:`~.pages.IoptPages` (the user memory an IOMMU_IOAS_MAP gave);
* *allowed* ranges (IOMMU_IOAS_ALLOW_IOVAS): if any, automatic IOVA
  allocation stays inside them, and nothing may reserve them;
* *reserved* ranges, each with an owner: a domain's aperture edges, a
  device's reserved regions (MSI window, RMRRs);
* the *domains* (HWPTs' iommu_domains) every area is mapped into, and
  ``iova_alignment``, the largest smallest-page-size among them (1 with no
  domain: a software-only IOAS has no alignment rule at all).

Each method names the upstream function it follows, with its checks in
upstream's order; IOVAs are inclusive ``[start, last]`` as in the kernel.
"""

from __future__ import annotations

import bisect
from errno import EADDRINUSE, EBUSY, EEXIST, EINVAL, ENOENT, ENOMEM, ENOSPC, EOVERFLOW, EPERM
from typing import TYPE_CHECKING, Any

from ..errors import KernelBug, KernelError, fail
from ..iommu.iommu import (IOMMU_RESV_DIRECT_RELAXABLE, IOMMU_RESV_MSI, IOMMU_RESV_SW_MSI, IOMMU_WRITE,
                           IommuDomain, iommu_get_resv_regions, iommu_unmap)
from . import pages as P
from .spans import holes, merge, overlaps, used

if TYPE_CHECKING:
    from ..kernel import Kernel
    from ..pci.device import PciDevice
    from ..task import Task
    from .pages import IoptPages

ULONG_MAX = (1 << 64) - 1
IOPT_ALLOC_IOVA = 1 << 0
# HPAGE_SIZE with CONFIG_TRANSPARENT_HUGEPAGE (Debian's x86 and ppc64el 6.12
# kernels): the largest alignment iopt_alloc_iova() keeps from the user address.
HPAGE_SIZE = 2 << 20


def _ffs(x: int) -> int:
    return (x & -x).bit_length() - 1


def _roundup_pow_of_two(x: int) -> int:
    return 1 << (x - 1).bit_length()


class IoptArea:
    """``struct iopt_area``: ``[start, last]`` maps bytes of ``pages`` from
    page ``pages_first`` (plus ``page_offset``) on.  ``pages`` is None while
    the area is being set up or torn down."""

    __slots__ = ("iopt", "start", "last", "pages", "pages_first", "pages_last", "page_offset", "iommu_prot",
                 "storage_domain", "num_accesses", "prevent_access")

    def __init__(self) -> None:
        self.iopt: IoPagetable | None = None
        self.start = 0
        self.last = 0
        self.pages: "IoptPages | None" = None
        self.pages_first = 0
        self.pages_last = 0
        self.page_offset = 0
        self.iommu_prot = 0
        self.storage_domain: Any = None
        self.num_accesses = 0
        self.prevent_access = False

    def __repr__(self) -> str:
        return f"<IoptArea {self.start:#x}..{self.last:#x} pages {self.pages_first}..{self.pages_last}>"

    @property
    def length(self) -> int:
        return self.last - self.start + 1

    def start_byte(self, iova: int) -> int:
        """iopt_area_start_byte(): bytes from the start of the pages to ``iova``."""
        assert self.iopt is not None
        return (iova - self.start) + self.page_offset + self.pages_first * self.iopt.page_size

    def index_to_iova(self, index: int) -> int:
        """iopt_area_index_to_iova()"""
        assert self.iopt is not None
        index -= self.pages_first
        if index == 0:
            return self.start
        return self.start - self.page_offset + index * self.iopt.page_size


class IoPagetable:
    """``struct io_pagetable``"""

    def __init__(self, kernel: "Kernel") -> None:
        self.kernel = kernel
        self.page_size = kernel.page_size
        self._starts: list[int] = []
        self._areas: list[IoptArea] = []
        self.allowed: list[tuple[int, int]] = []
        self.reserved: list[tuple[int, int, object]] = []
        self.domains: list[IommuDomain] = []
        self.disable_large_pages = False
        # iopt's start as software tables with no alignment restriction.
        self.iova_alignment = 1

    # -- lookups ------------------------------------------------------------------------------------

    def areas(self) -> list[IoptArea]:
        return list(self._areas)

    def area_iter(self, start: int, last: int) -> list[IoptArea]:
        """The areas overlapping [start, last], in IOVA order."""
        i = max(bisect.bisect_right(self._starts, start) - 1, 0)
        out = []
        for area in self._areas[i:]:
            if area.start > last:
                break
            if area.last >= start:
                out.append(area)
        return out

    def area_first(self, start: int, last: int) -> IoptArea | None:
        found = self.area_iter(start, last)
        return found[0] if found else None

    def reserved_first(self, start: int, last: int) -> bool:
        return overlaps(((s, e) for s, e, _ in self.reserved), start, last)

    def _insert(self, area: IoptArea) -> None:
        i = bisect.bisect_left(self._starts, area.start)
        self._starts.insert(i, area.start)
        self._areas.insert(i, area)

    def _remove(self, area: IoptArea) -> None:
        i = bisect.bisect_left(self._starts, area.start)
        while self._areas[i] is not area:
            i += 1
        del self._starts[i]
        del self._areas[i]

    def contig_areas(self, iova: int, last_iova: int) -> tuple[list[tuple[IoptArea, int]], bool]:
        """iopt_for_each_contig_area(): the areas that cover [iova, last_iova]
        back to back, each with the IOVA the walk enters it at, and whether
        they cover all of it (iopt_area_contig_done)."""
        out: list[tuple[IoptArea, int]] = []
        area = self.area_first(iova, iova)
        cur = iova
        while area is not None and area.pages is not None:
            out.append((area, cur))
            if last_iova <= area.last:
                return out, True
            cur = area.last + 1
            area = self.area_first(cur, last_iova)
            if area is None or area.start != cur:
                return out, False
        return out, False

    # -- IOVA allocation (iopt_alloc_iova, iopt_check_iova) ----------------------------------------------

    @staticmethod
    def _check_range(start: int, last: int, length: int, alignment: int, page_offset: int) -> int | None:
        """__alloc_iova_check_range(): the aligned start, or None."""
        aligned = start + alignment - 1
        if aligned > ULONG_MAX:
            return None
        aligned = (aligned & ~(alignment - 1)) | page_offset
        if aligned >= last or last - aligned < length - 1:
            return None
        return aligned

    def alloc_iova(self, uptr: int, length: int) -> int:
        """iopt_alloc_iova(): the first fitting IOVA that is allowed, not
        reserved and not mapped, aligned like the user address as far as a
        huge page (to give THPs a chance); never 0."""
        psz = self.page_size
        page_offset = uptr % psz
        if length == 0 or length >= ULONG_MAX // 2:
            raise fail(EOVERFLOW, f"length {length:#x} cannot be allocated an IOVA")
        if not uptr:
            alignment = _roundup_pow_of_two(length)
        else:
            alignment = min(_roundup_pow_of_two(length), 1 << _ffs(uptr))
        if alignment >= HPAGE_SIZE:
            alignment = HPAGE_SIZE
        if alignment < self.iova_alignment:
            raise fail(EINVAL, f"the user address {uptr:#x} and length {length:#x} are aligned to {alignment:#x}, "
                               f"less than the IOAS's IOVA alignment {self.iova_alignment:#x}")
        first, last = psz, ULONG_MAX - psz
        allowed = used(merge(self.allowed), first, last) if self.allowed else [(first, last)]
        busy = merge([(s, e) for s, e, _ in self.reserved] + [(a.start, a.last) for a in self._areas])
        for a_start, a_last in allowed:
            start = self._check_range(a_start, a_last, length, alignment, page_offset)
            if start is None:
                continue
            for h_start, h_last in holes(busy, start, a_last):
                found = self._check_range(h_start, h_last, length, alignment, page_offset)
                if found is not None:
                    return found
        raise fail(ENOSPC, f"no free IOVA range of {length:#x} bytes (aligned to {alignment:#x}) is left")

    def check_iova(self, iova: int, length: int) -> None:
        """iopt_check_iova()"""
        if iova & (self.iova_alignment - 1):
            raise fail(EINVAL, f"IOVA {iova:#x} is not aligned to the IOAS's IOVA alignment {self.iova_alignment:#x}")
        last = iova + length - 1
        if last > ULONG_MAX:
            raise fail(EOVERFLOW, f"IOVA {iova:#x} + length {length:#x} wraps")
        if self.reserved_first(iova, last):
            raise fail(EINVAL, f"IOVA {iova:#x}..{last:#x} overlaps a reserved range (see IOMMU_IOAS_IOVA_RANGES)")
        area = self.area_first(iova, last)
        if area is not None:
            raise fail(EEXIST, f"IOVA {iova:#x}..{last:#x} overlaps the mapping {area.start:#x}..{area.last:#x}")

    # -- mapping (iopt_map_pages, iopt_map_user_pages) ----------------------------------------------------

    def _insert_area(self, area: IoptArea, pages: "IoptPages", iova: int, start_byte: int, length: int,
                     iommu_prot: int) -> None:
        """iopt_insert_area(): inserted with no pages (being set up)."""
        if iommu_prot & IOMMU_WRITE and not pages.writable:
            raise fail(EPERM, "a writable mapping of pages first mapped read-only (IOMMU_IOAS_COPY cannot add "
                              "write access)")
        psz = self.page_size
        area.iommu_prot = iommu_prot
        area.page_offset = start_byte % psz
        if area.page_offset & (self.iova_alignment - 1):
            raise fail(EINVAL, f"the user address is {area.page_offset:#x} into its page, not aligned to the "
                               f"IOAS's IOVA alignment {self.iova_alignment:#x}")
        area.start = iova
        if iova + length - 1 > ULONG_MAX:
            raise fail(EOVERFLOW, f"IOVA {iova:#x} + length {length:#x} wraps")
        area.last = iova + length - 1
        area.pages_first = start_byte // psz
        if start_byte + length - 1 > ULONG_MAX:
            raise fail(EOVERFLOW, "the pages' byte range wraps")
        area.pages_last = (start_byte + length - 1) // psz
        if area.pages_last >= pages.npages:
            raise KernelBug(f"area {area!r} reaches past {pages!r}")
        area.iopt = self
        self._insert(area)

    def _alloc_area_pages(self, elms: list["PagesElm"], length: int, dst_iova: int, iommu_prot: int,
                          flags: int) -> int:
        """iopt_alloc_area_pages(): reserve the IOVA with not yet filled areas."""
        for elm in elms:
            if self.kernel.faults.should_fail("kmalloc:iopt_area_alloc"):
                raise fail(ENOMEM, "kzalloc(struct iopt_area) failed (fault injection)")
            elm.area = IoptArea()
        if length & (self.iova_alignment - 1) or not length:
            raise fail(EINVAL, f"length {length:#x} is 0 or not a multiple of the IOAS's IOVA alignment "
                               f"{self.iova_alignment:#x}")
        if flags & IOPT_ALLOC_IOVA:
            # The first entry guesses the ideal alignment.
            dst_iova = self.alloc_iova(elms[0].pages.uptr + elms[0].start_byte, length)
        else:
            self.check_iova(dst_iova, length)
        iova = dst_iova
        for elm in elms:
            assert elm.area is not None
            self._insert_area(elm.area, elm.pages, iova, elm.start_byte, elm.length, iommu_prot)
            iova += elm.length
        return dst_iova

    def _abort_area(self, area: IoptArea) -> None:
        """iopt_abort_area()"""
        if area.iopt is not None:
            self._remove(area)
            area.iopt = None

    def map_pages(self, elms: list["PagesElm"], length: int, dst_iova: int, iommu_prot: int, flags: int,
                  current: "Task") -> int:
        """iopt_map_pages(); returns the IOVA.  On failure the caller frees
        the list (iopt_free_pages_list): areas aborted, pages put."""
        iova = self._alloc_area_pages(elms, length, dst_iova, iommu_prot, flags)
        done: list[PagesElm] = []
        try:
            for elm in elms:
                assert elm.area is not None
                P.area_fill_domains(elm.area, elm.pages, current)
                done.append(elm)
        except KernelError:
            for elm in done:
                assert elm.area is not None
                P.area_unfill_domains(elm.area, elm.pages)
            raise
        for elm in elms:
            assert elm.area is not None
            elm.area.pages = elm.pages          # the reference moves into the area
            elm.pages_moved = True
        return iova

    def map_user_pages(self, account_mode: int, uptr: int, length: int, iommu_prot: int, flags: int, iova: int,
                       current: "Task") -> int:
        """iopt_map_user_pages()"""
        pages = P.alloc_pages(self.kernel, current, uptr, length, bool(iommu_prot & IOMMU_WRITE))
        if account_mode == P.IOPT_PAGES_ACCOUNT_MM and pages.account_mode == P.IOPT_PAGES_ACCOUNT_USER:
            pages.account_mode = P.IOPT_PAGES_ACCOUNT_MM
        elm = PagesElm(pages, uptr - pages.uptr, length)
        try:
            return self.map_pages([elm], length, iova, iommu_prot, flags, current)
        except KernelError:
            free_pages_list([elm])
            raise

    def get_pages(self, iova: int, length: int) -> list["PagesElm"]:
        """iopt_get_pages(): references on the pages behind [iova, iova + length),
        which must be mapped without a gap (ENOENT otherwise)."""
        if not length:
            raise fail(EINVAL, "length 0")
        last = iova + length - 1
        if last > ULONG_MAX:
            raise fail(EOVERFLOW, f"IOVA {iova:#x} + length {length:#x} wraps")
        walk, done = self.contig_areas(iova, last)
        elms: list[PagesElm] = []
        for area, cur in walk:
            if self.kernel.faults.should_fail("kmalloc:iopt_get_pages"):
                free_pages_list(elms)
                raise fail(ENOMEM, "kzalloc(struct iopt_pages_list) failed (fault injection)")
            assert area.pages is not None
            elms.append(PagesElm(area.pages.get(), area.start_byte(cur), min(last, area.last) - cur + 1))
        if not done:
            free_pages_list(elms)
            raise fail(ENOENT, f"IOVA {iova:#x}..{last:#x} is not mapped without a gap")
        return elms

    # -- unmapping (iopt_unmap_iova_range) ------------------------------------------------------------------

    def unmap_range(self, start: int, last: int) -> tuple[int, KernelError | None]:
        """iopt_unmap_iova_range(): whole areas only.  Returns the bytes unmapped
        and the error that stopped it, if any: an area that sticks out of the
        range is ENOENT, after the areas before it were unmapped."""
        unmapped = 0
        while True:
            area = self.area_first(start, last)
            if area is None:
                return unmapped, None
            if area.pages is None:
                return unmapped, fail(EBUSY, f"the mapping at {area.start:#x} is being set up")
            if area.start < start or area.last > last:
                return unmapped, fail(ENOENT, f"the range {start:#x}..{last:#x} cuts the mapping "
                                              f"{area.start:#x}..{area.last:#x}: unmap whole mappings")
            if area.num_accesses:
                raise KernelBug("unmapping an area an access pins (iommufd accesses are not modelled)")
            pages, area.pages = area.pages, None
            P.area_unfill_domains(area, pages)
            self._abort_area(area)
            pages.put()
            unmapped += area.last - area.start + 1
            if area.last >= last:
                return unmapped, None
            start = area.last + 1

    def unmap_iova(self, iova: int, length: int) -> tuple[int, KernelError | None]:
        """iopt_unmap_iova()"""
        if not length:
            return 0, fail(EINVAL, "length 0")
        if iova + length - 1 > ULONG_MAX:
            return 0, fail(EOVERFLOW, f"IOVA {iova:#x} + length {length:#x} wraps")
        return self.unmap_range(iova, iova + length - 1)

    def unmap_all(self) -> tuple[int, KernelError | None]:
        """iopt_unmap_all(): an empty IOAS unmaps "all" successfully."""
        return self.unmap_range(0, ULONG_MAX)

    # -- allowed and reserved IOVA ---------------------------------------------------------------------------

    def set_allow_iova(self, allowed: list[tuple[int, int]]) -> None:
        """iopt_set_allow_iova(): all or nothing; EADDRINUSE if a reserved range
        is in the way."""
        for start, last in allowed:
            if self.reserved_first(start, last):
                raise fail(EADDRINUSE, f"allowed range {start:#x}..{last:#x} overlaps a reserved range")
        self.allowed = sorted(allowed)

    def reserve_iova(self, start: int, last: int, owner: object) -> None:
        """iopt_reserve_iova()"""
        if self.area_first(start, last) is not None or overlaps(self.allowed, start, last):
            raise fail(EADDRINUSE, f"IOVA {start:#x}..{last:#x} is mapped or allowed, so it cannot be reserved")
        if self.kernel.faults.should_fail("kmalloc:iopt_reserve_iova"):
            raise fail(ENOMEM, "kzalloc(struct iopt_reserved) failed (fault injection)")
        self.reserved.append((start, last, owner))
        self.reserved.sort(key=lambda r: (r[0], r[1]))

    def remove_reserved_iova(self, owner: object) -> None:
        """iopt_remove_reserved_iova()"""
        self.reserved = [r for r in self.reserved if r[2] is not owner]

    def iova_ranges(self) -> list[tuple[int, int]]:
        """The holes of the reserved ranges: what IOMMU_IOAS_IOVA_RANGES reports."""
        return holes(merge((s, e) for s, e, _ in self.reserved), 0, ULONG_MAX)

    def enforce_dev_resv_regions(self, dev: "PciDevice", owner: object) -> int | None:
        """iopt_table_enforce_dev_resv_regions(): reserve the device's regions
        (all but direct-relaxable ones); returns the SW MSI start, if any."""
        sw_msi = None
        num_hw_msi = num_sw_msi = 0
        try:
            for r in iommu_get_resv_regions(dev):
                if r.type == IOMMU_RESV_DIRECT_RELAXABLE:
                    continue
                if r.type == IOMMU_RESV_MSI:
                    num_hw_msi += 1
                if r.type == IOMMU_RESV_SW_MSI:
                    sw_msi = r.start
                    num_sw_msi += 1
                self.reserve_iova(r.start, r.start + r.length - 1, owner)
            if (num_sw_msi and num_hw_msi) or num_sw_msi > 1:
                self.kernel.log.warn(f"WARNING: iopt_table_enforce_dev_resv_regions: {dev.bdf} has {num_hw_msi} "
                                     f"hardware and {num_sw_msi} software MSI regions")
                raise fail(EINVAL, f"{dev.bdf}: the IOMMU reports an inconsistent set of MSI regions")
        except KernelError:
            self.remove_reserved_iova(owner)
            raise
        return sw_msi

    # -- domains (iopt_table_add_domain, iopt_table_remove_domain) ---------------------------------------------

    def _check_iova_alignment(self, new_alignment: int) -> None:
        """iopt_check_iova_alignment()"""
        mask = new_alignment - 1
        for area in self._areas:
            if area.start & mask or area.length & mask or area.page_offset & mask:
                raise fail(EADDRINUSE, f"the mapping {area.start:#x}..{area.last:#x} is not aligned to "
                                       f"{new_alignment:#x}, the page size the new domain needs")

    def add_domain(self, domain: IommuDomain, current: "Task") -> None:
        """iopt_table_add_domain(): reserve what lies outside the aperture, then
        map every area into the domain (pinning what no domain held yet)."""
        if any(d is domain for d in self.domains):
            raise KernelBug("a domain added twice to one IOAS")
        new_alignment = max(1 << _ffs(domain.pgsize_bitmap), self.iova_alignment)
        if new_alignment > self.page_size:
            raise fail(EINVAL, f"the domain's smallest page, {new_alignment:#x} bytes, is larger than PAGE_SIZE")
        if new_alignment != self.iova_alignment:
            self._check_iova_alignment(new_alignment)
        try:
            if domain.aperture_start != 0:
                self.reserve_iova(0, domain.aperture_start - 1, domain)
            if domain.aperture_end != ULONG_MAX:
                self.reserve_iova(domain.aperture_end + 1, ULONG_MAX, domain)
            self._fill_domain(domain, current)
        except KernelError:
            self.remove_reserved_iova(domain)
            raise
        self.iova_alignment = new_alignment
        self.domains.append(domain)

    def _fill_domain(self, domain: IommuDomain, current: "Task") -> None:
        """iopt_fill_domain(): all areas or none."""
        first_domain = not self.domains
        done: list[IoptArea] = []
        try:
            for area in self._areas:
                if area.pages is None:
                    continue
                P.area_fill_domain(area, domain, current)
                if area.storage_domain is None:
                    area.storage_domain = domain
                    area.pages.domain_areas.append(area)
                done.append(area)
        except KernelError:
            for area in done:
                pages = area.pages
                assert pages is not None
                if first_domain:
                    pages.domain_areas.remove(area)
                    area.storage_domain = None
                    P.area_unfill_domain(area, pages, domain)
                else:
                    iommu_unmap(domain, area.start, area.length)
            raise

    def remove_domain(self, domain: IommuDomain) -> None:
        """iopt_table_remove_domain(): the tail entry moves into the removed
        one's index; every area is unmapped from it, and unpinned if it was
        the last domain."""
        i = next(i for i, d in enumerate(self.domains) if d is domain)
        tail = self.domains.pop()
        if i != len(self.domains):
            self.domains[i] = tail
        self._unfill_domain(domain)
        self.remove_reserved_iova(domain)
        self._calculate_iova_alignment()

    def _unfill_domain(self, domain: IommuDomain) -> None:
        """iopt_unfill_domain()"""
        if self.domains:
            storage = self.domains[0]
            for area in self._areas:
                if area.pages is None:
                    continue
                if area.storage_domain is domain:
                    area.storage_domain = storage
                iommu_unmap(domain, area.start, area.length)
            return
        for area in self._areas:
            pages = area.pages
            if pages is None:
                continue
            pages.domain_areas.remove(area)
            area.storage_domain = None
            P.area_unfill_domain(area, pages, domain)

    def _calculate_iova_alignment(self) -> None:
        """iopt_calculate_iova_alignment()"""
        new = self.page_size if self.disable_large_pages else 1
        for d in self.domains:
            new = max(new, 1 << _ffs(d.pgsize_bitmap))
        if new > self.iova_alignment:
            self._check_iova_alignment(new)
        self.iova_alignment = new

    # -- large pages (IOMMU_OPTION_HUGE_PAGES, VFIO Type1 compat) -------------------------------------------------

    def enable_large_pages(self) -> None:
        """iopt_enable_large_pages()"""
        self.disable_large_pages = False
        self._calculate_iova_alignment()

    def disable_large_pages_(self) -> None:
        """iopt_disable_large_pages(): not once domains hold mappings."""
        if self.disable_large_pages:
            return
        if self.domains and self._areas:
            raise fail(EINVAL, "large pages cannot be disabled once the IOAS has mappings in a domain")
        self.disable_large_pages = True
        try:
            self._calculate_iova_alignment()
        except KernelError:
            self.disable_large_pages = False
            raise

    # -- splitting (VFIO Type1 compat: unmapping inside a mapping) -------------------------------------------------

    def _area_split(self, area: IoptArea, iova: int) -> None:
        """iopt_area_split(): ``iova`` becomes the last byte of the left part."""
        alignment = self.iova_alignment
        last_iova, start_iova = area.last, area.start
        new_start = iova + 1
        pages = area.pages
        if iova == start_iova or iova == last_iova:
            return
        if pages is None or area.prevent_access:
            raise fail(EBUSY, f"the mapping at {start_iova:#x} is being set up or torn down")
        if new_start & (alignment - 1) or area.start_byte(new_start) & (alignment - 1):
            raise fail(EINVAL, f"IOVA {new_start:#x} is not aligned to {alignment:#x}")
        if self.kernel.faults.should_fail("kmalloc:iopt_area_split"):
            raise fail(ENOMEM, "kzalloc(struct iopt_area) failed (fault injection)")
        if area.num_accesses:
            raise fail(EINVAL, "an access pins part of the mapping")
        if area.storage_domain is not None and not self.disable_large_pages:
            raise fail(EINVAL, f"the mapping {start_iova:#x}..{last_iova:#x} may use large pages in a domain: it "
                               f"cannot be split")
        lhs, rhs = IoptArea(), IoptArea()
        self._remove(area)
        self._insert_area(lhs, pages, start_iova, area.start_byte(start_iova), new_start - start_iova,
                          area.iommu_prot)
        self._insert_area(rhs, pages, new_start, area.start_byte(new_start), last_iova - new_start + 1,
                          area.iommu_prot)
        if area.storage_domain is not None:
            pages.domain_areas.remove(area)
            pages.domain_areas += [lhs, rhs]
        lhs.storage_domain = rhs.storage_domain = area.storage_domain
        lhs.pages = rhs.pages = pages
        pages.get()
        area.iopt = None

    def cut_iova(self, iovas: list[int]) -> None:
        """iopt_cut_iova()"""
        for iova in iovas:
            area = self.area_first(iova, iova)
            if area is None:
                continue
            self._area_split(area, iova)

    # -- teardown --------------------------------------------------------------------------------------------------

    def destroy(self) -> None:
        """iopt_destroy_table()"""
        self.allowed = []
        if self.reserved or self.domains or self._areas:
            raise KernelBug(f"IOAS destroyed with {len(self.reserved)} reserved range(s), {len(self.domains)} "
                            f"domain(s) and {len(self._areas)} area(s) left")


class PagesElm:
    """``struct iopt_pages_list``: pages and the byte range of them to map."""

    __slots__ = ("pages", "start_byte", "length", "area", "pages_moved")

    def __init__(self, pages: "IoptPages", start_byte: int, length: int) -> None:
        self.pages = pages
        self.start_byte = start_byte
        self.length = length
        self.area: IoptArea | None = None
        self.pages_moved = False


def free_pages_list(elms: list[PagesElm]) -> None:
    """iopt_free_pages_list(): abort the areas not filled, put the pages not
    moved into an area."""
    for elm in elms:
        if elm.area is not None and not elm.pages_moved:
            if elm.area.iopt is not None:
                elm.area.iopt._abort_area(elm.area)
        if not elm.pages_moved:
            elm.pages.put()
