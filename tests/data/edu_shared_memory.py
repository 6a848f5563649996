"""edu DMA into a buffer the program chooses (tests/test_run_shared_memory.py).

    edu_shared_memory.py type1|spapr2 memfd|memfd-closed|anon [remap|exec|truncate]

Maps the buffer for DMA (sPAPR v2: registered first, in the default window),
DMAs a pattern RAM -> edu -> RAM, prints what arrived, then waits for a line on
stdin (the test looks at the daemon meanwhile).  With ``remap``, the buffer's
address is then mapped afresh (MAP_FIXED, anonymous) and the device writes
again: it prints what the new mapping and the file hold there.  With ``exec``
it execs a Python that prints ``execd`` and waits for a line; with
``truncate`` it truncates the file to nothing, lets the device write to and
read from it, extends it again, lets the device write what it read and prints
what the file holds where the device wrote.
"""

import ctypes
import fcntl
import mmap
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "examples"))
from vfio_edu import (CHUNK, EDU_BUFFER, EDU_DMA_CMD, EDU_DMA_CNT, EDU_DMA_DST, EDU_DMA_SRC, DMA_RUN,  # noqa: E402
                      DMA_TO_RAM, VFIO_GROUP_GET_DEVICE_FD, find_edu, vfio_region_info)
from vfiosim import uapi as u  # noqa: E402

iommu, kind = sys.argv[1], sys.argv[2]
remap = "remap" in sys.argv[3:]
SIZE = 1 << 20
libc = ctypes.CDLL(None, use_errno=True)
libc.mmap.restype = ctypes.c_void_p
libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]

bdf = find_edu()
group_id = int(os.path.basename(os.readlink(f"/sys/bus/pci/devices/{bdf}/iommu_group")))
container = os.open("/dev/vfio/vfio", os.O_RDWR)
group = os.open(f"/dev/vfio/{group_id}", os.O_RDWR)
fcntl.ioctl(group, u.VFIO_GROUP_SET_CONTAINER, ctypes.c_int32(container))
fcntl.ioctl(container, u.VFIO_SET_IOMMU, u.VFIO_SPAPR_TCE_v2_IOMMU if iommu == "spapr2" else u.VFIO_TYPE1v2_IOMMU)

memfd = -1
if kind == "anon":
    addr = libc.mmap(None, SIZE, mmap.PROT_READ | mmap.PROT_WRITE, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS, -1, 0)
else:
    memfd = os.memfd_create("edu-dma")
    os.ftruncate(memfd, SIZE)
    addr = libc.mmap(None, SIZE, mmap.PROT_READ | mmap.PROT_WRITE, mmap.MAP_SHARED, memfd, 0)
    if kind == "memfd-closed":
        os.close(memfd)
        memfd = -1
buf = (ctypes.c_char * SIZE).from_address(addr)

iova = 0
if iommu == "spapr2":
    info = u.vfio_iommu_spapr_tce_info(argsz=ctypes.sizeof(u.vfio_iommu_spapr_tce_info))
    fcntl.ioctl(container, u.VFIO_IOMMU_SPAPR_TCE_GET_INFO, info)
    iova = info.dma32_window_start
    fcntl.ioctl(container, u.VFIO_IOMMU_SPAPR_REGISTER_MEMORY, u.vfio_iommu_spapr_register_memory(
        argsz=ctypes.sizeof(u.vfio_iommu_spapr_register_memory), vaddr=addr, size=SIZE))
fcntl.ioctl(container, u.VFIO_IOMMU_MAP_DMA, u.vfio_iommu_type1_dma_map(
    argsz=ctypes.sizeof(u.vfio_iommu_type1_dma_map), flags=3, vaddr=addr, iova=iova, size=SIZE))

device = libc.ioctl(group, ctypes.c_ulong(VFIO_GROUP_GET_DEVICE_FD), ctypes.c_char_p(bdf.encode()))
bar_info = vfio_region_info(argsz=ctypes.sizeof(vfio_region_info), index=0)
fcntl.ioctl(device, u.VFIO_DEVICE_GET_REGION_INFO, bar_info)
cfg = vfio_region_info(argsz=ctypes.sizeof(vfio_region_info), index=7)
fcntl.ioctl(device, u.VFIO_DEVICE_GET_REGION_INFO, cfg)
cmd = int.from_bytes(os.pread(device, 2, cfg.offset + 4), "little")
os.pwrite(device, (cmd | 6).to_bytes(2, "little"), cfg.offset + 4)
bar = mmap.mmap(device, bar_info.size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE, offset=bar_info.offset)
regs64 = memoryview(bar).cast("Q")


def dma(src: int, dst: int, to_ram: bool) -> None:
    regs64[EDU_DMA_SRC // 8] = src
    regs64[EDU_DMA_DST // 8] = dst
    regs64[EDU_DMA_CNT // 8] = CHUNK
    regs64[EDU_DMA_CMD // 8] = DMA_RUN | (DMA_TO_RAM if to_ram else 0)
    while regs64[EDU_DMA_CMD // 8] & DMA_RUN:
        pass


pattern = bytes((i * 7 + 3) & 0xFF for i in range(CHUNK))
buf[0:CHUNK] = pattern
dma(iova + 0, EDU_BUFFER, False)                       # RAM -> device: a page the CPU wrote
dma(EDU_BUFFER, iova + 3 * CHUNK + 100, True)          # device -> RAM, across a page boundary
got = bytes(buf[3 * CHUNK + 100:4 * CHUNK + 100])
print("round trip", "ok" if got == pattern else "MISMATCH", flush=True)
sys.stdin.readline()
if "truncate" in sys.argv[3:]:      # the file shrinks under its DMA-mapped pages, then grows back
    os.ftruncate(memfd, 0)
    dma(EDU_BUFFER, iova + 8 * CHUNK, True)
    dma(iova, EDU_BUFFER, False)
    os.ftruncate(memfd, SIZE)
    dma(EDU_BUFFER, iova + 9 * CHUNK, True)
    seen = [os.pread(memfd, CHUNK, n * CHUNK) for n in (8, 9)]
    print("after truncate", *("pattern" if b == pattern else "zeros" if not any(b) else "other" for b in seen),
          flush=True)
    sys.stdin.readline()
if "exec" in sys.argv[3:]:          # a new image, the buffer still DMA-mapped by the container it inherits
    os.execv(sys.executable, [sys.executable, "-c", "import sys; print('execd', flush=True); sys.stdin.readline()"])
if remap:
    # The program maps something else where its DMA-mapped buffer was.
    assert libc.mmap(addr, SIZE, mmap.PROT_READ | mmap.PROT_WRITE,
                     mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | 0x10, -1, 0) == addr   # MAP_FIXED
    dma(EDU_BUFFER, iova + 8 * CHUNK, True)
    fresh = bytes(buf[8 * CHUNK:9 * CHUNK])
    print("new mapping", "pattern" if fresh == pattern else "zeros" if not any(fresh) else "other")
    if memfd >= 0:
        old = os.pread(memfd, CHUNK, 8 * CHUNK)
        print("file page", "pattern" if old == pattern else "zeros" if not any(old) else "other", flush=True)
    sys.stdin.readline()
regs64.release()
bar.close()
os.close(device)
fcntl.ioctl(container, u.VFIO_IOMMU_UNMAP_DMA, u.vfio_iommu_type1_dma_unmap(
    argsz=ctypes.sizeof(u.vfio_iommu_type1_dma_unmap), iova=iova, size=SIZE))
print("unmapped", flush=True)
sys.stdin.readline()
