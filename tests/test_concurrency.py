"""Threads: many threads on shared fds keep the machine consistent.

The simulated kernel is serialised by one lock per machine (``Machine._lock``,
a big kernel lock: docs/reliability.md says why that is correct here).  These
tests check that every entry point takes it -- the in-process API, the
daemon's request path, the introspection methods -- and that threads sharing
a process's container, group and device fds leave exactly the state their
calls describe.
"""

from __future__ import annotations

import ctypes
import errno
import os
import threading

import pytest

import vfiosim
from vfiosim import uapi
from vfiosim.kernel.kernel import Kernel
from vfioutil import BAR0, CONFIG, dma_map, dma_unmap, enable_bus_master, open_device, reg_read, reg_write, setup_v1

KiB, MiB = 1 << 10, 1 << 20
ENTRY_POINTS = [name for name in vars(Kernel) if name.startswith("sys_")] + ["spawn", "exit", "fork", "attach",
                                                                               "exec"]


@pytest.fixture
def lock_audit(monkeypatch):
    """Every kernel entry point must run with the machine's lock held."""
    violations: list[str] = []
    machines: list[vfiosim.Machine] = []
    original_init = vfiosim.Machine.__init__

    def init(self, *a, **kw):
        original_init(self, *a, **kw)
        machines.append(self)
    monkeypatch.setattr(vfiosim.Machine, "__init__", init)

    def wrap(name):
        fn = getattr(Kernel, name)

        def checked(self, *a, **kw):
            m = next((m for m in machines if m.kernel is self), None)
            if m is not None and not m._lock._is_owned():
                violations.append(name)
            return fn(self, *a, **kw)
        return checked
    for name in ENTRY_POINTS:
        monkeypatch.setattr(Kernel, name, wrap(name))
    return violations


def test_every_kernel_entry_point_runs_under_the_machine_lock(lock_audit, tmp_path):
    m = vfiosim.Machine.default()
    p = m.spawn()
    c, g = setup_v1(p)
    dev = open_device(p, g, m.iommu_groups()[0][0])
    buf = p.mmap(MiB)
    p.write_memory(buf, b"x" * MiB)
    dma_map(p, c, buf, 0, 64 * KiB)
    enable_bus_master(p, dev)
    reg_write(p, dev, 0x80, 0, 8)
    p.pread(dev, 4, CONFIG)
    efd = p.eventfd()
    p.write(efd, (1).to_bytes(8, "little"))
    p.read(efd, 8)
    p.dup(c)
    child = p.fork()
    child.exit()
    p._call("mmio", m.kernel.sys_mmio, dev, 0, 4, None)
    m.dmesg(), m.pinned_pages(), m.processes(), m.topology(), m.iommu_groups()
    p.exit()
    # The daemon's request path: a simulated task behind a socket pair.
    from vfiosim import fuzz
    fuzz.target_protocol(bytes(range(256)) * 4)
    assert lock_audit == []


def test_threads_sharing_fds_keep_the_state_their_calls_describe():
    m = vfiosim.Machine.default()
    p = m.spawn(rlimit_memlock=(1 << 30, 1 << 30))
    c, g = setup_v1(p)
    dev = open_device(p, g, m.iommu_groups()[0][0])
    enable_bus_master(p, dev)
    buf = p.mmap(8 * MiB)
    p.write_memory(buf, b"\x5a" * 8 * MiB)
    errors: list[BaseException] = []
    n_threads, rounds = 4, 60

    def worker(t: int) -> None:
        try:
            base = t * MiB
            for r in range(rounds):
                size = (1 + (r + t) % 16) * 4 * KiB
                assert dma_map(p, c, buf + base, base, size) == 0
                info = uapi.vfio_iommu_spapr_tce_info(argsz=32)
                p.ioctl(c, uapi.VFIO_IOMMU_SPAPR_TCE_GET_INFO, info)
                assert info.dma32_window_size == 1 << 31
                assert int.from_bytes(p.pread(dev, 2, CONFIG), "little") == 0x1234
                reg_write(p, dev, 0x04, t * 1000 + r)
                reg_read(p, dev, 0x04)                         # another thread may have written since
                if r % 2:
                    assert dma_unmap(p, c, base, size) == 0
                try:
                    dma_map(p, c, buf + base, base + 8 * MiB + t * 4096, 4096, flags=0)
                except OSError as exc:
                    assert exc.errno == errno.EINVAL
        except BaseException as exc:                            # noqa: BLE001
            errors.append(exc)

    def reader() -> None:
        try:
            for _ in range(200):
                m.dmesg()
                m.pinned_pages()
                m.topology()
        except BaseException as exc:                            # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(n_threads)]
    threads.append(threading.Thread(target=reader))
    for th in threads:
        th.start()
    for th in threads:
        th.join(60)
    assert not errors, errors[0]
    # Threads use disjoint IOVA ranges: each one's entries must be what its own
    # calls, in order, leave (a map over mapped entries replaces them).
    expected = set()
    for t in range(n_threads):
        mapped: set[int] = set()
        for r in range(rounds):
            pages = set(range(1 + (r + t) % 16))
            mapped |= pages
            if r % 2:
                mapped -= pages
        expected |= {(t * MiB >> 12) + i for i in mapped}
    tbl = m.pe_of(m.iommu_groups()[0][0]).tve[0]
    used = set(tbl.it_ops.used(tbl, tbl.it_offset, tbl.it_size).tolist())
    assert used == expected
    assert m.pinned_pages() == len(expected)
    assert not m.oopses
    p.exit()
    assert m.pinned_pages() == 0


def test_dmesg_while_other_threads_log_does_not_break():
    """Regression: dmesg() iterated the log ring without the machine lock and
    failed with "deque mutated during iteration" while another thread logged."""
    m = vfiosim.Machine.default()
    p = m.spawn()
    c, g = setup_v1(p)
    buf = p.mmap(64 * KiB)
    for _ in range(20000):
        m.kernel.log.info("filler")
    stop = threading.Event()
    errors: list[BaseException] = []

    def logger() -> None:
        while not stop.is_set():
            dma_map(p, c, buf, 0x1001, 4096)          # a misaligned IOVA: returns 1 and logs a line

    threads = [threading.Thread(target=logger) for _ in range(2)]
    for th in threads:
        th.start()
    try:
        for _ in range(150):
            m.dmesg()
    except BaseException as exc:                       # noqa: BLE001
        errors.append(exc)
    finally:
        stop.set()
        for th in threads:
            th.join(30)
    assert not errors, errors[0]
