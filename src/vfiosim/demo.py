"""`vfiosim demo`: the flow of the kernel's VFIO documentation, end to end.

On POWER, the sPAPR flow: open the container and the group, check the
extension, set the IOMMU, get the DMA window, enable (locked-memory
accounting), map a buffer, have the edu device DMA it through the TCE table
into its buffer and back out to a second buffer, verify, unmap, disable and
close.  On x86, the same round trip over the Type1v2 IOMMU: GET_INFO with
its capability chain instead of the window, no ENABLE (MAP_DMA pins and
charges the pages itself), and the device's DMA goes through the VT-d page
table.  Every system call is printed with its result and the process's VmLck.
"""

from __future__ import annotations

import ctypes
import functools
import os
import sys
from typing import Callable, TextIO, TypeVar

from .kernel.config import POWER_PLATFORMS
from .kernel.pci import edu as E
from .machine import Machine, Process
from .uapi import vfio as uapi

CONFIG = uapi.VFIO_PCI_CONFIG_REGION_INDEX << 40
BAR0 = uapi.VFIO_PCI_BAR0_REGION_INDEX << 40
PCI_COMMAND = 0x04
PCI_COMMAND_MASTER = 0x4


T = TypeVar("T")


class DemoFailed(Exception):
    pass


class Step:
    """Runs calls, printing ``call  result  VmLck`` for each."""

    def __init__(self, p: Process, out: TextIO) -> None:
        self.p = p
        self.out = out
        self.n = 0

    def __call__(self, label: str, fn: Callable[[], T], show: Callable[[T], str] | None = None) -> T:
        self.n += 1
        try:
            result = fn()
        except OSError as exc:
            self._line(label, f"FAILED: {exc.strerror}")
            raise DemoFailed(f"{label}: {exc.strerror}") from None
        text = show(result) if show else ("ok" if result is None else str(result))
        self._line(label, text)
        return result

    def note(self, text: str) -> None:
        print(f"       {text}", file=self.out)

    def _line(self, label: str, result: str) -> None:
        vmlck = self.p.status()["VmLck"] if self.p.alive else 0
        print(f"  {self.n:>2}  {label:<52} {result:<30} VmLck {vmlck:>8} kB", file=self.out)


def run_demo(m: Machine, out: TextIO | None = None, transfers: int = 4) -> bool:
    """Run the demo on ``m``; True if every byte made the round trip."""
    out = out if out is not None else sys.stdout
    k = m.kernel
    # sPAPR TCE on POWER; on every other platform the container is Type1's
    # (VFIO's driver, or iommufd's emulation of it).
    flow = _flow if m.platform in POWER_PLATFORMS else _flow_type1
    # The first group with a /dev/vfio node (x86 groups 0-3 are the host's).
    usable = [(gid, bdfs) for gid, bdfs in m.iommu_groups().items() if gid in k.vfio.groups]
    if not usable:
        raise ValueError(f"{m.name} has no device bound to vfio-pci")
    group_id, bdfs = usable[0]
    bdf = next(d.name for d in k.vfio.groups[group_id].devices)
    print(f"vfiosim demo: {m.spec.description or m.name}", file=out)
    print(f"  Linux {m.kernel_version} profile, {m.page_size // 1024} KiB pages; device {bdf} "
          f"(edu) in IOMMU group {group_id}\n", file=out)
    p = m.spawn(uid=0, rlimit_memlock=(8 << 20, 8 << 20), name="demo")
    step = Step(p, out)
    try:
        ok = flow(m, p, step, group_id, bdf, transfers)
    except DemoFailed as exc:
        print(f"\nFAILED: {exc}", file=out)
        ok = False
    finally:
        p.exit()
    lines = [line for line in m.dmesg()
             if "EEH" in line or "DMAR: [" in line or "vfiosim:" in line and "profile" not in line]
    if lines:
        print("\nkernel log:", file=out)
        for line in lines:
            print(f"  {line}", file=out)
    print(f"\n{'OK: the data made the round trip through the IOMMU' if ok else 'FAILED'}; after exit, "
          f"{m.pinned_pages()} pages pinned, VmLck {p.mm.locked_vm * m.page_size // 1024} kB", file=out)
    return ok and m.pinned_pages() == 0 and not m.oopses


def _flow(m: Machine, p: Process, step: Step, group_id: int, bdf: str, transfers: int) -> bool:
    container = step('open("/dev/vfio/vfio", O_RDWR)', lambda: p.open("/dev/vfio/vfio", os.O_RDWR),
                     lambda fd: f"fd {fd}")
    step("ioctl(VFIO_GET_API_VERSION)", lambda: p.ioctl(container, uapi.VFIO_GET_API_VERSION))
    has = step("ioctl(VFIO_CHECK_EXTENSION, VFIO_SPAPR_TCE_IOMMU)",
               lambda: p.ioctl(container, uapi.VFIO_CHECK_EXTENSION, uapi.VFIO_SPAPR_TCE_IOMMU))
    if not has:
        raise DemoFailed("the kernel has no sPAPR TCE IOMMU driver")
    group = step(f'open("/dev/vfio/{group_id}", O_RDWR)', lambda: p.open(f"/dev/vfio/{group_id}", os.O_RDWR),
                 lambda fd: f"fd {fd}")
    status = uapi.vfio_group_status(argsz=ctypes.sizeof(uapi.vfio_group_status))
    step("ioctl(VFIO_GROUP_GET_STATUS)", lambda: p.ioctl(group, uapi.VFIO_GROUP_GET_STATUS, status),
         lambda _: "viable" if status.flags & uapi.VFIO_GROUP_FLAGS_VIABLE else "NOT viable")
    step("ioctl(VFIO_GROUP_SET_CONTAINER)",
         lambda: p.ioctl(group, uapi.VFIO_GROUP_SET_CONTAINER, ctypes.c_int32(container)))
    step("ioctl(VFIO_SET_IOMMU, VFIO_SPAPR_TCE_IOMMU)",
         lambda: p.ioctl(container, uapi.VFIO_SET_IOMMU, uapi.VFIO_SPAPR_TCE_IOMMU))
    info = uapi.vfio_iommu_spapr_tce_info(argsz=ctypes.sizeof(uapi.vfio_iommu_spapr_tce_info))
    step("ioctl(VFIO_IOMMU_SPAPR_TCE_GET_INFO)", lambda: p.ioctl(container, uapi.VFIO_IOMMU_SPAPR_TCE_GET_INFO, info),
         lambda _: f"window {info.dma32_window_start:#x}+{info.dma32_window_size:#x}")
    step("ioctl(VFIO_IOMMU_ENABLE)", lambda: p.ioctl(container, uapi.VFIO_IOMMU_ENABLE))
    step.note("ENABLE charges the whole DMA window to locked memory (the seed's accounting)")

    size = max(transfers * E.DMA_SIZE, m.page_size)
    src = step(f"mmap({size:#x}, PROT_READ|PROT_WRITE)", lambda: p.mmap(size), lambda a: f"{a:#x}")
    dst = step(f"mmap({size:#x}, PROT_READ|PROT_WRITE)", lambda: p.mmap(size), lambda a: f"{a:#x}")
    pattern = bytes((i * 7 + 3) & 0xFF for i in range(size))
    p.write_memory(src, pattern)
    # Bus addresses at the start of the window, inside edu's 28-bit DMA mask.
    iova_src = info.dma32_window_start
    iova_dst = iova_src + size
    # The 3.10 driver maps exactly one 4 KiB IOMMU page per call.
    chunk = 4096 if m.kernel_version == "3.10" else size
    for vaddr, iova, flags, what in ((src, iova_src, uapi.VFIO_DMA_MAP_FLAG_READ, "READ"),
                                     (dst, iova_dst, uapi.VFIO_DMA_MAP_FLAG_WRITE, "WRITE")):
        for off in range(0, size, chunk):
            dma_map = uapi.vfio_iommu_type1_dma_map(argsz=ctypes.sizeof(uapi.vfio_iommu_type1_dma_map), flags=flags,
                                                     vaddr=vaddr + off, iova=iova + off, size=chunk)
            step(f"ioctl(VFIO_IOMMU_MAP_DMA, iova {iova + off:#x}+{chunk:#x}, {what})",
                 functools.partial(p.ioctl, container, uapi.VFIO_IOMMU_MAP_DMA, dma_map))
    if m.kernel_version != "3.10":
        step.note("the first MAP_DMA created the 32-bit window's TCE table, charged to locked memory too")

    device = step(f"ioctl(VFIO_GROUP_GET_DEVICE_FD, \"{bdf}\")",
                  lambda: p.ioctl(group, uapi.VFIO_GROUP_GET_DEVICE_FD, bdf.encode() + b"\0"), lambda fd: f"fd {fd}")
    dinfo = uapi.vfio_device_info(argsz=ctypes.sizeof(uapi.vfio_device_info))
    step("ioctl(VFIO_DEVICE_GET_INFO)", lambda: p.ioctl(device, uapi.VFIO_DEVICE_GET_INFO, dinfo),
         lambda _: f"{dinfo.num_regions} regions, {dinfo.num_irqs} irqs")
    rinfo = uapi.vfio_region_info(argsz=ctypes.sizeof(uapi.vfio_region_info), index=uapi.VFIO_PCI_BAR0_REGION_INDEX)
    step("ioctl(VFIO_DEVICE_GET_REGION_INFO, BAR0)", lambda: p.ioctl(device, uapi.VFIO_DEVICE_GET_REGION_INFO, rinfo),
         lambda _: f"{rinfo.size:#x} bytes at {rinfo.offset:#x}")
    ids = step("pread(config, 4, 0)", lambda: int.from_bytes(p.pread(device, 4, CONFIG), "little"),
               lambda v: f"vendor {v & 0xFFFF:04x} device {v >> 16:04x}")
    if ids != E.EDU_VENDOR | (E.EDU_DEVICE << 16):
        raise DemoFailed(f"{bdf} is not an edu device")
    cmd = int.from_bytes(p.pread(device, 2, CONFIG + PCI_COMMAND), "little")
    step("pwrite(config COMMAND |= BUS_MASTER)",
         lambda: p.pwrite(device, (cmd | PCI_COMMAND_MASTER).to_bytes(2, "little"), CONFIG + PCI_COMMAND),
         lambda n: f"{n} bytes")

    def reg_read(off: int, n: int = 4) -> int:
        return int.from_bytes(p.pread(device, n, BAR0 + off), "little")

    def reg_write(off: int, value: int, n: int = 4) -> None:
        p.pwrite(device, value.to_bytes(n, "little"), BAR0 + off)

    step("pread(BAR0 0x00: identification)", lambda: reg_read(0x00), lambda v: f"{v:#010x}")
    reg_write(0x04, 0x12345678)
    step("pread(BAR0 0x04: liveness of 0x12345678)", lambda: reg_read(0x04), lambda v: f"{v:#010x}")
    efd = step("eventfd(0, 0)", lambda: p.eventfd(), lambda fd: f"fd {fd}")
    irq = uapi.vfio_irq_set(argsz=ctypes.sizeof(uapi.vfio_irq_set) + 4, count=1,
                            flags=uapi.VFIO_IRQ_SET_DATA_EVENTFD | uapi.VFIO_IRQ_SET_ACTION_TRIGGER,
                            index=uapi.VFIO_PCI_MSI_IRQ_INDEX)
    buf = bytearray(bytes(irq) + int(efd).to_bytes(4, "little", signed=True))
    step("ioctl(VFIO_DEVICE_SET_IRQS, MSI -> eventfd)", lambda: p.ioctl(device, uapi.VFIO_DEVICE_SET_IRQS, buf))

    step.note(f"edu DMA: {transfers} x {E.DMA_SIZE} bytes, memory -> device buffer -> memory, through the TCEs")
    for i in range(transfers):
        off = i * E.DMA_SIZE
        reg_write(0x80, iova_src + off, 8)
        reg_write(0x88, E.DMA_START, 8)
        reg_write(0x90, E.DMA_SIZE, 8)
        reg_write(0x98, E.DMA_RUN | E.DMA_IRQ_ENABLE, 8)
        reg_write(0x80, E.DMA_START, 8)
        reg_write(0x88, iova_dst + off, 8)
        reg_write(0x90, E.DMA_SIZE, 8)
        step(f"edu DMA #{i}: device -> iova {iova_dst + off:#x}",
             lambda: reg_write(0x98, E.DMA_RUN | E.DMA_DIR_TO_RAM | E.DMA_IRQ_ENABLE, 8))
        reg_write(0x64, reg_read(0x24))       # acknowledge
    step("read(eventfd): interrupts delivered", lambda: int.from_bytes(p.read(efd, 8), "little"))
    data = p.read_memory(dst, transfers * E.DMA_SIZE)
    ok = data == pattern[:transfers * E.DMA_SIZE]
    step.note(f"verify: {'the destination buffer equals the source' if ok else 'MISMATCH'}")

    dma_unmap = uapi.vfio_iommu_type1_dma_unmap(argsz=ctypes.sizeof(uapi.vfio_iommu_type1_dma_unmap),
                                                iova=iova_src, size=2 * size)
    step("ioctl(VFIO_IOMMU_UNMAP_DMA)", lambda: p.ioctl(container, uapi.VFIO_IOMMU_UNMAP_DMA, dma_unmap))
    step("ioctl(VFIO_IOMMU_DISABLE)", lambda: p.ioctl(container, uapi.VFIO_IOMMU_DISABLE))
    step("close(device)", lambda: p.close(device))
    step("close(group)", lambda: p.close(group))
    step("close(container)", lambda: p.close(container))
    return ok


def _int(value: object) -> int:
    """A step's result that is a number (an fd, an address, a register)."""
    assert isinstance(value, int)
    return value


def _device_round_trip(m: Machine, p: Process, step: Step, group: int, bdf: str, iova_src: int, iova_dst: int,
                       src: int, dst: int, pattern: bytes, transfers: int, through: str) -> tuple[int, bool]:
    """Device fd, registers, MSI, and the edu DMA round trip; returns (device fd, data equal)."""
    device = _int(step(f"ioctl(VFIO_GROUP_GET_DEVICE_FD, \"{bdf}\")",
                  lambda: p.ioctl(group, uapi.VFIO_GROUP_GET_DEVICE_FD, bdf.encode() + b"\0"), lambda fd: f"fd {fd}"))
    dinfo = uapi.vfio_device_info(argsz=ctypes.sizeof(uapi.vfio_device_info))
    step("ioctl(VFIO_DEVICE_GET_INFO)", lambda: p.ioctl(device, uapi.VFIO_DEVICE_GET_INFO, dinfo),
         lambda _: f"{dinfo.num_regions} regions, {dinfo.num_irqs} irqs")
    rinfo = uapi.vfio_region_info(argsz=ctypes.sizeof(uapi.vfio_region_info), index=uapi.VFIO_PCI_BAR0_REGION_INDEX)
    step("ioctl(VFIO_DEVICE_GET_REGION_INFO, BAR0)", lambda: p.ioctl(device, uapi.VFIO_DEVICE_GET_REGION_INFO, rinfo),
         lambda _: f"{rinfo.size:#x} bytes at {rinfo.offset:#x}")
    ids = _int(step("pread(config, 4, 0)", lambda: int.from_bytes(p.pread(device, 4, CONFIG), "little"),
               lambda v: f"vendor {v & 0xFFFF:04x} device {v >> 16:04x}"))
    if ids != E.EDU_VENDOR | (E.EDU_DEVICE << 16):
        raise DemoFailed(f"{bdf} is not an edu device")
    cmd = int.from_bytes(p.pread(device, 2, CONFIG + PCI_COMMAND), "little")
    step("pwrite(config COMMAND |= BUS_MASTER)",
         lambda: p.pwrite(device, (cmd | PCI_COMMAND_MASTER).to_bytes(2, "little"), CONFIG + PCI_COMMAND),
         lambda n: f"{n} bytes")

    def reg_read(off: int, n: int = 4) -> int:
        return int.from_bytes(p.pread(device, n, BAR0 + off), "little")

    def reg_write(off: int, value: int, n: int = 4) -> None:
        p.pwrite(device, value.to_bytes(n, "little"), BAR0 + off)

    step("pread(BAR0 0x00: identification)", lambda: reg_read(0x00), lambda v: f"{v:#010x}")
    reg_write(0x04, 0x12345678)
    step("pread(BAR0 0x04: liveness of 0x12345678)", lambda: reg_read(0x04), lambda v: f"{v:#010x}")
    efd = _int(step("eventfd(0, 0)", lambda: p.eventfd(), lambda fd: f"fd {fd}"))
    irq = uapi.vfio_irq_set(argsz=ctypes.sizeof(uapi.vfio_irq_set) + 4, count=1,
                            flags=uapi.VFIO_IRQ_SET_DATA_EVENTFD | uapi.VFIO_IRQ_SET_ACTION_TRIGGER,
                            index=uapi.VFIO_PCI_MSI_IRQ_INDEX)
    buf = bytearray(bytes(irq) + efd.to_bytes(4, "little", signed=True))
    step("ioctl(VFIO_DEVICE_SET_IRQS, MSI -> eventfd)", lambda: p.ioctl(device, uapi.VFIO_DEVICE_SET_IRQS, buf))

    step.note(f"edu DMA: {transfers} x {E.DMA_SIZE} bytes, memory -> device buffer -> memory, through {through}")
    for i in range(transfers):
        off = i * E.DMA_SIZE
        reg_write(0x80, iova_src + off, 8)
        reg_write(0x88, E.DMA_START, 8)
        reg_write(0x90, E.DMA_SIZE, 8)
        reg_write(0x98, E.DMA_RUN | E.DMA_IRQ_ENABLE, 8)
        reg_write(0x80, E.DMA_START, 8)
        reg_write(0x88, iova_dst + off, 8)
        reg_write(0x90, E.DMA_SIZE, 8)
        step(f"edu DMA #{i}: device -> iova {iova_dst + off:#x}",
             lambda: reg_write(0x98, E.DMA_RUN | E.DMA_DIR_TO_RAM | E.DMA_IRQ_ENABLE, 8))
        reg_write(0x64, reg_read(0x24))       # acknowledge
    step("read(eventfd): interrupts delivered", lambda: int.from_bytes(p.read(efd, 8), "little"))
    data = p.read_memory(dst, transfers * E.DMA_SIZE)
    ok = data == pattern[:transfers * E.DMA_SIZE]
    step.note(f"verify: {'the destination buffer equals the source' if ok else 'MISMATCH'}")
    return device, ok


def _iova_ranges(buf: bytes | bytearray) -> list[tuple[int, int]]:
    """The IOVA_RANGE capability of a VFIO_IOMMU_GET_INFO answer."""
    offset = int.from_bytes(buf[16:20], "little")
    while offset and offset + 8 <= len(buf):
        cap_id = int.from_bytes(buf[offset:offset + 2], "little")
        nxt = int.from_bytes(buf[offset + 4:offset + 8], "little")
        if cap_id == uapi.VFIO_IOMMU_TYPE1_INFO_CAP_IOVA_RANGE:
            n = int.from_bytes(buf[offset + 8:offset + 12], "little")
            return [(int.from_bytes(buf[offset + 16 + 16 * i:offset + 24 + 16 * i], "little"),
                     int.from_bytes(buf[offset + 24 + 16 * i:offset + 32 + 16 * i], "little")) for i in range(n)]
        offset = nxt
    return []


def _flow_type1(m: Machine, p: Process, step: Step, group_id: int, bdf: str, transfers: int) -> bool:
    """The Type1v2 flow of Documentation/driver-api/vfio.rst (x86, any platform but POWER)."""
    container = _int(step('open("/dev/vfio/vfio", O_RDWR)', lambda: p.open("/dev/vfio/vfio", os.O_RDWR),
                     lambda fd: f"fd {fd}"))
    step("ioctl(VFIO_GET_API_VERSION)", lambda: p.ioctl(container, uapi.VFIO_GET_API_VERSION))
    has = _int(step("ioctl(VFIO_CHECK_EXTENSION, VFIO_TYPE1v2_IOMMU)",
               lambda: p.ioctl(container, uapi.VFIO_CHECK_EXTENSION, uapi.VFIO_TYPE1v2_IOMMU)))
    if not has:
        raise DemoFailed("the kernel has no Type1v2 IOMMU driver")
    group = _int(step(f'open("/dev/vfio/{group_id}", O_RDWR)', lambda: p.open(f"/dev/vfio/{group_id}", os.O_RDWR),
                 lambda fd: f"fd {fd}"))
    status = uapi.vfio_group_status(argsz=ctypes.sizeof(uapi.vfio_group_status))
    step("ioctl(VFIO_GROUP_GET_STATUS)", lambda: p.ioctl(group, uapi.VFIO_GROUP_GET_STATUS, status),
         lambda _: "viable" if status.flags & uapi.VFIO_GROUP_FLAGS_VIABLE else "NOT viable")
    step("ioctl(VFIO_GROUP_SET_CONTAINER)",
         lambda: p.ioctl(group, uapi.VFIO_GROUP_SET_CONTAINER, ctypes.c_int32(container)))
    step("ioctl(VFIO_SET_IOMMU, VFIO_TYPE1v2_IOMMU)",
         lambda: p.ioctl(container, uapi.VFIO_SET_IOMMU, uapi.VFIO_TYPE1v2_IOMMU))
    info = bytearray(4096)
    info[0:4] = len(info).to_bytes(4, "little")
    step("ioctl(VFIO_IOMMU_GET_INFO)", lambda: p.ioctl(container, uapi.VFIO_IOMMU_GET_INFO, info),
         lambda _: f"page sizes {int.from_bytes(info[8:16], 'little'):#x}")
    ranges = _iova_ranges(info)
    step.note("usable IOVA: " + ", ".join(f"{s:#x}..{e:#x}" for s, e in ranges) +
              " (the interrupt window is reserved)")

    size = max(transfers * E.DMA_SIZE, m.page_size)
    src = _int(step(f"mmap({size:#x}, PROT_READ|PROT_WRITE)", lambda: p.mmap(size), lambda a: f"{a:#x}"))
    dst = _int(step(f"mmap({size:#x}, PROT_READ|PROT_WRITE)", lambda: p.mmap(size), lambda a: f"{a:#x}"))
    pattern = bytes((i * 7 + 3) & 0xFF for i in range(size))
    p.write_memory(src, pattern)
    # Bus addresses inside edu's 28-bit DMA mask and the first usable range.
    iova_src = 0x100000
    iova_dst = iova_src + size
    for vaddr, iova, flags, what in ((src, iova_src, uapi.VFIO_DMA_MAP_FLAG_READ, "READ"),
                                     (dst, iova_dst, uapi.VFIO_DMA_MAP_FLAG_WRITE, "WRITE")):
        dma_map = uapi.vfio_iommu_type1_dma_map(argsz=ctypes.sizeof(uapi.vfio_iommu_type1_dma_map), flags=flags,
                                                 vaddr=vaddr, iova=iova, size=size)

        def do_map(dm: ctypes.Structure = dma_map) -> int:
            return p.ioctl(container, uapi.VFIO_IOMMU_MAP_DMA, dm)
        step(f"ioctl(VFIO_IOMMU_MAP_DMA, {iova:#x}+{size:#x}, {what})", do_map)
    step.note("MAP_DMA pins the buffer's pages and charges them to locked memory, page by page")

    device, ok = _device_round_trip(m, p, step, group, bdf, iova_src, iova_dst, src, dst, pattern, transfers,
                                    "the VT-d page table")
    dma_unmap = uapi.vfio_iommu_type1_dma_unmap(argsz=ctypes.sizeof(uapi.vfio_iommu_type1_dma_unmap),
                                                iova=iova_src, size=2 * size)
    step("ioctl(VFIO_IOMMU_UNMAP_DMA)", lambda: p.ioctl(container, uapi.VFIO_IOMMU_UNMAP_DMA, dma_unmap),
         lambda _: f"{dma_unmap.size:#x} bytes unmapped")
    step("close(device)", lambda: p.close(device))
    step("close(group)", lambda: p.close(group))
    step("close(container)", lambda: p.close(container))
    return ok

