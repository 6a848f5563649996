"""The usual pin and unpin of a real process's memory in C
(transport/_pin.c) do exactly what their Python (host.py's _pin_fast_run_py,
mm.py's unpin_run_of) does: the same answer (pinned, None, declined) and
the same window and RAM state after any mix of pins and unpins of one page
or a few, over private, read-only, PROT_NONE, shared (a memfd's pages bound
to the daemon's mapping of it) and unmapped pages, runs past the
end of their mapping, as RAM runs out.  And HostMM.pin_fast() with the
Python in their place still pins as the general pin does
(tests/test_fast_path_equality_host.py's comparison)."""

from __future__ import annotations

import ctypes
import mmap
import os

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import test_fast_path_equality_host as eq
from test_fast_path_equality_host import host_map, host_unmap, host_window, twins  # noqa: F401 (a fixture)
from vfiosim.kernel.mm import PhysicalMemory, unpin_run_of
from vfiosim.transport import _pin, host
from vfiosim.transport.host import HostMemoryObject, HostMM, HostProcess

PAGE = mmap.PAGESIZE
PROTS = {"rw": mmap.PROT_READ | mmap.PROT_WRITE, "ro": mmap.PROT_READ, "none": 0}


class PyWindow(HostMemoryObject):
    """A window whose unpin is the Python's."""
    __slots__ = ()
    unpin_run = staticmethod(unpin_run_of)


def test_the_native_pin_is_built_and_used():
    assert host._pin_fast_run is _pin.pin_run
    assert HostMemoryObject.unpin_run is _pin.unpin_run
    assert _pin.WINDOW_SHIFT == host.WINDOW_SHIFT


class Pages:
    """Mappings of this process, one per kind, a few pages each (made once)."""

    def __init__(self) -> None:
        self.maps: dict[str, mmap.mmap] = {}
        self.addrs: dict[str, int] = {}
        for kind, prot in PROTS.items():
            self._map(kind, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS, prot)
        self._map("shared", mmap.MAP_SHARED | mmap.MAP_ANONYMOUS, PROTS["rw"])
        self.memfd = os.memfd_create("test_pin_native")     # its pinned pages are bound to the file
        os.ftruncate(self.memfd, 4 * PAGE)
        self._map("memfd", mmap.MAP_SHARED, PROTS["rw"], self.memfd)
        self.addrs["unmapped"] = 1 << 44                 # far below where the host maps anything

    def _map(self, kind: str, flags: int, prot: int, fd: int = -1) -> None:
        m = mmap.mmap(fd, 4 * PAGE, flags=flags, prot=PROTS["rw"])
        m.write(b"\1" * 4 * PAGE)
        self.maps[kind] = m
        addr = ctypes.addressof(ctypes.c_char.from_buffer(m))
        self.addrs[kind] = addr
        assert ctypes.CDLL(None).mprotect(ctypes.c_void_p(addr), 4 * PAGE, prot) == 0


PAGES = Pages()


def side(ram_pages: int, python: bool) -> tuple[HostMM, PhysicalMemory]:
    """An address space of this process with every window its pages lie in
    registered (unpinned by the Python if ``python``)."""
    phys = PhysicalMemory(PAGE)
    phys.ram_pages = ram_pages
    mm = HostMM(os.getpid(), phys, HostProcess.open(os.getpid()))
    mm.files.opener = lambda dev, ino, hint: (os.dup(PAGES.memfd), PAGES.memfd)
    for addr in PAGES.addrs.values():
        obj = mm._window(addr >> host.WINDOW_SHIFT)
        if python:
            obj.__class__ = PyWindow
        if not obj.users:
            mm._register(obj)
    return mm, phys


def state(mm: HostMM, phys: PhysicalMemory) -> tuple:
    windows = {i: (o.pins, np.flatnonzero(o.pincount).tolist(), o.pincount[o.pincount != 0].tolist(),
                   np.flatnonzero(o.unmapped).tolist(), None if o.slots is None else np.flatnonzero(o.slots).tolist())
               for i, o in sorted(mm._windows.items())}
    return phys.used_pages, windows


KINDS = sorted(PAGES.addrs) + ["rw"] * 5 + ["ro"] * 2    # mostly what pins
pin = st.tuples(st.just("pin"), st.sampled_from(KINDS), st.integers(0, 2), st.booleans(), st.booleans(),
                st.one_of(st.just(1), st.integers(2, 3), st.integers(2, 3), st.just(5)))
unpin = st.tuples(st.just("unpin"), st.integers(0, 50))


@given(st.lists(st.one_of(pin, pin, unpin), max_size=30), st.one_of(st.integers(0, 6), st.just(1 << 20), st.just(1 << 20)))
@settings(max_examples=200, deadline=None)
def test_native_and_python_pins_agree(steps, ram_pages):
    (cm, cphys), (pm, pphys) = side(ram_pages, False), side(ram_pages, True)
    pinned: list[tuple[int, int]] = []                  # (hpa in C's memory, in Python's)
    try:
        for op in steps:
            if op[0] == "pin":
                _, kind, page, write, longterm, n = op
                addr = PAGES.addrs[kind] + page * PAGE      # (n pages from it: some run past the mapping)
                index = addr >> host.WINDOW_SHIFT
                c_obj, p_obj = cm._windows[index], pm._windows[index]
                room = ram_pages - cphys.used_pages
                got = _pin.pin_run(cm.host.maps_fd, addr, n, write, longterm, c_obj, cphys)
                want = host._pin_fast_run_py(pm.host.maps_fd, addr, n, write, longterm, p_obj, pphys)
                if isinstance(got, tuple) and isinstance(want, tuple):
                    assert got[0] - c_obj.phys_base == want[0] - p_obj.phys_base, op
                    assert got[1:] == want[1:], op
                    pinned.append((got[0], want[0], n))
                else:
                    assert got is want, op
                    if kind == "rw" and page + n <= 4 and room >= n:          # the pages fit
                        pytest.fail(f"{op}: private read-write pages not pinned ({got})")
                    if got is False:                        # the Python pin's (a shared page: bound to a file)
                        got, want = cm.pin_fast(addr, n, write, longterm), pm.pin_fast(addr, n, write, longterm)
                        assert (got is None) == (want is None), op
                        if got is not None and want is not None:
                            pinned.append((got[0], want[0], n))
            elif pinned:
                c_hpa, p_hpa, n = pinned.pop(op[1] % len(pinned))
                cphys.unpin_range(c_hpa, n)
                pphys.unpin_range(p_hpa, n)
            assert state(cm, cphys) == state(pm, pphys), op
    finally:
        cm.teardown()
        pm.teardown()


@pytest.mark.parametrize("config", ["type1v2", "pseries-v1"])
def test_the_python_pin_pins_as_the_general_pin(twins, monkeypatch, config):  # noqa: F811
    """HostMM.pin_fast() with _pin_fast_run_py: the usual pairs, of one page and
    of a few, a page pinned twice, RAM running out, all as the general path
    has them."""
    monkeypatch.setattr(host, "_pin_fast_run", host._pin_fast_run_py)
    monkeypatch.setattr(HostMemoryObject, "unpin_run", staticmethod(unpin_run_of))
    t = twins(config, ram_pages=600)
    iova, page = host_window(t)
    for n in range(3):
        t.fast_pin(host_map(iova, t.buf + n * PAGE))
        t.step(host_unmap(iova))
    if config == "type1v2":
        t.fast_pin(host_map(iova, t.buf + 2 * PAGE, pages=3))
        t.step(host_unmap(iova, pages=3))
    t.fast_pin(host_map(iova, t.buf + 5 * PAGE))
    t.fast_pin(host_map(iova + page, t.buf + 5 * PAGE))
    t.step(host_unmap(iova + page))

    def fill(s: eq.HostSide) -> None:
        hog = s.m.spawn()
        free = s.m.meminfo()["MemFree"] * 1024 // PAGE
        a = hog.mmap(free * PAGE)
        hog.write_memory(a, b"\x01" * (free * PAGE))
    t.step(fill)
    assert t.fast.m.meminfo()["MemFree"] == 0
    assert t.general_pin(host_map(iova + page, t.buf + 4 * PAGE))[1] == ("ENOMEM" if config == "type1v2"
                                                                          else "EFAULT")
    t.fast_pin(host_map(iova + page, t.buf + 5 * PAGE))         # pinned already: no RAM needed
    t.step(host_unmap(iova + page))
    t.step(host_unmap(iova))


def test_shared_pages_bind_as_the_general_pin_binds(monkeypatch):
    """A memfd's pages pinned by the C are bound to the daemon's mapping of the
    file as pin_fast()'s Python path binds them, and unbound with their last
    pin: the same slots, file mappings and RAM, pinned and unpinned again."""
    (cm, cphys), (pm, pphys) = side(1 << 20, False), side(1 << 20, False)
    general = host._pin_fast_run
    runs = [(0, 1), (1, 2), (0, 3), (3, 1)]
    pinned = []
    try:
        for page, n in runs:
            addr = PAGES.addrs["memfd"] + page * PAGE
            got = cm.pin_fast(addr, n, True, True)
            with monkeypatch.context() as mp:
                mp.setattr(host, "_pin_fast_run", lambda *args: False)      # the Python path
                want = pm.pin_fast(addr, n, True, True)
            assert got is not None and want is not None
            assert got[1:] == want[1:]
            pinned.append((got[0], want[0], n))
            assert state(cm, cphys) == state(pm, pphys)
            assert (cm.files.bound, cm.files.mapped, cm.files.count()) == \
                (pm.files.bound, pm.files.mapped, pm.files.count()) and cm.files.bound > 0
        assert host._pin_fast_run is general
        for c_hpa, p_hpa, n in pinned:
            cphys.unpin_range(c_hpa, n)
            pphys.unpin_range(p_hpa, n)
            assert state(cm, cphys) == state(pm, pphys)
        assert cm.files.bound == pm.files.bound == 0 and cphys.used_pages == 0
    finally:
        cm.teardown()
        pm.teardown()
