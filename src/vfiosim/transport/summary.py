"""``vfiosim trace summary FILE``: a ``--trace`` file condensed.

A run like QEMU's makes hundreds of thousands of calls, nearly all of them the same
per-page VFIO_IOMMU_MAP_DMA / UNMAP_DMA over consecutive IOVAs, or config space and
BAR accesses.  The summary keeps every other call as one line and turns each run of
those into one line with its count and range, and counts everything.
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
    page_maps: int = 0                 # MAP_DMA / UNMAP_DMA of one 4 KiB IOMMU page
    page_unmaps: int = 0
    window_unmaps: int = 0             # UNMAP_DMA of more than a page (a whole window going away)
    mmio: int = 0
    config_rw: int = 0
    bar_rw: int = 0
    failures: list[str] = field(default_factory=list)
    windows: list[str] = field(default_factory=list)
    registered: list[str] = field(default_factory=list)
    steps: list[str] = field(default_factory=list)


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
        if kind in ("VFIO_IOMMU_MAP_DMA", "VFIO_IOMMU_UNMAP_DMA"):
            a0 = run_first.get("args") or {}
            a1 = run_last.get("args") or {}
            lo, hi = a0.get("iova", 0), a1.get("iova", 0) + a1.get("size", 0)
            if run_n == 1:
                h.steps.append(_step(run_first))
            else:
                h.steps.append(f"{run_n} x {kind} of one {a0.get('size', 0) // 1024} KiB page each, "
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
                if cmd in ("VFIO_IOMMU_MAP_DMA", "VFIO_IOMMU_UNMAP_DMA") and a.get("size") == page_size:
                    if cmd == "VFIO_IOMMU_MAP_DMA":
                        h.page_maps += 1
                    else:
                        h.page_unmaps += 1
                    key = (cmd, "page")
                else:
                    if cmd == "VFIO_IOMMU_UNMAP_DMA":
                        h.window_unmaps += 1
                    if cmd == "VFIO_IOMMU_SPAPR_TCE_CREATE" and not rec.get("errno"):
                        o = rec.get("out") or {}
                        h.windows.append(f"{o.get('start_addr', a.get('start_addr', 0)):#x}+{a.get('window_size', 0):#x} "
                                         f"({1 << a.get('page_shift', 12)}-byte pages, {a.get('levels')} levels)")
                    if cmd == "VFIO_IOMMU_SPAPR_REGISTER_MEMORY" and not rec.get("errno"):
                        h.registered.append(f"{a.get('vaddr', 0):#x}+{a.get('size', 0):#x}")
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
    return h


def print_summary(h: HostConversation, out: IO[str]) -> None:
    for step in h.steps:
        out.write(f"{step}\n")
    out.write("\ncounts:\n")
    for cmd, n in sorted(h.ioctls.items(), key=lambda kv: -kv[1]):
        out.write(f"  {n:9d}  {cmd}\n")
    out.write(f"  {h.config_rw:9d}  config space read/write\n  {h.bar_rw:9d}  BAR read/write\n"
              f"  {h.mmio:9d}  BAR loads/stores (mmio)\n")
    out.write(f"  MAP_DMA/UNMAP_DMA of one page: {h.page_maps} maps, {h.page_unmaps} unmaps; "
              f"larger UNMAP_DMA: {h.window_unmaps}\n")
    if h.windows:
        out.write(f"  DMA windows created: {'; '.join(h.windows)}\n")
    if h.registered:
        out.write(f"  memory registered: {'; '.join(h.registered)}\n")
    if h.failures:
        out.write("failed calls:\n")
        for f in h.failures:
            out.write(f"  {f}\n")
