"""The trace decodes most ioctl arguments with a precompiled unpack
(tracing/ioctls.py, _FlatStruct) instead of a ctypes object walked field by
field: both must give the same fields, in the same order, for any bytes."""

from __future__ import annotations

import ctypes

from hypothesis import given, settings
from hypothesis import strategies as st

from vfiosim.tracing import ioctls

STRUCTS = sorted({layout.struct for layout in ioctls.LAYOUTS.values() if layout.struct is not None},
                 key=lambda cls: cls.__name__)


def walked(cls, raw):
    size = ctypes.sizeof(cls)
    return ioctls.struct_fields(cls.from_buffer_copy(bytes(raw[:size]).ljust(size, b"\0")))


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(STRUCTS), st.data())
def test_the_precompiled_decoding_equals_the_ctypes_walk(cls, data):
    size = ctypes.sizeof(cls)
    raw = data.draw(st.binary(min_size=0, max_size=size + 16))
    got = ioctls._struct(cls, raw)
    want = walked(cls, raw)
    assert got == want and list(got) == list(want)


def test_most_arguments_take_the_precompiled_path_and_the_others_the_walk():
    for cls in STRUCTS:
        ioctls._struct(cls, b"")
    flat = {cls.__name__ for cls in STRUCTS if ioctls._FLAT[cls] is not None}
    walked_ = {cls.__name__ for cls in STRUCTS if ioctls._FLAT[cls] is None}
    # A flexible array at the end (UNMAP_DMA's data[]) is left out, as the walk leaves it out.
    assert {"vfio_iommu_type1_dma_map", "vfio_iommu_type1_dma_unmap", "vfio_irq_set"} <= flat
    # A nested struct (the sPAPR info's ddw) or a union: the walk.
    assert "vfio_iommu_spapr_tce_info" in walked_
    assert len(flat) > len(walked_)
