"""The simulated kernel's declared interfaces: every implementation provides
all of it, and the kernel's per-mm state is real fields from the start (a
rename fails here or under mypy, instead of silently turning a feature off)."""

from __future__ import annotations

import os

import pytest

import vfiosim
from vfiosim.kernel.iommu.tce import TableOps
from vfiosim.kernel.mm import MM, AddressSpace, PhysicalMemory
from vfiosim.transport.host import HostMM


@pytest.mark.parametrize("make", [lambda phys: MM(phys), lambda phys: HostMM(os.getpid(), phys)], ids=["MM", "HostMM"])
def test_both_address_spaces_implement_the_whole_interface(make):
    mm = make(PhysicalMemory(4096))          # an abstract method left out would raise TypeError here
    assert isinstance(mm, AddressSpace)
    fields = vars(mm)
    for name in ("locked_vm", "pinned_vm", "dead", "mm_count", "iommu_group_mem_list"):
        assert name in fields, name
    assert mm.mm_count == 1 and mm.iommu_group_mem_list == []
    assert mm.count_mlocked_pages(0, 1 << 20) == 0


def test_mmgrab_keeps_the_mm_until_the_last_reference_goes():
    phys = PhysicalMemory(4096)
    mm = MM(phys)
    addr = mm.mmap(1 << 16, 3)
    res = mm.pin_range(addr, 4, True)
    from vfiosim.kernel.iommu.prereg import MmIommuMem
    mm.iommu_group_mem_list.append(MmIommuMem(addr, 4, 12, res.hpas.copy(), res.compound_shifts.copy()))
    mm.mmgrab()                      # a container
    mm.teardown()
    mm.mmdrop()                      # the task's own reference (exit)
    assert phys.pinned_pages() == 4 and mm.iommu_group_mem_list
    mm.mmdrop()                      # the container's: destroy_context() unpins what is still registered
    assert phys.pinned_pages() == 0 and mm.iommu_group_mem_list == []


@pytest.mark.parametrize("preset", ["powernv", "pseries"])
def test_every_platform_table_ops_is_a_complete_table_ops(preset):
    m = vfiosim.Machine.preset(preset)
    for pe in m.kernel.pes:
        for tbl in pe.table_group.tables:
            if tbl is not None:
                assert isinstance(tbl.it_ops, TableOps)
                assert tbl.it_ops.missing_levels(tbl, False, tbl.it_offset, 1) is not None


@pytest.mark.parametrize("preset", ["powernv", "pseries", "x86"])
def test_each_platform_lists_its_live_mappings(preset):
    """Platform.mappings(): one entry per IOMMU page mapped now, each at a pinned page
    (what the fuzzer's invariant checks), and none once unmapped."""
    import ctypes

    from vfiosim import uapi
    from vfioutil import dma_map, dma_unmap
    m = vfiosim.Machine.preset(preset)
    p = m.spawn()
    gid = next(gid for gid in m.iommu_groups() if f"/dev/vfio/{gid}" in m.kernel.dev_nodes)
    c = p.open("/dev/vfio/vfio", os.O_RDWR)
    g = p.open(f"/dev/vfio/{gid}", os.O_RDWR)
    p.ioctl(g, uapi.VFIO_GROUP_SET_CONTAINER, ctypes.c_int32(c))
    if preset == "x86":
        p.ioctl(c, uapi.VFIO_SET_IOMMU, uapi.VFIO_TYPE1v2_IOMMU)
    else:
        p.ioctl(c, uapi.VFIO_SET_IOMMU, uapi.VFIO_SPAPR_TCE_IOMMU)
        p.ioctl(c, uapi.VFIO_IOMMU_ENABLE)
    assert list(m.kernel.platform.mappings()) == []
    buf = p.mmap(16 * 4096)
    dma_map(p, c, buf, 0x100000, 16 * 4096)
    live = list(m.kernel.platform.mappings())
    assert sorted(mp.iova for mp in live) == [0x100000 + i * 4096 for i in range(16)]
    for mp in live:
        obj, off = m.kernel.phys.lookup(mp.hpa)
        assert obj.pincount[off >> obj.page_shift] == 1 and mp.length == 4096
    assert len(list(m.kernel.platform.mappings(limit=3))) == 3
    dma_unmap(p, c, 0x100000, 16 * 4096)
    assert list(m.kernel.platform.mappings()) == []
    p.exit()
