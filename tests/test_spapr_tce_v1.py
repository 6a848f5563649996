"""The sPAPR TCE IOMMU driver, v1 (VFIO_SPAPR_TCE_IOMMU), modern kernel.

Each test names the upstream function whose behaviour it checks
(drivers/vfio/vfio_iommu_spapr_tce.c unless said otherwise).
"""

from __future__ import annotations

import ctypes
import errno

import pytest

import vfiosim
from vfiosim import uapi
from vfioutil import dma_map, dma_unmap, get_info, open_device, setup_v1

MiB = 1 << 20
GiB = 1 << 30


def err(excinfo) -> str:
    return errno.errorcode[excinfo.value.errno]


def tce(m, group_id, iova):
    """The TCE a PE holds for a bus address (0 when unmapped)."""
    pe = next(pe for pe in m.kernel.pes if pe.iommu_group.id == group_id)
    found = pe.lookup_tces(iova, 1)
    return None if not isinstance(found, tuple) else int(found[0][0])


# -- GET_INFO (tce_iommu_ioctl) ---------------------------------------------------------------

def test_get_info_powernv_window_and_no_ddw_for_v1(powernv):
    p = powernv.spawn()
    c, _ = setup_v1(p, enable=False)
    info = get_info(p, c)
    assert (info.dma32_window_start, info.dma32_window_size, info.flags) == (0, 2 * GiB, 0)
    assert (info.ddw.pgsizes, info.ddw.max_dynamic_windows_supported, info.ddw.levels) == (0, 0, 0)


def test_get_info_copies_16_bytes_when_argsz_is_below_32(powernv):
    p = powernv.spawn()
    c, _ = setup_v1(p, enable=False)
    s = uapi.vfio_iommu_spapr_tce_info()
    ctypes.memset(ctypes.addressof(s), 0xA5, ctypes.sizeof(s))
    s.argsz = 24
    p.ioctl(c, uapi.VFIO_IOMMU_SPAPR_TCE_GET_INFO, s)
    assert s.dma32_window_size == 2 * GiB and s.ddw.levels == 0xA5A5A5A5
    s.argsz = 15
    with pytest.raises(OSError) as e:
        p.ioctl(c, uapi.VFIO_IOMMU_SPAPR_TCE_GET_INFO, s)
    assert err(e) == "EINVAL"


# -- ENABLE / DISABLE (tce_iommu_enable, tce_iommu_disable, account_locked_vm) -----------------

def test_enable_charges_the_window_and_disable_refunds(pseries):
    p = pseries.spawn()
    c, _ = setup_v1(p, enable=False)
    assert p.ioctl(c, uapi.VFIO_IOMMU_ENABLE) == 0
    assert p.status()["VmLck"] == GiB // 1024
    with pytest.raises(OSError) as e:
        p.ioctl(c, uapi.VFIO_IOMMU_ENABLE)
    assert err(e) == "EBUSY"
    assert p.ioctl(c, uapi.VFIO_IOMMU_DISABLE) == 0
    assert p.ioctl(c, uapi.VFIO_IOMMU_DISABLE) == 0
    assert p.status()["VmLck"] == 0


@pytest.mark.parametrize("limit, ok", [(64 << 10, False), (GiB - (64 << 10), False), (GiB, True)])
def test_enable_rlimit_is_inclusive_without_cap_ipc_lock(pseries, limit, ok):
    p = pseries.spawn(uid=0, rlimit_memlock=(limit, limit))
    c, _ = setup_v1(p, enable=False)
    p.setuid(65534)                                          # drops CAP_IPC_LOCK
    if ok:
        assert p.ioctl(c, uapi.VFIO_IOMMU_ENABLE) == 0
    else:
        with pytest.raises(OSError) as e:
            p.ioctl(c, uapi.VFIO_IOMMU_ENABLE)
        assert err(e) == "ENOMEM"
        assert "RLIMIT_MEMLOCK" in e.value.strerror
        assert p.status()["VmLck"] == 0


def test_root_bypasses_the_rlimit_with_cap_ipc_lock(pseries):
    p = pseries.spawn(uid=0, rlimit_memlock=(64 << 10, 64 << 10))
    c, _ = setup_v1(p)
    assert p.status()["VmLck"] == GiB // 1024


def test_first_map_also_charges_the_default_window_table(pseries):
    """tce_iommu_create_default_window(): 1 GiB / 4 KiB x 8 bytes = 2 MiB more,
    so a user whose limit is exactly the window can ENABLE but not MAP."""
    p = pseries.spawn(uid=0, rlimit_memlock=(GiB, GiB))
    c, _ = setup_v1(p, enable=False)
    p.setuid(65534)
    p.ioctl(c, uapi.VFIO_IOMMU_ENABLE)
    buf = p.mmap(MiB)
    with pytest.raises(OSError) as e:
        dma_map(p, c, buf, 0, 4096)
    assert err(e) == "ENOMEM"
    assert p.status()["VmLck"] == GiB // 1024


def test_powernv_default_table_costs_both_copies(powernv):
    """pnv_pci_ioda2_get_table_size(): 2 GiB of 4 KiB TCEs is 4 MiB, plus the userspace copy."""
    p = powernv.spawn()
    c, _ = setup_v1(p)
    buf = p.mmap(MiB)
    dma_map(p, c, buf, 0, MiB)
    assert p.status()["VmLck"] == 2 * GiB // 1024 + 8 * 1024


# -- MAP_DMA (tce_iommu_ioctl, tce_iommu_build, iommu_tce_put_param_check) ---------------------------

@pytest.fixture(params=["powernv", "pseries"])
def enabled(request):
    m = vfiosim.Machine.preset(request.param)
    p = m.spawn()
    c, g = setup_v1(p)
    buf = p.mmap(16 * MiB)
    p.write_memory(buf, b"\x5a" * 16 * MiB)
    return m, p, c, buf


def test_map_before_enable_is_eperm(powernv):
    p = powernv.spawn()
    c, _ = setup_v1(p, enable=False)
    buf = p.mmap(MiB)
    with pytest.raises(OSError) as e:
        dma_map(p, c, buf, 0, 4096)
    assert err(e) == "EPERM"
    with pytest.raises(OSError) as e:
        dma_unmap(p, c, 0, 4096)
    assert err(e) == "EPERM"


def test_map_checks_in_kernel_order(enabled):
    m, p, c, buf = enabled
    cases = [
        (dict(argsz=31), "EINVAL"),                       # argsz < minsz
        (dict(flags=7), "EINVAL"),                        # VADDR is a Type1 flag
        (dict(iova=4 * GiB), "ENXIO"),                    # in no window
        (dict(vaddr=buf + 1), "EINVAL"),                  # vaddr not IOMMU-page aligned
        (dict(size=4097), "EINVAL"),
        (dict(flags=0), "EINVAL"),                        # neither READ nor WRITE
    ]
    for overrides, expected in cases:
        kw = dict(vaddr=buf, iova=MiB, size=4096, flags=3, argsz=32) | overrides
        with pytest.raises(OSError) as e:
            dma_map(p, c, kw["vaddr"], kw["iova"], kw["size"], kw["flags"], kw["argsz"])
        assert err(e) == expected, overrides
    assert m.pinned_pages() == 0


def test_map_of_a_misaligned_iova_returns_1_and_maps_nothing(enabled):
    m, p, c, buf = enabled
    assert dma_map(p, c, buf, MiB + 1, 4096) == 1
    assert dma_unmap(p, c, MiB + 1, 4096) == 1
    assert m.pinned_pages() == 0


def test_map_pins_each_page_and_unmap_releases(enabled):
    m, p, c, buf = enabled
    assert dma_map(p, c, buf, 0, MiB) == 0
    assert m.pinned_pages() == MiB // 4096 * (4096 // m.page_size or 1)
    assert tce(m, 0, 0) & 3 == 3
    assert dma_unmap(p, c, 0, MiB) == 0
    assert m.pinned_pages() == 0 and tce(m, 0, 0) == 0


def test_map_over_an_existing_mapping_replaces_it(enabled):
    m, p, c, buf = enabled
    dma_map(p, c, buf, 0, 4096)
    first = tce(m, 0, 0)
    dma_map(p, c, buf + 0x10000, 0, 4096)
    assert tce(m, 0, 0) != first
    assert m.pinned_pages() == 1                           # the old page lost its pin


def test_read_only_and_write_only_mappings(enabled):
    m, p, c, buf = enabled
    dma_map(p, c, buf, 0, 4096, flags=uapi.VFIO_DMA_MAP_FLAG_READ)
    dma_map(p, c, buf + 4096, 4096, 4096, flags=uapi.VFIO_DMA_MAP_FLAG_WRITE)
    assert tce(m, 0, 0) & 3 == 1
    # PowerNV sets READ with WRITE (pnv_tce_xchg); the hypervisor keeps what it is given.
    assert tce(m, 0, 4096) & 3 == (3 if m.platform == "powernv" else 2)


def test_pinning_failures_are_efault_and_leave_nothing(enabled):
    m, p, c, buf = enabled
    ro = p.mmap(MiB, vfiosim.PROT_READ)
    hole = p.mmap(MiB)
    p.munmap(hole, MiB)
    dma_map(p, c, buf, 0, 4096)
    before = tce(m, 0, 0)
    for vaddr, size, flags in [(ro, 4096, 1), (ro, 4096, 3), (hole, 4096, 3), (buf + 16 * MiB - 4096, 8192, 3)]:
        with pytest.raises(OSError) as e:
            dma_map(p, c, vaddr, 0x100000, size, flags)
        assert err(e) == "EFAULT"
    assert m.pinned_pages() == 1 and tce(m, 0, 0) == before and tce(m, 0, 0x100000) == 0


def test_failed_map_undoes_the_entries_it_wrote(enabled):
    m, p, c, buf = enabled
    dma_map(p, c, buf, 0x200000, 8 * 4096)               # will be overwritten, then undone
    with pytest.raises(OSError):
        dma_map(p, c, buf + 16 * MiB - 4 * 4096, 0x200000, 8 * 4096)   # runs off the buffer
    # tce_iommu_build() clears the 4 entries this call wrote before it failed
    # (their old mappings are gone too); the 4 it never reached keep theirs.
    assert all(tce(m, 0, 0x200000 + i * 4096) == 0 for i in range(4))
    assert all(tce(m, 0, 0x200000 + i * 4096) & 3 == 3 for i in range(4, 8))
    assert m.pinned_pages() == 4 * max(1, 4096 // m.page_size)


def test_map_straddling_the_window_end_on_pseries_is_eintr(pseries):
    """The hypervisor answers H_PARAMETER (-4) past the end; Linux returns it as -EINTR."""
    p = pseries.spawn()
    c, _ = setup_v1(p)
    buf = p.mmap(MiB)
    end = GiB
    dma_map(p, c, buf, end - 8192, 4096)
    with pytest.raises(OSError) as e:
        dma_map(p, c, buf + 4096, end - 4096, 8192)
    assert err(e) == "EINTR"
    assert any("tce_iommu_build failed" in line for line in pseries.dmesg())
    assert pseries.pinned_pages() == 1                      # the earlier mapping stands
    assert dma_unmap(p, c, end - 4096, 8192) == 0           # UNMAP past the end: hcall errors ignored


def test_map_straddling_the_window_end_on_powernv_is_refused(powernv):
    """Upstream would write TCEs past the table here; vfiosim refuses, changes nothing, logs why."""
    p = powernv.spawn()
    c, _ = setup_v1(p)
    buf = p.mmap(MiB)
    end = 2 * GiB
    dma_map(p, c, buf, end - 4096, 4096)
    before = tce(powernv, 0, end - 4096)
    with pytest.raises(OSError) as e:
        dma_map(p, c, buf + 4096, end - 4096, 8192)
    assert err(e) == "EINVAL"
    assert tce(powernv, 0, end - 4096) == before and powernv.pinned_pages() == 1
    assert any("past the end of the window" in line and "deviations" in line for line in powernv.dmesg())
    with pytest.raises(OSError) as e:
        dma_unmap(p, c, end - 4096, 8192)
    assert err(e) == "EINVAL"
    assert powernv.pinned_pages() == 1


def test_powernv_straddle_that_faults_first_is_efault_like_upstream(powernv):
    """If pinning fails before the window end, the kernel never reaches the end: EFAULT."""
    p = powernv.spawn()
    c, _ = setup_v1(p)
    buf = p.mmap(MiB)
    with pytest.raises(OSError) as e:
        dma_map(p, c, buf, MiB, (1 << 64) - 4096)         # size overflows the window by far
    assert err(e) == "EFAULT"
    assert powernv.pinned_pages() == 0


def test_unmap_checks(enabled):
    m, p, c, buf = enabled
    dma_map(p, c, buf, 0x10000, 0x10000)
    for kw, expected in [(dict(argsz=23), "EINVAL"), (dict(flags=1), "EINVAL"), (dict(size=4097), "EINVAL"),
                         (dict(iova=(1 << 64) - 4096), "ENXIO")]:
        args = dict(iova=0x10000, size=4096, flags=0, argsz=24) | kw
        with pytest.raises(OSError) as e:
            dma_unmap(p, c, args["iova"], args["size"], args["flags"], args["argsz"])
        assert err(e) == expected
    assert dma_unmap(p, c, 0x800000, 0x4000) == 0           # never mapped: fine
    assert dma_unmap(p, c, 0x10000, 0) == 0
    s = uapi.vfio_iommu_type1_dma_unmap(argsz=24, iova=0x10000, size=0x4000)
    p.ioctl(c, uapi.VFIO_IOMMU_UNMAP_DMA, s)
    assert s.size == 0x4000                                  # not written back (Type1 would)
    assert m.pinned_pages() == 12


def test_disable_keeps_mappings_and_blocks_new_ones(enabled):
    m, p, c, buf = enabled
    dma_map(p, c, buf, 0, 0x10000)
    p.ioctl(c, uapi.VFIO_IOMMU_DISABLE)
    with pytest.raises(OSError) as e:
        dma_map(p, c, buf, 0x100000, 4096)
    assert err(e) == "EPERM"
    assert m.pinned_pages() == 16
    p.ioctl(c, uapi.VFIO_IOMMU_ENABLE)
    assert dma_unmap(p, c, 0, 0x10000) == 0


def test_detaching_an_enabled_group_releases_everything(powernv):
    """The review point of the seed patch: detach from an enabled container
    must not leave it enabled.  Modern kernels clear the TCEs and, as the last
    group leaves, release the container: VmLck back to 0."""
    p = powernv.spawn()
    c, g = setup_v1(p)
    buf = p.mmap(MiB)
    dma_map(p, c, buf, 0, MiB)
    p.ioctl(g, uapi.VFIO_GROUP_UNSET_CONTAINER)
    assert p.status()["VmLck"] == 0 and powernv.pinned_pages() == 0
    # The PE is the host's again: its default window, with nothing mapped.
    assert powernv.pe_of("0000:01:00.0").tve[0].it_userspace is None and tce(powernv, 0, 0) == 0


def test_windows_return_to_the_host_after_release(powernv):
    p = powernv.spawn()
    c, g = setup_v1(p)
    pe = powernv.pe_of("0000:01:00.0")
    assert pe.tve[0] is None                               # taken from the host at SET_CONTAINER
    dma_map(p, c, p.mmap(MiB), 0, 4096)
    assert pe.tve[0] is not None and pe.tve[0].it_userspace is not None
    p.close(g)
    assert pe.tve[0] is not None and pe.tve[0].it_userspace is None and pe.bypass


def test_eeh_pe_op_on_a_v1_container(powernv):
    p = powernv.spawn()
    c, _ = setup_v1(p)
    op = uapi.vfio_eeh_pe_op(argsz=ctypes.sizeof(uapi.vfio_eeh_pe_op), op=uapi.VFIO_EEH_PE_GET_STATE)
    assert p.ioctl(c, uapi.VFIO_EEH_PE_OP, op) == uapi.VFIO_EEH_PE_STATE_NORMAL
    op.flags = 1
    with pytest.raises(OSError) as e:
        p.ioctl(c, uapi.VFIO_EEH_PE_OP, op)
    assert err(e) == "EINVAL"


def test_v2_only_ioctls_on_a_v1_container_are_enotty(powernv):
    p = powernv.spawn()
    c, _ = setup_v1(p)
    for cmd in (uapi.VFIO_IOMMU_SPAPR_REGISTER_MEMORY, uapi.VFIO_IOMMU_SPAPR_UNREGISTER_MEMORY,
                uapi.VFIO_IOMMU_SPAPR_TCE_CREATE, uapi.VFIO_IOMMU_SPAPR_TCE_REMOVE):
        with pytest.raises(OSError) as e:
            p.ioctl(c, cmd, 0)
        assert err(e) == "ENOTTY"


def test_64k_kernel_pins_one_host_page_per_4k_tce(powernv):
    m = vfiosim.Machine.default(page_size=65536)
    p = m.spawn()
    c, _ = setup_v1(p)
    assert p.status()["VmLck"] == 2 * GiB // 1024           # 2 GiB >> 16 pages of 64 KiB
    buf = p.mmap(0x20000)
    assert buf % 0x10000 == 0
    assert dma_map(p, c, buf + 0x3000, 0x5000, 0x2000) == 0  # 4 KiB IOMMU pages inside 64 KiB pages
    assert m.pinned_pages() == 2                            # the same 64 KiB page, pinned twice
    obj, off = m.kernel.phys.lookup(tce(m, 0, 0x5000) & ~3)
    assert off & 0xFFFF == 0x3000                           # the TCE keeps the offset inside the page
    dma_unmap(p, c, 0x5000, 0x2000)
    assert m.pinned_pages() == 0
