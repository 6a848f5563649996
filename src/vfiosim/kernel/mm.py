"""Memory: simulated physical memory and per-process address spaces.

Physical memory is a set of :class:`MemoryObject` allocations, each a
contiguous range of host physical addresses backed by one NumPy byte array.
A process's :class:`MM` maps virtual ranges (:class:`Vma`) onto them.  The
IOMMU stores host physical addresses, so a device's DMA reaches whatever
physical page was pinned, even after the process unmapped its virtual range,
exactly as on real hardware: pinned pages outlive their mapping.

What the kernel checks and observable through the uAPI is modelled: VMA
protections (EFAULT), population (the shared zero page), pin counts, and the
``locked_vm``/``pinned_vm`` counters shown as ``VmLck``/``VmPin``.

RAM is a bound, as on a machine: a page costs RAM when it is first touched
(a store, a fault taken for a pin), never when it is only mapped, and gives
it back when it is neither mapped nor pinned.  The host memory behind a
large object is reserved without being committed (MAP_NORESERVE), so a
mapping far larger than the host costs what is written to it.  mmap(2)
follows the vm.* sysctls (``VmSysctl``): heuristic overcommit and
vm.max_map_count.
"""

from __future__ import annotations

import bisect
import mmap
import struct
from platform import machine as _host_arch
from abc import ABC, abstractmethod
from dataclasses import dataclass
from errno import EAGAIN, EFAULT, EINVAL, ENOMEM, EPERM, ESRCH
from typing import TYPE_CHECKING, Any, Callable, Iterator, Protocol, cast

import numpy as np

from .cred import CAP_IPC_LOCK
from .errors import KernelBug, KernelError, fail
from .progression import Progression, as_progression

if TYPE_CHECKING:
    from .faults import FaultInjector
    from .iommu.prereg import MmIommuIndex, MmIommuMem
    from .task import Task

PROT_NONE = 0
PROT_READ = 1
PROT_WRITE = 2
PROT_EXEC = 4
_PROT_ALL = PROT_READ | PROT_WRITE | PROT_EXEC
_PROT_RW = PROT_READ | PROT_WRITE

# Where anonymous mmaps start (grows upwards) and where the in-process ioctl
# argument buffer is mapped while a call runs.  Both are far from 0 so that
# small integers passed as pointers fault, as NULL-ish pointers do.
MMAP_BASE = 0x7F00_0000_0000
ARG_BASE = 0x7FFE_0000_0000
PHYS_BASE = 0x1_0000_0000

# vm.max_map_count's default, DEFAULT_MAX_MAP_COUNT = USHRT_MAX - MAPCOUNT_ELF_CORE_MARGIN
# (include/linux/mm.h), and vm.overcommit_memory's modes (include/uapi/linux/mman.h).
DEFAULT_MAX_MAP_COUNT = 65530
OVERCOMMIT_GUESS = 0
OVERCOMMIT_ALWAYS = 1
OVERCOMMIT_NEVER = 2

# MAP_NORESERVE of the host (<asm/mman.h>: 0x40 on powerpc and sparc, 0x4000 elsewhere).
_MAP_NORESERVE = getattr(mmap, "MAP_NORESERVE", 0x40 if _host_arch().startswith(("ppc", "sparc")) else 0x4000)
# Objects from this size on get host memory reserved without being committed.
_LAZY_BYTES = 1 << 21


def zeroed_bytes(length: int) -> np.ndarray:
    """``length`` zero bytes that cost host memory only where they are written.

    Small objects are ordinary arrays.  Large ones are a private anonymous
    host mapping with MAP_NORESERVE: the host's overcommit heuristic does
    not refuse it however large it is, and untouched pages read as zeros
    without being allocated."""
    if length < _LAZY_BYTES:
        return np.zeros(length, dtype=np.uint8)
    try:
        buf = mmap.mmap(-1, length, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | _MAP_NORESERVE)
    except (OSError, OverflowError) as exc:
        raise fail(ENOMEM, f"the host cannot reserve {length:#x} bytes of address space for simulated memory "
                           f"({exc})") from None
    return np.frombuffer(buf, dtype=np.uint8)


@dataclass
class VmSysctl:
    """The vm.* sysctls mmap(2) obeys (/proc/sys/vm)."""

    max_map_count: int = DEFAULT_MAX_MAP_COUNT
    overcommit_memory: int = OVERCOMMIT_GUESS


class PhysicalPages(Protocol):
    """A physically contiguous range of host memory, as the kernel sees it:
    its pages' pin counts and population, and what a device's DMA reads and
    writes there.  A :class:`MemoryObject` holds its own bytes; under
    ``vfiosim run`` a real process's pages stand in (transport/host.py)."""

    phys_base: int
    length: int
    page_shift: int
    compound_shift: int
    populated: np.ndarray
    pincount: np.ndarray
    pins: int
    users: int
    pinnable: bool
    # Pages whose RAM goes back with their last pin (None: none), and what
    # dropping pins does to them.
    unmapped: np.ndarray | None

    def unpinned(self, p0: int, n: int) -> None: ...

    # Drop one pin on each of pages [p0, p0+n) of obj: False (nothing
    # changed) when one had none.  A function of the class (a staticmethod: C
    # or Python), as every small UNMAP_DMA and sPAPR's every TCE cleared calls it.
    @property
    def unpin_run(self) -> "Callable[[PhysicalPages, int, int], bool]": ...

    def read_at(self, off: int, n: int) -> bytes: ...

    def read_into(self, off: int, out: np.ndarray) -> None: ...

    def write_at(self, off: int, data: bytes | bytearray | memoryview | np.ndarray) -> None: ...

    def read_ranges(self, offs: list[int], lens: list[int], out: memoryview) -> None:
        """read_at() of several ranges into ``out`` (bytes, one range after the
        other), in as few host operations as it can."""
        ...

    def write_ranges(self, offs: list[int], lens: list[int], data: memoryview) -> None:
        """write_at() of several ranges, in order, from ``data`` (bytes, one
        range after the other), in as few host operations as it can."""
        ...


def take_ram(present: np.ndarray, ram: "PhysicalMemory | None", p0: int, n: int, dry_run: bool) -> int:
    """Give each of pages [p0, p0+n) not yet ``present`` a page of ``ram``
    (None: no bound) and mark it present.  Returns how many pages from ``p0``
    have one afterwards: ``n``, or fewer when RAM ran out at page ``p0`` + the
    result (the pages before it keep theirs).  ``dry_run`` changes nothing.
    A page faulted in (MemoryObject) and a host page charged for its first pin
    (the run transport's HostMemoryObject) cost RAM alike."""
    if n == 1:                         # the usual small case: no NumPy reductions
        if present[p0]:
            return 1
        if ram is not None:
            if ram.ram_pages is not None and ram.used_pages >= ram.ram_pages:
                return 0
            if not dry_run:
                ram.used_pages += 1
        if not dry_run:
            present[p0] = True
        return 1
    seg = present[p0:p0 + n]
    missing = n - int(np.count_nonzero(seg))
    if not missing:
        return n
    room = missing if ram is None else min(missing, ram.free_pages())
    got = n if room == missing else int(np.flatnonzero(~seg)[room])
    if not dry_run:
        if ram is not None:
            ram.used_pages += room
        seg[:got] = True
    return got


def take_ram_pages(present: np.ndarray, ram: "PhysicalMemory | None", pages: np.ndarray, dry_run: bool) -> int:
    """take_ram() for a list of page numbers (in order, repeats allowed): how
    many leading entries name a page that has RAM afterwards."""
    missing = ~present[pages]
    if not missing.any():
        return int(pages.size)
    want, first = np.unique(pages[missing], return_index=True)
    room = want.size if ram is None else min(int(want.size), ram.free_pages())
    if room == want.size:
        got, new = int(pages.size), want
    else:
        got = int(np.flatnonzero(missing)[np.sort(first)[room]])
        new = np.unique(pages[:got][missing[:got]])
    if not dry_run:
        if ram is not None:
            ram.used_pages += int(new.size)
        present[new] = True
    return got


def unpin_run_of(obj: PhysicalPages, p0: int, n: int) -> bool:
    """PhysicalPages.unpin_run() of any memory: one pin less on each of pages
    [p0, p0+n) (one page in scalar operations, more with slice operations),
    what dropping them does to the pages (its ``unpinned()``); False, nothing
    changed, when one of them had no pin."""
    pincount = obj.pincount
    if n == 1:
        count = pincount.item(p0)
        if count <= 0:
            return False
        pincount[p0] = count - 1
    else:
        seg = pincount[p0:p0 + n]
        if seg.min(initial=1) <= 0:
            return False
        seg -= 1
    obj.pins -= n
    if obj.unmapped is not None:
        obj.unpinned(p0, n)
    return True


class PinCounted(Protocol):
    """What counts pins per page: a MemoryObject, the run transport's HostMemoryObject."""
    pincount: np.ndarray
    pins: int


def add_pins(obj: PinCounted, first: int, npages: int) -> int:
    """One more pin on each of pages [first, first+npages) of ``obj`` (a memory
    object's ``pincount`` and ``pins``): how many of them another pin held
    already (what pin_fast() reports for deviation 9)."""
    pincount = obj.pincount
    if npages == 1:
        count = pincount.item(first)
        pincount[first] = count + 1
        repinned = int(count > 0)
    else:
        seg = pincount[first:first + npages]
        repinned = int(np.count_nonzero(seg)) if obj.pins else 0
        seg += 1
    obj.pins += npages
    return repinned


class MemoryObject:
    """A physically contiguous allocation: pages, their data and pin counts.

    ``owner`` is the machine's physical memory, whose RAM a page uses from
    the moment it is present (``populated``) until it is neither mapped nor
    pinned; None for memory that is not RAM (the in-process API's ioctl
    argument buffers)."""

    __slots__ = ("phys_base", "length", "data", "view", "page_shift", "compound_shift",
                 "populated", "pincount", "pins", "users", "pinnable", "owner", "unmapped")

    unpin_run = staticmethod(unpin_run_of)

    def __init__(self, phys_base: int, data: np.ndarray, page_shift: int,
                 compound_shift: int, pinnable: bool = True, owner: "PhysicalMemory | None" = None) -> None:
        self.phys_base = phys_base
        self.length = int(data.shape[0])
        self.data = data
        self.view = data.data      # the same bytes: small copies through it cost less
        self.page_shift = page_shift
        # The size of the (compound) page backing this memory: what
        # tce_page_is_contained() compares the IOMMU page size against.
        self.compound_shift = compound_shift
        npages = (self.length + (1 << page_shift) - 1) >> page_shift
        self.populated = np.zeros(npages, dtype=np.bool_)
        self.pincount = np.zeros(npages, dtype=np.int32)   # a page refcount is an atomic_t
        self.pins = 0          # total pins, so freeing needs no array scan
        self.users = 0         # VMAs mapping (part of) this object
        self.pinnable = pinnable
        self.owner = owner
        # Pages whose mapping went while a pin held them: they go back to
        # RAM with their last pin (allocated the first time that happens).
        self.unmapped: np.ndarray | None = None

    def read_at(self, off: int, n: int) -> bytes:
        """What a device reads from this memory (a DMA run)."""
        return self.data[off:off + n].tobytes()

    def read_into(self, off: int, out: np.ndarray) -> None:
        """A DMA read straight into a device's buffer (a uint8 array)."""
        out[:] = self.data[off:off + out.size]

    def write_at(self, off: int, data: bytes | bytearray | memoryview | np.ndarray) -> None:
        """A device writes this memory (a DMA run).  Through an IOMMU a DMA
        reaches only pinned pages, which are present: a write changes no
        page's presence (nor the RAM in use)."""
        src = data if isinstance(data, np.ndarray) else np.frombuffer(data, dtype=np.uint8)
        self.data[off:off + src.size] = src

    # -- RAM ---------------------------------------------------------------------------------

    def fault_in(self, p0: int, n: int, dry_run: bool = False) -> int:
        """handle_mm_fault() for pages [p0, p0+n): each page not present gets
        a page of RAM.  Returns how many pages from ``p0`` are present after
        it: ``n``, or fewer when RAM ran out at page ``p0`` + the result
        (the pages before it keep what they got).  ``dry_run`` changes
        nothing and says how far it would get."""
        return take_ram(self.populated, self.owner, p0, n, dry_run)

    def fault_in_pages(self, pages: np.ndarray, dry_run: bool = False) -> int:
        """fault_in() for a list of page numbers (in order, repeats allowed):
        how many leading entries name a page that is present afterwards."""
        return take_ram_pages(self.populated, self.owner, pages, dry_run)

    def unmap_pages(self, p0: int, n: int) -> None:
        """Pages [p0, p0+n) lost their mapping (munmap, exit): those no pin
        holds go back to RAM now, the others with their last pin."""
        owner = self.owner
        if owner is None or n <= 0:
            return
        pop = self.populated[p0:p0 + n]
        if self.pins:
            held = self.pincount[p0:p0 + n] > 0
            kept = pop & held
            if kept.any():
                if self.unmapped is None:
                    self.unmapped = np.zeros(self.populated.size, dtype=np.bool_)
                self.unmapped[p0:p0 + n] |= kept
            freed = pop & ~held
            count = int(np.count_nonzero(freed))
            pop &= held
        else:
            count = int(np.count_nonzero(pop))
            pop[:] = False
            self._return_host_memory(p0, n)
        owner.used_pages -= count

    def unpinned(self, p0: int, n: int) -> None:
        """Pins on pages [p0, p0+n) were dropped: an unmapped page whose last
        pin went is free (put_page() of its last reference)."""
        if self.unmapped is None or self.owner is None:
            return
        gone = self.unmapped[p0:p0 + n] & (self.pincount[p0:p0 + n] == 0)
        count = int(np.count_nonzero(gone))
        if count:
            self.unmapped[p0:p0 + n] &= ~gone
            self.populated[p0:p0 + n] &= ~gone
            self.owner.used_pages -= count

    def release(self) -> None:
        """The object is gone (nothing maps or pins it): its RAM is free."""
        if self.owner is not None:
            self.owner.used_pages -= int(np.count_nonzero(self.populated))
            self.populated[:] = False

    def _return_host_memory(self, p0: int, n: int) -> None:
        """Give the host back the memory of freed pages of a large object."""
        base = self.data.base
        if isinstance(base, mmap.mmap):
            start, length = p0 << self.page_shift, min(n << self.page_shift, self.length - (p0 << self.page_shift))
            if length >= mmap.PAGESIZE and not start % mmap.PAGESIZE:
                base.madvise(mmap.MADV_DONTNEED, start, length - length % mmap.PAGESIZE)

    def host_pointer(self, off: int, n: int) -> int | None:
        """This process's address of bytes [off, off+n) (a native DMA path
        copies there directly: virtio_native.py); the object keeps its array
        for its whole life."""
        data = self.data
        if off < 0 or n <= 0 or off + n > self.length or not data.flags.c_contiguous:
            return None
        return int(data.__array_interface__["data"][0]) + off

    def read_ranges(self, offs: list[int], lens: list[int], out: memoryview) -> None:
        mem = self.data.data
        pos = 0
        for off, n in zip(offs, lens):
            out[pos:pos + n] = mem[off:off + n]
            pos += n

    def write_ranges(self, offs: list[int], lens: list[int], data: memoryview) -> None:
        mem = self.data.data
        pos = 0
        for off, n in zip(offs, lens):
            mem[off:off + n] = data[pos:pos + n]
            pos += n

    def __repr__(self) -> str:
        return f"<MemoryObject phys={self.phys_base:#x} len={self.length:#x} pins={self.pins}>"


class PhysicalMemory:
    """Host physical address space: allocates objects, resolves addresses."""

    def __init__(self, page_size: int) -> None:
        self.page_size = page_size
        self.page_shift = page_size.bit_length() - 1
        self._bases: list[int] = []
        self._objs: list[PhysicalPages] = []
        self._mmio: list[PhysicalPages] = []      # device memory (register_mmio), looked up last
        self._next = PHYS_BASE
        # RAM: totalram_pages() (None, unbounded, until the platform says),
        # and the pages present in some process's memory or held by a pin.
        # The kernel's own memory (page tables, TCE tables, slab) is not counted.
        self.ram_pages: int | None = None
        self.used_pages = 0
        self.vm = VmSysctl()
        # Set by the kernel: its fault injector (kernel/faults.py) and printk,
        # for code that reaches the kernel only through an mm; and the OOM
        # killer, which a process's own store that finds no free page calls
        # (it returns whether it killed a task, freeing what it held).
        self.faults: "FaultInjector | None" = None
        self.log: Callable[[str], None] | None = None
        self.oom_killer: "Callable[[Task], bool] | None" = None

    # -- RAM ------------------------------------------------------------------------------------

    def free_pages(self) -> int:
        """Pages of RAM not in use (a very large number when RAM is unbounded)."""
        return 1 << 62 if self.ram_pages is None else max(self.ram_pages - self.used_pages, 0)

    def vm_enough_memory(self, pages: int, current: "Task | None") -> None:
        """__vm_enough_memory() (mm/util.c) for a new accountable mapping.

        vm.overcommit_memory 0 (OVERCOMMIT_GUESS, the default) refuses only a
        single mapping larger than all of RAM (and swap: there is none); 1
        accepts anything.  2 (OVERCOMMIT_NEVER: commit accounting) is not
        modelled, and refused when set."""
        if self.vm.overcommit_memory == OVERCOMMIT_GUESS and self.ram_pages is not None and pages > self.ram_pages:
            if self.log is not None and current is not None:
                self.log(f"__vm_enough_memory: pid: {current.pid}, comm: {current.comm}, bytes: "
                         f"{pages << self.page_shift} not enough memory for the allocation")
            raise fail(ENOMEM, f"a private writable mapping of {pages << self.page_shift:#x} bytes is larger than "
                               f"the machine's RAM ({self.ram_pages << self.page_shift:#x} bytes): the heuristic "
                               f"overcommit (vm.overcommit_memory=0) refuses it; map it with MAP_NORESERVE, "
                               f"PROT_NONE first, or set vm.overcommit_memory=1")

    # -- allocation ----------------------------------------------------------------------------

    def allocate(self, length: int, compound_shift: int | None = None) -> MemoryObject:
        """Allocate ``length`` bytes (page multiple) of zeroed memory; no page
        of it is present (nor uses RAM) until touched."""
        shift = compound_shift if compound_shift is not None else self.page_shift
        align = max(1 << shift, 1 << 21)
        base = (self._next + align - 1) & ~(align - 1)
        obj = MemoryObject(base, zeroed_bytes(length), self.page_shift, shift, owner=self)
        # Leave a hole after each allocation: physically adjacent objects
        # would let a DMA run from one process's memory into another's.
        self._next = base + length + align
        self._insert(obj)
        return obj

    def register(self, obj: PhysicalPages, length: int, align: int = 1 << 21) -> int:
        """Give memory that lives elsewhere (a host process's pages) a range of
        physical addresses; returns its base."""
        base = (self._next + align - 1) & ~(align - 1)
        self._next = base + length + align
        obj.phys_base = base
        self._insert(obj)
        return base

    def register_mmio(self, obj: PhysicalPages) -> None:
        """Make device memory that has its own physical address (a BAR, on a
        platform where bus and host physical addresses are one) reachable at
        ``obj.phys_base`` by lookup(), for peer-to-peer DMA.  It is not one
        of objects(): it is not memory the kernel allocates or pins."""
        end = obj.phys_base + obj.length
        for other in self._objs + self._mmio:
            if other.phys_base < end and obj.phys_base < other.phys_base + other.length:
                raise KernelBug(f"{obj!r} overlaps {other!r} in the physical address space")
        self._mmio.append(obj)

    def _insert(self, obj: PhysicalPages) -> None:
        i = bisect.bisect(self._bases, obj.phys_base)
        self._bases.insert(i, obj.phys_base)
        self._objs.insert(i, obj)

    def release_if_unused(self, obj: PhysicalPages) -> None:
        if obj.users == 0 and obj.pins == 0:
            i = bisect.bisect_left(self._bases, obj.phys_base)
            if i < len(self._objs) and self._objs[i] is obj:
                del self._bases[i]
                del self._objs[i]
                if isinstance(obj, MemoryObject):
                    obj.release()

    def lookup(self, hpa: int) -> tuple[PhysicalPages, int] | None:
        """Return (object, offset) holding physical address ``hpa``."""
        i = bisect.bisect_right(self._bases, hpa) - 1
        if i >= 0:
            obj = self._objs[i]
            off = hpa - obj.phys_base
            if off < obj.length:
                return obj, off
        for obj in self._mmio:
            off = hpa - obj.phys_base
            if 0 <= off < obj.length:
                return obj, off
        return None

    def objects(self) -> list[PhysicalPages]:
        return list(self._objs)

    def pinned_pages(self) -> int:
        """Total page pins held anywhere (0 when nothing is pinned)."""
        return sum(o.pins for o in self._objs)

    # -- pin bookkeeping on physical addresses (unpin is by hpa, as the
    #    kernel's put_page(pfn_to_page(hpa >> PAGE_SHIFT)) is) -------------

    def _unpin_pages(self, obj: PhysicalPages, p0: int, n: int) -> None:
        """Drop one pin on each of pages [p0, p0+n) of ``obj``."""
        if not obj.unpin_run(obj, p0, n):
            raise KernelBug(f"page pin count below zero in {obj!r}")
        if not obj.pins and not obj.users:
            self.release_if_unused(obj)

    def _unpin_run(self, run: Progression) -> bool:
        """Unpin consecutive kernel pages of one object; False (nothing done)
        if ``run`` is not that."""
        if run.size == 0:
            return True
        found = self.lookup(run.first)
        if found is None:
            return False
        obj, off = found
        if run.step != 1 << obj.page_shift or off + (run.size - 1) * run.step >= obj.length:
            return False
        self._unpin_pages(obj, off >> obj.page_shift, run.size)
        return True

    def unpin_range(self, hpa: int, pages: int) -> None:
        """Drop one pin on each of ``pages`` consecutive pages from ``hpa``."""
        i = bisect.bisect_right(self._bases, hpa) - 1      # lookup(), for RAM
        if i >= 0:
            obj = self._objs[i]
            off = hpa - obj.phys_base
            shift = self.page_shift
            if obj.page_shift == shift and off + ((pages - 1) << shift) < obj.length:
                # _unpin_pages(), inline: every small UNMAP_DMA (and sPAPR's
                # every TCE cleared) drops its pins here.
                if not obj.unpin_run(obj, off >> shift, pages):
                    raise KernelBug(f"page pin count below zero in {obj!r}")
                if not obj.pins and not obj.users:
                    self.release_if_unused(obj)
                return
        self.unpin(Progression(hpa, self.page_size, pages))

    def unpin(self, hpas: "np.ndarray | list[int] | Progression") -> None:
        """Drop one pin on the page holding each physical address."""
        if isinstance(hpas, Progression):
            if self._unpin_run(hpas):
                return
            hpas = np.asarray(hpas)
        arr = np.asarray(hpas, dtype=np.uint64)
        if arr.size == 0:
            return
        # The usual case: consecutive pages of one object, in order.
        if arr.size > 1:
            run = as_progression(arr, self.page_size)
            if run is not None and self._unpin_run(run):
                return
        elif self._unpin_run(Progression(int(arr[0]), self.page_size, 1)):
            return
        bases = np.asarray(self._bases, dtype=np.uint64)
        idx = np.searchsorted(bases, arr, side="right").astype(np.int64) - 1
        if int(idx.min()) < 0:
            raise KernelBug(f"unpin of unknown physical address {int(arr[idx < 0][0]):#x}")
        # Objects are looked up before any is released: releasing one removes
        # it from _objs and would shift the indices of those after it.
        for i, obj in [(i, self._objs[int(i)]) for i in np.unique(idx)]:
            offs = arr[idx == i] - np.uint64(obj.phys_base)
            pages = (offs >> np.uint64(obj.page_shift)).astype(np.int64)
            if pages.size and int(pages.max()) >= obj.pincount.size:
                raise KernelBug(f"unpin past the end of {obj!r}")
            np.subtract.at(obj.pincount, pages, 1)
            if obj.pincount.min(initial=0) < 0:
                raise KernelBug(f"page pin count below zero in {obj!r}")
            obj.pins -= int(pages.size)
            if obj.unmapped is not None:
                lo, hi = int(pages.min()), int(pages.max()) + 1
                obj.unpinned(lo, hi - lo)
            self.release_if_unused(obj)


class DeviceMapping(Protocol):
    """``vm_ops`` of a device mapping (vfio-pci's vfio_pci_mmap_ops) and its
    ``vm_file``; offsets are in the device memory the mapping's ``obj``
    stands for.  Each VMA holds a reference to the file: ``open()`` when a
    VMA is split off or copied by fork, ``close()`` when one goes."""

    def open(self) -> None: ...

    def close(self) -> None: ...

    def access(self, off: int, size: int, value: int | None) -> int:
        """A CPU load (``value`` None) or store of ``size`` bytes."""
        ...

    def fault(self, off: int, write: bool) -> None:
        """The fault handler inserting the page's pfn: raises (EFAULT, what
        VM_FAULT_SIGBUS becomes for fixup_user_fault()) where it would refuse."""
        ...


@dataclass(slots=True)
class Vma:
    start: int
    end: int
    prot: int
    obj: PhysicalPages
    pgoff: int                 # byte offset of ``start`` inside ``obj``
    # "anon", "arg" (the in-process ioctl buffer) or "pfnmap" (device memory:
    # a vfio-pci BAR, VM_IO | VM_PFNMAP; its pages are not RAM, GUP refuses them)
    kind: str = "anon"
    locked: bool = False       # VM_LOCKED
    accounted: bool = False    # VM_ACCOUNT: charged by the overcommit check
    noreserve: bool = False    # VM_NORESERVE (MAP_NORESERVE)
    # A device mapping's vm_ops (its driver's loads, stores and faults).
    ops: "DeviceMapping | None" = None

    @property
    def length(self) -> int:
        return self.end - self.start

    def readable(self) -> bool:
        return bool(self.prot & (PROT_READ | PROT_WRITE))

    def writable(self) -> bool:
        return bool(self.prot & PROT_WRITE)


class PinResult:
    """Outcome of pinning a run of user pages, one entry per requested page.

    ``hpas`` describe the first ``count`` pages, which are pinned.
    ``errno`` is why page ``count`` could not be pinned (None when all were).
    ``compound_shifts`` gives, per pinned page, the size (log2) of the page
    backing it; it is built on demand from per-mapping runs.  ``extents()``
    gives the pinned pages as runs of consecutive pages: a pin that knows
    them (``parts``) never builds a per-page array at all.
    """

    __slots__ = ("_hpas", "_hpa_run", "count", "errno", "_shifts", "_runs", "_parts", "_step", "repinned")

    def __init__(self, hpas: np.ndarray | Progression | None, compound_shifts: np.ndarray | None, count: int,
                 errno: int | None, runs: list[tuple[int, int]] | None = None,
                 parts: list[tuple[int, int]] | None = None, step: int = 0) -> None:
        # Consecutive physical pages stay a Progression (or the parts: first
        # address, pages, ``step`` apart) until an array is asked for.
        self._hpa_run = hpas if isinstance(hpas, Progression) else None
        self._hpas = None if isinstance(hpas, Progression) else hpas
        self.count = count
        self.errno = errno
        self._shifts = compound_shifts
        self._runs = runs or []
        self._parts = parts
        self._step = step
        # How many of the pages were pinned already (by another pin), where
        # the pin counted them: None when it did not.
        self.repinned: int | None = None

    @property
    def hpas(self) -> np.ndarray:
        if self._hpas is None:
            run = self._progression()
            if run is not None:
                self._hpas = np.asarray(run)
            else:
                self._hpas = np.concatenate([np.asarray(Progression(a, self._step, n)) for a, n in self._parts or []])
        return self._hpas

    @hpas.setter
    def hpas(self, value: np.ndarray) -> None:
        self._hpas, self._hpa_run, self._parts = value, None, None

    def _progression(self) -> Progression | None:
        """The addresses as one Progression, when they are one run."""
        if self._hpa_run is None and self._hpas is None and self._parts is not None and len(self._parts) <= 1:
            first, n = self._parts[0] if self._parts else (0, 0)
            self._hpa_run = Progression(first, self._step, n)
        return self._hpa_run

    def hpa_values(self) -> "np.ndarray | Progression":
        """The addresses, as a Progression when they are consecutive pages."""
        run = self._progression()
        return run if run is not None else self.hpas

    def extents(self, step: int) -> list[tuple[int, int]]:
        """(first address, pages) of each run of pinned pages that follow each
        other ``step`` apart, in order."""
        if self._parts is not None:
            return self._parts
        if self._hpa_run is not None:
            run = self._hpa_run
            return [(run.first, run.size)] if run.size else []
        arr = self.hpas[:self.count]
        if not arr.size:
            return []
        cuts = (np.flatnonzero(arr[1:] != arr[:-1] + np.uint64(step)) + 1).tolist()
        starts, ends = [0, *cuts], [*cuts, int(arr.size)]
        return [(int(arr[a]), b - a) for a, b in zip(starts, ends)]

    @property
    def compound_shifts(self) -> np.ndarray:
        if self._shifts is None:
            if len(self._runs) == 1:
                self._shifts = np.full(self._runs[0][0], self._runs[0][1], dtype=np.int64)
            else:
                self._shifts = np.repeat(np.array([s for _, s in self._runs], dtype=np.int64),
                                         [n for n, _ in self._runs]).astype(np.int64)
        return self._shifts

    def min_compound_shift(self) -> int:
        if self._shifts is None:
            return min((s for n, s in self._runs if n), default=64)
        return int(self._shifts.min()) if self._shifts.size else 64


_NO_BYTES = np.zeros(0, dtype=np.uint8)
_NO_VIEW = _NO_BYTES.data


def _data(vma: Vma) -> np.ndarray:
    """The bytes behind a VMA of an :class:`MM`, whose memory is always a MemoryObject."""
    return cast(MemoryObject, vma.obj).data


class AddressSpace(ABC):
    """``struct mm_struct``: what the kernel needs of a process's memory.

    The simulated process's own memory (:class:`MM`) and a real process's
    (``vfiosim run``: transport/host.py's ``HostMM``) both implement it.  The
    fields are the kernel's: ``locked_vm``/``pinned_vm`` (VmLck/VmPin), the
    reference count of those who hold the mm without being its task
    (``mm_count``: a container's mmgrab()), and powerpc's list of memory
    preregistered for sPAPR TCE v2 (``mm->context.iommu_group_mem_list``).
    """

    def __init__(self, phys: PhysicalMemory) -> None:
        self.phys = phys
        self.page_size = phys.page_size
        self.page_shift = phys.page_shift
        self.locked_vm = 0      # pages, mm->locked_vm (VmLck)
        self.pinned_vm = 0      # pages, mm->pinned_vm (VmPin)
        # exit_mmap() ran (exit, exec): nothing maps the memory any more, but
        # pins may hold pages and a container may hold the mm.
        self.dead = False
        # mm->mm_count: 1 for the task that runs in it, +1 per mmgrab().
        self.mm_count = 1
        # mm->context.iommu_group_mem_list: preregistered regions, newest first.
        self.iommu_group_mem_list: list["MmIommuMem"] = []
        # The same regions sorted by address, for lookups (iommu/prereg.py builds it on first use).
        self.iommu_group_mem_index: "MmIommuIndex | None" = None

    # -- copy_from_user / copy_to_user --------------------------------------------

    @abstractmethod
    def read(self, addr: int, n: int) -> bytes:
        """EFAULT if any byte is unmapped or unreadable."""

    def read_unpack(self, addr: int, layout: struct.Struct) -> tuple[Any, ...]:
        """read() of a struct, unpacked (copy_from_user into one): an address
        space that can unpack in place overrides it."""
        return layout.unpack(self.read(addr, layout.size))

    @abstractmethod
    def write(self, addr: int, data: bytes | bytearray | memoryview) -> None:
        """EFAULT (writing nothing) if any byte is not writable."""

    @abstractmethod
    def find_vma(self, addr: int) -> Vma | None: ...

    # -- pinning (mm/gup.c) ------------------------------------------------------------

    @abstractmethod
    def pin_pages(self, addrs: np.ndarray, write: bool, dry_run: bool = False) -> "PinResult":
        """pin_user_pages() of the page holding each address, in order, until one fails."""

    @abstractmethod
    def pin_range(self, addr: int, npages: int, write: bool, dry_run: bool = False, tag: int = 0) -> "PinResult":
        """pin_pages() of consecutive kernel pages; ``tag`` is ORed into each address."""

    @abstractmethod
    def pin_pages_longterm(self, start: int, npages: int, write: bool) -> "PinResult":
        """pin_user_pages_remote(FOLL_LONGTERM) of consecutive pages (Type1)."""

    def pin_fast(self, start: int, npages: int, write: bool,
                 longterm: bool) -> "tuple[int, int | None, int | None] | None":
        """The usual case of pin_pages_longterm() (``longterm``) or of
        pin_range() (not): ``npages`` consecutive pages inside one mapping,
        physically contiguous, every one of which pins without a fault that
        could fail.  Pins them exactly as those do and returns (host physical
        address of the first page, how many of them another pin held
        already, how many are mlock'ed as count_mlocked_pages() counts them;
        either count None where it is not known); for anything else returns
        None having changed nothing, and the caller takes the general pin,
        which says what is wrong.  The drivers' fast paths for small maps use
        it.  This default has no fast pin."""
        return None

    @abstractmethod
    def count_mlocked_pages(self, start: int, length: int) -> int:
        """count_mm_mlocked_page_nr(): pages of VM_LOCKED VMAs in the range."""

    # -- lifetime and /proc ----------------------------------------------------------------

    @abstractmethod
    def teardown(self) -> None:
        """exit_mmap(): every mapping goes; pinned pages stay until unpinned."""

    @abstractmethod
    def mapped_bytes(self) -> int: ...

    @abstractmethod
    def resident_bytes(self) -> int: ...

    def mmgrab(self) -> None:
        """Keep the mm (not its mappings) after its task lets go of it."""
        self.mm_count += 1

    def mmdrop(self) -> None:
        """Drop a reference: the task's own at exit or exec, or a holder's.  The
        last one frees the mm: __mmdrop() -> destroy_context()."""
        self.mm_count -= 1
        if self.mm_count == 0:
            self.destroy_context()

    def destroy_context(self) -> None:
        """The architecture's mm state goes.  Regions still preregistered (those a
        container forgot, docs/deviations.md 3b) are unpinned, as
        mm_iommu_cleanup() once did; Linux 6.12 only warns here and leaves them
        pinned (docs/deviations.md, "Differences ... programs cannot observe")."""
        for mem in self.iommu_group_mem_list:
            self.phys.unpin(mem.hpas)
        self.iommu_group_mem_list.clear()
        self.iommu_group_mem_index = None


class MM(AddressSpace):
    """A simulated process's address space: its VMAs and the memory behind them."""

    def __init__(self, phys: PhysicalMemory) -> None:
        super().__init__(phys)
        self._vmas: list[Vma] = []
        self._starts: list[int] = []
        self._next = MMAP_BASE
        self._args = 0            # ioctl argument buffers mapped now (not VMAs of the program)
        self._arg_vma: Vma | None = None

    # -- VMA bookkeeping -----------------------------------------------------

    def vmas(self) -> list[Vma]:
        return list(self._vmas)

    @property
    def map_count(self) -> int:
        """mm->map_count: the program's VMAs."""
        return len(self._vmas) - self._args

    def find_vma(self, addr: int) -> Vma | None:
        i = bisect.bisect_right(self._starts, addr) - 1
        if i >= 0:
            vma = self._vmas[i]
            if addr < vma.end:
                return vma
        return None

    def _insert(self, vma: Vma) -> None:
        i = bisect.bisect(self._starts, vma.start)
        self._starts.insert(i, vma.start)
        self._vmas.insert(i, vma)
        vma.obj.users += 1

    def _unlink(self, vma: Vma) -> None:
        i = bisect.bisect_left(self._starts, vma.start)
        while self._vmas[i] is not vma:
            i += 1
        del self._vmas[i]
        del self._starts[i]
        vma.obj.users -= 1

    def _remove(self, vma: Vma) -> None:
        """The VMA goes: its pages no pin holds go back to RAM, its file
        reference is dropped."""
        self._unlink(vma)
        if vma.ops is not None:
            vma.ops.close()
        obj = vma.obj
        if isinstance(obj, MemoryObject):
            shift = obj.page_shift
            obj.unmap_pages(vma.pgoff >> shift, vma.length >> shift)
        self.phys.release_if_unused(obj)

    def _overlapping(self, start: int, end: int) -> list[Vma]:
        vmas = self._vmas
        i = max(bisect.bisect_right(self._starts, start) - 1, 0)
        out = []
        while i < len(vmas):
            vma = vmas[i]
            if vma.start >= end:
                break
            if vma.end > start:
                out.append(vma)
            i += 1
        return out

    def _split_at(self, vma: Vma, addr: int, check_limit: bool = True) -> Vma:
        """split_vma(): ``vma`` keeps [start, addr), a new VMA takes [addr, end)
        and is returned.  split_vma() refuses with ENOMEM when the mm already
        has vm.max_map_count VMAs (__split_vma(), which munmap uses, does not
        check)."""
        if check_limit and self.map_count >= self.phys.vm.max_map_count:
            raise fail(ENOMEM, f"splitting the mapping {vma.start:#x}-{vma.end:#x} at {addr:#x} would make more "
                               f"than vm.max_map_count ({self.phys.vm.max_map_count}) mappings")
        upper = Vma(addr, vma.end, vma.prot, vma.obj, vma.pgoff + (addr - vma.start), vma.kind, vma.locked,
                    vma.accounted, vma.noreserve, vma.ops)
        vma.end = addr
        self._insert(upper)
        if upper.ops is not None:
            upper.ops.open()                 # __split_vma(): get_file(), vm_ops->open()
        return upper

    def _modify(self, start: int, end: int, changes: Callable[[Vma], bool], apply: Callable[[Vma], None]) -> None:
        """For each VMA overlapping [start, end), in order, as vma_modify()
        callers do: if ``changes`` says the VMA changes, split it at ``start``
        and ``end`` (ENOMEM at vm.max_map_count: the VMAs before it stay
        changed) and ``apply`` the change to the part inside."""
        for vma in self._overlapping(start, end):
            if not changes(vma):
                continue
            if vma.start < start:
                vma = self._split_at(vma, start)
            if vma.end > end:
                self._split_at(vma, end)
            apply(vma)

    # -- mmap(2), munmap(2), mprotect(2) ---------------------------------------

    def _page_align(self, length: int) -> int:
        return (length + self.page_size - 1) & ~(self.page_size - 1)

    def _unmapped_area(self, length: int, align: int) -> int:
        """get_unmapped_area(): the next free range (ENOMEM when none is left)."""
        addr = (self._next + align - 1) & ~(align - 1)
        if addr + length > ARG_BASE:
            raise fail(ENOMEM, "simulated address space exhausted")
        return addr

    def _map(self, vma: Vma) -> int:
        """Insert a new mapping.  One unmapped guard page follows every
        mapping, so that running off the end of a buffer faults instead of
        landing in the next one."""
        self._insert(vma)
        self._next = vma.end + self.page_size
        return vma.start

    def mmap(self, length: int, prot: int, compound_shift: int | None = None, *, noreserve: bool = False,
             current: "Task | None" = None) -> int:
        """An anonymous private mapping (do_mmap, mmap_region); returns its
        address.  No page of it uses RAM until touched.  A writable one is
        accountable unless MAP_NORESERVE (or hugetlb) and goes through the
        overcommit check; the mm may hold vm.max_map_count + 1 VMAs (the
        check is ``map_count > max``)."""
        if length <= 0:
            raise fail(EINVAL, f"mmap length {length} must be positive")
        if prot & ~_PROT_ALL:
            raise fail(EINVAL, f"mmap prot {prot:#x} has unknown bits")
        length = self._page_align(length)
        align = 1 << (compound_shift or self.page_shift)
        length = (length + align - 1) & ~(align - 1)
        self.check_map_count()
        addr = self._unmapped_area(length, align)
        accountable = bool(prot & PROT_WRITE) and not noreserve and compound_shift is None
        if accountable:
            self.phys.vm_enough_memory(length >> self.page_shift, current)
        obj = self.phys.allocate(length, compound_shift)
        return self._map(Vma(addr, addr + length, prot, obj, 0, accounted=accountable, noreserve=noreserve))

    def mmap_pfn(self, length: int, prot: int, obj: PhysicalPages, pgoff: int, ops: DeviceMapping) -> int:
        """A shared mapping of device memory (a vfio-pci BAR: VM_IO |
        VM_PFNMAP) from byte ``pgoff`` of ``obj``: its pages are the
        device's, never RAM; loads and stores through it are ``ops``'s."""
        length = self._page_align(length)
        self.check_map_count()
        addr = self._unmapped_area(length, self.page_size)
        return self._map(Vma(addr, addr + length, prot, obj, pgoff, kind="pfnmap", ops=ops))

    def check_map_count(self) -> None:
        """do_mmap(): ``if (mm->map_count > sysctl_max_map_count) return -ENOMEM``."""
        limit = self.phys.vm.max_map_count
        if self.map_count > limit:
            raise fail(ENOMEM, f"the process has {self.map_count} mappings, more than vm.max_map_count ({limit})")

    def _check_range(self, addr: int, length: int, call: str) -> int:
        if addr & (self.page_size - 1):
            raise fail(EINVAL, f"{call}: address {addr:#x} is not aligned to the page size {self.page_size:#x}")
        if length <= 0:
            raise fail(EINVAL, f"{call}: length {length} must be positive")
        end = addr + self._page_align(length)
        if end > 1 << 64:
            raise fail(EINVAL, f"{call}: range wraps")
        return end

    def munmap(self, addr: int, length: int) -> None:
        """do_vmi_munmap(): splitting the first VMA to punch a hole in it would
        add one, refused at vm.max_map_count with ENOMEM (nothing unmapped);
        splits at the range's ends are otherwise unchecked."""
        end = self._check_range(addr, length, "munmap")
        vmas = self._overlapping(addr, end)
        if not vmas:
            return
        if any(v.kind == "arg" for v in vmas):
            raise fail(EINVAL, "munmap of the ioctl argument buffer")
        first = vmas[0]
        if first.start < addr:
            if end < first.end and self.map_count >= self.phys.vm.max_map_count:
                raise fail(ENOMEM, f"munmap: unmapping {addr:#x}-{end:#x} splits the mapping {first.start:#x}-"
                                   f"{first.end:#x} in three, more than vm.max_map_count "
                                   f"({self.phys.vm.max_map_count}) mappings")
            vmas[0] = self._split_at(first, addr, check_limit=False)
        last = vmas[-1]
        if last.end > end:
            self._split_at(last, end, check_limit=False)
        for vma in vmas:
            if vma.locked:
                # vms_gather_munmap_vmas(): unmapping VM_LOCKED memory unlocks it.
                self.locked_vm -= vma.length >> self.page_shift
            self._remove(vma)

    def mprotect(self, addr: int, length: int, prot: int, current: "Task | None" = None) -> None:
        """do_mprotect_pkey(): VMAs are changed in order; a hole stops the walk
        with ENOMEM, leaving the part before it changed (as Linux does).  A
        private VMA that becomes writable for the first time is charged as
        mmap() charges one (mprotect_fixup(): VM_ACCOUNT)."""
        end = self._check_range(addr, length, "mprotect")
        if prot & ~_PROT_ALL:
            raise fail(EINVAL, f"mprotect prot {prot:#x} has unknown bits")
        cur = addr
        for vma in self._overlapping(addr, end):
            if vma.start > cur:
                break
            cur = vma.end
        covered = min(cur, end)

        def changes(vma: Vma) -> bool:
            if vma.prot == prot:
                return False
            if prot & PROT_WRITE and vma.kind == "anon" and not (vma.accounted or vma.writable() or vma.noreserve
                                                                  or vma.obj.compound_shift > vma.obj.page_shift):
                pages = (min(covered, vma.end) - max(addr, vma.start)) >> self.page_shift
                self.phys.vm_enough_memory(pages, current)
            return True

        def apply(vma: Vma) -> None:
            if prot & PROT_WRITE and vma.kind == "anon" and not vma.noreserve \
                    and vma.obj.compound_shift == vma.obj.page_shift:
                vma.accounted = True
            vma.prot = prot
        if covered > addr:
            self._modify(addr, covered, changes, apply)
        if covered < end:
            raise fail(ENOMEM, f"mprotect: {covered:#x} is not mapped")

    def fork(self) -> "MM":
        """dup_mmap() for fork(2): the child gets the same mappings at the same
        addresses, its own copy of their contents (copy-on-write, resolved at
        once: pages a device may write through a pin stay the parent's, as
        Linux copies DMA-pinned pages at fork), no mlock (VM_LOCKED is not
        inherited) and nothing charged to its locked_vm.  Device mappings are
        shared.  The copies use RAM at once (Linux shares the pages until one
        side writes them): ENOMEM, and no child, when RAM cannot hold them."""
        child = MM(self.phys)
        child._next = self._next
        copies: dict[int, MemoryObject] = {}
        try:
            for vma in self._vmas:
                if vma.kind == "arg":
                    continue             # the in-process ioctl argument buffer is not memory of the task
                if vma.kind == "pfnmap":
                    child._insert(Vma(vma.start, vma.end, vma.prot, vma.obj, vma.pgoff, vma.kind, ops=vma.ops))
                    if vma.ops is not None:
                        vma.ops.open()
                    continue
                obj = copies.get(id(vma.obj))
                if obj is None:
                    src = cast(MemoryObject, vma.obj)
                    obj = copies[id(src)] = self.phys.allocate(src.length, src.compound_shift)
                    present = int(np.count_nonzero(src.populated))
                    if present > self.phys.free_pages():
                        raise fail(ENOMEM, f"fork: copying {present} present pages needs more RAM than is free "
                                           f"({self.phys.free_pages()} pages)")
                    self.phys.used_pages += present
                    obj.populated[:] = src.populated
                    _copy_present(src, obj)
                child._insert(Vma(vma.start, vma.end, vma.prot, obj, vma.pgoff, vma.kind, False, vma.accounted,
                                  vma.noreserve))
        except KernelError:
            child.teardown()
            for obj in copies.values():
                self.phys.release_if_unused(obj)
            raise
        return child

    def teardown(self) -> None:
        """exit_mmap(): drop every mapping; pinned pages stay until unpinned."""
        for vma in list(self._vmas):
            self._remove(vma)
        self.dead = True

    def mapped_bytes(self) -> int:
        return sum(v.length for v in self._vmas if v.kind != "arg")

    def resident_bytes(self) -> int:
        total = 0
        for v in self._vmas:
            if v.kind != "anon":
                continue
            first = v.pgoff >> self.page_shift
            n = v.length >> self.page_shift
            total += int(np.count_nonzero(v.obj.populated[first:first + n])) << self.page_shift
        return total

    # -- byte access (the process's own loads/stores, and copy_{to,from}_user) --

    def _segments(self, addr: int, n: int, write: bool) -> Iterator[tuple[Vma, int, int]]:
        """Yield (vma, offset in obj, length) covering [addr, addr+n) or EFAULT."""
        if addr < 0 or n < 0 or addr + n > 1 << 64:
            raise fail(EFAULT, f"bad address range {addr:#x}+{n:#x}")
        cur, end = addr, addr + n
        while cur < end:
            vma = self.find_vma(cur)
            if vma is None:
                raise fail(EFAULT, f"address {cur:#x} is not mapped")
            if write and not vma.writable():
                raise fail(EFAULT, f"address {cur:#x} is not writable")
            if not write and not vma.readable():
                raise fail(EFAULT, f"address {cur:#x} is not readable")
            chunk = min(end, vma.end) - cur
            yield vma, vma.pgoff + (cur - vma.start), chunk
            cur += chunk

    def _span(self, addr: int, n: int, write: bool) -> list[tuple[Vma, int, int]]:
        """_segments() as a list; the usual case (inside one VMA) without the walk."""
        vma = self.find_vma(addr)
        if vma is not None and addr >= 0 and addr + n <= vma.end and \
                (vma.prot & PROT_WRITE if write else vma.prot & (PROT_READ | PROT_WRITE)):
            return [(vma, vma.pgoff + (addr - vma.start), n)]
        return list(self._segments(addr, n, write))

    def read(self, addr: int, n: int) -> bytes:
        """Read user memory; EFAULT if any byte is unmapped or unreadable."""
        i = bisect.bisect_right(self._starts, addr) - 1
        if i >= 0 and n > 0:             # the usual case: inside one memory mapping
            vma = self._vmas[i]
            if addr + n <= vma.end and vma.prot & _PROT_RW and vma.kind != "pfnmap":
                off = vma.pgoff + (addr - vma.start)
                obj: MemoryObject = vma.obj      # type: ignore[assignment]  # an MM maps MemoryObjects
                return obj.view[off:off + n].tobytes()
        if n <= 0 or addr < 0:
            if n == 0:
                return b""
            raise fail(EFAULT, f"bad address range {addr:#x}+{n:#x}")
        return b"".join(_mmio_read(v, o, ln) if v.kind == "pfnmap" else _data(v)[o:o + ln].tobytes()
                        for v, o, ln in self._segments(addr, n, write=False))

    def write(self, addr: int, data: bytes | bytearray | memoryview) -> None:
        """copy_to_user(): EFAULT (writing nothing) if any byte is not
        writable, or if a page it needs finds no free RAM (the kernel's fault
        fails: VM_FAULT_OOM, fixed up as a short copy)."""
        i = bisect.bisect_right(self._starts, addr) - 1
        if i >= 0 and type(data) is bytes and data:
            # The usual case (an ioctl's write-back): bytes inside one writable
            # memory mapping whose pages are present; nothing to fault in.
            vma = self._vmas[i]
            n = len(data)
            if addr + n <= vma.end and vma.prot & PROT_WRITE and vma.kind != "pfnmap":
                obj: MemoryObject = vma.obj      # type: ignore[assignment]  # an MM maps MemoryObjects
                off = vma.pgoff + (addr - vma.start)
                if vma.kind == "anon":
                    p0, p1 = off >> obj.page_shift, (off + n - 1) >> obj.page_shift
                    present = obj.populated[p0] if p0 == p1 else obj.populated[p0:p1 + 1].all()
                else:
                    present = True
                if present:
                    obj.view[off:off + n] = data
                    return
        self._store(addr, data, None)

    def store(self, addr: int, data: bytes | bytearray | memoryview, current: "Task") -> None:
        """The process's own stores: as write(), but a page that finds no free
        RAM calls the OOM killer, which may kill this process."""
        self._store(addr, data, current)

    def _store(self, addr: int, data: bytes | bytearray | memoryview, current: "Task | None") -> None:
        src = np.frombuffer(data, dtype=np.uint8)
        n = int(src.size)
        if n == 0:
            return
        segs = self._span(addr, n, write=True)
        if len(segs) == 1 and segs[0][0].kind == "arg":         # an ioctl's write-back in-process
            vma, off, _ = segs[0]
            _data(vma)[off:off + n] = src
            return
        for vma, off, ln in segs:          # every page present first
            if vma.kind == "anon":
                self._fault_in(vma, off, ln, current)
        pos = 0
        for vma, off, ln in segs:
            if vma.kind == "pfnmap":
                _mmio_write(vma, off, src[pos:pos + ln])
            else:
                _data(vma)[off:off + ln] = src[pos:pos + ln]
            pos += ln

    def _fault_in(self, vma: Vma, off: int, n: int, current: "Task | None") -> None:
        """Make the pages of bytes [off, off+n) of the VMA's memory present, for a store."""
        obj = cast(MemoryObject, vma.obj)
        shift = obj.page_shift
        p0, p1 = off >> shift, ((off + n - 1) >> shift) + 1
        while p0 < p1:
            got = obj.fault_in(p0, p1 - p0)
            if got == p1 - p0:
                return
            p0 += got
            where = vma.start + (p0 << shift) - vma.pgoff
            killer = self.phys.oom_killer
            if current is None or killer is None or not killer(current):
                self._out_of_memory(f"copy_to_user() to {where:#x}")
                raise fail(EFAULT, f"out of memory: no free page of RAM for user address {where:#x} "
                                   f"({self.phys.used_pages} of {self.phys.ram_pages} pages in use)")
            if not current.alive:
                raise fail(ESRCH, f"process {current.pid} was killed by the OOM killer: its store needed a page of "
                                  f"RAM and none was free (m.dmesg() has the OOM report)")

    def _out_of_memory(self, what: str) -> None:
        """A fault inside the kernel found no free page (docs/deviations.md 12)."""
        if self.phys.log is not None:
            from .deviations import deviation
            self.phys.log(deviation("12", what=what, used=self.phys.used_pages, total=self.phys.ram_pages))

    # -- the ioctl argument buffer of the in-process API -----------------------

    def borrow(self, buf: bytearray | memoryview | bytes) -> Vma | None:
        """Map a Python buffer at ARG_BASE for the duration of one syscall
        (give it back with unborrow()); None for an empty buffer.

        The kernel then reads and writes it through the same copy_from_user /
        copy_to_user path as any user pointer: past its end is unmapped
        (EFAULT), and a read-only ``bytes`` argument cannot be written.
        Calls never nest, so one mapping object is reused: a call costs no
        allocation but the buffer's view.
        """
        mv = memoryview(buf).cast("B")
        n = mv.nbytes
        if n == 0:
            return None
        vma = self._arg_vma
        if vma is None:
            obj = MemoryObject(0, np.frombuffer(mv, dtype=np.uint8), self.page_shift, self.page_shift,
                               pinnable=False)
            vma = self._arg_vma = Vma(ARG_BASE, ARG_BASE + n, PROT_READ, obj, 0, kind="arg")
        obj = cast(MemoryObject, vma.obj)
        obj.data = np.frombuffer(mv, dtype=np.uint8)
        obj.view = mv
        obj.length = n
        vma.end = ARG_BASE + n
        vma.prot = PROT_READ if mv.readonly else PROT_READ | PROT_WRITE
        self._insert(vma)
        self._args += 1
        return vma

    def unborrow(self, vma: Vma | None) -> None:
        if vma is not None and not self.dead:          # (exit during the call took every mapping)
            self._unlink(vma)
            self._args -= 1
            obj = cast(MemoryObject, vma.obj)
            obj.data = _NO_BYTES                                 # let go of the caller's buffer
            obj.view = _NO_VIEW

    # -- pinning (pin_user_pages_fast) -----------------------------------------

    def pin_range(self, addr: int, npages: int, write: bool, dry_run: bool = False, tag: int = 0) -> PinResult:
        """pin_pages() for the consecutive kernel pages from ``addr``: the same
        rules, with slice operations instead of per-page ones.  ``tag`` (bits
        below the page size) is ORed into every returned address."""
        shift = self.page_shift
        page = 1 << shift
        parts: list[tuple[int, int]] = []
        runs: list[tuple[int, int]] = []
        done, cur = 0, addr
        err: int | None = None
        while done < npages:
            vma = self.find_vma(cur)
            if vma is None or not vma.obj.pinnable or not vma.readable() or (write and not vma.writable()):
                err = EFAULT
                break
            obj = cast(MemoryObject, vma.obj)
            n = min(npages - done, (vma.end - cur) >> shift)
            p0 = (vma.pgoff + (cur - vma.start)) >> shift
            if not write and not vma.writable():
                populated = obj.populated[p0:p0 + n]
                if not populated.all():
                    n = int(np.argmin(populated))
                    err = EFAULT
            elif write:
                got = obj.fault_in(p0, n, dry_run)
                if got < n:
                    n, err = got, ENOMEM
                    if not dry_run:
                        self._out_of_memory(f"pin_user_pages_fast() of {cur + (n << shift):#x}")
            if not dry_run and n:
                if n == 1:
                    obj.pincount[p0] += 1
                else:
                    obj.pincount[p0:p0 + n] += 1
                obj.pins += n
            parts.append((obj.phys_base + (p0 << shift), n))
            runs.append((n, obj.compound_shift))
            done += n
            cur += n << shift
            if err is not None:
                break
        hpas: np.ndarray | Progression
        if len(parts) == 1:
            base, n = parts[0]
            hpas = Progression(base | tag, page, n)
        else:
            hpas = np.concatenate([np.arange(b | tag, (b | tag) + (n << shift), page, dtype=np.uint64)
                                   for b, n in parts]) if parts else np.zeros(0, dtype=np.uint64)
        return PinResult(hpas, None, done, err, runs)

    def pin_pages(self, addrs: np.ndarray, write: bool, dry_run: bool = False) -> PinResult:
        """Pin the page holding each user address, in order, until one fails.

        ``addrs`` must be non-decreasing.  A page is pinned once per address
        that names it (the kernel takes one reference per call).  Pinning
        needs a mapped, accessible page: FOLL_WRITE needs a writable VMA and
        faults the page in (ENOMEM at the first page no free RAM is left
        for); a read pin of a never-populated page of a read-only mapping
        fails with EFAULT, as the reference traces show on Linux 6.12 (v1
        MAP_DMA of untouched PROT_READ memory).  With ``dry_run`` nothing is
        pinned or populated: the result says how far pinning would get.
        """
        n = int(addrs.size)
        hpas = np.zeros(n, dtype=np.uint64)
        shifts = np.zeros(n, dtype=np.int64)
        done = 0
        err: int | None = None
        shift = self.page_shift
        while done < n:
            addr = int(addrs[done])
            vma = self.find_vma(addr)
            if vma is None or not vma.obj.pinnable or not vma.readable() or (write and not vma.writable()):
                err = EFAULT
                break
            stop = done + int(np.searchsorted(addrs[done:], np.uint64(vma.end), side="left"))
            seg = addrs[done:stop]
            pages = ((seg - np.uint64(vma.start) + np.uint64(vma.pgoff)) >> np.uint64(shift)).astype(np.int64)
            obj = cast(MemoryObject, vma.obj)
            if not write and not vma.writable():
                missing = ~obj.populated[pages]
                if missing.any():
                    cut = int(np.argmax(missing))
                    pages = pages[:cut]
                    stop = done + cut
                    err = EFAULT
            elif write:
                got = obj.fault_in_pages(pages, dry_run)
                if got < pages.size:
                    if not dry_run:
                        self._out_of_memory(f"pin_user_pages() of {int(seg[got]):#x}")
                    pages = pages[:got]
                    stop = done + got
                    err = ENOMEM
            if not dry_run:
                np.add.at(obj.pincount, pages, 1)
                obj.pins += int(pages.size)
            hpas[done:stop] = np.uint64(obj.phys_base) + (pages.astype(np.uint64) << np.uint64(shift))
            shifts[done:stop] = obj.compound_shift
            done = stop
            if err is not None:
                break
        return PinResult(hpas[:done], shifts[:done], done, err)

    # -- mlock(2), munlock(2) (mm/mlock.c) ---------------------------------------

    def mlock(self, start: int, length: int, current: "Task") -> None:
        """do_mlock(start, len, VM_LOCKED).

        can_do_mlock() first (EPERM with a zero RLIMIT_MEMLOCK and no
        CAP_IPC_LOCK), then the limit: the new total of locked_vm, less the
        part of the range already locked, must fit RLIMIT_MEMLOCK unless the
        caller has CAP_IPC_LOCK (ENOMEM).  apply_vma_lock_flags() then marks
        the VMAs VM_LOCKED one by one (EINVAL if start + len wraps, ENOMEM at
        the first hole or at vm.max_map_count, the VMAs before it stay
        locked) and __mm_populate() faults the pages in; its errors go
        through __mlock_posix_error_return() (EFAULT becomes ENOMEM: a
        PROT_NONE VMA is locked but cannot be populated; ENOMEM, RAM
        exhausted, becomes EAGAIN).
        """
        soft = current.rlimit_memlock_soft()
        capable = current.capable(CAP_IPC_LOCK)
        if soft == 0 and not capable:
            raise fail(EPERM, "mlock: RLIMIT_MEMLOCK is 0 and the caller lacks CAP_IPC_LOCK (can_do_mlock)")
        start, length = self._mlock_align(start, length)
        lock_limit = soft >> self.page_shift
        locked = (length >> self.page_shift) + self.locked_vm
        if locked > lock_limit and not capable:
            locked -= self.count_mlocked_pages(start, length)
        if locked > lock_limit and not capable:
            raise fail(ENOMEM, f"mlock: {locked} pages would be locked, over RLIMIT_MEMLOCK "
                               f"({soft} bytes = {lock_limit} pages)")
        self._apply_vma_lock_flags(start, length, True, "mlock")
        self._mm_populate(start, length)

    def munlock(self, start: int, length: int) -> None:
        """munlock(2): apply_vma_lock_flags(start, len, 0); no limit, no EPERM."""
        start, length = self._mlock_align(start, length)
        self._apply_vma_lock_flags(start, length, False, "munlock")

    def _mlock_align(self, start: int, length: int) -> tuple[int, int]:
        """len = PAGE_ALIGN(len + offset_in_page(start)); start &= PAGE_MASK,
        in unsigned 64-bit arithmetic (a huge len wraps, as in C)."""
        mask = (1 << 64) - 1
        start &= mask
        length &= mask
        psz = self.page_size
        length = ((length + (start & (psz - 1)) + psz - 1) & ~(psz - 1)) & mask
        return start & ~(psz - 1) & mask, length

    def count_mlocked_pages(self, start: int, length: int) -> int:
        """count_mm_mlocked_page_nr(): pages of VM_LOCKED VMAs inside the range."""
        end = min(start + length, (1 << 64) - 1)
        vmas = self._vmas
        i = max(bisect.bisect_right(self._starts, start) - 1, 0)
        count = 0
        while i < len(vmas) and vmas[i].start < end:
            vma = vmas[i]
            if vma.locked and vma.end > start:
                count += min(end, vma.end) - max(start, vma.start)
            i += 1
        return count >> self.page_shift

    @staticmethod
    def _lock_exempt(vma: Vma) -> bool:
        """mlock_fixup() leaves some VMAs alone (no VM_LOCKED, not counted):
        hugetlb ones (our huge-page mmaps) and special mappings (the ioctl
        argument buffer of the in-process API, device mappings: VM_IO |
        VM_PFNMAP)."""
        return vma.kind != "anon" or vma.obj.compound_shift > vma.obj.page_shift

    def _apply_vma_lock_flags(self, start: int, length: int, lock: bool, call: str) -> None:
        """apply_vma_lock_flags() + mlock_fixup(): VMA by VMA, in order, each
        split to the range first (vma_modify_flags())."""
        end = start + length
        if end > (1 << 64) - 1:
            raise fail(EINVAL, f"{call}: {start:#x} + {length:#x} wraps around the address space")
        if end == start:
            return
        if self.find_vma(start) is None:
            raise fail(ENOMEM, f"{call}: {start:#x} is not mapped")
        cur = None
        for vma in self._overlapping(start, end):
            if cur is not None and vma.start != cur:
                raise fail(ENOMEM, f"{call}: {cur:#x} is not mapped")
            lo, hi = max(start, vma.start), min(end, vma.end)
            if vma.locked != lock and not self._lock_exempt(vma):
                piece = self._split_at(vma, lo) if vma.start < lo else vma
                if piece.end > hi:
                    self._split_at(piece, hi)
                piece.locked = lock
                pages = (hi - lo) >> self.page_shift
                self.locked_vm += pages if lock else -pages
            cur = hi
        if cur is None or cur < end:
            raise fail(ENOMEM, f"{call}: {cur or start:#x} is not mapped")

    def _mm_populate(self, start: int, length: int) -> None:
        """__mm_populate(start, len, 0) as mlock() calls it: fault the pages
        in, VMA by VMA (device mappings are skipped).  A writable private VMA
        gets its own pages (FOLL_WRITE); a read-only one maps the shared zero
        page, which is not a page of its own here.  PROT_NONE cannot be
        populated: EFAULT, which __mlock_posix_error_return() turns into
        ENOMEM; a page that finds no free RAM fails the fault with ENOMEM,
        which becomes EAGAIN (the pages before it stay present)."""
        end = start + length
        for vma in self._overlapping(start, end):
            if vma.kind == "pfnmap":
                continue
            if not vma.readable():
                raise fail(ENOMEM, f"mlock: {max(start, vma.start):#x} is PROT_NONE: locked, but its pages "
                                   f"cannot be faulted in (EFAULT from populate_vma_page_range)")
            if vma.writable():
                obj = cast(MemoryObject, vma.obj)
                lo = vma.pgoff + (max(start, vma.start) - vma.start)
                hi = vma.pgoff + (min(end, vma.end) - vma.start)
                p0, p1 = lo >> obj.page_shift, ((hi - 1) >> obj.page_shift) + 1
                got = obj.fault_in(p0, p1 - p0)
                if got < p1 - p0:
                    self._out_of_memory("mlock() populating its range")
                    raise fail(EAGAIN, f"mlock: the page at {vma.start + ((p0 + got) << obj.page_shift) - vma.pgoff:#x}"
                                       f" finds no free RAM: locked, but not populated (ENOMEM from "
                                       f"populate_vma_page_range, which __mlock_posix_error_return() makes EAGAIN)")

    def locked_bytes(self) -> int:
        """Bytes of VM_LOCKED VMAs (what mlock() charged to locked_vm)."""
        return sum(v.length for v in self._vmas if v.locked)

    # -- long-term pins (pin_user_pages_remote with FOLL_LONGTERM) --------------

    def pin_pages_longterm(self, start: int, npages: int, write: bool) -> PinResult:
        """Pin ``npages`` consecutive pages from ``start`` (page aligned), as
        vaddr_get_pfns() does for the Type1 IOMMU driver (drivers/vfio/
        vfio_iommu_type1.c): pin_user_pages_remote(FOLL_LONGTERM, plus
        FOLL_WRITE for a device-writable mapping).

        Stops at the first page that cannot be pinned: EFAULT for an
        unmapped page, PROT_NONE, the ioctl argument buffer, a device
        mapping (VM_PFNMAP: GUP refuses it, check_vma_flags()) or FOLL_WRITE
        on a read-only VMA; ENOMEM for a page that finds no free RAM.  A
        long-term read pin of a never-written page of a private mapping
        does not pin the shared zero page: GUP unshares it
        (FAULT_FLAG_UNSHARE, mm/gup.c since Linux 6.2), so the page is
        populated and charged like any other -- the x86 reference trace maps
        untouched PROT_READ memory READ-only and VmLck grows by its size.
        Work is one slice per VMA, never per page, and the result is its
        extents: no per-page array is built unless one is asked for.
        """
        shift = self.page_shift
        parts: list[tuple[int, int]] = []
        runs: list[tuple[int, int]] = []
        done = repinned = 0
        err: int | None = None
        addr = start
        need = PROT_WRITE if write else PROT_READ | PROT_WRITE
        while done < npages:
            vma = self.find_vma(addr)
            if vma is None or not vma.obj.pinnable or not vma.prot & need:
                err = EFAULT
                break
            n = min(npages - done, (vma.end - addr) >> shift)
            obj = cast(MemoryObject, vma.obj)
            first = (vma.pgoff + (addr - vma.start)) >> shift
            got = obj.fault_in(first, n)
            if got < n:
                n, err = got, ENOMEM
                self._out_of_memory(f"pin_user_pages_remote(FOLL_LONGTERM) of {addr + (n << shift):#x}")
            if n == 1:
                count = obj.pincount[first]
                repinned += count > 0
                obj.pincount[first] = count + 1
            elif n:
                seg = obj.pincount[first:first + n]
                if obj.pins:
                    repinned += int(np.count_nonzero(seg))
                seg += 1
            if n:
                obj.pins += n
                parts.append((obj.phys_base + (first << shift), n))
                runs.append((n, obj.compound_shift))
            done += n
            addr += n << shift
            if err is not None:
                break
        res = PinResult(None, None, done, err, runs, parts, 1 << shift)
        res.repinned = int(repinned)
        return res

    def pin_fast(self, start: int, npages: int, write: bool,
                 longterm: bool) -> tuple[int, int | None, int | None] | None:
        """AddressSpace.pin_fast(): the pages of one VMA that pin_pages_longterm()
        or pin_range() would pin all of.  The checks are theirs: a pinnable
        VMA with the access (GUP's EFAULT otherwise); pages faulted in for a
        write pin, and for a long-term read pin, which unshares the zero page
        (ENOMEM when RAM runs out, which is the general pin's to report); a
        short-term read pin of a read-only VMA only of present pages.  What
        is skipped is only the PinResult and the walk over several VMAs."""
        vma = self.find_vma(start)
        if vma is None or not vma.obj.pinnable:
            return None
        prot = vma.prot
        if not (prot & PROT_WRITE if write else prot & (PROT_READ | PROT_WRITE)):
            return None
        shift = self.page_shift
        if start + (npages << shift) > vma.end:
            return None
        obj = cast(MemoryObject, vma.obj)
        first = (vma.pgoff + (start - vma.start)) >> shift
        if write or longterm:
            if npages == 1:
                if not obj.populated[first]:
                    if not obj.fault_in(first, 1):
                        return None
            elif obj.fault_in(first, npages, dry_run=True) < npages:
                return None
            else:
                obj.fault_in(first, npages)
        elif not prot & PROT_WRITE and not obj.populated[first:first + npages].all():
            return None
        repinned = add_pins(obj, first, npages)
        return obj.phys_base + (first << shift), repinned, npages if vma.locked else 0


def _copy_present(src: MemoryObject, dst: MemoryObject) -> None:
    """Copy the present pages of ``src`` into ``dst`` (the rest reads as zeros
    in both), run by run: a large sparse object costs what it holds."""
    pop = src.populated
    if pop.all():
        dst.data[:] = src.data
        return
    edges = np.flatnonzero(np.diff(np.concatenate(([False], pop, [False])).astype(np.int8)))
    shift = src.page_shift
    for a, b in zip(edges[0::2].tolist(), edges[1::2].tolist()):
        dst.data[a << shift:b << shift] = src.data[a << shift:b << shift]


def mmio_accesses(off: int, n: int) -> Iterator[tuple[int, int]]:
    """(offset, size) of the naturally aligned loads or stores of at most 8
    bytes that cover [off, off+n), as a copy through a device mapping makes."""
    end = off + n
    while off < end:
        size = 8
        while size > 1 and (off % size or off + size > end):
            size >>= 1
        yield off, size
        off += size


def _mmio_read(vma: Vma, off: int, n: int) -> bytes:
    """Loads through a device mapping (``off``: the offset in the device memory)."""
    assert vma.ops is not None
    access = vma.ops.access
    return b"".join(access(o, size, None).to_bytes(size, "little") for o, size in mmio_accesses(off, n))


def _mmio_write(vma: Vma, off: int, data: np.ndarray) -> None:
    """Stores through a device mapping."""
    assert vma.ops is not None
    raw = data.tobytes()
    for o, size in mmio_accesses(off, len(raw)):
        vma.ops.access(o, size, int.from_bytes(raw[o - off:o - off + size], "little"))


def account_locked_vm(mm: AddressSpace | None, pages: int, inc: bool, current: "Task | None",
                      site: str | None = None) -> None:
    """Charge or refund ``pages`` of mm->locked_vm (mm/util.c: account_locked_vm).

    Charging fails with ENOMEM when the new total exceeds the *calling*
    task's RLIMIT_MEMLOCK (in pages, rounded down), unless the caller has
    CAP_IPC_LOCK.  Refunds never fail.  ``site`` names the caller for fault
    injection (kernel/faults.py): an injected failure is that ENOMEM.
    """
    if pages == 0 or mm is None:
        return
    if inc:
        assert current is not None
        faults = mm.phys.faults
        if site is not None and faults is not None and faults.should_fail(site):
            raise fail(ENOMEM, f"charging {pages} pages to locked_vm failed (fault injection at {site})")
        if not current.capable(CAP_IPC_LOCK):
            limit = current.rlimit_memlock_soft() >> mm.page_shift
            if mm.locked_vm + pages > limit:
                raise fail(ENOMEM, f"locked memory would be {(mm.locked_vm + pages) << mm.page_shift} bytes, "
                                   f"over RLIMIT_MEMLOCK {current.rlimit_memlock_soft()} bytes")
        mm.locked_vm += pages
    else:
        refund_locked_vm(mm, pages)


def refund_locked_vm(mm: AddressSpace, pages: int) -> None:
    """Give ``pages`` back to mm->locked_vm (the refund half of account_locked_vm)."""
    if pages > mm.locked_vm:
        if mm.dead:
            # exit() dropped what the dead mm still had charged (nobody can
            # see it any more); a container another process held refunds
            # its share later, into nothing.
            mm.locked_vm = 0
            return
        raise KernelBug(f"locked_vm underflow: refunding {pages} of {mm.locked_vm} pages")
    mm.locked_vm -= pages


def account_locked_vm_task(mm: AddressSpace | None, pages: int, inc: bool, task: "Task | None", bypass_rlim: bool,
                           site: str | None = None) -> None:
    """__account_locked_vm(mm, pages, inc, task, bypass_rlim) (mm/util.c).

    Unlike :func:`account_locked_vm`, the limit is ``task``'s RLIMIT_MEMLOCK
    and the capability was decided by the caller beforehand: the Type1 driver
    records ``capable(CAP_IPC_LOCK)`` and the group leader when a mapping is
    made (``dma->lock_cap``, ``dma->task``) and charges against those.
    """
    if pages == 0 or mm is None:
        return
    if inc:
        faults = mm.phys.faults
        if site is not None and faults is not None and faults.should_fail(site):
            raise fail(ENOMEM, f"charging {pages} pages to locked_vm failed (fault injection at {site})")
        if not bypass_rlim:
            assert task is not None
            limit = task.rlimit_memlock_soft() >> mm.page_shift
            if mm.locked_vm + pages > limit:
                raise fail(ENOMEM, f"locked memory would be {(mm.locked_vm + pages) << mm.page_shift} bytes, "
                                   f"over RLIMIT_MEMLOCK {task.rlimit_memlock_soft()} bytes")
        mm.locked_vm += pages
    else:
        refund_locked_vm(mm, pages)


def pin_with_faults(faults: "FaultInjector | None", site: str, phys: PhysicalMemory, res: PinResult) -> PinResult:
    """A pin_user_pages*() result as fault injection leaves it.

    Each page pinned is one event at ``site`` (kernel/faults.py).  When page
    ``k`` fails it cannot be faulted in: the call returns the ``k`` pages
    before it (the pins taken after it are dropped again) and the failure is
    ENOMEM, what handle_mm_fault()'s VM_FAULT_OOM becomes.  Callers decide,
    as upstream's do, whether fewer pages is an error.
    """
    if faults is None or not res.count:
        return res
    ok = faults.take(site, res.count)
    if ok == res.count:
        return res
    vals = res.hpa_values()
    phys.unpin(vals[ok:res.count])
    if isinstance(vals, Progression):
        return PinResult(vals[:ok], None, ok, ENOMEM, [(ok, res.min_compound_shift())] if ok else [])
    return PinResult(res.hpas[:ok].copy(), res.compound_shifts[:ok].copy(), ok, ENOMEM)
