"""Capability chains of VFIO's *_INFO ioctls (drivers/vfio/vfio_main.c:
vfio_info_cap_add, vfio_info_cap_shift), shared by the IOMMU drivers'
GET_INFO and vfio-pci's GET_REGION_INFO.  In the chain being built, each
header's ``next`` is an offset from the chain's start (0 ends it); shifting
makes them offsets from the start of the ioctl's structure."""

from __future__ import annotations

import struct


def info_cap_add(caps: bytearray, cap: bytes, cap_id: int, version: int) -> None:
    """vfio_info_cap_add(): append ``cap`` (its size aligned to 8, its header's
    id and version set) and link it from the end of the chain."""
    size = (len(cap) + 7) & ~7
    offset = len(caps)
    caps += cap.ljust(size, b"\0")
    struct.pack_into("<HHI", caps, offset, cap_id, version, 0)
    if offset == 0:
        return
    tmp = 0
    while True:
        nxt = struct.unpack_from("<I", caps, tmp + 4)[0]
        if not nxt:
            break
        tmp = nxt
    struct.pack_into("<I", caps, tmp + 4, offset)


def info_cap_shift(caps: bytearray, offset: int) -> None:
    """vfio_info_cap_shift(): add ``offset`` to every ``next`` of the chain."""
    tmp = 0
    while True:
        nxt = struct.unpack_from("<I", caps, tmp + 4)[0]
        if not nxt:
            break
        struct.pack_into("<I", caps, tmp + 4, nxt + offset)
        tmp = nxt
