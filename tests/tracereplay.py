"""Replay a real-kernel reference trace (tests/data/reference_traces) on a machine.

Each line of a trace is one step of a test program run on a real Linux
kernel: the call, its inputs, and what the kernel answered (return value,
errno, the struct fields afterwards, VmLck/VmPin).  This module performs the
same calls on a simulated process and compares every recorded field.

The test program's conventions, as the traces show them:

* ``buf`` (64 MiB, read/write, filled with 0x5a), ``robuf`` (1 MiB,
  PROT_READ, never written) and ``unmapped`` (1 MiB mapped, then unmapped)
  name memory symbolically (``buf+0x1000``).
* Structures are zeroed before a call, except GET_INFO, whose buffer is
  filled with 0xa5 (untouched fields show 0xa5a5a5a5), and TCE_CREATE, whose
  ``start_addr`` is preset to 0xdeadbeef.
* Opens and GET_DEVICE_FD record 0 on success, not the fd.
* ``close(device)`` closes every device fd the program holds: after it,
  UNSET_CONTAINER succeeds, which the kernel allows only when no device of
  the group is open (the program opened the device twice).
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import vfiosim
from vfiosim import uapi
from vfiosim.uapi import ioctl as ioc

TRACES = Path(__file__).parent / "data" / "reference_traces"


def load_trace(name: str) -> list[dict[str, Any]]:
    with open(TRACES / name) as f:
        return [json.loads(line) for line in f if line.strip()]


@dataclass
class Mismatch:
    seq: int
    case: str
    what: str
    expected: Any
    got: Any

    def __str__(self) -> str:
        return f"step {self.seq} {self.case}: {self.what}: expected {self.expected!r}, got {self.got!r}"


@dataclass
class ReplayResult:
    steps: int = 0
    matched: int = 0
    skipped: int = 0
    mismatches: list[Mismatch] = field(default_factory=list)


class Replayer:
    def __init__(self, machine: vfiosim.Machine, meta: dict[str, Any]) -> None:
        self.m = machine
        self.meta = meta
        self.p = machine.spawn(uid=meta["uid"], rlimit_memlock=(meta["rlimit_memlock_cur"], meta["rlimit_memlock_max"]))
        p = self.p
        size = meta["buf_size"]
        self.syms = {"buf": p.mmap(size)}
        p.write_memory(self.syms["buf"], b"\x5a" * size)
        self.syms["robuf"] = p.mmap(1 << 20, vfiosim.PROT_READ)
        unmapped = p.mmap(1 << 20)
        p.munmap(unmapped, 1 << 20)
        self.syms["unmapped"] = unmapped
        self.container: int | None = None
        self.groups: dict[int, int] = {}
        self.devices: list[int] = []

    def addr(self, args: dict[str, Any], key: str) -> int:
        sym = args.get(f"{key}_sym")
        if sym is None:
            return args[key]
        base, _, off = sym.partition("+")
        sign = 1
        if "-" in base:
            base, _, off = sym.partition("-")
            sign = -1
        return self.syms[base] + sign * int(off, 16)

    # -- one step ------------------------------------------------------------------------

    def call(self, step: dict[str, Any]) -> tuple[int, int, dict[str, Any] | None]:
        """Perform a step; return (ret, errno, out fields)."""
        op, args = step["op"], step.get("args") or {}
        p = self.p
        out: dict[str, Any] | None = None
        try:
            if op == "open(/dev/vfio/vfio)":
                self.container = p.open("/dev/vfio/vfio", os.O_RDWR)
                return 0, 0, None
            if op == "open(/dev/vfio/N)":
                self.groups[args["slot"]] = p.open(f"/dev/vfio/{args['group']}", os.O_RDWR)
                return 0, 0, None
            if op == "close(device)":
                for fd in self.devices:
                    p.close(fd)
                self.devices = []
                return 0, 0, None
            if op == "close(group)":
                p.close(self.groups.pop(args["slot"]))
                return 0, 0, None
            if op == "close(container)":
                assert self.container is not None
                p.close(self.container)
                return 0, 0, None
            return self.ioctl(op, args)
        except OSError as exc:
            return -1, exc.errno, self._last_out
        finally:
            pass

    _last_out: dict[str, Any] | None = None

    def ioctl(self, op: str, args: dict[str, Any]) -> tuple[int, int, dict[str, Any] | None]:
        p, c = self.p, self.container
        self._last_out = None
        done = self.type1_ioctl(op, args)
        if done is not None:
            return done
        if op == "VFIO_GET_API_VERSION":
            return p.ioctl(c, uapi.VFIO_GET_API_VERSION), 0, None
        if op == "VFIO_CHECK_EXTENSION":
            return p.ioctl(c, uapi.VFIO_CHECK_EXTENSION, args["extension"]), 0, None
        if op == "VFIO_SET_IOMMU":
            return p.ioctl(c, uapi.VFIO_SET_IOMMU, args["type"]), 0, None
        if op == "container_ioctl(raw)":
            return p.ioctl(c, ioc._IO(";", uapi.VFIO_BASE + args["vfio_base_plus"])), 0, None
        if op == "VFIO_IOMMU_ENABLE":
            return p.ioctl(c, uapi.VFIO_IOMMU_ENABLE), 0, None
        if op == "VFIO_IOMMU_DISABLE":
            return p.ioctl(c, uapi.VFIO_IOMMU_DISABLE), 0, None
        if op == "VFIO_IOMMU_SPAPR_TCE_GET_INFO":
            s = uapi.vfio_iommu_spapr_tce_info()
            ctypes.memset(ctypes.addressof(s), 0xA5, ctypes.sizeof(s))
            s.argsz, s.flags = args["argsz"], args["flags"]
            self._last_out = out = lambda: {
                "argsz": s.argsz, "flags": s.flags, "dma32_window_start": s.dma32_window_start,
                "dma32_window_size": s.dma32_window_size, "ddw_pgsizes": s.ddw.pgsizes,
                "ddw_max_dynamic_windows_supported": s.ddw.max_dynamic_windows_supported, "ddw_levels": s.ddw.levels}
            return self._struct_call(c, uapi.VFIO_IOMMU_SPAPR_TCE_GET_INFO, s, out)
        if op == "VFIO_GROUP_GET_STATUS":
            s = uapi.vfio_group_status(argsz=args["argsz"])
            out = lambda: {"flags": s.flags, "viable": int(bool(s.flags & uapi.VFIO_GROUP_FLAGS_VIABLE)),
                           "container_set": int(bool(s.flags & uapi.VFIO_GROUP_FLAGS_CONTAINER_SET))}
            return self._struct_call(self.groups[args["slot"]], uapi.VFIO_GROUP_GET_STATUS, s, out)
        if op == "VFIO_GROUP_SET_CONTAINER":
            return p.ioctl(self.groups[args["slot"]], uapi.VFIO_GROUP_SET_CONTAINER, ctypes.c_int32(c)), 0, None
        if op == "VFIO_GROUP_UNSET_CONTAINER":
            return p.ioctl(self.groups[args["slot"]], uapi.VFIO_GROUP_UNSET_CONTAINER), 0, None
        if op == "VFIO_GROUP_GET_DEVICE_FD":
            name = self.meta["bdf"] if args["name"] == "bdf" else args["name"]
            fd = p.ioctl(self.groups[args["slot"]], uapi.VFIO_GROUP_GET_DEVICE_FD, name.encode() + b"\0")
            self.devices.append(fd)
            return 0, 0, None
        if op == "VFIO_IOMMU_MAP_DMA":
            s = uapi.vfio_iommu_type1_dma_map(argsz=args["argsz"], flags=args["flags"], vaddr=self.addr(args, "vaddr"),
                                               iova=args["iova"], size=args["size"])
            return p.ioctl(c, uapi.VFIO_IOMMU_MAP_DMA, s), 0, None
        if op == "VFIO_IOMMU_UNMAP_DMA":
            s = uapi.vfio_iommu_type1_dma_unmap(argsz=args["argsz"], flags=args["flags"], iova=args["iova"],
                                                 size=args["size"])
            out = lambda: {"argsz": s.argsz, "flags": s.flags, "iova": s.iova, "size": s.size}
            return self._struct_call(c, uapi.VFIO_IOMMU_UNMAP_DMA, s, out)
        if op in ("VFIO_IOMMU_SPAPR_REGISTER_MEMORY", "VFIO_IOMMU_SPAPR_UNREGISTER_MEMORY"):
            s = uapi.vfio_iommu_spapr_register_memory(argsz=args["argsz"], flags=args["flags"],
                                                       vaddr=self.addr(args, "vaddr"), size=args["size"])
            return p.ioctl(c, getattr(uapi, op), s), 0, None
        if op == "VFIO_IOMMU_SPAPR_TCE_CREATE":
            s = uapi.vfio_iommu_spapr_tce_create(argsz=args["argsz"], flags=args["flags"], page_shift=args["page_shift"],
                                                  window_size=args["window_size"], levels=args["levels"],
                                                  start_addr=0xDEADBEEF)
            out = lambda: {"start_addr": s.start_addr}
            return self._struct_call(c, uapi.VFIO_IOMMU_SPAPR_TCE_CREATE, s, out)
        if op == "VFIO_IOMMU_SPAPR_TCE_REMOVE":
            s = uapi.vfio_iommu_spapr_tce_remove(argsz=args["argsz"], flags=args["flags"], start_addr=args["start_addr"])
            return p.ioctl(c, uapi.VFIO_IOMMU_SPAPR_TCE_REMOVE, s), 0, None
        if op == "VFIO_EEH_PE_OP":
            s = uapi.vfio_eeh_pe_op(argsz=args["argsz"], flags=args["flags"], op=args["op"])
            return p.ioctl(c, uapi.VFIO_EEH_PE_OP, s), 0, None
        if op == "VFIO_DEVICE_GET_INFO":
            s = uapi.vfio_device_info(argsz=args["argsz"])
            out = lambda: {"argsz": s.argsz, "flags": s.flags, "num_regions": s.num_regions, "num_irqs": s.num_irqs,
                           "cap_offset": s.cap_offset}
            return self._struct_call(self.devices[0], uapi.VFIO_DEVICE_GET_INFO, s, out)
        if op == "VFIO_DEVICE_GET_REGION_INFO":
            s = uapi.vfio_region_info(argsz=args["argsz"], index=args["index"])
            out = lambda: {"argsz": s.argsz, "flags": s.flags, "cap_offset": s.cap_offset, "size": s.size,
                           "offset": s.offset}
            return self._struct_call(self.devices[0], uapi.VFIO_DEVICE_GET_REGION_INFO, s, out)
        if op == "VFIO_DEVICE_GET_IRQ_INFO":
            s = uapi.vfio_irq_info(argsz=ctypes.sizeof(uapi.vfio_irq_info), index=args["index"])
            out = lambda: {"flags": s.flags, "count": s.count}
            return self._struct_call(self.devices[0], uapi.VFIO_DEVICE_GET_IRQ_INFO, s, out)
        raise NotImplementedError(f"replay does not know the op {op!r}")

    # -- Type1 (type1v2-x86.jsonl) ----------------------------------------------------------
    #
    # GET_INFO's buffer is 4096 bytes filled with 0xa5 (argsz and flags set),
    # and its capability chain is decoded into ``caps``.  Dirty bitmaps live in
    # the program's memory, zeroed before each call; ``data_null`` passes NULL
    # instead.  ``bitmap_head`` is the bitmap's 64-bit words, ``dirty_pages``
    # the bits set in them.

    _bitmap_addr: int | None = None

    def type1_ioctl(self, op: str, args: dict[str, Any]) -> tuple[int, int, dict[str, Any] | None] | None:
        """The Type1 ops and the device reset; None for any other op."""
        p, c = self.p, self.container
        if op == "VFIO_IOMMU_GET_INFO":
            buf = bytearray(b"\xa5" * max(4096, args["argsz"]))
            struct.pack_into("<II", buf, 0, args["argsz"], args["flags"])
            return self._buffer_call(c, uapi.VFIO_IOMMU_GET_INFO, buf, lambda: type1_info_fields(buf))
        if op == "VFIO_IOMMU_DIRTY_PAGES":
            data = self._bitmap(args)
            buf = bytearray(struct.pack("<IIQQQQQ", args["argsz"], args["flags"], args.get("iova", 0),
                                        args.get("size", 0), args.get("pgsize", 0), args.get("bitmap_size", 0), data))
            if "bitmap_size" not in args:
                return p.ioctl(c, uapi.VFIO_IOMMU_DIRTY_PAGES, buf), 0, None
            return self._buffer_call(c, uapi.VFIO_IOMMU_DIRTY_PAGES, buf, lambda: self._bitmap_fields(args))
        if op == "VFIO_IOMMU_UNMAP_DMA" and "bitmap_size" in args:
            data = self._bitmap(args)
            buf = bytearray(struct.pack("<IIQQQQQ", args["argsz"], args["flags"], args["iova"], args["size"],
                                        args["pgsize"], args["bitmap_size"], data))

            def out() -> dict[str, Any]:
                argsz, flags, iova, size = struct.unpack_from("<IIQQ", buf)
                return {"argsz": argsz, "flags": flags, "iova": iova, "size": size, **self._bitmap_fields(args)}
            return self._buffer_call(c, uapi.VFIO_IOMMU_UNMAP_DMA, buf, out)
        if op == "VFIO_DEVICE_RESET":
            return p.ioctl(self.devices[0], uapi.VFIO_DEVICE_RESET), 0, None
        return None

    def _bitmap(self, args: dict[str, Any]) -> int:
        """The zeroed bitmap buffer's address (0 for data_null)."""
        if self._bitmap_addr is None:
            self._bitmap_addr = self.p.mmap(1 << 20)
        self.p.write_memory(self._bitmap_addr, bytes(4096))
        return 0 if args.get("data_null") else self._bitmap_addr

    def _bitmap_fields(self, args: dict[str, Any]) -> dict[str, Any]:
        assert self._bitmap_addr is not None
        words = (args.get("bitmap_size", 0) + 7) // 8
        raw = self.p.read_memory(self._bitmap_addr, 8 * words)
        values = struct.unpack(f"<{words}Q", raw)
        return {"dirty_pages": sum(bin(v).count("1") for v in values), "bitmap_head": [hex(v) for v in values]}

    def _buffer_call(self, fd: int | None, cmd: int, buf: bytearray, out) -> tuple[int, int, dict]:
        try:
            ret = self.p.ioctl(fd, cmd, buf)
        except OSError:
            self._last_out = out()
            raise
        return ret, 0, out()

    def _struct_call(self, fd: int | None, cmd: int, s: ctypes.Structure, out) -> tuple[int, int, dict]:
        try:
            ret = self.p.ioctl(fd, cmd, s)
        except OSError as exc:
            self._last_out = out()
            raise
        return ret, 0, out()


_TYPE1_CAP_NAMES = {uapi.VFIO_IOMMU_TYPE1_INFO_CAP_IOVA_RANGE: "IOVA_RANGE",
                    uapi.VFIO_IOMMU_TYPE1_INFO_CAP_MIGRATION: "MIGRATION",
                    uapi.VFIO_IOMMU_TYPE1_INFO_DMA_AVAIL: "DMA_AVAIL"}


def type1_info_fields(buf: bytes | bytearray) -> dict[str, Any]:
    """struct vfio_iommu_type1_info and its capability chain, as the trace records them."""
    argsz, flags, pgsizes, cap_offset = struct.unpack_from("<IIQI", buf)
    out: dict[str, Any] = {"argsz": argsz, "flags": flags, "iova_pgsizes": pgsizes, "cap_offset": cap_offset}
    if not flags & uapi.VFIO_IOMMU_INFO_CAPS or not cap_offset or cap_offset >= len(buf):
        return out
    caps = []
    offset = cap_offset
    while offset and offset + 8 <= len(buf) and len(caps) < 64:
        cap_id, version, nxt = struct.unpack_from("<HHI", buf, offset)
        cap: dict[str, Any] = {"offset": offset, "id": cap_id, "version": version, "next": nxt,
                               "name": _TYPE1_CAP_NAMES.get(cap_id, str(cap_id))}
        if cap_id == uapi.VFIO_IOMMU_TYPE1_INFO_CAP_MIGRATION:
            cap["flags"], cap["pgsize_bitmap"], cap["max_dirty_bitmap_size"] = \
                struct.unpack_from("<I4xQQ", buf, offset + 8)
        elif cap_id == uapi.VFIO_IOMMU_TYPE1_INFO_DMA_AVAIL:
            cap["avail"] = struct.unpack_from("<I", buf, offset + 8)[0]
        elif cap_id == uapi.VFIO_IOMMU_TYPE1_INFO_CAP_IOVA_RANGE:
            nr = struct.unpack_from("<I", buf, offset + 8)[0]
            cap["nr_iovas"] = nr
            cap["ranges"] = [list(struct.unpack_from("<QQ", buf, offset + 16 + 16 * i))
                             for i in range(min(nr, (len(buf) - offset - 16) // 16))]
        caps.append(cap)
        offset = nxt
    out["caps"] = caps
    return out


def replay(machine: vfiosim.Machine, trace: list[dict[str, Any]]) -> ReplayResult:
    meta = trace[0]
    assert meta["op"] == "meta"
    r = Replayer(machine, meta)
    result = ReplayResult()
    for step in trace[1:]:
        if "seq" not in step:
            continue                                    # the __exit__ record
        result.steps += 1
        if step.get("skipped") or step["op"] in ("note", "meta"):
            ret, err, out = 0, 0, None
            if step.get("skipped"):
                result.skipped += 1
        else:
            ret, err, out = r.call(step)
        bad = []
        exp_ret = step["ret"]
        if exp_ret == -1:
            if ret != -1 or err != step["errno"]:
                bad.append(("result", f"-1 {errno.errorcode.get(step['errno'])}",
                            f"{ret} {errno.errorcode.get(err, err) if err else ''}".strip()))
        elif ret != exp_ret:
            bad.append(("ret", exp_ret, f"{ret} {errno.errorcode.get(err, '') if err else ''}".strip()))
        for key, value in (step.get("out") or {}).items():
            got = None if out is None else out.get(key)
            if got != value:
                bad.append((f"out.{key}", value, got))
        status = r.p.status()
        if status["VmLck"] != step["vmlck_kb"]:
            bad.append(("VmLck kB", step["vmlck_kb"], status["VmLck"]))
        if status["VmPin"] != step["vmpin_kb"]:
            bad.append(("VmPin kB", step["vmpin_kb"], status["VmPin"]))
        if bad:
            result.mismatches.extend(Mismatch(step["seq"], step["case"], *b) for b in bad)
        else:
            result.matched += 1
    r.p.exit()
    return result
