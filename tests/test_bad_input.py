"""Arbitrary input never crashes the simulated kernel: every call answers a value or an errno.

A short Hypothesis run over every VFIO ioctl number (and some others) with
random argument buffers, on container, group and device fds in several
states, on both platforms.  The autouse fixture in conftest.py fails the test
if any call reached an internal error.
"""

from __future__ import annotations

import ctypes
import errno

from hypothesis import given, settings
from hypothesis import strategies as st

import vfiosim
from vfiosim import uapi
from vfioutil import open_device, setup_v1

VFIO_CMDS = sorted(set(uapi.IOCTLS.values())) + [uapi.VFIO_GET_API_VERSION + 50, 0x5401]
KNOWN_ERRNOS = set(errno.errorcode)


def rig(platform: str, stage: int):
    m = vfiosim.Machine.preset(platform)
    p = m.spawn()
    fds = {"container": p.open("/dev/vfio/vfio")}
    gid, bdfs = next(iter(m.iommu_groups().items()))
    if stage >= 1:
        p.close(fds["container"])
        c, g = setup_v1(p, gid, enable=stage >= 3)
        fds.update(container=c, group=g)
        if stage >= 2:
            fds["device"] = open_device(p, g, bdfs[0])
    return m, p, fds


@settings(max_examples=300, deadline=None)
@given(platform=st.sampled_from(["powernv", "pseries"]), stage=st.integers(0, 3),
       target=st.sampled_from(["container", "group", "device"]), cmd=st.sampled_from(VFIO_CMDS),
       payload=st.one_of(st.binary(max_size=64), st.integers(-2, 1 << 64 - 1)))
def test_random_ioctls_answer_with_an_errno_or_a_value(platform, stage, target, cmd, payload):
    m, p, fds = rig(platform, stage)
    fd = fds.get(target, fds["container"])
    arg = bytearray(payload) if isinstance(payload, bytes) else payload
    try:
        ret = p.ioctl(fd, cmd, arg)
        assert isinstance(ret, int)
    except OSError as exc:
        assert exc.errno in KNOWN_ERRNOS and exc.errno != errno.EIO, exc
    # Whatever happened, the process can still exit cleanly and leave nothing behind.
    p.exit()
    assert m.pinned_pages() == 0


@settings(max_examples=150, deadline=None)
@given(argsz=st.integers(0, 64), flags=st.integers(0, 15), vaddr_off=st.integers(-8192, 1 << 22),
       iova=st.one_of(st.integers(0, 1 << 32), st.integers(0, (1 << 64) - 1)),
       size=st.one_of(st.integers(0, 1 << 22), st.integers(0, (1 << 64) - 1)),
       platform=st.sampled_from(["powernv", "pseries"]))
def test_random_map_and_unmap_keep_accounting_exact(argsz, flags, vaddr_off, iova, size, platform):
    m, p, fds = rig(platform, 3)
    c = fds["container"]
    buf = p.mmap(1 << 22)
    dm = uapi.vfio_iommu_type1_dma_map(argsz=argsz, flags=flags, vaddr=max(0, buf + vaddr_off), iova=iova, size=size)
    try:
        p.ioctl(c, uapi.VFIO_IOMMU_MAP_DMA, dm)
    except OSError as exc:
        assert exc.errno != errno.EIO
    um = uapi.vfio_iommu_type1_dma_unmap(argsz=24, iova=0, size=1 << 30)
    p.ioctl(c, uapi.VFIO_IOMMU_UNMAP_DMA, um)
    assert m.pinned_pages() == 0
    p.exit()
    assert p.mm.locked_vm == 0


def test_a_struct_argument_smaller_than_minsz_is_efault():
    m = vfiosim.Machine.default()
    p = m.spawn()
    c, g = setup_v1(p)
    small = (ctypes.c_uint8 * 20)()
    try:
        p.ioctl(c, uapi.VFIO_IOMMU_MAP_DMA, small)
    except OSError as exc:
        assert exc.errno == errno.EFAULT
    else:
        raise AssertionError("MAP_DMA read 32 bytes from a 20-byte buffer")
