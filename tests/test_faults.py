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
  clean run leaves (so nothing half-done got in the way) -- or, where
  upstream refuses it for good (a pseries PE on failed_ddw_pdn_list), fails
  as upstream does;
* a failure upstream ignores (a failed H_STUFF_TCE, RTAS reset or bitmap
  allocation on pseries) changes nothing the call returns or leaves;

and finally that with N one past the count nothing fires.  Walks name kinds
of site, or single sites where one kind spans two steps of the operation.
"""

from __future__ import annotations

import copy
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
import iommufdutil as iu_util
from vfiosim.uapi import iommufd as iu
from vfioutil import dma_map, dma_unmap, open_device

KiB, MiB = 1 << 10, 1 << 20
SPAPR_DMA64 = 0x800000000000000          # the pseries 64-bit window address (QEMU)


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


def iommufd_setup(attached=True, mappings=0, compat=False, huge_pages=True, type1=uapi.VFIO_TYPE1v2_IOMMU):
    """iommufd on x86 (iommufdutil.machine()): an IOAS with vfio0 bound and
    (``attached``) attached through its cdev, ``mappings`` mappings in it; or
    (``compat``) /dev/vfio/vfio served by iommufd with group 1 in it, Type1v2."""
    def setup() -> Ctx:
        m = iu_util.machine(config='["IOMMUFD", "VFIO_DEVICE_CDEV", "IOMMUFD_VFIO_CONTAINER"]')
        p = m.spawn(uid=1000, gid=1000, rlimit_memlock=(64 * MiB, 64 * MiB))
        ctx = Ctx(m, p, buf=mkbuf(p, 8 * MiB))
        if compat:
            ctx.c, ctx.g = open_groups(p, [1], type1)
            # the device joins the compat IOAS when it is opened (vfio_df_group_open())
            ctx.extra["dev"] = open_device(p, ctx.g[0], "0000:01:00.0")
            for i in range(mappings):
                dma_map(p, ctx.c, ctx.buf + i * MiB, 0x10000000 + i * MiB, 256 * KiB)
            return ctx
        ctx.c, ioas, dfd, devid = iu_util.cdev_setup(p)
        ctx.extra.update(ioas=ioas, dfd=dfd, devid=devid)
        if not huge_pages:
            iu_util.option(p, ctx.c, iu.IOMMU_OPTION_HUGE_PAGES, iu.IOMMU_OPTION_OP_SET, 0, ioas)
        if attached:
            iu_util.attach(p, dfd, ioas)
        for i in range(mappings):
            iu_util.ioas_map(p, ctx.c, ioas, ctx.buf + i * MiB, 256 * KiB, 0x10000000 + i * MiB)
        return ctx
    return setup


def iommufd_pin_expect(call_pages=8192):
    """Each area is pinned by its own pfn_reader, in pin_user_pages_fast()
    calls of up to 8192 pages (``call_pages``: the pages of one call here)."""
    def expect(site: str, n: int, ctx: Ctx, count: int) -> tuple[int, int]:
        if site == "pin_user_pages:pfn_reader_user_pin" and (n - 1) % call_pages:
            return 0, 0                       # a short pin: the next pin_user_pages_fast() call pins the rest
        return -1, errno_of(site)
    return expect


def compat_cut_leaks(before: dict, site: str, ctx: Ctx) -> None:
    """iommufd_vfio_unmap_dma() cuts at the end of the range first, then at
    its start: when the second iopt_area_split() fails the first cut stays
    (two areas where there was one, mapping the same pages)."""
    if ctx.m.faults.count("kmalloc:iopt_area_split") == 2:
        (_pid, _fd, desc, _reserved), = before["iommufd"]
        ioas = next(o for o in desc["objects"] if o["type"] == "ioas")
        area = ioas["areas"][0]
        cut = 0x10000000 + 128 * KiB - area["iova"]
        ioas["areas"][0:1] = [dict(area, length=cut),
                              dict(area, iova=area["iova"] + cut, length=area["length"] - cut,
                                   user_va=area["user_va"] + cut)]


def iommufd_map_op(x: Ctx) -> int:
    iu_util.ioas_map(x.p, x.c, x.extra["ioas"], x.buf + 2 * MiB, 520 * 4 * KiB, 0x40000000)
    return 0


def iommufd_hwpt_alloc_op(x: Ctx) -> int:
    x.extra["hwpt"] = iu_util.hwpt_alloc(x.p, x.c, x.extra["devid"], x.extra["ioas"])
    return 0


def seed_setup(iommu=True, mapped=False):
    """kernel="3.10" (the seed patch): one group, its 2 GiB window of 4 KiB pages."""
    def setup() -> Ctx:
        m = vfiosim.Machine.default(kernel="3.10")
        p = m.spawn(rlimit_memlock=(4 << 30, 4 << 30))
        c, g = open_groups(p, [0], uapi.VFIO_SPAPR_TCE_IOMMU if iommu else None)
        ctx = Ctx(m, p, c, g, mkbuf(p, MiB))
        if mapped:
            dma_map(p, c, ctx.buf, 0x10000, 4 * KiB)         # the seed maps one page per call
        return ctx
    return setup


def pseries_machine(dma32_size="32M"):
    """The pseries preset with a smaller default window: its table is
    cleared 512 entries per H_STUFF_TCE, one fault event each."""
    from importlib import resources
    text = resources.files("vfiosim.presets").joinpath("pseries.toml").read_text()
    return vfiosim.Machine.from_toml(text.replace('dma32_size = "1G"', f'dma32_size = "{dma32_size}"'))


def pseries_v1_setup():
    def setup() -> Ctx:
        m = pseries_machine()
        p = m.spawn(rlimit_memlock=(64 * MiB, 64 * MiB))
        c, g = open_groups(p, [0], uapi.VFIO_SPAPR_TCE_IOMMU)
        p.ioctl(c, uapi.VFIO_IOMMU_ENABLE)
        return Ctx(m, p, c, g, mkbuf(p, 4 * MiB))
    return setup


def pseries_v2_setup(mapped=False, default_window=True):
    """A v2 container on one pseries PE (pseries PEs share no tables) with
    8 MiB preregistered."""
    def setup() -> Ctx:
        m = pseries_machine()
        p = m.spawn(rlimit_memlock=(1 << 40, 1 << 40))
        c, g = open_groups(p, [0], uapi.VFIO_SPAPR_TCE_v2_IOMMU)
        ctx = Ctx(m, p, c, g, mkbuf(p, 8 * MiB))
        register(p, c, ctx.buf, 8 * MiB)
        if not default_window:
            tce_remove(p, c, 0)                    # creates the default window, then removes it
        if mapped:
            dma_map(p, c, ctx.buf, 0, 64 * KiB)    # the default window exists, something is mapped
        return ctx
    return setup


def x86_second_group(mappings=1):
    """A Type1v2 container holding group 4 (and mappings); group 5 is open,
    not yet in it: its attach allocates a second domain before it finds
    the first one can be shared."""
    def setup() -> Ctx:
        m = vfiosim.Machine.preset("x86")
        p = m.spawn(rlimit_memlock=(64 * MiB, 64 * MiB))
        c, g = open_groups(p, [4], uapi.VFIO_TYPE1v2_IOMMU)
        ctx = Ctx(m, p, c, g, mkbuf(p, 8 * MiB))
        for i in range(mappings):
            dma_map(p, c, ctx.buf + i * MiB, 0x10000000 + i * MiB, 256 * KiB)
        ctx.extra["g5"] = p.open("/dev/vfio/5")
        return ctx
    return setup


@dataclass
class Walk:
    name: str
    setup: Callable[[], Ctx]
    op: Callable[[Ctx], int]
    kinds: tuple[str, ...]               # kinds of site, or single sites
    # what the failure at a site looks like: errno, or a callable (site, n, ctx) -> expected (ret, errno)
    expect: Callable[[str, int, Ctx, int], tuple[int, int]] | None = None
    # what upstream leaks when ``site`` fails: a callable applied to the before-snapshot
    leak: Callable[[dict, str, Ctx], None] | None = None
    # undoes a successful op: the walk then goes on on the same machine (the
    # state after each failure and each undo must be the state before)
    undo: Callable[[Ctx], Any] | None = None
    # the errno the same call gets right after ``site`` failed (0: it succeeds)
    retry: Callable[[str, Ctx], int] | None = None


# What userspace sees when a site fails, where it is not ENOMEM.
ERRNO_OF = {
    "pin_user_pages:tce_iommu_use_page": errno.EFAULT,              # any short pin is -EFAULT
    "pin_user_pages:iommu_put_tce_user_mode": errno.EFAULT,         # the 3.10 seed: ret != 1 is -EFAULT
    "hcall:tce_exchange_pseries": errno.EPERM,                      # H_HARDWARE (-1) returned as the errno
    "rtas:query_ddw": errno.EPERM,                                  # RTAS status -1 returned as the errno
    "rtas:create_ddw": errno.ENODEV,                                # spapr_tce_create_table(): ret = -ENODEV
    "kmalloc:iommu_pseries_alloc_table": errno.ENODEV,              # ... already set before the kzalloc
    "kmalloc:ddw_property_create": errno.ENODEV,
    "kmalloc:ddw_list_new_entry": errno.ENODEV,
}


def errno_of(site: str) -> int:
    kind = site.split(":")[0]
    if site in ERRNO_OF:
        return ERRNO_OF[site]
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
    """A failed exchange in tce_iommu_build_v2() -- a TCE level that cannot be
    allocated (PowerNV), a failed hcall (pseries) -- leaves the region one
    mapping it never loses (docs/deviations.md 3d)."""
    if site in ("alloc_pages:pnv_tce", "hcall:tce_exchange_pseries"):
        regions = before["tasks"][ctx.p.pid]["regions"]
        (ua, entries, used, mapped), = regions
        before["tasks"][ctx.p.pid]["regions"] = ((ua, entries, used, mapped + 1),)


# pseries: spapr_tce_create_table() fails after tce_iommu_create_table() charged
# the table (not refunded, docs/deviations.md 3) ...
PSERIES_CHARGE_KEPT = ("kmalloc:iommu_pseries_alloc_table", "rtas:query_ddw", "rtas:create_ddw",
                       "kmalloc:ddw_property_create", "kmalloc:ddw_list_new_entry", "kmalloc:copy_property")
# ... and from out_failed the PE is on failed_ddw_pdn_list for good (docs/deviations.md 3f)
PSERIES_DDW_FAILED = ("rtas:query_ddw", "rtas:create_ddw", "kmalloc:ddw_property_create",
                      "kmalloc:ddw_list_new_entry")
# failures spapr_tce_create_table() ignores: the call succeeds
PSERIES_IGNORED = ("rtas:reset_dma_window", "kmalloc:iommu_init_table", "hcall:tce_freemulti_pSeriesLP",
                   "kmalloc:pseries_tce_iommu_userspace_view_alloc")


def pseries_pe_state(snap: dict, ctx: Ctx, change: Callable[[list], None]) -> None:
    pe = ctx.m.pe_of(ctx.m.iommu_groups()[0][0])
    state = list(snap["platform"][pe.name])
    change(state)
    snap["platform"][pe.name] = tuple(state)


def pseries_create_leaks(table_bytes: int):
    def leak(snap: dict, site: str, ctx: Ctx) -> None:
        if site in PSERIES_CHARGE_KEPT:
            snap["tasks"][ctx.p.pid]["locked_vm"] += table_bytes >> ctx.m.kernel.page_shift
        if site in PSERIES_DDW_FAILED:
            def failed(state):
                state[5] = True
            pseries_pe_state(snap, ctx, failed)
        if site == "kmalloc:pseries_tce_iommu_userspace_view_alloc":
            def no_view(state):                   # the new table has no userspace view
                state[2] = tuple(None if t is None else t[:-1] + (None,) for t in state[2])
            pseries_pe_state(snap, ctx, no_view)
    return leak


def pseries_expect(site: str, n: int, ctx: Ctx, count: int) -> tuple[int, int]:
    return (0, 0) if site in PSERIES_IGNORED else (-1, errno_of(site))


def pseries_retry(site: str, ctx: Ctx) -> int:
    return errno.ENODEV if site in PSERIES_DDW_FAILED else 0


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
         ("pin_user_pages", "hcall"), undo=lambda x: dma_unmap(x.p, x.c, 0x200000, 64 * KiB)),
    Walk("pseries v1 MAP_DMA creating the default window", pseries_v1_setup(),
         lambda x: dma_map(x.p, x.c, x.buf, 0, 64 * KiB),
         ("account_locked_vm", "kmalloc", "rtas", "hcall:tce_freemulti_pSeriesLP"),   # (the map itself: below)
         expect=pseries_expect, leak=pseries_create_leaks(32 * MiB >> 9)),
    Walk("pseries v2 TCE_CREATE of a 64-bit window", pseries_v2_setup(default_window=False),
         lambda x: tce_create(x.p, x.c, shift=16, size=256 * MiB, levels=1),
         ("account_locked_vm", "kmalloc", "rtas", "hcall"), expect=pseries_expect,
         leak=pseries_create_leaks(256 * MiB >> 13), retry=pseries_retry),
    Walk("pseries v2 MAP_DMA", pseries_v2_setup(mapped=True),
         lambda x: dma_map(x.p, x.c, x.buf + MiB, 0x100000, 64 * KiB), ("hcall",), leak=v2_level_leaks,
         undo=lambda x: dma_unmap(x.p, x.c, 0x100000, 64 * KiB)),
    Walk("3.10 seed v1 SET_IOMMU", seed_setup(iommu=False),
         lambda x: x.p.ioctl(x.c, uapi.VFIO_SET_IOMMU, uapi.VFIO_SPAPR_TCE_IOMMU), ("kmalloc",)),
    Walk("3.10 seed v1 ENABLE", seed_setup(), lambda x: x.p.ioctl(x.c, uapi.VFIO_IOMMU_ENABLE),
         ("account_locked_vm",), undo=lambda x: x.p.ioctl(x.c, uapi.VFIO_IOMMU_DISABLE)),
    Walk("3.10 seed v1 MAP_DMA", seed_setup(mapped=True), lambda x: dma_map(x.p, x.c, x.buf + 4 * KiB, 0x20000, 4 * KiB),
         ("pin_user_pages",), undo=lambda x: dma_unmap(x.p, x.c, 0x20000, 4 * KiB)),
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
         lambda x: x.p.ioctl(x.c, uapi.VFIO_SET_IOMMU, uapi.VFIO_TYPE1v2_IOMMU), ("kmalloc", "alloc_pages")),
    Walk("Type1 GROUP_SET_CONTAINER of a second group (its own domain first)", x86_second_group(),
         lambda x: x.p.ioctl(x.extra["g5"], uapi.VFIO_GROUP_SET_CONTAINER, ctypes.c_int32(x.c)),
         ("kmalloc", "alloc_pages")),
    Walk("Type1 MAP_DMA", x86_groups_ready(mappings=1),
         lambda x: dma_map(x.p, x.c, x.buf + 2 * MiB, 0x40000000, 520 * 4 * KiB),
         ("kmalloc", "pin_user_pages", "account_locked_vm", "iommu_map"), expect=type1_pin_expect,
         undo=lambda x: dma_unmap(x.p, x.c, 0x40000000, 520 * 4 * KiB)),
    Walk("Type1 DIRTY_PAGES start", x86_groups_ready(mappings=3), lambda x: dirty_start(x.p, x.c), ("kmalloc",)),
    Walk("iommufd IOAS_ALLOC", iommufd_setup(attached=False),
         lambda x: iu_util.ioas_alloc(x.p, x.c) and 0, ("kmalloc",)),
    Walk("iommufd IOAS_MAP into an attached HWPT", iommufd_setup(mappings=1), iommufd_map_op,
         ("kmalloc", "pin_user_pages", "account_locked_vm", "iommu_map"), expect=iommufd_pin_expect(),
         undo=lambda x: iu_util.ioas_unmap(x.p, x.c, x.extra["ioas"], 0x40000000, 520 * 4 * KiB)),
    Walk("iommufd IOAS_MAP with no domain (nothing pinned)", iommufd_setup(attached=False), iommufd_map_op,
         ("kmalloc",), undo=lambda x: iu_util.ioas_unmap(x.p, x.c, x.extra["ioas"], 0x40000000, 520 * 4 * KiB)),
    Walk("iommufd ATTACH_IOMMUFD_PT filling the auto domain", iommufd_setup(attached=False, mappings=3),
         lambda x: iu_util.attach(x.p, x.extra["dfd"], x.extra["ioas"]) and 0,
         ("kmalloc", "pin_user_pages", "account_locked_vm", "iommu_map"), expect=iommufd_pin_expect(64),
         undo=lambda x: iu_util.detach(x.p, x.extra["dfd"])),
    Walk("iommufd HWPT_ALLOC filled from the IOAS", iommufd_setup(attached=False, mappings=2), iommufd_hwpt_alloc_op,
         ("kmalloc", "pin_user_pages", "account_locked_vm", "iommu_map"), expect=iommufd_pin_expect(64),
         undo=lambda x: iu_util.destroy(x.p, x.c, x.extra["hwpt"])),
    Walk("iommufd compat Type1 (v1) UNMAP_DMA inside a mapping", iommufd_setup(compat=True, mappings=1,
                                                                                type1=uapi.VFIO_TYPE1_IOMMU),
         lambda x: dma_unmap(x.p, x.c, 0x10000000 + 64 * KiB, 64 * KiB), ("kmalloc",), leak=compat_cut_leaks),
    Walk("iommufd compat Type1 MAP_DMA", iommufd_setup(compat=True, mappings=1),
         lambda x: dma_map(x.p, x.c, x.buf + 2 * MiB, 0x40000000, 520 * 4 * KiB),
         ("kmalloc", "pin_user_pages", "account_locked_vm", "iommu_map"), expect=iommufd_pin_expect(),
         undo=lambda x: dma_unmap(x.p, x.c, 0x40000000, 520 * 4 * KiB)),
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
            assert len(fired) == 1 and (fired[0] == kind or fired[0].startswith(kind + ":")), (walk.name, kind, n, fired)
            site = fired[0]
            assert site in F.SITES
            want = walk.expect(site, n, ctx, total) if walk.expect else (-1, errno_of(site))
            if want == (0, 0):
                # The fault was absorbed (a short pin the next call completes, a
                # failure upstream ignores): all work done, as a clean run does it.
                assert (ret, err) == (ret0, 0), (walk.name, site, n, ret, err)
                expected = copy.deepcopy(clean)
                if walk.leak is not None:
                    walk.leak(expected, site, ctx)
                assert snapshot(ctx.m) == expected, f"{walk.name}, {site} #{n}:\n" + diff(expected, snapshot(ctx.m))
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
                # Nothing half-done is left in the way: the same call now succeeds
                # (unless upstream refuses it for good, as it tells).
                ret2, err2 = call(walk.op, ctx)
                want2 = walk.retry(site, ctx) if walk.retry is not None else 0
                assert err2 == want2, (walk.name, site, n, os.strerror(err2))
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


# -- pseries: what spapr_tce_create_table() and the TCE hcalls do when they fail ----------------------

def test_a_pe_whose_window_creation_failed_never_gets_a_window_again():
    """out_failed puts the PE on failed_ddw_pdn_list, which nothing prunes:
    every later create_table() for it is ENODEV -- the next TCE_CREATE, the
    32-bit window, another process's container -- each attempt charged
    and not refunded (docs/deviations.md 3, 3f)."""
    ctx = pseries_v2_setup(default_window=False)()
    m, p, c = ctx.m, ctx.p, ctx.c
    tg = m.pe_of(m.iommu_groups()[0][0]).table_group
    m.inject_fault(1, "rtas:create_ddw")
    vmlck = p.status()["VmLck"]
    for size, shift in ((256 * MiB, 16), (256 * MiB, 16), (32 * MiB, 12)):
        with pytest.raises(OSError) as exc:
            tce_create(p, c, shift=shift, size=size)
        assert exc.value.errno == errno.ENODEV
    assert tg.ddw_failed
    assert any("in failed DDW device list" in line for line in m.dmesg())
    charged = (256 * MiB >> 13) * 2 + (32 * MiB >> 9)
    assert p.status()["VmLck"] == vmlck + charged // KiB
    # The hypervisor holds no window it was asked for: the RTAS create failed.
    assert [t.enabled for t in tg.hv.tables] == [True, False]
    p.exit()
    assert m.pinned_pages() == 0
    # A new process, a v1 container: its default window is refused the same way.
    q = m.spawn(rlimit_memlock=(64 * MiB, 64 * MiB))
    c2, _ = open_groups(q, [0], uapi.VFIO_SPAPR_TCE_IOMMU)
    q.ioctl(c2, uapi.VFIO_IOMMU_ENABLE)
    buf = mkbuf(q, 64 * KiB)
    with pytest.raises(OSError) as exc:
        dma_map(q, c2, buf, 0, 4 * KiB)
    assert exc.value.errno == errno.ENODEV
    # The other PE (another PHB) is not on the list.
    c3, _ = open_groups(q, [1], uapi.VFIO_SPAPR_TCE_IOMMU)
    q.ioctl(c3, uapi.VFIO_IOMMU_ENABLE)
    assert dma_map(q, c3, buf, 0, 4 * KiB) == 0


def test_the_rtas_status_of_a_failed_query_is_the_errno():
    ctx = pseries_v2_setup(default_window=False)()
    ctx.m.inject_fault(1, "rtas:query_ddw")
    with pytest.raises(OSError) as exc:
        tce_create(ctx.p, ctx.c, shift=16, size=256 * MiB)
    assert exc.value.errno == errno.EPERM              # RTAS -1, returned as -EPERM
    with pytest.raises(OSError) as exc:                # and the PE is on the failed list
        tce_create(ctx.p, ctx.c, shift=16, size=256 * MiB)
    assert exc.value.errno == errno.ENODEV


def test_a_failed_iommu_table_allocation_is_enodev_and_can_be_retried():
    ctx = pseries_v2_setup(default_window=False)()
    ctx.m.inject_fault(1, "kmalloc:iommu_pseries_alloc_table")
    with pytest.raises(OSError) as exc:
        tce_create(ctx.p, ctx.c, shift=16, size=256 * MiB)
    assert exc.value.errno == errno.ENODEV             # the -ENODEV ret held, not -ENOMEM
    assert tce_create(ctx.p, ctx.c, shift=16, size=256 * MiB) == SPAPR_DMA64


def test_a_window_without_a_userspace_view_takes_no_v2_mapping():
    """pseries_tce_iommu_userspace_view_alloc() failing is ignored: the window
    is created, and a v2 MAP_DMA into it would write through a NULL
    IOMMU_TABLE_USERSPACE_ENTRY(): refused with ENOMEM (docs/deviations.md 6d)."""
    ctx = pseries_v2_setup(default_window=False)()
    m, p, c = ctx.m, ctx.p, ctx.c
    m.inject_fault(1, "kmalloc:pseries_tce_iommu_userspace_view_alloc")
    win = tce_create(p, c, shift=12, size=256 * MiB)
    before = snapshot(m)
    with pytest.raises(OSError) as exc:
        dma_map(p, c, ctx.buf, win, 64 * KiB)
    assert exc.value.errno == errno.ENOMEM
    assert snapshot(m) == before
    assert any("a kernel oops" in line for line in m.dmesg())
    # A map whose first page does not translate fails as it always does.
    with pytest.raises(OSError) as exc:
        dma_map(p, c, ctx.buf + 8 * MiB, win, 64 * KiB)
    assert exc.value.errno == errno.EINVAL
    assert dma_unmap(p, c, win, 64 * KiB) == 0
    # v1 never uses the view: its window works without one.
    v1 = pseries_v1_setup()()
    v1.m.inject_fault(1, "kmalloc:pseries_tce_iommu_userspace_view_alloc")
    assert dma_map(v1.p, v1.c, v1.buf, 0, 64 * KiB) == 0
    assert v1.m.pinned_pages() == 16


def test_a_failed_h_put_tce_over_a_mapped_entry_keeps_that_mapping():
    """tce_iommu_build_v2() after a failed exchange calls
    tce_iommu_unuse_page_v2() for the entry: with an old mapping there, Linux
    drops a mapping of the *old* region while the TCE still maps its page.
    vfiosim keeps the old mapping whole; the new region's increment leaks as
    upstream's does (docs/deviations.md 3d, 6e)."""
    from vfiosim.kernel.iommu import prereg
    m = pseries_machine()
    p = m.spawn(rlimit_memlock=(1 << 40, 1 << 40))
    c, _ = open_groups(p, [0], uapi.VFIO_SPAPR_TCE_v2_IOMMU)
    buf = mkbuf(p, 2 * MiB)
    register(p, c, buf, MiB)                            # region A
    register(p, c, buf + MiB, MiB)                      # region B
    a, b = sorted(prereg.regions(p.mm), key=lambda r: r.ua)
    dma_map(p, c, buf, 0, 64 * KiB)                     # 16 entries from A
    assert (a.mapped, b.mapped) == (17, 1)
    tbl = m.pe_of(m.iommu_groups()[0][0]).table_group.tables[0]
    hv = m.pe_of(m.iommu_groups()[0][0]).hv
    old4 = hv.tables[0].entries.get(4)
    m.inject_fault(5, "hcall:tce_exchange_pseries")
    with pytest.raises(OSError) as exc:
        dma_map(p, c, buf + MiB, 0, 64 * KiB)           # B over A: entries 0-3 replaced, 4 fails
    assert exc.value.errno == errno.EPERM
    # Entries 0-3 were replaced, then cleared by the rollback; 4-15 still map A.
    assert [hv.tables[0].entries.get(i) for i in range(5)] == [0, 0, 0, 0, old4]
    assert tbl.it_userspace.get(4) == buf + 4 * 4 * KiB
    assert (a.mapped, b.mapped) == (1 + 12, 1 + 1)      # B keeps the failed entry's increment
    assert any("not done here" in line for line in m.dmesg())
    assert dma_unmap(p, c, 0, 64 * KiB) == 0
    assert (a.mapped, b.mapped) == (1, 2)
    assert register(p, c, buf, MiB, unregister=True) == 0
    assert register(p, c, buf + MiB, MiB, unregister=True) == 0
    assert prereg.regions(p.mm) == [b]                  # B is mapped "for good" (3d)
    p.exit()
    assert m.pinned_pages() == 0


# -- regressions: bugs the walk and the model test found ---------------------------------------------

def test_a_region_its_container_forgot_is_unpinned_when_the_process_exits():
    """UNREGISTER of a mapped region returns 0 and the container forgets it
    (deviation 3b); vfiosim unpins it when the mm goes, as mm_iommu_cleanup()
    once did (Linux 6.12 only warns and leaves it pinned: docs/deviations.md,
    the differences programs cannot observe)."""
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
