"""The daemon's shortcuts for BAR stores and loads are observably identical
to the general path.

Under ``vfiosim run`` the daemon performs a store or load through a device
mapping with the function the device offers for that register
(``Kernel.mmap_store_fn``, ``Kernel.mmap_load_fn``: edu's DMA address,
count and command registers, kept per mapping for its life) instead of
``Kernel.mmap_access``'s layers; where the shortcut declines (memory
decoding off) it falls back to mmap_access, which says how the access fails.
Here Hypothesis drives random sequences of BAR accesses on two machines
built alike, one through the shortcuts (asked once per register and size,
as the daemon does) and one through mmap_access only, with what changes
their answers in between: memory decoding and bus mastering switched off
and on, DMA pages unmapped and mapped again, EEH recovery on PowerNV.  The
DMA commands aim at every kind of bus address (mapped, read-only, unmapped,
outside the window, past the 28-bit mask) and device-buffer range (inside,
overrunning, wrapping).  After every step it compares each access's value
or errno, the device's registers and DMA count, interrupts, dmesg, the
program's memory, the IOMMU and pin state (tests/machinestate.py), EEH
state and DMA fault counts, and oopses.
"""

from __future__ import annotations

import ctypes
import errno
from typing import Any, Callable

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

import vfiosim
from machinestate import diff, snapshot
from vfiosim import uapi
from vfiosim.kernel.errors import KernelError
from vfioutil import BAR0, CONFIG, dma_map, dma_unmap, open_device, setup_v1

PAGE = 4096
PAGES = 8
IOVA = 0x100000                         # the buffer's bus address; its last page is mapped read-only
DMA_BUF = 0x40000

# preset: (IOMMU group, edu's address, IOMMU type, needs VFIO_IOMMU_ENABLE)
PLATFORMS = {
    "x86": (4, "0000:01:00.0", uapi.VFIO_TYPE1v2_IOMMU, False),
    "powernv": (0, "0000:01:00.0", uapi.VFIO_SPAPR_TCE_IOMMU, True),
    "pseries": (0, "0000:00:00.0", uapi.VFIO_SPAPR_TCE_IOMMU, True),
}

REGISTERS = [0x00, 0x04, 0x08, 0x20, 0x24, 0x60, 0x64, 0x80, 0x84, 0x88, 0x8C, 0x90, 0x94, 0x98, 0x9C, 0xA0, 0x81]
SIZES = st.sampled_from([1, 2, 4, 8])
BUS_ADDRESSES = st.sampled_from([
    IOVA, IOVA + 0x800, IOVA + 3 * PAGE + 0xF00, IOVA + (PAGES - 1) * PAGE,     # mapped; the last page read-only
    IOVA + PAGES * PAGE, 0x0, 0x3000_0000, 0x7FFF_F000,                         # unmapped, outside a window
    0x1000_0000 | IOVA, (1 << 40) | IOVA, (1 << 64) - 0x1000,                   # past the mask
]) | st.integers(0, (1 << 64) - 1)
BUFFER_ADDRESSES = st.sampled_from([DMA_BUF, DMA_BUF + 0x10, DMA_BUF + 0xFFF, DMA_BUF + 0x1000, 0x3F000, 0]) | \
    st.integers(0, (1 << 64) - 1)
COUNTS = st.sampled_from([0, 1, 16, 0x800, 0x1000, 0x1001, 0x2000, (1 << 64) - 1]) | st.integers(0, 1 << 32)
COMMANDS = st.sampled_from([1, 3, 5, 7, 0, 2]) | st.integers(0, (1 << 64) - 1)


def outcome(fn: Callable[[], Any]) -> tuple[Any, ...]:
    try:
        return ("ok", fn())
    except KernelError as exc:
        return ("errno", errno.errorcode.get(exc.errno, exc.errno))


class Side:
    """One machine: a process with edu open, bus mastering on, and a buffer
    mapped for DMA; BAR accesses through the shortcuts or not."""

    def __init__(self, platform: str, shortcuts: bool) -> None:
        group, bdf, iommu, enable = PLATFORMS[platform]
        self.m = m = vfiosim.Machine.preset(platform)
        self.p = p = m.spawn(uid=0, rlimit_memlock=(1 << 40, 1 << 40))
        self.c, g = setup_v1(p, group, iommu=iommu, enable=enable)
        self.d = open_device(p, g, bdf)
        self.dev = m.device(bdf)
        self.buf = p.mmap(PAGES * PAGE)
        p.write_memory(self.buf, bytes(i * 7 % 251 for i in range(PAGES * PAGE)))
        self.map_pages()
        self.command(0x6)                   # memory decoding and bus mastering on
        self.file = p.task.files.get(self.d)
        self.shortcuts = shortcuts
        self.fns: dict[tuple[str, int, int], Any] = {}

    def map_pages(self) -> Any:
        rw = dma_map(self.p, self.c, self.buf, IOVA, (PAGES - 1) * PAGE)
        return rw, dma_map(self.p, self.c, self.buf + (PAGES - 1) * PAGE, IOVA + (PAGES - 1) * PAGE, PAGE,
                           flags=uapi.VFIO_DMA_MAP_FLAG_READ)

    def command(self, value: int) -> None:
        self.p.pwrite(self.d, value.to_bytes(2, "little"), CONFIG + 4)

    def _shortcut(self, kind: str, off: int, size: int) -> Any:
        key = (kind, off, size)
        if key not in self.fns:             # asked once, kept: as the daemon keeps them per mapping
            k = self.m.kernel
            make = k.mmap_store_fn if kind == "store" else k.mmap_load_fn
            self.fns[key] = make(self.file, BAR0 + off, size)
        return self.fns[key]

    def store(self, off: int, size: int, value: int) -> tuple[Any, ...]:
        k, task = self.m.kernel, self.p.task

        def go() -> Any:
            fn = self._shortcut("store", off, size) if self.shortcuts else None
            if fn is not None and fn(value):
                return 0
            return k.mmap_access(task, self.file, BAR0 + off, size, value)
        return outcome(go)

    def load(self, off: int, size: int) -> tuple[Any, ...]:
        k, task = self.m.kernel, self.p.task

        def go() -> Any:
            fn = self._shortcut("load", off, size) if self.shortcuts else None
            if fn is not None:
                value = fn()
                if value is not None:
                    return value
            return k.mmap_access(task, self.file, BAR0 + off, size, None)
        return outcome(go)

    def observe(self) -> dict[str, Any]:
        m = self.m
        pes = [(pe.name, pe.dma_faults, None if getattr(pe, "eeh", None) is None else
                (pe.eeh.mmio_stopped, pe.eeh.dma_stopped)) for pe in m.kernel.pes]
        return {"device": self.dev.snapshot(), "intx": self.dev.intx_level,
                "dmesg": m.dmesg(include_debug=True), "memory": self.p.read_memory(self.buf, PAGES * PAGE),
                "snapshot": snapshot(m), "pes": pes, "oopses": list(m.oopses)}


class ShortcutEquality(RuleBasedStateMachine):
    platform = "x86"

    def __init__(self) -> None:
        super().__init__()
        self.fast = Side(self.platform, True)
        self.slow = Side(self.platform, False)
        self.taken = 0                      # accesses the shortcuts answered

    def both(self, fn: Callable[[Side], Any]) -> None:
        a, b = fn(self.fast), fn(self.slow)
        assert a == b, (a, b)

    @rule(off=st.sampled_from(REGISTERS), size=SIZES, value=st.integers(0, (1 << 64) - 1))
    def store_any(self, off: int, size: int, value: int) -> None:
        if off == 0x08:
            value %= 64                     # (the model computes n! in n steps: no 2**32 of them here)
        self.both(lambda s: s.store(off, size, value & ((1 << (8 * size)) - 1)))

    @rule(to_ram=st.booleans(), bus=BUS_ADDRESSES, dev=BUFFER_ADDRESSES, count=COUNTS, size=st.sampled_from([4, 8]),
          irq=st.booleans())
    def transfer(self, to_ram: bool, bus: int, dev: int, count: int, size: int, irq: bool) -> None:
        """A driver's DMA: address registers, count, command, then a poll of the command."""
        mask = (1 << (8 * size)) - 1
        src, dst = (dev, bus) if to_ram else (bus, dev)
        for off, value in ((0x80, src), (0x88, dst), (0x90, count),
                           (0x98, 1 | (2 if to_ram else 0) | (4 if irq else 0))):
            self.both(lambda s: s.store(off, size, value & mask))
        self.both(lambda s: s.load(0x98, size))

    @rule(value=COMMANDS, size=st.sampled_from([4, 8]))
    def command(self, value: int, size: int) -> None:
        self.both(lambda s: s.store(0x98, size, value & ((1 << (8 * size)) - 1)))

    @rule(off=st.sampled_from(REGISTERS), size=SIZES)
    def load(self, off: int, size: int) -> None:
        self.both(lambda s: s.load(off, size))

    @rule(memory=st.booleans(), master=st.booleans())
    def pci_command(self, memory: bool, master: bool) -> None:
        self.both(lambda s: s.command((2 if memory else 0) | (4 if master else 0)))

    @rule(first=st.integers(0, PAGES - 1), pages=st.integers(1, PAGES))
    def unmap(self, first: int, pages: int) -> None:
        def go(s: Side) -> Any:
            try:
                return dma_unmap(s.p, s.c, IOVA + first * PAGE, min(pages, PAGES - first) * PAGE)
            except OSError as exc:
                return exc.errno
        self.both(go)

    @rule()
    def remap(self) -> None:
        def go(s: Side) -> Any:
            dma_unmap(s.p, s.c, IOVA, PAGES * PAGE)
            return s.map_pages()
        self.both(go)

    @rule()
    def eeh_recover(self) -> None:
        """PowerNV: a hot reset of the PE, which thaws it (elsewhere: the errno of an absent EEH)."""
        def go(s: Side) -> Any:
            out = []
            for op in (uapi.VFIO_EEH_PE_RESET_HOT, uapi.VFIO_EEH_PE_RESET_DEACTIVATE, uapi.VFIO_EEH_PE_CONFIGURE):
                try:
                    out.append(s.p.ioctl(s.c, uapi.VFIO_EEH_PE_OP,
                                         uapi.vfio_eeh_pe_op(argsz=ctypes.sizeof(uapi.vfio_eeh_pe_op), op=op)))
                except OSError as exc:
                    out.append(exc.errno)
            return out
        self.both(go)

    @invariant()
    def same(self) -> None:
        a, b = self.fast.observe(), self.slow.observe()
        for key in a:
            if key == "snapshot":
                assert a[key] == b[key], diff(a[key], b[key])
            else:
                assert a[key] == b[key], (key, a[key], b[key])
        assert not a["oopses"]


def _platform_test(platform: str, examples: int) -> Any:
    cls = type(f"ShortcutEquality_{platform}", (ShortcutEquality,), {"platform": platform})
    cls.TestCase.settings = settings(max_examples=examples, stateful_step_count=30, deadline=None)
    return cls.TestCase


TestX86 = _platform_test("x86", 40)
TestPowerNV = _platform_test("powernv", 40)
TestPseries = _platform_test("pseries", 40)


# -- the boundaries, one by one ----------------------------------------------------------------------------

@pytest.mark.parametrize("platform", sorted(PLATFORMS))
def test_shortcuts_are_offered_for_the_dma_registers_only(platform):
    """What a driver stores and polls for every transfer, at 4 or 8 bytes
    aligned; nothing for the other registers, other sizes, other BARs, the
    config region, or past BAR0."""
    s = Side(platform, True)
    k, f = s.m.kernel, s.file
    for off in (0x80, 0x88, 0x90, 0x98):
        for size in (4, 8):
            assert k.mmap_store_fn(f, BAR0 + off, size) is not None
            assert k.mmap_load_fn(f, BAR0 + off, size) is not None
        for size in (1, 2, 3, 16):
            assert k.mmap_store_fn(f, BAR0 + off, size) is None
            assert k.mmap_load_fn(f, BAR0 + off, size) is None
    for off in (0x00, 0x04, 0x08, 0x20, 0x24, 0x60, 0x64, 0x84, 0x9C, 0xA0, 0x82):
        assert k.mmap_store_fn(f, BAR0 + off, 4) is None
        assert k.mmap_load_fn(f, BAR0 + off, 4) is None
    assert k.mmap_load_fn(f, BAR0 + (1 << 20) - 4, 8) is None                   # runs past BAR0
    assert k.mmap_load_fn(f, CONFIG + 0x98, 8) is None
    assert k.mmap_load_fn(f, (1 << 40) + 0x98, 8) is None                       # BAR1: edu has none
    assert k.mmap_load_fn(s.p.task.files.get(s.c), 0x98, 8) is None            # not a device file


@pytest.mark.parametrize("platform", sorted(PLATFORMS))
def test_a_load_shortcut_declines_while_decoding_is_off(platform):
    """Decoding off as the user set it: the shortcut answers None and
    mmap_access faults (EIO: the program's SIGBUS); the device's own decoding
    or an EEH freeze (its view behind vfio-pci's): all-ones, both ways."""
    fast, slow = Side(platform, True), Side(platform, False)
    for s in (fast, slow):
        assert s.store(0x88, 8, 0x1234) == ("ok", 0)
    load = fast.m.kernel.mmap_load_fn(fast.file, BAR0 + 0x88, 8)
    assert load() == 0x1234
    for s in (fast, slow):
        s.command(0x4)
    assert load() is None
    assert fast.load(0x88, 8) == slow.load(0x88, 8) == ("errno", "EIO")
    assert fast.store(0x88, 8, 1) == slow.store(0x88, 8, 1) == ("errno", "EIO")
    for s in (fast, slow):
        s.command(0x6)
        s.dev.config.data[4] &= ~0x2                # the device stops decoding behind vfio-pci's back
    assert load() == (1 << 64) - 1
    assert fast.load(0x88, 8) == slow.load(0x88, 8) == ("ok", (1 << 64) - 1)
    for s in (fast, slow):
        s.dev.config.data[4] |= 0x2
    assert load() == 0x1234


def test_a_dma_through_the_shortcuts_freezes_the_pe_as_the_general_path_does():
    """PowerNV: a device write through a read-only TCE freezes the PE; then
    the PE's MMIO is stopped, and both paths read all-ones and drop stores."""
    fast, slow = Side("powernv", True), Side("powernv", False)
    ro = IOVA + (PAGES - 1) * PAGE
    for s in (fast, slow):
        for off, value in ((0x80, DMA_BUF), (0x88, ro), (0x90, 16), (0x98, 3)):
            assert s.store(off, 8, value) == ("ok", 0)
    assert fast.observe() == slow.observe()
    pe = next(pe for pe in fast.m.kernel.pes if fast.dev in pe.devices)
    assert pe.eeh.mmio_stopped and pe.eeh.dma_stopped
    assert fast.load(0x98, 8) == slow.load(0x98, 8) == ("ok", (1 << 64) - 1)
    assert fast.store(0x80, 8, 5) == slow.store(0x80, 8, 5) == ("ok", 0)
    assert fast.dev.dma_src == slow.dev.dma_src == DMA_BUF                      # dropped
    assert fast.observe() == slow.observe()
