"""/dev/iommu: the object table, the IOAS ioctls and the size rules, as Linux
6.12 answers them (drivers/iommu/iommufd/main.c, ioas.c, io_pagetable.c).

Test names follow tools/testing/selftests/iommu/iommufd.c where a selftest
checks the same thing; their mock domain is replaced by a VT-d device (an
edu behind QEMU's intel-iommu), whose domains have 4 KiB, 2 MiB and 1 GiB
pages, a 39-bit aperture and the MSI window reserved.
"""

from __future__ import annotations

import ctypes
import errno
import struct

import pytest

from iommufdutil import (KiB, MiB, RW, U64_MAX, allow_iovas, attach, bind, cdev_setup, destroy, ioas_alloc,
                         ioas_copy, ioas_map, ioas_unmap, iova_ranges, machine, option)
from vfiosim.uapi import iommufd as iu
from vfiosim.uapi.ioctl import _IO

MSI = (0xFEE00000, 0xFEEFFFFF)
APERTURE_END = (1 << 39) - 1


@pytest.fixture
def m():
    return machine()


@pytest.fixture
def p(m):
    return m.spawn(uid=1000, gid=1000, rlimit_memlock=(64 * MiB, 64 * MiB))


@pytest.fixture
def fd(p):
    return p.open("/dev/iommu")


def err(fn, *args):
    with pytest.raises(OSError) as exc:
        fn(*args)
    return exc.value.errno


# -- the object table and the size rules (main.c) -----------------------------------------------------------


def test_cmd_fail(p, fd):
    """TEST_F(iommufd, cmd_fail)"""
    assert err(destroy, p, fd, 0) == errno.ENOENT
    assert err(p.ioctl, fd, iu.IOMMU_DESTROY, 0x10) == errno.EFAULT          # a bad pointer
    assert err(p.ioctl, fd, _IO(";", 0x80 - 1), bytearray(8)) == errno.ENOTTY  # below iommufd: VFIO compat
    assert err(p.ioctl, fd, _IO(";", 0x80 + 15), bytearray(8)) == errno.ENOTTY  # past the table


@pytest.mark.parametrize("cls, cmd, last", [
    (iu.iommu_destroy, iu.IOMMU_DESTROY, "id"),
    (iu.iommu_hw_info, iu.IOMMU_GET_HW_INFO, "__reserved"),
    (iu.iommu_hwpt_alloc, iu.IOMMU_HWPT_ALLOC, "__reserved"),
    (iu.iommu_hwpt_invalidate, iu.IOMMU_HWPT_INVALIDATE, "__reserved"),
    (iu.iommu_ioas_alloc, iu.IOMMU_IOAS_ALLOC, "out_ioas_id"),
    (iu.iommu_ioas_iova_ranges, iu.IOMMU_IOAS_IOVA_RANGES, "out_iova_alignment"),
    (iu.iommu_ioas_allow_iovas, iu.IOMMU_IOAS_ALLOW_IOVAS, "allowed_iovas"),
    (iu.iommu_ioas_map, iu.IOMMU_IOAS_MAP, "iova"),
    (iu.iommu_ioas_copy, iu.IOMMU_IOAS_COPY, "src_iova"),
    (iu.iommu_ioas_unmap, iu.IOMMU_IOAS_UNMAP, "length"),
    (iu.iommu_option, iu.IOMMU_OPTION, "val64"),
    (iu.iommu_vfio_ioas, iu.IOMMU_VFIO_IOAS, "__reserved"),
])
def test_cmd_length(p, fd, cls, cmd, last):
    """TEST_F(iommufd, cmd_length): below the first version's size is EINVAL;
    one byte more than the kernel knows is E2BIG when that byte is not zero
    and otherwise the same answer as the exact size."""
    size = ctypes.sizeof(cls)
    buf = bytearray(size + 1)
    struct.pack_into("<I", buf, 0, iu.offsetofend(cls, last) - 1)
    buf[size] = 0xFF
    assert err(p.ioctl, fd, cmd, buf) == errno.EINVAL
    struct.pack_into("<I", buf, 0, size + 1)
    assert err(p.ioctl, fd, cmd, buf) == errno.E2BIG
    struct.pack_into("<I", buf, 0, size)
    try:
        p.ioctl(fd, cmd, buf)
        first = 0
    except OSError as exc:
        first = exc.errno
    buf[size] = 0
    struct.pack_into("<I", buf, 0, size + 1)
    buf[4:size] = bytes(size - 4)
    try:
        p.ioctl(fd, cmd, buf)
        second = 0
    except OSError as exc:
        second = exc.errno
    assert second == first


def test_cmd_ex_fail(p, fd):
    """TEST_F(iommufd, cmd_ex_fail)"""
    buf = bytearray(16)
    struct.pack_into("<II", buf, 0, 16, 0)
    assert err(p.ioctl, fd, iu.IOMMU_DESTROY, buf) == errno.ENOENT        # longer, zero tail: accepted
    buf[8] = 1
    assert err(p.ioctl, fd, iu.IOMMU_DESTROY, buf) == errno.E2BIG
    struct.pack_into("<I", buf, 0, 8)
    assert err(p.ioctl, fd, iu.IOMMU_DESTROY, buf) == errno.ENOENT
    struct.pack_into("<I", buf, 0, 7)
    assert err(p.ioctl, fd, iu.IOMMU_DESTROY, buf) == errno.EINVAL


def test_size_tail_is_read_until_a_nonzero_byte(p, fd):
    """check_zeroed_user() stops at the first non-zero word: a tail that runs
    into unmapped memory is E2BIG if a non-zero byte comes first, EFAULT if
    not."""
    page = p.mmap(4096)
    base = page + 4096 - 8                      # the struct's last byte is the page's last
    p.write_memory(base, struct.pack("<II", 8, 0))
    p.write_memory(base, struct.pack("<I", 64))
    assert err(p.ioctl, fd, iu.IOMMU_DESTROY, base) == errno.EFAULT
    p.munmap(page, 4096)
    two = p.mmap(8192)
    p.munmap(two + 4096, 4096)
    base = two + 4096 - 16
    p.write_memory(base, struct.pack("<IIII", 64, 0, 0, 7))
    assert err(p.ioctl, fd, iu.IOMMU_DESTROY, base) == errno.E2BIG


def test_ids_are_the_lowest_free_from_one(p, fd):
    a, b, c = (ioas_alloc(p, fd) for _ in range(3))
    assert (a, b, c) == (1, 2, 3)
    destroy(p, fd, b)
    assert ioas_alloc(p, fd) == 2
    assert err(destroy, p, fd, b + 10) == errno.ENOENT


def test_global_options(m, fd):
    """TEST_F(iommufd, global_options): RLIMIT_MODE is 0 (per user) by
    default, settable only with CAP_SYS_RESOURCE and only while the context
    is empty; HUGE_PAGES needs an IOAS."""
    root = m.spawn(uid=0)
    rfd = root.open("/dev/iommu")
    assert option(root, rfd, iu.IOMMU_OPTION_RLIMIT_MODE, iu.IOMMU_OPTION_OP_GET, 1) == 0
    assert option(root, rfd, iu.IOMMU_OPTION_RLIMIT_MODE, iu.IOMMU_OPTION_OP_SET, 1) == 1
    assert err(option, root, rfd, iu.IOMMU_OPTION_RLIMIT_MODE, iu.IOMMU_OPTION_OP_SET, 2) == errno.EINVAL
    assert option(root, rfd, iu.IOMMU_OPTION_RLIMIT_MODE, iu.IOMMU_OPTION_OP_GET) == 1
    option(root, rfd, iu.IOMMU_OPTION_RLIMIT_MODE, iu.IOMMU_OPTION_OP_SET, 0)
    assert err(option, root, rfd, iu.IOMMU_OPTION_HUGE_PAGES, iu.IOMMU_OPTION_OP_GET) == errno.ENOENT
    assert err(option, root, rfd, iu.IOMMU_OPTION_HUGE_PAGES, iu.IOMMU_OPTION_OP_SET) == errno.ENOENT
    assert err(option, root, rfd, iu.IOMMU_OPTION_RLIMIT_MODE, 7) == errno.EOPNOTSUPP
    assert err(option, root, rfd, 9, iu.IOMMU_OPTION_OP_GET) == errno.EOPNOTSUPP
    assert err(option, root, rfd, iu.IOMMU_OPTION_RLIMIT_MODE, iu.IOMMU_OPTION_OP_GET, 0, 1) == errno.EOPNOTSUPP
    ioas_alloc(root, rfd)
    assert err(option, root, rfd, iu.IOMMU_OPTION_RLIMIT_MODE, iu.IOMMU_OPTION_OP_SET, 1) == errno.EBUSY
    user = m.spawn(uid=1000, gid=1000)
    ufd = user.open("/dev/iommu")
    assert err(option, user, ufd, iu.IOMMU_OPTION_RLIMIT_MODE, iu.IOMMU_OPTION_OP_SET, 1) == errno.EPERM


def test_option_writes_back_only_val64(p, fd):
    ioas = ioas_alloc(p, fd)
    cmd = iu.iommu_option(size=ctypes.sizeof(iu.iommu_option), option_id=iu.IOMMU_OPTION_HUGE_PAGES,
                          op=iu.IOMMU_OPTION_OP_GET, object_id=ioas, val64=77)
    p.ioctl(fd, iu.IOMMU_OPTION, cmd)
    assert cmd.val64 == 1 and cmd.object_id == ioas


def test_unknown_flags_and_reserved_are_eopnotsupp(p, fd):
    ioas = ioas_alloc(p, fd)
    cmd = iu.iommu_ioas_alloc(size=ctypes.sizeof(iu.iommu_ioas_alloc), flags=1)
    assert err(p.ioctl, fd, iu.IOMMU_IOAS_ALLOC, cmd) == errno.EOPNOTSUPP
    buf = p.mmap(4096)
    assert err(ioas_map, p, fd, ioas, buf, 4096, None, RW | 8) == errno.EOPNOTSUPP
    m = iu.iommu_ioas_map(size=ctypes.sizeof(iu.iommu_ioas_map), flags=RW, ioas_id=ioas, user_va=buf, length=4096)
    setattr(m, "__reserved", 1)
    assert err(p.ioctl, fd, iu.IOMMU_IOAS_MAP, m) == errno.EOPNOTSUPP
    assert err(ioas_map, p, fd, ioas, buf, 4096, None, 0) == errno.EINVAL       # neither readable nor writeable
    r = iu.iommu_ioas_iova_ranges(size=ctypes.sizeof(iu.iommu_ioas_iova_ranges), ioas_id=ioas)
    setattr(r, "__reserved", 1)
    assert err(p.ioctl, fd, iu.IOMMU_IOAS_IOVA_RANGES, r) == errno.EOPNOTSUPP


def test_ioas_destroy(p, fd):
    """TEST_F(iommufd_ioas, ioas_destroy): a free IOAS goes; one a device's
    HWPT uses is EBUSY."""
    ioas = ioas_alloc(p, fd)
    destroy(p, fd, ioas)
    assert err(destroy, p, fd, ioas) == errno.ENOENT
    fd2, ioas2, dfd, devid = cdev_setup(p)
    hwpt = attach(p, dfd, ioas2)
    assert err(destroy, p, fd2, ioas2) == errno.EBUSY
    assert err(destroy, p, fd2, hwpt) == errno.EBUSY        # the device holds it
    assert err(destroy, p, fd2, devid) == errno.EBUSY       # the VFIO driver holds it


def test_wrong_object_type_is_enoent(p, fd):
    fd2, ioas, dfd, devid = cdev_setup(p)
    buf = p.mmap(4096)
    assert err(ioas_map, p, fd2, devid, buf, 4096) == errno.ENOENT


def test_close_destroys_everything(m, p, fd):
    """iommufd_fops_release(): leaves first (HWPT before its IOAS), all pages
    unpinned.  The bound device keeps the context alive until its fd closes."""
    fd2, ioas, dfd, devid = cdev_setup(p)
    buf = p.mmap(64 * KiB)
    ioas_map(p, fd2, ioas, buf, 64 * KiB)
    attach(p, dfd, ioas)
    assert m.pinned_pages() == 16
    p.close(fd2)
    assert m.pinned_pages() == 16                          # the device's reference holds the file
    p.close(dfd)
    assert m.pinned_pages() == 0 and not m.oopses


# -- IOAS_MAP / UNMAP / COPY (ioas.c, io_pagetable.c) -------------------------------------------------------


def test_area(p, fd):
    """TEST_F(iommufd_ioas, area): fixed maps, overlaps, unmaps that cut."""
    ioas = ioas_alloc(p, fd)
    buf = p.mmap(64 * KiB)
    for i in range(16):
        ioas_map(p, fd, ioas, buf + i * 4096, 4096, 0x10000 + i * 4096)
    # Overlaps in every way are EEXIST.
    assert err(ioas_map, p, fd, ioas, buf, 4096, 0x10000) == errno.EEXIST
    assert err(ioas_map, p, fd, ioas, buf, 8192, 0x10000 - 4096) == errno.EEXIST
    assert err(ioas_map, p, fd, ioas, buf, 64 * KiB, 0x10000 + 15 * 4096) == errno.EEXIST
    # Unmapping part of a mapping is ENOENT, nothing mapped there is ENOENT.
    ioas_map(p, fd, ioas, buf, 8192, 0x100000)
    assert err(ioas_unmap, p, fd, ioas, 0x100000, 4096) == errno.ENOENT
    assert err(ioas_unmap, p, fd, ioas, 0x200000, 4096) == errno.ENOENT
    assert ioas_unmap(p, fd, ioas, 0x100000, 8192) == 8192
    # Whole mappings inside the range go, however many.
    assert ioas_unmap(p, fd, ioas, 0x10000, 16 * 4096) == 16 * 4096


def test_unmap_fully_contained_areas(p, fd):
    """TEST_F(iommufd_ioas, unmap_fully_contained_areas)"""
    ioas = ioas_alloc(p, fd)
    buf = p.mmap(64 * KiB)
    for i in range(4):
        ioas_map(p, fd, ioas, buf, 4096, 0x10000 + i * 0x2000)
    # A range that cuts the last area: the ones before it are unmapped, then ENOENT.
    assert err(ioas_unmap, p, fd, ioas, 0x10000 - 0x1000, 0x7800) == errno.ENOENT
    assert ioas_unmap(p, fd, ioas, 0, U64_MAX) == 4096          # only 0x16000 was left
    assert err(ioas_unmap, p, fd, ioas, 0x10000, 0x1000) == errno.ENOENT
    assert ioas_unmap(p, fd, ioas, 0, U64_MAX) == 0            # unmap-all of nothing succeeds


def test_map_unmap_range_checks(p, fd):
    ioas = ioas_alloc(p, fd)
    buf = p.mmap(4096)
    assert err(ioas_map, p, fd, ioas, buf, 0, 0x1000) == errno.EINVAL
    assert err(ioas_map, p, fd, ioas, buf, U64_MAX, 0x1000) == errno.EOVERFLOW
    assert err(ioas_map, p, fd, ioas, buf, 4096, U64_MAX) == errno.EOVERFLOW
    assert err(ioas_map, p, fd, ioas, U64_MAX - 10, 4096, 0x1000) == errno.EOVERFLOW  # user_va + length wraps
    assert err(ioas_map, p, fd, ioas, buf, 8192, U64_MAX - 4096) == errno.EOVERFLOW   # iova + length wraps
    assert err(ioas_unmap, p, fd, ioas, 0x1000, 0) == errno.EINVAL
    assert err(ioas_unmap, p, fd, ioas, U64_MAX, 1) == errno.EOVERFLOW
    assert err(ioas_unmap, p, fd, ioas, 1 << 63, (1 << 63) + 1) == errno.EOVERFLOW
    assert err(ioas_unmap, p, fd, ioas, 1 << 63, 1 << 63) == errno.ENOENT     # ends at ULONG_MAX: fits


def test_software_ioas_has_no_alignment_and_pins_nothing(m, p, fd):
    """An IOAS with no domain is a software table: any byte alignment, and
    the pages are only referenced, not pinned, until a domain needs them."""
    ioas = ioas_alloc(p, fd)
    buf = p.mmap(64 * KiB)
    assert ioas_map(p, fd, ioas, buf + 1, 5, 0x10001) == 0x10001
    assert iova_ranges(p, fd, ioas) == ([(0, U64_MAX)], 1)
    assert m.pinned_pages() == 0
    p.munmap(buf, 64 * KiB)
    assert ioas_map(p, fd, ioas, buf, 4096, 0x20000) == 0x20000   # unmapped memory: nothing checks it yet


def test_area_auto_iova(p, fd):
    """TEST_F(iommufd_ioas, area_auto_iova): allocated IOVAs are aligned
    like the user address (up to 2 MiB), never 0, and fill holes."""
    ioas = ioas_alloc(p, fd)
    buf = p.mmap(4 * MiB, page_size=2 * MiB)
    got = []
    for i in range(10):
        length = 4096 * (i + 1)
        iova = ioas_map(p, fd, ioas, buf, length)
        align = min(1 << (length - 1).bit_length(), 2 * MiB)
        assert iova and iova % align == 0
        got.append((iova, length))
    for iova, length in got:
        ioas_unmap(p, fd, ioas, iova, length)
    # A user address aligned to 4 KiB only limits the alignment to 4 KiB.
    assert ioas_map(p, fd, ioas, buf + 4096, 2 * MiB) == 4096


def test_area_allowed(p, fd):
    """TEST_F(iommufd_ioas, area_allowed): allocation stays in the allowed
    ranges; fixed maps are not restricted by them."""
    ioas = ioas_alloc(p, fd)
    buf = p.mmap(64 * KiB)
    allow_iovas(p, fd, ioas, [(0x100000, 0x10FFFF)])
    assert ioas_map(p, fd, ioas, buf, 4096) == 0x100000
    assert ioas_map(p, fd, ioas, buf, 8192) == 0x102000
    assert ioas_map(p, fd, ioas, buf, 4096, 0x10) == 0x10       # fixed: anywhere not reserved
    assert err(ioas_map, p, fd, ioas, buf, 64 * KiB) == errno.ENOSPC
    # Ranges must be start < last, not overlapping.
    assert err(allow_iovas, p, fd, ioas, [(0x2000, 0x2000)]) == errno.EINVAL
    assert err(allow_iovas, p, fd, ioas, [(0x2000, 0x3FFF), (0x3000, 0x4FFF)]) == errno.EINVAL
    allow_iovas(p, fd, ioas, [])                                # none: no restriction


def test_allowed_and_reserved_exclude_each_other(p):
    """iopt_set_allow_iova() / iopt_reserve_iova(): EADDRINUSE both ways."""
    fd, ioas, dfd, devid = cdev_setup(p)
    attach(p, dfd, ioas)                                       # reserves the MSI window and past 2^39
    assert err(allow_iovas, p, fd, ioas, [(0xFEE00000, 0xFEE0FFFF)]) == errno.EADDRINUSE
    ioas2 = ioas_alloc(p, fd)
    allow_iovas(p, fd, ioas2, [(0xFEE00000, 0xFEE0FFFF)])
    dfd2 = p.open("/dev/vfio/devices/vfio1")
    bind(p, dfd2, fd)
    assert err(attach, p, dfd2, ioas2) == errno.EADDRINUSE


def test_iova_ranges(p):
    """TEST_F(iommufd_ioas, iova_ranges): all of it with no domain; with a
    VT-d domain the aperture's end and the MSI window are reserved; too small
    an array is EMSGSIZE with num_iovas set, ranges that fit written."""
    fd, ioas, dfd, devid = cdev_setup(p)
    assert iova_ranges(p, fd, ioas) == ([(0, U64_MAX)], 1)
    attach(p, dfd, ioas)
    want = [(0, MSI[0] - 1), (MSI[1] + 1, APERTURE_END)]
    assert iova_ranges(p, fd, ioas) == (want, 4096)
    buf = p.mmap(4096)
    cmd = iu.iommu_ioas_iova_ranges(size=ctypes.sizeof(iu.iommu_ioas_iova_ranges), ioas_id=ioas, num_iovas=1,
                                    allowed_iovas=buf)
    assert err(p.ioctl, fd, iu.IOMMU_IOAS_IOVA_RANGES, cmd) == errno.EMSGSIZE
    assert cmd.num_iovas == 2 and cmd.out_iova_alignment == 4096
    assert struct.unpack("<QQ", p.read_memory(buf, 16)) == want[0]


def test_copy_area(m, p):
    """TEST_F(iommufd_ioas, copy_area): pages of one IOAS into another, at a
    fixed or allocated IOVA; a range with a gap is ENOENT."""
    fd, ioas, dfd, devid = cdev_setup(p)
    buf = p.mmap(64 * KiB)
    ioas_map(p, fd, ioas, buf, 16 * KiB, 0x100000)
    dst = ioas_alloc(p, fd)
    assert ioas_copy(p, fd, dst, ioas, 0x100000, 16 * KiB, 0x400000) == 0x400000
    assert ioas_copy(p, fd, dst, ioas, 0x101000, 4096) not in (0, 0x400000)
    assert err(ioas_copy, p, fd, dst, ioas, 0x100000, 20 * KiB) == errno.ENOENT
    assert err(ioas_copy, p, fd, dst, ioas, 0x100000, 0, 0x800000) == errno.EINVAL
    assert err(ioas_copy, p, fd, dst, ioas, 0x100000, 4096, None, 0) == errno.EINVAL
    assert err(ioas_copy, p, fd, dst, 99, 0x100000, 4096) == errno.ENOENT
    assert err(ioas_copy, p, fd, 99, ioas, 0x100000, 4096) == errno.ENOENT


def test_copy_cannot_add_write_access(p, fd):
    """iopt_insert_area(): pages first mapped read-only cannot be copied writable."""
    ioas = ioas_alloc(p, fd)
    buf = p.mmap(4096)
    ioas_map(p, fd, ioas, buf, 4096, 0x1000, iu.IOMMU_IOAS_MAP_READABLE)
    assert err(ioas_copy, p, fd, ioas, ioas, 0x1000, 4096, 0x9000) == errno.EPERM
    assert ioas_copy(p, fd, ioas, ioas, 0x1000, 4096, 0x9000, iu.IOMMU_IOAS_MAP_READABLE) == 0x9000


def test_ioas_option_huge_pages(m, p):
    """TEST_F(iommufd_ioas, ioas_option_huge_pages): 1 by default; turning
    it off raises the alignment to PAGE_SIZE and is refused once domains
    hold mappings."""
    fd, ioas, dfd, devid = cdev_setup(p)
    get = iu.IOMMU_OPTION_OP_GET
    assert option(p, fd, iu.IOMMU_OPTION_HUGE_PAGES, get, 0, ioas) == 1
    option(p, fd, iu.IOMMU_OPTION_HUGE_PAGES, iu.IOMMU_OPTION_OP_SET, 0, ioas)
    assert option(p, fd, iu.IOMMU_OPTION_HUGE_PAGES, get, 0, ioas) == 0
    assert iova_ranges(p, fd, ioas)[1] == 4096
    option(p, fd, iu.IOMMU_OPTION_HUGE_PAGES, iu.IOMMU_OPTION_OP_SET, 1, ioas)
    assert iova_ranges(p, fd, ioas)[1] == 1
    assert err(option, p, fd, iu.IOMMU_OPTION_HUGE_PAGES, iu.IOMMU_OPTION_OP_SET, 2, ioas) == errno.EINVAL
    attach(p, dfd, ioas)
    buf = p.mmap(4096)
    ioas_map(p, fd, ioas, buf, 4096, 0x1000)
    assert err(option, p, fd, iu.IOMMU_OPTION_HUGE_PAGES, iu.IOMMU_OPTION_OP_SET, 0, ioas) == errno.EINVAL


def test_ioas_align_change(p):
    """TEST_F(iommufd_ioas, ioas_align_change): a domain cannot come while a
    mapping is not aligned to its page size (EADDRINUSE); once it is there,
    unaligned maps are EINVAL."""
    fd, ioas, dfd, devid = cdev_setup(p)
    buf = p.mmap(64 * KiB)
    ioas_map(p, fd, ioas, buf + 512, 1024, 0x200)
    assert err(attach, p, dfd, ioas) == errno.EADDRINUSE
    ioas_unmap(p, fd, ioas, 0x200, 1024)
    attach(p, dfd, ioas)
    assert err(ioas_map, p, fd, ioas, buf, 4096, 0x200) == errno.EINVAL
    assert err(ioas_map, p, fd, ioas, buf + 512, 4096, 0x3000) == errno.EINVAL
    assert err(ioas_map, p, fd, ioas, buf, 1024, 0x3000) == errno.EINVAL


def test_map_past_the_aperture_or_in_the_msi_window_is_einval(p):
    fd, ioas, dfd, devid = cdev_setup(p)
    attach(p, dfd, ioas)
    buf = p.mmap(64 * KiB)
    assert err(ioas_map, p, fd, ioas, buf, 4096, MSI[0]) == errno.EINVAL
    assert err(ioas_map, p, fd, ioas, buf, 4096, 1 << 39) == errno.EINVAL
    assert ioas_map(p, fd, ioas, buf, 4096, (1 << 39) - 4096) == (1 << 39) - 4096
    # Allowed ranges cannot cover reserved ones; automatic IOVAs stay in them.
    assert err(allow_iovas, p, fd, ioas, [(MSI[0] - 0x2000, MSI[1] + 0x2000)]) == errno.EADDRINUSE
    allow_iovas(p, fd, ioas, [(MSI[0] - 0x2000, MSI[0] - 1), (MSI[1] + 1, MSI[1] + 0x2000)])
    got = {ioas_map(p, fd, ioas, buf, 4096) for _ in range(4)}
    assert err(ioas_map, p, fd, ioas, buf, 4096) == errno.ENOSPC
    assert got == {MSI[0] - 0x2000, MSI[0] - 0x1000, MSI[1] + 1, MSI[1] + 1 + 0x1000}


def test_area_must_fit_the_aperture_before_a_domain_comes(p):
    """iopt_table_add_domain() reserves what lies past the aperture: EADDRINUSE
    while a mapping is there."""
    fd, ioas, dfd, devid = cdev_setup(p)
    buf = p.mmap(4096)
    ioas_map(p, fd, ioas, buf, 4096, 1 << 40)
    assert err(attach, p, dfd, ioas) == errno.EADDRINUSE
    ioas_unmap(p, fd, ioas, 1 << 40, 4096)
    assert attach(p, dfd, ioas) > 0
