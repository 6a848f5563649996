"""The fast pin of a real process's memory (``vfiosim run``) is observably
identical to the general pin.

Under ``vfiosim run`` a task's address space is transport/host.py's
``HostMM``: the real process's mappings, looked up with PROCMAP_QUERY, pins
counted in 1 GiB windows.  Its ``pin_fast()`` serves the drivers' fast paths
for small maps (Type1's _do_map_fast, sPAPR v1's _map_fast), where
``_pin_run()`` serves the general path.  As tests/test_fast_path_equality.py
does for simulated processes, Hypothesis drives two machines alike, one with
the fast paths and one without, and compares after every step what a program
or a device could observe (the same comparison, minus the sizes of the real
process, which are the host's).  Here each machine's tasks are HostMM-backed:
the test process itself, through its own /proc files, as the daemon opens
them.  The real memory is changed once for both machines: mmap, mprotect
(read-only, PROT_NONE), munmap, stores (pages become present), and a device's
placeholder mapping (PROT_NONE, private) that the kernel sees as the device's
VM_PFNMAP mapping.  RAM runs out on machines with little of it.
"""

from __future__ import annotations

import ctypes
import dataclasses
import mmap
import os
import resource
from typing import Any, Callable

import pytest
from hypothesis import event, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

import vfiosim
from machinestate import diff, snapshot
from test_fast_path_equality import CONFIGS, _caches, _generations, outcome
from vfiosim import uapi
from vfiosim.kernel.cred import Cred
from vfiosim.machine import Process
from vfiosim.transport.host import HostMemoryObject, HostMM, HostProcess

PAGE = mmap.PAGESIZE
PROT_NONE, PROT_READ, PROT_RW = 0, 1, 3
BUF_PAGES = 32
PROC = st.sampled_from([0, 0, 0, 1, 2])
HOST_CONFIGS = ["type1v2", "type1", "powernv-v1", "powernv-v2", "pseries-v1", "pseries-v2"]

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]


class RealMemory:
    """Mappings of this very process, made and changed with libc, each page's
    protection known (a store is made only where it would not fault).  Only
    pages made here are ever changed, and those still mapped are unmapped at
    the end."""

    def __init__(self) -> None:
        self.prot: dict[int, int] = {}            # page address -> PROT_*, for the pages mapped here

    def mmap(self, pages: int, prot: int) -> int:
        addr = _libc.mmap(None, pages * PAGE, prot, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS, -1, 0)
        if addr in (None, ctypes.c_void_p(-1).value):
            raise OSError(ctypes.get_errno(), "mmap")
        for i in range(pages):
            self.prot[addr + i * PAGE] = prot
        return addr

    def owns(self, addr: int, pages: int) -> bool:
        return all(addr + i * PAGE in self.prot for i in range(pages))

    def mprotect(self, addr: int, pages: int, prot: int) -> bool:
        if not self.owns(addr, pages):
            return False
        assert _libc.mprotect(addr, pages * PAGE, prot) == 0
        for i in range(pages):
            self.prot[addr + i * PAGE] = prot
        return True

    def munmap(self, addr: int, pages: int) -> bool:
        if not self.owns(addr, pages):
            return False
        assert _libc.munmap(addr, pages * PAGE) == 0
        for i in range(pages):
            del self.prot[addr + i * PAGE]
        return True

    def store(self, addr: int, byte: int) -> bool:
        """The process's own store (the page becomes present), where it may store."""
        if self.prot.get(addr & ~(PAGE - 1), 0) & 2:
            ctypes.memset(addr, byte, 1)
            return True
        return False

    def close(self) -> None:
        for page in sorted(self.prot):
            _libc.munmap(page, PAGE)
        self.prot.clear()


def attach(m: vfiosim.Machine, limit: int) -> Process:
    """A task for this process, as the daemon attaches one (root: every capability)."""
    k = m.kernel
    pid = k._next_pid
    k._next_pid += 1
    task = k.attach(pid, "host", Cred(), HostMM(pid, k.phys, HostProcess.open(os.getpid())), (limit, 1 << 62))
    return Process(m, task)


def observe(m: vfiosim.Machine, procs: list[Process]) -> dict[str, Any]:
    """tests/test_fast_path_equality.py's observe(), with each process's
    status from its simulated task (its mapped and resident sizes are the
    real process's, which change as the test runs)."""
    faults = m.faults

    def status(p: Process) -> Any:
        t = p.task
        return (t.cred.proc_status(), t.mm.locked_vm, t.mm.pinned_vm, t.files.slots)
    return {
        "dmesg": m.dmesg(include_debug=True),
        "status": [status(p) if p.alive else None for p in procs],
        "meminfo": m.meminfo(),
        "snapshot": snapshot(m),
        "generations": _generations(m),
        "caches": _caches(m),
        "faults": (dict(faults.counts), list(faults.fired), faults.armed),
        "oopses": list(m.oopses),
    }


class HostSide:
    """One machine whose tasks are this process (HostMM), each with a container and the group."""

    def __init__(self, config: str, fast: bool, ram_pages: int | None) -> None:
        preset, self.iommu_type, page_size = CONFIGS[config]
        assert page_size == PAGE
        m = vfiosim.Machine.preset(preset, page_size=page_size)
        if ram_pages is not None:
            m = vfiosim.Machine(dataclasses.replace(m.spec, ram=ram_pages * page_size), page_size=page_size)
        m.fast_paths = fast
        self.m = m
        self.procs: list[dict[str, Any]] = []
        self.gid = min(gid for gid, bdfs in m.iommu_groups().items() if m.device(bdfs[0]).driver == "vfio-pci")
        self.bdf = m.iommu_groups()[self.gid][0]
        m.device(self.bdf).config.data[4] |= 0x4     # bus master on: the device may DMA
        self.hog: Process | None = None              # a simulated process that uses RAM

    @property
    def v2(self) -> bool:
        return self.iommu_type == uapi.VFIO_SPAPR_TCE_v2_IOMMU

    @property
    def spapr(self) -> bool:
        return self.iommu_type != uapi.VFIO_TYPE1v2_IOMMU and self.iommu_type != uapi.VFIO_TYPE1_IOMMU

    def ioctl(self, pr: dict[str, Any], fd: int, cmd: int, arg: Any) -> int:
        """An ioctl whose argument is in this process's memory (as a real program's is)."""
        if isinstance(arg, int):
            return pr["p"].ioctl(fd, cmd, arg)
        return pr["p"].ioctl(fd, cmd, ctypes.addressof(arg))

    def spawn(self, limit: int, prereg: int) -> None:
        p = attach(self.m, limit)
        pr: dict[str, Any] = {"p": p, "container": None, "group": None}
        self.procs.append(pr)
        c = pr["container"] = p.open("/dev/vfio/vfio")
        g = pr["group"] = p.open(f"/dev/vfio/{self.gid}")
        self.ioctl(pr, g, uapi.VFIO_GROUP_SET_CONTAINER, ctypes.c_int32(c))
        p.ioctl(c, uapi.VFIO_SET_IOMMU, self.iommu_type)
        if self.iommu_type == uapi.VFIO_SPAPR_TCE_IOMMU:
            p.ioctl(c, uapi.VFIO_IOMMU_ENABLE)
        elif self.v2:
            self.ioctl(pr, c, uapi.VFIO_IOMMU_SPAPR_REGISTER_MEMORY,
                       uapi.vfio_iommu_spapr_register_memory(argsz=24, vaddr=prereg, size=BUF_PAGES // 2 * PAGE))

    def proc(self, i: int) -> dict[str, Any] | None:
        live = [pr for pr in self.procs if pr["p"].alive]
        return live[i % len(live)] if live else None

    def windows(self) -> list[tuple[int, int, int]]:
        """(bus start, size, IOMMU page size) of the sPAPR windows, or the Type1 usable ranges."""
        out = []
        for pr in self.procs:
            if not pr["p"].alive or pr["container"] is None:
                continue
            cont = getattr(pr["p"].task.files.get(pr["container"]), "container", None)
            data = getattr(cont, "iommu_data", None)
            for t in getattr(data, "tables", []) or []:
                if t is not None:
                    out.append((t.bus_start, t.bus_size, t.page_size))
            for lo, hi in getattr(data, "iova_list", []) or []:
                out.append((lo, hi - lo + 1, PAGE))
        return out

    def iovas(self) -> list[int]:
        out = [0, 0x100000, 0x101000]
        for start, size, page in self.windows()[:3]:
            end = start + min(size, 1 << 46)
            out += [start, start + page, start + 2 * page, end - page, end]
        return out


class HostFastPathEquality(RuleBasedStateMachine):
    """Two machines, fast paths on and off, whose tasks are this process."""

    config = "type1v2"
    ram_pages: int | None = None

    def __init__(self) -> None:
        super().__init__()
        self.mem = RealMemory()
        self.bufs: list[int] = []                    # starts of the mappings made (some since changed)
        self.sides = [HostSide(self.config, True, self.ram_pages), HostSide(self.config, False, self.ram_pages)]
        self.fast_taken = 0
        for drv in self.sides[0].m.kernel.vfio.iommu_drivers:
            for name in ("_do_map_fast", "_map_fast"):
                if hasattr(drv, name):
                    setattr(drv, name, self._counting(getattr(drv, name)))

    def _counting(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        def wrapper(*args: Any) -> Any:
            res = fn(*args)
            self.fast_taken += bool(res)
            return res
        return wrapper

    def teardown(self) -> None:
        n = self.fast_taken
        event(f"fast maps taken: {'0' if not n else '1-4' if n < 5 else '5-19' if n < 20 else '20+'}")
        for s in self.sides:
            for pr in s.procs:
                if pr["p"].alive:
                    pr["p"].exit()
        self.mem.close()

    def both(self, what: str, action: Callable[[HostSide], Any]) -> None:
        results = [outcome(lambda s=s: action(s)) for s in self.sides]
        assert results[0] == results[1], f"{what}: fast {results[0]!r} != general {results[1]!r}"
        event(f"{what}: {results[0][0]}{' ' + str(results[0][1]) if results[0][0] == 'errno' else ''}")

    @invariant()
    def observably_identical(self) -> None:
        a, b = (observe(s.m, [pr["p"] for pr in s.procs]) for s in self.sides)
        if a != b:
            lines = [diff(a[k], b[k]) if k == "snapshot" else f"{k}:\n  fast    {a[k]!r}\n  general {b[k]!r}"
                     for k in a if a[k] != b[k]]
            raise AssertionError("the fast path left a different machine:\n" + "\n".join(lines))

    def buf(self, b: int, off: int) -> int:
        return self.bufs[b % len(self.bufs)] + off * PAGE

    # -- processes ---------------------------------------------------------------------------------------

    @initialize(limit=st.sampled_from([1 << 30, 1 << 30, 64 * 1024, 256 * 1024]), hog=st.integers(0, 6))
    def first_process(self, limit: int, hog: int) -> None:
        """A buffer, written (its pages present); the task, with its container;
        on a machine with little RAM, a simulated process that leaves ``hog``
        pages free."""
        addr = self.mem.mmap(BUF_PAGES, PROT_RW)
        ctypes.memset(addr, 0x5A, BUF_PAGES * PAGE)
        self.bufs.append(addr)
        self.both("spawn", lambda s: s.spawn(limit, addr))
        if self.ram_pages is not None:
            def fill(s: HostSide) -> None:
                s.hog = s.m.spawn()
                free = s.m.meminfo()["MemFree"] * 1024 // PAGE - hog
                if free > 0:
                    a = s.hog.mmap(free * PAGE)
                    s.hog.write_memory(a, b"\x01" * (free * PAGE))
            self.both("fill RAM", fill)

    def another_process(self, limit: int) -> None:
        """Another task of this process: the group is taken (EBUSY) while the first lives."""
        if sum(pr["p"].alive for pr in self.sides[0].procs) < 3:
            self.both("spawn", lambda s: s.spawn(limit, self.bufs[0]))

    def exit(self, i: int) -> None:
        def do(s: HostSide) -> None:
            pr = s.proc(i)
            if pr is not None:
                pr["p"].exit()
        self.both("exit", do)

    def fork(self, i: int) -> None:
        """A child task sharing the container, with its own HostMM of the same memory
        (sPAPR: EPERM for it, the mm is not the container's)."""
        def do(s: HostSide) -> None:
            pr = s.proc(i)
            if pr is None or sum(q["p"].alive for q in s.procs) >= 4:
                return
            k = s.m.kernel
            pid = k._next_pid
            k._next_pid += 1
            child = k.fork(pr["p"].task, pid, HostMM(pid, k.phys, HostProcess.open(os.getpid())))
            s.procs.append({"p": Process(s.m, child), "container": pr["container"], "group": pr["group"]})
        self.both("fork", do)

    def rlimit(self, i: int, pages: int, delta: int) -> None:
        """RLIMIT_MEMLOCK set around the task's locked_vm, to the exact page."""
        def do(s: HostSide) -> None:
            pr = s.proc(i)
            if pr is not None:
                t = pr["p"].task
                limit = max(t.mm.locked_vm + pages + delta, 0) * PAGE
                t.setrlimit(resource.RLIMIT_MEMLOCK, (limit, t.rlimit(resource.RLIMIT_MEMLOCK)[1]))
        self.both("setrlimit", do)

    def drop_privileges(self, i: int) -> None:
        def do(s: HostSide) -> None:
            pr = s.proc(i)
            if pr is not None:
                pr["p"].setuid(1000)
        self.both("setuid", do)

    _PROCESS_STEPS: dict[str, dict[str, Any]] = {
        "another_process": dict(limit=st.sampled_from([1 << 30, 64 * 1024])),
        "exit": dict(i=PROC),
        "fork": dict(i=PROC),
        "rlimit": dict(i=PROC, pages=st.sampled_from([0, 1, 2, 8, 1 << 20]), delta=st.integers(-1, 1)),
        "drop_privileges": dict(i=PROC),
    }

    def _step(self, data: st.DataObject, steps: dict[str, dict[str, Any]]) -> None:
        name = data.draw(st.sampled_from(sorted(steps)), label="step")
        getattr(self, name)(**{k: data.draw(v, label=k) for k, v in steps[name].items()})

    @rule(data=st.data())
    def process_step(self, data: st.DataObject) -> None:
        self._step(data, self._PROCESS_STEPS)

    # -- the real memory: changed once, seen by both machines ------------------------------------------------

    def mmap(self, pages: int, touch: bool, prot: int) -> None:
        """A new mapping (read-only ones: untouched, or written before mprotect)."""
        if len(self.bufs) >= 8:
            return
        addr = self.mem.mmap(pages, PROT_RW if touch else prot)
        if touch:
            ctypes.memset(addr, 0x11, pages * PAGE)
            self.mem.mprotect(addr, pages, prot)
        self.bufs.append(addr)

    def change(self, b: int, off: int, pages: int, op: str) -> None:
        """mprotect (read-only, PROT_NONE, back to read-write) or munmap of pages
        of a mapping: mappings split, and a range can end mid-map."""
        addr = self.buf(b, off)
        if op == "munmap":
            self.mem.munmap(addr, pages)
        else:
            self.mem.mprotect(addr, pages, {"ro": PROT_READ, "none": PROT_NONE, "rw": PROT_RW}[op])
        event(f"memory {op}")

    def store(self, b: int, off: int) -> None:
        self.mem.store(self.buf(b, off), 0x77)

    def map_device(self, i: int, pages: int, region: int) -> None:
        """The program maps a device's BAR: a private PROT_NONE placeholder in
        its memory, the device's VM_PFNMAP mapping for the kernel (as the
        daemon records it); a MAP_DMA of it maps the BAR (Type1) or fails."""
        if len(self.bufs) >= 8:
            return
        addr = self.mem.mmap(pages, PROT_NONE)
        self.bufs.append(addr)

        def do(s: HostSide) -> Any:
            pr = s.proc(i)
            if pr is None or pr["group"] is None:
                return None
            p, k = pr["p"], s.m.kernel
            name = ctypes.create_string_buffer(s.bdf.encode())
            dev = s.ioctl(pr, pr["group"], uapi.VFIO_GROUP_GET_DEVICE_FD, ctypes.addressof(name))
            offset = region << 40
            file = p._in_task("mmap", lambda t: k.sys_mmap_host(t, dev, offset, pages * PAGE, PROT_RW, True))
            mm = p.task.mm
            mm.device_vmas[len(mm.device_vmas) + 1] = k.host_device_vma(p.task, file, offset, addr,
                                                                          pages * PAGE, PROT_RW)
            return dev
        self.both("mmap(device)", do)

    _MEMORY_STEPS: dict[str, dict[str, Any]] = {
        "mmap": dict(pages=st.sampled_from([1, 2, 4, 16]), touch=st.booleans(),
                     prot=st.sampled_from([PROT_RW, PROT_RW, PROT_READ])),
        "change": dict(b=st.integers(0, 7), off=st.integers(0, BUF_PAGES - 1), pages=st.integers(1, 4),
                       op=st.sampled_from(["ro", "none", "rw", "munmap"])),
        "store": dict(b=st.integers(0, 7), off=st.integers(0, BUF_PAGES - 1)),
        "map_device": dict(i=PROC, pages=st.sampled_from([1, 2, 4]), region=st.sampled_from([0, 0, 2])),
    }

    @rule(data=st.data())
    def memory_step(self, data: st.DataObject) -> None:
        self._step(data, self._MEMORY_STEPS)

    # -- MAP_DMA and UNMAP_DMA ---------------------------------------------------------------------------

    @rule(i=PROC, b=st.integers(0, 7), off=st.integers(0, BUF_PAGES), npages=st.sampled_from([1, 1, 1, 2, 3, 16]),
          k=st.integers(0, 20), flags=st.sampled_from([3, 3, 3, 1, 2, 0]))
    def map_dma(self, i: int, b: int, off: int, npages: int, k: int, flags: int) -> None:
        def do(s: HostSide) -> Any:
            pr = s.proc(i)
            if pr is None:
                return None
            iovas = s.iovas()
            iova = iovas[k % len(iovas)]
            page = max([PAGE] + [w[2] for w in s.windows() if w[0] <= iova < w[0] + w[1]])
            arg = uapi.vfio_iommu_type1_dma_map(argsz=32, flags=flags, vaddr=self.buf(b, off), iova=iova,
                                                size=npages * page)
            return s.ioctl(pr, pr["container"], uapi.VFIO_IOMMU_MAP_DMA, arg)
        self.both("MAP_DMA", do)

    @rule(i=PROC, calls=st.lists(st.tuples(
        st.booleans(), st.integers(0, 7), st.integers(0, BUF_PAGES - 1), st.integers(0, 7),
        st.sampled_from([3, 3, 1, 2]), st.sampled_from([1, 1, 1, 2, 4])), min_size=1, max_size=10))
    def small_maps(self, i: int, calls: list[tuple[bool, int, int, int, int, int]]) -> None:
        """The common case, several times: MAP_DMA of a page or a few at one of
        eight IOVAs of the first window or range (maps alias pages, pin them
        twice, replace TCEs), or UNMAP_DMA there; compared after each call."""
        for unmap, b, off, slot, flags, npages in calls:
            def do(s: HostSide) -> Any:
                pr = s.proc(i)
                if pr is None:
                    return None
                start, _, page = (s.windows() or [(0x100000, 1 << 30, PAGE)])[0]
                iova, size = start + slot * page, npages * page
                if unmap:
                    un = uapi.vfio_iommu_type1_dma_unmap(argsz=24, iova=iova, size=size)
                    return s.ioctl(pr, pr["container"], uapi.VFIO_IOMMU_UNMAP_DMA, un), un.size
                arg = uapi.vfio_iommu_type1_dma_map(argsz=32, flags=flags, vaddr=self.buf(b, off), iova=iova,
                                                    size=size)
                return s.ioctl(pr, pr["container"], uapi.VFIO_IOMMU_MAP_DMA, arg)
            self.both("small unmap" if unmap else "small map", do)
            self.observably_identical()

    @rule(i=PROC, npages=st.sampled_from([1, 1, 2, 0]), k=st.integers(0, 20), every=st.booleans())
    def unmap_dma(self, i: int, npages: int, k: int, every: bool) -> None:
        def do(s: HostSide) -> Any:
            pr = s.proc(i)
            if pr is None:
                return None
            iovas = s.iovas()
            iova = iovas[k % len(iovas)]
            page = max([PAGE] + [w[2] for w in s.windows() if w[0] <= iova < w[0] + w[1]])
            flags, size = 0, npages * page
            if every and not s.spapr:
                flags, iova, size = uapi.VFIO_DMA_UNMAP_FLAG_ALL, 0, 0
            arg = uapi.vfio_iommu_type1_dma_unmap(argsz=24, flags=flags, iova=iova, size=size)
            return s.ioctl(pr, pr["container"], uapi.VFIO_IOMMU_UNMAP_DMA, arg), arg.size
        self.both("UNMAP_DMA", do)

    @rule(k=st.integers(0, 20), write=st.booleans())
    def device_dma(self, k: int, write: bool) -> None:
        """The device reads or writes at an IOVA that maps a page of a mapping
        made here (never a page of this process that a pin outlived)."""
        s0 = self.sides[0]
        iova = s0.iovas()[k % len(s0.iovas())]
        for mp in s0.m.kernel.platform.mappings(limit=64):
            if mp.iova <= iova < mp.iova + mp.length:
                found = s0.m.kernel.phys.lookup(mp.hpa)
                if found is None or not isinstance(found[0], HostMemoryObject):
                    return
                obj, off = found
                if not self.mem.owns((obj.vaddr + off) & ~(PAGE - 1), 1):
                    return
                break

        def do(s: HostSide) -> Any:
            bm = s.m.device(s.bdf).bus_master
            if write:
                bm.dma_write(iova, b"\xd0" * 64)
                return None
            return bm.dma_read(iova, 64)
        self.both("device DMA", do)

    # -- sPAPR v2: preregistration (a pin), fault injection ----------------------------------------------

    @precondition(lambda self: self.sides[0].v2)
    @rule(i=PROC, b=st.integers(0, 7), off=st.integers(0, 8), pages=st.sampled_from([1, 4]), register=st.booleans())
    def prereg(self, i: int, b: int, off: int, pages: int, register: bool) -> None:
        def do(s: HostSide) -> Any:
            pr = s.proc(i)
            if pr is None:
                return None
            arg = uapi.vfio_iommu_spapr_register_memory(argsz=24, vaddr=self.buf(b, off), size=pages * PAGE)
            cmd = uapi.VFIO_IOMMU_SPAPR_REGISTER_MEMORY if register else uapi.VFIO_IOMMU_SPAPR_UNREGISTER_MEMORY
            return s.ioctl(pr, pr["container"], cmd, arg)
        self.both("REGISTER_MEMORY" if register else "UNREGISTER_MEMORY", do)

    def inject_fault(self, n: int, k: int) -> None:
        sites = [None, "pin_user_pages", "account_locked_vm", "kmalloc"]
        sites += ["iommu_map"] if self.config.startswith("type1") else \
            ["hcall"] if self.config.startswith("pseries") else ["alloc_pages"]
        self.both("inject_fault", lambda s: s.m.inject_fault(n, sites[k % len(sites)]) and None)

    def disarm(self) -> None:
        self.both("disarm", lambda s: s.m.faults.disarm())

    @rule(data=st.data())
    def faults_step(self, data: st.DataObject) -> None:
        self._step(data, {"inject_fault": dict(n=st.integers(1, 3), k=st.integers(0, 4)), "disarm": {}})

    @precondition(lambda self: self.ram_pages is not None)
    @rule(pages=st.integers(-2, 2))
    def ram(self, pages: int) -> None:
        """The simulated process gives RAM back, or takes more."""
        def do(s: HostSide) -> None:
            assert s.hog is not None
            pages_free = min(pages, s.m.meminfo()["MemFree"] * 1024 // PAGE)
            if pages_free > 0:
                a = s.hog.mmap(pages_free * PAGE)
                s.hog.write_memory(a, b"\x02" * (pages_free * PAGE))
            elif pages < 0:
                s.hog.exit()
                s.hog = s.m.spawn()
        self.both("RAM", do)


def _machine_test(config: str, ram_pages: int | None = None, examples: int = 60) -> Any:
    cls = type(f"HostFastPathEquality_{config}", (HostFastPathEquality,), {"config": config, "ram_pages": ram_pages})
    cls.TestCase.settings = settings(max_examples=examples, stateful_step_count=40, deadline=None)
    return cls.TestCase


TestHostType1v2 = _machine_test("type1v2")
TestHostType1 = _machine_test("type1", examples=25)
TestHostPowerNVv1 = _machine_test("powernv-v1")
TestHostPseriesV1 = _machine_test("pseries-v1")
TestHostPowerNVv2 = _machine_test("powernv-v2", examples=25)
TestHostPseriesV2 = _machine_test("pseries-v2", examples=25)
# Little RAM: pins that charge it run out.
TestHostType1v2LowRam = _machine_test("type1v2", ram_pages=600, examples=30)
TestHostPseriesV1LowRam = _machine_test("pseries-v1", ram_pages=600, examples=30)


# -- the boundaries, one by one ------------------------------------------------------------------------

class HostTwins:
    """Both machines of a configuration, tasks of this process, driven by plain
    calls: each step's outcome and the machines after it must be equal; which
    steps HostMM.pin_fast() completed is noted."""

    def __init__(self, config: str, ram_pages: int | None = None) -> None:
        self.mem = RealMemory()
        self.sides = [HostSide(config, True, ram_pages), HostSide(config, False, ram_pages)]
        self.fast = self.sides[0]
        self.pins = 0
        self.broken = False
        self.buf = self.mem.mmap(BUF_PAGES, PROT_RW)
        ctypes.memset(self.buf, 0x5A, BUF_PAGES * PAGE)
        self.step(lambda s: s.spawn(1 << 30, self.buf))
        mm = self.fast.procs[0]["p"].task.mm
        pin_fast = mm.pin_fast

        def noting(*args: Any) -> Any:
            res = pin_fast(*args)
            self.pins += res is not None
            return res
        mm.pin_fast = noting

    def close(self) -> None:
        for s in self.sides:
            for pr in s.procs:
                if not pr["p"].alive:
                    continue
                if self.broken:                    # a machine left inconsistent on purpose: just let go
                    pr["p"].task.mm.host.close()
                else:
                    pr["p"].exit()
        self.mem.close()

    def step(self, action: Callable[[HostSide], Any]) -> tuple[Any, ...]:
        results = [outcome(lambda s=s: action(s)) for s in self.sides]
        assert results[0] == results[1], f"fast {results[0]!r} != general {results[1]!r}"
        a, b = (observe(s.m, [pr["p"] for pr in s.procs]) for s in self.sides)
        assert a == b, "\n".join(f"{k}:\n  fast    {a[k]!r}\n  general {b[k]!r}" for k in a if a[k] != b[k])
        return results[0]

    def fast_pin(self, action: Callable[[HostSide], Any]) -> tuple[Any, ...]:
        """A step whose pin HostMM.pin_fast() must make."""
        before = self.pins
        res = self.step(action)
        assert self.pins == before + 1, f"the fast pin was not taken: {res!r}"
        return res

    def general_pin(self, action: Callable[[HostSide], Any]) -> tuple[Any, ...]:
        """A step whose pin HostMM.pin_fast() must leave to the general pin."""
        before = self.pins
        res = self.step(action)
        assert self.pins == before, f"the fast pin took it: {res!r}"
        return res


def host_window(t: HostTwins) -> tuple[int, int]:
    """(IOVA, IOMMU page size) to map at: Type1's usable range, or the sPAPR
    default window after a first map has created it (v1)."""
    s = t.fast
    if not s.spapr:
        return 0x100000, PAGE
    t.step(host_map(0x1000, t.buf, flags=3))
    start, _, page = s.windows()[0]
    return start + 0x10000, page


def host_map(iova: int, vaddr: int, pages: int = 1, flags: int = 3) -> Callable[[HostSide], Any]:
    def do(s: HostSide) -> Any:
        pr = s.procs[0]
        arg = uapi.vfio_iommu_type1_dma_map(argsz=32, flags=flags, vaddr=vaddr, iova=iova, size=pages * PAGE)
        return s.ioctl(pr, pr["container"], uapi.VFIO_IOMMU_MAP_DMA, arg)
    return do


def host_unmap(iova: int, pages: int = 1) -> Callable[[HostSide], Any]:
    def do(s: HostSide) -> Any:
        pr = s.procs[0]
        arg = uapi.vfio_iommu_type1_dma_unmap(argsz=24, iova=iova, size=pages * PAGE)
        return s.ioctl(pr, pr["container"], uapi.VFIO_IOMMU_UNMAP_DMA, arg), arg.size
    return do


@pytest.fixture
def twins():
    made: list[HostTwins] = []

    def make(config: str, ram_pages: int | None = None) -> HostTwins:
        made.append(HostTwins(config, ram_pages))
        return made[-1]
    yield make
    for t in made:
        t.close()


@pytest.mark.parametrize("config", ["type1v2", "powernv-v1", "pseries-v1"])
def test_the_usual_pair_pins_fast(twins, config):
    """MAP_DMA + UNMAP_DMA of a page of a real process: the fast pin every
    time, the page pinned as the general pin pins it (its window registered
    once, charged to RAM, unpinned and uncharged again)."""
    t = twins(config)
    iova, _ = host_window(t)
    for n in range(3):
        t.fast_pin(host_map(iova, t.buf + n * PAGE))
        t.step(host_unmap(iova))
    if not t.fast.spapr:
        t.fast_pin(host_map(iova, t.buf, pages=4))      # Type1: a few pages at once
        t.step(host_unmap(iova, pages=4))


@pytest.mark.parametrize("config", ["type1v2", "powernv-v1", "pseries-v1"])
def test_pages_pinned_twice(twins, config):
    """One page mapped at two IOVAs: the second pin finds it pinned (Type1
    announces the double charge, deviation 9, from the fast pin's count as
    from the general path's look-up)."""
    t = twins(config)
    iova, page = host_window(t)
    t.fast_pin(host_map(iova, t.buf + 5 * PAGE))
    t.fast_pin(host_map(iova + page, t.buf + 5 * PAGE))
    if not t.fast.spapr:
        assert "1 already pinned" in t.fast.m.dmesg()[-1]
        t.fast_pin(host_map(iova + 2 * page, t.buf + 4 * PAGE, pages=3))   # pages 4-6: one pinned already
        assert "1 already pinned" in t.fast.m.dmesg()[-1]
        t.step(host_unmap(iova + 2 * page, pages=3))
    t.step(host_unmap(iova))
    t.step(host_unmap(iova + page))


@pytest.mark.parametrize("config", ["type1v2", "powernv-v1", "pseries-v1"])
def test_read_only_and_prot_none(twins, config):
    """A read-only mapping: a device-read map of it is the fast pin's where
    the general pin would not need pagemap (Type1's long-term pin unshares;
    sPAPR v1's short-term read pin takes present pages only: left to the
    general pin, which says EFAULT for an untouched page); a device-write map
    of it, and any map of PROT_NONE, is the general path's EFAULT."""
    t = twins(config)
    iova, _ = host_window(t)
    untouched = t.mem.mmap(2, PROT_READ)
    touched = t.mem.mmap(2, PROT_RW)
    ctypes.memset(touched, 0x33, 2 * PAGE)
    t.mem.mprotect(touched, 2, PROT_READ)
    none = t.mem.mmap(1, PROT_NONE)
    if t.fast.spapr:
        assert t.general_pin(host_map(iova, untouched, flags=1))[1] == "EFAULT"
        assert t.general_pin(host_map(iova, touched, flags=1)) == ("ok", 0)
    else:
        t.fast_pin(host_map(iova, untouched, flags=1))
        t.step(host_unmap(iova))
        t.fast_pin(host_map(iova, touched, flags=1))
    t.step(host_unmap(iova))
    assert t.general_pin(host_map(iova, touched, flags=3))[1] == "EFAULT"
    assert t.general_pin(host_map(iova, none, flags=1))[1] == "EFAULT"
    assert t.general_pin(host_map(iova, none, flags=2))[1] == "EFAULT"


def test_type1_mapping_ending_mid_range(twins):
    """A Type1 map whose pages run past the end of their mapping: into an
    adjacent mapping of other protections (the general pin walks both), into
    PROT_NONE or nothing (EFAULT, nothing left pinned)."""
    t = twins("type1v2")
    iova, _ = host_window(t)
    t.mem.mprotect(t.buf + 8 * PAGE, 1, PROT_READ)      # pages 6-7 RW, 8 RO, 9.. RW
    t.general_pin(host_map(iova, t.buf + 6 * PAGE, pages=3, flags=1))
    t.step(host_unmap(iova, pages=3))
    assert t.general_pin(host_map(iova, t.buf + 6 * PAGE, pages=3, flags=3))[1] == "EFAULT"
    t.mem.mprotect(t.buf + 8 * PAGE, 1, PROT_NONE)
    assert t.general_pin(host_map(iova, t.buf + 6 * PAGE, pages=4, flags=1))[1] == "EFAULT"
    t.mem.munmap(t.buf + 8 * PAGE, 1)
    assert t.general_pin(host_map(iova, t.buf + 7 * PAGE, pages=2))[1] == "EFAULT"
    t.fast_pin(host_map(iova, t.buf + 6 * PAGE, pages=2))       # what is left of the mapping
    assert t.fast.m.pinned_pages() == 2


def test_type1_device_placeholder(twins):
    """A Type1 map of the PROT_NONE placeholder of a device's BAR mapping: GUP
    refuses it, the general path maps the BAR (reserved pages, no pin)."""
    t = twins("type1v2")
    iova, _ = host_window(t)
    place = t.mem.mmap(1, PROT_NONE)

    def map_bar(s: HostSide) -> None:
        pr = s.procs[0]
        p, k = pr["p"], s.m.kernel
        name = ctypes.create_string_buffer(s.bdf.encode())
        dev = s.ioctl(pr, pr["group"], uapi.VFIO_GROUP_GET_DEVICE_FD, ctypes.addressof(name))
        file = p._in_task("mmap", lambda task: k.sys_mmap_host(task, dev, 0, PAGE, PROT_RW, True))
        p.task.mm.device_vmas[1] = k.host_device_vma(p.task, file, 0, place, PAGE, PROT_RW)
    t.step(map_bar)
    assert t.general_pin(host_map(iova, place)) == ("ok", 0)
    assert t.fast.m.pinned_pages() == 0
    t.step(host_unmap(iova))


@pytest.mark.parametrize("config", ["type1v2", "pseries-v1"])
def test_pins_when_ram_runs_out(twins, config):
    """A page not pinned yet costs a page of RAM: with none free the general
    path answers (Type1 ENOMEM, sPAPR v1 EFAULT, deviation 12 logged), the
    fast pin having changed nothing; a page another pin holds pins fast."""
    t = twins(config, ram_pages=600)
    iova, page = host_window(t)

    def fill(s: HostSide) -> None:
        hog = s.m.spawn()
        free = s.m.meminfo()["MemFree"] * 1024 // PAGE
        a = hog.mmap((free - 1) * PAGE)
        hog.write_memory(a, b"\x01" * ((free - 1) * PAGE))
    t.step(fill)
    t.fast_pin(host_map(iova, t.buf + 3 * PAGE))           # the last free page
    assert t.fast.m.meminfo()["MemFree"] == 0
    res = t.general_pin(host_map(iova + page, t.buf + 4 * PAGE))
    assert res[1] == ("ENOMEM" if config == "type1v2" else "EFAULT"), res
    assert "no free page of RAM" in t.fast.m.dmesg()[-1] and "deviations.md 12" in t.fast.m.dmesg()[-1]
    if config == "type1v2":                                # two pages, one of them charged already
        assert t.general_pin(host_map(iova + page, t.buf + 3 * PAGE, pages=2))[1] == "ENOMEM"
    t.fast_pin(host_map(iova + 2 * page, t.buf + 3 * PAGE))   # pinned already: no RAM needed
    t.step(host_unmap(iova + 2 * page))
    t.step(host_unmap(iova))


def test_v2_maps_pin_nothing_registration_pins(twins):
    """sPAPR v2: REGISTER_MEMORY pins (the general pin, a range), a map
    through the region pins nothing; both equal with the fast paths on."""
    t = twins("powernv-v2")
    start, _ = host_window(t)
    assert t.fast.m.pinned_pages() == BUF_PAGES // 2
    for n in range(3):
        t.step(host_map(start, t.buf + n * PAGE))
        t.step(host_unmap(start))
    assert t.pins == 0 and t.fast.m.pinned_pages() == BUF_PAGES // 2


@pytest.mark.parametrize("mutation", ["no RAM charge", "window not registered", "repinned not counted",
                                      "mid-range end ignored", "read-only short-term pin"])
def test_a_wrong_fast_pin_is_caught(twins, monkeypatch, mutation):
    """The comparison is sharp enough to see a fast pin that is wrong in one
    way: each mutation of HostMM.pin_fast() below makes a step differ."""
    from vfiosim.transport import host as host_mod
    real = HostMM.pin_fast

    def mutated(self: HostMM, start: int, npages: int, write: bool, longterm: bool) -> Any:
        if mutation == "mid-range end ignored" and npages > 1:
            vma = self.host.vma_at(start)
            if vma is not None and start + npages * PAGE > vma[1] and vma[2] & 2:
                obj = self._window(start >> host_mod.WINDOW_SHIFT)
                if not obj.users:
                    self._register(obj)
                p0 = (start - obj.vaddr) >> self.page_shift
                obj.charge(p0, npages, False)
                obj.pincount[p0:p0 + npages] += 1
                obj.pins += npages
                return obj.phys_base + (p0 << self.page_shift), 0, 0
        if mutation == "read-only short-term pin" and not write and not longterm:
            return real(self, start, npages, write, True)
        if mutation in ("no RAM charge", "window not registered"):
            cls, name, wrong = (HostMemoryObject, "charge", lambda obj, p0, n, dry: n) \
                if mutation == "no RAM charge" else (HostMM, "_register", lambda mm, obj: None)
            right = getattr(cls, name)
            setattr(cls, name, wrong)
            try:
                return real(self, start, npages, write, longterm)
            finally:
                setattr(cls, name, right)
        res = real(self, start, npages, write, longterm)
        if mutation == "repinned not counted" and res is not None:
            return res[0], 0, res[2]
        return res

    monkeypatch.setattr(HostMM, "pin_fast", mutated)
    config = "powernv-v1" if mutation == "read-only short-term pin" else "type1v2"
    t = twins(config, ram_pages=600 if mutation == "no RAM charge" else None)
    iova, page = host_window(t)
    t.broken = True
    with pytest.raises(AssertionError):
        if mutation == "read-only short-term pin":
            untouched = t.mem.mmap(1, PROT_READ)
            t.step(host_map(iova, untouched, flags=1))
        elif mutation == "mid-range end ignored":
            t.mem.munmap(t.buf + 8 * PAGE, 1)
            t.step(host_map(iova, t.buf + 7 * PAGE, pages=2))
        else:
            t.step(host_map(iova, t.buf))
            t.step(host_map(iova + page, t.buf))
