"""sPAPR TCE v2 (VFIO_SPAPR_TCE_v2_IOMMU): preregistered memory and dynamic DMA windows.

Sources: drivers/vfio/vfio_iommu_spapr_tce.c (tce_iommu_register_pages,
tce_iommu_unregister_pages, tce_iommu_build_v2, tce_iommu_create_window,
tce_iommu_remove_window), arch/powerpc/mm/book3s64/iommu_api.c
(mm_iommu_do_alloc, mm_iommu_put), arch/powerpc/platforms/powernv/pci-ioda.c
(pnv_pci_ioda2_get_table_size, pnv_pci_ioda2_create_table) and
pci-ioda-tce.c (pnv_pci_ioda2_table_alloc_pages).
"""

from __future__ import annotations

import ctypes
import errno

import pytest

import vfiosim
from vfiosim import uapi
from vfioutil import dma_map, dma_unmap, edu_dma, enable_bus_master, get_info, open_device, setup_v1

KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30
V2 = uapi.VFIO_SPAPR_TCE_v2_IOMMU
WIN1 = 1 << 59


def err(excinfo) -> str:
    return errno.errorcode[excinfo.value.errno]


def register(p, c, vaddr, size, unregister=False, argsz=24, flags=0):
    s = uapi.vfio_iommu_spapr_register_memory(argsz=argsz, flags=flags, vaddr=vaddr, size=size)
    cmd = uapi.VFIO_IOMMU_SPAPR_UNREGISTER_MEMORY if unregister else uapi.VFIO_IOMMU_SPAPR_REGISTER_MEMORY
    return p.ioctl(c, cmd, s)


def create(p, c, page_shift, window_size, levels=1):
    s = uapi.vfio_iommu_spapr_tce_create(argsz=40, page_shift=page_shift, window_size=window_size, levels=levels,
                                         start_addr=0xDEADBEEF)
    p.ioctl(c, uapi.VFIO_IOMMU_SPAPR_TCE_CREATE, s)
    return s.start_addr


def remove(p, c, start_addr):
    return p.ioctl(c, uapi.VFIO_IOMMU_SPAPR_TCE_REMOVE, uapi.vfio_iommu_spapr_tce_remove(argsz=16, start_addr=start_addr))


def vmlck(p) -> int:
    return p.status()["VmLck"]


@pytest.fixture(params=["powernv", "pseries"])
def v2(request):
    m = vfiosim.Machine.preset(request.param)
    p = m.spawn()
    gid = next(iter(m.iommu_groups()))
    c, g = setup_v1(p, gid, iommu=V2, enable=False)
    buf = p.mmap(64 * MiB)
    p.write_memory(buf, b"\x5a" * 64 * MiB)
    return m, p, c, g, buf


# -- GET_INFO and the v1-only ioctls ----------------------------------------------------------

def test_get_info_reports_ddw_on_powernv(powernv):
    p = powernv.spawn()
    c, _ = setup_v1(p, iommu=V2, enable=False)
    info = get_info(p, c)
    assert info.flags == uapi.VFIO_IOMMU_SPAPR_INFO_DDW
    assert (info.ddw.pgsizes, info.ddw.max_dynamic_windows_supported, info.ddw.levels) == (0x40211000, 2, 5)
    for cmd in (uapi.VFIO_IOMMU_ENABLE, uapi.VFIO_IOMMU_DISABLE):
        with pytest.raises(OSError) as e:
            p.ioctl(c, cmd)
        assert err(e) == "ENOTTY"


# -- preregistration ------------------------------------------------------------------------------

def test_register_charges_locked_memory_and_enables_mapping(v2):
    m, p, c, g, buf = v2
    with pytest.raises(OSError) as e:
        dma_map(p, c, buf, 0, 4096)
    assert err(e) == "EPERM"                             # nothing registered yet
    with pytest.raises(OSError) as e:
        register(p, c, buf, 16 * MiB, unregister=True)
    assert err(e) == "EPERM"                             # the container has no mm yet
    assert register(p, c, buf, 16 * MiB) == 0
    assert vmlck(p) == 16 * MiB // KiB
    assert m.pinned_pages() == 16 * MiB // m.page_size
    assert dma_map(p, c, buf, 0, 4096) == 0
    assert vmlck(p) == 16 * MiB // KiB + m.kernel.pes[0].table_group.get_table_size(12, m.kernel.pes[0].table_group.tce32_size, 1) // KiB


def test_register_checks(v2):
    m, p, c, g, buf = v2
    ro = p.mmap(MiB, vfiosim.PROT_READ)
    hole = p.mmap(MiB)
    p.munmap(hole, MiB)
    register(p, c, buf, 16 * MiB)
    cases = [(dict(argsz=23), "EINVAL"), (dict(flags=1), "EINVAL"), (dict(vaddr=buf + 1), "EINVAL"),
             (dict(size=16 * MiB + 1), "EINVAL"), (dict(size=0), "ENOMEM"), (dict(vaddr=hole, size=64 * KiB), "EFAULT"),
             (dict(vaddr=ro, size=64 * KiB), "EFAULT"), (dict(vaddr=buf + MiB), "EINVAL"),   # overlap
             (dict(vaddr=(1 << 64) - 4096, size=8192), "EINVAL"), (dict(), "EBUSY")]           # same again
    for kw, expected in cases:
        a = dict(vaddr=buf, size=16 * MiB, argsz=24, flags=0) | kw
        with pytest.raises(OSError) as e:
            register(p, c, a["vaddr"], a["size"], argsz=a["argsz"], flags=a["flags"])
        assert err(e) == expected, kw
    assert vmlck(p) == 16 * MiB // KiB                  # every failure undid its charge
    assert register(p, c, buf + 16 * MiB, MiB) == 0     # adjacent is fine
    assert m.pinned_pages() == 17 * MiB // m.page_size


def test_register_over_the_rlimit_is_enomem_for_users(pseries):
    p = pseries.spawn(uid=0, rlimit_memlock=(MiB, MiB))
    c, _ = setup_v1(p, iommu=V2, enable=False)
    p.setuid(1000)
    buf = p.mmap(2 * MiB)
    with pytest.raises(OSError) as e:
        register(p, c, buf, 2 * MiB)
    assert err(e) == "ENOMEM" and "RLIMIT_MEMLOCK" in e.value.strerror
    assert vmlck(p) == 0 and pseries.pinned_pages() == 0
    assert register(p, c, buf, MiB) == 0                 # exactly the limit is allowed


def test_regions_belong_to_the_mm_and_are_shared_by_containers(powernv):
    p = powernv.spawn()
    c0, _ = setup_v1(p, 0, iommu=V2, enable=False)
    c1, _ = setup_v1(p, 1, iommu=V2, enable=False)
    buf = p.mmap(MiB)
    register(p, c0, buf, MiB)
    assert register(p, c1, buf, MiB) == 0               # the same region, one more user
    assert vmlck(p) == MiB // KiB                       # charged once
    with pytest.raises(OSError) as e:
        register(p, c1, buf, 64 * KiB)                  # overlaps in the mm, whichever container
    assert err(e) == "EINVAL"
    register(p, c0, buf, MiB, unregister=True)
    assert vmlck(p) == MiB // KiB                       # c1 still holds it
    register(p, c1, buf, MiB, unregister=True)
    assert vmlck(p) == 0 and powernv.pinned_pages() == 0


def test_unregister_needs_the_exact_region(v2):
    m, p, c, g, buf = v2
    register(p, c, buf, 16 * MiB)
    for vaddr, size in [(buf, MiB), (buf + MiB, 15 * MiB), (buf + 32 * MiB, MiB)]:
        with pytest.raises(OSError) as e:
            register(p, c, vaddr, size, unregister=True)
        assert err(e) == "ENOENT"
    assert register(p, c, buf, 16 * MiB, unregister=True) == 0
    assert vmlck(p) == 0


def test_unregister_while_mapped_returns_0_and_leaks_like_upstream(v2):
    m, p, c, g, buf = v2
    register(p, c, buf, 16 * MiB)
    dma_map(p, c, buf, 0x100000, MiB)
    locked = vmlck(p)
    assert register(p, c, buf, 16 * MiB, unregister=True) == 0
    assert vmlck(p) == locked                            # nothing refunded
    assert any("while TCEs map it" in line for line in m.dmesg())
    with pytest.raises(OSError) as e:
        register(p, c, buf, 16 * MiB, unregister=True)   # the container forgot it
    assert err(e) == "ENOENT"
    assert dma_map(p, c, buf + MiB, 0x400000, MiB) == 0  # still usable for MAP
    with pytest.raises(OSError) as e:
        register(p, c, buf + MiB, MiB)                   # and still blocks overlapping regions
    assert err(e) == "EINVAL"


# -- MAP_DMA over preregistered memory -----------------------------------------------------------------

def test_map_needs_the_page_inside_one_region(v2):
    m, p, c, g, buf = v2
    register(p, c, buf + 0x10000, 16 * MiB)
    with pytest.raises(OSError) as e:
        dma_map(p, c, buf, 0, 4096)                      # below the region
    assert err(e) == "EINVAL"
    with pytest.raises(OSError) as e:
        dma_map(p, c, buf + 0x10000 + 16 * MiB - 4096, 0, 8192)   # runs off its end
    assert err(e) == "EINVAL"
    pinned = m.pinned_pages()
    assert dma_map(p, c, buf + 0x10000, 0, MiB) == 0
    assert m.pinned_pages() == pinned                   # v2 maps pin nothing more
    assert dma_unmap(p, c, 0, MiB) == 0


def test_edu_dma_through_a_v2_window(v2):
    m, p, c, g, buf = v2
    gid, bdfs = next(iter(m.iommu_groups().items()))
    register(p, c, buf, 16 * MiB)
    data = bytes(range(256)) * 16
    p.write_memory(buf, data)
    dma_map(p, c, buf, 0x10000, 0x10000)
    d = open_device(p, g, bdfs[0])
    enable_bus_master(p, d)
    edu_dma(p, d, 0x10000, 0x40000, 4096, to_ram=False)
    edu_dma(p, d, 0x40000, 0x18000, 4096, to_ram=True)
    assert p.read_memory(buf + 0x8000, 4096) == data


# -- dynamic windows ----------------------------------------------------------------------------------

def test_powernv_window_sizes_levels_and_their_cost(powernv):
    p = powernv.spawn()
    c, _ = setup_v1(p, iommu=V2, enable=False)
    p.ioctl(c, uapi.VFIO_IOMMU_SPAPR_TCE_REMOVE, uapi.vfio_iommu_spapr_tce_remove(argsz=16, start_addr=0))
    base = vmlck(p)
    # 4 GiB of 64 KiB pages, one level: 512 KiB of TCEs, twice (the userspace copy).
    assert create(p, c, 16, 4 * GiB, 1) == 0            # window 0 is free: it starts at tce32_start
    assert vmlck(p) == base + 1024
    # Two levels: one 512 KiB level plus one 4 KiB level, twice.
    assert create(p, c, 16, 4 * GiB, 2) == WIN1
    assert vmlck(p) == base + 1024 + 1032
    with pytest.raises(OSError) as e:
        create(p, c, 12, GiB, 1)                        # a third window
    assert err(e) == "ENOSPC"
    remove(p, c, WIN1)
    for shift in (0, 13, 24):                           # not in 4K|64K|2M|1G
        with pytest.raises(OSError) as e:
            create(p, c, shift, 4 * GiB, 1)
        assert err(e) == "EINVAL"
    for levels, size in [(0, 4 * GiB), (6, 4 * GiB), (1, 3 * GiB), (1, 4096)]:
        with pytest.raises(OSError) as e:
            create(p, c, 16, size, levels)
        assert err(e) == "EINVAL"
    assert vmlck(p) == base + 1024                     # none of those was charged


def test_powernv_too_big_one_level_table_leaks_its_charge(powernv):
    """A 1 TiB window of 64 KiB pages needs 128 MiB of TCEs: more than the
    16 MiB a level may be.  The charge (both copies) is not refunded."""
    p = powernv.spawn()
    c, _ = setup_v1(p, iommu=V2, enable=False)
    before = vmlck(p)
    with pytest.raises(OSError) as e:
        create(p, c, 16, 1 << 40, 1)
    assert err(e) == "ENOMEM"
    assert vmlck(p) == before + 256 * 1024 + 8192       # the table (x2) and the default window (x2)
    assert any("Linux does not refund" in line for line in powernv.dmesg())
    assert create(p, c, 16, 1 << 40, 3) == WIN1         # with more levels it fits


def test_window_removal(v2):
    m, p, c, g, buf = v2
    register(p, c, buf, 16 * MiB)
    dma_map(p, c, buf, 0x100000, MiB)                   # creates the default window
    pinned_before = vmlck(p)
    assert remove(p, c, 0x1234000) == 0                 # any address inside the window
    assert vmlck(p) < pinned_before
    with pytest.raises(OSError) as e:
        remove(p, c, 0)
    assert err(e) == "EINVAL"
    with pytest.raises(OSError) as e:
        dma_map(p, c, buf, 0, 4096)
    assert err(e) == "ENXIO"
    assert register(p, c, buf, 16 * MiB, unregister=True) == 0   # the TCEs went with the window


def test_removing_the_pending_default_window_just_cancels_it(powernv):
    p = powernv.spawn()
    c, _ = setup_v1(p, iommu=V2, enable=False)
    assert remove(p, c, 0) == 0
    assert vmlck(p) == 0
    buf = p.mmap(MiB)
    register(p, c, buf, MiB)
    with pytest.raises(OSError) as e:
        dma_map(p, c, buf, 0, 4096)
    assert err(e) == "ENXIO"                            # no default window any more


def test_map_past_a_v2_window_end_is_refused_not_an_oops(v2):
    m, p, c, g, buf = v2
    register(p, c, buf, 16 * MiB)
    start = create(p, c, 16, 1 << 24) if m.platform == "powernv" else None
    win_end = m.kernel.pes[0].table_group.tce32_size
    dma_map(p, c, buf, win_end - 4096, 4096)
    with pytest.raises(OSError) as e:
        dma_map(p, c, buf + 4096, win_end - 4096, 8192)
    assert err(e) == "EINVAL"
    line = next(line for line in m.dmesg() if "(v2)" in line and "runs past the end" in line)
    assert ("oops" in line) == (m.platform == "pseries")
    assert start in (None, WIN1)


# -- several groups in one v2 container -------------------------------------------------------------

def test_powernv_groups_share_the_container_windows(powernv):
    p = powernv.spawn()
    c = p.open("/dev/vfio/vfio")
    g0, g1 = p.open("/dev/vfio/0"), p.open("/dev/vfio/1")
    p.ioctl(g0, uapi.VFIO_GROUP_SET_CONTAINER, ctypes.c_int32(c))
    p.ioctl(c, uapi.VFIO_SET_IOMMU, V2)
    buf = p.mmap(MiB)
    register(p, c, buf, MiB)
    dma_map(p, c, buf, 0x10000, 0x10000)
    p.ioctl(g1, uapi.VFIO_GROUP_SET_CONTAINER, ctypes.c_int32(c))   # joins: gets the existing window
    pe0, pe1 = powernv.pe_of("0000:01:00.0"), powernv.pe_of("0001:01:00.0")
    assert pe0.tve[0] is pe1.tve[0] is not None
    assert create(p, c, 16, 4 * GiB) == WIN1
    assert pe0.tve[1] is pe1.tve[1] is not None
    # A DMA from the second device reads what the first group mapped.
    d1 = open_device(p, g1, "0001:01:00.0")
    enable_bus_master(p, d1)
    p.write_memory(buf, b"shared window!")
    edu_dma(p, d1, 0x10000, 0x40000, 14, to_ram=False)
    edu_dma(p, d1, 0x40000, 0x18000, 14, to_ram=True)
    assert p.read_memory(buf + 0x8000, 14) == b"shared window!"
    p.close(d1)
    # A group leaving clears every TCE of the shared windows (tce_iommu_release_ownership).
    p.ioctl(g1, uapi.VFIO_GROUP_UNSET_CONTAINER)
    assert pe0.tve[0].mapped_count() == 0 and pe1.tve[0] is None or pe1.tve[0].it_userspace is None
    assert register(p, c, buf, MiB, unregister=True) == 0


def test_v1_refuses_a_second_group_but_v2_takes_it(powernv):
    p = powernv.spawn()
    c = p.open("/dev/vfio/vfio")
    g0, g1 = p.open("/dev/vfio/0"), p.open("/dev/vfio/1")
    p.ioctl(g0, uapi.VFIO_GROUP_SET_CONTAINER, ctypes.c_int32(c))
    p.ioctl(g1, uapi.VFIO_GROUP_SET_CONTAINER, ctypes.c_int32(c))
    assert p.ioctl(c, uapi.VFIO_SET_IOMMU, V2) == 0


def test_pseries_second_group_breaks_window_creation(pseries):
    """pseries 6.12: set_window accepts only the PE's own table, so with two
    groups the lazily created default window fails with EPERM (trace multi-v2)."""
    p = pseries.spawn()
    c = p.open("/dev/vfio/vfio")
    g0, g1 = p.open("/dev/vfio/0"), p.open("/dev/vfio/1")
    for g in (g0, g1):
        p.ioctl(g, uapi.VFIO_GROUP_SET_CONTAINER, ctypes.c_int32(c))
    p.ioctl(c, uapi.VFIO_SET_IOMMU, V2)
    buf = p.mmap(MiB)
    register(p, c, buf, MiB)
    with pytest.raises(OSError) as e:
        dma_map(p, c, buf, 0, 4096)
    assert err(e) == "EPERM"
    with pytest.raises(OSError) as e:
        create(p, c, 16, 4 * GiB)
    assert err(e) == "EPERM"
    p.ioctl(g1, uapi.VFIO_GROUP_UNSET_CONTAINER)
    assert dma_map(p, c, buf, 0, 4096) == 0
    with pytest.raises(OSError) as e:                   # with windows now, the group cannot rejoin
        p.ioctl(g1, uapi.VFIO_GROUP_SET_CONTAINER, ctypes.c_int32(c))
    assert err(e) == "EPERM"


def test_exit_returns_every_charge(v2):
    m, p, c, g, buf = v2
    register(p, c, buf, 16 * MiB)
    create(p, c, 16, 4 * GiB)
    dma_map(p, c, buf, 0x100000, MiB)
    p.exit()
    assert p.mm.locked_vm == 0 and m.pinned_pages() == 0


# -- the 64 KiB-page kernel ----------------------------------------------------------------------------

def test_64k_kernel_prereg_rules():
    """PAGE_SIZE alignment is 64 KiB; the 4 KiB-aligned registration that works
    on a 4 KiB kernel is EINVAL; registering the same region again through the
    same container is EBUSY; an adjacent region is fine."""
    m = vfiosim.Machine.preset("pseries", page_size=65536)
    p = m.spawn()
    c, g = setup_v1(p, iommu=V2, enable=False)
    buf = p.mmap(64 * MiB)
    with pytest.raises(OSError) as e:
        register(p, c, buf + 0x1000, 16 * MiB)
    assert err(e) == "EINVAL"
    assert register(p, c, buf, 16 * MiB) == 0
    assert vmlck(p) == 16 * MiB // KiB
    with pytest.raises(OSError) as e:
        register(p, c, buf, 16 * MiB)
    assert err(e) == "EBUSY"
    assert register(p, c, buf + 16 * MiB, MiB) == 0


def test_64k_kernel_maps_64k_iommu_pages_but_not_16m():
    m = vfiosim.Machine.preset("pseries", page_size=65536)
    p = m.spawn()
    c, g = setup_v1(p, iommu=V2, enable=False)
    buf = p.mmap(64 * MiB)
    register(p, c, buf, 32 * MiB)
    base = vmlck(p)
    assert create(p, c, 16, 4 * GiB) == WIN1
    assert vmlck(p) == base + 2048 + 512                # the default window (2 MiB) and 512 KiB of TCEs
    assert dma_map(p, c, buf, WIN1, MiB) == 0           # 64 KiB IOMMU pages over 64 KiB pages
    remove(p, c, WIN1)
    before = vmlck(p)
    assert create(p, c, 24, 16 * GiB) == WIN1
    assert vmlck(p) == before                           # 8 KiB of TCEs: less than a page, accounts 0
    with pytest.raises(OSError) as e:
        dma_map(p, c, buf, WIN1, 16 * MiB)              # 16 MiB IOMMU pages need 16 MiB pages
    assert err(e) == "EINVAL"


def test_4k_kernel_cannot_back_64k_iommu_pages_without_huge_pages(pseries):
    p = pseries.spawn()
    c, g = setup_v1(p, iommu=V2, enable=False)
    buf = p.mmap(32 * MiB)
    register(p, c, buf, 16 * MiB)
    create(p, c, 16, 4 * GiB)
    with pytest.raises(OSError) as e:
        dma_map(p, c, buf, WIN1, 64 * KiB)
    assert err(e) == "EINVAL"
    huge = p.mmap(32 * MiB, page_size=16 * MiB)          # hugetlb-backed memory
    register(p, c, huge, 32 * MiB)
    assert dma_map(p, c, huge, WIN1, 64 * KiB) == 0
