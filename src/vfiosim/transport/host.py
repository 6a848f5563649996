"""Host-backed pieces for running real programs on the simulated kernel.

Under ``vfiosim run`` a simulated task stands for a real process.  Its
memory is the real process's memory: user pointers passed to ioctls are
read and written with process_vm_readv/process_vm_writev, pinned pages are
the process's real pages, and a device's DMA lands in them.  Interrupts
signal the program's real eventfds.  These classes implement the kernel's
interfaces (the ``AddressSpace`` of kernel/mm.py, a ``File`` for eventfds)
on top of the host; the kernel itself stays free of real I/O.

Limitation: a pin does not hold a real page in place.  If the program
unmaps a buffer that is still DMA-mapped and maps something else there, a
DMA reaches the new mapping (on Linux it would reach the old, still pinned,
page).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import select
import struct
from dataclasses import dataclass
from errno import EFAULT
from typing import TYPE_CHECKING, Callable

import numpy as np

from ..kernel.errors import fail
from ..kernel.eventfd import EventFd
from ..kernel.mm import PROT_EXEC, PROT_READ, PROT_WRITE, AddressSpace, PhysicalMemory, PinResult, Vma

if TYPE_CHECKING:
    from ..kernel.task import Task

_libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)


class _iovec(ctypes.Structure):
    _fields_ = [("iov_base", ctypes.c_void_p), ("iov_len", ctypes.c_size_t)]


_libc.process_vm_readv.restype = ctypes.c_ssize_t
_libc.process_vm_writev.restype = ctypes.c_ssize_t


class HostProcess:
    """Memory and /proc views of one real process."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        # Set when the image this stands for is gone (exit, exec): the pid
        # may now name a new image, or another process.
        self.gone = False

    def read(self, addr: int, n: int) -> bytes:
        """process_vm_readv(); EFAULT unless all ``n`` bytes were read."""
        if n == 0:
            return b""
        buf = ctypes.create_string_buffer(n)
        local = _iovec(ctypes.cast(buf, ctypes.c_void_p), n)
        remote = _iovec(addr, n)
        got = _libc.process_vm_readv(self.pid, ctypes.byref(local), 1, ctypes.byref(remote), 1, 0)
        if got != n:
            raise fail(EFAULT, f"cannot read {n} bytes at {addr:#x} in process {self.pid}")
        return buf.raw

    def write(self, addr: int, data: bytes | bytearray | memoryview) -> None:
        """process_vm_writev(); honours the mapping's protection (no FOLL_FORCE)."""
        data = bytes(data)
        n = len(data)
        if n == 0:
            return
        buf = ctypes.create_string_buffer(data, n)
        local = _iovec(ctypes.cast(buf, ctypes.c_void_p), n)
        remote = _iovec(addr, n)
        got = _libc.process_vm_writev(self.pid, ctypes.byref(local), 1, ctypes.byref(remote), 1, 0)
        if got != n:
            raise fail(EFAULT, f"cannot write {n} bytes at {addr:#x} in process {self.pid}")

    def device_write(self, addr: int, data: bytes | bytearray | memoryview) -> None:
        """A DMA write: like a device, it ignores the CPU's page protection."""
        try:
            fd = os.open(f"/proc/{self.pid}/mem", os.O_WRONLY)
        except OSError:
            self.write(addr, data)
            return
        try:
            if os.pwrite(fd, bytes(data), addr) != len(data):
                raise fail(EFAULT, f"DMA write of {len(data)} bytes at {addr:#x} in process {self.pid} was short")
        except OSError:
            raise fail(EFAULT, f"DMA write at {addr:#x} in process {self.pid} failed") from None
        finally:
            os.close(fd)

    def maps(self) -> list[tuple[int, int, int, bool, str]]:
        """(start, end, prot, private anonymous-like, path) of each mapping."""
        out = []
        try:
            with open(f"/proc/{self.pid}/maps") as f:
                lines = f.readlines()
        except OSError:
            return []
        for line in lines:
            parts = line.split(maxsplit=5)
            start, end = (int(x, 16) for x in parts[0].split("-"))
            perms = parts[1]
            prot = (PROT_READ if perms[0] == "r" else 0) | (PROT_WRITE if perms[1] == "w" else 0) | \
                (PROT_EXEC if perms[2] == "x" else 0)
            path = parts[5].strip() if len(parts) > 5 else ""
            out.append((start, end, prot, perms[3] == "p", path))
        return out

    def present(self, pages: np.ndarray, page_shift: int) -> np.ndarray:
        """Whether each page (virtual address >> 12 of the host) is populated
        (present or swapped), from /proc/<pid>/pagemap."""
        out = np.zeros(pages.size, dtype=np.bool_)
        try:
            with open(f"/proc/{self.pid}/pagemap", "rb") as f:
                for i, page in enumerate(pages.tolist()):
                    f.seek((page << page_shift >> 12) * 8)
                    raw = f.read(8)
                    if len(raw) == 8:
                        entry = struct.unpack("<Q", raw)[0]
                        out[i] = bool(entry >> 62 & 3)
        except OSError:
            out[:] = True
        return out


class HostMemoryObject:
    """Physical memory standing for one real mapping: DMA reads and writes
    reach the process at the same offset."""

    __slots__ = ("phys_base", "length", "page_shift", "compound_shift", "pincount", "pins", "users",
                 "pinnable", "host", "vaddr", "populated", "orphan")

    def __init__(self, host: HostProcess, vaddr: int, length: int, page_shift: int) -> None:
        self.host = host
        self.vaddr = vaddr
        self.phys_base = 0
        self.length = length
        self.page_shift = page_shift
        self.compound_shift = page_shift
        npages = (length + (1 << page_shift) - 1) >> page_shift
        self.pincount = np.zeros(npages, dtype=np.int32)   # a page refcount is an atomic_t
        self.populated = np.ones(npages, dtype=np.bool_)
        self.pins = 0
        self.users = 0
        self.pinnable = True
        self.orphan: np.ndarray | None = None

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

    def read_at(self, off: int, n: int) -> bytes:
        mem = self._orphaned()
        if mem is not None:
            return mem[off:off + n].tobytes()
        return self.host.read(self.vaddr + off, n)

    def read_into(self, off: int, out: np.ndarray) -> None:
        mem = self._orphaned()
        if mem is not None:
            out[:] = mem[off:off + out.size]
            return
        out[:] = np.frombuffer(self.host.read(self.vaddr + off, out.size), dtype=np.uint8)

    def write_at(self, off: int, data: "bytes | bytearray | memoryview | np.ndarray") -> None:
        mem = self._orphaned()
        if mem is not None:
            src = data if isinstance(data, np.ndarray) else np.frombuffer(data, dtype=np.uint8)
            mem[off:off + src.size] = src
            return
        # A device writes whatever the CPU mapping's protection is now (the
        # IOMMU already checked the TCE's permission), so write through
        # /proc/<pid>/mem, which does not honour PROT_WRITE.
        self.host.device_write(self.vaddr + off, data.tobytes() if isinstance(data, np.ndarray) else data)

    def __repr__(self) -> str:
        return f"<HostMemoryObject pid={self.host.pid} vaddr={self.vaddr:#x} len={self.length:#x} pins={self.pins}>"


class HostMM(AddressSpace):
    """The address space of a simulated task that is a real process."""

    def __init__(self, pid: int, phys: PhysicalMemory) -> None:
        super().__init__(phys)
        self.host = HostProcess(pid)
        self._objects: dict[tuple[int, int], HostMemoryObject] = {}

    # -- copy_from_user / copy_to_user --------------------------------------------------------

    def read(self, addr: int, n: int) -> bytes:
        if addr < 0 or n < 0 or addr + n > 1 << 64:
            raise fail(EFAULT, f"bad address range {addr:#x}+{n:#x}")
        return self.host.read(addr, n)

    def write(self, addr: int, data: bytes | bytearray | memoryview) -> None:
        if addr < 0 or addr + len(data) > 1 << 64:
            raise fail(EFAULT, f"bad address range {addr:#x}+{len(data):#x}")
        self.host.write(addr, data)

    # -- mappings ---------------------------------------------------------------------------------

    def _object(self, start: int, end: int) -> HostMemoryObject:
        obj = self._objects.get((start, end))
        if obj is None or (obj.pins == 0 and obj not in self.phys.objects()):
            obj = HostMemoryObject(self.host, start, end - start, self.page_shift)
            self._objects[(start, end)] = obj
        return obj

    def vmas(self) -> list[Vma]:
        out = []
        for start, end, prot, private, path in self.host.maps():
            obj = self._object(start, end)
            out.append(Vma(start, end, prot, obj, 0, kind="anon" if private else "shared"))
        return out

    def find_vma(self, addr: int) -> Vma | None:
        for vma in self.vmas():
            if vma.start <= addr < vma.end:
                return vma
        return None

    def pin_pages_longterm(self, start: int, npages: int, write: bool) -> PinResult:
        """As MM.pin_pages_longterm (Type1's FOLL_LONGTERM pin): a read pin of a
        never-written page of a read-only private mapping unshares the zero
        page and succeeds, where pin_pages() faults."""
        addrs = np.uint64(start) + (np.arange(npages, dtype=np.uint64) << np.uint64(self.page_shift))
        return self.pin_pages(addrs, write, unshare=True)

    def pin_pages(self, addrs: np.ndarray, write: bool, dry_run: bool = False, unshare: bool = False) -> PinResult:
        """As MM.pin_pages, against the process's real mappings."""
        n = int(addrs.size)
        hpas = np.zeros(n, dtype=np.uint64)
        shifts = np.full(n, self.page_shift, dtype=np.int64)
        vmas = self.vmas()
        starts = np.array([v.start for v in vmas], dtype=np.uint64)
        done, err = 0, None
        while done < n:
            addr = int(addrs[done])
            i = int(np.searchsorted(starts, np.uint64(addr), side="right")) - 1
            vma = vmas[i] if i >= 0 and addr < vmas[i].end else None
            if vma is None or not vma.readable() or (write and not vma.writable()):
                err = EFAULT
                break
            stop = done + int(np.searchsorted(addrs[done:], np.uint64(vma.end), side="left"))
            seg = addrs[done:stop]
            if not write and not vma.writable() and not unshare:
                missing = ~self.host.present(seg >> np.uint64(self.page_shift), self.page_shift)
                if missing.any():
                    cut = int(np.argmax(missing))
                    seg, stop, err = seg[:cut], done + cut, EFAULT
            obj = vma.obj
            pages = ((seg - np.uint64(vma.start)) >> np.uint64(self.page_shift)).astype(np.int64)
            if not dry_run and pages.size:
                if obj.pins == 0 and obj not in self.phys.objects():
                    self.phys.register(obj, obj.length)
                np.add.at(obj.pincount, pages, 1)
                obj.pins += int(pages.size)
            hpas[done:stop] = np.uint64(obj.phys_base) + (pages.astype(np.uint64) << np.uint64(self.page_shift))
            done = stop
            if err is not None:
                break
        return PinResult(hpas[:done], shifts[:done], done, err)

    def pin_range(self, addr: int, npages: int, write: bool, dry_run: bool = False, tag: int = 0) -> PinResult:
        """Consecutive pages: as pin_pages over their addresses."""
        addrs = np.uint64(addr) + (np.arange(npages, dtype=np.uint64) << np.uint64(self.page_shift))
        res = self.pin_pages(addrs, write, dry_run)
        if tag:
            res.hpas = res.hpas | np.uint64(tag)
        return res

    def count_mlocked_pages(self, start: int, length: int) -> int:
        """None that this locked_vm counts: the program's own mlock() is charged
        to its real VmLck by the host kernel, not here."""
        return 0

    def teardown(self) -> None:
        """The image is gone (exit, exec): its pinned memory is orphaned."""
        self.dead = True
        self.host.gone = True

    def pinned_pages(self) -> int:
        """Pins held on this image's memory."""
        return sum(obj.pins for obj in self._objects.values())

    def mapped_bytes(self) -> int:
        return sum(e - s for s, e, *_ in self.host.maps())

    def resident_bytes(self) -> int:
        try:
            with open(f"/proc/{self.host.pid}/statm") as f:
                return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except OSError:
            return 0


class HostEventFd(EventFd):
    """A real eventfd of the program, as the simulated kernel holds it:
    signalling it writes to the real counter, waking the program."""

    kind = "eventfd"

    def __init__(self, fd: int) -> None:
        super().__init__()
        self.fd = fd              # our duplicate of the program's eventfd
        # Called before our duplicate is closed: an epoll watch must go first,
        # as it lasts while the program keeps the eventfd open.
        self.before_close: Callable[[], None] | None = None

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
        if self.before_close is not None:
            self.before_close()
        try:
            os.close(self.fd)
        except OSError:
            pass
        self.fd = -1


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


def read_host_creds(pid: int) -> HostCreds:
    """Parse /proc/<pid>/status (Uid, Gid, Groups, CapEff) and /proc/<pid>/limits."""
    uid = gid = (0, 0, 0, 0)
    groups: tuple[int, ...] = ()
    caps = 0
    with open(f"/proc/{pid}/status") as f:
        for line in f:
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
    with open(f"/proc/{pid}/limits") as f:
        for line in f:
            if line.startswith("Max locked memory"):
                fields = line.split()
                soft, hard = fields[3], fields[4]
                inf = (1 << 64) - 1
                memlock = (inf if soft == "unlimited" else int(soft), inf if hard == "unlimited" else int(hard))
    return HostCreds(uid[0], uid[1], uid[2], gid[0], gid[1], groups,
                     frozenset(i for i in range(64) if caps >> i & 1), memlock)
