"""The performance paths keep the semantics of the simple ones.

The TCE storage (sparse chunks, a pool of reused chunks, values written as
progressions), the PHB's TCE cache and the bulk DMA path are checked against
dense reference models and against what a stale cache would get wrong.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import vfiosim
from vfiosim.kernel.iommu.tce import TceStorage
from vfiosim.kernel.pci.device import DmaError
from vfiosim.kernel.progression import Progression
from vfioutil import dma_map, dma_unmap, setup_v1

U64 = (1 << 64) - 1


# -- Progression ----------------------------------------------------------------------------------

@given(first=st.integers(0, U64), step=st.sampled_from([0, 1, 8, 4096, 1 << 16, 1 << 24, 12345]),
       size=st.integers(0, 40000), lo=st.integers(0, 40000), hi=st.integers(0, 40000))
@settings(max_examples=60, deadline=None)
def test_progression_matches_arange(first, step, size, lo, hi):
    p = Progression(first, step, size)
    ref = (np.arange(size, dtype=np.uint64) * np.uint64(step)) + np.uint64(first)
    assert np.array_equal(np.asarray(p), ref)
    sl = p[lo:hi]
    assert np.array_equal(np.asarray(sl), ref[lo:hi])
    assert sl.any() == bool(ref[lo:hi].any())
    dest = np.zeros(len(sl), dtype=np.uint64)
    p.write_to(dest, min(lo, size))
    assert np.array_equal(dest, ref[lo:hi])


@given(st.integers(0, (1 << 64) - 1), st.integers(0, 1 << 20), st.integers(0, 1 << 12), st.integers(0, 200))
def test_progression_counts_its_nonzero_values(first, step, start, n):
    p = Progression(first, step, start + n)
    assert p.count_nonzero_in(start, n) == int(np.count_nonzero(np.asarray(p)[start:start + n]))


def test_progression_or_refuses_bits_it_would_corrupt():
    p = Progression(0x10000, 0x1000, 4)
    assert np.array_equal(np.asarray(p | 3), np.asarray(p) | np.uint64(3))
    with pytest.raises(ValueError):
        p | 0x1000                                   # a bit that varies along the run
    with pytest.raises(TypeError):
        p[::2]


# -- TceStorage against a dense array ---------------------------------------------------------------

SIZE = 3 * TceStorage.CHUNK + 100

lengths = st.one_of(st.just(1), st.integers(0, 2 * TceStorage.CHUNK))       # one entry has its own path
ops = st.one_of(
    st.tuples(st.just("xchg"), st.integers(0, SIZE - 1), lengths, st.booleans(), st.integers(0, 3)),
    st.tuples(st.just("clear"), st.integers(0, SIZE - 1), lengths),
    st.tuples(st.just("clear_idx"), st.lists(st.integers(0, SIZE - 1), max_size=50, unique=True)),
)


@given(st.lists(ops, max_size=25))
@settings(max_examples=80, deadline=None)
def test_storage_behaves_like_a_dense_array(steps):
    s = TceStorage(SIZE)
    ref = np.zeros(SIZE, dtype=np.uint64)
    for op in steps:
        gen = s.generation
        if op[0] == "xchg":
            _, start, n, as_prog, kind = op
            n = min(n, SIZE - start)
            if kind == 0 and as_prog:
                values = Progression(0, 0x1000, n)               # a zero first, then mappings
            elif kind == 0:
                values = np.zeros(n, dtype=np.uint64)            # an exchange that empties entries
            elif as_prog:
                values = Progression(0x1000 * (start + 1) | kind, 0x1000, n)
            else:
                values = np.arange(n, dtype=np.uint64) * np.uint64(kind) + np.uint64(kind)
            pos, old = s.xchg_range(start, values)
            dense = np.asarray(values)
            before = ref[start:start + n].copy()
            nz = np.flatnonzero(before)
            assert np.array_equal(pos, nz) and np.array_equal(old, before[nz])
            ref[start:start + n] = dense
        elif op[0] == "clear":
            _, start, n = op
            n = min(n, SIZE - start)
            parts = s.clear_range(start, n)
            got = np.concatenate(parts) if parts else np.zeros(0, dtype=np.uint64)
            seg = ref[start:start + n]
            assert np.array_equal(got, seg[seg != 0])
            seg[:] = 0
        else:
            idx = np.array(sorted(op[1]), dtype=np.int64)
            old = s.clear_indices(idx)
            assert np.array_equal(old, ref[idx])
            ref[idx] = 0
        if op[0] == "xchg":
            assert s.generation > gen                    # every change invalidates caches
        assert np.array_equal(s.get_range(0, SIZE), ref)
        assert s.count_used() == np.count_nonzero(ref)
        # Memory follows what is mapped: a chunk exists only while it holds something.
        assert len(s._chunks) == len({i >> TceStorage.CHUNK_SHIFT for i in np.flatnonzero(ref)})


def test_reused_chunks_come_back_empty():
    a = TceStorage(TceStorage.CHUNK * 4)
    a.xchg_range(0, Progression(0x1003, 0x1000, TceStorage.CHUNK * 4))
    a.clear_range(0, TceStorage.CHUNK * 4)           # the chunks go to the pool
    b = TceStorage(TceStorage.CHUNK * 4)
    b.xchg_range(10, np.array([7], dtype=np.uint64))  # takes a pooled chunk
    assert b.count_used() == 1 and b.get(10) == 7
    assert np.count_nonzero(b.get_range(0, TceStorage.CHUNK)) == 1


# -- the PHB's TCE cache can never serve a stale translation -------------------------------------

@pytest.fixture(params=["powernv", "pseries"])
def dma_rig(request):
    m = vfiosim.Machine.preset(request.param)
    p = m.spawn(uid=0)
    gid, bdfs = next(iter(m.iommu_groups().items()))
    c, _ = setup_v1(p, gid)
    dev = m.device(bdfs[0])
    dev.config.data[4] |= 0x4                          # bus master
    return m, p, c, dev


def test_dma_after_unmap_faults_even_when_cached(dma_rig):
    m, p, c, dev = dma_rig
    buf = p.mmap(8192)
    p.write_memory(buf, b"A" * 8192)
    dma_map(p, c, buf, 0, 8192)
    assert dev.bus_master.dma_read(0, 8192) == b"A" * 8192
    assert dev.bus_master.dma_read(0, 8192) == b"A" * 8192      # served from the cache
    dma_unmap(p, c, 0, 4096)
    with pytest.raises(DmaError):
        dev.bus_master.dma_read(0, 8192)


def test_dma_after_remap_sees_the_new_page(dma_rig):
    m, p, c, dev = dma_rig
    a, b = p.mmap(4096), p.mmap(4096)
    p.write_memory(a, b"a" * 4096)
    p.write_memory(b, b"b" * 4096)
    dma_map(p, c, a, 0, 4096)
    assert dev.bus_master.dma_read(0, 16) == b"a" * 16
    dma_unmap(p, c, 0, 4096)
    dma_map(p, c, b, 0, 4096)
    assert dev.bus_master.dma_read(0, 16) == b"b" * 16


def test_read_only_mapping_refuses_a_cached_read_turned_write(dma_rig):
    m, p, c, dev = dma_rig
    buf = p.mmap(4096)
    dma_map(p, c, buf, 0, 4096, flags=1)                         # READ: device may read only
    dev.bus_master.dma_read(0, 4096)
    with pytest.raises(DmaError):
        dev.bus_master.dma_write(0, b"x" * 4096)


def test_bulk_dma_spans_pages_in_order(dma_rig):
    m, p, c, dev = dma_rig
    n = 64
    buf = p.mmap(n * 4096)
    data = np.random.default_rng(1).integers(0, 256, n * 4096, dtype=np.uint8).tobytes()
    p.write_memory(buf, data)
    # Map the pages in reverse order: bus-contiguous, host-scattered.
    for i in range(n):
        dma_map(p, c, buf + (n - 1 - i) * 4096, i * 4096, 4096)
    expect = b"".join(data[(n - 1 - i) * 4096:(n - i) * 4096] for i in range(n))
    out = np.zeros(n * 4096, dtype=np.uint8)
    dev.bus_master.dma_read_into(0, out)
    assert out.tobytes() == expect
    dev.bus_master.dma_write(100, b"\xee" * 8000)
    got = p.read_memory(buf, n * 4096)
    ref = bytearray(expect)
    ref[100:8100] = b"\xee" * 8000
    assert b"".join(got[(n - 1 - i) * 4096:(n - i) * 4096] for i in range(n)) == bytes(ref)


def test_large_map_and_unmap_keep_pins_and_accounting_exact(dma_rig):
    m, p, c, dev = dma_rig
    n = 3 * TceStorage.CHUNK + 17                      # several storage chunks and a tail
    tbl_pages = m.kernel.phys.pinned_pages()
    buf = p.mmap(n * 4096)
    p.write_memory(buf + (n - 1) * 4096, b"z")
    dma_map(p, c, buf, 0, n * 4096)
    assert m.kernel.phys.pinned_pages() == tbl_pages + n
    assert dev.bus_master.dma_read((n - 1) * 4096, 1) == b"z"
    dma_unmap(p, c, 0, n * 4096)
    assert m.kernel.phys.pinned_pages() == tbl_pages
    with pytest.raises(DmaError):
        dev.bus_master.dma_read(0, 1)


def test_one_unpin_across_objects_that_it_frees(dma_rig):
    """Found by the model test: the clear at exit unpins pages of three
    separate mappings in one call, after munmap at exit has left them held by
    their pins alone; the first object freed must not shift the lookup of the
    next (it raised 'unpin past the end' or IndexError)."""
    m, p, c, dev = dma_rig
    for i in range(3):
        buf = p.mmap(65536)
        dma_map(p, c, buf, i << 20, 4096)            # TCEs of three objects, no arithmetic progression
    p.exit()
    assert not m.oopses
    assert m.pinned_pages() == 0
