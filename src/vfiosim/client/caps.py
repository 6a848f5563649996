"""VFIO capability chains (``struct vfio_info_cap_header``), decoded.

Several info ioctls (VFIO_DEVICE_GET_INFO, VFIO_DEVICE_GET_REGION_INFO,
VFIO_IOMMU_GET_INFO) append a chain of capabilities after the fixed struct
when the caller's ``argsz`` leaves room: ``cap_offset`` points at the first
header, each header's ``next`` at the following one (offsets from the start
of the info struct), 0 ends the chain.  When ``argsz`` is too small the
kernel sets the CAPS flag and raises ``argsz`` to what it needs, and the
caller asks again (:func:`query_with_caps`).

Capability ids are per ioctl, so decoding takes the kind of chain.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass
from typing import Callable, Literal

from ..uapi import vfio as uapi
from .iova import IovaRange

__all__ = ["Capability", "SparseMmapCap", "RegionTypeCap", "MsixMappableCap", "IovaRangeCap", "MigrationCap",
           "DmaAvailCap", "parse_caps", "ChainKind", "query_with_caps"]

ChainKind = Literal["region", "iommu", "device"]


@dataclass(frozen=True)
class Capability:
    """A capability the client does not decode further: id, version, raw bytes."""

    id: int
    version: int
    offset: int
    raw: bytes


@dataclass(frozen=True)
class SparseMmapCap(Capability):
    """VFIO_REGION_INFO_CAP_SPARSE_MMAP: the parts of a region that may be mmapped."""

    areas: tuple[tuple[int, int], ...] = ()      # (offset, size) within the region


@dataclass(frozen=True)
class RegionTypeCap(Capability):
    """VFIO_REGION_INFO_CAP_TYPE: a device-specific region's type and subtype."""

    type: int = 0
    subtype: int = 0


@dataclass(frozen=True)
class MsixMappableCap(Capability):
    """VFIO_REGION_INFO_CAP_MSIX_MAPPABLE: the MSI-X table may be mmapped too."""


@dataclass(frozen=True)
class IovaRangeCap(Capability):
    """VFIO_IOMMU_TYPE1_INFO_CAP_IOVA_RANGE: the usable IOVA ranges."""

    ranges: tuple[IovaRange, ...] = ()


@dataclass(frozen=True)
class MigrationCap(Capability):
    """VFIO_IOMMU_TYPE1_INFO_CAP_MIGRATION: dirty page tracking parameters."""

    flags: int = 0
    pgsize_bitmap: int = 0
    max_dirty_bitmap_size: int = 0


@dataclass(frozen=True)
class DmaAvailCap(Capability):
    """VFIO_IOMMU_TYPE1_INFO_DMA_AVAIL: how many more mappings the container takes."""

    avail: int = 0


def _struct(cls: type[ctypes.Structure], buf: bytes, offset: int) -> ctypes.Structure:
    size = ctypes.sizeof(cls)
    if offset + size > len(buf):
        raise ValueError(f"{cls.__name__} at {offset} runs past the {len(buf)}-byte info buffer")
    return cls.from_buffer_copy(buf[offset:offset + size])


def _decode(kind: ChainKind, hdr: uapi.vfio_info_cap_header, offset: int, buf: bytes, page_size: int) -> Capability:
    base = dict(id=hdr.id, version=hdr.version, offset=offset, raw=buf[offset:hdr.next or len(buf)])
    if kind == "region":
        if hdr.id == uapi.VFIO_REGION_INFO_CAP_SPARSE_MMAP:
            s = _struct(uapi.vfio_region_info_cap_sparse_mmap, buf, offset)
            start = offset + ctypes.sizeof(uapi.vfio_region_info_cap_sparse_mmap)
            area = ctypes.sizeof(uapi.vfio_region_sparse_mmap_area)
            areas = []
            for i in range(s.nr_areas):
                a = _struct(uapi.vfio_region_sparse_mmap_area, buf, start + i * area)
                areas.append((int(a.offset), int(a.size)))
            return SparseMmapCap(**base, areas=tuple(areas))
        if hdr.id == uapi.VFIO_REGION_INFO_CAP_TYPE:
            t = _struct(uapi.vfio_region_info_cap_type, buf, offset)
            return RegionTypeCap(**base, type=int(t.type), subtype=int(t.subtype))
        if hdr.id == uapi.VFIO_REGION_INFO_CAP_MSIX_MAPPABLE:
            return MsixMappableCap(**base)
    elif kind == "iommu":
        if hdr.id == uapi.VFIO_IOMMU_TYPE1_INFO_CAP_IOVA_RANGE:
            c = _struct(uapi.vfio_iommu_type1_info_cap_iova_range, buf, offset)
            start = offset + ctypes.sizeof(uapi.vfio_iommu_type1_info_cap_iova_range)
            step = ctypes.sizeof(uapi.vfio_iova_range)
            ranges = []
            for i in range(c.nr_iovas):
                r = _struct(uapi.vfio_iova_range, buf, start + i * step)
                ranges.append(IovaRange(int(r.start), int(r.end), page_size))
            return IovaRangeCap(**base, ranges=tuple(ranges))
        if hdr.id == uapi.VFIO_IOMMU_TYPE1_INFO_CAP_MIGRATION:
            mg = _struct(uapi.vfio_iommu_type1_info_cap_migration, buf, offset)
            return MigrationCap(**base, flags=int(mg.flags), pgsize_bitmap=int(mg.pgsize_bitmap),
                                max_dirty_bitmap_size=int(mg.max_dirty_bitmap_size))
        if hdr.id == uapi.VFIO_IOMMU_TYPE1_INFO_DMA_AVAIL:
            av = _struct(uapi.vfio_iommu_type1_info_dma_avail, buf, offset)
            return DmaAvailCap(**base, avail=int(av.avail))
    return Capability(**base)


def parse_caps(buf: bytes, cap_offset: int, kind: ChainKind, *, page_size: int = 4096) -> tuple[Capability, ...]:
    """Walk the chain starting at ``cap_offset`` of ``buf`` (the whole info buffer).

    A malformed chain (an offset outside the buffer, or a loop) raises
    ValueError rather than decoding garbage.
    """
    caps: list[Capability] = []
    seen: set[int] = set()
    hsize = ctypes.sizeof(uapi.vfio_info_cap_header)
    offset = cap_offset
    while offset:
        if offset in seen:
            raise ValueError(f"capability chain loops back to offset {offset}")
        if offset < 0 or offset + hsize > len(buf):
            raise ValueError(f"capability at offset {offset} is outside the {len(buf)}-byte info buffer")
        seen.add(offset)
        hdr = uapi.vfio_info_cap_header.from_buffer_copy(buf[offset:offset + hsize])
        caps.append(_decode(kind, hdr, offset, buf, page_size))
        offset = int(hdr.next)
    return tuple(caps)


def query_with_caps(ioctl: Callable[[bytearray], int], cls: type[ctypes.Structure],
                    init: Callable[[ctypes.Structure], None] | None = None, *,
                    max_size: int = 1 << 20) -> bytearray:
    """Issue an info ioctl, growing the buffer while the kernel asks for more.

    ``ioctl`` gets the whole buffer (``argsz`` set to its length); ``init``
    fills the input fields (``index``) each time.  Returns the final buffer:
    ``cls.from_buffer(result)`` is the struct, caps follow it.
    """
    size = ctypes.sizeof(cls)
    for _ in range(4):
        buf = bytearray(size)
        s = cls.from_buffer(buf)
        s.argsz = size
        if init is not None:
            init(s)
        del s
        ioctl(buf)
        want = int(cls.from_buffer_copy(buf[:ctypes.sizeof(cls)]).argsz)
        if want <= size:
            return buf
        if want > max_size:
            raise ValueError(f"{cls.__name__}: the kernel asks for an argsz of {want} bytes")
        size = want
    return buf
