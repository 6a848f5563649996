"""`vfiosim bench`: the simulator's cost, as ratios measured side by side.

Every figure compares vfiosim doing something with the machine doing the
bare work in the same run (a NumPy copy, a NumPy fill, an ioctl on a real
fd), so the ratios mean the same on a fast or a slow, busy machine.
"""

from __future__ import annotations

import ctypes
import dataclasses
import fcntl
import functools
import gc
import json
import math
import os
import re
import sys
import time
import tracemalloc
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, TextIO

import numpy as np

from .machine import Machine, Process
from .uapi import vfio as uapi

KiB, MiB, GiB, TiB = 1 << 10, 1 << 20, 1 << 30, 1 << 40


@dataclass
class Figure:
    name: str
    value: float
    unit: str
    goal: str = ""
    met: bool | None = None
    detail: dict[str, Any] = field(default_factory=dict)


def best_of(fn: Callable[[], object], repeat: int, number: int = 1) -> float:
    """Smallest mean time of ``number`` calls, over ``repeat`` rounds (seconds)."""
    best = math.inf
    for _ in range(repeat):
        t0 = time.perf_counter()
        for _ in range(number):
            fn()
        best = min(best, (time.perf_counter() - t0) / number)
    return best


def _v1_setup(page_size: int = 4096, machine: str = "powernv") -> tuple[Machine, Process, int, int]:
    m = Machine.preset(machine, page_size=page_size)
    p = m.spawn(uid=0, rlimit_memlock=(1 << 62, 1 << 62))
    c = p.open("/dev/vfio/vfio")
    gid = next(iter(m.iommu_groups()))
    g = p.open(f"/dev/vfio/{gid}")
    p.ioctl(g, uapi.VFIO_GROUP_SET_CONTAINER, ctypes.c_int32(c))
    p.ioctl(c, uapi.VFIO_SET_IOMMU, uapi.VFIO_SPAPR_TCE_IOMMU)
    p.ioctl(c, uapi.VFIO_IOMMU_ENABLE)
    return m, p, c, g


def _v2_setup(ram: int | None = None) -> tuple[Machine, Process, int]:
    """A PowerNV machine (``ram`` bytes of RAM instead of the preset's), and a
    root process with group 0 in a sPAPR v2 container."""
    m = Machine.preset("powernv")
    if ram is not None:
        m = Machine(dataclasses.replace(m.spec, ram=ram))
    p = m.spawn(uid=0, rlimit_memlock=(1 << 62, 1 << 62))
    c = p.open("/dev/vfio/vfio")
    g = p.open("/dev/vfio/0")
    p.ioctl(g, uapi.VFIO_GROUP_SET_CONTAINER, ctypes.c_int32(c))
    p.ioctl(c, uapi.VFIO_SET_IOMMU, uapi.VFIO_SPAPR_TCE_v2_IOMMU)
    return m, p, c


def _map(p: Process, c: int, vaddr: int, iova: int, size: int) -> None:
    p.ioctl(c, uapi.VFIO_IOMMU_MAP_DMA, uapi.vfio_iommu_type1_dma_map(argsz=32, flags=3, vaddr=vaddr, iova=iova,
                                                                       size=size))


def _unmap(p: Process, c: int, iova: int, size: int) -> None:
    p.ioctl(c, uapi.VFIO_IOMMU_UNMAP_DMA, uapi.vfio_iommu_type1_dma_unmap(argsz=24, iova=iova, size=size))


# -- the figures ------------------------------------------------------------------------------------

def bench_dma(iommu_page_shift: int, size: int = MiB, repeat: int = 20, cold: bool = False) -> Figure:
    """A device DMA of ``size`` bytes through the bus-master interface vs a NumPy copy.

    The same transfer repeats, so the PHB's TCE cache serves its translation
    after the first (as hardware's would); ``cold`` empties the cache before
    every transfer, so each one walks the TCE table."""
    m, p, c = _v2_setup()
    page = 1 << iommu_page_shift
    buf = p.mmap(2 * size, page_size=page if page > m.page_size else None)
    p.write_memory(buf, os.urandom(2 * size))
    p.ioctl(c, uapi.VFIO_IOMMU_SPAPR_REGISTER_MEMORY,
            uapi.vfio_iommu_spapr_register_memory(argsz=24, vaddr=buf, size=2 * size))
    if iommu_page_shift != 12:
        s = uapi.vfio_iommu_spapr_tce_create(argsz=40, page_shift=iommu_page_shift, window_size=1 << 32, levels=1)
        p.ioctl(c, uapi.VFIO_IOMMU_SPAPR_TCE_CREATE, s)
        iova = s.start_addr
    else:
        iova = 0
    _map(p, c, buf, iova, 2 * size)
    dev = m.device("0000:01:00.0")
    dev.config.data[4] |= 0x4                                 # bus master
    bm = dev.bus_master
    # The device moves 1 MiB from memory into its buffer, then back out to
    # memory: two copies, compared with two NumPy copies of the same size.
    device_buf = np.zeros(size, dtype=np.uint8)
    src, dst = np.frombuffer(os.urandom(size), dtype=np.uint8).copy(), np.zeros(size, dtype=np.uint8)

    def dma() -> None:
        bm.dma_read_into(iova, device_buf)
        bm.dma_write(iova + size, device_buf)

    def memcpy() -> None:
        np.copyto(dst, src)
        np.copyto(src, dst)
    cache = m.pe_of(dev.bdf).tce_cache

    def dma_cold() -> None:
        cache.clear()
        dma()
    t_dma = best_of(dma_cold if cold else dma, repeat)
    t_copy = best_of(memcpy, repeat)
    assert p.read_memory(buf + size, size) == p.read_memory(buf, size)
    ratio = t_copy / t_dma
    if cold:
        return Figure(f"DMA {size // KiB} KiB, {page // KiB} KiB IOMMU pages, TCE cache cold, vs memcpy", ratio,
                      "x memcpy speed", "(informational)", None, {"dma_us": t_dma * 1e6, "memcpy_us": t_copy * 1e6})
    goal = 0.5 if iommu_page_shift == 12 else 0.8
    return Figure(f"DMA {size // KiB} KiB, {page // KiB} KiB IOMMU pages, vs memcpy", ratio, "x memcpy speed",
                  f">= {goal}", ratio >= goal, {"dma_us": t_dma * 1e6, "memcpy_us": t_copy * 1e6})


def bench_edu_transfer(repeat: int = 200) -> Figure:
    """One 4 KiB edu transfer started by its registers vs a 4 KiB copy."""
    m, p, c, g = _v1_setup()
    buf = p.mmap(2 * 4096)
    _map(p, c, buf, 0x10000, 2 * 4096)
    d = p.ioctl(g, uapi.VFIO_GROUP_GET_DEVICE_FD, b"0000:01:00.0\0")
    cfg = uapi.VFIO_PCI_CONFIG_REGION_INDEX << 40
    cmd = int.from_bytes(p.pread(d, 2, cfg + 4), "little")
    p.pwrite(d, (cmd | 4).to_bytes(2, "little"), cfg + 4)

    def regw(off: int, v: int) -> None:
        p.pwrite(d, v.to_bytes(8, "little"), off)

    regw(0x80, 0x10000)
    regw(0x88, 0x40000)
    regw(0x90, 4096)
    t_edu = best_of(lambda: regw(0x98, 1), repeat)
    a, b = np.zeros(4096, dtype=np.uint8), np.ones(4096, dtype=np.uint8)
    t_copy = best_of(lambda: np.copyto(a, b), repeat, 10)
    ratio = t_edu / t_copy
    return Figure("edu 4 KiB transfer (register write) vs 4 KiB copy", ratio, "x copy time", "(per-transfer overhead)",
                  None, {"edu_us": t_edu * 1e6, "copy_us": t_copy * 1e6})


def bench_map(npages: int, repeat: int = 5, goal: float | None = 0.1) -> Figure:
    """MAP_DMA of ``npages`` 4 KiB pages vs a NumPy fill of that many 64-bit entries."""
    m, p, c, g = _v1_setup()
    buf = p.mmap(npages * 4096)
    p.write_memory(buf, b"\x01" * (npages * 4096))
    _map(p, c, buf, 0, 4096)
    _unmap(p, c, 0, 4096)
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        _map(p, c, buf, 0, npages * 4096)
        times.append(time.perf_counter() - t0)
        _unmap(p, c, 0, npages * 4096)
    t_map = min(times)
    arr = np.zeros(npages, dtype=np.uint64)
    t_fill = best_of(lambda: arr.fill(7), repeat * 4)
    ratio = t_fill / t_map
    return Figure(f"MAP_DMA of {npages} pages vs NumPy fill of {npages} u64", ratio, "x fill speed",
                  f">= {goal}" if goal else "(smoke: no goal)", None if goal is None else ratio >= goal,
                  {"map_us": t_map * 1e6, "fill_us": t_fill * 1e6})


def bench_ioctl(repeat: int = 20, number: int = 2000) -> Figure:
    """In-process ioctl(GET_API_VERSION) vs fcntl.ioctl on a real fd (FIONREAD on a pipe)."""
    import termios
    m = Machine.default()
    p = m.spawn()
    c = p.open("/dev/vfio/vfio")
    t_sim = best_of(lambda: p.ioctl(c, uapi.VFIO_GET_API_VERSION), repeat, number)
    r, w = os.pipe()
    buf = bytearray(4)
    try:
        t_real = best_of(lambda: fcntl.ioctl(r, termios.FIONREAD, buf), repeat, number)
    finally:
        os.close(r)
        os.close(w)
    ratio = t_sim / t_real
    return Figure("in-process ioctl(GET_API_VERSION) vs fcntl.ioctl on a real fd", ratio, "x slower", "<= 10",
                  ratio <= 10, {"sim_us": t_sim * 1e6, "real_us": t_real * 1e6})


# The three IOMMU backends a small-map fast path serves: (machine, IOMMU type, label).
_PAIR_BACKENDS = {
    "type1v2": ("x86", uapi.VFIO_TYPE1v2_IOMMU, "Type1v2 (x86)"),
    "v1": ("powernv", uapi.VFIO_SPAPR_TCE_IOMMU, "sPAPR v1 (PowerNV)"),
    "v2": ("powernv", uapi.VFIO_SPAPR_TCE_v2_IOMMU, "sPAPR v2 (PowerNV)"),
}


def _real_ioctl_time(repeat: int, number: int) -> float:
    """fcntl.ioctl(FIONREAD) on a pipe: the cost of a real, trivial ioctl syscall."""
    import termios
    r, w = os.pipe()
    buf = bytearray(4)
    try:
        return best_of(lambda: fcntl.ioctl(r, termios.FIONREAD, buf), repeat, number)
    finally:
        os.close(r)
        os.close(w)


def bench_map_pair(backend: str, repeat: int = 15, number: int = 300, goal: float = 40) -> Figure:
    """One in-process MAP_DMA + UNMAP_DMA of a 4 KiB page vs fcntl.ioctl on a
    real fd: what a small map costs inside the simulated kernel.  The detail
    also has the kernel's own share (``kernel_us``: sys_ioctl on arguments
    in the process's memory, without the in-process API's buffer mapping),
    which is what a transport adds its own cost to under ``vfiosim run``,
    and (``general_*``) both again with the IOMMU drivers' fast paths for
    small maps turned off, the general path alone, alternated in this run.
    The goal is issue 13's for the whole pair under ``vfiosim run``."""
    machine, iommu_type, label = _PAIR_BACKENDS[backend]
    m = Machine.preset(machine)
    p = m.spawn(uid=0, rlimit_memlock=(1 << 62, 1 << 62))
    c = p.open("/dev/vfio/vfio")
    gid = min(gid for gid, bdfs in m.iommu_groups().items() if m.device(bdfs[0]).driver == "vfio-pci")
    g = p.open(f"/dev/vfio/{gid}")
    p.ioctl(g, uapi.VFIO_GROUP_SET_CONTAINER, ctypes.c_int32(c))
    p.ioctl(c, uapi.VFIO_SET_IOMMU, iommu_type)
    buf = p.mmap(4096)
    p.write_memory(buf, b"\x01" * 4096)
    iova = 0x100000
    if iommu_type == uapi.VFIO_SPAPR_TCE_IOMMU:
        p.ioctl(c, uapi.VFIO_IOMMU_ENABLE)
    elif iommu_type == uapi.VFIO_SPAPR_TCE_v2_IOMMU:
        p.ioctl(c, uapi.VFIO_IOMMU_SPAPR_REGISTER_MEMORY,
                uapi.vfio_iommu_spapr_register_memory(argsz=24, vaddr=buf, size=4096))
    map_arg = uapi.vfio_iommu_type1_dma_map(argsz=32, flags=3, vaddr=buf, iova=iova, size=4096)
    unmap_arg = uapi.vfio_iommu_type1_dma_unmap(argsz=24, iova=iova, size=4096)

    def pair() -> None:
        p.ioctl(c, uapi.VFIO_IOMMU_MAP_DMA, map_arg)
        p.ioctl(c, uapi.VFIO_IOMMU_UNMAP_DMA, unmap_arg)
    # The same pair straight into the kernel, its arguments in the process's memory.
    args = p.mmap(4096)
    p.write_memory(args, bytes(map_arg))
    p.write_memory(args + 64, bytes(unmap_arg))
    k, task = m.kernel, p.task

    def kernel_pair() -> None:
        with m._lock:
            k.sys_ioctl(task, c, uapi.VFIO_IOMMU_MAP_DMA, args)
            k.sys_ioctl(task, c, uapi.VFIO_IOMMU_UNMAP_DMA, args + 64)
    pair()
    kernel_pair()
    # Alternate the measurements so that all see the same machine load; the
    # same pair with the drivers' fast paths off (Machine.fast_paths) is the
    # "before" of docs/performance.md, measured in the same run.
    t_pair = t_kernel = t_real = t_pair_general = t_kernel_general = math.inf
    for _ in range(repeat):
        m.fast_paths = True
        t_pair = min(t_pair, best_of(pair, 1, number))
        t_kernel = min(t_kernel, best_of(kernel_pair, 1, number))
        m.fast_paths = False
        try:
            t_pair_general = min(t_pair_general, best_of(pair, 1, number))
            t_kernel_general = min(t_kernel_general, best_of(kernel_pair, 1, number))
        finally:
            m.fast_paths = True
        t_real = min(t_real, _real_ioctl_time(1, number * 4))
    assert unmap_arg.size == 4096 and m.pinned_pages() == (1 if iommu_type == uapi.VFIO_SPAPR_TCE_v2_IOMMU else 0)
    ratio = t_pair / t_real
    return Figure(f"in-process 4 KiB MAP_DMA+UNMAP_DMA pair, {label}, vs fcntl.ioctl on a real fd", ratio,
                  "x slower", f"<= {goal:g}", ratio <= goal,
                  {"pair_us": t_pair * 1e6, "kernel_us": t_kernel * 1e6, "kernel_ratio": t_kernel / t_real,
                   "real_us": t_real * 1e6,
                   "general_pair_us": t_pair_general * 1e6, "general_kernel_us": t_kernel_general * 1e6,
                   "general_ratio": t_pair_general / t_real, "general_kernel_ratio": t_kernel_general / t_real})


def bench_empty_window(window: int = TiB) -> Figure:
    """Python memory for a created-but-empty 1 TiB window of 4 KiB pages (tracemalloc)."""
    m, p, c = _v2_setup()
    p.ioctl(c, uapi.VFIO_IOMMU_SPAPR_TCE_REMOVE, uapi.vfio_iommu_spapr_tce_remove(argsz=16, start_addr=0))
    gc.collect()
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    s = uapi.vfio_iommu_spapr_tce_create(argsz=40, page_shift=12, window_size=window, levels=3)
    p.ioctl(c, uapi.VFIO_IOMMU_SPAPR_TCE_CREATE, s)
    gc.collect()
    used = tracemalloc.get_traced_memory()[0] - before
    tracemalloc.stop()
    accounted = p.status()["VmLck"] * KiB
    return Figure(f"memory of an empty {window // GiB} GiB window (4 KiB pages)", used / MiB, "MiB", "< 1", used < MiB,
                  {"bytes": used, "kernel_accounts_bytes": accounted})


def bench_scaling(kind: str, exponents: range) -> Figure:
    """Cost vs size: fits log(time) = a + slope*log(n); slope 1 is linear."""
    sizes, times = [], []
    # A v2 container with a 1 TiB window: room for 2^20 pages and more, and
    # RAM for the 4 GiB the DMA run writes (the preset has 4 GiB in all).
    m, p, c = _v2_setup(ram=16 * GiB)
    n_max = 1 << (exponents[-1])
    buf = p.mmap(n_max * 4096)
    if kind == "dma":
        # Real data behind every page (untouched pages would all read the
        # one shared zero page, which no real workload does).
        pattern = os.urandom(MiB)
        for off in range(0, n_max * 4096, MiB):
            p.write_memory(buf + off, pattern[:min(MiB, n_max * 4096 - off)])
    p.ioctl(c, uapi.VFIO_IOMMU_SPAPR_REGISTER_MEMORY,
            uapi.vfio_iommu_spapr_register_memory(argsz=24, vaddr=buf, size=n_max * 4096))
    s = uapi.vfio_iommu_spapr_tce_create(argsz=40, page_shift=12, window_size=1 << 40, levels=3)
    p.ioctl(c, uapi.VFIO_IOMMU_SPAPR_TCE_CREATE, s)
    base = s.start_addr
    if kind == "map":
        for e in exponents:
            n = 1 << e

            def once(n: int = n) -> None:
                _map(p, c, buf, base, n * 4096)
                _unmap(p, c, base, n * 4096)
            times.append(best_of(once, 3))
            sizes.append(n)
    else:
        _map(p, c, buf, base, n_max * 4096)
        dev = m.device("0000:01:00.0")
        dev.config.data[4] |= 0x4
        # Into one preallocated buffer: the figure is the DMA path's cost,
        # not the allocator's.
        dest = np.empty(n_max * 4096, dtype=np.uint8)
        for e in exponents:
            n = 1 << e
            view = dest[:n * 4096]
            times.append(best_of(functools.partial(dev.bus_master.dma_read_into, base, view), 3))
            sizes.append(n)
        del dest
    # The slope of log(time) against log(pages) over the larger half of the
    # sizes, where a fixed per-call cost no longer hides how the work grows:
    # 1 is linear, 2 would be quadratic.
    half = len(sizes) // 2
    slope = float(np.polyfit(np.log(sizes[half:]), np.log(times[half:]), 1)[0])
    slope_all = float(np.polyfit(np.log(sizes), np.log(times), 1)[0])
    what = "map+unmap" if kind == "map" else "DMA"
    return Figure(f"{what} cost vs size (2^{exponents[half]}..2^{exponents[-1]} pages): fitted slope", slope,
                  "log-log slope", "< 1.2 (linear is 1)", slope < 1.2,
                  {"pages": sizes, "seconds": times, "slope_all_sizes": slope_all})


def bench_machine_start(devices: int = 1024) -> Figure:
    """Machine start with ``devices`` edu devices vs with 1."""
    def spec(n: int) -> str:
        lines = ['[machine]\nname = "many"\nplatform = "powernv"\n']
        phbs = (n + 254) // 255
        for i in range(phbs):
            lines.append(f"[[phb]]\nindex = {i}\n")
        for j in range(n):
            phb, slot = divmod(j, 255)
            lines.append(f'[[device]]\nbdf = "{phb:04x}:{slot + 1:02x}:00.0"\nmodel = "edu"\nphb = {phb}\n'
                         f"pe = {slot + 1}\niommu_group = {j}\nbehind_bridge = true\n")
        return "\n".join(lines)
    big, small = spec(devices), spec(1)
    t_big = best_of(lambda: Machine.from_toml(big), 5)
    t_small = best_of(lambda: Machine.from_toml(small), 50)      # small and noisy: more rounds
    ratio = t_big / t_small
    return Figure(f"machine start with {devices} devices vs 1", ratio, "x", f"<= {devices} (linear)",
                  ratio <= devices, {"big_ms": t_big * 1e3, "small_ms": t_small * 1e3})


# -- running the suite -----------------------------------------------------------------------------------

def suite(quick: bool = False) -> list[tuple[str, Callable[[], Figure]]]:
    """(name, benchmark) pairs; ``quick`` runs each at a tiny size (a smoke
    test of the machinery: its figures are not judged against the goals)."""
    if quick:
        return [
            ("dma-4k", lambda: bench_dma(12, size=64 * KiB, repeat=3)),
            ("dma-64k", lambda: bench_dma(16, size=64 * KiB, repeat=3)),
            ("dma-cold", lambda: bench_dma(12, size=64 * KiB, repeat=3, cold=True)),
            ("edu", lambda: bench_edu_transfer(repeat=10)),
            ("map", lambda: bench_map(1 << 10, repeat=2)),
            ("ioctl", lambda: bench_ioctl(repeat=3, number=200)),
            ("pair-type1v2", lambda: bench_map_pair("type1v2", repeat=2, number=20)),
            ("pair-v1", lambda: bench_map_pair("v1", repeat=2, number=20)),
            ("pair-v2", lambda: bench_map_pair("v2", repeat=2, number=20)),
            ("window", lambda: bench_empty_window(GiB)),
            ("scaling-map", lambda: bench_scaling("map", range(6, 9))),
            ("scaling-dma", lambda: bench_scaling("dma", range(6, 9))),
            ("start", lambda: bench_machine_start(8)),
        ]
    return [
        ("dma-4k", lambda: bench_dma(12)),
        ("dma-64k", lambda: bench_dma(16)),
        ("dma-4k-cold", lambda: bench_dma(12, cold=True)),
        ("dma-64k-cold", lambda: bench_dma(16, cold=True)),
        ("edu", bench_edu_transfer),
        ("map", lambda: bench_map(1 << 18)),
        ("ioctl", bench_ioctl),
        ("pair-type1v2", lambda: bench_map_pair("type1v2")),
        ("pair-v1", lambda: bench_map_pair("v1")),
        ("pair-v2", lambda: bench_map_pair("v2")),
        ("window", bench_empty_window),
        ("scaling-map", lambda: bench_scaling("map", range(10, 21))),
        ("scaling-dma", lambda: bench_scaling("dma", range(10, 21, 2))),
        ("start", bench_machine_start),
    ]


def run(quick: bool = False, out: TextIO | None = None, json_out: TextIO | None = None,
        plot_dir: str | None = None, only: list[str] | None = None, progress: bool = True) -> list[Figure]:
    """Run the suite (or the figures named in ``only``), print the table to
    ``out``, optionally write JSON to ``json_out`` and charts; returns the
    figures.  Progress goes to stderr: a bar redrawn in place on a terminal,
    one line per figure otherwise (no carriage returns in CI logs)."""
    out = out or sys.stdout
    items = [(n, fn) for n, fn in suite(quick) if not only or n in only]
    figures: list[Figure] = []
    t_start = time.perf_counter()
    tty = sys.stderr.isatty()
    for i, (name, fn) in enumerate(items):
        if progress:
            elapsed = time.perf_counter() - t_start
            if tty:
                bar = "#" * (i * 30 // len(items))
                print(f"\r[{bar:<30}] {i}/{len(items)} {name:<12} {elapsed:5.0f} s",
                      end="", file=sys.stderr, flush=True)
            else:
                print(f"vfiosim bench: [{i + 1}/{len(items)}] {name} (after {elapsed:.0f} s)",
                      file=sys.stderr, flush=True)
        f = fn()
        if quick:
            f.met = None            # tiny sizes: the goals are for the full suite
        figures.append(f)
        gc.collect()
    if progress:
        elapsed = time.perf_counter() - t_start
        if tty:
            print(f"\r[{'#' * 30}] {len(items)}/{len(items)} done in {elapsed:.0f} s{' ' * 8}", file=sys.stderr)
        else:
            print(f"vfiosim bench: {len(items)} figure(s) done in {elapsed:.0f} s", file=sys.stderr, flush=True)
    print(format_table(figures), file=out)
    if quick:
        print("(--quick: tiny sizes, a smoke run; goals are judged only by the full suite)", file=out)
    if json_out is not None:
        json.dump({"machine": {"python": sys.version.split()[0], "numpy": np.__version__,
                               "cpus": os.cpu_count()},
                   "figures": [asdict(f) for f in figures]}, json_out, indent=2)
        json_out.write("\n")
        json_out.flush()
    if plot_dir:
        for path in plot(figures, plot_dir):
            print(f"wrote {path}", file=out)
    return figures


def format_table(figures: list[Figure]) -> str:
    """The figures as an aligned text table, goal and verdict beside each."""
    width = max((len(f.name) for f in figures), default=6)
    lines = [f"{'figure':<{width}}  {'value':>10}  {'unit':<16} {'goal':<24} met"]
    for f in figures:
        met = "-" if f.met is None else ("yes" if f.met else "NO")
        lines.append(f"{f.name:<{width}}  {f.value:>10.4g}  {f.unit:<16} {f.goal:<24} {met}")
    return "\n".join(lines)


def require_matplotlib() -> None:
    try:
        import matplotlib  # noqa: F401
    except ImportError as exc:
        raise SystemExit("vfiosim bench --plot needs matplotlib: pip install 'vfiosim[plot]'") from exc


def plot(figures: list[Figure], directory: str) -> list[str]:
    require_matplotlib()
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    os.makedirs(directory, exist_ok=True)
    written = []
    for f in figures:
        if "pages" not in f.detail:
            continue
        fig, ax = plt.subplots(figsize=(6, 4))
        ax.loglog(f.detail["pages"], [s * 1e3 for s in f.detail["seconds"]], "o-")
        ax.set_xlabel("pages")
        ax.set_ylabel("ms")
        ax.set_title(f"{f.name}\nslope {f.value:.2f}")
        ax.grid(True, which="both", alpha=0.3)
        path = os.path.join(directory, f.name.split(" ")[0].replace("+", "-") + "-scaling.png")
        fig.tight_layout()
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)
    # One chart of every figure that has a goal: how far each is from it.
    goals = []
    for f in figures:
        m = re.match(r"\s*(>=|<=|<|>|~)\s*([0-9.]+)", f.goal)
        if m and f.value > 0:
            goals.append((f, m.group(1), float(m.group(2))))
    if goals:
        fig, ax = plt.subplots(figsize=(8, 0.45 * len(goals) + 1.2))
        names = [f.name for f, _, _ in goals]
        # Headroom: > 1 means better than the goal, whichever way is better.
        head = [(f.value / t if op in (">=", ">") else t / f.value) if op != "~" else 1 / max(f.value, 1e-9)
                for f, op, t in goals]
        colors = ["tab:gray" if f.met is None else "tab:green" if f.met else "tab:red" for f, _, _ in goals]
        ax.barh(range(len(goals)), head, color=colors)
        ax.axvline(1.0, color="black", linewidth=1)
        ax.set_xscale("log")
        ax.set_yticks(range(len(goals)), names, fontsize=8)
        ax.invert_yaxis()
        ax.set_xlabel("headroom against the goal (>1: goal met; log scale)")
        ax.set_title("vfiosim bench: each figure against its goal")
        fig.tight_layout()
        path = os.path.join(directory, "goals.png")
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)
    return written
