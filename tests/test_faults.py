"""Fault injection: every failure point of every bulk operation rolls back as Linux does.

For each operation below the walk first runs it once without a fault and
counts the events it consults at each kind of fault site (kernel/faults.py).
Then, for every N from 1 to that count, on a fresh machine set up the same
way, it makes the Nth event fail (``m.inject_fault(N, kind)``) and checks:

* the errno is the one the kernel's error path returns for that site;
* the machine is exactly as before the call (``machinestate.snapshot``:
  every TCE and userspace-address entry, VT-d extents, every page pin, each
  process's locked_vm and preregistered regions, containers and groups) --
  or differs by exactly what upstream leaks (a table charge, a region's
  mapping count), which dmesg then explains;
* the same call made again without a fault succeeds and leaves the state a
  clean run leaves (so nothing half-done got in the way);

and finally that with N one past the count nothing fires.
"""

from __future__ import annotations

import ctypes
import errno
import os
import struct
from dataclasses import dataclass, field
from typing import Any, Callable

import pytest

import vfiosim
from vfiosim import uapi
from vfiosim.kernel import faults as F
from machinestate import diff, snapshot
from vfioutil import dma_map, dma_unmap

KiB, MiB = 1 << 10, 1 << 20


def call(fn, *args) -> tuple[int, int]:
    """(return value, errno) of a call that may fail."""
    try:
        return fn(*args), 0
    except OSError as exc:
        assert exc.errno != errno.EIO, exc
        return -1, exc.errno


def open_groups(p, groups, iommu):
    c = p.open("/dev/vfio/vfio")
    gfds = []
    for gid in groups:
        g = p.open(f"/dev/vfio/{gid}")
        p.ioctl(g, uapi.VFIO_GROUP_SET_CONTAINER, ctypes.c_int32(c))
        gfds.append(g)
    if iommu is not None:
        p.ioctl(c, uapi.VFIO_SET_IOMMU, iommu)
    return c, gfds


def register(p, c, vaddr, size, unregister=False):
    r = uapi.vfio_iommu_spapr_register_memory(argsz=24, vaddr=vaddr, size=size)
    cmd = uapi.VFIO_IOMMU_SPAPR_UNREGISTER_MEMORY if unregister else uapi.VFIO_IOMMU_SPAPR_REGISTER_MEMORY
    return p.ioctl(c, cmd, r)


def tce_create(p, c, shift=16, size=1 << 30, levels=1):
    s = uapi.vfio_iommu_spapr_tce_create(argsz=40, page_shift=shift, window_size=size, levels=levels)
    p.ioctl(c, uapi.VFIO_IOMMU_SPAPR_TCE_CREATE, s)
    return s.start_addr


def tce_remove(p, c, start):
    s = uapi.vfio_iommu_spapr_tce_remove(argsz=16, start_addr=start)
    return p.ioctl(c, uapi.VFIO_IOMMU_SPAPR_TCE_REMOVE, s)


def dirty_start(p, c):
    return p.ioctl(c, uapi.VFIO_IOMMU_DIRTY_PAGES, bytearray(struct.pack("<II", 8, 1)))


@dataclass
class Ctx:
    m: Any
    p: Any
    c: int = -1
    g: list = field(default_factory=list)
    buf: int = 0
    extra: dict = field(default_factory=dict)


def mkbuf(p, size):
    buf = p.mmap(size)
    p.write_memory(buf, b"\xa5" * size)
    return buf


# -- the operations -------------------------------------------------------------------------------

def v1_setup(platform, window=True, enable=True):
    def setup() -> Ctx:
        m = vfiosim.Machine.preset(platform)
        p = m.spawn(rlimit_memlock=(64 * MiB, 64 * MiB))
        c, g = open_groups(p, [0], uapi.VFIO_SPAPR_TCE_IOMMU)
        if enable:
            p.ioctl(c, uapi.VFIO_IOMMU_ENABLE)
        ctx = Ctx(m, p, c, g, mkbuf(p, 4 * MiB))
        if window:
            # The default window exists and something is mapped already.
            dma_map(p, c, ctx.buf + MiB, 0x100000, 64 * KiB)
        return ctx
    return setup


def v2_setup(levels=None, groups=(0, 1), region=None, default_window=True, other_group=False):
    def setup() -> Ctx:
        m = vfiosim.Machine.preset("powernv")
        p = m.spawn(rlimit_memlock=(1 << 40, 1 << 40))
        c, g = open_groups(p, list(groups), uapi.VFIO_SPAPR_TCE_v2_IOMMU)
        ctx = Ctx(m, p, c, g, mkbuf(p, 8 * MiB))
        if levels is not None or not default_window:
            tce_remove(p, c, 0)                    # no default window: window 0 is ours
        if levels is not None:
            ctx.extra["win"] = tce_create(p, c, shift=12, size=1 << 30, levels=levels)
        if other_group:
            ctx.extra["g1"] = p.open("/dev/vfio/1")
        if region is not None:
            register(p, c, ctx.buf, region)
        return ctx
    return setup


def x86_groups_ready(mappings=0):
    def setup() -> Ctx:
        m = vfiosim.Machine.preset("x86")
        p = m.spawn(rlimit_memlock=(64 * MiB, 64 * MiB))
        c, g = open_groups(p, [4, 5], uapi.VFIO_TYPE1v2_IOMMU)
        ctx = Ctx(m, p, c, g, mkbuf(p, 8 * MiB))
        for i in range(mappings):
            dma_map(p, c, ctx.buf + i * MiB, 0x10000000 + i * MiB, 256 * KiB)
        return ctx
    return setup


@dataclass
class Walk:
    name: str
    setup: Callable[[], Ctx]
    op: Callable[[Ctx], int]
    kinds: tuple[str, ...]
    # what the failure at a site looks like: errno, or a callable (site, n, ctx) -> expected (ret, errno)
    expect: Callable[[str, int, Ctx, int], tuple[int, int]] | None = None
    # what upstream leaks when ``site`` fails: a callable applied to the before-snapshot
    leak: Callable[[dict, str, Ctx], None] | None = None
    # undoes a successful op: the walk then goes on on the same machine (the
    # state after each failure and each undo must be the state before)
    undo: Callable[[Ctx], Any] | None = None


def errno_of(site: str) -> int:
    kind = site.split(":")[0]
    if site == "pin_user_pages:tce_iommu_use_page":
        return errno.EFAULT
    return errno.ENXIO if kind == "opal" else errno.ENOMEM


def table_charge_leaks(before: dict, site: str, ctx: Ctx) -> None:
    """tce_iommu_create_table() charges before the platform builds the table;
    a platform failure is not refunded (docs/deviations.md 3)."""
    if site in ("kmalloc:pnv_pci_table_alloc", "alloc_pages:pnv_pci_ioda2_table_alloc_pages",
                "alloc_pages:pnv_pci_ioda2_table_alloc_pages.uas"):
        tg = ctx.m.pe_of(ctx.m.iommu_groups()[0][0]).table_group
        size = ctx.extra.get("table_size") or tg.get_table_size(12, tg.tce32_size, 1)
        before["tasks"][ctx.p.pid]["locked_vm"] += size >> ctx.m.kernel.page_shift


def v2_level_leaks(before: dict, site: str, ctx: Ctx) -> None:
    """A failed TCE level in tce_iommu_build_v2() leaves the region one
    mapping it never loses (docs/deviations.md 3d)."""
    if site == "alloc_pages:pnv_tce":
        regions = before["tasks"][ctx.p.pid]["regions"]
        (ua, entries, used, mapped), = regions
        before["tasks"][ctx.p.pid]["regions"] = ((ua, entries, used, mapped + 1),)


def prereg_expect(site: str, n: int, ctx: Ctx, count: int) -> tuple[int, int]:
    if site == "pin_user_pages:mm_iommu_do_alloc" and n > 1:
        return n - 1, 0                       # pin_user_pages() pinned n-1 pages: that count is returned
    return -1, errno_of(site)


def type1_pin_expect(site: str, n: int, ctx: Ctx, count: int) -> tuple[int, int]:
    if site == "pin_user_pages:vaddr_get_pfns" and (n - 1) % 512:
        return 0, 0                           # a short pin: the next vaddr_get_pfns() call pins the rest
    return -1, errno_of(site)


WALKS = [
    Walk("v1 ENABLE", v1_setup("powernv", window=False, enable=False),
         lambda x: x.p.ioctl(x.c, uapi.VFIO_IOMMU_ENABLE), ("account_locked_vm",)),
    Walk("v1 MAP_DMA creating the default window", v1_setup("powernv", window=False),
         lambda x: dma_map(x.p, x.c, x.buf, 0, 64 * KiB),
         ("account_locked_vm", "kmalloc", "alloc_pages", "opal"), leak=table_charge_leaks),
    Walk("v1 MAP_DMA (PowerNV)", v1_setup("powernv"), lambda x: dma_map(x.p, x.c, x.buf, 0x200000, 64 * KiB),
         ("pin_user_pages",), undo=lambda x: dma_unmap(x.p, x.c, 0x200000, 64 * KiB)),
    Walk("v1 MAP_DMA (pseries)", v1_setup("pseries"), lambda x: dma_map(x.p, x.c, x.buf, 0x200000, 64 * KiB),
         ("pin_user_pages",), undo=lambda x: dma_unmap(x.p, x.c, 0x200000, 64 * KiB)),
    Walk("v2 SET_IOMMU of two groups", lambda: (lambda m: (lambda p: Ctx(m, p, *open_groups(p, [0, 1], None)))(
        m.spawn()))(vfiosim.Machine.preset("powernv")),
         lambda x: x.p.ioctl(x.c, uapi.VFIO_SET_IOMMU, uapi.VFIO_SPAPR_TCE_v2_IOMMU), ("kmalloc",)),
    Walk("v2 REGISTER_MEMORY", v2_setup(), lambda x: register(x.p, x.c, x.buf + MiB, 64 * KiB),
         ("account_locked_vm", "kmalloc", "pin_user_pages"), expect=prereg_expect),
    Walk("v2 TCE_CREATE on two PEs", v2_setup(default_window=False),
         lambda x: tce_create(x.p, x.c, shift=16, size=1 << 32, levels=2),
         ("account_locked_vm", "kmalloc", "alloc_pages", "opal"), leak=table_charge_leaks),
    Walk("v2 MAP_DMA across TCE levels", v2_setup(levels=2, groups=(0,), region=8 * MiB),
         lambda x: dma_map(x.p, x.c, x.buf, x.extra["win"] + 256 * 4 * KiB, 4 * MiB),
         ("alloc_pages",), leak=v2_level_leaks),
    Walk("v2 GROUP_SET_CONTAINER into a container with windows", v2_setup(levels=1, groups=(0,), other_group=True),
         lambda x: x.p.ioctl(x.extra["g1"], uapi.VFIO_GROUP_SET_CONTAINER, ctypes.c_int32(x.c)),
         ("kmalloc", "opal")),
    Walk("Type1 SET_IOMMU of two groups", lambda: (lambda m: (lambda p: Ctx(m, p, *open_groups(p, [4, 5], None)))(
        m.spawn()))(vfiosim.Machine.preset("x86")),
         lambda x: x.p.ioctl(x.c, uapi.VFIO_SET_IOMMU, uapi.VFIO_TYPE1v2_IOMMU), ("kmalloc",)),
    Walk("Type1 MAP_DMA", x86_groups_ready(mappings=1),
         lambda x: dma_map(x.p, x.c, x.buf + 2 * MiB, 0x40000000, 520 * 4 * KiB),
         ("kmalloc", "pin_user_pages", "account_locked_vm", "iommu_map"), expect=type1_pin_expect,
         undo=lambda x: dma_unmap(x.p, x.c, 0x40000000, 520 * 4 * KiB)),
    Walk("Type1 DIRTY_PAGES start", x86_groups_ready(mappings=3), lambda x: dirty_start(x.p, x.c), ("kmalloc",)),
]


def table_size_of(walk: Walk, ctx: Ctx) -> None:
    if walk.name.startswith("v2 TCE_CREATE"):
        tg = ctx.m.pe_of(ctx.m.iommu_groups()[0][0]).table_group
        ctx.extra["table_size"] = tg.get_table_size(16, 1 << 32, 2)


@pytest.mark.parametrize("walk", WALKS, ids=[w.name for w in WALKS])
def test_every_failure_point_rolls_back_as_linux_does(walk: Walk):
    # A clean run: what the operation returns, the state it leaves, the events it consults.
    ref = walk.setup()
    ref.m.faults.reset_counts()
    ret0, err0 = call(walk.op, ref)
    assert err0 == 0, f"{walk.name} fails without a fault: {os.strerror(err0)}"
    clean = snapshot(ref.m)
    counts = {kind: ref.m.faults.count(kind) for kind in walk.kinds}
    assert any(counts.values()), f"{walk.name} consults none of {walk.kinds}"
    for kind, total in counts.items():
        assert total, f"{walk.name} consults no {kind} site"
        ctx = None
        for n in range(1, total + 1):
            if ctx is None or walk.undo is None:
                if ctx is not None:
                    ctx.p.exit()
                    assert ctx.m.pinned_pages() == 0
                ctx = walk.setup()
                table_size_of(walk, ctx)
            before = snapshot(ctx.m)
            ctx.m.faults.fired.clear()
            ctx.m.inject_fault(n, kind)
            ret, err = call(walk.op, ctx)
            fired = ctx.m.faults.fired
            assert len(fired) == 1 and fired[0].startswith(kind + ":"), (walk.name, kind, n, fired)
            site = fired[0]
            assert site in F.SITES
            want = walk.expect(site, n, ctx, total) if walk.expect else (-1, errno_of(site))
            if want == (0, 0):
                # The fault was absorbed (a short pin the next call completes): all work done.
                assert (ret, err) == (ret0, 0), (walk.name, site, n, ret, err)
                assert snapshot(ctx.m) == clean, f"{walk.name}, {site} #{n}:\n" + diff(clean, snapshot(ctx.m))
            else:
                if want[0] > 0:
                    assert (ret, err) == want, (walk.name, site, n, ret, err)
                else:
                    assert err == want[1], (walk.name, site, n, ret, os.strerror(err) if err else ret)
                if walk.leak is not None:
                    walk.leak(before, site, ctx)
                after = snapshot(ctx.m)
                assert after == before, f"{walk.name}, {site} #{n}:\n" + diff(before, after)
                assert any("FAULT_INJECTION" in line for line in ctx.m.dmesg())
                # Nothing half-done is left in the way: the same call now succeeds.
                ret2, err2 = call(walk.op, ctx)
                assert err2 == 0, (walk.name, site, n, os.strerror(err2))
            if walk.undo is not None:
                walk.undo(ctx)
                assert snapshot(ctx.m) == before, f"{walk.name}, undo after {site} #{n}"
        ctx.p.exit()
        assert ctx.m.pinned_pages() == 0
        # One past the last event: nothing fails.
        ctx = walk.setup()
        ctx.m.inject_fault(total + 1, kind)
        assert call(walk.op, ctx) == (ret0, 0)
        assert not ctx.m.faults.fired
        assert snapshot(ctx.m) == clean


# -- the switch itself ----------------------------------------------------------------------------

def test_fail_nth_counts_matching_events_only_and_fires_once():
    m = vfiosim.Machine.default()
    p = m.spawn()
    c, g = open_groups(p, [0], uapi.VFIO_SPAPR_TCE_IOMMU)
    p.ioctl(c, uapi.VFIO_IOMMU_ENABLE)
    buf = mkbuf(p, 64 * KiB)
    dma_map(p, c, buf, 0, 4 * KiB)                     # creates the default window first
    inj = m.inject_fault(3, "pin_user_pages:tce_iommu_use_page")
    assert inj is m.faults and inj.armed
    with pytest.raises(OSError) as exc:
        dma_map(p, c, buf, 0x10000, 16 * KiB)           # pages 1 and 2 pin, page 3 fails
    assert exc.value.errno == errno.EFAULT
    assert m.faults.fired == ["pin_user_pages:tce_iommu_use_page"] and not m.faults.armed
    assert "FAULT_INJECTION: forcing a failure." in m.dmesg()[-1]
    assert dma_map(p, c, buf, 0x10000, 16 * KiB) == 0  # fired once: the next call works
    # A kind that the call does not consult is not counted down.
    m.inject_fault(1, "iommu_map")
    dma_unmap(p, c, 0x10000, 16 * KiB)
    assert dma_map(p, c, buf, 0x10000, 16 * KiB) == 0
    assert m.faults.armed
    m.faults.disarm()
    assert not m.faults.armed


def test_fail_nth_rejects_unknown_sites_and_counts_from_one():
    m = vfiosim.Machine.default()
    with pytest.raises(ValueError, match="unknown fault site"):
        m.inject_fault(1, "kmalloc:no_such_function")
    with pytest.raises(ValueError, match="counts from 1"):
        m.inject_fault(0)
    assert set(s.split(":")[0] for s in F.SITES) == set(F.KINDS)


# -- what Linux does when these fail, reproduced (docs/deviations.md) -----------------------------

def v2_on_levels(levels=2):
    ctx = v2_setup(levels=levels, groups=(0,), region=8 * MiB)()
    return ctx


def test_register_memory_of_a_partly_pinnable_range_returns_the_pages_pinned():
    """mm_iommu_do_alloc() keeps pin_user_pages()'s short count as its return
    value: REGISTER_MEMORY returns it, having registered and charged nothing."""
    m = vfiosim.Machine.default()
    p = m.spawn()
    c, g = open_groups(p, [0, 1], uapi.VFIO_SPAPR_TCE_v2_IOMMU)
    buf = mkbuf(p, 64 * KiB)
    before = snapshot(m)
    assert register(p, c, buf + 48 * KiB, 64 * KiB) == 4          # 4 pages, then the unmapped guard page
    p.mprotect(buf + 32 * KiB, 32 * KiB, 1)
    assert register(p, c, buf, 64 * KiB) == 8                     # 8 writable pages, then read-only ones
    assert snapshot(m) == before
    assert p.status()["VmLck"] == 0
    assert any("returns that count" in line for line in m.dmesg())
    with pytest.raises(OSError) as exc:                           # nothing was registered
        register(p, c, buf, 64 * KiB, unregister=True)
    assert exc.value.errno == errno.ENOENT
    # Failing at the first page is an error, as before.
    with pytest.raises(OSError) as exc:
        register(p, c, buf + 32 * KiB, 32 * KiB)
    assert exc.value.errno == errno.EFAULT


def test_a_failed_tce_level_leaves_the_region_mapped_for_good():
    """tce_iommu_build_v2(): the exchange fails after mm_iommu_mapped_inc() and
    tce_iommu_unuse_page_v2() cannot undo it; UNREGISTER then returns 0 and the
    region stays registered, pinned and charged until the process exits."""
    ctx = v2_on_levels()
    m, p, c = ctx.m, ctx.p, ctx.c
    win = ctx.extra["win"]
    vmlck = p.status()["VmLck"]
    m.inject_fault(1, "alloc_pages:pnv_tce")
    with pytest.raises(OSError) as exc:
        dma_map(p, c, ctx.buf, win, 64 * KiB)
    assert exc.value.errno == errno.ENOMEM
    assert any("keeps one mapping for good" in line for line in m.dmesg())
    from vfiosim.kernel.iommu import prereg
    (mem,) = prereg.regions(p.mm)
    assert mem.mapped == 2
    assert register(p, c, ctx.buf, 8 * MiB, unregister=True) == 0
    assert prereg.regions(p.mm) == [mem]                           # still there
    assert p.status()["VmLck"] == vmlck and m.pinned_pages() == 8 * MiB // 4096
    p.exit()
    assert m.pinned_pages() == 0


def test_a_failed_level_of_the_userspace_copy_is_refused_not_an_oops():
    ctx = v2_on_levels()
    m, p = ctx.m, ctx.p
    before = snapshot(m)
    m.inject_fault(1, "alloc_pages:pnv_tce.uas")
    with pytest.raises(OSError) as exc:
        dma_map(p, ctx.c, ctx.buf, ctx.extra["win"], 64 * KiB)
    assert exc.value.errno == errno.ENOMEM
    assert snapshot(m) == before
    assert any("a kernel oops" in line for line in m.dmesg())


def test_a_table_the_platform_cannot_allocate_keeps_its_charge():
    ctx = v2_setup(default_window=False)()
    m, p = ctx.m, ctx.p
    tg = m.pe_of(m.iommu_groups()[0][0]).table_group
    pages = tg.get_table_size(16, 1 << 32, 2) >> 12
    m.inject_fault(1, "alloc_pages")
    with pytest.raises(OSError) as exc:
        tce_create(p, ctx.c, shift=16, size=1 << 32, levels=2)
    assert exc.value.errno == errno.ENOMEM
    assert p.status()["VmLck"] == pages * 4
    assert any("Linux does not refund them" in line for line in m.dmesg())
    # OPAL refusing the TVE: the table is freed and its charge refunded.
    m.inject_fault(2, "opal")
    with pytest.raises(OSError) as exc:
        tce_create(p, ctx.c, shift=16, size=1 << 32, levels=2)
    assert exc.value.errno == errno.ENXIO
    assert p.status()["VmLck"] == pages * 4


# -- regressions: bugs the walk and the model test found ---------------------------------------------

def test_a_region_its_container_forgot_is_unpinned_when_the_process_exits():
    """UNREGISTER of a mapped region returns 0 and the container forgets it
    (deviation 3b); Linux unpins it when the mm goes (mm_iommu_cleanup).  The
    in-process exit used to leave its pins behind for good."""
    m = vfiosim.Machine.default()
    p = m.spawn()
    c, g = open_groups(p, [0, 1], uapi.VFIO_SPAPR_TCE_v2_IOMMU)
    buf = mkbuf(p, MiB)
    register(p, c, buf, MiB)
    dma_map(p, c, buf, 0, 64 * KiB)
    assert register(p, c, buf, MiB, unregister=True) == 0
    p.exit()
    assert m.pinned_pages() == 0


def test_a_container_that_outlives_its_process_releases_cleanly():
    """After fork() the child holds the parent's container; when the parent has
    exited, the container's release refunds into the dead mm.  That used to
    be a locked_vm underflow (an internal error)."""
    for platform, group, iommu in (("powernv", 0, uapi.VFIO_SPAPR_TCE_IOMMU), ("x86", 4, uapi.VFIO_TYPE1v2_IOMMU)):
        m = vfiosim.Machine.preset(platform)
        p = m.spawn()
        c, g = open_groups(p, [group], iommu)
        if platform == "powernv":
            p.ioctl(c, uapi.VFIO_IOMMU_ENABLE)
        buf = mkbuf(p, MiB)
        dma_map(p, c, buf, 0x100000 if platform == "x86" else 0, 64 * KiB)
        child = p.fork()
        p.exit()
        assert m.pinned_pages() == 16                  # the container, held by the child, keeps its mapping
        child.exit()
        assert m.pinned_pages() == 0 and not m.oopses
