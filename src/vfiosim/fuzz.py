"""Fuzzing harnesses: arbitrary input must get an errno, never a crash.

Three targets, each a function of one ``bytes`` input:

``ioctl``
    A fresh machine (PowerNV 4 KiB / 64 KiB / 3.10, pseries, x86; the 6.12
    ones with Debian's kernel configuration or with iommufd: x86 with the
    device cdev and the iommufd-served /dev/vfio/vfio, or with the cdev
    only, POWER with IOMMUFD), one to
    four simulated processes, and a sequence of system calls decoded from
    the input: opens of every node (and of paths that are not nodes),
    ioctls with every request number -- VFIO's and iommufd's -- on every fd
    type (container, group, device and its cdev, /dev/iommu, eventfd,
    /dev/null) whose arguments are integers, pointers to
    structures filled from the input (with plausible field values mixed
    in), raw bytes, or pointers into unmapped and read-only memory;
    pread/pwrite of device regions, edu DMA, mmap/munmap/mprotect/mlock,
    fork, exit, setrlimit, setuid, dup, BAR mmap and MMIO, and armed fault
    injection (kernel/faults.py).  Every call must return a value or raise
    ``OSError``; afterwards every process exits and the machine must be
    back where it started (no pins, no tasks, every group free, no user's
    locked memory charged) with its
    invariants intact along the way (every TCE and VT-d extent points at a
    pinned page) and no internal error (``machine.oopses``).

``protocol``
    The ``vfiosim run`` daemon's request handling (transport/daemon.py,
    protocol.py): messages decoded from the input -- well-formed requests
    of every operation with arbitrary fields, and raw bytes -- are handed to
    ``Daemon.handle`` as the daemon's helper copies them out of a
    connection's shared-memory channel.  Every reply must be well formed; a
    malformed message may only drop its
    connection; the daemon must not raise; the task's exit must leave
    nothing behind.

``machine-file``
    Machine files: arbitrary text, and mutations of the presets (values of
    any type at any key, keys removed and added, devices duplicated),
    through ``Machine.from_toml``.  It must build a machine or raise
    ``ValueError`` (``MachineFileError``) -- nothing else; a machine it builds
    must survive a VFIO session on every group without an internal error.

Engines: ``atheris`` (coverage-guided libFuzzer, ``pip install
'vfiosim[fuzz]'``) or the built-in ``random`` engine (corpus mutation,
no coverage; always available).  ``vfiosim fuzz --help`` and
docs/reliability.md say how to run them.
"""

from __future__ import annotations

import argparse
import ctypes
import errno
import hashlib
import math
import os
import random
import resource
import struct
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Sequence, TypeVar, cast

C = TypeVar("C")

MASK64 = (1 << 64) - 1
INTERESTING = (0, 1, 2, 3, 4, 7, 8, 12, 16, 0x7F, 0x80, 0xFF, 0x100, 0xFFF, 0x1000, 0x1001, 0x2000, 0xFFFF,
               0x10000, 0x10001, 0x100000, 1 << 21, 1 << 24, 1 << 28, 1 << 30, (1 << 31) - 1, 1 << 31, 1 << 32,
               (1 << 32) - 1, (1 << 32) - 0x1000, 1 << 40, 1 << 47, (1 << 47) - 0x1000, 1 << 48, 1 << 59,
               (1 << 59) + 0x1000, (1 << 63) - 1, 1 << 63, MASK64, MASK64 - 0xFFF, MASK64 - 1)


class FuzzFailure(AssertionError):
    """An input broke a promise: an exception escaped, an invariant failed, an oops."""


class Data:
    """Reads typed values from a fuzz input; past its end every read is 0."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def left(self) -> int:
        return len(self.data) - self.pos

    def take(self, n: int) -> bytes:
        out = self.data[self.pos:self.pos + n]
        self.pos += len(out)
        return out

    def uint(self, n: int) -> int:
        return int.from_bytes(self.take(n).ljust(n, b"\0"), "little")

    def u8(self) -> int:
        return self.uint(1)

    def u16(self) -> int:
        return self.uint(2)

    def u32(self) -> int:
        return self.uint(4)

    def u64(self) -> int:
        return self.uint(8)

    def below(self, n: int) -> int:
        return self.u8() % n if n <= 256 else self.u32() % n

    def choice(self, seq: Sequence[C]) -> C:
        return seq[self.below(len(seq))]

    def flag(self) -> bool:
        return bool(self.u8() & 1)

    def value64(self, *extra: int) -> int:
        """A 64-bit value: interesting ones (and ``extra``) most of the time."""
        mode = self.u8() % 4
        if mode == 0:
            return self.u64()
        pool = INTERESTING + tuple(extra)
        v = pool[self.below(len(pool))]
        if mode == 3:
            v = (v + (self.u8() - 128) * 0x1000) & MASK64
        return v


def _check_errno(exc: OSError, what: str) -> None:
    if exc.errno is None or exc.errno not in errno.errorcode:
        raise FuzzFailure(f"{what}: an OSError without a valid errno: {exc!r}")


# =============================================================================================
# target "ioctl": the simulated kernel through the in-process API
# =============================================================================================

# (a preset, each named after its platform; its page size and kernel profile)
CONFIGS = (("powernv", 4096, "6.12"), ("powernv", 65536, "6.12"), ("powernv", 4096, "3.10"),
           ("pseries", 4096, "6.12"), ("x86", 4096, "6.12"))
# The kernel configuration, from the same first byte: half Debian's, half with
# iommufd (x86: with the cdev and the compat container, or with the cdev; POWER
# has no cdev: IOMMUFD alone).  The 3.10 profile predates iommufd.
KCONFIGS = ((), (), ("IOMMUFD", "VFIO_DEVICE_CDEV", "IOMMUFD_VFIO_CONTAINER"), ("IOMMUFD", "VFIO_DEVICE_CDEV"))
_IOMMUFD_IDS = ("ioas_id", "id", "pt_id", "dev_id", "hwpt_id", "object_id", "src_ioas_id", "dst_ioas_id", "fault_id",
                "out_ioas_id", "out_hwpt_id", "out_devid", "out_fault_id", "out_fault_fd")
MEMLOCKS = ((0, 0), (64 << 10, 64 << 10), (8 << 20, 8 << 20), (1 << 40, 1 << 40),
            (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
BUF = 1 << 20               # each process's read-write buffer
RO = 64 << 10               # and a read-only one


class _Proc:
    def __init__(self, p: Any) -> None:
        self.p = p
        self.fds: list[int] = [0, 1, 2]
        self.buf = 0
        self.ro = 0
        self.maps: list[tuple[int, int]] = []


class IoctlWorld:
    """One input's machine and processes."""

    def __init__(self, d: Data) -> None:
        from . import uapi
        from .kernel.config import POWER_PLATFORMS
        from .machine import Machine
        self.uapi = uapi
        self.d = d
        first = d.u8()
        plat, ps, kern = CONFIGS[first % len(CONFIGS)]
        kconfig: tuple[str, ...] = KCONFIGS[(first // len(CONFIGS)) % len(KCONFIGS)] if kern != "3.10" else ()
        if plat in POWER_PLATFORMS and kconfig:          # no VFIO device cdev on POWER
            kconfig = ("IOMMUFD",)
        self.m = Machine.preset(plat, page_size=ps, kernel=kern, kernel_config=list(kconfig))
        k = self.m.kernel
        self.paths = sorted(k.dev_nodes) + ["/dev/vfio/99", "/dev/vfio", "/dev/vfio/", "/", "/dev/null", "",
                                            "/dev/vfio/../vfio/vfio", "/dev/vfio/0x0"]
        self.bdfs = sorted(k.devices) + ["0000:00:00.9", "", "x" * 300]
        from .uapi import iommufd as iu
        self.iu = iu
        self.cmds = sorted(set(uapi.IOCTLS.values()) | set(iu.IOCTLS.values()))
        self.iommufd_cmds = sorted(iu.IOCTLS.values())
        self.templates = _templates(uapi)
        self.procs: list[_Proc] = []
        self.page = self.m.page_size
        self.spawn()

    # -- helpers ---------------------------------------------------------------------------------

    def call(self, what: str, fn: Callable[..., Any], *args: Any, **kw: Any) -> Any:
        try:
            return fn(*args, **kw)
        except OSError as exc:
            _check_errno(exc, what)
            return None
        finally:
            if self.m.oopses:
                raise FuzzFailure(f"{what}: internal error\n{self.m.oopses[0]}")

    def live(self) -> list[_Proc]:
        return [pr for pr in self.procs if pr.p.alive]

    def proc(self) -> _Proc | None:
        live = self.live()
        return live[self.d.below(len(live))] if live else None

    def fd(self, pr: _Proc) -> int:
        d = self.d
        if pr.fds and d.u8() % 8:
            return pr.fds[d.below(len(pr.fds))]
        return d.choice((-1, 3, 4, 5, 6, 64, 1023, 1024, (1 << 31) - 1))

    def addr(self, pr: _Proc, size: int) -> int:
        """An address for ``size`` bytes: mostly good ones, sometimes not."""
        d = self.d
        mode = d.u8() % 8
        if mode < 5:
            return pr.buf + (d.u16() * 8) % max(BUF - size, 1)
        if mode == 5:
            return pr.buf + BUF - d.below(64)            # runs off the end
        if mode == 6:
            return pr.ro + d.below(RO)
        return d.value64(pr.buf, pr.ro)

    def _spawn_fill(self, pr: _Proc) -> None:
        p = pr.p
        pr.buf = p.mmap(BUF)
        p.write_memory(pr.buf, (b"\x5a" * 4096) * (BUF // 4096))
        pr.ro = p.mmap(RO, prot=1)

    def spawn(self) -> None:
        d = self.d
        p = self.m.spawn(uid=d.choice((0, 0, 1000)), rlimit_memlock=d.choice(MEMLOCKS))
        pr = _Proc(p)
        self._spawn_fill(pr)
        self.procs.append(pr)

    # -- one step ------------------------------------------------------------------------------------

    def step(self) -> None:
        d = self.d
        pr = self.proc()
        if pr is None:
            self.spawn()
            return
        p = pr.p
        op = d.u8() % 16
        u = self.uapi
        if op in (0, 1):
            flags = d.choice((os.O_RDWR, os.O_RDWR, os.O_RDONLY, os.O_WRONLY, os.O_RDWR | os.O_CLOEXEC,
                              os.O_RDONLY | os.O_DIRECTORY, d.u32()))
            fd = self.call("open", p.open, d.choice(self.paths), flags)
            if fd is not None:
                pr.fds.append(fd)
        elif op == 2:
            fd = self.fd(pr)
            self.call("close", p.close, fd)
            if fd in pr.fds:
                pr.fds.remove(fd)
        elif op in (3, 4, 5, 6):
            self.ioctl(pr)
        elif op == 7:
            self.region_io(pr)
        elif op == 8:
            self.memory(pr)
        elif op == 9:
            kind = d.u8() % 4
            if kind == 0:
                fd = self.call("eventfd", p.eventfd, d.choice((0, 1, 0xFFFFFFFF, 1 << 32)),
                               d.choice((0, os.O_NONBLOCK, os.O_CLOEXEC, 1, d.u32())))
                if fd is not None:
                    pr.fds.append(fd)
            elif kind == 1:
                fd = self.call("dup", p.dup, self.fd(pr))
                if fd is not None:
                    pr.fds.append(fd)
            elif kind == 2:
                self.call("read", p.read, self.fd(pr), d.choice((0, 1, 8, 4096, 1 << 20)))
            else:
                self.call("write", p.write, self.fd(pr), d.take(d.choice((0, 1, 8, 16))))
        elif op == 10:
            kind = d.u8() % 5
            if kind == 0 and len(self.live()) < 4:
                child = self.call("fork", p.fork)
                if child is not None:
                    c = _Proc(child)
                    c.fds, c.buf, c.ro = list(pr.fds), pr.buf, pr.ro
                    self.procs.append(c)
            elif kind == 1:
                self.call("exit", p.exit)
            elif kind == 2 and len(self.live()) < 4:
                self.spawn()
            elif kind == 3:
                hard = p.getrlimit(resource.RLIMIT_MEMLOCK)[1]
                soft = d.choice(MEMLOCKS)[0]
                self.call("setrlimit", p.setrlimit, resource.RLIMIT_MEMLOCK,
                          (soft, d.choice((hard, soft, resource.RLIM_INFINITY))))
            else:
                self.call("setuid", p.setuid, d.choice((1000, 0, 1001)))
        elif op == 11:
            self.mmio(pr)
        elif op == 12:
            self.edu_dma(pr)
        elif op == 13:
            from .kernel.faults import KINDS, SITES
            sites = d.choice((None,) + KINDS + tuple(SITES))
            self.m.inject_fault(1 + d.u8() % 64, sites)
        elif op == 15 and "/dev/iommu" in self.m.kernel.dev_nodes and d.flag():
            self.iommufd_session(pr)
        else:
            self.ioctl(pr, plausible=True)

    # -- calls ------------------------------------------------------------------------------------------

    def ioctl(self, pr: _Proc, plausible: bool = False) -> None:
        d = self.d
        u = self.uapi
        p = pr.p
        fd = self.fd(pr)
        mode = d.u8() % 10
        if mode < 4 and self._kind(p, fd) == "iommufd":
            cmd = d.choice(self.iommufd_cmds)           # mostly its own calls on /dev/iommu
        elif mode < 8:
            cmd = d.choice(self.cmds)
        elif mode == 8:
            cmd = d.choice((0x5401, 0x5421, 0x5450, 0x5451, (u.VFIO_BASE + d.u8()) | (ord(";") << 8)))
        else:
            cmd = d.u32()
        tmpl = self.templates.get(cmd)
        amode = d.u8() % 6
        if cmd in (u.VFIO_CHECK_EXTENSION, u.VFIO_SET_IOMMU) and amode < 4:
            arg: Any = d.choice((0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, d.u32(), MASK64))
        elif cmd == u.VFIO_GROUP_SET_CONTAINER and amode < 4:
            arg = ctypes.c_int32(self.fd(pr))
        elif cmd == u.VFIO_GROUP_GET_DEVICE_FD and amode < 4:
            arg = d.choice(self.bdfs).encode() + (b"\0" if d.u8() % 8 else b"")
        elif tmpl is not None and (plausible or amode < 3):
            arg = self.struct_arg(pr, tmpl)
        elif amode == 3:
            addr = self.addr(pr, 64)
            raw = d.take(d.below(96))
            if raw:
                self.call("write_memory", p.write_memory, pr.buf + (addr - pr.buf) % max(BUF - len(raw), 1), raw)
            arg = addr
        elif amode == 4:
            arg = bytearray(d.take(d.below(80)))
        else:
            arg = d.value64(pr.buf, pr.ro)
        ret = self.call(f"ioctl({cmd:#x})", p.ioctl, fd, cmd, arg)
        if isinstance(ret, int) and ret > 2 and cmd == u.VFIO_GROUP_GET_DEVICE_FD:
            pr.fds.append(ret)

    @staticmethod
    def _kind(p: Any, fd: int) -> str:
        try:
            return str(p.task.files.get(fd).kind)
        except Exception:       # noqa: BLE001 -- a bad fd
            return ""

    def struct_arg(self, pr: _Proc, cls: type) -> Any:
        d = self.d
        s = cls()
        for name, ctype, *_ in getattr(cls, "_fields_", ()):
            if not hasattr(s, name):
                continue
            cur = getattr(s, name)
            if not isinstance(cur, int):
                continue
            bits = ctypes.sizeof(ctype) * 8
            v = self.field_value(pr, name, cls)
            setattr(s, name, v & ((1 << bits) - 1))
        extra = d.take(d.below(48)) if d.u8() % 4 == 0 else b""
        buf = bytearray(bytes(s) + extra)
        if d.u8() % 3 == 0:
            # At an address in the process's memory, so the kernel's view is a pointer.
            where = pr.buf + (d.u16() * 8) % (BUF - len(buf))
            self.call("write_memory", pr.p.write_memory, where, bytes(buf))
            return where
        return buf

    def field_value(self, pr: _Proc, name: str, cls: type) -> int:
        d = self.d
        page = self.page
        if d.u8() % 8 == 0:
            return d.value64()
        if cls.__name__.startswith("iommu_"):
            # iommufd: a size-first struct, object ids, user pointers
            if name == "size":
                return d.choice((ctypes.sizeof(cls), ctypes.sizeof(cls), ctypes.sizeof(cls) + 8, 8, 4, 0, 16, 24))
            if name in _IOMMUFD_IDS:
                return d.choice((0, 1, 1, 2, 2, 3, 4, 5, 6, 0xFFFFFFFF))
            if name == "dev_fd" or name == "iommufd":
                return self.fd(pr)
            if name in ("user_va", "allowed_iovas", "data_uptr", "uptr"):
                return pr.buf + d.below(BUF // page) * page + d.choice((0, 0, 0, 8, page // 2))
            if name in ("length", "data_len", "entry_len", "page_size"):
                return d.choice((page, 16 * page, 1 << 20, 1 << 21, 0, 8, 1, MASK64, BUF))
            if name in ("num_iovas", "entry_num", "num_ranges"):
                return d.choice((0, 1, 2, 3, 16, 0xFFFFFFFF))
            if name in ("dst_iova", "src_iova"):
                name = "iova"
            if name in ("option_id", "op", "data_type", "out_data_type", "enable"):
                return d.choice((0, 1, 2, 3, 0xFFFF))
            if name == "flags":
                return d.choice((0, 0, 0, 0, 1, 2, 4, 6, 7, 8, 0xFFFFFFFF))
        if name == "iommufd":
            return self.fd(pr)
        if name == "pt_id":
            return d.choice((0, 1, 2, 3, 4))
        if name == "argsz":
            return d.choice((ctypes.sizeof(cls), ctypes.sizeof(cls), ctypes.sizeof(cls) + 256, 8, 0, 16, 24, 32))
        if name == "flags":
            return d.choice((0, 1, 2, 3, 4, 7, 8, 0x10, 0x20, 0xFFFFFFFF))
        if name in ("vaddr", "data"):
            return pr.buf + d.below(BUF // page) * page
        if name in ("iova", "start_addr", "dma32_window_start"):
            return d.choice((0, 0x100000, 0x10000000, 0x40000000, 1 << 59, (1 << 59) + (1 << 20), 0x1000,
                             0xFEE00000, d.u32() * page)) + d.choice((0, 0, 0, 0x800))
        if name in ("size", "window_size"):
            return d.choice((page, 16 * page, 64 * page, 1 << 20, 1 << 24, 1 << 30, 1 << 32, 0, page + 1,
                             MASK64 - page + 1, BUF))
        if name == "page_shift":
            return d.choice((12, 16, 21, 24, 30, 0, 11, 63, 64))
        if name == "levels":
            return d.choice((0, 1, 2, 3, 4, 5, 6))
        if name in ("index", "start", "count", "op", "type", "func"):
            return d.choice((0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 0xFFFFFFFF))
        return d.value64()

    def iommufd_session(self, pr: _Proc) -> None:
        """A plausible iommufd set-up, each step's arguments from the input:
        /dev/iommu, an IOAS, a device cdev bound and attached (to the IOAS or
        an HWPT allocated with input flags), mappings, and one of the
        calls that need all that (dirty tracking, copy, a partial unmap,
        options, detach, destroy)."""
        d = self.d
        p = pr.p
        iu, u = self.iu, self.uapi
        page = self.page

        def io(cmd: int, s: Any) -> Any:
            return self.call(f"ioctl({iu.ioctl_name(cmd) or u.ioctl_name(cmd)})", p.ioctl, fd, cmd, s)
        fd = next((f for f in pr.fds if self._kind(p, f) == "iommufd"), None) if d.flag() else None
        if fd is None:
            fd = self.call("open", p.open, d.choice(("/dev/iommu", "/dev/vfio/vfio")), os.O_RDWR)
            if fd is None:
                return
            pr.fds.append(fd)
        alloc = iu.iommu_ioas_alloc(size=ctypes.sizeof(iu.iommu_ioas_alloc))
        if io(iu.IOMMU_IOAS_ALLOC, alloc) is None:
            return
        ioas = int(alloc.out_ioas_id)
        if d.u8() % 4 == 0:
            io(iu.IOMMU_OPTION, iu.iommu_option(size=24, option_id=d.choice((0, 1)), op=0, object_id=ioas,
                                                val64=d.choice((0, 1))))
        cdevs = [n for n in sorted(self.m.kernel.dev_nodes) if n.startswith("/dev/vfio/devices/")]
        pt = ioas
        dfd = None
        if cdevs and d.u8() % 4:
            dfd = self.call("open", p.open, d.choice(cdevs), os.O_RDWR)
            if dfd is not None:
                pr.fds.append(dfd)
                bind = u.vfio_device_bind_iommufd(argsz=16, iommufd=fd)
                if self.call("BIND", p.ioctl, dfd, u.VFIO_DEVICE_BIND_IOMMUFD, bind) is not None:
                    if d.flag():
                        h = iu.iommu_hwpt_alloc(size=ctypes.sizeof(iu.iommu_hwpt_alloc), dev_id=bind.out_devid,
                                                pt_id=ioas, flags=d.choice((0, 0, 1, 2, 3)))
                        if io(iu.IOMMU_HWPT_ALLOC, h) is not None:
                            pt = int(h.out_hwpt_id)
                    at = u.vfio_device_attach_iommufd_pt(argsz=12, pt_id=pt)
                    self.call("ATTACH", p.ioctl, dfd, u.VFIO_DEVICE_ATTACH_IOMMUFD_PT, at)
        iovas = []
        for _ in range(1 + d.below(3)):
            length = d.choice((page, 4 * page, 64 * page, 1 << 21, BUF))
            va = pr.buf + d.below(BUF // page) * page if d.u8() % 4 else self.addr(pr, length)
            mp = iu.iommu_ioas_map(size=ctypes.sizeof(iu.iommu_ioas_map), ioas_id=ioas, user_va=va, length=length,
                                   flags=d.choice((7, 7, 6, 3, 5, 0)),
                                   iova=d.choice((0x100000, 0x200000, 0x40000000, 0xfee00000, d.u32() * page)))
            if io(iu.IOMMU_IOAS_MAP, mp) is not None:
                iovas.append((int(mp.iova), length))
        what = d.u8() % 8
        if what == 0 and iovas:
            iova, length = d.choice(iovas)
            io(iu.IOMMU_IOAS_UNMAP, iu.iommu_ioas_unmap(size=24, ioas_id=ioas, iova=iova + d.choice((0, page)),
                                                        length=d.choice((length, page, length - page, 0))))
        elif what == 1:
            io(iu.IOMMU_HWPT_SET_DIRTY_TRACKING, iu.iommu_hwpt_set_dirty_tracking(size=16, hwpt_id=pt,
                                                                                 flags=d.choice((1, 0))))
            if iovas:
                iova, length = d.choice(iovas)
                bm = pr.buf + BUF - 4096
                io(iu.IOMMU_HWPT_GET_DIRTY_BITMAP, iu.iommu_hwpt_get_dirty_bitmap(
                    size=48, hwpt_id=pt, iova=iova, length=length, page_size=d.choice((page, 2 * page, 1 << 21)),
                    data=bm, flags=d.choice((0, 1))))
        elif what == 2 and iovas:
            iova, length = d.choice(iovas)
            dst = iu.iommu_ioas_alloc(size=12)
            if io(iu.IOMMU_IOAS_ALLOC, dst) is not None:
                io(iu.IOMMU_IOAS_COPY, iu.iommu_ioas_copy(size=40, flags=d.choice((7, 6, 3)), dst_ioas_id=dst.out_ioas_id,
                                                          src_ioas_id=ioas, length=length, dst_iova=0x80000000,
                                                          src_iova=iova))
        elif what == 3 and dfd is not None:
            self.call("DETACH", p.ioctl, dfd, u.VFIO_DEVICE_DETACH_IOMMUFD_PT, u.vfio_device_detach_iommufd_pt(argsz=8))
        elif what == 4:
            io(iu.IOMMU_DESTROY, iu.iommu_destroy(size=8, id=d.choice((ioas, pt, pt + 1, 1))))
        elif what == 5 and dfd is not None:
            self.call("pwrite", p.pwrite, dfd, (0x6).to_bytes(2, "little"), (7 << 40) + 4)
            src = iovas[0][0] if iovas else 0x100000
            for reg, val in ((0x80, src), (0x88, 0x40000), (0x90, 4096), (0x98, 1)):
                self.call("pwrite", p.pwrite, dfd, val.to_bytes(8, "little"), reg)

    def region_io(self, pr: _Proc) -> None:
        d = self.d
        p = pr.p
        fd = self.fd(pr)
        index = d.choice((0, 0, 0, 7, 7, 1, 2, 5, 8, 9, 10, 255))
        off = (index << 40) | d.choice((0, 4, 8, 0x20, 0x24, 0x80, 0x88, 0x90, 0x98, 0xFC, 0x3C, 0x100,
                                        0xFFF, 0x1000, d.u16()))
        n = d.choice((1, 2, 4, 8, 3, 16, 4096, 0))
        if d.flag():
            self.call("pread", p.pread, fd, n, off)
        else:
            data = d.take(n).ljust(n, b"\0")
            self.call("pwrite", p.pwrite, fd, data, off)

    def edu_dma(self, pr: _Proc) -> None:
        """Program an edu DMA: the device reaches memory through the IOMMU."""
        d = self.d
        p = pr.p
        fd = self.fd(pr)
        bar = 0
        cfg = 7 << 40
        self.call("pwrite", p.pwrite, fd, (0x6).to_bytes(2, "little"), cfg + 4)      # memory + bus master
        iova = d.choice((0, 0x1000, 0x100000, 0x10000000, 0x40000000, 1 << 59, d.u32() * 0x1000))
        for reg, val in ((0x80, 0x40000 if d.flag() else iova), (0x88, iova if d.flag() else 0x40000),
                         (0x90, d.choice((8, 4096, 1, 0, 4097, 1 << 20))),
                         (0x98, d.choice((1, 3, 5, 7, 0)))):
            self.call("pwrite", p.pwrite, fd, val.to_bytes(8, "little"), bar + reg)

    def mmio(self, pr: _Proc) -> None:
        d = self.d
        k = self.m.kernel
        p = pr.p
        fd = self.fd(pr)
        off = d.choice((0, 0, 7 << 40, 1 << 40)) | d.choice((0, 4, 0x80, 0x98, 0x1000, d.u16()))
        self.call("mmap", p._call, "mmap_check", k.sys_mmap_check, fd, off & ~0xFFF,
                  d.choice((4096, 1 << 20, 0, 8192)), d.choice((1, 3, 0)), d.flag() or d.flag())
        value = d.value64() if d.flag() else None
        self.call("mmio", p._call, "mmio", k.sys_mmio, fd, off, d.choice((1, 2, 4, 8, 3, 16)), value)

    def memory(self, pr: _Proc) -> None:
        d = self.d
        p = pr.p
        kind = d.u8() % 7
        page = self.page
        if kind == 0:
            size = d.choice((page, 16 * page, 1 << 21, 1 << 24))
            hp = d.choice((None, None, 1 << 21, 1 << 24))
            if hp is not None and hp <= page:
                hp = None
            addr = self.call("mmap", p.mmap, size, d.choice((3, 1, 0)), page_size=hp) if hp is None or \
                size % hp == 0 else None
            if addr is not None:
                pr.maps.append((addr, size))
                if d.flag():
                    self.call("write_memory", p.write_memory, addr, b"\x11" * min(size, 1 << 16))
            return
        if pr.maps and d.flag():
            base, size = pr.maps[d.below(len(pr.maps))]
        else:
            base, size = pr.buf, BUF
        start = base + d.below(max(size // page, 1)) * page
        length = d.choice((page, 4 * page, size, 1, 0, page + 1))
        if kind == 1:
            self.call("munmap", p.munmap, start, max(length, 1))
        elif kind == 2:
            self.call("mprotect", p.mprotect, start, max(length, 1), d.choice((0, 1, 3, 7)))
        elif kind == 3:
            self.call("mlock", p.mlock, start, length)
        elif kind == 4:
            self.call("munlock", p.munlock, start, length)
        elif kind == 5:
            self.call("write_memory", p.write_memory, start, d.take(d.below(64)))
        else:
            self.call("read_memory", p.read_memory, start, d.choice((1, 64, 4096)))

    # -- the end ---------------------------------------------------------------------------------------

    def finish(self) -> None:
        m = self.m
        m.faults.disarm()
        check_invariants(m)
        order = list(self.procs)
        random.Random(self.d.u32()).shuffle(order)
        for pr in order:
            pr.p.exit()
            check_invariants(m)
        check_clean(m)


def _templates(uapi: Any) -> dict[int, type]:
    from .transport.trace import _STRUCTS
    from .uapi import iommufd as iu
    out: dict[int, type] = {}
    for name, cls in _STRUCTS.items():
        out.setdefault(uapi.IOCTLS[name] if name in uapi.IOCTLS else iu.IOCTLS[name], cls)
    out[uapi.VFIO_DEVICE_GET_IRQ_INFO] = uapi.vfio_irq_info
    return out


def check_invariants(m: Any) -> None:
    """What holds at every moment: every IOMMU entry points at a pinned page
    (or at device memory, which is never pinned), a group is in at most one
    container, RAM in use is what the present pages add up to, and no
    internal error happened."""
    k = m.kernel
    if m.oopses:
        raise FuzzFailure("internal error:\n" + m.oopses[0])
    phys = k.phys

    def pinned(hpa: int) -> bool:
        found = phys.lookup(hpa)
        if found is None:
            return False
        obj, off = found
        return not obj.pinnable or bool(obj.pincount[off >> obj.page_shift] > 0)

    # (the first 4096 pages of each table or domain: tables can be huge)
    for mp in k.platform.mappings(limit=4096):
        if not pinned(mp.hpa):
            raise FuzzFailure(f"{mp.where}: {mp.iova:#x} -> {mp.hpa:#x} points at a page nobody pinned")
    present = sum(int(o.populated.sum()) for o in phys.objects() if getattr(o, "owner", None) is phys)
    if present != phys.used_pages:
        raise FuzzFailure(f"{phys.used_pages} pages of RAM are counted in use, but {present} pages are present")
    for g in k.vfio.groups.values():
        c = g.container
        if c is not None and g not in c.group_list:
            raise FuzzFailure(f"group {g.id} names a container that does not list it")
    seen: dict[int, Any] = {}
    for g in k.vfio.groups.values():
        if g.container is not None:
            for other in g.container.group_list:
                if other.container is not g.container:
                    raise FuzzFailure(f"container lists group {other.id}, which is elsewhere")
            if g.id in seen:
                raise FuzzFailure(f"group {g.id} twice")
            seen[g.id] = g.container


def check_clean(m: Any) -> None:
    """After every process exited: nothing of theirs remains."""
    k = m.kernel
    if m.oopses:
        raise FuzzFailure("internal error:\n" + m.oopses[0])
    if k.tasks:
        raise FuzzFailure(f"tasks remain after every exit: {sorted(k.tasks)}")
    if k.phys.pinned_pages():
        raise FuzzFailure(f"{k.phys.pinned_pages()} page pins remain after every process exited")
    for g in k.vfio.groups.values():
        if g.opened_file is not None or g.container is not None or g.container_users:
            raise FuzzFailure(f"group {g.id} is still open or in a container after every exit")
        if g.iommu_group.dma_owner_claimed():
            raise FuzzFailure(f"IOMMU group {g.id} still has a DMA owner")
        if g.iommufd is not None or g.cdev_device_open_cnt:
            raise FuzzFailure(f"group {g.id} still has an iommufd or an open cdev device after every exit")
    for user in k.users.all():
        if user.locked_vm:
            raise FuzzFailure(f"user {user.uid} still has {user.locked_vm} pages of locked memory charged")
    paging = k.platform.paging_domains()
    if paging:
        raise FuzzFailure(f"IOMMU paging domains remain: {paging}")


def target_ioctl(data: bytes) -> None:
    d = Data(data)
    world = IoctlWorld(d)
    for _ in range(48):
        if not d.left():
            break
        world.step()
    world.finish()


# =============================================================================================
# target "protocol": the daemon's message handling
# =============================================================================================

_daemon: Any = None


def _get_daemon() -> Any:
    global _daemon
    if _daemon is None:
        import atexit
        import shutil
        from .machine import Machine
        from .transport.daemon import Daemon
        from .transport.run import start_reaper
        from .transport.sysfs import FakeSysfs
        tmp = tempfile.mkdtemp(prefix="vfiosim-fuzz-")
        # Everything in one directory, removed when this process ends: libFuzzer
        # leaves with exit() from C, where atexit handlers may not run.
        reaper = start_reaper([tmp])
        machine = Machine.default()
        _daemon = Daemon(machine, os.path.join(tmp, "fuzz.sock"), log=lambda text: None,
                         sysfs=FakeSysfs(machine, root=os.path.join(tmp, "root")))

        def close() -> None:
            try:
                _daemon.close()
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
                os.close(reaper)
        atexit.register(close)
    return _daemon


FAKE_PID = (1 << 22) + 4242          # above pid_max: no real process has it


def target_protocol(data: bytes) -> None:
    from . import uapi
    from .kernel.mm import MM
    from .machine import Machine
    from .transport import protocol as P
    from .transport.daemon import Session, TaskState
    from .transport.peer import Peer
    d = Data(data)
    daemon = _get_daemon()
    plat, ps, kern = d.choice((("powernv", 4096, "6.12"), ("pseries", 4096, "6.12"), ("x86", 4096, "6.12")))
    m = Machine.preset(plat, page_size=ps, kernel=kern)
    daemon.machine, daemon.kernel, daemon.gate = m, m.kernel, m.kernel.gate
    k = m.kernel
    with m._lock:                 # as the daemon's own task set-up and exit do
        task = k.spawn(d.choice((0, 1000)), 0, d.choice(MEMLOCKS), "fuzz")
        mm = cast(MM, task.mm)            # a task spawned here has simulated memory
        buf = mm.mmap(BUF, 3)
        mm.write(buf, b"\x5a" * BUF)
        ro = mm.mmap(RO, 1)
    # A task with no real process behind it: no pidfd, no /proc directory.
    st = TaskState(FAKE_PID, task, -1, -1)
    task.files.foreign = lambda n, st=st: daemon._foreign(st, n)
    sess = Session(None, Peer(FAKE_PID, 0, 0, -1))  # type: ignore[arg-type]
    if d.u8() % 8:
        sess.state = st
        st.session = sess
    paths = sorted(k.dev_nodes) + ["/dev/vfio/99", "/dev/vfio", "/dev/null", "/sys/bus/pci", ""]
    cmds = sorted(set(uapi.IOCTLS.values()))
    ops = sorted(P.OP_NAMES)
    try:
        for _ in range(32):
            if not d.left():
                break
            if d.u8() % 8 == 0:
                msg = d.take(d.choice((0, 1, 16, 63, 64, 65, 80, 200)))
            else:
                op = d.choice(ops) if d.u8() % 16 else d.u32()
                flags = d.choice((0, 0, P.F_REFRESH_CREDS, P.RW_POSITIONAL, P.MMIO_WRITE | P.F_REFRESH_CREDS,
                                  P.HELLO_FORK, d.u32()))
                fd = d.choice((3, 4, 5, 6, 7, 3, 4, -1, 0, 1023, 65535, 1 << 20, d.u32() - (1 << 31)))
                fd2 = d.choice((-1, 5, 6, 7, 8, 3, 100, d.u32() - (1 << 31)))
                a = []
                for i in range(5):
                    if op == P.OP_IOCTL and i == 0:
                        a.append(d.choice(cmds) if d.u8() % 8 else d.u32())
                    elif op == P.OP_HELLO and i == 0 and d.u8() % 4:
                        a.append(P.MAGIC_VERSION)
                    elif d.flag():
                        a.append(buf + (d.u16() * 8) % BUF)
                    else:
                        a.append(d.value64(buf, ro, os.O_RDWR, os.O_RDWR | os.O_CLOEXEC, 1, 2, 4, 8))
                payload = b""
                if op == P.OP_OPEN or d.u8() % 16 == 0:
                    payload = d.choice(paths).encode() if d.u8() % 4 else d.take(d.below(64))
                if d.u8() % 32 == 0:
                    # a valid struct in the task's memory for the ioctl to read
                    task.mm.write(buf, d.take(64).ljust(64, b"\0"))
                msg = P.pack_request(op & 0xFFFFFFFF, flags & 0xFFFFFFFF, _s32(fd), _s32(fd2), tuple(a), payload)
                if d.u8() % 32 == 0:
                    msg = msg[:-1] if msg else msg
            # What the daemon's helper copies out of the channel: a fixed-size request buffer.
            raw = msg.ljust(P.REQ.size + P.MAX_PAYLOAD, b"\0")[:P.REQ.size + P.MAX_PAYLOAD]
            try:
                reply = daemon.handle(sess, raw)
            except P.ProtocolError:
                break                                        # dropped: a malformed message
            if m.oopses:
                raise FuzzFailure("internal error in the daemon:\n" + m.oopses[0])
            if len(reply) < P.REP.size:
                raise FuzzFailure(f"short reply {reply!r}")
            ret, err, length = P.REP.unpack_from(reply)
            if len(reply) != P.REP.size + length:
                raise FuzzFailure(f"reply length {length} but {len(reply)} bytes")
            if err and (ret != -1 or err not in errno.errorcode):
                raise FuzzFailure(f"reply ret={ret} errno={err}")
            check_invariants(m)
    finally:
        with m._lock:
            m.faults.disarm()
            for mapping in st.mappings.values():
                k.munmap_file(task, mapping.file)
            st.mappings.clear()
            k.exit(task)
            for _eid, efd in st.eventfds.values():
                efd.release(task)
    check_clean(m)


def _s32(v: int) -> int:
    v &= 0xFFFFFFFF
    return v - (1 << 32) if v >= 1 << 31 else v


# =============================================================================================
# target "machine-file"
# =============================================================================================

_KEY_POOL = ("name", "platform", "description", "ram", "phb", "device", "iommu", "type1", "index", "model",
             "m32_pci_base", "tce_page_sizes", "eeh", "max_order", "dma32_start", "dma32_size", "ddw_page_sizes",
             "ddw_windows", "dma64_address", "ddw_largest_block", "bdf", "pe", "iommu_group", "behind_bridge",
             "driver", "dma_mask", "group_uid", "group_gid", "group_mode", "address_width", "page_sizes",
             "reserved_regions", "start", "size", "type", "snoop_control", "interrupt_remapping", "caching_mode",
             "dma_entry_limit", "allow_unsafe_interrupts", "kernel", "config", "iommufd", "dirty_tracking", "bogus")
_STR_POOL = ("powernv", "pseries", "x86", "edu", "pcie-root-port", "q35-host-bridge", "ich9-lpc", "ich9-ahci",
             "ich9-smbus", "vfio-pci", "", "0000:00:00.0", "0000:01:00.0", "0001:00:00.0", "ffff:ff:1f.7",
             "0000:00:00.8", "PHB4", "PHB3", "intel-iommu", "msi", "sw-msi", "direct", "reserved",
             "direct-relaxable", "4K", "64KiB", "2M", "1G", "16 MiB", "-1", "x" * 70, "\u00e9", "\0",
             "IOMMUFD", "VFIO_DEVICE_CDEV", "IOMMUFD_VFIO_CONTAINER", "VFIO_CONTAINER=n", "VFIO_GROUP=n",
             "CONFIG_IOMMUFD=y")


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        return "nan" if math.isnan(v) else ("inf" if v == math.inf else "-inf" if v == -math.inf else repr(v))
    if isinstance(v, str):
        return '"' + "".join(c if c.isprintable() and c not in '"\\' else f"\\u{ord(c):04x}" for c in v) + '"'
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{_toml_key(k)} = {_toml_value(x)}" for k, x in v.items()) + "}"
    raise TypeError(type(v))


def _toml_key(k: str) -> str:
    return k if k and all(c.isalnum() or c in "_-" for c in k) else _toml_value(k)


def to_toml(data: dict[str, Any]) -> str:
    """A small TOML writer: scalars and inline values, tables, arrays of tables."""
    lines: list[str] = []

    def table(d: dict[str, Any], prefix: str) -> None:
        subs: list[tuple[str, Any, Any]] = []
        for k, v in d.items():
            if isinstance(v, dict):
                subs.append(("table", k, v))
            elif isinstance(v, list) and v and all(isinstance(x, dict) for x in v):
                subs.append(("array", k, v))
            else:
                lines.append(f"{_toml_key(k)} = {_toml_value(v)}")
        for kind, k, v in subs:
            name = f"{prefix}{_toml_key(k)}"
            if kind == "table":
                lines.append(f"\n[{name}]")
                table(v, name + ".")
            else:
                for item in v:
                    lines.append(f"\n[[{name}]]")
                    table(item, name + ".")
    table(data, "")
    return "\n".join(lines) + "\n"


def _fuzz_value(d: Data) -> Any:
    kind = d.u8() % 9
    if kind < 3:
        v = d.value64()
        return -v if d.u8() % 8 == 0 else v
    if kind == 3:
        return d.flag()
    if kind == 4:
        return d.choice(_STR_POOL)
    if kind == 5:
        return d.choice((0.5, -1.0, 4096.0, math.inf, math.nan, 1e300))
    if kind == 6:
        return [d.value64() for _ in range(d.below(3))]
    if kind == 7:
        return {d.choice(_KEY_POOL): d.value64()}
    return d.take(d.below(12)).decode("latin-1")


def _mutate(d: Data, node: Any, depth: int = 0) -> Any:
    """One mutation somewhere inside a parsed machine file."""
    if isinstance(node, dict) and node:
        keys = list(node)
        what = d.u8() % 6
        if what == 0:
            node[d.choice(_KEY_POOL)] = _fuzz_value(d)
        elif what == 1:
            node.pop(d.choice(keys))
        elif what in (2, 3) and depth < 4:
            k = d.choice(keys)
            node[k] = _mutate(d, node[k], depth + 1)
        else:
            node[d.choice(keys)] = _fuzz_value(d)
        return node
    if isinstance(node, list) and node:
        what = d.u8() % 4
        i = d.below(len(node))
        if what == 0:
            node.append(_copy(node[i]))
        elif what == 1 and len(node) > 1:
            node.pop(i)
        else:
            node[i] = _mutate(d, node[i], depth + 1)
        return node
    return _fuzz_value(d)


def _copy(x: Any) -> Any:
    if isinstance(x, dict):
        return {k: _copy(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_copy(v) for v in x]
    return x


_preset_data: dict[str, dict[str, Any]] = {}


def target_machine_file(data: bytes) -> None:
    import tomllib
    from importlib import resources
    from .machine import PRESETS, Machine
    d = Data(data)
    mode = d.u8() % 4
    if mode == 0:
        text = d.take(d.left()).decode("utf-8", "replace")
    else:
        name = d.choice(sorted(PRESETS))
        if name not in _preset_data:
            _preset_data[name] = tomllib.loads(resources.files("vfiosim.presets").joinpath(PRESETS[name]).read_text())
        tree = _copy(_preset_data[name])
        for _ in range(1 + d.below(6)):
            tree = _mutate(d, tree)
        if not isinstance(tree, dict):
            tree = {"value": tree}
        text = to_toml(tree)
        if mode == 3:                       # and some bytes of damage
            pos = d.u16() % (len(text) + 1)
            text = text[:pos] + d.take(d.below(8)).decode("latin-1") + text[pos:]
    page_size = d.choice((4096, 4096, 65536))
    kernel = d.choice(("6.12", "6.12", "3.10"))
    try:
        m = Machine.from_toml(text, source="<fuzz>", page_size=page_size, kernel=kernel)
    except ValueError:
        return                              # MachineFileError and the documented combinations
    smoke(m)


def smoke(m: Any) -> None:
    """A VFIO session on every group of a machine built from a fuzzed file."""
    from . import uapi
    from .kernel.iommu.type1 import Type1IommuDriver
    m.topology()
    type1 = any(isinstance(drv, Type1IommuDriver) for drv in m.kernel.vfio.iommu_drivers)
    p = m.spawn(rlimit_memlock=(1 << 40, 1 << 40))
    buf = p.mmap(1 << 20)
    p.write_memory(buf, b"\x11" * (1 << 20))

    def call(fn: Callable[..., Any], *args: Any) -> Any:
        try:
            return fn(*args)
        except OSError as exc:
            _check_errno(exc, getattr(fn, "__name__", "call"))
            return None
    for path in sorted(m.kernel.dev_nodes):
        if not path.startswith("/dev/vfio/") or not path.rsplit("/", 1)[1].isdigit():
            continue                # groups only: the cdevs are below
        c = call(p.open, "/dev/vfio/vfio")
        g = call(p.open, path)
        if c is None or g is None:
            continue
        if call(p.ioctl, g, uapi.VFIO_GROUP_SET_CONTAINER, ctypes.c_int32(c)) is None:
            continue
        if type1:
            call(p.ioctl, c, uapi.VFIO_SET_IOMMU, uapi.VFIO_TYPE1v2_IOMMU)
            iova = 0x100000
        else:
            call(p.ioctl, c, uapi.VFIO_SET_IOMMU, uapi.VFIO_SPAPR_TCE_IOMMU)
            call(p.ioctl, c, uapi.VFIO_IOMMU_ENABLE)
            info = uapi.vfio_iommu_spapr_tce_info(argsz=32)
            call(p.ioctl, c, uapi.VFIO_IOMMU_SPAPR_TCE_GET_INFO, info)
            iova = info.dma32_window_start
        dm = uapi.vfio_iommu_type1_dma_map(argsz=32, flags=3, vaddr=buf, iova=iova, size=1 << 16)
        call(p.ioctl, c, uapi.VFIO_IOMMU_MAP_DMA, dm)
        for dev in m.kernel.vfio.groups[int(path.rsplit("/", 1)[1])].devices:
            fd = call(p.ioctl, g, uapi.VFIO_GROUP_GET_DEVICE_FD, dev.name.encode() + b"\0")
            if fd is not None:
                call(p.pread, fd, 4, uapi.VFIO_PCI_CONFIG_REGION_INDEX << 40)
                call(p.pwrite, fd, (6).to_bytes(2, "little"), (uapi.VFIO_PCI_CONFIG_REGION_INDEX << 40) + 4)
                for reg, val in ((0x80, 0x40000), (0x88, iova), (0x90, 64), (0x98, 1)):
                    call(p.pwrite, fd, val.to_bytes(8, "little"), reg)
        check_invariants(m)
    if "/dev/iommu" in m.kernel.dev_nodes:
        _smoke_iommufd(m, p, buf, call)
    p.exit()
    check_clean(m)


def _smoke_iommufd(m: Any, p: Any, buf: int, call: Callable[..., Any]) -> None:
    """Each device cdev bound to an iommufd, attached to an IOAS, an edu DMA."""
    from . import uapi
    from .uapi import iommufd as iu
    fd = call(p.open, "/dev/iommu")
    if fd is None:
        return
    alloc = iu.iommu_ioas_alloc(size=ctypes.sizeof(iu.iommu_ioas_alloc))
    if call(p.ioctl, fd, iu.IOMMU_IOAS_ALLOC, alloc) is None:
        return
    mp = iu.iommu_ioas_map(size=ctypes.sizeof(iu.iommu_ioas_map), flags=7, ioas_id=alloc.out_ioas_id, user_va=buf,
                           length=1 << 16, iova=0x100000)
    call(p.ioctl, fd, iu.IOMMU_IOAS_MAP, mp)
    for path in sorted(n for n in m.kernel.dev_nodes if n.startswith("/dev/vfio/devices/")):
        dfd = call(p.open, path)
        if dfd is None:
            continue
        bind = uapi.vfio_device_bind_iommufd(argsz=16, iommufd=fd)
        if call(p.ioctl, dfd, uapi.VFIO_DEVICE_BIND_IOMMUFD, bind) is None:
            continue
        attach = uapi.vfio_device_attach_iommufd_pt(argsz=12, pt_id=alloc.out_ioas_id)
        if call(p.ioctl, dfd, uapi.VFIO_DEVICE_ATTACH_IOMMUFD_PT, attach) is None:
            continue
        call(p.pwrite, dfd, (6).to_bytes(2, "little"), (uapi.VFIO_PCI_CONFIG_REGION_INDEX << 40) + 4)
        for reg, val in ((0x80, 0x40000), (0x88, 0x100000), (0x90, 64), (0x98, 1)):
            call(p.pwrite, dfd, val.to_bytes(8, "little"), reg)
        check_invariants(m)


TARGETS: dict[str, Callable[[bytes], None]] = {
    "ioctl": target_ioctl,
    "protocol": target_protocol,
    "machine-file": target_machine_file,
}


# =============================================================================================
# engines
# =============================================================================================

REPO_FUZZ = Path(__file__).resolve().parents[2] / "fuzz"
# Where an installed copy keeps them: setup.py copies fuzz/corpus and
# fuzz/regressions into the package.
PACKAGED_FUZZ = Path(__file__).resolve().parent / "fuzz_inputs"


def fuzz_root() -> Path | None:
    """The directory of the seed corpus and regression inputs: the repository's
    fuzz/ beside the source this module was imported from, or else ./fuzz (an
    installed vfiosim run from a checkout, as CI does after `pip install .`),
    or else the copy installed with the package (a wheel used anywhere)."""
    for root in (REPO_FUZZ, Path.cwd() / "fuzz", PACKAGED_FUZZ):
        if (root / "corpus").is_dir():
            return root
    return None


def corpus_dirs(target: str) -> list[Path]:
    """The seed corpus and the regression inputs kept in the repository."""
    root = fuzz_root()
    if root is None:
        return []
    return [p for p in (root / "corpus" / target, root / "regressions" / target) if p.is_dir()]


def load_corpus(dirs: Sequence[Path]) -> list[bytes]:
    out = []
    for d in dirs:
        for f in sorted(Path(d).iterdir()):
            if f.is_file():
                out.append(f.read_bytes())
    return out


def mutate(rng: random.Random, data: bytes, corpus: Sequence[bytes], max_len: int) -> bytes:
    """libFuzzer-style mutations, without coverage feedback."""
    buf = bytearray(data)
    for _ in range(rng.randint(1, 6)):
        kind = rng.randrange(8)
        if kind == 0 or not buf:
            pos = rng.randint(0, len(buf))
            buf[pos:pos] = rng.randbytes(rng.randint(1, 16))
        elif kind == 1:
            pos = rng.randrange(len(buf))
            del buf[pos:pos + rng.randint(1, 8)]
        elif kind == 2:
            pos = rng.randrange(len(buf))
            buf[pos] ^= 1 << rng.randrange(8)
        elif kind == 3:
            pos = rng.randrange(len(buf))
            buf[pos] = rng.choice((0, 1, 0x7F, 0x80, 0xFF, rng.randrange(256)))
        elif kind == 4 and len(buf) >= 8:
            pos = rng.randrange(len(buf) - 7)
            buf[pos:pos + 8] = rng.choice(INTERESTING).to_bytes(8, "little")
        elif kind == 5 and corpus:
            other = rng.choice(corpus)
            if other:
                a = rng.randrange(len(other))
                pos = rng.randint(0, len(buf))
                buf[pos:pos] = other[a:a + rng.randint(1, 64)]
        elif kind == 6:
            pos = rng.randrange(len(buf))
            buf[pos:pos + 4] = rng.randbytes(4)
        else:
            a, b = sorted(rng.randrange(len(buf)) for _ in range(2))
            buf[a:b] = buf[a:b][::-1]
    return bytes(buf[:max_len])


def run_one(target: str, data: bytes) -> str | None:
    """Run one input; the failure (a traceback) or None."""
    import traceback
    try:
        TARGETS[target](data)
    except Exception as exc:     # noqa: BLE001 -- anything escaping is the finding
        return "".join(traceback.format_exception(exc))
    return None


def save_crash(target: str, data: bytes, out_dir: Path) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"crash-{target}-{hashlib.sha1(data).hexdigest()[:16]}"
    path.write_bytes(data)
    return path


def random_engine(target: str, runs: int, seed: int, extra_dirs: Sequence[Path], max_len: int,
                  crash_dir: Path, seconds: float | None, out: Any) -> dict[str, Any]:
    rng = random.Random(seed)
    dirs = list(corpus_dirs(target)) + list(extra_dirs)
    if not dirs:
        print(f"vfiosim fuzz: {target}: no seed corpus (no fuzz/corpus/ beside the source, in the current "
              f"directory or installed with vfiosim, no --corpus): starting from empty inputs, which reach far less",
              file=out, flush=True)
    corpus = load_corpus(dirs) or [b""]
    crashes: list[str] = []
    t0 = time.monotonic()
    n = 0
    last = t0
    while n < runs:
        if seconds is not None and time.monotonic() - t0 > seconds:
            break
        if n < len(corpus):
            data = corpus[n]
        elif rng.random() < 0.1:
            data = rng.randbytes(rng.randint(0, max_len))
        else:
            data = mutate(rng, rng.choice(corpus), corpus, max_len)
        failure = run_one(target, data)
        n += 1
        if failure is not None:
            path = save_crash(target, data, crash_dir)
            crashes.append(str(path))
            print(f"vfiosim fuzz: {target}: crash #{len(crashes)} saved to {path}\n{failure}", file=out, flush=True)
        now = time.monotonic()
        if now - last > 30:
            last = now
            print(f"vfiosim fuzz: {target}: {n} inputs, {len(crashes)} crash(es), {now - t0:.0f} s "
                  f"({n / (now - t0):.0f}/s)", file=out, flush=True)
    elapsed = time.monotonic() - t0
    summary = {"target": target, "engine": "random", "seed": seed, "inputs": n, "crashes": len(crashes),
               "crash_files": crashes, "seconds": round(elapsed, 1)}
    print(f"vfiosim fuzz: {target}: {n} inputs in {elapsed:.1f} s, {len(crashes)} crash(es)", file=out, flush=True)
    return summary


def atheris_engine(target: str, runs: int, seed: int, extra_dirs: Sequence[Path], max_len: int,
                   crash_dir: Path, seconds: float | None, work: Path) -> None:
    """Coverage-guided fuzzing with atheris (libFuzzer); does not return (libFuzzer exits)."""
    try:
        import atheris  # type: ignore[import-untyped]
    except ImportError:
        raise SystemExit("vfiosim fuzz: atheris is not installed (pip install 'vfiosim[fuzz]'), "
                         "or use --engine random") from None
    # Everything the targets reach, loaded now, then instrumented for coverage.
    from . import machine, uapi  # noqa: F401
    from .transport import daemon, protocol, trace  # noqa: F401
    from .kernel.iommu import prereg, spapr_tce, spapr_tce_310, type1  # noqa: F401
    from .kernel.iommufd import device, hw_pagetable, io_pagetable, ioas, main, pages, vfio_compat  # noqa: F401
    from .kernel.vfio import device_cdev, iommufd  # noqa: F401
    from .kernel.platform import powernv, pseries, x86  # noqa: F401
    atheris.instrument_all()
    work.mkdir(parents=True, exist_ok=True)
    crash_dir.mkdir(parents=True, exist_ok=True)
    fn = TARGETS[target]
    args = [sys.argv[0], f"-runs={runs}", f"-max_len={max_len}", f"-seed={seed}",
            f"-artifact_prefix={crash_dir}/crash-{target}-", "-print_final_stats=1", "-timeout=60",
            "-rss_limit_mb=4096", str(work), *[str(d) for d in list(corpus_dirs(target)) + list(extra_dirs)]]
    if seconds is not None:
        args.insert(1, f"-max_total_time={int(seconds)}")
    atheris.Setup(args, fn)
    atheris.Fuzz()


def add_fuzz_parser(sub: Any) -> None:
    f = sub.add_parser("fuzz", help="fuzz the simulated kernel, the `vfiosim run` protocol or machine files "
                                    "(see docs/reliability.md)")
    f.add_argument("target", choices=sorted(TARGETS) + ["all"])
    f.add_argument("--runs", type=int, default=10000, help="inputs to run (per target; default 10000)")
    f.add_argument("--seconds", type=float, help="stop after this many seconds")
    f.add_argument("--engine", choices=("auto", "atheris", "random"), default="auto",
                   help="atheris (coverage-guided, the fuzz extra) or random (built in); auto: atheris if installed")
    f.add_argument("--seed", type=int, default=1)
    f.add_argument("--max-len", type=int, default=1024)
    f.add_argument("--corpus", type=Path, action="append", default=[], help="more seed inputs (a directory)")
    f.add_argument("--crashes", type=Path, default=Path("fuzz-crashes"), help="where crashing inputs go")
    f.add_argument("--work", type=Path, help="atheris: the corpus it grows (default: a temporary directory)")
    f.add_argument("--replay", type=Path, nargs="+", metavar="FILE", help="run these inputs once and report")
    f.set_defaults(func=cmd_fuzz)


def cmd_fuzz(args: argparse.Namespace) -> int:
    targets = sorted(TARGETS) if args.target == "all" else [args.target]
    if args.replay:
        bad = 0
        for path in args.replay:
            files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
            for f in files:
                for t in ([f.parent.name] if f.parent.name in TARGETS and args.target == "all" else targets):
                    failure = run_one(t, f.read_bytes())
                    if failure:
                        bad += 1
                        print(f"{f} ({t}): FAILS\n{failure}")
                    else:
                        print(f"{f} ({t}): ok")
        return 1 if bad else 0
    engine = args.engine
    if engine == "auto":
        try:
            import atheris  # noqa: F401
            engine = "atheris"
        except ImportError:
            engine = "random"
    if engine == "atheris":
        if len(targets) != 1:
            raise ValueError("atheris fuzzes one target per process: name it (ioctl, protocol, machine-file)")
        work = args.work or Path(tempfile.mkdtemp(prefix=f"vfiosim-fuzz-{targets[0]}-"))
        atheris_engine(targets[0], args.runs, args.seed, args.corpus, args.max_len, args.crashes, args.seconds, work)
        return 0
    total = 0
    for t in targets:
        summary = random_engine(t, args.runs, args.seed, args.corpus, args.max_len, args.crashes, args.seconds,
                                sys.stdout)
        total += summary["crashes"]
    return 1 if total else 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m vfiosim.fuzz")
    sub = ap.add_subparsers(dest="command", required=True)
    add_fuzz_parser(sub)
    args = ap.parse_args(["fuzz", *(sys.argv[1:] if argv is None else argv)])
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
