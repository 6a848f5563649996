"""The generic IOMMU API (kernel/iommu/iommu.py: drivers/iommu/iommu.c).

The Type1 driver reaches IOMMU hardware only through it: a second IOMMU
driver, written here in a few lines, serves a VFIO container next to VT-d
with no change to Type1.  Also: DMA ownership moves a group between its
default, blocking and attached domains on every platform; iommu_map()'s
checks; reserved regions merged per group; VT-d's dirty tracking.
"""

from __future__ import annotations

import ctypes
import errno
import os

import pytest

import vfiosim
from vfiosim import uapi
from vfiosim.kernel.dma import DmaFault, IommuBusMaster, Run
from vfiosim.kernel.errors import KernelBug, KernelError
from vfiosim.kernel.pci.device import DmaError
from vfiosim.kernel.iommu.iommu import (IOMMU_DOMAIN_IDENTITY, IOMMU_DOMAIN_PAGING, IOMMU_READ, IOMMU_RESV_MSI,
                                        IOMMU_RESV_RESERVED, IOMMU_WRITE, DirtyRange, IommuDomain, IommuOps,
                                        ResvRegion, iommu_attach_group, iommu_detach_group, iommu_domain_free,
                                        iommu_get_group_resv_regions, iommu_group_paging_domain_alloc,
                                        iommu_iova_to_phys, iommu_map, iommu_probe_device,
                                        iommu_read_and_clear_dirty, iommu_set_dirty_tracking, iommu_unmap)
from vfiosim.kernel.platform.x86 import IntelIommu
from vfioutil import dma_map, dma_unmap, edu_dma, enable_bus_master, open_device

MiB = 1 << 20
EDU0, EDU1 = "0000:01:00.0", "0000:02:00.0"


class ToyDomain(IommuDomain):
    """A page-per-entry IO page table: nothing like VT-d's extents."""

    def __init__(self, owner: "ToyIommu", type: str) -> None:
        super().__init__(owner, type, pgsize_bitmap=0x1000, aperture_start=0, aperture_end=(1 << 39) - 1)
        self.ptes: dict[int, tuple[int, int]] = {}

    def attach_dev(self, dev) -> None:
        self.owner.contexts[dev.bdf].domain = self

    def map_pages(self, iova, paddr, size, prot):
        for off in range(0, size, 0x1000):
            assert iova + off not in self.ptes
            self.ptes[iova + off] = (paddr + off, prot)

    def unmap_pages(self, iova, size):
        gone = [a for a in range(iova, iova + size, 0x1000) if self.ptes.pop(a, None) is not None]
        return len(gone) * 0x1000

    def iova_to_phys(self, iova):
        pte = self.ptes.get(iova & ~0xFFF)
        return 0 if pte is None else pte[0] + (iova & 0xFFF)


class ToyContext:
    def __init__(self, unit: "ToyIommu", bdf: str) -> None:
        self.unit = unit
        self.name = f"toy {bdf}"
        self.domain: ToyDomain = unit.identity_domain

    def dma_enabled(self) -> bool:
        return True

    def translate(self, iova: int, length: int, write: bool) -> list[Run] | DmaFault:
        runs: list[Run] = []
        need = IOMMU_WRITE if write else IOMMU_READ
        for page in range(iova & ~0xFFF, iova + length, 0x1000):
            pte = self.domain.ptes.get(page)
            if pte is None or not pte[1] & need:
                return DmaFault(max(page, iova), f"toy: {page:#x} is not mapped")
            lo, hi = max(page, iova), min(page + 0x1000, iova + length)
            obj, off = self.unit.phys.lookup(pte[0] + (lo - page))
            runs.append((obj, off, hi - lo))
        return runs

    def dma_fault(self, fault: DmaFault, write: bool) -> None:
        self.unit.faults.append(fault)


class ToyIommu(IommuOps):
    name = "toy-iommu"

    def __init__(self, phys) -> None:
        self.phys = phys
        self.identity_domain = ToyDomain(self, IOMMU_DOMAIN_IDENTITY)
        self.blocked_domain = ToyDomain(self, "blocked")
        self.contexts: dict[str, ToyContext] = {}
        self.faults: list[DmaFault] = []

    def probe_device(self, dev) -> None:
        ctx = self.contexts[dev.bdf] = ToyContext(self, dev.bdf)
        dev.bus_master = IommuBusMaster(ctx, dev)

    def default_domain(self, dev) -> IommuDomain:
        return self.identity_domain

    def domain_alloc_paging(self, dev) -> IommuDomain:
        return ToyDomain(self, IOMMU_DOMAIN_PAGING)

    def get_resv_regions(self, dev):
        return [ResvRegion(0xFEE00000, MiB, IOMMU_RESV_MSI)]

    def isolated_msi(self, dev) -> bool:
        return True


def move_behind(m, gid: int, ops: IommuOps) -> None:
    """Put a group's devices behind another IOMMU, as firmware could have."""
    g = m.kernel.iommu_groups[gid]
    g.domain.groups.remove(g)
    devs, g.devices = list(g.devices), []
    g.default_domain = g.blocking_domain = g.domain = None
    for dev in devs:
        iommu_probe_device(dev, ops)
        g.add_device(dev)


def test_type1_serves_a_second_iommu_driver_through_the_generic_api():
    """Group 4 behind VT-d, group 5 behind another IOMMU driver: one Type1
    container gets a domain on each (their ops differ, so none is shared),
    the mapping made before group 5 joined is replayed into its domain, and
    both devices DMA through their own page tables."""
    m = vfiosim.Machine.preset("x86")
    toy = ToyIommu(m.kernel.phys)
    move_behind(m, 5, toy)
    p = m.spawn()
    c = p.open("/dev/vfio/vfio", os.O_RDWR)
    g4 = p.open("/dev/vfio/4", os.O_RDWR)
    p.ioctl(g4, uapi.VFIO_GROUP_SET_CONTAINER, ctypes.c_int32(c))
    p.ioctl(c, uapi.VFIO_SET_IOMMU, uapi.VFIO_TYPE1v2_IOMMU)
    buf = p.mmap(MiB)
    p.write_memory(buf, b"both iommus")
    dma_map(p, c, buf, 0x100000, MiB)
    g5 = p.open("/dev/vfio/5", os.O_RDWR)
    p.ioctl(g5, uapi.VFIO_GROUP_SET_CONTAINER, ctypes.c_int32(c))
    iommu = m.kernel.vfio.groups[4].container.iommu_data
    domains = [d.domain for d in iommu.domain_list]
    assert [type(d).__name__ for d in domains] == ["ToyDomain", "VtdDomain"]
    toy_domain, vtd_domain = domains
    assert m.kernel.iommu_groups[5].domain is toy_domain
    assert len(toy_domain.ptes) == 256                            # replayed, page by page in this driver
    for iova in (0x100000, 0x100000 + 0x12345, 0x1FF000):
        assert iommu_iova_to_phys(toy_domain, iova) == iommu_iova_to_phys(vtd_domain, iova) != 0
    for gfd, bdf in ((g4, EDU0), (g5, EDU1)):
        dev = open_device(p, gfd, bdf)
        enable_bus_master(p, dev)
        edu_dma(p, dev, 0x100000, 0x40000, 16, to_ram=False)       # RAM -> the device's buffer
        assert m.device(bdf).bus_master.dma_read(0x100000, 11) == b"both iommus"
    dma_unmap(p, c, 0x100000, MiB)
    assert toy_domain.ptes == {} and vtd_domain.mapped_bytes() == 0
    with pytest.raises(DmaError):
        m.device(EDU1).bus_master.dma_read(0x100000, 8)
    assert toy.faults and "toy" in toy.faults[0].reason
    p.exit()
    assert m.kernel.iommu_groups[5].domain is toy.identity_domain and m.pinned_pages() == 0 and not m.oopses


def test_dma_ownership_moves_a_vtd_group_between_its_domains():
    m = vfiosim.Machine.preset("x86")
    g = m.kernel.iommu_groups[4]
    unit = m.iommu_units[0]
    assert g.domain is g.default_domain is unit.identity_domain
    g.claim_dma_owner("me")
    assert g.domain is g.blocking_domain is unit.blocked_domain
    with pytest.raises(KernelError) as exc:
        g.claim_dma_owner("another")
    assert exc.value.errno == errno.EBUSY
    d = iommu_group_paging_domain_alloc(g)
    iommu_attach_group(d, g)
    assert g.domain is d and d.groups == [g]
    other = iommu_group_paging_domain_alloc(g)
    with pytest.raises(KernelError) as exc:                   # only from the default or blocking domain
        iommu_attach_group(other, g)
    assert exc.value.errno == errno.EBUSY and g.domain is d
    iommu_domain_free(other)
    with pytest.raises(KernelBug):                            # a domain still in use cannot be freed
        iommu_domain_free(d)
    iommu_detach_group(d, g)
    assert g.domain is unit.blocked_domain                    # the owner keeps DMA blocked
    iommu_domain_free(d)
    g.release_dma_owner()
    assert g.domain is unit.identity_domain and g.owner is None


def test_claiming_a_powernv_group_hands_the_pe_to_the_user_through_the_blocking_domain():
    """spapr_tce_iommu_ops: the blocked domain's attach is take_ownership()
    (the host's window and bypass go), the platform domain's release_ownership()."""
    m = vfiosim.Machine.default()
    g = m.kernel.iommu_groups[0]
    pe = m.pe_of(g.devices[0].bdf)
    assert g.domain is g.default_domain and g.domain.type == "platform"
    assert pe.tve[0] is not None and pe.bypass
    g.claim_dma_owner("me")
    assert g.domain is g.blocking_domain and pe.tve[0] is None and not pe.bypass
    with pytest.raises(KernelError) as exc:                   # POWER has no paging domains
        iommu_group_paging_domain_alloc(g)
    assert exc.value.errno == errno.EOPNOTSUPP
    g.release_dma_owner()
    assert g.domain is g.default_domain and pe.tve[0] is not None and pe.bypass


def test_the_3_10_profile_has_no_iommu_api_on_power():
    """3.10 PEs are probed by no IOMMU driver: claiming a group changes
    nothing in the PE; the seed driver takes the PE's table itself."""
    m = vfiosim.Machine.default(kernel="3.10")
    g = m.kernel.iommu_groups[0]
    pe = m.pe_of(g.devices[0].bdf)
    assert g.domain is None and g.devices[0].iommu_ops is None
    table = pe.tve[0]
    g.claim_dma_owner("me")
    assert pe.tve[0] is table
    g.release_dma_owner()


def test_iommu_map_checks_and_iova_to_phys():
    m = vfiosim.Machine.preset("x86")
    g = m.kernel.iommu_groups[4]
    unit = m.iommu_units[0]
    d = iommu_group_paging_domain_alloc(g)
    obj = m.kernel.phys.allocate(2 * MiB)
    for args in ((0x1000, obj.phys_base + 0x800, 0x1000), (0x1800, obj.phys_base, 0x1000),
                 (0x1000, obj.phys_base, 0x800)):
        with pytest.raises(KernelError) as exc:
            iommu_map(d, *args, IOMMU_READ)
        assert exc.value.errno == errno.EINVAL and "unaligned" in exc.value.reason
    with pytest.raises(KernelError) as exc:                   # not a paging domain
        iommu_map(unit.identity_domain, 0, obj.phys_base, 0x1000, IOMMU_READ)
    assert exc.value.errno == errno.EINVAL
    iommu_map(d, 0x200000, obj.phys_base, 2 * MiB, IOMMU_READ | IOMMU_WRITE)
    assert iommu_iova_to_phys(d, 0x200123) == obj.phys_base + 0x123
    assert iommu_iova_to_phys(unit.identity_domain, 0x1234) == 0x1234
    assert iommu_unmap(d, 0x300000, MiB) == MiB
    assert iommu_iova_to_phys(d, 0x300000) == 0 and iommu_iova_to_phys(d, 0x2FF000) == obj.phys_base + 0xFF000
    iommu_unmap(d, 0, 1 << 30)
    iommu_domain_free(d)
    assert unit.domains == []


def test_group_reserved_regions_are_the_union_of_its_devices_merged():
    m = vfiosim.Machine.preset("x86")
    unit = m.iommu_units[0]
    unit.resv_regions = [ResvRegion(0x2000, 0x1000, IOMMU_RESV_RESERVED), ResvRegion(0xFEE00000, MiB, IOMMU_RESV_MSI),
                         ResvRegion(0x1000, 0x1000, IOMMU_RESV_RESERVED), ResvRegion(0xFEF00000, 0x1000,
                                                                                     IOMMU_RESV_MSI)]
    regions = iommu_get_group_resv_regions(m.kernel.iommu_groups[4])
    assert regions == [ResvRegion(0x1000, 0x2000, IOMMU_RESV_RESERVED),
                       ResvRegion(0xFEE00000, MiB + 0x1000, IOMMU_RESV_MSI)]


def test_vtd_dirty_tracking_records_device_writes_when_the_unit_supports_it():
    m = vfiosim.Machine.preset("x86")
    g = m.kernel.iommu_groups[4]
    assert not m.iommu_units[0].dirty_tracking                # QEMU's intel-iommu: no SSADS
    d = iommu_group_paging_domain_alloc(g)
    with pytest.raises(KernelError) as exc:
        iommu_set_dirty_tracking(d, True)
    assert exc.value.errno == errno.EOPNOTSUPP
    iommu_domain_free(d)
    m.iommu_units[0].dirty_tracking = True
    g.claim_dma_owner("me")
    d = iommu_group_paging_domain_alloc(g)
    with pytest.raises(KernelError) as exc:                   # intel_iommu_domain_alloc(): no dirty ops
        iommu_set_dirty_tracking(d, True)
    iommu_domain_free(d)
    d = m.iommu_units[0].domain_alloc_user(m.device(EDU0), nest_parent=False, dirty_tracking=True)
    iommu_attach_group(d, g)
    obj = m.kernel.phys.allocate(MiB)
    iommu_map(d, 0x100000, obj.phys_base, MiB, IOMMU_READ | IOMMU_WRITE)
    dev = m.device(EDU0)
    dev.config.data[4] |= 0x4                                 # bus master
    dev.bus_master.dma_write(0x100000 + 0x1800, b"x" * 0x1000)  # before tracking: not recorded
    iommu_set_dirty_tracking(d, True)
    dev.bus_master.dma_write(0x100000 + 0x3800, b"x" * 0x1000)
    dev.bus_master.dma_read(0x100000 + 0x8000, 0x1000)        # reads dirty nothing
    # One record per dirty IOPTE (4 KiB ones here: 0x100000 is not 2 MiB aligned).
    assert iommu_read_and_clear_dirty(d, 0x100000, MiB) == [DirtyRange(0x103000, 0x1000), DirtyRange(0x104000, 0x1000)]
    assert iommu_read_and_clear_dirty(d, 0x100000, MiB) == []
    iommu_detach_group(d, g)
    iommu_unmap(d, 0x100000, MiB)
    iommu_domain_free(d)
    g.release_dma_owner()
