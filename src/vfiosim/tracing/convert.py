"""The real-kernel reference traces (``tests/data/reference_traces``) in the format of record.

A reference trace is one JSON object per *step* of the program that recorded it,
with that program's conventions (its README and ``src/vfiosim/qemu/guest/reference_walker.c`` say
the same):

* ``buf`` (64 MiB, read/write, filled with 0x5a), ``robuf`` (1 MiB, PROT_READ) and
  ``unmapped`` (1 MiB mapped, then unmapped) name memory: ``vaddr_sym: "buf+0x1000"``;
* structs are zeroed before a call, except the GET_INFO buffers (4 KiB filled with
  0xa5, then argsz and flags set) and TCE_CREATE's ``start_addr`` (0xdeadbeef);
* opens and GET_DEVICE_FD record 0 on success, not the fd;
* ``close(device)`` closes every device fd the program holds (it opened two);
* ``slot`` says which of the program's group fds a step used.

Here each step becomes the calls it made, as ``vfiosim record`` would have written
them: the header declares the three mappings, a ``vaddr`` refers to one of them
(``mem``), fds get the numbers a fresh process would have had, and the GET_INFO
argument is carried as its bytes (``raw.in``).  Records keep the step's ``seq``,
``scenario`` and ``case``; the calls of one step share its ``seq``.
"""

from __future__ import annotations

import errno as E
import os
from typing import Any, Iterable, Iterator

from ..uapi import vfio as uapi
from ..uapi.ioctl import _IO
from . import ioctls

#: the recording program's mappings, in the order it made them
MEMORY: list[dict[str, Any]] = [{"name": "buf", "size": None, "prot": "rw", "fill": 0x5A},
          {"name": "robuf", "size": 1 << 20, "prot": "r"},
          {"name": "unmapped", "size": 1 << 20, "prot": "none", "unmapped": True}]

_PLATFORM = {"v1": "pseries", "v2": "pseries", "type1v2": "x86"}
_INFO_FILL = 0xA5
_INFO_SIZE = 4096


def reference_header(meta: dict[str, Any]) -> dict[str, Any]:
    """The header of a converted reference trace, from its ``meta`` step."""
    from .format import make_header
    memory = [dict(m) for m in MEMORY]
    memory[0]["size"] = meta["buf_size"]
    scenario = meta.get("scenario", "")
    return make_header(
        "reference", "a reference-trace program (src/vfiosim/qemu/guest/reference_walker.c walks the same steps)",
        scenario=scenario,
        system={"kernel": "Linux 6.12 (Debian 6.12.95)", "page_size": meta.get("page_size", 4096),
                "platform": _PLATFORM.get(scenario, ""),
                "machine": "ppc64le" if _PLATFORM.get(scenario) == "pseries" else "x86_64"},
        devices=[{"bdf": meta["bdf"], "iommu_group": meta["group"]}],
        groups=[{"id": meta["group"], "devices": [meta["bdf"]]}],
        process={"uid": meta["uid"], "rlimit_memlock": [meta["rlimit_memlock_cur"], meta["rlimit_memlock_max"]],
                 "vmlck_kb": meta.get("vmlck_kb", 0), "vmpin_kb": meta.get("vmpin_kb", 0)},
        memory=memory)


def _mem_ref(sym: str) -> dict[str, Any]:
    base, sign, off = sym, 1, "0"
    for sep, s in (("+", 1), ("-", -1)):
        if sep in sym:
            base, _, off = sym.partition(sep)
            sign = s
            break
    return {"map": base, "offset": sign * int(off, 16)}


class _Converter:
    def __init__(self, header: dict[str, Any]) -> None:
        self.header = header
        self.bdf = header["devices"][0]["bdf"]
        self.next_fd = 3
        self.container: int | None = None
        self.groups: dict[int, int] = {}
        self.devices: list[int] = []
        self.iommu = ""

    def _fd(self) -> int:
        fd = self.next_fd
        self.next_fd += 1
        return fd

    def records(self, step: dict[str, Any]) -> list[dict[str, Any]]:
        op = step["op"]
        args = dict(step.get("args") or {})
        base = {"seq": step["seq"], "scenario": step.get("scenario", ""), "case": step.get("case", ""),
                "pid": 1}
        tail = {"ret": step["ret"], "errno": step["errno"], "err": step.get("err", ""),
                "vmlck_kb": step["vmlck_kb"], "vmpin_kb": step["vmpin_kb"]}
        ok = step["ret"] != -1
        if step.get("skipped") or op in ("note", "meta"):
            rec = {**base, "call": "note", **tail}
            if step.get("skipped"):
                rec["skipped"] = True
                rec["detail"] = f"{op} not run by the recording program"
            return [rec]
        if op.startswith("open("):
            if op == "open(/dev/vfio/vfio)":
                path = "/dev/vfio/vfio"
            else:
                path = f"/dev/vfio/{args['group']}"
            fd = self._fd() if ok else -1
            if ok:
                if path == "/dev/vfio/vfio":
                    self.container = fd
                else:
                    self.groups[args["slot"]] = fd
            return [{**base, "call": "open", "path": path, "flags": os.O_RDWR, **tail, "ret": fd}]
        if op.startswith("close("):
            if op == "close(device)":
                fds, self.devices = self.devices, []
            elif op == "close(group)":
                fds = [self.groups.pop(args["slot"])]
            else:
                fds = [self.container] if self.container is not None else []
            kind = {"close(device)": "vfio-device", "close(group)": "vfio-group"}.get(op, "vfio-container")
            return [{**base, "call": "close", "fd": fd, "fd_kind": kind, **tail} for fd in fds]
        return [self._ioctl(op, args, step, base, tail)]

    def _ioctl(self, op: str, args: dict[str, Any], step: dict[str, Any], base: dict[str, Any],
               tail: dict[str, Any]) -> dict[str, Any]:
        rec: dict[str, Any] = {**base, "call": "ioctl"}
        slot = args.pop("slot", None)
        if op.startswith("VFIO_GROUP_"):
            rec["fd"], rec["fd_kind"] = self.groups.get(slot or 0, -1), "vfio-group"
        elif op.startswith("VFIO_DEVICE_"):
            rec["fd"], rec["fd_kind"] = self.devices[0] if self.devices else -1, "vfio-device"
        else:
            rec["fd"], rec["fd_kind"] = self.container, "vfio-container"
        out_ref = step.get("out")
        if op == "container_ioctl(raw)":
            rec["cmd"] = f"VFIO_BASE+{args['vfio_base_plus']}"
            rec["request"] = _IO(uapi.VFIO_TYPE, uapi.VFIO_BASE + args["vfio_base_plus"])
            return {**rec, **tail}
        rec["cmd"] = op
        layout = ioctls.LAYOUTS[op]
        mem: dict[str, Any] = {}
        for key in list(args):
            if key.endswith("_sym"):
                sym = args.pop(key)
                field = key[:-4]
                if field in ioctls.ADDRESS_FIELDS.get(op, ()):
                    mem[field] = _mem_ref(sym)
                    args.setdefault(field, 0)
        if layout.kind == ioctls.VALUE:
            rec["args"] = args
        elif op == "VFIO_GROUP_SET_CONTAINER":
            rec["args"] = {"fd": self.container}
        elif op == "VFIO_GROUP_GET_DEVICE_FD":
            rec["args"] = {"name": self.bdf if args.get("name") == "bdf" else args.get("name", "")}
        elif layout.kind == ioctls.STRUCT:
            self._struct_args(op, args, out_ref, rec)
        if mem:
            rec["mem"] = mem
        if op == "VFIO_SET_IOMMU" and step["ret"] == 0:
            self.iommu = ioctls.iommu_family(args.get("type"))
        rec.update(tail)
        if op == "VFIO_GROUP_GET_DEVICE_FD" and step["ret"] != -1:
            fd = self._fd()
            self.devices.append(fd)
            rec["ret"] = fd
        return rec

    def _struct_args(self, op: str, args: dict[str, Any], out_ref: dict[str, Any] | None,
                     rec: dict[str, Any]) -> None:
        if op in ("VFIO_IOMMU_SPAPR_TCE_GET_INFO", "VFIO_IOMMU_GET_INFO"):
            # 4 KiB of 0xa5, then argsz and flags: the bytes themselves, so that a replay passes them.
            buf = bytearray([_INFO_FILL]) * _INFO_SIZE
            buf[0:8] = args["argsz"].to_bytes(4, "little") + args["flags"].to_bytes(4, "little")
            rec["raw"] = {"in": bytes(buf).hex()}
            rec["args"] = ioctls.decode(op, bytes(buf))
            if out_ref is not None:
                after = dict(rec["args"])
                if op == "VFIO_IOMMU_SPAPR_TCE_GET_INFO":
                    ddw = dict(after["ddw"])
                    for k, v in out_ref.items():
                        if k.startswith("ddw_"):
                            ddw[k[4:]] = v
                        else:
                            after[k] = v
                    after["ddw"] = ddw
                else:
                    after.update(out_ref)
                rec["out"] = ioctls.changed(rec["args"], after)
            return
        if op in ("VFIO_IOMMU_DIRTY_PAGES", "VFIO_IOMMU_UNMAP_DMA") and "bitmap_size" in args:
            bitmap = {"pgsize": args.pop("pgsize", 0), "size": args.pop("bitmap_size"),
                      "data": 0 if args.pop("data_null", 0) else 1}
            if op == "VFIO_IOMMU_DIRTY_PAGES":
                fields = {"argsz": args["argsz"], "flags": args["flags"], "iova": args.get("iova", 0),
                          "size": args.get("size", 0), "bitmap": bitmap}
            else:
                fields = {**args, "bitmap": bitmap}
            if bitmap["data"]:
                rec["mem"] = {"bitmap.data": {"scratch": True}}
        else:
            fields = {k: v for k, v in args.items() if k not in ("data_null",)}
            if op == "VFIO_IOMMU_SPAPR_TCE_CREATE":
                fields["start_addr"] = 0xDEADBEEF
            if op == "VFIO_DEVICE_GET_IRQ_INFO":
                fields["argsz"] = 16
            if op == "VFIO_IOMMU_DIRTY_PAGES" and args.get("data_null"):
                fields["bitmap"] = {"data": 0}
        raw = ioctls.encode(op, fields)
        rec["args"] = ioctls.decode(op, bytes(raw))
        if out_ref is not None:
            after = dict(rec["args"])
            for k, v in out_ref.items():
                if k in ("viable", "container_set"):
                    continue                  # GROUP_GET_STATUS: both are bits of flags
                after[k] = v
            rec["out"] = ioctls.changed(rec["args"], after)


def reference_records(header: dict[str, Any], steps: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    """The records of a reference trace's steps (after its ``meta`` step)."""
    conv = _Converter(header)
    for step in steps:
        if step.get("op") == "exit" or "seq" not in step:
            if step.get("op") == "exit":
                yield {"pid": 1, "call": "exit", "detail": f"exited with status {step.get('exit_status')}",
                       "scenario": step.get("scenario", "")}
            continue
        if step.get("op") == "meta":
            continue
        for rec in conv.records(step):
            if rec.get("errno") and not rec.get("err"):
                rec["err"] = E.errorcode.get(rec["errno"], "")
            yield rec
