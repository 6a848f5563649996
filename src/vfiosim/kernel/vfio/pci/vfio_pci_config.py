"""Config space of vfio-pci (drivers/vfio/pci/vfio_pci_config.c).

Config space is partly virtualized: IDs, BARs, the capability chain and MSI
are kept by vfio-pci (``vconfig``, with per-byte masks of virtualized and
writable bits); the rest reaches the device; the MSI-X capability reads from
the device and ignores writes; vendor-specific capabilities (virtio's) are
raw: reads and writes reach the device.
"""

from __future__ import annotations

from errno import EFAULT
from typing import TYPE_CHECKING

from ...errors import fail
from ...pci.config import (PCI_BASE_ADDRESS_0, PCI_CAP_ID_MSI, PCI_CAP_ID_MSIX, PCI_CAP_ID_VNDR, PCI_CAPABILITY_LIST,
                           PCI_COMMAND,
                           PCI_COMMAND_INTX_DISABLE, PCI_COMMAND_MEMORY, PCI_DEVICE_ID, PCI_INTERRUPT_LINE,
                           PCI_INTERRUPT_PIN, PCI_MSI_FLAGS, PCI_MSI_FLAGS_64BIT, PCI_MSI_FLAGS_ENABLE,
                           PCI_ROM_ADDRESS, PCI_STATUS, PCI_STATUS_CAP_LIST, PCI_STD_HEADER_SIZEOF, PCI_VENDOR_ID)

if TYPE_CHECKING:
    from .vfio_pci_core import VfioPciDevice


def vfio_pci_memory_enabled(vdev: "VfioPciDevice") -> bool:
    """__vfio_pci_memory_enabled(): memory decoding, as the user last set it."""
    return bool(vdev.vconfig[PCI_COMMAND] & PCI_COMMAND_MEMORY)


def vfio_config_init(vdev: "VfioPciDevice") -> None:
    p = vdev.pdev
    vdev.vconfig[:] = p.config.data
    vdev.virt[:] = bytes(len(vdev.virt))
    vdev.vwrite[:] = bytes(len(vdev.vwrite))

    def perm(off: int, size: int, virt: int, write: int) -> None:
        vdev.virt[off:off + size] = (virt & ((1 << 8 * size) - 1)).to_bytes(size, "little")
        vdev.vwrite[off:off + size] = (write & ((1 << 8 * size) - 1)).to_bytes(size, "little")

    ALL = 0xFFFFFFFF
    # init_pci_cap_basic_perm(): the standard header.  Unlisted fields of
    # the header read from the device and ignore writes.
    for off in range(0, 0x40):
        vdev.vwrite[off] = 0
    perm(PCI_VENDOR_ID, 2, ALL, 0)
    perm(PCI_DEVICE_ID, 2, ALL, 0)
    perm(PCI_COMMAND, 2, PCI_COMMAND_INTX_DISABLE, ALL)
    perm(PCI_STATUS, 2, PCI_STATUS_CAP_LIST, 0)
    perm(0x0C, 1, 0, ALL)        # cache line size
    perm(0x0D, 1, 0, ALL)        # latency timer
    perm(0x0F, 1, 0, ALL)        # BIST
    for bar in range(6):
        perm(PCI_BASE_ADDRESS_0 + 4 * bar, 4, ALL, ALL)
    perm(PCI_ROM_ADDRESS, 4, ALL, ALL)
    perm(PCI_CAPABILITY_LIST, 1, ALL, 0)
    perm(PCI_INTERRUPT_LINE, 1, ALL, ALL)
    perm(PCI_INTERRUPT_PIN, 1, ALL, 0)
    # The header's COMMAND is tracked in vconfig too, so memory decode can
    # be tested against the user's view (__vfio_pci_memory_enabled()).
    msi = p.config.find_capability(PCI_CAP_ID_MSI)
    if msi:
        flags = p.config.read(msi + PCI_MSI_FLAGS, 2)
        length = 14 if flags & PCI_MSI_FLAGS_64BIT else 10
        perm(msi, 2, ALL, 0)                      # id and next pointer
        perm(msi + PCI_MSI_FLAGS, 1, ALL, ALL)
        perm(msi + 3, 1, ALL, 0)
        for off in range(msi + 4, msi + length):
            vdev.virt[off] = 0xFF
            vdev.vwrite[off] = 0xFF
        # MSI is enabled by SET_IRQS, never by writing config space.
        vdev.vconfig[msi + PCI_MSI_FLAGS] &= ~PCI_MSI_FLAGS_ENABLE & 0xFF
    msix = p.config.find_capability(PCI_CAP_ID_MSIX)
    if msix:
        # No perm_bits for MSI-X (cap_perms[] defaults to vfio_direct_config_read
        # with no writefn): the capability reads from the device, its ID and next
        # pointer from vconfig, and every write is dropped.  So userspace sees the
        # Enable and Function Mask bits the host's PCI core programmed.
        perm(msix, 2, ALL, 0)
    # Vendor-specific capabilities (virtio's): vfio_pci_init_perm_bits() gives
    # PCI_CAP_ID_VNDR vfio_raw_config_write, so every write reaches the device, and
    # the default vfio_direct_config_read (ID and next pointer from vconfig).
    cap, seen = p.config.data[PCI_CAPABILITY_LIST] & ~3, 0
    while cap and seen < 48:
        if p.config.data[cap] == PCI_CAP_ID_VNDR:
            length = max(p.config.data[cap + 2], 3)
            perm(cap, 2, ALL, 0)
            for off in range(cap + 2, min(cap + length, len(vdev.vwrite))):
                vdev.vwrite[off] = 0xFF
        cap, seen = p.config.data[cap + 1] & ~3, seen + 1
    # Bytes past the header that no capability covers are unassigned_perms: raw reads and
    # writes ("some devices hide registers between the gaps in config space", as IOAT's
    # CHANERR_INT at 0x180 of its extended space).  vfio_config_init() marks them
    # PCI_CAP_ID_INVALID up to pdev->cfg_size; a write reaches the device, whose own write
    # masks decide what sticks.
    covered = bytearray(len(vdev.vwrite))
    for off, length in p.config.cap_lengths.items():
        covered[off:off + length] = b"\x01" * length
    for off in range(PCI_STD_HEADER_SIZEOF, len(vdev.vwrite)):
        if not covered[off]:
            vdev.vwrite[off] = 0xFF
    # BARs: sizes come from the device; unimplemented BARs read 0.
    for bar in range(6):
        reg = PCI_BASE_ADDRESS_0 + 4 * bar
        if bar not in p.bars and not (bar > 0 and (bar - 1) in p.bars and p.bars[bar - 1].is_64bit):
            vdev.vconfig[reg:reg + 4] = bytes(4)
    vdev.vconfig[PCI_ROM_ADDRESS:PCI_ROM_ADDRESS + 4] = bytes(4)


def vfio_bar_fixup(vdev: "VfioPciDevice", reg: int) -> None:
    """vfio_bar_fixup(): keep only the address bits the BAR's size allows."""
    bar = (reg - PCI_BASE_ADDRESS_0) // 4
    b = vdev.pdev.bars.get(bar)
    raw = int.from_bytes(vdev.vconfig[reg:reg + 4], "little")
    if b is not None:
        flags = vdev.pdev.config.read(reg, 4) & 0xF
        raw = (raw & ~(b.size - 1) & 0xFFFFFFF0) | flags
    elif bar > 0 and (bar - 1) in vdev.pdev.bars and vdev.pdev.bars[bar - 1].is_64bit:
        size = vdev.pdev.bars[bar - 1].size
        raw &= ~((size - 1) >> 32) & 0xFFFFFFFF
    else:
        raw = 0
    if reg == PCI_ROM_ADDRESS:
        raw = 0
    vdev.vconfig[reg:reg + 4] = raw.to_bytes(4, "little")


def vfio_config_read(vdev: "VfioPciDevice", off: int, size: int) -> int:
    hw = vdev.pdev.config_read(off, size)
    value = 0
    for i in range(size):
        v = vdev.virt[off + i]
        byte = (vdev.vconfig[off + i] & v) | ((hw >> (8 * i)) & ~v & 0xFF)
        value |= byte << (8 * i)
    if off <= PCI_COMMAND < off + size or off <= PCI_COMMAND + 1 < off + size:
        # COMMAND reads back what the user last wrote, INTx-disable included.
        for i in range(size):
            if off + i in (PCI_COMMAND, PCI_COMMAND + 1):
                value = (value & ~(0xFF << (8 * i))) | (vdev.vconfig[off + i] << (8 * i))
    return value


def vfio_config_write(vdev: "VfioPciDevice", off: int, size: int, value: int) -> None:
    hw_mask = 0
    for i in range(size):
        b = (value >> (8 * i)) & 0xFF
        w, v = vdev.vwrite[off + i], vdev.virt[off + i]
        vdev.vconfig[off + i] = (vdev.vconfig[off + i] & ~(w & v) & 0xFF) | (b & w & v)
        hw_mask |= (w & ~v & 0xFF) << (8 * i)
    if off <= PCI_COMMAND + 1 and off + size > PCI_COMMAND:
        # Track every COMMAND bit in vconfig (vfio_basic_config_write).
        for i in range(size):
            if off + i in (PCI_COMMAND, PCI_COMMAND + 1):
                vdev.vconfig[off + i] = (value >> (8 * i)) & 0xFF
    for reg in range(PCI_BASE_ADDRESS_0, PCI_ROM_ADDRESS + 4, 4):
        if off < reg + 4 and reg < off + size and (reg < PCI_BASE_ADDRESS_0 + 24 or reg == PCI_ROM_ADDRESS):
            vfio_bar_fixup(vdev, reg)
    if hw_mask:
        cur = vdev.pdev.config.read(off, size)
        vdev.pdev.config_write(off, size, (cur & ~hw_mask) | (value & hw_mask))


def vfio_pci_config_rw(vdev: "VfioPciDevice", pos: int, count: int, data: bytes | None) -> bytes | int:
    """vfio_pci_config_rw(): aligned 4/2/1-byte accesses; EFAULT past the end."""
    size = vdev.pdev.config.size
    if pos < 0 or pos >= size or pos + count > size:
        raise fail(EFAULT, f"config space access {pos:#x}+{count:#x} beyond its {size} bytes")
    out = bytearray()
    done = 0
    while done < count:
        at = pos + done
        left = count - done
        n = 4 if left >= 4 and at % 4 == 0 else 2 if left >= 2 and at % 2 == 0 else 1
        if data is None:
            out += vfio_config_read(vdev, at, n).to_bytes(n, "little")
        else:
            vfio_config_write(vdev, at, n, int.from_bytes(data[done:done + n], "little"))
        done += n
    return bytes(out) if data is None else count
