"""``--trace FILE``: every VFIO call of the programs, in the trace format of record.

The file starts with a header describing the simulated machine, then one object
per call, written when the call returns::

    {"format": "vfiosim-trace", "version": 1, "source": "simulator", "system": {...}, ...}
    {"seq": 7, "time": 0.0123, "pid": 4242, "call": "ioctl", "fd": 5, "fd_kind": "vfio-container",
     "cmd": "VFIO_IOMMU_MAP_DMA", "args": {"argsz": 32, "flags": 3, "vaddr": ..., ...},
     "mem": {"vaddr": {"vma": [start, end, "rw-p"], "offset": 4096}},
     "out": {...fields the kernel changed...}, "ret": 0, "errno": 0, "err": "", "reason": "...",
     "vmlck_kb": 1024, "vmpin_kb": 0}

``args`` are the ioctl's struct fields as the program passed them (read from
its memory before the call), ``out`` the fields the kernel changed, ``mem`` the
mapping a user address lies in (so that a replay can match buffers by mapping).
The iommufd ioctls of /dev/iommu (``fd_kind`` "iommufd", also /dev/vfio/vfio
when iommufd serves it, whose VFIO numbers are then the Type1 container's)
are decoded the same way, from their ``size``-first structs; so are the
cdev's VFIO_DEVICE_BIND_IOMMUFD and ATTACH/DETACH_IOMMUFD_PT.
Other calls: open (path, flags), close, read/pread/write/pwrite (count, offset,
the bytes), dup, mmap (offset, length, prot), mmio (offset, size, value),
munmap, fork, and ``exit`` events.  docs/trace-format.md is the schema;
``vfiosim trace show FILE`` prints a trace strace-style.
"""

from __future__ import annotations

import ctypes
import errno
import errno as E
import json
import os
import stat
import struct
import time
from typing import IO, TYPE_CHECKING, Any, Callable, TextIO

from ..kernel.config import POWER_PLATFORMS
from ..tracing import ioctls
from ..tracing.format import describe_header, make_header, open_trace, simulator_header
from . import protocol as P

if TYPE_CHECKING:
    from ..kernel.task import Task

# The ioctls whose argument is a struct (vfiosim.fuzz builds its templates from them).
_STRUCTS: dict[str, type] = {name: layout.struct for name, layout in ioctls.LAYOUTS.items()
                             if layout.kind == ioctls.STRUCT and layout.struct is not None}
_SIZES = {name: ctypes.sizeof(cls) for name, cls in _STRUCTS.items()}
_U32 = struct.Struct("<I")
#: the calls on an fd, whose records name it and its kind
_FD_OPS = frozenset({P.OP_OPEN, P.OP_CLOSE, P.OP_IOCTL, P.OP_READ, P.OP_WRITE, P.OP_DUP, P.OP_SETFD, P.OP_MMAP})
_NO_ARG = {name for name, layout in ioctls.LAYOUTS.items() if layout.kind == ioctls.NONE}
_VALUE_ARG = {name: layout.value_field for name, layout in ioctls.LAYOUTS.items() if layout.kind == ioctls.VALUE}
#: A BAR access's record, the commonest, formatted in one operation.
_MMIO_RECORD = ('{"time": %.6f, "pid": %d, "call": "mmio", "mapping": %d, "offset": %d, "size": %d, '
                '"write": %s%s%s, "ret": %d, "errno": %d, "err": "%s", "seq": %d}\n')
#: successful BAR access records whose constant text is kept (one per register a program uses)
_MMIO_PARTS = 1024
#: what follows a successful posted store's value
_POSTED_TAIL = ', "posted": true, "ret": 0, "errno": 0, "err": "", "seq": '
#: decoded arguments and ioctl record texts kept (a loop uses a few), for arguments up to _KEPT_ARG bytes
_CACHED = 512
_KEPT_ARG = 256
#: A record holds no cycles: the encoder need not look for them.
_encode = json.JSONEncoder(check_circular=False).encode
#: read/write payloads kept in a trace (config space and BAR accesses are a few bytes)
MAX_DATA = 4096


def _perms(prot: int, shared: bool = False) -> str:
    return ("r" if prot & 1 else "-") + ("w" if prot & 2 else "-") + ("x" if prot & 4 else "-") + \
        ("s" if shared else "p")


def _mem(where: tuple[tuple[str, tuple[tuple[int, int, str] | None, int]], ...]) -> dict[str, Any]:
    """A record's ``mem``: for each address argument, the mapping it lies in and where."""
    return {key: {"vma": None if vma is None else list(vma), "offset": offset} for key, (vma, offset) in where}


def open_trace_file(path: str) -> IO[str]:
    """Create ``path`` for writing, never through a symlink and never over
    anything but a regular file of ours that nothing else links to: a trace
    path in a shared directory such as /tmp must not let another user point
    the daemon at a file of their choosing (OSError with the reason)."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        fd = os.open(path, flags, 0o644)
    except FileExistsError:
        st = os.lstat(path)
        why = ("a symlink" if stat.S_ISLNK(st.st_mode) else "not a regular file" if not stat.S_ISREG(st.st_mode)
               else f"owned by uid {st.st_uid}" if st.st_uid != os.geteuid()
               else "linked from elsewhere (it has several names)" if st.st_nlink != 1 else "")
        if why:
            raise OSError(errno.EEXIST, f"refusing to overwrite {path}: it is {why}") from None
        fd = os.open(path, os.O_WRONLY | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC)
        now = os.fstat(fd)
        if (now.st_dev, now.st_ino) != (st.st_dev, st.st_ino):      # replaced in between
            os.close(fd)
            raise OSError(errno.EEXIST, f"refusing to overwrite {path}: it changed while it was opened") from None
    return os.fdopen(fd, "w", buffering=1 << 16)


class Tracer:
    """Writes one JSON line per call to a file (or an open text stream), after a header.

    The daemon calls ``begin`` before a call and ``end`` after it; ``event`` for
    things that are not calls (a process exiting)."""

    def __init__(self, target: str | IO[str], platform: str = "", machine: Any = None) -> None:
        self.platform = platform
        if isinstance(target, str):
            self.f: IO[str] = open_trace_file(target)
            self._own = True
        else:
            self.f = target
            self._own = False
        self.seq = 0
        self.t0 = time.monotonic()
        #: (ioctl, bytes) -> decoded fields, and the text of ioctl records (end())
        self._decoded: dict[tuple[str, bytes], dict[str, Any]] = {}
        self._labels: dict[tuple[int, str, str], str] = {}      # (request, fd kind, iommu) -> its name
        self._texts: dict[tuple[Any, ...], str] = {}
        self._mmio_parts: dict[tuple[int, int, int, int, bool, bool, bool], tuple[str, str]] = {}
        self._posted_heads: dict[tuple[int, int, int, int], str] = {}
        #: called with each record after it is written (``vfiosim run -v`` prints failures)
        self.observer: Callable[[dict[str, Any]], None] | None = None
        if machine is not None:
            header = simulator_header(machine, "vfiosim run --trace")
        else:
            header = make_header("simulator", "vfiosim run --trace", system={"platform": platform})
        self.f.write(json.dumps(header) + "\n")
        self.f.flush()

    def close(self) -> None:
        if self._own:
            self.f.close()

    def flush(self) -> None:
        """The daemon's main loop flushes now and then (and close() at the end):
        a write per record would cost more than some calls do."""
        self.f.flush()

    def _write(self, rec: dict[str, Any]) -> None:
        rec["seq"] = self.seq
        self.seq += 1
        self.f.write(_encode(rec) + "\n")
        if self.observer is not None:
            self.observer(rec)

    def mmio(self, pid: int, mapping: int, offset: int, size: int, value: int | None, written: bool,
             ret: int, err: int, reason: str = "", posted: bool = False) -> None:
        """One BAR load or store: the commonest record, written without building a dict.

        A successful access's record differs from the last one at the same
        register only in its time, value and seq: the rest of its text is made
        once (a DMA loop uses the same few registers over and over) and the
        record is one f-string (1.15 -> 0.9 us; `%` parsed the whole format
        every time)."""
        if err or ret or reason:
            self._mmio_failed(pid, mapping, offset, size, value, written, ret, err, reason, posted)
            return
        key = (pid, mapping, offset, size, written, posted, value is None)
        parts = self._mmio_parts.get(key)
        if parts is None:
            parts = self._mmio_record_parts(key)
        head, tail = parts
        seq = self.seq
        self.seq = seq + 1
        if value is None:
            self.f.write(f'{{"time": {time.monotonic() - self.t0:.6f}{head}{tail}{seq}}}\n')
        else:
            self.f.write(f'{{"time": {time.monotonic() - self.t0:.6f}{head}{value}{tail}{seq}}}\n')

    def posted_stores(self, pid: int, done: list[tuple[int, int, int, int, int, int, str]]) -> None:
        """The records of posted stores performed together, in order: (mapping,
        offset, size, value, ret, errno, reason) each.  They were one flush
        of the program's posted-store ring, one system call of the task: they
        share its time, and reach the file in one write."""
        stamp = f'{{"time": {time.monotonic() - self.t0:.6f}'
        heads = self._posted_heads
        seq = self.seq
        lines = []
        for mapping, offset, size, value, ret, err, reason in done:
            if ret or err or reason:
                break
            head = heads.get((pid, mapping, offset, size))
            if head is None:
                head = self._posted_head(pid, mapping, offset, size)
            lines.append(f"{stamp}{head}{value}{_POSTED_TAIL}{seq}}}\n")
            seq += 1
        else:
            self.seq = seq
            self.f.write("".join(lines))
            return
        for mapping, offset, size, value, ret, err, reason in done:      # rare: one by one, as mmio() does it
            self.mmio(pid, mapping, offset, size, value, True, ret, err, reason, posted=True)

    def _posted_head(self, pid: int, mapping: int, offset: int, size: int) -> str:
        if len(self._posted_heads) >= _MMIO_PARTS:
            self._posted_heads.clear()
        head = self._posted_heads[(pid, mapping, offset, size)] = \
            self._mmio_record_parts((pid, mapping, offset, size, True, True, False))[0]
        return head

    def _mmio_record_parts(self, key: tuple[int, int, int, int, bool, bool, bool]) -> tuple[str, str]:
        """The text of a successful access's record around its time, value and seq."""
        pid, mapping, offset, size, written, posted, no_value = key
        if len(self._mmio_parts) >= _MMIO_PARTS:         # a program sweeping a BAR
            self._mmio_parts.clear()
        head = (f', "pid": {pid}, "call": "mmio", "mapping": {mapping}, "offset": {offset}, "size": {size}, '
                f'"write": {"true" if written else "false"}' + ("" if no_value else ', "value": '))
        tail = (', "posted": true' if posted else "") + ', "ret": 0, "errno": 0, "err": "", "seq": '
        parts = self._mmio_parts[key] = (head, tail)
        return parts

    def _mmio_failed(self, pid: int, mapping: int, offset: int, size: int, value: int | None, written: bool,
                     ret: int, err: int, reason: str, posted: bool) -> None:
        if self.observer is not None and err:
            rec: dict[str, Any] = {"time": round(time.monotonic() - self.t0, 6), "pid": pid, "call": "mmio",
                                   "mapping": mapping, "offset": offset, "size": size, "write": written}
            if value is not None:
                rec["value"] = value
            if posted:
                rec["posted"] = True
            rec.update(ret=ret, errno=err, err=E.errorcode.get(err, ""), reason=reason)
            self._write(rec)
            return
        extra = ', "posted": true' if posted else ""
        if reason:
            extra += f', "reason": {json.dumps(reason)}'
        seq = self.seq
        self.seq = seq + 1
        self.f.write(_MMIO_RECORD % (time.monotonic() - self.t0, pid, mapping, offset, size,
                                     "true" if written else "false",
                                     "" if value is None else ', "value": %d' % value, extra, ret, err,
                                     E.errorcode.get(err, "") if err else "", seq))

    def event(self, pid: int, kind: str, detail: str = "") -> None:
        self._write({"time": round(time.monotonic() - self.t0, 6), "pid": pid, "call": kind, "detail": detail})

    # -- a call -------------------------------------------------------------------------------------

    def begin(self, task: "Task", op: int, flags: int, fd: int, fd2: int, a: tuple[int, ...],
              payload: bytes) -> dict[str, Any]:
        rec: dict[str, Any] = {"time": round(time.monotonic() - self.t0, 6), "pid": task.pid,
                               "call": P.OP_NAMES.get(op, str(op))}
        file = None
        if op in _FD_OPS:
            rec["fd"] = fd
            try:
                file = task.files.get(fd)
                rec["fd_kind"] = file.kind
            except Exception:
                pass
        if op == P.OP_OPEN:
            rec.pop("fd_kind", None)
            rec["path"] = payload.decode("utf-8", "replace")
            rec["flags"] = a[0]
        elif op == P.OP_IOCTL:
            self._ioctl_args(task, rec, file, a[0] & 0xFFFFFFFF, a[1])
        elif op in (P.OP_READ, P.OP_WRITE):
            rec["buf"], rec["count"] = a[0], a[1]
            if flags & P.RW_POSITIONAL:
                rec["offset"] = a[2]
            if op == P.OP_WRITE:
                self._data(task, rec, a[0], a[1])
        elif op == P.OP_MMAP:
            rec.update(offset=a[0], length=a[1], prot=a[2], shared=bool(a[3]))
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

    @staticmethod
    def _data(task: "Task", rec: dict[str, Any], buf: int, count: int) -> None:
        try:
            rec["data"] = task.mm.read(buf, min(count, MAX_DATA)).hex()
        except Exception:
            return
        if count > MAX_DATA:
            rec["data_truncated"] = True

    def _ioctl_args(self, task: "Task", rec: dict[str, Any], file: Any, cmd: int, arg: int) -> None:
        iommu = ""
        kind = rec.get("fd_kind", "")
        if kind == "iommufd":
            iommu = "type1"                                           # iommufd emulates Type1 only
        elif kind == "vfio-container":
            try:
                container = file.container
            except Exception:
                container = None
            drv = getattr(getattr(container, "iommu_driver", None), "name", "") or ""
            iommu = "type1" if "type1" in drv or (not drv and self.platform not in POWER_PLATFORMS) else "spapr"
        name = self._labels.get((cmd, kind, iommu))
        if name is None:
            if len(self._labels) >= _CACHED:
                self._labels.clear()
            name = self._labels[(cmd, kind, iommu)] = ioctls.ioctl_label(cmd, kind, iommu)
        rec["cmd"] = name
        if name not in ioctls.LAYOUTS:
            rec["request"] = cmd
        rec["_arg"] = arg
        if name in _VALUE_ARG:
            rec["args"] = {_VALUE_ARG[name]: arg}
        elif name == "VFIO_GROUP_SET_CONTAINER":
            rec["args"] = self._read_s32(task, arg)
        elif name == "VFIO_GROUP_GET_DEVICE_FD":
            rec["args"] = self._read_str(task, arg)
        elif name in _STRUCTS:
            raw = self._read_arg(task, name, arg)
            if raw is None:
                rec["args"] = {"ptr": arg, "fault": True}
            else:
                # The same bytes decode to the same fields: a loop's arguments are decoded
                # once (the dict is shared by records, so nothing changes it after this).
                keep = self.observer is None and len(raw) <= _KEPT_ARG
                args = self._decoded.get((name, raw)) if keep else None
                if args is None:
                    args = ioctls.decode(name, raw)
                    if keep:
                        if len(self._decoded) >= _CACHED:
                            self._decoded.clear()
                        self._decoded[(name, raw)] = args
                rec["args"] = args
                rec["_raw"] = raw
                fields = ioctls.ADDRESS_FIELDS.get(name)
                if fields:           # (as tuples, made into the record's dicts by end() if it needs them)
                    rec["mem"] = tuple([(key, self._where(task, args.get(key, 0))) for key in fields])
        elif arg and name not in _NO_ARG:
            rec["args"] = {"arg": arg}

    @staticmethod
    def _where(task: "Task", addr: int) -> tuple[tuple[int, int, str] | None, int]:
        """The mapping ``addr`` lies in, (start, end, perms), and the offset in
        it; (None, 0) when it lies in none."""
        try:
            vma = task.mm.find_vma(addr)
        except Exception:
            vma = None
        if vma is None or not vma.start <= addr < vma.end:
            return None, 0
        return (vma.start, vma.end, _perms(vma.prot, getattr(vma, "shared", False))), addr - vma.start

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
    def _read_arg(task: "Task", name: str, arg: int, size: int | None = None) -> bytes | None:
        """The argument's bytes: argsz of them (at least the struct, at most MAX_ARG),
        fewer if the program's memory ends first; None if not even argsz can be read."""
        least = _SIZES[name]
        if size is None:
            try:                        # the usual case, argsz no more than the struct: one read
                raw = task.mm.read(arg, least)
            except Exception:
                pass
            else:
                if _U32.unpack_from(raw)[0] <= least:
                    return raw
        if size is not None:            # as many as before the call (no argsz to read)
            n = size
        else:
            try:
                argsz = _U32.unpack(task.mm.read(arg, 4))[0]
            except Exception:
                return None
            n = min(max(argsz, least), ioctls.MAX_ARG)
        for length in (n, least, 4):
            try:
                return task.mm.read(arg, length)
            except Exception:
                continue
        return None

    def end(self, rec: dict[str, Any], task: "Task", ret: int, err: int) -> None:
        arg = rec.pop("_arg", None)
        before = rec.pop("_raw", None)
        where = rec.get("mem")
        cmd = rec.get("cmd")
        after_raw = bitmap = None
        if arg is not None and before is not None and cmd in _STRUCTS:
            after_raw = self._read_arg(task, cmd, arg, len(before))
            bitmap = self._bitmap(task, cmd, rec["args"]) if after_raw is not None else None
            # Bytes the kernel left as they were decode to what was passed: no "out".
            unchanged = after_raw == before and bitmap is None and cmd not in ioctls.DECODED_AFTER_ONLY
            if after_raw is not None and not unchanged:
                after = ioctls.decode(cmd, after_raw, after=True, bitmap=bitmap)
                changed = ioctls.changed(rec["args"], after)
                if changed:
                    rec["out"] = changed
        if rec.get("call") == "read" and ret > 0:
            self._data(task, rec, rec.get("buf", 0), ret)
        rec["ret"] = ret
        rec["errno"] = err
        rec["err"] = E.errorcode.get(err, "") if err else ""
        try:
            kb = task.mm.page_size // 1024
            rec["vmlck_kb"], rec["vmpin_kb"] = task.mm.locked_vm * kb, task.mm.pinned_vm * kb
        except Exception:
            pass
        if before is None or bitmap is not None or self.observer is not None or len(before) > _KEPT_ARG:
            if where is not None:
                rec["mem"] = _mem(where)
            self._write(rec)
            return
        # An ioctl with a struct argument: its record is what these make of it
        # (args and out decode from the bytes before and after the call; mem
        # from where), and a loop makes the same one over and over but for its
        # time and seq.  Its text is kept, not encoded again (JSON encoding was
        # the dearest part of a traced MAP_DMA).
        key = (rec["pid"], rec["fd"], rec.get("fd_kind"), cmd, rec.get("request"), before, where, after_raw,
               rec.get("reason"), ret, err, rec.get("vmlck_kb"), rec.get("vmpin_kb"))
        t = rec.pop("time")
        text = self._texts.get(key)
        if text is None:
            if len(self._texts) >= _CACHED:
                self._texts.clear()
            if where is not None:
                rec["mem"] = _mem(where)
            text = self._texts[key] = _encode(rec)[1:-1]
        seq = self.seq
        self.seq = seq + 1
        self.f.write(f'{{"time": {t!r}, {text}, "seq": {seq}}}\n')

    @staticmethod
    def _bitmap(task: "Task", cmd: str, args: dict[str, Any]) -> bytes | None:
        bm = args.get("bitmap")
        if cmd not in ioctls.BITMAP_CMDS or not isinstance(bm, dict) or not bm.get("data"):
            return None
        try:
            return task.mm.read(bm["data"], min((bm.get("size", 0) + 7) // 8 * 8, ioctls.MAX_ARG))
        except Exception:
            return None


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
    if call in ("exit", "hello") and "ret" not in rec or call == "exec":
        return head + f"+++ {rec.get('detail') or call} +++"
    if call == "note":
        text = rec.get("detail") or rec.get("case") or "note"
        return head + f"--- {text}{' (skipped)' if rec.get('skipped') and not rec.get('detail') else ''} ---"
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
        args = f"{fdtxt}, {_fmt_value('buf', rec['buf'])}, {rec.get('count')}" if "buf" in rec else \
            f"{fdtxt}, {rec.get('count')}"
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
        args = f"mapping {rec.get('mapping')}" if "mapping" in rec else \
            f"{_fmt_value('addr', rec.get('addr', 0))}, {_fmt_value('length', rec.get('length', 0))}"
    elif call == "setuid":
        args = f"{rec.get('detail', '')} => {_fmt_value('', rec.get('now') or {})}"
    elif call == "chown":
        args = f"{rec.get('path')}, {rec.get('uid')}, {rec.get('gid')}"
    elif call == "fork":
        args = f"child={rec.get('child')}"
    elif call == "setrlimit":
        args = f"RLIMIT_MEMLOCK, {{cur={rec.get('cur')}, max={rec.get('max')}}}"
    else:
        args = fdtxt if fd is not None else ""
    ret = rec.get("ret")
    if rec.get("errno"):
        res = f"-1 {rec.get('err') or rec['errno']} ({os.strerror(rec['errno'])}"
        res += f": {rec['reason']})" if rec.get("reason") else ")"
    else:
        res = _fmt_value("value", rec.get("value", ret)) if call == "mmio_read" else \
            hex(ret) if call == "mmap" and isinstance(ret, int) and ret > 0xFFFF else str(ret)
    line = f"{head}{call}({args}) = {res}"
    if rec.get("out"):
        line += f"  => {_fmt_value('', rec['out'])}"
    if call in ("read", "pread", "write", "pwrite") and rec.get("data"):
        data = rec["data"]
        line += f"  [{data[:64]}{'...' if len(data) > 64 else ''}]"
    return line


def _open_flags(flags: int) -> str:
    acc = {os.O_RDONLY: "O_RDONLY", os.O_WRONLY: "O_WRONLY", os.O_RDWR: "O_RDWR"}.get(flags & os.O_ACCMODE, "O_ACCMODE")
    names = [acc]
    for name in ("O_CLOEXEC", "O_NONBLOCK", "O_DIRECTORY", "O_CREAT", "O_EXCL"):
        if flags & getattr(os, name):
            names.append(name)
    return "|".join(names)


def show(path: str, out: TextIO) -> int:
    """Print a trace of any shape (format of record, older --trace files, reference
    traces) strace-style, streaming."""
    with open_trace(path) as t:
        print(f"# {describe_header(t.header)}", file=out)
        for rec in t:
            print(format_record(rec), file=out)
    return 0
