"""The process side of the simulator: memory, credentials, limits, files, exit.

Each test compares the simulated system call with what Linux does (mmap(2),
munmap(2), mprotect(2), setrlimit(2), setuid(2), open(2), eventfd(2), and the
kernel functions named in the tests).
"""

from __future__ import annotations

import ctypes
import errno
import os
import resource

import pytest

import vfiosim
from vfiosim import PROT_NONE, PROT_READ, PROT_WRITE, uapi
from vfioutil import dma_map, get_info, setup_v1

PAGE_SIZES = (4096, 65536)
MiB = 1 << 20


def expect_errno(err: int, fn, *args, **kwargs) -> OSError:
    with pytest.raises(OSError) as info:
        fn(*args, **kwargs)
    assert info.value.errno == err, (f"expected {errno.errorcode[err]}, got "
                                     f"{errno.errorcode.get(info.value.errno, info.value.errno)}: {info.value}")
    return info.value


@pytest.fixture(params=PAGE_SIZES, ids=["4K", "64K"])
def machine(request) -> vfiosim.Machine:
    return vfiosim.Machine.default(page_size=request.param)


def vma_lengths(p) -> list[int]:
    return [v.length for v in p.mm.vmas() if v.kind == "anon"]


# -- mmap(2) ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("page_size", PAGE_SIZES)
def test_mmap_returns_page_aligned_addresses(page_size):
    m = vfiosim.Machine.default(page_size=page_size)
    p = m.spawn()
    addrs = [p.mmap(n) for n in (1, page_size - 1, page_size, page_size + 1, 3 * page_size + 7, 12345)]
    for a in addrs:
        assert a % page_size == 0, f"{a:#x} is not aligned to {page_size:#x}"
    assert len(set(addrs)) == len(addrs)


@pytest.mark.parametrize("page_size", PAGE_SIZES)
@pytest.mark.parametrize("pages,extra", [(0, 1), (1, 0), (1, 1), (2, -1), (5, 0)])
def test_mmap_length_rounds_up_to_whole_pages(page_size, pages, extra):
    m = vfiosim.Machine.default(page_size=page_size)
    p = m.spawn()
    length = pages * page_size + extra
    expected = -(-length // page_size) * page_size
    before = p.status()["VmSize"]
    a = p.mmap(length)
    assert vma_lengths(p) == [expected]
    assert p.status()["VmSize"] - before == expected // 1024
    # Every byte of the rounded-up mapping is accessible, the last one included.
    p.write_memory(a + expected - 1, b"\x5a")
    assert p.read_memory(a + expected - 1, 1) == b"\x5a"
    assert p.read_memory(a, expected) == bytes(expected - 1) + b"\x5a"


def test_mmap_of_zero_length_is_einval(machine):
    p = machine.spawn()
    expect_errno(errno.EINVAL, p.mmap, 0)
    assert vma_lengths(p) == []


def test_new_anonymous_memory_reads_as_zero(machine):
    p = machine.spawn()
    a = p.mmap(2 * machine.page_size)
    assert p.read_memory(a, 2 * machine.page_size) == bytes(2 * machine.page_size)


def test_write_then_read_round_trips_across_pages(machine):
    ps = machine.page_size
    p = machine.spawn()
    a = p.mmap(3 * ps)
    data = bytes((i * 31 + 7) & 0xFF for i in range(ps + 100))
    # Straddles the boundary between page 0 and page 1, and ends inside page 2.
    p.write_memory(a + ps - 50, data)
    assert p.read_memory(a + ps - 50, len(data)) == data
    assert p.read_memory(a, ps - 50) == bytes(ps - 50)
    assert p.read_memory(a + ps - 50 + len(data), 10) == bytes(10)


def test_two_processes_have_separate_memory(machine):
    p1, p2 = machine.spawn(), machine.spawn()
    a1, a2 = p1.mmap(100), p2.mmap(100)
    p1.write_memory(a1, b"one")
    p2.write_memory(a2, b"two")
    assert p1.read_memory(a1, 3) == b"one"
    assert p2.read_memory(a2, 3) == b"two"


# -- EFAULT on bad user memory -----------------------------------------------------------------------


def test_reading_or_writing_unmapped_memory_is_efault(machine):
    p = machine.spawn()
    for addr in (0, 0x1000, 0xDEAD0000):
        expect_errno(errno.EFAULT, p.read_memory, addr, 4)
        expect_errno(errno.EFAULT, p.write_memory, addr, b"abcd")


def test_write_running_off_the_end_of_a_mapping_is_efault_and_writes_nothing(machine):
    ps = machine.page_size
    p = machine.spawn()
    a = p.mmap(ps)
    p.write_memory(a, b"\x11" * ps)
    expect_errno(errno.EFAULT, p.write_memory, a + ps - 4, b"\xff" * 8)
    assert p.read_memory(a, ps) == b"\x11" * ps
    expect_errno(errno.EFAULT, p.read_memory, a + ps - 4, 8)


def test_munmapped_memory_faults(machine):
    ps = machine.page_size
    p = machine.spawn()
    a = p.mmap(ps)
    p.write_memory(a, b"x")
    p.munmap(a, ps)
    expect_errno(errno.EFAULT, p.read_memory, a, 1)
    expect_errno(errno.EFAULT, p.write_memory, a, b"y")
    assert vma_lengths(p) == []


def test_prot_none_page_is_efault_for_reads_and_writes(machine):
    ps = machine.page_size
    p = machine.spawn()
    a = p.mmap(ps, PROT_NONE)
    expect_errno(errno.EFAULT, p.read_memory, a, 1)
    expect_errno(errno.EFAULT, p.write_memory, a, b"z")
    p.mprotect(a, ps, PROT_READ)
    # The failed write changed nothing: the page is still zero.
    assert p.read_memory(a, ps) == bytes(ps)


def test_writing_a_read_only_page_is_efault_and_changes_nothing(machine):
    ps = machine.page_size
    p = machine.spawn()
    a = p.mmap(ps)
    p.write_memory(a, b"original")
    p.mprotect(a, ps, PROT_READ)
    expect_errno(errno.EFAULT, p.write_memory, a, b"modified")
    assert p.read_memory(a, 8) == b"original"
    p.mprotect(a, ps, PROT_READ | PROT_WRITE)
    p.write_memory(a, b"modified")
    assert p.read_memory(a, 8) == b"modified"


def test_write_spanning_writable_and_read_only_pages_is_efault_and_writes_neither(machine):
    ps = machine.page_size
    p = machine.spawn()
    a = p.mmap(2 * ps)
    p.mprotect(a + ps, ps, PROT_READ)
    expect_errno(errno.EFAULT, p.write_memory, a + ps - 4, b"\xee" * 8)
    assert p.read_memory(a, 2 * ps) == bytes(2 * ps)


def test_read_spanning_readable_and_prot_none_pages_is_efault(machine):
    ps = machine.page_size
    p = machine.spawn()
    a = p.mmap(2 * ps)
    p.mprotect(a + ps, ps, PROT_NONE)
    assert p.read_memory(a + ps - 4, 4) == bytes(4)
    expect_errno(errno.EFAULT, p.read_memory, a + ps - 4, 8)


def test_mapping_created_read_only_reads_zero_and_rejects_writes(machine):
    ps = machine.page_size
    p = machine.spawn()
    a = p.mmap(ps, PROT_READ)
    assert p.read_memory(a, 16) == bytes(16)
    expect_errno(errno.EFAULT, p.write_memory, a, b"x")


# -- munmap(2) ------------------------------------------------------------------------------------------


def test_munmap_of_unaligned_address_is_einval_and_unmaps_nothing(machine):
    ps = machine.page_size
    p = machine.spawn()
    a = p.mmap(2 * ps)
    p.write_memory(a, b"keep")
    for off in (1, 512, ps // 2, ps - 1):
        expect_errno(errno.EINVAL, p.munmap, a + off, ps)
    assert p.read_memory(a, 4) == b"keep"
    assert vma_lengths(p) == [2 * ps]


def test_munmap_of_zero_length_is_einval(machine):
    p = machine.spawn()
    a = p.mmap(machine.page_size)
    expect_errno(errno.EINVAL, p.munmap, a, 0)
    assert vma_lengths(p) == [machine.page_size]


def test_munmap_of_the_middle_splits_the_mapping(machine):
    ps = machine.page_size
    p = machine.spawn()
    a = p.mmap(3 * ps)
    p.write_memory(a, b"A" * ps + b"B" * ps + b"C" * ps)
    p.munmap(a + ps, ps)
    assert vma_lengths(p) == [ps, ps]
    assert p.read_memory(a, ps) == b"A" * ps
    assert p.read_memory(a + 2 * ps, ps) == b"C" * ps
    expect_errno(errno.EFAULT, p.read_memory, a + ps, 1)
    # The remaining pieces are still writable, independently.
    p.write_memory(a + 2 * ps, b"c")
    assert p.read_memory(a + 2 * ps, 2) == b"cC"


def test_munmap_of_the_head_leaves_the_tail_readable(machine):
    ps = machine.page_size
    p = machine.spawn()
    a = p.mmap(4 * ps)
    p.write_memory(a + 2 * ps, b"tail")
    p.munmap(a, 2 * ps)
    assert vma_lengths(p) == [2 * ps]
    assert p.read_memory(a + 2 * ps, 4) == b"tail"
    expect_errno(errno.EFAULT, p.read_memory, a + ps, 1)


def test_munmap_length_rounds_up_to_whole_pages(machine):
    ps = machine.page_size
    p = machine.spawn()
    a = p.mmap(2 * ps)
    p.write_memory(a + ps, b"second")
    p.munmap(a, 1)                       # the whole first page goes
    expect_errno(errno.EFAULT, p.read_memory, a + ps - 1, 1)
    assert p.read_memory(a + ps, 6) == b"second"


def test_munmap_of_a_range_with_nothing_mapped_succeeds(machine):
    # munmap(2): "It is not an error if the indicated range does not contain any mapped pages."
    ps = machine.page_size
    p = machine.spawn()
    a = p.mmap(ps)
    p.munmap(a, ps)
    p.munmap(a, ps)
    p.munmap(0x4000_0000_0000 & ~(ps - 1), 16 * ps)


# -- mprotect(2) ----------------------------------------------------------------------------------------


def test_mprotect_of_unaligned_address_is_einval_and_changes_nothing(machine):
    ps = machine.page_size
    p = machine.spawn()
    a = p.mmap(2 * ps)
    expect_errno(errno.EINVAL, p.mprotect, a + 8, ps, PROT_READ)
    p.write_memory(a, b"still writable")
    assert p.read_memory(a, 14) == b"still writable"


def test_mprotect_of_zero_length_is_einval(machine):
    ps = machine.page_size
    p = machine.spawn()
    a = p.mmap(ps)
    expect_errno(errno.EINVAL, p.mprotect, a, 0, PROT_READ)
    p.write_memory(a, b"w")


def test_mprotect_with_unknown_prot_bits_is_einval(machine):
    ps = machine.page_size
    p = machine.spawn()
    a = p.mmap(ps)
    expect_errno(errno.EINVAL, p.mprotect, a, ps, 0x100)
    p.write_memory(a, b"w")


def test_mprotect_of_unmapped_range_is_enomem(machine):
    ps = machine.page_size
    p = machine.spawn()
    a = p.mmap(ps)
    p.munmap(a, ps)
    expect_errno(errno.ENOMEM, p.mprotect, a, ps, PROT_READ)


def test_mprotect_starting_in_a_hole_is_enomem_and_changes_nothing(machine):
    # do_mprotect_pkey(): the first VMA starts above `start` -> -ENOMEM before any change.
    ps = machine.page_size
    p = machine.spawn()
    a = p.mmap(3 * ps)
    p.munmap(a, ps)
    expect_errno(errno.ENOMEM, p.mprotect, a, 3 * ps, PROT_READ)
    p.write_memory(a + ps, b"x" * (2 * ps))
    assert p.read_memory(a + ps, 2 * ps) == b"x" * (2 * ps)
    assert vma_lengths(p) == [2 * ps]


def test_mprotect_running_into_a_hole_is_enomem_after_protecting_the_mapped_prefix(machine):
    # do_mprotect_pkey() walks the VMAs in order, calling mprotect_fixup() on
    # each, and fails with -ENOMEM only when it reaches the hole: the pages
    # before the hole keep the new protection, the ones after it the old.
    # (Checked on a real 6.x kernel: mprotect(a, 3 pages, PROT_READ) over
    # [rw][hole][rw] returns ENOMEM and /proc/self/maps shows [r--][hole][rw-].)
    ps = machine.page_size
    p = machine.spawn()
    a = p.mmap(3 * ps)
    p.munmap(a + ps, ps)
    expect_errno(errno.ENOMEM, p.mprotect, a, 3 * ps, PROT_READ)
    p.write_memory(a + 2 * ps, b"after the hole: unchanged")
    expect_errno(errno.EFAULT, p.write_memory, a, b"before the hole: now read-only")


def test_mprotect_of_part_of_a_mapping_splits_it(machine):
    ps = machine.page_size
    p = machine.spawn()
    a = p.mmap(3 * ps)
    p.mprotect(a + ps, ps, PROT_READ)
    assert vma_lengths(p) == [ps, ps, ps]
    p.write_memory(a, b"0")
    p.write_memory(a + 2 * ps, b"2")
    expect_errno(errno.EFAULT, p.write_memory, a + ps, b"1")
    assert p.read_memory(a + ps, 1) == b"\0"


# -- ioctl arguments: buffers and pointers ------------------------------------------------------------


def test_ioctl_with_a_bytearray_shorter_than_the_struct_is_efault():
    m = vfiosim.Machine.default()
    p = m.spawn()
    g = p.open("/dev/vfio/0", os.O_RDWR)
    # VFIO_GROUP_GET_STATUS copies offsetofend(flags) = 8 bytes from the user.
    short = bytearray((8).to_bytes(4, "little"))
    expect_errno(errno.EFAULT, p.ioctl, g, uapi.VFIO_GROUP_GET_STATUS, short)
    assert short == bytearray((8).to_bytes(4, "little"))


def test_ioctl_with_a_ctypes_struct_updates_it_in_place():
    m = vfiosim.Machine.default()
    p = m.spawn()
    g = p.open("/dev/vfio/0", os.O_RDWR)
    status = uapi.vfio_group_status(argsz=ctypes.sizeof(uapi.vfio_group_status), flags=0xFFFF0000)
    assert p.ioctl(g, uapi.VFIO_GROUP_GET_STATUS, status) == 0
    assert status.argsz == 8
    assert status.flags == uapi.VFIO_GROUP_FLAGS_VIABLE


def test_ioctl_with_a_full_size_bytearray_updates_it_in_place():
    m = vfiosim.Machine.default()
    p = m.spawn()
    g = p.open("/dev/vfio/0", os.O_RDWR)
    buf = bytearray((8).to_bytes(4, "little") + (0).to_bytes(4, "little"))
    p.ioctl(g, uapi.VFIO_GROUP_GET_STATUS, buf)
    assert int.from_bytes(buf[4:8], "little") == uapi.VFIO_GROUP_FLAGS_VIABLE


def test_ioctl_with_read_only_bytes_for_an_output_struct_is_efault():
    m = vfiosim.Machine.default()
    p = m.spawn()
    g = p.open("/dev/vfio/0", os.O_RDWR)
    expect_errno(errno.EFAULT, p.ioctl, g, uapi.VFIO_GROUP_GET_STATUS, bytes(uapi.vfio_group_status(argsz=8)))


def test_ioctl_with_a_pointer_into_mmapped_memory_reads_and_writes_it(machine):
    p = machine.spawn()
    g = p.open("/dev/vfio/0", os.O_RDWR)
    a = p.mmap(machine.page_size)
    # Put the struct at the very end of the page: exactly 8 mapped bytes.
    addr = a + machine.page_size - 8
    p.write_memory(addr, bytes(uapi.vfio_group_status(argsz=8, flags=0)))
    assert p.ioctl(g, uapi.VFIO_GROUP_GET_STATUS, addr) == 0
    out = uapi.vfio_group_status.from_buffer_copy(p.read_memory(addr, 8))
    assert out.argsz == 8
    assert out.flags == uapi.VFIO_GROUP_FLAGS_VIABLE


def test_ioctl_with_a_pointer_to_unmapped_memory_is_efault(machine):
    ps = machine.page_size
    p = machine.spawn()
    g = p.open("/dev/vfio/0", os.O_RDWR)
    a = p.mmap(ps)
    p.munmap(a, ps)
    expect_errno(errno.EFAULT, p.ioctl, g, uapi.VFIO_GROUP_GET_STATUS, a)
    expect_errno(errno.EFAULT, p.ioctl, g, uapi.VFIO_GROUP_GET_STATUS, 0)


def test_ioctl_with_a_pointer_to_a_struct_straddling_the_end_of_a_mapping_is_efault(machine):
    p = machine.spawn()
    g = p.open("/dev/vfio/0", os.O_RDWR)
    a = p.mmap(machine.page_size)
    addr = a + machine.page_size - 4
    p.write_memory(addr, (8).to_bytes(4, "little"))
    expect_errno(errno.EFAULT, p.ioctl, g, uapi.VFIO_GROUP_GET_STATUS, addr)


def test_ioctl_with_a_pointer_to_read_only_memory_for_an_output_struct_is_efault(machine):
    # copy_from_user succeeds, the copy_to_user of the result faults.
    ps = machine.page_size
    p = machine.spawn()
    g = p.open("/dev/vfio/0", os.O_RDWR)
    a = p.mmap(ps)
    p.write_memory(a, bytes(uapi.vfio_group_status(argsz=8, flags=0)))
    p.mprotect(a, ps, PROT_READ)
    expect_errno(errno.EFAULT, p.ioctl, g, uapi.VFIO_GROUP_GET_STATUS, a)
    assert p.read_memory(a, 8) == bytes(uapi.vfio_group_status(argsz=8, flags=0))


# -- setrlimit(2) -----------------------------------------------------------------------------------------


def test_spawn_sets_rlimit_memlock():
    m = vfiosim.Machine.default()
    p = m.spawn(uid=1000, gid=1000, rlimit_memlock=(2 * MiB, 4 * MiB))
    assert p.getrlimit(resource.RLIMIT_MEMLOCK) == (2 * MiB, 4 * MiB)


@pytest.mark.parametrize("uid", [0, 1000])
def test_setrlimit_with_soft_above_hard_is_einval(uid):
    m = vfiosim.Machine.default()
    p = m.spawn(uid=uid, rlimit_memlock=(MiB, 8 * MiB))
    expect_errno(errno.EINVAL, p.setrlimit, resource.RLIMIT_MEMLOCK, (4 * MiB, 2 * MiB))
    expect_errno(errno.EINVAL, p.setrlimit, resource.RLIMIT_MEMLOCK, (resource.RLIM_INFINITY, 2 * MiB))
    assert p.getrlimit(resource.RLIMIT_MEMLOCK) == (MiB, 8 * MiB)


def test_non_root_may_raise_soft_up_to_hard_and_lower_hard():
    m = vfiosim.Machine.default()
    p = m.spawn(uid=1000, gid=1000, rlimit_memlock=(MiB, 8 * MiB))
    p.setrlimit(resource.RLIMIT_MEMLOCK, (8 * MiB, 8 * MiB))
    assert p.getrlimit(resource.RLIMIT_MEMLOCK) == (8 * MiB, 8 * MiB)
    p.setrlimit(resource.RLIMIT_MEMLOCK, (MiB, 4 * MiB))
    assert p.getrlimit(resource.RLIMIT_MEMLOCK) == (MiB, 4 * MiB)


def test_non_root_raising_its_hard_limit_is_eperm():
    m = vfiosim.Machine.default()
    p = m.spawn(uid=1000, gid=1000, rlimit_memlock=(MiB, 8 * MiB))
    expect_errno(errno.EPERM, p.setrlimit, resource.RLIMIT_MEMLOCK, (MiB, 16 * MiB))
    expect_errno(errno.EPERM, p.setrlimit, resource.RLIMIT_MEMLOCK,
                 (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
    assert p.getrlimit(resource.RLIMIT_MEMLOCK) == (MiB, 8 * MiB)


def test_non_root_cannot_raise_a_hard_limit_back_after_lowering_it():
    m = vfiosim.Machine.default()
    p = m.spawn(uid=1000, gid=1000, rlimit_memlock=(MiB, 8 * MiB))
    p.setrlimit(resource.RLIMIT_MEMLOCK, (MiB, 2 * MiB))
    expect_errno(errno.EPERM, p.setrlimit, resource.RLIMIT_MEMLOCK, (MiB, 8 * MiB))
    assert p.getrlimit(resource.RLIMIT_MEMLOCK) == (MiB, 2 * MiB)


def test_root_may_raise_its_hard_limit():
    m = vfiosim.Machine.default()
    p = m.spawn(uid=0, rlimit_memlock=(MiB, 8 * MiB))
    p.setrlimit(resource.RLIMIT_MEMLOCK, (64 * MiB, 64 * MiB))
    assert p.getrlimit(resource.RLIMIT_MEMLOCK) == (64 * MiB, 64 * MiB)
    p.setrlimit(resource.RLIMIT_MEMLOCK, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
    assert p.getrlimit(resource.RLIMIT_MEMLOCK) == (resource.RLIM_INFINITY, resource.RLIM_INFINITY)


def test_root_loses_the_right_to_raise_hard_limits_after_setuid():
    m = vfiosim.Machine.default()
    p = m.spawn(uid=0, rlimit_memlock=(MiB, 8 * MiB))
    p.setuid(1000)
    expect_errno(errno.EPERM, p.setrlimit, resource.RLIMIT_MEMLOCK, (MiB, 16 * MiB))


# -- setuid(2) and permissions ----------------------------------------------------------------------------


def test_root_setuid_to_1000_sets_every_uid_and_drops_capabilities():
    m = vfiosim.Machine.default()
    p = m.spawn(uid=0)
    g = p.open("/dev/vfio/0", os.O_RDWR)            # root: allowed
    p.close(g)
    p.setuid(1000)
    assert p.getuid() == 1000
    assert p.geteuid() == 1000
    assert p.status()["Uid"][:3] == (1000, 1000, 1000)
    expect_errno(errno.EACCES, p.open, "/dev/vfio/0", os.O_RDWR)
    expect_errno(errno.EACCES, p.open, "/dev/vfio/0", os.O_RDONLY)
    c = p.open("/dev/vfio/vfio", os.O_RDWR)          # mode 0666
    assert p.ioctl(c, uapi.VFIO_GET_API_VERSION) == uapi.VFIO_API_VERSION


def test_setuid_away_from_root_is_irreversible():
    m = vfiosim.Machine.default()
    p = m.spawn(uid=0)
    p.setuid(1000)
    expect_errno(errno.EPERM, p.setuid, 0)
    assert (p.getuid(), p.geteuid()) == (1000, 1000)


def test_non_root_setuid_to_root_is_eperm():
    m = vfiosim.Machine.default()
    p = m.spawn(uid=1000, gid=1000)
    expect_errno(errno.EPERM, p.setuid, 0)
    expect_errno(errno.EPERM, p.setuid, 1001)
    assert (p.getuid(), p.geteuid()) == (1000, 1000)
    expect_errno(errno.EACCES, p.open, "/dev/vfio/0", os.O_RDWR)


def test_non_root_setuid_to_its_own_uid_succeeds():
    m = vfiosim.Machine.default()
    p = m.spawn(uid=1000, gid=1000)
    p.setuid(1000)
    assert (p.getuid(), p.geteuid()) == (1000, 1000)


def test_dropped_capabilities_make_iommu_enable_obey_rlimit_memlock():
    # tce_iommu_enable() charges the 32-bit window to locked_vm; without
    # CAP_IPC_LOCK that must fit RLIMIT_MEMLOCK (account_locked_vm -> ENOMEM).
    m = vfiosim.Machine.default()
    p = m.spawn(uid=0, rlimit_memlock=(8 * MiB, 8 * MiB))
    c, g = setup_v1(p, enable=False)
    p.setuid(1000)
    expect_errno(errno.ENOMEM, p.ioctl, c, uapi.VFIO_IOMMU_ENABLE)
    assert p.status()["VmLck"] == 0


# -- open(2), close(2), dup(2) ---------------------------------------------------------------------------


def test_open_of_a_nonexistent_path_is_enoent():
    p = vfiosim.Machine.default().spawn()
    for path in ("/dev/vfio/99", "/dev/nonexistent", "/etc/passwd", "/dev/vfio/vfio2"):
        expect_errno(errno.ENOENT, p.open, path, os.O_RDWR)
    assert p.task.files.fds() == [0, 1, 2]


@pytest.mark.parametrize("flags", [os.O_RDWR, os.O_WRONLY])
def test_open_of_dev_vfio_for_writing_is_eisdir(flags):
    p = vfiosim.Machine.default().spawn()
    expect_errno(errno.EISDIR, p.open, "/dev/vfio", flags)
    expect_errno(errno.EISDIR, p.open, "/dev/vfio/", flags)


def test_close_of_a_closed_fd_is_ebadf():
    p = vfiosim.Machine.default().spawn()
    fd = p.open("/dev/vfio/vfio", os.O_RDWR)
    p.close(fd)
    expect_errno(errno.EBADF, p.close, fd)
    expect_errno(errno.EBADF, p.close, 999)
    expect_errno(errno.EBADF, p.ioctl, fd, uapi.VFIO_GET_API_VERSION)


def test_fds_are_allocated_lowest_first_from_3():
    p = vfiosim.Machine.default().spawn()
    a = p.open("/dev/vfio/vfio", os.O_RDWR)
    b = p.open("/dev/vfio/vfio", os.O_RDWR)
    e = p.eventfd()
    assert (a, b, e) == (3, 4, 5)
    p.close(a)
    assert p.open("/dev/vfio/vfio", os.O_RDWR) == 3
    p.close(b)
    assert p.dup(e) == 4
    assert p.open("/dev/vfio/0", os.O_RDWR) == 6


def test_failed_open_does_not_consume_an_fd():
    p = vfiosim.Machine.default().spawn(uid=1000, gid=1000)
    expect_errno(errno.EACCES, p.open, "/dev/vfio/0", os.O_RDWR)
    expect_errno(errno.ENOENT, p.open, "/dev/vfio/42", os.O_RDWR)
    assert p.open("/dev/vfio/vfio", os.O_RDWR) == 3


def test_fds_0_to_2_are_open_at_spawn():
    p = vfiosim.Machine.default().spawn()
    for fd in (0, 1, 2):
        assert p.read(fd, 10) == b""
    assert p.write(1, b"hello") == 5


def test_dup_shares_the_open_file():
    p = vfiosim.Machine.default().spawn()
    e = p.eventfd()
    d = p.dup(e)
    p.write(e, (3).to_bytes(8, "little"))
    assert p.read(d, 8) == (3).to_bytes(8, "little")
    p.close(e)
    p.write(d, (1).to_bytes(8, "little"))
    assert p.read(d, 8) == (1).to_bytes(8, "little")


# -- /proc/<pid>/status ----------------------------------------------------------------------------------


def test_status_reports_name_pid_and_ids():
    m = vfiosim.Machine.default()
    p = m.spawn(uid=1000, gid=1001, name="myproc")
    s = p.status()
    assert s["Name"] == "myproc"
    assert s["Pid"] == p.pid
    assert s["Uid"] == (1000, 1000, 1000, 1000)
    assert s["Gid"] == (1001, 1001, 1001, 1001)
    assert p.pid in m.processes()


def test_status_vm_sizes_follow_mmap_writes_and_munmap(machine):
    ps = machine.page_size
    kb = ps // 1024
    p = machine.spawn()
    s0 = p.status()
    a = p.mmap(4 * ps)
    s1 = p.status()
    assert s1["VmSize"] - s0["VmSize"] == 4 * kb
    assert s1["VmRSS"] == s0["VmRSS"], "untouched anonymous memory is not resident"
    p.write_memory(a + ps, b"x")
    p.write_memory(a + 3 * ps - 1, b"yy")
    s2 = p.status()
    assert s2["VmRSS"] - s0["VmRSS"] == 3 * kb
    p.munmap(a, 4 * ps)
    s3 = p.status()
    assert s3["VmSize"] == s0["VmSize"]
    assert s3["VmRSS"] == s0["VmRSS"]


def test_status_vmlck_is_locked_vm_in_kb(machine):
    p = machine.spawn()
    assert p.status()["VmLck"] == 0
    setup_v1(p)
    assert p.mm.locked_vm > 0
    assert p.status()["VmLck"] == p.mm.locked_vm * machine.page_size // 1024
    assert p.status()["VmPin"] == p.mm.pinned_vm * machine.page_size // 1024


def test_status_fdsize_counts_allocated_fd_slots_not_open_fds():
    # proc(5): "FDSize: Number of file descriptor slots currently allocated",
    # i.e. files_fdtable()->max_fds, which starts at NR_OPEN_DEFAULT
    # (BITS_PER_LONG = 64) and only grows in multiples of it (alloc_fdtable).
    p = vfiosim.Machine.default().spawn()
    fdsize = p.status()["FDSize"]
    assert fdsize >= 64 and fdsize % 64 == 0, f"FDSize {fdsize}"
    p.open("/dev/vfio/vfio", os.O_RDWR)
    assert p.status()["FDSize"] == fdsize


# -- exit -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("platform,page_size,kernel", [
    ("powernv", 4096, "6.12"), ("powernv", 65536, "6.12"), ("pseries", 4096, "6.12"), ("pseries", 65536, "6.12"),
])
def test_exit_unpins_pages_and_refunds_locked_memory(platform, page_size, kernel):
    m = vfiosim.Machine.preset(platform, page_size=page_size, kernel=kernel)
    p = m.spawn(uid=0)
    c, g = setup_v1(p)
    info = get_info(p, c)
    size = 4 * page_size
    a = p.mmap(size)
    p.write_memory(a, b"\xa5" * size)
    dma_map(p, c, a, info.dma32_window_start, size)
    assert m.pinned_pages() > 0
    assert p.mm.locked_vm > 0
    p.exit()
    assert not p.alive
    assert m.pinned_pages() == 0
    assert p.mm.locked_vm == 0
    # The release path (tce_iommu_release -> tce_iommu_disable) refunded it to
    # the mm it was charged to: nothing was left over for the mm's teardown.
    assert not [line for line in m.dmesg() if "still charged" in line]
    assert p.pid not in m.processes()
    # The group was released: another process can use it.
    q = m.spawn(uid=0)
    c2, g2 = setup_v1(q)
    q.exit()
    assert m.pinned_pages() == 0


def test_exit_on_the_3_10_kernel_unpins_pages():
    m = vfiosim.Machine.default(kernel="3.10")
    p = m.spawn(uid=0)
    c, g = setup_v1(p)
    info = get_info(p, c)
    a = p.mmap(4096)
    p.write_memory(a, b"\x5a" * 4096)
    dma_map(p, c, a, info.dma32_window_start, 4096)
    assert m.pinned_pages() == 1
    p.exit()
    assert m.pinned_pages() == 0
    assert p.mm.locked_vm == 0


def test_calls_after_exit_raise_process_lookup_error():
    m = vfiosim.Machine.default()
    p = m.spawn()
    fd = p.open("/dev/vfio/vfio", os.O_RDWR)
    a = p.mmap(4096)
    p.exit()
    calls = [
        lambda: p.open("/dev/vfio/vfio", os.O_RDWR), lambda: p.close(fd),
        lambda: p.ioctl(fd, uapi.VFIO_GET_API_VERSION), lambda: p.mmap(4096), lambda: p.munmap(a, 4096),
        lambda: p.mprotect(a, 4096, PROT_READ), lambda: p.read_memory(a, 1), lambda: p.write_memory(a, b"x"),
        lambda: p.status(), lambda: p.setuid(0), lambda: p.getrlimit(resource.RLIMIT_MEMLOCK),
        lambda: p.setrlimit(resource.RLIMIT_MEMLOCK, (0, 0)), lambda: p.eventfd(), lambda: p.read(fd, 8),
        lambda: p.write(fd, b"x" * 8), lambda: p.pread(fd, 8, 0), lambda: p.dup(fd),
    ]
    for call in calls:
        with pytest.raises(ProcessLookupError):
            call()


def test_exit_twice_is_harmless():
    m = vfiosim.Machine.default()
    p = m.spawn()
    p.exit()
    p.exit()
    assert not p.alive


def test_exit_closes_the_group_so_its_node_opens_again():
    m = vfiosim.Machine.default()
    p = m.spawn()
    p.open("/dev/vfio/0", os.O_RDWR)
    q = m.spawn()
    expect_errno(errno.EBUSY, q.open, "/dev/vfio/0", os.O_RDWR)
    p.exit()
    assert q.open("/dev/vfio/0", os.O_RDWR) == 3


# -- eventfd(2) -------------------------------------------------------------------------------------------


def test_eventfd_read_returns_the_counter_little_endian_and_resets_it():
    p = vfiosim.Machine.default().spawn()
    e = p.eventfd(0, os.EFD_NONBLOCK)
    assert p.write(e, (5).to_bytes(8, "little")) == 8
    assert p.write(e, (0x1_0000_0002).to_bytes(8, "little")) == 8
    assert p.read(e, 8) == (0x1_0000_0007).to_bytes(8, "little")
    expect_errno(errno.EAGAIN, p.read, e, 8)


def test_eventfd_initial_value_is_readable():
    p = vfiosim.Machine.default().spawn()
    e = p.eventfd(42, os.EFD_NONBLOCK)
    assert p.read(e, 8) == (42).to_bytes(8, "little")
    expect_errno(errno.EAGAIN, p.read, e, 8)


def test_eventfd_semaphore_mode_reads_one_at_a_time():
    p = vfiosim.Machine.default().spawn()
    e = p.eventfd(2, os.EFD_SEMAPHORE | os.EFD_NONBLOCK)
    assert p.read(e, 8) == (1).to_bytes(8, "little")
    assert p.read(e, 8) == (1).to_bytes(8, "little")
    expect_errno(errno.EAGAIN, p.read, e, 8)


def test_read_of_an_empty_nonblocking_eventfd_is_eagain():
    p = vfiosim.Machine.default().spawn()
    e = p.eventfd(0, os.EFD_NONBLOCK)
    expect_errno(errno.EAGAIN, p.read, e, 8)


def test_eventfd_read_or_write_shorter_than_8_bytes_is_einval():
    p = vfiosim.Machine.default().spawn()
    e = p.eventfd(1, os.EFD_NONBLOCK)
    expect_errno(errno.EINVAL, p.read, e, 4)
    expect_errno(errno.EINVAL, p.write, e, b"\1\0\0\0")
    assert p.read(e, 8) == (1).to_bytes(8, "little")


def test_eventfd_write_of_all_ones_is_einval():
    p = vfiosim.Machine.default().spawn()
    e = p.eventfd(0, os.EFD_NONBLOCK)
    expect_errno(errno.EINVAL, p.write, e, b"\xff" * 8)


def test_eventfd_with_unknown_flags_is_einval():
    p = vfiosim.Machine.default().spawn()
    expect_errno(errno.EINVAL, p.eventfd, 0, 0x8)


def test_pread_on_an_eventfd_is_espipe():
    p = vfiosim.Machine.default().spawn()
    e = p.eventfd(1, os.EFD_NONBLOCK)
    expect_errno(errno.ESPIPE, p.pread, e, 8, 0)
    expect_errno(errno.ESPIPE, p.pwrite, e, (1).to_bytes(8, "little"), 0)
    assert p.read(e, 8) == (1).to_bytes(8, "little")


def test_pread_on_a_container_fd_is_einval():
    # vfio_fops has no .read: vfs_read() finds no FMODE_CAN_READ -> -EINVAL.
    p = vfiosim.Machine.default().spawn()
    c = p.open("/dev/vfio/vfio", os.O_RDWR)
    expect_errno(errno.EINVAL, p.pread, c, 8, 0)
    expect_errno(errno.EINVAL, p.read, c, 8)
    expect_errno(errno.EINVAL, p.pwrite, c, b"x" * 8, 0)
