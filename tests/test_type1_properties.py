"""Property tests for the Type1 driver on x86: arbitrary input never crashes the
kernel, and any sequence of map/unmap/VADDR/dirty calls keeps the accounting
exact against a simple model (VmLck = pinned pages = pages of live mappings,
DMA_AVAIL = limit - mappings), ending with nothing pinned."""

from __future__ import annotations

import ctypes
import errno
import os
import struct

from hypothesis import given, settings
from hypothesis import strategies as st

import vfiosim
from vfiosim import uapi
from vfioutil import open_device

VFIO_CMDS = sorted(set(uapi.IOCTLS.values())) + [uapi.VFIO_GET_API_VERSION + 50, 0x5401]
KNOWN_ERRNOS = set(errno.errorcode)
PAGE = 4096


def rig(stage: int, iommu: int):
    m = vfiosim.Machine.preset("x86")
    p = m.spawn()
    fds = {"container": p.open("/dev/vfio/vfio", os.O_RDWR)}
    if stage >= 1:
        g = p.open("/dev/vfio/4", os.O_RDWR)
        fds["group"] = g
        p.ioctl(g, uapi.VFIO_GROUP_SET_CONTAINER, ctypes.c_int32(fds["container"]))
    if stage >= 2:
        p.ioctl(fds["container"], uapi.VFIO_SET_IOMMU, iommu)
    if stage >= 3:
        buf = p.mmap(1 << 20)
        p.ioctl(fds["container"], uapi.VFIO_IOMMU_MAP_DMA,
                uapi.vfio_iommu_type1_dma_map(argsz=32, flags=3, vaddr=buf, iova=0x100000, size=1 << 20))
        fds["device"] = open_device(p, fds["group"], "0000:01:00.0")
    return m, p, fds


@settings(max_examples=300, deadline=None)
@given(stage=st.integers(0, 3), iommu=st.sampled_from([uapi.VFIO_TYPE1_IOMMU, uapi.VFIO_TYPE1v2_IOMMU]),
       target=st.sampled_from(["container", "group", "device"]), cmd=st.sampled_from(VFIO_CMDS),
       payload=st.one_of(st.binary(max_size=96), st.integers(-2, (1 << 64) - 1)))
def test_random_ioctls_on_x86_answer_with_an_errno_or_a_value(stage, iommu, target, cmd, payload):
    m, p, fds = rig(stage, iommu)
    fd = fds.get(target, fds["container"])
    arg = bytearray(payload) if isinstance(payload, bytes) else payload
    try:
        assert isinstance(p.ioctl(fd, cmd, arg), int)
    except OSError as exc:
        assert exc.errno in KNOWN_ERRNOS and exc.errno != errno.EIO, exc
    p.exit()
    assert m.pinned_pages() == 0
    assert m.iommu_units[0].domains == []


# -- random operation sequences against a model -----------------------------------------------------------

SLOTS = 8                      # IOVA slots of 64 KiB, mapped from matching 64 KiB pieces of one buffer
SLOT = 0x10000
BASE = 0x1000000

op = st.one_of(
    st.tuples(st.just("map"), st.integers(0, SLOTS - 1), st.integers(1, 3), st.sampled_from([1, 2, 3])),
    st.tuples(st.just("unmap"), st.integers(0, SLOTS - 1), st.integers(1, 4), st.just(0)),
    st.tuples(st.just("unmap_all"), st.just(0), st.just(0), st.just(0)),
    st.tuples(st.just("invalidate"), st.integers(0, SLOTS - 1), st.integers(1, 3), st.just(0)),
    st.tuples(st.just("update"), st.integers(0, SLOTS - 1), st.integers(1, 3), st.just(0)),
    st.tuples(st.just("dirty"), st.integers(0, SLOTS - 1), st.integers(1, 4), st.integers(0, 2)),
)


@settings(max_examples=120, deadline=None)
@given(v2=st.booleans(), ops=st.lists(op, max_size=25))
def test_random_sequences_keep_the_model(v2, ops):
    m = vfiosim.Machine.preset("x86")
    p = m.spawn()
    c = p.open("/dev/vfio/vfio", os.O_RDWR)
    g = p.open("/dev/vfio/4", os.O_RDWR)
    p.ioctl(g, uapi.VFIO_GROUP_SET_CONTAINER, ctypes.c_int32(c))
    p.ioctl(c, uapi.VFIO_SET_IOMMU, uapi.VFIO_TYPE1v2_IOMMU if v2 else uapi.VFIO_TYPE1_IOMMU)
    buf = p.mmap(SLOTS * SLOT)
    bitmap = p.mmap(PAGE)
    model: dict[int, list] = {}             # first slot -> [slots, vaddr_invalid]
    tracking = False

    def covering(first: int, n: int) -> list[int]:
        return [s for s, (k, _) in model.items() if s < first + n and first < s + k]

    for name, slot, n, extra in ops:
        n = min(n, SLOTS - slot)
        iova = BASE + slot * SLOT
        if name == "map":
            s = uapi.vfio_iommu_type1_dma_map(argsz=32, flags=extra, vaddr=buf + slot * SLOT, iova=iova, size=n * SLOT)
            try:
                p.ioctl(c, uapi.VFIO_IOMMU_MAP_DMA, s)
                assert not covering(slot, n)
                model[slot] = [n, False]
            except OSError as exc:
                assert exc.errno == errno.EEXIST and covering(slot, n)
        elif name in ("unmap", "invalidate"):
            flags = uapi.VFIO_DMA_UNMAP_FLAG_VADDR if name == "invalidate" else 0
            s = uapi.vfio_iommu_type1_dma_unmap(argsz=24, flags=flags, iova=iova, size=n * SLOT)
            hit = covering(slot, n)
            bisects = any(h < slot or h + model[h][0] > slot + n for h in hit)
            try:
                p.ioctl(c, uapi.VFIO_IOMMU_UNMAP_DMA, s)
            except OSError as exc:
                assert exc.errno == errno.EINVAL
                assert (v2 and bisects) or (name == "invalidate" and any(model[h][1] for h in hit))
                continue
            if not v2:                     # v1: from the first mapping starting inside the range
                hit = [h for h in hit if h >= slot]
                if any(h < slot for h in covering(slot, n)):
                    hit = []
            assert s.size == sum(model[h][0] for h in hit) * SLOT
            for h in hit:
                if name == "invalidate":
                    model[h][1] = True
                else:
                    del model[h]
        elif name == "unmap_all":
            s = uapi.vfio_iommu_type1_dma_unmap(argsz=24, flags=uapi.VFIO_DMA_UNMAP_FLAG_ALL)
            p.ioctl(c, uapi.VFIO_IOMMU_UNMAP_DMA, s)
            assert s.size == sum(k for k, _ in model.values()) * SLOT
            model.clear()
        elif name == "update":
            s = uapi.vfio_iommu_type1_dma_map(argsz=32, flags=uapi.VFIO_DMA_MAP_FLAG_VADDR,
                                               vaddr=buf + slot * SLOT, iova=iova, size=n * SLOT)
            try:
                p.ioctl(c, uapi.VFIO_IOMMU_MAP_DMA, s)
                assert slot in model and model[slot] == [n, True]
                model[slot][1] = False
            except OSError as exc:
                assert exc.errno in (errno.ENOENT, errno.EINVAL)
                assert not (slot in model and model[slot] == [n, True])
        elif name == "dirty":
            flags = (uapi.VFIO_IOMMU_DIRTY_PAGES_FLAG_START, uapi.VFIO_IOMMU_DIRTY_PAGES_FLAG_STOP,
                     uapi.VFIO_IOMMU_DIRTY_PAGES_FLAG_GET_BITMAP)[extra]
            arg = bytearray(struct.pack("<IIQQQQQ", 48, flags, iova, n * SLOT, PAGE, PAGE, bitmap))
            try:
                p.ioctl(c, uapi.VFIO_IOMMU_DIRTY_PAGES, arg)
            except OSError as exc:
                assert exc.errno == (errno.EACCES if not v2 else errno.EINVAL)
                continue
            tracking = {0: True, 1: False}.get(extra, tracking)
        pages = sum(k for k, _ in model.values()) * SLOT // PAGE
        assert p.status()["VmLck"] == pages * 4
        assert m.pinned_pages() == pages
        iommu = m.kernel.vfio.groups[4].container.iommu_data
        assert iommu.dma_avail == 65535 - len(model)
        assert iommu.vaddr_invalid_count == sum(1 for _, inv in model.values() if inv)
        assert all((d.bitmap is not None) == iommu.dirty_page_tracking for d in iommu.dmas)
    p.exit()
    assert m.pinned_pages() == 0
