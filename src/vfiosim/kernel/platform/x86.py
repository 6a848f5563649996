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

The unit implements the IOMMU API (kernel/iommu/iommu.py): :class:`IntelIommu`
is its ``iommu_ops`` and :class:`VtdDomain` its domains, which is all the
Type1 driver sees.  A device's DMA goes through its context entry
(:class:`VtdContext`), its DMA translator as a PE is on POWER; data moves
run by run (kernel/dma.py), never page by page.
"""

from __future__ import annotations

import bisect
import itertools
from dataclasses import dataclass
from errno import EFAULT, EINVAL, ENOMEM, EOPNOTSUPP
from itertools import count
from typing import TYPE_CHECKING, Any, Callable, Iterator, Sequence

from ..dma import DmaFault, IommuBusMaster, Pieces, Run, TranslationCache
from ..errors import KernelBug, fail
from ..iommu.iommu import (IOMMU_CAP_CACHE_COHERENCY, IOMMU_CAP_DEFERRED_FLUSH, IOMMU_CAP_DIRTY_TRACKING,
                           IOMMU_CAP_ENFORCE_CACHE_COHERENCY, IOMMU_DIRTY_NO_CLEAR, IOMMU_DOMAIN_BLOCKED,
                           IOMMU_DOMAIN_IDENTITY, IOMMU_DOMAIN_PAGING, IOMMU_READ, IOMMU_WRITE, DirtyRange,
                           IommuDomain, IommuOps, ResvRegion)
from ..mm import PhysicalMemory
from .base import IommuMapping, Platform

if TYPE_CHECKING:
    from ..iommu.iommu import IommuGroup
    from ..pci.device import PciDevice

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


@dataclass
class VtdFault(DmaFault):
    """A refused transfer and the VT-d fault reason the unit records."""

    code: int = DMAR_FR_READ


class VtdDomain(IommuDomain):
    """An IOMMU domain on the unit: identity, blocking, or paging.

    A paging domain (``struct dmar_domain``) keeps its second-level page
    table as extents: runs of IOVA mapped to physically contiguous memory
    with one permission, which is how the Type1 driver maps them
    (vfio_iommu_map() maps each contiguous chunk of pinned pages with one
    iommu_map()).  Lookups bisect the extents, so a transfer costs one step
    per extent it crosses.
    """

    def __init__(self, unit: "IntelIommu", type: str, domain_id: int) -> None:
        # domain->geometry: the aperture of a paging domain is its address width.
        super().__init__(unit, type, domain_id=domain_id, pgsize_bitmap=unit.pgsize_bitmap, aperture_start=0,
                         aperture_end=(1 << unit.aw_bits) - 1)
        self.unit = unit
        self._starts: list[int] = []
        self._ext: list[tuple[int, int, int, int]] = []     # (iova, length, hpa, prot)
        # Second-stage A/D bits (ecap SSADS, scalable mode): only a domain
        # allocated for dirty tracking has intel_dirty_ops
        # (intel_iommu_domain_alloc_user(IOMMU_HWPT_ALLOC_DIRTY_TRACKING));
        # while tracking is on, a DMA write sets the D bit of every leaf PTE
        # it touches.  D bits are kept per 4 KiB, as [start, end) intervals.
        self.dirty_ops = False
        self.dirty_tracking = False
        self._dirty: list[tuple[int, int]] = []
        # Bumped by every change of the page table: a unit's IOTLB (VtdContext.iotlb)
        # serves a cached translation only while it is unchanged.
        self.generation = 0

    @property
    def kind(self) -> str:
        return self.type

    def __repr__(self) -> str:
        return f"<VtdDomain {self.type} #{self.id} on {self.unit.name}>"

    # -- iommu_domain_ops ---------------------------------------------------------------

    def attach_dev(self, dev: "PciDevice") -> None:
        """intel_iommu_attach_device() (and the static identity and blocked
        domains' attach): the device's context entry now leads here."""
        ctx = self.unit.contexts.get(dev.bdf)
        if ctx is None:
            raise fail(EINVAL, f"domain {self!r}: {dev.bdf} is not behind {self.unit.name}")
        ctx.domain = self

    def enforce_cache_coherency(self) -> bool:
        """intel_iommu_enforce_cache_coherency(): force snooping needs every
        unit the domain's devices sit behind to support snoop control."""
        return self.unit.snoop_control

    def map_pages(self, iova: int, paddr: int, size: int, prot: int) -> None:
        """intel_iommu_map(): one physically contiguous range.

        Past the domain's address width is EFAULT, as upstream logs "iommu
        width (%d) is not sufficient for the mapped address".
        """
        if self.type != IOMMU_DOMAIN_PAGING:
            raise KernelBug(f"map into the {self.type} domain")
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
        self._ext.insert(i, (iova, size, paddr, prot))
        self.generation += 1

    def unmap_pages(self, iova: int, size: int) -> int:
        """intel_iommu_unmap_pages(): clear [iova, iova+size); bytes unmapped."""
        self.generation += 1
        i = bisect.bisect_right(self._starts, iova) - 1
        if i >= 0 and self._starts[i] == iova and self._ext[i][1] == size:
            # The usual case, one whole extent (what Type1 mapped with one
            # iommu_map()): the walk below would remove it and stop there.
            del self._ext[i]
            del self._starts[i]
            return size
        end = iova + size
        i = max(i, 0)
        done = 0
        while i < len(self._ext):
            e_iova, e_len, e_hpa, e_prot = self._ext[i]
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
                pieces.append((e_iova, lo - e_iova, e_hpa, e_prot))
            if hi < e_end:
                pieces.append((hi, e_end - hi, e_hpa + (hi - e_iova), e_prot))
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
            e_iova, e_len, e_hpa, _ = self._ext[i]
            if iova < e_iova + e_len:
                return e_hpa + (iova - e_iova)
        return 0

    def free(self) -> None:
        """intel_iommu_domain_free()"""
        if self in self.unit.domains:
            self.unit.domains.remove(self)

    # -- intel_dirty_ops (second-stage A/D bits) --------------------------------------------

    @property
    def dirty_tracking_supported(self) -> bool:
        """domain->dirty_ops: set only for a domain allocated for dirty
        tracking, on a unit with second-stage A/D bits."""
        return self.dirty_ops

    def set_dirty_tracking(self, enabled: bool) -> None:
        """intel_iommu_set_dirty_tracking(): the PASID entries' SSADE bit.
        The D bits already set stay (iommufd clears them before enabling)."""
        self.dirty_tracking = enabled

    def _leaf(self, iova: int) -> tuple[int, int] | None:
        """The leaf PTE that maps ``iova``: (its first IOVA, its size), or None.

        __domain_mapping() picks, at each position, the largest page size the
        unit supports to which both the IOVA and the physical address are
        aligned and that fits in what is left of the iommu_map() call (an
        extent here)."""
        i = bisect.bisect_right(self._starts, iova) - 1
        if i < 0:
            return None
        e_iova, e_len, e_hpa, _prot = self._ext[i]
        end = e_iova + e_len
        if iova >= end:
            return None
        sizes = [sz for sz in (1 << 30, 1 << 21) if self.pgsize_bitmap & sz]
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

    def _mark_dirty(self, iova: int, length: int) -> None:
        start, end = iova & ~0xFFF, (iova + length + 0xFFF) & ~0xFFF
        out = []
        for s, e in self._dirty:
            if e < start or s > end:
                out.append((s, e))
            else:
                start, end = min(s, start), max(e, end)
        out.append((start, end))
        self._dirty = sorted(out)

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

    def read_and_clear_dirty(self, iova: int, size: int, flags: int = 0, bitmap: bool = True) -> list[DirtyRange]:
        """intel_iommu_read_and_clear_dirty(): walk the leaf PTEs from ``iova``
        in steps of each one's size -- from ``iova`` itself, so a walk that
        starts inside a super page records it from there -- and record each
        dirty one as (the walk's IOVA, the PTE's size), clearing its D bit
        unless IOMMU_DIRTY_NO_CLEAR.  EINVAL while tracking is off, unless
        there is no bitmap (``bitmap`` False: iommufd clearing the D bits
        before it enables tracking)."""
        if not self.dirty_tracking and bitmap:
            raise fail(EINVAL, f"{self!r} is not tracking dirty pages")
        out: list[DirtyRange] = []
        end = iova + size - 1
        while True:
            leaf = self._leaf(iova)
            if leaf is None:
                nxt = bisect.bisect_right(self._starts, iova)
                pgsize = 0x1000 if nxt >= len(self._starts) else max(self._starts[nxt] - iova, 0x1000)
            else:
                first, pgsize = leaf
                if self._dirty_in(first, first + pgsize):
                    if not flags & IOMMU_DIRTY_NO_CLEAR:
                        self._clear_dirty(first, first + pgsize)
                    if bitmap:
                        out.append(DirtyRange(iova, pgsize))
            iova += pgsize
            if iova >= end or iova >= 1 << 64:
                return out

    def mapped_bytes(self) -> int:
        return sum(e[1] for e in self._ext)

    def extents(self) -> list[tuple[int, int, int, int]]:
        return list(self._ext)

    # -- the hardware walk -----------------------------------------------------------------

    def translate(self, iova: int, length: int, write: bool, phys: PhysicalMemory) -> list[Run] | VtdFault:
        """Translate [iova, iova+length) for a device read or write; a write
        sets the dirty bits of its pages while dirty tracking is on."""
        runs = self.walk(iova, length, write, phys)
        if write and self.dirty_tracking and isinstance(runs, list):
            self.mark_dirty(iova, length)
        return runs

    def mark_dirty(self, iova: int, length: int) -> None:
        """The second-stage dirty bits of the pages a device wrote."""
        self._mark_dirty(iova, length)

    def walk(self, iova: int, length: int, write: bool, phys: PhysicalMemory) -> list[Run] | VtdFault:
        """The page walk of [iova, iova+length): the runs of memory, or the fault."""
        if self.type == IOMMU_DOMAIN_BLOCKED:
            return VtdFault(iova, "the group is in the blocking domain (VFIO owns it, no IOMMU domain attached)",
                            DMAR_FR_CONTEXT_ENTRY_P)
        if self.type == IOMMU_DOMAIN_IDENTITY:
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
            e_iova, e_len, e_hpa, e_prot = self._ext[i]
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


class IntelIommu(IommuOps):
    """One VT-d remapping unit (DMAR DRHD) with intel_iommu_ops: the domains
    allocated on it and the context entries of the devices behind it."""

    name = "intel-iommu"
    identity_domain: "VtdDomain"
    blocked_domain: "VtdDomain"

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
        self.dirty_tracking = dirty_tracking
        self.phys = phys
        self.log_err = log_err
        self._ids = count(1)
        self.identity_domain = VtdDomain(self, IOMMU_DOMAIN_IDENTITY, 0)
        self.blocked_domain = VtdDomain(self, IOMMU_DOMAIN_BLOCKED, 0)
        self.domains: list[VtdDomain] = []
        self.contexts: dict[str, VtdContext] = {}
        self.faults = 0

    # -- intel_iommu_ops ---------------------------------------------------------------------

    def probe_device(self, dev: "PciDevice") -> None:
        """intel_iommu_probe_device(): the device's context entry (its requester
        ID), through which its DMA now goes."""
        ctx = self.contexts[dev.bdf] = VtdContext(self, dev)
        dev.bus_master = IommuBusMaster(ctx, dev)

    def default_domain(self, dev: "PciDevice") -> VtdDomain:
        """The identity domain: the host runs with iommu=pt."""
        return self.identity_domain

    def domain_alloc_paging(self, dev: "PciDevice") -> VtdDomain:
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
        domain = VtdDomain(self, IOMMU_DOMAIN_PAGING, next(self._ids))
        self.domains.append(domain)
        return domain

    def domain_alloc_user(self, dev: "PciDevice", *, nest_parent: bool, dirty_tracking: bool) -> VtdDomain:
        """intel_iommu_domain_alloc_user() without a parent or user data (what
        iommufd's IOMMU_HWPT_ALLOC and automatic domains ask for):
        EOPNOTSUPP for a nesting parent without nesting (ecap NEST in
        scalable mode; QEMU 7.2 has none) and for dirty tracking without
        SSADS, else paging_domain_alloc(dev, first_stage=false) -- the same
        geometry and page sizes as a Type1 domain -- with intel_dirty_ops
        when dirty tracking was asked for."""
        if nest_parent:
            raise fail(EOPNOTSUPP, f"{self.name} cannot nest translation (no scalable-mode nesting, ecap NEST)")
        if dirty_tracking and not self.dirty_tracking:
            raise fail(EOPNOTSUPP, f"{self.name} has no second-stage dirty bits (ecap SLADS in scalable mode)")
        faults = self.phys.faults
        if faults is not None and faults.should_fail("kmalloc:paging_domain_alloc"):
            raise fail(ENOMEM, "kzalloc of the dmar_domain failed (fault injection)")
        domain = VtdDomain(self, IOMMU_DOMAIN_PAGING, next(self._ids))
        domain.dirty_ops = dirty_tracking
        self.domains.append(domain)
        return domain

    has_domain_alloc_user = True

    def capable(self, dev: "PciDevice", cap: int) -> bool:
        """intel_iommu_capable()"""
        if cap in (IOMMU_CAP_CACHE_COHERENCY, IOMMU_CAP_DEFERRED_FLUSH):
            return True
        if cap == IOMMU_CAP_ENFORCE_CACHE_COHERENCY:
            return self.snoop_control
        if cap == IOMMU_CAP_DIRTY_TRACKING:
            return self.dirty_tracking
        return False

    def hw_info(self, dev: "PciDevice") -> tuple[bytes, int] | None:
        """intel_iommu_hw_info(): struct iommu_hw_info_vtd."""
        from ...uapi import iommufd as iu
        vtd = iu.iommu_hw_info_vtd(flags=iu.IOMMU_HW_INFO_VTD_ERRATA_772415_SPR17, cap_reg=self.cap_reg,
                                   ecap_reg=self.ecap_reg)
        return bytes(vtd), iu.IOMMU_HW_INFO_TYPE_INTEL_VTD

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
        through; interrupt remapping and MHMV; snoop control; for dirty
        tracking, scalable mode (SMTS, SRS, SLTS) with second-level A/D bits
        (SLADS).  No EIM: QEMU's vtd_decide_config() turns it on only with
        KVM's in-kernel irqchip, and the machines modelled are TCG guests (the
        x86-iommufd guest's 6.12 reads 0xf00f4a from sysfs and from
        IOMMU_GET_HW_INFO alike)."""
        ecap = (1 << 1) | (0xF0 << 4) | (1 << 6)
        if self.interrupt_remapping:
            ecap |= (1 << 3) | (15 << 20)
        if self.snoop_control:
            ecap |= 1 << 7
        if self.dirty_tracking:
            ecap |= (1 << 43) | (1 << 31) | (1 << 46) | (1 << 45)
        return ecap

    def get_resv_regions(self, dev: "PciDevice") -> list[ResvRegion]:
        """intel_iommu_get_resv_regions(): every device behind this unit has the
        interrupt (IOAPIC/MSI) range."""
        return list(self.resv_regions)

    def isolated_msi(self, dev: "PciDevice") -> bool:
        """The VT-d interrupt remapping domain isolates MSIs (IRQ_DOMAIN_FLAG_ISOLATED_MSI)."""
        return self.interrupt_remapping

    # -- the hardware ---------------------------------------------------------------------------

    def report_fault(self, dev: "PciDevice", fault: VtdFault, write: bool) -> None:
        """dmar_fault() -> dmar_fault_do_one(): the recorded fault, logged."""
        self.faults += 1
        reason = DMAR_FAULT_REASONS.get(fault.code, "Unknown")
        # The fault recording register holds the page address (FRCD.FI).
        addr = fault.iova & ~0xFFF
        self.log_err("DMAR: DRHD: handling fault status reg 2")
        self.log_err(f"DMAR: [DMA {'Write' if write else 'Read'} NO_PASID] Request device "
                     f"[{dev.bus:02x}:{dev.slot:02x}.{dev.function}] fault addr {addr:#x} "
                     f"[fault reason {fault.code:#04x}] {reason}")

    def describe(self) -> dict[str, Any]:
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
    """A device's context entry: its requester ID leads to the domain its
    group is attached to.  The device's DMA translator, as the PE is on POWER."""

    def __init__(self, unit: IntelIommu, dev: "PciDevice") -> None:
        self.unit = unit
        self.dev = dev
        self.domain: VtdDomain = unit.identity_domain
        self.name = f"{unit.name} {dev.bdf}"
        self.dma_faults = 0
        # The unit's IOTLB as this device uses it: 4 KiB page translations of
        # the paging domain, valid while the domain's page table is unchanged.
        self.iotlb = TranslationCache()

    def dma_enabled(self) -> bool:
        """No EEH on x86: nothing ever stops a device's DMA wholesale."""
        return True

    def translate(self, iova: int, length: int, write: bool) -> list[Run] | DmaFault:
        domain = self.domain
        if domain.type != IOMMU_DOMAIN_PAGING:
            return domain.translate(iova, length, write, self.unit.phys)
        runs = self.iotlb.translate(domain, iova, length, write, self._walk, 12)
        if write and domain.dirty_tracking and isinstance(runs, list):
            domain.mark_dirty(iova, length)
        return runs

    def native_tables(self) -> list[VtdDomain]:
        """The tables a native DMA path may cache translations of
        (virtio_native.py): the paging domain the device is attached to now,
        unless dirty tracking wants every write seen."""
        domain = self.domain
        if domain.type != IOMMU_DOMAIN_PAGING or domain.dirty_tracking:
            return []
        return [domain]

    def native_table(self, iova: int) -> VtdDomain | None:
        tables = self.native_tables()
        return tables[0] if tables else None

    def translate_burst(self, iovas: Sequence[int], lens: Sequence[int], write: bool) -> Pieces | None:
        """translate() of a burst, through the IOTLB.  A write while dirty
        tracking is on goes range by range, which sets the dirty bits."""
        domain = self.domain
        if domain.type != IOMMU_DOMAIN_PAGING or (write and domain.dirty_tracking):
            return None
        return self.iotlb.translate_burst(domain, iovas, lens, write, self._walk, 12)

    def _walk(self, iova: int, length: int, write: bool) -> list[Run] | DmaFault:
        return self.domain.walk(iova, length, write, self.unit.phys)

    def dma_fault(self, fault: DmaFault, write: bool) -> None:
        self.dma_faults += 1
        if not isinstance(fault, VtdFault):
            fault = VtdFault(fault.iova, fault.reason, DMAR_FR_WRITE if write else DMAR_FR_READ)
        self.unit.report_fault(self.dev, fault, write)


class X86Platform(Platform):
    """An x86 host: its VT-d units translate every device; no PEs, no EEH."""

    name = "x86"

    def __init__(self, units: list[IntelIommu]) -> None:
        super().__init__()
        self.units = units

    @property
    def iommu_units(self) -> list[IntelIommu]:
        return self.units

    def describe(self) -> dict[str, Any]:
        return {"pes": [], "iommu_units": [u.describe() for u in self.units]}

    def describe_group(self, group: "IommuGroup") -> dict[str, Any]:
        """The IOMMU domain the group's DMA goes through now."""
        d = group.domain
        return {} if d is None else {"domain": {"type": d.type, "id": d.id}}

    def mappings(self, limit: int | None = None) -> Iterator[IommuMapping]:
        for unit in self.units:
            for d in unit.domains:
                where = f"{unit.name} domain {d.id}"
                pages = (IommuMapping(where, iova + off, hpa + off, 4096)
                         for iova, length, hpa, _ in d.extents() for off in range(0, length, 4096))
                yield from itertools.islice(pages, limit)

    def state(self) -> Any:
        return [[(d.type, tuple(d.extents())) for d in unit.domains] for unit in self.units]

    def paging_domains(self) -> list[IommuDomain]:
        return [d for unit in self.units for d in unit.domains]
