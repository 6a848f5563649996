"""mlock(2) and munlock(2) (mm/mlock.c: do_mlock, apply_vma_lock_flags, mlock_fixup).

VmLck counts the pages of VM_LOCKED VMAs; mlock charges them against
RLIMIT_MEMLOCK (unless CAP_IPC_LOCK), munlock and munmap give them back.
"""

from __future__ import annotations

import errno

import pytest

import vfiosim

MiB = 1 << 20


@pytest.fixture(params=["x86", "powernv"])
def m(request):
    return vfiosim.Machine.preset(request.param)


def vmlck(p) -> int:
    return p.status()["VmLck"]


def test_mlock_charges_vmlck_and_munlock_refunds_it(m):
    p = m.spawn(uid=1000, rlimit_memlock=(4 * MiB, 4 * MiB))
    buf = p.mmap(2 * MiB)
    p.mlock(buf, MiB)
    assert vmlck(p) == 1024
    p.mlock(buf, MiB)                         # already locked: not charged again
    assert vmlck(p) == 1024
    p.mlock(buf + MiB // 2, MiB)              # half overlaps: only the new half counts
    assert vmlck(p) == 1536
    p.munlock(buf, 2 * MiB)
    assert vmlck(p) == 0
    assert p.mm.locked_bytes() == 0


def test_mlock_populates_writable_memory(m):
    p = m.spawn()
    buf = p.mmap(MiB)
    assert p.status()["VmRSS"] == 0
    p.mlock(buf, MiB)
    assert p.status()["VmRSS"] == 1024


def test_mlock_rounds_the_range_to_whole_pages(m):
    p = m.spawn()
    buf = p.mmap(4 * m.page_size)
    p.mlock(buf + 100, m.page_size)           # touches two pages
    assert vmlck(p) == 2 * m.page_size // 1024
    p.mlock(buf, 0)                           # nothing to do
    assert vmlck(p) == 2 * m.page_size // 1024


def test_mlock_over_the_limit_is_enomem_and_locks_nothing(m):
    p = m.spawn(uid=1000, rlimit_memlock=(MiB, MiB))
    buf = p.mmap(2 * MiB)
    with pytest.raises(OSError) as exc:
        p.mlock(buf, MiB + m.page_size)
    assert exc.value.errno == errno.ENOMEM
    assert vmlck(p) == 0
    p.mlock(buf, MiB)                         # exactly the limit is fine
    assert vmlck(p) == 1024


def test_root_may_exceed_the_limit(m):
    p = m.spawn(uid=0, rlimit_memlock=(MiB, MiB))
    buf = p.mmap(4 * MiB)
    p.mlock(buf, 4 * MiB)
    assert vmlck(p) == 4096


def test_zero_rlimit_without_cap_ipc_lock_is_eperm(m):
    p = m.spawn(uid=1000, rlimit_memlock=(0, 0))
    buf = p.mmap(MiB)
    with pytest.raises(OSError) as exc:
        p.mlock(buf, m.page_size)
    assert exc.value.errno == errno.EPERM
    root = m.spawn(uid=0, rlimit_memlock=(0, 0))
    rbuf = root.mmap(MiB)
    root.mlock(rbuf, MiB)                     # can_do_mlock(): CAP_IPC_LOCK is enough
    assert vmlck(root) == 1024


def test_unmapped_ranges_are_enomem_and_a_hole_stops_the_walk(m):
    p = m.spawn()
    a = p.mmap(MiB)
    b = p.mmap(MiB)                           # a guard page separates the two
    with pytest.raises(OSError) as exc:
        p.mlock(a + 2 * MiB + 2 * m.page_size, m.page_size)   # nothing there
    assert exc.value.errno == errno.ENOMEM
    with pytest.raises(OSError) as exc:
        p.mlock(a, b + MiB - a)               # a, the hole, b
    assert exc.value.errno == errno.ENOMEM
    # apply_vma_lock_flags() locked the VMA before the hole, as Linux does.
    assert vmlck(p) == 1024
    with pytest.raises(OSError) as exc:
        p.munlock(a, b + MiB - a)
    assert exc.value.errno == errno.ENOMEM
    assert vmlck(p) == 0


def test_a_wrapping_range_is_einval(m):
    p = m.spawn()
    buf = p.mmap(MiB)
    with pytest.raises(OSError) as exc:
        p.mlock(buf, (1 << 64) - buf - m.page_size + 1)
    assert exc.value.errno == errno.EINVAL
    with pytest.raises(OSError) as exc:
        p.munlock(buf, (1 << 64) - buf - m.page_size + 1)
    assert exc.value.errno == errno.EINVAL


def test_prot_none_is_locked_but_enomem(m):
    """__mm_populate() cannot fault PROT_NONE pages: EFAULT, which
    __mlock_posix_error_return() reports as ENOMEM; the VMA stays locked."""
    p = m.spawn()
    buf = p.mmap(MiB, vfiosim.PROT_NONE)
    with pytest.raises(OSError) as exc:
        p.mlock(buf, MiB)
    assert exc.value.errno == errno.ENOMEM
    assert vmlck(p) == 1024


def test_munmap_of_locked_memory_unlocks_it(m):
    p = m.spawn()
    buf = p.mmap(2 * MiB)
    p.mlock(buf, 2 * MiB)
    p.munmap(buf, MiB)
    assert vmlck(p) == 1024
    p.munmap(buf + MiB, MiB)
    assert vmlck(p) == 0


def test_huge_page_mappings_are_not_counted():
    """mlock_fixup() leaves hugetlb VMAs alone."""
    m = vfiosim.Machine.preset("x86")
    p = m.spawn()
    buf = p.mmap(4 * MiB, page_size=2 * MiB)
    p.mlock(buf, 4 * MiB)
    assert vmlck(p) == 0
