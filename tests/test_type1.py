"""The Type1 IOMMU driver (drivers/vfio/vfio_iommu_type1.c) on the x86 machine (Intel VT-d).

Map and unmap rules, the GET_INFO capability chain, locked-memory
accounting (RLIMIT_MEMLOCK, CAP_IPC_LOCK, mlock'ed and doubly pinned pages),
v1 versus v2 unmapping, UNMAP_ALL, VADDR updates, dirty tracking,
containers with several groups, and the edu device's DMA through the VT-d
page table, including the DMAR faults it logs when refused.
"""

from __future__ import annotations

import ctypes
import errno
import os
import struct
from importlib import resources

import numpy as np
import pytest

import vfiosim
from tracereplay import type1_info_fields
from vfiosim import uapi
from vfiosim.kernel.iommu.type1 import Type1IommuDriver, VfioIommu
from vfiosim.kernel.iommu.iommu import ResvRegion, iommu_probe_device
from vfiosim.kernel.platform.x86 import IntelIommu
from vfioutil import dma_map, edu_dma, enable_bus_master, open_device, reg_read

MiB = 1 << 20
V1, V2 = uapi.VFIO_TYPE1_IOMMU, uapi.VFIO_TYPE1v2_IOMMU
EDU0, EDU1 = "0000:01:00.0", "0000:02:00.0"
X86_TOML = resources.files("vfiosim.presets").joinpath("x86.toml").read_text()


@pytest.fixture
def m():
    return vfiosim.Machine.preset("x86")


def open_container(p, groups=(4,), iommu=V2):
    c = p.open("/dev/vfio/vfio", os.O_RDWR)
    fds = []
    for gid in groups:
        g = p.open(f"/dev/vfio/{gid}", os.O_RDWR)
        p.ioctl(g, uapi.VFIO_GROUP_SET_CONTAINER, ctypes.c_int32(c))
        fds.append(g)
    if iommu is not None:
        p.ioctl(c, uapi.VFIO_SET_IOMMU, iommu)
    return c, fds


def unmap(p, c, iova, size, flags=0):
    s = uapi.vfio_iommu_type1_dma_unmap(argsz=24, flags=flags, iova=iova, size=size)
    p.ioctl(c, uapi.VFIO_IOMMU_UNMAP_DMA, s)
    return s.size


def info(p, c, argsz=4096):
    buf = bytearray(b"\xa5" * max(argsz, 4096))
    struct.pack_into("<II", buf, 0, argsz, 0)
    p.ioctl(c, uapi.VFIO_IOMMU_GET_INFO, buf)
    return type1_info_fields(buf)


def caps(p, c):
    return {cap["name"]: cap for cap in info(p, c)["caps"]}


def errno_of(fn, *args, **kwargs) -> int:
    with pytest.raises(OSError) as exc:
        fn(*args, **kwargs)
    return exc.value.errno


def vmlck(p) -> int:
    return p.status()["VmLck"]


def dirty(p, c, iova, size, flags=uapi.VFIO_IOMMU_DIRTY_PAGES_FLAG_GET_BITMAP, bitmap=None, pgsize=4096,
          bitmap_size=8, argsz=48):
    buf = bytearray(struct.pack("<IIQQQQQ", argsz, flags, iova, size, pgsize, bitmap_size, bitmap or 0))
    return p.ioctl(c, uapi.VFIO_IOMMU_DIRTY_PAGES, buf)


def start_tracking(p, c):
    p.ioctl(c, uapi.VFIO_IOMMU_DIRTY_PAGES, bytearray(struct.pack("<II", 8, uapi.VFIO_IOMMU_DIRTY_PAGES_FLAG_START)))


def bitmap_words(p, addr, n=1):
    return list(struct.unpack(f"<{n}Q", p.read_memory(addr, 8 * n)))


# -- the driver on this machine ---------------------------------------------------------------------


def test_only_type1_is_registered_and_answers_the_extensions(m):
    assert m.kernel.vfio.iommu_drivers.names() == ["vfio-iommu-type1"]
    p = m.spawn()
    c = p.open("/dev/vfio/vfio", os.O_RDWR)
    answers = {ext: p.ioctl(c, uapi.VFIO_CHECK_EXTENSION, ext) for ext in range(12)}
    # No container yet: UPDATE_VADDR and DMA_CC_IOMMU need iommu data.
    assert answers == {0: 0, 1: 1, 2: 0, 3: 1, 4: 0, 5: 0, 6: 1, 7: 0, 8: 0, 9: 1, 10: 0, 11: 0}
    c2, _ = open_container(p)
    assert p.ioctl(c2, uapi.VFIO_CHECK_EXTENSION, uapi.VFIO_UPDATE_VADDR) == 1
    assert p.ioctl(c2, uapi.VFIO_CHECK_EXTENSION, uapi.VFIO_DMA_CC_IOMMU) == 0      # no snoop control
    assert p.ioctl(c2, uapi.VFIO_CHECK_EXTENSION, uapi.VFIO_EEH) == 0
    assert m.topology()["eeh"] is False


@pytest.mark.parametrize("iommu", [uapi.VFIO_SPAPR_TCE_IOMMU, uapi.VFIO_SPAPR_TCE_v2_IOMMU,
                                   uapi.VFIO_NOIOMMU_IOMMU, 99])
def test_other_iommu_types_are_enodev(m, iommu):
    p = m.spawn()
    c, _ = open_container(p, iommu=None)
    assert errno_of(p.ioctl, c, uapi.VFIO_SET_IOMMU, iommu) == errno.ENODEV


def test_nesting_type_is_advertised_but_vtd_cannot_nest(m):
    """6.12 still answers VFIO_TYPE1_NESTING_IOMMU, but iommu_enable_nesting()
    fails on VT-d (only the ARM SMMUs had enable_nesting), so SET_IOMMU is EINVAL."""
    p = m.spawn()
    c, _ = open_container(p, iommu=None)
    assert p.ioctl(c, uapi.VFIO_CHECK_EXTENSION, uapi.VFIO_TYPE1_NESTING_IOMMU) == 1
    assert errno_of(p.ioctl, c, uapi.VFIO_SET_IOMMU, uapi.VFIO_TYPE1_NESTING_IOMMU) == errno.EINVAL
    assert m.iommu_units[0].domains == []                 # the domain it tried was freed
    p.ioctl(c, uapi.VFIO_SET_IOMMU, V2)                   # the container is still usable


def test_snoop_control_makes_dma_cc_iommu_1():
    m = vfiosim.Machine.from_toml(X86_TOML.replace("snoop_control = false", "snoop_control = true"))
    p = m.spawn()
    c, _ = open_container(p)
    assert p.ioctl(c, uapi.VFIO_CHECK_EXTENSION, uapi.VFIO_DMA_CC_IOMMU) == 1


def test_without_interrupt_remapping_set_iommu_is_eperm_unless_allowed():
    text = X86_TOML.replace("interrupt_remapping = true", "interrupt_remapping = false")
    m = vfiosim.Machine.from_toml(text)
    p = m.spawn()
    c, _ = open_container(p, iommu=None)
    assert errno_of(p.ioctl, c, uapi.VFIO_SET_IOMMU, V2) == errno.EPERM
    assert any("No interrupt remapping support" in line for line in m.dmesg())
    m2 = vfiosim.Machine.from_toml(text.replace("allow_unsafe_interrupts = false", "allow_unsafe_interrupts = true"))
    p2 = m2.spawn()
    open_container(p2)


def test_unknown_container_ioctls_are_enotty(m):
    p = m.spawn()
    c, _ = open_container(p)
    assert errno_of(p.ioctl, c, uapi.VFIO_IOMMU_ENABLE) == errno.ENOTTY
    assert errno_of(p.ioctl, c, uapi.VFIO_EEH_PE_OP, bytearray(12)) == errno.ENOTTY


# -- GET_INFO -------------------------------------------------------------------------------------------


def test_get_info_argsz_protocol(m):
    p = m.spawn()
    c, _ = open_container(p)
    assert errno_of(info, p, c, argsz=15) == errno.EINVAL
    short = info(p, c, argsz=16)
    assert (short["argsz"], short["flags"], short["iova_pgsizes"]) == (120, 3, 0x40201000)
    assert short["cap_offset"] == 0xA5A5A5A5                 # beyond argsz: untouched
    no_room = info(p, c, argsz=119)
    assert (no_room["argsz"], no_room["cap_offset"]) == (120, 0)
    assert "caps" not in no_room
    full = info(p, c, argsz=120)
    assert full["argsz"] == 120 and full["cap_offset"] == 24
    assert [(cap["offset"], cap["name"], cap["next"]) for cap in full["caps"]] == \
        [(24, "MIGRATION", 56), (56, "DMA_AVAIL", 72), (72, "IOVA_RANGE", 0)]
    mig, avail, iova = full["caps"]
    assert (mig["pgsize_bitmap"], mig["max_dirty_bitmap_size"]) == (4096, 1 << 28)
    assert avail["avail"] == 65535
    assert iova["ranges"] == [[0, 0xFEDFFFFF], [0xFEF00000, (1 << 39) - 1]]


def test_iova_ranges_follow_the_machine_file():
    text = X86_TOML.replace("address_width = 39", "address_width = 48").replace(
        'reserved_regions = [{ start = 0xfee00000, size = "1M", type = "msi" }]',
        'reserved_regions = [{ start = 0xfee00000, size = "1M", type = "msi" },\n'
        '                    { start = 0x0, size = "64K", type = "direct-relaxable" },\n'
        '                    { start = 0x80000000, size = "2G", type = "reserved" }]')
    m = vfiosim.Machine.from_toml(text)
    p = m.spawn()
    c, _ = open_container(p)
    # DIRECT_RELAXABLE regions stay usable (vfio_iommu_resv_exclude skips them).
    assert caps(p, c)["IOVA_RANGE"]["ranges"] == [[0, 0x7FFFFFFF], [0x100000000, (1 << 48) - 1]]
    buf = p.mmap(MiB)
    assert errno_of(dma_map, p, c, buf, 0x80000000, 4096) == errno.EINVAL
    dma_map(p, c, buf, 0, 4096)


# -- MAP_DMA / UNMAP_DMA --------------------------------------------------------------------------------


def test_map_pins_charges_and_unmap_returns_everything(m):
    p = m.spawn()
    c, _ = open_container(p)
    buf = p.mmap(4 * MiB)
    dma_map(p, c, buf, 0x100000, 4 * MiB)
    assert vmlck(p) == 4096
    assert p.status()["VmPin"] == 0
    assert m.pinned_pages() == 1024
    assert caps(p, c)["DMA_AVAIL"]["avail"] == 65534
    assert unmap(p, c, 0x100000, 4 * MiB) == 4 * MiB
    assert vmlck(p) == 0 and m.pinned_pages() == 0
    assert caps(p, c)["DMA_AVAIL"]["avail"] == 65535


@pytest.mark.parametrize("vaddr_off,iova,size,why", [
    (0x800, 0x100000, 4096, "vaddr not page aligned"),
    (0, 0x100800, 4096, "iova not page aligned"),
    (0, 0x100000, 0x1800, "size not page aligned"),
    (0, 0x100000, 0, "size 0"),
    (0, (1 << 64) - 4096, 8192, "iova wraps"),
    (0, 0xFEE00000, 4096, "the MSI window"),
    (0, 0xFEDFF000, 8192, "straddles the MSI window"),
    (0, 1 << 39, 4096, "past the 39-bit address width"),
])
def test_map_argument_errors_are_einval(m, vaddr_off, iova, size, why):
    p = m.spawn()
    c, _ = open_container(p)
    buf = p.mmap(MiB)
    assert errno_of(dma_map, p, c, buf + vaddr_off, iova, size) == errno.EINVAL, why
    assert vmlck(p) == 0 and m.pinned_pages() == 0


def test_map_flags_and_argsz(m):
    p = m.spawn()
    c, _ = open_container(p)
    buf = p.mmap(MiB)
    assert errno_of(dma_map, p, c, buf, 0, 4096, argsz=31) == errno.EINVAL
    assert errno_of(dma_map, p, c, buf, 0, 4096, flags=0) == errno.EINVAL
    assert errno_of(dma_map, p, c, buf, 0, 4096, flags=8 | 3) == errno.EINVAL
    assert errno_of(dma_map, p, c, buf, 0, 4096, flags=uapi.VFIO_DMA_MAP_FLAG_VADDR | 1) == errno.EINVAL


def test_overlapping_maps_are_eexist(m):
    p = m.spawn()
    c, _ = open_container(p)
    buf = p.mmap(MiB)
    dma_map(p, c, buf, 0x100000, 0x10000)
    for iova, size in ((0x100000, 0x1000), (0xFF000, 0x2000), (0x10F000, 0x2000), (0x0, 0x200000)):
        assert errno_of(dma_map, p, c, buf, iova, size) == errno.EEXIST
    dma_map(p, c, buf, 0x110000, 0x1000)                  # adjacent is fine


def test_unpinnable_memory_is_efault_and_leaves_nothing(m):
    p = m.spawn()
    c, _ = open_container(p)
    ro = p.mmap(MiB, vfiosim.PROT_READ)
    none = p.mmap(MiB, vfiosim.PROT_NONE)
    rw = p.mmap(MiB)
    for vaddr, flags in ((ro, 3), (ro, 2), (none, 1), (rw + MiB, 1), (rw + MiB - 8192, 3)):
        size = 0x4000
        assert errno_of(dma_map, p, c, vaddr, 0x100000, size, flags=flags) == errno.EFAULT
        assert vmlck(p) == 0 and m.pinned_pages() == 0
    # A long-term READ pin of untouched read-only memory gets real pages (no
    # zero page): it succeeds and is charged, as the x86 trace shows.
    dma_map(p, c, ro, 0x100000, 0x4000, flags=1)
    assert vmlck(p) == 16


def test_dma_entry_limit_is_enospc():
    m = vfiosim.Machine.from_toml(X86_TOML.replace("dma_entry_limit = 65535", "dma_entry_limit = 2"))
    p = m.spawn()
    c, _ = open_container(p)
    buf = p.mmap(MiB)
    dma_map(p, c, buf, 0x0, 4096)
    dma_map(p, c, buf + 4096, 0x1000, 4096)
    assert caps(p, c)["DMA_AVAIL"]["avail"] == 0
    assert errno_of(dma_map, p, c, buf + 8192, 0x2000, 4096) == errno.ENOSPC
    # The overlap check comes first (vfio_dma_do_map): EEXIST beats ENOSPC.
    assert errno_of(dma_map, p, c, buf, 0x0, 4096) == errno.EEXIST
    unmap(p, c, 0, 4096)
    dma_map(p, c, buf + 8192, 0x2000, 4096)


def test_unmap_argument_errors(m):
    p = m.spawn()
    c, _ = open_container(p)
    buf = p.mmap(MiB)
    dma_map(p, c, buf, 0x100000, 0x10000)
    for iova, size, flags in ((0x100800, 0x1000, 0), (0x100000, 0x800, 0), (0x100000, 0, 0),
                              ((1 << 64) - 4096, 8192, 0), (0x100000, 0x1000, 8),
                              (0, 4096, uapi.VFIO_DMA_UNMAP_FLAG_ALL),
                              (0, 0, uapi.VFIO_DMA_UNMAP_FLAG_ALL | uapi.VFIO_DMA_UNMAP_FLAG_GET_DIRTY_BITMAP)):
        assert errno_of(unmap, p, c, iova, size, flags) == errno.EINVAL
    s = uapi.vfio_iommu_type1_dma_unmap(argsz=23, iova=0x100000, size=0x10000)
    assert errno_of(p.ioctl, c, uapi.VFIO_IOMMU_UNMAP_DMA, s) == errno.EINVAL
    assert vmlck(p) == 64


# -- v1 versus v2 ----------------------------------------------------------------------------------------


def test_v2_refuses_to_bisect_a_mapping(m):
    p = m.spawn()
    c, _ = open_container(p, iommu=V2)
    buf = p.mmap(MiB)
    dma_map(p, c, buf, 0x100000, 0x10000)
    dma_map(p, c, buf, 0x120000, 0x10000)
    assert errno_of(unmap, p, c, 0x101000, 0x1000) == errno.EINVAL        # inside
    assert errno_of(unmap, p, c, 0x100000, 0x1000) == errno.EINVAL        # head only
    assert errno_of(unmap, p, c, 0x0F0000, 0x11000) == errno.EINVAL       # ends inside
    assert unmap(p, c, 0x200000, 0x10000) == 0                            # nothing there
    assert unmap(p, c, 0x0, 0x200000) == 0x20000                          # both, and the hole
    assert vmlck(p) == 0


def test_v1_unmaps_whole_mappings_by_their_first_page(m):
    """vfio_dma_do_unmap() v1 rules: a range starting inside a mapping unmaps
    nothing (size 0, success); one covering a mapping's first byte unmaps all
    of it, even past the end of the range."""
    p = m.spawn()
    c, _ = open_container(p, iommu=V1)
    buf = p.mmap(MiB)
    dma_map(p, c, buf, 0x100000, 0x10000)
    assert unmap(p, c, 0x101000, 0x1000) == 0
    assert vmlck(p) == 64
    assert unmap(p, c, 0x100000, 0x1000) == 0x10000
    assert vmlck(p) == 0


def test_v1_has_no_dirty_tracking(m):
    p = m.spawn()
    c, _ = open_container(p, iommu=V1)
    assert errno_of(start_tracking, p, c) == errno.EACCES


def test_unmap_all(m):
    p = m.spawn()
    c, _ = open_container(p)
    buf = p.mmap(4 * MiB)
    for i in range(8):
        dma_map(p, c, buf + i * 0x80000, 0x1000000 * i, 0x80000)
    assert vmlck(p) == 4096
    assert unmap(p, c, 0, 0, uapi.VFIO_DMA_UNMAP_FLAG_ALL) == 4 * MiB
    assert vmlck(p) == 0 and m.pinned_pages() == 0
    assert unmap(p, c, 0, 0, uapi.VFIO_DMA_UNMAP_FLAG_ALL) == 0
    assert caps(p, c)["DMA_AVAIL"]["avail"] == 65535


# -- accounting -------------------------------------------------------------------------------------------


def test_rlimit_memlock_bounds_what_a_user_can_map(m):
    p = m.spawn(uid=0, rlimit_memlock=(MiB, MiB))
    c, _ = open_container(p)
    p.setuid(1000)                                       # drops CAP_IPC_LOCK
    buf = p.mmap(4 * MiB)
    dma_map(p, c, buf, 0x0, MiB - 4096)
    assert errno_of(dma_map, p, c, buf + MiB, MiB, 8192) == errno.ENOMEM
    assert any("vfio_pin_pages_remote: RLIMIT_MEMLOCK (1048576) exceeded" in line for line in m.dmesg())
    assert vmlck(p) == 1020 and m.pinned_pages() == 255
    dma_map(p, c, buf + MiB, MiB, 4096)                  # exactly the limit
    assert vmlck(p) == 1024


def test_cap_ipc_lock_maps_past_the_limit(m):
    p = m.spawn(uid=0, rlimit_memlock=(MiB, MiB))
    c, _ = open_container(p)
    buf = p.mmap(8 * MiB)
    dma_map(p, c, buf, 0, 8 * MiB)
    assert vmlck(p) == 8192


def test_efault_comes_before_enomem_when_the_bad_page_is_first(m):
    p = m.spawn(uid=0, rlimit_memlock=(MiB, MiB))
    c, _ = open_container(p)
    p.setuid(1000)
    buf = p.mmap(2 * MiB)
    # Page 256 would cross the limit; page 256 is also the first unmapped one.
    assert errno_of(dma_map, p, c, buf + MiB, 0, 2 * MiB) == errno.EFAULT
    # Crossing the limit at page 256 before the hole at page 300: ENOMEM.
    big = p.mmap(4 * MiB)
    p.munmap(big + 300 * 4096, 4096)
    assert errno_of(dma_map, p, c, big, 0, 2 * MiB) == errno.ENOMEM
    assert vmlck(p) == 0 and m.pinned_pages() == 0


def test_mlocked_pages_are_charged_again(m):
    p = m.spawn()
    c, _ = open_container(p)
    buf = p.mmap(2 * MiB)
    p.mlock(buf, MiB)
    assert vmlck(p) == 1024
    dma_map(p, c, buf, 0, 2 * MiB)
    assert vmlck(p) == 1024 + 2048
    assert any("256 page(s) already mlock'ed" in line and "charged to locked_vm again" in line
               for line in m.dmesg())
    unmap(p, c, 0, 2 * MiB)
    assert vmlck(p) == 1024
    p.munlock(buf, MiB)
    assert vmlck(p) == 0


def test_mlock_and_map_share_one_limit(m):
    p = m.spawn(uid=0, rlimit_memlock=(2 * MiB, 2 * MiB))
    c, _ = open_container(p)
    p.setuid(1000)
    buf = p.mmap(2 * MiB)
    p.mlock(buf, 2 * MiB)
    # The same pages, already locked, do not fit a second time.
    assert errno_of(dma_map, p, c, buf, 0, 4096) == errno.ENOMEM
    p.munlock(buf, MiB)
    dma_map(p, c, buf, 0, MiB)
    assert vmlck(p) == 2048
    # And mlock sees the pinned pages: locking the other half again would exceed.
    assert errno_of(p.mlock, buf, 2 * MiB) == errno.ENOMEM


def test_the_same_memory_mapped_twice_is_charged_twice(m):
    p = m.spawn()
    c, _ = open_container(p)
    buf = p.mmap(MiB)
    dma_map(p, c, buf, 0x0, MiB)
    dma_map(p, c, buf, 0x10000000, MiB)
    assert vmlck(p) == 2048
    assert m.pinned_pages() == 512
    assert any("256 already pinned by another mapping" in line for line in m.dmesg())


def test_exit_unpins_everything(m):
    p = m.spawn()
    c, g = open_container(p, groups=(4, 5))
    buf = p.mmap(4 * MiB)
    dma_map(p, c, buf, 0, 4 * MiB)
    p.munmap(buf, 4 * MiB)                               # the pins keep the pages alive
    assert m.pinned_pages() == 1024
    p.exit()
    assert m.pinned_pages() == 0
    assert m.iommu_units[0].domains == []
    for gid in (4, 5):
        assert m.kernel.iommu_groups[gid].domain.kind == "identity"
    # A new process can take the groups again.
    q = m.spawn()
    c2, _ = open_container(q, groups=(4, 5))


def test_closing_the_group_returns_all_accounting(m):
    p = m.spawn()
    c, (g,) = open_container(p)
    buf = p.mmap(MiB)
    dma_map(p, c, buf, 0, MiB)
    p.close(g)                                           # last group: every mapping goes
    assert vmlck(p) == 0 and m.pinned_pages() == 0
    assert errno_of(info, p, c) == errno.EINVAL          # the container has no IOMMU any more


# -- VADDR updates ---------------------------------------------------------------------------------------


def test_vaddr_invalidate_and_update(m):
    p = m.spawn()
    c, _ = open_container(p)
    old = p.mmap(MiB)
    p.write_memory(old, b"\x11" * 4096)
    dma_map(p, c, old, 0x100000, MiB)
    assert unmap(p, c, 0x100000, MiB, uapi.VFIO_DMA_UNMAP_FLAG_VADDR) == MiB
    assert errno_of(unmap, p, c, 0x100000, MiB, uapi.VFIO_DMA_UNMAP_FLAG_VADDR) == errno.EINVAL
    new = p.mmap(MiB)
    assert errno_of(dma_map, p, c, new, 0x100000, 4096, flags=uapi.VFIO_DMA_MAP_FLAG_VADDR) == errno.EINVAL
    assert errno_of(dma_map, p, c, new, 0x200000, MiB, flags=uapi.VFIO_DMA_MAP_FLAG_VADDR) == errno.ENOENT
    dma_map(p, c, new, 0x100000, MiB, flags=uapi.VFIO_DMA_MAP_FLAG_VADDR)
    assert vmlck(p) == 1024                              # nothing re-pinned or re-charged
    # The IOMMU still points at the pages pinned at map time.
    dev = m.device(EDU0)
    dev.config.data[4] |= 0x4
    assert dev.bus_master.dma_read(0x100000, 16) == b"\x11" * 16


def test_attach_is_ebusy_while_a_vaddr_is_invalid(m):
    p = m.spawn()
    c, _ = open_container(p, groups=(4,))
    buf = p.mmap(MiB)
    dma_map(p, c, buf, 0, MiB)
    unmap(p, c, 0, 0, uapi.VFIO_DMA_UNMAP_FLAG_ALL | uapi.VFIO_DMA_UNMAP_FLAG_VADDR)
    g5 = p.open("/dev/vfio/5", os.O_RDWR)
    assert errno_of(p.ioctl, g5, uapi.VFIO_GROUP_SET_CONTAINER, ctypes.c_int32(c)) == errno.EBUSY
    dma_map(p, c, buf, 0, MiB, flags=uapi.VFIO_DMA_MAP_FLAG_VADDR)
    p.ioctl(g5, uapi.VFIO_GROUP_SET_CONTAINER, ctypes.c_int32(c))


# -- dirty tracking ---------------------------------------------------------------------------------------


def test_dirty_tracking_reports_every_mapped_page_a_device_may_have_written(m):
    """Type1 has no view of what a device wrote (it uses no IOMMU dirty
    tracking): with an IOMMU-backed group, every mapped page is reported
    dirty, written or not (update_user_bitmap)."""
    p = m.spawn()
    c, (g,) = open_container(p)
    buf = p.mmap(MiB)
    bitmap = p.mmap(4096)
    dma_map(p, c, buf, 0x100000, 0x40000)                # 64 pages
    assert errno_of(dirty, p, c, 0x100000, 0x40000, bitmap=bitmap) == errno.EINVAL   # not started
    start_tracking(p, c)
    start_tracking(p, c)                                 # again: fine
    dev = open_device(p, g, EDU0)
    enable_bus_master(p, dev)
    edu_dma(p, dev, 0x40000, 0x100000 + 5 * 4096, 4096, to_ram=True)
    iommu: VfioIommu = m.kernel.vfio.groups[4].container.iommu_data
    (mapping,) = iommu.dmas
    dirty(p, c, 0x100000, 0x40000, bitmap=bitmap)
    # vfio-pci groups cannot limit the dirty scope: every mapped page is reported.
    assert bitmap_words(p, bitmap) == [(1 << 64) - 1]
    assert int(mapping.bitmap[0]) == 0                   # cleared after the report
    p.ioctl(c, uapi.VFIO_IOMMU_DIRTY_PAGES, bytearray(struct.pack("<II", 8, 2)))
    assert mapping.bitmap is None
    assert errno_of(dirty, p, c, 0x100000, 0x40000, bitmap=bitmap) == errno.EINVAL


def test_dirty_bitmap_argument_checks(m):
    p = m.spawn()
    c, _ = open_container(p)
    buf = p.mmap(MiB)
    bitmap = p.mmap(4096)
    dma_map(p, c, buf, 0x100000, 0x10000)
    start_tracking(p, c)
    for kwargs, why in (({"pgsize": 0x10000}, "pgsize not the IOMMU's"), ({"bitmap_size": 1}, "bitmap too small"),
                        ({"argsz": 47}, "argsz too small"), ({"bitmap": (1 << 47)}, "bitmap not in user space")):
        assert errno_of(dirty, p, c, 0x100000, 0x10000, **{"bitmap": bitmap, **kwargs}) == errno.EINVAL, why
    assert errno_of(dirty, p, c, 0x101000, 0x1000, bitmap=bitmap) == errno.EINVAL          # bisects
    assert errno_of(dirty, p, c, 0x100000, 0x10000, bitmap=None) == errno.EFAULT           # NULL
    for flags in (0, 3, 8):
        assert errno_of(p.ioctl, c, uapi.VFIO_IOMMU_DIRTY_PAGES,
                        bytearray(struct.pack("<II", 8, flags))) == errno.EINVAL


def test_unmap_with_dirty_bitmap(m):
    p = m.spawn()
    c, _ = open_container(p)
    buf = p.mmap(MiB)
    bitmap = p.mmap(4096)
    dma_map(p, c, buf, 0x100000, 0x10000)
    start_tracking(p, c)
    s = bytearray(struct.pack("<IIQQQQQ", 48, uapi.VFIO_DMA_UNMAP_FLAG_GET_DIRTY_BITMAP, 0x100000, 0x10000,
                              4096, 8, bitmap))
    p.ioctl(c, uapi.VFIO_IOMMU_UNMAP_DMA, s)
    assert struct.unpack_from("<Q", s, 16)[0] == 0x10000
    assert bitmap_words(p, bitmap) == [0xFFFF]
    assert vmlck(p) == 0


def test_a_map_made_while_tracking_gets_a_bitmap(m):
    p = m.spawn()
    c, _ = open_container(p)
    buf = p.mmap(MiB)
    start_tracking(p, c)
    dma_map(p, c, buf, 0x100000, 0x10000)
    iommu = m.kernel.vfio.groups[4].container.iommu_data
    assert iommu.dmas[0].bitmap is not None and iommu.dmas[0].bitmap.size == 2


# -- several groups -----------------------------------------------------------------------------------------


def test_two_groups_share_one_vtd_domain(m):
    p = m.spawn()
    c, (g4, g5) = open_container(p, groups=(4, 5))
    topo = m.topology()["iommu_units"][0]
    assert [d["groups"] for d in topo["domains"]] == [[4, 5]]
    buf = p.mmap(MiB)
    p.write_memory(buf, b"shared" * 100)
    dma_map(p, c, buf, 0x100000, MiB)
    for g, bdf in ((g4, EDU0), (g5, EDU1)):
        dev = open_device(p, g, bdf)
        enable_bus_master(p, dev)
        edu_dma(p, dev, 0x100000, 0x40000, 600, to_ram=False)
        assert bytes(m.device(bdf).dma_buf[:600]) == b"shared" * 100
        p.close(dev)
    # The first group leaves: the mapping stays for the other one.
    p.close(g4)
    assert vmlck(p) == 1024
    assert m.kernel.iommu_groups[4].domain.kind == "identity"
    assert [d["groups"] for d in m.topology()["iommu_units"][0]["domains"]] == [[5]]
    p.close(g5)
    assert vmlck(p) == 0 and m.pinned_pages() == 0


def test_a_group_on_another_unit_gets_its_own_domain_and_the_mappings_replayed(m):
    """vfio_iommu_type1_attach_group(): a domain that cannot be shared (here a
    second VT-d unit with snoop control, so a different cache coherency) is
    added to the container and vfio_iommu_replay() maps the existing
    mappings into it; DMA_CC_IOMMU is 1 only when every domain enforces it."""
    unit2 = IntelIommu(name="dmar1", model="intel-iommu", aw_bits=48, pgsize_bitmap=0x201000,
                       resv_regions=[ResvRegion(0xFEE00000, MiB, 3)], snoop_control=True,
                       interrupt_remapping=True, caching_mode=True, phys=m.kernel.phys, log_err=m.kernel.log.err)
    m.iommu_units.append(unit2)
    # Move group 5's device behind the second unit, as if the firmware had put it there.
    g5 = m.kernel.iommu_groups[5]
    g5.domain.groups.remove(g5)
    g5.devices.clear()
    g5.default_domain = g5.blocking_domain = g5.domain = None
    iommu_probe_device(m.device(EDU1), unit2)
    g5.add_device(m.device(EDU1))
    p = m.spawn()
    c, (fd4,) = open_container(p, groups=(4,))
    buf = p.mmap(MiB)
    p.write_memory(buf, b"replayed")
    dma_map(p, c, buf, 0x100000, MiB)
    fd5 = p.open("/dev/vfio/5", os.O_RDWR)
    p.ioctl(fd5, uapi.VFIO_GROUP_SET_CONTAINER, ctypes.c_int32(c))
    iommu = m.kernel.vfio.groups[4].container.iommu_data
    assert len(iommu.domain_list) == 2
    assert iommu.pgsize_bitmap == 0x201000               # the intersection of both units' sizes
    assert unit2.domains[0].mapped_bytes() == MiB
    assert vmlck(p) == 1024                              # replaying pins nothing new
    assert p.ioctl(c, uapi.VFIO_CHECK_EXTENSION, uapi.VFIO_DMA_CC_IOMMU) == 0
    dev = m.device(EDU1)
    dev.config.data[4] |= 0x4
    assert dev.bus_master.dma_read(0x100000, 8) == b"replayed"
    p.close(fd4)                                         # its domain goes; the mapping stays
    assert p.ioctl(c, uapi.VFIO_CHECK_EXTENSION, uapi.VFIO_DMA_CC_IOMMU) == 1
    assert iommu.pgsize_bitmap == 0x201000 and vmlck(p) == 1024
    p.close(fd5)
    assert vmlck(p) == 0 and m.pinned_pages() == 0


# -- the device's DMA through VT-d ---------------------------------------------------------------------------


def test_edu_dma_round_trip_through_type1(m):
    p = m.spawn(uid=0, rlimit_memlock=(8 * MiB, 8 * MiB))
    c, (g,) = open_container(p)
    src, dst = p.mmap(0x10000), p.mmap(0x10000)
    pattern = bytes((i * 13 + 7) & 0xFF for i in range(0x10000))
    p.write_memory(src, pattern)
    dma_map(p, c, src, 0x200000, 0x10000, flags=uapi.VFIO_DMA_MAP_FLAG_READ)
    dma_map(p, c, dst, 0x400000, 0x10000, flags=uapi.VFIO_DMA_MAP_FLAG_WRITE)
    dev = open_device(p, g, EDU0)
    enable_bus_master(p, dev)
    for i in range(16):
        edu_dma(p, dev, 0x200000 + i * 4096, 0x40000, 4096, to_ram=False)
        edu_dma(p, dev, 0x40000, 0x400000 + i * 4096, 4096, to_ram=True)
    assert p.read_memory(dst, 0x10000) == pattern
    assert m.device(EDU0).dma_count == 32
    assert not any("DMAR: [" in line for line in m.dmesg())


@pytest.mark.parametrize("iova,to_ram,code,reason", [
    (0x300000, False, 0x06, "PTE Read access is not set"),          # nothing mapped
    (0x300000, True, 0x05, "PTE Write access is not set"),
    (0x200000, True, 0x05, "PTE Write access is not set"),          # a READ-only mapping
    (0x400000, False, 0x06, "PTE Read access is not set"),          # a WRITE-only mapping
])
def test_refused_dma_is_a_dmar_fault(m, iova, to_ram, code, reason):
    p = m.spawn()
    c, (g,) = open_container(p)
    src, dst = p.mmap(0x10000), p.mmap(0x10000)
    dma_map(p, c, src, 0x200000, 0x10000, flags=uapi.VFIO_DMA_MAP_FLAG_READ)
    dma_map(p, c, dst, 0x400000, 0x10000, flags=uapi.VFIO_DMA_MAP_FLAG_WRITE)
    dev = open_device(p, g, EDU0)
    enable_bus_master(p, dev)
    before = p.read_memory(src, 0x10000) + p.read_memory(dst, 0x10000)
    if to_ram:
        edu_dma(p, dev, 0x40000, iova, 4096, to_ram=True)
    else:
        edu_dma(p, dev, iova, 0x40000, 4096, to_ram=False)
    line = f"DMAR: [DMA {'Write' if to_ram else 'Read'} NO_PASID] Request device [01:00.0] fault addr {iova:#x} " \
           f"[fault reason {code:#04x}] {reason}"
    assert line in m.dmesg()
    assert "DMAR: DRHD: handling fault status reg 2" in m.dmesg()
    assert m.device(EDU0).dma_count == 0
    assert p.read_memory(src, 0x10000) + p.read_memory(dst, 0x10000) == before
    assert m.iommu_units[0].faults == 1
    assert reg_read(p, dev, 0x00) == 0x010000ED           # no EEH on x86: the device still answers


def test_dma_past_a_mapping_moves_nothing(m):
    p = m.spawn()
    c, (g,) = open_container(p)
    buf = p.mmap(0x10000)
    dma_map(p, c, buf, 0x200000, 0x1000)
    dev = open_device(p, g, EDU0)
    enable_bus_master(p, dev)
    edu_dma(p, dev, 0x40000, 0x200800, 4096, to_ram=True)   # the second half is unmapped
    assert any("fault addr 0x201000 [fault reason 0x05]" in line for line in m.dmesg())
    assert p.read_memory(buf, 4096) == bytes(4096)


def test_dma_of_a_vfio_owned_group_without_iommu_is_blocked(m):
    p = m.spawn()
    c, _ = open_container(p, iommu=None)                  # VFIO owns the group; no SET_IOMMU yet
    assert m.kernel.iommu_groups[4].domain.kind == "blocked"
    dev = m.device(EDU0)
    dev.config.data[4] |= 0x4
    with pytest.raises(vfiosim.kernel.pci.device.DmaError):
        dev.bus_master.dma_write(0x1000, b"x")
    assert any("[fault reason 0x02] Present bit in context entry is clear" in line for line in m.dmesg())


def test_dma_beyond_the_address_width(m):
    p = m.spawn()
    open_container(p)
    dev = m.device(EDU0)
    dev.config.data[4] |= 0x4
    with pytest.raises(vfiosim.kernel.pci.device.DmaError):
        dev.bus_master.dma_read(1 << 39, 8)
    assert any("[fault reason 0x04] Access beyond MGAW" in line for line in m.dmesg())


def test_large_map_is_one_extent_per_physical_run(m):
    p = m.spawn()
    c, _ = open_container(p)
    buf = p.mmap(256 * MiB)
    dma_map(p, c, buf, 1 << 32, 256 * MiB)
    (domain,) = m.iommu_units[0].domains
    assert domain.extents() == [(1 << 32, 256 * MiB, domain.iova_to_phys(1 << 32), 3 | 4)]
    assert m.pinned_pages() == 65536
    assert unmap(p, c, 1 << 32, 256 * MiB) == 256 * MiB
    assert m.pinned_pages() == 0 and domain.extents() == []


def test_type1_needs_x86_4k_pages_and_the_6_12_profile():
    with pytest.raises(ValueError, match="4 KiB"):
        vfiosim.Machine.preset("x86", page_size=65536)
    with pytest.raises(ValueError, match="6.12"):
        vfiosim.Machine.preset("x86", kernel="3.10")


def test_driver_describes_its_state(m):
    p = m.spawn()
    c, _ = open_container(p)
    buf = p.mmap(MiB)
    dma_map(p, c, buf, 0x100000, MiB)
    state = m.topology()["iommu_groups"][4]["container"]
    assert state["iommu"] == Type1IommuDriver.name
    assert state["type"] == "Type1v2"
    assert state["mappings"] == [{"iova": 0x100000, "size": MiB, "vaddr": buf, "prot": 3, "vaddr_invalid": False,
                                  "locked_pages": 256}]
    assert np.array_equal(np.array(state["iova_ranges"]), np.array([[0, 0xFEDFFFFF], [0xFEF00000, (1 << 39) - 1]]))


# -- docs/deviations.md ---------------------------------------------------------------------------------------


def test_stale_dirty_bits_after_an_unaligned_report_are_reproduced(m):
    """Deviation 8: update_user_bitmap() leaves the shifted bits of a mapping
    reported at an unaligned offset; its later reports include them."""
    p = m.spawn()
    c, _ = open_container(p)
    buf = p.mmap(MiB)
    bitmap = p.mmap(4096)
    dma_map(p, c, buf, 0x200000000, 0x10000)             # e: 16 pages
    dma_map(p, c, buf + 0x10000, 0x200010000, 0x10000)   # e2: the next 16
    start_tracking(p, c)
    dirty(p, c, 0x200010000, 0x10000, bitmap=bitmap)
    assert bitmap_words(p, bitmap) == [0xFFFF]           # aligned: exact
    p.write_memory(bitmap, bytes(8))
    dirty(p, c, 0x200000000, 0x20000, bitmap=bitmap)     # e2 lands at bit 16: shifted
    assert bitmap_words(p, bitmap) == [0xFFFFFFFF]
    assert not any("past the mapping" in line for line in m.dmesg())
    for _ in range(2):
        p.write_memory(bitmap, bytes(8))
        dirty(p, c, 0x200010000, 0x10000, bitmap=bitmap)
        assert bitmap_words(p, bitmap) == [0xFFFFFFFF]       # 16 pages past e2 reported dirty
    assert sum("vfiosim: update_user_bitmap: 16 bit(s) past the mapping 0x200010000+0x10000" in line
               for line in m.dmesg()) == 2
    # Stopping tracking frees the bitmaps: a restart reports exactly again.
    p.ioctl(c, uapi.VFIO_IOMMU_DIRTY_PAGES, bytearray(struct.pack("<II", 8, 2)))
    start_tracking(p, c)
    p.write_memory(bitmap, bytes(8))
    dirty(p, c, 0x200010000, 0x10000, bitmap=bitmap)
    assert bitmap_words(p, bitmap) == [0xFFFF]
