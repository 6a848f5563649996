#!/usr/bin/env python3
"""A VFIO userspace driver for QEMU's edu device in plain Python.

Only the standard library: os, fcntl.ioctl, mmap, select and ctypes -- no
vfiosim.  It finds an edu device (1234:11e8) bound to vfio-pci in sysfs,
sets up the container with the sPAPR TCE IOMMU (POWER) or Type1 (x86),
maps a buffer for DMA, maps BAR0, takes the INTx interrupt on an eventfd and
has the device copy the buffer through the IOMMU: RAM -> device -> RAM.

On a host with such a device it runs as it is; anywhere else::

    vfiosim run -- python3 vfio_edu.py [BDF]

Exit status 0 when every byte made the round trip.
"""

from __future__ import annotations

import ctypes
import fcntl
import mmap
import os
import select
import struct
import sys

# <linux/vfio.h>: _IO(VFIO_TYPE, VFIO_BASE + n) with VFIO_TYPE ';' and VFIO_BASE 100.
# x86-64 (asm-generic) encoding: _IO(type, nr) = type << 8 | nr.


def _IO(n: int) -> int:
    return (ord(";") << 8) | (100 + n)


VFIO_GET_API_VERSION = _IO(0)
VFIO_CHECK_EXTENSION = _IO(1)
VFIO_SET_IOMMU = _IO(2)
VFIO_GROUP_GET_STATUS = _IO(3)
VFIO_GROUP_SET_CONTAINER = _IO(4)
VFIO_GROUP_GET_DEVICE_FD = _IO(6)
VFIO_DEVICE_GET_INFO = _IO(7)
VFIO_DEVICE_GET_REGION_INFO = _IO(8)
VFIO_DEVICE_SET_IRQS = _IO(10)
VFIO_IOMMU_GET_INFO = _IO(12)          # VFIO_IOMMU_SPAPR_TCE_GET_INFO on POWER
VFIO_IOMMU_MAP_DMA = _IO(13)
VFIO_IOMMU_UNMAP_DMA = _IO(14)
VFIO_IOMMU_ENABLE = _IO(15)
VFIO_IOMMU_DISABLE = _IO(16)

VFIO_API_VERSION = 0
VFIO_TYPE1v2_IOMMU = 3
VFIO_SPAPR_TCE_IOMMU = 2
VFIO_GROUP_FLAGS_VIABLE = 1
VFIO_DMA_MAP_FLAG_READ, VFIO_DMA_MAP_FLAG_WRITE = 1, 2
VFIO_REGION_INFO_FLAG_MMAP = 4
VFIO_PCI_BAR0_REGION_INDEX, VFIO_PCI_CONFIG_REGION_INDEX = 0, 7
VFIO_PCI_INTX_IRQ_INDEX = 0
VFIO_IRQ_SET_DATA_EVENTFD, VFIO_IRQ_SET_ACTION_TRIGGER = 1 << 2, 1 << 5
VFIO_IRQ_SET_DATA_NONE, VFIO_IRQ_SET_ACTION_UNMASK = 1 << 0, 1 << 4


class vfio_group_status(ctypes.Structure):
    _fields_ = [("argsz", ctypes.c_uint32), ("flags", ctypes.c_uint32)]


class vfio_region_info(ctypes.Structure):
    _fields_ = [("argsz", ctypes.c_uint32), ("flags", ctypes.c_uint32), ("index", ctypes.c_uint32),
                ("cap_offset", ctypes.c_uint32), ("size", ctypes.c_uint64), ("offset", ctypes.c_uint64)]


class vfio_iommu_type1_dma_map(ctypes.Structure):
    _fields_ = [("argsz", ctypes.c_uint32), ("flags", ctypes.c_uint32), ("vaddr", ctypes.c_uint64),
                ("iova", ctypes.c_uint64), ("size", ctypes.c_uint64)]


class vfio_iommu_type1_dma_unmap(ctypes.Structure):
    _fields_ = [("argsz", ctypes.c_uint32), ("flags", ctypes.c_uint32), ("iova", ctypes.c_uint64),
                ("size", ctypes.c_uint64)]


class vfio_iommu_spapr_tce_info(ctypes.Structure):
    _fields_ = [("argsz", ctypes.c_uint32), ("flags", ctypes.c_uint32), ("dma32_window_start", ctypes.c_uint32),
                ("dma32_window_size", ctypes.c_uint32), ("pgsizes", ctypes.c_uint64),
                ("max_dynamic_windows_supported", ctypes.c_uint32), ("levels", ctypes.c_uint32)]


class vfio_irq_set(ctypes.Structure):
    _fields_ = [("argsz", ctypes.c_uint32), ("flags", ctypes.c_uint32), ("index", ctypes.c_uint32),
                ("start", ctypes.c_uint32), ("count", ctypes.c_uint32), ("data", ctypes.c_int32 * 1)]


# edu registers (QEMU docs/specs/edu.rst)
EDU_IDENT, EDU_IRQ_STATUS, EDU_IRQ_ACK = 0x00, 0x24, 0x64
EDU_DMA_SRC, EDU_DMA_DST, EDU_DMA_CNT, EDU_DMA_CMD = 0x80, 0x88, 0x90, 0x98
EDU_BUFFER, DMA_RUN, DMA_TO_RAM, DMA_IRQ = 0x40000, 1, 2, 4
CHUNK = 4096


def find_edu() -> str:
    base = "/sys/bus/pci/devices"
    for bdf in sorted(os.listdir(base)):
        def attr(name: str) -> str:
            with open(f"{base}/{bdf}/{name}") as f:
                return f.read().strip()
        try:
            if attr("vendor") == "0x1234" and attr("device") == "0x11e8" and \
                    os.path.basename(os.readlink(f"{base}/{bdf}/driver")) == "vfio-pci":
                return bdf
        except OSError:
            continue
    sys.exit("vfio_edu: no edu device bound to vfio-pci")


def status_vmlck() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmLck:"):
                return int(line.split()[1])
    return -1


def main() -> int:
    bdf = sys.argv[1] if len(sys.argv) > 1 else find_edu()
    group_id = int(os.path.basename(os.readlink(f"/sys/bus/pci/devices/{bdf}/iommu_group")))
    print(f"device {bdf} in IOMMU group {group_id}")

    container = os.open("/dev/vfio/vfio", os.O_RDWR)
    assert fcntl.ioctl(container, VFIO_GET_API_VERSION) == VFIO_API_VERSION
    spapr = fcntl.ioctl(container, VFIO_CHECK_EXTENSION, VFIO_SPAPR_TCE_IOMMU) == 1
    if not spapr and fcntl.ioctl(container, VFIO_CHECK_EXTENSION, VFIO_TYPE1v2_IOMMU) != 1:
        sys.exit("vfio_edu: neither the sPAPR TCE nor the Type1 IOMMU is supported")
    group = os.open(f"/dev/vfio/{group_id}", os.O_RDWR)
    status = vfio_group_status(argsz=ctypes.sizeof(vfio_group_status))
    fcntl.ioctl(group, VFIO_GROUP_GET_STATUS, status)
    if not status.flags & VFIO_GROUP_FLAGS_VIABLE:
        sys.exit("vfio_edu: the group is not viable")
    fcntl.ioctl(group, VFIO_GROUP_SET_CONTAINER, ctypes.c_int32(container))
    fcntl.ioctl(container, VFIO_SET_IOMMU, VFIO_SPAPR_TCE_IOMMU if spapr else VFIO_TYPE1v2_IOMMU)
    iova = 0
    if spapr:
        info = vfio_iommu_spapr_tce_info(argsz=ctypes.sizeof(vfio_iommu_spapr_tce_info))
        fcntl.ioctl(container, VFIO_IOMMU_GET_INFO, info)
        iova = info.dma32_window_start
        fcntl.ioctl(container, VFIO_IOMMU_ENABLE)
    print(f"IOMMU: {'sPAPR TCE' if spapr else 'Type1v2'}, VmLck {status_vmlck()} kB")

    # The DMA buffer: anonymous memory, its address through ctypes.
    size = 1 << 20
    buf = mmap.mmap(-1, size, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS, mmap.PROT_READ | mmap.PROT_WRITE)
    vaddr = ctypes.addressof(ctypes.c_char.from_buffer(buf))
    dma_map = vfio_iommu_type1_dma_map(argsz=ctypes.sizeof(vfio_iommu_type1_dma_map),
                                       flags=VFIO_DMA_MAP_FLAG_READ | VFIO_DMA_MAP_FLAG_WRITE,
                                       vaddr=vaddr, iova=iova, size=size)
    fcntl.ioctl(container, VFIO_IOMMU_MAP_DMA, dma_map)
    print(f"mapped {size >> 10} KiB at iova {iova:#x}, VmLck {status_vmlck()} kB")

    # GET_DEVICE_FD returns the new fd, which fcntl.ioctl() does not pass back
    # for a buffer argument: call ioctl(2) through ctypes.
    libc = ctypes.CDLL(None, use_errno=True)
    device = libc.ioctl(group, ctypes.c_ulong(VFIO_GROUP_GET_DEVICE_FD), ctypes.c_char_p(bdf.encode()))
    if device < 0:
        raise OSError(ctypes.get_errno(), os.strerror(ctypes.get_errno()))
    bar_info = vfio_region_info(argsz=ctypes.sizeof(vfio_region_info), index=VFIO_PCI_BAR0_REGION_INDEX)
    fcntl.ioctl(device, VFIO_DEVICE_GET_REGION_INFO, bar_info)
    cfg_info = vfio_region_info(argsz=ctypes.sizeof(vfio_region_info), index=VFIO_PCI_CONFIG_REGION_INDEX)
    fcntl.ioctl(device, VFIO_DEVICE_GET_REGION_INFO, cfg_info)
    assert bar_info.flags & VFIO_REGION_INFO_FLAG_MMAP, "BAR0 cannot be mmapped"
    bar = mmap.mmap(device, bar_info.size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE,
                    offset=bar_info.offset)
    # One load or store per access: index a memoryview cast to the register width.
    regs32 = memoryview(bar).cast("I")
    regs64 = memoryview(bar).cast("Q")
    print(f"edu identification {regs32[EDU_IDENT // 4]:#x}")

    # Memory decoding and bus mastering on, in config space.
    (cmd,) = struct.unpack("<H", os.pread(device, 2, cfg_info.offset + 4))
    os.pwrite(device, struct.pack("<H", cmd | 0x6), cfg_info.offset + 4)

    # INTx to an eventfd; INTx is automasked until unmasked.
    efd = os.eventfd(0, os.EFD_CLOEXEC)
    irq = vfio_irq_set(argsz=ctypes.sizeof(vfio_irq_set), flags=VFIO_IRQ_SET_DATA_EVENTFD | VFIO_IRQ_SET_ACTION_TRIGGER,
                       index=VFIO_PCI_INTX_IRQ_INDEX, start=0, count=1)
    irq.data[0] = efd
    fcntl.ioctl(device, VFIO_DEVICE_SET_IRQS, irq)
    unmask = vfio_irq_set(argsz=ctypes.sizeof(vfio_irq_set) - 4,
                          flags=VFIO_IRQ_SET_DATA_NONE | VFIO_IRQ_SET_ACTION_UNMASK,
                          index=VFIO_PCI_INTX_IRQ_INDEX, start=0, count=1)

    def dma(src: int, dst: int, to_ram: bool) -> None:
        regs64[EDU_DMA_SRC // 8] = src
        regs64[EDU_DMA_DST // 8] = dst
        regs64[EDU_DMA_CNT // 8] = CHUNK
        regs64[EDU_DMA_CMD // 8] = DMA_RUN | DMA_IRQ | (DMA_TO_RAM if to_ram else 0)
        ready, _, _ = select.select([efd], [], [], 5)
        if not ready:
            sys.exit("vfio_edu: no interrupt within 5 s")
        os.eventfd_read(efd)
        regs32[EDU_IRQ_ACK // 4] = regs32[EDU_IRQ_STATUS // 4]
        fcntl.ioctl(device, VFIO_DEVICE_SET_IRQS, bytes(unmask)[:ctypes.sizeof(vfio_irq_set) - 4])

    pattern = bytes((i * 13 + 1) & 0xFF for i in range(CHUNK))
    buf[:CHUNK] = pattern
    dma(iova, EDU_BUFFER, to_ram=False)
    dma(EDU_BUFFER, iova + CHUNK, to_ram=True)
    ok = buf[CHUNK:2 * CHUNK] == pattern
    print(f"DMA round trip of {CHUNK} bytes: {'verified' if ok else 'MISMATCH'}")

    regs32.release()
    regs64.release()
    bar.close()
    os.close(device)
    fcntl.ioctl(container, VFIO_IOMMU_UNMAP_DMA,
                vfio_iommu_type1_dma_unmap(argsz=ctypes.sizeof(vfio_iommu_type1_dma_unmap), iova=iova, size=size))
    if spapr:
        fcntl.ioctl(container, VFIO_IOMMU_DISABLE)
    print(f"unmapped: VmLck {status_vmlck()} kB")
    os.close(group)
    os.close(container)
    return 0 if ok else 2


if __name__ == "__main__":
    sys.exit(main())
