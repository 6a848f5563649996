"""The machine's RAM is a bound (issue 14): pages cost RAM when first touched
or pinned, never when only mapped; a pin past what is left fails as Linux
6.12 fails it, in each pin path; mmap(2) follows heuristic overcommit and
vm.max_map_count.

Upstream sources of each errno:
- Type1: vaddr_get_pfns() -> pin_user_pages_remote(FOLL_LONGTERM): a page
  that cannot be faulted in (handle_mm_fault() VM_FAULT_OOM, vm_fault_to_errno)
  is -ENOMEM; vfio_pin_map_dma() unwinds and MAP_DMA returns it.
- sPAPR v1: tce_iommu_use_page(): pin_user_pages_fast() != 1 is -EFAULT.
- sPAPR v2: mm_iommu_do_alloc(): pin_user_pages() returns the pages it
  pinned before the one it could not; a short chunk leaves through
  free_exit with that positive count as the return value (deviations.md 3e),
  none pinned is -ENOMEM.
- mlock(2): __mm_populate()'s -ENOMEM is EAGAIN (__mlock_posix_error_return).
- mmap(2): __vm_enough_memory() with vm.overcommit_memory=0 refuses a single
  accountable mapping larger than RAM + swap (mm/util.c); do_mmap() refuses
  when mm->map_count > vm.max_map_count; split_vma() when it is >= it.
"""

from __future__ import annotations

import ctypes
import dataclasses
import errno
import resource
from importlib import resources

import pytest

import vfiosim
from vfiosim import PROT_NONE, PROT_READ, PROT_WRITE, uapi
from vfiosim.machine import PRESETS
from vfiosim.machine_spec import load_spec_text
from vfioutil import dma_map, dma_unmap, setup_v1

KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30
PAGE = 4096


def machine(preset: str, ram: int) -> vfiosim.Machine:
    """A preset with less (or more) RAM than its 4 GiB."""
    text = resources.files("vfiosim.presets").joinpath(PRESETS[preset]).read_text()
    return vfiosim.Machine(dataclasses.replace(load_spec_text(text, preset), ram=ram))


def expect_errno(err: int, fn, *args, **kwargs) -> OSError:
    with pytest.raises(OSError) as info:
        fn(*args, **kwargs)
    assert info.value.errno == err, f"expected {errno.errorcode[err]}, got {info.value!r}"
    return info.value


def free(m) -> int:
    return m.meminfo()["MemFree"] * KiB


def type1(m, p, group=4):
    c, g = setup_v1(p, group, iommu=uapi.VFIO_TYPE1v2_IOMMU, enable=False)
    return c


def used_matches_present(m) -> bool:
    phys = m.kernel.phys
    return phys.used_pages == sum(int(o.populated.sum()) for o in phys.objects() if o.owner is phys)


# -- touching, not mapping, costs RAM ------------------------------------------------------------


def test_meminfo_is_the_machine_files_ram():
    m = vfiosim.Machine.preset("x86")
    assert m.meminfo() == {"MemTotal": 4 * GiB // KiB, "MemFree": 4 * GiB // KiB}


def test_pages_use_ram_when_first_touched_and_give_it_back_when_unmapped():
    m = machine("x86", 64 * MiB)
    p = m.spawn()
    buf = p.mmap(16 * MiB)
    assert free(m) == 64 * MiB                                   # mapped, not touched
    p.read_memory(buf, 8 * MiB)                                  # reads map the zero page
    assert free(m) == 64 * MiB
    p.write_memory(buf + 4 * MiB, b"x" * (2 * MiB + 1))          # 513 pages touched
    assert free(m) == 64 * MiB - 513 * PAGE
    p.write_memory(buf + 4 * MiB, b"y")                          # already present
    assert free(m) == 64 * MiB - 513 * PAGE
    p.munmap(buf + 4 * MiB, PAGE)                                # one page goes back at once
    assert free(m) == 64 * MiB - 512 * PAGE
    p.munmap(buf, 16 * MiB)
    assert free(m) == 64 * MiB and used_matches_present(m)


def test_a_pinned_page_outlives_its_mapping_and_frees_with_its_last_pin():
    m = machine("x86", 64 * MiB)
    p = m.spawn()
    c = type1(m, p)
    buf = p.mmap(1 * MiB)
    assert dma_map(p, c, buf, 0x100000, 1 * MiB) == 0           # the pin faults every page in
    assert free(m) == 63 * MiB
    p.munmap(buf, 1 * MiB)                                       # still pinned: still RAM
    assert free(m) == 63 * MiB
    dma_unmap(p, c, 0x100000, 1 * MiB)
    assert free(m) == 64 * MiB and m.pinned_pages() == 0 and used_matches_present(m)


def test_exit_gives_everything_back():
    m = machine("x86", 64 * MiB)
    p = m.spawn()
    c = type1(m, p)
    a, b = p.mmap(8 * MiB), p.mmap(8 * MiB)
    p.write_memory(a, b"x" * (8 * MiB))
    dma_map(p, c, b, 0x100000, 8 * MiB)
    assert free(m) == 48 * MiB
    p.exit()
    assert free(m) == 64 * MiB and used_matches_present(m)


# -- pins past the RAM that is left ---------------------------------------------------------------------


def test_type1_map_dma_past_ram_fails_with_enomem_and_keeps_nothing_pinned():
    m = machine("x86", 64 * MiB)
    p = m.spawn()
    c = type1(m, p)
    a, b = p.mmap(48 * MiB), p.mmap(48 * MiB)
    assert dma_map(p, c, a, 0x100000, 48 * MiB) == 0
    e = expect_errno(errno.ENOMEM, dma_map, p, c, b, 0x10000000, 48 * MiB)
    assert "no free page of RAM" in str(e)
    assert any(line.endswith("(docs/deviations.md 12)") and "pin_user_pages_remote" in line for line in m.dmesg())
    assert p.status()["VmLck"] == 48 * MiB // KiB                # nothing of b stays pinned or charged
    assert m.pinned_pages() == 48 * MiB // PAGE
    # The pages the failed pin faulted in stay the process's, as on Linux.
    assert free(m) == 0 and p.status()["VmRSS"] == 64 * MiB // KiB
    dma_unmap(p, c, 0x100000, 48 * MiB)
    p.munmap(a, 48 * MiB)
    assert dma_map(p, c, b, 0x10000000, 48 * MiB) == 0            # room again
    assert used_matches_present(m)


def test_spapr_v1_map_dma_past_ram_is_efault():
    """tce_iommu_use_page(): any pin_user_pages_fast() failure is -EFAULT."""
    m = machine("powernv", 64 * MiB)
    p = m.spawn()
    c, _ = setup_v1(p)
    a = p.mmap(96 * MiB, PROT_READ | PROT_WRITE, noreserve=True)
    e = expect_errno(errno.EFAULT, dma_map, p, c, a, 0, 96 * MiB)
    assert "no free page of RAM" in str(e)
    assert m.pinned_pages() == 0
    assert dma_map(p, c, a, 0, 32 * MiB) == 0


def test_spapr_v2_register_memory_past_ram_returns_the_count_upstream_leaves():
    """mm_iommu_do_alloc(): a chunk pinned short leaves with the positive count
    (deviations.md 3e); with no page free at all it is -ENOMEM."""
    m = machine("powernv", 64 * MiB)
    p = m.spawn(rlimit_memlock=(1 << 40, 1 << 40))
    c, _ = setup_v1(p, iommu=uapi.VFIO_SPAPR_TCE_v2_IOMMU, enable=False)
    a, b = p.mmap(48 * MiB), p.mmap(48 * MiB)
    reg = uapi.VFIO_IOMMU_SPAPR_REGISTER_MEMORY

    def register(vaddr, size):
        return p.ioctl(c, reg, uapi.vfio_iommu_spapr_register_memory(argsz=24, vaddr=vaddr, size=size))
    assert register(a, 48 * MiB) == 0
    assert register(b, 48 * MiB) == 16 * MiB // PAGE               # what fit, as a return value
    assert any("3e" in line or "positive" in line for line in m.dmesg())
    assert p.status()["VmLck"] == 48 * MiB // KiB and m.pinned_pages() == 48 * MiB // PAGE
    expect_errno(errno.ENOMEM, register, b + 32 * MiB, 16 * MiB)   # RAM is full: the first page fails


def test_mlock_past_ram_is_eagain_and_leaves_the_range_locked():
    m = machine("x86", 64 * MiB)
    p = m.spawn()
    a = p.mmap(96 * MiB, noreserve=True)
    expect_errno(errno.EAGAIN, p.mlock, a, 96 * MiB)
    assert p.status()["VmLck"] == 96 * MiB // KiB                # VM_LOCKED, as apply_vma_lock_flags left it
    assert free(m) == 0


def test_copy_to_user_into_a_page_no_ram_is_left_for_is_efault():
    m = machine("x86", 64 * MiB)
    p = m.spawn()
    c = type1(m, p)
    out = p.mmap(2 * PAGE)
    info = out + PAGE - 8                      # argsz and flags in a present page, the rest in the next
    p.write_memory(info, ctypes.c_uint32(ctypes.sizeof(uapi.vfio_iommu_type1_info)))
    hog = p.mmap(64 * MiB - PAGE)
    dma_map(p, c, hog, 0x100000, 64 * MiB - PAGE)                 # every other page of RAM pinned
    assert free(m) == 0
    # The kernel's write-back is copy_to_user(): no OOM killer, the fault fails.
    expect_errno(errno.EFAULT, p.ioctl, c, uapi.VFIO_IOMMU_GET_INFO, info)
    assert p.alive


def test_fork_that_cannot_copy_its_pages_is_enomem():
    m = machine("x86", 64 * MiB)
    p = m.spawn()
    a = p.mmap(40 * MiB)
    p.write_memory(a, b"x" * (40 * MiB))
    expect_errno(errno.ENOMEM, p.fork)
    assert free(m) == 24 * MiB and len(m.processes()) == 1 and used_matches_present(m)


# -- the OOM killer for a process's own stores ----------------------------------------------------------------


def test_a_store_that_finds_no_ram_kills_the_largest_process():
    m = machine("x86", 64 * MiB)
    big, small = m.spawn(name="big"), m.spawn(name="small")
    a = big.mmap(40 * MiB)
    big.write_memory(a, b"x" * (40 * MiB))
    b = small.mmap(32 * MiB)
    small.write_memory(b, b"y" * (32 * MiB))                     # needs 8 MiB more than is free
    assert not big.alive and small.alive
    assert small.read_memory(b + 32 * MiB - 1, 1) == b"y"
    kills = [line for line in m.dmesg() if line.startswith("Out of memory: Killed process")]
    assert kills == [f"Out of memory: Killed process {big.pid} (big) total-vm:{40 * MiB // KiB}kB, "
                     f"anon-rss:{40 * MiB // KiB}kB, file-rss:0kB, shmem-rss:0kB, UID:0 pgtables:80kB "
                     f"oom_score_adj:0"]
    assert any("small invoked oom-killer" in line for line in m.dmesg())
    c = small.mmap(64 * MiB, noreserve=True)
    with pytest.raises(ProcessLookupError, match="OOM killer"):
        small.write_memory(c, b"z" * (64 * MiB))                 # it is the largest now: it goes
    assert not small.alive and free(m) == 64 * MiB and used_matches_present(m)


# -- overcommit: memory costs what is touched, not what is mapped -------------------------------------------------


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def test_a_mapping_larger_than_ram_is_refused_by_the_heuristic_overcommit():
    m = vfiosim.Machine.preset("x86")                            # 4 GiB of RAM, no swap
    p = m.spawn()
    e = expect_errno(errno.ENOMEM, p.mmap, 64 * GiB)
    assert "overcommit" in str(e)
    assert any(f"pid: {p.pid}, comm: sim, bytes: {64 * GiB} not enough memory for the allocation" in line
               for line in m.dmesg())
    p.mmap(4 * GiB)                                              # not larger than RAM: accepted
    p.mmap(64 * GiB, PROT_NONE)                                  # not accountable: accepted
    r = p.mmap(64 * GiB, PROT_READ)
    expect_errno(errno.ENOMEM, p.mprotect, r, 64 * GiB, PROT_READ | PROT_WRITE)   # mprotect_fixup() charges it


@pytest.mark.parametrize("how", ["noreserve", "overcommit_always", "many_mappings"])
def test_far_more_than_the_host_has_can_be_mapped_and_a_little_of_it_pinned(how):
    """64 GiB (the host has 24) mapped in-process, a page touched near its end,
    4 KiB of it DMA-mapped: the simulator's own memory grows by what is used."""
    m = vfiosim.Machine.preset("x86")
    p = m.spawn()
    c = type1(m, p)
    before = rss_bytes()
    if how == "many_mappings":                                  # 20 x 3.2 GiB, each under RAM
        bufs = [p.mmap(3200 * MiB) for _ in range(20)]
        buf, size = bufs[-1], 3200 * MiB
    else:
        if how == "overcommit_always":
            m.sysctl("vm.overcommit_memory", 1)
        size = 64 * GiB
        buf = p.mmap(size, noreserve=how == "noreserve")
    p.write_memory(buf + size - PAGE, b"edge")
    assert dma_map(p, c, buf + size - 2 * PAGE, 0x100000, 2 * PAGE) == 0
    assert p.read_memory(buf + size - PAGE, 4) == b"edge"
    assert p.status()["VmSize"] >= 60 * GiB // KiB and p.status()["VmRSS"] == 8
    assert free(m) == 4 * GiB - 2 * PAGE
    assert rss_bytes() - before < 256 * MiB, "the simulator's memory must follow what is used"
    dma_unmap(p, c, 0x100000, 2 * PAGE)
    p.exit()
    assert free(m) == 4 * GiB


def test_overcommit_sysctl_values():
    m = vfiosim.Machine.preset("x86")
    assert m.sysctl("vm.overcommit_memory") == 0 and m.sysctl("vm.max_map_count") == 65530
    with pytest.raises(ValueError, match="strict commit accounting"):
        m.sysctl("vm.overcommit_memory", 2)
    with pytest.raises(ValueError, match="unknown sysctl"):
        m.sysctl("vm.swappiness")


# -- vm.max_map_count ----------------------------------------------------------------------------------------------


def test_mmap_stops_at_vm_max_map_count_as_linux_does():
    """do_mmap() refuses when map_count > max_map_count: the mm can hold
    max + 1 mappings (none merge here: each has a guard page after it)."""
    m = vfiosim.Machine.preset("x86")
    p = m.spawn()
    for _ in range(65531):
        p.mmap(PAGE)
    e = expect_errno(errno.ENOMEM, p.mmap, PAGE)
    assert "vm.max_map_count" in str(e)
    assert p.mm.map_count == 65531


def test_splits_past_vm_max_map_count_are_enomem():
    m = vfiosim.Machine.preset("x86")
    m.sysctl("vm.max_map_count", 10)
    p = m.spawn()
    bufs = [p.mmap(4 * PAGE) for _ in range(10)]
    assert p.mm.map_count == 10
    expect_errno(errno.ENOMEM, p.mprotect, bufs[0], PAGE, PROT_READ)      # split_vma(): map_count >= max
    p.mprotect(bufs[0], 4 * PAGE, PROT_READ)                              # a whole VMA: no split
    p.mprotect(bufs[0], PAGE, PROT_READ)                                  # no change: no split
    expect_errno(errno.ENOMEM, p.munmap, bufs[1] + PAGE, PAGE)            # a hole would add one
    p.munmap(bufs[1], PAGE)                                               # trimming the end adds none
    expect_errno(errno.ENOMEM, p.mlock, bufs[2] + PAGE, PAGE)
    p.mmap(PAGE)                                                          # 11: max + 1 is reached...
    expect_errno(errno.ENOMEM, p.mmap, PAGE)                              # ...and no further
    expect_errno(errno.ENOMEM, p.mmap, PAGE, fd=0)                        # a device mapping counts too
    m.sysctl("vm.max_map_count", 65530)
    p.mprotect(bufs[0], PAGE, PROT_READ | PROT_WRITE)
    assert p.mm.map_count == 12
