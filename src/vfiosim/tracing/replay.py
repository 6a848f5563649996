"""``vfiosim replay TRACE``: re-issue a recorded session's calls on a simulated machine.

Each record of the trace becomes the same call in a simulated process, and the
simulator's answer is written as a record of the same shape (``--output`` keeps them:
a trace of the simulator that ``vfiosim trace diff`` reads like any other), then
compared with the recording (:mod:`.compare`).  What cannot be the same number in two
runs is matched by what it stands for:

* **fds** are renumbered: a recorded fd maps to the simulated fd the same call
  returned; an fd the program made outside VFIO (an eventfd passed to SET_IRQS)
  becomes a simulated eventfd the first time it is seen.
* **buffers** are matched by mapping, not by address: a ``vaddr`` refers to a mapping
  of the recording program (``mem`` in the record: a mapping the header declared, or
  the VMA ``vfiosim record`` found in /proc/self/maps); the replay makes a mapping of
  the same size and protection once and uses the same offset in it.  Records without
  ``mem`` (a trace of ``vfiosim run`` before trace format 1) learn their mappings from
  the ranges the program passed.
* **argument buffers** are the replay's own: the recorded bytes (``raw.in``) or the
  decoded fields, with the addresses and fds above substituted.

The trace is read as a stream; only the current step, a few steps of context and the
divergences found (the first ``keep`` of them in full) stay in memory.
"""

from __future__ import annotations

import collections
import errno as E
import os
import resource
import struct
import sys
import time
from dataclasses import dataclass, field
from typing import IO, Any, Callable, Iterable

from ..kernel.cred import ALL_CAPS
from ..kernel.task import RLIM_INFINITY
from ..uapi import vfio as uapi
from ..uapi.ioctl import _IO
from . import ioctls
from .compare import KERNEL, LABELS, Context, Divergence, compare, family, header_notes, record_note
from .format import Trace, TraceWriter, kernel_config_items, make_header

PROT = {"r": 1, "w": 2, "x": 4}
_SCRATCH = 1 << 20                       # a dirty bitmap's buffer (the largest the traces keep)

# open(2) flags that differ between x86-64 and powerpc (asm/fcntl.h): O_DIRECTORY,
# O_NOFOLLOW, O_LARGEFILE, O_DIRECT.
_PPC_OPEN_FLAGS = {0o40000: os.O_DIRECTORY, 0o100000: os.O_NOFOLLOW, 0o200000: 0, 0o400000: os.O_DIRECT}


def _limit(x: int | None) -> int:
    """A recorded rlimit value (-1 or 2^64-1 for unlimited) as the simulator takes it."""
    return RLIM_INFINITY if x is None or x < 0 or x >= 1 << 63 else int(x)


def _prot(perms: str) -> int:
    return sum(v for k, v in PROT.items() if k in perms[:3])


@dataclass
class Step:
    """One step: the recorded records and the replay's answers."""
    seq: int
    recorded: list[dict[str, Any]] = field(default_factory=list)
    replayed: list[dict[str, Any]] = field(default_factory=list)
    divergences: list[Divergence] = field(default_factory=list)


@dataclass
class FamilyCount:
    steps: int = 0
    matched: int = 0


@dataclass
class ReplayResult:
    steps: int = 0
    matched: int = 0                     # steps without a kernel divergence
    skipped: int = 0                     # steps the recording program recorded as not run
    counts: dict[str, int] = field(default_factory=lambda: {label: 0 for label in LABELS})
    divergences: list[Divergence] = field(default_factory=list)     # the first `keep`, in full
    first_by_scenario: dict[str, Divergence] = field(default_factory=dict)
    families: dict[str, FamilyCount] = field(default_factory=dict)
    contexts: list[list[str]] = field(default_factory=list)         # the steps before each kept divergence
    notes: list[str] = field(default_factory=list)       # what limited the recording's environment

    @property
    def kernel_divergences(self) -> int:
        return self.counts[KERNEL]

    @property
    def mismatches(self) -> list[Divergence]:
        """The kernel divergences kept (compatibility with tests/tracereplay.py)."""
        return [d for d in self.divergences if d.label == KERNEL]


class ReplayError(RuntimeError):
    """A record the replay cannot perform (names the step)."""


class _Memory:
    """The recording program's mappings, as simulated mappings of the replay's process."""

    #: room left around a recorded mapping for the mappings that grow it later
    RESERVE = 64 << 20
    #: how far a replayed address keeps the recorded one's alignment: the kernel can
    #: act on it up to a huge page (iopt_alloc_iova() aligns an automatic IOVA like
    #: the user address, up to HPAGE_SIZE)
    ALIGN = 2 << 20

    def __init__(self, proc: Any, declared: list[dict[str, Any]]) -> None:
        self.p = proc
        self.named: dict[str, int] = {}
        self.vmas: dict[tuple[int, int, str], int] = {}
        self.areas: list[tuple[int, int, int]] = []        # (recorded start, end, replay start)
        self.holes: dict[int, int] = {}
        self.learned: list[tuple[int, int, int]] = []      # (recorded start, end, replay start)
        for m in declared:
            addr = proc.mmap(m["size"], _prot("rw"))
            if m.get("fill"):
                proc.write_memory(addr, bytes([m["fill"]]) * m["size"])
            if m.get("unmapped"):
                proc.munmap(addr, m["size"])
            elif _prot(m.get("prot", "rw")) != _prot("rw"):
                proc.mprotect(addr, m["size"], _prot(m.get("prot", "rw")))
            self.named[m["name"]] = addr

    def fork(self, child: Any) -> "_Memory":
        new = _Memory.__new__(_Memory)
        new.p = child
        new.named, new.vmas, new.holes = dict(self.named), dict(self.vmas), dict(self.holes)
        new.areas, new.learned = list(self.areas), list(self.learned)
        return new

    def resolve(self, ref: dict[str, Any] | None, recorded: int, size: int) -> int:
        """The replay's address for a recorded address ``recorded`` (``ref``: its ``mem`` entry)."""
        if ref is None:
            return self._learn(recorded, size)
        if "map" in ref:
            if ref["map"] not in self.named:
                raise ReplayError(f"the trace refers to mapping {ref['map']!r}, which its header does not declare")
            return int(self.named[ref["map"]] + ref.get("offset", 0))
        vma = ref.get("vma")
        if vma is None:                                   # the address was not mapped in the recording
            # Keep it as it was when it is unmapped here too: its value can matter
            # (an overflow check of vaddr + size); else an unmapped page of ours.
            if not self._mapped(recorded, size):
                return recorded
            page = recorded & ~0xFFF
            if page not in self.holes:
                length = max(size, 1 << 12) + (1 << 12)
                addr = self.p.mmap(length)
                self.p.munmap(addr, length)
                self.holes[page] = addr
            return self.holes[page] + (recorded - page)
        span = [tuple(v) for v in ref.get("span") or [vma]]
        key = (span[0][0], span[0][1], span[0][2])
        if key not in self.vmas:
            self._map_span(span)
        return int(self.vmas[key] + ref.get("offset", 0))

    def _mapped(self, addr: int, size: int) -> bool:
        mm = self.p.mm
        end = min(addr + max(size, 1), 1 << 64)
        return any(v.start < end and addr < v.end for v in mm.vmas())

    def _map_span(self, span: list[tuple[Any, ...]]) -> None:
        """Memory for recorded VMAs that lie next to each other (a range that crossed
        from one into the next), placed next to each other here too.

        Each is placed in an area reserved around it (PROT_NONE, no memory): the
        program's later mappings next to it merge with it into a larger VMA (mmap
        places anonymous mappings next to the last one), and an address the program
        got before must keep its meaning in the larger one."""
        start, end = span[0][0], span[-1][1]
        base = None
        for s0, e0, r0 in self.areas:
            if s0 <= start and end <= e0:
                base = r0 + start - s0
                break
        if base is None:
            lo = max(start - self.RESERVE, 0) & ~(self.ALIGN - 1)
            hi = end + self.RESERVE
            raw = self.p.mmap(hi - lo + self.ALIGN, 0)
            r0 = (raw + self.ALIGN - 1) & ~(self.ALIGN - 1)    # so base and start agree modulo ALIGN
            self.areas.append((lo, hi, r0))
            base = r0 + start - lo
        for s, e, perms in span:                      # the recorder lists them without gaps
            self.p.mprotect(base + s - start, e - s, _prot(perms))
            self.vmas.setdefault((s, e, perms), base + s - start)

    def _learn(self, recorded: int, size: int) -> int:
        for s, e, addr in self.learned:
            if s <= recorded < e:
                return addr + recorded - s
        length = max(size, 1)
        page = recorded & ~0xFFF
        end = (recorded + length + 0xFFF) & ~0xFFF
        addr = self.p.mmap(end - page)
        self.learned.append((page, end, addr))
        return int(addr + recorded - page)


def _node_kind(sim: Any, fd: int, path: str) -> str:
    """What an open VFIO node is here (/dev/vfio/vfio is an iommufd when
    IOMMUFD_VFIO_CONTAINER serves it)."""
    try:
        return str(sim._call("fstat", lambda task: task.files.get(fd).kind))
    except OSError:
        return "vfio-container" if path == "/dev/vfio/vfio" else "vfio-group"


def _open_in(sim: Any, fd: int) -> bool:
    try:
        sim._call("fstat", lambda task: task.files.get(fd))
    except OSError:
        return False
    return True


class _Proc:
    """A recorded process and the simulated process standing in for it."""

    def __init__(self, sim: Any, memory: _Memory) -> None:
        self.sim = sim
        self.mem = memory
        self.fds: dict[int, int] = {}
        self.mappings: dict[int, tuple[Any, int]] = {}     # recorded handle or address -> (file, offset)
        self.scratch: int | None = None


class Replayer:
    """Performs a trace's records on ``machine`` and answers each with the simulator's record."""

    def __init__(self, machine: Any, header: dict[str, Any]) -> None:
        self.m = machine
        self.header = header
        self.procs: dict[int, _Proc] = {}
        system = header.get("system") or {}
        self.ppc = str(system.get("machine", "")).startswith(("ppc", "powerpc"))
        proc = header.get("process") or {}
        self.baseline = (int(proc.get("vmlck_kb", 0) or 0), int(proc.get("vmpin_kb", 0) or 0))
        self.learn = header.get("version", 1) < 1

    # -- processes ------------------------------------------------------------------------------------

    def _spawn(self) -> _Proc:
        proc = self.header.get("process") or {}
        limit = proc.get("rlimit_memlock") or [8 << 20, 8 << 20]
        cur, mx = (_limit(x) for x in limit)
        sim = self.m.spawn(uid=int(proc.get("uid", 0)), rlimit_memlock=(cur, mx))
        if "cap_eff" in proc:                                  # as the recording process had them
            caps = int(proc["cap_eff"], 16) if isinstance(proc["cap_eff"], str) else int(proc["cap_eff"])
            with self.m._lock:
                sim.task.cred.caps = frozenset(c for c in ALL_CAPS if caps >> c & 1)
        return _Proc(sim, _Memory(sim, self.header.get("memory") or []))

    def proc(self, pid: int) -> _Proc:
        p = self.procs.get(pid)
        if p is None:
            p = self.procs[pid] = self._spawn()
        return p

    def close(self) -> None:
        for p in self.procs.values():
            self._exit(p)
        self.procs.clear()

    @staticmethod
    def _exit(p: _Proc) -> None:
        """do_exit(): the device mappings go with the address space, then the files."""
        if not p.sim.alive:
            return
        for file, _ in p.mappings.values():
            p.sim._call("munmap", lambda task, f=file: f.put(task))
        p.mappings.clear()
        p.sim.exit()

    # -- one record -------------------------------------------------------------------------------------

    def perform(self, rec: dict[str, Any]) -> dict[str, Any]:
        """Do what ``rec`` did; return the simulator's record of it."""
        call = rec.get("call")
        pid = rec.get("pid", 0)
        out: dict[str, Any] = {k: rec[k] for k in ("seq", "pid", "call", "scenario", "case", "fd", "fd_kind",
                                                   "cmd", "path", "flags", "offset", "count") if k in rec}
        if call == "exit":
            p = self.procs.pop(pid, None)
            if p is not None:
                self._exit(p)
            out["detail"] = rec.get("detail", "")
            return out
        p = self.proc(pid)
        try:
            ret, extra = self._do(p, rec)
            out["ret"], out["errno"] = ret, 0
            out.update(extra)
        except OSError as exc:
            out["ret"], out["errno"] = -1, exc.errno or E.EIO
            out["err"] = E.errorcode.get(out["errno"], "")
            out["reason"] = exc.strerror or str(exc)
            out.update(getattr(exc, "replay_extra", {}))
        if "err" not in out:
            out["err"] = ""
        if p.sim.alive:
            st = p.sim.status()
            out["vmlck_kb"], out["vmpin_kb"] = st["VmLck"], st["VmPin"]
        return out

    def _fd(self, p: _Proc, fd: int | None) -> int:
        """The replay's fd for a recorded one; an fd never seen stays a number that is
        not open here (EBADF, as it presumably was there)."""
        if fd is None or fd < 0:
            return -1 if fd is None else fd
        if fd in p.fds:
            return p.fds[fd]
        return 100000 + fd

    def _foreign_fd(self, p: _Proc, fd: int, what: str | None) -> int:
        """An fd the program made outside VFIO: an eventfd of ours, made once (``what``:
        what the recorder saw there, /proc/self/fd's name; None when it did not say)."""
        if fd < 0:
            return fd
        if fd in p.fds:
            return p.fds[fd]
        if what is None or what == "anon_inode:[eventfd]":
            p.fds[fd] = p.sim.eventfd(0, 0)
            return p.fds[fd]
        if what == "(not open)":
            return 100000 + fd
        # Some other file (a pipe, /dev/null): a file of ours that is no eventfd either.
        p.fds[fd] = p.sim.open("/dev/vfio", os.O_RDONLY)
        return p.fds[fd]

    def _do(self, p: _Proc, rec: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        call = rec.get("call")
        sim = p.sim
        if call == "note":
            return 0, {"skipped": True} if rec.get("skipped") else {}
        if call == "open":
            flags = int(rec.get("flags", os.O_RDWR))
            if self.ppc:
                flags = self._ppc_flags(flags)
            fd = sim.open(rec["path"], flags)
            if rec.get("ret", -1) >= 0:
                p.fds[rec["ret"]] = fd
            return fd, {"fd": fd, "fd_kind": _node_kind(sim, fd, rec["path"])}
        if call == "close":
            fd = self._fd(p, rec.get("fd"))
            sim.close(fd)
            p.fds.pop(int(rec.get("fd") or 0) if rec.get("fd") is not None else -1, None)
            return 0, {}
        if call == "dup":
            old = self._fd(p, rec.get("fd"))
            new = sim.dup(old)
            if rec.get("ret", -1) >= 0:
                p.fds[rec["ret"]] = new
            return new, {}
        if call == "ioctl":
            return self._ioctl(p, rec)
        if call in ("read", "write"):
            return self._rw(p, rec)
        if call == "mmap":
            return self._mmap(p, rec)
        if call == "munmap":
            entry = p.mappings.pop(int(rec.get("mapping", rec.get("addr", 0)) or 0), None)
            if entry is not None:                   # the mapping's reference to the device file
                sim._call("munmap", lambda task: entry[0].put(task))
            return 0, {}
        if call == "mmio":
            return self._mmio(p, rec)
        if call == "fork":
            child = sim.fork()
            cp = _Proc(child, p.mem.fork(child))
            cp.fds = dict(p.fds)
            cp.mappings = dict(p.mappings)
            if rec.get("child") is not None:
                self.procs[int(rec["child"])] = cp
            return 0, {}
        if call == "setrlimit":
            # The limits the recording process had after the call, whether it could set
            # them or not (a container's hard limit): the replay mirrors its environment.
            lim = rec.get("now") or [rec.get("cur"), rec.get("max")]
            cur, mx = (_limit(x) for x in lim)
            with self.m._lock:
                sim.task.rlimits[int(rec.get("resource", resource.RLIMIT_MEMLOCK))] = (cur, mx)
            if rec.get("errno"):
                raise OSError(rec["errno"], "as recorded: the recording's environment refused it")
            return 0, {"now": [cur, mx]}
        if call == "setuid":
            # The credentials the recording process had after the call (mirrored, like limits).
            now = rec.get("now") or {}
            with self.m._lock:
                cred = sim.task.cred
                cred.uid, cred.euid, cred.suid = (int(now.get(k, getattr(cred, k))) for k in ("uid", "euid", "suid"))
                if now.get("cap_eff"):
                    caps = int(now["cap_eff"], 16)
                    cred.caps = frozenset(c for c in ALL_CAPS if caps >> c & 1)
            if rec.get("errno"):
                raise OSError(rec["errno"], "as recorded")
            return 0, {"now": now}
        if call == "chown":
            # An administrator giving a user a node, as the recording did (before it
            # dropped its privileges): who may open the node afterwards.
            sim.chown(rec["path"], int(rec.get("uid", -1)), int(rec.get("gid", -1)))
            return 0, {}
        if call == "exec":
            # A new image: a new address space, close-on-exec files closed (Kernel.exec).
            sim.exec()
            p.mem = _Memory(sim, [])
            for fd in [f for f, mine in p.fds.items() if not _open_in(sim, mine)]:
                del p.fds[fd]
            p.mappings.clear()
            return 0, {}
        if call in ("setfd",):
            return 0, {}
        raise ReplayError(f"step {rec.get('seq')}: the replay cannot perform a {call!r} record")

    def _ppc_flags(self, flags: int) -> int:
        out = flags
        for ppc, host in _PPC_OPEN_FLAGS.items():
            if flags & ppc:
                out = (out & ~ppc) | host
        return out

    # -- ioctl --------------------------------------------------------------------------------------------

    def _ioctl(self, p: _Proc, rec: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        sim = p.sim
        name = rec.get("cmd") or ""
        fd = self._fd(p, rec.get("fd"))
        got_args, got_raw = rec.get("args"), rec.get("raw")
        args: dict[str, Any] = got_args if isinstance(got_args, dict) else {}
        raw: dict[str, Any] = got_raw if isinstance(got_raw, dict) else {}
        layout = ioctls.LAYOUTS.get(name)
        extra: dict[str, Any] = {}
        if layout is None:
            if "request" in rec:
                request = int(rec["request"])
            elif name.startswith("VFIO_BASE+"):
                request = _IO(uapi.VFIO_TYPE, uapi.VFIO_BASE + int(name[10:]))
            else:
                request = int(name, 16) if name.startswith("0x") else 0      # an older trace's hex name
            off = ioctls.base_offset(request)
            if off is not None:
                request = _IO(uapi.VFIO_TYPE, uapi.VFIO_BASE + off)      # the host's encoding
            return sim.ioctl(fd, request, int(raw.get("arg", args.get("arg", 0)) or 0)), extra
        request = ioctls.request_number(name)
        if layout.kind == ioctls.NONE:
            return sim.ioctl(fd, request, 0), extra
        if layout.kind == ioctls.VALUE:
            value = args.get(layout.value_field, raw.get("arg", 0))
            return sim.ioctl(fd, request, int(value)), extra
        if args.get("fault") or raw.get("fault"):
            return sim.ioctl(fd, request, self._bad_pointer(p)), {"args": dict(args)}
        if layout.kind == ioctls.FD_PTR:
            target = args.get("fd", -1)
            buf = bytearray(struct.pack("<i", self._fd(p, target)))
            ret = sim.ioctl(fd, request, buf)
            return ret, {"args": {"fd": target}}
        if layout.kind == ioctls.STRING:
            nm = args.get("name", "")
            ret = sim.ioctl(fd, request, nm.encode() + b"\0")
            if rec.get("ret", -1) >= 0:
                p.fds[rec["ret"]] = ret
            return ret, {"args": {"name": nm}}
        return self._struct_ioctl(p, rec, name, fd, request, args, raw)

    def _struct_ioctl(self, p: _Proc, rec: dict[str, Any], name: str, fd: int, request: int,
                      args: dict[str, Any], raw: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        sim = p.sim
        if raw.get("in"):
            buf = bytearray(bytes.fromhex(raw["in"]))
        else:
            buf = ioctls.encode(name, args, fill=int(rec.get("fill", 0)))
        fields = ioctls.decode(name, bytes(buf))
        mem = rec.get("mem") or {}
        # Addresses: the replay's memory, matched by mapping.
        # A trace of format 1 says where every address lies (mem); one it does not
        # annotate is a literal the program passed (0, or an address past the end).
        # Older traces never say: their mappings are learned from the ranges passed.
        resolved: dict[str, int] = {}
        for key in ioctls.ADDRESS_FIELDS.get(name, ()):
            recorded = fields.get(key, 0)
            if key in mem or (self.learn and recorded):
                addr = p.mem.resolve(mem.get(key), recorded, ioctls.address_span(name, key, fields))
                self._patch(name, buf, key, addr)
                resolved[key] = addr
        # A buffer the argument points to (IOMMU_IOAS_IOVA_RANGES' array, ...): in our memory,
        # with the bytes the recording's kernel read there.
        ubuf = ioctls.USER_BUFFERS.get(name)
        user_len = 0
        kept = (raw.get("user") or {}).get(ubuf.field) if ubuf is not None else None
        if ubuf is not None and ubuf.field in resolved and isinstance(kept, dict) and ubuf.reaches(name, fields):
            user_len = ubuf.length(fields)
            if "in" in kept:
                vma = (mem.get(ubuf.field) or {}).get("vma")
                self._write_user(p, resolved[ubuf.field], bytes.fromhex(kept["in"]), vma[2] if vma else "rw")
            elif "out" not in kept:
                user_len = 0
        # The dirty bitmap's buffer: our own, zeroed, read back as the recorder read its own
        # (a recorder that kept the bitmap's words of a call with a NULL buffer read zeros).
        bitmap_size = 0
        if name in ioctls.BITMAP_CMDS:
            bm = fields.get("bitmap") if isinstance(fields.get("bitmap"), dict) else None
            recorded_out = rec.get("out") or {}
            bitmap_size = min((int(bm.get("size", 0)) + 7) // 8 * 8, _SCRATCH) if bm is not None else 0
            if bm is not None and (bm.get("data") and bitmap_size or "bitmap_head" in recorded_out):
                if p.scratch is None:
                    p.scratch = sim.mmap(_SCRATCH)
                sim.write_memory(p.scratch, bytes(max(bitmap_size, 8)))
                if bm.get("data"):
                    self._patch(name, buf, "bitmap.data", p.scratch)
        # fds the program made outside VFIO, and VFIO fds inside the argument.
        seen = rec.get("fds") if isinstance(rec.get("fds"), dict) else None
        if name == "VFIO_DEVICE_SET_IRQS" and fields.get("flags", 0) & uapi.VFIO_IRQ_SET_DATA_EVENTFD:
            base = 20
            for i, efd in enumerate(fields.get("data", [])):
                what = seen.get(str(efd), "anon_inode:[eventfd]") if seen is not None else None
                struct.pack_into("<i", buf, base + 4 * i, self._foreign_fd(p, efd, what))
        elif name == "VFIO_DEVICE_IOEVENTFD" and fields.get("fd", -1) >= 0:
            what = seen.get(str(fields["fd"]), "anon_inode:[eventfd]") if seen is not None else None
            struct.pack_into("<i", buf, 24, self._foreign_fd(p, fields["fd"], what))
        elif name == "VFIO_DEVICE_PCI_HOT_RESET":
            for i, gfd in enumerate(fields.get("group_fds", [])):
                struct.pack_into("<i", buf, 12 + 4 * i, self._fd(p, gfd))
        elif name == "VFIO_DEVICE_BIND_IOMMUFD":
            ifd = fields.get("iommufd", -1)
            if ifd in p.fds or seen is None or str(ifd) not in seen:
                ours = self._fd(p, ifd)
            else:                                       # not an iommufd (an error path): what it was
                ours = self._foreign_fd(p, ifd, seen[str(ifd)])
            struct.pack_into("<i", buf, ioctls.field_offset(name, "iommufd"), ours)
        sent = ioctls.decode(name, bytes(buf))
        user_at = resolved.get(ubuf.field, 0) if ubuf is not None and user_len else 0
        try:
            ret = sim.ioctl(fd, request, buf)
        except OSError as exc:
            if not ioctls.wrote_user(name, exc.errno or 0):
                user_len = 0
            exc.replay_extra = self._struct_out(p, name, rec, sent, buf, bitmap_size,   # type: ignore[attr-defined]
                                                user_at, user_len)
            raise
        return ret, self._struct_out(p, name, rec, sent, buf, bitmap_size, user_at, user_len)

    @staticmethod
    def _write_user(p: _Proc, addr: int, data: bytes, perms: str) -> None:
        """What the recording's program had in a buffer, put in ours (a read-only one
        made writable for the moment: the loader wrote the program's constants)."""
        if not data:
            return
        page = addr & ~0xFFF
        length = (addr + len(data) - page + 0xFFF) & ~0xFFF
        try:
            if _prot(perms) != _prot("rw"):
                p.sim.mprotect(page, length, _prot("rw"))
            p.sim.write_memory(addr, data)
            if _prot(perms) != _prot("rw"):
                p.sim.mprotect(page, length, _prot(perms))
        except OSError:
            pass                     # not mapped here either: the call faults as it did there

    def _struct_out(self, p: _Proc, name: str, rec: dict[str, Any], sent: dict[str, Any], buf: bytearray,
                    bitmap_size: int, user_at: int = 0, user_len: int = 0) -> dict[str, Any]:
        """The argument as the recording shows it (its own addresses and fds) and what
        the kernel changed in it here."""
        got = rec.get("args")
        args: dict[str, Any] = got if isinstance(got, dict) else ioctls.decode(name, bytes(buf))
        bitmap = None
        if p.scratch is not None and name in ioctls.BITMAP_CMDS and isinstance(sent.get("bitmap"), dict) and \
                (sent["bitmap"].get("data") and bitmap_size or "bitmap_head" in (rec.get("out") or {})):
            bitmap = p.sim.read_memory(p.scratch, bitmap_size)
        user = None
        ubuf = ioctls.USER_BUFFERS.get(name)
        if user_at and user_len and ubuf is not None and ubuf.out:
            try:
                user = p.sim.read_memory(user_at, user_len)
            except OSError:
                user = None          # unmapped: the recorder could not read it either
        after = ioctls.decode(name, bytes(buf), after=True, bitmap=bitmap, user=user)
        # What the replay substituted (its addresses and fds) is not a change the kernel made.
        for key, value in sent.items():
            if key in args and after.get(key) == value:
                after[key] = args[key]
        return {"args": args, "out": ioctls.changed(args, after)}

    @staticmethod
    def _patch(name: str, buf: bytearray, key: str, value: int) -> None:
        # The dirty bitmap's pointer lies in the variable part after the struct.
        tails = {("VFIO_IOMMU_DIRTY_PAGES", "bitmap.data"): 8 + 16 + 16, ("VFIO_IOMMU_UNMAP_DMA", "bitmap.data"): 24 + 16}
        off = tails.get((name, key))
        if off is None:
            off = ioctls.field_offset(name, key)
        if len(buf) < off + 8:
            buf.extend(bytes(off + 8 - len(buf)))
        struct.pack_into("<Q", buf, off, value & 0xFFFFFFFFFFFFFFFF)

    def _bad_pointer(self, p: _Proc) -> int:
        return p.mem.resolve({"vma": None}, 0xDEAD0000, 4096)

    # -- read/write and mappings ---------------------------------------------------------------------

    def _rw(self, p: _Proc, rec: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        sim = p.sim
        fd = self._fd(p, rec.get("fd"))
        count = int(rec.get("count", 0))
        positional = "offset" in rec
        if rec["call"] == "read":
            data = sim.pread(fd, count, rec["offset"]) if positional else sim.read(fd, count)
            extra = {"data": data.hex()} if "data" in rec else {}
            return len(data), extra
        if "data" in rec:
            payload = bytes.fromhex(rec["data"])
        else:
            payload = bytes(count)                    # a trace that did not keep what was written
        n = sim.pwrite(fd, payload, rec["offset"]) if positional else sim.write(fd, payload)
        return n, {"data": rec["data"]} if "data" in rec else {}

    def _mmap(self, p: _Proc, rec: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        fd = self._fd(p, rec.get("fd"))
        prot = int(rec.get("prot", 3))
        shared = bool(rec.get("shared", True))
        m = self.m
        sim = p.sim

        def check(task: Any) -> Any:
            m.kernel.sys_mmap_check(task, fd, int(rec.get("offset", 0)), int(rec.get("length", 0)), prot, shared)
            return task.files.get(fd).get()
        file = sim._call("mmap", check)
        handle = int(rec.get("ret", 0))
        p.mappings[handle] = (file, int(rec.get("offset", 0)))
        return handle, {}

    def _mmio(self, p: _Proc, rec: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        entry = p.mappings.get(int(rec.get("mapping", 0) or 0))
        if entry is None:
            raise OSError(E.EFAULT, f"no device mapping {rec.get('mapping')}")
        file, base = entry
        value = rec.get("value") if rec.get("write") else None
        got = p.sim._call("mmio", lambda task: file.mmio(task, base + int(rec.get("offset", 0)),
                                                          int(rec.get("size", 4)), value))
        return 0, ({} if rec.get("write") else {"value": got})


# -- the machine -------------------------------------------------------------------------------------------


def machine_for(header: dict[str, Any], *, machine: str | None = None, kernel: str = "6.12",
                page_size: int | None = None, kernel_config: Any = None) -> tuple[Any, str]:
    """The simulated machine to replay a trace on, and why that one: ``machine`` (a preset
    or a machine file), else the preset of the trace's platform; the trace's page size
    and kernel configuration (its ``kernel_config``: a kernel built with iommufd, say)
    unless ``page_size`` and ``kernel_config`` are given."""
    from ..kernel.config import KernelConfigError
    from ..machine import Machine, preset_names
    system = header.get("system") or {}
    page = page_size or (system.get("page_size") if system.get("page_size") in (4096, 65536) else 4096)
    platform = system.get("platform") or ""
    if machine is None and platform not in preset_names():
        raise ValueError(f"the trace does not say which platform it was recorded on (system.platform is "
                         f"{platform!r}): choose one with --machine {'|'.join(preset_names())}|FILE")
    name = machine or platform
    why = f"{machine} (--machine)" if machine else f"{platform} (the preset of the trace's platform)"
    config = kernel_config
    recorded = header.get("kernel_config")
    if config is None and isinstance(recorded, list) and recorded:
        config = [str(item) for item in recorded]
        if any(item.endswith("=y") for item in config if not item.startswith(("VFIO_GROUP", "VFIO_CONTAINER"))):
            why += f", with the trace's kernel configuration ({', '.join(i for i in config if i.endswith('=y'))})"
    try:
        return Machine.load(name, kernel=kernel, page_size=page, kernel_config=config), why
    except KernelConfigError as exc:
        if kernel_config is not None:
            raise
        return (Machine.load(name, kernel=kernel, page_size=page),
                f"{why}; not the trace's kernel configuration, which vfiosim cannot build ({exc}): Debian's")


# -- a whole trace ---------------------------------------------------------------------------------------


def _steps(records: Iterable[dict[str, Any]]) -> Iterable[list[dict[str, Any]]]:
    """Records grouped into steps (the records of a step share its seq)."""
    group: list[dict[str, Any]] = []
    for rec in records:
        if group and (rec.get("call") == "exit" or "seq" not in rec or rec.get("seq") != group[0].get("seq")):
            yield group
            group = []
        if rec.get("call") == "exit" or "seq" not in rec:
            yield [rec]
            continue
        group.append(rec)
    if group:
        yield group


def replay(machine: Any, trace: Trace, *, keep: int = 1000, context: int = 3,
           output: str | IO[str] | None = None,
           on_step: Callable[[Step], None] | None = None,
           progress: Callable[[int, int, int], None] | None = None) -> ReplayResult:
    """Replay ``trace`` on ``machine``; compare every step with the recording."""
    head = trace.header
    r = Replayer(machine, head)
    result = ReplayResult()
    ctx = Context(baseline_a=r.baseline, baseline_b=(0, 0))
    # The replay takes the recording's limits and capabilities over, so what they refused
    # there is refused here too; the report says what they were.
    result.notes = header_notes(head)
    writer = None
    if output is not None:
        writer = TraceWriter(output, make_header("simulator", "vfiosim replay", scenario=head.get("scenario"),
                                                 replay_of=head.get("source"),
                                                 system={"kernel": f"vfiosim (Linux {machine.kernel_version} profile)",
                                                         "platform": machine.platform,
                                                         "page_size": machine.page_size},
                                                 kernel_config=kernel_config_items(machine.kernel.config),
                                                 process=head.get("process"), memory=head.get("memory")))
    # The last steps, formatted only when a divergence needs them as its context.
    recent: collections.deque[tuple[dict[str, Any], dict[str, Any]]] = collections.deque(maxlen=context)
    platform = (head.get("system") or {}).get("platform", "") or machine.platform
    iommu = "spapr" if platform in ("pseries", "powernv") else "type1"
    from ..transport.trace import format_record
    last_progress = time.monotonic()
    records = 0
    try:
        for group in _steps(trace):
            if group[0].get("call") == "exit":            # an event, not a step
                sim = r.perform(group[0])
                if writer:
                    writer.write(sim)
                continue
            step = Step(group[0].get("seq", -1), group)
            where: list[int] = []                    # the record of the step each divergence is about
            for k, rec in enumerate(group):
                note = record_note(rec)
                if note and note not in result.notes:
                    result.notes.append(note)
                sim = r.perform(rec)
                step.replayed.append(sim)
                found = compare(rec, sim, ctx)
                step.divergences.extend(found)
                where.extend([k] * len(found))
                if writer:
                    writer.write(sim)
                records += 1
            result.steps += 1
            if any(rec.get("skipped") for rec in group):
                result.skipped += 1
            kernel_bad = any(d.label == KERNEL for d in step.divergences)
            if not kernel_bad:
                result.matched += 1
            fam = family(group[0], iommu)
            fc = result.families.setdefault(fam, FamilyCount())
            fc.steps += 1
            fc.matched += 0 if kernel_bad else 1
            for d, k in zip(step.divergences, where):
                result.counts[d.label] += 1
                scen = d.scenario or head.get("scenario") or ""
                first = d.label == KERNEL and scen not in result.first_by_scenario
                kept = len(result.divergences) < keep
                if first or kept:
                    d.step, d.other = format_record(group[k]), format_record(step.replayed[k])
                if first:
                    result.first_by_scenario[scen] = d
                if kept:
                    result.divergences.append(d)
                    result.contexts.append([f"{format_record(a)}   [replay: {_result(b)}]" for a, b in recent])
            recent.extend(zip(group, step.replayed))
            if on_step:
                on_step(step)
            if progress and time.monotonic() - last_progress > 2:
                last_progress = time.monotonic()
                progress(records, trace.bytes_read, trace.size)
    finally:
        r.close()
        if writer:
            writer.close()
    if progress and records:
        progress(records, trace.size, trace.size)
    return result


def _result(rec: dict[str, Any]) -> str:
    if rec.get("errno"):
        return f"-1 {rec.get('err') or rec['errno']}"
    return str(rec.get("ret"))


def print_progress(records: int, done: int, total: int, out: IO[str] = sys.stderr) -> None:
    pct = f" ({100 * done // total}%)" if total else ""
    out.write(f"\r  {records} calls replayed{pct}  ")
    out.flush()
    if total and done >= total:
        out.write("\n")
