"""Small helpers for tests that drive VFIO by hand."""

from __future__ import annotations

import ctypes
import os

from vfiosim import uapi

CONFIG = uapi.VFIO_PCI_CONFIG_REGION_INDEX << 40
BAR0 = uapi.VFIO_PCI_BAR0_REGION_INDEX << 40


def dma_map(p, container, vaddr, iova, size, flags=3, argsz=32):
    s = uapi.vfio_iommu_type1_dma_map(argsz=argsz, flags=flags, vaddr=vaddr, iova=iova, size=size)
    return p.ioctl(container, uapi.VFIO_IOMMU_MAP_DMA, s)


def dma_unmap(p, container, iova, size, flags=0, argsz=24):
    s = uapi.vfio_iommu_type1_dma_unmap(argsz=argsz, flags=flags, iova=iova, size=size)
    return p.ioctl(container, uapi.VFIO_IOMMU_UNMAP_DMA, s)


def get_info(p, container, argsz=32):
    s = uapi.vfio_iommu_spapr_tce_info(argsz=argsz)
    p.ioctl(container, uapi.VFIO_IOMMU_SPAPR_TCE_GET_INFO, s)
    return s


def setup_v1(p, group_id=0, iommu=uapi.VFIO_SPAPR_TCE_IOMMU, enable=True):
    """container + group + SET_IOMMU (+ ENABLE); returns (container, group)."""
    c = p.open("/dev/vfio/vfio", os.O_RDWR)
    g = p.open(f"/dev/vfio/{group_id}", os.O_RDWR)
    p.ioctl(g, uapi.VFIO_GROUP_SET_CONTAINER, ctypes.c_int32(c))
    p.ioctl(c, uapi.VFIO_SET_IOMMU, iommu)
    if enable:
        p.ioctl(c, uapi.VFIO_IOMMU_ENABLE)
    return c, g


def open_device(p, group, bdf):
    return p.ioctl(group, uapi.VFIO_GROUP_GET_DEVICE_FD, bdf.encode() + b"\0")


def enable_bus_master(p, dev):
    cmd = int.from_bytes(p.pread(dev, 2, CONFIG + 4), "little")
    p.pwrite(dev, (cmd | 0x4).to_bytes(2, "little"), CONFIG + 4)


def reg_read(p, dev, off, n=4):
    return int.from_bytes(p.pread(dev, n, BAR0 + off), "little")


def reg_write(p, dev, off, value, n=4):
    p.pwrite(dev, value.to_bytes(n, "little"), BAR0 + off)


def edu_dma(p, dev, src, dst, count, to_ram, irq=False):
    """Program one edu transfer; the model completes it at the command write."""
    reg_write(p, dev, 0x80, src, 8)
    reg_write(p, dev, 0x88, dst, 8)
    reg_write(p, dev, 0x90, count, 8)
    reg_write(p, dev, 0x98, 0x1 | (0x2 if to_ram else 0) | (0x4 if irq else 0), 8)
