"""Helpers for the iommufd tests: one function per ioctl, as the kernel
selftests' iommufd_utils.h has them, raising OSError like the real calls."""

from __future__ import annotations

import ctypes
import struct

import vfiosim
from vfiosim.uapi import iommufd as iu
from vfiosim.uapi import vfio as uapi

RW = iu.IOMMU_IOAS_MAP_READABLE | iu.IOMMU_IOAS_MAP_WRITEABLE
FIXED = iu.IOMMU_IOAS_MAP_FIXED_IOVA
U64_MAX = (1 << 64) - 1
KiB, MiB = 1 << 10, 1 << 20

X86_IOMMUFD = """
[machine]
name = "x86-iommufd"
platform = "x86"
[kernel]
config = ["IOMMUFD", "VFIO_DEVICE_CDEV"]
[iommu]
{iommu}
[[device]]
bdf = "0000:01:00.0"
model = "edu"
iommu_group = 1
behind_bridge = true
group_uid = 1000
[[device]]
bdf = "0000:02:00.0"
model = "edu"
iommu_group = 2
behind_bridge = true
group_uid = 1000
"""


def machine(iommu: str = "", config: str | None = None) -> vfiosim.Machine:
    """An x86 machine with IOMMUFD and the cdev, two edu devices (vfio0 in
    group 1, vfio1 in group 2) whose nodes uid 1000 may open."""
    text = X86_IOMMUFD.format(iommu=iommu)
    if config is not None:
        text = text.replace('config = ["IOMMUFD", "VFIO_DEVICE_CDEV"]', f"config = {config}")
    m = vfiosim.Machine.from_toml(text, source="test machine")
    node = m.kernel.dev_nodes.get("/dev/iommu")
    if node is not None:
        node.gid = 1000          # as a distribution's udev rule would let a user in
    return m


def ioas_alloc(p, fd: int) -> int:
    cmd = iu.iommu_ioas_alloc(size=ctypes.sizeof(iu.iommu_ioas_alloc))
    p.ioctl(fd, iu.IOMMU_IOAS_ALLOC, cmd)
    return int(cmd.out_ioas_id)


def ioas_map(p, fd: int, ioas: int, va: int, length: int, iova: int | None = None, flags: int = RW) -> int:
    if iova is not None:
        flags |= FIXED
    cmd = iu.iommu_ioas_map(size=ctypes.sizeof(iu.iommu_ioas_map), flags=flags, ioas_id=ioas, user_va=va,
                            length=length, iova=iova or 0)
    p.ioctl(fd, iu.IOMMU_IOAS_MAP, cmd)
    return int(cmd.iova)


def ioas_unmap(p, fd: int, ioas: int, iova: int, length: int) -> int:
    cmd = iu.iommu_ioas_unmap(size=ctypes.sizeof(iu.iommu_ioas_unmap), ioas_id=ioas, iova=iova, length=length)
    p.ioctl(fd, iu.IOMMU_IOAS_UNMAP, cmd)
    return int(cmd.length)


def ioas_copy(p, fd: int, dst: int, src: int, src_iova: int, length: int, dst_iova: int | None = None,
              flags: int = RW) -> int:
    if dst_iova is not None:
        flags |= FIXED
    cmd = iu.iommu_ioas_copy(size=ctypes.sizeof(iu.iommu_ioas_copy), flags=flags, dst_ioas_id=dst, src_ioas_id=src,
                             length=length, dst_iova=dst_iova or 0, src_iova=src_iova)
    p.ioctl(fd, iu.IOMMU_IOAS_COPY, cmd)
    return int(cmd.dst_iova)


def iova_ranges(p, fd: int, ioas: int, room: int = 16) -> tuple[list[tuple[int, int]], int]:
    """(ranges, iova alignment)"""
    buf = p.mmap(4096)
    cmd = iu.iommu_ioas_iova_ranges(size=ctypes.sizeof(iu.iommu_ioas_iova_ranges), ioas_id=ioas, num_iovas=room,
                                    allowed_iovas=buf)
    p.ioctl(fd, iu.IOMMU_IOAS_IOVA_RANGES, cmd)
    raw = p.read_memory(buf, 16 * cmd.num_iovas)
    p.munmap(buf, 4096)
    return [struct.unpack_from("<QQ", raw, 16 * i) for i in range(cmd.num_iovas)], int(cmd.out_iova_alignment)


def allow_iovas(p, fd: int, ioas: int, ranges: list[tuple[int, int]]) -> None:
    buf = p.mmap(4096)
    p.write_memory(buf, b"".join(struct.pack("<QQ", s, e) for s, e in ranges))
    cmd = iu.iommu_ioas_allow_iovas(size=ctypes.sizeof(iu.iommu_ioas_allow_iovas), ioas_id=ioas,
                                    num_iovas=len(ranges), allowed_iovas=buf)
    try:
        p.ioctl(fd, iu.IOMMU_IOAS_ALLOW_IOVAS, cmd)
    finally:
        p.munmap(buf, 4096)


def option(p, fd: int, option_id: int, op: int, val: int = 0, object_id: int = 0) -> int:
    cmd = iu.iommu_option(size=ctypes.sizeof(iu.iommu_option), option_id=option_id, op=op, object_id=object_id,
                          val64=val)
    p.ioctl(fd, iu.IOMMU_OPTION, cmd)
    return int(cmd.val64)


def destroy(p, fd: int, oid: int) -> None:
    p.ioctl(fd, iu.IOMMU_DESTROY, iu.iommu_destroy(size=8, id=oid))


def hwpt_alloc(p, fd: int, dev_id: int, pt_id: int, flags: int = 0) -> int:
    cmd = iu.iommu_hwpt_alloc(size=ctypes.sizeof(iu.iommu_hwpt_alloc), flags=flags, dev_id=dev_id, pt_id=pt_id)
    p.ioctl(fd, iu.IOMMU_HWPT_ALLOC, cmd)
    return int(cmd.out_hwpt_id)


def bind(p, dfd: int, iommufd: int) -> int:
    cmd = uapi.vfio_device_bind_iommufd(argsz=ctypes.sizeof(uapi.vfio_device_bind_iommufd), iommufd=iommufd)
    p.ioctl(dfd, uapi.VFIO_DEVICE_BIND_IOMMUFD, cmd)
    return int(cmd.out_devid)


def attach(p, dfd: int, pt_id: int) -> int:
    cmd = uapi.vfio_device_attach_iommufd_pt(argsz=ctypes.sizeof(uapi.vfio_device_attach_iommufd_pt), pt_id=pt_id)
    p.ioctl(dfd, uapi.VFIO_DEVICE_ATTACH_IOMMUFD_PT, cmd)
    return int(cmd.pt_id)


def detach(p, dfd: int) -> None:
    p.ioctl(dfd, uapi.VFIO_DEVICE_DETACH_IOMMUFD_PT, uapi.vfio_device_detach_iommufd_pt(argsz=8))


def cdev_setup(p, dev: str = "vfio0") -> tuple[int, int, int, int]:
    """(iommufd, ioas, device fd, devid): a cdev bound but not attached."""
    fd = p.open("/dev/iommu")
    ioas = ioas_alloc(p, fd)
    dfd = p.open(f"/dev/vfio/devices/{dev}")
    return fd, ioas, dfd, bind(p, dfd, fd)

