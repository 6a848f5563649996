"""Host-backed pieces for running real programs on the simulated kernel.

Under ``vfiosim run`` a simulated task stands for a real process.  Its
memory is the real process's memory: user pointers passed to ioctls are
read and written through ``/proc/<pid>/mem``, pinned pages are the
process's real pages, and a device's DMA lands in them.  Interrupts signal
the program's real eventfds.  These classes implement the kernel's
interfaces (the ``AddressSpace`` of kernel/mm.py, a ``File`` for eventfds)
on top of the host; the kernel itself stays free of real I/O.

The files a :class:`HostProcess` reads through are opened once, when the
process's hello is verified, with the program's own credentials
(transport/daemon.py): ``/proc/<pid>/mem`` and ``/proc/<pid>/maps`` are
bound to the address space that was there then, so an image the process
later exec()s -- a set-uid program, say -- is out of their reach, and the
``/proc/<pid>`` directory fd is bound to the process, never to a pid that
another process reuses.

Cost follows what is pinned, not what is mapped: a mapping is looked up per
address (``PROCMAP_QUERY``, Linux 6.11; /proc/<pid>/maps before that), and
pins are counted per 1 GiB window of the address space that holds one, so a
program that reserves terabytes and maps a page costs the daemon a page.

Pages of a ``MAP_SHARED`` mapping of a memory file (memfd, tmpfs,
hugetlbfs: DPDK's memory) are bound, when they are first pinned, to the file
page the program had there: the daemon takes the file acting as the program
(:class:`SharedFiles`), maps that part of it once, and a device's DMA is a
copy to or from that mapping -- no system call per buffer -- and reaches the
pinned file page even after the program unmaps or remaps the address, as on
Linux.

Limitation: elsewhere (private memory, a file that cannot be had) a pin does
not hold a real page in place.  If the program unmaps a buffer that is still
DMA-mapped and maps something else there, a DMA reaches the new mapping (on
Linux it would reach the old, still pinned, page).
"""

from __future__ import annotations

import errno
import os
import select
import stat
import struct
from dataclasses import dataclass
from errno import EFAULT, ENOMEM
from typing import TYPE_CHECKING, Any, Callable, Iterator, Literal

import numpy as np

from ..kernel.errors import fail
from ..kernel.eventfd import EventFd
from ..kernel.mm import (PROT_EXEC, PROT_READ, PROT_WRITE, AddressSpace, PhysicalMemory, PinResult, Vma,
                          add_pins, take_ram, take_ram_pages, unpin_run_of)
from ..kernel.progression import Progression
from . import native

if TYPE_CHECKING:
    from ..kernel.task import Task

WINDOW_SHIFT = 30                   # pins are counted per 1 GiB of address space
TMPFS_MAGIC = 0x01021994            # memfd and tmpfs (<linux/magic.h>)
HUGETLBFS_MAGIC = 0x958458F6
MAX_FILE_MAPS = 256                 # file mappings the daemon makes for one address space
FILE_MAP_CHUNK = 2 << 20            # at least this much of a file is mapped at once (pins come page by page)
FILE_MAP_SLACK = 32 << 20           # what the daemon may map beyond twice what is pinned through its mappings
_PROCMAP_PROT = ((native.PROCMAP_READ, PROT_READ), (native.PROCMAP_WRITE, PROT_WRITE),
                 (native.PROCMAP_EXEC, PROT_EXEC))
# PROT_* of each combination of PROCMAP_QUERY's flags (a look-up per MAP_DMA, not a loop).
_PROCMAP_MASK = native.PROCMAP_READ | native.PROCMAP_WRITE | native.PROCMAP_EXEC | native.PROCMAP_SHARED
_PROCMAP_SHARED = native.PROCMAP_SHARED
_PROCMAP_READ, _PROCMAP_WRITE = native.PROCMAP_READ, native.PROCMAP_WRITE
_vma = native.vma_query
# The usual pin and unpin in C (_pin.c), or their Python where it is not built.
_pin: Any
try:
    from . import _pin
except ImportError:
    _pin = None
_PROT_OF = tuple(sum(prot for bit, prot in _PROCMAP_PROT if flags & bit) for flags in range(_PROCMAP_MASK + 1))


ArgWindow = native.ArgWindow
"""A copy of the program's memory at a call's pointer argument, sent with the
call (protocol.F_WINDOW), and what the call wrote in it: ``open(addr, data,
writable)``, ``unpack(addr, layout)``, ``read(addr, n)``, ``write(addr,
data)`` (None, None, False: not inside), ``take_written()``, ``close()``
(``close_reply()``: as the reply sends it).  In C (vfiosim_daemon.c): every
windowed call opens, reads and closes one.  The bytes as sent are kept until
the call first writes to them (most calls only read their argument: no copy
is made for them)."""


class HostProcess:
    """Memory and /proc views of one real process (one exec image of it).

    Made by :meth:`open` (the daemon calls it acting as the program), or
    unbound (``HostProcess(pid)``): a fork child the daemon knows of before
    it said hello, whose memory is out of reach until it does."""

    def __init__(self, pid: int, procdir: int = -1, mem: int = -1, maps: int = -1, pagemap: int = -1) -> None:
        self.pid = pid
        self.procdir = procdir
        self.mem = mem
        self.maps_fd = maps
        self.pagemap = pagemap
        self._query = maps >= 0          # PROCMAP_QUERY works (until ENOTTY says otherwise)
        # Set when the image this stands for is gone (exit, exec): the pid
        # may now name a new image, or another process.
        self.gone = False
        self.window: native.Window | None = None    # the current call's copy of its pointer argument
        self.arg_window = ArgWindow()           # what open_window() opens and makes current

    @classmethod
    def open(cls, pid: int) -> "HostProcess":
        """Open the views of ``pid`` with this thread's credentials: the host
        kernel refuses ``mem`` unless they may ptrace the process."""
        fds: list[int] = []
        try:
            procdir = os.open(f"/proc/{pid}", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            fds.append(procdir)
            for name, flags in (("mem", os.O_RDWR), ("maps", os.O_RDONLY), ("pagemap", os.O_RDONLY)):
                fds.append(os.open(name, flags | os.O_CLOEXEC, dir_fd=procdir))
        except OSError:
            for fd in fds:
                os.close(fd)
            raise
        return cls(pid, *fds)

    @property
    def bound(self) -> bool:
        return self.mem >= 0

    def close(self) -> None:
        for name in ("procdir", "mem", "maps_fd", "pagemap"):
            fd = getattr(self, name)
            if fd >= 0:
                try:
                    os.close(fd)
                except OSError:
                    pass
                setattr(self, name, -1)

    # -- copy_from_user / copy_to_user: the CPU's view, protection honoured -------------------

    # -- the window: the current call's copy of the memory its pointer argument names ----------

    def open_window(self, addr: int, data: bytes, writable: int) -> None:
        """The program sent the ``data`` at ``addr`` along with its call (read
        as it can read them; ``writable`` non-zero: it can write them too): the call's
        copy_from_user and copy_to_user of those bytes use the copy.  Every
        call of the program opens one: the same object serves them all.  (The
        daemon's request loop does what this does, without its frame.)"""
        self.window = self.arg_window.open(addr, data, writable)

    def close_window(self) -> tuple[int, bytes] | None:
        """End the call's window: (offset, bytes) that the program stores back
        (what copy_to_user wrote in it), or None."""
        self.window = None
        return self.arg_window.close()     # (None if _flush_window() wrote it out meanwhile)

    def _flush_window(self, keep: bool) -> None:
        """Write what the window holds for the program through /proc/<pid>/mem
        (another path is about to read or write those bytes), and keep it
        (clean) or drop it."""
        w = self.window
        if w is None:
            return
        self.window = w if keep else None
        written = w.take_written()
        if written is not None:
            self._write(*written)

    def read(self, addr: int, n: int) -> bytes:
        """EFAULT unless all ``n`` bytes are mapped readable."""
        if n == 0:
            return b""
        w = self.window
        if w is not None:
            inside = w.read(addr, n)
            if inside is not None:
                return inside
            if addr < w.end and w.addr < addr + n:
                self._flush_window(False)
        if not self.bound or self.gone:
            raise fail(EFAULT, f"the memory of process {self.pid} is out of reach")
        if self._query:
            try:
                return native.uread(self.maps_fd, self.mem, addr, n)  # type: ignore[no-any-return]
            except OSError as exc:
                if exc.errno != errno.ENOTTY:
                    raise fail(EFAULT, f"cannot read {n} bytes at {addr:#x} in process {self.pid}") from None
            self._query = False
        self._check(addr, n, write=False)
        return self._mem_read(addr, n)

    def write(self, addr: int, data: bytes | bytearray | memoryview) -> None:
        """EFAULT unless all of it is mapped writable (no FOLL_FORCE)."""
        n = len(data)
        if n == 0:
            return
        w = self.window
        if w is not None:
            if w.write(addr, data):
                return
            if addr < w.end and w.addr < addr + n:
                self._flush_window(False)
        self._write(addr, data)

    def _write(self, addr: int, data: bytes | bytearray | memoryview) -> None:
        n = len(data)
        if not self.bound or self.gone:
            raise fail(EFAULT, f"the memory of process {self.pid} is out of reach")
        if self._query:
            try:
                native.uwrite(self.maps_fd, self.mem, addr, data)
                return
            except OSError as exc:
                if exc.errno != errno.ENOTTY:
                    raise fail(EFAULT, f"cannot write {n} bytes at {addr:#x} in process {self.pid}") from None
            self._query = False
        self._check(addr, n, write=True)
        try:
            native.dma_write(self.mem, addr, data)
        except OSError:
            raise fail(EFAULT, f"write of {n} bytes at {addr:#x} in process {self.pid} failed") from None

    def _check(self, addr: int, n: int, write: bool) -> None:
        """Without PROCMAP_QUERY: the mappings from /proc/<pid>/maps."""
        end = addr + n
        for start, stop, prot, _private, _path in self.maps():
            if stop <= addr or start >= end:
                continue
            if start > addr or not (prot & PROT_WRITE if write else prot & (PROT_READ | PROT_WRITE)):
                break
            addr = stop
            if addr >= end:
                return
        raise fail(EFAULT, f"cannot {'write' if write else 'read'} {n} bytes at {addr:#x} in process {self.pid}")

    def _mem_read(self, addr: int, n: int) -> bytes:
        try:
            return native.dma_read(self.mem, addr, n)  # type: ignore[no-any-return]
        except OSError:
            raise fail(EFAULT, f"read of {n} bytes at {addr:#x} in process {self.pid} failed") from None

    # -- a device's DMA: the pages, whatever the CPU's protection is now ---------------------------

    def device_read(self, addr: int, n: int) -> bytes:
        if self.window is not None:
            self._flush_window(True)
        if not self.bound:
            raise fail(EFAULT, f"DMA read of {n} bytes at {addr:#x} in process {self.pid} failed")
        try:
            return native.dma_read(self.mem, addr, n)  # type: ignore[no-any-return]
        except OSError:
            raise fail(EFAULT, f"DMA read of {n} bytes at {addr:#x} in process {self.pid} failed") from None

    def device_read_into(self, addr: int, out: np.ndarray) -> None:
        if self.window is not None:
            self._flush_window(True)
        try:
            if not self.bound:
                raise OSError(EFAULT, "unbound")
            native.dma_read_into(self.mem, addr, out)
        except OSError:
            raise fail(EFAULT, f"DMA read of {out.size} bytes at {addr:#x} in process {self.pid} failed") from None

    def device_read_ranges(self, addrs: list[int], lens: list[int], out: memoryview) -> None:
        """Several DMA reads (a NIC's burst of descriptors and frames) into
        ``out``, one after the other, in one foreign call: EFAULT unless every
        byte was read."""
        if self.window is not None:
            self._flush_window(True)
        try:
            if not self.bound:
                raise OSError(EFAULT, "unbound")
            native.dma_read_ranges(self.mem, addrs, lens, out)
        except OSError:
            raise fail(EFAULT, f"DMA read of {len(out)} bytes in {len(addrs)} ranges in process {self.pid} "
                               f"failed") from None

    def device_write_ranges(self, addrs: list[int], lens: list[int], data: memoryview) -> None:
        """Several DMA writes, in order, in one foreign call."""
        if self.window is not None:
            self._flush_window(False)
        try:
            if not self.bound:
                raise OSError(EFAULT, "unbound")
            native.dma_write_ranges(self.mem, addrs, lens, data)
        except OSError:
            raise fail(EFAULT, f"DMA write of {len(data)} bytes in {len(addrs)} ranges in process {self.pid} "
                               f"failed") from None

    def device_window_ranges(self, obj: "HostMemoryObject", offs: list[int], lens: list[int], buf: object,
                             write: bool) -> None:
        """DMA of several ranges of window ``obj`` whose pages are bound to
        file mappings of the daemon (the rest through /proc/<pid>/mem)."""
        if self.window is not None:
            self._flush_window(not write)
        try:
            if not self.bound or obj.files is None:
                raise OSError(EFAULT, "unbound")
            native.window_ranges(self.mem, obj.vaddr, obj.page_shift, obj.slots, obj.files.bases, offs, lens,
                                 buf, write)
        except OSError:
            raise fail(EFAULT, f"DMA {'write' if write else 'read'} in {len(offs)} ranges at {obj.vaddr:#x} in "
                               f"process {self.pid} failed") from None

    def device_write(self, addr: int, data: "bytes | bytearray | memoryview | np.ndarray") -> None:
        if self.window is not None:
            self._flush_window(False)
        if isinstance(data, np.ndarray):
            data = np.ascontiguousarray(data, dtype=np.uint8)
        try:
            if not self.bound:
                raise OSError(EFAULT, "unbound")
            native.dma_write(self.mem, addr, data)
        except OSError:
            raise fail(EFAULT, f"DMA write of {len(data)} bytes at {addr:#x} in process {self.pid} failed") from None

    # -- mappings ----------------------------------------------------------------------------------

    def vma_at(self, addr: int) -> tuple[int, int, int, bool, str] | None:
        """(start, end, PROT_*, private, path) of the mapping holding ``addr``,
        or None: one PROCMAP_QUERY (Linux 6.11; no path), else a scan of the
        bound maps file."""
        if self.mem < 0 or self.gone:           # not bound
            return None
        if self._query:
            try:
                found = _vma(self.maps_fd, addr, False)
            except OSError as exc:
                if exc.errno != errno.ENOTTY:
                    return None
                self._query = False
            else:
                if found is None:
                    return None
                start, end, flags, _inode = found
                return start, end, _PROT_OF[flags & _PROCMAP_MASK], not flags & _PROCMAP_SHARED, ""
        for entry in self.maps():
            if entry[0] <= addr < entry[1]:
                return entry
        return None

    def maps(self) -> list[tuple[int, int, int, bool, str]]:
        """(start, end, prot, private, path) of each mapping, from the bound maps file."""
        if self.maps_fd < 0 or self.gone:
            return []
        chunks = []
        try:
            os.lseek(self.maps_fd, 0, os.SEEK_SET)
            while True:
                chunk = os.read(self.maps_fd, 1 << 16)
                if not chunk:
                    break
                chunks.append(chunk)
        except OSError:
            return []
        out = []
        for line in b"".join(chunks).decode(errors="replace").splitlines():
            parts = line.split(maxsplit=5)
            if len(parts) < 5:
                continue
            start, end = (int(x, 16) for x in parts[0].split("-"))
            perms = parts[1]
            prot = (PROT_READ if perms[0] == "r" else 0) | (PROT_WRITE if perms[1] == "w" else 0) | \
                (PROT_EXEC if perms[2] == "x" else 0)
            out.append((start, end, prot, perms[3] == "p", parts[5].strip() if len(parts) > 5 else ""))
        return out

    def present(self, pages: np.ndarray, page_shift: int) -> np.ndarray:
        """Whether each page (virtual address >> page_shift) is populated
        (present or swapped), from /proc/<pid>/pagemap: one read per run."""
        out = np.ones(pages.size, dtype=np.bool_)
        if self.pagemap < 0 or pages.size == 0:
            return out
        host = (pages.astype(np.uint64) << np.uint64(page_shift)) >> np.uint64(12)
        try:
            i = 0
            while i < host.size:
                j = i + 1
                while j < host.size and host[j] == host[j - 1] + 1 and j - i < 4096:
                    j += 1
                raw = os.pread(self.pagemap, 8 * (j - i), int(host[i]) * 8)
                entries = np.frombuffer(raw.ljust(8 * (j - i), b"\0"), dtype=np.uint64)
                out[i:j] = (entries >> np.uint64(62)) & np.uint64(3) != 0
                i = j
        except OSError:
            pass
        return out

    # -- the process itself, through its /proc directory ------------------------------------------

    def fd_link(self, n: int) -> str:
        """readlink /proc/<pid>/fd/<n> ('' if there is none)."""
        if self.procdir < 0:
            return ""
        try:
            return os.readlink(f"fd/{n}", dir_fd=self.procdir)
        except OSError:
            return ""

    def fd_numbers(self) -> list[int]:
        if self.procdir < 0:
            return []
        try:
            fd = os.open("fd", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=self.procdir)
        except OSError:
            return []
        try:
            return sorted(int(n) for n in os.listdir(fd) if n.isdigit())
        finally:
            os.close(fd)

    def read_file(self, name: str) -> str:
        fd = os.open(name, os.O_RDONLY | os.O_CLOEXEC, dir_fd=self.procdir)
        try:
            return os.read(fd, 1 << 16).decode(errors="replace")
        finally:
            os.close(fd)

    def file_fd(self, dev: int, ino: int, getfd: Callable[[int], int], hint: int = -1) -> tuple[int, int] | None:
        """(our duplicate, its number in the process) of an fd of the process
        open on the file (dev, ino): ``hint`` first, then every fd (a stat
        through /proc/<pid>/fd, which the host kernel allows only to whoever
        may ptrace the process: call it acting as the program), taken with
        ``getfd`` (pidfd_getfd)."""
        if self.procdir < 0 or self.gone:
            return None
        for n in self._fd_candidates(hint):
            try:
                st = os.stat(f"fd/{n}", dir_fd=self.procdir)
            except OSError:
                continue
            if st.st_dev == dev and st.st_ino == ino:
                return getfd(n), n
        return None

    def _fd_candidates(self, hint: int) -> Iterator[int]:
        if hint >= 0:
            yield hint
        yield from (n for n in self.fd_numbers() if n != hint)


class FileMap:
    """One mapping of a program's memory file in the daemon: ``addr`` stands
    for the program's address ``vaddr`` (as it was mapped when the pin was
    taken), ``refs`` pinned pages are bound to it."""

    __slots__ = ("base", "size", "vaddr", "span", "key", "foff", "refs", "slot")

    def __init__(self, base: int, size: int, vaddr: int, span: int, key: tuple[int, int], foff: int,
                 slot: int) -> None:
        self.base, self.size = base, size           # the daemon's mmap()
        self.vaddr, self.span = vaddr, span         # the program's addresses it stands for, at the pin
        self.key, self.foff = key, foff             # the file (dev, inode) and the offset of vaddr in it
        self.slot = slot
        self.refs = 0

    def covers(self, key: tuple[int, int], vaddr: int, length: int, foff: int) -> bool:
        return key == self.key and self.vaddr <= vaddr and vaddr + length <= self.vaddr + self.span and \
            self.foff + (vaddr - self.vaddr) == foff


class SharedFiles:
    """The memory files of one address space that the daemon maps: pinned
    pages of a ``MAP_SHARED`` mapping of a memfd, tmpfs or hugetlbfs file are
    bound, at their first pin, to the file page the program had there, and a
    device's DMA copies to and from the daemon's mapping of it.

    What it takes, it takes as the program: ``opener(dev, ino, hint)`` (the
    daemon's, acting with the program's credentials: HostProcess.file_fd)
    returns a duplicate of one of the program's fds open on that file and its
    number there, or None; the file is mapped only if the
    duplicate is the same file the mapping shows (device, inode), a regular
    file of a memory file system, opened for writing, and the range lies
    within it.  Anything else keeps the /proc/<pid>/mem path.  A mapping
    covers at least FILE_MAP_CHUNK (cut at the program's mapping and the
    file's end) so that pins taken page by page (sPAPR v2 registration) share
    it.  What it maps is bounded by what is pinned through it: at most twice
    the bytes of the pages bound to files plus FILE_MAP_SLACK, and
    MAX_FILE_MAPS mappings; a mapping goes with the last pin bound to it, and
    all of them with the image (exit, exec)."""

    def __init__(self, host: HostProcess) -> None:
        self.host = host
        self.opener: Callable[[int, int, int], tuple[int, int] | None] | None = None
        self.maps: list[FileMap | None] = [None]              # by slot; slot 0 is /proc/<pid>/mem
        self.bases = np.zeros(1, dtype=np.uint64)             # addr - vaddr, by slot (window_ranges)
        self.mapped = 0                                       # bytes mapped
        self.bound = 0                                        # pinned pages bound to a mapping
        self.refused: set[tuple[int, int]] = set()            # files that could not be had
        self.last: FileMap | None = None                      # the mapping a pin last used
        self.hints: dict[tuple[int, int], int] = {}           # the program's fd last found on a file

    def bind(self, obj: "HostMemoryObject", p0: int, n: int, which: np.ndarray | None = None) -> None:
        """Pages [p0, p0+n) of window ``obj`` (``which`` of them, relative to
        p0: all if None) were just pinned, all in one mapping: bind those
        pinned for the first time to the file page behind them, if that
        mapping is a shared memory file that can be had."""
        if self.opener is None or self.host.gone or not self.host.bound:
            return
        new = obj.pincount[p0:p0 + n] == 1
        if which is not None:
            mask = np.zeros(n, dtype=np.bool_)
            mask[which] = True
            new &= mask
        if obj.slots is not None:
            new &= obj.slots[p0:p0 + n] == 0
        if not new.any():
            return
        first = int(np.argmax(new))
        last = n - 1 - int(np.argmax(new[::-1]))
        shift = obj.page_shift
        vaddr = obj.vaddr + ((p0 + first) << shift)
        length = (last - first + 1) << shift
        try:
            vma = native.vma_file(self.host.maps_fd, vaddr)
        except OSError:
            return
        if vma is None:
            return
        start, end, flags, ino, offset, major, minor = vma
        if not flags & native.PROCMAP_SHARED or not ino or vaddr + length > end:
            return
        key = (os.makedev(major, minor), ino)
        foff = offset + (vaddr - start)
        fm = self.last
        if fm is None or self.maps[fm.slot] is not fm or not fm.covers(key, vaddr, length, foff):
            fm = next((m for m in self.maps if m is not None and m.covers(key, vaddr, length, foff)), None)
        if fm is None:
            fm = self._new_map(key, vaddr, length, min(max(length, FILE_MAP_CHUNK), end - vaddr), foff, shift)
            if fm is None:
                return
        self.last = fm
        if obj.slots is None:
            obj.slots = np.zeros(obj.length >> shift, dtype=np.int32)    # calloc'd: touched where bound
        count = int(np.count_nonzero(new))
        obj.slots[p0:p0 + n][new] = fm.slot
        fm.refs += count
        self.bound += count

    def _new_map(self, key: tuple[int, int], vaddr: int, length: int, span: int, foff: int,
                 shift: int) -> FileMap | None:
        """Map ``span`` bytes of the file from ``foff`` (standing for the
        program's ``vaddr``; ``length`` of them are being pinned), if the
        budget allows and the program's fd on the file can be had."""
        if key in self.refused or self.count() >= MAX_FILE_MAPS or \
                self.mapped + span > 2 * ((self.bound << shift) + length) + FILE_MAP_SLACK:
            return None
        got = self.opener(key[0], key[1], self.hints.get(key, -1)) if self.opener is not None else None
        if got is None:
            self.refused.add(key)
            return None
        fd, number = got
        try:
            got_map = self._map(fd, key, foff, length, span)
        finally:
            os.close(fd)
        if got_map is None:
            self.refused.add(key)
            return None
        base, size, addr, span = got_map
        self.hints[key] = number
        slot = next((i for i, m in enumerate(self.maps) if i and m is None), len(self.maps))
        fm = FileMap(base, size, vaddr, span, key, foff, slot)
        if slot == len(self.maps):
            self.maps.append(fm)
            self.bases = np.append(self.bases, np.uint64(0))
        else:
            self.maps[slot] = fm
        self.bases[slot] = (addr - vaddr) % (1 << 64)
        return fm

    def _map(self, fd: int, key: tuple[int, int], offset: int, length: int,
             span: int) -> tuple[int, int, int, int] | None:
        """Our mapping of [offset, offset+span) of the file at ``fd``, cut at
        its end (its address and size, the address standing for ``offset``,
        the span mapped), or None if it is not the file the program's mapping
        shows, not a memory file, its first ``length`` bytes are not all in
        it, or it cannot be mapped."""
        try:
            st = os.fstat(fd)
            kind = native.fs_type(fd)
        except OSError:
            return None
        if (st.st_dev, st.st_ino) != key or not stat.S_ISREG(st.st_mode) or \
                kind not in (TMPFS_MAGIC, HUGETLBFS_MAGIC) or offset + length > st.st_size:
            return None
        span = max(length, min(span, st.st_size - offset))
        align = max(st.st_blksize if kind == HUGETLBFS_MAGIC else 0, os.sysconf("SC_PAGE_SIZE"))
        lo = offset & ~(align - 1)
        hi = (offset + span + align - 1) & ~(align - 1)
        try:
            addr = native.file_map(fd, lo, hi - lo)   # EACCES: not open for writing; EPERM: sealed
        except OSError:
            return None
        self.mapped += hi - lo
        return int(addr), hi - lo, int(addr) + (offset - lo), span

    def unbind(self, obj: "HostMemoryObject", p0: int, n: int) -> None:
        """Pins on pages [p0, p0+n) were dropped: those no pin holds now leave
        their mapping, which goes with its last page."""
        assert obj.slots is not None
        slots = obj.slots[p0:p0 + n]
        gone = (slots != 0) & (obj.pincount[p0:p0 + n] == 0)
        if not gone.any():
            return
        which, counts = np.unique(slots[gone], return_counts=True)
        slots[gone] = 0
        for slot, count in zip(which.tolist(), counts.tolist()):
            fm = self.maps[slot]
            assert fm is not None
            fm.refs -= count
            self.bound -= count
            if fm.refs <= 0:
                self._unmap(fm)

    def _unmap(self, fm: FileMap) -> None:
        self.maps[fm.slot] = None
        self.bases[fm.slot] = 0
        try:
            native.file_unmap(fm.base, fm.size)
        except OSError:
            pass
        self.mapped -= fm.size

    def release(self, windows: "list[HostMemoryObject]") -> None:
        """The image is gone: every mapping goes (pinned pages read as zeros)."""
        for fm in self.maps:
            if fm is not None:
                self._unmap(fm)
        for obj in windows:
            obj.slots = None
        self.bound = 0
        self.last = None

    def count(self) -> int:
        """Mappings held."""
        return sum(m is not None for m in self.maps)


class HostMemoryObject:
    """Physical memory standing for one 1 GiB window of a real process's
    address space: DMA reads and writes reach the process at the same
    offset.  Pin counts are a lazily touched array: memory follows the pins.

    The machine's RAM: the host, not the simulation, gives the program its
    pages, so what the simulation can charge is what it pins -- a page costs
    RAM from its first pin to its last (``unmapped``: the pages whose RAM
    goes with their last pin, here every page a pin holds)."""

    __slots__ = ("phys_base", "length", "page_shift", "compound_shift", "pincount", "pins", "users",
                 "pinnable", "host", "vaddr", "orphan", "populated", "unmapped", "ram", "files", "slots")

    unpin_run = staticmethod(_pin.unpin_run if _pin is not None else unpin_run_of)

    def __init__(self, host: HostProcess, vaddr: int, length: int, page_shift: int,
                 files: SharedFiles | None = None) -> None:
        self.host = host
        # Pages bound to the daemon's mappings of the program's memory files:
        # a slot of ``files`` per page, 0 for none (None: no page is).
        self.files = files
        self.slots: np.ndarray | None = None
        self.vaddr = vaddr
        self.phys_base = 0
        self.length = length
        self.page_shift = page_shift
        self.compound_shift = page_shift
        # calloc'd: the pages of this array are touched only where pins are.
        self.pincount = np.zeros(length >> page_shift, dtype=np.int32)   # a page refcount is an atomic_t
        # Every page counts as populated (a view of one value: no memory): the
        # host faults pages in, and pagemap says which a read-only pin may take.
        self.populated = np.broadcast_to(np.True_, (length >> page_shift,))
        self.pins = 0
        self.users = 0
        self.pinnable = True
        self.orphan: np.ndarray | None = None
        # Pages charged to the machine's RAM (calloc'd, like the counts).
        self.unmapped: np.ndarray | None = np.zeros(length >> page_shift, dtype=np.bool_)
        self.ram: PhysicalMemory | None = None          # whose RAM they are charged to

    def charge(self, p0: int, n: int, dry_run: bool) -> int:
        """Charge the machine's RAM for the pages of [p0, p0+n) that no pin
        holds yet: how many of the n can be pinned (n, or fewer when RAM ran
        out at page p0 + the result: the pages before it keep their charge)."""
        assert self.ram is not None and self.unmapped is not None
        return take_ram(self.unmapped, self.ram, p0, n, dry_run)

    def charge_pages(self, pages: np.ndarray, dry_run: bool) -> int:
        """charge() for a list of page numbers (in order, repeats allowed): how
        many leading entries can be pinned."""
        assert self.ram is not None and self.unmapped is not None
        return take_ram_pages(self.unmapped, self.ram, pages, dry_run)

    def unpinned(self, p0: int, n: int) -> None:
        """Pins on pages [p0, p0+n) were dropped: those no pin holds now give
        their RAM back."""
        if self.slots is not None and self.files is not None:
            self.files.unbind(self, p0, n)
        charged = self.unmapped
        if charged is None or self.ram is None:
            return
        if n == 1:
            if charged[p0] and self.pincount[p0] == 0:
                charged[p0] = False
                self.ram.used_pages -= 1
            return
        gone = charged[p0:p0 + n] & (self.pincount[p0:p0 + n] == 0)
        count = int(np.count_nonzero(gone))
        if count:
            charged[p0:p0 + n] &= ~gone
            self.ram.used_pages -= count

    def _orphaned(self) -> np.ndarray | None:
        """Once the image is gone, pages a pin still holds are private memory:
        Linux keeps the old pages, whose contents vfiosim can no longer read,
        so they read as zeros -- and DMA never reaches the pid's new image or
        a process that reuses the pid."""
        if not self.host.gone:
            return None
        if self.orphan is None:
            self.orphan = np.zeros(self.length, dtype=np.uint8)
        return self.orphan

    def host_pointer(self, off: int, n: int) -> int | None:
        """The daemon's address of bytes [off, off+n), when all of them are
        pinned pages bound to one mapping of a memory file (a native DMA
        path copies there directly: virtio_native.py); else None.  It holds
        while the pages stay pinned and :meth:`direct_ready` says so."""
        slots, files = self.slots, self.files
        if slots is None or files is None or not self.direct_ready() or off < 0 or n <= 0 or off + n > self.length:
            return None
        p0, p1 = off >> self.page_shift, (off + n - 1) >> self.page_shift
        slot = int(slots[p0])
        if not slot or slot >= len(files.bases) or (p1 > p0 and not (slots[p0:p1 + 1] == slot).all()):
            return None
        return (int(files.bases[slot]) + self.vaddr + off) % (1 << 64)

    def direct_ready(self) -> bool:
        """Whether pointers from :meth:`host_pointer` may be used now: the
        program's image is still there (its mappings go with it), and no
        call's argument window is open (DMA must see what the call wrote:
        device_window_ranges flushes it first)."""
        host = self.host
        return not host.gone and host.window is None and host.bound

    def read_at(self, off: int, n: int) -> bytes:
        mem = self._orphaned()
        if mem is not None:
            return mem[off:off + n].tobytes()
        if self.slots is not None:
            out = bytearray(n)
            self.host.device_window_ranges(self, [off], [n], out, False)
            return bytes(out)
        return self.host.device_read(self.vaddr + off, n)

    def read_into(self, off: int, out: np.ndarray) -> None:
        mem = self._orphaned() if self.host.gone else None     # (no call on a device's every transfer)
        if mem is not None:
            out[:] = mem[off:off + out.size]
            return
        if self.slots is not None:
            if out.flags.c_contiguous and out.dtype == np.uint8:
                self.host.device_window_ranges(self, [off], [out.size], out, False)
            else:
                buf = bytearray(out.size)
                self.host.device_window_ranges(self, [off], [out.size], buf, False)
                out[:] = np.frombuffer(buf, dtype=np.uint8)
        elif out.flags.c_contiguous and out.dtype == np.uint8:
            self.host.device_read_into(self.vaddr + off, out)
        else:
            out[:] = np.frombuffer(self.host.device_read(self.vaddr + off, out.size), dtype=np.uint8)

    def read_ranges(self, offs: list[int], lens: list[int], out: memoryview) -> None:
        """Several ranges at once: one foreign call."""
        mem = self._orphaned()
        if mem is not None:
            pos = 0
            for off, n in zip(offs, lens):
                out[pos:pos + n] = mem[off:off + n].data
                pos += n
            return
        if self.slots is not None:
            self.host.device_window_ranges(self, offs, lens, out, False)
            return
        base = self.vaddr
        self.host.device_read_ranges([base + off for off in offs], lens, out)

    def write_ranges(self, offs: list[int], lens: list[int], data: memoryview) -> None:
        mem = self._orphaned()
        if mem is not None:
            pos = 0
            for off, n in zip(offs, lens):
                mem[off:off + n] = np.frombuffer(data[pos:pos + n], dtype=np.uint8)
                pos += n
            return
        if self.slots is not None:
            self.host.device_window_ranges(self, offs, lens, data, True)
            return
        base = self.vaddr
        self.host.device_write_ranges([base + off for off in offs], lens, data)

    def write_at(self, off: int, data: "bytes | bytearray | memoryview | np.ndarray") -> None:
        mem = self._orphaned() if self.host.gone else None
        if mem is not None:
            src = data if isinstance(data, np.ndarray) else np.frombuffer(data, dtype=np.uint8)
            mem[off:off + src.size] = src
            return
        # A device writes whatever the CPU mapping's protection is now (the
        # IOMMU already checked the TCE's permission).
        if self.slots is not None:
            if isinstance(data, np.ndarray):
                data = np.ascontiguousarray(data, dtype=np.uint8)
            self.host.device_window_ranges(self, [off], [len(data)], data, True)
            return
        self.host.device_write(self.vaddr + off, data)

    def __repr__(self) -> str:
        return f"<HostMemoryObject pid={self.host.pid} vaddr={self.vaddr:#x} len={self.length:#x} pins={self.pins}>"


def _pin_fast_run_py(maps_fd: int, addr: int, npages: int, write: bool, longterm: bool, obj: HostMemoryObject,
                ram: PhysicalMemory) -> tuple[int, int, int] | None | Literal[False]:
    """HostMM.pin_fast(addr, npages, write, longterm) where ``obj`` is the
    registered window holding ``addr``: what _pin.c's pin_run() does, for a
    build without it (tests/test_pin_native.py compares the two).  None: not
    pinnable so (pin_fast() answers None); False: declined, nothing changed
    (the query failed).  Pages of a shared mapping are bound to their file
    (``obj.files``: HostMM.files), as pin_fast() binds them."""
    try:
        found = _vma(maps_fd, addr, False)
    except OSError:
        return False
    if found is None:
        return None
    flags = found[2]
    if not (flags & _PROCMAP_WRITE if write else flags & (_PROCMAP_READ | _PROCMAP_WRITE)):
        return None
    shift = obj.page_shift
    end = addr + (npages << shift)
    if end > found[1] or (end - 1) >> WINDOW_SHIFT != addr >> WINDOW_SHIFT:
        return None
    if not write and not longterm and not flags & _PROCMAP_WRITE:
        return None
    files = obj.files if flags & _PROCMAP_SHARED else None
    if flags & _PROCMAP_SHARED and files is None:
        return False
    p0 = (addr - obj.vaddr) >> shift
    charged = obj.unmapped
    if charged is None or npages < 1 or not 0 <= p0 <= min(charged.size, obj.pincount.size) - npages:
        return False
    if take_ram(charged, ram, p0, npages, True) < npages:      # all of them or none
        return None
    take_ram(charged, ram, p0, npages, False)
    repinned = add_pins(obj, p0, npages)
    if files is not None:
        files.bind(obj, p0, npages)
    return obj.phys_base + (p0 << shift), repinned, 0


_PinFastRun = Callable[[int, int, int, bool, bool, HostMemoryObject, PhysicalMemory],
                   "tuple[int, int, int] | None | Literal[False]"]
_pin_fast_run: _PinFastRun = _pin.pin_run if _pin is not None else _pin_fast_run_py


class HostMM(AddressSpace):
    """The address space of a simulated task that is a real process."""

    def __init__(self, pid: int, phys: PhysicalMemory, host: HostProcess | None = None) -> None:
        super().__init__(phys)
        self.host = host or HostProcess(pid)
        self._windows: dict[int, HostMemoryObject] = {}
        self.files = SharedFiles(self.host)         # its memory files the daemon maps (opener: the daemon's)
        # What a Vma of this address space names as its memory: nothing pinnable
        # through it (pins go to the windows).
        self._unpinned = HostMemoryObject(self.host, 0, 0, self.page_shift)
        self._unpinned.pinnable = False
        # The program's mappings of device files, by the daemon's handle: what
        # the shim maps there is an inaccessible placeholder, the kernel sees a
        # VM_PFNMAP mapping of the device (Kernel.host_device_vma).
        self.device_vmas: dict[int, Vma] = {}

    def bind(self, host: HostProcess) -> None:
        """The process said hello: its memory is reachable from now on."""
        old, self.host = self.host, host
        self.files.host = host
        for obj in self._windows.values():
            obj.host = host
        old.close()

    # -- copy_from_user / copy_to_user --------------------------------------------------------

    def read(self, addr: int, n: int) -> bytes:
        w = self.host.window
        if w is not None:
            # The usual copy_from_user of an ioctl's struct: HostProcess.read()'s
            # first case, one frame fewer (the range checks hold inside a window).
            inside = w.read(addr, n)
            if inside is not None:
                return inside
        if addr < 0 or n < 0 or addr + n > 1 << 64:
            raise fail(EFAULT, f"bad address range {addr:#x}+{n:#x}")
        return self.host.read(addr, n)

    def read_unpack(self, addr: int, layout: struct.Struct) -> tuple[Any, ...]:
        w = self.host.window
        if w is not None:
            inside = w.unpack(addr, layout)        # an ioctl's struct: no copy of it
            if inside is not None:
                return inside
        return layout.unpack(self.read(addr, layout.size))

    def write(self, addr: int, data: bytes | bytearray | memoryview) -> None:
        w = self.host.window
        if w is not None and w.write(addr, data):   # an ioctl's struct written back (the range holds inside)
            return
        if addr < 0 or addr + len(data) > 1 << 64:
            raise fail(EFAULT, f"bad address range {addr:#x}+{len(data):#x}")
        self.host.write(addr, data)

    # -- mappings ---------------------------------------------------------------------------------

    def _window(self, index: int) -> HostMemoryObject:
        """The object counting pins in 1 GiB window ``index`` (made once, at
        its first pin, and kept: a window's counts are not allocated anew)."""
        obj = self._windows.get(index)
        if obj is None:
            obj = HostMemoryObject(self.host, index << WINDOW_SHIFT, 1 << WINDOW_SHIFT, self.page_shift, self.files)
            obj.ram = self.phys
            self._windows[index] = obj
        return obj

    def _register(self, obj: HostMemoryObject) -> None:
        """A window's first pin gives it physical addresses, which it keeps
        while the image lives (``users``: this address space holds it), so a
        map/unmap loop does not register and forget it at every pair; once the
        image is gone it goes with its last pin (teardown)."""
        self.phys.register(obj, obj.length)
        obj.users = 1

    def vmas(self) -> list[Vma]:
        """Every mapping (for /proc-style summaries; the kernel looks up one address at a time)."""
        return [Vma(start, end, prot, self._unpinned, 0, kind="anon" if private else "shared")
                for start, end, prot, private, _path in self.host.maps()]

    def find_vma(self, addr: int) -> Vma | None:
        """The mapping holding ``addr`` (its pages are reached through pin_pages,
        not through the Vma's object); where the program mapped a device, the
        device's VM_PFNMAP mapping, as far as the shim's placeholder (private,
        inaccessible) is still there."""
        found = self.host.vma_at(addr)
        if found is None:
            return None
        start, end, prot, private, _path = found
        if self.device_vmas and not prot and private:
            for dev in self.device_vmas.values():
                if dev.start <= addr < dev.end:
                    lo, hi = max(start, dev.start), min(end, dev.end)
                    return Vma(lo, hi, dev.prot, dev.obj, dev.pgoff + (lo - dev.start), kind="pfnmap", ops=dev.ops)
        return Vma(start, end, prot, self._unpinned, 0, kind="anon" if private else "shared")

    def pin_pages_longterm(self, start: int, npages: int, write: bool) -> PinResult:
        """As MM.pin_pages_longterm (Type1's FOLL_LONGTERM pin): a read pin of a
        never-written page of a read-only private mapping unshares the zero
        page and succeeds, where pin_pages() faults."""
        return self._pin_run(start, npages, write, False, True, 0, "pin_user_pages_remote(FOLL_LONGTERM)")

    def pin_pages(self, addrs: np.ndarray, write: bool, dry_run: bool = False, unshare: bool = False) -> PinResult:
        """As MM.pin_pages, against the process's real mappings: one lookup
        per mapping the addresses cross, pins counted in 1 GiB windows."""
        n = int(addrs.size)
        shift = np.uint64(self.page_shift)
        parts: list[np.ndarray | Progression] = []
        done, err = 0, None
        while done < n:
            addr = int(addrs[done])
            vma = self.host.vma_at(addr)
            if vma is None or not vma[2] & (PROT_READ | PROT_WRITE) or (write and not vma[2] & PROT_WRITE):
                err = EFAULT
                break
            start, end, prot, _private, _path = vma
            stop = done + int(np.searchsorted(addrs[done:], np.uint64(end), side="left"))
            seg = addrs[done:stop]
            if not write and not prot & PROT_WRITE and not unshare:
                missing = ~self.host.present(seg >> shift, self.page_shift)
                if missing.any():
                    cut = int(np.argmax(missing))
                    seg, stop, err = seg[:cut], done + cut, EFAULT
            got, pinned = self._pin_segment(seg, dry_run, not _private)
            parts.extend(pinned)
            if got < seg.size:
                stop, err = done + got, ENOMEM
                if not dry_run:
                    self._out_of_memory(f"pin_user_pages() of {int(seg[got]):#x}")
            done = stop
            if err is not None:
                break
        shifts = np.full(done, self.page_shift, dtype=np.int64)
        if len(parts) == 1:
            return PinResult(parts[0], shifts, done, err)
        hpas = np.concatenate([np.asarray(p) for p in parts]) if parts else np.zeros(0, dtype=np.uint64)
        return PinResult(hpas, shifts, done, err)

    def _pin_segment(self, seg: np.ndarray, dry_run: bool,
                     shared: bool = False) -> tuple[int, list[np.ndarray | Progression]]:
        """Pin the pages of ``seg`` (addresses inside one mapping), window by
        window: how many were pinned (fewer than all when the machine's RAM
        ran out) and their physical addresses."""
        out: list[np.ndarray | Progression] = []
        i = 0
        page = 1 << self.page_shift
        while i < seg.size:
            index = int(seg[i]) >> WINDOW_SHIFT
            j = i + int(np.searchsorted(seg[i:], np.uint64((index + 1) << WINDOW_SHIFT), side="left"))
            obj = self._window(index)
            pages = ((seg[i:j] - np.uint64(obj.vaddr)) >> np.uint64(self.page_shift)).astype(np.int64)
            got = obj.charge_pages(pages, dry_run)
            pages = pages[:got]
            consecutive = pages.size <= 1 or (int(pages[-1]) - int(pages[0]) == pages.size - 1
                                              and bool((np.diff(pages) == 1).all()))
            if not dry_run and pages.size:
                if not obj.users:
                    self._register(obj)
                if consecutive:
                    obj.pincount[int(pages[0]):int(pages[-1]) + 1] += 1
                else:
                    np.add.at(obj.pincount, pages, 1)
                obj.pins += int(pages.size)
                if shared:
                    lo, hi = int(pages.min()), int(pages.max()) + 1
                    self.files.bind(obj, lo, hi - lo, None if consecutive else pages - lo)
            if not pages.size:
                pass
            elif consecutive:
                out.append(Progression(obj.phys_base + (int(pages[0]) << self.page_shift), page, int(pages.size)))
            else:
                out.append(np.uint64(obj.phys_base) + (pages.astype(np.uint64) << np.uint64(self.page_shift)))
            if got < j - i:
                return i + got, out
            i = j
        return i, out

    def pin_range(self, addr: int, npages: int, write: bool, dry_run: bool = False, tag: int = 0) -> PinResult:
        """Consecutive pages: as pin_pages over their addresses."""
        return self._pin_run(addr, npages, write, dry_run, False, tag, "pin_user_pages_fast()")

    def _pin_run(self, addr: int, npages: int, write: bool, dry_run: bool, unshare: bool, tag: int,
                 gup: str) -> PinResult:
        """Pin ``npages`` consecutive pages from ``addr``: one lookup per mapping
        crossed and one slice per 1 GiB window, in plain integers (a small map
        pays for no array)."""
        shift = self.page_shift
        page = 1 << shift
        parts: list[Progression] = []
        done, cur, err = 0, addr, None
        while done < npages:
            vma = self.host.vma_at(cur)
            if vma is None or not vma[2] & (PROT_READ | PROT_WRITE) or (write and not vma[2] & PROT_WRITE):
                err = EFAULT
                break
            n = min(npages - done, (vma[1] - cur) >> shift)
            if not write and not vma[2] & PROT_WRITE and not unshare:
                present = self.host.present(np.arange(cur >> shift, (cur >> shift) + n, dtype=np.uint64), shift)
                if not present.all():
                    n, err = int(np.argmin(present)), EFAULT
            while n > 0:
                index = cur >> WINDOW_SHIFT
                obj = self._window(index)
                k = min(n, (((index + 1) << WINDOW_SHIFT) - cur) >> shift)
                p0 = (cur - obj.vaddr) >> shift
                got = obj.charge(p0, k, dry_run)
                if got < k:                             # the machine's RAM ran out at page p0 + got
                    n, err = got, ENOMEM
                    if not dry_run:
                        self._out_of_memory(f"{gup} of {cur + (got << shift):#x}")
                    if not got:
                        break
                    k = got
                if not dry_run:
                    if not obj.users:
                        self._register(obj)
                    if k == 1:
                        obj.pincount[p0] += 1
                    else:
                        obj.pincount[p0:p0 + k] += 1
                    obj.pins += k
                    if not vma[3]:
                        self.files.bind(obj, p0, k)
                parts.append(Progression((obj.phys_base + (p0 << shift)) | tag, page, k))
                cur += k << shift
                n -= k
                done += k
            if err is not None:
                break
        runs = [(done, shift)]
        if len(parts) == 1:
            return PinResult(parts[0], None, done, err, runs)
        hpas = np.concatenate([np.asarray(p) for p in parts]) if parts else np.zeros(0, dtype=np.uint64)
        return PinResult(hpas, None, done, err, runs)

    def pin_fast(self, start: int, npages: int, write: bool,
                 longterm: bool) -> tuple[int, int | None, int | None] | None:
        """AddressSpace.pin_fast(): the pages that _pin_run() would pin all of
        with one mapping and one window (pin_pages_longterm(): ``longterm``,
        which unshares; pin_range() otherwise), pinned as it pins them.  Its
        checks, in its order: one PROCMAP_QUERY for the mapping, its
        protection (EFAULT: the general pin reports it; a device's
        placeholder is PROT_NONE), a short-term read pin of a read-only
        mapping needing pagemap (left to the general pin), the RAM charge
        (all of it or, as RAM would run out, nothing: the general pin logs
        deviation 12).  A window needing registration is registered as it
        would be.  Pages mlock'ed by the program are not counted here
        (count_mlocked_pages() is 0).  Pages in a registered window, the
        usual map, are _pin_fast_run()'s (C, _pin.c)."""
        obj = self._windows.get(start >> WINDOW_SHIFT)
        host = self.host
        if obj is not None and obj.users and host._query and host.mem >= 0 and not host.gone:
            done = _pin_fast_run(host.maps_fd, start, npages, write, longterm, obj, self.phys)
            if done is not False:
                return done
        vma = self.host.vma_at(start)
        if vma is None:
            return None
        prot = vma[2]
        if not (prot & PROT_WRITE if write else prot & (PROT_READ | PROT_WRITE)):
            return None
        shift = self.page_shift
        end = start + (npages << shift)
        index = start >> WINDOW_SHIFT
        if end > vma[1] or (end - 1) >> WINDOW_SHIFT != index:
            return None
        if not write and not longterm and not prot & PROT_WRITE:
            return None
        obj = self._window(index)
        p0 = (start - obj.vaddr) >> shift
        if npages == 1:
            if not obj.charge(p0, 1, False):
                return None
        elif obj.charge(p0, npages, True) < npages:
            return None
        else:
            obj.charge(p0, npages, False)
        if not obj.users:
            self._register(obj)
        repinned = add_pins(obj, p0, npages)
        if not vma[3]:
            self.files.bind(obj, p0, npages)
        return obj.phys_base + (p0 << shift), repinned, 0

    def _out_of_memory(self, what: str) -> None:
        """A pin found no free page of the machine's RAM (docs/deviations.md 12)."""
        if self.phys.log is not None:
            from ..kernel.deviations import deviation
            self.phys.log(deviation("12", what=what, used=self.phys.used_pages, total=self.phys.ram_pages))

    def count_mlocked_pages(self, start: int, length: int) -> int:
        """None that this locked_vm counts: the program's own mlock() is charged
        to its real VmLck by the host kernel, not here."""
        return 0

    def teardown(self) -> None:
        """The image is gone (exit, exec): its pinned memory is orphaned."""
        self.dead = True
        self.host.gone = True
        self.host.close()
        self.files.release(list(self._windows.values()))
        for obj in self._windows.values():
            if obj.users:
                obj.users = 0
                self.phys.release_if_unused(obj)

    def pinned_pages(self) -> int:
        """Pins held on this image's memory."""
        return sum(obj.pins for obj in self._windows.values())

    def mapped_bytes(self) -> int:
        return sum(e - s for s, e, *_ in self.host.maps())

    def resident_bytes(self) -> int:
        try:
            return int(self.host.read_file("statm").split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except (OSError, ValueError, IndexError):
            return 0


class HostEventFd(EventFd):
    """A real eventfd of the program, as the simulated kernel holds it:
    signalling it writes to the real counter, waking the program."""

    kind = "eventfd"

    def __init__(self, fd: int) -> None:
        super().__init__()
        self.fd = fd              # our duplicate of the program's eventfd
        # Closes our duplicate instead of release(): an epoll watch on it must
        # go first, as it lasts while the program keeps the eventfd open.
        self.closer: Callable[[int], None] | None = None

    def signal(self, n: int = 1) -> None:
        self.signals += 1
        try:
            os.write(self.fd, n.to_bytes(8, "little"))
        except OSError:
            pass                  # the program closed it: nobody to wake
        # A virqfd on it wakes when the transport next reads the counter (take_signal).

    def readable(self) -> bool:
        """The real counter is not zero (poll, nothing read)."""
        if self.fd < 0:
            return False
        return bool(select.select([self.fd], [], [], 0)[0])

    def take_signal(self) -> bool:
        """What the kernel's wake-up does for a virqfd: read the real counter
        without blocking (RWF_NOWAIT: the file's O_NONBLOCK is the program's
        to set), and run the handlers if it was not zero.  The transport calls
        this, as the program's writes reach the real eventfd, not us."""
        if self.fd < 0 or not self.waiters:
            return False
        try:
            os.preadv(self.fd, [bytearray(8)], -1, os.RWF_NOWAIT)
        except OSError:
            return False          # zero (EAGAIN), or closed
        for wake in list(self.waiters):
            wake(self)
        return True

    def release(self, current: "Task") -> None:
        if self.fd < 0:
            return
        fd, self.fd = self.fd, -1
        if self.closer is not None:
            self.closer(fd)
            return
        try:
            os.close(fd)
        except OSError:
            pass


@dataclass
class HostCreds:
    """Credentials and limits read from /proc/<pid>."""

    uid: int
    euid: int
    suid: int
    gid: int
    egid: int
    groups: tuple[int, ...]
    caps: frozenset[int]
    memlock: tuple[int, int]


def parse_host_creds(status: str, limits: str) -> HostCreds:
    """Parse /proc/<pid>/status (Uid, Gid, Groups, CapEff) and /proc/<pid>/limits."""
    uid = gid = (0, 0, 0, 0)
    groups: tuple[int, ...] = ()
    caps = 0
    for line in status.splitlines():
        key, _, value = line.partition(":")
        if key == "Uid":
            uid = tuple(int(x) for x in value.split())  # type: ignore[assignment]
        elif key == "Gid":
            gid = tuple(int(x) for x in value.split())  # type: ignore[assignment]
        elif key == "Groups":
            groups = tuple(int(x) for x in value.split())
        elif key == "CapEff":
            caps = int(value.strip(), 16)
    memlock = (0, 0)
    for line in limits.splitlines():
        if line.startswith("Max locked memory"):
            fields = line.split()
            soft, hard = fields[3], fields[4]
            inf = (1 << 64) - 1
            memlock = (inf if soft == "unlimited" else int(soft), inf if hard == "unlimited" else int(hard))
    return HostCreds(uid[0], uid[1], uid[2], gid[0], gid[1], groups,
                     frozenset(i for i in range(64) if caps >> i & 1), memlock)


def read_host_creds(pid: int, host: HostProcess | None = None) -> HostCreds:
    """The credentials of ``pid`` (through its bound /proc directory if given)."""
    if host is not None and host.procdir >= 0:
        return parse_host_creds(host.read_file("status"), host.read_file("limits"))
    with open(f"/proc/{pid}/status") as f:
        status = f.read()
    with open(f"/proc/{pid}/limits") as f:
        limits = f.read()
    return parse_host_creds(status, limits)
