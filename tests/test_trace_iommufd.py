"""The trace decodes iommufd's ioctls and the cdev's, as the daemon records
them (Tracer.begin before the call, Tracer.end after, on the caller's task),
and ``vfiosim trace show`` prints them."""

from __future__ import annotations

import ctypes
import errno
import io
import json
import os

from vfiosim.transport import protocol as P
from vfiosim.transport.trace import Tracer, format_record
from vfiosim.uapi import iommufd as iu
from vfiosim.uapi import vfio as uapi

import iommufdutil


class Traced:
    """A process whose ioctls go through a Tracer the way the daemon's do."""

    def __init__(self, p, platform="x86"):
        self.p = p
        self.out = io.StringIO()
        self.tracer = Tracer(self.out, platform)

    def ioctl(self, fd, cmd, struct=None, extra=b""):
        p = self.p
        if struct is None:
            addr = 0
        else:
            raw = bytes(struct) + extra
            addr = p.mmap(4096)
            p.write_memory(addr, raw)
        rec = self.tracer.begin(p.task, P.OP_IOCTL, 0, fd, 0, (cmd, addr), b"")
        ret, err = 0, 0
        try:
            ret = p.ioctl(fd, cmd, addr)
        except OSError as exc:
            err = exc.errno
        self.tracer.end(rec, p.task, ret if not err else -1, err)
        if struct is not None:
            ctypes.memmove(ctypes.addressof(struct), p.read_memory(addr, ctypes.sizeof(struct)), ctypes.sizeof(struct))
        return ret, err

    def records(self):
        """The calls (the trace's header record left out)."""
        return [r for r in (json.loads(line) for line in self.out.getvalue().splitlines()) if "call" in r]


def test_iommufd_and_cdev_calls_are_decoded():
    m = iommufdutil.machine()
    p = m.spawn(uid=1000, gid=1000, rlimit_memlock=(1 << 26, 1 << 26))
    t = Traced(p)
    fd = p.open("/dev/iommu")
    dfd = p.open("/dev/vfio/devices/vfio0")
    t.ioctl(fd, iu.IOMMU_IOAS_ALLOC, iu.iommu_ioas_alloc(size=12))
    t.ioctl(dfd, uapi.VFIO_DEVICE_BIND_IOMMUFD, uapi.vfio_device_bind_iommufd(argsz=16, iommufd=fd))
    t.ioctl(dfd, uapi.VFIO_DEVICE_ATTACH_IOMMUFD_PT, uapi.vfio_device_attach_iommufd_pt(argsz=12, pt_id=1))
    buf = p.mmap(1 << 16)
    t.ioctl(fd, iu.IOMMU_IOAS_MAP, iu.iommu_ioas_map(size=40, flags=iommufdutil.RW, ioas_id=1, user_va=buf,
                                                      length=1 << 16))
    t.ioctl(fd, iu.IOMMU_IOAS_UNMAP, iu.iommu_ioas_unmap(size=24, ioas_id=1, iova=0x12345000, length=4096))
    t.ioctl(dfd, uapi.VFIO_DEVICE_PCI_HOT_RESET, uapi.vfio_pci_hot_reset(argsz=12, count=0))
    t.ioctl(dfd, uapi.VFIO_DEVICE_DETACH_IOMMUFD_PT, uapi.vfio_device_detach_iommufd_pt(argsz=8))
    recs = t.records()
    assert [r["cmd"] for r in recs] == ["IOMMU_IOAS_ALLOC", "VFIO_DEVICE_BIND_IOMMUFD",
                                        "VFIO_DEVICE_ATTACH_IOMMUFD_PT", "IOMMU_IOAS_MAP", "IOMMU_IOAS_UNMAP",
                                        "VFIO_DEVICE_PCI_HOT_RESET", "VFIO_DEVICE_DETACH_IOMMUFD_PT"]
    alloc, bind, attach, mp, unmap, reset, detach = recs
    assert alloc["fd_kind"] == "iommufd" and alloc["args"] == {"size": 12, "flags": 0, "out_ioas_id": 0}
    assert alloc["out"] == {"out_ioas_id": 1}
    assert bind["fd_kind"] == "vfio-device" and bind["args"]["iommufd"] == fd and bind["out"] == {"out_devid": 2}
    assert attach["ret"] == 0 and mp["args"]["user_va"] == buf and mp["out"] == {"iova": mp["out"]["iova"]}
    assert unmap["err"] == "ENOENT"
    assert reset["args"] == {"argsz": 12, "flags": 0, "count": 0, "group_fds": []} and reset["ret"] == 0  # devid form
    assert detach["ret"] == 0
    lines = [format_record(r) for r in recs]
    assert f"ioctl({fd}<iommufd>, IOMMU_IOAS_MAP, {{size=0x28, flags=0x6, ioas_id=1, user_va={buf:#x}, " \
           f"length=0x10000, iova=0}}) = 0  => {{iova=0x2000}}" in lines[3]   # above PAGE_SIZE, uptr-aligned
    assert f"ioctl({fd}<iommufd>, IOMMU_IOAS_UNMAP, {{size=0x18, ioas_id=1, iova=0x12345000, length=0x1000}}) = " \
           f"-1 ENOENT ({os.strerror(errno.ENOENT)})" in lines[4]
    assert "VFIO_DEVICE_BIND_IOMMUFD, {argsz=16, flags=0, iommufd=" in lines[1] and "=> {out_devid=2}" in lines[1]


def test_the_compat_container_is_type1_in_the_trace():
    m = iommufdutil.machine(config='["IOMMUFD", "VFIO_DEVICE_CDEV", "IOMMUFD_VFIO_CONTAINER"]')
    p = m.spawn(uid=1000, gid=1000)
    t = Traced(p)
    c = p.open("/dev/vfio/vfio")
    t.ioctl(c, uapi.VFIO_CHECK_EXTENSION, None)
    info = uapi.vfio_iommu_type1_info(argsz=ctypes.sizeof(uapi.vfio_iommu_type1_info))
    t.ioctl(c, uapi.VFIO_IOMMU_GET_INFO, info)
    recs = t.records()
    assert recs[0]["fd_kind"] == "iommufd" and recs[0]["cmd"] == "VFIO_CHECK_EXTENSION"
    assert recs[1]["cmd"] == "VFIO_IOMMU_GET_INFO" and recs[1]["err"] == "ENODEV"     # no IOAS yet
