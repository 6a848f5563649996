"""x86 with an Intel VT-d IOMMU, as QEMU's ``intel-iommu`` presents it to Linux.

The remapping unit (a DMAR DRHD, :class:`IntelIommu`) translates every DMA
through the IOMMU domain the device's group is attached to: the host's
identity domain while the kernel owns the group (``iommu=pt``), the
blocking domain once VFIO claims it (iommu_group_claim_dma_owner), and a
paging domain (:class:`VtdDomain`, ``struct dmar_domain``) once the Type1
driver attaches it.  A paging domain is a second-level page table from IOVA
to host physical address; a transfer reaches memory only where every page
it touches is mapped with the permission its direction needs.  Anything
else is refused: the transfer does not happen and the unit records a DMAR
fault, which Linux logs as dmar_fault_do_one() does
(drivers/iommu/intel/dmar.c).  There is no EEH on x86: a fault stops
nothing else.

Geometry and capabilities follow drivers/iommu/intel/iommu.c as of Linux
6.12: the aperture is ``[0, 2^aw - 1]`` (__DOMAIN_MAX_ADDR of the domain's
guest address width), the page sizes are 4K plus the super pages the unit
reports (QEMU: 2M and 1G), the reserved regions are the interrupt
(IOAPIC/MSI) range (intel_iommu_get_resv_regions), and force-snooping
(VFIO_DMA_CC_IOMMU) needs snoop control, which QEMU's unit lacks by default.

Devices use :class:`VtdBusMaster`, the same path as POWER's PeBusMaster
with the device's context entry (:class:`VtdContext`) in the place of the
PE; data moves run by run (kernel/iommu/dma.py), never page by page.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass
from errno import EBUSY, EFAULT, EINVAL, ENOMEM, EOPNOTSUPP
from itertools import count
from typing import TYPE_CHECKING, Callable

from ..errors import KernelBug, fail
from ..iommu.dma import DmaFault, Run
from ..mm import PhysicalMemory
from ..pci.device import PciDevice
from .base import PeBusMaster

if TYPE_CHECKING:
    from ..iommu.iommu_group import IommuGroup

# IOMMU_* protection flags of the IOMMU API (include/linux/iommu.h).
IOMMU_READ = 1 << 0
IOMMU_WRITE = 1 << 1
IOMMU_CACHE = 1 << 2

# enum iommu_resv_type (include/linux/iommu.h).
IOMMU_RESV_DIRECT = 0
IOMMU_RESV_DIRECT_RELAXABLE = 1
IOMMU_RESV_RESERVED = 2
IOMMU_RESV_MSI = 3
IOMMU_RESV_SW_MSI = 4
RESV_TYPE_NAMES = {"direct": IOMMU_RESV_DIRECT, "direct-relaxable": IOMMU_RESV_DIRECT_RELAXABLE,
                   "reserved": IOMMU_RESV_RESERVED, "msi": IOMMU_RESV_MSI, "sw-msi": IOMMU_RESV_SW_MSI}
RESV_TYPE_BY_NUMBER = {v: k for k, v in RESV_TYPE_NAMES.items()}

# Fault reasons of second-level translation (dma_remap_fault_reasons[] in
# drivers/iommu/intel/dmar.c; QEMU's VTD_FR_* codes in hw/i386/intel_iommu.c).
DMAR_FR_CONTEXT_ENTRY_P = 0x2
DMAR_FR_ADDR_BEYOND_MGAW = 0x4
DMAR_FR_WRITE = 0x5
DMAR_FR_READ = 0x6
DMAR_FAULT_REASONS = {
    DMAR_FR_CONTEXT_ENTRY_P: "Present bit in context entry is clear",
    DMAR_FR_ADDR_BEYOND_MGAW: "Access beyond MGAW",
    DMAR_FR_WRITE: "PTE Write access is not set",
    DMAR_FR_READ: "PTE Read access is not set",
}

# What the Type1 driver compares to decide whether two domains can be shared
# (``d->domain->ops == domain->domain->ops``): every VT-d paging domain has
# intel_iommu_ops' paging ops.
INTEL_IOMMU_OPS = "intel_iommu_ops"


@dataclass(frozen=True)
class ResvRegion:
    """``struct iommu_resv_region``: a range no IOVA may use."""

    start: int
    length: int
    type: int

    @property
    def end(self) -> int:
        return self.start + self.length - 1

    @property
    def type_name(self) -> str:
        return RESV_TYPE_BY_NUMBER.get(self.type, str(self.type))


@dataclass
class VtdFault(DmaFault):
    """A refused transfer and the VT-d fault reason the unit records."""

    code: int = DMAR_FR_READ


class VtdDomain:
    """An IOMMU domain on the unit: identity, blocking, or paging.

    A paging domain (``struct dmar_domain``) keeps its second-level page
    table as extents: runs of IOVA mapped to physically contiguous memory
    with one permission, which is how the Type1 driver maps them
    (vfio_iommu_map() maps each contiguous chunk of pinned pages with one
    iommu_map()).  Lookups bisect the extents, so a transfer costs one step
    per extent it crosses.
    """

    IDENTITY = "identity"
    BLOCKED = "blocked"
    PAGING = "paging"

    def __init__(self, unit: "IntelIommu", kind: str, domain_id: int) -> None:
        self.unit = unit
        self.kind = kind
        self.id = domain_id
        self.ops = INTEL_IOMMU_OPS
        # domain->geometry: the aperture of a paging domain is its address width.
        self.aperture_start = 0
        self.aperture_end = (1 << unit.aw_bits) - 1
        self.pgsize_bitmap = unit.pgsize_bitmap
        self.groups: list["IommuGroup"] = []
        self._starts: list[int] = []
        # (iova, length, hpa, prot, leaf): leaf caps the size of the PTEs the
        # extent is made of (0: the largest the alignment allows, as
        # intel_iommu_map_pages() picks them; iommufd's batch_iommu_map_small()
        # maps one PAGE_SIZE at a time).
        self._ext: list[tuple[int, int, int, int, int]] = []
        # Called with (iova, length) after the device wrote through this
        # domain; the Type1 driver records dirty pages with it.
        self.on_dma_write: Callable[[int, int], None] | None = None
        self.freed = False
        # Second-stage A/D bits (ecap SSADS, scalable mode): a domain allocated
        # with IOMMU_HWPT_ALLOC_DIRTY_TRACKING has intel_dirty_ops; while
        # tracking is on, a DMA write sets the D bit of every leaf PTE it
        # touches.  D bits are kept per 4 KiB as [start, end) intervals.
        self.dirty_ops = False
        self.dirty_tracking = False
        self._dirty: list[tuple[int, int]] = []

    def __repr__(self) -> str:
        return f"<VtdDomain {self.kind} #{self.id} on {self.unit.name}>"

    # -- iommu_domain_ops ---------------------------------------------------------------

    def enforce_cache_coherency(self) -> bool:
        """intel_iommu_enforce_cache_coherency(): force snooping needs every
        unit the domain's devices sit behind to support snoop control."""
        return self.unit.snoop_control

    def map(self, iova: int, hpa: int, size: int, prot: int, leaf: int = 0) -> None:
        """intel_iommu_map(): one physically contiguous range.

        Past the domain's address width is EFAULT, as upstream logs "iommu
        width (%d) is not sufficient for the mapped address".
        """
        if self.kind != self.PAGING:
            raise KernelBug(f"map into the {self.kind} domain")
        if size <= 0:
            return
        if iova + size - 1 > self.aperture_end:
            self.unit.log_err(f"DMAR: intel_iommu_map: iommu width ({self.unit.aw_bits}) is not sufficient for the "
                              f"mapped address ({iova + size:x})")
            raise fail(EFAULT, f"IOVA {iova:#x}+{size:#x} is beyond the {self.unit.aw_bits}-bit address width")
        if not prot & (IOMMU_READ | IOMMU_WRITE):
            raise fail(EINVAL, "a VT-d mapping needs read or write permission")
        i = bisect.bisect_right(self._starts, iova)
        if (i > 0 and self._ext[i - 1][0] + self._ext[i - 1][1] > iova) or \
                (i < len(self._starts) and self._starts[i] < iova + size):
            # __domain_mapping() WARNs "DMA PTE for vPFN ... already set"; the
            # Type1 driver never maps over a mapping.
            raise KernelBug(f"VT-d PTE for IOVA {iova:#x}+{size:#x} already set in {self!r}")
        self._starts.insert(i, iova)
        self._ext.insert(i, (iova, size, hpa, prot, leaf))

    def unmap(self, iova: int, size: int) -> int:
        """intel_iommu_unmap_pages(): clear [iova, iova+size); bytes unmapped."""
        end = iova + size
        i = max(bisect.bisect_right(self._starts, iova) - 1, 0)
        done = 0
        while i < len(self._ext):
            e_iova, e_len, e_hpa, e_prot, e_leaf = self._ext[i]
            e_end = e_iova + e_len
            if e_iova >= end:
                break
            if e_end <= iova:
                i += 1
                continue
            lo, hi = max(iova, e_iova), min(end, e_end)
            done += hi - lo
            pieces = []
            if e_iova < lo:
                pieces.append((e_iova, lo - e_iova, e_hpa, e_prot, e_leaf))
            if hi < e_end:
                pieces.append((hi, e_end - hi, e_hpa + (hi - e_iova), e_prot, e_leaf))
            del self._ext[i]
            del self._starts[i]
            for piece in reversed(pieces):
                self._ext.insert(i, piece)
                self._starts.insert(i, piece[0])
            i += len(pieces)
        return done

    def iova_to_phys(self, iova: int) -> int:
        """intel_iommu_iova_to_phys(): 0 when nothing is mapped there."""
        i = bisect.bisect_right(self._starts, iova) - 1
        if i >= 0:
            e_iova, e_len, e_hpa = self._ext[i][:3]
            if iova < e_iova + e_len:
                return e_hpa + (iova - e_iova)
        return 0

    def mapped_bytes(self) -> int:
        return sum(e[1] for e in self._ext)

    def extents(self) -> list[tuple[int, int, int, int]]:
        """(iova, length, hpa, prot) of each mapped range."""
        return [e[:4] for e in self._ext]

    # -- second-stage dirty tracking (intel_dirty_ops) -----------------------------------------

    def _leaf(self, iova: int) -> tuple[int, int] | None:
        """The leaf PTE that maps ``iova``: (its first IOVA, its size), or None.

        __domain_mapping() picks, at each position, the largest page size the
        unit supports to which both the IOVA and the physical address are
        aligned and that fits in what is left of the iommu_map() call."""
        i = bisect.bisect_right(self._starts, iova) - 1
        if i < 0:
            return None
        e_iova, e_len, e_hpa, _prot, e_leaf = self._ext[i]
        end = e_iova + e_len
        if iova >= end:
            return None
        sizes = [sz for sz in (1 << 30, 1 << 21) if self.pgsize_bitmap & sz and (not e_leaf or sz <= e_leaf)]
        delta = e_hpa - e_iova
        pos = e_iova
        while True:
            size = next((sz for sz in sizes if not (pos | (pos + delta)) & (sz - 1) and end - pos >= sz), 0x1000)
            if pos + size > iova:
                return pos, size
            if size != 0x1000:
                pos += size
                continue
            # A run of 4 KiB PTEs lasts until the next boundary where a super
            # page could start: jump there, or to the page of iova.
            nxt = min([(pos + sz) & ~(sz - 1) for sz in sizes if not delta & (sz - 1)] + [end])
            pos = max(min(nxt, iova & ~0xFFF), pos + 0x1000)

    def set_dirty_tracking(self, enable: bool) -> None:
        """intel_iommu_set_dirty_tracking(): the PASID entries' SSADE bit."""
        self.dirty_tracking = enable

    def mark_dirty(self, iova: int, length: int) -> None:
        """The unit sets D in each leaf PTE a DMA write went through (tracking on)."""
        if not self.dirty_tracking or length <= 0:
            return
        start, end = iova & ~0xFFF, (iova + length + 0xFFF) & ~0xFFF
        out, placed = [], False
        for s, e in self._dirty:
            if e < start or s > end:
                if s > end and not placed:
                    out.append((start, end))
                    placed = True
                out.append((s, e))
            else:
                start, end = min(s, start), max(e, end)
        if not placed:
            out.append((start, end))
        out.sort()
        self._dirty = out

    def _dirty_in(self, start: int, end: int) -> bool:
        return any(s < end and e > start for s, e in self._dirty)

    def _clear_dirty(self, start: int, end: int) -> None:
        out = []
        for s, e in self._dirty:
            if e <= start or s >= end:
                out.append((s, e))
                continue
            if s < start:
                out.append((s, start))
            if e > end:
                out.append((end, e))
        self._dirty = out

    def read_and_clear_dirty(self, iova: int, size: int, no_clear: bool,
                             record: Callable[[int, int], None] | None) -> None:
        """intel_iommu_read_and_clear_dirty(): walk the leaf PTEs from ``iova``
        in steps of each one's size (from ``iova`` itself, so a walk that
        starts inside a super page records it from there), recording and
        (unless ``no_clear``) clearing the dirty ones.  EINVAL when tracking
        is off and a bitmap is wanted; without one (``record`` None) it only
        clears, as iopt_set_dirty_tracking() does before enabling."""
        if not self.dirty_tracking and record is not None:
            raise fail(EINVAL, "the domain is not tracking dirty pages")
        end = iova + size - 1
        while True:
            leaf = self._leaf(iova)
            if leaf is None:
                nxt = bisect.bisect_right(self._starts, iova)
                pgsize = 0x1000 if nxt >= len(self._starts) else max(self._starts[nxt] - iova, 0x1000)
            else:
                first, pgsize = leaf
                if self._dirty_in(first, first + pgsize):
                    if not no_clear:
                        self._clear_dirty(first, first + pgsize)
                    if record is not None:
                        record(iova, pgsize)
            iova += pgsize
            if iova >= end or iova >= 1 << 64:
                break

    # -- the hardware walk -----------------------------------------------------------------

    def translate(self, iova: int, length: int, write: bool, phys: PhysicalMemory) -> list[Run] | VtdFault:
        """Translate [iova, iova+length) for a device read or write."""
        if self.kind == self.BLOCKED:
            return VtdFault(iova, "the group is in the blocking domain (VFIO owns it, no IOMMU domain attached)",
                            DMAR_FR_CONTEXT_ENTRY_P)
        if self.kind == self.IDENTITY:
            found = phys.lookup(iova)
            if found is None or found[1] + length > found[0].length:
                return VtdFault(iova, f"{iova:#x}+{length:#x} is not RAM (identity domain)",
                                DMAR_FR_WRITE if write else DMAR_FR_READ)
            return [(found[0], found[1], length)]
        end = iova + length
        if end - 1 > self.aperture_end:
            bad = max(iova, self.aperture_end + 1)
            return VtdFault(bad, f"IOVA {bad:#x} is beyond the {self.unit.aw_bits}-bit address width",
                            DMAR_FR_ADDR_BEYOND_MGAW)
        need = IOMMU_WRITE if write else IOMMU_READ
        code = DMAR_FR_WRITE if write else DMAR_FR_READ
        runs: list[Run] = []
        pos = iova
        i = bisect.bisect_right(self._starts, pos) - 1
        while pos < end:
            if i < 0 or i >= len(self._ext) or not (self._ext[i][0] <= pos < self._ext[i][0] + self._ext[i][1]):
                page = pos & ~0xFFF
                return VtdFault(pos, f"IOVA page {page:#x} is not mapped", code)
            e_iova, e_len, e_hpa, e_prot = self._ext[i][:4]
            if not e_prot & need:
                page = pos & ~0xFFF
                return VtdFault(pos, f"IOVA page {page:#x} is mapped without {'write' if write else 'read'} "
                                     f"permission", code)
            chunk = min(end, e_iova + e_len) - pos
            hpa = e_hpa + (pos - e_iova)
            found = phys.lookup(hpa)
            if found is None or found[1] + chunk > found[0].length:
                return VtdFault(pos, f"IOVA {pos:#x} translates to {hpa:#x}, which is not RAM", code)
            if runs and runs[-1][0] is found[0] and runs[-1][1] + runs[-1][2] == found[1]:
                obj, off, ln = runs[-1]
                runs[-1] = (obj, off, ln + chunk)
            else:
                runs.append((found[0], found[1], chunk))
            pos += chunk
            i += 1
        return runs


class VtdGroup:
    """The IOMMU core's view of one group on VT-d: its default domain
    (identity with ``iommu=pt``), the blocking domain, and the domain it is
    attached to now (``group->domain``), drivers/iommu/iommu.c."""

    def __init__(self, unit: "IntelIommu", group: "IommuGroup") -> None:
        self.unit = unit
        self.group = group
        self.default_domain = unit.identity_domain
        self.blocking_domain = unit.blocking_domain
        self.domain = self.default_domain
        self.owned = False

    def take_ownership(self) -> None:
        """__iommu_take_dma_ownership(): the group moves to the blocking domain."""
        if self.domain is not self.default_domain:
            raise fail(EBUSY, f"IOMMU group {self.group.id} is attached to another domain")
        self.owned = True
        self._set(self.blocking_domain)

    def release_ownership(self) -> None:
        """__iommu_release_dma_ownership(): back to the default domain."""
        self.owned = False
        self._set(self.default_domain)

    def attach(self, domain: VtdDomain) -> None:
        """__iommu_attach_group(): only from the default or blocking domain."""
        if self.domain not in (self.default_domain, self.blocking_domain):
            raise fail(EBUSY, f"IOMMU group {self.group.id} is already attached to {self.domain!r}")
        if domain.unit is not self.unit:
            # dev_iommu_ops(dev) != domain->owner, or a unit the domain cannot
            # use (prepare_domain_attach_device).
            raise fail(EINVAL, f"domain {domain!r} belongs to another IOMMU unit")
        self._set(domain)

    def replace(self, domain: VtdDomain) -> None:
        """iommu_replace_group_handle() -> __iommu_group_set_domain(): from the
        current domain straight to the next (iommufd's attach replacement)."""
        if domain.unit is not self.unit:
            raise fail(EINVAL, f"domain {domain!r} belongs to another IOMMU unit")
        self._set(domain)

    def detach(self, domain: VtdDomain) -> None:
        """iommu_detach_group() -> __iommu_group_set_core_domain()."""
        self._set(self.blocking_domain if self.owned else self.default_domain)

    def _set(self, domain: VtdDomain) -> None:
        if self.group in self.domain.groups:
            self.domain.groups.remove(self.group)
        self.domain = domain
        domain.groups.append(self.group)


class IntelIommu:
    """One VT-d remapping unit (DMAR DRHD) and the domains allocated on it."""

    def __init__(self, *, name: str, model: str, aw_bits: int, pgsize_bitmap: int, resv_regions: list[ResvRegion],
                 snoop_control: bool, interrupt_remapping: bool, caching_mode: bool, phys: PhysicalMemory,
                 log_err: Callable[[str], None], dirty_tracking: bool = False) -> None:
        self.name = name
        self.model = model
        self.aw_bits = aw_bits
        self.pgsize_bitmap = pgsize_bitmap
        self.resv_regions = list(resv_regions)
        self.snoop_control = snoop_control
        self.interrupt_remapping = interrupt_remapping
        self.caching_mode = caching_mode
        # Scalable mode with second-stage A/D bits (ecap SMTS + SLADS), and a
        # kernel booted with intel_iommu=sm_on: ssads_supported(), hence
        # IOMMU_CAP_DIRTY_TRACKING.  QEMU 7.2's intel-iommu has neither.
        self.dirty_tracking = dirty_tracking
        self.phys = phys
        self.log_err = log_err
        self._ids = count(1)
        self.identity_domain = VtdDomain(self, VtdDomain.IDENTITY, 0)
        self.blocking_domain = VtdDomain(self, VtdDomain.BLOCKED, 0)
        self.domains: list[VtdDomain] = []
        self.groups: dict[int, VtdGroup] = {}
        self.contexts: list["VtdContext"] = []
        self.faults = 0

    # -- the capability registers (what IOMMU_GET_HW_INFO reports) ---------------------------

    @property
    def cap_reg(self) -> int:
        """CAP_REG as QEMU 7.2's vtd_init() builds it (hw/i386/intel_iommu.c):
        FRO at 0x220, one fault register, 16-bit domain ids, MAMV 18, page
        selective invalidation, the second-level super pages, SAGAW for
        39/48 bits, MGAW, DMA draining (dma-drain=on) and caching mode."""
        cap = (0x220 << 20) | 6 | (18 << 48) | (1 << 39) | (((self.aw_bits - 1) & 0x3F) << 16) | (3 << 54)
        if self.pgsize_bitmap & (1 << 21):
            cap |= 1 << 34
        if self.pgsize_bitmap & (1 << 30):
            cap |= 1 << 35
        if self.aw_bits >= 39:
            cap |= 0x2 << 8
        if self.aw_bits >= 48:
            cap |= 0x4 << 8
        if self.caching_mode:
            cap |= 1 << 7
        return cap

    @property
    def ecap_reg(self) -> int:
        """ECAP_REG: queued invalidation, the IOTLB register offset (0xf0), pass-
        through; interrupt remapping with EIM (QEMU enables EIM when KVM's
        split irqchip is in use, which intremap requires) and MHMV; snoop
        control; for dirty tracking, scalable mode (SMTS, SRS, SLTS) with
        second-level A/D bits (SLADS)."""
        ecap = (1 << 1) | (0xF0 << 4) | (1 << 6)
        if self.interrupt_remapping:
            ecap |= (1 << 3) | (1 << 4) | (15 << 20)
        if self.snoop_control:
            ecap |= 1 << 7
        if self.dirty_tracking:
            ecap |= (1 << 43) | (1 << 31) | (1 << 46) | (1 << 45)
        return ecap

    def add_group(self, group: "IommuGroup") -> VtdGroup:
        state = self.groups.get(group.id)
        if state is None:
            state = self.groups[group.id] = VtdGroup(self, group)
            state.domain.groups.append(group)
        return state

    def add_device(self, dev: PciDevice, state: VtdGroup) -> "VtdContext":
        ctx = VtdContext(self, dev, state)
        self.contexts.append(ctx)
        dev.bus_master = VtdBusMaster(ctx, dev)
        return ctx

    def domain_alloc_paging(self) -> VtdDomain:
        """iommu_paging_domain_alloc() -> __iommu_domain_alloc() ->
        intel_iommu_domain_alloc(IOMMU_DOMAIN_UNMANAGED), as in Linux 6.12
        (intel_iommu_domain_alloc_paging() replaced it in 6.13): alloc_domain()
        kzallocs the dmar_domain, md_domain_init() allocates its top page
        directory; either failing returns NULL, which __iommu_domain_alloc()
        turns into ERR_PTR(-ENOMEM)."""
        faults = self.phys.faults
        if faults is not None and faults.should_fail("kmalloc:alloc_domain"):
            self.log_err("DMAR: Can't allocate dmar_domain")
            raise fail(ENOMEM, "allocating the VT-d domain (struct dmar_domain) failed (fault injection)")
        if faults is not None and faults.should_fail("alloc_pages:md_domain_init"):
            self.log_err("DMAR: Domain initialization failed")
            raise fail(ENOMEM, "allocating the VT-d domain's page directory failed (fault injection)")
        domain = VtdDomain(self, VtdDomain.PAGING, next(self._ids))
        self.domains.append(domain)
        return domain

    def domain_alloc_user(self, *, nest_parent: bool, dirty_tracking: bool) -> VtdDomain:
        """intel_iommu_domain_alloc_user() without a parent or user data (what
        iommufd's IOMMU_HWPT_ALLOC and auto domains ask for): EOPNOTSUPP for a
        nesting parent without nesting support and for dirty tracking without
        SSADS, else paging_domain_alloc(dev, first_stage=false) -- the same
        geometry and page sizes as a Type1 domain -- with intel_dirty_ops when
        dirty tracking was asked for."""
        if nest_parent:
            raise fail(EOPNOTSUPP, f"{self.name} cannot nest translation (no scalable-mode nesting, ecap NEST)")
        if dirty_tracking and not self.dirty_tracking:
            raise fail(EOPNOTSUPP, f"{self.name} has no second-stage dirty bits (ecap SLADS in scalable mode)")
        faults = self.phys.faults
        if faults is not None and faults.should_fail("kmalloc:paging_domain_alloc"):
            raise fail(ENOMEM, "kzalloc of the dmar_domain failed (fault injection)")
        domain = VtdDomain(self, VtdDomain.PAGING, next(self._ids))
        domain.dirty_ops = dirty_tracking
        self.domains.append(domain)
        return domain

    def domain_free(self, domain: VtdDomain) -> None:
        """iommu_domain_free()"""
        if domain.groups:
            raise KernelBug(f"freeing {domain!r} with groups {[g.id for g in domain.groups]} attached")
        domain.freed = True
        if domain in self.domains:
            self.domains.remove(domain)

    def get_resv_regions(self, group: "IommuGroup") -> list[ResvRegion]:
        """iommu_get_group_resv_regions(): the union over the group's devices,
        sorted, overlapping regions of one type merged.  Every device behind
        this unit has the interrupt range (intel_iommu_get_resv_regions)."""
        regions = sorted(self.resv_regions, key=lambda r: (r.start, r.type))
        out: list[ResvRegion] = []
        for r in regions:
            if out and out[-1].type == r.type and r.start <= out[-1].end + 1:
                last = out[-1]
                out[-1] = ResvRegion(last.start, max(last.end, r.end) - last.start + 1, r.type)
            else:
                out.append(r)
        return out

    def report_fault(self, dev: PciDevice, fault: VtdFault, write: bool) -> None:
        """dmar_fault() -> dmar_fault_do_one(): the recorded fault, logged."""
        self.faults += 1
        reason = DMAR_FAULT_REASONS.get(fault.code, "Unknown")
        # The fault recording register holds the page address (FRCD.FI).
        addr = fault.iova & ~0xFFF
        self.log_err("DMAR: DRHD: handling fault status reg 2")
        self.log_err(f"DMAR: [DMA {'Write' if write else 'Read'} NO_PASID] Request device "
                     f"[{dev.bus:02x}:{dev.slot:02x}.{dev.function}] fault addr {addr:#x} "
                     f"[fault reason {fault.code:#04x}] {reason}")

    def describe(self) -> dict:
        return {
            "name": self.name, "model": self.model, "address_width": self.aw_bits,
            "page_sizes": self.pgsize_bitmap, "snoop_control": self.snoop_control,
            "interrupt_remapping": self.interrupt_remapping, "caching_mode": self.caching_mode,
            "dirty_tracking": self.dirty_tracking,
            "reserved_regions": [{"start": r.start, "end": r.end, "type": r.type_name} for r in self.resv_regions],
            "domains": [{"id": d.id, "groups": [g.id for g in d.groups], "mapped_bytes": d.mapped_bytes(),
                         "extents": len(d.extents())} for d in self.domains],
            "faults": self.faults,
        }


class VtdContext:
    """A device's context entry: its requester ID leads to its group's
    current domain.  It stands where a PE stands for PeBusMaster on POWER
    (name, dma_enabled, translate, dma_fault)."""

    eeh = None

    def __init__(self, unit: IntelIommu, dev: PciDevice, state: VtdGroup) -> None:
        self.unit = unit
        self.dev = dev
        self.state = state
        self.name = f"{unit.name} {dev.bdf}"
        self.dma_faults = 0

    def dma_enabled(self) -> bool:
        return True

    def translate(self, iova: int, length: int, write: bool) -> list[Run] | VtdFault:
        domain = self.state.domain
        runs = domain.translate(iova, length, write, self.unit.phys)
        if not isinstance(runs, DmaFault) and write:
            if domain.on_dma_write is not None:
                domain.on_dma_write(iova, length)
            if domain.dirty_tracking:
                domain.mark_dirty(iova, length)
        return runs

    def dma_fault(self, fault: DmaFault, write: bool) -> None:
        self.dma_faults += 1
        if not isinstance(fault, VtdFault):
            fault = VtdFault(fault.iova, fault.reason, DMAR_FR_WRITE if write else DMAR_FR_READ)
        self.unit.report_fault(self.dev, fault, write)


class VtdBusMaster(PeBusMaster):
    """A device's DMA path on x86: bus master enable, then the VT-d context.

    Same checks and run-based copying as POWER's PeBusMaster; a refused
    transfer raises DmaError and moves nothing, and the unit logs a DMAR
    fault (no EEH freeze: x86 has none).
    """

    def __init__(self, ctx: VtdContext, dev: PciDevice) -> None:
        super().__init__(ctx, dev)  # type: ignore[arg-type]
