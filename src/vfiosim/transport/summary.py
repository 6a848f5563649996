"""``vfiosim trace summary FILE``: a ``--trace`` file condensed.

A run like QEMU's makes hundreds of thousands of calls, nearly all of them the same
per-page VFIO_IOMMU_MAP_DMA / UNMAP_DMA (or iommufd's IOMMU_IOAS_MAP / UNMAP) over
consecutive IOVAs, or config space and BAR accesses.  The summary keeps every other
call as one line and turns each run of those into one line with its count and
range, and counts everything.
"""

from __future__ import annotations

import collections
import json
from dataclasses import dataclass, field
from typing import IO, Any

from ..tracing.format import open_trace


@dataclass
class HostConversation:
    """vfiosim's trace, condensed."""
    ioctls: collections.Counter[str] = field(default_factory=collections.Counter)
    page_maps: int = 0                 # MAP_DMA / UNMAP_DMA (IOAS_MAP / UNMAP) of one 4 KiB IOMMU page
    page_unmaps: int = 0
    window_unmaps: int = 0             # UNMAP_DMA of more than a page (a whole window going away)
    mmio: int = 0
    config_rw: int = 0
    bar_rw: int = 0
    failures: list[str] = field(default_factory=list)
    windows: list[str] = field(default_factory=list)
    registered: list[str] = field(default_factory=list)
    steps: list[str] = field(default_factory=list)
    # VFIO_IOMMU_SPAPR_REGISTER_MEMORY as [start, size, calls] runs: a program that
    # registers page by page (DPDK without hugepages) gives one run, not thousands.
    registered_runs: list[list[int]] = field(default_factory=list)
    iommu_type: int | None = None      # the type VFIO_SET_IOMMU accepted
    map_bytes: int = 0                 # bytes mapped by successful VFIO_IOMMU_MAP_DMA
    ioas_map_bytes: int = 0            # and by IOMMU_IOAS_MAP
    removed_windows: list[str] = field(default_factory=list)
    default_window: tuple[int, int] | None = None   # (start, size) VFIO_IOMMU_SPAPR_TCE_GET_INFO reported

    def registered_bytes(self) -> int:
        return sum(size for _start, size, _n in self.registered_runs)


def iommu_type_name(t: int | None) -> str:
    """VFIO_SET_IOMMU's argument as <linux/vfio.h> names it."""
    from ..uapi import vfio as uapi
    for name in ("VFIO_TYPE1_IOMMU", "VFIO_SPAPR_TCE_IOMMU", "VFIO_TYPE1v2_IOMMU", "VFIO_TYPE1_NESTING_IOMMU",
                 "VFIO_SPAPR_TCE_v2_IOMMU", "VFIO_NOIOMMU_IOMMU"):
        if getattr(uapi, name, None) == t:
            return name
    return "none" if t is None else f"type {t}"


def _step(rec: dict[str, Any]) -> str:
    call = rec.get("call")
    if call == "ioctl":
        a = rec.get("args") or {}
        o = rec.get("out") or {}
        cmd = rec.get("cmd") or "?"
        brief = {k: v for k, v in a.items() if k not in ("argsz", "flags") or v}
        text = f"{cmd} {_fmt(brief)}" if brief else cmd
        if o:
            text += f" => {_fmt(o)}"
    else:
        text = call or "?"
        if rec.get("path"):
            text += f" {rec['path']}"
    ret = rec.get("ret")
    if rec.get("errno"):
        text += f" = -1 {rec.get('err') or rec['errno']}"
    elif call == "ioctl" and ret not in (0, None):
        text += f" = {ret}"
    return text


def _fmt(d: dict[str, Any]) -> str:
    parts = []
    for k, v in d.items():
        if isinstance(v, dict):
            v = "{" + _fmt(v) + "}"
        elif isinstance(v, int) and k not in ("index", "count", "start", "op", "extension", "type", "levels",
                                               "page_shift", "fd", "num_regions", "num_irqs"):
            v = hex(v)
        parts.append(f"{k}={v}")
    return ", ".join(parts)


#: the per-page calls a run condenses, and the field that holds their length
_PAGE_CALLS = {"VFIO_IOMMU_MAP_DMA": "size", "VFIO_IOMMU_UNMAP_DMA": "size",
               "IOMMU_IOAS_MAP": "length", "IOMMU_IOAS_UNMAP": "length"}


def summarize_trace(path: str, page_size: int = 4096) -> HostConversation:
    """Count and condense a ``--trace`` file: runs of the same per-page MAP/UNMAP
    become one line, as do config-space and BAR accesses."""
    h = HostConversation()
    run_key: tuple[str, ...] | None = None
    run_n = 0
    run_first: dict[str, Any] = {}
    run_last: dict[str, Any] = {}

    def flush() -> None:
        nonlocal run_key, run_n
        if run_key is None:
            return
        kind = run_key[0]
        if kind in _PAGE_CALLS:
            # IOAS_MAP without FIXED_IOVA: the kernel chose the IOVA (out).
            a0 = {**(run_first.get("args") or {}), **(run_first.get("out") or {})}
            a1 = {**(run_last.get("args") or {}), **(run_last.get("out") or {})}
            size = _PAGE_CALLS[kind]
            lo, hi = a0.get("iova", 0), a1.get("iova", 0) + a1.get(size, 0)
            if run_n == 1:
                h.steps.append(_step(run_first))
            else:
                h.steps.append(f"{run_n} x {kind} of one {a0.get(size, 0) // 1024} KiB page each, "
                               f"iova {lo:#x}..{hi:#x}")
        elif kind in ("config", "bar", "mmio"):
            what = {"config": "config space read/write", "bar": "BAR read/write",
                    "mmio": "BAR loads/stores through the mapping"}[kind]
            h.steps.append(f"{run_n} x {what} ({'pread/pwrite' if kind != 'mmio' else 'mmio'})")
        else:
            h.steps.append(_step(run_first) if run_n == 1 else f"{run_n} x {_step(run_first)}")
        run_key = None
        run_n = 0

    with open_trace(path) as trace:
        for rec in trace:
            call = rec.get("call")
            key: tuple[str, ...]
            if call == "ioctl":
                cmd = rec.get("cmd") or "?"
                h.ioctls[cmd] += 1
                a = rec.get("args") or {}
                if rec.get("errno"):
                    h.failures.append(_step(rec))
                ok = not rec.get("errno")
                if cmd == "VFIO_SET_IOMMU" and ok:
                    h.iommu_type = a.get("arg", a.get("type"))
                if cmd == "VFIO_IOMMU_MAP_DMA" and ok:
                    h.map_bytes += a.get("size", 0)
                if cmd == "IOMMU_IOAS_MAP" and ok:
                    h.ioas_map_bytes += a.get("length", 0)
                if cmd == "VFIO_IOMMU_SPAPR_TCE_GET_INFO" and ok and h.default_window is None:
                    o = rec.get("out") or {}
                    h.default_window = (o.get("dma32_window_start", a.get("dma32_window_start", 0)),
                                        o.get("dma32_window_size", a.get("dma32_window_size", 0)))
                if cmd == "VFIO_IOMMU_SPAPR_TCE_REMOVE" and ok:
                    h.removed_windows.append(f"{a.get('start_addr', 0):#x}")
                if cmd in _PAGE_CALLS and a.get(_PAGE_CALLS[cmd]) == page_size:
                    if cmd in ("VFIO_IOMMU_MAP_DMA", "IOMMU_IOAS_MAP"):
                        h.page_maps += 1
                    else:
                        h.page_unmaps += 1
                    key = (cmd, "page", str(a.get("ioas_id", "")))
                else:
                    if cmd in ("VFIO_IOMMU_UNMAP_DMA", "IOMMU_IOAS_UNMAP"):
                        h.window_unmaps += 1
                    if cmd == "VFIO_IOMMU_SPAPR_TCE_CREATE" and not rec.get("errno"):
                        o = rec.get("out") or {}
                        h.windows.append(f"{o.get('start_addr', a.get('start_addr', 0)):#x}+{a.get('window_size', 0):#x} "
                                         f"({1 << a.get('page_shift', 12)}-byte pages, {a.get('levels')} levels)")
                    if cmd == "VFIO_IOMMU_SPAPR_REGISTER_MEMORY" and not rec.get("errno"):
                        start, size = a.get("vaddr", 0), a.get("size", 0)
                        last = h.registered_runs[-1] if h.registered_runs else None
                        if last is not None and last[0] + last[1] == start:
                            last[1] += size
                            last[2] += 1
                        else:
                            h.registered_runs.append([start, size, 1])
                    key = (cmd, json.dumps(a, sort_keys=True), str(rec.get("ret")))
            elif call in ("read", "write", "pread", "pwrite"):
                off = rec.get("offset", 0) or 0
                region = off >> 40
                kind = "config" if region == 7 else "bar"
                if kind == "config":
                    h.config_rw += 1
                else:
                    h.bar_rw += 1
                key = (kind,)
            elif call == "mmio":
                h.mmio += 1
                key = ("mmio",)
            else:
                key = (call or "?", json.dumps(rec.get("path")), str(rec.get("ret")))
            if key != run_key:
                flush()
                run_key = key
                run_first = rec
            run_n += 1
            run_last = rec
    flush()
    h.registered = [f"{start:#x}+{size:#x}" + (f" ({n} registrations of {size // n:#x})" if n > 1 else "")
                    for start, size, n in h.registered_runs]
    return h


def print_summary(h: HostConversation, out: IO[str]) -> None:
    for step in h.steps:
        out.write(f"{step}\n")
    out.write("\ncounts:\n")
    for cmd, n in sorted(h.ioctls.items(), key=lambda kv: -kv[1]):
        out.write(f"  {n:9d}  {cmd}\n")
    out.write(f"  {h.config_rw:9d}  config space read/write\n  {h.bar_rw:9d}  BAR read/write\n"
              f"  {h.mmio:9d}  BAR loads/stores (mmio)\n")
    out.write(f"  MAP_DMA/UNMAP_DMA (IOAS_MAP/UNMAP) of one page: {h.page_maps} maps, {h.page_unmaps} unmaps; "
              f"larger unmaps: {h.window_unmaps}\n")
    if h.iommu_type is not None:
        out.write(f"  IOMMU type: {iommu_type_name(h.iommu_type)}; MAP_DMA: {h.ioctls['VFIO_IOMMU_MAP_DMA']} calls, "
                  f"{h.map_bytes:#x} bytes\n")
    if h.ioctls["IOMMU_IOAS_MAP"]:
        out.write(f"  iommufd: IOAS_MAP: {h.ioctls['IOMMU_IOAS_MAP']} calls, {h.ioas_map_bytes:#x} bytes\n")
    if h.windows:
        out.write(f"  DMA windows created: {'; '.join(h.windows)}\n")
    if h.registered:
        out.write(f"  memory registered: {'; '.join(h.registered)}\n")
    if h.failures:
        out.write("failed calls:\n")
        for f in h.failures:
            out.write(f"  {f}\n")
