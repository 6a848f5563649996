"""``--trace FILE``: every VFIO call of the programs, as JSON lines.

One object per call, written when the call returns::

    {"seq": 7, "time": 0.0123, "pid": 4242, "call": "ioctl", "fd": 5, "fd_kind": "vfio-container",
     "cmd": "VFIO_IOMMU_MAP_DMA", "args": {"argsz": 32, "flags": 3, "vaddr": ..., ...},
     "out": {...fields the kernel changed...}, "ret": 0, "errno": 0, "err": "", "reason": "..."}

``args`` are the ioctl's struct fields as the program passed them (read from
its memory before the call), ``out`` the fields the kernel changed.  The
iommufd ioctls of /dev/iommu (``fd_kind`` "iommufd", also /dev/vfio/vfio when
iommufd serves it) are decoded the same way, from their ``size``-first
structs; so are the cdev's VFIO_DEVICE_BIND_IOMMUFD, ATTACH/DETACH_IOMMUFD_PT
and VFIO_DEVICE_PCI_HOT_RESET (with its group fds, or none: the devid form).  Other
calls: open (path, flags), close, read/pread/write/pwrite (count, offset),
dup, mmap (offset, length, prot), mmio (offset, size, value), munmap, fork,
and ``exit`` events.  ``vfiosim trace show FILE`` prints them strace-style.
"""

from __future__ import annotations

import ctypes
import errno as E
import json
import os
import struct
import time
from typing import IO, TYPE_CHECKING, Any, Iterable, TextIO

from ..uapi import iommufd as iu
from ..uapi import vfio as uapi
from . import protocol as P

if TYPE_CHECKING:
    from ..kernel.task import Task

_STRUCTS: dict[str, type] = {
    "VFIO_GROUP_GET_STATUS": uapi.vfio_group_status,
    "VFIO_DEVICE_GET_INFO": uapi.vfio_device_info,
    "VFIO_DEVICE_GET_REGION_INFO": uapi.vfio_region_info,
    "VFIO_DEVICE_GET_IRQ_INFO": uapi.vfio_irq_info,
    "VFIO_DEVICE_SET_IRQS": uapi.vfio_irq_set,
    "VFIO_DEVICE_IOEVENTFD": uapi.vfio_device_ioeventfd,
    "VFIO_DEVICE_FEATURE": uapi.vfio_device_feature,
    "VFIO_DEVICE_GET_PCI_HOT_RESET_INFO": uapi.vfio_pci_hot_reset_info,
    "VFIO_IOMMU_GET_INFO": uapi.vfio_iommu_type1_info,
    "VFIO_IOMMU_MAP_DMA": uapi.vfio_iommu_type1_dma_map,
    "VFIO_IOMMU_UNMAP_DMA": uapi.vfio_iommu_type1_dma_unmap,
    "VFIO_IOMMU_DIRTY_PAGES": uapi.vfio_iommu_type1_dirty_bitmap,
    "VFIO_IOMMU_SPAPR_TCE_GET_INFO": uapi.vfio_iommu_spapr_tce_info,
    "VFIO_EEH_PE_OP": uapi.vfio_eeh_pe_op,
    "VFIO_IOMMU_SPAPR_REGISTER_MEMORY": uapi.vfio_iommu_spapr_register_memory,
    "VFIO_IOMMU_SPAPR_UNREGISTER_MEMORY": uapi.vfio_iommu_spapr_register_memory,
    "VFIO_IOMMU_SPAPR_TCE_CREATE": uapi.vfio_iommu_spapr_tce_create,
    "VFIO_IOMMU_SPAPR_TCE_REMOVE": uapi.vfio_iommu_spapr_tce_remove,
    "VFIO_DEVICE_BIND_IOMMUFD": uapi.vfio_device_bind_iommufd,
    "VFIO_DEVICE_ATTACH_IOMMUFD_PT": uapi.vfio_device_attach_iommufd_pt,
    "VFIO_DEVICE_DETACH_IOMMUFD_PT": uapi.vfio_device_detach_iommufd_pt,
    "VFIO_DEVICE_PCI_HOT_RESET": uapi.vfio_pci_hot_reset,
}
# /dev/iommu: struct iommu_<name> of IOMMU_<NAME>, but for two
_STRUCTS.update({name: iu.STRUCTS[name.lower()] for name in iu.IOCTLS if name.lower() in iu.STRUCTS})
_STRUCTS["IOMMU_GET_HW_INFO"] = iu.iommu_hw_info
_STRUCTS["IOMMU_FAULT_QUEUE_ALLOC"] = iu.iommu_fault_alloc
_NO_ARG = {"VFIO_GET_API_VERSION", "VFIO_IOMMU_ENABLE", "VFIO_IOMMU_DISABLE", "VFIO_GROUP_UNSET_CONTAINER",
           "VFIO_DEVICE_RESET"}
_VALUE_ARG = {"VFIO_CHECK_EXTENSION": "extension", "VFIO_SET_IOMMU": "type"}


def _fields(obj: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, ftype, *_ in obj._fields_:
        if name.startswith("_") and name not in getattr(obj, "_anonymous_", ()):
            continue
        value = getattr(obj, name)
        if name in getattr(obj, "_anonymous_", ()):
            out.update(_fields(value))
        elif isinstance(value, (ctypes.Structure, ctypes.Union)):
            out[name] = _fields(value)
        elif isinstance(value, ctypes.Array):
            if len(value):
                out[name] = list(value)
        else:
            out[name] = value
    return out


class Tracer:
    """Writes one JSON line per call to a file (or an open text stream)."""

    def __init__(self, target: str | IO[str], platform: str = "") -> None:
        self.platform = platform
        if isinstance(target, str):
            self.f: IO[str] = open(target, "w", buffering=1)
            self._own = True
        else:
            self.f = target
            self._own = False
        self.seq = 0
        self.t0 = time.monotonic()

    def close(self) -> None:
        if self._own:
            self.f.close()

    def _write(self, rec: dict[str, Any]) -> None:
        rec["seq"] = self.seq
        self.seq += 1
        self.f.write(json.dumps(rec, sort_keys=False) + "\n")
        self.f.flush()

    def event(self, pid: int, kind: str, detail: str = "") -> None:
        self._write({"time": round(time.monotonic() - self.t0, 6), "pid": pid, "call": kind, "detail": detail})

    # -- a call -------------------------------------------------------------------------------------

    def begin(self, task: "Task", op: int, flags: int, fd: int, fd2: int, a: tuple[int, ...],
              payload: bytes) -> dict[str, Any]:
        rec: dict[str, Any] = {"time": round(time.monotonic() - self.t0, 6), "pid": task.pid,
                               "call": P.OP_NAMES.get(op, str(op))}
        if op in (P.OP_OPEN, P.OP_CLOSE, P.OP_IOCTL, P.OP_READ, P.OP_WRITE, P.OP_DUP, P.OP_SETFD, P.OP_MMAP):
            rec["fd"] = fd
            try:
                rec["fd_kind"] = task.files.get(fd).kind
            except Exception:
                pass
        if op == P.OP_OPEN:
            rec.pop("fd_kind", None)
            rec["path"] = payload.decode("utf-8", "replace")
            rec["flags"] = a[0]
        elif op == P.OP_IOCTL:
            self._ioctl_args(task, rec, a[0] & 0xFFFFFFFF, a[1])
        elif op in (P.OP_READ, P.OP_WRITE):
            rec["buf"], rec["count"] = a[0], a[1]
            if flags & P.RW_POSITIONAL:
                rec["offset"] = a[2]
        elif op == P.OP_MMAP:
            rec.update(offset=a[0], length=a[1], prot=a[2])
        elif op == P.OP_MMIO:
            rec.update(mapping=a[0], offset=a[1], size=a[2], write=bool(flags & P.MMIO_WRITE))
            if flags & P.MMIO_WRITE:
                rec["value"] = a[3]
        elif op == P.OP_MUNMAP:
            rec["mapping"] = a[0]
        elif op == P.OP_FORK:
            rec["child"] = a[0]
        elif op == P.OP_DUP:
            rec["newfd"] = fd2
        return rec

    def _ioctl_args(self, task: "Task", rec: dict[str, Any], cmd: int, arg: int) -> None:
        if rec.get("fd_kind") == "iommufd":
            # iommufd's own numbers, else the VFIO container's (its Type1 emulation)
            name = iu.ioctl_name(cmd) or uapi.ioctl_name_for(cmd, "vfio-container") or f"{cmd:#x}"
            if "/" in name:
                name = next((n for n in name.split("/") if "SPAPR" not in n), name)
        else:
            name = uapi.ioctl_name_for(cmd, rec.get("fd_kind", "")) or f"{cmd:#x}"
        if "/" in name:
            parts = name.split("/")
            spapr = [n for n in parts if "SPAPR" in n]
            other = [n for n in parts if "SPAPR" not in n]
            container = None
            try:
                container = task.files.get(rec["fd"]).container      # type: ignore[attr-defined]
            except Exception:
                pass
            drv = getattr(getattr(container, "iommu_driver", None), "name", "") or ""
            type1 = "type1" in drv or (not drv and self.platform == "x86")
            name = other[0] if (type1 and other) or not spapr else spapr[0]
        rec["cmd"] = name
        rec["_arg"] = arg
        if name in _VALUE_ARG:
            rec["args"] = {_VALUE_ARG[name]: arg}
        elif name == "VFIO_GROUP_SET_CONTAINER":
            rec["args"] = self._read_s32(task, arg)
        elif name == "VFIO_GROUP_GET_DEVICE_FD":
            rec["args"] = self._read_str(task, arg)
        elif name in _STRUCTS:
            rec["args"] = self._read_struct(task, _STRUCTS[name], arg)
            if name == "VFIO_DEVICE_SET_IRQS" and isinstance(rec["args"], dict):
                s = rec["args"]
                if s.get("flags", 0) & uapi.VFIO_IRQ_SET_DATA_EVENTFD and 0 < s.get("count", 0) <= 64:
                    try:
                        raw = task.mm.read(arg + ctypes.sizeof(uapi.vfio_irq_set), 4 * s["count"])
                        s["data"] = list(struct.unpack(f"<{s['count']}i", raw))
                    except Exception:
                        s["data"] = "<fault>"
            elif name == "VFIO_DEVICE_PCI_HOT_RESET" and isinstance(rec["args"], dict):
                s = rec["args"]
                if 0 < s.get("count", 0) <= 64:
                    try:
                        raw = task.mm.read(arg + ctypes.sizeof(uapi.vfio_pci_hot_reset), 4 * s["count"])
                        s["group_fds"] = list(struct.unpack(f"<{s['count']}i", raw))
                    except Exception:
                        s["group_fds"] = "<fault>"
        elif arg and name not in _NO_ARG:
            rec["args"] = {"arg": arg}

    @staticmethod
    def _read_s32(task: "Task", arg: int) -> Any:
        try:
            return {"fd": struct.unpack("<i", task.mm.read(arg, 4))[0]}
        except Exception:
            return {"ptr": arg, "fault": True}

    @staticmethod
    def _read_str(task: "Task", arg: int) -> Any:
        try:
            raw = task.mm.read(arg, 64)
        except Exception:
            try:
                raw = task.mm.read(arg, 16)
            except Exception:
                return {"ptr": arg, "fault": True}
        return {"name": raw.split(b"\0", 1)[0].decode("utf-8", "replace")}

    @staticmethod
    def _read_struct(task: "Task", cls: Any, arg: int) -> Any:
        size = ctypes.sizeof(cls)
        try:
            argsz = struct.unpack("<I", task.mm.read(arg, 4))[0]
        except Exception:
            return {"ptr": arg, "fault": True}
        n = max(4, min(argsz, size))
        try:
            raw = task.mm.read(arg, n)
        except Exception:
            raw = task.mm.read(arg, 4)
        return _fields(cls.from_buffer_copy(raw.ljust(size, b"\0")))

    def end(self, rec: dict[str, Any], task: "Task", ret: int, err: int) -> None:
        arg = rec.pop("_arg", None)
        cmd = rec.get("cmd")
        if arg is not None and cmd in _STRUCTS and isinstance(rec.get("args"), dict) \
                and not rec["args"].get("fault"):
            try:
                after = self._read_struct(task, _STRUCTS[cmd], arg)
                before = rec["args"]
                changed = {k: v for k, v in after.items() if before.get(k) != v}
                if changed:
                    rec["out"] = changed
            except Exception:
                pass
        rec["ret"] = ret
        rec["errno"] = err
        rec["err"] = E.errorcode.get(err, "") if err else ""
        self._write(rec)


# -- `vfiosim trace show` ---------------------------------------------------------------------------


def _fmt_value(key: str, v: Any) -> str:
    if isinstance(v, dict):
        return "{" + ", ".join(f"{k}={_fmt_value(k, x)}" for k, x in v.items()) + "}"
    if isinstance(v, list):
        return "[" + ", ".join(_fmt_value(key, x) for x in v) + "]"
    if isinstance(v, int) and not isinstance(v, bool) and v > 0:
        if key in ("vaddr", "iova", "offset", "start_addr", "buf", "dma32_window_start", "flags", "ptr", "value",
                   "mask", "addr", "arg", "iova_pgsizes", "pgsizes", "user_va", "dst_iova", "src_iova",
                   "allowed_iovas", "data_uptr", "out_iova_alignment", "page_size", "out_capabilities"):
            return hex(v)
        if key in ("size", "window_size", "dma32_window_size", "length") and v > 9:
            return hex(v)
    return json.dumps(v) if isinstance(v, str) else str(v)


def format_record(rec: dict[str, Any]) -> str:
    pid = rec.get("pid", "?")
    call = rec.get("call", "?")
    head = f"[pid {pid:>6}] "
    if call in ("exit", "hello") and "ret" not in rec:
        return head + f"+++ {rec.get('detail') or call} +++"
    fd = rec.get("fd")
    fdtxt = f"{fd}<{rec['fd_kind']}>" if fd is not None and rec.get("fd_kind") else str(fd)
    if call == "open":
        args = f"{json.dumps(rec.get('path'))}, {_open_flags(rec.get('flags', 0))}"
    elif call == "ioctl":
        parts = [fdtxt, rec.get("cmd", "?")]
        if "args" in rec:
            parts.append(_fmt_value("", rec["args"]))
        args = ", ".join(parts)
    elif call in ("read", "write"):
        args = f"{fdtxt}, {_fmt_value('buf', rec.get('buf', 0))}, {rec.get('count')}"
        if "offset" in rec:
            call = "p" + call
            args += f", {_fmt_value('offset', rec['offset'])}"
    elif call == "mmap":
        args = f"{fdtxt}, offset={_fmt_value('offset', rec.get('offset', 0))}, length={_fmt_value('length', rec.get('length', 0))}, prot={rec.get('prot')}"
    elif call == "mmio":
        args = f"mapping {rec.get('mapping')}, offset={_fmt_value('offset', rec.get('offset', 0))}, size={rec.get('size')}"
        if rec.get("write"):
            call = "mmio_write"
            args += f", value={_fmt_value('value', rec.get('value', 0))}"
        else:
            call = "mmio_read"
    elif call == "dup":
        args = f"{fdtxt}, {rec.get('newfd')}"
    elif call == "munmap":
        args = f"mapping {rec.get('mapping')}"
    elif call == "fork":
        args = f"child={rec.get('child')}"
    else:
        args = fdtxt if fd is not None else ""
    ret = rec.get("ret")
    if rec.get("errno"):
        res = f"-1 {rec.get('err') or rec['errno']} ({os.strerror(rec['errno'])}"
        res += f": {rec['reason']})" if rec.get("reason") else ")"
    else:
        res = _fmt_value("value", rec.get("value", ret)) if call == "mmio_read" else str(ret)
    line = f"{head}{call}({args}) = {res}"
    if rec.get("out"):
        line += f"  => {_fmt_value('', rec['out'])}"
    return line


def _open_flags(flags: int) -> str:
    acc = {os.O_RDONLY: "O_RDONLY", os.O_WRONLY: "O_WRONLY", os.O_RDWR: "O_RDWR"}.get(flags & os.O_ACCMODE, "O_ACCMODE")
    names = [acc]
    for name in ("O_CLOEXEC", "O_NONBLOCK", "O_DIRECTORY", "O_CREAT", "O_EXCL"):
        if flags & getattr(os, name):
            names.append(name)
    return "|".join(names)


def read_trace(path: str) -> Iterable[dict[str, Any]]:
    with open(path) as f:
        for line in f:
            if line.strip():
                yield json.loads(line)


def show(path: str, out: TextIO) -> int:
    for rec in read_trace(path):
        print(format_record(rec), file=out)
    return 0
