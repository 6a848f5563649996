"""TceStorage's one-entry operations in C (kernel/iommu/_tce.c) do exactly
what their Python (tce.py's _ScalarOps) does: the same old values, the same
chunks, counts and generation after any mix of one-entry and range
operations, chunks taken from and given back to the shared pool."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vfiosim.kernel.iommu import _tce, tce
from vfiosim.kernel.iommu.tce import PyTceStorage, TceStorage

CHUNK = TceStorage.CHUNK
SIZE = 3 * CHUNK
index = st.one_of(st.integers(0, 40), st.integers(CHUNK - 3, CHUNK + 3), st.integers(0, SIZE - 1))
value = st.one_of(st.just(0), st.integers(1, 3), st.integers(0, 2 ** 64 - 1))
ops = st.one_of(
    st.tuples(st.just("xchg_one"), index, value),
    st.tuples(st.just("clear_one"), index),
    st.tuples(st.just("get"), index),
    st.tuples(st.just("xchg_range"), index, st.lists(value, min_size=1, max_size=5)),
    st.tuples(st.just("clear_range"), index, st.integers(1, CHUNK + 5)),
)


def test_the_native_base_is_built_and_used():
    assert TceStorage.__mro__[2] is _tce.SparseU64
    assert TceStorage._pool is _tce.POOL and PyTceStorage._pool is _tce.POOL
    assert (_tce.CHUNK_SHIFT, _tce.POOL_MAX) == (TceStorage.CHUNK_SHIFT, TceStorage.POOL_MAX)


def state(s: TceStorage | PyTceStorage) -> tuple:
    return (s.generation, dict(s._used), {c: a.tobytes() for c, a in sorted(s._chunks.items())})


@given(st.lists(ops, max_size=40))
@settings(max_examples=150, deadline=None)
def test_native_and_python_one_entry_operations_agree(steps):
    native, python = TceStorage(SIZE), PyTceStorage(SIZE)
    for op in steps:
        name, i = op[0], min(op[1], SIZE - 1)
        if name == "xchg_range":
            values = np.array(op[2][:SIZE - i], dtype=np.uint64)
            got = [np.asarray(x).tolist() for x in native.xchg_range(i, values)]
            want = [np.asarray(x).tolist() for x in python.xchg_range(i, values)]
        elif name == "clear_range":
            n = min(op[2], SIZE - i)
            got = [p.tolist() for p in native.clear_range(i, n)]
            want = [p.tolist() for p in python.clear_range(i, n)]
        else:
            got, want = getattr(native, name)(i, *op[2:]), getattr(python, name)(i, *op[2:])
        assert got == want, op
        assert state(native) == state(python), op
        # Memory follows what is mapped: a chunk exists only while it holds something.
        assert all(native._used[c] == np.count_nonzero(a) > 0 for c, a in native._chunks.items())


def test_an_emptied_chunk_goes_back_to_the_pool_zeroed_and_is_taken_again():
    tce._shared_pool.clear()
    s = TceStorage(SIZE)
    assert s.xchg_one(CHUNK + 7, 0x1003) == 0
    chunk = s._chunks[1]
    assert s.clear_one(CHUNK + 7) == 0x1003 and not s._chunks and not s._used
    assert tce._shared_pool[-1] is chunk and not chunk.any()
    t = PyTceStorage(SIZE)
    t.xchg_one(5, 9)
    assert t._chunks[0] is chunk                     # the pool is one, whichever base takes from it
    assert s.generation == 2 and t.generation == 1


def test_a_chunk_that_is_not_writable_is_refused_not_written():
    s = TceStorage(SIZE)
    ro = np.zeros(CHUNK, dtype=np.uint64)
    ro.flags.writeable = False
    s._chunks[0], s._used[0] = ro, 1
    with pytest.raises(ValueError, match="read-only"):     # NumPy refuses the writable buffer
        s.xchg_one(3, 1)
    assert not ro.any()
    # A view of a larger array is a chunk like another (its own data pointer).
    big = np.zeros(2 * CHUNK, dtype=np.uint64)
    s._chunks[1], s._used[1] = big[CHUNK:], 1
    s.xchg_one(CHUNK + 2, 5)
    assert big[CHUNK + 2] == 5 and s.get(CHUNK + 2) == 5 and s._used[1] == 2


def test_a_negative_index_is_refused_by_both():
    for s in (TceStorage(SIZE), PyTceStorage(SIZE)):
        with pytest.raises(IndexError):
            s.xchg_one(-1, 1)
        with pytest.raises(IndexError):
            s.clear_one(-1)
