"""The argument window of a call under ``vfiosim run`` (transport/host.py).

The shim sends a copy of the memory an ioctl's pointer names along with the
call; the kernel's copy_from_user and copy_to_user of those bytes use the
copy, and what copy_to_user wrote goes back with the reply.  ``HostMM.read``
answers a read inside the window itself, one frame short of
``HostProcess.read`` (the general path), and the window keeps the bytes as
sent until the call first writes to them.  These tests hold both to the
general path: the test process is the program (its own /proc files, as the
daemon opens them), the window's bytes differ from the memory they stand
for, so a read that took the wrong source would show it.
"""

from __future__ import annotations

import ctypes
import struct
import os
from typing import Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vfiosim.kernel.errors import KernelError
from vfiosim.kernel.mm import PhysicalMemory
from vfiosim.transport.host import ArgWindow, HostMM, HostProcess

SIZE = 512                                   # VWIN_MAX
MEMORY = bytes(range(256)) * 4               # what the program's memory holds (1 KiB)
SENT = bytes(255 - b for b in MEMORY[256:256 + SIZE])   # the window's copy of [256, 768): differs from MEMORY


@pytest.fixture(scope="module")
def mm():
    host = HostProcess.open(os.getpid())
    m = HostMM(os.getpid(), PhysicalMemory(4096), host)
    yield m
    host.close()


@pytest.fixture(scope="module")
def area():
    buf = ctypes.create_string_buffer(MEMORY, len(MEMORY))
    yield buf, ctypes.addressof(buf)


def outcome(fn: Callable[[], bytes]) -> bytes | tuple[str, int]:
    try:
        return fn()
    except KernelError as exc:
        return ("errno", exc.errno)


def reference_read(mm: HostMM, addr: int, n: int) -> bytes:
    """HostMM.read() as it was before its window case: the range checks, then HostProcess.read()."""
    if addr < 0 or n < 0 or addr + n > 1 << 64:
        raise KernelError(14, "bad range")
    return mm.host.read(addr, n)


def compare_reads(mm: HostMM, area, read: Callable[[HostMM, int, int], bytes], off: int, n: int) -> None:
    buf, base = area
    ctypes.memmove(base, MEMORY, len(MEMORY))
    start = base + 256
    mm.host.open_window(start, SENT, True)
    try:
        got = outcome(lambda: read(mm, start + off, n))
    finally:
        mm.host.close_window()
    mm.host.open_window(start, SENT, True)
    try:
        want = outcome(lambda: reference_read(mm, start + off, n))
    finally:
        mm.host.close_window()
    assert got == want, (off, n)
    assert bytes(buf.raw) == MEMORY                  # a read never writes the program's memory


@settings(max_examples=300, deadline=None)
@given(off=st.integers(-300, SIZE + 300), n=st.integers(-2, SIZE + 8))
def test_a_read_is_what_the_general_path_reads(mm, area, off, n):
    compare_reads(mm, area, HostMM.read, off, n)


@pytest.mark.parametrize("off, n", [(0, SIZE), (SIZE - 8, 8), (0, 0), (SIZE, 0), (-1, 4), (SIZE - 4, 5), (8, -1)])
def test_window_edges(mm, area, off, n):
    compare_reads(mm, area, HostMM.read, off, n)


def test_inside_reads_the_copy_outside_reads_memory(mm, area):
    _, base = area
    mm.host.open_window(base + 256, SENT, True)
    try:
        assert mm.read(base + 256 + 16, 8) == SENT[16:24]
        assert mm.read(base + 16, 8) == MEMORY[16:24]
    finally:
        mm.host.close_window()


@pytest.mark.parametrize("mutation", ["end one past", "negative length", "start one before"])
def test_a_wrong_window_read_is_caught(mm, area, mutation):
    """The comparison sees a window case that is wrong at its edges."""

    def mutated(self: HostMM, addr: int, n: int) -> bytes:
        w = self.host.window
        assert w is not None
        slack_end = 1 if mutation == "end one past" else 0
        slack_start = 1 if mutation == "start one before" else 0
        if (n >= 0 or mutation == "negative length") and w.addr - slack_start <= addr and addr + n <= w.end + slack_end:
            off = max(addr - w.addr, 0)
            return bytes(w.data[off:off + n])
        return reference_read(self, addr, n)

    cases = {"end one past": (SIZE - 4, 5), "negative length": (8, -1), "start one before": (-1, 4)}
    off, n = cases[mutation]
    with pytest.raises(AssertionError):
        compare_reads(mm, area, mutated, off, n)


def test_writes_go_to_the_copy_and_come_back_with_the_reply(mm, area):
    buf, base = area
    ctypes.memmove(base, MEMORY, len(MEMORY))
    sent = bytes(SENT)
    mm.host.open_window(base + 256, sent, True)
    try:
        mm.write(base + 256 + 24, b"\xAA" * 8)
        mm.write(base + 256 + 8, b"\xBB" * 4)
        assert mm.read(base + 256 + 8, 24) == b"\xBB" * 4 + SENT[12:24] + b"\xAA" * 8
    finally:
        back = mm.host.close_window()
    assert back == (8, b"\xBB" * 4 + SENT[12:24] + b"\xAA" * 8)
    assert sent == SENT                               # the bytes as sent are never written
    assert bytes(buf.raw) == MEMORY                   # the program stores what comes back itself


def test_a_read_only_window_is_not_written(mm, area):
    buf, base = area
    ctypes.memmove(base, MEMORY, len(MEMORY))
    mm.host.open_window(base + 256, SENT, False)
    try:
        mm.write(base + 256 + 8, b"\xCC" * 4)         # copy_to_user of memory the program cannot write: not the copy
    except KernelError:
        pass
    finally:
        back = mm.host.close_window()
    assert back is None


def test_a_call_that_only_reads_sends_nothing_back(mm, area):
    _, base = area
    mm.host.open_window(base + 256, SENT, True)
    try:
        mm.read(base + 256, 32)
    finally:
        assert mm.host.close_window() is None


# -- the window itself (native.ArgWindow, in C) against a model of it in Python ---------------------------


class ModelWindow:
    """What ArgWindow does, written plainly (the Python class it replaced)."""

    def __init__(self) -> None:
        self.addr, self.data, self.writable, self.lo, self.hi = 0, b"", 0, 0, 0

    @property
    def end(self) -> int:
        return self.addr + len(self.data)

    def open(self, addr: int, data: bytes, writable: int) -> None:
        self.addr, self.data, self.writable = addr, data, writable
        self.lo, self.hi = len(data), 0

    def inside(self, addr: int, n: int) -> bool:
        return 0 <= addr < 1 << 64 and n >= 0 and self.addr <= addr and addr + n <= self.end

    def unpack(self, addr: int, layout: struct.Struct) -> tuple[int, ...] | None:
        return layout.unpack_from(self.data, addr - self.addr) if self.inside(addr, layout.size) else None

    def read(self, addr: int, n: int) -> bytes | None:
        return bytes(self.data[addr - self.addr:addr - self.addr + n]) if self.inside(addr, n) else None

    def write(self, addr: int, data: bytes) -> bool:
        if not self.writable or not self.inside(addr, len(data)):
            return False
        off = addr - self.addr
        self.data = bytearray(self.data)
        self.data[off:off + len(data)] = data
        if data:
            self.lo, self.hi = min(self.lo, off), max(self.hi, off + len(data))
        return True

    def take_written(self) -> tuple[int, bytes] | None:
        if self.lo >= self.hi:
            return None
        out = (self.addr + self.lo, bytes(self.data[self.lo:self.hi]))
        self.lo, self.hi = len(self.data), 0
        return out

    def close(self) -> tuple[int, bytes] | None:
        out = None if self.lo >= self.hi else (self.lo, bytes(self.data[self.lo:self.hi]))
        self.data, self.lo, self.hi = b"", 0, 0          # (it lets go of the bytes)
        return out

    def close_reply(self) -> bytes | None:
        out = self.close()
        return None if out is None else struct.pack("<I", out[0]) + out[1]


LAYOUTS = [struct.Struct("<IIQQQ"), struct.Struct("<IIQQ"), struct.Struct("<I"), struct.Struct("<Q")]
BASES = [0x1000, (1 << 64) - 64, 0]
addresses = st.one_of(st.integers(-8, 600), st.sampled_from([-(1 << 64), 1 << 64, (1 << 64) + 8, 1 << 70]))
operations = st.lists(st.one_of(
    st.tuples(st.just("open"), st.sampled_from(BASES), st.binary(max_size=64), st.integers(0, 1)),
    st.tuples(st.just("unpack"), addresses, st.integers(0, len(LAYOUTS) - 1)),
    st.tuples(st.just("read"), addresses, st.integers(-2, 70)),
    st.tuples(st.just("write"), addresses, st.binary(max_size=12)),
    st.tuples(st.just("take_written")),
    st.tuples(st.just("close")),
    st.tuples(st.just("close_reply"))), max_size=30)


@settings(max_examples=300, deadline=None)
@given(operations)
def test_the_c_window_does_what_its_model_does(ops):
    w, model = ArgWindow(), ModelWindow()
    for op in ops:
        name, *args = op
        if name == "open":
            base, data, writable = args
            assert w.open(base, data, writable) is w
            model.open(base, data, writable)
            continue
        if args:
            addr = args[0] + model.addr if -8 <= args[0] <= 600 else args[0]     # near the window: relative to it
            args = [addr, LAYOUTS[args[1]] if name == "unpack" else args[1]]
        got, want = getattr(w, name)(*args), getattr(model, name)(*args)
        assert got == want, (op, got, want)
        assert (w.addr, w.end, w.lo, w.hi, bytes(w.data)) == (model.addr, model.end, model.lo, model.hi,
                                                              bytes(model.data))
