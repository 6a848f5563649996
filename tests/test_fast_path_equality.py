"""The fast paths for small maps are observably identical to the general path.

The IOMMU drivers take MAP_DMA and UNMAP_DMA of a page (Type1: a few pages)
in straight-line code and fall back to the general path for anything
unusual (Type1: type1.py _do_map_fast, _do_unmap_fast; sPAPR:
spapr_tce.py _map_fast, _unmap_fast; the pin: mm.py MM.pin_fast).  Here
Hypothesis drives random sequences of calls on two machines built alike, one
with the fast paths (``Machine.fast_paths``) and one without, and after every
step compares everything a program or a device could observe:

* each call's return value, or its errno and message;
* the kernel log (dmesg), every process's /proc status (VmLck, VmPin, ...),
  /proc/meminfo;
* tests/machinestate.py's snapshot: every TCE and VT-d extent, every page
  pin, each process's locked_vm and preregistered regions (with their use
  and mapping counts), the containers as their drivers describe them;
* the generation counters of every TCE table and VT-d domain, and what
  every PHB TCE cache and VT-d IOTLB holds;
* fault injection: the per-site counts, the failures fired, whether one is
  still armed.

The steps are the calls that meet a small map: MAP_DMA and UNMAP_DMA (good
and bad arguments, window and aperture edges, aliases of one page), mlock,
munlock, mprotect, munmap, mmap, RLIMIT_MEMLOCK changes (to the exact
page), REGISTER/UNREGISTER_MEMORY and window create/remove (v2), device DMA,
fault injection, fork, exit and a new process, and RAM running out.  The
targeted tests at the end pin down the boundaries, and check that the fast
paths are taken at all.
"""

from __future__ import annotations

import ctypes
import dataclasses
import errno
import resource
from typing import Any, Callable

import pytest
from hypothesis import event, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

import vfiosim
from machinestate import diff, snapshot
from vfiosim import uapi
from vfiosim.kernel.dma import DmaError

KiB, MiB = 1 << 10, 1 << 20
PROT_NONE, PROT_READ, PROT_RW = 0, 1, 3
BUF_PAGES = 64
# Which process a step is about (the first one, with the group, mostly).
PROC = st.sampled_from([0, 0, 0, 1, 2])


# -- what is compared ----------------------------------------------------------------------------------

def _caches(m: vfiosim.Machine) -> list[Any]:
    """What each translation cache holds (PHB TCE caches, VT-d IOTLBs), with
    the generation each entry was taken at."""
    out = []
    k = m.kernel
    translators = [pe for pe in k.pes] + [ctx for u in k.platform.iommu_units for ctx in u.contexts.values()]
    for t in translators:
        cache = getattr(t, "tce_cache", None) or getattr(t, "iotlb", None)
        if cache is None:
            continue
        # _entries: (IOVA, length, write) -> (table, generation, runs);
        # _pages: write -> (table, generation, {page: (memory, offset)}).
        out.append((t.name, sorted((key, v[1]) for key, v in cache._entries.items()),
                    sorted((write, v[1], sorted((page, mem.phys_base + off) for page, (mem, off) in v[2].items()))
                           for write, v in cache._pages.items())))
    return out


def _generations(m: vfiosim.Machine) -> list[Any]:
    """The generation counters of every TCE table (its entries and userspace
    view, and the pseries hypervisor's) and VT-d domain."""
    out: list[Any] = []
    k = m.kernel
    for unit in k.platform.iommu_units:
        out.append([(d.id, d.generation) for d in unit.domains])
    for pe in k.pes:
        tg = getattr(pe, "table_group", None)
        for t in getattr(tg, "tables", []) or []:
            if t is not None:
                out.append((pe.name, t.bus_start, t.entries.generation,
                            None if t.it_userspace is None else t.it_userspace.generation))
        hv = getattr(tg, "hv", None)
        if hv is not None:
            out.append((pe.name, [(t.liobn, t.entries.generation) for t in hv.tables]))
    for pe in k.pes:
        for t in getattr(pe, "tve", []) or []:
            if t is not None:
                out.append(("tve", pe.name, t.bus_start, t.entries.generation))
    return out


def observe(m: vfiosim.Machine, procs: list[Any]) -> dict[str, Any]:
    faults = m.faults
    return {
        "dmesg": m.dmesg(include_debug=True),
        "status": [p.status() if p.alive else None for p in procs],
        "meminfo": m.meminfo(),
        "snapshot": snapshot(m),
        "generations": _generations(m),
        "caches": _caches(m),
        "faults": (dict(faults.counts), list(faults.fired), faults.armed),
        "oopses": list(m.oopses),
    }


def outcome(fn: Callable[[], Any]) -> tuple[Any, ...]:
    """A call's result, or how it failed."""
    try:
        value = fn()
    except OSError as exc:
        return ("errno", errno.errorcode.get(exc.errno or 0, exc.errno), str(exc))
    except DmaError as exc:
        return ("dma error", str(exc))
    if isinstance(value, (ctypes.Structure, ctypes.Array)):
        value = bytes(value)
    return ("ok", value)


# -- one machine and its processes ---------------------------------------------------------------------

# (preset, IOMMU type, page size, RAM): the backends with fast paths, and 64 KiB pages
CONFIGS = {
    "type1v2": ("x86", uapi.VFIO_TYPE1v2_IOMMU, 4096),
    "type1": ("x86", uapi.VFIO_TYPE1_IOMMU, 4096),
    "powernv-v1": ("powernv", uapi.VFIO_SPAPR_TCE_IOMMU, 4096),
    "powernv-v2": ("powernv", uapi.VFIO_SPAPR_TCE_v2_IOMMU, 4096),
    "pseries-v1": ("pseries", uapi.VFIO_SPAPR_TCE_IOMMU, 4096),
    "pseries-v2": ("pseries", uapi.VFIO_SPAPR_TCE_v2_IOMMU, 4096),
    "powernv-64k-v1": ("powernv", uapi.VFIO_SPAPR_TCE_IOMMU, 65536),
    "powernv-64k-v2": ("powernv", uapi.VFIO_SPAPR_TCE_v2_IOMMU, 65536),
}


def build_machine(config: str, fast: bool, ram_pages: int | None = None) -> vfiosim.Machine:
    preset, _, page_size = CONFIGS[config]
    m = vfiosim.Machine.preset(preset, page_size=page_size)
    if ram_pages is not None:
        m = vfiosim.Machine(dataclasses.replace(m.spec, ram=ram_pages * page_size), page_size=page_size)
    m.fast_paths = fast
    return m


class Side:
    """One machine: its processes, each with a container, a group and buffers."""

    def __init__(self, config: str, fast: bool, ram_pages: int | None) -> None:
        self.config = config
        self.iommu_type = CONFIGS[config][1]
        self.m = build_machine(config, fast, ram_pages)
        self.page = self.m.page_size
        self.procs: list[dict[str, Any]] = []
        self.gid = min(gid for gid, bdfs in self.m.iommu_groups().items()
                       if self.m.device(bdfs[0]).driver == "vfio-pci")
        self.bdf = self.m.iommu_groups()[self.gid][0]
        dev = self.m.device(self.bdf)
        dev.config.data[4] |= 0x4                     # bus master on: the device may DMA

    @property
    def v2(self) -> bool:
        return self.iommu_type == uapi.VFIO_SPAPR_TCE_v2_IOMMU

    @property
    def spapr(self) -> bool:
        return self.iommu_type in (uapi.VFIO_SPAPR_TCE_IOMMU, uapi.VFIO_SPAPR_TCE_v2_IOMMU)

    def spawn(self, uid: int, limit: int) -> Any:
        p = self.m.spawn(uid=uid, rlimit_memlock=(limit, 1 << 62))
        pr: dict[str, Any] = {"p": p, "bufs": [], "container": None, "group": None}
        self.procs.append(pr)
        pr["bufs"].append(p.mmap(BUF_PAGES * self.page))
        p.write_memory(pr["bufs"][0], b"\x5a" * (BUF_PAGES * self.page))
        return self.open_container(pr)

    def open_container(self, pr: dict[str, Any]) -> Any:
        """A container with the group, its IOMMU set (v1: enabled)."""
        p = pr["p"]
        c = p.open("/dev/vfio/vfio")
        pr["container"] = c
        g = p.open(f"/dev/vfio/{self.gid}")
        pr["group"] = g
        p.ioctl(g, uapi.VFIO_GROUP_SET_CONTAINER, ctypes.c_int32(c))
        p.ioctl(c, uapi.VFIO_SET_IOMMU, self.iommu_type)
        if self.iommu_type == uapi.VFIO_SPAPR_TCE_IOMMU:
            p.ioctl(c, uapi.VFIO_IOMMU_ENABLE)
        elif self.v2:
            # The first half of the first buffer, preregistered.
            p.ioctl(c, uapi.VFIO_IOMMU_SPAPR_REGISTER_MEMORY,
                    uapi.vfio_iommu_spapr_register_memory(argsz=24, vaddr=pr["bufs"][0], size=BUF_PAGES // 2 * self.page))
        return c

    def proc(self, i: int) -> dict[str, Any] | None:
        live = [pr for pr in self.procs if pr["p"].alive]
        return live[i % len(live)] if live else None

    def windows(self) -> list[tuple[int, int, int]]:
        """(bus start, size, IOMMU page size) of the IOVA ranges that matter:
        the sPAPR windows the driver has, the Type1 usable ranges."""
        out = []
        for pr in self.procs:
            if not pr["p"].alive or pr["container"] is None:
                continue
            try:
                f = pr["p"].task.files.get(pr["container"])
            except Exception:
                continue
            cont = getattr(f, "container", None)
            data = getattr(cont, "iommu_data", None)
            if data is None:
                continue
            for t in getattr(data, "tables", []) or []:
                if t is not None:
                    out.append((t.bus_start, t.bus_size, t.page_size))
            for lo, hi in getattr(data, "iova_list", []) or []:
                out.append((lo, hi - lo + 1, self.page))
        return out

    def iovas(self) -> list[int]:
        """IOVAs at the edges: each window's first pages, its last, just past it."""
        out = [0, 0x100000, 0x101000, 0x200000]
        for start, size, page in self.windows()[:4]:
            end = start + min(size, 1 << 46)
            out += [start, start + page, start + 2 * page, end - page, end - 2 * page, end, end + page]
        if self.spapr:
            out += [0x8000000 - 0x1000, 0x8000000]
        else:
            out += [0xFEE00000 - 0x1000, 0xFEE00000, (1 << 39) - 0x1000, 1 << 39, (1 << 48) - 0x1000]
        return out


# -- the state machine ---------------------------------------------------------------------------------

class FastPathEquality(RuleBasedStateMachine):
    """Two machines, fast paths on and off, driven alike and compared after every step."""

    config = "type1v2"
    ram_pages: int | None = None

    def __init__(self) -> None:
        super().__init__()
        self.sides = [Side(self.config, True, self.ram_pages), Side(self.config, False, self.ram_pages)]
        self.fast_taken = 0
        self._count_fast_paths(self.sides[0])

    def _count_fast_paths(self, side: Side) -> None:
        """Count, on the fast machine, the calls its fast paths completed."""
        def counting(fn: Callable[..., Any], done: Callable[[Any], bool]) -> Callable[..., Any]:
            def wrapper(*args: Any) -> Any:
                res = fn(*args)
                if done(res):
                    self.fast_taken += 1
                return res
            return wrapper
        for drv in side.m.kernel.vfio.iommu_drivers:
            for name, done in (("_do_map_fast", bool), ("_do_unmap_fast", lambda r: r is not None),
                               ("_map_fast", bool), ("_unmap_fast", bool)):
                if hasattr(drv, name):
                    setattr(drv, name, counting(getattr(drv, name), done))

    def teardown(self) -> None:
        n = self.fast_taken
        event(f"fast paths taken: {'0' if not n else '1-4' if n < 5 else '5-19' if n < 20 else '20+'}")

    def both(self, what: str, action: Callable[[Side], Any]) -> None:
        """Make the same call on both machines; the outcomes must be equal."""
        results = [outcome(lambda s=s: action(s)) for s in self.sides]
        assert results[0] == results[1], f"{what}: fast {results[0]!r} != general {results[1]!r}"
        event(f"{what}: {results[0][0]}{' ' + str(results[0][1]) if results[0][0] == 'errno' else ''}")

    @invariant()
    def observably_identical(self) -> None:
        a, b = (observe(s.m, [pr["p"] for pr in s.procs]) for s in self.sides)
        if a != b:
            lines = []
            for key in a:
                if a[key] != b[key]:
                    if key == "snapshot":
                        lines.append(diff(a[key], b[key]))
                    else:
                        lines.append(f"{key}:\n  fast    {a[key]!r}\n  general {b[key]!r}")
            raise AssertionError("the fast path left a different machine:\n" + "\n".join(lines))

    # -- processes -------------------------------------------------------------------------------------

    @initialize(limit=st.sampled_from([1 << 30, 1 << 30, 64 * KiB, 256 * KiB]))
    def first_process(self, limit: int) -> None:
        """root, whose container the calls below use (RLIMIT_MEMLOCK still
        counts for Type1 without CAP_IPC_LOCK: see drop_privileges)."""
        self.both("spawn", lambda s: s.spawn(0, limit))

    def another_process(self, limit: int, uid: int) -> None:
        """Another process: the group is taken (EBUSY), so its container stays
        without an IOMMU unless the first one has exited."""
        if sum(pr["p"].alive for pr in self.sides[0].procs) < 3:
            self.both("spawn", lambda s: s.spawn(uid, limit))

    def exit(self, i: int) -> None:
        def do(s: Side) -> None:
            pr = s.proc(i)
            if pr is not None:
                pr["p"].exit()
        self.both("exit", do)

    def fork(self, i: int) -> None:
        """A child shares the container, not the memory (sPAPR: EPERM for it)."""
        def do(s: Side) -> None:
            pr = s.proc(i)
            if pr is not None and sum(q["p"].alive for q in s.procs) < 4:
                child = pr["p"].fork()
                s.procs.append({"p": child, "bufs": list(pr["bufs"]), "container": pr["container"],
                                "group": pr["group"]})
        self.both("fork", do)

    def rlimit(self, i: int, pages: int, delta: int) -> None:
        """RLIMIT_MEMLOCK set around the process's locked_vm, to the exact page."""
        def do(s: Side) -> None:
            pr = s.proc(i)
            if pr is None:
                return
            p = pr["p"]
            locked = p.status()["VmLck"] * 1024 // s.page
            limit = max(locked + pages + delta, 0) * s.page
            p.setrlimit(resource.RLIMIT_MEMLOCK, (limit, p.getrlimit(resource.RLIMIT_MEMLOCK)[1]))
        self.both("setrlimit", do)

    def drop_privileges(self, i: int) -> None:
        def do(s: Side) -> None:
            pr = s.proc(i)
            if pr is not None:
                pr["p"].setuid(1000)
        self.both("setuid", do)

    # -- memory ----------------------------------------------------------------------------------------

    def mmap(self, i: int, pages: int, touch: bool, prot: int) -> None:
        def do(s: Side) -> None:
            pr = s.proc(i)
            if pr is None:
                return
            addr = pr["p"].mmap(pages * s.page, prot)
            if touch and prot == PROT_RW:
                pr["p"].write_memory(addr, b"\x11" * (pages * s.page))
            pr["bufs"].append(addr)
        self.both("mmap", do)

    def memory(self, i: int, b: int, off: int, pages: int, op: str) -> None:
        def do(s: Side) -> None:
            pr = s.proc(i)
            if pr is None:
                return
            p = pr["p"]
            addr = pr["bufs"][b % len(pr["bufs"])] + off * s.page
            n = pages * s.page
            if op == "mlock":
                p.mlock(addr, n)
            elif op == "munlock":
                p.munlock(addr, n)
            elif op == "munmap":
                p.munmap(addr, n)
            else:
                p.mprotect(addr, n, {"mprotect-ro": PROT_READ, "mprotect-none": PROT_NONE,
                                     "mprotect-rw": PROT_RW}[op])
        self.both(op, do)

    def touch(self, i: int, b: int, off: int) -> None:
        """The process stores to a page (it becomes present: RAM is used)."""
        def do(s: Side) -> None:
            pr = s.proc(i)
            if pr is not None:
                pr["p"].write_memory(pr["bufs"][b % len(pr["bufs"])] + off * s.page, b"\x77")
        self.both("store", do)

    # -- the other steps, drawn a group at a time (so that small maps stay frequent) ---------------

    def _step(self, data: st.DataObject, steps: dict[str, dict[str, Any]]) -> None:
        name = data.draw(st.sampled_from(sorted(steps)), label="step")
        getattr(self, name)(**{k: data.draw(v, label=k) for k, v in steps[name].items()})

    _PROCESS_STEPS: dict[str, dict[str, Any]] = {
        "another_process": dict(limit=st.sampled_from([1 << 30, 64 * KiB]), uid=st.sampled_from([0, 1000])),
        "exit": dict(i=PROC),
        "fork": dict(i=PROC),
        "rlimit": dict(i=PROC, pages=st.sampled_from([0, 1, 2, 8, 64, 1 << 20]), delta=st.integers(-1, 1)),
        "drop_privileges": dict(i=PROC),
    }

    @rule(data=st.data())
    def process_step(self, data: st.DataObject) -> None:
        self._step(data, self._PROCESS_STEPS)

    _MEMORY_STEPS: dict[str, dict[str, Any]] = {
        "mmap": dict(i=PROC, pages=st.sampled_from([1, 4, 16]), touch=st.booleans(),
                     prot=st.sampled_from([PROT_RW, PROT_RW, PROT_READ])),
        "memory": dict(i=PROC, b=st.integers(0, 4), off=st.integers(0, BUF_PAGES), pages=st.integers(1, 4),
                       op=st.sampled_from(["mlock", "mlock", "munlock", "mprotect-ro", "mprotect-none",
                                           "mprotect-rw", "munmap"])),
        "touch": dict(i=PROC, b=st.integers(0, 4), off=st.integers(0, BUF_PAGES - 1)),
        "use_ram": dict(i=PROC, pages=st.sampled_from([8, 64, 256])),
    }

    @rule(data=st.data())
    def memory_step(self, data: st.DataObject) -> None:
        self._step(data, self._MEMORY_STEPS)

    _FAULTS_STEPS: dict[str, dict[str, Any]] = {
        "inject_fault": dict(n=st.integers(1, 3), k=st.integers(0, 5)),
        "disarm": dict(),
    }

    @rule(data=st.data())
    def faults_step(self, data: st.DataObject) -> None:
        self._step(data, self._FAULTS_STEPS)

    # -- MAP_DMA and UNMAP_DMA -------------------------------------------------------------------------

    @rule(i=PROC, b=st.integers(0, 4), off=st.integers(0, BUF_PAGES),
          npages=st.sampled_from([1, 1, 1, 1, 2, 3, 0, 16]), k=st.integers(0, 40),
          flags=st.sampled_from([3, 3, 3, 1, 2, 0, 4, 5, 8]), argsz=st.sampled_from([32, 32, 32, 16, 40]),
          odd=st.sampled_from([0, 0, 0, 0, 0x800, 0x1000]))
    def map_dma(self, i: int, b: int, off: int, npages: int, k: int, flags: int, argsz: int, odd: int) -> None:
        def do(s: Side) -> Any:
            pr = s.proc(i)
            if pr is None:
                return None
            iovas = s.iovas()
            iova = iovas[k % len(iovas)] + odd
            page = max([s.page] + [w[2] for w in s.windows() if w[0] <= iova < w[0] + w[1]])
            vaddr = pr["bufs"][b % len(pr["bufs"])] + off * s.page
            arg = uapi.vfio_iommu_type1_dma_map(argsz=argsz, flags=flags, vaddr=vaddr, iova=iova,
                                                size=npages * page)
            return pr["p"].ioctl(pr["container"], uapi.VFIO_IOMMU_MAP_DMA, arg)
        self.both("MAP_DMA", do)

    @rule(i=PROC, calls=st.lists(st.tuples(
        st.booleans(), st.integers(0, 4), st.integers(0, BUF_PAGES - 1), st.integers(0, 7),
        st.sampled_from([3, 3, 1, 2]), st.sampled_from([1, 1, 1, 2])), min_size=1, max_size=10))
    def small_maps(self, i: int, calls: list[tuple[bool, int, int, int, int, int]]) -> None:
        """The common case, several times: MAP_DMA of a page (or two) of a
        buffer at one of eight IOVAs of the first window or IOVA range (so
        maps alias pages, overlap each other, replace TCEs), or UNMAP_DMA
        there; the machines are compared after each call."""
        for unmap, b, off, slot, flags, npages in calls:
            def do(s: Side) -> Any:
                pr = s.proc(i)
                if pr is None:
                    return None
                start, _, page = (s.windows() or [(0x100000, 1 << 30, s.page)])[0]
                iova, size = start + slot * page, npages * page
                if unmap:
                    un = uapi.vfio_iommu_type1_dma_unmap(argsz=24, iova=iova, size=size)
                    return pr["p"].ioctl(pr["container"], uapi.VFIO_IOMMU_UNMAP_DMA, un), un.size
                vaddr = pr["bufs"][b % len(pr["bufs"])] + off * s.page
                arg = uapi.vfio_iommu_type1_dma_map(argsz=32, flags=flags, vaddr=vaddr, iova=iova, size=size)
                return pr["p"].ioctl(pr["container"], uapi.VFIO_IOMMU_MAP_DMA, arg)
            self.both("small unmap" if unmap else "small map", do)
            self.observably_identical()

    @rule(i=PROC, npages=st.sampled_from([1, 1, 1, 2, 0, 3]), k=st.integers(0, 40),
          flags=st.sampled_from([0, 0, 0, 0, 1, 2, 4]), odd=st.sampled_from([0, 0, 0, 0x800]))
    def unmap_dma(self, i: int, npages: int, k: int, flags: int, odd: int) -> None:
        def do(s: Side) -> Any:
            pr = s.proc(i)
            if pr is None:
                return None
            iovas = s.iovas()
            iova = iovas[k % len(iovas)] + odd
            page = max([s.page] + [w[2] for w in s.windows() if w[0] <= iova < w[0] + w[1]])
            size = npages * page
            if flags == 2:                             # VFIO_DMA_UNMAP_FLAG_ALL
                iova = size = 0
            arg = uapi.vfio_iommu_type1_dma_unmap(argsz=24, flags=flags, iova=iova, size=size)
            ret = pr["p"].ioctl(pr["container"], uapi.VFIO_IOMMU_UNMAP_DMA, arg)
            return ret, arg.size
        self.both("UNMAP_DMA", do)

    @rule(i=PROC, k=st.integers(0, 40), write=st.booleans())
    def device_dma(self, i: int, k: int, write: bool) -> None:
        """The device reads or writes a page at an IOVA (through the TCE cache or IOTLB)."""
        def do(s: Side) -> Any:
            iovas = s.iovas()
            bm = s.m.device(s.bdf).bus_master
            iova = iovas[k % len(iovas)]
            if write:
                bm.dma_write(iova, b"\xd0" * 64)
                return None
            return bm.dma_read(iova, 64)
        self.both("device DMA", do)

    # -- sPAPR v2: preregistration and windows ------------------------------------------------------------

    @precondition(lambda self: self.sides[0].v2)
    @rule(i=PROC, b=st.integers(0, 4), off=st.integers(0, 8), pages=st.sampled_from([1, 4, 64]),
          register=st.booleans())
    def prereg(self, i: int, b: int, off: int, pages: int, register: bool) -> None:
        def do(s: Side) -> Any:
            pr = s.proc(i)
            if pr is None:
                return None
            vaddr = pr["bufs"][b % len(pr["bufs"])] + off * s.page
            arg = uapi.vfio_iommu_spapr_register_memory(argsz=24, vaddr=vaddr, size=pages * s.page)
            cmd = uapi.VFIO_IOMMU_SPAPR_REGISTER_MEMORY if register else uapi.VFIO_IOMMU_SPAPR_UNREGISTER_MEMORY
            return pr["p"].ioctl(pr["container"], cmd, arg)
        self.both("REGISTER_MEMORY" if register else "UNREGISTER_MEMORY", do)

    @precondition(lambda self: self.sides[0].v2)
    @rule(i=PROC, shift=st.sampled_from([12, 16]), size=st.sampled_from([1 << 24, 1 << 30]),
          levels=st.sampled_from([1, 2]), create=st.booleans(), k=st.integers(0, 3))
    def window(self, i: int, shift: int, size: int, levels: int, create: bool, k: int) -> None:
        def do(s: Side) -> Any:
            pr = s.proc(i)
            if pr is None:
                return None
            if create:
                arg = uapi.vfio_iommu_spapr_tce_create(argsz=40, page_shift=shift, window_size=size, levels=levels)
                pr["p"].ioctl(pr["container"], uapi.VFIO_IOMMU_SPAPR_TCE_CREATE, arg)
                return arg.start_addr
            starts = [w[0] for w in s.windows()] + [0, 1 << 59]
            arg = uapi.vfio_iommu_spapr_tce_remove(argsz=16, start_addr=starts[k % len(starts)])
            return pr["p"].ioctl(pr["container"], uapi.VFIO_IOMMU_SPAPR_TCE_REMOVE, arg)
        self.both("TCE_CREATE" if create else "TCE_REMOVE", do)

    # -- fault injection and RAM -------------------------------------------------------------------------

    def inject_fault(self, n: int, k: int) -> None:
        """The nth event from now at one of the sites a small map meets fails."""
        sites = [None, "pin_user_pages", "account_locked_vm", "kmalloc"]
        sites += ["iommu_map"] if self.config.startswith("type1") else \
            ["hcall"] if self.config.startswith("pseries") else ["alloc_pages"]
        self.both("inject_fault", lambda s: s.m.inject_fault(n, sites[k % len(sites)]) and None)

    def disarm(self) -> None:
        self.both("disarm", lambda s: s.m.faults.disarm())

    def use_ram(self, i: int, pages: int) -> None:
        """The process fills memory (on a machine with little RAM: until none is free)."""
        def do(s: Side) -> Any:
            pr = s.proc(i)
            if pr is None:
                return None
            free = s.m.meminfo()["MemFree"] * 1024 // s.page
            n = max(min(pages, free), 1)
            addr = pr["p"].mmap(n * s.page)
            pr["bufs"].append(addr)
            pr["p"].write_memory(addr, b"\x99" * (n * s.page))
            return None
        self.both("fill RAM", do)


def _machine_test(config: str, ram_pages: int | None = None, examples: int = 100) -> Any:
    cls = type(f"FastPathEquality_{config}", (FastPathEquality,), {"config": config, "ram_pages": ram_pages})
    cls.TestCase.settings = settings(max_examples=examples, stateful_step_count=50, deadline=None)
    return cls.TestCase


TestType1v2 = _machine_test("type1v2")
TestType1 = _machine_test("type1", examples=40)
TestPowerNVv1 = _machine_test("powernv-v1")
TestPowerNVv2 = _machine_test("powernv-v2")
TestPseriesV1 = _machine_test("pseries-v1")
TestPseriesV2 = _machine_test("pseries-v2")
TestPowerNV64kV1 = _machine_test("powernv-64k-v1", examples=30)
TestPowerNV64kV2 = _machine_test("powernv-64k-v2", examples=30)
# A machine whose RAM the processes can exhaust: pins then fail for want of a page.
TestType1v2LowRam = _machine_test("type1v2", ram_pages=600, examples=40)
TestPowerNVv1LowRam = _machine_test("powernv-v1", ram_pages=600, examples=40)


# -- the boundaries, one by one ------------------------------------------------------------------------

class Twins:
    """Both machines of a configuration, driven by plain calls: each step's
    outcome and the machines after it must be equal."""

    def __init__(self, config: str, ram_pages: int | None = None) -> None:
        self.sides = [Side(config, True, ram_pages), Side(config, False, ram_pages)]
        self.fast = self.sides[0]
        self.taken: list[str] = []
        for drv in self.fast.m.kernel.vfio.iommu_drivers:
            for name in ("_do_map_fast", "_do_unmap_fast", "_map_fast", "_unmap_fast"):
                if hasattr(drv, name):
                    setattr(drv, name, self._noting(name, getattr(drv, name)))

    def _noting(self, name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def wrapper(*args: Any) -> Any:
            res = fn(*args)
            if res is not None and res is not False:
                self.taken.append(name)
            return res
        return wrapper

    def step(self, action: Callable[[Side], Any]) -> tuple[Any, ...]:
        results = [outcome(lambda s=s: action(s)) for s in self.sides]
        assert results[0] == results[1], f"fast {results[0]!r} != general {results[1]!r}"
        a, b = (observe(s.m, [pr["p"] for pr in s.procs]) for s in self.sides)
        assert a == b, "\n".join(f"{k}:\n  fast    {a[k]!r}\n  general {b[k]!r}" for k in a if a[k] != b[k])
        return results[0]

    def fast_taken(self, action: Callable[[Side], Any]) -> tuple[Any, ...]:
        """A step the fast path must complete."""
        before = len(self.taken)
        res = self.step(action)
        assert len(self.taken) > before, f"the fast path was not taken: {res!r}"
        return res

    def general_only(self, action: Callable[[Side], Any]) -> tuple[Any, ...]:
        """A step the fast path must leave to the general path."""
        before = len(self.taken)
        res = self.step(action)
        assert len(self.taken) == before, f"the fast path took it: {res!r}"
        return res


def first_window(t: Twins) -> tuple[int, int, int]:
    """(start, size, IOMMU page size) of the default DMA window (sPAPR, from
    VFIO_IOMMU_SPAPR_TCE_GET_INFO: it may not exist yet), or of a range of
    the first Type1 IOVA range."""
    s = t.fast
    if not s.spapr:
        return 0x100000, 1 << 30, s.page
    info = uapi.vfio_iommu_spapr_tce_info(argsz=ctypes.sizeof(uapi.vfio_iommu_spapr_tce_info))
    s.procs[0]["p"].ioctl(s.procs[0]["container"], uapi.VFIO_IOMMU_SPAPR_TCE_GET_INFO, info)
    return info.dma32_window_start, info.dma32_window_size, 4096


def map_at(iova: int, vaddr_of: Callable[[Side], int], size: int | None = None, flags: int = 3,
           proc: int = 0) -> Callable[[Side], Any]:
    def do(s: Side) -> Any:
        pr = s.procs[proc]
        arg = uapi.vfio_iommu_type1_dma_map(argsz=32, flags=flags, vaddr=vaddr_of(s), iova=iova,
                                            size=s.page if size is None else size)
        return pr["p"].ioctl(pr["container"], uapi.VFIO_IOMMU_MAP_DMA, arg)
    return do


def unmap_at(iova: int, size: int | None = None, proc: int = 0) -> Callable[[Side], Any]:
    def do(s: Side) -> Any:
        pr = s.procs[proc]
        arg = uapi.vfio_iommu_type1_dma_unmap(argsz=24, iova=iova, size=s.page if size is None else size)
        return pr["p"].ioctl(pr["container"], uapi.VFIO_IOMMU_UNMAP_DMA, arg), arg.size
    return do


def buf(page: int = 0, k: int = 0, proc: int = 0) -> Callable[[Side], int]:
    return lambda s: s.procs[proc]["bufs"][k] + page * s.page


@pytest.mark.parametrize("config", ["type1v2", "type1", "powernv-v1", "powernv-v2", "pseries-v1", "pseries-v2",
                                    "powernv-64k-v1", "powernv-64k-v2"])
def test_the_usual_pair_takes_the_fast_paths(config):
    """MAP_DMA + UNMAP_DMA of a page, repeated, takes both fast paths every
    time, and leaves what the general path leaves."""
    t = Twins(config)
    t.step(lambda s: s.spawn(0, 1 << 30))
    start, _, page = first_window(t)
    start += 0x100000
    t.step(map_at(start - page, buf(0), size=page))    # (v1: the first map creates the default window)
    for n in range(3):
        t.fast_taken(map_at(start, buf(n), size=page))
        assert t.taken[-1] in ("_do_map_fast", "_map_fast")
        t.fast_taken(unmap_at(start, size=page))
        assert t.taken[-1] in ("_do_unmap_fast", "_unmap_fast")
    t.step(unmap_at(start - page, size=page))
    assert t.fast.m.pinned_pages() == (BUF_PAGES // 2 if t.fast.v2 else 0)


def test_type1_rlimit_memlock_reached_exactly():
    """Without CAP_IPC_LOCK, a map that brings locked_vm exactly to
    RLIMIT_MEMLOCK is the fast path's; one page more is the general path's
    ENOMEM, with its dmesg line, nothing left pinned or charged."""
    t = Twins("type1v2")
    t.step(lambda s: s.spawn(0, 1 << 30))
    t.step(lambda s: s.procs[0]["p"].setrlimit(resource.RLIMIT_MEMLOCK, (3 * s.page, 1 << 62)))
    t.step(lambda s: s.procs[0]["p"].setuid(1000))
    t.fast_taken(map_at(0x100000, buf(0), size=2 * 4096))
    t.fast_taken(map_at(0x200000, buf(2)))
    assert t.fast.procs[0]["p"].status()["VmLck"] == 12
    res = t.general_only(map_at(0x300000, buf(3)))
    assert res[1] == "ENOMEM"
    assert "RLIMIT_MEMLOCK" in t.fast.m.dmesg()[-1]
    t.fast_taken(unmap_at(0x200000))
    t.fast_taken(map_at(0x300000, buf(3)))


def test_type1_aliases_of_one_page():
    """Two IOVAs mapping one page: the second pin finds the page pinned
    already, and both paths announce the double charge (deviation 9);
    mlock'ed pages likewise."""
    t = Twins("type1v2")
    t.step(lambda s: s.spawn(0, 1 << 30))
    t.fast_taken(map_at(0x100000, buf(5)))
    t.fast_taken(map_at(0x200000, buf(5)))
    assert "0x200000+0x1000: 0 page(s) already mlock'ed and 1 already pinned" in t.fast.m.dmesg()[-1]
    t.step(lambda s: s.procs[0]["p"].mlock(buf(8)(s), s.page))
    t.fast_taken(map_at(0x300000, buf(8)))
    assert "0x300000+0x1000: 1 page(s) already mlock'ed and 0 already pinned" in t.fast.m.dmesg()[-1]
    t.fast_taken(unmap_at(0x100000))
    t.fast_taken(unmap_at(0x200000))
    t.fast_taken(unmap_at(0x300000))
    assert t.fast.m.pinned_pages() == 0


@pytest.mark.parametrize("config", ["type1v2", "powernv-v1", "pseries-v1"])
def test_pins_when_ram_runs_out(config):
    """A page not yet present needs RAM to be pinned: with none free the
    general path answers (Type1 ENOMEM, sPAPR v1 EFAULT, logged as RAM
    exhausted); a present page still pins on the fast path."""
    t = Twins(config, ram_pages=400)
    t.step(lambda s: s.spawn(0, 1 << 30))

    def fill(s: Side) -> None:
        """Every free page written, and a few more mapped but never touched."""
        p = s.procs[0]["p"]
        free = s.m.meminfo()["MemFree"] * 1024 // s.page
        addr = p.mmap((free + 8) * s.page)
        s.procs[0]["bufs"].append(addr)
        p.write_memory(addr, b"\x01" * (free * s.page))
        s.procs[0]["untouched"] = addr + free * s.page
    t.step(fill)
    assert t.fast.m.meminfo()["MemFree"] == 0
    start = first_window(t)[0] + 0x100000
    t.step(map_at(start + 0x100000, buf(0), size=4096))      # (v1: the first map creates the default window)
    res = t.general_only(map_at(start, lambda s: s.procs[0]["untouched"]))
    assert res[1] == ("ENOMEM" if config == "type1v2" else "EFAULT"), res
    t.fast_taken(map_at(start, buf(0, k=1)))
    t.fast_taken(unmap_at(start))


@pytest.mark.parametrize("config", ["powernv-v1", "powernv-v2", "pseries-v1", "pseries-v2"])
def test_spapr_window_edges(config):
    """The first and last IOMMU page of the window are the fast path's; past
    the end, an unaligned IOVA (MAP_DMA returns 1), and two pages from the
    last one are the general path's."""
    t = Twins(config)
    t.step(lambda s: s.spawn(0, 1 << 30))
    start, size, page = first_window(t)
    last = start + size - page
    t.step(map_at(start + page, buf(0), size=page))     # (v1: the first map creates the default window)
    for iova in (start, last):
        t.fast_taken(map_at(iova, buf(1), size=page))
    assert t.general_only(map_at(start + size, buf(1), size=page))[1] == "ENXIO"
    assert t.general_only(map_at(start + 0x800, buf(1), size=page)) == ("ok", 1)
    res = t.general_only(map_at(last, buf(2), size=2 * page))
    assert res[0] == "errno", res
    for iova in (start, last):
        t.fast_taken(unmap_at(iova, size=page))
    t.fast_taken(unmap_at(last, size=page))            # an empty entry: nothing to drop
    assert t.general_only(unmap_at(start + size, size=page))[1] == "ENXIO"


@pytest.mark.parametrize("config", ["powernv-v1", "pseries-v1", "powernv-v2", "pseries-v2"])
def test_spapr_map_over_a_mapped_entry(config):
    """A map over an entry that maps something replaces it: v1 unpins the old
    page, v2 drops the old region's mapping count, as the general path does."""
    t = Twins(config)
    t.step(lambda s: s.spawn(0, 1 << 30))
    start, _, page = first_window(t)
    t.step(map_at(start + page, buf(0), size=page))     # (v1: the first map creates the default window)
    t.fast_taken(map_at(start, buf(1), size=page))
    t.fast_taken(map_at(start, buf(2), size=page, flags=1))
    t.fast_taken(map_at(start, buf(2), size=page, flags=2))
    t.fast_taken(unmap_at(start, size=page))


def test_v2_unregistered_memory_and_levels():
    """v2: memory outside every preregistered region, and a map into a
    two-level window whose indirect level is not allocated yet (the general
    path allocates it), then a map the level exists for (fast)."""
    t = Twins("powernv-v2")
    t.step(lambda s: s.spawn(0, 1 << 30))
    start, _, page = first_window(t)
    assert t.general_only(map_at(start, buf(BUF_PAGES - 1), size=page))[1] == "EINVAL"

    def create(s: Side) -> int:
        arg = uapi.vfio_iommu_spapr_tce_create(argsz=40, page_shift=12, window_size=1 << 30, levels=2)
        s.procs[0]["p"].ioctl(s.procs[0]["container"], uapi.VFIO_IOMMU_SPAPR_TCE_CREATE, arg)
        return arg.start_addr
    ddw = t.step(create)[1]
    t.general_only(map_at(ddw, buf(1), size=4096))
    t.fast_taken(map_at(ddw + 4096, buf(2), size=4096))
    t.fast_taken(unmap_at(ddw, size=4096))
    t.fast_taken(unmap_at(ddw + 4096, size=4096))


@pytest.mark.parametrize("config", ["type1v2", "powernv-v1", "pseries-v2"])
def test_armed_fault_injection_takes_the_general_path(config):
    """While a failure is armed every map is the general path's, which makes
    it fail where it should; once it fired the fast path is back."""
    t = Twins(config)
    t.step(lambda s: s.spawn(0, 1 << 30))
    start, _, page = first_window(t)
    t.step(map_at(start + 0x10000, buf(0), size=page))     # (v1: the first map creates the default window)
    site = {"type1v2": "iommu_map", "powernv-v1": "pin_user_pages", "pseries-v2": "hcall"}[config]
    t.step(lambda s: s.m.inject_fault(1, site) and None)
    res = t.general_only(map_at(start, buf(1), size=page))
    assert res[0] == "errno", res
    assert t.fast.m.faults.fired
    t.fast_taken(map_at(start, buf(1), size=page))
    t.fast_taken(unmap_at(start, size=page))


def test_device_dma_sees_what_the_fast_path_mapped():
    """The translation caches: a device reads through a mapping, the mapping
    goes and another takes its IOVA, and the device reads the new page."""
    for config in ("type1v2", "powernv-v1", "pseries-v2"):
        t = Twins(config)
        t.step(lambda s: s.spawn(0, 1 << 30))
        start, _, page = first_window(t)
        t.step(map_at(start + 0x10000, buf(0), size=page))     # (v1: the first map creates the default window)
        t.step(lambda s: s.procs[0]["p"].write_memory(buf(2)(s), b"\x22" * 16))
        t.fast_taken(map_at(start, buf(1), size=page))
        assert t.step(lambda s: s.m.device(s.bdf).bus_master.dma_read(start, 16))[1] == b"\x5a" * 16
        t.fast_taken(unmap_at(start, size=page))
        t.fast_taken(map_at(start, buf(2), size=page))
        assert t.step(lambda s: s.m.device(s.bdf).bus_master.dma_read(start, 16))[1] == b"\x22" * 16


@pytest.mark.parametrize("config", ["powernv-v1", "pseries-v1", "powernv-64k-v1", "type1v2"])
def test_read_only_memory(config):
    """A device-read map (READ only) of a read-only mapping: sPAPR v1's
    short-term pin takes only present pages (untouched ones are EFAULT, as
    the reference traces show on Linux 6.12), Type1's long-term pin unshares
    the zero page and takes it.  Once the page is present the fast path
    takes it on both."""
    t = Twins(config)
    t.step(lambda s: s.spawn(0, 1 << 30))
    start, _, page = first_window(t)
    start += 0x100000
    t.step(map_at(start - page, buf(0), size=page))     # (v1: the first map creates the default window)

    def mmap_ro(s: Side) -> None:
        p = s.procs[0]["p"]
        untouched = p.mmap(4 * s.page, PROT_READ)
        touched = p.mmap(4 * s.page)
        p.write_memory(touched, b"\x33" * (4 * s.page))
        p.mprotect(touched, 4 * s.page, PROT_READ)
        s.procs[0]["bufs"] += [untouched, touched]
    t.step(mmap_ro)
    if config == "type1v2":
        t.fast_taken(map_at(start, buf(0, k=1), size=page, flags=1))
        t.fast_taken(unmap_at(start, size=page))
    else:
        assert t.general_only(map_at(start, buf(0, k=1), size=page, flags=1))[1] == "EFAULT"
    assert t.general_only(map_at(start, buf(1, k=1), size=page, flags=3))[1] == "EFAULT"
    t.fast_taken(map_at(start, buf(1, k=2), size=page, flags=1))
    t.fast_taken(unmap_at(start, size=page))
    assert t.general_only(map_at(start, buf(1, k=2), size=page, flags=2))[1] == "EFAULT"


def test_type1_unmap_after_the_mapping_process_exited():
    """A forked child unmaps what its parent mapped after the parent exited:
    the pages are unpinned, and the refund goes with the dead mm (the
    child's locked_vm is untouched), on the fast path as on the general."""
    t = Twins("type1v2")
    t.step(lambda s: s.spawn(0, 1 << 30))
    t.fast_taken(map_at(0x100000, buf(0), size=2 * 4096))

    def fork_and_exit(s: Side) -> None:
        parent = s.procs[0]
        child = parent["p"].fork()
        s.procs.append({"p": child, "bufs": list(parent["bufs"]), "container": parent["container"],
                        "group": parent["group"]})
        parent["p"].exit()
    t.step(fork_and_exit)
    assert t.fast.m.pinned_pages() == 2
    assert t.fast_taken(unmap_at(0x100000, size=2 * 4096, proc=1)) == ("ok", (0, 2 * 4096))
    assert t.fast.m.pinned_pages() == 0
    assert t.fast.procs[1]["p"].status()["VmLck"] == 0
